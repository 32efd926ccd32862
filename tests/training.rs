//! The training engine on the built-in task (tiny ViT pretrained on Fashion-MNIST → MNIST 5k):
//! learning happens for every method and both baselines, results reload, runs are recorded,
//! and the worker honours stop, pause and panics.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use peft_studio::train::{
    EvalPoint, Event, NeverStop, RunStatus, RunStore, TrainConfig, reload_and_evaluate, train,
};
use peft_studio::worker::{Command, Worker};

fn store(name: &str) -> RunStore {
    let d = std::env::temp_dir().join(format!(
        "peft-studio-training-{}-{name}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&d);
    RunStore::new(d)
}

fn preset(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("presets")
        .join(name)
}

/// A quick-start preset shortened for tests.
fn quick(name: &str, extra: &[&str]) -> TrainConfig {
    let mut o: Vec<String> = [
        "optim.steps=120",
        "optim.warmup_steps=10",
        "optim.eval_every=60",
        "optim.batch_size=32",
        "data.max_eval=300",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    o.extend(extra.iter().map(|s| s.to_string()));
    TrainConfig::from_preset(&preset(name), &o).unwrap()
}

#[test]
fn every_method_and_baseline_learns_the_builtin_task() {
    let s = store("learn");
    let mut results = Vec::new();
    for p in [
        "quickstart-lora.toml",
        "quickstart-svfit.toml",
        "quickstart-loldu.toml",
        "baseline-head.toml",
        "baseline-full.toml",
    ] {
        let cfg = quick(p, &[]);
        let summary = train(&cfg, &s, &mut NeverStop, &mut |_| {}).unwrap();
        assert_eq!(summary.status, RunStatus::Finished, "{p}");
        let l = common::step_losses(&s, &summary.id);
        assert_eq!(l.len(), 120);
        let first: f64 = l[..5].iter().sum::<f64>() / 5.0;
        let last: f64 = l[l.len() - 5..].iter().sum::<f64>() / 5.0;
        let acc = summary.final_eval.unwrap().accuracy;
        results.push((p, first, last, acc));
    }
    for (p, first, last, acc) in &results {
        eprintln!("{p}: loss {first:.3} → {last:.3}, eval accuracy {acc:.3}");
    }
    for (p, first, last, acc) in results {
        assert!(
            last < 0.65 * first,
            "{p}: loss did not fall enough ({first:.3} → {last:.3})"
        );
        assert!(
            acc > 0.5,
            "{p}: eval accuracy {acc:.3} is not well above chance (0.1)"
        );
    }
    let (runs, problems) = s.list();
    assert_eq!(runs.len(), 5);
    assert!(problems.is_empty());
    // Trainable counts follow METHODS.md: LoRA r=8 on query/value of 4 layers of width 64
    // is 8·(64+64)·8 = 8,192; SVFit/LoLDU at r=64: 8·64 (+8 scales for LoLDU); head 650.
    let by = |m: &str| runs.iter().find(|r| r.method == m).unwrap().trainable;
    assert_eq!(by("lora"), 8_192 + 650);
    assert_eq!(by("svfit"), 512 + 650);
    assert_eq!(by("loldu"), 520 + 650);
    assert_eq!(by("head"), 650);
    assert_eq!(
        by("full"),
        runs.iter().find(|r| r.method == "full").unwrap().total
    );
    std::fs::remove_dir_all(s.root()).unwrap();
}

#[test]
fn saved_runs_reload_to_the_same_accuracy() {
    let s = store("reload");
    for p in [
        "quickstart-loldu.toml",
        "baseline-full.toml",
        "baseline-head.toml",
        "quickstart-lora.toml",
    ] {
        let cfg = quick(p, &["optim.steps=20", "optim.eval_every=20"]);
        let summary = train(&cfg, &s, &mut NeverStop, &mut |_| {}).unwrap();
        let again: EvalPoint = reload_and_evaluate(&s.root().join(&summary.id)).unwrap();
        let before = summary.final_eval.unwrap();
        assert_eq!(again.accuracy, before.accuracy, "{p}");
        assert!((again.loss - before.loss).abs() < 1e-4, "{p}");
    }
    std::fs::remove_dir_all(s.root()).unwrap();
}

#[test]
fn same_seed_same_run() {
    let s = store("seed");
    let cfg = quick(
        "quickstart-lora.toml",
        &[
            "optim.steps=12",
            "optim.eval_every=12",
            "optim.grad_accum=2",
        ],
    );
    let a = train(&cfg, &s, &mut NeverStop, &mut |_| {}).unwrap();
    let b = train(&cfg, &s, &mut NeverStop, &mut |_| {}).unwrap();
    assert_ne!(a.id, b.id, "each run gets its own folder");
    assert_eq!(
        common::step_losses(&s, &a.id),
        common::step_losses(&s, &b.id)
    );
    let cfg2 = quick(
        "quickstart-lora.toml",
        &["optim.steps=12", "optim.eval_every=12", "optim.seed=5"],
    );
    let c = train(&cfg2, &s, &mut NeverStop, &mut |_| {}).unwrap();
    assert_ne!(
        common::step_losses(&s, &a.id),
        common::step_losses(&s, &c.id)
    );
    std::fs::remove_dir_all(s.root()).unwrap();
}

#[test]
fn bad_input_fails_clearly_and_keeps_earlier_runs() {
    let s = store("bad");
    let ok = train(
        &quick("baseline-head.toml", &["optim.steps=3"]),
        &s,
        &mut NeverStop,
        &mut |_| {},
    )
    .unwrap();
    let before = std::fs::read(s.root().join(&ok.id).join("summary.json")).unwrap();

    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["adapter.rank=65"], "rank 65"),
        (vec!["adapter.targets=[\"nope\"]"], "nope"),
        (vec!["data.source.name=cifar"], "cifar"),
        (vec!["model.source.name=gpt5"], "gpt5"),
    ];
    for (o, needle) in cases {
        let cfg = quick("quickstart-lora.toml", &o);
        let e = format!(
            "{:#}",
            train(&cfg, &s, &mut NeverStop, &mut |_| {}).unwrap_err()
        );
        assert!(e.contains(needle), "{o:?}: {e}");
    }
    let missing = std::env::temp_dir().join("peft-studio-no-such.idx");
    let cfg = quick(
        "quickstart-lora.toml",
        &[&format!(
            "data.source={{ kind = \"idx\", images = \"{}\", labels = \"{}\" }}",
            missing.display(),
            missing.display()
        )],
    );
    let e = format!(
        "{:#}",
        train(&cfg, &s, &mut NeverStop, &mut |_| {}).unwrap_err()
    );
    assert!(e.contains("peft-studio-no-such.idx"), "{e}");
    let e = TrainConfig::from_preset(&preset("nope.toml"), &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope.toml"), "{e}");

    // A diverging run ends as failed, with the reason recorded.
    let cfg = quick(
        "baseline-full.toml",
        &[
            "optim.lr=1e12",
            "optim.max_grad_norm=100000000.0",
            "optim.warmup_steps=0",
        ],
    );
    let e = format!(
        "{:#}",
        train(&cfg, &s, &mut NeverStop, &mut |_| {}).unwrap_err()
    );
    assert!(e.contains("diverged"), "{e}");
    let (runs, _) = s.list();
    let failed = runs
        .iter()
        .find(|r| r.status == RunStatus::Failed)
        .expect("a failed run is recorded");
    assert!(failed.error.as_deref().unwrap().contains("diverged"));
    // Earlier runs are untouched.
    assert_eq!(
        std::fs::read(s.root().join(&ok.id).join("summary.json")).unwrap(),
        before
    );
    std::fs::remove_dir_all(s.root()).unwrap();
}

fn wait_for(w: &Worker, mut pred: impl FnMut(&Event) -> bool) -> Vec<Event> {
    let mut seen = Vec::new();
    loop {
        let e = w
            .events()
            .recv_timeout(Duration::from_secs(120))
            .expect("the worker went quiet");
        let done = pred(&e);
        seen.push(e);
        if done {
            return seen;
        }
    }
}

#[test]
fn worker_stops_pauses_and_takes_the_next_command() {
    let s = store("worker");
    let w = Worker::spawn(s.clone(), || {}).unwrap();
    let long = quick("quickstart-lora.toml", &["optim.steps=100000"]);
    w.send(Command::Start(Box::new(long.clone())));
    wait_for(&w, |e| matches!(e, Event::Step { step: 3, .. }));
    w.send(Command::Pause);
    wait_for(&w, |e| {
        matches!(e, Event::Phase(peft_studio::train::Phase::Paused))
    });
    w.send(Command::Start(Box::new(long)));
    wait_for(&w, |e| matches!(e, Event::Refused(_)));
    w.send(Command::Resume);
    wait_for(&w, |e| matches!(e, Event::Step { .. }));
    w.send(Command::Stop);
    let events = wait_for(&w, |e| {
        matches!(e, Event::RunFinished(_) | Event::RunFailed { .. })
    });
    let Some(Event::RunFinished(summary)) = events.last() else {
        panic!("expected a finished event, got {:?}", events.last())
    };
    assert_eq!(summary.status, RunStatus::Stopped);
    assert!(summary.steps_done >= 4 && summary.steps_done < 100000);
    assert!(
        summary.final_eval.is_some(),
        "a stopped run is evaluated where it stopped"
    );
    assert_eq!(
        common::step_losses(&s, &summary.id).len(),
        summary.steps_done
    );
    // The worker takes the next command.
    w.send(Command::Start(Box::new(quick(
        "baseline-head.toml",
        &["optim.steps=3"],
    ))));
    let events = wait_for(&w, |e| {
        matches!(e, Event::RunFinished(_) | Event::RunFailed { .. })
    });
    assert!(
        matches!(events.last(), Some(Event::RunFinished(s)) if s.status == RunStatus::Finished)
    );
    drop(w);
    std::fs::remove_dir_all(s.root()).unwrap();
}

#[test]
fn a_panic_in_a_run_becomes_a_failed_event() {
    let s = store("panic");
    let runner: peft_studio::worker::Runner = Arc::new(|cfg, store, ctl, emit| {
        let mut n = 0;
        let mut wrapped = |e: Event| {
            if matches!(e, Event::Step { .. }) {
                n += 1;
                assert!(n < 3, "injected failure at step {n}");
            }
            emit(e);
        };
        train(cfg, store, ctl, &mut wrapped)
    });
    let w = Worker::spawn_with(s.clone(), runner, || {}).unwrap();
    w.send(Command::Start(Box::new(quick("baseline-head.toml", &[]))));
    let events = wait_for(&w, |e| {
        matches!(e, Event::RunFinished(_) | Event::RunFailed { .. })
    });
    let Some(Event::RunFailed { error, summary }) = events.last() else {
        panic!("expected a failure, got {:?}", events.last())
    };
    assert!(error.contains("injected failure"), "{error}");
    let summary = summary.as_ref().expect("the run had started");
    assert_eq!(summary.status, RunStatus::Failed);
    let (runs, _) = s.list();
    assert_eq!(
        runs[0].status,
        RunStatus::Failed,
        "the store records the failure"
    );
    assert!(w.is_alive(), "the worker survives a panicking run");
    drop(w);
    std::fs::remove_dir_all(s.root()).unwrap();
}

#[test]
fn a_failure_that_cannot_be_recorded_is_reported_once() {
    let s = store("unrecorded");
    // A run that announces a folder which has no summary, then panics.
    let runner: peft_studio::worker::Runner = Arc::new(|_, _, _, emit| {
        emit(Event::RunStarted {
            run_id: "ghost".into(),
            name: "ghost".into(),
            method: "lora".into(),
            trainable: 1,
            total: 1,
            total_steps: 1,
            model: String::new(),
        });
        panic!("injected failure");
    });
    let w = Worker::spawn_with(s.clone(), runner, || {}).unwrap();
    w.send(Command::Start(Box::new(quick("baseline-head.toml", &[]))));
    let events = wait_for(&w, |e| matches!(e, Event::RunFailed { .. }));
    let notes: Vec<&String> = events
        .iter()
        .filter_map(|e| match e {
            Event::Log(t) if t.contains("could not record") => Some(t),
            _ => None,
        })
        .collect();
    assert_eq!(notes.len(), 1, "{events:?}");
    assert!(
        notes[0].contains("ghost") && notes[0].contains("summary.json"),
        "{}",
        notes[0]
    );
    assert!(
        matches!(events.last(), Some(Event::RunFailed { error, summary: None }) if error.contains("injected failure"))
    );
    drop(w);
    let _ = std::fs::remove_dir_all(s.root());
}

/// Continues for `n` steps, then says stop.
struct StopAfter(usize);

impl peft_studio::train::Controller for StopAfter {
    fn check(&mut self) -> peft_studio::train::Control {
        if self.0 == 0 {
            peft_studio::train::Control::Stop
        } else {
            self.0 -= 1;
            peft_studio::train::Control::Continue
        }
    }
}

#[test]
fn an_interrupted_run_resumes_to_the_same_result() {
    let s = store("resume");
    for p in ["quickstart-loldu.toml", "baseline-full.toml"] {
        let cfg = quick(
            p,
            &[
                "optim.steps=24",
                "optim.eval_every=8",
                "optim.checkpoint_every=10",
                "optim.grad_accum=2",
            ],
        );
        let whole = train(&cfg, &s, &mut NeverStop, &mut |_| {}).unwrap();
        let cut = train(&cfg, &s, &mut StopAfter(15), &mut |_| {}).unwrap();
        assert_eq!(cut.status, RunStatus::Stopped);
        assert_eq!(cut.steps_done, 15);
        assert!(
            s.root()
                .join(&cut.id)
                .join("checkpoint/state.safetensors")
                .is_file()
        );
        let resumed =
            peft_studio::train::resume(&s.root().join(&cut.id), &mut NeverStop, &mut |_| {})
                .unwrap();
        assert_eq!(resumed.id, cut.id, "{p}: the same run continues");
        assert_eq!(resumed.status, RunStatus::Finished);
        assert_eq!(resumed.steps_done, 24);
        assert_eq!(
            common::step_losses(&s, &whole.id),
            common::step_losses(&s, &cut.id),
            "{p}: every step's loss matches"
        );
        assert_eq!(resumed.final_eval, whole.final_eval, "{p}");
        let again = reload_and_evaluate(&s.root().join(&cut.id)).unwrap();
        assert_eq!(again.accuracy, whole.final_eval.unwrap().accuracy);
    }
    // A finished run is not trained over.
    let plain = train(
        &quick("baseline-head.toml", &["optim.steps=2"]),
        &s,
        &mut NeverStop,
        &mut |_| {},
    )
    .unwrap();
    let e = peft_studio::train::resume(&s.root().join(&plain.id), &mut NeverStop, &mut |_| {})
        .unwrap_err();
    assert!(e.to_string().contains("finished"), "{e}");
    // A run stopped without `checkpoint_every` resumes where it stopped.
    let cfg = quick(
        "baseline-head.toml",
        &["optim.steps=6", "optim.eval_every=3"],
    );
    let whole = train(&cfg, &s, &mut NeverStop, &mut |_| {}).unwrap();
    let cut = train(&cfg, &s, &mut StopAfter(4), &mut |_| {}).unwrap();
    assert_eq!((cut.status, cut.steps_done), (RunStatus::Stopped, 4));
    let resumed =
        peft_studio::train::resume(&s.root().join(&cut.id), &mut NeverStop, &mut |_| {}).unwrap();
    assert_eq!(resumed.steps_done, 6);
    assert_eq!(
        common::step_losses(&s, &whole.id),
        common::step_losses(&s, &cut.id)
    );
    assert_eq!(
        s.metrics(&whole.id).unwrap().len(),
        s.metrics(&cut.id).unwrap().len(),
        "the evaluation made where it stopped is not kept"
    );
    std::fs::remove_dir_all(s.root()).unwrap();
}

/// The device setting: a preset's `device` reaches the run (its log says where it computed), and
/// a GPU this binary cannot use fails before any work with an error that says how to get one.
#[test]
fn the_device_setting_is_used_and_a_missing_gpu_is_a_clear_error() {
    let s = store("device");
    let cfg = quick("quickstart-lora.toml", &["device=cpu", "optim.steps=4"]);
    assert_eq!(cfg.device, peft_studio::device::DeviceChoice::Cpu);
    let mut logs = Vec::new();
    let summary = train(&cfg, &s, &mut NeverStop, &mut |e| {
        if let peft_studio::train::Event::Log(l) = e {
            logs.push(l);
        }
    })
    .unwrap();
    assert_eq!(summary.status, RunStatus::Finished);
    assert!(
        logs.iter()
            .any(|l| l == "computing on cpu (device = \"cpu\")"),
        "{logs:?}"
    );
    if peft_studio::device::cuda_device_count() == 0 {
        let cfg = quick("quickstart-lora.toml", &["device=cuda:0"]);
        let err = format!(
            "{:#}",
            train(&cfg, &s, &mut NeverStop, &mut |_| {}).unwrap_err()
        );
        assert!(err.contains("cuda:0"), "{err}");
    }
    let bad = TrainConfig::from_preset(&preset("quickstart-lora.toml"), &["device=gpu".into()]);
    let err = bad.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("device") && err.contains("gpu"), "{err}");
}

/// Every training preset shipped in `presets/` loads (the DiffLoRA and attribute-reader presets
/// are other commands' and are checked by theirs), and a preset named after a method trains
/// that method: a user who runs `presets/smollm2-spam-svfit.toml` gets SVFit.
#[test]
fn every_training_preset_loads_and_trains_the_method_its_name_says() {
    use peft_studio::peft::Method;
    use peft_studio::train::TrainMode;
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("presets");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        if !file.ends_with(".toml") || !text.lines().any(|l| l.starts_with("mode = ")) {
            continue;
        }
        let cfg = TrainConfig::from_preset(&path, &[])
            .unwrap_or_else(|e| panic!("{file} does not load: {e}"));
        assert!(
            cfg.name.as_deref().is_some_and(|n| !n.is_empty()),
            "{file}: no name"
        );
        let stem = file.trim_end_matches(".toml");
        let method = if stem.ends_with("-svfit") {
            Some(Method::Svfit)
        } else if stem.ends_with("-loldu") {
            Some(Method::Loldu)
        } else if stem.ends_with("-lora") {
            Some(Method::Lora)
        } else {
            None
        };
        if let Some(m) = method {
            assert_eq!(cfg.mode, TrainMode::Adapter, "{file}");
            assert_eq!(cfg.adapter.method, m, "{file}");
        }
        if stem.ends_with("-full") {
            assert_eq!(cfg.mode, TrainMode::Full, "{file}");
        }
        checked += 1;
    }
    assert!(checked >= 14, "only {checked} training presets found");
}

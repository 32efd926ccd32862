//! The run store survives a kill at any instant: the real binary trains a tiny run and is
//! aborted at every named point of its saves (`PEFT_STUDIO_FAULT_AT`) and SIGKILLed at random
//! moments; every run folder left behind must parse, resume to completion and end with the
//! same adapter (byte for byte) and the same metrics as an uninterrupted run. Also: SIGINT and
//! SIGTERM stop a run cleanly, two processes cannot train one folder, a finished run is not
//! resumed over.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use peft_studio::train::{MetricLine, RunStatus, RunStore, RunSummary, TrainConfig};
use rand::{Rng, SeedableRng};

const BIN: &str = env!("CARGO_BIN_EXE_peft-studio");
const STEPS: usize = 8;

/// The tiny run: LoRA on the built-in tiny ViT, 64 training images, 8 steps, a checkpoint
/// every 2 steps, an evaluation every 4.
fn tiny_args(steps: usize) -> Vec<String> {
    let preset = concat!(env!("CARGO_MANIFEST_DIR"), "/presets/quickstart-lora.toml");
    let mut a: Vec<String> = vec!["train".into(), "--preset".into(), preset.into()];
    for s in [
        format!("optim.steps={steps}"),
        "optim.checkpoint_every=2".into(),
        "optim.eval_every=4".into(),
        "optim.warmup_steps=1".into(),
        "optim.batch_size=8".into(),
        "data.max_train=64".into(),
        "data.max_eval=32".into(),
    ] {
        a.push("--set".into());
        a.push(s);
    }
    a
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("peft-studio-faults-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn train_cmd(out: &Path, steps: usize) -> Command {
    let mut c = Command::new(BIN);
    c.args(tiny_args(steps))
        .arg("--out")
        .arg(out)
        .env_remove(peft_studio::fsio::FAULT_ENV)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

fn resume_cmd(folder: &Path) -> Command {
    let mut c = Command::new(BIN);
    c.arg("train")
        .arg("--resume")
        .arg(folder)
        .env_remove(peft_studio::fsio::FAULT_ENV)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The run folders under `out`.
fn runs_in(out: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(out)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// What must match an uninterrupted run: the adapter's bytes and the metrics (without the
/// seconds each step took).
#[derive(Debug, PartialEq)]
struct Outcome {
    weights: Vec<u8>,
    config: String,
    metrics: Vec<String>,
    steps_done: usize,
}

fn outcome(folder: &Path) -> Outcome {
    let id = folder.file_name().unwrap().to_str().unwrap();
    let store = RunStore::new(folder.parent().unwrap());
    let metrics = store
        .metrics(id)
        .unwrap()
        .into_iter()
        .map(|m| match m {
            MetricLine::Step { step, loss, lr, .. } => format!("step {step} {loss} {lr}"),
            MetricLine::Eval(e) => format!("eval {} {} {}", e.step, e.loss, e.accuracy),
        })
        .collect();
    let summary = summary(folder).expect("a finished run has a summary");
    assert_eq!(summary.status, RunStatus::Finished, "{}", folder.display());
    Outcome {
        weights: std::fs::read(folder.join("adapter/adapter_model.safetensors")).unwrap(),
        config: std::fs::read_to_string(folder.join("adapter/adapter_config.json")).unwrap(),
        metrics,
        steps_done: summary.steps_done,
    }
}

fn summary(folder: &Path) -> Option<RunSummary> {
    let t = std::fs::read_to_string(folder.join("summary.json")).ok()?;
    Some(serde_json::from_str(&t).unwrap_or_else(|e| {
        panic!(
            "{}: summary.json does not parse: {e}\n{t}",
            folder.display()
        )
    }))
}

/// The uninterrupted run, once per test binary.
fn reference() -> &'static (Outcome, Duration) {
    static R: OnceLock<(Outcome, Duration)> = OnceLock::new();
    R.get_or_init(|| {
        let out = scratch("reference");
        let t0 = Instant::now();
        let o = train_cmd(&out, STEPS).output().unwrap();
        let took = t0.elapsed();
        assert!(o.status.success(), "{}", text(&o));
        let runs = runs_in(&out);
        assert_eq!(runs.len(), 1);
        let r = outcome(&runs[0]);
        assert_eq!(r.steps_done, STEPS);
        let _ = std::fs::remove_dir_all(&out);
        (r, took)
    })
}

/// Checks that what a killed process left in `out` parses; returns its run folder, or `None`
/// when the kill came before the run had its config (nothing was trained, nothing is listed).
fn check_left_behind(out: &Path, what: &str) -> Option<PathBuf> {
    let runs = runs_in(out);
    assert!(runs.len() <= 1, "{what}: {runs:?}");
    let folder = runs.into_iter().next()?;
    let (listed, problems) = RunStore::new(out).list();
    assert!(problems.is_empty(), "{what}: {problems:?}");
    if !folder.join("config.toml").is_file() {
        assert!(listed.is_empty(), "{what}: a run without config is listed");
        return None;
    }
    TrainConfig::from_preset(&folder.join("config.toml"), &[])
        .unwrap_or_else(|e| panic!("{what}: config.toml: {e}"));
    let id = folder.file_name().unwrap().to_str().unwrap();
    RunStore::new(out)
        .metrics(id)
        .unwrap_or_else(|e| panic!("{what}: metrics: {e:#}"));
    if let Some(s) = summary(&folder) {
        assert!(s.steps_done <= STEPS, "{what}: {s:?}");
        assert_eq!(listed.len(), 1, "{what}");
    }
    Some(folder)
}

/// Resumes `folder` until it finishes (`kill_after` may cut each attempt short); returns the
/// step the first attempt resumed from.
fn resume_to_end(
    folder: &Path,
    what: &str,
    mut kill_after: impl FnMut() -> Option<Duration>,
) -> Option<usize> {
    let mut first = None;
    for attempt in 0..12 {
        if attempt > 0 && summary(folder).is_some_and(|s| s.status == RunStatus::Finished) {
            // The kill came after the run was recorded as finished.
            return first;
        }
        let mut child = resume_cmd(folder).spawn().unwrap();
        let cut = if attempt < 10 { kill_after() } else { None };
        if let Some(d) = cut {
            let t0 = Instant::now();
            while t0.elapsed() < d {
                if child.try_wait().unwrap().is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            let _ = child.kill();
        }
        let o = child.wait_with_output().unwrap();
        let out = text(&o);
        if attempt == 0 {
            first = out
                .split_once(" from step ")
                .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok());
        }
        if o.status.success() {
            return first;
        }
        if cut.is_none() {
            panic!("{what}: resume attempt {attempt} failed:\n{out}");
        }
        assert!(!out.contains("panicked"), "{what}: {out}");
        check_left_behind(folder.parent().unwrap(), what);
    }
    panic!("{what}: did not finish in 12 attempts");
}

/// Every named point of a run's saves, as `point@n` (the n-th time it is reached). The tiny
/// run checkpoints at steps 2, 4 and 6, writes its summary at the start, at each checkpoint
/// and at the end (5 times), and appends 10 metrics lines (8 steps, 2 evaluations).
fn faults() -> Vec<String> {
    let mut f = vec!["write-atomic:config.toml".to_string()];
    let mut each = |point: &str, times: usize| {
        f.extend((1..=times).map(|n| format!("{point}@{n}")));
    };
    each("write-atomic:summary.json", 5);
    each("metrics-half-line", 10);
    each("step-done", STEPS);
    for point in [
        "checkpoint-begin",
        "write-atomic:state.safetensors",
        "checkpoint-tensors-written",
        "write-atomic:state.json",
        "checkpoint-tmp-complete",
        "checkpoint-old-cleared",
        "checkpoint-rename-1",
        "checkpoint-rename-2",
        "checkpoint-done",
    ] {
        each(point, 3);
    }
    each("write-atomic:adapter_model.safetensors", 1);
    each("adapter-weights-written", 1);
    each("write-atomic:adapter_config.json", 1);
    f
}

/// The step a run aborted at `fault` must resume from: its newest checkpoint complete on disk
/// (the tiny run checkpoints at steps 2, 4 and 6).
fn expected_start(fault: &str) -> usize {
    let (point, n) = match fault.split_once('@') {
        Some((p, n)) => (p, n.parse::<usize>().unwrap()),
        None => (fault, 1),
    };
    // The newest checkpoint taken before step `s` finished.
    let before = |s: usize| (s.saturating_sub(1) / 2) * 2;
    match point {
        "write-atomic:summary.json" => (2 * (n - 1)).min(6),
        // Metrics lines: steps 1-4, the eval at 4, steps 5-8, the eval at 8.
        "metrics-half-line" => before([1, 2, 3, 4, 4, 5, 6, 7, 8, 8][n - 1]),
        "step-done" => before(n),
        "checkpoint-begin"
        | "write-atomic:state.safetensors"
        | "checkpoint-tensors-written"
        | "write-atomic:state.json" => 2 * (n - 1),
        "checkpoint-tmp-complete"
        | "checkpoint-old-cleared"
        | "checkpoint-rename-1"
        | "checkpoint-rename-2"
        | "checkpoint-done" => 2 * n,
        _ => 6,
    }
}

/// Aborts a training process at `fault`; returns the folder left behind (if the run started).
fn abort_at(fault: &str, out: &Path) -> Option<PathBuf> {
    let o = train_cmd(out, STEPS)
        .env(peft_studio::fsio::FAULT_ENV, fault)
        .output()
        .unwrap();
    let log = text(&o);
    assert!(
        !o.status.success(),
        "{fault}: the fault did not fire\n{log}"
    );
    assert!(log.contains("aborting at"), "{fault}: {log}");
    check_left_behind(out, fault)
}

#[test]
fn a_kill_at_every_point_of_a_save_leaves_a_run_that_resumes_to_the_same_result() {
    let (reference, _) = reference();
    let mut injected = 0;
    let mut not_started = 0;
    for (k, fault) in faults().iter().enumerate() {
        let out = scratch(&format!("point-{k}"));
        injected += 1;
        match abort_at(fault, &out) {
            Some(folder) => {
                let from = resume_to_end(&folder, fault, || None);
                assert_eq!(
                    from,
                    Some(expected_start(fault)),
                    "{fault}: resumed from the newest complete checkpoint"
                );
                assert_eq!(&outcome(&folder), reference, "{fault}");
            }
            None => not_started += 1,
        }
        let _ = std::fs::remove_dir_all(&out);
    }
    eprintln!(
        "{injected} faults injected at named points; {not_started} before the run had a config; 0 runs lost"
    );
    assert!(
        not_started <= 1,
        "only the config's own write comes before the run exists"
    );
}

#[test]
fn a_kill_inside_the_recovery_of_a_cut_save_is_recovered_too() {
    let (reference, _) = reference();
    for (k, (first, second)) in [
        ("checkpoint-rename-1@2", "recover-rename-1"),
        ("checkpoint-rename-1@2", "recover-rename-2"),
        ("checkpoint-tmp-complete@2", "checkpoint-begin@1"),
        ("checkpoint-rename-2@2", "checkpoint-rename-1@1"),
    ]
    .into_iter()
    .enumerate()
    {
        let out = scratch(&format!("recover-{k}"));
        let folder = abort_at(first, &out).expect("the run started");
        let o = resume_cmd(&folder)
            .env(peft_studio::fsio::FAULT_ENV, second)
            .output()
            .unwrap();
        assert!(!o.status.success(), "{first} then {second}: {}", text(&o));
        check_left_behind(&out, second);
        resume_to_end(&folder, second, || None);
        assert_eq!(&outcome(&folder), reference, "{first} then {second}");
        let _ = std::fs::remove_dir_all(&out);
    }
}

#[test]
fn random_sigkills_of_training_and_resuming_lose_nothing() {
    let (reference, took) = reference();
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let span = took.as_millis() as u64 + 50;
    let (mut kills, mut before_start, mut after_end, mut resumed) = (0, 0, 0, 0);
    for round in 0..30 {
        let out = scratch(&format!("random-{round}"));
        let mut child = train_cmd(&out, STEPS).spawn().unwrap();
        if round % 2 == 0 {
            // Any moment of the process.
            std::thread::sleep(Duration::from_millis(rng.random_range(0..span)));
        } else {
            // A moment of its training: after the first metrics line.
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(60)
                && child.try_wait().unwrap().is_none()
                && runs_in(&out).first().is_none_or(|f| {
                    std::fs::metadata(f.join("metrics.jsonl")).map_or(true, |m| m.len() == 0)
                })
            {
                std::thread::sleep(Duration::from_millis(1));
            }
            std::thread::sleep(Duration::from_millis(rng.random_range(0..200)));
        }
        let _ = child.kill();
        child.wait().unwrap();
        kills += 1;
        let what = format!("random kill {round}");
        let Some(folder) = check_left_behind(&out, &what) else {
            before_start += 1;
            let _ = std::fs::remove_dir_all(&out);
            continue;
        };
        if summary(&folder).is_some_and(|s| s.status == RunStatus::Finished) {
            after_end += 1;
            assert_eq!(&outcome(&folder), reference, "{what}");
            let _ = std::fs::remove_dir_all(&out);
            continue;
        }
        resumed += 1;
        // Resuming is killed at random moments too, three times at most.
        let mut cuts = 0;
        resume_to_end(&folder, &what, || {
            if cuts < 3 && rng.random_bool(0.7) {
                cuts += 1;
                kills += 1;
                Some(Duration::from_millis(rng.random_range(0..span)))
            } else {
                None
            }
        });
        assert_eq!(&outcome(&folder), reference, "{what}");
        let _ = std::fs::remove_dir_all(&out);
    }
    eprintln!(
        "{kills} random SIGKILLs: {before_start} before the run had a config, {after_end} after it finished, {resumed} runs resumed to the same result; 0 runs lost"
    );
    assert!(resumed >= 10, "too few kills landed inside a run");
}

fn wait_for_steps(folder_parent: &Path, n: usize, child: &mut std::process::Child) -> PathBuf {
    let t0 = Instant::now();
    loop {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before it could be interrupted"
        );
        if let Some(f) = runs_in(folder_parent).into_iter().next() {
            let steps = std::fs::read_to_string(f.join("metrics.jsonl"))
                .map(|t| t.matches("\"kind\":\"step\"").count())
                .unwrap_or(0);
            if steps >= n {
                return f;
            }
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "no progress");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn sigint_and_sigterm_stop_between_steps_and_the_run_resumes() {
    const LONG: usize = 400;
    for (signal, code) in [("-INT", 130), ("-TERM", 143)] {
        let out = scratch(&format!("signal{signal}"));
        let mut child = train_cmd(&out, LONG).spawn().unwrap();
        let folder = wait_for_steps(&out, 3, &mut child);
        let sent = Command::new("kill")
            .arg(signal)
            .arg(child.id().to_string())
            .status()
            .unwrap();
        assert!(sent.success());
        let o = child.wait_with_output().unwrap();
        let log = text(&o);
        assert_eq!(o.status.code(), Some(code), "{signal}: {log}");
        assert!(log.contains("stopped by SIG"), "{log}");
        assert!(log.contains("--resume"), "{log}");
        let s = summary(&folder).unwrap();
        assert_eq!(s.status, RunStatus::Stopped, "{signal}");
        assert!(s.steps_done >= 3 && s.steps_done < LONG, "{s:?}");
        let steps = RunStore::new(&out)
            .metrics(folder.file_name().unwrap().to_str().unwrap())
            .unwrap()
            .iter()
            .filter(|m| matches!(m, MetricLine::Step { .. }))
            .count();
        assert_eq!(s.steps_done, steps, "steps_done counts the steps recorded");
        let meta = std::fs::read_to_string(folder.join("checkpoint/state.json")).unwrap();
        assert!(
            meta.contains(&format!("\"step\": {}", s.steps_done)),
            "a stop writes a checkpoint where it stopped: {meta}"
        );
        if signal == "-INT" {
            // Resumes to exactly what an uninterrupted run gives.
            resume_to_end(&folder, signal, || None);
            let whole = scratch("signal-whole");
            let o = train_cmd(&whole, LONG).output().unwrap();
            assert!(o.status.success(), "{}", text(&o));
            assert_eq!(outcome(&folder), outcome(&runs_in(&whole)[0]));
            let _ = std::fs::remove_dir_all(&whole);
        }
        let _ = std::fs::remove_dir_all(&out);
    }
}

#[test]
fn one_process_per_run_folder_and_finished_runs_are_not_resumed_over() {
    let out = scratch("lock");
    let o = train_cmd(&out, 4).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let folder = runs_in(&out).remove(0);
    let before = std::fs::read(folder.join("adapter/adapter_model.safetensors")).unwrap();
    let metrics_before = std::fs::read(folder.join("metrics.jsonl")).unwrap();

    // A finished run is refused, and left as it was.
    let o = resume_cmd(&folder).output().unwrap();
    let log = text(&o);
    assert!(!o.status.success(), "{log}");
    assert!(log.contains("finished") && log.contains("--force"), "{log}");
    assert_eq!(
        std::fs::read(folder.join("adapter/adapter_model.safetensors")).unwrap(),
        before
    );
    assert_eq!(
        std::fs::read(folder.join("metrics.jsonl")).unwrap(),
        metrics_before
    );

    // --force trains a new run from its config.
    let o = resume_cmd(&folder).arg("--force").output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let runs = runs_in(&out);
    assert_eq!(runs.len(), 2, "a new run folder");
    let new = runs.iter().find(|r| **r != folder).unwrap();
    assert_eq!(summary(new).unwrap().status, RunStatus::Finished);
    assert_eq!(
        std::fs::read(folder.join("adapter/adapter_model.safetensors")).unwrap(),
        before
    );

    // While this process holds a run's lock, another process cannot train it.
    let cut = scratch("lock-cut");
    let folder = abort_at("checkpoint-done@1", &cut).unwrap();
    let layout = peft_studio::train::RunLayout::new(&folder);
    let lock = peft_studio::train::RunLock::acquire(&layout).unwrap();
    let o = resume_cmd(&folder).output().unwrap();
    let log = text(&o);
    assert!(!o.status.success(), "{log}");
    assert!(
        log.contains(&folder.display().to_string())
            && log.contains(&format!("pid {}", std::process::id())),
        "{log}"
    );
    // So is this process while another one holds it.
    let e = peft_studio::train::resume(&folder, &mut peft_studio::train::NeverStop, &mut |_| {})
        .unwrap_err();
    assert!(e.to_string().contains("another peft-studio process"), "{e}");
    let store = RunStore::new(&cut);
    let id = folder.file_name().unwrap().to_str().unwrap();
    assert!(store.is_training(id));
    drop(lock);
    assert!(
        !store.is_training(id),
        "the summary says running, but nobody trains it"
    );
    // Released (also when its process is killed): the run resumes.
    resume_to_end(&folder, "after the lock", || None);
    let _ = std::fs::remove_dir_all(&out);
    let _ = std::fs::remove_dir_all(&cut);
}

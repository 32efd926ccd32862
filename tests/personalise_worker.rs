//! Personalisation as a worker job, on a tiny personaliser built once for this binary: the
//! stages come in order and end in the galleries (the same as `Personaliser::personalise`
//! draws) and the files; Cancel, at a drawing step or a direct-tuning step, ends the job as
//! cancelled with nothing written; a panic inside the job becomes a failure and the worker
//! takes the next command; and the worker runs one job at a time (a personalisation is refused
//! during a training run, a training run during a personalisation).

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use common::TempDir;
use crossbeam_channel::{Receiver, Sender};
use peft_studio::personalize::build::{DiffLoraPreset, Stage as BuildStage, build};
use peft_studio::personalize::commands::sample_person;
use peft_studio::personalize::job::{self, PersonaliseEvent, PersonaliseRequest};
use peft_studio::personalize::pipeline::Personaliser;
use peft_studio::personalize::progress::{GalleryKind, Stage};
use peft_studio::train::{Control, Event, Phase, RunFailure, RunStore};
use peft_studio::worker::{Command, PersonaliseRunner, Runners, Worker};

/// The tiny personaliser, built once for all the tests of this binary.
fn tiny() -> Arc<Personaliser> {
    static MODEL: OnceLock<Arc<Personaliser>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let dir = std::env::temp_dir().join(format!(
                "peft-studio-personalise-worker-{}/tiny-personaliser",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            build(
                &DiffLoraPreset::tiny(&dir),
                BuildStage::All,
                &candle_core::Device::Cpu,
                &mut |_, _, _, _| {},
            )
            .expect("the tiny personaliser builds");
            Arc::new(
                Personaliser::load(&dir, &candle_core::Device::Cpu)
                    .expect("the tiny personaliser loads"),
            )
        })
        .clone()
}

fn request(prompt: &str, out: Option<PathBuf>) -> PersonaliseRequest {
    let p = tiny();
    let references = sample_person(1, p.image_size());
    PersonaliseRequest {
        personaliser: p,
        references,
        prompt: prompt.to_string(),
        n: 2,
        seed: 3,
        compare_base: true,
        compare_direct: true,
        out,
    }
}

fn store(dir: &TempDir) -> RunStore {
    RunStore::new(dir.path("runs"))
}

/// The worker's events up to and including the first that `end` accepts.
fn events_until(w: &Worker, end: impl Fn(&Event) -> bool) -> Vec<Event> {
    let mut seen = Vec::new();
    loop {
        let e = w
            .events()
            .recv_timeout(Duration::from_secs(300))
            .unwrap_or_else(|_| panic!("the worker went quiet after {seen:?}"));
        let done = end(&e);
        seen.push(e);
        if done {
            return seen;
        }
    }
}

/// Whether `e` ends a personalisation job.
fn job_end(e: &Event) -> bool {
    matches!(
        e,
        Event::Personalise(
            PersonaliseEvent::Finished(_)
                | PersonaliseEvent::Failed(_)
                | PersonaliseEvent::Cancelled
                | PersonaliseEvent::Refused(_)
        )
    )
}

/// The stages among `events`.
fn stages(events: &[Event]) -> Vec<Stage> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Personalise(PersonaliseEvent::Progress(s)) => Some(*s),
            _ => None,
        })
        .collect()
}

/// Files under `dir` (none when it does not exist).
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            found.extend(files_under(&p));
        } else {
            found.push(p);
        }
    }
    found
}

#[test]
fn a_job_reports_its_stages_in_order_then_its_galleries_and_files() {
    let dir = TempDir::new("stages");
    let woken = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&woken);
    let w = Worker::spawn(store(&dir), move || {
        counter.fetch_add(1, Ordering::SeqCst);
    })
    .unwrap();
    let out = dir.path("out");
    w.send(Command::Personalise(Box::new(request(
        "smile, hat",
        Some(out.clone()),
    ))));
    let events = events_until(&w, job_end);

    let p = tiny();
    let draw = |gallery| {
        let steps = p.preset().sampling.steps;
        (1..=steps).map(move |step| Stage::Drawing {
            gallery,
            images: 2,
            step,
            steps,
        })
    };
    let tune_steps = p.recipe().steps;
    let mut expected = vec![
        Stage::EncodingReferences,
        Stage::SamplingLatent,
        Stage::DecodingLora,
        Stage::Merging,
    ];
    expected.extend(draw(GalleryKind::DiffLora));
    expected.extend(draw(GalleryKind::Base));
    expected.extend((1..=tune_steps).map(|step| Stage::DirectTuning {
        step,
        steps: tune_steps,
    }));
    expected.extend(draw(GalleryKind::Direct));
    expected.push(Stage::Saving);
    assert_eq!(stages(&events), expected);

    let Some(Event::Personalise(PersonaliseEvent::Finished(r))) = events.last() else {
        panic!("expected the result, got {:?}", events.last())
    };
    assert_eq!(r.diff.images.len(), 2);
    assert_eq!(r.diff.scores.len(), 2);
    assert_eq!(r.base.as_ref().expect("the base gallery").images.len(), 2);
    let direct = r.direct.as_ref().expect("the direct gallery");
    assert_eq!(direct.gallery.images.len(), 2);
    assert!(direct.train_seconds > 0.0);
    // One implementation: the job draws what `Personaliser::personalise` draws.
    let req = request("smile, hat", None);
    let same = p
        .personalise(&req.references, &req.prompt, req.n, req.seed)
        .unwrap();
    assert_eq!(same.lora, r.lora);
    assert_eq!(same.gallery.images, r.diff.images);
    let written = r.written.as_ref().expect("the files");
    for f in ["images/01.png", "images/02.png", "sheet.png"] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    assert_eq!(written.images.len(), 2);
    assert!(written.adapter.join("adapter_config.json").is_file());
    // Every event woke the window.
    assert!(woken.load(Ordering::SeqCst) >= events.len());
}

/// Which stage to stop at.
type StageTest = fn(&Stage) -> bool;

/// A personalisation that, at the first stage `at` accepts, tells the test (`reached`) and
/// waits for it (`gate`) before going on; other requests run straight through.
fn held_at(at: StageTest, reached: Sender<Stage>, gate: Receiver<()>) -> PersonaliseRunner {
    Arc::new(move |req, progress| {
        let mut held = req.prompt != "hold";
        job::run(req, &mut |stage| {
            let flow = progress(stage);
            if !held && at(&stage) {
                held = true;
                reached.send(stage).unwrap();
                gate.recv().unwrap();
            }
            flow
        })
    })
}

fn runners(personalise: PersonaliseRunner) -> Runners {
    Runners {
        personalise,
        ..Runners::default()
    }
}

#[test]
fn cancel_mid_job_ends_it_as_cancelled_with_nothing_written() {
    let points: [(&str, StageTest); 2] = [
        ("a drawing step", |s| {
            matches!(
                s,
                Stage::Drawing {
                    gallery: GalleryKind::DiffLora,
                    step: 1,
                    ..
                }
            )
        }),
        ("a direct-tuning step", |s| {
            matches!(s, Stage::DirectTuning { step: 1, .. })
        }),
    ];
    for (what, at) in points {
        let dir = TempDir::new("cancel");
        let (reached_tx, reached) = crossbeam_channel::unbounded();
        let (open, gate) = crossbeam_channel::unbounded();
        let w = Worker::spawn_runners(store(&dir), runners(held_at(at, reached_tx, gate)), || {})
            .unwrap();
        let out = dir.path("out");
        w.send(Command::Personalise(Box::new(request(
            "hold",
            Some(out.clone()),
        ))));
        let stage = reached
            .recv_timeout(Duration::from_secs(300))
            .unwrap_or_else(|_| panic!("{what}: never reached"));
        w.send(Command::CancelPersonalise);
        open.send(()).unwrap();
        let events = events_until(&w, job_end);
        assert!(
            matches!(
                events.last(),
                Some(Event::Personalise(PersonaliseEvent::Cancelled))
            ),
            "{what}: {:?}",
            events.last()
        );
        assert_eq!(stages(&events).last(), Some(&stage), "{what}");
        assert!(
            files_under(&out).is_empty(),
            "{what}: {:?}",
            files_under(&out)
        );
        // The worker goes on: the next job runs to its end (and writes its files).
        w.send(Command::Personalise(Box::new(request(
            "smile",
            Some(out.clone()),
        ))));
        let events = events_until(&w, job_end);
        assert!(
            matches!(
                events.last(),
                Some(Event::Personalise(PersonaliseEvent::Finished(_)))
            ),
            "{what}: {:?}",
            events.last()
        );
        assert!(out.join("sheet.png").is_file());
    }
}

#[test]
fn a_panic_in_a_job_becomes_a_failure_and_the_worker_takes_the_next_command() {
    let dir = TempDir::new("panic");
    let runner: PersonaliseRunner = Arc::new(|req, progress| {
        job::run(req, &mut |stage| {
            assert!(
                !(req.prompt == "panic" && stage == Stage::Merging),
                "injected panic while merging"
            );
            progress(stage)
        })
    });
    let w = Worker::spawn_runners(store(&dir), runners(runner), || {}).unwrap();
    let out = dir.path("out");
    w.send(Command::Personalise(Box::new(request(
        "panic",
        Some(out.clone()),
    ))));
    let events = events_until(&w, job_end);
    let Some(Event::Personalise(PersonaliseEvent::Failed(error))) = events.last() else {
        panic!("expected a failure, got {:?}", events.last())
    };
    assert!(error.contains("internal error"), "{error}");
    assert!(error.contains("injected panic while merging"), "{error}");
    assert!(files_under(&out).is_empty());
    assert!(w.is_alive(), "the worker survives a panicking job");
    w.send(Command::Personalise(Box::new(request("smile", None))));
    let events = events_until(&w, job_end);
    assert!(
        matches!(
            events.last(),
            Some(Event::Personalise(PersonaliseEvent::Finished(_)))
        ),
        "{:?}",
        events.last()
    );
}

#[test]
fn the_worker_runs_one_job_at_a_time() {
    let dir = TempDir::new("one-job");
    // A training run that goes on until stopped.
    let train: peft_studio::worker::Runner = Arc::new(|_, _, ctl, emit| {
        emit(Event::Phase(Phase::Training));
        while ctl.check() != Control::Stop {
            std::thread::sleep(Duration::from_millis(2));
        }
        Err(RunFailure::from(anyhow::anyhow!("stopped by the test")))
    });
    let (reached_tx, reached) = crossbeam_channel::unbounded();
    let (open, gate) = crossbeam_channel::unbounded();
    let personalise = held_at(|s| *s == Stage::EncodingReferences, reached_tx, gate);
    let w = Worker::spawn_runners(store(&dir), Runners { train, personalise }, || {}).unwrap();

    // During a training run, a personalisation is refused and the run goes on.
    w.send(Command::Start(Box::default()));
    events_until(&w, |e| matches!(e, Event::Phase(Phase::Training)));
    w.send(Command::Personalise(Box::new(request("smile", None))));
    let events = events_until(&w, job_end);
    let Some(Event::Personalise(PersonaliseEvent::Refused(why))) = events.last() else {
        panic!("expected a refusal, got {:?}", events.last())
    };
    assert!(why.contains("training run is in progress"), "{why}");
    w.send(Command::Stop);
    events_until(&w, |e| matches!(e, Event::RunFailed { .. }));

    // During a personalisation, a training run is refused and the job goes on.
    w.send(Command::Personalise(Box::new(request("hold", None))));
    reached.recv_timeout(Duration::from_secs(300)).unwrap();
    w.send(Command::Start(Box::default()));
    open.send(()).unwrap();
    let events = events_until(&w, job_end);
    let refusal = events.iter().find_map(|e| match e {
        Event::RunFailed { error, summary } => Some((error, summary)),
        _ => None,
    });
    let (error, summary) = refusal.expect("the training run is refused");
    assert!(error.contains("personalisation is in progress"), "{error}");
    assert!(summary.is_none());
    assert!(
        !events.iter().any(|e| matches!(e, Event::Phase(_))),
        "no run started"
    );
    assert!(matches!(
        events.last(),
        Some(Event::Personalise(PersonaliseEvent::Finished(_)))
    ));
}

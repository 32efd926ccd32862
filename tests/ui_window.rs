//! The window beyond training: a small (640 × 480) window that still shows its content, the
//! Compare tab with finished, stopped and failed runs (two of one name), a typed path when no
//! file dialog can open, the runs folder shown absolute and chosen in the settings, Resume of
//! a stopped run, unreadable metrics reported once, and a window that does not repaint
//! continuously while a spinner turns or while idle.

use std::path::{Path, PathBuf};
use std::time::Duration;

use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use peft_studio::app::{AppOptions, FilePicker, StudioApp, UiState, scripted_picker};
use peft_studio::train::{EvalPoint, MetricLine, RunStatus, RunSummary};
use peft_studio::worker::Runners;

mod ui_support;
use ui_support::run_until;

fn temp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("peft-studio-uiw-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn harness_with(
    runs_dir: PathBuf,
    picker: FilePicker,
    size: egui::Vec2,
) -> Harness<'static, StudioApp> {
    let options = AppOptions {
        personaliser_dir: runs_dir.join("no-personaliser"),
        runs_dir,
        picker,
        persist: false,
        runners: Runners::default(),
    };
    Harness::builder()
        .with_size(size)
        .build_eframe(move |cc| StudioApp::new(cc, options))
}

fn big() -> egui::Vec2 {
    egui::vec2(1280.0, 820.0)
}

/// A deterministic loss curve.
fn curve(steps: usize, floor: f64, speed: f64) -> Vec<[f64; 2]> {
    (1..=steps)
        .map(|s| {
            let wobble = (((s as u64 * 2654435761) % 1000) as f64 / 1000.0 - 0.5) * 0.1;
            let x = s as f64;
            [
                x,
                (2.3 - floor) * (-x / speed).exp() + floor + wobble * (0.3 + floor),
            ]
        })
        .collect()
}

/// A stored run: (id, name, method, trainable, accuracy, steps done, status).
fn fake_run(
    store: &Path,
    (id, name, method, trainable, acc, done, status): (
        &str,
        &str,
        &str,
        usize,
        f64,
        usize,
        RunStatus,
    ),
) {
    let dir = store.join(id);
    std::fs::create_dir_all(&dir).unwrap();
    let mut lines = String::new();
    for p in curve(done, 1.0 - acc, 120.0) {
        let m = MetricLine::Step {
            step: p[0] as usize,
            loss: p[1],
            lr: 1e-3,
            secs: 0.03,
        };
        lines += &format!("{}\n", serde_json::to_string(&m).unwrap());
        if (p[0] as usize).is_multiple_of(50) {
            let e = EvalPoint {
                step: p[0] as usize,
                loss: p[1] * 1.1,
                accuracy: acc * (1.0 - (-p[0] / 120.0).exp() * 0.8),
                perplexity: None,
            };
            lines += &format!("{}\n", serde_json::to_string(&MetricLine::Eval(e)).unwrap());
        }
    }
    std::fs::write(dir.join("metrics.jsonl"), lines).unwrap();
    let eval = EvalPoint {
        step: done,
        loss: 0.4,
        accuracy: acc,
        perplexity: None,
    };
    let s = RunSummary {
        id: id.into(),
        name: name.into(),
        method: method.into(),
        rank: Some(8),
        model: "tiny-vit-fmnist".into(),
        dataset: "mnist-5k".into(),
        trainable,
        total: 139_018,
        steps_done: done,
        total_steps: 400,
        final_train_loss: Some(0.4),
        final_eval: Some(eval),
        best_eval: Some(eval),
        wall_secs: 30.0,
        secs_per_step: 0.03,
        peak_rss_mib: 230.0,
        error: (status == RunStatus::Failed).then(|| "training diverged".into()),
        status,
        started_at: format!(
            "2026-11-29T{}:{}:{}+00:00",
            &id[9..11],
            &id[11..13],
            &id[13..15]
        ),
    };
    std::fs::write(
        dir.join("summary.json"),
        serde_json::to_string_pretty(&s).unwrap(),
    )
    .unwrap();
}

/// Three runs: two named "LoRA r8" (one finished, one stopped half-way) and a failed SVFit.
fn three_runs(store: &Path) -> [&'static str; 3] {
    let ids = [
        "20261129-101500-lora-r8",
        "20261129-114200-lora-r8",
        "20261129-123000-svfit-r64",
    ];
    fake_run(
        store,
        (
            ids[0],
            "LoRA r8",
            "lora",
            8_842,
            0.875,
            400,
            RunStatus::Finished,
        ),
    );
    fake_run(
        store,
        (
            ids[1],
            "LoRA r8",
            "lora",
            8_842,
            0.71,
            200,
            RunStatus::Stopped,
        ),
    );
    fake_run(
        store,
        (
            ids[2],
            "SVFit r64",
            "svfit",
            1_162,
            0.83,
            300,
            RunStatus::Failed,
        ),
    );
    ids
}

/// A run in progress, drawn by the Fine-tune tab.
fn mid_run(app: &mut StudioApp) {
    app.run.state = UiState::Training;
    app.run.name = "LoRA r8".into();
    app.run.step = 180;
    app.run.total_steps = 400;
    app.run.secs_per_step = 0.031;
    app.run.train_loss = curve(180, 0.3, 100.0);
    app.run.eval_loss = vec![[50.0, 1.2], [100.0, 0.8], [150.0, 0.6]];
    app.run.eval_accuracy = vec![[50.0, 0.55], [100.0, 0.74], [150.0, 0.8]];
}

#[test]
fn snapshots_of_a_small_window() {
    let dir = temp("small");
    let runs = dir.join("runs");
    three_runs(&runs);
    let mut h = harness_with(
        runs.clone(),
        scripted_picker(vec![]),
        egui::vec2(640.0, 480.0),
    );
    run_until(&mut h, 30, "the dataset preview", |a| {
        a.form_preview_ready()
    });
    mid_run(h.state_mut());
    h.run_steps(4);
    // The state line and the trainable count are on screen, not cut off by the form.
    h.get_by_label_contains("State: training");
    h.get_by_label_contains("trainable:");
    ui_support::mask_runs_folder(&mut h);
    h.snapshot("small_window_fine_tune");
    // Hiding the form leaves the charts the whole width.
    h.get_by_label("Hide form").click();
    h.run_steps(3);
    assert!(!h.state().settings.form_open);
    h.get_by_label("Show form");
    h.state_mut().run.state = UiState::Finished;
    h.get_by_label("Compare").click();
    h.run_steps(3);
    h.snapshot("small_window_compare");
    drop(h);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn snapshot_of_compare_with_three_runs() {
    let dir = temp("three");
    let runs = dir.join("runs");
    let ids = three_runs(&runs);
    let mut h = harness_with(runs, scripted_picker(vec![]), big());
    h.get_by_label("Compare").click();
    h.run_steps(2);
    for id in ids {
        h.state_mut().select_for_overlay(id);
    }
    h.run_steps(4);
    // Two runs of one name are two entries; stopped and failed runs say so.
    h.get_by_label_contains("stopped at 200/400");
    h.get_by_label("failed");
    h.get_by_label("finished");
    assert!(h.state().errors.is_empty(), "{:?}", h.state().errors);
    h.snapshot("compare_three_runs");
    drop(h);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_typed_path_replaces_a_dialog_that_cannot_open() {
    let dir = temp("typed");
    let preset = dir.join("p.toml");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("presets/quickstart-svfit.toml"),
        &preset,
    )
    .unwrap();
    let picker = peft_studio::app::unavailable_picker("no portal, no zenity");
    let mut h = harness_with(dir.join("runs"), picker, big());
    h.get_by_label("Load preset…").click();
    run_until(&mut h, 10, "the dialog error", |a| a.typed_path_open());
    h.get_by_label_contains("No file dialog could open");
    h.get_by_label_contains("Type the path for: Load a preset");
    h.get_by_role(egui::accesskit::Role::TextInput).focus();
    h.run_steps(1);
    h.get_by_role(egui::accesskit::Role::TextInput)
        .type_text(&preset.display().to_string());
    h.run_steps(2);
    h.get_by_label("Open").click();
    run_until(&mut h, 10, "the preset", |a| {
        a.settings.last_preset.is_some()
    });
    assert_eq!(
        h.state().settings.last_preset.as_deref(),
        Some(preset.as_path())
    );
    assert_eq!(
        h.state().settings.config.adapter.method,
        peft_studio::peft::Method::Svfit
    );
    assert!(!h.state().typed_path_open());
    drop(h);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_runs_folder_is_absolute_and_chosen_in_the_settings() {
    let dir = temp("folder");
    let other = dir.join("other-runs");
    three_runs(&other);
    // A relative folder is shown absolute.
    let relative = PathBuf::from("peft-studio-relative-runs-never-created");
    let mut h = harness_with(relative, scripted_picker(vec![Some(other.clone())]), big());
    assert!(h.state().runs_dir().is_absolute());
    h.get_by_label("Compare").click();
    h.run_steps(2);
    h.get_by_label_contains("No runs yet in /");
    h.get_by_label("Settings").click();
    h.run_steps(2);
    h.get_by_label("Choose…").click();
    run_until(&mut h, 10, "the new folder", |a| a.runs.len() == 3);
    assert_eq!(h.state().runs_dir(), other.as_path());
    assert_eq!(
        h.state().settings.runs_dir.as_deref(),
        Some(other.as_path())
    );
    h.get_by_label(&other.display().to_string());
    drop(h);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn unreadable_metrics_are_reported_once() {
    let dir = temp("metrics");
    let runs = dir.join("runs");
    let ids = three_runs(&runs);
    std::fs::write(runs.join(ids[0]).join("metrics.jsonl"), "not json\n{}\n").unwrap();
    let mut h = harness_with(runs, scripted_picker(vec![]), big());
    h.get_by_label("Compare").click();
    h.state_mut().select_for_overlay(ids[0]);
    h.state_mut().select_for_overlay(ids[1]);
    h.run_steps(10);
    let reported = h
        .state()
        .errors
        .iter()
        .filter(|e| e.title.contains("metrics could not be read"))
        .count();
    assert_eq!(reported, 1, "{:?}", h.state().errors);
    assert!(h.state().errors[0].details.contains("metrics.jsonl"));
    drop(h);
    let _ = std::fs::remove_dir_all(&dir);
}

fn repaint_delay(h: &Harness<'static, StudioApp>) -> Duration {
    h.output()
        .viewport_output
        .get(&egui::ViewportId::ROOT)
        .map_or(Duration::MAX, |v| v.repaint_delay)
}

#[test]
fn the_window_sleeps_when_idle_and_animates_gently() {
    let dir = temp("repaint");
    let mut h = harness_with(dir.join("runs"), scripted_picker(vec![]), big());
    run_until(&mut h, 30, "the dataset preview", |a| {
        a.form_preview_ready()
    });
    // Idle: no repaint requested at all.
    h.try_run().expect("an idle window settles");
    assert!(
        repaint_delay(&h) > Duration::from_secs(10),
        "{:?}",
        repaint_delay(&h)
    );
    // Loading (a spinner turns): a few frames a second, never every frame.
    h.state_mut().run.state = UiState::Loading;
    h.try_run()
        .expect("a spinner does not repaint continuously");
    let d = repaint_delay(&h);
    assert!(
        d >= Duration::from_millis(50) && d <= Duration::from_millis(250),
        "{d:?}"
    );
    drop(h);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A short run on the built-in model and data that checkpoints every 5 steps.
fn write_preset(dir: &Path) -> PathBuf {
    let p = dir.join("resumable.toml");
    std::fs::write(
        &p,
        r#"name = "resumable"
mode = "adapter"
[model]
source = { kind = "builtin", name = "tiny-vit-fmnist" }
[data]
source = { kind = "builtin", name = "mnist-5k" }
max_eval = 100
[adapter]
method = "lora"
rank = 4
[optim]
lr = 5e-3
steps = 200
eval_every = 10
batch_size = 16
warmup_steps = 2
checkpoint_every = 5
"#,
    )
    .unwrap();
    p
}

#[test]
fn resume_continues_a_stopped_run() {
    let dir = temp("resume");
    let preset = write_preset(&dir);
    let mut h = harness_with(dir.join("runs"), scripted_picker(vec![Some(preset)]), big());
    h.get_by_label("Load preset…").click();
    run_until(&mut h, 30, "the preset", |a| {
        a.settings.last_preset.is_some()
    });
    run_until(&mut h, 30, "the preview", |a| a.form_preview_ready());
    h.get_by_label("Start training").click();
    run_until(&mut h, 60, "a checkpoint", |a| a.run.step >= 12);
    h.get_by_label("Pause").click();
    run_until(&mut h, 30, "the pause", |a| a.run.state == UiState::Paused);
    // The running run is listed in Compare while it trains.
    h.get_by_label("Compare").click();
    h.run_steps(2);
    h.get_by_label_contains("running ");
    h.get_by_label("Fine-tune").click();
    h.run_steps(2);
    h.get_by_label("Stop").click();
    run_until(&mut h, 60, "the stop", |a| a.run.state == UiState::Stopped);
    let stopped = h.state().runs[0].clone();
    assert_eq!(stopped.status, RunStatus::Stopped);
    assert!(stopped.steps_done < 200);
    h.get_by_label("Compare").click();
    h.run_steps(2);
    h.get_by_label("resume").click();
    h.run_steps(2);
    run_until(&mut h, 120, "the resumed run", |a| {
        a.run.state == UiState::Finished
    });
    let done = h
        .state()
        .runs
        .iter()
        .find(|r| r.id == stopped.id)
        .cloned()
        .unwrap();
    assert_eq!(done.status, RunStatus::Finished, "{:?}", h.state().errors);
    assert_eq!(h.state().runs.len(), 1, "resumed in place, not a new run");
    assert_eq!(done.steps_done, 200);
    // The curve holds the steps before the stop and those after the resume, once each.
    let steps: Vec<f64> = h.state().run.train_loss.iter().map(|p| p[0]).collect();
    assert!(steps.windows(2).all(|w| w[0] < w[1]), "steps in order");
    assert_eq!(steps.len(), 200);
    drop(h);
    let _ = std::fs::remove_dir_all(&dir);
}

//! The studio window driven by egui_kittest: train with each method from a preset, watch the
//! run finish and appear in Compare; errors appear in the window and leave it usable; Stop
//! ends a run as stopped; rendered snapshots of both tabs.

use std::path::{Path, PathBuf};

use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use peft_studio::app::{AppOptions, StudioApp, UiState, scripted_picker};
use peft_studio::inspect::thousands;
use peft_studio::worker::Runners;

mod common;
mod ui_support;
use ui_support::run_until;

fn temp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("peft-studio-ui-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A short preset on the built-in model and data.
fn write_preset(dir: &Path, steps: usize) -> PathBuf {
    let p = dir.join("short.toml");
    std::fs::write(
        &p,
        format!(
            r#"mode = "adapter"
[model]
source = {{ kind = "builtin", name = "tiny-vit-fmnist" }}
[data]
source = {{ kind = "builtin", name = "mnist-5k" }}
max_eval = 100
[adapter]
method = "lora"
rank = 8
[optim]
lr = 5e-3
steps = {steps}
eval_every = 10
batch_size = 32
warmup_steps = 2
"#
        ),
    )
    .unwrap();
    p
}

fn harness(dir: &Path, answers: Vec<Option<PathBuf>>) -> Harness<'static, StudioApp> {
    let options = AppOptions {
        runs_dir: dir.join("runs"),
        picker: scripted_picker(answers),
        persist: false,
        personaliser_dir: dir.join("no-personaliser"),
        runners: Runners::default(),
    };
    Harness::builder()
        .with_size(egui::vec2(1280.0, 820.0))
        .build_eframe(move |cc| StudioApp::new(cc, options))
}

fn load_preset(h: &mut Harness<'static, StudioApp>) {
    h.get_by_label("Load preset…").click();
    run_until(h, 30, "the preset", |a| a.settings.last_preset.is_some());
    run_until(h, 30, "the dataset preview", |a| {
        a.errors.is_empty() && a.settings.config.optim.steps.is_some()
    });
}

#[test]
fn train_each_method_and_compare() {
    let dir = temp("methods");
    let preset = write_preset(&dir, 12);
    let mut h = harness(&dir, vec![Some(preset)]);
    load_preset(&mut h);
    let methods = [
        ("LoRA", "lora", 4usize),
        ("SVFit", "svfit", 16),
        ("LoLDU", "loldu", 16),
        ("Full fine-tuning", "full", 0),
        ("Head only", "head", 0),
    ];
    for (label, method, rank) in methods {
        h.get_by_label(label).click();
        h.run_steps(2);
        // The precision choice names what it applies to: every product in full fine-tuning.
        h.get_by_label(if method == "full" {
            "matmuls"
        } else {
            "frozen matmuls"
        });
        if rank > 0 {
            h.state_mut().settings.config.adapter.rank = rank;
        }
        // Short runs whatever the method's defaults.
        h.state_mut().settings.config.optim.steps = Some(12);
        h.run_steps(2);
        let before = h.state().runs.len();
        h.get_by_label("Start training").click();
        run_until(&mut h, 120, label, move |a| {
            !a.run.state.is_busy() && a.runs.len() > before
        });
        assert_eq!(
            h.state().run.state,
            UiState::Finished,
            "{label}: {:?}",
            h.state().errors
        );
        assert!(
            h.state().run.train_loss.len() == 12,
            "{label}: the loss curve has every step"
        );
        assert!(
            !h.state().run.eval_accuracy.is_empty(),
            "{label}: the eval curve has points"
        );
        h.get_by_label_contains("State: finished");
        let summary = h
            .state()
            .runs
            .iter()
            .find(|r| Some(&r.id) == h.state().run.run_id.as_ref())
            .cloned()
            .expect("the run is in the store");
        assert_eq!(summary.method, method);
        // The estimate the form shows equals what the run trained.
        h.get_by_label_contains(&format!("trainable: {} of", thousands(summary.trainable)));
        h.get_by_label("Compare").click();
        h.run_steps(3);
        h.get_all_by_label_contains(&summary.name)
            .next()
            .expect("the run is listed in Compare");
        h.get_all_by_label(&thousands(summary.trainable))
            .next()
            .expect("with its trainable count");
        h.get_by_label("Fine-tune").click();
        h.run_steps(2);
    }
    let runs = &h.state().runs;
    assert_eq!(runs.len(), 5);
    let lora = runs.iter().find(|r| r.method == "lora").unwrap();
    // LoRA r=4 on query/value of 4 layers of width 64, plus the 10-way head.
    assert_eq!(lora.trainable, 4 * 2 * 4 * 128 + 650);
    let svfit = runs.iter().find(|r| r.method == "svfit").unwrap();
    assert_eq!(svfit.trainable, 8 * 16 + 650);
    drop(h);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn errors_show_in_the_window_and_leave_it_usable() {
    let dir = temp("errors");
    let bad = dir.join("broken.jsonl");
    std::fs::write(
        &bad,
        "{\"text\": \"fine\", \"label\": \"a\"}\nthis is not json\n",
    )
    .unwrap();
    let preset = write_preset(&dir, 6);
    let mut h = harness(&dir, vec![Some(preset), Some(bad)]);
    load_preset(&mut h);
    // An impossible rank.
    h.state_mut().settings.config.adapter.rank = 1000;
    h.run_steps(2);
    h.get_by_label("Start training").click();
    h.run_steps(3);
    h.get_by_label_contains("These settings cannot train");
    assert!(!h.state().run.state.is_busy());
    h.get_by_label("Dismiss").click();
    h.run_steps(2);
    assert!(h.state().errors.is_empty());
    // An unreadable dataset.
    h.get_by_label("Open dataset file…").click();
    run_until(
        &mut h,
        30,
        "the preview error",
        |a| matches!(&a.form_preview_error(), Some(e) if e.contains("broken.jsonl")),
    );
    h.get_by_label_contains("cannot read the dataset");
    h.get_by_label("Start training").click();
    h.run_steps(3);
    h.get_by_label_contains("These settings cannot train");
    // Still usable: back to the built-in data, and training works.
    h.state_mut().settings.config.adapter.rank = 8;
    h.state_mut().select_builtin_dataset("mnist-5k");
    run_until(&mut h, 30, "the preview", |a| {
        a.form_preview_error().is_none() && a.form_preview_ready()
    });
    h.get_by_label("Start training").click();
    run_until(&mut h, 120, "the run", |a| a.run.state == UiState::Finished);
    drop(h);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn stop_ends_the_run_as_stopped_and_reenables_train() {
    let dir = temp("stop");
    let preset = write_preset(&dir, 100_000);
    let mut h = harness(&dir, vec![Some(preset)]);
    load_preset(&mut h);
    h.get_by_label("Start training").click();
    run_until(&mut h, 60, "a few steps", |a| a.run.step >= 3);
    h.get_by_label("Pause").click();
    run_until(&mut h, 30, "the pause", |a| a.run.state == UiState::Paused);
    h.get_by_label("Resume").click();
    run_until(&mut h, 30, "the resume", |a| {
        a.run.state == UiState::Training || a.run.state == UiState::Evaluating
    });
    h.get_by_label("Stop").click();
    run_until(&mut h, 60, "the stop", |a| a.run.state == UiState::Stopped);
    h.get_by_label_contains("State: stopped");
    let summary = h
        .state()
        .runs
        .first()
        .cloned()
        .expect("the stopped run is stored");
    assert_eq!(summary.status.to_string(), "stopped");
    assert!(summary.steps_done >= 3 && summary.steps_done < 100_000);
    // Train is enabled again: pressing it starts a new run.
    h.state_mut().settings.config.optim.steps = Some(5);
    h.get_by_label("Start training").click();
    run_until(&mut h, 60, "the second run", |a| {
        a.run.state == UiState::Finished
    });
    assert_eq!(h.state().runs.len(), 2);
    drop(h);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A synthetic, deterministic loss curve.
fn curve(steps: usize, floor: f64, speed: f64, seed: u64) -> Vec<[f64; 2]> {
    (1..=steps)
        .map(|s| {
            let wobble = (((s as u64 * 2654435761 + seed) % 1000) as f64 / 1000.0 - 0.5) * 0.15;
            [
                s as f64,
                (2.3 - floor) * (-(s as f64) / speed).exp() + floor + wobble * (0.3 + floor),
            ]
        })
        .collect()
}

/// (id, name, method, rank, trainable, final accuracy, curve speed).
type FakeRun<'a> = (&'a str, &'a str, &'a str, Option<usize>, usize, f64, f64);

fn fake_run(store: &Path, run: FakeRun<'_>) {
    let (id, name, method, rank, trainable, acc, speed) = run;
    use peft_studio::train::{EvalPoint, MetricLine, RunStatus, RunSummary};
    let dir = store.join(id);
    std::fs::create_dir_all(&dir).unwrap();
    let mut lines = String::new();
    for p in curve(400, 1.0 - acc, speed, id.len() as u64) {
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
                accuracy: acc * (1.0 - (-(p[0]) / speed).exp() * 0.8),
                perplexity: None,
            };
            lines += &format!("{}\n", serde_json::to_string(&MetricLine::Eval(e)).unwrap());
        }
    }
    std::fs::write(dir.join("metrics.jsonl"), lines).unwrap();
    let final_eval = EvalPoint {
        step: 400,
        loss: 0.4,
        accuracy: acc,
        perplexity: None,
    };
    let s = RunSummary {
        id: id.into(),
        name: name.into(),
        method: method.into(),
        rank,
        model: "tiny-vit-fmnist".into(),
        dataset: "mnist-5k".into(),
        trainable,
        total: 139_018 + if method == "lora" { trainable - 650 } else { 0 },
        steps_done: 400,
        total_steps: 400,
        final_train_loss: Some(0.4),
        final_eval: Some(final_eval),
        best_eval: Some(final_eval),
        wall_secs: 30.0,
        secs_per_step: 0.03,
        peak_rss_mib: 230.0,
        status: RunStatus::Finished,
        error: None,
        started_at: format!("2026-11-29T01:{:02}:00+00:00", id.len()),
    };
    std::fs::write(
        dir.join("summary.json"),
        serde_json::to_string_pretty(&s).unwrap(),
    )
    .unwrap();
}

#[test]
fn snapshots_of_both_tabs() {
    let dir = temp("snapshots");
    let runs = dir.join("runs");
    fake_run(
        &runs,
        ("a-lora", "LoRA r8", "lora", Some(8), 8_842, 0.875, 120.0),
    );
    fake_run(
        &runs,
        (
            "bb-svfit",
            "SVFit r64",
            "svfit",
            Some(64),
            1_162,
            0.837,
            160.0,
        ),
    );
    fake_run(
        &runs,
        (
            "ccc-loldu",
            "LoLDU r64",
            "loldu",
            Some(64),
            1_170,
            0.824,
            150.0,
        ),
    );
    fake_run(
        &runs,
        ("dddd-head", "head only", "head", None, 650, 0.709, 200.0),
    );
    fake_run(
        &runs,
        (
            "eeeee-full",
            "full fine-tuning",
            "full",
            None,
            139_018,
            0.934,
            90.0,
        ),
    );
    let mut h = harness(&dir, vec![]);
    run_until(&mut h, 30, "the dataset preview", |a| {
        a.form_preview_ready()
    });
    {
        let app = h.state_mut();
        app.run.state = UiState::Training;
        app.run.name = "LoLDU r64".into();
        app.run.step = 420;
        app.run.total_steps = 1000;
        app.run.secs_per_step = 0.031;
        app.run.trainable = 1_170;
        app.run.total = 139_018 + 520;
        app.run.train_loss = curve(420, 0.45, 150.0, 7);
        app.run.eval_loss = (1..=4)
            .map(|i| {
                [
                    i as f64 * 100.0,
                    2.3 * (-(i as f64) * 100.0 / 150.0).exp() + 0.5,
                ]
            })
            .collect();
        app.run.eval_accuracy = (1..=4)
            .map(|i| {
                [
                    i as f64 * 100.0,
                    0.82 * (1.0 - (-(i as f64) * 100.0 / 150.0).exp() * 0.8),
                ]
            })
            .collect();
    }
    h.run_steps(4);
    ui_support::mask_runs_folder(&mut h);
    h.snapshot("train_tab_mid_run");
    h.state_mut().run.state = UiState::Finished;
    h.get_by_label("Compare").click();
    h.run_steps(2);
    h.get_by_label("best acc").click();
    h.run_steps(2);
    for name in ["LoRA r8", "SVFit r64", "LoLDU r64"] {
        let id = h
            .state()
            .runs
            .iter()
            .find(|r| r.name == name)
            .unwrap()
            .id
            .clone();
        h.state_mut().select_for_overlay(&id);
    }
    h.run_steps(4);
    h.snapshot("compare_tab");
    drop(h);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn choosing_smollm2_sets_up_a_language_model_run() {
    use peft_studio::data::DataSource;
    use peft_studio::models::ModelSource;
    let dir = temp("smollm2");
    let chat = dir.join("chat.jsonl");
    std::fs::write(
        &chat,
        concat!(
            r#"{"messages": [{"role": "user", "content": "Spam or ham? Win a prize"}, {"role": "assistant", "content": "spam"}]}"#,
            "\n",
            r#"{"messages": [{"role": "user", "content": "Spam or ham? Lunch at noon"}, {"role": "assistant", "content": "ham"}]}"#,
            "\n",
            r#"{"messages": [{"role": "user", "content": "Spam or ham? Cheap pills"}, {"role": "assistant", "content": "spam"}]}"#,
            "\n"
        ),
    )
    .unwrap();
    let mut h = harness(&dir, vec![Some(chat.clone())]);
    run_until(&mut h, 30, "the dataset preview", |a| {
        a.form_preview_ready()
    });
    h.get_by_role_and_label(egui::accesskit::Role::ComboBox, "Base model")
        .click();
    h.run_steps(2);
    h.get_by_label("smollm2-135m-instruct").click();
    h.run_steps(3);
    let cfg = h.state().settings.config.clone();
    assert_eq!(
        cfg.model.source,
        ModelSource::Builtin {
            name: "smollm2-135m-instruct".into()
        }
    );
    assert_eq!(
        cfg.adapter.targets,
        peft_studio::peft::Targets::List(vec!["q_proj".into(), "v_proj".into()])
    );
    assert_eq!(cfg.model.max_length, 256);
    // The model line: its size once fetched, else how to fetch it.
    if peft_studio::models::llama::language_model::smollm2_path().is_some() {
        h.get_by_label_contains("134,515,008 parameters");
    } else {
        // On the model line and in the form's check.
        assert!(
            h.get_all_by_label_contains("scripts/fetch-models.sh")
                .next()
                .is_some()
        );
    }
    // A JSONL picked for a language model is instruction data, previewed as turns.
    h.get_by_label("Open dataset file…").click();
    run_until(&mut h, 30, "the instruction preview", |a| {
        a.form_preview_ready()
            && matches!(
                &a.settings.config.data.source,
                DataSource::Instruct { path, .. } if *path == chat
            )
    });
    h.run_steps(2);
    h.get_by_label_contains("3 records (chat)");
    h.get_by_label_contains("[assistant] spam");
    drop(h);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_language_model_answers_in_try_it_and_its_run_exports_from_compare() {
    use common::chat::{chat_model, config, yes_data};
    use peft_studio::app::AnswerStatus;
    use peft_studio::models::ModelSource;
    let dir = temp("try-it");
    let model = chat_model(&dir.join("model"));
    let data = yes_data(&dir);
    let job_output = common::TempDir::new("ui-job");
    let finished_job = common::job::finished_job(&job_output);
    let mut h = harness(
        &dir,
        vec![Some(model.clone()), Some(data.clone()), Some(finished_job)],
    );
    run_until(&mut h, 30, "the dataset preview", |a| {
        a.form_preview_ready()
    });
    // The built-in image classifier has no Try-it panel.
    assert!(h.query_by_label("Ask both").is_none());
    h.get_by_label("Open model folder…").click();
    run_until(
        &mut h,
        30,
        "the chat model",
        |a| matches!(&a.settings.config.model.source, ModelSource::Folder { path } if *path == model),
    );
    // A language model's folder gets a language model's settings.
    assert_eq!(
        h.state().settings.config.adapter.targets,
        peft_studio::peft::Targets::List(vec!["q_proj".into(), "v_proj".into()])
    );
    h.get_by_label_contains("no fine-tuned run chosen");
    // Its chat data previews as the model reads it: the template rendered, the answer trained.
    h.get_by_label("Open dataset file…").click();
    run_until(&mut h, 30, "the rendered example", |a| {
        a.form_preview_ready()
            && matches!(&a.settings.config.data.source,
                peft_studio::data::DataSource::Instruct { path, .. } if *path == data)
    });
    h.run_steps(2);
    h.get_by_label_contains("one example as the model reads it");
    h.get_by_label_contains("<|im_start|>assistant");
    // Chat records have no classes to count.
    assert!(h.query_by_label("Class counts").is_none());
    h.state_mut().settings.try_it.prompt = "is the sky blue ?".into();
    h.run_steps(2);
    h.get_by_label("Ask both").click();
    h.step();
    assert!(h.state().try_it.is_waiting());
    run_until(&mut h, 60, "the base model's answer", |a| {
        !a.try_it.is_waiting()
    });
    let base = h.state().try_it.base.clone();
    assert!(
        matches!(base.status, AnswerStatus::Done(_)),
        "{:?}",
        base.status
    );
    assert!(!base.text.trim().is_empty());
    assert!(matches!(
        h.state().try_it.tuned.status,
        AnswerStatus::Unavailable(_)
    ));
    h.get_by_label(&base.text);

    // Train on "yes" answers, then ask again: the run answers "yes", the base as before.
    h.state_mut().settings.config = config(&model, &data, 12);
    h.run_steps(2);
    h.get_by_label("Start training").click();
    run_until(&mut h, 120, "the run to finish", |a| {
        a.run.state == UiState::Finished
    });
    let id = h.state().run.run_id.clone().unwrap();
    h.get_by_label_contains(&format!("fine-tuned: {id}"));
    h.get_by_label("Ask both").click();
    h.step();
    assert!(h.state().try_it.is_waiting());
    run_until(&mut h, 60, "both answers", |a| !a.try_it.is_waiting());
    let s = h.state();
    assert_eq!(s.try_it.base.text, base.text);
    assert_eq!(s.try_it.tuned.text.trim(), "yes");
    assert!(
        s.try_it.tuned.label.contains(&id),
        "{}",
        s.try_it.tuned.label
    );
    assert!(s.errors.is_empty(), "{:?}", s.errors);

    // Compare: export the run as a PEFT adapter and as llama.cpp's LoRA GGUF.
    h.get_by_label("Compare").click();
    h.run_steps(2);
    for (format, file) in [
        ("peft", "adapter_config.json"),
        ("gguf-lora", "adapter.gguf"),
    ] {
        h.get_by_label("export").click();
        h.run_steps(2);
        h.get_by_label(format).click();
        h.run_steps(2);
        h.get_by_label("Export").click();
        let out = dir.join("exports").join(format!("{id}-{format}"));
        run_until(&mut h, 60, "the export", |_| out.exists());
        run_until(&mut h, 10, "the export's message", |a| a.errors.is_empty());
        h.run_steps(3);
        h.get_by_label_contains(&format!("exported as {format} into"));
        let written: Vec<String> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            written
                .iter()
                .any(|f| f == file || f.ends_with(".gguf") && file.ends_with(".gguf")),
            "{written:?}"
        );
    }
    // As a PEFT + accelerate job: train.py, its spec and the launch configs.
    h.get_by_label("export").click();
    h.run_steps(2);
    h.get_by_label("job").click();
    h.run_steps(2);
    h.get_by_label_contains("model for transformers");
    h.get_by_label("Export").click();
    let job = dir.join("exports").join(format!("{id}-job"));
    run_until(&mut h, 60, "the job folder", |_| job.exists());
    h.run_steps(3);
    for f in ["train.py", "job.json", "accelerate", "data"] {
        assert!(job.join(f).exists(), "{f} missing from the job folder");
    }
    // A finished job's output imports back and is listed beside the local run.
    h.get_by_label("Import job output…").click();
    run_until(&mut h, 60, "the imported run", |a| a.runs.len() == 2);
    h.run_steps(3);
    h.get_by_label_contains("imported");
    assert!(
        h.state()
            .runs
            .iter()
            .any(|r| r.name.contains("accelerate job"))
    );
    drop(h);
    let _ = std::fs::remove_dir_all(&dir);
}

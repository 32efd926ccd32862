//! `export-job` and `import-run`: the job folder holds the preset's values (read back from the
//! written files), the data split as peft-studio splits it, and the launch files; a synthetic
//! job output imports into a run store and lists beside local runs; bad outputs are refused
//! with errors naming the file and field, leaving the store untouched. No PyTorch needed.

mod common;

use std::path::Path;

use common::TempDir;
use common::job::{finished_job, preset, text_task, write_lora};
use peft_studio::job::assets::{ACCELERATE_CONFIGS, ADAPTERS_PY, TRAIN_PY};
use peft_studio::job::{ExportJobOptions, JobSpec, JobTask, export_job, import_run, run_origin};
use peft_studio::train::{MetricLine, RunLayout, RunStatus, RunStore, TrainConfig, TrainMode};
use serde_json::json;

fn read_spec(out: &Path) -> JobSpec {
    serde_json::from_str(&std::fs::read_to_string(out.join("job.json")).unwrap()).unwrap()
}

fn jsonl(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn export_job_writes_the_presets_values_and_its_split() {
    let t = TempDir::new("export");
    let (data, model) = text_task(&t);
    let cfg = preset(
        &data,
        &model,
        "loldu",
        "trainable_scale = true\nalpha = 3.0",
    );
    let out = t.0.join("job");
    let job = export_job(
        &cfg,
        Path::new("test.toml"),
        &out,
        &ExportJobOptions::default(),
    )
    .unwrap();
    let spec = read_spec(&out);
    assert_eq!(spec, job.spec);
    assert_eq!(spec.task, JobTask::Classification);
    assert_eq!((spec.method.as_str(), spec.rank), ("loldu", Some(6)));
    assert_eq!(
        spec.adapter, cfg.adapter,
        "the adapter config goes over unchanged"
    );
    assert_eq!(spec.adapter.alpha, Some(3.0));
    assert!(spec.adapter.trainable_scale);
    let o = &spec.optim;
    assert_eq!((o.lr, o.head_lr, o.warmup_steps), (0.004, Some(0.002), 5));
    assert_eq!(
        (o.batch_size, o.grad_accum, o.steps, o.seed),
        (6, 2, 17, 11)
    );
    assert_eq!((o.eval_every, o.eval_batch_size), (5, 10));
    assert_eq!(o.schedule, peft_studio::train::Schedule::Cosine);
    assert_eq!(spec.model.max_length, 48);
    assert_eq!(
        Path::new(&spec.model.path),
        model.canonicalize().unwrap().as_path()
    );
    assert_eq!(spec.classes, vec!["ham".to_string(), "spam".to_string()]);
    // The split is peft-studio's: the same texts on each side as data::load gives.
    let ds = peft_studio::data::load(&cfg.data).unwrap();
    let train = jsonl(&out.join("data/train.jsonl"));
    let eval = jsonl(&out.join("data/eval.jsonl"));
    assert_eq!((train.len(), eval.len()), (30, 10));
    assert_eq!(
        (spec.data.train_examples, spec.data.eval_examples),
        (30, 10)
    );
    let peft_studio::data::Samples::Texts(ev) = &ds.eval else {
        panic!("texts")
    };
    for (line, (text, label)) in eval.iter().zip(ev.texts.iter().zip(&ev.labels)) {
        assert_eq!(line["text"], json!(text));
        assert_eq!(line["label"], json!(label));
    }
    // The run's own config travels with the job, unchanged.
    let back = TrainConfig::from_preset(&out.join("config.toml"), &[]).unwrap();
    assert_eq!(back, cfg);
    // Launch files: the scripts as compiled in, every accelerate config with its values.
    assert_eq!(
        std::fs::read_to_string(out.join("train.py")).unwrap(),
        TRAIN_PY
    );
    assert_eq!(
        std::fs::read_to_string(out.join("peft_studio_adapters.py")).unwrap(),
        ADAPTERS_PY
    );
    for (name, _) in ACCELERATE_CONFIGS {
        let text = std::fs::read_to_string(out.join("accelerate").join(name)).unwrap();
        assert!(!text.contains("{{"), "{name}: a placeholder is left");
        assert!(text.contains("num_processes:"), "{name}");
        if name.starts_with("deepspeed") {
            assert!(text.contains("gradient_accumulation_steps: 2"), "{name}");
            assert!(text.contains("gradient_clipping: 1"), "{name}");
        }
    }
    let req = std::fs::read_to_string(out.join("requirements.txt")).unwrap();
    for line in req
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
    {
        assert!(line.contains("=="), "not pinned: {line}");
    }
    for pkg in ["torch==", "transformers==", "peft==", "accelerate=="] {
        assert!(req.contains(pkg), "{pkg}");
    }
    let readme = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(readme.contains("accelerate launch --config_file accelerate/multi_gpu.yaml"));
    assert!(readme.contains("import-run"));
    // A second export refuses the non-empty folder unless forced.
    let opts = ExportJobOptions::default();
    let e = export_job(&cfg, Path::new("test.toml"), &out, &opts).unwrap_err();
    assert!(format!("{e:#}").contains("--force"), "{e:#}");
    let forced = ExportJobOptions {
        force: true,
        model: Some("org/some-model".into()),
    };
    export_job(&cfg, Path::new("test.toml"), &out, &forced).unwrap();
    assert_eq!(read_spec(&out).model.path, "org/some-model");
}

#[test]
fn export_job_resolves_epochs_and_hands_over_instruction_data() {
    let t = TempDir::new("instruct");
    let mut lines = String::new();
    for i in 0..12 {
        lines += &json!({"messages": [
            {"role": "user", "content": format!("question {i}")},
            {"role": "assistant", "content": if i % 2 == 0 { "spam" } else { "ham" }}
        ]})
        .to_string();
        lines.push('\n');
    }
    let data = t.write("chat.jsonl", lines.as_bytes());
    let gguf = t.write("models/tiny.gguf", b"GGUF");
    let text = format!(
        r#"mode = "adapter"
[model]
source = {{ kind = "gguf", path = "{}" }}
max_length = 64
[data]
source = {{ kind = "instruct", path = "{}" }}
eval_fraction = 0.25
[adapter]
method = "lora"
rank = 4
alpha = 8.0
targets = ["q_proj", "v_proj"]
[optim]
batch_size = 3
epochs = 2.0
[generation]
questions = 2
max_new_tokens = 3
"#,
        gguf.display(),
        data.display()
    );
    let cfg = TrainConfig::from_toml_str(&text, "chat.toml", &[]).unwrap();
    let out = t.0.join("job");
    export_job(
        &cfg,
        Path::new("chat.toml"),
        &out,
        &ExportJobOptions::default(),
    )
    .unwrap();
    let spec = read_spec(&out);
    assert_eq!(spec.task, JobTask::CausalLm);
    assert_eq!(spec.model.gguf_file.as_deref(), Some("tiny.gguf"));
    assert_eq!((spec.data.train_examples, spec.data.eval_examples), (9, 3));
    assert_eq!(spec.optim.steps, 6, "⌈2 epochs · 9 / 3⌉");
    assert_eq!(
        (spec.generation.questions, spec.generation.max_new_tokens),
        (2, 3)
    );
    let back = TrainConfig::from_preset(&out.join("config.toml"), &[]).unwrap();
    assert_eq!(back.optim.steps, Some(6));
    for line in jsonl(&out.join("data/train.jsonl")) {
        let m = line["messages"].as_array().unwrap();
        assert_eq!(m.last().unwrap()["role"], "assistant");
    }
}

#[test]
fn export_job_refuses_image_runs_with_a_reason() {
    let t = TempDir::new("images");
    let cfg = TrainConfig::default(); // the built-in ViT on MNIST digits
    let e = export_job(&cfg, Path::new("x"), &t.0.join("job"), &Default::default());
    let e = format!("{:#}", e.unwrap_err());
    assert!(e.contains("image") || e.contains("text"), "{e}");
    assert!(!t.0.join("job").exists(), "nothing is written");
}

/// A finished job: the export of a LoRA preset plus an output folder as train.py writes it.
#[test]
fn import_run_brings_a_job_into_the_store() {
    let t = TempDir::new("import");
    let job = finished_job(&t);
    let store = RunStore::new(t.0.join("runs"));
    let run = import_run(&store, &job).unwrap();
    let (runs, problems) = store.list();
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(runs.len(), 1);
    let s = &runs[0];
    assert_eq!(s, &run.summary);
    assert!(s.name.contains("accelerate job"), "{}", s.name);
    assert_eq!((s.method.as_str(), s.rank), ("lora", Some(6)));
    assert_eq!((s.trainable, s.total), (1234, 99999));
    assert_eq!((s.steps_done, s.total_steps), (17, 17));
    assert_eq!(s.status, RunStatus::Finished);
    assert_eq!(s.final_eval.unwrap().accuracy, 0.8);
    assert_eq!(s.best_eval.unwrap().step, 10);
    assert!((s.secs_per_step - 0.5).abs() < 1e-12);
    let metrics = store.metrics(&run.id).unwrap();
    assert_eq!(metrics.len(), 17 + 4);
    assert!(matches!(metrics[0], MetricLine::Step { step: 1, .. }));
    let cfg = store.config(&run.id).unwrap();
    assert_eq!((cfg.mode, cfg.adapter.rank), (TrainMode::Adapter, 6));
    let layout = RunLayout::new(&run.path);
    assert!(layout.adapter().join("adapter_model.safetensors").is_file());
    let origin = run_origin(&layout).expect("origin.json");
    assert_eq!(origin.origin, "accelerate job");
    assert_eq!(origin.job.num_processes, 2);
    assert!(run_origin(&RunLayout::new(t.0.join("nowhere"))).is_none());
    // The output folder itself imports too (a second run).
    let again = import_run(&store, &job.join("output")).unwrap();
    assert_ne!(again.id, run.id);
}

/// A change that breaks a finished job folder.
type Damage = Box<dyn Fn(&Path)>;

/// Breaks the finished job with `damage`, imports, and returns the error (the store must stay
/// empty).
fn import_error(tag: &str, damage: impl Fn(&Path)) -> String {
    let t = TempDir::new(tag);
    let job = finished_job(&t);
    damage(&job);
    let store = RunStore::new(t.0.join("runs"));
    let e = format!("{:#}", import_run(&store, &job).unwrap_err());
    assert!(
        store.list().0.is_empty(),
        "{tag}: a run was left in the store"
    );
    let left = std::fs::read_dir(store.root())
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(left, 0, "{tag}: a folder was left in the store");
    e
}

#[test]
fn import_run_refuses_bad_outputs_naming_file_and_field() {
    let out = |j: &Path| j.join("output");
    let cases: Vec<(&str, Damage, Vec<&str>)> = vec![
        (
            "eval-without-accuracy",
            Box::new(move |j: &Path| {
                let p = out(j).join("metrics.jsonl");
                let mut text = std::fs::read_to_string(&p).unwrap();
                text += "{\"kind\": \"eval\", \"step\": 17, \"loss\": 0.3}\n";
                std::fs::write(&p, text).unwrap();
            }),
            vec!["metrics.jsonl", "line 22", "accuracy"],
        ),
        (
            "accuracy-as-percent",
            Box::new(move |j: &Path| {
                let p = out(j).join("metrics.jsonl");
                std::fs::write(&p, "{\"kind\":\"step\",\"step\":1,\"loss\":1.0,\"lr\":0.1,\"secs\":1.0}\n{\"kind\":\"eval\",\"step\":1,\"loss\":0.3,\"accuracy\":93.0}\n").unwrap();
            }),
            vec!["metrics.jsonl", "line 2", "accuracy"],
        ),
        (
            "no-steps",
            Box::new(move |j: &Path| std::fs::write(out(j).join("metrics.jsonl"), "\n").unwrap()),
            vec!["metrics.jsonl", "no training step"],
        ),
        (
            "summary-missing",
            Box::new(move |j: &Path| {
                std::fs::remove_file(out(j).join("job_summary.json")).unwrap()
            }),
            vec!["job_summary.json"],
        ),
        (
            "summary-field",
            Box::new(move |j: &Path| {
                std::fs::write(out(j).join("job_summary.json"), "{\"trainable\": 3}").unwrap()
            }),
            vec!["job_summary.json", "total"],
        ),
        (
            "adapter-missing",
            Box::new(move |j: &Path| std::fs::remove_dir_all(out(j).join("adapter")).unwrap()),
            vec!["adapter_config.json"],
        ),
        (
            "adapter-other-method",
            Box::new(move |j: &Path| write_lora(&out(j).join("adapter"), "LOLDU")),
            vec!["adapter_config.json", "peft_type"],
        ),
        (
            "config-missing",
            Box::new(|j: &Path| std::fs::remove_file(j.join("config.toml")).unwrap()),
            vec!["config.toml"],
        ),
        (
            "not-run-yet",
            Box::new(move |j: &Path| std::fs::remove_dir_all(out(j)).unwrap()),
            vec!["no job output", "metrics.jsonl"],
        ),
    ];
    for (tag, damage, words) in cases {
        let e = import_error(tag, damage);
        println!("{tag}: {e}");
        for w in words {
            assert!(e.contains(w), "{tag}: `{w}` not in: {e}");
        }
    }
}

#[test]
fn cli_export_job_and_import_run() {
    let t = TempDir::new("cli");
    let job = finished_job(&t);
    let bin = env!("CARGO_BIN_EXE_peft-studio");
    let runs = t.0.join("runs");
    let o = std::process::Command::new(bin)
        .args(["import-run"])
        .arg(&job)
        .arg("--runs")
        .arg(&runs)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("imported"));
    let o = std::process::Command::new(bin)
        .args(["export-job", "presets/none.toml", "--out"])
        .arg(t.0.join("x"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("presets/none.toml"));
}

//! `peft-studio export` on real runs: short runs trained by the binary on the built-in tiny
//! ViT (LoRA, SVFit, full fine-tuning, head only), exported as PEFT adapter folders and
//! merged model folders that peft-studio reads back with the same logits as the run's own
//! model (written beside the export by `--write-check-logits`); the formats a run kind cannot
//! take, and an occupied `--out`, are clear errors.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{Device, Tensor};
use common::{TempDir, max_diff};
use peft_studio::models::{Batch, Classifier, ModelSource, load_model};
use peft_studio::peft::{AdaptedLinear, Method, load_adapter_with};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_peft-studio");

fn run_cli(args: &[&str]) -> (bool, String) {
    let o = Command::new(BIN).args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.success(), text)
}

/// Trains a 4-step run of `preset` (with extra `--set`s) into `out`; returns its folder.
fn train(out: &Path, preset: &str, sets: &[&str]) -> PathBuf {
    let preset = format!("{}/presets/{preset}", env!("CARGO_MANIFEST_DIR"));
    let out_s = out.display().to_string();
    let mut args = vec!["train", "--preset", &preset, "--out", &out_s];
    let base = [
        "optim.steps=4",
        "optim.warmup_steps=1",
        "optim.batch_size=8",
        "optim.eval_every=4",
        "data.max_train=64",
        "data.max_eval=16",
    ];
    for s in base.iter().chain(sets) {
        args.push("--set");
        args.push(s);
    }
    let (ok, text) = run_cli(&args);
    assert!(ok, "training failed:\n{text}");
    let mut runs: Vec<PathBuf> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("config.toml").is_file())
        .collect();
    runs.sort();
    runs.pop().unwrap()
}

fn export(run: &Path, format: &str, out: &Path, extra: &[&str]) -> (bool, String) {
    let (r, o) = (run.display().to_string(), out.display().to_string());
    let mut args = vec!["export", &r, "--format", format, "--out", &o];
    args.extend(extra);
    run_cli(&args)
}

/// The input and logits `--write-check-logits` wrote into `dir`.
fn check_logits(dir: &Path) -> (Tensor, Tensor) {
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("check_logits.json")).unwrap())
            .unwrap();
    assert_eq!(v["kind"], "image");
    let shape: Vec<usize> = serde_json::from_value(v["input"]["shape"].clone()).unwrap();
    let px: Vec<f32> = serde_json::from_value(v["input"]["pixel_values"].clone()).unwrap();
    let ls: Vec<usize> = serde_json::from_value(v["logits_shape"].clone()).unwrap();
    let lg: Vec<f32> = serde_json::from_value(v["logits"].clone()).unwrap();
    (
        Tensor::from_vec(px, shape, &Device::Cpu).unwrap(),
        Tensor::from_vec(lg, ls, &Device::Cpu).unwrap(),
    )
}

/// The built-in tiny ViT with the exported PEFT folder `dir` loaded (adapter + head).
fn read_peft_export(dir: &Path) -> Box<dyn Classifier> {
    let source = ModelSource::Builtin {
        name: "tiny-vit-fmnist".into(),
    };
    let mut model = load_model(&source, 10, true, 123, &candle_core::Device::Cpu)
        .unwrap()
        .model;
    let (cfg, extra) = load_adapter_with(model.as_mut(), dir).unwrap();
    assert_eq!(cfg.method, Method::Lora, "an export is always a plain LoRA");
    for l in model.head_mut() {
        let w = extra[&format!("{}.weight", l.path())].clone();
        let b = extra.get(&format!("{}.bias", l.path())).cloned();
        *l = AdaptedLinear::new(l.path().to_string(), w, b);
    }
    model
}

/// Logits of `model` on the check input of `dir`, against the run's.
fn assert_same_logits(model: &dyn Classifier, dir: &Path, what: &str) {
    let (px, want) = check_logits(dir);
    let got = model.forward_t(&Batch::Images(px), false).unwrap();
    let d = max_diff(&got, &want);
    assert!(d < 1e-4, "{what}: logits differ by {d}");
}

fn read_merged(dir: &Path) -> Box<dyn Classifier> {
    let src = ModelSource::Folder {
        path: dir.to_path_buf(),
    };
    load_model(&src, 10, false, 0, &candle_core::Device::Cpu)
        .unwrap()
        .model
}

#[test]
fn adapter_runs_export_as_peft_and_merged_with_the_same_logits() {
    let tmp = TempDir::new("adapter-runs");
    for (preset, method) in [
        ("quickstart-lora.toml", "lora"),
        ("quickstart-svfit.toml", "svfit"),
    ] {
        let run = train(&tmp.0.join("runs"), preset, &["adapter.rank=8"]);
        let peft = tmp.0.join(format!("{method}-peft"));
        let (ok, text) = export(&run, "peft", &peft, &["--write-check-logits"]);
        assert!(ok, "{text}");
        assert!(text.contains("rank 8"), "{text}");
        if method == "svfit" {
            assert!(text.contains("plain LoRA of its learned change"), "{text}");
        }
        let cfg: Value = serde_json::from_str(
            &std::fs::read_to_string(peft.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(cfg["peft_type"], "LORA");
        assert_eq!(cfg["r"], 8);
        assert_eq!(cfg["lora_alpha"], 8);
        assert_eq!(cfg["modules_to_save"][0], "classifier");
        assert_eq!(cfg["target_modules"], serde_json::json!(["query", "value"]));
        assert!(
            cfg["base_model_name_or_path"]
                .as_str()
                .unwrap()
                .ends_with("tiny-vit-fmnist")
        );
        let w =
            candle_core::safetensors::load(peft.join("adapter_model.safetensors"), &Device::Cpu)
                .unwrap();
        assert!(w.contains_key(
            "base_model.model.vit.encoder.layer.0.attention.attention.query.lora_A.weight"
        ));
        assert!(w.contains_key("base_model.model.classifier.weight"));
        assert_same_logits(read_peft_export(&peft).as_ref(), &peft, method);
        // Merged: a plain model folder computing the same logits.
        let merged = tmp.0.join(format!("{method}-merged"));
        let (ok, text) = export(&run, "merged", &merged, &["--write-check-logits"]);
        assert!(ok, "{text}");
        let m = read_merged(&merged);
        assert!(m.linears().iter().all(|l| l.adapter().is_none()));
        assert_same_logits(m.as_ref(), &merged, &format!("{method} merged"));
        // gguf-lora is for LLaMA-family models only.
        let (ok, text) = export(&run, "gguf-lora", &tmp.0.join("g"), &[]);
        assert!(
            !ok && text.contains("LLaMA-family") && text.contains("--format peft"),
            "{text}"
        );
        assert!(!tmp.0.join("g").exists());
    }
}

#[test]
fn full_and_head_runs_export_merged_and_refuse_peft() {
    let tmp = TempDir::new("full-head");
    for (mode, lr) in [("full", "optim.lr=0.001"), ("head", "optim.lr=0.01")] {
        let set = format!("mode=\"{mode}\"");
        let run = train(&tmp.0.join("runs"), "quickstart-lora.toml", &[&set, lr]);
        let (ok, text) = export(&run, "peft", &tmp.0.join(format!("{mode}-peft")), &[]);
        assert!(!ok, "{text}");
        assert!(
            text.contains("--format merged") && text.contains(&run.display().to_string()),
            "{text}"
        );
        let merged = tmp.0.join(format!("{mode}-merged"));
        let (ok, text) = export(&run, "merged", &merged, &["--write-check-logits"]);
        assert!(ok, "{text}");
        assert_same_logits(read_merged(&merged).as_ref(), &merged, mode);
    }
}

#[test]
fn an_occupied_out_is_refused_without_force_and_run_ids_resolve() {
    let tmp = TempDir::new("occupied");
    let runs = tmp.0.join("runs");
    let run = train(&runs, "quickstart-lora.toml", &[]);
    let out = tmp.0.join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "x").unwrap();
    let (ok, text) = export(&run, "peft", &out, &[]);
    assert!(
        !ok && text.contains("not empty") && text.contains("--force"),
        "{text}"
    );
    assert!(
        out.join("keep.txt").is_file(),
        "a refused export leaves --out alone"
    );
    // By id in --runs, with --force.
    let id = run.file_name().unwrap().to_str().unwrap();
    let (r, o) = (runs.display().to_string(), out.display().to_string());
    let (ok, text) = run_cli(&[
        "export", id, "--runs", &r, "--format", "peft", "--out", &o, "--force",
    ]);
    assert!(ok, "{text}");
    assert!(!out.join("keep.txt").exists() && out.join("adapter_config.json").is_file());
    let (ok, text) = run_cli(&[
        "export",
        "no-such-run",
        "--runs",
        &r,
        "--format",
        "peft",
        "--out",
        &o,
    ]);
    assert!(!ok && text.contains("no-such-run"), "{text}");
    let (ok, text) = run_cli(&["export", id, "--runs", &r, "--format", "onnx", "--out", &o]);
    assert!(!ok && text.contains("gguf-lora"), "{text}");
}

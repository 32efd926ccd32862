//! Bad inputs to the run store, each a clear error naming the file and the field, never a
//! panic, and never a good file overwritten: damaged, cut short, missing or mismatched
//! checkpoints, run files and adapter folders (table-driven; the counts are printed).

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::*;
use peft_studio::fsio::FileDigest;
use peft_studio::peft::checkpoint::{CONFIG_FILE, DIGEST_KEY, WEIGHTS_FILE};
use peft_studio::peft::linear::attach_adapters;
use peft_studio::peft::{
    AdaptedLinear, AdapterConfig, LayerSet, Method, load_adapter, save_adapter,
};
use peft_studio::train::{
    Control, Controller, Event, NeverStop, RunStatus, RunStore, TrainConfig, resume, train,
};
use serde_json::{Value, json};

/// Continues for `n` steps, then says stop.
struct StopAfter(usize);

impl Controller for StopAfter {
    fn check(&mut self) -> Control {
        if self.0 == 0 {
            Control::Stop
        } else {
            self.0 -= 1;
            Control::Continue
        }
    }
}

fn tiny() -> TrainConfig {
    let preset = concat!(env!("CARGO_MANIFEST_DIR"), "/presets/quickstart-lora.toml");
    let o: Vec<String> = [
        "optim.steps=8",
        "optim.checkpoint_every=2",
        "optim.eval_every=4",
        "optim.warmup_steps=1",
        "optim.batch_size=8",
        "data.max_train=64",
        "data.max_eval=32",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    TrainConfig::from_preset(Path::new(preset), &o).unwrap()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let p = e.path();
        let q = to.join(e.file_name());
        if p.is_dir() {
            copy_dir(&p, &q);
        } else {
            std::fs::copy(&p, &q).unwrap();
        }
    }
}

fn flip_16(path: &Path) {
    let mut b = std::fs::read(path).unwrap();
    let mid = b.len() / 2;
    for x in &mut b[mid..mid + 16] {
        *x ^= 0x5a;
    }
    std::fs::write(path, b).unwrap();
}

fn cut_half(path: &Path) {
    let b = std::fs::read(path).unwrap();
    std::fs::write(path, &b[..b.len() / 2]).unwrap();
}

fn edit_json(path: &Path, f: impl FnOnce(&mut Value)) {
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

/// Rewrites the run's `checkpoint/state.safetensors` with `f` applied to its tensors, and
/// records the new file's digest, so only the contents are wrong.
fn rewrite_state(run: &Path, f: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let p = run.join("checkpoint/state.safetensors");
    let mut t = candle_core::safetensors::load(&p, &Device::Cpu).unwrap();
    f(&mut t);
    candle_core::safetensors::save(&t, &p).unwrap();
    record_digest(run, &std::fs::read(&p).unwrap());
}

fn record_digest(run: &Path, bytes: &[u8]) {
    edit_json(&run.join("checkpoint/state.json"), |v| {
        v["files"]["state.safetensors"] = serde_json::to_value(FileDigest::of(bytes)).unwrap();
    });
}

type Mutation = Box<dyn Fn(&Path)>;

fn state_json(f: impl Fn(&mut Value) + 'static) -> Mutation {
    Box::new(move |run: &Path| edit_json(&run.join("checkpoint/state.json"), &f))
}

fn write(rel: &'static str, bytes: &'static [u8]) -> Mutation {
    Box::new(move |run: &Path| std::fs::write(run.join(rel), bytes).unwrap())
}

/// Every bad run folder: (what, how to break a stopped run's folder, what the error says).
fn run_cases() -> Vec<(&'static str, Mutation, Vec<&'static str>)> {
    let st = "checkpoint/state.safetensors";
    vec![
        (
            "16 flipped bytes in state.safetensors",
            Box::new(move |r: &Path| flip_16(&r.join(st))),
            vec!["state.safetensors", "damaged", "SHA-256"],
        ),
        (
            "state.safetensors cut in half",
            Box::new(move |r: &Path| cut_half(&r.join(st))),
            vec!["state.safetensors", "damaged", "cut short"],
        ),
        (
            "state.safetensors empty",
            write("checkpoint/state.safetensors", b""),
            vec!["state.safetensors", "damaged"],
        ),
        (
            "state.safetensors with a byte more",
            Box::new(move |r: &Path| {
                let mut b = std::fs::read(r.join(st)).unwrap();
                b.push(0);
                std::fs::write(r.join(st), b).unwrap();
            }),
            vec!["state.safetensors", "damaged"],
        ),
        (
            "state.safetensors missing",
            Box::new(move |r: &Path| std::fs::remove_file(r.join(st)).unwrap()),
            vec!["state.safetensors", "No such file"],
        ),
        (
            "state.safetensors is a folder",
            Box::new(move |r: &Path| {
                std::fs::remove_file(r.join(st)).unwrap();
                std::fs::create_dir(r.join(st)).unwrap();
            }),
            vec!["state.safetensors"],
        ),
        (
            "state.json missing",
            Box::new(|r: &Path| std::fs::remove_file(r.join("checkpoint/state.json")).unwrap()),
            vec!["state.json", "No such file"],
        ),
        (
            "state.json empty",
            write("checkpoint/state.json", b""),
            vec!["state.json", "not valid JSON"],
        ),
        (
            "state.json cut short",
            write("checkpoint/state.json", b"{\"step\": 4, \"optim"),
            vec!["state.json", "not valid JSON"],
        ),
        (
            "state.json not UTF-8",
            write("checkpoint/state.json", b"\xff\xfe{}"),
            vec!["state.json"],
        ),
        (
            "state.json a list",
            write("checkpoint/state.json", b"[1, 2]"),
            vec!["state.json", "not a JSON object"],
        ),
        (
            "step missing",
            state_json(|v| {
                v.as_object_mut().unwrap().remove("step");
            }),
            vec!["state.json", "`step` is missing"],
        ),
        (
            "step null",
            state_json(|v| v["step"] = Value::Null),
            vec!["`step` is missing"],
        ),
        (
            "step negative",
            state_json(|v| v["step"] = json!(-3)),
            vec!["state.json", "`step` is -3", "negative"],
        ),
        (
            "step beyond the run",
            state_json(|v| v["step"] = json!(999)),
            vec!["state.json", "`step` is 999 > total 8"],
        ),
        (
            "step a fraction",
            state_json(|v| v["step"] = json!(2.5)),
            vec!["`step` is 2.5", "whole number"],
        ),
        (
            "step a string",
            state_json(|v| v["step"] = json!("4")),
            vec!["`step`", "whole number"],
        ),
        (
            "step huge",
            state_json(|v| v["step"] = json!(1e30)),
            vec!["`step`"],
        ),
        (
            "total_steps of another run",
            state_json(|v| v["total_steps"] = json!(99)),
            vec!["`total_steps` is 99", "8"],
        ),
        (
            "total_steps negative",
            state_json(|v| v["total_steps"] = json!(-1)),
            vec!["`total_steps` is -1", "negative"],
        ),
        (
            "optimizer_steps missing",
            state_json(|v| {
                v.as_object_mut().unwrap().remove("optimizer_steps");
            }),
            vec!["`optimizer_steps` is missing"],
        ),
        (
            "optimizer_steps empty",
            state_json(|v| v["optimizer_steps"] = json!([])),
            vec!["`optimizer_steps`"],
        ),
        (
            "optimizer_steps a string",
            state_json(|v| v["optimizer_steps"] = json!("5")),
            vec!["`optimizer_steps`", "not a list"],
        ),
        (
            "optimizer_steps negative",
            state_json(|v| v["optimizer_steps"] = json!([-1, -1])),
            vec!["`optimizer_steps[0]` is -1", "negative"],
        ),
        (
            "optimizer_steps not the step",
            state_json(|v| v["optimizer_steps"] = json!([7, 7])),
            vec!["`optimizer_steps[0]` is 7"],
        ),
        (
            "optimizer_steps of three groups",
            state_json(|v| {
                let s = v["step"].clone();
                v["optimizer_steps"] = json!([s, s, s]);
            }),
            vec!["state.json", "3 parameter groups"],
        ),
        (
            "train_secs negative",
            state_json(|v| v["train_secs"] = json!(-1.0)),
            vec!["`train_secs` is -1"],
        ),
        (
            "train_secs a string",
            state_json(|v| v["train_secs"] = json!("soon")),
            vec!["`train_secs`"],
        ),
        (
            "files not a map",
            state_json(|v| v["files"] = json!("all good")),
            vec!["state.json", "`files`"],
        ),
        (
            "files with a wrong SHA-256",
            state_json(|v| v["files"]["state.safetensors"]["sha256"] = json!("0".repeat(64))),
            vec!["state.safetensors", "damaged", "SHA-256"],
        ),
        (
            "files with a wrong size",
            state_json(|v| v["files"]["state.safetensors"]["bytes"] = json!(12)),
            vec!["state.safetensors", "damaged"],
        ),
        (
            "files without state.safetensors",
            state_json(|v| v["files"] = json!({"other.bin": {"bytes": 1, "sha256": "00"}})),
            vec!["state.json", "no record of state.safetensors"],
        ),
        (
            "state tensors of the wrong shape",
            Box::new(|r: &Path| {
                rewrite_state(r, |t| {
                    t.insert(
                        "group0.0.m".into(),
                        Tensor::zeros((3, 3), DType::F32, &Device::Cpu).unwrap(),
                    );
                })
            }),
            vec!["state.safetensors", "`group0.0.m` has shape [3, 3]"],
        ),
        (
            "state tensor missing",
            Box::new(|r: &Path| {
                rewrite_state(r, |t| {
                    t.remove("group0.1.v");
                })
            }),
            vec!["state.safetensors", "lacks `group0.1.v`"],
        ),
        (
            "state.safetensors not safetensors",
            Box::new(|r: &Path| {
                std::fs::write(
                    r.join("checkpoint/state.safetensors"),
                    b"\x08\0\0\0\0\0\0\0{\"a\":1}",
                )
                .unwrap();
                record_digest(r, b"\x08\0\0\0\0\0\0\0{\"a\":1}");
            }),
            vec!["state.safetensors", "not a safetensors file"],
        ),
        (
            "summary.json not JSON",
            write("summary.json", b"{\"id\": "),
            vec!["summary.json", "not a run summary"],
        ),
        (
            "summary.json without a status",
            Box::new(|r: &Path| {
                edit_json(&r.join("summary.json"), |v| {
                    v.as_object_mut().unwrap().remove("status");
                })
            }),
            vec!["summary.json", "status"],
        ),
        (
            "summary.json with another schedule",
            Box::new(|r: &Path| {
                edit_json(&r.join("summary.json"), |v| v["total_steps"] = json!(9))
            }),
            vec!["state.json", "`total_steps` is 8, but the run has 9"],
        ),
        (
            "summary.json and checkpoint of another schedule",
            Box::new(|r: &Path| {
                edit_json(&r.join("summary.json"), |v| v["total_steps"] = json!(9));
                edit_json(&r.join("checkpoint/state.json"), |v| {
                    v["total_steps"] = json!(9)
                });
            }),
            vec!["summary.json", "`total_steps` is 9", "give 8"],
        ),
        (
            "config.toml missing",
            Box::new(|r: &Path| std::fs::remove_file(r.join("config.toml")).unwrap()),
            vec!["not a run folder", "config.toml"],
        ),
        (
            "config.toml not TOML",
            write("config.toml", b"[optim\nlr = "),
            vec!["config.toml"],
        ),
        (
            "config.toml of another rank",
            Box::new(|r: &Path| {
                let t = std::fs::read_to_string(r.join("config.toml")).unwrap();
                std::fs::write(r.join("config.toml"), t.replace("rank = 8", "rank = 4")).unwrap();
            }),
            vec!["state.safetensors", "has shape"],
        ),
        (
            "checkpoint is a file",
            Box::new(|r: &Path| {
                std::fs::remove_dir_all(r.join("checkpoint")).unwrap();
                std::fs::write(r.join("checkpoint"), b"x").unwrap();
            }),
            vec!["checkpoint", "not a folder"],
        ),
        (
            "metrics.jsonl damaged mid-file",
            Box::new(|r: &Path| {
                let t = std::fs::read_to_string(r.join("metrics.jsonl")).unwrap();
                let mut lines: Vec<&str> = t.lines().collect();
                lines[1] = "{\"kind\": \"step\", \"step\": ";
                std::fs::write(r.join("metrics.jsonl"), lines.join("\n")).unwrap();
            }),
            vec!["metrics.jsonl", "line 2"],
        ),
        (
            "damaged checkpoint beside an unfinished save",
            Box::new(move |r: &Path| {
                copy_dir(&r.join("checkpoint"), &r.join("checkpoint.tmp"));
                std::fs::remove_file(r.join("checkpoint.tmp/state.json")).unwrap();
                flip_16(&r.join(st));
            }),
            vec!["state.safetensors", "damaged", "delete"],
        ),
    ]
}

/// A run stopped after 5 of 8 steps (checkpoint at step 5), made once.
fn stopped_run(root: &Path) -> PathBuf {
    let store = RunStore::new(root);
    let s = train(&tiny(), &store, &mut StopAfter(5), &mut |_| {}).unwrap();
    assert_eq!((s.status, s.steps_done), (RunStatus::Stopped, 5));
    root.join(&s.id)
}

#[test]
fn bad_run_folders_are_refused_clearly_and_left_alone() {
    let root = TempDir::new("runs");
    let good = stopped_run(&root.0);
    let cases = run_cases();
    let n = cases.len();
    for (k, (what, mutate, needles)) in cases.into_iter().enumerate() {
        let dir = root.path(&format!("case-{k}/run"));
        copy_dir(&good, &dir);
        mutate(&dir);
        let adapter = std::fs::read(dir.join("adapter/adapter_model.safetensors")).unwrap();
        let summary = std::fs::read(dir.join("summary.json")).unwrap();
        let e = resume(&dir, &mut NeverStop, &mut |_| {})
            .map(|s| format!("resumed: {s:?}"))
            .unwrap_err();
        let msg = format!("{e:#}");
        for needle in &needles {
            assert!(msg.contains(needle), "{what}: `{needle}` not in: {msg}");
        }
        assert!(!msg.contains("panicked"), "{what}: {msg}");
        assert_eq!(
            std::fs::read(dir.join("adapter/adapter_model.safetensors")).unwrap(),
            adapter,
            "{what}: the adapter was overwritten"
        );
        assert_eq!(
            std::fs::read(dir.join("summary.json")).unwrap(),
            summary,
            "{what}"
        );
        eprintln!("{what}: {msg}");
    }
    eprintln!("{n} bad run folders, {n} clean errors");
    assert!(n >= 40);
}

#[test]
fn good_copies_beside_a_damaged_checkpoint_are_used_and_old_checkpoints_still_load() {
    let root = TempDir::new("runs-good");
    let good = stopped_run(&root.0);
    // A damaged checkpoint/ with a good checkpoint.old/ (step 4): resumes from the old one.
    let dir = root.path("old/run");
    copy_dir(&good, &dir);
    copy_dir(&dir.join("checkpoint"), &dir.join("checkpoint.old"));
    flip_16(&dir.join("checkpoint/state.safetensors"));
    let mut log = Vec::new();
    let s = resume(&dir, &mut NeverStop, &mut |e| {
        if let Event::Log(t) = e {
            log.push(t)
        }
    })
    .unwrap();
    assert_eq!((s.status, s.steps_done), (RunStatus::Finished, 8));
    assert!(
        log.iter()
            .any(|l| l.contains("damaged") && l.contains("checkpoint.old")),
        "{log:?}"
    );
    // A checkpoint of an older version, without checksums, loads with a note.
    let dir = root.path("unverified/run");
    copy_dir(&good, &dir);
    edit_json(&dir.join("checkpoint/state.json"), |v| {
        let o = v.as_object_mut().unwrap();
        o.remove("files");
        o.remove("total_steps");
    });
    let mut log = Vec::new();
    let s = resume(&dir, &mut NeverStop, &mut |e| {
        if let Event::Log(t) = e {
            log.push(t)
        }
    })
    .unwrap();
    assert_eq!(s.status, RunStatus::Finished);
    assert!(log.iter().any(|l| l.contains("not verified")), "{log:?}");
}

/// A two-block toy model with query/key/value layers of 12×10.
fn model() -> LayerSet {
    let mut layers = Vec::new();
    for b in 0..2 {
        for (i, name) in ["query", "key", "value"].iter().enumerate() {
            let s = (b * 3 + i) as u64 * 10;
            layers.push(AdaptedLinear::new(
                format!("encoder.layer.{b}.attention.self.{name}"),
                randn(&[12, 10], 0.5, s),
                Some(randn(&[12], 0.1, s + 1)),
            ));
        }
    }
    LayerSet { layers }
}

fn adapter_json(f: impl Fn(&mut Value) + 'static) -> Mutation {
    Box::new(move |d: &Path| edit_json(&d.join(CONFIG_FILE), &f))
}

/// PEFT's own config (no `peft_studio` section), changed by `f`.
fn peft_json(f: impl Fn(&mut Value) + 'static) -> Mutation {
    Box::new(move |d: &Path| {
        edit_json(&d.join(CONFIG_FILE), |v| {
            v.as_object_mut().unwrap().remove("peft_studio");
            f(v);
        })
    })
}

/// Rewrites the weights with `f` applied, the digest dropped (as PEFT writes them).
fn weights(f: impl Fn(&mut HashMap<String, Tensor>) + 'static) -> Mutation {
    Box::new(move |d: &Path| {
        let p = d.join(WEIGHTS_FILE);
        let mut t = candle_core::safetensors::load(&p, &Device::Cpu).unwrap();
        f(&mut t);
        candle_core::safetensors::save(&t, &p).unwrap();
        edit_json(&d.join(CONFIG_FILE), |v| {
            v.as_object_mut().unwrap().remove(DIGEST_KEY);
        });
    })
}

const Q: &str = "base_model.model.encoder.layer.0.attention.self.query";

fn adapter_cases() -> Vec<(&'static str, Mutation, Vec<&'static str>)> {
    let w = WEIGHTS_FILE;
    vec![
        (
            "16 flipped bytes in the weights",
            Box::new(move |d: &Path| flip_16(&d.join(w))),
            vec![WEIGHTS_FILE, "damaged"],
        ),
        (
            "weights cut in half",
            Box::new(move |d: &Path| cut_half(&d.join(w))),
            vec![WEIGHTS_FILE, "damaged", "cut short"],
        ),
        (
            "weights empty",
            write_in(WEIGHTS_FILE, b""),
            vec![WEIGHTS_FILE, "damaged"],
        ),
        (
            "weights missing",
            Box::new(move |d: &Path| std::fs::remove_file(d.join(w)).unwrap()),
            vec![WEIGHTS_FILE, "No such file"],
        ),
        (
            "weights a folder",
            Box::new(move |d: &Path| {
                std::fs::remove_file(d.join(w)).unwrap();
                std::fs::create_dir(d.join(w)).unwrap();
            }),
            vec![WEIGHTS_FILE],
        ),
        (
            "config missing",
            Box::new(|d: &Path| std::fs::remove_file(d.join(CONFIG_FILE)).unwrap()),
            vec![CONFIG_FILE, "No such file"],
        ),
        (
            "config empty",
            write_in(CONFIG_FILE, b""),
            vec![CONFIG_FILE, "not valid JSON"],
        ),
        (
            "config a list",
            write_in(CONFIG_FILE, b"[]"),
            vec![CONFIG_FILE, "peft_type"],
        ),
        (
            "peft_type unknown",
            peft_json(|v| v["peft_type"] = json!("IA3")),
            vec![CONFIG_FILE, "peft_type", "IA3"],
        ),
        (
            "r missing",
            peft_json(|v| {
                v.as_object_mut().unwrap().remove("r");
            }),
            vec![CONFIG_FILE, "r: missing"],
        ),
        (
            "r negative",
            peft_json(|v| v["r"] = json!(-1)),
            vec![CONFIG_FILE, "r: -1 is not a rank"],
        ),
        (
            "r a word",
            peft_json(|v| v["r"] = json!("eight")),
            vec![CONFIG_FILE, "r:"],
        ),
        (
            "r zero",
            peft_json(|v| v["r"] = json!(0)),
            vec![CONFIG_FILE, "r: 0 is not a rank"],
        ),
        (
            "peft_type missing",
            peft_json(|v| {
                v.as_object_mut().unwrap().remove("peft_type");
            }),
            vec![CONFIG_FILE, "peft_type: missing"],
        ),
        (
            "target_modules missing",
            peft_json(|v| {
                v.as_object_mut().unwrap().remove("target_modules");
            }),
            vec![CONFIG_FILE, "target_modules"],
        ),
        (
            "target_modules a number",
            peft_json(|v| v["target_modules"] = json!(5)),
            vec![CONFIG_FILE, "target_modules: 5 is neither"],
        ),
        (
            "target_modules numbers",
            peft_json(|v| v["target_modules"] = json!([1, 2])),
            vec![CONFIG_FILE, "target_modules"],
        ),
        (
            "init_lora_weights unsupported",
            peft_json(|v| v["init_lora_weights"] = json!("olora")),
            vec![CONFIG_FILE, "init_lora_weights"],
        ),
        (
            "peft_studio section malformed",
            adapter_json(|v| v["peft_studio"] = json!({"method": "nope"})),
            vec![CONFIG_FILE, "peft_studio"],
        ),
        (
            "digest malformed",
            adapter_json(|v| v[DIGEST_KEY][WEIGHTS_FILE] = json!(5)),
            vec![CONFIG_FILE, DIGEST_KEY],
        ),
        (
            "digest of other contents",
            adapter_json(|v| v[DIGEST_KEY][WEIGHTS_FILE]["sha256"] = json!("ab".repeat(32))),
            vec![WEIGHTS_FILE, "damaged"],
        ),
        (
            "modules_to_save not a list",
            adapter_json(|v| v["modules_to_save"] = json!("head")),
            vec![CONFIG_FILE, "modules_to_save"],
        ),
        (
            "lora_A of the wrong width",
            weights(|t| {
                t.insert(
                    format!("{Q}.lora_A.weight"),
                    Tensor::zeros((4, 11), DType::F32, &Device::Cpu).unwrap(),
                );
            }),
            vec!["does not fit", "lora_A is 4×11"],
        ),
        (
            "lora_A not a matrix",
            weights(|t| {
                t.insert(
                    format!("{Q}.lora_A.weight"),
                    Tensor::zeros(40, DType::F32, &Device::Cpu).unwrap(),
                );
            }),
            vec!["does not fit", "must be matrices"],
        ),
        (
            "lora_B missing",
            weights(|t| {
                t.remove(&format!("{Q}.lora_B.weight"));
            }),
            vec!["does not fit", "`lora_B` is missing"],
        ),
        (
            "a module the model lacks",
            weights(|t| {
                let a = t[&format!("{Q}.lora_A.weight")].clone();
                t.insert("base_model.model.decoder.proj.lora_A.weight".into(), a);
            }),
            vec!["does not fit", "decoder.proj", "does not exist"],
        ),
        (
            "a key without PEFT's prefix",
            weights(|t| {
                let a = t[&format!("{Q}.lora_A.weight")].clone();
                t.insert("encoder.layer.0.lora_A.weight".into(), a);
            }),
            vec!["does not fit", "does not start with"],
        ),
        (
            "a key of another method",
            weights(|t| {
                t.insert(
                    format!("{Q}.svfit.z"),
                    Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap(),
                );
            }),
            vec!["does not fit", "is not a lora key"],
        ),
        (
            "a rank the layer cannot hold",
            weights(|t| {
                t.insert(
                    format!("{Q}.lora_A.weight"),
                    Tensor::zeros((20, 10), DType::F32, &Device::Cpu).unwrap(),
                );
                t.insert(
                    format!("{Q}.lora_B.weight"),
                    Tensor::zeros((12, 20), DType::F32, &Device::Cpu).unwrap(),
                );
            }),
            vec!["does not fit", "rank 20 is impossible"],
        ),
        (
            "no adapter weights at all",
            weights(|t| t.clear()),
            vec!["does not fit", "no adapter weights"],
        ),
        (
            "weights not safetensors",
            Box::new(move |d: &Path| {
                std::fs::write(d.join(w), b"PK\x03\x04 a zip file").unwrap();
                edit_json(&d.join(CONFIG_FILE), |v| {
                    v.as_object_mut().unwrap().remove(DIGEST_KEY);
                });
            }),
            vec![WEIGHTS_FILE, "not a safetensors file"],
        ),
    ]
}

fn write_in(rel: &'static str, bytes: &'static [u8]) -> Mutation {
    write(rel, bytes)
}

#[test]
fn bad_adapter_folders_are_refused_clearly_and_the_model_is_unchanged() {
    let root = TempDir::new("adapters");
    let mut trained = model();
    let cfg = AdapterConfig::new(Method::Lora, 4);
    attach_adapters(&mut trained, &cfg).unwrap();
    let good = root.path("good");
    save_adapter(&trained, &cfg, &good).unwrap();
    load_adapter(&mut model(), &good).expect("the good folder loads");
    let cases = adapter_cases();
    let n = cases.len();
    for (k, (what, mutate, needles)) in cases.into_iter().enumerate() {
        let dir = root.path(&format!("case-{k}"));
        copy_dir(&good, &dir);
        mutate(&dir);
        let mut m = model();
        let msg = match load_adapter(&mut m, &dir) {
            Ok(c) => panic!("{what}: loaded {c:?}"),
            Err(e) => format!("{e:#}"),
        };
        for needle in &needles {
            assert!(msg.contains(needle), "{what}: `{needle}` not in: {msg}");
        }
        assert!(
            m.layers.iter().all(|l| l.adapter().is_none()),
            "{what}: the model changed"
        );
        eprintln!("{what}: {msg}");
    }
    eprintln!("{n} bad adapter folders, {n} clean errors");
    assert!(n >= 25);
}

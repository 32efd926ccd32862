//! The LLaMA-family decoder and PEFT adapter loading against PyTorch: tiny random models and
//! PEFT LoRA adapters written by transformers and PEFT themselves
//! (`scripts/reference_llama.py`), with the logits PyTorch computed for fixed token ids,
//! committed under `tests/reference/llama_tiny/`. peft-studio loads the folders
//! (`load_folder`, `load_adapter`) and must give the same logits, base and adapted.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use peft_studio::models::llama::load_folder;
use peft_studio::peft::{Method, load_adapter};
use serde_json::Value;

/// Tolerance on |Δlogit| (f32 against PyTorch's f32; measured ≤ 1e-5).
const TOL: f32 = 1e-4;

fn case_dir(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/reference/llama_tiny")
        .join(case)
}

fn tensor3(v: &Value) -> Tensor {
    let rows: Vec<Vec<Vec<f32>>> = serde_json::from_value(v.clone()).unwrap();
    let (b, t, n) = (rows.len(), rows[0].len(), rows[0][0].len());
    let flat: Vec<f32> = rows.into_iter().flatten().flatten().collect();
    Tensor::from_vec(flat, (b, t, n), &Device::Cpu).unwrap()
}

fn check(case: &str) {
    let dir = case_dir(case);
    let r: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("logits.json")).unwrap()).unwrap();
    let ids: Vec<Vec<u32>> = serde_json::from_value(r["input_ids"].clone()).unwrap();
    let (b, t) = (ids.len(), ids[0].len());
    let ids = Tensor::from_vec(ids.concat(), (b, t), &Device::Cpu).unwrap();
    let compare = |got: &Tensor, want: &Tensor, what: &str| {
        let scale = want
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let d = (got - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            d <= TOL,
            "{case} {what}: max |Δlogit| {d:.3e} (max |logit| {scale:.2})"
        );
        eprintln!("{case} {what}: max |Δlogit| {d:.3e} (max |logit| {scale:.2})");
    };
    let mut m = load_folder(&dir, &candle_core::Device::Cpu).unwrap();
    compare(
        &m.forward(&ids, None, false).unwrap(),
        &tensor3(&r["base"]),
        "base",
    );
    let cfg = load_adapter(&mut m, &dir.join("adapter")).unwrap();
    assert_eq!((cfg.method, cfg.rank), (Method::Lora, 4));
    compare(
        &m.forward(&ids, None, false).unwrap(),
        &tensor3(&r["adapted"]),
        "with the PEFT adapter",
    );
}

#[test]
fn llama_gqa_untied_matches_pytorch() {
    check("llama_gqa_untied");
}

#[test]
fn llama3_rope_scaling_tied_matches_pytorch() {
    check("llama3_rope_tied");
}

#[test]
fn qwen2_biases_match_pytorch() {
    check("qwen2_biases");
}

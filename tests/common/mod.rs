//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod chat;
pub mod job;

use candle_core::{DType, Device, Tensor};
use peft_studio::peft::{AdaptedLinear, AdapterConfig, Init, Method};

/// Reproducible N(0, std²) tensor.
pub fn randn(dims: &[usize], std: f32, seed: u64) -> Tensor {
    peft_studio::bench::seeded_normal(dims, std, seed, &Device::Cpu).unwrap()
}

/// Largest |a − b| / max(|b|, floor).
pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let a = a
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let b = b
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    assert_eq!(a.len(), b.len(), "length differs");
    let scale = b.iter().map(|x| x.abs()).fold(0.0, f64::max).max(1e-12);
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
        / scale
}

/// A layer with a random m×n weight and bias.
pub fn layer(m: usize, n: usize, seed: u64) -> AdaptedLinear {
    AdaptedLinear::new(
        "block.0.attn.query",
        randn(&[m, n], 0.5, seed),
        Some(randn(&[m], 0.5, seed + 1)),
    )
}

/// Every (method, init) pair of METHODS.md.
pub fn every_method_and_init() -> Vec<(Method, Init)> {
    Method::ALL
        .iter()
        .flat_map(|m| m.inits().iter().map(move |i| (*m, *i)))
        .collect()
}

/// A config for `method`/`init` at `rank` with alpha 2r (scale 2, so scaling bugs show).
pub fn config(method: Method, init: Init, rank: usize) -> AdapterConfig {
    AdapterConfig {
        method,
        rank,
        alpha: Some(2.0 * rank as f64),
        init: Some(init),
        ..AdapterConfig::default()
    }
}

/// A fresh folder under the system temp dir, removed on drop.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    /// A new empty folder named after the test binary, a counter and `tag`.
    pub fn new(tag: &str) -> Self {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "peft-studio-{}-{}-{}-{tag}",
            env!("CARGO_CRATE_NAME"),
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    /// `rel` inside the folder, its parent folders created.
    pub fn path(&self, rel: &str) -> std::path::PathBuf {
        let p = self.0.join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        p
    }

    /// Writes `bytes` to `rel`; returns its path.
    pub fn write(&self, rel: &str, bytes: &[u8]) -> std::path::PathBuf {
        let p = self.path(rel);
        std::fs::write(&p, bytes).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Random weights for a LLaMA-family `c` under Hugging Face names (q/k/v biases when
/// `qkv_bias`), seeded.
pub fn random_weights(
    c: &peft_studio::models::llama::LlamaConfig,
    seed: u64,
) -> std::collections::HashMap<String, Tensor> {
    let (h, d, i) = (c.hidden_size, c.head_dim, c.intermediate_size);
    let (q, kv) = (c.num_attention_heads * d, c.num_key_value_heads * d);
    let mut n = seed;
    let mut rnd = |dims: &[usize], std: f32| {
        n += 1;
        randn(dims, std, n)
    };
    let mut w = std::collections::HashMap::new();
    w.insert(
        "model.embed_tokens.weight".into(),
        rnd(&[c.vocab_size, h], 1.0),
    );
    for l in 0..c.num_hidden_layers {
        let p = format!("model.layers.{l}");
        for (name, out, inp) in [
            ("self_attn.q_proj", q, h),
            ("self_attn.k_proj", kv, h),
            ("self_attn.v_proj", kv, h),
            ("self_attn.o_proj", h, q),
            ("mlp.gate_proj", i, h),
            ("mlp.up_proj", i, h),
            ("mlp.down_proj", h, i),
        ] {
            let std = 1.0 / (inp as f32).sqrt();
            w.insert(format!("{p}.{name}.weight"), rnd(&[out, inp], std));
            if c.qkv_bias && name.starts_with("self_attn.") && name != "self_attn.o_proj" {
                w.insert(format!("{p}.{name}.bias"), rnd(&[out], 0.5));
            }
        }
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            w.insert(
                format!("{p}.{norm}.weight"),
                (rnd(&[h], 0.1) + 1.0).unwrap(),
            );
        }
    }
    w.insert("model.norm.weight".into(), (rnd(&[h], 0.1) + 1.0).unwrap());
    if !c.tie_word_embeddings {
        w.insert("lm_head.weight".into(), rnd(&[c.vocab_size, h], 0.2));
    }
    w
}

/// Two sequences of token ids below 50 (the tiny LLaMA configs' vocabulary).
pub fn ids() -> Tensor {
    Tensor::new(
        &[[3u32, 17, 42, 0, 8, 49, 21], [1, 1, 30, 12, 5, 44, 9]],
        &Device::Cpu,
    )
    .unwrap()
}

/// Largest |a − b|.
pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// A tiny config: hidden 32, 2 layers, 4 heads, 2 KV heads, vocab 50.
pub fn tiny_llama(model_type: &str, tied: bool) -> serde_json::Value {
    serde_json::json!({
        "model_type": model_type,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 50,
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        // qwen2's reference config needs these.
        "sliding_window": 4096,
        "max_window_layers": 2,
        "use_sliding_window": false,
    })
}

/// The training loss of every step of run `id` in `store`, in order.
pub fn step_losses(store: &peft_studio::train::RunStore, id: &str) -> Vec<f64> {
    store
        .metrics(id)
        .unwrap()
        .into_iter()
        .filter_map(|m| match m {
            peft_studio::train::MetricLine::Step { loss, .. } => Some(loss),
            _ => None,
        })
        .collect()
}

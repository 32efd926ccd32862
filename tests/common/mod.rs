//! Helpers shared by the integration tests.
#![allow(dead_code)]

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

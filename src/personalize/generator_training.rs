//! Pre-training the text-to-portrait [`Generator`] as a DDPM, with checkpoints every N steps
//! and exact resume (a session may end mid-run; the next one continues from the checkpoint).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::fsio::write_safetensors;
use crate::models::unet::{Generator, UnetConfig};
use crate::train::optim::{AdamW, AdamWParams};

/// How the generator is trained.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GeneratorTraining {
    /// Optimiser steps.
    pub steps: usize,
    /// Images per step.
    pub batch: usize,
    /// Peak learning rate (after warm-up; cosine decay to 10 % of it).
    pub lr: f64,
    /// Linear warm-up steps.
    pub warmup: usize,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Write a checkpoint every this many steps (0: never).
    pub checkpoint_every: usize,
    /// Seed of batches, timesteps and noise.
    pub seed: u64,
}

impl Default for GeneratorTraining {
    fn default() -> Self {
        Self {
            steps: 2000,
            batch: 16,
            lr: 2e-3,
            warmup: 100,
            weight_decay: 0.0,
            checkpoint_every: 200,
            seed: 0,
        }
    }
}

impl GeneratorTraining {
    /// The learning rate at `step` (0-based).
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.lr * (step + 1) as f64 / self.warmup as f64;
        }
        let span = self.steps.saturating_sub(self.warmup).max(1) as f64;
        let p = ((step - self.warmup) as f64 / span).min(1.0);
        self.lr * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()))
    }
}

/// Progress of a training loop: `(step, total, loss)` after every step.
pub type Progress<'a> = &'a mut dyn FnMut(usize, usize, f32);

const STEP_KEY: &str = "step";
const CONFIG_KEY: &str = "unet_config";

/// Trains a generator of architecture `cfg` on `images` (N, C, S, S in [-1, 1]) with one
/// prompt each. When `checkpoint` is given, the run resumes from it if it exists (same
/// architecture required) and writes it every `checkpoint_every` steps; the batches of a step
/// depend only on `(seed, step)`, so a resumed run equals an uninterrupted one.
pub fn train_generator(
    cfg: &UnetConfig,
    images: &Tensor,
    prompts: &[String],
    training: &GeneratorTraining,
    checkpoint: Option<&Path>,
    progress: Progress<'_>,
) -> anyhow::Result<Generator> {
    let n = images.dim(0)?;
    anyhow::ensure!(n > 0, "no training images");
    anyhow::ensure!(
        prompts.len() == n,
        "{} prompts for {n} images",
        prompts.len()
    );
    anyhow::ensure!(training.batch > 0, "batch must be positive");
    let device = images.device().clone();
    let mut generator = Generator::new(cfg.clone(), &device)?;
    let vars = generator.trainable_vars()?;
    let mut opt = AdamW::new(
        vars.into_iter().map(|(_, v)| v).collect(),
        AdamWParams {
            lr: training.lr,
            weight_decay: training.weight_decay,
            ..Default::default()
        },
    )?;
    let mut start = 0;
    if let Some(path) = checkpoint.filter(|p| p.exists()) {
        start = load_checkpoint(path, cfg, &mut opt, &device)?;
        log::info!(
            "resuming the generator from step {start} ({})",
            path.display()
        );
    }
    for step in start..training.steps {
        let mut rng = StdRng::seed_from_u64(training.seed.wrapping_mul(0x9E37_79B9) ^ step as u64);
        let idx: Vec<u32> = (0..training.batch)
            .map(|_| rng.random_range(0..n) as u32)
            .collect();
        let idx_t = Tensor::from_vec(idx.clone(), training.batch, &device)?;
        let batch = images.index_select(&idx_t, 0)?;
        let batch_prompts: Vec<String> = idx.iter().map(|&i| prompts[i as usize].clone()).collect();
        let loss = generator.loss(&batch, &batch_prompts, &mut rng)?;
        let value = loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        anyhow::ensure!(
            value.is_finite(),
            "the loss is {value} at step {}",
            step + 1
        );
        opt.params.lr = training.lr_at(step);
        opt.step(&loss.backward()?)?;
        progress(step + 1, training.steps, value);
        let done = step + 1;
        if let Some(path) = checkpoint
            && training.checkpoint_every > 0
            && (done % training.checkpoint_every == 0 || done == training.steps)
        {
            save_checkpoint(path, cfg, &opt)?;
        }
    }
    Ok(generator)
}

fn save_checkpoint(path: &Path, cfg: &UnetConfig, opt: &AdamW) -> anyhow::Result<()> {
    let (tensors, step) = opt.state("opt");
    let meta: HashMap<String, String> = [
        (STEP_KEY.to_string(), step.to_string()),
        (CONFIG_KEY.to_string(), serde_json::to_string(cfg)?),
    ]
    .into();
    let tensors: Vec<(String, Tensor)> = tensors.into_iter().collect();
    write_safetensors(path, &tensors, meta)
        .map_err(|e| anyhow::anyhow!("checkpoint {}: {}", path.display(), e.reason()))
}

fn load_checkpoint(
    path: &Path,
    cfg: &UnetConfig,
    opt: &mut AdamW,
    device: &Device,
) -> anyhow::Result<usize> {
    let at = |e: String| anyhow::anyhow!("checkpoint {}: {e}", path.display());
    let bytes = std::fs::read(path).map_err(|e| at(e.to_string()))?;
    let (_, meta) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| at(e.to_string()))?;
    let meta = meta.metadata().clone().unwrap_or_default();
    let saved: UnetConfig = serde_json::from_str(
        meta.get(CONFIG_KEY)
            .ok_or_else(|| at("no generator config".into()))?,
    )?;
    anyhow::ensure!(
        &saved == cfg,
        "checkpoint {} was written for another generator architecture; delete it to start over",
        path.display()
    );
    let step: usize = meta
        .get(STEP_KEY)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| at("no step count".into()))?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, device)?;
    opt.load_state("opt", &tensors, step)
        .map_err(|e| at(e.to_string()))?;
    Ok(step)
}

//! Pre-training the text-to-portrait [`Generator`] as a DDPM (and a latent generator's
//! [`ImageCodec`] before it), with checkpoints every N steps
//! and exact resume (a session may end mid-run; the next one continues from the checkpoint).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

use crate::fsio::write_safetensors;
use crate::models::kit::{WarmupCosine, draw_indices, step_rng};
use crate::models::unet::{CodecConfig, Generator, ImageCodec, UnetConfig};
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
    /// The learning rate at `step` (0-based): linear warm-up, then cosine decay to 10 % of
    /// `lr` at `steps`.
    pub fn lr_at(&self, step: usize) -> f64 {
        WarmupCosine {
            peak: self.lr,
            warmup: self.warmup,
            steps: self.steps,
            floor: 0.1,
        }
        .lr_at(step)
    }
}

/// Progress of a training loop: `(step, total, loss)` after every step.
pub type Progress<'a> = &'a mut dyn FnMut(usize, usize, f32);

const STEP_KEY: &str = "step";
const CONFIG_KEY: &str = "unet_config";

/// Trains a generator of architecture `cfg` on `images` (N, C, S, S in [-1, 1]) with one
/// prompt each. A latent generator (`cfg.codec` set) needs its trained `codec`: the images are
/// encoded once and the UNet trains on their latents. When `checkpoint` is given, the run
/// resumes from it if it exists (same architecture required) and writes it every
/// `checkpoint_every` steps; the batches of a step depend only on `(seed, step)`, so a resumed
/// run equals an uninterrupted one. `after_checkpoint` sees the generator after each
/// checkpoint (the build draws a preview with it).
#[allow(clippy::too_many_arguments)] // data, recipe, checkpoint and two hooks: each distinct
pub fn train_generator(
    cfg: &UnetConfig,
    codec: Option<ImageCodec>,
    images: &Tensor,
    prompts: &[String],
    training: &GeneratorTraining,
    checkpoint: Option<&Path>,
    progress: Progress<'_>,
    after_checkpoint: &mut dyn FnMut(&Generator) -> anyhow::Result<()>,
) -> anyhow::Result<Generator> {
    let n = images.dim(0)?;
    anyhow::ensure!(n > 0, "no training images");
    anyhow::ensure!(
        prompts.len() == n,
        "{} prompts for {n} images",
        prompts.len()
    );
    let device = images.device().clone();
    let mut generator = Generator::new(cfg.clone(), &device)?;
    match codec {
        Some(c) => generator.set_codec(c)?,
        None => anyhow::ensure!(
            cfg.codec.is_none(),
            "a latent generator trains with its trained image codec"
        ),
    }
    let latents = generator.to_latents(images)?;
    let vars = generator.trainable_vars()?;
    let config = serde_json::to_string(cfg)?;
    run_steps(
        vars.into_iter().map(|(_, v)| v).collect(),
        n,
        training,
        Checkpointing {
            path: checkpoint,
            what: "generator",
            config: &config,
        },
        progress,
        &mut |idx, rng| {
            let idx_t = Tensor::from_vec(idx.to_vec(), idx.len(), &device)?;
            let batch = latents.index_select(&idx_t, 0)?;
            let batch_prompts: Vec<String> =
                idx.iter().map(|&i| prompts[i as usize].clone()).collect();
            let loss = generator.latent_loss_from(&batch, &batch_prompts, rng, 0)?;
            let value = loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
            Ok((loss, value))
        },
        &mut || after_checkpoint(&generator),
    )?;
    Ok(generator)
}

/// Trains the image codec of architecture `cfg` on `images` (N, C, S, S in [-1, 1]), with
/// checkpoints and exact resume as [`train_generator`]; the progress reports the mean absolute
/// reconstruction error. Ends by measuring the latent statistics on (up to 2048 of) the images.
pub fn train_codec(
    cfg: &CodecConfig,
    images: &Tensor,
    training: &GeneratorTraining,
    checkpoint: Option<&Path>,
    progress: Progress<'_>,
) -> anyhow::Result<ImageCodec> {
    let n = images.dim(0)?;
    anyhow::ensure!(n > 0, "no training images");
    let device = images.device().clone();
    let mut codec = ImageCodec::new(cfg.clone(), &device)?;
    let vars = codec.trainable_vars()?;
    let config = serde_json::to_string(cfg)?;
    run_steps(
        vars.into_iter().map(|(_, v)| v).collect(),
        n,
        training,
        Checkpointing {
            path: checkpoint,
            what: "image codec",
            config: &config,
        },
        progress,
        &mut |idx, rng| {
            let idx_t = Tensor::from_vec(idx.to_vec(), idx.len(), &device)?;
            Ok(codec.loss(&images.index_select(&idx_t, 0)?, rng)?)
        },
        &mut || Ok(()),
    )?;
    codec.set_latent_statistics(&images.narrow(0, 0, n.min(2048))?)?;
    Ok(codec)
}

/// How a trained codec's decoder is sharpened (the encoder stays fixed, so a generator trained
/// on its latents stays valid, as Stable Diffusion's fine-tuned VAE decoders do).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DecoderRefinement {
    /// Steps, batch, learning rate and checkpoints.
    pub training: GeneratorTraining,
    /// Weight of the error of the image's horizontal and vertical differences (edges).
    pub edge_weight: f64,
    /// Noise added to the latents, relative to their standard deviation (the generator's
    /// latents are imperfect; the decoder must tolerate that).
    pub latent_noise: f64,
}

impl Default for DecoderRefinement {
    fn default() -> Self {
        Self {
            training: GeneratorTraining {
                steps: 2000,
                lr: 5e-4,
                warmup: 50,
                checkpoint_every: 100,
                ..GeneratorTraining::default()
            },
            edge_weight: 1.0,
            latent_noise: 0.1,
        }
    }
}

/// Sharpens the decoder of a trained `codec` on `images` (N, C, S, S in [-1, 1]) as
/// `refinement` says, with checkpoints and exact resume as [`train_generator`]; the encoder
/// and the latent statistics are unchanged. The progress reports the mean absolute
/// reconstruction error.
pub fn refine_decoder(
    mut codec: ImageCodec,
    images: &Tensor,
    refinement: &DecoderRefinement,
    checkpoint: Option<&Path>,
    progress: Progress<'_>,
) -> anyhow::Result<ImageCodec> {
    let n = images.dim(0)?;
    anyhow::ensure!(n > 0, "no training images");
    let device = images.device().clone();
    let latents = codec.encode_unscaled(images)?;
    let vars = codec.decoder_trainable_vars()?;
    let config = serde_json::to_string(&(codec.config(), refinement))?;
    run_steps(
        vars.into_iter().map(|(_, v)| v).collect(),
        n,
        &refinement.training,
        Checkpointing {
            path: checkpoint,
            what: "decoder refinement",
            config: &config,
        },
        progress,
        &mut |idx, rng| {
            let idx_t = Tensor::from_vec(idx.to_vec(), idx.len(), &device)?;
            Ok(codec.decoder_loss(
                &latents.index_select(&idx_t, 0)?,
                &images.index_select(&idx_t, 0)?,
                refinement.latent_noise,
                refinement.edge_weight,
                rng,
            )?)
        },
        &mut || Ok(()),
    )?;
    Ok(codec)
}

/// One step's loss from the batch's indices and the step's random numbers: `(loss, value to
/// report)`.
type StepLoss<'a> = &'a mut dyn FnMut(&[u32], &mut StdRng) -> anyhow::Result<(Tensor, f32)>;

/// Where a training loop checkpoints, and what: the checkpoint is tagged with the trained
/// model's kind and configuration, and refused for another.
struct Checkpointing<'a> {
    path: Option<&'a Path>,
    what: &'a str,
    config: &'a str,
}

/// The AdamW loop both trainings share: seeded batches of `n` items per step, the learning
/// rate schedule, a finite-loss check, checkpoints of the optimiser (variables and moments)
/// tagged with `config` of the `what` they train (`after_checkpoint` runs after each), and resume from them.
fn run_steps(
    vars: Vec<Var>,
    n: usize,
    training: &GeneratorTraining,
    Checkpointing {
        path: checkpoint,
        what,
        config,
    }: Checkpointing<'_>,
    progress: Progress<'_>,
    step_loss: StepLoss<'_>,
    after_checkpoint: &mut dyn FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    anyhow::ensure!(training.batch > 0, "batch must be positive");
    let device = vars
        .first()
        .map(|v| v.device().clone())
        .ok_or_else(|| anyhow::anyhow!("nothing to train"))?;
    let mut opt = AdamW::new(
        vars,
        AdamWParams {
            lr: training.lr,
            weight_decay: training.weight_decay,
            ..Default::default()
        },
    )?;
    let mut start = 0;
    if let Some(path) = checkpoint.filter(|p| p.exists()) {
        start = load_checkpoint(path, (what, config), &mut opt, &device)?;
        log::info!("resuming the {what} from step {start} ({})", path.display());
    }
    for step in start..training.steps {
        let mut rng = step_rng(training.seed, step);
        let idx = draw_indices(&mut rng, n, training.batch)?;
        let (loss, value) = step_loss(&idx, &mut rng)?;
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
            save_checkpoint(path, config, &opt)?;
            after_checkpoint()?;
        }
    }
    Ok(())
}

fn save_checkpoint(path: &Path, config: &str, opt: &AdamW) -> anyhow::Result<()> {
    let (tensors, step) = opt.state("opt");
    let meta: HashMap<String, String> = [
        (STEP_KEY.to_string(), step.to_string()),
        (CONFIG_KEY.to_string(), config.to_string()),
    ]
    .into();
    let tensors: Vec<(String, Tensor)> = tensors.into_iter().collect();
    write_safetensors(path, &tensors, meta)
        .map_err(|e| anyhow::anyhow!("checkpoint {}: {}", path.display(), e.reason()))
}

fn load_checkpoint(
    path: &Path,
    (what, config): (&str, &str),
    opt: &mut AdamW,
    device: &Device,
) -> anyhow::Result<usize> {
    let at = |e: String| anyhow::anyhow!("checkpoint {}: {e}", path.display());
    let bytes = std::fs::read(path).map_err(|e| at(e.to_string()))?;
    let (_, meta) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| at(e.to_string()))?;
    let meta = meta.metadata().clone().unwrap_or_default();
    let saved: serde_json::Value =
        serde_json::from_str(meta.get(CONFIG_KEY).ok_or_else(|| at("no config".into()))?)?;
    anyhow::ensure!(
        saved == serde_json::from_str::<serde_json::Value>(config)?,
        "checkpoint {} was written for another {what} architecture; delete it to start over",
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

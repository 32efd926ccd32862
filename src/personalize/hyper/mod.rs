//! DiffLoRA's hypernetwork (see `METHODS.md`, "DiffLoRA"): the pieces that turn reference-image
//! embeddings into LoRA weights without any fine-tuning at use time.
//!
//! - [`fuse_embeddings`]: several reference embeddings of one person → one condition vector
//!   (mean of the rows, L2-normalised).
//! - [`LoraAutoencoder`] (`autoencoder.rs`): compresses a flat LoRA vector (D values) to a
//!   small latent (L values) and back. An MLP `D → hidden → L` / `L → hidden → D` with SiLU,
//!   trained on standardised vectors with a reconstruction loss and noise augmentation of the
//!   input and of the latent.
//! - [`LatentDenoiser`] (`denoiser.rs`): a conditional diffusion model over (standardised)
//!   autoencoder latents, conditioned on the fused identity embedding; DDPM ε-prediction
//!   training, DDIM sampling.
//!
//! Both are built from the layer kit ([`crate::models::kit`]): seeded dense layers, the
//! learning-rate schedule, shuffled epochs and model files. Everything random (initial
//! weights, batches, noise) is drawn from a `StdRng` seeded from the configuration, so training
//! and sampling are reproducible per seed. Models are saved as one safetensors file each, with
//! the configuration as JSON in the file's metadata; loading checks every tensor's name and
//! shape and names the file and the tensor in any error.

mod autoencoder;
mod denoiser;
#[cfg(test)]
mod tests;

use candle_core::{DType, Tensor};

pub use autoencoder::{AutoencoderConfig, LoraAutoencoder};
pub use denoiser::{DenoiserConfig, LatentDenoiser};

use crate::diffusion::DiffusionError;
use crate::models::kit::{Dense, DenseLayout, KitError, ParamSource, WarmupCosine};

/// Errors of the hypernetwork: bad settings, bad inputs, diverged training, bad files.
#[derive(Debug, thiserror::Error)]
pub enum HyperError {
    /// A configuration value is out of range.
    #[error("invalid setting `{field}` = {value}: {why}")]
    InvalidConfig {
        /// The configuration field.
        field: &'static str,
        /// Its value, as text.
        value: String,
        /// What is wrong with it.
        why: String,
    },
    /// An input tensor has the wrong shape.
    #[error("{what} has shape {got:?}, expected {expected}")]
    Shape {
        /// Which input.
        what: String,
        /// Its shape.
        got: Vec<usize>,
        /// The expected shape, in words.
        expected: String,
    },
    /// Inputs that are inconsistent with each other (indices out of range, empty sets …).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// An input holds NaN or infinite values.
    #[error("{0} holds NaN or infinite values")]
    NonFinite(String),
    /// The training loss became NaN or infinite.
    #[error("training diverged at step {step}: the loss is {loss}")]
    Diverged {
        /// The step (1-based).
        step: usize,
        /// The loss value.
        loss: f32,
    },
    /// A model file cannot be read or written, is not of the expected kind, or holds a
    /// missing, misshapen, corrupt or unexpected tensor (the error names the file and tensor).
    #[error(transparent)]
    Weights(#[from] KitError),
    /// An error of the diffusion utilities.
    #[error(transparent)]
    Diffusion(#[from] DiffusionError),
    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result type of the hypernetwork.
pub type Result<T> = std::result::Result<T, HyperError>;

/// The learning rate decays (cosine) to this fraction of the configured one.
const FINAL_LR_FRACTION: f64 = 0.1;

/// The learning rate of both trainings: no warm-up, cosine decay from `lr` to
/// [`FINAL_LR_FRACTION`] of it over `steps`.
fn lr_schedule(lr: f64, steps: usize) -> WarmupCosine {
    WarmupCosine {
        peak: lr,
        warmup: 0,
        steps,
        floor: FINAL_LR_FRACTION,
    }
}

/// A dense layer `name` (`fan_in` → `fan_out`) stored as `{name}.w` (in, out) and `{name}.b`.
fn dense(
    src: &mut dyn ParamSource,
    name: &str,
    fan_in: usize,
    fan_out: usize,
    gain: f64,
) -> Result<Dense> {
    Ok(Dense::build(
        src,
        name,
        fan_in,
        fan_out,
        gain,
        DenseLayout::InOut,
    )?)
}

/// Fuses the embeddings of several references of one person, `e` of shape (n, E) with n ≥ 1,
/// into one condition vector of shape (E,): the mean of the rows, L2-normalised (a zero mean
/// stays zero).
pub fn fuse_embeddings(e: &Tensor) -> candle_core::Result<Tensor> {
    let dims = e.dims();
    if dims.len() != 2 || dims[0] == 0 || dims[1] == 0 {
        candle_core::bail!("fuse_embeddings expects a tensor (n, E) with n, E ≥ 1, got {dims:?}");
    }
    let mean = e.to_dtype(DType::F32)?.mean(0)?;
    let norm = mean.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
    let mean = (mean / f64::from(norm.max(1e-12)))?;
    mean.to_dtype(e.dtype())
}

/// [`fuse_embeddings`] on plain rows (the training loop's fast path).
fn fuse_rows(rows: &[&[f32]], dim: usize) -> Vec<f32> {
    let mut acc = vec![0f32; dim];
    for r in rows {
        for (a, v) in acc.iter_mut().zip(r.iter()) {
            *a += v;
        }
    }
    let n = rows.len().max(1) as f32;
    acc.iter_mut().for_each(|a| *a /= n);
    let norm = acc.iter().map(|a| a * a).sum::<f32>().sqrt().max(1e-12);
    acc.iter_mut().for_each(|a| *a /= norm);
    acc
}
fn invalid(field: &'static str, value: impl std::fmt::Display, why: &str) -> HyperError {
    HyperError::InvalidConfig {
        field,
        value: value.to_string(),
        why: why.to_string(),
    }
}

fn check_positive(field: &'static str, v: usize) -> Result<()> {
    if v == 0 {
        return Err(invalid(field, v, "must be at least 1"));
    }
    Ok(())
}

fn check_lr(field: &'static str, v: f64) -> Result<()> {
    if !(v.is_finite() && v > 0.0) {
        return Err(invalid(field, v, "must be finite and > 0"));
    }
    Ok(())
}

fn check_nonneg(field: &'static str, v: f64) -> Result<()> {
    if !(v.is_finite() && v >= 0.0) {
        return Err(invalid(field, v, "must be finite and ≥ 0"));
    }
    Ok(())
}

/// Checks that `t` has rank 2 with both dimensions ≥ 1 (and the second equal to `cols` if
/// given), returning (rows, cols).
fn check_matrix(what: &str, t: &Tensor, cols: Option<usize>) -> Result<(usize, usize)> {
    let dims = t.dims();
    let expected = match cols {
        Some(c) => format!("(B, {c}) with B ≥ 1"),
        None => "(N, D) with N, D ≥ 1".to_string(),
    };
    match *dims {
        [r, c] if r > 0 && c > 0 && cols.is_none_or(|want| want == c) => Ok((r, c)),
        _ => Err(HyperError::Shape {
            what: what.to_string(),
            got: dims.to_vec(),
            expected,
        }),
    }
}

fn check_finite(what: &str, t: &Tensor) -> Result<()> {
    let s = t
        .abs()?
        .sum_all()?
        .to_dtype(DType::F32)?
        .to_scalar::<f32>()?;
    if !s.is_finite() {
        return Err(HyperError::NonFinite(what.to_string()));
    }
    Ok(())
}

fn check_loss(step: usize, loss: f32) -> Result<()> {
    if !loss.is_finite() {
        return Err(HyperError::Diverged { step, loss });
    }
    Ok(())
}

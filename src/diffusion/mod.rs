//! Model-agnostic diffusion utilities (DDPM training, DDIM sampling), the building blocks of the
//! DiffLoRA feature described in `METHODS.md`: a conditional denoiser over images or over LoRA
//! latents is trained with [`NoiseSchedule::ddpm_loss`] and sampled with [`ddim_sample`].
//!
//! - [`schedule`]: the DDPM noise schedules (linear, cosine), the forward process
//!   ([`NoiseSchedule::q_sample`]), the training targets (ε or v) and the loss.
//! - [`sampler`]: the DDIM sampler (deterministic for η = 0, seeded for η > 0) and the
//!   classifier-free guidance helper [`guided`].
//!
//! Timesteps are 0-based: `t` runs over `0..T`, and `ᾱ_t = Π_{i ≤ t} (1 − β_i)`, so `t = 0` is
//! the least noisy step and `t = T − 1` the noisiest. Everything random takes a caller-seeded
//! RNG (never candle's unseeded `randn`), so results are reproducible per seed.

pub mod sampler;
pub mod schedule;

pub use sampler::{DdimConfig, ddim_sample, ddim_timesteps, guided};
pub use schedule::{NoiseSchedule, Prediction, ScheduleConfig, ScheduleKind};

use candle_core::{DType, Device, Shape, Tensor};
use rand::Rng;
use rand_distr::StandardNormal;

/// Errors of the diffusion utilities: bad arguments are reported here instead of panicking.
#[derive(Debug, thiserror::Error)]
pub enum DiffusionError {
    /// A schedule with zero steps was requested.
    #[error("a noise schedule needs at least one step (got steps = 0)")]
    ZeroScheduleSteps,
    /// A sampler with zero steps was requested.
    #[error("the sampler needs at least one step (got steps = 0)")]
    ZeroSamplingSteps,
    /// More sampling steps than the schedule has.
    #[error("{sampling} sampling steps requested but the schedule has only {schedule} steps")]
    TooManySamplingSteps {
        /// Sampling steps requested.
        sampling: usize,
        /// Steps of the schedule (T).
        schedule: usize,
    },
    /// A timestep outside `0..T`.
    #[error("timestep {t} is out of range for a schedule of {steps} steps (valid: 0..{steps})")]
    TimestepOutOfRange {
        /// The offending timestep.
        t: usize,
        /// Steps of the schedule (T).
        steps: usize,
    },
    /// The number of timesteps does not match the batch size.
    #[error("{timesteps} timesteps given for a batch of {batch}")]
    BatchMismatch {
        /// Number of timesteps passed.
        timesteps: usize,
        /// Leading dimension of the tensor.
        batch: usize,
    },
    /// Two tensors that must have the same shape do not.
    #[error("shape mismatch: {what} has shape {got:?}, expected {expected:?}")]
    ShapeMismatch {
        /// Which tensor.
        what: &'static str,
        /// Its shape.
        got: Vec<usize>,
        /// The shape it should have.
        expected: Vec<usize>,
    },
    /// A tensor without a batch dimension (rank 0) or with an empty batch.
    #[error("expected a tensor of shape (B, …) with B ≥ 1, got shape {0:?}")]
    NoBatch(Vec<usize>),
    /// An invalid numeric parameter (η, guidance scale, clip value …).
    #[error("invalid parameter {name} = {value}: {why}")]
    InvalidParameter {
        /// Parameter name.
        name: &'static str,
        /// Its value.
        value: f64,
        /// What is wrong with it.
        why: &'static str,
    },
    /// An error from candle (including one returned by the model closure).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result type of the diffusion utilities.
pub type Result<T> = std::result::Result<T, DiffusionError>;

/// A tensor of independent standard-normal values of `shape`, drawn from `rng` (so reproducible
/// per seed, unlike candle's `randn`), converted to `dtype` on `device`.
pub fn seeded_normal<R: Rng + ?Sized, S: Into<Shape>>(
    shape: S,
    dtype: DType,
    device: &Device,
    rng: &mut R,
) -> Result<Tensor> {
    let shape: Shape = shape.into();
    let n = shape.elem_count();
    let data: Vec<f32> = (0..n)
        .map(|_| rng.sample::<f32, _>(StandardNormal))
        .collect();
    Ok(Tensor::from_vec(data, shape, device)?.to_dtype(dtype)?)
}

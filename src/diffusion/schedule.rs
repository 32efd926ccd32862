//! DDPM noise schedules, the forward process and the training targets.

use candle_core::{DType, Tensor};
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::{DiffusionError, Result};

/// Largest β allowed in any schedule (the clip of Nichol & Dhariwal 2021), so that ᾱ stays > 0.
pub const MAX_BETA: f64 = 0.999;

/// Offset `s` of the cosine schedule (Nichol & Dhariwal 2021).
pub const COSINE_S: f64 = 0.008;

/// The shape of the β schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    /// DDPM's linear β from 1e-4 to 0.02 for T = 1000, both ends scaled by 1000 / T for other T
    /// (as in the improved-DDPM code), each β clipped to [`MAX_BETA`].
    Linear,
    /// The cosine schedule of Nichol & Dhariwal (2021):
    /// `f(t) = cos²((t/T + s)/(1 + s) · π/2)`, `β_t = min(1 − f(t+1)/f(t), 0.999)`, `s = 0.008`.
    Cosine,
}

/// Serialisable description of a schedule: its kind and its number of steps T.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleConfig {
    /// Shape of the β schedule.
    pub kind: ScheduleKind,
    /// Number of diffusion steps T (≥ 1).
    pub steps: usize,
}

/// What the denoiser predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Prediction {
    /// The added noise ε.
    #[default]
    Epsilon,
    /// The velocity `v = √ᾱ·ε − √(1−ᾱ)·x0` (Salimans & Ho 2022).
    V,
}

/// A DDPM noise schedule with precomputed β and ᾱ (`alphas_cumprod`), indexed by 0-based `t`.
#[derive(Debug, Clone, PartialEq)]
pub struct NoiseSchedule {
    config: ScheduleConfig,
    betas: Vec<f64>,
    alphas_cumprod: Vec<f64>,
}

/// The cosine schedule's `f(t)` for T steps (unnormalised ᾱ).
fn cosine_f(t: f64, steps: f64) -> f64 {
    let c = ((t / steps + COSINE_S) / (1.0 + COSINE_S) * std::f64::consts::FRAC_PI_2).cos();
    c * c
}

impl NoiseSchedule {
    /// Builds the schedule described by `config`; errors if `config.steps == 0`.
    pub fn new(config: ScheduleConfig) -> Result<Self> {
        let steps = config.steps;
        if steps == 0 {
            return Err(DiffusionError::ZeroScheduleSteps);
        }
        let betas: Vec<f64> = match config.kind {
            ScheduleKind::Linear => {
                let scale = 1000.0 / steps as f64;
                let (start, end) = (1e-4 * scale, 0.02 * scale);
                (0..steps)
                    .map(|i| {
                        let frac = if steps == 1 {
                            0.0
                        } else {
                            i as f64 / (steps - 1) as f64
                        };
                        (start + (end - start) * frac).min(MAX_BETA)
                    })
                    .collect()
            }
            ScheduleKind::Cosine => {
                let t_total = steps as f64;
                (0..steps)
                    .map(|i| {
                        let b =
                            1.0 - cosine_f(i as f64 + 1.0, t_total) / cosine_f(i as f64, t_total);
                        b.clamp(0.0, MAX_BETA)
                    })
                    .collect()
            }
        };
        let mut acc = 1.0;
        let alphas_cumprod = betas
            .iter()
            .map(|b| {
                acc *= 1.0 - b;
                acc
            })
            .collect();
        Ok(Self {
            config,
            betas,
            alphas_cumprod,
        })
    }

    /// Shorthand for [`NoiseSchedule::new`] with a [`ScheduleKind::Linear`] schedule.
    pub fn linear(steps: usize) -> Result<Self> {
        Self::new(ScheduleConfig {
            kind: ScheduleKind::Linear,
            steps,
        })
    }

    /// Shorthand for [`NoiseSchedule::new`] with a [`ScheduleKind::Cosine`] schedule.
    pub fn cosine(steps: usize) -> Result<Self> {
        Self::new(ScheduleConfig {
            kind: ScheduleKind::Cosine,
            steps,
        })
    }

    /// The configuration this schedule was built from.
    pub fn config(&self) -> ScheduleConfig {
        self.config
    }

    /// Number of diffusion steps T.
    pub fn steps(&self) -> usize {
        self.betas.len()
    }

    /// β_t for `t` in `0..T`.
    pub fn betas(&self) -> &[f64] {
        &self.betas
    }

    /// ᾱ_t = Π_{i ≤ t}(1 − β_i) for `t` in `0..T` (strictly decreasing, in (0, 1)).
    pub fn alphas_cumprod(&self) -> &[f64] {
        &self.alphas_cumprod
    }

    /// ᾱ_t, or an error if `t ≥ T`.
    pub fn alpha_bar(&self, t: usize) -> Result<f64> {
        self.alphas_cumprod
            .get(t)
            .copied()
            .ok_or(DiffusionError::TimestepOutOfRange {
                t,
                steps: self.steps(),
            })
    }

    /// `batch` timesteps drawn uniformly from `0..T` with the caller's (seeded) RNG.
    pub fn sample_timesteps<R: Rng + ?Sized>(&self, batch: usize, rng: &mut R) -> Vec<usize> {
        let steps = self.steps();
        (0..batch).map(|_| rng.random_range(0..steps)).collect()
    }

    /// Checks that `x` has a batch dimension matching `t` and that every `t` is in range.
    fn check_batch(&self, x: &Tensor, t: &[usize]) -> Result<()> {
        let dims = x.dims();
        let batch = match dims.first() {
            Some(&b) if b > 0 => b,
            _ => return Err(DiffusionError::NoBatch(dims.to_vec())),
        };
        if t.len() != batch {
            return Err(DiffusionError::BatchMismatch {
                timesteps: t.len(),
                batch,
            });
        }
        for &ti in t {
            self.alpha_bar(ti)?;
        }
        Ok(())
    }

    /// Per-example coefficients `f(ᾱ_t)` as a tensor of shape (B, 1, …, 1) (rank and dtype of
    /// `like`), ready to broadcast against `like`.
    fn coef(&self, t: &[usize], like: &Tensor, f: impl Fn(f64) -> f64) -> Result<Tensor> {
        let vals: Vec<f64> = t
            .iter()
            .map(|&ti| self.alpha_bar(ti).map(&f))
            .collect::<Result<_>>()?;
        let mut shape = vec![1usize; like.rank().max(1)];
        shape[0] = t.len();
        Ok(Tensor::from_vec(vals, shape, like.device())?.to_dtype(like.dtype())?)
    }

    fn check_same_shape(what: &'static str, a: &Tensor, reference: &Tensor) -> Result<()> {
        if a.dims() != reference.dims() {
            return Err(DiffusionError::ShapeMismatch {
                what,
                got: a.dims().to_vec(),
                expected: reference.dims().to_vec(),
            });
        }
        Ok(())
    }

    /// The forward process `x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·noise` for a batch: `x0` and `noise` of
    /// the same shape (B, …), one timestep per example.
    pub fn q_sample(&self, x0: &Tensor, noise: &Tensor, t: &[usize]) -> Result<Tensor> {
        self.check_batch(x0, t)?;
        Self::check_same_shape("noise", noise, x0)?;
        let a = self.coef(t, x0, f64::sqrt)?;
        let b = self.coef(t, x0, |ab| (1.0 - ab).sqrt())?;
        Ok((x0.broadcast_mul(&a)? + noise.broadcast_mul(&b)?)?)
    }

    /// The regression target of the denoiser: `noise` for [`Prediction::Epsilon`], or
    /// `v = √ᾱ_t·noise − √(1−ᾱ_t)·x0` for [`Prediction::V`].
    pub fn target(
        &self,
        x0: &Tensor,
        noise: &Tensor,
        t: &[usize],
        prediction: Prediction,
    ) -> Result<Tensor> {
        self.check_batch(x0, t)?;
        Self::check_same_shape("noise", noise, x0)?;
        match prediction {
            Prediction::Epsilon => Ok(noise.clone()),
            Prediction::V => {
                let a = self.coef(t, x0, f64::sqrt)?;
                let b = self.coef(t, x0, |ab| (1.0 - ab).sqrt())?;
                Ok((noise.broadcast_mul(&a)? - x0.broadcast_mul(&b)?)?)
            }
        }
    }

    /// The DDPM training loss: the mean squared error between `model_output` and
    /// [`NoiseSchedule::target`] (a scalar, differentiable through `model_output`; the target
    /// is detached).
    pub fn ddpm_loss(
        &self,
        model_output: &Tensor,
        x0: &Tensor,
        noise: &Tensor,
        t: &[usize],
        prediction: Prediction,
    ) -> Result<Tensor> {
        Self::check_same_shape("model_output", model_output, x0)?;
        let target = self.target(x0, noise, t, prediction)?.detach();
        let target = target.to_dtype(model_output.dtype())?;
        Ok((model_output - target)?.sqr()?.mean_all()?)
    }

    /// Recovers `(x0, ε)` from a noisy `x_t` and a model output of kind `prediction`:
    /// ε-prediction: `x0 = (x_t − √(1−ᾱ)·ε)/√ᾱ`; v-prediction: `x0 = √ᾱ·x_t − √(1−ᾱ)·v`,
    /// `ε = √(1−ᾱ)·x_t + √ᾱ·v`.
    pub fn predict_x0_and_eps(
        &self,
        x_t: &Tensor,
        model_output: &Tensor,
        t: &[usize],
        prediction: Prediction,
    ) -> Result<(Tensor, Tensor)> {
        self.check_batch(x_t, t)?;
        Self::check_same_shape("model_output", model_output, x_t)?;
        let model_output = model_output.to_dtype(x_t.dtype())?;
        let sa = self.coef(t, x_t, f64::sqrt)?;
        let sb = self.coef(t, x_t, |ab| (1.0 - ab).sqrt())?;
        match prediction {
            Prediction::Epsilon => {
                let x0 = (x_t - model_output.broadcast_mul(&sb)?)?.broadcast_div(&sa)?;
                Ok((x0, model_output))
            }
            Prediction::V => {
                let x0 = (x_t.broadcast_mul(&sa)? - model_output.broadcast_mul(&sb)?)?;
                let eps = (x_t.broadcast_mul(&sb)? + model_output.broadcast_mul(&sa)?)?;
                Ok((x0, eps))
            }
        }
    }

    /// The x0 part of [`NoiseSchedule::predict_x0_and_eps`].
    pub fn predict_x0(
        &self,
        x_t: &Tensor,
        model_output: &Tensor,
        t: &[usize],
        prediction: Prediction,
    ) -> Result<Tensor> {
        Ok(self.predict_x0_and_eps(x_t, model_output, t, prediction)?.0)
    }

    /// The timestep `t` as sinusoidal features of shape (B, `dim`) (`dim/2` sines then `dim/2`
    /// cosines at geometrically spaced frequencies, as in the transformer / DDPM embedding),
    /// a convenience for small denoisers. Errors if `dim` is 0 or odd, or a `t` is out of range.
    pub fn timestep_embedding(
        &self,
        t: &[usize],
        dim: usize,
        dtype: DType,
        device: &candle_core::Device,
    ) -> Result<Tensor> {
        if dim == 0 || !dim.is_multiple_of(2) {
            return Err(DiffusionError::InvalidParameter {
                name: "dim",
                value: dim as f64,
                why: "the timestep embedding needs an even, positive dimension",
            });
        }
        for &ti in t {
            self.alpha_bar(ti)?;
        }
        let half = dim / 2;
        let mut data = Vec::with_capacity(t.len() * dim);
        for &ti in t {
            let freqs = (0..half).map(|i| (-(10_000f64.ln()) * i as f64 / half as f64).exp());
            let args: Vec<f64> = freqs.map(|f| ti as f64 * f).collect();
            data.extend(args.iter().map(|a| a.sin()));
            data.extend(args.iter().map(|a| a.cos()));
        }
        Ok(Tensor::from_vec(data, (t.len(), dim), device)?.to_dtype(dtype)?)
    }
}

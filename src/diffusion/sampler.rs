//! DDIM sampling (Song et al. 2021) and classifier-free guidance.

use candle_core::{DType, Device, Shape, Tensor};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

use super::schedule::{NoiseSchedule, Prediction};
use super::{DiffusionError, Result, seeded_normal};

/// Settings of [`ddim_sample`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DdimConfig {
    /// Number of denoising steps S (1 ≤ S ≤ T), spread evenly over the schedule.
    pub steps: usize,
    /// Stochasticity η ≥ 0: 0 is deterministic DDIM, 1 matches the DDPM posterior variance.
    pub eta: f64,
    /// What the model closure predicts.
    pub prediction: Prediction,
    /// If set, each predicted x0 is clamped to `[-c, c]` (and ε recomputed from it); `c > 0`.
    pub clip_x0: Option<f64>,
    /// Seed of the starting noise (and of the per-step noise when η > 0).
    pub seed: u64,
}

impl Default for DdimConfig {
    /// 50 steps, η = 0, ε-prediction, no clipping, seed 0.
    fn default() -> Self {
        Self {
            steps: 50,
            eta: 0.0,
            prediction: Prediction::Epsilon,
            clip_x0: None,
            seed: 0,
        }
    }
}

/// The S timesteps DDIM visits, noisiest first: `round(k·(T−1)/(S−1))` for `k = S−1 … 0`, so
/// they start at `T − 1` and end at 0, all distinct. Errors if `S == 0` or `S > T`.
pub fn ddim_timesteps(schedule_steps: usize, sampling_steps: usize) -> Result<Vec<usize>> {
    if sampling_steps == 0 {
        return Err(DiffusionError::ZeroSamplingSteps);
    }
    if schedule_steps == 0 {
        return Err(DiffusionError::ZeroScheduleSteps);
    }
    if sampling_steps > schedule_steps {
        return Err(DiffusionError::TooManySamplingSteps {
            sampling: sampling_steps,
            schedule: schedule_steps,
        });
    }
    if sampling_steps == 1 {
        return Ok(vec![schedule_steps - 1]);
    }
    let span = (schedule_steps - 1) as f64 / (sampling_steps - 1) as f64;
    Ok((0..sampling_steps)
        .rev()
        .map(|k| ((k as f64 * span).round() as usize).min(schedule_steps - 1))
        .collect())
}

/// Draws samples of `shape` (B, …) by DDIM from `schedule`, returning the final x0.
///
/// `model(x_t, t)` receives the current batch and one timestep per example (all equal) and
/// returns its prediction of kind `config.prediction` with the shape of `x_t`. The starting
/// noise is drawn from `config.seed` with a seeded RNG, so equal seeds give equal samples. Each
/// step goes from `t` to the next visited `t'` (ᾱ' = 1 after the last):
/// `x_{t'} = √ᾱ'·x̂0 + √(1−ᾱ'−σ²)·ε̂ + σ·z`, `σ = η·√((1−ᾱ')/(1−ᾱ))·√(1−ᾱ/ᾱ')`.
pub fn ddim_sample<S, F>(
    schedule: &NoiseSchedule,
    shape: S,
    dtype: DType,
    device: &Device,
    config: &DdimConfig,
    mut model: F,
) -> Result<Tensor>
where
    S: Into<Shape>,
    F: FnMut(&Tensor, &[usize]) -> candle_core::Result<Tensor>,
{
    let shape: Shape = shape.into();
    let batch = match shape.dims().first() {
        Some(&b) if b > 0 => b,
        _ => return Err(DiffusionError::NoBatch(shape.dims().to_vec())),
    };
    if !(config.eta.is_finite() && config.eta >= 0.0) {
        return Err(DiffusionError::InvalidParameter {
            name: "eta",
            value: config.eta,
            why: "η must be finite and ≥ 0",
        });
    }
    if let Some(c) = config.clip_x0
        && !(c.is_finite() && c > 0.0)
    {
        return Err(DiffusionError::InvalidParameter {
            name: "clip_x0",
            value: c,
            why: "the clip bound must be finite and > 0",
        });
    }
    let timesteps = ddim_timesteps(schedule.steps(), config.steps)?;
    let mut rng = StdRng::seed_from_u64(config.seed);
    let mut x = seeded_normal(shape.clone(), dtype, device, &mut rng)?;
    for (i, &t) in timesteps.iter().enumerate() {
        let ab = schedule.alpha_bar(t)?;
        let ab_prev = match timesteps.get(i + 1) {
            Some(&tp) => schedule.alpha_bar(tp)?,
            None => 1.0,
        };
        let ts = vec![t; batch];
        let out = model(&x, &ts)?;
        let (mut x0, mut eps) = schedule.predict_x0_and_eps(&x, &out, &ts, config.prediction)?;
        if let Some(c) = config.clip_x0 {
            x0 = x0.clamp(-c, c)?;
            eps = ((&x - (&x0 * ab.sqrt())?)? / (1.0 - ab).sqrt())?;
        }
        let sigma = if config.eta > 0.0 {
            config.eta
                * ((1.0 - ab_prev) / (1.0 - ab)).sqrt()
                * (1.0 - ab / ab_prev).max(0.0).sqrt()
        } else {
            0.0
        };
        let dir = (1.0 - ab_prev - sigma * sigma).max(0.0).sqrt();
        let mut next = ((&x0 * ab_prev.sqrt())? + (&eps * dir)?)?;
        if sigma > 0.0 {
            let z = seeded_normal(shape.clone(), dtype, device, &mut rng)?;
            next = (next + (z * sigma)?)?;
        }
        x = next;
    }
    Ok(x)
}

/// Classifier-free guidance: `uncond + scale·(cond − uncond)` (scale 1 gives `cond`, 0 gives
/// `uncond`). Errors if the shapes differ or `scale` is not finite.
pub fn guided(cond_out: &Tensor, uncond_out: &Tensor, scale: f64) -> Result<Tensor> {
    if !scale.is_finite() {
        return Err(DiffusionError::InvalidParameter {
            name: "scale",
            value: scale,
            why: "the guidance scale must be finite",
        });
    }
    if cond_out.dims() != uncond_out.dims() {
        return Err(DiffusionError::ShapeMismatch {
            what: "uncond_out",
            got: uncond_out.dims().to_vec(),
            expected: cond_out.dims().to_vec(),
        });
    }
    Ok((uncond_out + ((cond_out - uncond_out)? * scale)?)?)
}

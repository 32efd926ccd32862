//! How a LoRA is predicted from the fused identity embedding: an ensemble of latent denoisers
//! trained alike from different seeds, several latent samples from each, averaged, and the
//! decoded LoRA's update scaled by a strength.
//!
//! Why: with a bank of a few hundred LoRAs the denoiser's mapping from identity to latent is
//! poorly determined away from the training identities; two denoisers trained from different
//! seeds disagree there as much as they agree. Averaging samples estimates the conditional mean
//! latent (one DDIM sample is one draw of the bank's per-person spread), and averaging members
//! removes most of the seed-dependent error. Measured on held-out people (see the issue note).

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::bank::LoraLayout;
use super::hyper::{DenoiserConfig, LatentDenoiser, Result};

/// How a personaliser turns a fused identity embedding into a LoRA.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PredictionConfig {
    /// Latent denoisers in the ensemble; member `m` is trained with seed `denoiser.seed + m`.
    pub members: usize,
    /// Latents sampled from each member (seeds `seed`, `seed + 1`, … in one batch); all
    /// members' samples are averaged.
    pub samples: usize,
    /// Scale of the decoded LoRA's update ΔW = B·A (its B factors are multiplied by it), like
    /// a LoRA weight in other tools; 1 keeps the decoded LoRA as it is.
    pub lora_strength: f64,
}

impl Default for PredictionConfig {
    fn default() -> Self {
        Self {
            members: 1,
            samples: 1,
            lora_strength: 1.0,
        }
    }
}

impl PredictionConfig {
    /// Checks every setting; the error names the field.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.members >= 1, "prediction.members must be at least 1");
        anyhow::ensure!(self.samples >= 1, "prediction.samples must be at least 1");
        anyhow::ensure!(
            self.lora_strength.is_finite() && self.lora_strength > 0.0,
            "prediction.lora_strength must be a positive number, got {}",
            self.lora_strength
        );
        Ok(())
    }
}

/// The file of ensemble member `m` inside a personaliser folder (`latent_denoiser.safetensors`
/// for the first, `latent_denoiser.<m>.safetensors` for the others).
pub fn member_file(dir: &Path, m: usize) -> PathBuf {
    if m == 0 {
        dir.join(super::files::DENOISER)
    } else {
        dir.join(format!("latent_denoiser.{m}.safetensors"))
    }
}

/// The configuration of ensemble member `m`: `cfg` with the seed moved on by `m`.
pub fn member_config(cfg: &DenoiserConfig, m: usize) -> DenoiserConfig {
    DenoiserConfig {
        seed: cfg.seed.wrapping_add(m as u64),
        ..cfg.clone()
    }
}

/// Latent denoisers whose samples are averaged.
pub struct DenoiserEnsemble {
    members: Vec<LatentDenoiser>,
}

impl DenoiserEnsemble {
    /// An ensemble of already trained members (at least one, all of one latent and condition
    /// size).
    pub fn new(members: Vec<LatentDenoiser>) -> anyhow::Result<Self> {
        let first = members
            .first()
            .ok_or_else(|| anyhow::anyhow!("a denoiser ensemble needs at least one member"))?;
        let (l, e) = (first.config().latent_dim, first.config().cond_dim);
        for (m, d) in members.iter().enumerate() {
            anyhow::ensure!(
                d.config().latent_dim == l && d.config().cond_dim == e,
                "denoiser member {m} reads {}-value conditions and writes {}-value latents; \
                 member 0: {e} and {l}",
                d.config().cond_dim,
                d.config().latent_dim
            );
        }
        Ok(Self { members })
    }

    /// Loads members `0..count` from the personaliser folder `dir`; the error names the
    /// missing or bad file.
    pub fn load(dir: &Path, count: usize, device: &Device) -> anyhow::Result<Self> {
        let members = (0..count)
            .map(|m| {
                let path = member_file(dir, m);
                LatentDenoiser::load(&path, device).map_err(|e| {
                    anyhow::anyhow!("{}: {e} (denoiser member {m} of {count})", path.display())
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Self::new(members)
    }

    /// The members.
    pub fn members(&self) -> &[LatentDenoiser] {
        &self.members
    }

    /// The mean of `samples` latents from every member for one condition `cond` (1, E):
    /// a (1, L) latent. Deterministic in `seed`, and the same on any number of threads: the
    /// members sample in parallel (rayon's pool; each is a chain of small MLP calls too small
    /// to use more than one core), and their samples are joined in member order.
    pub fn predict(&self, cond: &Tensor, seed: u64, samples: usize) -> Result<Tensor> {
        use rayon::prelude::*;
        let cond = cond.repeat((samples.max(1), 1))?;
        let all = self
            .members
            .par_iter()
            .enumerate()
            .map(|(m, d)| d.sample(&cond, seed.wrapping_add(m as u64)))
            .collect::<Result<Vec<Tensor>>>()?;
        Ok(Tensor::cat(&all, 0)?.mean_keepdim(0)?)
    }
}

/// Multiplies the B factor of every layer of the flat LoRA `flat` (in `layout`'s order) by
/// `strength`, which scales each layer's update B·A by `strength`.
pub fn scale_lora_update(
    layout: &LoraLayout,
    flat: &mut [f32],
    strength: f32,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        flat.len() == layout.len(),
        "a LoRA vector of {} values, the layout holds {}",
        flat.len(),
        layout.len()
    );
    let mut offset = 0;
    for e in &layout.entries {
        let n: usize = e.shape.iter().product();
        if e.key.ends_with(".lora_B.weight") {
            flat[offset..offset + n]
                .iter_mut()
                .for_each(|v| *v *= strength);
        }
        offset += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::personalize::bank::LayoutEntry;
    use crate::test_util::max_abs_diff;

    fn tiny_member(seed: u64) -> LatentDenoiser {
        let dev = Device::Cpu;
        let latents = Tensor::arange(0f32, 18.0, &dev)
            .unwrap()
            .reshape((6, 3))
            .unwrap()
            .affine(0.1, -0.5)
            .unwrap();
        let embeddings: Vec<Tensor> = (0..3)
            .map(|i| {
                Tensor::new(
                    &[[1f32, i as f32, 0.5, -1.0], [0.5, 1.0, i as f32, 0.0]],
                    &dev,
                )
                .unwrap()
            })
            .collect();
        let cfg = DenoiserConfig {
            hidden: 8,
            layers: 1,
            time_dim: 8,
            steps: 3,
            batch: 4,
            sample_steps: 3,
            ..DenoiserConfig::default()
        };
        LatentDenoiser::train(
            &latents,
            &[0, 0, 1, 1, 2, 2],
            &embeddings,
            &member_config(&cfg, seed as usize),
            &mut |_, _| {},
        )
        .unwrap()
    }

    #[test]
    fn prediction_is_the_mean_of_every_members_samples() {
        let members = vec![tiny_member(0), tiny_member(1)];
        let cond = Tensor::new(&[[0.5f32, 0.5, 0.5, 0.5]], &Device::Cpu).unwrap();
        let three = cond.repeat((3, 1)).unwrap();
        let manual: Vec<Tensor> = members
            .iter()
            .enumerate()
            .map(|(m, d)| d.sample(&three, 7 + m as u64).unwrap())
            .collect();
        let expected = Tensor::cat(&manual, 0).unwrap().mean_keepdim(0).unwrap();
        let ensemble = DenoiserEnsemble::new(members).unwrap();
        let got = ensemble.predict(&cond, 7, 3).unwrap();
        assert_eq!(got.dims(), &[1, 3]);
        let diff = max_abs_diff(&got, &expected);
        assert!(diff < 1e-6, "{diff}");
        // Members trained from other seeds really differ, so averaging changes something.
        let single = ensemble.members()[0].sample(&cond, 7).unwrap();
        assert!(max_abs_diff(&single, &got) > 1e-6);
        assert!(DenoiserEnsemble::new(Vec::new()).is_err());
    }

    #[test]
    fn strength_scales_b_factors_only() {
        let layout = LoraLayout {
            entries: vec![
                LayoutEntry {
                    key: "x.to_q.lora_A.weight".into(),
                    shape: vec![1, 2],
                },
                LayoutEntry {
                    key: "x.to_q.lora_B.weight".into(),
                    shape: vec![2, 1],
                },
            ],
        };
        let mut v = vec![1.0, 2.0, 3.0, -4.0];
        scale_lora_update(&layout, &mut v, 1.5).unwrap();
        assert_eq!(v, [1.0, 2.0, 4.5, -6.0]);
        assert!(scale_lora_update(&layout, &mut [0.0; 3], 2.0).is_err());
    }

    #[test]
    fn settings_are_checked() {
        assert!(PredictionConfig::default().validate().is_ok());
        for bad in [
            PredictionConfig {
                members: 0,
                ..PredictionConfig::default()
            },
            PredictionConfig {
                samples: 0,
                ..PredictionConfig::default()
            },
            PredictionConfig {
                lora_strength: f64::NAN,
                ..PredictionConfig::default()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}

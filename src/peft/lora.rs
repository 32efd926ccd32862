//! LoRA (Hugging Face PEFT's): `y = x·Wᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ`.

use candle_core::{DType, Device, Tensor, Var};
use faer::Mat;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal, Uniform};

use super::config::{AdapterConfig, Init};
use super::decompose::{self, mat_to_tensor};
use super::frozen::{FrozenGrad, frozen_linear};
use super::{PeftError, Result};

/// LoRA's trainable pair and its scale.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    /// A (r×n), trainable.
    pub a: Var,
    /// B (m×r), trainable.
    pub b: Var,
    /// s = alpha / r (or alpha / √r).
    pub scale: f64,
    /// The initialiser used.
    pub init: Init,
    /// PiSSA's starting (A₀, B₀), subtracted from W to make the frozen base.
    pub initial: Option<(Tensor, Tensor)>,
}

impl LoraAdapter {
    /// Builds the adapter for pre-trained `w` (m×n, as f64 matrix `w64` too) at rank `r`.
    /// Returns it and the frozen base weight the layer must use (W, or `W − s·B·A` for PiSSA).
    pub fn init(
        layer: &str,
        w: &Tensor,
        w64: &Mat<f64>,
        r: usize,
        cfg: &AdapterConfig,
        seed: u64,
    ) -> Result<(Self, Tensor)> {
        let (m, n) = w.dims2()?;
        let dev = w.device();
        let scale = cfg.scale_for_rank(r);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let init = cfg.init();
        let adapter = match init {
            Init::Kaiming | Init::Gaussian => {
                let a: Vec<f32> = if init == Init::Kaiming {
                    // Kaiming-uniform with a = √5 on fan-in n: bound = 1/√n.
                    let bound = 1.0 / (n as f32).sqrt();
                    let dist = Uniform::new_inclusive(-bound, bound)
                        .map_err(|e| PeftError::Config(format!("kaiming init: {e}")))?;
                    (0..r * n).map(|_| dist.sample(&mut rng)).collect()
                } else {
                    let dist = Normal::new(0.0f32, 1.0 / r as f32)
                        .map_err(|e| PeftError::Config(format!("gaussian init: {e}")))?;
                    (0..r * n).map(|_| dist.sample(&mut rng)).collect()
                };
                let a = Var::from_tensor(&Tensor::from_vec(a, (r, n), dev)?)?;
                let b = Var::zeros((m, r), DType::F32, dev)?;
                LoraAdapter {
                    a,
                    b,
                    scale,
                    init,
                    initial: None,
                }
            }
            Init::Pissa => {
                let svd =
                    decompose::top_svd(w64, r, seed).map_err(|e| PeftError::Decomposition {
                        layer: layer.into(),
                        reason: e.to_string(),
                    })?;
                let root: Vec<f64> = svd.s.iter().map(|s| (s / scale).sqrt()).collect();
                let a = Mat::from_fn(r, n, |i, j| root[i] * svd.v[(j, i)]);
                let b = Mat::from_fn(m, r, |i, j| svd.u[(i, j)] * root[j]);
                let a0 = mat_to_tensor(a.as_ref(), DType::F32, dev)?;
                let b0 = mat_to_tensor(b.as_ref(), DType::F32, dev)?;
                let prod = &b * &a;
                let base = Mat::from_fn(m, n, |i, j| w64[(i, j)] - scale * prod[(i, j)]);
                let base = mat_to_tensor(base.as_ref(), w.dtype(), dev)?;
                let adapter = LoraAdapter {
                    a: Var::from_tensor(&a0.copy()?)?,
                    b: Var::from_tensor(&b0.copy()?)?,
                    scale,
                    init,
                    initial: Some((a0, b0)),
                };
                return Ok((adapter, base));
            }
            other => {
                return Err(PeftError::Config(format!(
                    "init `{other}` is not a LoRA initialiser"
                )));
            }
        };
        Ok((adapter, w.clone()))
    }

    /// Rank r.
    pub fn rank(&self) -> usize {
        self.a.dims()[0]
    }

    /// The branch `s·(x·Aᵀ)·Bᵀ` for `x` of shape (…, n), in f32.
    pub fn branch(&self, x: &Tensor) -> Result<Tensor> {
        let h = matmul_t(x, self.a.as_tensor())?;
        Ok((matmul_t(&h, self.b.as_tensor())? * self.scale)?)
    }

    /// The starting branch (PiSSA's `s·(x·A₀ᵀ)·B₀ᵀ`), or `None` when it is zero.
    pub fn initial_branch(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let Some((a0, b0)) = &self.initial else {
            return Ok(None);
        };
        let h = frozen_linear(x, a0, FrozenGrad::Skip)?;
        Ok(Some(
            (frozen_linear(&h, b0, FrozenGrad::Skip)? * self.scale)?,
        ))
    }

    /// `s·B·A` (m×n): what merging adds to the frozen base.
    pub fn merge_delta(&self) -> Result<Tensor> {
        Ok((self.b.as_tensor().matmul(self.a.as_tensor())? * self.scale)?)
    }

    /// `s·B₀·A₀`, what PiSSA took out of W; `None` for the other inits.
    pub fn initial_delta(&self) -> Result<Option<Tensor>> {
        match &self.initial {
            Some((a0, b0)) => Ok(Some((b0.matmul(a0)? * self.scale)?)),
            None => Ok(None),
        }
    }

    /// The change relative to the pre-trained weight as a plain LoRA pair `(B, A)` with scale 1:
    /// `(s·B, A)`, or for PiSSA `([s·B, −s·B₀], [A; A₀])` (rank 2r).
    pub fn lora_form(&self) -> Result<(Tensor, Tensor)> {
        let b = (self.b.as_tensor() * self.scale)?;
        let a = self.a.as_tensor().clone();
        match &self.initial {
            None => Ok((b, a)),
            Some((a0, b0)) => {
                let b0 = (b0 * (-self.scale))?;
                Ok((Tensor::cat(&[&b, &b0], 1)?, Tensor::cat(&[&a, a0], 0)?))
            }
        }
    }

    /// Named trainable variables (`lora_A`, `lora_B`).
    pub fn vars(&self) -> Vec<(&'static str, Var)> {
        vec![("lora_A", self.a.clone()), ("lora_B", self.b.clone())]
    }

    /// Device the adapter lives on.
    pub fn device(&self) -> &Device {
        self.a.device()
    }
}

/// `x·wᵀ` for x of shape (…, n) and w (k×n), with gradients for both.
pub(crate) fn matmul_t(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let (k, n) = w.dims2()?;
    let dims = x.dims();
    let lead = &dims[..dims.len() - 1];
    let rows: usize = lead.iter().product();
    let y = x.reshape((rows, n))?.matmul(&w.t()?)?;
    let mut out = lead.to_vec();
    out.push(k);
    y.reshape(out)
}

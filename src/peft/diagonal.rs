//! The shared "frozen factors + trainable diagonal" adapter of SVFit and LoLDU:
//! `y = x·W_resᵀ + b + s·((x·Rᵀ) ⊙ act(z))·Lᵀ`, with L (m×r) and R (r×n) frozen.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor, Var};
use faer::Mat;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal, Uniform};

use super::config::{AdapterConfig, Init, Method};
use super::decompose::{self, mat_to_tensor, vec_to_tensor};
use super::frozen::{
    FrozenGrad, frozen_linear, frozen_matmul_cpu, input_grad, product_in_precision,
};
use super::{PeftError, Result};

/// The scalar s: fixed, or trainable (SVFit's and LoLDU's option).
#[derive(Debug, Clone)]
pub enum Scale {
    /// A constant.
    Fixed(f64),
    /// A trainable scalar of shape (1).
    Trainable(Var),
}

/// SVFit's or LoLDU's adapter.
#[derive(Debug, Clone)]
pub struct DiagonalAdapter {
    /// Which method built it.
    pub method: Method,
    /// The initialiser used for z.
    pub init: Init,
    /// Left factor (m×r): `U_r` for SVFit, `P·L_r` for LoLDU. Frozen.
    pub left: Tensor,
    /// Right factor (r×n): `V_rᵀ` for SVFit, `U₁[:r]` for LoLDU. Frozen.
    pub right: Tensor,
    /// The trainable diagonal (r).
    pub z: Var,
    /// z's starting value (r).
    pub z0: Tensor,
    /// The scale s.
    pub scale: Scale,
    /// s's starting value.
    pub s0: f64,
    /// ReLU on z in the forward.
    pub relu: bool,
    /// LoLDU: the row order after r elimination steps (what rebuilds the factors exactly).
    pub perm: Option<Vec<usize>>,
}

/// Factors of a [`DiagonalAdapter`] before z is chosen.
struct Factors {
    left: Mat<f64>,
    right: Mat<f64>,
    /// Σ_r (SVFit) or D_r (LoLDU).
    values: Vec<f64>,
    perm: Option<Vec<usize>>,
}

impl DiagonalAdapter {
    /// Builds the adapter for pre-trained `w` (m×n; `w64` is the same as f64) at rank `r` and
    /// returns it with the frozen residual `W_res = W − s₀·L·diag(act(z₀))·R`.
    ///
    /// `forced_perm` replays a stored LoLDU pivot order (on load).
    pub fn init(
        layer: &str,
        w: &Tensor,
        w64: &Mat<f64>,
        r: usize,
        cfg: &AdapterConfig,
        seed: u64,
        forced_perm: Option<&[usize]>,
    ) -> Result<(Self, Tensor)> {
        let decomposition = |e: decompose::DecomposeError| PeftError::Decomposition {
            layer: layer.into(),
            reason: e.to_string(),
        };
        let s0 = cfg.scale_for_rank(r);
        let factors = match cfg.method {
            Method::Svfit => {
                let svd = decompose::top_svd(w64, r, seed).map_err(decomposition)?;
                Factors {
                    left: svd.u,
                    right: svd.v.transpose().to_owned(),
                    values: svd.s,
                    perm: None,
                }
            }
            Method::Loldu => {
                let lu = decompose::lu_truncated(w64, r, cfg.pivot_epsilon, forced_perm)
                    .map_err(decomposition)?;
                Factors {
                    left: lu.left,
                    right: lu.right,
                    values: lu.diag,
                    perm: Some(lu.perm),
                }
            }
            Method::Lora => {
                return Err(PeftError::Config("LoRA is not a diagonal adapter".into()));
            }
        };
        let init = cfg.init();
        let z0 = initial_z(init, &factors.values, s0, seed)?;
        let act = |v: f64| if cfg.relu { v.max(0.0) } else { v };
        let coef: Vec<f64> = z0.iter().map(|&z| s0 * act(z)).collect();
        let (m, n) = (w64.nrows(), w64.ncols());
        let scaled_left = Mat::from_fn(m, r, |i, j| factors.left[(i, j)] * coef[j]);
        let removed = &scaled_left * &factors.right;
        let residual = Mat::from_fn(m, n, |i, j| w64[(i, j)] - removed[(i, j)]);

        let dev = w.device();
        let z0_t = vec_to_tensor(&z0, DType::F32, dev)?;
        let scale = if cfg.trainable_scale {
            Scale::Trainable(Var::from_tensor(&vec_to_tensor(&[s0], DType::F32, dev)?)?)
        } else {
            Scale::Fixed(s0)
        };
        let adapter = DiagonalAdapter {
            method: cfg.method,
            init,
            left: mat_to_tensor(factors.left.as_ref(), DType::F32, dev)?,
            right: mat_to_tensor(factors.right.as_ref(), DType::F32, dev)?,
            z: Var::from_tensor(&z0_t.copy()?)?,
            z0: z0_t,
            scale,
            s0,
            relu: cfg.relu,
            perm: factors.perm,
        };
        Ok((
            adapter,
            mat_to_tensor(residual.as_ref(), w.dtype(), w.device())?,
        ))
    }

    /// Rank r.
    pub fn rank(&self) -> usize {
        self.z0.dims()[0]
    }

    fn act(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        if self.relu { z.relu() } else { Ok(z.clone()) }
    }

    /// The current coefficient vector `s·act(z)` (r).
    pub fn coefficients(&self) -> Result<Tensor> {
        let z = self.act(self.z.as_tensor())?;
        Ok(match &self.scale {
            Scale::Fixed(s) => (z * *s)?,
            Scale::Trainable(s) => z.broadcast_mul(s.as_tensor())?,
        })
    }

    /// The starting coefficients `s₀·act(z₀)` (r).
    pub fn initial_coefficients(&self) -> Result<Tensor> {
        Ok((self.act(&self.z0)? * self.s0)?)
    }

    fn apply(&self, x: &Tensor, coef: &Tensor) -> Result<Tensor> {
        let h = frozen_linear(x, &self.right, FrozenGrad::Skip)?;
        let h = h.broadcast_mul(coef)?;
        Ok(frozen_linear(&h, &self.left, FrozenGrad::Skip)?)
    }

    /// The branch `s·((x·Rᵀ) ⊙ act(z))·Lᵀ`, never forming the m×n delta.
    pub fn branch(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, &self.coefficients()?)
    }

    /// The starting branch, removed from W when the residual was built.
    pub fn initial_branch(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, &self.initial_coefficients()?)
    }

    /// Whether [`merged_forward`](Self::merged_forward) costs less than the factored branch
    /// for an m×n layer on `rows` input rows. The factored branch adds four rows×r×(m or n)
    /// products to a step; the merged one forms L·diag(c)·R (m·r·n) and, for z's gradient,
    /// `gᵀ·x` (rows·m·n) and one m·n·r product.
    pub fn merged_forward_pays(&self, rows: usize) -> bool {
        let (m, n) = (self.left.dims()[0], self.right.dims()[1]);
        let r = self.rank();
        let factored = 2 * rows * r * (m + n);
        let merged = 2 * m * r * n + rows * m * n;
        merged < factored
    }

    /// The whole adapted layer `x·(W_res + s·L·diag(act(z))·R)ᵀ (+ b)` with one matmul over the
    /// rows: the m×n weight is formed once per call (per step), the backward gives x's gradient
    /// through it and z's as `diag(Lᵀ·(gᵀ·x)·Rᵀ)`. Same function as the factored form (up to
    /// float rounding). One op for f32 on the CPU; on a GPU
    /// [`merged_forward_composed`](Self::merged_forward_composed). With bf16 matmuls
    /// (`model.matmul_precision`) forming the weight, its products and z's gradient products
    /// take bf16 operands with f32 sums.
    pub fn merged_forward(
        &self,
        x: &Tensor,
        w_res: &Tensor,
        bias: Option<&Tensor>,
    ) -> Result<Tensor> {
        if composed(x) {
            return self.merged_forward_composed(x, w_res, bias);
        }
        let coef = self.coefficients()?;
        let delta = product_in_precision(&self.left_scaled(&coef.detach())?, &self.right)?;
        let w_eff = (w_res + delta)?;
        let (m, n) = w_eff.dims2()?;
        let dims = x.dims();
        let rows: usize = dims[..dims.len().saturating_sub(1)].iter().product();
        let y = x.reshape((rows, n))?.contiguous()?.apply_op3(
            &w_eff.t()?,
            &coef,
            MergedDiagonal {
                left: self.left.clone(),
                right: self.right.clone(),
            },
        )?;
        let mut out_dims = dims[..dims.len() - 1].to_vec();
        out_dims.push(m);
        let y = y.reshape(out_dims)?;
        Ok(match bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }

    /// [`merged_forward`](Self::merged_forward) as standard candle ops on x's device (the GPU
    /// path): `W_eff = W_res + L·diag(s·act(z))·R` with `W_res` detached, then `x·W_effᵀ (+ b)`;
    /// candle's autograd carries the gradient to x, z and a trainable s through W_eff. The
    /// product runs in f32 (W_eff carries a gradient, so it is not a frozen product).
    pub fn merged_forward_composed(
        &self,
        x: &Tensor,
        w_res: &Tensor,
        bias: Option<&Tensor>,
    ) -> Result<Tensor> {
        let w_eff = (w_res.detach() + self.product(&self.coefficients()?)?)?;
        let (m, n) = w_eff.dims2()?;
        let dims = x.dims();
        let lead = &dims[..dims.len().saturating_sub(1)];
        let y = x.reshape(((), n))?.matmul(&w_eff.t()?)?;
        let mut out_dims = lead.to_vec();
        out_dims.push(m);
        let y = y.reshape(out_dims)?;
        Ok(match bias {
            Some(b) => y.broadcast_add(&b.detach())?,
            None => y,
        })
    }

    /// `L·diag(coef)` (m×r).
    fn left_scaled(&self, coef: &Tensor) -> Result<Tensor> {
        Ok(self.left.broadcast_mul(&coef.unsqueeze(0)?)?)
    }

    /// `L·diag(coef)·R` (m×n), with coef's gradient (candle's matmul).
    fn product(&self, coef: &Tensor) -> Result<Tensor> {
        Ok(self.left_scaled(coef)?.matmul(&self.right)?)
    }

    /// `L·diag(s·act(z))·R` (m×n): what merging adds to the residual.
    pub fn merge_delta(&self) -> Result<Tensor> {
        self.product(&self.coefficients()?)
    }

    /// `L·diag(s₀·act(z₀))·R`: what was taken out of W to make the residual.
    pub fn initial_delta(&self) -> Result<Tensor> {
        self.product(&self.initial_coefficients()?)
    }

    /// The change relative to the pre-trained weight as a plain LoRA pair `(B, A)` with
    /// scale 1: `B = L·diag(s·act(z) − s₀·act(z₀))`, `A = R`.
    pub fn lora_form(&self) -> Result<(Tensor, Tensor)> {
        let diff = (self.coefficients()? - self.initial_coefficients()?)?;
        Ok((self.left_scaled(&diff)?, self.right.clone()))
    }

    /// Named trainable variables (`z`, and `scale` when it trains).
    pub fn vars(&self) -> Vec<(&'static str, Var)> {
        let mut v = vec![("z", self.z.clone())];
        if let Scale::Trainable(s) = &self.scale {
            v.push(("scale", s.clone()));
        }
        v
    }

    /// The current scale s.
    pub fn scale_value(&self) -> Result<f64> {
        Ok(match &self.scale {
            Scale::Fixed(s) => *s,
            Scale::Trainable(v) => v.as_tensor().flatten_all()?.to_vec1::<f32>()?[0] as f64,
        })
    }
}

/// Whether a product with input `x` runs as standard candle ops on the device (the GPU path):
/// the fused kernel here implements `cpu_fwd` only.
fn composed(x: &Tensor) -> bool {
    !x.device().is_cpu()
}

/// `x·W_effᵀ` over (x, W_effᵀ, c) whose backward yields the gradients of x and of the
/// coefficients c (W_eff is a constant formed from c outside the op).
struct MergedDiagonal {
    left: Tensor,
    right: Tensor,
}

impl CustomOp3 for MergedDiagonal {
    fn name(&self) -> &'static str {
        "merged-diagonal-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        _s3: &CpuStorage,
        _l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        frozen_matmul_cpu(s1, l1, s2, l2)
    }

    fn bwd(
        &self,
        x: &Tensor,
        wt: &Tensor,
        _coef: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?;
        // No gradient for an input that no trained value reaches (see the fused LoRA op).
        let gx = if x.track_op() {
            Some(input_grad(&g, wt)?)
        } else {
            None
        };
        // dc_j = Σ_rows (x·R_jᵀ)(g·L_j) = L_jᵀ·(gᵀ·x)·R_jᵀ.
        let gtx = product_in_precision(&g.t()?, x)?;
        let p = product_in_precision(&gtx, &self.right.t()?)?;
        let gc = (&self.left * p)?.sum(0)?;
        Ok((gx, None, Some(gc)))
    }
}

/// z₀ for the initialiser, from the decomposition's values (Σ_r or D_r) and the scale s₀.
fn initial_z(init: Init, values: &[f64], s0: f64, seed: u64) -> Result<Vec<f64>> {
    let r = values.len();
    let mean = values.iter().sum::<f64>() / r as f64;
    let std = (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / r as f64).sqrt();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed_2a11);
    Ok(match init {
        Init::Svd => values.iter().map(|v| v / s0).collect(),
        Init::Lu => values.to_vec(),
        Init::Uniform => {
            let h = mean.abs() / 2.0;
            if h == 0.0 {
                vec![0.0; r]
            } else {
                let d = Uniform::new_inclusive(-h, h)
                    .map_err(|e| PeftError::Config(format!("uniform init: {e}")))?;
                (0..r).map(|_| d.sample(&mut rng)).collect()
            }
        }
        Init::Normal => {
            let d = Normal::new(mean, std)
                .map_err(|e| PeftError::Config(format!("normal init: {e}")))?;
            (0..r).map(|_| d.sample(&mut rng)).collect()
        }
        Init::Constant => vec![mean; r],
        Init::Ones => vec![1.0; r],
        Init::Zeros => vec![0.0; r],
        other => {
            return Err(PeftError::Config(format!(
                "init `{other}` is not an SVFit or LoLDU initialiser"
            )));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peft::{AdaptedLinear, AdapterConfig};
    use crate::test_util::max_abs_diff as max_diff;
    use candle_core::Device;

    /// At full rank the merged forward (one matmul) computes what the factored branch does,
    /// with the same gradients for x and z, for both methods.
    #[test]
    fn merged_forward_matches_the_factored_branch_with_gradients() {
        let dev = Device::Cpu;
        for method in [Method::Svfit, Method::Loldu] {
            let (m, n, rows) = (24, 16, 40);
            let w = Tensor::randn(0f32, 0.3, (m, n), &dev).unwrap();
            let b = Tensor::randn(0f32, 0.1, m, &dev).unwrap();
            let mut layer = AdaptedLinear::new("q", w, Some(b.clone()));
            let mut cfg = AdapterConfig::new(method, n);
            cfg.trainable_scale = true;
            layer.attach(&cfg).unwrap();
            let Some(crate::peft::Adapter::Diagonal(d)) = layer.adapter() else {
                panic!("no diagonal adapter");
            };
            // Move z away from z₀ so the learned part is live.
            let z = d.z.as_tensor();
            d.z.set(&(z * 1.3).unwrap()).unwrap();
            assert!(d.merged_forward_pays(rows));
            let x = candle_core::Var::from_tensor(
                &Tensor::randn(0f32, 1.0, (2, rows / 2, n), &dev).unwrap(),
            )
            .unwrap();
            let g = Tensor::randn(0f32, 1.0, (2, rows / 2, m), &dev).unwrap();
            let merged = d
                .merged_forward(x.as_tensor(), &layer.base_weight().unwrap(), Some(&b))
                .unwrap();
            let factored = (frozen_linear(
                x.as_tensor(),
                &layer.base_weight().unwrap(),
                FrozenGrad::Skip,
            )
            .unwrap()
            .broadcast_add(&b)
            .unwrap()
                + d.branch(x.as_tensor()).unwrap())
            .unwrap();
            assert!(max_diff(&merged, &factored) < 1e-4, "{method:?} values");
            // The layer's own forward takes the merged path here.
            assert!(max_diff(&layer.forward(x.as_tensor()).unwrap(), &merged) < 1e-6);
            let ga = (merged * &g)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let gb = (factored * &g)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            // An input from frozen values only gets no gradient; z's is the same.
            let frozen_x = x.as_tensor().detach();
            let gf = (d
                .merged_forward(&frozen_x, &layer.base_weight().unwrap(), Some(&b))
                .unwrap()
                * &g)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            assert!(
                gf.get(&frozen_x).is_none(),
                "{method:?}: a frozen input got a gradient"
            );
            assert_eq!(
                max_diff(gf.get(&d.z).unwrap(), ga.get(&d.z).unwrap()),
                0.0,
                "{method:?}: z's gradient depends on whether x trains"
            );
            let vars = [x.clone(), d.z.clone()];
            for v in vars.iter().chain(d.vars().iter().map(|(_, v)| v)) {
                let (a, b) = (ga.get(v).unwrap(), gb.get(v).unwrap());
                let scale = b
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(
                    max_diff(a, b) <= 1e-4 * f64::from(scale.max(1.0)),
                    "{method:?} gradient differs by {}",
                    max_diff(a, b)
                );
            }
        }
    }
}

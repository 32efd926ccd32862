//! AdamW with decoupled weight decay, whose state can be saved and restored (so long runs
//! checkpoint and resume exactly). The update is candle-nn's `AdamW`, term for term; for f32
//! on the CPU it runs in place (three streaming passes, no temporaries) instead of as a dozen
//! tensor ops that each allocate a parameter-sized buffer. Gradient clipping's global norm
//! ([`global_grad_norm`]) is read the same way, and its factor enters the update
//! ([`AdamW::step_scaled`]) instead of a scaled copy of every gradient.

use std::collections::HashMap;

use candle_core::{
    CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Tensor, Var, backprop::GradStore,
};
use rayon::prelude::*;

/// AdamW's hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWParams {
    /// Learning rate.
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator guard.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for AdamWParams {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

struct Slot {
    var: Var,
    m: Var,
    v: Var,
}

/// AdamW over a group of variables.
pub struct AdamW {
    slots: Vec<Slot>,
    step: usize,
    /// Hyper-parameters (the learning rate changes every step with the schedule).
    pub params: AdamWParams,
}

impl AdamW {
    /// An optimiser for `vars`.
    pub fn new(vars: Vec<Var>, params: AdamWParams) -> candle_core::Result<Self> {
        let slots = vars
            .into_iter()
            .filter(|v| v.dtype().is_float())
            .map(|var| {
                let m = Var::zeros(var.shape(), var.dtype(), var.device())?;
                let v = Var::zeros(var.shape(), var.dtype(), var.device())?;
                Ok(Slot { var, m, v })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            slots,
            step: 0,
            params,
        })
    }

    /// Steps taken.
    pub fn steps(&self) -> usize {
        self.step
    }

    /// One update from `grads` (variables without a gradient are left alone).
    pub fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        self.step_scaled(grads, 1.0)
    }

    /// One update from `grads` multiplied by `grad_scale` (gradient clipping's factor), without
    /// writing the scaled gradients anywhere: the moments read `grad_scale·g` as they stream.
    pub fn step_scaled(&mut self, grads: &GradStore, grad_scale: f64) -> candle_core::Result<()> {
        self.step += 1;
        let p = self.params;
        let (b1, b2) = (p.beta1, p.beta2);
        let scale_m = 1.0 / (1.0 - b1.powi(self.step as i32));
        let scale_v = 1.0 / (1.0 - b2.powi(self.step as i32));
        for s in &self.slots {
            let theta = s.var.as_tensor();
            let Some(g) = grads.get(theta) else { continue };
            let in_place = theta.device().is_cpu()
                && theta.dtype() == DType::F32
                && g.dtype() == DType::F32
                && g.dims() == theta.dims();
            if in_place {
                let g = g.contiguous()?;
                s.m.as_tensor().inplace_op2(
                    &g,
                    &Moment {
                        decay: b1,
                        square: false,
                        grad_scale,
                    },
                )?;
                s.v.as_tensor().inplace_op2(
                    &g,
                    &Moment {
                        decay: b2,
                        square: true,
                        grad_scale,
                    },
                )?;
                theta.inplace_op3(
                    s.m.as_tensor(),
                    s.v.as_tensor(),
                    &Update {
                        scale_m,
                        scale_v,
                        lr: p.lr,
                        eps: p.eps,
                        keep: 1.0 - p.lr * p.weight_decay,
                    },
                )?;
                continue;
            }
            let scaled;
            let g = if grad_scale == 1.0 {
                g
            } else {
                scaled = (g * grad_scale)?;
                &scaled
            };
            let m = ((s.m.as_tensor() * b1)? + (g * (1.0 - b1))?)?;
            let v = ((s.v.as_tensor() * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let m_hat = (&m * scale_m)?;
            let v_hat = (&v * scale_v)?;
            let next = (theta * (1.0 - p.lr * p.weight_decay))?;
            let adjusted = (m_hat / (v_hat.sqrt()? + p.eps)?)?;
            s.var.set(&(next - (adjusted * p.lr)?)?)?;
            s.m.set(&m)?;
            s.v.set(&v)?;
        }
        Ok(())
    }

    /// The state as named tensors (`<prefix>.<i>.m`, `.v`, `.var`) plus the step count.
    pub fn state(&self, prefix: &str) -> (HashMap<String, Tensor>, usize) {
        let mut t = HashMap::new();
        for (i, s) in self.slots.iter().enumerate() {
            t.insert(format!("{prefix}.{i}.var"), s.var.as_tensor().detach());
            t.insert(format!("{prefix}.{i}.m"), s.m.as_tensor().detach());
            t.insert(format!("{prefix}.{i}.v"), s.v.as_tensor().detach());
        }
        (t, self.step)
    }

    /// Restores [`state`](Self::state): variable values, moments and step count. Every shape
    /// must match.
    pub fn load_state(
        &mut self,
        prefix: &str,
        tensors: &HashMap<String, Tensor>,
        step: usize,
    ) -> anyhow::Result<()> {
        for (i, s) in self.slots.iter().enumerate() {
            for (name, target) in [("var", &s.var), ("m", &s.m), ("v", &s.v)] {
                let key = format!("{prefix}.{i}.{name}");
                let t = tensors
                    .get(&key)
                    .ok_or_else(|| anyhow::anyhow!("the checkpoint lacks `{key}`"))?;
                anyhow::ensure!(
                    t.dims() == target.dims(),
                    "`{key}` has shape {:?}, the run has {:?}",
                    t.dims(),
                    target.dims()
                );
                target.set(&t.to_dtype(target.dtype())?.to_device(target.device())?)?;
            }
        }
        self.step = step;
        Ok(())
    }
}

/// Elements per parallel task of the in-place passes.
const GRAIN: usize = 64 * 1024;

/// The global L2 norm of the gradients of `vars` (what clipping compares with its maximum).
/// f32 gradients on the CPU are read where they lie, in parallel; others through candle ops.
pub fn global_grad_norm(grads: &GradStore, vars: &[Var]) -> candle_core::Result<f64> {
    let mut sum = 0.0f64;
    for v in vars {
        if let Some(g) = grads.get(v) {
            sum += sum_of_squares(g)?;
        }
    }
    Ok(sum.sqrt())
}

/// Σ g² over every element of `g`.
fn sum_of_squares(g: &Tensor) -> candle_core::Result<f64> {
    let in_place =
        crate::device::with_host_f32(g, |v| v.par_chunks(GRAIN).map(chunk_sum_of_squares).sum());
    if let Some(sum) = in_place {
        return Ok(sum);
    }
    g.sqr()?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()
}

/// Σ x² of one chunk: 16 f32 lanes (which vectorise), summed in f64.
fn chunk_sum_of_squares(chunk: &[f32]) -> f64 {
    let mut lanes = [0f32; 16];
    let mut blocks = chunk.chunks_exact(16);
    for block in &mut blocks {
        for (lane, &x) in lanes.iter_mut().zip(block) {
            *lane += x * x;
        }
    }
    let tail: f64 = blocks.remainder().iter().map(|&x| f64::from(x * x)).sum();
    lanes.iter().map(|&l| f64::from(l)).sum::<f64>() + tail
}

fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("adamw: {what} must be contiguous f32"),
    }
}

fn contiguous_f32_mut<'a>(
    s: &'a mut CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&mut v[a..b]),
        _ => candle_core::bail!("adamw: {what} must be contiguous f32"),
    }
}

/// `m ← decay·m + (1 − decay)·ĝ` (or `ĝ²` when `square`) with `ĝ = grad_scale·g`, in place,
/// with candle's rounding: each product in f32 with the factors rounded to f32 (a scale of 1
/// leaves g exact).
struct Moment {
    decay: f64,
    square: bool,
    grad_scale: f64,
}

impl InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        "adamw-moment"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let m = contiguous_f32_mut(s1, l1, "a moment")?;
        let g = contiguous_f32(s2, l2, "the gradient")?;
        if m.len() != g.len() {
            candle_core::bail!("adamw: {} moments for {} gradients", m.len(), g.len());
        }
        let (d, c) = (self.decay as f32, (1.0 - self.decay) as f32);
        let (square, k) = (self.square, self.grad_scale as f32);
        m.par_chunks_mut(GRAIN)
            .zip(g.par_chunks(GRAIN))
            .for_each(|(m, g)| {
                if square {
                    m.iter_mut().zip(g).for_each(|(m, &g)| {
                        let g = g * k;
                        *m = *m * d + (g * g) * c
                    });
                } else {
                    m.iter_mut()
                        .zip(g)
                        .for_each(|(m, &g)| *m = *m * d + (g * k) * c);
                }
            });
        Ok(())
    }
}

/// `θ ← θ·keep − lr·(m·scale_m) / (√(v·scale_v) + eps)`, in place (arg2 = m, arg3 = v).
struct Update {
    scale_m: f64,
    scale_v: f64,
    lr: f64,
    eps: f64,
    keep: f64,
}

impl InplaceOp3 for Update {
    fn name(&self) -> &'static str {
        "adamw-update"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<()> {
        let theta = contiguous_f32_mut(s1, l1, "a variable")?;
        let m = contiguous_f32(s2, l2, "a moment")?;
        let v = contiguous_f32(s3, l3, "a moment")?;
        if m.len() != theta.len() || v.len() != theta.len() {
            candle_core::bail!("adamw: moments do not match the variable's size");
        }
        let (sm, sv) = (self.scale_m as f32, self.scale_v as f32);
        let (lr, eps, keep) = (self.lr as f32, self.eps as f32, self.keep as f32);
        theta
            .par_chunks_mut(GRAIN)
            .zip(m.par_chunks(GRAIN).zip(v.par_chunks(GRAIN)))
            .for_each(|(t, (m, v))| {
                for ((t, &m), &v) in t.iter_mut().zip(m).zip(v) {
                    let adjusted = (m * sm) / ((v * sv).sqrt() + eps);
                    *t = *t * keep - adjusted * lr;
                }
            });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::Optimizer;

    use crate::test_util::max_abs_diff;

    /// Clipping's norm equals candle's on every layout and dtype (in-place f32, a strided
    /// view, f64), and a scaled step equals a step on gradients scaled beforehand.
    #[test]
    fn the_global_norm_and_a_scaled_step_equal_the_candle_ops() {
        let dev = Device::Cpu;
        let a = Var::from_tensor(&Tensor::randn(0f32, 1.0, (300, 517), &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::randn(0f64, 2.0, 77, &dev).unwrap()).unwrap();
        let c = Var::from_tensor(&Tensor::randn(0f32, 1.0, (9, 7), &dev).unwrap()).unwrap();
        let target = Tensor::randn(0f32, 1.0, (300, 517), &dev).unwrap();
        let loss = (((a.as_tensor() - &target)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            + b.as_tensor()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap())
        .unwrap()
            + c.as_tensor().t().unwrap().sqr().unwrap().sum_all().unwrap())
        .unwrap();
        let grads = loss.backward().unwrap();
        let want: f64 = [&a, &b, &c]
            .iter()
            .map(|v| {
                let g = grads.get(v).unwrap().to_dtype(DType::F64).unwrap();
                g.sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
            })
            .sum::<f64>()
            .sqrt();
        let got = global_grad_norm(&grads, &[a.clone(), b.clone(), c.clone()]).unwrap();
        assert!((got - want).abs() <= 1e-6 * want, "{got} vs {want}");
        assert!(want > 100.0);

        // A plain step, then a clipped one: scaling inside the update = scaling the gradients
        // first, on the in-place f32 path (a) and the candle-ops path (b, f64). (Adam's first
        // step does not depend on the gradients' scale; the second does.)
        let scale = 0.37;
        let (mut plain, mut scaled) = (loss.backward().unwrap(), loss.backward().unwrap());
        for v in [&a, &b] {
            let start = v.as_tensor().copy().unwrap();
            let twin = Var::from_tensor(&start).unwrap();
            let unclipped = Var::from_tensor(&start).unwrap();
            let g = plain.remove(v).unwrap();
            plain.insert(twin.as_tensor(), g.clone());
            plain.insert(unclipped.as_tensor(), g.clone());
            scaled.insert(twin.as_tensor(), (g * scale).unwrap());
            let adamw = |v: &Var| AdamW::new(vec![v.clone()], AdamWParams::default()).unwrap();
            let (mut inside, mut outside, mut never) = (adamw(v), adamw(&twin), adamw(&unclipped));
            inside.step(&grads).unwrap();
            inside.step_scaled(&grads, scale).unwrap();
            outside.step(&plain).unwrap();
            outside.step(&scaled).unwrap();
            never.step(&plain).unwrap();
            never.step(&plain).unwrap();
            assert_eq!(max_abs_diff(v.as_tensor(), twin.as_tensor()), 0.0);
            assert!(
                max_abs_diff(v.as_tensor(), unclipped.as_tensor()) > 1e-5,
                "scale ignored"
            );
            assert!(
                max_abs_diff(v.as_tensor(), &start) > 1e-4,
                "the variable did not move"
            );
        }
    }

    #[test]
    fn in_place_update_matches_candle_nns_adamw() {
        let dev = Device::Cpu;
        let init = Tensor::randn(0f32, 1.0, (37, 129), &dev).unwrap();
        let target = Tensor::randn(0f32, 1.0, (37, 129), &dev).unwrap();
        let ours_var = Var::from_tensor(&init.copy().unwrap()).unwrap();
        let theirs_var = Var::from_tensor(&init.copy().unwrap()).unwrap();
        let params = AdamWParams {
            lr: 0.05,
            weight_decay: 0.1,
            ..Default::default()
        };
        let mut ours = AdamW::new(vec![ours_var.clone()], params).unwrap();
        let mut theirs = candle_nn::AdamW::new(
            vec![theirs_var.clone()],
            candle_nn::ParamsAdamW {
                lr: params.lr,
                beta1: params.beta1,
                beta2: params.beta2,
                eps: params.eps,
                weight_decay: params.weight_decay,
            },
        )
        .unwrap();
        let loss = |v: &Var| {
            (v.as_tensor() - &target)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
        };
        for _ in 0..5 {
            ours.step(&loss(&ours_var).backward().unwrap()).unwrap();
            theirs.backward_step(&loss(&theirs_var)).unwrap();
        }
        let d = max_abs_diff(ours_var.as_tensor(), theirs_var.as_tensor());
        assert!(d <= 1e-6, "differ by {d}");
        // The variable moved.
        assert!(max_abs_diff(ours_var.as_tensor(), &init) > 0.1);
    }
}

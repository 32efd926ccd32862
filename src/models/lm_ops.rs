//! Fused CPU kernels of the LLaMA family, each with its backward pass: RMSNorm, the rotary
//! embedding (fused with the (B, T, H, d) → (B, H, T, d) head split), SwiGLU and the
//! cross-entropy over the vocabulary.
//!
//! The composite candle versions ([`rms_norm_composite`], [`rope_composite`]) allocate one
//! tensor per element-wise step and keep every one of them alive until the backward pass; these
//! run one pass per row, rayon-parallel, and keep only what their backward needs (RMSNorm: its
//! input and one `1/rms` per row; cross-entropy: the logits and one log-sum-exp per row). f32 on
//! the CPU; other dtypes, and tensors on a GPU, use the compositions of standard candle ops in
//! [`composed`](super::composed), whose backward is candle's autograd.

use std::sync::{Arc, OnceLock};

use candle_core::{CpuStorage, CustomOp2, CustomOp3, D, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::attention::{SharedOut, gemm_into};
use super::composed as gpu;
use super::ops::{GRAIN, f32_rows, last_dim, par_fill, rows_per_task};
use super::vmath;
use crate::bf16_gemm::{PackedB, Strided, gemm_bf16_packed};
use crate::peft::fused_lora::FrozenWeight;

/// Whether an op on `t` runs as a composition of standard candle ops (the GPU path): the
/// kernels here implement `cpu_fwd` only.
fn composed(t: &Tensor) -> bool {
    !t.device().is_cpu()
}

/// Whether the fused CPU kernels take `t`: f32 on the CPU.
fn fast(t: &Tensor) -> bool {
    !composed(t) && t.dtype() == DType::F32
}

/// RMSNorm as candle ops: `x / √(mean(x²) + eps) · w` (the reference for the fused kernel).
pub fn rms_norm_composite(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let x = x.to_dtype(DType::F32)?;
    let var = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(var + eps)?.sqrt()?)?.broadcast_mul(w)
}

/// Hugging Face's rotary embedding (`rotate_half` convention) as candle ops on (B, H, T, d),
/// with `cos` and `sin` of shape (T, d / 2) (the reference for [`rope_heads`]).
pub fn rope_composite(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let cos = Tensor::cat(&[cos, cos], D::Minus1)?;
    let sin = Tensor::cat(&[sin, sin], D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
}

// ---------------------------------------------------------------- RMSNorm

fn row_rstd(x: &[f32], eps: f32) -> f32 {
    let ss: f32 = x.iter().map(|v| v * v).sum();
    1.0 / (ss / x.len() as f32 + eps).sqrt()
}

/// `1/rms` of every row of length `d`.
fn rstd_rows(x: &[f32], d: usize, eps: f32) -> Vec<f32> {
    x.par_chunks(d)
        .with_min_len(rows_per_task(d))
        .map(|r| row_rstd(r, eps))
        .collect()
}

/// Forward of RMSNorm (arg1 = x, arg2 = w); keeps each row's `1/rms` for the backward.
struct RmsNorm {
    eps: f32,
    rstd: OnceLock<Arc<Vec<f32>>>,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "peft-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_rows(s1, l1, "rms norm")?;
        let w = f32_rows(s2, l2, "rms norm")?;
        let d = last_dim(l1)?;
        if w.len() != d {
            candle_core::bail!("rms norm: {} weights for rows of {d}", w.len());
        }
        let rstd = rstd_rows(x, d, self.eps);
        let rows = rows_per_task(d);
        let out = par_fill(x.len(), rows * d, |i, o| {
            let first = i * rows;
            let x = &x[first * d..][..o.len()];
            for (r, (o, x)) in o.chunks_mut(d).zip(x.chunks(d)).enumerate() {
                let s = rstd[first + r];
                for ((o, &x), &w) in o.iter_mut().zip(x).zip(w) {
                    o.write(x * s * w);
                }
            }
        });
        let _ = self.rstd.set(Arc::new(rstd));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let Some(rstd) = self.rstd.get().cloned() else {
            candle_core::bail!("rms norm backward before its forward");
        };
        let grad = grad.contiguous()?;
        let dx = x.apply_op3_no_bwd(w, &grad, &RmsNormBackward { rstd: rstd.clone() })?;
        let dw = if w.track_op() {
            Some(x.apply_op2_no_bwd(&grad, &RmsNormWeightGrad { rstd })?)
        } else {
            None
        };
        Ok((Some(dx), dw))
    }
}

/// dx of RMSNorm: `r·(g⊙w − x̂·mean(g⊙w⊙x̂))` with `x̂ = r·x`; arg1 = x, arg2 = w, arg3 = g.
struct RmsNormBackward {
    rstd: Arc<Vec<f32>>,
}

impl CustomOp3 for RmsNormBackward {
    fn name(&self) -> &'static str {
        "peft-rms-norm-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_rows(s1, l1, "rms norm backward")?;
        let w = f32_rows(s2, l2, "rms norm backward")?;
        let g = f32_rows(s3, l3, "rms norm backward")?;
        let d = last_dim(l1)?;
        if g.len() != x.len() || self.rstd.len() * d != x.len() {
            candle_core::bail!("rms norm backward: shapes differ from the forward's");
        }
        let rows = rows_per_task(d);
        let rstd = &self.rstd;
        let out = par_fill(x.len(), rows * d, |i, o| {
            let first = i * rows;
            let (x, g) = (&x[first * d..][..o.len()], &g[first * d..][..o.len()]);
            for (r, ((o, x), g)) in o
                .chunks_mut(d)
                .zip(x.chunks(d))
                .zip(g.chunks(d))
                .enumerate()
            {
                let s = rstd[first + r];
                let m: f32 = x
                    .iter()
                    .zip(g)
                    .zip(w)
                    .map(|((&x, &g), &w)| g * w * x * s)
                    .sum::<f32>()
                    / d as f32;
                for (((o, &x), &g), &w) in o.iter_mut().zip(x).zip(g).zip(w) {
                    o.write(s * (g * w - x * s * m));
                }
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// dw of RMSNorm, `Σ_rows g⊙x̂`: arg1 = x, arg2 = g.
struct RmsNormWeightGrad {
    rstd: Arc<Vec<f32>>,
}

impl CustomOp2 for RmsNormWeightGrad {
    fn name(&self) -> &'static str {
        "peft-rms-norm-weight-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_rows(s1, l1, "rms norm backward")?;
        let g = f32_rows(s2, l2, "rms norm backward")?;
        let d = last_dim(l1)?;
        // Fixed blocks summed in order: the same result whatever the thread count or schedule.
        const ROWS: usize = 64;
        let partials: Vec<Vec<f32>> = x
            .par_chunks(d * ROWS)
            .zip(g.par_chunks(d * ROWS))
            .zip(self.rstd.par_chunks(ROWS))
            .map(|((xb, gb), rb)| {
                let mut acc = vec![0f32; d];
                for ((x, g), &s) in xb.chunks(d).zip(gb.chunks(d)).zip(rb) {
                    for ((a, &x), &g) in acc.iter_mut().zip(x).zip(g) {
                        *a += g * x * s;
                    }
                }
                acc
            })
            .collect();
        let mut out = vec![0f32; d];
        for p in partials {
            out.iter_mut().zip(p).for_each(|(a, b)| *a += b);
        }
        Ok((CpuStorage::F32(out), Shape::from(d)))
    }
}

/// RMSNorm over the last dimension, `x / √(mean(x²) + eps) · w`, computed in f32, with a
/// backward pass for x and, when it trains, w. The fused kernel on the CPU, else
/// [`composed::rms_norm`](super::composed::rms_norm).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let x = x.to_dtype(DType::F32)?;
    if fast(&x) && w.dtype() == DType::F32 {
        x.contiguous()?.apply_op2(
            &w.contiguous()?,
            RmsNorm {
                eps: eps as f32,
                rstd: OnceLock::new(),
            },
        )
    } else {
        gpu::rms_norm(&x, w, eps)
    }
}

// ---------------------------------------------------------------- RoPE

/// The rotary embedding fused with the head transpose. Forward (`inverse` false): arg1 is
/// (B, T, H, d), the result (B, H, T, d) rotated by +θ. Backward (`inverse` true): arg1 is
/// (B, H, T, d), the result (B, T, H, d) rotated by −θ (a rotation's transpose is its inverse).
/// arg2 = cos, arg3 = sin, both (T, d/2).
struct Rope {
    inverse: bool,
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        if self.inverse {
            "peft-rope-bwd"
        } else {
            "peft-rope"
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_rows(s1, l1, "rope")?;
        let cos = f32_rows(s2, l2, "rope")?;
        let sin = f32_rows(s3, l3, "rope")?;
        let (b, a1, a2, d) = l1.shape().dims4()?;
        // (heads, positions) of the input.
        let (h, t) = if self.inverse { (a1, a2) } else { (a2, a1) };
        let half = d / 2;
        if d % 2 != 0 || l2.dims() != [t, half] || l3.dims() != [t, half] {
            candle_core::bail!(
                "rope: cos/sin are {:?}/{:?}, expected [{t}, {half}] for head size {d}",
                l2.dims(),
                l3.dims()
            );
        }
        let inverse = self.inverse;
        let sign = if inverse { -1.0f32 } else { 1.0 };
        let rows = rows_per_task(d);
        let out = par_fill(x.len(), rows * d, |i, o| {
            for (k, o) in o.chunks_mut(d).enumerate() {
                let r = i * rows + k;
                // Output row r is (b, h, t) going forward, (b, t, h) going back.
                let (bi, hi, ti) = if inverse {
                    (r / (t * h), r % h, (r / h) % t)
                } else {
                    (r / (h * t), (r / t) % h, r % t)
                };
                let src = if inverse {
                    ((bi * h + hi) * t + ti) * d
                } else {
                    ((bi * t + ti) * h + hi) * d
                };
                let (x1, x2) = x[src..src + d].split_at(half);
                let (c, s) = (&cos[ti * half..][..half], &sin[ti * half..][..half]);
                let (o1, o2) = o.split_at_mut(half);
                for j in 0..half {
                    let sj = sign * s[j];
                    o1[j].write(x1[j] * c[j] - x2[j] * sj);
                    o2[j].write(x2[j] * c[j] + x1[j] * sj);
                }
            }
        });
        let shape = if inverse { (b, t, h, d) } else { (b, h, t, d) };
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx = grad.contiguous()?.apply_op3_no_bwd(
            cos,
            sin,
            &Rope {
                inverse: !self.inverse,
            },
        )?;
        Ok((Some(dx), None, None))
    }
}

/// The rotary embedding of Hugging Face's LLaMA (`rotate_half` convention) applied to heads
/// laid out as a linear layer writes them, `x` (B, T, H, d), returning (B, H, T, d) — the
/// transpose comes free with the rotation. `cos` and `sin` are (T, d/2). The fused kernel on
/// the CPU, else [`composed::rope_heads`](super::composed::rope_heads).
pub fn rope_heads(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if fast(x) && fast(cos) && fast(sin) {
        x.contiguous()?.apply_op3(
            &cos.contiguous()?,
            &sin.contiguous()?,
            Rope { inverse: false },
        )
    } else {
        gpu::rope_heads(x, cos, sin)
    }
}

// ---------------------------------------------------------------- SwiGLU

/// `silu(gate)·up`: arg1 = gate, arg2 = up.
struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "peft-swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let a = f32_rows(s1, l1, "swiglu")?;
        let b = f32_rows(s2, l2, "swiglu")?;
        if l1.dims() != l2.dims() {
            candle_core::bail!("swiglu: gate {:?} and up {:?} differ", l1.dims(), l2.dims());
        }
        let out = par_fill(a.len(), GRAIN, |i, o| {
            let at = i * GRAIN;
            vmath::silu_mul_slice(&a[at..][..o.len()], &b[at..][..o.len()], o)
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let both = gate.apply_op3_no_bwd(up, &grad.contiguous()?, &SwiGluBackward)?;
        let dg = both.get(0)?;
        let du = both.get(1)?;
        Ok((Some(dg), Some(du)))
    }
}

/// [d_gate; d_up] stacked on a new first axis: arg1 = gate, arg2 = up, arg3 = g.
struct SwiGluBackward;

impl CustomOp3 for SwiGluBackward {
    fn name(&self) -> &'static str {
        "peft-swiglu-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let a = f32_rows(s1, l1, "swiglu backward")?;
        let b = f32_rows(s2, l2, "swiglu backward")?;
        let g = f32_rows(s3, l3, "swiglu backward")?;
        let n = a.len();
        if b.len() != n || g.len() != n {
            candle_core::bail!("swiglu backward: shapes differ from the forward's");
        }
        let mut out: Vec<f32> = Vec::with_capacity(2 * n);
        let (dg, du) = out.spare_capacity_mut()[..2 * n].split_at_mut(n);
        dg.par_chunks_mut(GRAIN)
            .zip(du.par_chunks_mut(GRAIN))
            .enumerate()
            .for_each(|(i, (dg, du))| {
                let at = i * GRAIN;
                let m = dg.len();
                vmath::silu_mul_backward_slice(&a[at..][..m], &b[at..][..m], &g[at..][..m], dg, du);
            });
        // SAFETY: the two halves cover `0..2n` and the kernel wrote every element of both.
        unsafe { out.set_len(2 * n) };
        let mut dims = vec![2];
        dims.extend_from_slice(l1.dims());
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

/// SwiGLU's gated product `silu(gate)·up` with a fused backward for both inputs (on the CPU;
/// elsewhere [`composed::swiglu`](super::composed::swiglu)).
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if fast(gate) && fast(up) {
        gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
    } else {
        gpu::swiglu(gate, up)
    }
}

/// `swiglu(gate, up)·Wᵀ` for a frozen W: the gated product lives only inside the op (the
/// backward recomputes it from gate and up), so a LoRA step keeps one intermediate-sized
/// tensor per layer fewer (SmolLM2-135M, batch 4 × 256: 190 MB). args: gate, up (rows×I).
struct SwiGluLinear {
    weight: FrozenWeight,
}

impl CustomOp2 for SwiGluLinear {
    fn name(&self) -> &'static str {
        "peft-swiglu-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (gated, shape) = SwiGlu.cpu_fwd(s1, l1, s2, l2)?;
        let CpuStorage::F32(gated) = gated else {
            candle_core::bail!("swiglu linear: the gated product is not f32");
        };
        let (rows, _) = shape.dims2()?;
        let (m, _) = self.weight.dims()?;
        let y = self
            .weight
            .forward_cpu(&gated, &Layout::contiguous(shape), None)?;
        Ok((CpuStorage::F32(y), Shape::from((rows, m))))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let d_gated = self.weight.input_grad(grad)?;
        let both = gate.apply_op3_no_bwd(up, &d_gated, &SwiGluBackward)?;
        Ok((Some(both.get(0)?), Some(both.get(1)?)))
    }
}

/// `swiglu(gate, up)·Wᵀ` with `down` a frozen layer (`AdaptedLinear::frozen_only`): one
/// fused op on the CPU in f32; otherwise (a GPU, another dtype, a layer that trains something)
/// `down.forward_t(swiglu(gate, up))`, whose parts have their own GPU paths.
pub fn swiglu_down(
    gate: &Tensor,
    up: &Tensor,
    down: &crate::peft::AdaptedLinear,
    train: bool,
) -> Result<Tensor> {
    let weight = down.frozen_only().filter(|_| fast(gate) && fast(up));
    let Some(weight) = weight else {
        return down
            .forward_t(&swiglu(gate, up)?, train)
            .map_err(|e| candle_core::Error::Msg(e.to_string()));
    };
    let (m, n) = weight.dims()?;
    let dims = gate.dims();
    let Some((&last, lead)) = dims.split_last() else {
        candle_core::bail!("swiglu linear: the input is a scalar");
    };
    if last != n || up.dims() != dims {
        candle_core::bail!(
            "swiglu linear: gate {:?} and up {:?} for a {m}×{n} weight",
            dims,
            up.dims()
        );
    }
    let rows: usize = lead.iter().product();
    let y = gate.reshape((rows, n))?.contiguous()?.apply_op2(
        &up.reshape((rows, n))?.contiguous()?,
        SwiGluLinear { weight },
    )?;
    let mut out = lead.to_vec();
    out.push(m);
    y.reshape(out)
}

// ---------------------------------------------------------------- cross-entropy

/// Log-sum-exp of a row.
fn row_lse(x: &[f32]) -> f32 {
    let mut max = f32::NEG_INFINITY;
    vmath::max_slice(x, &mut max);
    let mut sum = 0.0;
    vmath::sum_exp_shifted(x, max, &mut sum);
    max + sum.ln()
}

fn targets_of<'a>(s: &'a CpuStorage, l: &Layout, rows: usize, vocab: usize) -> Result<&'a [u32]> {
    let CpuStorage::U32(v) = s else {
        candle_core::bail!("cross-entropy: targets must be u32");
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("cross-entropy: targets must be contiguous");
    };
    let t = &v[a..b];
    if t.len() != rows {
        candle_core::bail!(
            "cross-entropy: {} targets for {rows} rows of logits",
            t.len()
        );
    }
    if let Some(&bad) = t.iter().find(|&&t| t as usize >= vocab) {
        candle_core::bail!("cross-entropy: target {bad} is outside the {vocab} classes");
    }
    Ok(t)
}

/// Mean cross-entropy of logits (N, V) against targets (N) u32; keeps each row's
/// log-sum-exp for the backward.
struct CrossEntropy {
    lse: OnceLock<Arc<Vec<f32>>>,
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "peft-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_rows(s1, l1, "cross-entropy")?;
        let (n, v) = l1.shape().dims2()?;
        let t = targets_of(s2, l2, n, v)?;
        if n == 0 {
            candle_core::bail!("cross-entropy of no rows");
        }
        let lse: Vec<f32> = x.par_chunks(v).map(row_lse).collect();
        // Summed in f64, in row order: the same loss whatever the thread count.
        let total: f64 = lse
            .iter()
            .zip(x.chunks(v))
            .zip(t)
            .map(|((&l, row), &t)| (l - row[t as usize]) as f64)
            .sum();
        let _ = self.lse.set(Arc::new(lse));
        Ok((
            CpuStorage::F32(vec![(total / n as f64) as f32]),
            Shape::from(()),
        ))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let Some(lse) = self.lse.get().cloned() else {
            candle_core::bail!("cross-entropy backward before its forward");
        };
        let n = logits.dim(0)?;
        let g = grad.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        let dx = logits.apply_op2_no_bwd(
            targets,
            &CrossEntropyBackward {
                lse,
                scale: g / n as f32,
            },
        )?;
        Ok((Some(dx), None))
    }
}

/// `scale·(softmax(x) − onehot(t))` from the saved log-sum-exp: arg1 = logits, arg2 = targets.
struct CrossEntropyBackward {
    lse: Arc<Vec<f32>>,
    scale: f32,
}

impl CustomOp2 for CrossEntropyBackward {
    fn name(&self) -> &'static str {
        "peft-cross-entropy-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_rows(s1, l1, "cross-entropy backward")?;
        let (n, v) = l1.shape().dims2()?;
        let t = targets_of(s2, l2, n, v)?;
        if self.lse.len() != n {
            candle_core::bail!("cross-entropy backward: shapes differ from the forward's");
        }
        let rows = rows_per_task(v);
        let (lse, scale) = (&self.lse, self.scale);
        let out = par_fill(x.len(), rows * v, |i, o| {
            let first = i * rows;
            let x = &x[first * v..][..o.len()];
            for (r, (o, x)) in o.chunks_mut(v).zip(x.chunks(v)).enumerate() {
                vmath::exp_shifted_slice(x, lse[first + r], o);
                // SAFETY: the kernel wrote every element.
                let o = unsafe { vmath::assume_init_mut(o) };
                o.iter_mut().for_each(|p| *p *= scale);
                o[t[first + r] as usize] -= scale;
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Mean cross-entropy of `logits` (N, V) against class ids `targets` (N, u32), with a fused
/// backward `(softmax − onehot)/N` (no log-softmax tensor is kept). The fused kernel on the
/// CPU, else [`composed::cross_entropy`](super::composed::cross_entropy).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if fast(logits) && !composed(targets) {
        logits.contiguous()?.apply_op2(
            &targets.to_dtype(DType::U32)?.contiguous()?,
            CrossEntropy {
                lse: OnceLock::new(),
            },
        )
    } else {
        gpu::cross_entropy(logits, targets)
    }
}

/// Rows of the fused head per task: a 128 × vocabulary logits block (25 MB for 49,152 words)
/// per worker, enough rows that packing the head's weight is paid once per block.
const HEAD_ROWS: usize = 128;

/// Mean cross-entropy of `hidden·Wᵀ` against the targets for a frozen output projection `W`
/// (V, h), computed block by block so that the (N, V) logits never exist whole. With a
/// tracked `hidden` the forward also forms the hidden states' gradient (N, h) block by block
/// (`(softmax − onehot)/N · W`) and keeps only that: arg1 = hidden, arg2 = W.
struct FrozenHeadCrossEntropy {
    targets: Arc<Vec<u32>>,
    with_grad: bool,
    dhidden: OnceLock<Arc<Vec<f32>>>,
}

impl CustomOp2 for FrozenHeadCrossEntropy {
    fn name(&self) -> &'static str {
        "peft-frozen-head-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_rows(s1, l1, "output projection")?;
        let w = f32_rows(s2, l2, "output projection")?;
        let (n, h) = l1.shape().dims2()?;
        let (v, h2) = l2.shape().dims2()?;
        if h != h2 || n == 0 || self.targets.len() != n {
            candle_core::bail!(
                "output projection: {n}×{h} hidden states, a {v}×{h2} weight, {} targets",
                self.targets.len()
            );
        }
        if let Some(&bad) = self.targets.iter().find(|&&t| t as usize >= v) {
            candle_core::bail!("cross-entropy: target {bad} is outside the {v} classes");
        }
        let with_grad = self.with_grad;
        let mut dx: Vec<f32> = Vec::with_capacity(if with_grad { n * h } else { 0 });
        let dst = SharedOut(dx.as_mut_ptr());
        let scale = 1.0 / n as f32;
        // bf16 on AMX or AVX512-BF16 (model.matmul_precision): W packed once, for the logits
        // (Wᵀ) and for the gradient (W).
        let packed = crate::peft::frozen::bf16_for(n).then(|| {
            let as_b = |rs, cs, k, m| {
                PackedB::new(
                    Strided {
                        data: w,
                        start: 0,
                        rs,
                        cs,
                    },
                    k,
                    m,
                )
            };
            (as_b(1, h, h, v), with_grad.then(|| as_b(h, 1, v, h)))
        });
        // With W packed beforehand, small blocks cost nothing more and keep the logits block
        // (6 MB) in memory the allocator reuses; gemm packs W per call, so it gets 128 rows.
        let block_rows = if packed.is_some() { 32 } else { HEAD_ROWS };
        let losses: Vec<f64> = (0..n.div_ceil(block_rows))
            .into_par_iter()
            .map(|blk| {
                let first = blk * block_rows;
                let rows = block_rows.min(n - first);
                let mut z = vec![0f32; rows * v];
                let x_block = Strided {
                    data: x,
                    start: first * h,
                    rs: h,
                    cs: 1,
                };
                match &packed {
                    Some((wt, _)) => gemm_bf16_packed(x_block, rows, wt, &mut z, false, false),
                    // SAFETY: z is rows×V; x's block is rows×h; W read as Wᵀ (h×V) with
                    // strides (1, h) stays inside the V×h weight.
                    None => unsafe {
                        gemm_into(
                            (rows, v, h),
                            z.as_mut_ptr(),
                            v,
                            false,
                            x[first * h..].as_ptr(),
                            (h, 1),
                            w.as_ptr(),
                            (1, h),
                        );
                    },
                }
                let mut loss = 0f64;
                for (r, row) in z.chunks_mut(v).enumerate() {
                    let t = self.targets[first + r] as usize;
                    let lse = row_lse(row);
                    loss += (lse - row[t]) as f64;
                    if with_grad {
                        vmath::exp_shifted_in_place(row, lse);
                        row.iter_mut().for_each(|p| *p *= scale);
                        row[t] -= scale;
                    }
                }
                if let Some((_, Some(wn))) = &packed {
                    let mut d = vec![0f32; rows * h];
                    let probs = Strided {
                        data: &z,
                        start: 0,
                        rs: v,
                        cs: 1,
                    };
                    gemm_bf16_packed(probs, rows, wn, &mut d, false, false);
                    // SAFETY: this block writes rows first…first+rows of the N×h gradient,
                    // disjoint from every other block's.
                    unsafe {
                        std::ptr::copy_nonoverlapping(d.as_ptr(), dst.ptr().add(first * h), d.len())
                    };
                } else if with_grad {
                    // SAFETY: this block writes rows first…first+rows of the N×h gradient,
                    // disjoint from every other block's; W is read V×h with strides (h, 1).
                    unsafe {
                        gemm_into(
                            (rows, h, v),
                            dst.ptr().add(first * h),
                            h,
                            false,
                            z.as_ptr(),
                            (v, 1),
                            w.as_ptr(),
                            (h, 1),
                        );
                    }
                }
                loss
            })
            .collect();
        if with_grad {
            // SAFETY: the blocks wrote all N·h gradient values.
            unsafe { dx.set_len(n * h) };
            let _ = self.dhidden.set(Arc::new(dx));
        }
        let total: f64 = losses.iter().sum();
        Ok((
            CpuStorage::F32(vec![(total / n as f64) as f32]),
            Shape::from(()),
        ))
    }

    fn bwd(
        &self,
        hidden: &Tensor,
        _w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let Some(dx) = self.dhidden.get() else {
            candle_core::bail!("output projection backward without the forward's gradient");
        };
        let g = grad.to_dtype(DType::F32)?.to_scalar::<f32>()? as f64;
        let dx = Tensor::from_slice(dx.as_slice(), hidden.shape(), hidden.device())?;
        Ok((Some((dx * g)?), None))
    }
}

/// Mean cross-entropy of `hidden·Wᵀ` (hidden (N, h), a frozen output projection `w` (V, h))
/// against `targets` (N, u32), without materialising the (N, V) logits: the forward forms the
/// hidden states' gradient block by block when `hidden` is tracked, and the backward only
/// scales it. `w`'s gradient is never computed: use it for a frozen head. Fused on the CPU in
/// f32; elsewhere the whole logits through the frozen product's GPU path
/// ([`composed::frozen_head_cross_entropy`](super::composed::frozen_head_cross_entropy)).
pub fn frozen_head_cross_entropy(hidden: &Tensor, w: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if !(fast(hidden) && fast(w)) {
        return gpu::frozen_head_cross_entropy(hidden, w, targets);
    }
    let targets = targets.to_dtype(DType::U32)?.to_vec1::<u32>()?;
    hidden.contiguous()?.apply_op2(
        &w.contiguous()?.detach(),
        FrozenHeadCrossEntropy {
            targets: Arc::new(targets),
            with_grad: hidden.track_op(),
            dhidden: OnceLock::new(),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    use crate::test_util::max_abs_diff as max_diff;

    fn close(a: &Tensor, b: &Tensor, tol: f64) {
        let d = max_diff(a, b);
        assert!(d < tol, "differ by {d}");
    }

    fn randn(shape: &[usize], std: f32) -> Tensor {
        Tensor::randn(0f32, std, shape, &Device::Cpu).unwrap()
    }

    /// Checks `grad` (the analytic gradient of `loss` at `x`) against central differences at
    /// a spread of coordinates, the loss summed in f64.
    fn check_fd(x: &Tensor, grad: &Tensor, loss: impl Fn(&Tensor) -> f64) {
        let x0 = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let g = grad.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let h = 1e-2f32;
        let step = (x0.len() / 23).max(1);
        let mut checked = 0;
        for i in (0..x0.len()).step_by(step) {
            let at = |delta: f32| {
                let mut v = x0.clone();
                v[i] += delta;
                loss(&Tensor::from_vec(v, x.shape(), &Device::Cpu).unwrap())
            };
            let fd = (at(h) - at(-h)) / (2.0 * h as f64);
            let err = (fd - g[i] as f64).abs();
            assert!(
                err <= 2e-3 + 1e-2 * fd.abs(),
                "coordinate {i}: analytic {} vs finite difference {fd}",
                g[i]
            );
            checked += 1;
        }
        assert!(checked >= 10);
    }

    /// `Σ y⊙r` in f64.
    fn weighted_sum(y: &Tensor, r: &Tensor) -> f64 {
        (y.to_dtype(DType::F64).unwrap() * r.to_dtype(DType::F64).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    fn var(t: Tensor) -> Var {
        Var::from_tensor(&t).unwrap()
    }

    #[test]
    fn rms_norm_matches_the_composite_version_and_finite_differences() {
        let x = var((randn(&[2, 5, 16], 2.0) + 0.5).unwrap());
        let w = var((randn(&[16], 0.3) + 1.0).unwrap());
        let r = randn(&[2, 5, 16], 1.0);
        let eps = 1e-5;
        let ours = rms_norm(x.as_tensor(), w.as_tensor(), eps).unwrap();
        let theirs = rms_norm_composite(x.as_tensor(), w.as_tensor(), eps).unwrap();
        close(&ours, &theirs, 1e-5);
        let ga = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (&theirs * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in [&x, &w] {
            close(ga.get(v).unwrap(), gb.get(v).unwrap(), 1e-4);
        }
        let wt = w.as_tensor().detach();
        check_fd(x.as_tensor(), ga.get(&x).unwrap(), |x| {
            weighted_sum(&rms_norm(x, &wt, eps).unwrap(), &r)
        });
        let xt = x.as_tensor().detach();
        check_fd(w.as_tensor(), ga.get(&w).unwrap(), |w| {
            weighted_sum(&rms_norm(&xt, w, eps).unwrap(), &r)
        });
        // A frozen weight: the input's gradient alone, the same.
        let y = rms_norm(x.as_tensor(), &wt, eps).unwrap();
        let gc = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        close(gc.get(&x).unwrap(), gb.get(&x).unwrap(), 1e-4);
        assert!(gc.get(&w).is_none());
    }

    #[test]
    fn rope_matches_the_composite_version_and_finite_differences() {
        let (b, t, h, d) = (2, 5, 3, 8);
        let x = var(randn(&[b, t, h, d], 1.0));
        let ang = randn(&[t, d / 2], 2.0);
        let (cos, sin) = (ang.cos().unwrap(), ang.sin().unwrap());
        let r = randn(&[b, h, t, d], 1.0);
        let ours = rope_heads(x.as_tensor(), &cos, &sin).unwrap();
        assert_eq!(ours.dims(), [b, h, t, d]);
        let theirs = rope_composite(
            &x.as_tensor().transpose(1, 2).unwrap().contiguous().unwrap(),
            &cos,
            &sin,
        )
        .unwrap();
        close(&ours, &theirs, 1e-6);
        let ga = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (&theirs * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        close(ga.get(&x).unwrap(), gb.get(&x).unwrap(), 1e-5);
        check_fd(x.as_tensor(), ga.get(&x).unwrap(), |x| {
            weighted_sum(&rope_heads(x, &cos, &sin).unwrap(), &r)
        });
        // A rotation keeps norms: ‖rope(x)‖ = ‖x‖.
        let n = |t: &Tensor| {
            t.sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert!((n(&ours) - n(x.as_tensor())).abs() < 1e-3);
    }

    #[test]
    fn swiglu_matches_the_composite_version_and_finite_differences() {
        let gate = var(randn(&[4, 37], 3.0));
        let up = var(randn(&[4, 37], 1.0));
        let r = randn(&[4, 37], 1.0);
        let ours = swiglu(gate.as_tensor(), up.as_tensor()).unwrap();
        let theirs = (candle_nn::ops::silu(gate.as_tensor()).unwrap() * up.as_tensor()).unwrap();
        close(&ours, &theirs, 1e-5);
        let ga = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (&theirs * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in [&gate, &up] {
            close(ga.get(v).unwrap(), gb.get(v).unwrap(), 1e-4);
        }
        let ut = up.as_tensor().detach();
        check_fd(gate.as_tensor(), ga.get(&gate).unwrap(), |g| {
            weighted_sum(&swiglu(g, &ut).unwrap(), &r)
        });
        let gt = gate.as_tensor().detach();
        check_fd(up.as_tensor(), ga.get(&up).unwrap(), |u| {
            weighted_sum(&swiglu(&gt, u).unwrap(), &r)
        });
    }

    #[test]
    fn swiglu_down_equals_the_separate_ops_for_dense_and_packed_weights() {
        use candle_core::quantized::{GgmlDType, QTensor};
        let gate = var(randn(&[2, 3, 64], 2.0));
        let up = var(randn(&[2, 3, 64], 1.0));
        let w = randn(&[24, 64], 0.2);
        let r = randn(&[2, 3, 24], 1.0);
        let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        let packed = crate::peft::PackedWeight::new(q).unwrap();
        let dense_of_packed = packed.dequantize().unwrap();
        let layers = [
            (crate::peft::AdaptedLinear::new("down", w.clone(), None), w),
            (
                crate::peft::AdaptedLinear::new_packed("down", packed, None),
                dense_of_packed,
            ),
        ];
        for (down, w) in layers {
            assert!(down.frozen_only().is_some());
            let ours = swiglu_down(gate.as_tensor(), up.as_tensor(), &down, true).unwrap();
            let gated = (candle_nn::ops::silu(gate.as_tensor()).unwrap() * up.as_tensor()).unwrap();
            let theirs = gated.broadcast_matmul(&w.t().unwrap()).unwrap();
            close(&ours, &theirs, 1e-4);
            let ga = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let gb = (&theirs * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for v in [&gate, &up] {
                close(ga.get(v).unwrap(), gb.get(v).unwrap(), 1e-4);
            }
        }
    }

    #[test]
    fn swiglu_down_falls_back_when_the_layer_trains_something() {
        let gate = randn(&[3, 16], 1.0);
        let up = randn(&[3, 16], 1.0);
        let mut down = crate::peft::AdaptedLinear::new("down", randn(&[5, 16], 0.3), None);
        let cfg = crate::peft::AdapterConfig {
            rank: 2,
            init: Some(crate::peft::Init::Gaussian),
            ..Default::default()
        };
        down.attach(&cfg).unwrap();
        assert!(down.frozen_only().is_none());
        let ours = swiglu_down(&gate, &up, &down, false).unwrap();
        let theirs = down.forward(&swiglu(&gate, &up).unwrap()).unwrap();
        close(&ours, &theirs, 1e-5);
    }

    #[test]
    fn cross_entropy_matches_candle_and_finite_differences() {
        let logits = var(randn(&[6, 41], 3.0));
        let targets = Tensor::new(&[0u32, 40, 7, 7, 13, 2], &Device::Cpu).unwrap();
        let ours = cross_entropy(logits.as_tensor(), &targets).unwrap();
        let theirs = candle_nn::loss::cross_entropy(logits.as_tensor(), &targets).unwrap();
        close(&ours, &theirs, 1e-5);
        // A scale on the loss reaches the gradient.
        let ga = (&ours * 3.0).unwrap().backward().unwrap();
        let gb = (&theirs * 3.0).unwrap().backward().unwrap();
        close(ga.get(&logits).unwrap(), gb.get(&logits).unwrap(), 1e-6);
        let gl = ga.get(&logits).unwrap();
        check_fd(logits.as_tensor(), &(gl / 3.0).unwrap(), |x| {
            cross_entropy(x, &targets)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64
        });
        // Every row of the gradient sums to zero (softmax − onehot).
        let rows = gl.sum(1).unwrap().abs().unwrap().max(0).unwrap();
        assert!(rows.to_scalar::<f32>().unwrap() < 1e-6);
        let bad = Tensor::new(&[0u32, 41, 0, 0, 0, 0], &Device::Cpu).unwrap();
        let e = cross_entropy(logits.as_tensor(), &bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("target 41 is outside the 41 classes"), "{e}");
    }

    #[test]
    fn frozen_head_cross_entropy_matches_logits_then_cross_entropy() {
        // 300 rows: three blocks, the last one partial.
        let (n, h, v) = (300, 12, 37);
        let x = var(randn(&[n, h], 1.0));
        let w = randn(&[v, h], 0.5);
        let t: Vec<u32> = (0..n as u32).map(|i| (i * 7) % v as u32).collect();
        let targets = Tensor::new(t.as_slice(), &Device::Cpu).unwrap();
        let ours = frozen_head_cross_entropy(x.as_tensor(), &w, &targets).unwrap();
        let logits = x.as_tensor().matmul(&w.t().unwrap()).unwrap();
        let theirs = candle_nn::loss::cross_entropy(&logits, &targets).unwrap();
        close(&ours, &theirs, 1e-5);
        let ga = (&ours * 2.0).unwrap().backward().unwrap();
        let gb = (&theirs * 2.0).unwrap().backward().unwrap();
        close(ga.get(&x).unwrap(), gb.get(&x).unwrap(), 1e-6);
        let gx = (ga.get(&x).unwrap() / 2.0).unwrap();
        check_fd(x.as_tensor(), &gx, |x| {
            frozen_head_cross_entropy(x, &w, &targets)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64
        });
        let bad = Tensor::from_vec(vec![37u32; n], n, &Device::Cpu).unwrap();
        let e = frozen_head_cross_entropy(x.as_tensor(), &w, &bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("target 37 is outside the 37 classes"), "{e}");
    }

    #[test]
    fn fused_kernels_split_work_across_tasks_the_same_way() {
        // Sizes past one parallel task, so the row bookkeeping of the chunked loops is used.
        let x = randn(&[3, 200, 64], 1.0);
        let w = (randn(&[64], 0.2) + 1.0).unwrap();
        close(
            &rms_norm(&x, &w, 1e-6).unwrap(),
            &rms_norm_composite(&x, &w, 1e-6).unwrap(),
            1e-5,
        );
        let q = randn(&[2, 300, 4, 32], 1.0);
        let ang = randn(&[300, 16], 2.0);
        let (cos, sin) = (ang.cos().unwrap(), ang.sin().unwrap());
        let ours = rope_heads(&q, &cos, &sin).unwrap();
        let theirs = rope_composite(
            &q.transpose(1, 2).unwrap().contiguous().unwrap(),
            &cos,
            &sin,
        )
        .unwrap();
        close(&ours, &theirs, 1e-5);
        let g = randn(&[5, 20000], 4.0);
        let u = randn(&[5, 20000], 1.0);
        let theirs = (candle_nn::ops::silu(&g).unwrap() * &u).unwrap();
        close(&swiglu(&g, &u).unwrap(), &theirs, 1e-4);
    }
}

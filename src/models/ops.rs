//! Fused CPU kernels with a backward pass: softmax over the last dimension and layer norm.
//!
//! candle-nn 0.11's `softmax_last_dim` and `layer_norm` are forward-only (`apply_op*_no_bwd`):
//! training through them silently drops gradients, and the composite versions allocate many
//! temporaries. These run one pass per row (rayon-parallel) and have a real backward. f32 on
//! the CPU; other dtypes, and tensors on a GPU, use the compositions of standard candle ops in
//! [`composed`](super::composed), whose backward is candle's autograd.

use std::mem::MaybeUninit;

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor,
};
use rayon::prelude::*;

use super::{composed as gpu, vmath};

/// Whether an op on `x` runs as a composition of standard candle ops (the GPU path): the
/// kernels here implement `cpu_fwd` only.
fn composed(x: &Tensor) -> bool {
    !x.device().is_cpu()
}

/// Elements per parallel task of the element-wise kernels: large enough that scheduling costs
/// nothing next to the work, small enough to split a (16·64·1536) activation evenly.
pub(crate) const GRAIN: usize = 16 * 1024;

/// A vector of `n` values produced chunk by chunk (`chunk` elements, in parallel), never zeroed
/// first: `fill(i, out)` must write every element of chunk `i`.
pub(crate) fn par_fill(
    n: usize,
    chunk: usize,
    fill: impl Fn(usize, &mut [MaybeUninit<f32>]) + Sync + Send,
) -> Vec<f32> {
    let mut out: Vec<f32> = Vec::with_capacity(n);
    out.spare_capacity_mut()[..n]
        .par_chunks_mut(chunk.max(1))
        .enumerate()
        .for_each(|(i, c)| fill(i, c));
    // SAFETY: the chunks cover `0..n` and every caller's `fill` writes its whole chunk.
    unsafe { out.set_len(n) };
    out
}

/// Rows of length `d` per parallel task: about [`GRAIN`] elements.
pub(crate) fn rows_per_task(d: usize) -> usize {
    (GRAIN / d.max(1)).max(1)
}

pub(crate) fn f32_rows<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{op}: only f32 is supported");
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{op}: the input must be contiguous");
    };
    Ok(&v[a..b])
}

pub(crate) fn last_dim(l: &Layout) -> Result<usize> {
    l.dims()
        .last()
        .copied()
        .ok_or_else(|| candle_core::Error::Msg("scalar input".into()))
}

struct Softmax;

/// Writes `softmax(x)` into `o`.
fn softmax_row(x: &[f32], o: &mut [MaybeUninit<f32>]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    vmath::exp_shifted_slice(x, max, o);
    // SAFETY: the kernel wrote every element.
    let o = unsafe { vmath::assume_init_mut(o) };
    let sum: f32 = o.iter().sum();
    let inv = 1.0 / sum;
    o.iter_mut().for_each(|o| *o *= inv);
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "peft-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_rows(s, l, "softmax")?;
        let d = last_dim(l)?;
        let rows = rows_per_task(d);
        let out = par_fill(x.len(), rows * d, |i, o| {
            let x = &x[i * rows * d..][..o.len()];
            for (o, x) in o.chunks_mut(d).zip(x.chunks(d)) {
                softmax_row(x, o);
            }
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            res.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxBackward)?,
        ))
    }
}

/// dx = y ⊙ (g − Σ g⊙y), arg1 = y, arg2 = g.
struct SoftmaxBackward;

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "peft-softmax-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = f32_rows(s1, l1, "softmax backward")?;
        let g = f32_rows(s2, l2, "softmax backward")?;
        let d = last_dim(l1)?;
        let rows = rows_per_task(d);
        let out = par_fill(y.len(), rows * d, |i, o| {
            let (y, g) = (&y[i * rows * d..][..o.len()], &g[i * rows * d..][..o.len()]);
            for ((o, y), g) in o.chunks_mut(d).zip(y.chunks(d)).zip(g.chunks(d)) {
                let dot: f32 = y.iter().zip(g).map(|(a, b)| a * b).sum();
                for ((o, &y), &g) in o.iter_mut().zip(y).zip(g) {
                    o.write(y * (g - dot));
                }
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Softmax over the last dimension, with a backward pass: the fused kernel for f32 on the
/// CPU, else [`composed::softmax_last_dim`](super::composed::softmax_last_dim).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if composed(x) || x.dtype() != DType::F32 {
        gpu::softmax_last_dim(x)
    } else {
        x.contiguous()?.apply_op1(Softmax)
    }
}

/// Attention probabilities `softmax(scale·scores + bias)` in one pass, where `bias` (B, T_k)
/// is added to every head and query row of `scores` (B, H, T_q, T_k). The backward yields
/// the scores' gradient only (the bias is a constant mask).
struct MaskedSoftmax {
    scale: f32,
}

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "peft-masked-softmax"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_rows(s1, l1, "masked softmax")?;
        let bias = f32_rows(s2, l2, "masked softmax")?;
        let (b, h, tq, tk) = l1.shape().dims4()?;
        if l2.dims() != [b, tk] {
            candle_core::bail!(
                "masked softmax: bias is {:?}, expected [{b}, {tk}]",
                l2.dims()
            );
        }
        let scale = self.scale;
        let rows = rows_per_task(tk);
        let out = par_fill(x.len(), rows * tk, |i, o| {
            let first = i * rows;
            let x = &x[first * tk..][..o.len()];
            for (r, (o, x)) in o.chunks_mut(tk).zip(x.chunks(tk)).enumerate() {
                let bias = &bias[((first + r) / (h * tq)) * tk..][..tk];
                for ((o, &v), &m) in o.iter_mut().zip(x).zip(bias) {
                    o.write(v * scale + m);
                }
                // SAFETY: every element was just written.
                let o = unsafe { vmath::assume_init_mut(o) };
                let max = o.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                vmath::exp_shifted_in_place(o, max);
                let sum: f32 = o.iter().sum();
                let inv = 1.0 / sum;
                o.iter_mut().for_each(|o| *o *= inv);
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _bias: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = res.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxBackward)?;
        Ok((Some((g * self.scale as f64)?), None))
    }
}

/// `softmax(scale·scores + bias)` over the last dimension; `bias` (B, T_k) is broadcast over
/// heads and queries (0 for tokens, a large negative number for padding). The fused kernel
/// for f32 on the CPU, else [`composed::masked_softmax`](super::composed::masked_softmax).
pub fn masked_softmax(scores: &Tensor, bias: Option<&Tensor>, scale: f64) -> Result<Tensor> {
    if composed(scores) || scores.dtype() != DType::F32 {
        return gpu::masked_softmax(scores, bias, scale);
    }
    match bias {
        Some(b) => scores.contiguous()?.apply_op2(
            &b.contiguous()?,
            MaskedSoftmax {
                scale: scale as f32,
            },
        ),
        None => softmax_last_dim(&(scores * scale)?),
    }
}

/// The exact (erf) GELU with a one-pass backward, on the vectorised erf of [`vmath`].
struct GeluErf;

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "peft-gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_rows(s, l, "gelu")?;
        let out = par_fill(x.len(), GRAIN, |i, o| {
            vmath::gelu_slice(&x[i * GRAIN..][..o.len()], o)
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            arg.apply_op2_no_bwd(&grad.contiguous()?, &GeluErfBackward)?,
        ))
    }
}

/// d gelu(x) = Φ(x) + x·φ(x), times the incoming gradient: arg1 = x, arg2 = g.
struct GeluErfBackward;

impl CustomOp2 for GeluErfBackward {
    fn name(&self) -> &'static str {
        "peft-gelu-erf-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_rows(s1, l1, "gelu backward")?;
        let g = f32_rows(s2, l2, "gelu backward")?;
        if g.len() != x.len() {
            candle_core::bail!(
                "gelu backward: {} gradients for {} inputs",
                g.len(),
                x.len()
            );
        }
        let out = par_fill(x.len(), GRAIN, |i, o| {
            let at = i * GRAIN;
            vmath::gelu_backward_slice(&x[at..][..o.len()], &g[at..][..o.len()], o)
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// The exact GELU, `x·Φ(x)`, with a fused backward (f32 CPU; elsewhere candle's op,
/// [`composed::gelu_erf`](super::composed::gelu_erf)).
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if composed(x) || x.dtype() != DType::F32 {
        gpu::gelu_erf(x)
    } else {
        x.contiguous()?.apply_op1(GeluErf)
    }
}

struct LayerNorm {
    eps: f32,
}

fn row_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let d = x.len() as f32;
    let mean = x.iter().sum::<f32>() / d;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d;
    (mean, 1.0 / (var + eps).sqrt())
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "peft-layer-norm"
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
        let x = f32_rows(s1, l1, "layer norm")?;
        let w = f32_rows(s2, l2, "layer norm")?;
        let b = f32_rows(s3, l3, "layer norm")?;
        let d = last_dim(l1)?;
        let eps = self.eps;
        let rows = rows_per_task(d);
        let out = par_fill(x.len(), rows * d, |i, o| {
            let x = &x[i * rows * d..][..o.len()];
            for (o, x) in o.chunks_mut(d).zip(x.chunks(d)) {
                let (mean, rstd) = row_stats(x, eps);
                for (((o, &x), &w), &b) in o.iter_mut().zip(x).zip(w).zip(b) {
                    o.write((x - mean) * rstd * w + b);
                }
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let dx = x.apply_op3_no_bwd(w, &grad, &LayerNormBackward { eps: self.eps })?;
        if !(w.track_op() || b.track_op()) {
            return Ok((Some(dx), None, None));
        }
        let params = x.apply_op2_no_bwd(&grad, &LayerNormParamGrads { eps: self.eps })?;
        let d = w.dims1()?;
        let dw = params.narrow(0, 0, d)?;
        let db = params.narrow(0, d, d)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// dx of layer norm: arg1 = x, arg2 = w, arg3 = g.
struct LayerNormBackward {
    eps: f32,
}

impl CustomOp3 for LayerNormBackward {
    fn name(&self) -> &'static str {
        "peft-layer-norm-bwd"
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
        let x = f32_rows(s1, l1, "layer norm backward")?;
        let w = f32_rows(s2, l2, "layer norm backward")?;
        let g = f32_rows(s3, l3, "layer norm backward")?;
        let d = last_dim(l1)?;
        let eps = self.eps;
        let rows = rows_per_task(d);
        let out = par_fill(x.len(), rows * d, |i, o| {
            let (x, g) = (&x[i * rows * d..][..o.len()], &g[i * rows * d..][..o.len()]);
            for ((o, x), g) in o.chunks_mut(d).zip(x.chunks(d)).zip(g.chunks(d)) {
                let (mean, rstd) = row_stats(x, eps);
                let (mut m1, mut m2) = (0.0f32, 0.0f32);
                for i in 0..d {
                    let gw = g[i] * w[i];
                    m1 += gw;
                    m2 += gw * (x[i] - mean) * rstd;
                }
                m1 /= d as f32;
                m2 /= d as f32;
                for (i, o) in o.iter_mut().enumerate() {
                    let xh = (x[i] - mean) * rstd;
                    o.write(rstd * (g[i] * w[i] - m1 - xh * m2));
                }
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// [dw; db] of layer norm (2·d values): arg1 = x, arg2 = g.
struct LayerNormParamGrads {
    eps: f32,
}

impl CustomOp2 for LayerNormParamGrads {
    fn name(&self) -> &'static str {
        "peft-layer-norm-param-grads"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_rows(s1, l1, "layer norm backward")?;
        let g = f32_rows(s2, l2, "layer norm backward")?;
        let d = last_dim(l1)?;
        let eps = self.eps;
        // Fixed blocks summed in order: the same result whatever the thread count or schedule.
        const ROWS: usize = 64;
        let partials: Vec<Vec<f32>> = x
            .par_chunks(d * ROWS)
            .zip(g.par_chunks(d * ROWS))
            .map(|(xb, gb)| {
                let mut acc = vec![0f32; 2 * d];
                for (x, g) in xb.chunks(d).zip(gb.chunks(d)) {
                    let (mean, rstd) = row_stats(x, eps);
                    for i in 0..d {
                        acc[i] += g[i] * (x[i] - mean) * rstd;
                        acc[d + i] += g[i];
                    }
                }
                acc
            })
            .collect();
        let mut out = vec![0f32; 2 * d];
        for p in partials {
            out.iter_mut().zip(p).for_each(|(a, b)| *a += b);
        }
        Ok((CpuStorage::F32(out), Shape::from(2 * d)))
    }
}

/// Layer norm over the last dimension, `(x − mean)/√(var + eps) · w + b`, with a backward
/// pass for x and, when they train, w and b. The fused kernel for f32 on the CPU, else
/// [`composed::layer_norm`](super::composed::layer_norm).
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    if composed(x) || x.dtype() != DType::F32 || w.dtype() != DType::F32 {
        gpu::layer_norm(x, w, b, eps)
    } else {
        x.contiguous()?
            .apply_op3(w, b, LayerNorm { eps: eps as f32 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{D, Device, Var};

    fn close(a: &Tensor, b: &Tensor, tol: f32) {
        let d = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < tol, "differ by {d}");
    }

    #[test]
    fn softmax_matches_the_composite_version_with_gradients() {
        let x =
            Var::from_tensor(&Tensor::randn(0f32, 2.0, (3, 4, 7), &Device::Cpu).unwrap()).unwrap();
        let g = Tensor::randn(0f32, 1.0, (3, 4, 7), &Device::Cpu).unwrap();
        let ours = softmax_last_dim(x.as_tensor()).unwrap();
        let theirs = candle_nn::ops::softmax(x.as_tensor(), D::Minus1).unwrap();
        close(&ours, &theirs, 1e-6);
        let ga = (ours * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (theirs * &g)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        close(ga.get(&x).unwrap(), gb.get(&x).unwrap(), 1e-5);
    }

    #[test]
    fn gelu_and_masked_softmax_match_candle_with_gradients() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 2.0, (4, 33), &dev).unwrap()).unwrap();
        let g = Tensor::randn(0f32, 1.0, (4, 33), &dev).unwrap();
        let ours = gelu_erf(x.as_tensor()).unwrap();
        let theirs = x.as_tensor().gelu_erf().unwrap();
        close(&ours, &theirs, 1e-5);
        let ga = (ours * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (theirs * &g)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        close(ga.get(&x).unwrap(), gb.get(&x).unwrap(), 1e-4);

        let s = Var::from_tensor(&Tensor::randn(0f32, 2.0, (2, 3, 4, 5), &dev).unwrap()).unwrap();
        let mask = Tensor::new(&[[0f32, 0., 0., -1e9, -1e9], [0., 0., 0., 0., 0.]], &dev).unwrap();
        let g = Tensor::randn(0f32, 1.0, (2, 3, 4, 5), &dev).unwrap();
        let ours = masked_softmax(s.as_tensor(), Some(&mask), 0.5).unwrap();
        let theirs = candle_nn::ops::softmax(
            &(s.as_tensor() * 0.5)
                .unwrap()
                .broadcast_add(&mask.reshape((2, 1, 1, 5)).unwrap())
                .unwrap(),
            D::Minus1,
        )
        .unwrap();
        close(&ours, &theirs, 1e-6);
        let ga = (ours * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (theirs * &g)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        close(ga.get(&s).unwrap(), gb.get(&s).unwrap(), 1e-5);
    }

    #[test]
    fn layer_norm_matches_the_composite_version_with_gradients() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(1f32, 3.0, (2, 5, 16), &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(1f32, 0.2, 16, &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::randn(0f32, 0.2, 16, &dev).unwrap()).unwrap();
        let g = Tensor::randn(0f32, 1.0, (2, 5, 16), &dev).unwrap();
        let ours = layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5).unwrap();
        let theirs =
            candle_nn::ops::layer_norm_slow(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5)
                .unwrap();
        close(&ours, &theirs, 1e-5);
        let ga = (ours * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (theirs * &g)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in [&x, &w, &b] {
            close(ga.get(v).unwrap(), gb.get(v).unwrap(), 1e-4);
        }
        // Frozen w and b: only the input gradient.
        let y = layer_norm(
            x.as_tensor(),
            &w.as_tensor().detach(),
            &b.as_tensor().detach(),
            1e-5,
        )
        .unwrap();
        let gc = (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        close(gc.get(&x).unwrap(), gb.get(&x).unwrap(), 1e-4);
    }
}

//! Fused causal self-attention with grouped-query heads, for training and full-sequence
//! forwards on the CPU: `softmax(scale·q·kᵀ + mask)·v` per head, where the mask hides future
//! keys, keys outside a sliding window and padded keys.
//!
//! The composite version materialises, and keeps until the backward pass, the repeated keys
//! and values, the (B, H, T, T) scores, their scaled and masked copies and the probabilities:
//! per SmolLM2 layer at batch 4 × 256, 38 MB of the 75 MB a layer kept. This kernel keeps the
//! output and one log-sum-exp per query row; the backward recomputes each head's probabilities
//! (one T×T buffer per worker at a time) and writes the gradients of q, k and v in one pass.
//! The masked entries get the same additive −1e9 as the composite mask, so a row whose every
//! key is masked gives the same (finite) result. On a GPU (and for dtypes other than f32)
//! [`causal_attention`] computes the same with standard candle ops
//! ([`composed::causal_attention`](super::composed::causal_attention)).

use std::sync::{Arc, OnceLock};

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::ops::f32_rows;
use super::vmath;

/// Additive mask value of a hidden key (as the composite mask).
pub const MASKED: f32 = -1e9;

/// A raw pointer that rayon tasks share; each task writes a disjoint part of the buffer.
#[derive(Clone, Copy)]
pub(crate) struct SharedOut(pub(crate) *mut f32);

impl SharedOut {
    /// The pointer (a method, so that closures capture the whole `Send` wrapper).
    pub(crate) fn ptr(self) -> *mut f32 {
        self.0
    }
}
// SAFETY: the tasks that receive it write disjoint index ranges (see each use).
unsafe impl Send for SharedOut {}
// SAFETY: as above.
unsafe impl Sync for SharedOut {}

/// `dst = (accumulate ? dst : 0) + a·b`, single-threaded (called inside rayon tasks), for
/// an m×k `a` and a k×n `b` given by (row stride, column stride).
///
/// # Safety
/// Every pointer must reach all the elements its strides and sizes address.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_into(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    a: *const f32,
    (a_rs, a_cs): (usize, usize),
    b: *const f32,
    (b_rs, b_cs): (usize, usize),
) {
    // SAFETY: the caller vouches for the pointers; gemm reads dst only when `accumulate`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            a,
            a_cs as isize,
            a_rs as isize,
            b,
            b_cs as isize,
            b_rs as isize,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// The shapes of one attention call.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    h: usize,
    hkv: usize,
    t: usize,
    d: usize,
}

/// Fills `s` (T×T, row-major) with `scale·q·kᵀ + mask` for one head: `q` and `k` are (T, d)
/// with rows of stride d.
fn masked_scores(
    s: &mut [f32],
    q: &[f32],
    k: &[f32],
    pad: Option<&[f32]>,
    dm: Dims,
    scale: f32,
    window: usize,
) {
    let (t, d) = (dm.t, dm.d);
    // SAFETY: s is T×T, q and k are T×d, all with the strides given.
    unsafe {
        gemm_into(
            (t, t, d),
            s.as_mut_ptr(),
            t,
            false,
            q.as_ptr(),
            (d, 1),
            k.as_ptr(),
            (1, d),
        );
    }
    for (i, row) in s.chunks_mut(t).enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            let mut x = *v * scale;
            if j > i || i - j >= window {
                x += MASKED;
            }
            if let Some(p) = pad {
                x += p[j];
            }
            *v = x;
        }
    }
}

struct CausalAttention {
    scale: f32,
    window: usize,
    pad: Option<Arc<Vec<f32>>>,
    lse: OnceLock<Arc<Vec<f32>>>,
}

impl CausalAttention {
    fn dims(l1: &Layout, l2: &Layout, l3: &Layout) -> Result<Dims> {
        let (b, h, t, d) = l1.shape().dims4()?;
        let (b2, hkv, t2, d2) = l2.shape().dims4()?;
        if l3.dims() != l2.dims() || (b2, t2, d2) != (b, t, d) || hkv == 0 || h % hkv != 0 {
            candle_core::bail!(
                "attention: q {:?}, k {:?}, v {:?} do not fit (B, H, T, d) / (B, H_kv, T, d)",
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        Ok(Dims { b, h, hkv, t, d })
    }

    fn pad_row(&self, b: usize, t: usize) -> Option<&[f32]> {
        self.pad.as_ref().map(|p| &p[b * t..][..t])
    }
}

impl CustomOp3 for CausalAttention {
    fn name(&self) -> &'static str {
        "peft-causal-attention"
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
        let q = f32_rows(s1, l1, "attention")?;
        let k = f32_rows(s2, l2, "attention")?;
        let v = f32_rows(s3, l3, "attention")?;
        let dm = Self::dims(l1, l2, l3)?;
        let Dims { b, h, hkv, t, d } = dm;
        if let Some(p) = &self.pad
            && p.len() != b * t
        {
            candle_core::bail!("attention: {} mask values for {b}×{t} keys", p.len());
        }
        let rep = h / hkv;
        let mut out: Vec<f32> = Vec::with_capacity(b * t * h * d);
        let mut lse = vec![0f32; b * h * t];
        let dst = SharedOut(out.as_mut_ptr());
        lse.par_chunks_mut(t).enumerate().for_each(|(bh, lse)| {
            let (bi, hi) = (bh / h, bh % h);
            let kv = (bi * hkv + hi / rep) * t * d;
            let qh = &q[bh * t * d..][..t * d];
            let mut s = vec![0f32; t * t];
            masked_scores(
                &mut s,
                qh,
                &k[kv..][..t * d],
                self.pad_row(bi, t),
                dm,
                self.scale,
                self.window,
            );
            for (row, l) in s.chunks_mut(t).zip(lse.iter_mut()) {
                let mut max = f32::NEG_INFINITY;
                vmath::max_slice(row, &mut max);
                vmath::exp_shifted_in_place(row, max);
                let sum: f32 = row.iter().sum();
                let inv = 1.0 / sum;
                row.iter_mut().for_each(|p| *p *= inv);
                *l = max + sum.ln();
            }
            // SAFETY: head (bi, hi) writes rows ((bi·T + i)·H + hi)·d … +d of the (B, T, H, d)
            // output, disjoint from every other head's; v's head is T×d.
            unsafe {
                gemm_into(
                    (t, d, t),
                    dst.ptr().add((bi * t * h + hi) * d),
                    h * d,
                    false,
                    s.as_ptr(),
                    (t, 1),
                    v[kv..].as_ptr(),
                    (d, 1),
                );
            }
        });
        // SAFETY: the heads together wrote all B·T·H·d outputs.
        unsafe { out.set_len(b * t * h * d) };
        let _ = self.lse.set(Arc::new(lse));
        Ok((CpuStorage::F32(out), Shape::from((b, t, h * d))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some(lse) = self.lse.get().cloned() else {
            candle_core::bail!("attention backward before its forward");
        };
        let dm = Self::dims(q.layout(), k.layout(), v.layout())?;
        let (q, k, v) = (storage_vec(q)?, storage_vec(k)?, storage_vec(v)?);
        let (o, g) = (storage_vec(res)?, storage_vec(&grad.contiguous()?)?);
        let (nq, nk) = (q.len(), k.len());
        let all = self.backward(&q, &k, &v, &o, &g, &lse, dm)?;
        let all = Tensor::from_vec(all, nq + 2 * nk, &candle_core::Device::Cpu)?;
        let Dims { b, h, hkv, t, d } = dm;
        let dq = all.narrow(0, 0, nq)?.reshape((b, h, t, d))?;
        let dk = all.narrow(0, nq, nk)?.reshape((b, hkv, t, d))?;
        let dv = all.narrow(0, nq + nk, nk)?.reshape((b, hkv, t, d))?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// The values of a contiguous f32 CPU tensor.
fn storage_vec(t: &Tensor) -> Result<Vec<f32>> {
    t.contiguous()?.flatten_all()?.to_vec1::<f32>()
}

impl CausalAttention {
    /// [dq; dk; dv] in one buffer. Parallel over (batch, kv head): the query heads that share
    /// a kv head add to the same dk, dv, so they run in one task.
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        o: &[f32],
        g: &[f32],
        lse: &[f32],
        dm: Dims,
    ) -> Result<Vec<f32>> {
        let Dims { b, h, hkv, t, d } = dm;
        let rep = h / hkv;
        let (nq, nk) = (q.len(), k.len());
        let mut all: Vec<f32> = Vec::with_capacity(nq + 2 * nk);
        let dst = SharedOut(all.as_mut_ptr());
        let scale = self.scale;
        (0..b * hkv).into_par_iter().for_each(|bk| {
            let bi = bk / hkv;
            let kv = bk * t * d;
            let (kh, vh) = (&k[kv..][..t * d], &v[kv..][..t * d]);
            let mut p = vec![0f32; t * t];
            let mut dp = vec![0f32; t * t];
            let mut dot = vec![0f32; t];
            for (r, hi) in (bk % hkv * rep..).take(rep).enumerate() {
                let bh = bi * h + hi;
                let qh = &q[bh * t * d..][..t * d];
                masked_scores(&mut p, qh, kh, self.pad_row(bi, t), dm, scale, self.window);
                for (row, &l) in p.chunks_mut(t).zip(&lse[bh * t..][..t]) {
                    vmath::exp_shifted_in_place(row, l);
                }
                // Rows of this head in the (B, T, H, d) output and its gradient.
                let at = (bi * t * h + hi) * d;
                for (i, dot) in dot.iter_mut().enumerate() {
                    let (gi, oi) = (&g[at + i * h * d..][..d], &o[at + i * h * d..][..d]);
                    *dot = gi.iter().zip(oi).map(|(a, b)| a * b).sum();
                }
                // SAFETY: every operand below is a T×T buffer of this task or a T×d head
                // read with its strides; the writes go to this task's dv, dk (the kv head's,
                // T×d each at nq + bk·T·d and nq + nk + bk·T·d) and dq (query head bh's T×d),
                // disjoint from every other task's.
                unsafe {
                    // dv (+)= pᵀ·g
                    gemm_into(
                        (t, d, t),
                        dst.ptr().add(nq + nk + kv),
                        d,
                        r > 0,
                        p.as_ptr(),
                        (1, t),
                        g[at..].as_ptr(),
                        (h * d, 1),
                    );
                    // dp = g·vᵀ
                    gemm_into(
                        (t, t, d),
                        dp.as_mut_ptr(),
                        t,
                        false,
                        g[at..].as_ptr(),
                        (h * d, 1),
                        vh.as_ptr(),
                        (1, d),
                    );
                }
                // ds = p ⊙ (dp − rowdot) · scale, in dp.
                for ((dp, p), &dot) in dp.chunks_mut(t).zip(p.chunks(t)).zip(&dot) {
                    for (x, &p) in dp.iter_mut().zip(p) {
                        *x = p * (*x - dot) * scale;
                    }
                }
                // SAFETY: as above.
                unsafe {
                    // dq = ds·k
                    gemm_into(
                        (t, d, t),
                        dst.ptr().add(bh * t * d),
                        d,
                        false,
                        dp.as_ptr(),
                        (t, 1),
                        kh.as_ptr(),
                        (d, 1),
                    );
                    // dk (+)= dsᵀ·q
                    gemm_into(
                        (t, d, t),
                        dst.ptr().add(nq + kv),
                        d,
                        r > 0,
                        dp.as_ptr(),
                        (1, t),
                        qh.as_ptr(),
                        (d, 1),
                    );
                }
            }
        });
        // SAFETY: the tasks wrote every dq head and every dk, dv kv head.
        unsafe { all.set_len(nq + 2 * nk) };
        Ok(all)
    }
}

/// Whether an op on `x` runs as a composition of standard candle ops (the GPU path): the
/// kernel here implements `cpu_fwd` only.
fn composed(x: &Tensor) -> bool {
    !x.device().is_cpu()
}

/// Whether [`causal_attention`] runs the fused kernel on these inputs.
pub fn fused_attention_applies(q: &Tensor) -> bool {
    !composed(q) && q.dtype() == DType::F32
}

/// Causal self-attention over a whole sequence: `q` (B, H, T, d), `k` and `v` (B, H_kv, T, d)
/// (query head h reads kv head h / (H / H_kv)); `pad` (B, T) is 1 for tokens and 0 for padded
/// keys; `window` limits how far back a query sees. Returns (B, T, H·d), the layout the
/// output projection reads. The fused kernel for f32 on the CPU (see
/// [`fused_attention_applies`]); elsewhere
/// [`composed::causal_attention`](super::composed::causal_attention).
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    pad: Option<&Tensor>,
    scale: f64,
    window: Option<usize>,
) -> Result<Tensor> {
    if !fused_attention_applies(q) {
        return super::composed::causal_attention(q, k, v, pad, scale, window);
    }
    let pad = match pad {
        None => None,
        Some(m) => {
            let m = m.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            Some(Arc::new(
                m.into_iter()
                    .map(|x| if x > 0.5 { 0.0 } else { MASKED })
                    .collect(),
            ))
        }
    };
    q.contiguous()?.apply_op3(
        &k.contiguous()?,
        &v.contiguous()?,
        CausalAttention {
            scale: scale as f32,
            window: window.unwrap_or(usize::MAX),
            pad,
            lse: OnceLock::new(),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::ops::softmax_last_dim;
    use crate::test_util::max_abs_diff as max_diff;
    use candle_core::{Device, Var};

    /// The composite attention the model used before: repeated kv heads, scores, additive
    /// mask, softmax, probabilities times values.
    fn reference(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        pad: Option<&Tensor>,
        scale: f64,
        window: usize,
    ) -> Tensor {
        let (b, h, t, d) = q.dims4().unwrap();
        let rep = h / k.dim(1).unwrap();
        let rk = |x: &Tensor| {
            let (b, n, t, d) = x.dims4().unwrap();
            x.unsqueeze(2)
                .unwrap()
                .broadcast_as((b, n, rep, t, d))
                .unwrap()
                .contiguous()
                .unwrap()
                .reshape((b, n * rep, t, d))
                .unwrap()
        };
        let mut m = Vec::new();
        for i in 0..t {
            for j in 0..t {
                m.push(if j <= i && i - j < window {
                    0f32
                } else {
                    MASKED
                });
            }
        }
        let mut bias = Tensor::from_vec(m, (1, 1, t, t), &Device::Cpu).unwrap();
        if let Some(p) = pad {
            let p = ((p.ones_like().unwrap() - p).unwrap() * MASKED as f64)
                .unwrap()
                .reshape((b, 1, 1, t))
                .unwrap();
            bias = bias.broadcast_add(&p).unwrap();
        }
        let s = (q.matmul(&rk(k).t().unwrap()).unwrap() * scale).unwrap();
        let p = softmax_last_dim(&s.broadcast_add(&bias).unwrap().contiguous().unwrap()).unwrap();
        p.matmul(&rk(v))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, t, h * d))
            .unwrap()
    }

    #[test]
    fn fused_attention_matches_the_composite_version_with_gradients() {
        let dev = Device::Cpu;
        let (b, h, hkv, t, d) = (2, 6, 2, 7, 8);
        let q = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, h, t, d), &dev).unwrap()).unwrap();
        let k = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, hkv, t, d), &dev).unwrap()).unwrap();
        let v = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, hkv, t, d), &dev).unwrap()).unwrap();
        let r = Tensor::randn(0f32, 1.0, (b, t, h * d), &dev).unwrap();
        let pad = Tensor::new(&[[1f32, 1., 1., 1., 1., 0., 0.], [1.; 7]], &dev).unwrap();
        for (mask, window) in [
            (None, usize::MAX),
            (Some(&pad), usize::MAX),
            (Some(&pad), 3),
        ] {
            let w = (window < usize::MAX).then_some(window);
            let ours = causal_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), mask, 0.35, w)
                .unwrap();
            let theirs = reference(
                q.as_tensor(),
                k.as_tensor(),
                v.as_tensor(),
                mask,
                0.35,
                window,
            );
            assert!(max_diff(&ours, &theirs) < 1e-5);
            let ga = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let gb = (&theirs * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for x in [&q, &k, &v] {
                let e = max_diff(ga.get(x).unwrap(), gb.get(x).unwrap());
                assert!(e < 1e-4, "gradient differs by {e} (window {window})");
            }
        }
    }

    #[test]
    fn fused_attention_gradient_matches_finite_differences() {
        let dev = Device::Cpu;
        let (b, h, hkv, t, d) = (1, 2, 1, 5, 4);
        let q = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, h, t, d), &dev).unwrap()).unwrap();
        let k = Tensor::randn(0f32, 1.0, (b, hkv, t, d), &dev).unwrap();
        let v = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, hkv, t, d), &dev).unwrap()).unwrap();
        let r = Tensor::randn(0f32, 1.0, (b, t, h * d), &dev)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        let loss = |q: &Tensor, v: &Tensor| -> f64 {
            let y = causal_attention(q, &k, v, None, 0.5, None).unwrap();
            (y.to_dtype(DType::F64).unwrap() * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let y = causal_attention(q.as_tensor(), &k, v.as_tensor(), None, 0.5, None).unwrap();
        let grads = (y * r.to_dtype(DType::F32).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (which, x) in [(0, &q), (1, &v)] {
            let x0 = x
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let g = grads
                .get(x)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for i in 0..x0.len() {
                let at = |delta: f32| {
                    let mut p = x0.clone();
                    p[i] += delta;
                    let p = Tensor::from_vec(p, x.shape(), &dev).unwrap();
                    if which == 0 {
                        loss(&p, v.as_tensor())
                    } else {
                        loss(q.as_tensor(), &p)
                    }
                };
                let fd = (at(1e-2) - at(-1e-2)) / 2e-2;
                let err = (fd - g[i] as f64).abs();
                assert!(
                    err <= 2e-3 + 1e-2 * fd.abs(),
                    "{which}/{i}: {} vs {fd}",
                    g[i]
                );
            }
        }
    }
}

//! The GPU paths of the fused kernels of [`ops`](super::ops), [`lm_ops`](super::lm_ops) and
//! [`attention`](super::attention): each function computes what its kernel computes with
//! standard candle tensor ops only (matmul, broadcast arithmetic, `exp`, reductions, `narrow`,
//! `cat`, `gather`), all of which have CUDA and Metal kernels, so candle's autograd supplies the
//! backward pass.
//!
//! The kernels implement `cpu_fwd` alone; their entry functions (`softmax_last_dim`,
//! `rms_norm`, `causal_attention`, …) call the function of the same name here when the input is
//! not on the CPU (and, as before, for dtypes other than f32). They are public so that tests
//! compare them with the kernels on the CPU, where both run.

use candle_core::{D, DType, Result, Tensor};

use super::attention::MASKED;
use super::lm_ops::{rms_norm_composite, rope_composite};

/// Softmax over the last dimension: `exp(x − max)/Σ exp(x − max)`. The row maximum is a
/// constant shift (softmax does not depend on it), so it is detached: no gradient flows
/// through the `max` reduction.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// `softmax(scale·scores + bias)` over the last dimension, `scores` (B, H, T_q, T_k) and
/// `bias` (B, T_k) broadcast over heads and queries.
pub fn masked_softmax(scores: &Tensor, bias: Option<&Tensor>, scale: f64) -> Result<Tensor> {
    let s = (scores * scale)?;
    let s = match bias {
        Some(b) => {
            let (bs, _, _, tk) = scores.dims4()?;
            if b.dims() != [bs, tk] {
                candle_core::bail!(
                    "masked softmax: bias is {:?}, expected [{bs}, {tk}]",
                    b.dims()
                );
            }
            s.broadcast_add(&b.reshape((bs, 1, 1, tk))?)?
        }
        None => s,
    };
    softmax_last_dim(&s)
}

/// The exact GELU, `x·Φ(x)`: candle's own element-wise op (it has a backward).
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    x.gelu_erf()
}

/// Layer norm over the last dimension, `(x − mean)/√(var + eps) · w + b`, in f32 for half
/// inputs (candle-nn's composite version).
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    candle_nn::ops::layer_norm_slow(x, w, b, eps as f32)
}

/// RMSNorm over the last dimension in f32, `x / √(mean(x²) + eps) · w`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    rms_norm_composite(x, w, eps)
}

/// The rotary embedding of `x` (B, T, H, d) by `cos`, `sin` (T, d/2), returned as
/// (B, H, T, d): the head transpose, then [`rope_composite`].
pub fn rope_heads(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (_, t, _, d) = x.dims4()?;
    if d % 2 != 0 || cos.dims() != [t, d / 2] || sin.dims() != [t, d / 2] {
        candle_core::bail!(
            "rope: cos/sin are {:?}/{:?}, expected [{t}, {}] for head size {d}",
            cos.dims(),
            sin.dims(),
            d / 2
        );
    }
    rope_composite(&x.transpose(1, 2)?.contiguous()?, cos, sin)
}

/// SwiGLU's gated product `silu(gate)·up`.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.dims() != up.dims() {
        candle_core::bail!(
            "swiglu: gate {:?} and up {:?} differ",
            gate.dims(),
            up.dims()
        );
    }
    gate.silu()? * up
}

/// Checks that `targets` holds one class id below `vocab` per row of `n` rows. A target on a
/// GPU is checked there (one scalar comes back).
fn check_targets(targets: &Tensor, n: usize, vocab: usize) -> Result<Tensor> {
    if targets.dims() != [n] {
        candle_core::bail!(
            "cross-entropy: {:?} targets for {n} rows of logits",
            targets.dims()
        );
    }
    if n == 0 {
        candle_core::bail!("cross-entropy of no rows");
    }
    let t = targets.to_dtype(DType::U32)?;
    let max = t.max_all()?.to_scalar::<u32>()?;
    if max as usize >= vocab {
        candle_core::bail!("cross-entropy: target {max} is outside the {vocab} classes");
    }
    Ok(t)
}

/// Mean cross-entropy of `logits` (N, V) against class ids `targets` (N), in f32:
/// `mean(lse(x) − x[t])`, the log-sum-exp shifted by each row's (detached) maximum.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (n, v) = logits.dims2()?;
    let t = check_targets(targets, n, v)?;
    let x = logits.to_dtype(DType::F32)?;
    let shifted = x.broadcast_sub(&x.max_keepdim(1)?.detach())?;
    let lse = shifted.exp()?.sum_keepdim(1)?.log()?;
    let picked = shifted.gather(&t.unsqueeze(1)?, 1)?;
    (lse - picked)?.mean_all()
}

/// Mean cross-entropy of `hidden·Wᵀ` (hidden (N, h), a frozen `w` (V, h)) against `targets`:
/// the logits through the frozen product's GPU path
/// ([`frozen_linear_composed`](crate::peft::frozen::frozen_linear_composed): no gradient for
/// `w`, the thread's [`MatmulPrecision`](crate::peft::MatmulPrecision)), then
/// [`cross_entropy`].
pub fn frozen_head_cross_entropy(hidden: &Tensor, w: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logits = crate::peft::frozen::frozen_linear_composed(hidden, w, None)?;
    cross_entropy(&logits, targets)
}

/// The additive mask of causal attention over T keys, on `q`'s device and dtype: (T, T) with
/// [`MASKED`] for future keys and keys `window` or more positions back, 0 elsewhere.
fn causal_bias(t: usize, window: usize, like: &Tensor) -> Result<Tensor> {
    let mut m = Vec::with_capacity(t * t);
    for i in 0..t {
        for j in 0..t {
            m.push(if j > i || i - j >= window {
                MASKED
            } else {
                0.0
            });
        }
    }
    Tensor::from_vec(m, (t, t), like.device())?.to_dtype(like.dtype())
}

/// The kv heads repeated for grouped-query attention: (B, H_kv, T, d) → (B, H_kv·rep, T, d),
/// query head h reading kv head h / rep.
pub(crate) fn repeat_kv(x: &Tensor, rep: usize) -> Result<Tensor> {
    if rep == 1 {
        return Ok(x.clone());
    }
    let (b, n, t, d) = x.dims4()?;
    x.unsqueeze(2)?
        .broadcast_as((b, n, rep, t, d))?
        .contiguous()?
        .reshape((b, n * rep, t, d))
}

/// Causal self-attention, `softmax(scale·q·kᵀ + mask)·v` per head, as the fused kernel of
/// [`causal_attention`](super::attention::causal_attention) computes it: `q` (B, H, T, d), `k`
/// and `v` (B, H_kv, T, d); `pad` (B, T) 1 for tokens and 0 for padded keys; `window` limits how
/// far back a query sees. The mask adds [`MASKED`] per hidden reason (future or out of the
/// window, padded), as the kernel does. Returns (B, T, H·d).
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    pad: Option<&Tensor>,
    scale: f64,
    window: Option<usize>,
) -> Result<Tensor> {
    let (b, h, t, d) = q.dims4()?;
    let (b2, hkv, t2, d2) = k.dims4()?;
    if v.dims() != k.dims() || (b2, t2, d2) != (b, t, d) || hkv == 0 || h % hkv != 0 {
        candle_core::bail!(
            "attention: q {:?}, k {:?}, v {:?} do not fit (B, H, T, d) / (B, H_kv, T, d)",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    let rep = h / hkv;
    let (k, v) = (repeat_kv(k, rep)?, repeat_kv(v, rep)?);
    let scores = (q.matmul(&k.t()?)? * scale)?;
    let mut s = scores.broadcast_add(&causal_bias(t, window.unwrap_or(usize::MAX), q)?)?;
    if let Some(p) = pad {
        if p.elem_count() != b * t {
            candle_core::bail!("attention: {} mask values for {b}×{t} keys", p.elem_count());
        }
        // 1 (a token) → 0, 0 (padding) → MASKED, as the kernel reads the mask.
        let keep = p.reshape((b, 1, 1, t))?.to_dtype(DType::F32)?.gt(0.5)?;
        let bias = keep
            .to_dtype(DType::F32)?
            .affine(-(MASKED as f64), MASKED as f64)?
            .to_dtype(q.dtype())?;
        s = s.broadcast_add(&bias)?;
    }
    softmax_last_dim(&s)?
        .matmul(&v)?
        .transpose(1, 2)?
        .reshape((b, t, h * d))
}

//! Batches of tokenised examples for a causal language model, and its loss: next-token
//! cross-entropy over the trained tokens only (an instruction's prompt is masked, as TRL and
//! LLaMA-Factory do). The output projection runs on the trained positions alone, so a masked
//! prompt costs no vocabulary-sized logits.

use candle_core::{D, DType, Device, Tensor};

use crate::models::llama::LlamaModel;

/// One tokenised example: its ids and, per id, whether the model learns to predict it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LmExample {
    /// Token ids.
    pub ids: Vec<u32>,
    /// `true` where the token is trained (predicted from the ones before it).
    pub loss_mask: Vec<bool>,
}

impl LmExample {
    /// Tokens the loss covers (a first token is never predicted).
    pub fn trained_tokens(&self) -> usize {
        self.loss_mask.iter().skip(1).filter(|&&m| m).count()
    }
}

/// A padded batch: inputs, attention mask, and the flat rows whose next token is trained.
pub struct LmBatch {
    /// Token ids (B, T) u32, padded on the right.
    pub ids: Tensor,
    /// Attention mask (B, T) f32: 1 for tokens, 0 for padding.
    pub mask: Tensor,
    /// Row indices into the flattened (B·T) positions whose next token is trained (u32).
    pub rows: Tensor,
    /// The tokens those rows predict (u32).
    pub targets: Tensor,
    /// Number of trained tokens.
    pub count: usize,
}

/// Builds the batch of `examples` (padding with `pad_id`), or `None` when none of them has
/// a trained token.
pub fn lm_batch(
    examples: &[&LmExample],
    pad_id: u32,
    device: &Device,
) -> candle_core::Result<Option<LmBatch>> {
    let t = examples.iter().map(|e| e.ids.len()).max().unwrap_or(0);
    if t < 2 {
        return Ok(None);
    }
    let b = examples.len();
    let mut ids = Vec::with_capacity(b * t);
    let mut mask = Vec::with_capacity(b * t);
    let (mut rows, mut targets) = (Vec::new(), Vec::new());
    for (i, e) in examples.iter().enumerate() {
        let n = e.ids.len();
        ids.extend_from_slice(&e.ids);
        ids.extend(std::iter::repeat_n(pad_id, t - n));
        mask.extend(std::iter::repeat_n(1f32, n));
        mask.extend(std::iter::repeat_n(0f32, t - n));
        for p in 1..n {
            if e.loss_mask.get(p).copied().unwrap_or(false) {
                rows.push((i * t + p - 1) as u32);
                targets.push(e.ids[p]);
            }
        }
    }
    let count = rows.len();
    if count == 0 {
        return Ok(None);
    }
    Ok(Some(LmBatch {
        ids: Tensor::from_vec(ids, (b, t), device)?,
        mask: Tensor::from_vec(mask, (b, t), device)?,
        rows: Tensor::from_vec(rows, count, device)?,
        targets: Tensor::from_vec(targets, count, device)?,
        count,
    }))
}

/// Logits (count, vocab) at the batch's trained positions.
pub fn trained_logits(
    model: &LlamaModel,
    batch: &LmBatch,
    train: bool,
) -> candle_core::Result<Tensor> {
    let hidden = model.hidden_states(&batch.ids, Some(&batch.mask), train)?;
    let (b, t, h) = hidden.dims3()?;
    let picked = hidden.reshape((b * t, h))?.index_select(&batch.rows, 0)?;
    model
        .lm_head()
        .forward_t(&picked, train)
        .map_err(|e| candle_core::Error::Msg(e.to_string()))
}

/// Mean next-token cross-entropy over the batch's trained tokens. A frozen, plain `lm_head`
/// (every adapter run) goes through the fused head-and-loss kernel, which never holds the
/// (tokens × vocabulary) logits.
pub fn lm_loss(model: &LlamaModel, batch: &LmBatch, train: bool) -> candle_core::Result<Tensor> {
    let head = model.lm_head();
    let w = head
        .base_weight()
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    if head.adapter().is_none()
        && head.bias().is_none()
        && head.trainable_count() == 0
        && !w.track_op()
        && w.dtype() == DType::F32
        && w.device().is_cpu()
    {
        let hidden = model.hidden_states(&batch.ids, Some(&batch.mask), train)?;
        let (b, t, h) = hidden.dims3()?;
        let picked = hidden.reshape((b * t, h))?.index_select(&batch.rows, 0)?;
        return crate::models::lm_ops::frozen_head_cross_entropy(&picked, &w, &batch.targets);
    }
    let logits = trained_logits(model, batch, train)?;
    crate::models::lm_ops::cross_entropy(&logits, &batch.targets)
}

/// Summed loss and correct next-token predictions over a batch (for evaluation).
pub fn lm_eval_sums(model: &LlamaModel, batch: &LmBatch) -> candle_core::Result<(f64, usize)> {
    let logits = trained_logits(model, batch, false)?.detach();
    let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let picked = log_probs
        .gather(&batch.targets.unsqueeze(1)?, 1)?
        .to_dtype(DType::F64)?
        .sum_all()?
        .to_scalar::<f64>()?;
    let pred = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
    let gold = batch.targets.to_vec1::<u32>()?;
    let correct = pred.iter().zip(&gold).filter(|(a, b)| a == b).count();
    Ok((-picked, correct))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(ids: &[u32], mask: &[bool]) -> LmExample {
        LmExample {
            ids: ids.to_vec(),
            loss_mask: mask.to_vec(),
        }
    }

    #[test]
    fn batches_pad_right_and_pick_the_positions_before_trained_tokens() {
        let a = ex(&[5, 6, 7, 8], &[false, false, true, true]);
        let b = ex(&[9, 10], &[false, true]);
        let batch = lm_batch(&[&a, &b], 0, &Device::Cpu).unwrap().unwrap();
        assert_eq!(
            batch.ids.to_vec2::<u32>().unwrap(),
            vec![vec![5, 6, 7, 8], vec![9, 10, 0, 0]]
        );
        assert_eq!(
            batch.mask.to_vec2::<f32>().unwrap(),
            vec![vec![1.0; 4], vec![1.0, 1.0, 0.0, 0.0]]
        );
        // Rows (flat b·T + p−1) predict the token at p.
        assert_eq!(batch.rows.to_vec1::<u32>().unwrap(), vec![1, 2, 4]);
        assert_eq!(batch.targets.to_vec1::<u32>().unwrap(), vec![7, 8, 10]);
        assert_eq!(batch.count, 3);
        assert_eq!(a.trained_tokens() + b.trained_tokens(), 3);
        // Nothing trained, or nothing to predict: no batch.
        let none = ex(&[1, 2, 3], &[true, false, false]);
        assert!(lm_batch(&[&none], 0, &Device::Cpu).unwrap().is_none());
        assert!(
            lm_batch(&[&ex(&[1], &[true])], 0, &Device::Cpu)
                .unwrap()
                .is_none()
        );
    }
}

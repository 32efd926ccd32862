//! The allowed range of every number in a [`TrainConfig`], and the checks that need the data
//! and the model: the batch against the training split, the step count an `epochs` setting
//! gives, and the memory a run needs against what the machine has. Every message names the
//! field, the value and the range, so a bad setting stops before any work starts.

use super::config::{TrainConfig, TrainMode};
use crate::data::DataSource;
use crate::models::InputKind;

/// Most optimiser steps a run may take.
pub const MAX_STEPS: usize = 10_000_000;
/// Largest (eval) batch.
pub const MAX_BATCH: usize = 1 << 16;
/// Most micro-batches accumulated per step.
pub const MAX_GRAD_ACCUM: usize = 1 << 12;
/// Most passes over the training split.
pub const MAX_EPOCHS: f64 = 100_000.0;
/// Longest token sequence (`model.max_length`).
pub const MAX_LENGTH: usize = 1 << 16;
/// Largest side of a resized image (`data.source.size`).
pub const MAX_IMAGE_SIDE: u32 = 4096;

fn positive(field: &str, v: f64) -> Result<(), String> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(format!("{field}: must be a positive number, got {v}"))
    }
}

fn non_negative(field: &str, v: f64) -> Result<(), String> {
    if v.is_finite() && v >= 0.0 {
        Ok(())
    } else {
        Err(format!("{field}: must be a number ≥ 0, got {v}"))
    }
}

fn within(field: &str, v: usize, lo: usize, hi: usize) -> Result<(), String> {
    if (lo..=hi).contains(&v) {
        Ok(())
    } else {
        Err(format!("{field}: must be between {lo} and {hi}, got {v}"))
    }
}

/// Checks every number of `cfg` that does not depend on the model or the data.
pub(crate) fn check_numbers(cfg: &TrainConfig) -> Result<(), String> {
    let o = &cfg.optim;
    positive("optim.lr", o.lr)?;
    if let Some(h) = o.head_lr {
        positive("optim.head_lr", h)?;
    }
    non_negative("optim.weight_decay", o.weight_decay)?;
    non_negative("optim.diagonal_weight_decay", o.diagonal_weight_decay)?;
    within("optim.warmup_steps", o.warmup_steps, 0, MAX_STEPS)?;
    if let Some(m) = o.max_grad_norm {
        positive("optim.max_grad_norm", m)?;
    }
    within("optim.grad_accum", o.grad_accum, 1, MAX_GRAD_ACCUM)?;
    within("optim.batch_size", o.batch_size, 1, MAX_BATCH)?;
    within("optim.eval_batch_size", o.eval_batch_size, 1, MAX_BATCH)?;
    if let Some(s) = o.steps {
        within("optim.steps", s, 1, MAX_STEPS)?;
    }
    if let Some(e) = o.epochs
        && !(e.is_finite() && e > 0.0 && e <= MAX_EPOCHS)
    {
        return Err(format!(
            "optim.epochs: must be a number in (0, {MAX_EPOCHS}], got {e}"
        ));
    }
    if o.steps.is_none() && o.epochs.is_none() {
        return Err("optim: give steps or epochs".into());
    }
    within("optim.eval_every", o.eval_every, 1, usize::MAX)?;
    if let Some(c) = o.checkpoint_every {
        within("optim.checkpoint_every", c, 1, usize::MAX)?;
    }
    within("model.max_length", cfg.model.max_length, 2, MAX_LENGTH)
        .map_err(|e| format!("{e} (2 leaves room for the [CLS] and [SEP] tokens)"))?;
    within("generation.questions", cfg.generation.questions, 0, 100_000)?;
    within(
        "generation.max_new_tokens",
        cfg.generation.max_new_tokens,
        1,
        4096,
    )?;
    let d = &cfg.data;
    if !(d.eval_fraction.is_finite() && d.eval_fraction > 0.0 && d.eval_fraction < 1.0) {
        return Err(format!(
            "data.eval_fraction: must be between 0 and 1 (exclusive), got {}",
            d.eval_fraction
        ));
    }
    for (field, cap) in [
        ("data.max_train", d.max_train),
        ("data.max_eval", d.max_eval),
    ] {
        if cap == Some(0) {
            return Err(format!(
                "{field}: must be at least 1 (leave it out for no cap)"
            ));
        }
    }
    if let DataSource::ImageFolder {
        size: Some([h, w]), ..
    } = &d.source
    {
        for (side, v) in [("height", h), ("width", w)] {
            if !(1..=MAX_IMAGE_SIDE).contains(v) {
                return Err(format!(
                    "data.source.size: the {side} must be between 1 and {MAX_IMAGE_SIDE}, got {v}"
                ));
            }
        }
    }
    Ok(())
}

/// Optimiser steps of a run on `n_train` examples: `optim.steps`, or
/// ⌈epochs · n_train / (batch_size · grad_accum)⌉ when only `optim.epochs` is given.
pub fn total_steps(cfg: &TrainConfig, n_train: usize) -> Result<usize, String> {
    let o = &cfg.optim;
    if let Some(s) = o.steps {
        return Ok(s);
    }
    let epochs = o.epochs.unwrap_or(1.0);
    let per_step = (o.batch_size as f64) * (o.grad_accum as f64);
    let steps = ((epochs * n_train as f64) / per_step).ceil().max(1.0);
    if steps > MAX_STEPS as f64 {
        return Err(format!(
            "optim.epochs = {epochs} gives {steps:.0} steps on {n_train} training examples at batch {} × {}; at most {MAX_STEPS} are allowed",
            o.batch_size, o.grad_accum
        ));
    }
    Ok(steps as usize)
}

/// Refuses a batch larger than the training split.
pub fn check_batch(cfg: &TrainConfig, n_train: usize, dataset: &str) -> Result<(), String> {
    let b = cfg.optim.batch_size;
    if b > n_train {
        return Err(format!(
            "optim.batch_size = {b} is larger than the training split of {dataset} ({n_train} examples); use 1 to {n_train}"
        ));
    }
    Ok(())
}

/// The sizes the memory estimate reads from a model's `config.json`, and its sequence length.
struct Shape {
    hidden: u64,
    layers: u64,
    inter: u64,
    heads: u64,
    tokens: u64,
}

impl Shape {
    fn of(cfg: &TrainConfig, model_config: &serde_json::Value, input: InputKind) -> Self {
        let field = |k: &str, d: u64| model_config.get(k).and_then(|v| v.as_u64()).unwrap_or(d);
        let hidden = field("hidden_size", 768);
        let tokens = match input {
            InputKind::Image { .. } => {
                let patch = field("patch_size", 16).max(1);
                (field("image_size", 224) / patch).pow(2) + 1
            }
            InputKind::Text { max_positions, .. } => {
                cfg.model.max_length.min(max_positions).max(2) as u64
            }
        };
        Shape {
            hidden,
            layers: field("num_hidden_layers", 12).max(1),
            inter: field("intermediate_size", 4 * hidden),
            heads: field("num_attention_heads", 12),
            tokens,
        }
    }
}

/// A rough estimate (on the low side: it catches gross overruns without refusing real runs)
/// of the bytes a run holds at its peak: the model's values (times
/// four in full fine-tuning: weights, gradients and AdamW's two moments) plus the larger of
/// one training micro-batch's activations (kept for the backward pass: about a dozen
/// hidden-size vectors, two feed-forward ones and three attention rows per head, per token
/// and layer) and one evaluation batch's (one layer at a time).
pub fn peak_bytes(
    cfg: &TrainConfig,
    model_config: &serde_json::Value,
    input: InputKind,
    parameters: usize,
    eval_examples: usize,
) -> u64 {
    let s = Shape::of(cfg, model_config, input);
    let per_token_layer = 12 * s.hidden + 2 * s.inter + 3 * s.heads * s.tokens;
    let train = (cfg.optim.batch_size as u64)
        .saturating_mul(s.tokens)
        .saturating_mul(s.layers)
        .saturating_mul(per_token_layer)
        .saturating_mul(4);
    let eval_batch = cfg.optim.eval_batch_size.min(eval_examples.max(1)) as u64;
    let eval = eval_batch
        .saturating_mul(s.tokens)
        .saturating_mul(per_token_layer)
        .saturating_mul(4);
    let copies = if cfg.mode == TrainMode::Full { 4 } else { 1 };
    (parameters as u64)
        .saturating_mul(4 * copies)
        .saturating_add(train.max(eval))
}

/// Refuses a run whose [`peak_bytes`] exceed `available` bytes, naming the batch sizes and
/// the numbers.
pub fn check_memory(
    cfg: &TrainConfig,
    model_config: &serde_json::Value,
    input: InputKind,
    parameters: usize,
    eval_examples: usize,
    available: u64,
) -> Result<(), String> {
    let need = peak_bytes(cfg, model_config, input, parameters, eval_examples);
    if need <= available {
        return Ok(());
    }
    let gib = crate::memory::gib;
    Err(format!(
        "this run needs about {:.1} GiB (model {} values{}, optim.batch_size = {}, optim.eval_batch_size = {}), more than the {:.1} GiB of memory available; lower the batch sizes (or model.max_length)",
        gib(need),
        crate::inspect::thousands(parameters),
        if cfg.mode == TrainMode::Full {
            ", 4 copies in full fine-tuning"
        } else {
            ""
        },
        cfg.optim.batch_size,
        cfg.optim.eval_batch_size,
        gib(available)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bert_base() -> serde_json::Value {
        serde_json::json!({"hidden_size": 768, "num_hidden_layers": 12,
            "num_attention_heads": 12, "intermediate_size": 3072})
    }

    const TEXT: InputKind = InputKind::Text {
        max_positions: 512,
        pad_id: 0,
    };

    #[test]
    fn memory_estimate_refuses_batches_that_cannot_fit() {
        let mut cfg = TrainConfig::default();
        cfg.model.max_length = 128;
        cfg.optim.batch_size = 16;
        let gib8 = 8u64 << 30;
        let small = peak_bytes(&cfg, &bert_base(), TEXT, 110_000_000, 1000);
        // BERT-base, batch 16 × 128 tokens: between 1 and 8 GiB.
        assert!(small > 1 << 30 && small < gib8, "{small}");
        assert!(check_memory(&cfg, &bert_base(), TEXT, 110_000_000, 1000, gib8).is_ok());
        cfg.optim.batch_size = 4096;
        let e = check_memory(&cfg, &bert_base(), TEXT, 110_000_000, 1000, gib8).unwrap_err();
        assert!(
            e.contains("optim.batch_size = 4096") && e.contains("GiB"),
            "{e}"
        );
        // A huge evaluation batch counts too, bounded by the eval split.
        cfg.optim.batch_size = 16;
        cfg.optim.eval_batch_size = 65536;
        assert!(check_memory(&cfg, &bert_base(), TEXT, 110_000_000, 100_000, gib8).is_err());
        assert!(check_memory(&cfg, &bert_base(), TEXT, 110_000_000, 100, gib8).is_ok());
        // Full fine-tuning keeps four copies of the weights.
        cfg.mode = TrainMode::Full;
        let full = peak_bytes(&cfg, &bert_base(), TEXT, 110_000_000, 100);
        cfg.mode = TrainMode::Head;
        let head = peak_bytes(&cfg, &bert_base(), TEXT, 110_000_000, 100);
        assert_eq!(full - head, 3 * 4 * 110_000_000);
    }

    #[test]
    fn epochs_give_the_step_count_and_are_bounded() {
        let mut cfg = TrainConfig::default();
        cfg.optim.steps = None;
        cfg.optim.epochs = Some(3.0);
        cfg.optim.batch_size = 10;
        assert_eq!(total_steps(&cfg, 95), Ok(29)); // ⌈285 / 10⌉
        cfg.optim.epochs = Some(100_000.0);
        cfg.optim.batch_size = 1;
        assert!(
            total_steps(&cfg, 1_000_000)
                .unwrap_err()
                .contains("optim.epochs")
        );
        assert!(check_batch(&cfg, 0, "d").is_err());
    }
}

//! The allowed range of every number in a [`TrainConfig`], and the checks that need the data
//! and the model: the batch against the training split, the step count an `epochs` setting
//! gives, and the memory a run needs against what the machine has. Every message names the
//! field, the value and the range, so a bad setting stops before any work starts.

use super::config::{TrainConfig, TrainMode};
use crate::data::DataSource;
use crate::models::{Classifier, InputKind};

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

/// A rough upper estimate of the bytes one training step holds: the model's values (times
/// four in full fine-tuning: weights, gradients and AdamW's two moments) plus the
/// activations of one micro-batch kept for the backward pass.
pub fn step_bytes(cfg: &TrainConfig, model: &dyn Classifier, parameters: usize) -> u64 {
    let c = model.config_json();
    let field = |k: &str, d: u64| c.get(k).and_then(|v| v.as_u64()).unwrap_or(d);
    let h = field("hidden_size", 768);
    let layers = field("num_hidden_layers", 12);
    let inter = field("intermediate_size", 4 * h);
    let heads = field("num_attention_heads", 12);
    let tokens = match model.input() {
        InputKind::Image { .. } => {
            let patch = field("patch_size", 16).max(1);
            let image = field("image_size", 224);
            (image / patch).pow(2) + 1
        }
        InputKind::Text { max_positions, .. } => {
            cfg.model.max_length.min(max_positions).max(2) as u64
        }
    };
    // Per token and layer: about a dozen hidden-size vectors, two of the feed-forward size,
    // and three attention rows per head.
    let per_token_layer = 12 * h + 2 * inter + 3 * heads * tokens;
    let activations = (cfg.optim.batch_size as u64)
        .saturating_mul(tokens)
        .saturating_mul(layers.max(1))
        .saturating_mul(per_token_layer)
        .saturating_mul(4);
    let copies = if cfg.mode == TrainMode::Full { 4 } else { 1 };
    (parameters as u64)
        .saturating_mul(4 * copies)
        .saturating_add(activations)
}

/// Refuses a run whose estimated step memory exceeds what the machine has available
/// (`MemAvailable`), naming the batch and the numbers.
pub fn check_memory(
    cfg: &TrainConfig,
    model: &dyn Classifier,
    parameters: usize,
) -> Result<(), String> {
    let Some(available) = crate::memory::available_bytes() else {
        return Ok(());
    };
    let need = step_bytes(cfg, model, parameters);
    if need <= available {
        return Ok(());
    }
    let gib = crate::memory::gib;
    Err(format!(
        "this run needs about {:.1} GiB per step (model {}, optim.batch_size = {}{}), more than the {:.1} GiB of memory available; lower optim.batch_size (or model.max_length)",
        gib(need),
        crate::inspect::thousands(parameters),
        cfg.optim.batch_size,
        if cfg.mode == TrainMode::Full {
            ", full fine-tuning keeps 4 copies of the weights"
        } else {
            ""
        },
        gib(available)
    ))
}

//! The settings of the identity encoder and its training.

use serde::{Deserialize, Serialize};

use super::{EncoderError, Result};
use crate::models::kit::ConvTower;

/// Hyper-parameters of the encoder and its training.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct EncoderConfig {
    /// Side of the (square) input images; must be divisible by `2^stages`.
    pub image_size: usize,
    /// Channels of the first convolution stage; stage `i` has `width·2^i`.
    pub width: usize,
    /// Convolution stages (each halves the resolution).
    pub stages: usize,
    /// Features of the hidden layer between the flattened map and the embedding.
    pub hidden: usize,
    /// Length of the embedding.
    pub embed_dim: usize,
    /// Optimiser steps.
    pub steps: usize,
    /// Images per step.
    pub batch: usize,
    /// Peak learning rate (linear warm-up, then cosine decay to 5 %).
    pub lr: f64,
    /// Decoupled weight decay of AdamW.
    pub weight_decay: f64,
    /// Scale of the normalised-softmax logits.
    pub scale: f64,
    /// Additive cosine margin (CosFace) subtracted from the true class's cosine.
    pub margin: f64,
    /// Random horizontal flips, small shifts and brightness/contrast jitter while training.
    pub augment: bool,
    /// Seed of the initial weights, batches and augmentations.
    pub seed: u64,
}

impl Default for EncoderConfig {
    fn default() -> Self {
        Self {
            image_size: 32,
            width: 24,
            stages: 3,
            hidden: 256,
            embed_dim: 64,
            steps: 600,
            batch: 64,
            lr: 2e-3,
            weight_decay: 0.01,
            scale: 16.0,
            margin: 0.2,
            augment: true,
            seed: 0,
        }
    }
}

impl EncoderConfig {
    /// Checks that the config describes a buildable, trainable encoder.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(EncoderError::Config(m));
        if self.stages == 0 || self.stages > 6 {
            return bad(format!("stages must be 1..=6, got {}", self.stages));
        }
        let div = 1usize << self.stages;
        if self.image_size == 0 || !self.image_size.is_multiple_of(div) {
            return bad(format!(
                "image_size ({}) must be a positive multiple of 2^stages ({div})",
                self.image_size
            ));
        }
        if self.width == 0 || self.hidden == 0 || self.embed_dim == 0 {
            return bad("width, hidden and embed_dim must be positive".into());
        }
        if self.batch == 0 {
            return bad("batch must be positive".into());
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(format!("lr must be positive, got {}", self.lr));
        }
        if !(self.scale.is_finite() && self.scale > 0.0) {
            return bad(format!("scale must be positive, got {}", self.scale));
        }
        if !(self.margin.is_finite() && self.weight_decay.is_finite()) {
            return bad("margin and weight_decay must be finite".into());
        }
        Ok(())
    }

    /// The network: the layer kit's convolutional tower with the embedding (`head.fc2`) as
    /// output.
    pub(super) fn tower(&self) -> ConvTower {
        ConvTower {
            image_size: self.image_size,
            width: self.width,
            stages: self.stages,
            hidden: self.hidden,
            outputs: self.embed_dim,
            output: "fc2",
        }
    }
}

//! The generator's architecture and its validation.

use serde::{Deserialize, Serialize};

use crate::diffusion::{Prediction, ScheduleConfig, ScheduleKind};

use super::codec::CodecConfig;
use super::{Result, UnetError};

/// Architecture and training settings of the [`Generator`](super::Generator).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UnetConfig {
    /// Side of the square images (divisible by 2^(levels − 1)).
    pub image_size: usize,
    /// Image channels (3 for RGB).
    pub channels: usize,
    /// Channels of the first level.
    pub base_channels: usize,
    /// Channel multiplier of each resolution level (one level per entry).
    pub channel_mult: Vec<usize>,
    /// Residual blocks per level on the way down (the way up has one more).
    pub layers_per_block: usize,
    /// Levels (indices into `channel_mult`) with a spatial transformer after each residual
    /// block; the middle block always has one.
    pub attention_levels: Vec<usize>,
    /// Attention heads of the UNet's transformer blocks.
    pub heads: usize,
    /// Groups of every group norm (divides every channel count).
    pub norm_groups: usize,
    /// Width of the text encoder's token states.
    pub text_dim: usize,
    /// Transformer blocks of the text encoder.
    pub text_layers: usize,
    /// Attention heads of the text encoder.
    pub text_heads: usize,
    /// Rows of the token embedding (at least the vocabulary's size).
    pub vocab_size: usize,
    /// Tokens per prompt, including the leading `<bos>`.
    pub max_tokens: usize,
    /// Width of the timestep embedding MLP.
    pub time_embed_dim: usize,
    /// The DDPM noise schedule.
    pub schedule: ScheduleConfig,
    /// What the UNet predicts: `epsilon` (the noise) or `v` (the velocity; its target at high
    /// noise is the image itself, so identity shapes the loss where the prompt cannot).
    pub prediction: Prediction,
    /// Probability of training on the empty prompt (classifier-free guidance).
    pub p_uncond: f64,
    /// Seed of the weight initialisation.
    pub seed: u64,
    /// A latent generator's image codec: the UNet then diffuses the codec's latents
    /// (`image_size` and `channels` are the latent's side and channels) and the generator takes
    /// and draws images of the codec's size. Absent: the UNet diffuses pixels.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub codec: Option<CodecConfig>,
}

impl Default for UnetConfig {
    /// 32×32 RGB, widths 32/64, two residual blocks per level, attention at 16×16, a
    /// two-block text encoder of width 64, a cosine schedule of 1000 steps.
    fn default() -> Self {
        Self {
            image_size: 32,
            channels: 3,
            base_channels: 32,
            channel_mult: vec![1, 2],
            layers_per_block: 2,
            attention_levels: vec![1],
            heads: 4,
            norm_groups: 8,
            text_dim: 64,
            text_layers: 2,
            text_heads: 4,
            vocab_size: 64,
            max_tokens: 16,
            time_embed_dim: 128,
            schedule: ScheduleConfig {
                kind: ScheduleKind::Cosine,
                steps: 1000,
            },
            prediction: Prediction::Epsilon,
            p_uncond: 0.1,
            seed: 0,
            codec: None,
        }
    }
}

impl UnetConfig {
    /// A very small configuration for tests: widths 16/32, one residual block per level, a
    /// one-block text encoder of width 32.
    pub fn tiny() -> Self {
        Self {
            base_channels: 16,
            layers_per_block: 1,
            heads: 2,
            text_dim: 32,
            text_layers: 1,
            text_heads: 2,
            time_embed_dim: 64,
            ..Self::default()
        }
    }

    /// Side of the images the generator takes and draws (the codec's when it has one).
    pub fn pixel_size(&self) -> usize {
        self.codec
            .as_ref()
            .map_or(self.image_size, |c| c.image_size)
    }

    /// Channels of the images the generator takes and draws.
    pub fn pixel_channels(&self) -> usize {
        self.codec.as_ref().map_or(self.channels, |c| c.channels)
    }

    /// Channels of each level.
    pub fn level_channels(&self) -> Vec<usize> {
        self.channel_mult
            .iter()
            .map(|m| m * self.base_channels)
            .collect()
    }

    /// Checks every field; the message names the first bad one.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(UnetError::Config(m));
        if self.channel_mult.is_empty() || self.channel_mult.contains(&0) {
            return bad("channel_mult must be non-empty with positive entries".into());
        }
        if self.channels == 0 || self.base_channels == 0 || self.layers_per_block == 0 {
            return bad("channels, base_channels and layers_per_block must be > 0".into());
        }
        let levels = self.channel_mult.len();
        let factor = 1usize << (levels - 1);
        if self.image_size == 0 || !self.image_size.is_multiple_of(factor) {
            return bad(format!(
                "image_size {} must be a positive multiple of {factor} ({levels} levels)",
                self.image_size
            ));
        }
        if let Some(l) = self.attention_levels.iter().find(|&&l| l >= levels) {
            return bad(format!(
                "attention level {l} does not exist ({levels} levels)"
            ));
        }
        let ch = self.level_channels();
        if self.norm_groups == 0 || ch.iter().any(|c| !c.is_multiple_of(self.norm_groups)) {
            return bad(format!(
                "norm_groups {} must divide every level's channels {ch:?}",
                self.norm_groups
            ));
        }
        if self.heads == 0 || ch.iter().any(|c| !c.is_multiple_of(self.heads)) {
            return bad(format!(
                "heads {} must divide every level's channels",
                self.heads
            ));
        }
        if self.text_heads == 0
            || self.text_dim == 0
            || !self.text_dim.is_multiple_of(self.text_heads)
        {
            return bad(format!(
                "text_heads {} must divide text_dim {}",
                self.text_heads, self.text_dim
            ));
        }
        if self.max_tokens < 2 {
            return bad("max_tokens must be ≥ 2 (<bos> and one word)".into());
        }
        if self.time_embed_dim == 0 || !self.base_channels.is_multiple_of(2) {
            return bad("time_embed_dim must be > 0 and base_channels even".into());
        }
        if !(0.0..=1.0).contains(&self.p_uncond) {
            return bad(format!("p_uncond {} must lie in [0, 1]", self.p_uncond));
        }
        if self.schedule.steps == 0 {
            return bad("schedule.steps must be > 0".into());
        }
        if let Some(codec) = &self.codec {
            codec.validate()?;
            if codec.latent_size() != self.image_size || codec.latent_channels != self.channels {
                return bad(format!(
                    "a latent generator's image_size {} and channels {} must be its codec's \
                     latent side {} and latent_channels {}",
                    self.image_size,
                    self.channels,
                    codec.latent_size(),
                    codec.latent_channels
                ));
            }
        }
        Ok(())
    }
}

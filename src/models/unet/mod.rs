//! A small text-conditioned UNet image generator for DiffLoRA (see `METHODS.md`): a prompt
//! tokenizer over the portrait vocabulary ([`PromptVocab`]), a small transformer text encoder
//! ([`TextEncoder`]), a UNet denoiser with spatial transformer blocks ([`Unet`]) and the bundle
//! that trains and samples them ([`Generator`]).
//!
//! Module paths follow Stable Diffusion's diffusers UNet (`down_blocks.1.attentions.0.
//! transformer_blocks.0.attn1.to_q`, `mid_block.…`, `up_blocks.…`) and CLIP's text model
//! (`text_model.encoder.layers.0.self_attn.q_proj`), with one deviation: the attention output
//! projection is `…attn1.to_out` (diffusers writes `to_out.0`), so the PEFT target list
//! `["to_q", "to_k", "to_v", "to_out"]` matches it. Every linear layer of the transformer
//! blocks is an [`AdaptedLinear`](crate::peft::linear::AdaptedLinear); convolutions, norms, embeddings and the time MLP are plain
//! tensors. [`Unet`]'s [`LinearLayers`](crate::peft::linear::LinearLayers) lists only the UNet's own linear layers; the text
//! encoder is a separate [`LinearLayers`](crate::peft::linear::LinearLayers) (adapt it through [`Generator::text_encoder_mut`]).

mod blocks;
mod codec;
mod config;
mod generator;
mod net;
mod text;
mod vocab;

pub use codec::{CodecConfig, ImageCodec};
pub use config::UnetConfig;
pub use generator::Generator;
pub use net::Unet;
pub use text::TextEncoder;
pub use vocab::PromptVocab;

use crate::diffusion::DiffusionError;
use crate::peft::PeftError;

/// Errors of the generator; each says which field, tensor or file is wrong.
#[derive(Debug, thiserror::Error)]
pub enum UnetError {
    /// An invalid configuration field.
    #[error("unet config: {0}")]
    Config(String),
    /// An input of the wrong shape.
    #[error("unet input: {0}")]
    Shape(String),
    /// A weights file could not be read, written or matched to the model.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// An adapted layer failed.
    #[error(transparent)]
    Peft(#[from] PeftError),
    /// The diffusion utilities refused an argument.
    #[error(transparent)]
    Diffusion(#[from] DiffusionError),
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, UnetError>;

//! LLaMA-family causal language models (`model_type` llama, mistral, qwen2): one decoder
//! with config switches, every linear layer an [`AdaptedLinear`](crate::peft::AdaptedLinear)
//! under its Hugging Face module path.
//!
//! - [`config`]: `config.json` read and validated ([`LlamaConfig`]).
//! - [`model`]: the forward pass, with a [`KvCache`] for incremental decoding.
//! - [`load`]: a local Hugging Face folder (single or sharded safetensors).

pub mod config;
pub mod load;
pub mod model;

pub use config::{DecoderFamily, Llama3RopeScaling, LlamaConfig};
pub use load::load_folder;
pub use model::{KvCache, LlamaModel};

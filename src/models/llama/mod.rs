//! LLaMA-family causal language models (`model_type` llama, mistral, qwen2): one decoder
//! with config switches, every linear layer an [`AdaptedLinear`](crate::peft::AdaptedLinear)
//! under its Hugging Face module path.
//!
//! - [`config`]: `config.json` read and validated ([`LlamaConfig`]).
//! - [`model`]: the forward pass, with a [`KvCache`] for incremental decoding.
//! - [`load`]: a local Hugging Face folder (single or sharded safetensors).
//! - [`gguf`]: a llama.cpp GGUF file (llama, qwen2), dequantized to f32.
//! - [`tokenizer`]: the tokenizer, special tokens and chat template ([`LlmTokenizer`]).
//! - [`language_model`]: model + tokenizer from a folder, a GGUF file or the built-in name.
//! - [`generate`]: greedy and sampled generation with streaming.

pub mod config;
pub mod generate;
pub mod gguf;
pub mod language_model;
pub mod load;
pub mod model;
pub mod tokenizer;

pub use config::{DecoderFamily, Llama3RopeScaling, LlamaConfig};
pub use generate::{
    GenerateError, GenerateOptions, Generation, Sampling, StopReason, Timings, generate_text,
    generate_tokens,
};
pub use gguf::{load_gguf, load_gguf_packed};
pub use language_model::{
    LanguageModel, SMOLLM2_NAME, load_language_model, load_language_model_with, resolve_model,
    smollm2_fetch_hint, smollm2_path,
};
pub use load::load_folder;
pub use model::{KvCache, LlamaModel};
pub use tokenizer::LlmTokenizer;

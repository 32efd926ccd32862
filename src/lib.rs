//! peft-studio: parameter-efficient fine-tuning (LoRA, SVFit, LoLDU) on candle.
//!
//! - [`peft`]: the adapters, exactly as `METHODS.md` specifies, independent of any model.
//! - [`arch`]: model descriptions (module paths and shapes) read from a Hugging Face
//!   `config.json`, enough to size an experiment without weights.
//! - [`inspect`]: parameter counts of a model with an adapter.
//! - [`bench`](mod@bench): measured training-step time and peak memory, side by side with PyTorch + PEFT.
//! - [`device`]: the compute device (CPU, CUDA, Metal), chosen once per job.
//! - [`threads`]: one compute thread pool, the calling thread included.
//! - [`train`]: the training loop and the run store; [`worker`]: the background thread.
//! - [`fsio`]: atomic file writes, safetensors files and their checksums.
//! - [`export`]: a run as a PEFT adapter, a merged Hugging Face folder or a llama.cpp LoRA.
//! - [`job`]: a run as a transformers + PEFT + accelerate job folder, and its results back.

pub mod app;
pub mod arch;
pub mod bench;
pub mod bf16_gemm;
pub mod data;
pub mod device;
pub mod diffusion;
pub mod export;
pub mod fsio;
pub mod inspect;
pub mod job;
pub mod memory;
pub mod models;
pub mod peft;
pub mod personalize;
pub mod plot;
pub mod report;
pub mod threads;
pub mod train;
pub mod worker;

#[cfg(test)]
mod test_util;

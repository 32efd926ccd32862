//! Parameter-efficient adapters (LoRA, SVFit, LoLDU), exactly as `METHODS.md` specifies,
//! independent of any model.
//!
//! The building block is [`AdaptedLinear`]: a frozen linear layer plus an optional adapter.
//! Models build their linear layers from it, so any model can carry any adapter by module path.

pub mod checkpoint;
pub mod config;
pub mod decompose;
pub mod diagonal;
pub mod frozen;
pub(crate) mod fused_lora;
pub mod linear;
pub mod lora;
pub mod packed;

pub use checkpoint::{
    export_lora, load_adapter, load_adapter_with, save_adapter, save_adapter_with,
};
pub use config::{AdapterConfig, Init, Method, Targets};
pub use diagonal::DiagonalAdapter;
pub use frozen::{FrozenGrad, MatmulPrecision, MatmulPrecisionGuard, frozen_linear};
pub use linear::{AdaptedLinear, Adapter, LayerSet};
pub use lora::LoraAdapter;
pub use packed::{PackedWeight, packed_linear};

/// Everything that can go wrong while building, running or storing an adapter. Each variant
/// names the field, layer or file involved.
#[derive(Debug, thiserror::Error)]
pub enum PeftError {
    /// An invalid configuration field.
    #[error("adapter config: {0}")]
    Config(String),
    /// A rank that the layer cannot hold.
    #[error("layer `{layer}`: rank {rank} is impossible for a {m}×{n} weight (1 ≤ r ≤ {max})", max = (*m).min(*n))]
    Rank {
        /// Module path.
        layer: String,
        /// Requested rank.
        rank: usize,
        /// Output features.
        m: usize,
        /// Input features.
        n: usize,
    },
    /// A decomposition failed (tiny pivot, SVD did not converge).
    #[error("layer `{layer}`: {reason}")]
    Decomposition {
        /// Module path.
        layer: String,
        /// What went wrong.
        reason: String,
    },
    /// The targets matched no module of the model.
    #[error("targets `{targets}` match no linear module of the model (it has e.g. {examples})")]
    NoTarget {
        /// The rule as written.
        targets: String,
        /// A few module paths of the model.
        examples: String,
    },
    /// A saved adapter does not fit the model.
    #[error("adapter `{path}` does not fit the model:\n  {}", problems.join("\n  "))]
    Mismatch {
        /// The adapter folder or file.
        path: String,
        /// Every mismatch found.
        problems: Vec<String>,
    },
    /// File input/output.
    #[error("{path}: {cause}")]
    Io {
        /// The file.
        path: String,
        /// The cause (shown in the message, so not chained as a source: it would print
        /// twice).
        cause: std::io::Error,
    },
    /// A malformed file.
    #[error("{path}: {reason}")]
    Format {
        /// The file.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A file could not be written, read or trusted.
    #[error(transparent)]
    File(#[from] crate::fsio::FsError),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Shorthand for results of this module.
pub type Result<T, E = PeftError> = std::result::Result<T, E>;

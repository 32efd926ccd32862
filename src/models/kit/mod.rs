//! The small layer kit the DiffLoRA models are built from — the hypernetwork's LoRA
//! autoencoder and latent denoiser, the identity encoders and the attribute reader — with one
//! implementation of each piece they share:
//!
//! - [`init`]: seeded initial values ([`Init`], [`draw`]) and where a model's parameters come
//!   from while it is built ([`ParamSource`]): fresh values from the caller's seeded generator
//!   ([`Fresh`]) or a saved file ([`ModelFile`]), so one builder serves training and loading;
//! - [`dense`]: the dense layer [`Dense`];
//! - [`mod@im2col`]: 3×3 convolutions of channels-last maps as im2col + matmul, with CPU kernels
//!   whose backward is the adjoint kernel ([`im2col()`], [`col2im`], [`conv3x3`]);
//! - [`conv_tower`]: the small convolutional network of the identity encoders and the
//!   attribute reader ([`ConvTower`]);
//! - [`schedule`]: the learning-rate schedule, linear warm-up then cosine decay
//!   ([`WarmupCosine`]);
//! - [`batches`]: seeded batch order, epoch by epoch ([`Epochs`]) or keyed by the step
//!   ([`step_rng`], [`draw_indices`]);
//! - [`mod@file`]: a model as one safetensors file with its configuration as JSON in the metadata
//!   ([`save_model`], [`ModelFile`]); loading checks every tensor's presence, shape and values
//!   and names the file and the tensor in any error.
//!
//! Everything random is drawn from a generator the caller seeds, in a fixed order, so a model
//! is reproducible per seed. The UNet (`models::unet`) has its own versions of these pieces for
//! now; [`Init::scaled`], [`DenseLayout::Torch`], [`ModelFile`] and [`step_rng`] are the ones it
//! can take over unchanged (same values, same tensor names).

pub mod batches;
pub mod conv_tower;
pub mod dense;
pub mod file;
pub mod im2col;
pub mod init;
pub mod schedule;

use std::path::Path;

pub use batches::{Epochs, Shuffle, draw_indices, step_rng};
pub use conv_tower::ConvTower;
pub use dense::{Dense, DenseLayout};
pub use file::{FORMAT_KEY, ModelFile, ModelKind, half_precision, save_model};
pub use im2col::{col2im, conv3x3, im2col};
pub use init::{Fresh, Init, ParamSource, draw, normal_values};
pub use schedule::WarmupCosine;

/// Errors of the kit. File errors name the file, and the tensor where one is at fault.
#[derive(Debug, thiserror::Error)]
pub enum KitError {
    /// An initialisation that cannot be drawn (a negative or non-finite std).
    #[error("cannot initialise: {0}")]
    Init(String),
    /// An input the kit cannot work with (no examples to draw batches from …).
    #[error("invalid input: {0}")]
    Input(String),
    /// A file cannot be read or written, or is not a file of the expected kind.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// A saved model lacks a tensor.
    #[error("{path}: tensor `{tensor}` is missing")]
    MissingTensor {
        /// The file.
        path: String,
        /// The tensor name.
        tensor: String,
    },
    /// A saved tensor has the wrong shape.
    #[error("{path}: tensor `{tensor}` has shape {got:?}, expected {expected:?}")]
    TensorShape {
        /// The file.
        path: String,
        /// The tensor name.
        tensor: String,
        /// Its shape in the file.
        got: Vec<usize>,
        /// The shape the configuration implies.
        expected: Vec<usize>,
    },
    /// A saved tensor holds NaN or infinite values.
    #[error("{path}: tensor `{tensor}` holds NaN or infinite values")]
    CorruptTensor {
        /// The file.
        path: String,
        /// The tensor name.
        tensor: String,
    },
    /// A saved model holds a tensor that the configuration does not use.
    #[error("{path}: unexpected tensor `{tensor}` (not part of this model)")]
    UnexpectedTensor {
        /// The file.
        path: String,
        /// The tensor name.
        tensor: String,
    },
    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl KitError {
    /// A [`KitError::File`] naming `path`.
    pub fn file(path: &Path, reason: impl Into<String>) -> Self {
        KitError::File {
            path: path.display().to_string(),
            reason: reason.into(),
        }
    }
}

/// Result type of the kit.
pub type Result<T, E = KitError> = std::result::Result<T, E>;

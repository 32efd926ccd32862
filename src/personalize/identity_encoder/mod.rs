//! The identity encoder of DiffLoRA (see `METHODS.md`): maps a portrait to a unit-norm
//! embedding such that pictures of one person embed close together, whatever the expression,
//! head turn, background, lighting or accessory.
//!
//! - [`IdentityEncoder`]: a small convolutional network trained from scratch on labelled
//!   portraits (a class per person) with a normalised-softmax (CosFace) head; after training
//!   the head is dropped and the embeddings are compared by cosine similarity.
//! - [`ParamRegressor`]: closed-form ridge regression from embeddings to numeric targets (the
//!   24 ground-truth identity parameters of synthetic portraits).
//! - [`verification_accuracy`], [`centroid_accuracy`]: nearest-centroid identity accuracy.
//!
//! # Architecture
//!
//! Images (N, 3, S, S) in [-1, 1] are read channels-last by the layer kit's
//! [`ConvTower`](crate::models::kit::ConvTower): each of `stages` stages is a 3×3 convolution
//! (im2col + matmul, whose backward is matmuls and slices, fast on CPU), a layer norm over the
//! channels, GELU and a 2×2 average pool; stage `i` has `width·2^i` channels. The final
//! (S/2^stages)² map is flattened, projected to `hidden` features (layer norm, GELU) and then to
//! `embed_dim` (`head.fc2`), and L2-normalised. The fused ops of [`crate::models::ops`] give
//! real gradients for layer norm and GELU.
//!
//! Training is deterministic in the seed: the initial weights, batches and augmentations all
//! come from one [`StdRng`](rand::rngs::StdRng).
//!
//! Files: `config.rs` ([`EncoderConfig`]), `encoder.rs` ([`IdentityEncoder`]: training,
//! embedding, files), `metrics.rs` (the accuracies), `regressor.rs` ([`ParamRegressor`]).

mod config;
mod encoder;
mod metrics;
mod regressor;
#[cfg(test)]
mod tests;

use candle_core::{D, DType, Device, Tensor};

pub use config::EncoderConfig;
pub use encoder::IdentityEncoder;
pub use metrics::{
    centroid_accuracy, centroid_accuracy_of, verification_accuracy, verification_accuracy_of,
};
pub use regressor::ParamRegressor;

use crate::models::kit::KitError;

/// Metadata key under which [`IdentityEncoder::save`] stores the config as JSON.
pub const CONFIG_KEY: &str = "identity_encoder_config";

/// Errors of the identity encoder; each names the file, tensor or shape at fault.
#[derive(Debug, thiserror::Error)]
pub enum EncoderError {
    /// A tensor operation failed.
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    /// Reading or writing a file failed.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// A tensor does not have the expected shape.
    #[error("tensor `{name}` has shape {got:?}, expected {expected}")]
    Shape {
        /// Which tensor (an argument or a stored weight).
        name: String,
        /// Its shape.
        got: Vec<usize>,
        /// What was expected, in words.
        expected: String,
    },
    /// The configuration is unusable.
    #[error("invalid encoder config: {0}")]
    Config(String),
    /// The inputs are inconsistent (labels, sizes, too few examples).
    #[error("invalid input: {0}")]
    Input(String),
    /// A weights file is unreadable, of another kind, or holds a missing, misshapen, corrupt
    /// or unexpected tensor (the error names the file and the tensor); or the network's
    /// weights do not fit it.
    #[error(transparent)]
    Weights(#[from] KitError),
}

/// Result of this module.
pub type Result<T, E = EncoderError> = std::result::Result<T, E>;

fn shape_err(name: &str, t: &Tensor, expected: impl Into<String>) -> EncoderError {
    EncoderError::Shape {
        name: name.into(),
        got: t.dims().to_vec(),
        expected: expected.into(),
    }
}

/// Row-wise L2 normalisation of (N, E).
fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = (x.sqr()?.sum_keepdim(D::Minus1)? + 1e-12)?.sqrt()?;
    Ok(x.broadcast_div(&norm)?)
}

/// Rows of a 2-D f32 tensor as `Vec<Vec<f32>>`, checking it is (N, `cols`) when given.
fn rows_of(t: &Tensor, name: &str, cols: Option<usize>) -> Result<Vec<Vec<f32>>> {
    let ok = match (t.dims(), cols) {
        (&[_, c], Some(want)) => c == want,
        (&[_, _], None) => true,
        _ => false,
    };
    if !ok {
        let expected = match cols {
            Some(c) => format!("(N, {c})"),
            None => "a 2-D (N, D) tensor".into(),
        };
        return Err(shape_err(name, t, expected));
    }
    Ok(t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.to_vec2()?)
}

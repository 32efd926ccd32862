//! Models built from [`AdaptedLinear`] layers with Hugging Face weight names, so real
//! checkpoints load from a local folder and any linear layer can carry any adapter.
//!
//! - [`bert`]: BERT and RoBERTa encoders with a sequence-classification head.
//! - [`vit`]: the Vision Transformer with an image-classification head.
//! - [`llama`]: LLaMA, Mistral and Qwen2 causal language models.
//! - [`ops`]: fused CPU kernels with a backward (softmax, layer norm, exact GELU).
//! - [`attention`]: fused causal self-attention (grouped-query) with a backward.
//! - [`lm_ops`]: the LLaMA family's fused kernels (RMSNorm, RoPE, SwiGLU, cross-entropy).
//! - [`vmath`]: the vectorised `erf`/`exp` those kernels use.
//! - [`kit`]: the small layer kit of the DiffLoRA models (seeded init, dense layers, 3×3
//!   convolutions, learning-rate schedule, batch order, safetensors files with their config).
//!
//! The classifiers implement [`Classifier`]; the causal language models have their own
//! forward ([`llama::LlamaModel`]). Module paths always use the classification models'
//! names (`bert.encoder.layer.0.attention.self.query`, `vit.…`, `roberta.…`), whatever prefix the
//! checkpoint used.

pub mod attention;
pub mod bert;
pub mod composed;
pub mod encoder;
pub mod hub;
pub mod kit;
pub mod llama;
pub mod lm_ops;
pub mod ops;
pub mod unet;
pub mod vit;
pub mod vmath;
pub mod weights;

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::peft::{AdaptedLinear, linear::LinearLayers};

pub use hub::{LoadedModel, ModelSource, load_model};

/// What a model reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum InputKind {
    /// Images of this many channels, height and width.
    Image {
        /// Channels.
        channels: usize,
        /// Height.
        height: usize,
        /// Width.
        width: usize,
    },
    /// Token ids, at most this many per sequence.
    Text {
        /// Longest sequence the position table allows.
        max_positions: usize,
        /// The padding token's id.
        pad_id: u32,
    },
}

/// One batch of model inputs.
#[derive(Debug, Clone)]
pub enum Batch {
    /// Pixel values (B, C, H, W), f32, normalised.
    Images(Tensor),
    /// Token ids (B, T) u32 and attention mask (B, T) f32 (1 = token, 0 = padding).
    Tokens {
        /// Token ids.
        ids: Tensor,
        /// Attention mask.
        mask: Tensor,
    },
}

impl Batch {
    /// Number of examples.
    pub fn len(&self) -> usize {
        match self {
            Batch::Images(t) => t.dims()[0],
            Batch::Tokens { ids, .. } => ids.dims()[0],
        }
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Errors building or loading a model; each names the file, field or tensor.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// Reading the model description failed.
    #[error(transparent)]
    Arch(#[from] crate::arch::ArchError),
    /// A weight is missing or has the wrong shape.
    #[error("{file}: {problem}")]
    Weights {
        /// The weights file.
        file: String,
        /// What is wrong.
        problem: String,
    },
    /// A file could not be read.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// A classification head for fewer than two classes.
    #[error("a classifier needs at least 2 classes, got {0}")]
    TooFewClasses(usize),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// An adapter operation failed.
    #[error(transparent)]
    Peft(#[from] crate::peft::PeftError),
}

/// A classification model whose linear layers can carry adapters.
pub trait Classifier: LinearLayers + Send {
    /// Logits (B, num_labels); `train` enables adapter dropout.
    fn forward_t(&self, batch: &Batch, train: bool) -> candle_core::Result<Tensor>;
    /// What the model reads.
    fn input(&self) -> InputKind;
    /// Number of classes the head predicts.
    fn num_labels(&self) -> usize;
    /// The Hugging Face `config.json` describing the model.
    fn config_json(&self) -> serde_json::Value;
    /// A one-line description.
    fn summary(&self) -> String;
    /// The classification head's layers (trained fully, PEFT's `modules_to_save`).
    fn head(&self) -> Vec<&AdaptedLinear>;
    /// The head's layers, mutably.
    fn head_mut(&mut self) -> Vec<&mut AdaptedLinear>;
    /// Parameters outside linear layers (embeddings, layer norms, tokens), by HF name.
    fn other_params_mut(&mut self) -> Vec<(String, &mut Tensor)>;
    /// The same, read-only.
    fn other_params(&self) -> Vec<(String, Tensor)>;
}

/// `base` (a model's `config.json`) turned into a classification config: `architectures`,
/// `num_labels` and `id2label` set for `num_labels` classes.
pub fn classification_config(
    base: &serde_json::Value,
    architecture: &str,
    num_labels: usize,
) -> serde_json::Value {
    let mut c = base.clone();
    if let Some(o) = c.as_object_mut() {
        o.insert("num_labels".into(), num_labels.into());
        o.insert("architectures".into(), serde_json::json!([architecture]));
        let labels: serde_json::Map<String, serde_json::Value> = (0..num_labels)
            .map(|i| {
                (
                    i.to_string(),
                    serde_json::Value::String(format!("LABEL_{i}")),
                )
            })
            .collect();
        o.insert("id2label".into(), serde_json::Value::Object(labels));
        o.remove("label2id");
    }
    c
}

/// Every parameter of the model by Hugging Face name (merged weights), for saving a whole model.
pub fn named_tensors(model: &dyn Classifier) -> candle_core::Result<Vec<(String, Tensor)>> {
    let mut out = model.other_params();
    for l in model.linears().into_iter().chain(model.head()) {
        let w = l
            .effective_weight()
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        out.push((format!("{}.weight", l.path()), w));
        if let Some(b) = l.bias() {
            out.push((format!("{}.bias", l.path()), b.detach()));
        }
    }
    Ok(out)
}

/// Parameters of the pre-trained model (head included, adapters excluded).
pub fn parameter_count(model: &dyn Classifier) -> usize {
    let other: usize = model
        .other_params()
        .iter()
        .map(|(_, t)| t.elem_count())
        .sum();
    let lin: usize = model
        .linears()
        .into_iter()
        .chain(model.head())
        .map(|l| {
            let (m, n) = l.shape();
            m * n + l.bias().map_or(0, |b| b.elem_count())
        })
        .sum();
    other + lin
}

/// Makes the head trainable; returns its variables.
pub fn train_head(model: &mut dyn Classifier) -> Result<Vec<(String, Var)>, ModelError> {
    let mut vars = Vec::new();
    for l in model.head_mut() {
        vars.extend(l.make_trainable()?);
    }
    Ok(vars)
}

/// Makes every parameter trainable (full fine-tuning); returns all variables.
pub fn train_everything(model: &mut dyn Classifier) -> Result<Vec<(String, Var)>, ModelError> {
    let mut vars = train_head(model)?;
    for l in model.linears_mut() {
        vars.extend(l.make_trainable()?);
    }
    for (name, t) in model.other_params_mut() {
        let v = Var::from_tensor(&t.to_dtype(DType::F32)?)?;
        *t = v.as_tensor().clone();
        vars.push((name, v));
    }
    Ok(vars)
}

/// Builds `B×C×H×W` normalised pixels ((x/255 − 0.5)/0.5, as ViT's image processor) from bytes.
pub fn pixels_to_tensor(
    bytes: &[u8],
    n: usize,
    channels: usize,
    height: usize,
    width: usize,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let data: Vec<f32> = bytes.iter().map(|&b| b as f32 / 127.5 - 1.0).collect();
    Tensor::from_vec(data, (n, channels, height, width), device)
}

//! What a run trains, as the loop sees it: a classifier with its encoded splits, or a causal
//! language model with its tokenised instruction data ([`CausalLm`]). The loop asks for a
//! loss on a batch of training examples, an evaluation, and the trained parts saved.

use std::path::Path;

use candle_core::{Device, Tensor};

use super::batches::EncodedSplit;
use super::causal_lm::CausalLm;
use super::config::TrainConfig;
use super::saved::save_trained;
use super::store::EvalPoint;
use super::try_it::{TryItEvent, TryItRequest};
use crate::data::Dataset;
use crate::models::Classifier;

/// A classifier (BERT, RoBERTa, ViT) and its data.
pub struct Classification {
    /// The model with its adapter / trainable parts.
    pub model: Box<dyn Classifier>,
    /// The data.
    pub data: Dataset,
    /// Training split, encoded.
    pub train: EncodedSplit,
    /// Eval split, encoded.
    pub eval: EncodedSplit,
    /// Where the model computes.
    pub device: Device,
}

/// The model and data of a run.
pub enum Work {
    /// Sequence or image classification.
    Classify(Box<Classification>),
    /// Causal language modelling on instruction or plain-text data.
    CausalLm(Box<CausalLm>),
}

impl Work {
    /// Examples in the training split.
    pub fn train_len(&self) -> usize {
        match self {
            Work::Classify(c) => c.train.len(),
            Work::CausalLm(lm) => lm.train_len(),
        }
    }

    /// The mean loss over training examples `idx` (a scalar the trainable variables' gradients
    /// flow from), with dropout on.
    pub fn loss(&self, idx: &[usize]) -> anyhow::Result<Tensor> {
        match self {
            Work::Classify(c) => {
                let (batch, labels) = c.train.batch(idx, &c.device)?;
                let logits = c.model.forward_t(&batch, true)?;
                Ok(candle_nn::loss::cross_entropy(&logits, &labels)?)
            }
            Work::CausalLm(lm) => lm.train_loss(idx),
        }
    }

    /// Evaluates the model on the held-out split.
    pub fn evaluate(&self, batch_size: usize, step: usize) -> anyhow::Result<EvalPoint> {
        match self {
            Work::Classify(c) => {
                super::trainer::evaluate(c.model.as_ref(), &c.eval, batch_size, step, &c.device)
            }
            Work::CausalLm(lm) => lm.evaluate(batch_size, step),
        }
    }

    /// Saves what trained into the run folder `run_path`.
    pub fn save(&self, cfg: &TrainConfig, run_path: &Path) -> anyhow::Result<()> {
        match self {
            Work::Classify(c) => save_trained(cfg, c.model.as_ref(), run_path),
            Work::CausalLm(lm) => lm.save(cfg, run_path),
        }
    }

    /// Answers a Try-it prompt with the model as trained after `step` steps (language models
    /// only: a classifier's run says so).
    pub fn try_it(
        &mut self,
        req: &TryItRequest,
        step: usize,
        total_steps: usize,
        emit: &mut dyn FnMut(TryItEvent),
    ) {
        match self {
            Work::Classify(_) => emit(TryItEvent::Failed {
                id: req.id,
                error: "this run trains a classifier; Try it answers with language models".into(),
            }),
            Work::CausalLm(lm) => lm.try_it(req, step, total_steps, emit),
        }
    }

    /// Where the model computes.
    pub fn device(&self) -> Device {
        match self {
            Work::Classify(c) => c.device.clone(),
            Work::CausalLm(lm) => lm.model.device().clone(),
        }
    }

    /// A one-line description of the model.
    pub fn summary(&self) -> String {
        match self {
            Work::Classify(c) => c.model.summary(),
            Work::CausalLm(lm) => lm.summary(),
        }
    }
}

//! A causal language model as a training run's work: the model, its tokenised instruction (or
//! plain-text) splits, and the held-out questions whose generated answers are scored.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Device;

use super::config::{TrainConfig, TrainMode};
use super::layout::{MODEL_CONFIG_FILE, MODEL_WEIGHTS_FILE, RunLayout};
use super::lm_batches::{LmExample, lm_batch, lm_eval_sums, lm_loss};
use super::store::EvalPoint;
use crate::fsio;
use crate::models::ModelSource;
use crate::models::llama::LlamaModel;
use crate::peft::linear::LinearLayers;
use crate::peft::save_adapter;

/// A held-out question and the answer the task expects (scored by exact match).
#[derive(Debug, Clone)]
pub struct GenerationCase {
    /// The rendered prompt's token ids (ending where the assistant's answer starts).
    pub prompt: Vec<u32>,
    /// The expected answer.
    pub reference: String,
}

/// Writes and scores the model's answers to held-out questions (greedy, as the task's metric
/// needs); returns the share answered exactly.
pub type AnswerScorer = dyn Fn(&LlamaModel, &[GenerationCase]) -> anyhow::Result<f64> + Send + Sync;

/// A causal language model and its data.
pub struct CausalLm {
    /// The model with its adapter or trainable weights.
    pub model: LlamaModel,
    /// The model's `config.json` (written beside fully fine-tuned weights).
    pub config_json: serde_json::Value,
    /// Training examples.
    pub train: Vec<LmExample>,
    /// Held-out examples (loss and perplexity).
    pub eval: Vec<LmExample>,
    /// Held-out questions scored by generation (empty: next-token accuracy is the metric).
    pub questions: Vec<GenerationCase>,
    /// Scores generated answers.
    pub scorer: Option<Box<AnswerScorer>>,
    /// The padding id.
    pub pad_id: u32,
    /// A one-line description of the model.
    pub description: String,
}

impl CausalLm {
    /// Training examples.
    pub fn train_len(&self) -> usize {
        self.train.len()
    }

    /// Mean next-token loss over the trained tokens of training examples `idx`.
    pub fn train_loss(&self, idx: &[usize]) -> anyhow::Result<candle_core::Tensor> {
        let examples: Vec<&LmExample> = idx.iter().map(|&i| &self.train[i]).collect();
        let batch = lm_batch(&examples, self.pad_id, &Device::Cpu)?.ok_or_else(|| {
            anyhow::anyhow!(
                "a batch of training examples ({idx:?}) has no trained token: every example needs an answer to learn"
            )
        })?;
        Ok(lm_loss(&self.model, &batch, true)?)
    }

    /// Held-out loss (mean over trained tokens), perplexity, and the task metric: the exact
    /// match rate of generated answers where there are questions, else next-token accuracy.
    pub fn evaluate(&self, batch_size: usize, step: usize) -> anyhow::Result<EvalPoint> {
        let (mut loss_sum, mut correct, mut tokens) = (0.0f64, 0usize, 0usize);
        let refs: Vec<&LmExample> = self.eval.iter().collect();
        for chunk in refs.chunks(batch_size.max(1)) {
            if let Some(batch) = lm_batch(chunk, self.pad_id, &Device::Cpu)? {
                let (l, c) = lm_eval_sums(&self.model, &batch)?;
                loss_sum += l;
                correct += c;
                tokens += batch.count;
            }
        }
        anyhow::ensure!(
            tokens > 0,
            "the held-out split has no trained token to evaluate"
        );
        let loss = loss_sum / tokens as f64;
        let accuracy = match (&self.scorer, self.questions.is_empty()) {
            (Some(score), false) => score(&self.model, &self.questions)?,
            _ => correct as f64 / tokens as f64,
        };
        Ok(EvalPoint {
            step,
            loss,
            accuracy,
            perplexity: Some(loss.exp()),
        })
    }

    /// Saves what trained: the adapter (`adapter/`, PEFT's format) or the whole model
    /// (`model/`, a Hugging Face folder).
    pub fn save(&self, cfg: &TrainConfig, run_path: &Path) -> anyhow::Result<()> {
        let layout = RunLayout::new(run_path);
        match cfg.mode {
            TrainMode::Adapter => save_adapter(&self.model, &cfg.adapter, &layout.adapter())?,
            TrainMode::Full => {
                let dir = layout.model();
                fsio::create_dir_all(&dir)?;
                let tensors = self.named_tensors()?;
                fsio::write_safetensors(&dir.join(MODEL_WEIGHTS_FILE), &tensors, HashMap::new())?;
                fsio::write_atomic(
                    &dir.join(MODEL_CONFIG_FILE),
                    serde_json::to_string_pretty(&self.config_json)?.as_bytes(),
                )?;
            }
            TrainMode::Head => {
                anyhow::bail!("head-only training is for classifiers, not language models")
            }
        }
        Ok(())
    }

    /// Every weight by Hugging Face name (adapters merged; a tied `lm_head` stored once, as
    /// the embedding).
    pub fn named_tensors(&self) -> anyhow::Result<Vec<(String, candle_core::Tensor)>> {
        let mut out: Vec<(String, candle_core::Tensor)> = self
            .model
            .other_params()
            .into_iter()
            .map(|(n, t)| (n, t.detach()))
            .collect();
        let head = (!self.model.config().tie_word_embeddings).then(|| self.model.lm_head());
        for l in self.model.linears().into_iter().chain(head) {
            out.push((format!("{}.weight", l.path()), l.effective_weight()?));
            if let Some(b) = l.bias() {
                out.push((format!("{}.bias", l.path()), b.detach()));
            }
        }
        Ok(out)
    }

    /// A one-line description.
    pub fn summary(&self) -> String {
        self.description.clone()
    }
}

/// Whether `source` is a causal language model (LLaMA, Mistral, Qwen2; a GGUF file), read
/// from its `config.json` without loading weights.
pub fn is_language_model(source: &ModelSource) -> anyhow::Result<bool> {
    let config = match source {
        ModelSource::Builtin { name } => return Ok(name == "smollm2-135m-instruct"),
        ModelSource::Gguf { .. } => return Ok(true),
        ModelSource::Folder { path } => {
            if path.is_file() {
                return Ok(path.extension().is_some_and(|e| e == "gguf"));
            }
            path.join("config.json")
        }
        ModelSource::Config { path } => path.clone(),
    };
    let Ok(text) = std::fs::read_to_string(&config) else {
        // The classifier's loader reports the missing file.
        return Ok(false);
    };
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}: not valid JSON: {e}", config.display()))?;
    Ok(matches!(
        v.get("model_type").and_then(serde_json::Value::as_str),
        Some("llama" | "mistral" | "qwen2")
    ))
}

/// Loads the language model and its data for `cfg` and makes the configured parts trainable.
pub fn prepare(cfg: &TrainConfig) -> anyhow::Result<super::trainer::Prepared> {
    anyhow::bail!(
        "{}: training a causal language model is not wired to the trainer yet",
        cfg.model.source.display_name()
    )
}

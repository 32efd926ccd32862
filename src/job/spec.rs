//! `job.json`: what the job's `train.py` reads, resolved from a [`TrainConfig`] (paths made
//! absolute, `epochs` turned into steps, the model named as transformers loads it).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::models::ModelSource;
use crate::peft::AdapterConfig;
use crate::train::config::GenerationEval;
use crate::train::{Schedule, TrainConfig, TrainMode};

/// The version of the `job.json` layout this build writes.
pub const JOB_FORMAT: u32 = 1;

/// What the job trains on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobTask {
    /// Text classification (BERT, RoBERTa): `AutoModelForSequenceClassification`.
    Classification,
    /// Instruction tuning or continued pre-training: `AutoModelForCausalLM`, the loss on the
    /// assistant's tokens only.
    CausalLm,
}

/// The model as transformers loads it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobModel {
    /// A local folder (absolute) or a hub id; for a GGUF file, its folder.
    pub path: String,
    /// The GGUF file inside `path` (transformers' `gguf_file`), when the model is one.
    pub gguf_file: Option<String>,
    /// Tokens per sequence after truncation.
    pub max_length: usize,
}

/// The data files inside the job folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobData {
    /// The training split, relative to the job folder.
    pub train: String,
    /// The held-out split, relative to the job folder.
    pub eval: String,
    /// Examples in `train`.
    pub train_examples: usize,
    /// Examples in `eval`.
    pub eval_examples: usize,
    /// Where peft-studio read them from.
    pub source: String,
}

/// Optimisation, as peft-studio runs it (steps resolved).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobOptim {
    /// Peak learning rate.
    pub lr: f64,
    /// The head's learning rate.
    pub head_lr: Option<f64>,
    /// AdamW weight decay of weights, LoRA factors and the head.
    pub weight_decay: f64,
    /// Weight decay of SVFit/LoLDU's z.
    pub diagonal_weight_decay: f64,
    /// Linear warm-up steps.
    pub warmup_steps: usize,
    /// Decay after the warm-up.
    pub schedule: Schedule,
    /// Gradient-norm clipping.
    pub max_grad_norm: Option<f64>,
    /// Micro-batches per optimiser step.
    pub grad_accum: usize,
    /// Examples per optimiser step (the global batch, split over the processes).
    pub batch_size: usize,
    /// Optimiser steps.
    pub steps: usize,
    /// Evaluate every this many steps and at the end.
    pub eval_every: usize,
    /// Examples per evaluation batch (global).
    pub eval_batch_size: usize,
    /// Seed.
    pub seed: u64,
}

/// `job.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    /// [`JOB_FORMAT`].
    pub format: u32,
    /// The run's display name.
    pub name: String,
    /// `lora`, `svfit`, `loldu`, `full` or `head`.
    pub method: String,
    /// The adapter's rank (adapter runs).
    pub rank: Option<usize>,
    /// What trains.
    pub mode: TrainMode,
    /// Classification or causal LM.
    pub task: JobTask,
    /// The model.
    pub model: JobModel,
    /// Class names by label (classification).
    pub classes: Vec<String>,
    /// The data files.
    pub data: JobData,
    /// The adapter, exactly as peft-studio's config holds it.
    pub adapter: AdapterConfig,
    /// Optimisation.
    pub optim: JobOptim,
    /// Language models: held-out questions answered greedily and scored by exact match.
    pub generation: GenerationEval,
    /// The peft-studio version that wrote the job.
    pub peft_studio_version: String,
}

/// How transformers should load `source` (a folder or hub id given by the user wins).
pub fn job_model(
    source: &ModelSource,
    over: Option<&str>,
) -> anyhow::Result<(String, Option<String>)> {
    if let Some(m) = over {
        return Ok(split_gguf(Path::new(m)).unwrap_or_else(|| (absolute(Path::new(m)), None)));
    }
    let path: PathBuf = match source {
        ModelSource::Folder { path } | ModelSource::Gguf { path } => path.clone(),
        ModelSource::Builtin { .. } => crate::train::causal_lm::model_path(source).map_err(|e| {
            anyhow::anyhow!(
                "{e}\n(the job loads the model with transformers: give --model with a Hugging Face folder or hub id)"
            )
        })?,
        ModelSource::Config { path } => anyhow::bail!(
            "{}: a model from a config alone (random weights) cannot be handed to transformers; give --model",
            path.display()
        ),
    };
    Ok(split_gguf(&path).unwrap_or_else(|| (absolute(&path), None)))
}

/// `(folder, file)` when `path` is a `.gguf` file.
fn split_gguf(path: &Path) -> Option<(String, Option<String>)> {
    if path.extension().is_some_and(|e| e == "gguf") {
        let file = path.file_name()?.to_string_lossy().into_owned();
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        return Some((absolute(dir), Some(file)));
    }
    None
}

/// An existing local path made absolute; anything else (a hub id) as given.
fn absolute(p: &Path) -> String {
    match p.canonicalize() {
        Ok(abs) => abs.display().to_string(),
        Err(_) => p.display().to_string(),
    }
}

impl JobSpec {
    /// The spec of `cfg` with its data already converted (`data`, `classes`) and `steps`
    /// resolved.
    pub fn new(
        cfg: &TrainConfig,
        task: JobTask,
        model: JobModel,
        classes: Vec<String>,
        data: JobData,
        steps: usize,
    ) -> Self {
        let o = &cfg.optim;
        Self {
            format: JOB_FORMAT,
            name: cfg.label(),
            method: cfg.method_name(),
            rank: (cfg.mode == TrainMode::Adapter).then_some(cfg.adapter.rank),
            mode: cfg.mode,
            task,
            model,
            classes,
            data,
            adapter: cfg.adapter.clone(),
            optim: JobOptim {
                lr: o.lr,
                head_lr: o.head_lr,
                weight_decay: o.weight_decay,
                diagonal_weight_decay: o.diagonal_weight_decay,
                warmup_steps: o.warmup_steps,
                schedule: o.schedule,
                max_grad_norm: o.max_grad_norm,
                grad_accum: o.grad_accum,
                batch_size: o.batch_size,
                steps,
                eval_every: o.eval_every,
                eval_batch_size: o.eval_batch_size,
                seed: o.seed,
            },
            generation: cfg.generation.clone(),
            peft_studio_version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }
}

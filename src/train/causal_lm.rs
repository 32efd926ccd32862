//! A causal language model as a training run's work: the model, its tokenised instruction (or
//! plain-text) splits, and the held-out questions whose generated answers are scored.

use std::path::{Path, PathBuf};

use candle_core::{Device, Var};

use super::config::{TrainConfig, TrainMode};
use super::layout::{MODEL_WEIGHTS_FILE, RunLayout};
use super::limits;
use super::lm_batches::{LmExample, lm_batch, lm_eval_sums, lm_loss};
use super::store::EvalPoint;
use super::trainer::Prepared;
use super::try_it::{Answerer, Side, TryItEvent, TryItRequest, report_failure};
use super::work::Work;
use crate::data::{
    ChatTemplate, DataSource, InstructEncoder, TokenizedExample, exact_match_rate,
    read_instruct_file, split,
};
use crate::fsio;
use crate::models::ModelSource;
use crate::models::llama::LlamaModel;
use crate::models::llama::generate::{GenerateOptions, Sampling, generate_tokens};
use crate::models::llama::language_model::{
    LanguageModel, SMOLLM2_NAME, load_language_model_with, smollm2_fetch_hint, smollm2_path,
};
use crate::models::llama::tokenizer::LlmTokenizer;
use crate::peft::linear::{LinearLayers, attach_adapters, trainable_vars};
use crate::peft::{Method, save_adapter};

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
    /// The Hugging Face folder the model was loaded from (its config and tokenizer go beside
    /// fully fine-tuned weights); `None` for a GGUF file.
    pub base_folder: Option<PathBuf>,
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
    /// The tokenizer (Try it renders and decodes with it).
    pub tokenizer: LlmTokenizer,
    /// The chat template (`None`: prompts are continued as plain text).
    pub template: Option<ChatTemplate>,
    /// Whether the whole model trains (no adapter to switch off for the base answer).
    pub full: bool,
}

impl CausalLm {
    /// Training examples.
    pub fn train_len(&self) -> usize {
        self.train.len()
    }

    /// Mean next-token loss over the trained tokens of training examples `idx`.
    pub fn train_loss(&self, idx: &[usize]) -> anyhow::Result<candle_core::Tensor> {
        let examples: Vec<&LmExample> = idx.iter().map(|&i| &self.train[i]).collect();
        let batch = lm_batch(&examples, self.pad_id, self.model.device())?.ok_or_else(|| {
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
            if let Some(batch) = lm_batch(chunk, self.pad_id, self.model.device())? {
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
                crate::export::merged::write_merged_llama(
                    &self.model,
                    self.base_folder.as_deref(),
                    &dir,
                )?;
            }
            TrainMode::Head => {
                anyhow::bail!("head-only training is for classifiers, not language models")
            }
        }
        Ok(())
    }

    /// A one-line description.
    pub fn summary(&self) -> String {
        self.description.clone()
    }

    /// Answers a Try-it prompt between steps: the base model (the adapter switched off) and
    /// the model as trained after `step` of `total_steps` steps.
    pub fn try_it(
        &mut self,
        req: &TryItRequest,
        step: usize,
        total_steps: usize,
        emit: &mut dyn FnMut(TryItEvent),
    ) {
        let mut answerer = Answerer {
            model: &mut self.model,
            tokenizer: &self.tokenizer,
            template: self.template.as_ref(),
        };
        let full = self.full;
        report_failure(req.id, emit, |emit| {
            if full {
                emit(TryItEvent::Unavailable {
                    id: req.id,
                    side: Side::Base,
                    reason: "full fine-tuning changes the base weights themselves: the base model's answer appears once the run ends".into(),
                });
            } else {
                answerer.answer(req, Side::Base, "base model (adapter off)", emit)?;
            }
            let label = format!("fine-tuned so far: step {step} of {total_steps}");
            answerer.answer(req, Side::Tuned, &label, emit)
        });
    }
}

/// Whether `source` is a causal language model (LLaMA, Mistral, Qwen2; a GGUF file), read
/// from its `config.json` without loading weights.
pub fn is_language_model(source: &ModelSource) -> anyhow::Result<bool> {
    let config = match source {
        ModelSource::Builtin { name } => return Ok(name == SMOLLM2_NAME),
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

/// The file or folder a language-model source names (the built-in SmolLM2 once fetched).
pub fn model_path(source: &ModelSource) -> anyhow::Result<PathBuf> {
    match source {
        ModelSource::Builtin { name } if name == SMOLLM2_NAME => {
            smollm2_path().ok_or_else(|| anyhow::anyhow!("{}", smollm2_fetch_hint()))
        }
        ModelSource::Builtin { name } => anyhow::bail!("`{name}` is not a built-in language model"),
        ModelSource::Folder { path } | ModelSource::Gguf { path } => Ok(path.clone()),
        ModelSource::Config { path } => anyhow::bail!(
            "{}: a language model needs its weights (a model folder or a GGUF file), not a config alone",
            path.display()
        ),
    }
}

/// The chat template of a loaded model, compiled (`None` for a base model without one).
pub fn chat_template(
    tokenizer: &LlmTokenizer,
    origin: &Path,
) -> anyhow::Result<Option<ChatTemplate>> {
    let Some(source) = &tokenizer.chat_template else {
        return Ok(None);
    };
    Ok(Some(ChatTemplate::new(
        source.clone(),
        origin.display().to_string(),
        tokenizer.bos_token(),
        tokenizer.eos_token(),
    )?))
}

/// The instruction data's files: (training file, held-out file if any).
fn data_files(cfg: &TrainConfig) -> anyhow::Result<(PathBuf, Option<PathBuf>)> {
    match &cfg.data.source {
        DataSource::Instruct { path, eval_path } => Ok((path.clone(), eval_path.clone())),
        other => anyhow::bail!(
            "{}: a language model trains on instruction or plain-text data (data kind \"instruct\": JSON or JSONL with messages, conversations, instruction/output or text)",
            other.describe()
        ),
    }
}

/// Keeps at most `max` of `v` (a seeded subset, in order).
fn capped<T: Clone>(v: Vec<T>, max: Option<usize>, seed: u64, stream: u64) -> Vec<T> {
    let keep = split::cap(v.len(), max, seed, stream);
    if keep.len() == v.len() {
        return v;
    }
    keep.into_iter().map(|i| v[i].clone()).collect()
}

fn to_example(e: &TokenizedExample) -> LmExample {
    LmExample {
        ids: e.ids.clone(),
        loss_mask: e.loss_mask.clone(),
    }
}

/// Scores greedy answers by exact match (trimmed, case- and end-punctuation-insensitive).
fn exact_match_scorer(tokenizer: LlmTokenizer, max_new_tokens: usize) -> Box<AnswerScorer> {
    Box::new(move |model: &LlamaModel, cases: &[GenerationCase]| {
        let opts = GenerateOptions {
            max_new_tokens,
            sampling: Sampling::default(),
            stop_ids: tokenizer.stop_ids.clone(),
        };
        let mut answers = Vec::with_capacity(cases.len());
        for c in cases {
            let out = generate_tokens(model, &c.prompt, &opts, &mut |_| true)?;
            answers.push(tokenizer.decode(&out.tokens)?);
        }
        Ok(exact_match_rate(
            answers
                .iter()
                .zip(cases)
                .map(|(a, c)| (a.as_str(), c.reference.as_str())),
        ))
    })
}

/// Loads the language model onto `device` with its data for `cfg` and makes the configured
/// parts trainable.
pub fn prepare(cfg: &TrainConfig, device: &Device) -> anyhow::Result<Prepared> {
    let (train_path, eval_path) = data_files(cfg)?;
    let path = model_path(&cfg.model.source)?;
    let packed = cfg.model.packed_base && cfg.mode == TrainMode::Adapter && path.is_file();
    let LanguageModel {
        mut model,
        tokenizer,
        ..
    } = load_language_model_with(&path, packed, device)?;
    let template = chat_template(&tokenizer, &path)?;
    let encoder = InstructEncoder::new(
        &tokenizer.tokenizer,
        template.as_ref(),
        cfg.model.max_length,
    )?;
    let train_set = encoder.encode_file(&read_instruct_file(&train_path)?)?;
    let mut notes = train_set.report.notes.clone();
    notes.push(format!(
        "{}: {} examples, {} tokens ({} trained), {} truncated at {} tokens",
        train_path.display(),
        train_set.report.examples,
        train_set.report.tokens,
        train_set.report.trained_tokens,
        train_set.report.truncated,
        cfg.model.max_length
    ));
    let d = &cfg.data;
    let (train, eval) = match &eval_path {
        Some(p) => {
            let set = encoder.encode_file(&read_instruct_file(p)?)?;
            notes.extend(set.report.notes.iter().cloned());
            (train_set.examples, set.examples)
        }
        None => {
            let all = train_set.examples;
            let (t, e) = split::random_split(
                all.len(),
                d.eval_fraction,
                d.split_seed,
                &train_path.display().to_string(),
            )?;
            (
                t.iter().map(|&i| all[i].clone()).collect(),
                e.iter().map(|&i| all[i].clone()).collect(),
            )
        }
    };
    let train = capped(train, d.max_train, d.split_seed, split::STREAM_CAP_TRAIN);
    let eval = capped(eval, d.max_eval, d.split_seed, split::STREAM_CAP_EVAL);
    anyhow::ensure!(
        !train.is_empty() && !eval.is_empty(),
        "{}: {} training and {} held-out examples with a trained token: both need at least one",
        train_path.display(),
        train.len(),
        eval.len()
    );
    limits::check_batch(cfg, train.len(), &train_path.display().to_string())
        .map_err(anyhow::Error::msg)?;
    let mut questions = Vec::new();
    if template.is_some() {
        for e in eval.iter().take(cfg.generation.questions) {
            if let Some(reference) = &e.reference {
                questions.push(GenerationCase {
                    prompt: encoder.encode_prompt(&e.prompt_messages)?,
                    reference: reference.clone(),
                });
            }
        }
    }
    let base_total = model.parameter_count();
    let wd = cfg.optim.weight_decay;
    let mut groups = Vec::new();
    let mut adapter_trainable = 0;
    match cfg.mode {
        TrainMode::Adapter => {
            let report = attach_adapters(&mut model, &cfg.adapter)?;
            adapter_trainable = report.trainable();
            let decay = match cfg.adapter.method {
                Method::Lora => wd,
                Method::Svfit | Method::Loldu => cfg.optim.diagonal_weight_decay,
            };
            let vars: Vec<Var> = trainable_vars(&model).into_iter().map(|(_, v)| v).collect();
            groups.push((vars, decay, 1.0));
            notes.extend(super::trainer::store_frozen_base(cfg, device, &mut model)?);
        }
        TrainMode::Full => {
            let all = model.train_everything()?;
            // As Hugging Face's Trainer: no decay on biases and norms.
            let (no_decay, decay): (Vec<_>, Vec<_>) = all
                .into_iter()
                .partition(|(n, v)| n.ends_with(".bias") || n.contains("norm") || v.rank() == 1);
            groups.push((decay.into_iter().map(|(_, v)| v).collect(), wd, 1.0));
            groups.push((no_decay.into_iter().map(|(_, v)| v).collect(), 0.0, 1.0));
        }
        TrainMode::Head => anyhow::bail!(
            "mode \"head\" trains a classifier's head; a language model trains with an adapter or fully"
        ),
    }
    let packed_layers: Vec<_> = model
        .linears()
        .into_iter()
        .filter_map(|l| l.packed_weight().map(|p| (p.size_in_bytes(), l.shape())))
        .collect();
    if !packed_layers.is_empty() {
        let bytes: usize = packed_layers.iter().map(|p| p.0).sum();
        let f32_bytes: usize = packed_layers.iter().map(|p| p.1.0 * p.1.1 * 4).sum();
        notes.push(format!(
            "frozen base kept as stored (model.packed_base, after the adapter's init): {} linear weights in {:.0} MiB instead of {:.0} MiB as f32",
            packed_layers.len(),
            crate::memory::mib(bytes as u64),
            crate::memory::mib(f32_bytes as u64)
        ));
    }
    let trainable = groups
        .iter()
        .flat_map(|g| g.0.iter())
        .map(|v| v.elem_count())
        .sum();
    let c = model.config();
    let description = format!(
        "{}: {} layers, hidden {}, {} heads ({} key/value), vocabulary {} — {} parameters",
        c.family.model_type(),
        c.num_hidden_layers,
        c.hidden_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.vocab_size,
        crate::inspect::thousands(base_total)
    );
    let pad_id = tokenizer.eos.unwrap_or(0);
    let scorer = (!questions.is_empty())
        .then(|| exact_match_scorer(tokenizer.clone(), cfg.generation.max_new_tokens));
    Ok(Prepared {
        work: Work::CausalLm(Box::new(CausalLm {
            model,
            base_folder: path.is_dir().then(|| path.clone()),
            train: train.iter().map(to_example).collect(),
            eval: eval.iter().map(to_example).collect(),
            questions,
            scorer,
            pad_id,
            description,
            tokenizer,
            template,
            full: cfg.mode == TrainMode::Full,
        })),
        groups,
        trainable,
        total: base_total + adapter_trainable,
        initialised: Vec::new(),
        notes,
    })
}

/// What a trained run (or an adapter folder) changes in a base language model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trained {
    /// An adapter folder (peft-studio's or PEFT's format).
    Adapter(PathBuf),
    /// A fully fine-tuned model folder (`config.json`, `model.safetensors`).
    Weights(PathBuf),
}

/// Finds what `path` holds: a run folder (its `adapter/` or `model/`), an adapter folder
/// (`adapter_config.json`), or a model folder.
pub fn trained_at(path: &Path) -> anyhow::Result<Trained> {
    let layout = RunLayout::new(path);
    let adapter = layout.adapter();
    if adapter.join("adapter_config.json").is_file() {
        return Ok(Trained::Adapter(adapter));
    }
    if path.join("adapter_config.json").is_file() {
        return Ok(Trained::Adapter(path.to_path_buf()));
    }
    let model = layout.model();
    if model.join(MODEL_WEIGHTS_FILE).is_file() {
        return Ok(Trained::Weights(model));
    }
    if path.join(MODEL_WEIGHTS_FILE).is_file() {
        return Ok(Trained::Weights(path.to_path_buf()));
    }
    anyhow::bail!(
        "{}: neither a finished run (adapter/ or model/), an adapter folder (adapter_config.json) nor a model folder (model.safetensors)",
        path.display()
    )
}

/// Applies `trained` to a loaded base model: attaches the adapter, or replaces the weights
/// with the fine-tuned ones (checked against the base's shape).
pub fn apply_trained(lm: &mut LanguageModel, trained: &Trained) -> anyhow::Result<()> {
    match trained {
        Trained::Adapter(dir) => {
            crate::peft::load_adapter(&mut lm.model, dir)?;
        }
        Trained::Weights(dir) => {
            let tuned = crate::models::llama::load_folder(dir, lm.model.device())?;
            anyhow::ensure!(
                tuned.config() == lm.model.config(),
                "{}: the fine-tuned model's config does not match the base model's",
                dir.display()
            );
            lm.model = tuned;
        }
    }
    Ok(())
}

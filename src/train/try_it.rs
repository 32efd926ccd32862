//! "Try it": one prompt answered by the base model and by the fine-tuned one, side by side,
//! streamed as [`TryItEvent`]s.
//!
//! During a run the trainer answers between steps with the model it is training (the base
//! answer with the adapter switched off, as PEFT's `disable_adapter` does); afterwards the
//! worker loads the finished run ([`TryItSession`]) and keeps it for the next prompt. Neither
//! runs on the UI thread.

use std::path::{Path, PathBuf};

use super::causal_lm::{Trained, apply_trained, chat_template, model_path, trained_at};
use super::config::TrainConfig;
use super::layout::RunLayout;
use crate::data::{ChatTemplate, Message};
use crate::device::DeviceChoice;
use crate::models::ModelSource;
use crate::models::llama::LlamaModel;
use crate::models::llama::generate::{GenerateOptions, StopReason, generate_text};
use crate::models::llama::language_model::{LanguageModel, load_language_model};
use crate::models::llama::tokenizer::LlmTokenizer;
use crate::peft::linear::LinearLayers;

/// The most new tokens one answer may take (a prompt box is for quick looks).
pub const MAX_NEW_TOKENS: usize = 512;

/// What to answer with when no run is training.
#[derive(Debug, Clone, PartialEq)]
pub enum TryItTarget {
    /// The base model alone (nothing fine-tuned yet).
    Model(ModelSource),
    /// A run folder: its base model and what it trained.
    Run(PathBuf),
}

/// A prompt to answer.
#[derive(Debug, Clone, PartialEq)]
pub struct TryItRequest {
    /// Chosen by the asker; every event about this request carries it.
    pub id: u64,
    /// The user's message (rendered with the model's chat template when it has one).
    pub prompt: String,
    /// Most new tokens per answer (greedy decoding, stopping at the end token).
    pub max_new_tokens: usize,
    /// Used when no run is in progress (a run in progress answers with itself).
    pub target: TryItTarget,
    /// Where a model loaded for the answer computes (a run in progress answers on its own).
    pub device: DeviceChoice,
}

/// Which model answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The model before fine-tuning.
    Base,
    /// The fine-tuned model (mid-run: as trained so far).
    Tuned,
}

/// What a Try-it request reports.
#[derive(Debug, Clone, PartialEq)]
pub enum TryItEvent {
    /// A side starts answering; `label` says which model (e.g. "fine-tuned, step 20 of 40").
    Started {
        /// Request id.
        id: u64,
        /// Which model.
        side: Side,
        /// Which model, in words.
        label: String,
    },
    /// A piece of an answer.
    Text {
        /// Request id.
        id: u64,
        /// Which model.
        side: Side,
        /// The text that formed since the last piece.
        piece: String,
    },
    /// A side finished.
    Done {
        /// Request id.
        id: u64,
        /// Which model.
        side: Side,
        /// New tokens.
        tokens: usize,
        /// New tokens per second.
        tokens_per_s: f64,
        /// Why it ended, in words.
        stop: String,
    },
    /// A side cannot answer (e.g. nothing is fine-tuned yet).
    Unavailable {
        /// Request id.
        id: u64,
        /// Which model.
        side: Side,
        /// Why, in words.
        reason: String,
    },
    /// The request failed (the model could not load, the prompt is too long, …).
    Failed {
        /// Request id.
        id: u64,
        /// What went wrong.
        error: String,
    },
}

impl TryItEvent {
    /// The request the event is about.
    pub fn id(&self) -> u64 {
        match self {
            Self::Started { id, .. }
            | Self::Text { id, .. }
            | Self::Done { id, .. }
            | Self::Unavailable { id, .. }
            | Self::Failed { id, .. } => *id,
        }
    }
}

/// A loaded model with what it needs to answer a chat prompt.
pub struct Answerer<'a> {
    /// The model (its adapter, if any, is switched off for the base answer).
    pub model: &'a mut LlamaModel,
    /// Its tokenizer.
    pub tokenizer: &'a LlmTokenizer,
    /// Its chat template (`None`: the prompt is continued as plain text).
    pub template: Option<&'a ChatTemplate>,
}

impl Answerer<'_> {
    /// The prompt's token ids: the chat template's rendering of one user turn, or the text.
    fn prompt_ids(&self, prompt: &str) -> anyhow::Result<Vec<u32>> {
        Ok(match self.template {
            Some(t) => {
                let text = t.render(&[Message::new("user", prompt)], true)?;
                self.tokenizer.encode(&text, false)?
            }
            None => self.tokenizer.encode(prompt, true)?,
        })
    }

    /// Answers `req` as `side` (greedy), streaming through `emit`. The base side switches the
    /// adapter off for the answer and back on after, even when generation fails.
    pub fn answer(
        &mut self,
        req: &TryItRequest,
        side: Side,
        label: &str,
        emit: &mut dyn FnMut(TryItEvent),
    ) -> anyhow::Result<()> {
        let ids = self.prompt_ids(&req.prompt)?;
        let opts = GenerateOptions {
            max_new_tokens: req.max_new_tokens.clamp(1, MAX_NEW_TOKENS),
            stop_ids: self.tokenizer.stop_ids.clone(),
            ..GenerateOptions::default()
        };
        let switch_off = side == Side::Base;
        if switch_off {
            set_adapters_disabled(self.model, true)?;
        }
        emit(TryItEvent::Started {
            id: req.id,
            side,
            label: label.to_string(),
        });
        let id = req.id;
        let result = generate_text(self.model, self.tokenizer, &ids, &opts, &mut |piece| {
            emit(TryItEvent::Text {
                id,
                side,
                piece: piece.to_string(),
            });
            true
        });
        if switch_off {
            set_adapters_disabled(self.model, false)?;
        }
        let g = result?;
        emit(TryItEvent::Done {
            id,
            side,
            tokens: g.timings.new_tokens,
            tokens_per_s: g.timings.decode_tokens_per_s(),
            stop: match g.stop {
                StopReason::StopToken(_) => "end of answer".into(),
                StopReason::MaxTokens => format!("stopped at {} tokens", opts.max_new_tokens),
                StopReason::ContextFull => "context full".into(),
                StopReason::Cancelled => "cancelled".into(),
            },
        });
        Ok(())
    }
}

/// Switches every adapter of `model` off (PEFT's `disable_adapter`) or back on.
fn set_adapters_disabled(model: &mut LlamaModel, disabled: bool) -> anyhow::Result<()> {
    for l in model.linears_mut() {
        if l.adapter().is_some() {
            l.set_disabled(disabled)?;
        }
    }
    Ok(())
}

/// Whether any linear layer of `model` carries an adapter.
pub fn has_adapter(model: &LlamaModel) -> bool {
    model.linears().iter().any(|l| l.adapter().is_some())
}

/// Runs `f` with `emit`, turning its error into [`TryItEvent::Failed`].
pub fn report_failure(
    id: u64,
    emit: &mut dyn FnMut(TryItEvent),
    f: impl FnOnce(&mut dyn FnMut(TryItEvent)) -> anyhow::Result<()>,
) {
    if let Err(e) = f(emit) {
        emit(TryItEvent::Failed {
            id,
            error: format!("{e:#}"),
        });
    }
}

/// A model loaded for answering outside a run: what a target names, kept for the next
/// prompt with the same target.
struct Loaded {
    target: TryItTarget,
    device: DeviceChoice,
    tuned: Option<(LanguageModel, String)>,
    /// The base model when it is not the tuned one with its adapter off (full fine-tuning,
    /// or no run).
    base: Option<LanguageModel>,
    template: Option<ChatTemplate>,
}

/// Answers Try-it requests when no run is in progress, keeping the last model loaded.
#[derive(Default)]
pub struct TryItSession {
    loaded: Option<Loaded>,
}

impl TryItSession {
    /// A session with nothing loaded.
    pub fn new() -> Self {
        Self::default()
    }

    /// Lets go of the loaded model (before a run needs the memory).
    pub fn unload(&mut self) {
        self.loaded = None;
    }

    /// Answers `req` with its target: the base model's answer, then the fine-tuned one's.
    pub fn serve(&mut self, req: &TryItRequest, emit: &mut dyn FnMut(TryItEvent)) {
        report_failure(req.id, emit, |emit| {
            if self
                .loaded
                .as_ref()
                .is_none_or(|l| l.target != req.target || l.device != req.device)
            {
                // The old model goes before the new one loads: never two in memory.
                self.loaded = None;
                self.loaded = Some(load_target(&req.target, req.device)?);
            }
            let Some(l) = self.loaded.as_mut() else {
                anyhow::bail!("no model is loaded");
            };
            let template = l.template.as_ref();
            match (&mut l.base, &mut l.tuned) {
                (Some(base), _) => Answerer {
                    model: &mut base.model,
                    tokenizer: &base.tokenizer,
                    template,
                }
                .answer(req, Side::Base, "base model", emit)?,
                (None, Some((tuned, _))) => Answerer {
                    model: &mut tuned.model,
                    tokenizer: &tuned.tokenizer,
                    template,
                }
                .answer(req, Side::Base, "base model (adapter off)", emit)?,
                (None, None) => anyhow::bail!("no model is loaded"),
            }
            match &mut l.tuned {
                Some((tuned, label)) => Answerer {
                    model: &mut tuned.model,
                    tokenizer: &tuned.tokenizer,
                    template,
                }
                .answer(req, Side::Tuned, label, emit)?,
                None => emit(TryItEvent::Unavailable {
                    id: req.id,
                    side: Side::Tuned,
                    reason: "no fine-tuned run yet: train one, and its answer appears here (during training too)".into(),
                }),
            }
            Ok(())
        });
    }
}

/// Loads what `target` names onto the device `choice` names.
fn load_target(target: &TryItTarget, choice: DeviceChoice) -> anyhow::Result<Loaded> {
    let device = choice.resolve()?;
    let load =
        |path: &Path| -> anyhow::Result<LanguageModel> { Ok(load_language_model(path, &device)?) };
    match target {
        TryItTarget::Model(source) => {
            let path = model_path(source)?;
            let base = load(&path)?;
            let template = chat_template(&base.tokenizer, &path)?;
            Ok(Loaded {
                target: target.clone(),
                device: choice,
                tuned: None,
                base: Some(base),
                template,
            })
        }
        TryItTarget::Run(run) => {
            let cfg = run_config(run)?;
            let path = model_path(&cfg.model.source)?;
            let trained = trained_at(run).map_err(|_| {
                anyhow::anyhow!(
                    "{}: the run saved no adapter or model yet (it saves when it finishes or stops)",
                    run.display()
                )
            })?;
            let mut tuned = load(&path)?;
            let template = chat_template(&tuned.tokenizer, &path)?;
            apply_trained(&mut tuned, &trained)?;
            let base = match trained {
                Trained::Adapter(_) => None,
                Trained::Weights(_) => Some(load(&path)?),
            };
            let name = RunLayout::new(run).id().unwrap_or_else(|| cfg.label());
            Ok(Loaded {
                target: target.clone(),
                device: choice,
                tuned: Some((tuned, format!("fine-tuned: {name}"))),
                base,
                template,
            })
        }
    }
}

/// A run folder's config, refused unless it trains a language model.
fn run_config(run: &Path) -> anyhow::Result<TrainConfig> {
    let cfg = TrainConfig::from_preset(&RunLayout::new(run).config(), &[])?;
    anyhow::ensure!(
        super::causal_lm::is_language_model(&cfg.model.source)?,
        "{}: this run trained a classifier; Try it answers with language models",
        run.display()
    );
    Ok(cfg)
}

//! Exporting what a run trained, in the formats other tools read:
//!
//! - [`peft_adapter`]: a PEFT LoRA adapter folder (`--format peft`).
//! - [`merged`]: a Hugging Face model folder with the adapter folded in (`--format merged`).
//! - [`gguf_lora`]: llama.cpp's LoRA adapter GGUF (`--format gguf-lora`, LLaMA family only).
//! - [`run`]: a finished run's trained model, rebuilt from its folder.
//! - [`staging`]: the atomic output folder.
//!
//! The writers work on a model (any [`LinearLayers`](crate::peft::linear::LinearLayers), or a
//! [`LlamaModel`](crate::models::llama::LlamaModel)); [`export_run`] applies them to a run
//! folder (encoder classification runs: adapter, full fine-tuning, head only).

pub mod check;
pub mod gguf_lora;
pub mod merged;
pub mod peft_adapter;
pub mod run;
pub mod staging;

use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::bail;

use crate::device::HOST;
use crate::models::{Classifier, InputKind};
use run::{RunKind, TrainedRun};
use staging::Staging;

/// An export format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    /// A PEFT LoRA adapter folder.
    Peft,
    /// A Hugging Face model folder, adapter merged.
    Merged,
    /// llama.cpp's LoRA adapter GGUF.
    GgufLora,
}

impl ExportFormat {
    /// Every format.
    pub const ALL: [ExportFormat; 3] = [Self::Peft, Self::Merged, Self::GgufLora];

    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Peft => "peft",
            Self::Merged => "merged",
            Self::GgufLora => "gguf-lora",
        }
    }
}

impl std::fmt::Display for ExportFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ExportFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| format!("`{s}` is not a format (peft, merged or gguf-lora)"))
    }
}

/// What an export wrote.
#[derive(Debug, Clone)]
pub struct ExportReport {
    /// The output folder.
    pub out: PathBuf,
    /// The format.
    pub format: ExportFormat,
    /// Human-readable lines on what was written (rank used, files copied…).
    pub notes: Vec<String>,
}

/// The head's parameters as PEFT `modules_to_save`, grouped under the head's top module
/// (`classifier`, whose sub-modules RoBERTa's head has), the name PEFT wraps.
type HeadModules = Vec<(String, Vec<(String, candle_core::Tensor)>)>;

fn head_modules(model: &dyn Classifier) -> crate::peft::Result<HeadModules> {
    let mut groups: HeadModules = Vec::new();
    for l in model.head() {
        let path = l.path();
        let (top, rest) = match path.split_once('.') {
            Some((t, r)) => (t.to_string(), format!("{r}.")),
            None => (path.to_string(), String::new()),
        };
        let mut params = vec![(format!("{rest}weight"), l.base_weight()?.detach())];
        if let Some(b) = l.bias() {
            params.push((format!("{rest}bias"), b.detach()));
        }
        match groups.iter_mut().find(|(t, _)| *t == top) {
            Some((_, p)) => p.extend(params),
            None => groups.push((top, params)),
        }
    }
    Ok(groups)
}

/// Exports the finished run in `run_folder` as `format` into the folder `out` (refused when
/// `out` is a non-empty folder, unless `force`). Written in a staging folder and renamed into
/// place: `out` is either complete or untouched.
pub fn export_run(
    run_folder: &Path,
    format: ExportFormat,
    out: &Path,
    force: bool,
) -> anyhow::Result<ExportReport> {
    export_run_with(run_folder, format, out, force, false)
}

/// [`export_run`]; with `check_logits`, also writes [`check::FILE`] (a fixed input and the
/// trained model's logits for it) into the export, for `scripts/peft_interop.py`.
pub fn export_run_with(
    run_folder: &Path,
    format: ExportFormat,
    out: &Path,
    force: bool,
    check_logits: bool,
) -> anyhow::Result<ExportReport> {
    if let Some(report) = export_language_model_run(run_folder, format, out, force)? {
        return Ok(report);
    }
    let trained = run::load_run(run_folder)?;
    let id = run_folder.display();
    if format == ExportFormat::GgufLora {
        bail!(
            "run {id}: `--format gguf-lora` is llama.cpp's LoRA format for LLaMA-family language models; this run fine-tuned an encoder classifier ({}). Use `--format peft` or `--format merged`",
            trained.model.summary()
        );
    }
    if format == ExportFormat::Peft {
        match trained.kind {
            RunKind::Full => bail!(
                "run {id}: {} changed every weight, which no PEFT adapter can hold; use `--format merged` for a complete model folder",
                trained.kind.describe()
            ),
            RunKind::Head => bail!(
                "run {id}: {} trained no adapter, only the classification head; use `--format merged` for a complete model folder",
                trained.kind.describe()
            ),
            RunKind::Adapter(_) => {}
        }
    }
    let staging = Staging::begin(out, force)?;
    let notes = write_run(&trained, format, staging.dir())?;
    if check_logits {
        check::write_classifier(staging.dir(), trained.model.as_ref())?;
    }
    staging.commit()?;
    Ok(ExportReport {
        out: out.to_path_buf(),
        format,
        notes,
    })
}

/// Exports a causal-LM run (`None` when the run fine-tuned a classifier): the base model with
/// the run's adapter or weights, through [`export_llama`].
fn export_language_model_run(
    run_folder: &Path,
    format: ExportFormat,
    out: &Path,
    force: bool,
) -> anyhow::Result<Option<ExportReport>> {
    use crate::train::causal_lm::{
        Trained, apply_trained, is_language_model, model_path, trained_at,
    };
    let layout = crate::train::RunLayout::new(run_folder);
    let cfg = crate::train::TrainConfig::from_preset(&layout.config(), &[])?;
    if !is_language_model(&cfg.model.source)? {
        return Ok(None);
    }
    let trained = trained_at(run_folder)?;
    if format == ExportFormat::Peft && matches!(trained, Trained::Weights(_)) {
        bail!(
            "run {}: full fine-tuning changed every weight, which no PEFT adapter can hold; use `--format merged` for a complete model folder",
            run_folder.display()
        );
    }
    let base = model_path(&cfg.model.source)?;
    let mut lm = crate::models::llama::load_language_model(&base, &HOST)?;
    apply_trained(&mut lm, &trained)?;
    let report = export_llama(
        &lm.model,
        base.is_dir().then_some(base.as_path()),
        format,
        out,
        force,
    )?;
    Ok(Some(report))
}

/// Exports a LLaMA-family model carrying adapters as `format` into the folder `out`
/// (atomically, refusing a non-empty `out` unless `force`), for causal-LM runs: `base` is the
/// Hugging Face folder the model was loaded from (PEFT's `base_model_name_or_path`; its
/// config and tokenizer files are copied into a merged folder).
pub fn export_llama(
    model: &crate::models::llama::LlamaModel,
    base: Option<&Path>,
    format: ExportFormat,
    out: &Path,
    force: bool,
) -> anyhow::Result<ExportReport> {
    let staging = Staging::begin(out, force)?;
    let dir = staging.dir();
    let notes = match format {
        ExportFormat::Peft => {
            let target = peft_adapter::PeftTarget {
                task_type: Some("CAUSAL_LM".into()),
                base_model: base.map(|p| {
                    std::path::absolute(p)
                        .unwrap_or_else(|_| p.to_path_buf())
                        .display()
                        .to_string()
                }),
                modules_to_save: Vec::new(),
            };
            let s = peft_adapter::write_peft(model, &target, dir)?;
            vec![format!(
                "{} modules, LoRA rank {} (lora_alpha {}), target_modules {}",
                s.modules,
                s.rank,
                s.rank,
                s.target_modules.join(",")
            )]
        }
        ExportFormat::Merged => {
            let copied = merged::write_merged_llama(model, base, dir)?;
            vec![format!(
                "{} with adapters merged, {}{}",
                merged::WEIGHTS_FILE,
                merged::CONFIG_FILE,
                if copied.is_empty() {
                    String::new()
                } else {
                    format!(", copied from the base: {}", copied.join(", "))
                }
            )]
        }
        ExportFormat::GgufLora => {
            let s = gguf_lora::write_gguf_lora(model, &dir.join(gguf_lora::FILE_NAME))?;
            vec![format!(
                "{}: {} modules, rank {} (adapter.lora.alpha {}), general.architecture {}",
                gguf_lora::FILE_NAME,
                s.modules,
                s.rank,
                s.rank,
                s.architecture
            )]
        }
    };
    staging.commit()?;
    Ok(ExportReport {
        out: out.to_path_buf(),
        format,
        notes,
    })
}

fn write_run(t: &TrainedRun, format: ExportFormat, dir: &Path) -> anyhow::Result<Vec<String>> {
    let model = t.model.as_ref();
    let mut notes = Vec::new();
    match format {
        ExportFormat::Peft => {
            let task_type = match model.input() {
                InputKind::Text { .. } => Some("SEQ_CLS".to_string()),
                InputKind::Image { .. } => None,
            };
            let base_model = t
                .base_folder
                .as_ref()
                .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone()))
                .map(|p| p.display().to_string());
            if base_model.is_none() {
                notes.push("the base model was initialised from a config.json and a seed: PEFT needs those same weights, which only this run's `merged` export holds".into());
            }
            let target = peft_adapter::PeftTarget {
                task_type,
                base_model,
                modules_to_save: head_modules(model)?,
            };
            let s = peft_adapter::write_peft(model, &target, dir)?;
            let method = t.cfg.adapter.method;
            notes.push(format!(
                "{} modules, LoRA rank {} (lora_alpha {}), target_modules {}",
                s.modules,
                s.rank,
                s.rank,
                s.target_modules.join(",")
            ));
            if method != crate::peft::Method::Lora {
                notes.push(format!(
                    "the {method} adapter is written as the plain LoRA of its learned change (rank {}, exact)",
                    s.rank
                ));
            } else if s.rank != t.cfg.adapter.rank {
                notes.push(format!(
                    "the learned change relative to the pre-trained weight has rank {} (the {} initialisation's starting factors are folded in)",
                    s.rank,
                    t.cfg.adapter.init().name()
                ));
            }
            if !target.modules_to_save.is_empty() {
                notes.push(format!(
                    "head saved as modules_to_save: {}",
                    target
                        .modules_to_save
                        .iter()
                        .map(|(m, _)| m.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
        ExportFormat::Merged => {
            let tensors = crate::models::named_tensors(model)?;
            let copied = merged::write_merged(
                &tensors,
                &model.config_json(),
                t.base_folder.as_deref(),
                dir,
            )?;
            notes.push(format!(
                "{} ({} tensors, adapters merged), {}{}",
                merged::WEIGHTS_FILE,
                tensors.len(),
                merged::CONFIG_FILE,
                if copied.is_empty() {
                    String::new()
                } else {
                    format!(", copied from the base: {}", copied.join(", "))
                }
            ));
        }
        ExportFormat::GgufLora => bail!("gguf-lora needs a LLaMA-family model"),
    }
    Ok(notes)
}

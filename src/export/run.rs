//! A finished run's trained model, rebuilt in host memory ([`HOST`]) from its folder for
//! export (exports are file conversions: no GPU needed): the base model plus
//! `adapter/` (adapter runs), `model/` (full fine-tuning) or `head/` (head-only runs).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use candle_core::Tensor;

use crate::device::HOST;

use crate::fsio;
use crate::models::{Classifier, LoadedModel, ModelSource, hub, load_model};
use crate::peft::{AdaptedLinear, Method, load_adapter_with};
use crate::train::layout::{HEAD_FILE, MODEL_WEIGHTS_FILE};
use crate::train::store::read_summary;
use crate::train::{RunLayout, RunLock, RunStatus, TrainConfig, TrainMode};

/// What a run trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunKind {
    /// An adapter of this method (plus the head).
    Adapter(Method),
    /// Every parameter.
    Full,
    /// The head alone.
    Head,
}

impl RunKind {
    /// A short description for messages.
    pub fn describe(self) -> String {
        match self {
            RunKind::Adapter(m) => format!("a {m} adapter run"),
            RunKind::Full => "a full fine-tuning run".into(),
            RunKind::Head => "a head-only run".into(),
        }
    }
}

/// A finished run's trained model.
pub struct TrainedRun {
    /// The run folder.
    pub folder: PathBuf,
    /// Its config.
    pub cfg: TrainConfig,
    /// What it trained.
    pub kind: RunKind,
    /// The trained model (adapters attached, unmerged; head loaded).
    pub model: Box<dyn Classifier>,
    /// The base model's folder (for its tokenizer and as PEFT's `base_model_name_or_path`);
    /// none for a model initialised from a `config.json` alone.
    pub base_folder: Option<PathBuf>,
}

/// `run`: a run folder, or the id of a run in `runs_dir`.
pub fn resolve_run(run: &Path, runs_dir: &Path) -> anyhow::Result<PathBuf> {
    let candidates = [run.to_path_buf(), runs_dir.join(run)];
    for c in &candidates {
        if c.join(crate::train::layout::CONFIG_FILE).is_file() {
            return Ok(c.clone());
        }
    }
    bail!(
        "run `{}`: neither a run folder (with {}) nor the id of a run in {}",
        run.display(),
        crate::train::layout::CONFIG_FILE,
        runs_dir.display()
    )
}

/// The base model's folder for `source`.
fn base_folder(source: &ModelSource) -> anyhow::Result<Option<PathBuf>> {
    Ok(match source {
        ModelSource::Builtin { name } => Some(hub::builtin_folder(name)?),
        ModelSource::Folder { path } => Some(path.clone()),
        ModelSource::Config { .. } | ModelSource::Gguf { .. } => None,
    })
}

/// Reads a safetensors file's tensors.
fn read_tensors(path: &Path) -> anyhow::Result<HashMap<String, Tensor>> {
    Ok(fsio::parse_safetensors(path, &fsio::read(path)?, &HOST)?)
}

/// Classes of the head stored in `tensors` (`<prefix>classifier.weight`, or RoBERTa's
/// `<prefix>classifier.out_proj.weight`).
fn head_classes(
    tensors: &HashMap<String, Tensor>,
    prefix: &str,
    file: &Path,
) -> anyhow::Result<usize> {
    for name in ["classifier.weight", "classifier.out_proj.weight"] {
        if let Some(t) = tensors.get(&format!("{prefix}{name}")) {
            return Ok(t.dims()[0]);
        }
    }
    bail!(
        "{}: no classification head (`{prefix}classifier.weight`) in the file",
        file.display()
    )
}

/// Puts the saved head (`<module>.weight`, `<module>.bias` in `tensors`) into `model`.
fn set_head(
    model: &mut dyn Classifier,
    tensors: &HashMap<String, Tensor>,
    file: &Path,
) -> anyhow::Result<()> {
    for l in model.head_mut() {
        let w = tensors
            .get(&format!("{}.weight", l.path()))
            .with_context(|| format!("{}: `{}.weight` is missing", file.display(), l.path()))?;
        let b = tensors.get(&format!("{}.bias", l.path())).cloned();
        *l = AdaptedLinear::new(l.path().to_string(), w.clone(), b);
    }
    Ok(())
}

/// Loads the finished run in `folder` for export. A run still training, failed or stopped
/// before its end is refused: only a finished run has its trained parts saved.
pub fn load_run(folder: &Path) -> anyhow::Result<TrainedRun> {
    let layout = RunLayout::new(folder);
    let cfg = TrainConfig::from_preset(&layout.config(), &[])
        .with_context(|| format!("run {}", folder.display()))?;
    if RunLock::is_held(&layout) {
        bail!(
            "run {}: it is still training; export it once it has finished",
            folder.display()
        );
    }
    let summary = read_summary(&layout).with_context(|| format!("run {}", folder.display()))?;
    if summary.status != RunStatus::Finished {
        bail!(
            "run {}: its status is {:?} ({} of {} steps); only a finished run has its trained model saved (resume it with `peft-studio train --resume {}`)",
            folder.display(),
            summary.status,
            summary.steps_done,
            summary.total_steps,
            folder.display()
        );
    }
    let kind = match cfg.mode {
        TrainMode::Adapter => RunKind::Adapter(cfg.adapter.method),
        TrainMode::Full => RunKind::Full,
        TrainMode::Head => RunKind::Head,
    };
    let seed = cfg.optim.seed;
    let source = &cfg.model.source;
    let model = match kind {
        RunKind::Adapter(_) => {
            let dir = layout.adapter();
            let wfile = dir.join(crate::peft::checkpoint::WEIGHTS_FILE);
            let classes = head_classes(
                &read_tensors(&wfile)?,
                crate::peft::checkpoint::KEY_PREFIX,
                &wfile,
            )?;
            let LoadedModel { mut model, .. } = load_model(source, classes, true, seed, &HOST)?;
            let (_, extra) = load_adapter_with(model.as_mut(), &dir)
                .with_context(|| format!("run {}", folder.display()))?;
            set_head(model.as_mut(), &extra, &wfile)?;
            model
        }
        RunKind::Head => {
            let file = layout.head().join(HEAD_FILE);
            let tensors = read_tensors(&file)?;
            let LoadedModel { mut model, .. } = load_model(
                source,
                head_classes(&tensors, "", &file)?,
                true,
                seed,
                &HOST,
            )?;
            set_head(model.as_mut(), &tensors, &file)?;
            model
        }
        RunKind::Full => {
            let file = layout.model().join(MODEL_WEIGHTS_FILE);
            let tensors = read_tensors(&file)?;
            let LoadedModel { mut model, .. } = load_model(
                source,
                head_classes(&tensors, "", &file)?,
                true,
                seed,
                &HOST,
            )?;
            set_head(model.as_mut(), &tensors, &file)?;
            for l in model.linears_mut() {
                let w = tensors
                    .get(&format!("{}.weight", l.path()))
                    .with_context(|| {
                        format!("{}: `{}.weight` is missing", file.display(), l.path())
                    })?;
                let b = tensors.get(&format!("{}.bias", l.path())).cloned();
                *l = AdaptedLinear::new(l.path().to_string(), w.clone(), b);
            }
            for (name, t) in model.other_params_mut() {
                let w = tensors
                    .get(&name)
                    .with_context(|| format!("{}: `{name}` is missing", file.display()))?;
                if w.dims() != t.dims() {
                    bail!(
                        "{}: `{name}` has shape {:?}, the model {:?}",
                        file.display(),
                        w.dims(),
                        t.dims()
                    );
                }
                *t = w.clone();
            }
            model
        }
    };
    Ok(TrainedRun {
        folder: folder.to_path_buf(),
        base_folder: base_folder(source)?,
        cfg,
        kind,
        model,
    })
}

//! `peft-studio export-job`: a preset or a run as a self-contained transformers + PEFT +
//! accelerate job folder, written atomically (a staging folder renamed into place).

use std::path::{Path, PathBuf};

use super::assets::{ACCELERATE_CONFIGS, ADAPTERS_PY, README, REQUIREMENTS, TRAIN_PY, fill};
use super::data::{self as jobdata, write_jsonl};
use super::spec::{JobData, JobModel, JobSpec, JobTask, job_model};
use crate::export::staging::Staging;
use crate::fsio;
use crate::train::causal_lm::is_language_model;
use crate::train::{RunLayout, TrainConfig, limits};

/// `job.json`.
pub const JOB_FILE: &str = "job.json";
/// The run's peft-studio config inside the job folder.
pub const JOB_CONFIG_FILE: &str = "config.toml";
/// Where `train.py` writes its results, inside the job folder.
pub const OUTPUT_DIR: &str = "output";

/// What to export and how.
#[derive(Debug, Clone, Default)]
pub struct ExportJobOptions {
    /// A model folder, `.gguf` file or hub id for transformers, instead of the run's model.
    pub model: Option<String>,
    /// Replace a non-empty output folder.
    pub force: bool,
}

/// What [`export_job`] wrote.
#[derive(Debug, Clone)]
pub struct ExportedJob {
    /// The job folder.
    pub out: PathBuf,
    /// Its `job.json`, as written.
    pub spec: JobSpec,
    /// Remarks for the user.
    pub notes: Vec<String>,
}

/// The config of `source`: a preset file (`.toml`) or a run folder (its `config.toml`).
pub fn source_config(source: &Path, overrides: &[String]) -> anyhow::Result<TrainConfig> {
    if source.is_dir() {
        let config = RunLayout::new(source).config();
        anyhow::ensure!(
            config.is_file(),
            "{}: a folder without config.toml is not a run folder (give a preset .toml or a run folder)",
            source.display()
        );
        return Ok(TrainConfig::from_preset(&config, overrides)?);
    }
    Ok(TrainConfig::from_preset(source, overrides)?)
}

/// Writes the job folder of `cfg` (read from `source`, named in its README) into `out`.
pub fn export_job(
    cfg: &TrainConfig,
    source: &Path,
    out: &Path,
    opts: &ExportJobOptions,
) -> anyhow::Result<ExportedJob> {
    cfg.validate().map_err(anyhow::Error::msg)?;
    let task = if is_language_model(&cfg.model.source)? {
        JobTask::CausalLm
    } else {
        JobTask::Classification
    };
    let converted = match task {
        JobTask::Classification => jobdata::classification(cfg)?,
        JobTask::CausalLm => jobdata::instruct(cfg)?,
    };
    let steps = limits::total_steps(cfg, converted.train.len()).map_err(anyhow::Error::msg)?;
    limits::check_batch(cfg, converted.train.len(), &cfg.data.source.describe())
        .map_err(anyhow::Error::msg)?;
    let (path, gguf_file) = job_model(&cfg.model.source, opts.model.as_deref())?;
    let spec = JobSpec::new(
        cfg,
        task,
        JobModel {
            path,
            gguf_file,
            max_length: cfg.model.max_length,
        },
        converted.classes.clone(),
        JobData {
            train: "data/train.jsonl".into(),
            eval: "data/eval.jsonl".into(),
            train_examples: converted.train.len(),
            eval_examples: converted.eval.len(),
            source: cfg.data.source.describe(),
        },
        steps,
    );
    let staging = Staging::begin(out, opts.force)?;
    let dir = staging.dir();
    fsio::create_dir_all(&dir.join("data"))?;
    write_jsonl(&dir.join(&spec.data.train), &converted.train)?;
    write_jsonl(&dir.join(&spec.data.eval), &converted.eval)?;
    let mut job_cfg = cfg.clone();
    job_cfg.optim.steps = Some(steps);
    job_cfg.optim.epochs = None;
    fsio::write_atomic(&dir.join(JOB_CONFIG_FILE), job_cfg.to_toml().as_bytes())?;
    fsio::write_atomic(
        &dir.join(JOB_FILE),
        serde_json::to_string_pretty(&spec)?.as_bytes(),
    )?;
    fsio::write_atomic(&dir.join("train.py"), TRAIN_PY.as_bytes())?;
    fsio::write_atomic(&dir.join("peft_studio_adapters.py"), ADAPTERS_PY.as_bytes())?;
    fsio::write_atomic(&dir.join("requirements.txt"), REQUIREMENTS.as_bytes())?;
    let acc = dir.join("accelerate");
    fsio::create_dir_all(&acc)?;
    let values = [
        ("grad_accum", spec.optim.grad_accum.to_string()),
        (
            "max_grad_norm",
            spec.optim.max_grad_norm.unwrap_or(0.0).to_string(),
        ),
    ];
    for (name, template) in ACCELERATE_CONFIGS {
        fsio::write_atomic(&acc.join(name), fill(template, &values)?.as_bytes())?;
    }
    let readme = fill(README, &readme_values(&spec, source, out))?;
    fsio::write_atomic(&dir.join("README.md"), readme.as_bytes())?;
    staging.commit()?;
    Ok(ExportedJob {
        out: out.to_path_buf(),
        spec,
        notes: converted.notes,
    })
}

fn readme_values(spec: &JobSpec, source: &Path, out: &Path) -> Vec<(&'static str, String)> {
    let model = match &spec.model.gguf_file {
        Some(f) => format!("{}/{f}", spec.model.path),
        None => spec.model.path.clone(),
    };
    let method = match spec.rank {
        Some(r) => format!(
            "{} r{r} on {}",
            spec.method,
            spec.adapter.targets.describe()
        ),
        None => spec.method.clone(),
    };
    vec![
        ("name", spec.name.clone()),
        ("peft_studio_version", spec.peft_studio_version.clone()),
        ("source", source.display().to_string()),
        ("model", model),
        (
            "task",
            match spec.task {
                JobTask::Classification => "text classification".into(),
                JobTask::CausalLm => {
                    "causal language model (loss on the assistant's tokens)".into()
                }
            },
        ),
        ("method", method),
        ("steps", spec.optim.steps.to_string()),
        ("batch_size", spec.optim.batch_size.to_string()),
        ("grad_accum", spec.optim.grad_accum.to_string()),
        ("train_examples", spec.data.train_examples.to_string()),
        ("eval_examples", spec.data.eval_examples.to_string()),
        ("data_source", spec.data.source.clone()),
        ("out_hint", out.display().to_string()),
    ]
}

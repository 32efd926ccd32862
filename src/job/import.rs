//! `peft-studio import-run`: a finished job's output (`metrics.jsonl`, the adapter folder,
//! `job_summary.json`) and its `config.toml` as a run of the run store, marked with its
//! origin ([`ORIGIN_FILE`]) so the Compare tab lists it beside local runs.
//!
//! Everything is read and checked before the run folder is created; a failure after that
//! removes the folder, so the store never holds a half-imported run.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::export::{JOB_CONFIG_FILE, OUTPUT_DIR};
use crate::fsio;
use crate::peft::Method;
use crate::peft::checkpoint::{KEY_PREFIX, WEIGHTS_FILE, read_adapter_config};
use crate::train::layout::{ADAPTER_DIR, HEAD_DIR, HEAD_FILE, MODEL_DIR, MODEL_WEIGHTS_FILE};
use crate::train::trainer::{new_summary, record_results};
use crate::train::{
    EvalPoint, MetricLine, RunLayout, RunStatus, RunStore, RunSummary, TrainConfig, TrainMode,
};

/// `origin.json` in an imported run's folder: where the run was trained.
pub const ORIGIN_FILE: &str = "origin.json";
/// `job_summary.json` in a job's output folder.
pub const JOB_SUMMARY_FILE: &str = "job_summary.json";
/// The origin recorded for runs trained by an exported job.
pub const ACCELERATE_ORIGIN: &str = "accelerate job";

/// `job_summary.json`, as `train.py` writes it (the fields import needs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSummary {
    /// Trainable values.
    pub trainable: usize,
    /// All values (model plus adapter).
    pub total: usize,
    /// Optimiser steps done.
    pub steps_done: usize,
    /// Steps planned.
    pub total_steps: usize,
    /// Wall time of the job, seconds.
    pub wall_secs: f64,
    /// Mean seconds per optimiser step.
    pub secs_per_step: f64,
    /// Peak resident memory of the main process, MiB.
    #[serde(default)]
    pub peak_rss_mib: f64,
    /// Processes the job ran on.
    #[serde(default = "one")]
    pub num_processes: usize,
    /// accelerate's distributed type (`DistributedType.MULTI_CPU`, …).
    #[serde(default)]
    pub distributed_type: String,
    /// The model transformers loaded.
    #[serde(default)]
    pub model: String,
    /// Start time.
    #[serde(default)]
    pub started_at: String,
    /// Library versions.
    #[serde(default)]
    pub versions: serde_json::Value,
}

fn one() -> usize {
    1
}

/// `origin.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunOrigin {
    /// [`ACCELERATE_ORIGIN`].
    pub origin: String,
    /// The job folder imported.
    pub imported_from: String,
    /// When (RFC 3339).
    pub imported_at: String,
    /// The job's own summary.
    pub job: JobSummary,
}

/// A run created by [`import_run`].
#[derive(Debug, Clone)]
pub struct ImportedRun {
    /// Its id in the store.
    pub id: String,
    /// Its folder.
    pub path: PathBuf,
    /// Its summary.
    pub summary: RunSummary,
}

/// The origin of the run in `layout`, when it was imported (`None` for a local run).
pub fn run_origin(layout: &RunLayout) -> Option<RunOrigin> {
    let text = std::fs::read_to_string(layout.root().join(ORIGIN_FILE)).ok()?;
    serde_json::from_str(&text).ok()
}

/// The job folder and its output folder, from either of them.
fn locate(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    anyhow::ensure!(dir.is_dir(), "{}: not a folder", dir.display());
    if dir.join(OUTPUT_DIR).join("metrics.jsonl").is_file() {
        return Ok((dir.to_path_buf(), dir.join(OUTPUT_DIR)));
    }
    if dir.join("metrics.jsonl").is_file()
        && let Some(parent) = dir.parent()
        && parent.join(JOB_CONFIG_FILE).is_file()
    {
        return Ok((parent.to_path_buf(), dir.to_path_buf()));
    }
    anyhow::bail!(
        "{}: no job output here: expected {OUTPUT_DIR}/metrics.jsonl (a job folder written by export-job, after train.py ran) or metrics.jsonl beside a job folder's {JOB_CONFIG_FILE}",
        dir.display()
    )
}

/// Reads `metrics.jsonl`; every line must be a metrics line (errors name the line and field).
pub fn read_job_metrics(path: &Path) -> anyhow::Result<Vec<MetricLine>> {
    let text = fsio::read_to_string(path)?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let m: MetricLine = serde_json::from_str(line)
            .map_err(|e| anyhow::anyhow!("{}: line {}: {e}", path.display(), i + 1))?;
        let bad = |what: &str, v: f64| {
            anyhow::anyhow!("{}: line {}: {what} is {v}", path.display(), i + 1)
        };
        match &m {
            MetricLine::Step { loss, .. } if !loss.is_finite() => return Err(bad("loss", *loss)),
            MetricLine::Eval(e) if !(0.0..=1.0).contains(&e.accuracy) => {
                return Err(bad("accuracy (a share in [0, 1])", e.accuracy));
            }
            _ => {}
        }
        out.push(m);
    }
    anyhow::ensure!(
        out.iter().any(|m| matches!(m, MetricLine::Step { .. })),
        "{}: no training step recorded (lines of kind \"step\")",
        path.display()
    );
    Ok(out)
}

fn read_job_summary(path: &Path) -> anyhow::Result<JobSummary> {
    let text = fsio::read_to_string(path)?;
    serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// Checks what the job trained (adapter folder, model or head) before it is copied.
fn check_trained(cfg: &TrainConfig, out: &Path) -> anyhow::Result<PathBuf> {
    match cfg.mode {
        TrainMode::Adapter => {
            let dir = out.join(ADAPTER_DIR);
            let acfg = read_adapter_config(&dir)?;
            anyhow::ensure!(
                acfg.method == cfg.adapter.method,
                "{}: peft_type is {}, but the run's config.toml trains {}",
                dir.join("adapter_config.json").display(),
                acfg.method,
                cfg.adapter.method
            );
            let wpath = dir.join(WEIGHTS_FILE);
            let tensors =
                fsio::parse_safetensors(&wpath, &fsio::read(&wpath)?, &crate::device::HOST)?;
            let marker = match acfg.method {
                Method::Lora => ".lora_A.weight".to_string(),
                m => format!(".{}.z", m.name()),
            };
            if let Some(k) = tensors.keys().find(|k| !k.starts_with(KEY_PREFIX)) {
                anyhow::bail!(
                    "{}: key `{k}` does not start with `{KEY_PREFIX}`",
                    wpath.display()
                );
            }
            anyhow::ensure!(
                tensors.keys().any(|k| k.ends_with(&marker)),
                "{}: no `*{marker}` tensor: not a {} adapter",
                wpath.display(),
                acfg.method
            );
            Ok(dir)
        }
        TrainMode::Full => {
            let dir = out.join(MODEL_DIR);
            let w = dir.join(MODEL_WEIGHTS_FILE);
            anyhow::ensure!(
                w.is_file(),
                "{}: missing (full fine-tuning's weights)",
                w.display()
            );
            Ok(dir)
        }
        TrainMode::Head => {
            let dir = out.join(HEAD_DIR);
            let w = dir.join(HEAD_FILE);
            anyhow::ensure!(w.is_file(), "{}: missing (the trained head)", w.display());
            Ok(dir)
        }
    }
}

fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    fsio::create_dir_all(to)?;
    for entry in std::fs::read_dir(from).map_err(|e| anyhow::anyhow!("{}: {e}", from.display()))? {
        let entry = entry.map_err(|e| anyhow::anyhow!("{}: {e}", from.display()))?;
        let p = entry.path();
        let dest = to.join(entry.file_name());
        if p.is_dir() {
            copy_dir(&p, &dest)?;
        } else {
            std::fs::copy(&p, &dest)
                .map_err(|e| anyhow::anyhow!("{} → {}: {e}", p.display(), dest.display()))?;
        }
    }
    Ok(())
}

/// Imports the job in `dir` (the job folder, or its `output/`) into `store` as a new run.
pub fn import_run(store: &RunStore, dir: &Path) -> anyhow::Result<ImportedRun> {
    let (job_dir, out) = locate(dir)?;
    let mut cfg = TrainConfig::from_preset(&job_dir.join(JOB_CONFIG_FILE), &[])?;
    let metrics = read_job_metrics(&out.join("metrics.jsonl"))?;
    let job = read_job_summary(&out.join(JOB_SUMMARY_FILE))?;
    let trained = check_trained(&cfg, &out)?;
    cfg.name = Some(format!("{} ({ACCELERATE_ORIGIN})", cfg.label()));
    let run = store.create(&cfg)?;
    let (id, path) = (run.id.clone(), run.path.clone());
    let result = (|| -> anyhow::Result<RunSummary> {
        let mut run = run;
        let name = trained
            .file_name()
            .map(|n| n.to_os_string())
            .ok_or_else(|| anyhow::anyhow!("{}: not a folder", trained.display()))?;
        let tmp = run.path.join(format!(".import-{}", std::process::id()));
        copy_dir(&trained, &tmp)?;
        fsio::rename(&tmp, &run.path.join(name))?;
        for m in &metrics {
            run.append(m)?;
        }
        let summary = summary_of(&cfg, &run.id, &metrics, &job);
        run.write_summary(&summary)?;
        let origin = RunOrigin {
            origin: ACCELERATE_ORIGIN.into(),
            imported_from: job_dir
                .canonicalize()
                .unwrap_or_else(|_| job_dir.clone())
                .display()
                .to_string(),
            imported_at: chrono::Local::now().to_rfc3339(),
            job: job.clone(),
        };
        fsio::write_atomic(
            &run.path.join(ORIGIN_FILE),
            serde_json::to_string_pretty(&origin)?.as_bytes(),
        )?;
        Ok(summary)
    })();
    match result {
        Ok(summary) => Ok(ImportedRun { id, path, summary }),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&path);
            Err(e)
        }
    }
}

/// The job's start time in local time (as local runs record it), or now.
fn local_time(started_at: &str) -> String {
    chrono::DateTime::parse_from_rfc3339(started_at)
        .map(|t| t.with_timezone(&chrono::Local).to_rfc3339())
        .unwrap_or_else(|_| chrono::Local::now().to_rfc3339())
}

/// The run's summary from the job's metrics and summary.
fn summary_of(cfg: &TrainConfig, id: &str, metrics: &[MetricLine], job: &JobSummary) -> RunSummary {
    let losses: Vec<f64> = metrics
        .iter()
        .filter_map(|m| match m {
            MetricLine::Step { loss, .. } => Some(*loss),
            MetricLine::Eval(_) => None,
        })
        .collect();
    let evals: Vec<EvalPoint> = metrics
        .iter()
        .filter_map(|m| match m {
            MetricLine::Eval(e) => Some(*e),
            MetricLine::Step { .. } => None,
        })
        .collect();
    let mut summary = new_summary(
        cfg,
        (job.trainable, job.total),
        id,
        job.total_steps,
        local_time(&job.started_at),
    );
    record_results(&mut summary, &losses, &evals);
    summary.steps_done = job.steps_done;
    summary.wall_secs = job.wall_secs;
    summary.secs_per_step = job.secs_per_step;
    summary.peak_rss_mib = job.peak_rss_mib;
    summary.status = if job.steps_done >= job.total_steps {
        RunStatus::Finished
    } else {
        RunStatus::Stopped
    };
    summary
}

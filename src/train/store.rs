//! The run store: `runs/<id>/` holding `config.toml` (exactly what ran), `metrics.jsonl` (one
//! line per step and evaluation), `adapter/` (or `model/` for full fine-tuning, `head/` for
//! the head alone), `checkpoint/` (when resumable) and `summary.json`; the names are
//! [`RunLayout`]'s. Summaries are written atomically; a run's folder is never touched by
//! another run, and while a run trains its [`RunDir`] holds the folder's [`RunLock`], so no
//! second process can train it at the same time.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::config::TrainConfig;
use super::layout::{RunLayout, RunLock, SUMMARY_FILE};
use crate::fsio::write_atomic;

/// How a run ended (or that it is still going).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    /// Training now (or the process died: then the summary is stale).
    Running,
    /// Completed every step.
    Finished,
    /// Stopped by the user; metrics so far are kept.
    Stopped,
    /// Failed; `error` says why.
    Failed,
}

impl std::fmt::Display for RunStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RunStatus::Running => "running",
            RunStatus::Finished => "finished",
            RunStatus::Stopped => "stopped",
            RunStatus::Failed => "failed",
        })
    }
}

/// One evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EvalPoint {
    /// Optimiser step.
    pub step: usize,
    /// Mean cross-entropy on the eval split.
    pub loss: f64,
    /// Accuracy on the eval split: for a classifier, of its predictions; for a language model,
    /// the task metric (exact match of generated answers) where the data has answers to
    /// generate, else next-token accuracy on the trained tokens.
    pub accuracy: f64,
    /// Perplexity (exp of the mean token loss), for a language model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub perplexity: Option<f64>,
}

/// `summary.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    /// Folder name under `runs/`.
    pub id: String,
    /// Display name.
    pub name: String,
    /// `lora`, `svfit`, `loldu`, `full` or `head`.
    pub method: String,
    /// Adapter rank (adapter runs).
    pub rank: Option<usize>,
    /// Model name.
    pub model: String,
    /// Dataset name.
    pub dataset: String,
    /// Trainable values.
    pub trainable: usize,
    /// All values: the model plus the adapter's trainable ones.
    pub total: usize,
    /// Optimiser steps done.
    pub steps_done: usize,
    /// Steps planned.
    pub total_steps: usize,
    /// Last training loss (mean of the last 10 steps).
    pub final_train_loss: Option<f64>,
    /// Last evaluation.
    pub final_eval: Option<EvalPoint>,
    /// Best evaluation by accuracy.
    pub best_eval: Option<EvalPoint>,
    /// Wall time of the whole run, seconds.
    pub wall_secs: f64,
    /// Mean seconds per optimiser step (training only).
    pub secs_per_step: f64,
    /// Peak resident memory of the process during the run, MiB.
    pub peak_rss_mib: f64,
    /// How it ended.
    pub status: RunStatus,
    /// Why it failed.
    pub error: Option<String>,
    /// Start time (RFC 3339).
    pub started_at: String,
}

impl RunSummary {
    /// Trainable share of all parameters, in percent.
    pub fn trainable_percent(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            100.0 * self.trainable as f64 / self.total as f64
        }
    }
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum MetricLine {
    /// A training step.
    Step {
        /// Step.
        step: usize,
        /// Training loss.
        loss: f64,
        /// Learning rate.
        lr: f64,
        /// Seconds this step took.
        secs: f64,
    },
    /// An evaluation.
    Eval(EvalPoint),
}

/// The folder of all runs.
#[derive(Debug, Clone)]
pub struct RunStore {
    root: PathBuf,
}

/// A run's folder while it trains; holds the folder's lock until dropped.
#[derive(Debug)]
pub struct RunDir {
    /// The run's id.
    pub id: String,
    /// Its folder.
    pub path: PathBuf,
    /// Its files.
    pub layout: RunLayout,
    metrics: std::fs::File,
    _lock: RunLock,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> anyhow::Error + '_ {
    move |e| anyhow::anyhow!("{}: {e}", path.display())
}

impl RunStore {
    /// The store at `root` (created on first use).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// Its folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Creates a fresh run folder and writes its config.
    pub fn create(&self, cfg: &TrainConfig) -> anyhow::Result<RunDir> {
        std::fs::create_dir_all(&self.root).map_err(io(&self.root))?;
        let stamp = chrono::Local::now().format("%Y%m%d-%H%M%S");
        let slug: String = cfg
            .label()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .collect();
        let base = format!("{stamp}-{}", slug.trim_matches('-'));
        let mut id = base.clone();
        let mut n = 1;
        // create_dir (not _all) fails if it exists: no two runs share a folder.
        let path = loop {
            let p = self.root.join(&id);
            match std::fs::create_dir(&p) {
                Ok(()) => break p,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    n += 1;
                    id = format!("{base}-{n}");
                }
                Err(e) => return Err(io(&p)(e)),
            }
        };
        let layout = RunLayout::new(&path);
        let lock = RunLock::acquire(&layout)?;
        write_atomic(&layout.config(), cfg.to_toml().as_bytes())?;
        let mpath = layout.metrics();
        let metrics = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&mpath)
            .map_err(io(&mpath))?;
        Ok(RunDir {
            id,
            path,
            layout,
            metrics,
            _lock: lock,
        })
    }

    /// The files of run `id`.
    pub fn layout(&self, id: &str) -> RunLayout {
        RunLayout::new(self.root.join(id))
    }

    /// Every run's summary, newest first; unreadable folders are skipped with their reason.
    pub fn list(&self) -> (Vec<RunSummary>, Vec<String>) {
        let mut runs = Vec::new();
        let mut problems = Vec::new();
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return (runs, problems);
        };
        for e in entries.flatten() {
            let p = e.path().join(SUMMARY_FILE);
            if !p.is_file() {
                continue;
            }
            match std::fs::read_to_string(&p)
                .map_err(|e| e.to_string())
                .and_then(|t| serde_json::from_str::<RunSummary>(&t).map_err(|e| e.to_string()))
            {
                Ok(s) => runs.push(s),
                Err(err) => problems.push(format!("{}: {err}", p.display())),
            }
        }
        runs.sort_by(|a, b| b.started_at.cmp(&a.started_at).then(b.id.cmp(&a.id)));
        (runs, problems)
    }

    /// A run's metrics.
    pub fn metrics(&self, id: &str) -> anyhow::Result<Vec<MetricLine>> {
        read_metrics(&self.layout(id))
    }

    /// A run's config.
    pub fn config(&self, id: &str) -> anyhow::Result<TrainConfig> {
        Ok(TrainConfig::from_preset(&self.layout(id).config(), &[])?)
    }

    /// Whether run `id` is being trained now (by any process); a `running` summary without
    /// it means the run was interrupted and can be resumed.
    pub fn is_training(&self, id: &str) -> bool {
        RunLock::is_held(&self.layout(id))
    }

    /// Deletes a run's folder (refused while a process trains it).
    pub fn delete(&self, id: &str) -> anyhow::Result<()> {
        if id.is_empty() || id.contains('/') || id.contains("..") {
            anyhow::bail!("`{id}` is not a run id");
        }
        let layout = self.layout(id);
        let _lock = RunLock::acquire(&layout)?;
        let p = layout.root();
        std::fs::remove_dir_all(p).map_err(io(p))
    }
}

/// The summary of the run in `layout`; errors name the file.
pub fn read_summary(layout: &RunLayout) -> anyhow::Result<RunSummary> {
    let p = layout.summary();
    let text = crate::fsio::read_to_string(&p)?;
    serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}: not a run summary: {e}", p.display()))
}

/// The metrics of the run in `layout`; a last line cut short by a kill is dropped.
fn read_metrics(layout: &RunLayout) -> anyhow::Result<Vec<MetricLine>> {
    let p = layout.metrics();
    let text = std::fs::read_to_string(&p).map_err(io(&p))?;
    let mut out = Vec::new();
    let count = text.lines().count();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(line) {
            Ok(m) => out.push(m),
            // A last line cut short by a crash is dropped; earlier lines stay usable.
            Err(_) if i + 1 == count => break,
            Err(e) => anyhow::bail!("{}: line {}: {e}", p.display(), i + 1),
        }
    }
    Ok(out)
}

impl RunDir {
    /// Re-opens the existing run folder of `layout`, whose `lock` the caller holds, to continue
    /// it: only the metrics lines `keep` accepts stay (rewritten atomically); returns the folder
    /// and the metrics kept.
    pub fn reopen(
        layout: RunLayout,
        lock: RunLock,
        keep: impl Fn(&MetricLine) -> bool,
    ) -> anyhow::Result<(RunDir, Vec<MetricLine>)> {
        let id = layout
            .id()
            .ok_or_else(|| anyhow::anyhow!("{}: not a run folder", layout.root().display()))?;
        let mpath = layout.metrics();
        let kept: Vec<MetricLine> = if mpath.exists() {
            read_metrics(&layout)?
                .into_iter()
                .filter(|m| keep(m))
                .collect()
        } else {
            Vec::new()
        };
        let mut text = String::new();
        for m in &kept {
            text += &serde_json::to_string(m)?;
            text.push('\n');
        }
        write_atomic(&mpath, text.as_bytes())?;
        let metrics = std::fs::OpenOptions::new()
            .append(true)
            .open(&mpath)
            .map_err(io(&mpath))?;
        Ok((
            RunDir {
                id,
                path: layout.root().to_path_buf(),
                layout,
                metrics,
                _lock: lock,
            },
            kept,
        ))
    }

    /// Appends one metrics line (flushed, so a crash keeps what was written).
    pub fn append(&mut self, line: &MetricLine) -> anyhow::Result<()> {
        let mut s = serde_json::to_string(line)?;
        s.push('\n');
        if std::env::var_os(crate::fsio::FAULT_ENV).is_some() {
            // Test hook: a line cut in half by a kill.
            let half = s.len() / 2;
            self.metrics
                .write_all(&s.as_bytes()[..half])
                .map_err(io(&self.layout.metrics()))?;
            crate::fsio::fault_point("metrics-half-line");
            s.drain(..half);
        }
        self.metrics
            .write_all(s.as_bytes())
            .and_then(|_| self.metrics.flush())
            .map_err(io(&self.layout.metrics()))
    }

    /// Writes `summary.json` atomically.
    pub fn write_summary(&self, s: &RunSummary) -> anyhow::Result<()> {
        write_summary(&self.layout, s)
    }
}

/// Writes the `summary.json` of the run in `layout` atomically.
pub fn write_summary(layout: &RunLayout, s: &RunSummary) -> anyhow::Result<()> {
    write_atomic(
        &layout.summary(),
        serde_json::to_string_pretty(s)?.as_bytes(),
    )?;
    Ok(())
}

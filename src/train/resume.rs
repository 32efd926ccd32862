//! Continuing a stopped or killed run from its folder ([`resume`]), or training a new run from
//! a finished one's config ([`train_again`]).

use std::path::Path;
use std::time::Instant;

use anyhow::Context;

use super::checkpoint;
use super::config::TrainConfig;
use super::events::{Controller, Event, Phase, RunFailure};
use super::layout::{RunLayout, RunLock};
use super::limits::total_steps;
use super::store::{MetricLine, RunDir, RunStatus, RunStore, RunSummary, read_summary};
use super::trainer::{Start, drive, new_summary, optimisers, prepare, train};
use crate::memory;

/// Continues the run in `run_path` from its newest good checkpoint (written every
/// `optim.checkpoint_every` steps and when a run stops; a save cut short by a kill is finished
/// or undone, a damaged checkpoint refused): the same config, the trainable values and
/// optimiser state as saved, the batch order replayed, metrics after the checkpoint
/// discarded. The result equals an uninterrupted run. A run killed before its first
/// checkpoint starts again from step 0; a finished run is refused (see [`train_again`]).
pub fn resume(
    run_path: &Path,
    ctl: &mut dyn Controller,
    emit: &mut dyn FnMut(Event),
) -> Result<RunSummary, RunFailure> {
    let started = Instant::now();
    memory::reset_peak_rss();
    emit(Event::Phase(Phase::Loading));
    let layout = RunLayout::new(run_path);
    if !layout.config().is_file() {
        return Err(anyhow::anyhow!(
            "{}: not a run folder (it has no {})",
            run_path.display(),
            super::layout::CONFIG_FILE
        )
        .into());
    }
    let lock = RunLock::acquire(&layout).map_err(anyhow::Error::from)?;
    let cfg = TrainConfig::from_preset(&layout.config(), &[]).map_err(anyhow::Error::from)?;
    // A run killed before its first summary has none: it starts afresh.
    let recorded = match layout.summary().exists() {
        true => Some(read_summary(&layout)?),
        false => None,
    };
    if let Some(s) = recorded
        .as_ref()
        .filter(|s| s.status == RunStatus::Finished)
    {
        return Err(anyhow::anyhow!(
            "{}: the run is finished ({} of {} steps); there is nothing to resume (`train --resume {} --force` trains a new run from its config)",
            run_path.display(),
            s.steps_done,
            s.total_steps,
            run_path.display()
        )
        .into());
    }
    // The checkpoint is checked before the (slower) loading of model and data.
    let early = match &recorded {
        Some(s) => Some(
            checkpoint::load(&layout, s.total_steps, &mut |m| emit(Event::Log(m)))
                .map_err(anyhow::Error::from)?,
        ),
        None => None,
    };
    let mut p = prepare(&cfg)?;
    let total = total_steps(&cfg, p.work.train_len()).map_err(anyhow::Error::msg)?;
    let (mut summary, ckpt) = match (recorded, early) {
        (Some(s), Some(ckpt)) => {
            if s.total_steps != total {
                return Err(anyhow::anyhow!(
                    "{}: `total_steps` is {}, but its config and data give {total} steps: the run's files do not belong together",
                    layout.summary().display(),
                    s.total_steps
                )
                .into());
            }
            (s, ckpt)
        }
        _ => {
            let ckpt = checkpoint::load(&layout, total, &mut |m| emit(Event::Log(m)))
                .map_err(anyhow::Error::from)?;
            let id = layout.id().unwrap_or_default();
            let now = chrono::Local::now().to_rfc3339();
            (
                new_summary(&cfg, (p.trainable, p.total), &id, total, now),
                ckpt,
            )
        }
    };
    let mut opts = optimisers(&cfg, &p)?;
    let (step, train_secs) = match &ckpt {
        Some(c) => {
            let groups = &c.meta.optimizer_steps;
            if groups.len() != opts.len() {
                return Err(anyhow::anyhow!(
                    "{}: `optimizer_steps` has {} parameter groups, the run {}",
                    c.state_path.with_file_name(checkpoint::META_FILE).display(),
                    groups.len(),
                    opts.len()
                )
                .into());
            }
            for (k, (opt, _)) in opts.iter_mut().enumerate() {
                opt.load_state(&format!("group{k}"), &c.tensors, groups[k])
                    .with_context(|| format!("{}", c.state_path.display()))?;
            }
            (c.meta.step, c.meta.train_secs)
        }
        None => {
            emit(Event::Log(format!(
                "{}: no checkpoint yet; the run starts again from step 0",
                run_path.display()
            )));
            (0, 0.0)
        }
    };
    drop(ckpt);
    let eval_every = cfg.optim.eval_every;
    // What an uninterrupted run would hold at `step`: evaluations made only because a run
    // stopped there are dropped.
    let keep = |m: &MetricLine| match m {
        MetricLine::Step { step: s, .. } => *s <= step,
        MetricLine::Eval(e) => e.step <= step && (e.step % eval_every == 0 || e.step == total),
    };
    let (run, kept) = RunDir::reopen(layout, lock, keep)?;
    let mut start = Start {
        step,
        losses: Vec::new(),
        evals: Vec::new(),
        train_secs,
    };
    for m in kept {
        match m {
            MetricLine::Step { loss, .. } => start.losses.push(loss),
            MetricLine::Eval(e) => start.evals.push(e),
        }
    }
    summary.status = RunStatus::Running;
    summary.error = None;
    summary.steps_done = step;
    emit(Event::Log(format!(
        "resuming {} from step {step}",
        summary.id
    )));
    drive(&cfg, &mut p, run, summary, opts, start, started, ctl, emit)
}

/// Trains a new run, in the same store, from the config of the run in `run_path` (the
/// `--force` of a resumed finished run).
pub fn train_again(
    run_path: &Path,
    ctl: &mut dyn Controller,
    emit: &mut dyn FnMut(Event),
) -> Result<RunSummary, RunFailure> {
    let layout = RunLayout::new(run_path);
    let cfg = TrainConfig::from_preset(&layout.config(), &[]).map_err(anyhow::Error::from)?;
    let store = RunStore::new(run_path.parent().unwrap_or(Path::new(".")));
    train(&cfg, &store, ctl, emit)
}

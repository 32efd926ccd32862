//! What a run reports while it trains, and how it is steered between steps.

use super::store::{EvalPoint, RunSummary};

/// A run's phase, for the state line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Loading data and model, building the adapter.
    Loading,
    /// Optimiser steps.
    Training,
    /// Evaluating on the held-out split.
    Evaluating,
    /// Writing the adapter and summary.
    Saving,
    /// Waiting for resume.
    Paused,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::Loading => "loading",
            Phase::Training => "training",
            Phase::Evaluating => "evaluating",
            Phase::Saving => "saving",
            Phase::Paused => "paused",
        })
    }
}

/// Events of one run, in order: `Started`, then `Phase`/`Step`/`Eval`/`Log`, then `Finished`
/// (any status) or `Failed` before a run folder existed.
#[derive(Debug, Clone)]
pub enum RunEvent {
    /// The run has a folder and knows its size.
    Started {
        /// Run id.
        run_id: String,
        /// Display name.
        name: String,
        /// Method column.
        method: String,
        /// Trainable values.
        trainable: usize,
        /// All values.
        total: usize,
        /// Optimiser steps planned.
        total_steps: usize,
        /// Model description.
        model: String,
    },
    /// The phase changed.
    Phase(Phase),
    /// One optimiser step.
    Step {
        /// Step (1-based).
        step: usize,
        /// Steps planned.
        total_steps: usize,
        /// Training loss.
        loss: f64,
        /// Learning rate used.
        lr: f64,
        /// Mean seconds per step so far.
        secs_per_step: f64,
    },
    /// An evaluation.
    Eval(EvalPoint),
    /// A message for the log.
    Log(String),
    /// The run ended (finished, stopped or failed after it started); the summary is on disk.
    Finished(Box<RunSummary>),
}

/// What the controller says between steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Go on.
    Continue,
    /// Stop now, keeping what was done.
    Stop,
}

/// Asked between steps; may block while paused.
pub trait Controller {
    /// Continue or stop. A pausing controller blocks here until resumed or stopped.
    fn check(&mut self) -> Control;
}

/// A controller that never stops.
pub struct NeverStop;

impl Controller for NeverStop {
    fn check(&mut self) -> Control {
        Control::Continue
    }
}

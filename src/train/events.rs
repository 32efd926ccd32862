//! What a run reports while it trains, and how it is steered between steps.

use super::store::{EvalPoint, RunSummary};
use super::try_it::{TryItEvent, TryItRequest};
use crate::personalize::job::PersonaliseEvent;

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

/// What a run reports. The trainer sends, in order, `Phase`, `RunStarted`, then `Phase`,
/// `Step`, `Eval` and `Log`; whoever drives it (the worker) sends the closing `RunFinished` or
/// `RunFailed` from its result, and `Refused` for commands it cannot carry out.
#[derive(Debug, Clone)]
pub enum Event {
    /// The run's phase changed (loading, training, evaluating, saving, paused).
    Phase(Phase),
    /// A run started: it has a folder and knows its size.
    RunStarted {
        /// Run id (its folder under the run store).
        run_id: String,
        /// Display name.
        name: String,
        /// `lora`, `svfit`, `loldu`, `full` or `head`.
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
    /// An evaluation on the held-out split.
    Eval(EvalPoint),
    /// A message for the log.
    Log(String),
    /// The run ended normally: finished every step, or stopped on request.
    RunFinished(Box<RunSummary>),
    /// The run failed (bad input, a NaN loss, a panic). `summary` is set when the run had
    /// started and its folder records the failure.
    RunFailed {
        /// What went wrong, in words for the user.
        error: String,
        /// The recorded run, if it had started.
        summary: Option<Box<RunSummary>>,
    },
    /// A command could not be carried out (e.g. Start while a run is in progress).
    Refused(String),
    /// Progress of a Try-it prompt (answered between steps, or by the idle worker).
    TryIt(TryItEvent),
    /// Progress and end of a personalisation (sent by the worker, never by a training run).
    Personalise(PersonaliseEvent),
}

/// A run that failed: the error, and the run's record when it had started.
#[derive(Debug)]
pub struct RunFailure {
    /// What went wrong.
    pub error: anyhow::Error,
    /// The run as recorded (status failed), if it had a folder.
    pub summary: Option<Box<RunSummary>>,
}

impl std::fmt::Display for RunFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.error)
    }
}

impl std::error::Error for RunFailure {}

impl From<anyhow::Error> for RunFailure {
    fn from(error: anyhow::Error) -> Self {
        Self {
            error,
            summary: None,
        }
    }
}

/// What the controller says between steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Go on.
    Continue,
    /// Stop now, keeping what was done.
    Stop,
    /// A paused run got requests (see [`Controller::take_try_it`]): serve them, then ask
    /// again (the run stays paused). Requests are taken after every check whatever it says.
    Serve,
}

/// Asked between steps; may block while paused.
pub trait Controller {
    /// Continue or stop. A pausing controller blocks here until resumed or stopped.
    fn check(&mut self) -> Control;

    /// Try-it prompts that arrived since the last call, for the run to answer with the model
    /// it is training.
    fn take_try_it(&mut self) -> Vec<TryItRequest> {
        Vec::new()
    }
}

/// A controller that never stops.
pub struct NeverStop;

impl Controller for NeverStop {
    fn check(&mut self) -> Control {
        Control::Continue
    }
}

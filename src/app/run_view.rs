//! The live run as the window shows it: its state line, progress and curves, updated from the
//! worker's events.

use std::time::Instant;

use crate::train::{MetricLine, Phase, RunStatus, RunSummary, TrainConfig};
use crate::worker::Event;

/// The state line.
#[derive(Debug, Clone, PartialEq)]
pub enum UiState {
    /// Nothing has run yet.
    Idle,
    /// Loading data and model.
    Loading,
    /// Optimiser steps.
    Training,
    /// Evaluating.
    Evaluating,
    /// Writing results.
    Saving,
    /// Paused between steps.
    Paused,
    /// Completed every step.
    Finished,
    /// Stopped on request.
    Stopped,
    /// Failed, with the reason.
    Failed(String),
}

impl UiState {
    /// Whether a run is in progress (Train disabled, Stop enabled).
    pub fn is_busy(&self) -> bool {
        matches!(
            self,
            UiState::Loading
                | UiState::Training
                | UiState::Evaluating
                | UiState::Saving
                | UiState::Paused
        )
    }

    /// The words of the state line.
    pub fn describe(&self) -> String {
        match self {
            UiState::Idle => "ready".into(),
            UiState::Loading => "loading".into(),
            UiState::Training => "training".into(),
            UiState::Evaluating => "evaluating".into(),
            UiState::Saving => "saving".into(),
            UiState::Paused => "paused".into(),
            UiState::Finished => "finished".into(),
            UiState::Stopped => "stopped".into(),
            UiState::Failed(why) => format!("failed: {why}"),
        }
    }
}

/// The current (or last) run.
#[derive(Debug, Clone)]
pub struct RunView {
    /// State line.
    pub state: UiState,
    /// Run id, once started.
    pub run_id: Option<String>,
    /// Display name.
    pub name: String,
    /// Steps done.
    pub step: usize,
    /// Steps planned.
    pub total_steps: usize,
    /// Mean seconds per step.
    pub secs_per_step: f64,
    /// Trainable values.
    pub trainable: usize,
    /// All values.
    pub total: usize,
    /// Model description.
    pub model: String,
    /// (step, training loss).
    pub train_loss: Vec<[f64; 2]>,
    /// (step, eval loss).
    pub eval_loss: Vec<[f64; 2]>,
    /// (step, eval accuracy).
    pub eval_accuracy: Vec<[f64; 2]>,
    /// Log lines.
    pub log: Vec<String>,
    started: Option<Instant>,
}

impl Default for RunView {
    fn default() -> Self {
        Self {
            state: UiState::Idle,
            run_id: None,
            name: String::new(),
            step: 0,
            total_steps: 0,
            secs_per_step: 0.0,
            trainable: 0,
            total: 0,
            model: String::new(),
            train_loss: Vec::new(),
            eval_loss: Vec::new(),
            eval_accuracy: Vec::new(),
            log: Vec::new(),
            started: None,
        }
    }
}

impl RunView {
    /// A run that was just requested.
    pub fn starting(cfg: &TrainConfig) -> Self {
        Self {
            state: UiState::Loading,
            name: cfg.label(),
            started: Some(Instant::now()),
            ..Self::default()
        }
    }

    /// A stored run that is being resumed: its curves so far, from its metrics.
    pub fn resuming(summary: &RunSummary, metrics: &[MetricLine]) -> Self {
        let mut v = Self {
            state: UiState::Loading,
            run_id: Some(summary.id.clone()),
            name: summary.name.clone(),
            step: summary.steps_done,
            total_steps: summary.total_steps,
            trainable: summary.trainable,
            total: summary.total,
            started: Some(Instant::now()),
            ..Self::default()
        };
        for m in metrics {
            match m {
                MetricLine::Step { step, loss, .. } => v.train_loss.push([*step as f64, *loss]),
                MetricLine::Eval(e) => {
                    v.eval_loss.push([e.step as f64, e.loss]);
                    v.eval_accuracy.push([e.step as f64, e.accuracy]);
                }
            }
        }
        v
    }

    /// Seconds left, from the mean step time.
    pub fn eta_secs(&self) -> Option<f64> {
        (self.step > 0 && self.state.is_busy()).then(|| {
            (self.total_steps - self.step.min(self.total_steps)) as f64 * self.secs_per_step
        })
    }

    /// Seconds since the run was requested.
    pub fn elapsed_secs(&self) -> f64 {
        self.started.map_or(0.0, |s| s.elapsed().as_secs_f64())
    }

    /// Applies a worker event.
    pub fn apply(&mut self, e: Event) {
        match e {
            Event::Phase(p) => {
                self.state = match p {
                    Phase::Loading => UiState::Loading,
                    Phase::Training => UiState::Training,
                    Phase::Evaluating => UiState::Evaluating,
                    Phase::Saving => UiState::Saving,
                    Phase::Paused => UiState::Paused,
                }
            }
            Event::RunStarted {
                run_id,
                name,
                trainable,
                total,
                total_steps,
                model,
                ..
            } => {
                self.run_id = Some(run_id);
                self.name = name;
                self.trainable = trainable;
                self.total = total;
                self.total_steps = total_steps;
                self.model = model;
            }
            Event::Step {
                step,
                total_steps,
                loss,
                secs_per_step,
                ..
            } => {
                self.step = step;
                self.total_steps = total_steps;
                self.secs_per_step = secs_per_step;
                // A resumed run continues from its checkpoint: later points are replaced.
                truncate_from(&mut self.train_loss, step as f64);
                self.train_loss.push([step as f64, loss]);
            }
            Event::Eval(e) => {
                truncate_from(&mut self.eval_loss, e.step as f64);
                truncate_from(&mut self.eval_accuracy, e.step as f64);
                self.eval_loss.push([e.step as f64, e.loss]);
                self.eval_accuracy.push([e.step as f64, e.accuracy]);
            }
            Event::Log(t) => self.log.push(t),
            Event::RunFinished(s) => {
                self.state = match s.status {
                    RunStatus::Stopped => UiState::Stopped,
                    RunStatus::Failed => UiState::Failed(s.error.clone().unwrap_or_default()),
                    _ => UiState::Finished,
                };
                self.run_id = Some(s.id.clone());
            }
            Event::RunFailed { error, .. } => {
                let first = error.lines().next().unwrap_or("").to_string();
                self.state = UiState::Failed(first);
            }
            Event::Refused(why) => self.log.push(why),
            // The Try-it panel and the Personalise tab take these.
            Event::TryIt(_) | Event::Personalise(_) => {}
        }
    }
}

/// Drops the points at `step` and after.
fn truncate_from(points: &mut Vec<[f64; 2]>, step: f64) {
    while points.last().is_some_and(|p| p[0] >= step) {
        points.pop();
    }
}

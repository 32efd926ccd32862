//! Training: configuration and its limits, the loop, batches, events and the run store.

pub mod batches;
pub mod config;
pub mod events;
pub mod limits;
pub mod optim;
pub mod store;
pub mod trainer;

pub use config::{ModelConfig, OptimConfig, Schedule, TrainConfig, TrainMode};
pub use events::{Control, Controller, Event, NeverStop, Phase, RunFailure};
pub use store::{EvalPoint, MetricLine, RunStatus, RunStore, RunSummary};
pub use trainer::{evaluate, reload_and_evaluate, resume, train};

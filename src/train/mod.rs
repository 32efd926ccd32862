//! Training: configuration ([`config`]) and its limits ([`limits`]), the loop ([`trainer`],
//! [`optim`], [`batches`]), what a run reports and how it is stopped ([`events`],
//! [`interrupt`]), and the run store: the folder of runs ([`store`]), the files of one run and
//! its lock ([`layout`]), and its resumable state ([`checkpoint`]).

pub mod batches;
pub mod causal_lm;
pub mod checkpoint;
pub mod config;
pub mod events;
pub mod interrupt;
pub mod layout;
pub mod limits;
pub mod lm_batches;
pub mod optim;
pub mod resume;
pub mod saved;
pub mod store;
pub mod trainer;
pub mod try_it;
pub mod work;

pub use config::{ModelConfig, OptimConfig, Schedule, TrainConfig, TrainMode};
pub use events::{Control, Controller, Event, NeverStop, Phase, RunFailure};
pub use interrupt::SignalStop;
pub use layout::{RunLayout, RunLock};
pub use resume::{resume, train_again};
pub use saved::reload_and_evaluate;
pub use store::{EvalPoint, MetricLine, RunStatus, RunStore, RunSummary};
pub use trainer::{evaluate, train};

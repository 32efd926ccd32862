//! Handing a run to the field's distributed engine and taking the result back.
//!
//! - [`export`]: `peft-studio export-job`: a preset or run as a folder holding a transformers +
//!   PEFT + accelerate `train.py`, the data as JSONL, `job.json`, accelerate configs
//!   (single GPU, multi-GPU, multi-node, DeepSpeed ZeRO-2/3, two CPU processes), pinned
//!   requirements and a README.
//! - [`spec`]: `job.json`, what `train.py` reads.
//! - [`data`]: the run's split as JSONL.
//! - [`assets`]: the Python files and templates (from `assets/job/`), compiled in.
//! - [`import`]: `peft-studio import-run`: the job's output as a run of the run store.

pub mod assets;
pub mod data;
pub mod export;
pub mod import;
pub mod spec;

pub use export::{ExportJobOptions, ExportedJob, export_job, source_config};
pub use import::{ImportedRun, RunOrigin, import_run, run_origin};
pub use spec::{JobSpec, JobTask};

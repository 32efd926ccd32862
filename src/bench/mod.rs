//! Benchmarks: seconds per training step and peak resident memory, written to `bench-results/`
//! as a markdown table and JSON.
//!
//! Each variant runs in its own child process (`peft-studio bench <suite> --variant V`), so
//! every peak-memory figure is that variant's alone. Where a peer exists (PyTorch + PEFT, see
//! [`peer`]) it runs in the same invocation, alternating with ours round by round, and the
//! tables give both figures, their ratio and the CPU they were measured on; without a peer the
//! table says so and quotes no figure from elsewhere.
//!
//! - [`cli`]: the `bench` command (argument checks, rounds, child processes, output files).
//! - [`llm`]: the SmolLM2-135M causal-LM step and its peer equivalent.
//! - [`minilm`](mod@minilm): the MiniLM variants (the real trainer) and their peer equivalents.
//! - [`stack`]: the frozen-backward stack of BERT-base-sized layers.
//! - [`peer`]: finding and running the peer.
//! - [`machine`]: CPU model and flags, page faults and CPU time.
//! - [`table`]: the markdown and JSON of a run.

pub mod cli;
pub mod llm;
pub mod machine;
pub mod minilm;
pub mod peer;
pub mod stack;
pub mod table;

use serde::{Deserialize, Serialize};

pub use cli::{BenchArgs, Suite, run};
pub use minilm::{MINILM_VARIANTS, minilm};
pub use stack::{StackShape, frozen_backward, lora_stack, seeded_normal, stack_forward};

use crate::peft::MatmulPrecision;

/// A bench variant's recipe without its precision suffix, and the precision: `lora-bf16` →
/// (`lora`, bf16); a variant without `-bf16` runs f32.
pub fn split_precision(variant: &str) -> (&str, MatmulPrecision) {
    match variant.strip_suffix("-bf16") {
        Some(base) => (base, MatmulPrecision::Bf16),
        None => (variant, MatmulPrecision::F32),
    }
}

/// One measured variant of ours.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepStats {
    /// What ran.
    pub variant: String,
    /// Timed steps.
    pub steps: usize,
    /// Median seconds per training step.
    pub secs_per_step: f64,
    /// Fastest step.
    pub best_secs: f64,
    /// Peak resident memory of the process, MiB.
    pub peak_rss_mib: f64,
    /// Trainable values.
    pub trainable: usize,
    /// Minor page faults per timed step (`/proc/self/stat`), where readable.
    #[serde(default)]
    pub minor_faults_per_step: Option<f64>,
    /// CPU use over the timed steps, % of one core (200 = two cores busy), where readable.
    #[serde(default)]
    pub cpu_percent: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_variant_names_its_precision_by_suffix() {
        assert_eq!(
            split_precision("lora-bf16"),
            ("lora", MatmulPrecision::Bf16)
        );
        assert_eq!(
            split_precision("full-bf16"),
            ("full", MatmulPrecision::Bf16)
        );
        assert_eq!(split_precision("qlora"), ("qlora", MatmulPrecision::F32));
        assert_eq!(split_precision("bf16"), ("bf16", MatmulPrecision::F32));
    }
}

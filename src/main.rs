//! The `peft-studio` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use peft_studio::arch::ArchSpec;
use peft_studio::bench::{self, StepStats};
use peft_studio::inspect::inspect;
use peft_studio::peft::{AdapterConfig, FrozenGrad, Method, Targets};

/// Keeps freed memory for reuse instead of returning it to the OS every step (glibc's
/// allocator did, costing ~30% of a training step in page faults).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "peft-studio",
    version,
    about = "Parameter-efficient fine-tuning: LoRA, SVFit and LoLDU on candle"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Per-module shapes and trainable counts of a model with an adapter (no weights needed).
    Inspect {
        /// A Hugging Face config.json, a model folder holding one, or a built-in name
        /// (bert-base-uncased, roberta-base, all-MiniLM-L6-v2, vit-base-patch16-224).
        #[arg(long)]
        model: String,
        /// lora, svfit or loldu.
        #[arg(long)]
        method: Method,
        /// Rank r.
        #[arg(long)]
        rank: usize,
        /// Alpha (scale = alpha / r); defaults to the rank.
        #[arg(long)]
        alpha: Option<f64>,
        /// Target modules: `query,value` (PEFT suffix rule), `re:<regex>`, or `all-linear`.
        #[arg(long, default_value = "query,value")]
        targets: String,
        /// SVFit / LoLDU: the scale trains too.
        #[arg(long)]
        trainable_scale: bool,
        /// Add a classification head with this many labels (trained fully).
        #[arg(long)]
        num_labels: Option<usize>,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Measure seconds per training step and peak memory; writes a markdown table.
    Bench {
        /// Which benchmark.
        suite: Suite,
        /// Timed steps per variant.
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// Where the table goes.
        #[arg(long, default_value = "bench-results/frozen_backward.md")]
        out: PathBuf,
        /// Internal: run one variant in this process and print its JSON.
        #[arg(long, hide = true)]
        variant: Option<Variant>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Suite {
    /// A LoRA training step on 12 frozen 768×768 layers, batch 16×64, before and after the
    /// frozen-matmul op.
    FrozenBackward,
}

#[derive(Clone, Copy, ValueEnum)]
enum Variant {
    Plain,
    Skip,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Inspect {
            model,
            method,
            rank,
            alpha,
            targets,
            trainable_scale,
            num_labels,
            json,
        } => {
            let arch = ArchSpec::resolve(&model, num_labels)?;
            let cfg = AdapterConfig {
                method,
                rank,
                alpha,
                targets: Targets::parse_cli(&targets),
                trainable_scale,
                ..AdapterConfig::default()
            };
            let report = inspect(&arch, &cfg)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.to_text());
            }
            Ok(())
        }
        Command::Bench {
            suite: Suite::FrozenBackward,
            steps,
            out,
            variant,
        } => {
            if let Some(v) = variant {
                let mode = match v {
                    Variant::Plain => FrozenGrad::Plain,
                    Variant::Skip => FrozenGrad::Skip,
                };
                let stats = bench::frozen_backward(mode, steps, 2)?;
                println!("{}", serde_json::to_string(&stats)?);
                return Ok(());
            }
            let exe =
                std::env::current_exe().context("finding this program to run the variants")?;
            let mut rows = Vec::new();
            for v in ["plain", "skip"] {
                eprintln!("bench frozen-backward: running variant {v} ({steps} steps)…");
                let output = std::process::Command::new(&exe)
                    .args([
                        "bench",
                        "frozen-backward",
                        "--steps",
                        &steps.to_string(),
                        "--variant",
                        v,
                    ])
                    .output()
                    .with_context(|| format!("running variant {v}"))?;
                if !output.status.success() {
                    bail!(
                        "variant {v} failed: {}",
                        String::from_utf8_lossy(&output.stderr)
                    );
                }
                let stats: StepStats = serde_json::from_slice(&output.stdout)
                    .with_context(|| format!("reading variant {v}'s result"))?;
                rows.push(stats);
            }
            let mut table = bench::markdown_table(
                "LoRA r=8 training step: 12 frozen 768×768 layers + GELU, batch 16×64, AdamW (2 CPU cores)",
                &rows,
            );
            let speedup = rows[0].secs_per_step / rows[1].secs_per_step;
            table += &format!(
                "\nstep time: {:.1}% less; peak RSS: {:.0} → {:.0} MiB\n",
                100.0 * (1.0 - 1.0 / speedup),
                rows[0].peak_rss_mib,
                rows[1].peak_rss_mib
            );
            print!("{table}");
            if let Some(dir) = out.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            peft_studio::peft::checkpoint::write_atomic(&out, table.as_bytes())?;
            eprintln!("wrote {}", out.display());
            Ok(())
        }
    }
}

//! The `bench` command: checks its arguments before any work, runs every variant in a child
//! process (and the peer beside it) for the requested rounds, and writes the markdown table and
//! the JSON record.

use std::path::{Path, PathBuf};

use anyhow::Context;

use super::llm;
use super::machine::CpuInfo;
use super::minilm::{self, MINILM_DIR};
use super::peer::Peer;
use super::table::{BenchRun, RoundResult};
use super::{StepStats, frozen_backward};
use crate::device::DeviceChoice;
use crate::peft::FrozenGrad;

/// Which benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Suite {
    /// A LoRA training step on 12 frozen 768×768 layers, batch 16×64, before and after the
    /// frozen-matmul op.
    FrozenBackward,
    /// A training step of all-MiniLM-L6-v2 (batch 16 × 64 tokens, AdamW) with LoRA r=8 on
    /// query/value, SVFit and LoLDU at full rank, and full fine-tuning, side by side with the
    /// PyTorch + PEFT peer when one is installed. Needs `scripts/fetch-models.sh`.
    Minilm,
    /// A causal-LM training step of SmolLM2-135M (batch 4 × 256 tokens, AdamW) with LoRA r=8
    /// on q_proj/v_proj and full fine-tuning, side by side with the peer's `llm_step.py` on
    /// the same f32 weights. Needs the peer's `setup.sh`.
    Smollm2,
}

impl Suite {
    /// The name on the command line and of the default output file.
    pub fn name(self) -> &'static str {
        match self {
            Suite::FrozenBackward => "frozen-backward",
            Suite::Minilm => "minilm",
            Suite::Smollm2 => "smollm2",
        }
    }

    /// Every variant key, in run order.
    pub fn variants(self) -> Vec<&'static str> {
        match self {
            Suite::FrozenBackward => vec!["plain", "skip"],
            Suite::Minilm => minilm::MINILM_VARIANTS.iter().map(|(n, _)| *n).collect(),
            Suite::Smollm2 => llm::LLM_VARIANTS.to_vec(),
        }
    }

    fn title(self, threads: usize) -> String {
        match self {
            Suite::FrozenBackward => format!(
                "LoRA r=8 training step: 12 frozen 768×768 layers + GELU, batch 16×64, AdamW ({threads} threads)"
            ),
            Suite::Minilm => format!(
                "all-MiniLM-L6-v2 training step, batch 16 × 64 tokens, AdamW ({threads} threads), side by side with PyTorch + PEFT"
            ),
            Suite::Smollm2 => format!(
                "SmolLM2-135M causal-LM training step, batch 4 × 256 tokens (all trained), AdamW, and greedy generation ({threads} threads), side by side with PyTorch + PEFT"
            ),
        }
    }
}

/// Arguments of `peft-studio bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Which benchmark.
    pub suite: Suite,
    /// Timed steps per variant and round (1–10000).
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Rounds (1–20): every variant, ours then the peer's, runs once per round.
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// CPU threads for ours and the peer (1–1024).
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Only these variants (comma-separated; default: all of the suite).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Where ours computes: auto, cpu, cuda:N (the peer stays on the CPU).
    #[arg(long, default_value = "cpu")]
    pub device: DeviceChoice,
    /// Do not run the peer even when it is installed.
    #[arg(long)]
    pub no_peer: bool,
    /// Where the table goes (default: `bench-results/<suite>.md`; the JSON goes beside it).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Internal: run one variant in this process and print its JSON.
    #[arg(long, hide = true)]
    pub variant: Option<String>,
}

impl BenchArgs {
    /// Checks every argument; the error names the option, the value and the allowed range.
    pub fn validate(&self) -> anyhow::Result<()> {
        let range = |name: &str, v: usize, lo: usize, hi: usize| {
            anyhow::ensure!(
                (lo..=hi).contains(&v),
                "--{name} must be {lo} to {hi}, got {v}"
            );
            Ok(())
        };
        range("steps", self.steps, 1, 10_000)?;
        range("rounds", self.rounds, 1, 20)?;
        range("threads", self.threads, 1, 1024)?;
        let known = self.suite.variants();
        for v in self.only.iter().chain(self.variant.iter()) {
            anyhow::ensure!(
                known.contains(&v.as_str()),
                "unknown variant `{v}` for bench {} (one of: {})",
                self.suite.name(),
                known.join(", ")
            );
        }
        if let Some(out) = &self.out {
            anyhow::ensure!(
                out.file_name().is_some() && !out.is_dir(),
                "--out {} must be a file path",
                out.display()
            );
        }
        Ok(())
    }

    fn selected(&self) -> Vec<&'static str> {
        self.suite
            .variants()
            .into_iter()
            .filter(|v| self.only.is_empty() || self.only.iter().any(|o| o == v))
            .collect()
    }
}

/// Runs `peft-studio bench`.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    args.validate()?;
    if let Some(v) = &args.variant {
        let stats = run_variant_here(args.suite, v, args.steps, args.device)?;
        println!("{}", serde_json::to_string(&stats)?);
        return Ok(());
    }
    let variants = args.selected();
    if args.suite == Suite::Minilm {
        minilm::check_inputs(&variants)?;
    }
    let llm_dir = match args.suite {
        Suite::Smollm2 => Some(llm::model_dir()?),
        _ => None,
    };
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("bench-results/{}.md", args.suite.name())));
    check_writable(&out)?;
    let has_peer = matches!(args.suite, Suite::Minilm | Suite::Smollm2);
    let script = match args.suite {
        Suite::Smollm2 => "llm_step.py",
        _ => "minilm_step.py",
    };
    let peer = match (has_peer, args.no_peer) {
        (false, _) => Err("this benchmark has no peer".to_string()),
        (true, true) => Err("--no-peer was given".to_string()),
        (true, false) => Peer::find(script),
    };
    if let Err(why) = &peer
        && has_peer
    {
        eprintln!("bench: no peer: {why}");
    }
    let model_dir = Path::new(MINILM_DIR)
        .canonicalize()
        .unwrap_or_else(|_| PathBuf::from(MINILM_DIR));
    let exe = std::env::current_exe().context("finding this program to run the variants")?;
    let mut record = BenchRun {
        suite: args.suite.name().into(),
        title: args.suite.title(args.threads),
        date: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        cpu: CpuInfo::detect(),
        device: device_description(args.device)?,
        threads: args.threads,
        steps: args.steps,
        rounds: args.rounds,
        has_peer,
        peer_python: peer.as_ref().ok().map(|p| p.python.display().to_string()),
        peer_missing: if has_peer { peer.clone().err() } else { None },
        results: Vec::new(),
    };
    for round in 1..=args.rounds {
        for v in &variants {
            eprintln!(
                "bench {}: round {round}/{}, {v}: peft-studio ({} steps)…",
                args.suite.name(),
                args.rounds,
                args.steps
            );
            let ours = run_child(&exe, &args, v)?;
            let (mut peer_stats, mut peer_error) = (None, None);
            let peer_args = match (&llm_dir, minilm::peer_mode(v)) {
                (Some(dir), _) => Some(llm::peer_args(v, args.steps, args.threads, dir)),
                (None, Some(mode)) => Some(minilm::peer_args(
                    mode,
                    args.steps,
                    args.threads,
                    &model_dir,
                )),
                (None, None) => None,
            };
            if let (Ok(p), Some(peer_args)) = (&peer, peer_args) {
                eprintln!(
                    "bench {}: round {round}/{}, {v}: peer…",
                    args.suite.name(),
                    args.rounds
                );
                match p.run(script, &peer_args, args.threads) {
                    Ok(s) => peer_stats = Some(s),
                    Err(e) => {
                        eprintln!("bench: {e:#}");
                        peer_error = Some(format!("{e:#}"));
                    }
                }
            }
            record.results.push(RoundResult {
                round,
                variant: v.to_string(),
                ours,
                peer: peer_stats,
                peer_error,
            });
        }
        // Every finished round is on disk: an interrupted run keeps what it measured.
        let table = write_record(&record, &out, round < args.rounds)?;
        if round == args.rounds {
            print!("{table}");
        }
    }
    Ok(())
}

/// Writes the table (returned) and the JSON beside it; `partial` marks an unfinished run.
fn write_record(record: &BenchRun, out: &Path, partial: bool) -> anyhow::Result<String> {
    let mut table = record.markdown();
    if record.suite == Suite::FrozenBackward.name() {
        table += &frozen_backward_note(record);
    }
    if partial {
        let done = record.results.last().map_or(0, |r| r.round);
        table += &format!(
            "\n**Partial**: {done} of {} rounds so far.\n",
            record.rounds
        );
    }
    write_file(out, table.as_bytes())?;
    let json = out.with_extension("json");
    write_file(&json, serde_json::to_string_pretty(record)?.as_bytes())?;
    eprintln!("wrote {} and {}", out.display(), json.display());
    Ok(table)
}

/// Writes a result file atomically (the run store's writer).
fn write_file(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    Ok(crate::fsio::write_atomic(path, bytes)?)
}

/// One variant in this process.
fn run_variant_here(
    suite: Suite,
    v: &str,
    steps: usize,
    device: DeviceChoice,
) -> anyhow::Result<StepStats> {
    match (suite, v) {
        (Suite::FrozenBackward, "plain") => {
            frozen_backward(FrozenGrad::Plain, steps, 2, &device.resolve()?)
        }
        (Suite::FrozenBackward, "skip") => {
            frozen_backward(FrozenGrad::Skip, steps, 2, &device.resolve()?)
        }
        (Suite::Minilm, v) => minilm::minilm(v, steps, device),
        (Suite::Smollm2, v) => llm::llm_step(v, steps, &device.resolve()?),
        (s, v) => anyhow::bail!("unknown variant `{v}` for bench {}", s.name()),
    }
}

/// One variant in a child process (its own peak RSS), on `args.threads` threads.
fn run_child(exe: &Path, args: &BenchArgs, v: &str) -> anyhow::Result<StepStats> {
    let output = std::process::Command::new(exe)
        .args(["bench", args.suite.name(), "--steps"])
        .arg(args.steps.to_string())
        .args(["--threads", &args.threads.to_string(), "--variant", v])
        .args(["--device", &args.device.to_string()])
        .env("RAYON_NUM_THREADS", args.threads.to_string())
        .output()
        .with_context(|| format!("running variant {v}"))?;
    anyhow::ensure!(
        output.status.success(),
        "variant {v} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).with_context(|| format!("reading variant {v}'s result"))
}

/// What the table says ours ran on; fails now when the device cannot be opened.
fn device_description(choice: DeviceChoice) -> anyhow::Result<String> {
    let device = choice.resolve()?;
    let label = crate::device::label(&device);
    Ok(crate::device::available()
        .into_iter()
        .find(|d| d.choice.to_string() == label)
        .filter(|_| !device.is_cpu())
        .map_or(label, |d| d.describe()))
}

/// Fails now, not after minutes of work, when `out` cannot be written.
fn check_writable(out: &Path) -> anyhow::Result<()> {
    let dir = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let probe = dir.join(format!(".bench-write-test-{}", std::process::id()));
    std::fs::write(&probe, b"")
        .with_context(|| format!("--out {}: cannot write in {}", out.display(), dir.display()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

fn frozen_backward_note(r: &BenchRun) -> String {
    let sums = r.summaries();
    match (
        sums.iter().find(|s| s.variant == "plain"),
        sums.iter().find(|s| s.variant == "skip"),
    ) {
        (Some(p), Some(s)) => format!(
            "\nstep time: {:.1}% less; peak RSS: {:.0} → {:.0} MiB\n",
            100.0 * (1.0 - s.ours_secs / p.ours_secs),
            p.ours_rss_mib,
            s.ours_rss_mib
        ),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: BenchArgs,
    }

    fn parse(a: &[&str]) -> BenchArgs {
        Cli::try_parse_from(std::iter::once("bench").chain(a.iter().copied()))
            .unwrap()
            .args
    }

    #[test]
    fn every_bad_argument_gets_a_clear_error() {
        let cases: [(&[&str], &str); 7] = [
            (
                &["frozen-backward", "--steps", "0"],
                "--steps must be 1 to 10000, got 0",
            ),
            (
                &["minilm", "--rounds", "0"],
                "--rounds must be 1 to 20, got 0",
            ),
            (&["minilm", "--rounds", "21"], "--rounds must be 1 to 20"),
            (&["minilm", "--threads", "0"], "--threads must be 1 to 1024"),
            (
                &["minilm", "--only", "lora,qlora"],
                "unknown variant `qlora`",
            ),
            (
                &["frozen-backward", "--variant", "lora"],
                "one of: plain, skip",
            ),
            (&["minilm", "--out", "/"], "must be a file path"),
        ];
        for (a, want) in cases {
            let err = parse(a).validate().unwrap_err().to_string();
            assert!(err.contains(want), "{a:?}: {err}");
        }
        assert!(parse(&["minilm"]).validate().is_ok());
        let only = parse(&["minilm", "--only", "full,lora"]);
        assert_eq!(only.selected(), ["lora", "full"]);
    }

    #[test]
    fn zero_steps_is_an_error_not_a_panic() {
        let err = frozen_backward(FrozenGrad::Skip, 0, 0, &candle_core::Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("at least 1"), "{err}");
    }

    #[test]
    fn unwritable_out_fails_before_any_work() {
        let file = std::env::temp_dir().join(format!("bench-out-file-{}", std::process::id()));
        std::fs::write(&file, b"x").unwrap();
        // A path under a regular file cannot be created.
        let err = check_writable(&file.join("t.md")).unwrap_err();
        assert!(format!("{err:#}").contains("creating"), "{err:#}");
        let _ = std::fs::remove_file(&file);
    }
}

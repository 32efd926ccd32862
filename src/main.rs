//! The `peft-studio` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

mod generate_cli;
mod job_cli;

use peft_studio::arch::ArchSpec;
use peft_studio::bench;
use peft_studio::device::DeviceChoice;
use peft_studio::fsio::write_atomic;
use peft_studio::inspect::inspect;
use peft_studio::peft::{AdapterConfig, Method, Targets};
use peft_studio::report;
use peft_studio::train::{
    Event, NeverStop, RunStatus, RunStore, RunSummary, SignalStop, TrainConfig,
};

/// Keeps freed memory for reuse instead of returning it to the OS every step (glibc's
/// allocator did, costing ~30% of a training step in page faults).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc itself hands emptied pages back to the OS 1 s after they are freed ("purge"), so
/// the buffers a training step frees and allocates again were faulted back in (zeroed by the
/// kernel) every step: up to 150,000 minor page faults per full fine-tuning step of MiniLM.
/// A 60 s delay keeps them across steps (a SmolLM2-135M step takes ~13 s; at 10 s its steps
/// still took 29,000 faults each, at 60 s about 10) and still returns memory a minute after
/// training stops.
fn keep_freed_pages_across_steps() {
    unsafe extern "C" {
        fn mi_option_get(option: i32) -> std::ffi::c_long;
        fn mi_option_set(option: i32, value: std::ffi::c_long);
    }
    /// `mi_option_purge_delay` in mimalloc v2 and v3 (libmimalloc-sys 0.1); its default, 10 or
    /// 1000 (ms), is checked before setting so another numbering cannot change another option.
    const PURGE_DELAY: i32 = 15;
    // SAFETY: plain C calls of mimalloc (linked in through the global allocator) on an option
    // index; both accept any index and value.
    unsafe {
        if matches!(mi_option_get(PURGE_DELAY), 10 | 1000) {
            mi_option_set(PURGE_DELAY, 60_000);
        }
    }
}

#[derive(Parser)]
#[command(
    name = "peft-studio",
    version,
    about = "Parameter-efficient fine-tuning: LoRA, SVFit and LoLDU on candle"
)]
struct Cli {
    /// Without a command, the studio window opens.
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Per-module shapes and trainable counts of a model with an adapter (no weights needed).
    Inspect {
        /// A Hugging Face config.json, a model folder holding one, or a built-in name
        /// (bert-base-uncased, roberta-base, all-MiniLM-L6-v2, vit-base-patch16-224,
        /// llama-2-7b, smollm2-135m).
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
        /// Target modules: `query,value` (PEFT suffix rule), `re:<regex>`, or `all-linear`
        /// (default: PEFT's, `query,value` for encoders, `q_proj,v_proj` for LLaMA-family models).
        #[arg(long)]
        targets: Option<String>,
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
    /// Fine-tune from a preset, with a progress bar and a closing summary.
    Train {
        /// The preset (TOML); without one, the built-in defaults (LoRA on the tiny ViT, MNIST 5k).
        #[arg(long)]
        preset: Option<PathBuf>,
        /// Override a preset value: `--set adapter.rank=16 --set optim.lr=0.01`.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// The run store.
        #[arg(long, default_value = "runs")]
        out: PathBuf,
        /// Copy the trained model folder here (full fine-tuning runs).
        #[arg(long)]
        export_model: Option<PathBuf>,
        /// Where it computes (overrides the preset's `device`): auto, cpu, cuda:N. A resumed
        /// run uses its own setting.
        #[arg(long)]
        device: Option<DeviceChoice>,
        /// Continue an interrupted run from its last checkpoint (`optim.checkpoint_every`):
        /// give its folder, e.g. `runs/20261129-004726-pretrain-…`.
        #[arg(long, conflicts_with_all = ["preset", "overrides", "device"])]
        resume: Option<PathBuf>,
        /// With `--resume` of a finished run: train a new run from its config instead of
        /// refusing.
        #[arg(long, requires = "resume")]
        force: bool,
    },
    /// Run several presets and print one comparison table; writes it as markdown and CSV beside
    /// a PNG of the loss curves.
    Compare {
        /// Presets to run, in order.
        #[arg(long = "preset", required = true)]
        presets: Vec<PathBuf>,
        /// Overrides applied to every preset.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// The run store; the table goes to `<out>/compare-<time>/`.
        #[arg(long, default_value = "runs")]
        out: PathBuf,
        /// Where every run computes (overrides the presets' `device`): auto, cpu, cuda:N.
        #[arg(long)]
        device: Option<DeviceChoice>,
    },
    /// Build a DiffLoRA personaliser from a preset: generator, LoRA bank, encoders,
    /// hypernetwork. Resumable: run the same command again to continue an interrupted build.
    DiffloraBuild {
        /// The preset (TOML), e.g. `presets/difflora-portraits-64.toml`.
        #[arg(long)]
        preset: PathBuf,
        /// Build only up to and including this stage.
        #[arg(long, value_enum, default_value = "all")]
        stage: peft_studio::personalize::build::Stage,
        /// Run only `--stage` (its inputs must already be built).
        #[arg(long)]
        only: bool,
        /// Where it computes: auto (a GPU when this binary has CUDA and one is present, else
        /// the CPU), cpu, cuda:N.
        #[arg(long)]
        device: Option<DeviceChoice>,
    },
    /// Train the attribute reader (names hair, skin, glasses, expression, background… in a
    /// portrait; trained on renders only) into a personaliser folder, for the prompt-adherence
    /// and identity-agreement scores of `eval-personalize` and the Personalise tab.
    AttributeReaderBuild {
        /// The preset (TOML), e.g. `presets/attribute-reader.toml`.
        #[arg(long)]
        preset: PathBuf,
        /// Where it computes: auto (a GPU when this binary has CUDA and one is present, else
        /// the CPU), cpu, cuda:N.
        #[arg(long)]
        device: Option<DeviceChoice>,
    },
    /// Personalise from reference photos (DiffLoRA, no fine-tuning): writes a gallery, the
    /// LoRA as an adapter folder and report.json.
    Personalize {
        /// A folder of one person's photos (or one image file).
        #[arg(long)]
        refs: PathBuf,
        /// What the portraits should show, e.g. "smile, blue background, hat".
        #[arg(long, default_value = "")]
        prompt: String,
        /// Images to generate.
        #[arg(long, default_value_t = 4)]
        n: usize,
        /// Seed of the LoRA sample and the gallery.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        /// A personaliser folder built by `difflora-build` (default: the built-in one).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Where it computes: auto (a GPU when this binary has CUDA and one is present, else
        /// the CPU), cpu, cuda:N.
        #[arg(long)]
        device: Option<DeviceChoice>,
    },
    /// Evaluate a personaliser on its held-out people: DiffLoRA vs the base generator vs direct
    /// LoRA fine-tuning (identity similarity by a separate encoder, parameter error, seconds).
    EvalPersonalize {
        /// A personaliser folder (default: the built-in one).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Reference images per person.
        #[arg(long, default_value_t = 4)]
        refs: usize,
        /// Images generated per person and path.
        #[arg(long, default_value_t = 4)]
        n: usize,
        /// Seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Output path without extension (default `bench-results/eval-<model folder>`); writes
        /// .md and .json.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Worker processes, each evaluating every `jobs`-th person single-threaded (the
        /// results equal one process's up to float summation order).
        #[arg(long, default_value_t = 1)]
        jobs: usize,
        /// Internal: evaluate shard `k/N` only and print its people's results as JSON.
        #[arg(long, hide = true)]
        shard: Option<String>,
        /// Where it computes: auto (a GPU when this binary has CUDA and one is present, else
        /// the CPU), cpu, cuda:N.
        #[arg(long)]
        device: Option<DeviceChoice>,
    },
    /// Time DiffLoRA against direct LoRA fine-tuning and a 4-image gallery on the built-in
    /// sample people; writes a markdown table.
    BenchPersonalize {
        /// A personaliser folder (default: the built-in one).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Where the table goes.
        #[arg(long, default_value = "bench-results/personalize.md")]
        out: PathBuf,
        /// Where it computes: auto (a GPU when this binary has CUDA and one is present, else
        /// the CPU), cpu, cuda:N.
        #[arg(long)]
        device: Option<DeviceChoice>,
    },
    /// Export a finished run: a PEFT adapter folder, a merged Hugging Face model folder, or
    /// llama.cpp's LoRA GGUF (LLaMA-family models).
    Export {
        /// The run folder, or a run id in `--runs`.
        run: PathBuf,
        /// peft, merged or gguf-lora.
        #[arg(long)]
        format: peft_studio::export::ExportFormat,
        /// The output folder (created; written atomically).
        #[arg(long)]
        out: PathBuf,
        /// Replace `--out` when it is a non-empty folder.
        #[arg(long)]
        force: bool,
        /// The run store a run id is looked up in.
        #[arg(long, default_value = "runs")]
        runs: PathBuf,
        /// Also write check_logits.json (a fixed input and the model's logits), for
        /// scripts/peft_interop.py.
        #[arg(long, hide = true)]
        write_check_logits: bool,
    },
    /// Measure seconds per training step and peak memory (side by side with the PyTorch + PEFT
    /// peer where one is installed); writes a markdown table and JSON to `bench-results/`.
    Bench(bench::BenchArgs),
    /// Generate text with a causal language model (a folder, a .gguf file or
    /// `smollm2-135m-instruct`), streaming the answer.
    Generate(generate_cli::GenerateArgs),
    /// Write a preset or run as a transformers + PEFT + accelerate job folder (train.py, data
    /// as JSONL, accelerate configs for one GPU, several GPUs or machines and DeepSpeed ZeRO,
    /// pinned requirements, a README with the launch commands).
    ExportJob(job_cli::ExportJobArgs),
    /// Import a finished job's output (metrics.jsonl, adapter folder) into the run store.
    ImportRun(job_cli::ImportRunArgs),
}

/// A run stopped by SIGINT/SIGTERM: the process exits with the shell's code for the signal.
#[derive(Debug, thiserror::Error)]
#[error("stopped by {} after {steps} of {total} steps; resume with `peft-studio train --resume {}`", SignalStop::name(*signal), folder.display())]
struct Interrupted {
    signal: i32,
    steps: usize,
    total: usize,
    folder: PathBuf,
}

fn main() -> ExitCode {
    peft_studio::threads::single_compute_pool();
    keep_freed_pages_across_steps();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            match e.downcast_ref::<Interrupted>() {
                Some(i) => ExitCode::from((128 + i.signal).clamp(1, 255) as u8),
                None => ExitCode::FAILURE,
            }
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    // Every command logs, not only the window: `RUST_LOG=info` shows the build stages' notes.
    peft_studio::app::init_logging();
    let Some(command) = cli.command else {
        return peft_studio::app::run_window();
    };
    // Commands compute on this thread: make it one of the compute pool's threads.
    peft_studio::threads::join_compute_pool();
    match command {
        Command::Train {
            preset,
            mut overrides,
            out,
            export_model,
            resume,
            force,
            device,
        } => {
            overrides.extend(device.map(|d| format!("device={d}")));
            let stop = SignalStop::install().context("installing the SIGINT/SIGTERM handler")?;
            let (summary, run_folder) = match &resume {
                Some(folder) if force && finished(folder) => {
                    let s = with_progress(|emit| {
                        peft_studio::train::train_again(folder, &mut stop.clone(), emit)
                    })?;
                    let new = folder.parent().unwrap_or(folder).join(&s.id);
                    (s, new)
                }
                Some(folder) => (
                    with_progress(|emit| {
                        peft_studio::train::resume(folder, &mut stop.clone(), emit)
                    })?,
                    folder.clone(),
                ),
                None => {
                    let cfg = match &preset {
                        Some(p) => TrainConfig::from_preset(p, &overrides)?,
                        None => {
                            TrainConfig::from_toml_str("", "the built-in defaults", &overrides)?
                        }
                    };
                    let store = RunStore::new(&out);
                    let s = with_progress(|emit| {
                        peft_studio::train::train(&cfg, &store, &mut stop.clone(), emit)
                    })?;
                    let folder = out.join(&s.id);
                    (s, folder)
                }
            };
            println!("\n{}", report::text_table(std::slice::from_ref(&summary)));
            println!("run folder: {}", run_folder.display());
            if let Some(dest) = export_model {
                let src = run_folder.join("model");
                anyhow::ensure!(
                    src.is_dir(),
                    "--export-model needs a full fine-tuning run (mode = \"full\")"
                );
                std::fs::create_dir_all(&dest)
                    .with_context(|| format!("creating {}", dest.display()))?;
                for f in ["config.json", "model.safetensors"] {
                    let tmp = dest.join(format!("{f}.tmp"));
                    std::fs::copy(src.join(f), &tmp).with_context(|| format!("copying {f}"))?;
                    std::fs::rename(&tmp, dest.join(f))?;
                }
                println!("model exported to {}", dest.display());
            }
            anyhow::ensure!(
                summary.status != RunStatus::Failed,
                "the run failed: {}",
                summary.error.unwrap_or_default()
            );
            if let (RunStatus::Stopped, Some(signal)) = (summary.status, stop.received()) {
                return Err(Interrupted {
                    signal,
                    steps: summary.steps_done,
                    total: summary.total_steps,
                    folder: run_folder,
                }
                .into());
            }
            Ok(())
        }
        Command::Compare {
            presets,
            mut overrides,
            out,
            device,
        } => {
            overrides.extend(device.map(|d| format!("device={d}")));
            let store = RunStore::new(&out);
            // Every preset is read before any trains: a typo stops the comparison at once.
            let configs = presets
                .iter()
                .map(|p| TrainConfig::from_preset(p, &overrides))
                .collect::<Result<Vec<_>, _>>()?;
            let mut done = Vec::new();
            let mut failed = Vec::new();
            for (p, cfg) in presets.iter().zip(&configs) {
                eprintln!("== {} ({})", cfg.label(), p.display());
                match train_with_progress(cfg, &store) {
                    Ok(s) => done.push(s),
                    Err(e) => {
                        eprintln!("   failed: {e:#}");
                        failed.push(p.display().to_string());
                    }
                }
            }
            anyhow::ensure!(!done.is_empty(), "no run finished");
            println!("\n{}", report::text_table(&done));
            let dir = out.join(format!(
                "compare-{}",
                chrono::Local::now().format("%Y%m%d-%H%M%S")
            ));
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            write_atomic(&dir.join("compare.md"), report::markdown(&done).as_bytes())?;
            write_atomic(&dir.join("compare.csv"), report::csv(&done)?.as_bytes())?;
            let curves: Vec<_> = done
                .iter()
                .map(|s| Ok((s.clone(), store.metrics(&s.id)?)))
                .collect::<anyhow::Result<_>>()?;
            report::loss_png(&dir.join("loss.png"), &curves)?;
            println!("table and curves: {}", dir.display());
            anyhow::ensure!(
                failed.is_empty(),
                "{} of {} presets failed: {}",
                failed.len(),
                presets.len(),
                failed.join(", ")
            );
            Ok(())
        }
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
            let targets = targets.unwrap_or_else(|| arch.default_targets().to_string());
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
        Command::Personalize {
            refs,
            prompt,
            n,
            seed,
            out,
            model,
            device,
        } => {
            let model = model.unwrap_or_else(peft_studio::personalize::pipeline::builtin_dir);
            let device = device.unwrap_or_default().resolve()?;
            let report = peft_studio::personalize::commands::personalize_command(
                &model, &refs, &prompt, n, seed, &out, &device,
            )?;
            for w in &report.warnings {
                eprintln!("warning: {w}");
            }
            println!(
                "{} images for \"{}\" from {} references in {}: identity score {:.3} (per image {})",
                report.n,
                report.prompt,
                report.reference_count,
                out.display(),
                report.mean_identity_score,
                report
                    .identity_scores
                    .iter()
                    .map(|s| format!("{s:.2}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            let s = &report.seconds;
            println!(
                "seconds: personalise {:.3} (encode {:.3}, latent {:.3}, decode {:.3}, merge {:.3}), gallery {:.2}",
                s.personalise_total,
                s.encode_references,
                s.sample_latent,
                s.decode_lora,
                s.merge,
                s.gallery
            );
            Ok(())
        }
        Command::EvalPersonalize {
            model,
            refs,
            n,
            seed,
            out,
            jobs,
            shard,
            device,
        } => {
            let device = device.unwrap_or_default().resolve()?;
            use peft_studio::personalize::commands::{EvalWorkers, default_eval_out, eval_command};
            let model = model.unwrap_or_else(peft_studio::personalize::pipeline::builtin_dir);
            let out = out.unwrap_or_else(|| default_eval_out(&model));
            let settings = peft_studio::personalize::evaluate::EvalSettings {
                references: refs,
                images: n,
                seed,
            };
            if let Some(shard) = shard {
                let (k, total) = shard
                    .split_once('/')
                    .and_then(|(k, t)| Some((k.parse::<usize>().ok()?, t.parse::<usize>().ok()?)))
                    .with_context(|| format!("--shard {shard}: expected k/N"))?;
                let personaliser =
                    peft_studio::personalize::pipeline::Personaliser::load(&model, &device)?;
                let part = peft_studio::personalize::evaluate::evaluate_shard(
                    &personaliser,
                    settings,
                    k,
                    total,
                    &mut |i, all, what| eprintln!("[eval {k}/{total}] {i}/{all} {what}"),
                )?;
                println!("{}", serde_json::to_string(&part)?);
                return Ok(());
            }
            anyhow::ensure!(
                (1..=peft_studio::personalize::commands::MAX_JOBS).contains(&jobs),
                "--jobs {jobs}: must be between 1 and {}",
                peft_studio::personalize::commands::MAX_JOBS
            );
            let exe = std::env::current_exe().context("finding this program to run the workers")?;
            let workers = if jobs > 1 {
                EvalWorkers::Processes { exe: &exe, jobs }
            } else {
                EvalWorkers::InProcess
            };
            let report = eval_command(
                &model,
                settings,
                workers,
                &out,
                &device,
                &mut |i, total, what| eprintln!("[eval] {i}/{total} {what}"),
            )?;
            println!(
                "{}",
                report.markdown(&format!("eval-personalize: {}", model.display()))
            );
            println!("written: {}.md, {}.json", out.display(), out.display());
            Ok(())
        }
        Command::BenchPersonalize { model, out, device } => {
            let model = model.unwrap_or_else(peft_studio::personalize::pipeline::builtin_dir);
            peft_studio::personalize::commands::check_writable_file(&out, "--out")?;
            let device = device.unwrap_or_default().resolve()?;
            let (_, table) =
                peft_studio::personalize::commands::bench_personalize(&model, &device)?;
            print!("{table}");
            if let Some(dir) = out.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            write_atomic(&out, table.as_bytes())?;
            eprintln!("wrote {}", out.display());
            Ok(())
        }
        Command::DiffloraBuild {
            preset,
            stage,
            only,
            device,
        } => {
            let preset = peft_studio::personalize::build::DiffLoraPreset::load(&preset)?;
            let device = device.unwrap_or_default().resolve()?;
            let mut reporter = StageReporter::default();
            peft_studio::personalize::build::build_stages(
                &preset,
                stage,
                only,
                &device,
                &mut |name, step, total, loss| reporter.report(name, step, total, loss),
            )?;
            println!("built {}", preset.out.display());
            Ok(())
        }
        Command::AttributeReaderBuild { preset, device } => {
            let device = device.unwrap_or_default().resolve()?;
            let (report, path) = peft_studio::personalize::attribute_reader::build_reader(
                &preset,
                &device,
                &mut |line| eprintln!("{line}"),
            )?;
            for (name, acc) in &report.accuracy {
                println!("{name}: {:.1}% held out", 100.0 * acc);
            }
            println!(
                "wrote {} ({} bytes) in {:.0} s of training",
                path.display(),
                report.file_bytes,
                report.train_seconds
            );
            Ok(())
        }
        Command::Export {
            run,
            format,
            out,
            force,
            runs,
            write_check_logits,
        } => {
            let folder = peft_studio::export::run::resolve_run(&run, &runs)?;
            let report = peft_studio::export::export_run_with(
                &folder,
                format,
                &out,
                force,
                write_check_logits,
            )?;
            for n in &report.notes {
                println!("{n}");
            }
            println!(
                "exported {} as {} to {}",
                folder.display(),
                format,
                out.display()
            );
            Ok(())
        }
        Command::Bench(args) => bench::run(args),
        Command::Generate(args) => generate_cli::run(args),
        Command::ExportJob(args) => job_cli::export(args),
        Command::ImportRun(args) => job_cli::import(args),
    }
}

/// Whether the run in `folder` finished (its summary says so).
fn finished(folder: &std::path::Path) -> bool {
    peft_studio::train::store::read_summary(&peft_studio::train::RunLayout::new(folder))
        .is_ok_and(|s| s.status == RunStatus::Finished)
}

fn train_with_progress(cfg: &TrainConfig, store: &RunStore) -> anyhow::Result<RunSummary> {
    with_progress(|emit| peft_studio::train::train(cfg, store, &mut NeverStop, emit))
}

/// Runs `job` (a training or a resumed one) with a progress bar on stderr; a panic inside
/// becomes an error.
fn with_progress(
    job: impl FnOnce(&mut dyn FnMut(Event)) -> Result<RunSummary, peft_studio::train::RunFailure>,
) -> anyhow::Result<RunSummary> {
    use indicatif::{ProgressBar, ProgressStyle};
    let bar = ProgressBar::new(1);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} steps  {msg}  ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let mut last_eval = String::new();
    // Without a terminal the bar is hidden: print plain lines instead.
    let plain = !std::io::IsTerminal::is_terminal(&std::io::stderr());
    let say = |text: String| {
        if plain {
            eprintln!("{text}");
        } else {
            bar.println(text);
        }
    };
    let mut emit = |e: Event| match e {
        Event::RunStarted {
            name,
            trainable,
            total,
            total_steps,
            model,
            ..
        } => {
            bar.set_length(total_steps as u64);
            say(format!(
                "{name}: {model}; trainable {} of {} ({:.3}%)",
                peft_studio::inspect::thousands(trainable),
                peft_studio::inspect::thousands(total),
                100.0 * trainable as f64 / total.max(1) as f64
            ));
        }
        Event::Step { step, loss, .. } => {
            bar.set_position(step as u64);
            bar.set_message(format!("loss {loss:.4}{last_eval}"));
        }
        Event::Eval(ev) => {
            last_eval = format!("  eval acc {:.2}%", 100.0 * ev.accuracy);
            if plain {
                eprintln!(
                    "step {}: eval loss {:.4}, accuracy {:.2}%",
                    ev.step,
                    ev.loss,
                    100.0 * ev.accuracy
                );
            }
        }
        Event::Log(text) => say(text),
        Event::Phase(_) => {}
        Event::RunFinished(_)
        | Event::RunFailed { .. }
        | Event::Refused(_)
        | Event::TryIt(_)
        | Event::Personalise(_) => {}
    };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(&mut emit)));
    bar.finish_and_clear();
    match result {
        Ok(r) => r.map_err(|f| f.error),
        Err(p) => anyhow::bail!("internal error: {}", panic_message(&*p)),
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// Prints one line per stage every few seconds: step, smoothed loss, seconds per step, ETA.
#[derive(Default)]
struct StageReporter {
    stage: String,
    started: Option<std::time::Instant>,
    first_step: usize,
    last_print: Option<std::time::Instant>,
    ema: Option<f32>,
}

impl StageReporter {
    fn report(&mut self, stage: &str, step: usize, total: usize, loss: f32) {
        let now = std::time::Instant::now();
        if self.stage != stage || self.started.is_none() {
            self.stage = stage.to_string();
            self.started = Some(now);
            self.first_step = step.saturating_sub(1);
            self.last_print = None;
            self.ema = None;
        }
        self.ema = Some(match self.ema {
            Some(e) => 0.95 * e + 0.05 * loss,
            None => loss,
        });
        let due = self
            .last_print
            .is_none_or(|t| now.duration_since(t).as_secs_f64() >= 5.0);
        if due || step == total {
            let elapsed = self
                .started
                .map_or(0.0, |s| now.duration_since(s).as_secs_f64());
            let per = elapsed / (step - self.first_step).max(1) as f64;
            println!(
                "[{stage}] {step}/{total} loss {:.4} ({per:.3} s/step, {:.0} s left)",
                self.ema.unwrap_or(loss),
                per * (total - step) as f64
            );
            self.last_print = Some(now);
        }
    }
}

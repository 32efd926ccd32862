//! `peft-studio export-job` and `peft-studio import-run`: handing a run to transformers + PEFT +
//! accelerate, and reading its results back into the run store.

use std::path::PathBuf;

use peft_studio::job::{ExportJobOptions, export_job, import_run, source_config};
use peft_studio::train::causal_lm::is_language_model;
use peft_studio::train::{RunLayout, RunStore, reload_and_evaluate};

/// Arguments of `export-job`.
#[derive(clap::Args)]
pub struct ExportJobArgs {
    /// A preset (.toml) or a run folder (its config.toml).
    source: PathBuf,
    /// The job folder to write (created; written atomically).
    #[arg(long)]
    out: PathBuf,
    /// Replace `--out` when it is a non-empty folder.
    #[arg(long)]
    force: bool,
    /// Override a config value before exporting (`optim.steps=40`), as `train --set`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// The model for transformers (a Hugging Face folder, a .gguf file or a hub id), when the
    /// run's model is not one transformers reads (the built-in SmolLM2 is a GGUF file).
    #[arg(long)]
    model: Option<String>,
}

/// Arguments of `import-run`.
#[derive(clap::Args)]
pub struct ImportRunArgs {
    /// The job folder (or its output/ folder) after train.py ran.
    dir: PathBuf,
    /// The run store to import into.
    #[arg(long, default_value = "runs")]
    runs: PathBuf,
    /// Also rebuild the imported run in peft-studio and evaluate it on the run's held-out
    /// split (classification runs).
    #[arg(long)]
    verify: bool,
}

/// `export-job`.
pub fn export(args: ExportJobArgs) -> anyhow::Result<()> {
    let cfg = source_config(&args.source, &args.set)?;
    let opts = ExportJobOptions {
        model: args.model,
        force: args.force,
    };
    let job = export_job(&cfg, &args.source, &args.out, &opts)?;
    for n in &job.notes {
        println!("note: {n}");
    }
    let s = &job.spec;
    println!(
        "wrote {}: {} ({}), {} steps × batch {}, {} training and {} held-out examples, model {}",
        job.out.display(),
        s.name,
        s.method,
        s.optim.steps,
        s.optim.batch_size,
        s.data.train_examples,
        s.data.eval_examples,
        s.model.path
    );
    println!(
        "run it: cd {} && accelerate launch --config_file accelerate/single_gpu.yaml train.py",
        job.out.display()
    );
    println!("then:   peft-studio import-run {}", job.out.display());
    Ok(())
}

/// `import-run`.
pub fn import(args: ImportRunArgs) -> anyhow::Result<()> {
    let store = RunStore::new(&args.runs);
    let run = import_run(&store, &args.dir)?;
    let s = &run.summary;
    let eval = s
        .final_eval
        .map(|e| format!("eval accuracy {:.4}, loss {:.4}", e.accuracy, e.loss))
        .unwrap_or_else(|| "no evaluation".into());
    println!(
        "imported {} as run {} ({} of {} steps, {eval})",
        args.dir.display(),
        run.path.display(),
        s.steps_done,
        s.total_steps
    );
    let lm = is_language_model(&store.config(&run.id)?.model.source)?;
    if args.verify && lm {
        println!(
            "--verify evaluates classification runs; check a language model's adapter with `peft-studio generate --adapter {}`",
            run.path.display()
        );
    } else if args.verify {
        let again = reload_and_evaluate(RunLayout::new(&run.path).root())?;
        println!(
            "peft-studio's evaluation of the imported run: accuracy {:.4}, loss {:.4}",
            again.accuracy, again.loss
        );
    }
    Ok(())
}

//! The Compare tab's export dialog: a finished run written as a PEFT adapter folder, a merged
//! Hugging Face model folder, or llama.cpp's LoRA GGUF (as `peft-studio export` does), or as a
//! PEFT + accelerate job folder (`peft-studio export-job`); and the import of a job's output
//! (`peft-studio import-run`). Both run on a helper thread; the outcome is shown in the tab.

use std::path::{Path, PathBuf};

use egui::{RichText, Ui};

use super::dialogs::PickPurpose;
use super::{StudioApp, TaskResult};
use crate::export::{ExportFormat, export_run};
use crate::job::{ExportJobOptions, export_job, import_run, source_config};

/// What the dialog writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportChoice {
    /// The trained model in one of the formats other tools load.
    Format(ExportFormat),
    /// A PEFT + accelerate job folder that trains the same run elsewhere.
    Job,
}

impl ExportChoice {
    const ALL: [ExportChoice; 4] = [
        ExportChoice::Format(ExportFormat::Peft),
        ExportChoice::Format(ExportFormat::Merged),
        ExportChoice::Format(ExportFormat::GgufLora),
        ExportChoice::Job,
    ];

    fn name(self) -> &'static str {
        match self {
            ExportChoice::Format(f) => f.name(),
            ExportChoice::Job => "job",
        }
    }
}

/// The open dialog.
#[derive(Debug, Clone)]
pub struct ExportDialog {
    /// The run exported.
    pub id: String,
    /// What is written.
    pub format: ExportChoice,
    /// For a job: the model transformers loads instead of the run's (a folder or hub id;
    /// empty: the run's own).
    pub job_model: String,
    /// The output folder, as typed or picked.
    pub out: String,
    /// Replace a non-empty output folder.
    pub force: bool,
}

/// How the last export went: the message, and whether it succeeded.
pub type ExportOutcome = (String, bool);

/// What each choice is, for the dialog.
fn describe(format: ExportChoice) -> &'static str {
    let ExportChoice::Format(format) = format else {
        return "distributed job: train.py (transformers + PEFT, this run's data, method and schedule), accelerate configs (one GPU, several, several machines, DeepSpeed ZeRO-2/3, two CPU processes) and a README; its output comes back with Import job output…";
    };
    match format {
        ExportFormat::Peft => {
            "PEFT adapter folder (adapter_config.json + adapter_model.safetensors): PeftModel.from_pretrained loads it onto the base model; SVFit and LoLDU runs export the plain LoRA of their learned change"
        }
        ExportFormat::Merged => {
            "Hugging Face model folder with the change merged into the weights (config, safetensors, tokenizer): loads with from_pretrained, no PEFT needed"
        }
        ExportFormat::GgufLora => {
            "llama.cpp LoRA adapter (GGUF): llama-cli -m BASE.gguf --lora FILE (language models only)"
        }
    }
}

/// The default output folder: `exports/<run>-<format>` beside the runs folder.
fn default_out(runs_dir: &Path, id: &str, format: ExportChoice) -> String {
    let parent = runs_dir.parent().unwrap_or(runs_dir);
    parent
        .join("exports")
        .join(format!("{id}-{}", format.name()))
        .display()
        .to_string()
}

/// Opens the dialog for run `id`.
pub fn open(app: &mut StudioApp, id: &str) {
    let format = ExportChoice::Format(ExportFormat::Peft);
    app.compare.export = Some(ExportDialog {
        id: id.to_string(),
        format,
        job_model: String::new(),
        out: default_out(app.runs_dir(), id, format),
        force: false,
    });
}

/// A folder picked for the export: the output goes inside it, named after the run.
pub fn use_picked_folder(app: &mut StudioApp, folder: PathBuf) {
    if let Some(d) = &mut app.compare.export {
        d.out = folder
            .join(format!("{}-{}", d.id, d.format.name()))
            .display()
            .to_string();
    }
}

/// Starts the export on a helper thread.
fn start(app: &mut StudioApp, d: ExportDialog) {
    let run = app.runs_dir().join(&d.id);
    let out = PathBuf::from(d.out.trim());
    app.compare.exporting = true;
    let spawned = app.background.spawn("export", move || {
        TaskResult::Exported(export_in_background(&d, &run, &out))
    });
    if let Err(e) = spawned {
        app.compare.exporting = false;
        app.report("A helper thread could not start", e);
    }
}

/// The export itself (on the helper thread): what was written, or why not.
fn export_in_background(d: &ExportDialog, run: &Path, out: &Path) -> Result<String, String> {
    let (notes, written) = match d.format {
        ExportChoice::Format(format) => {
            export_run(run, format, out, d.force).map(|r| (r.notes, r.out))
        }
        ExportChoice::Job => {
            let model = d.job_model.trim();
            let opts = ExportJobOptions {
                model: (!model.is_empty()).then(|| model.to_string()),
                force: d.force,
            };
            source_config(run, &[])
                .and_then(|cfg| export_job(&cfg, run, out, &opts))
                .map(|j| (j.notes, j.out))
        }
    }
    .map_err(|e| format!("{e:#}"))?;
    let mut text = format!(
        "{} exported as {} into {}",
        d.id,
        d.format.name(),
        written.display()
    );
    if !notes.is_empty() {
        text.push_str(&format!(" ({})", notes.join("; ")));
    }
    Ok(text)
}

/// Asks for a job's output folder to import (the Compare tab's button).
pub fn pick_job_output(app: &mut StudioApp) {
    app.pick(PickPurpose::JobOutput);
}

/// Imports the job output in `dir` into the run store on a helper thread.
pub fn import_job(app: &mut StudioApp, dir: PathBuf) {
    let store = app.store.clone();
    app.compare.exporting = true;
    let spawned = app.background.spawn("import-run", move || {
        TaskResult::Imported(
            import_run(&store, &dir)
                .map(|r| format!("imported {} as run {}", dir.display(), r.id))
                .map_err(|e| format!("{e:#}")),
        )
    });
    if let Err(e) = spawned {
        app.compare.exporting = false;
        app.report("A helper thread could not start", e);
    }
}

/// Takes the outcome of an export, or of an import (which added a run to the store).
pub fn finished(app: &mut StudioApp, result: Result<String, String>, imported: bool) {
    app.compare.exporting = false;
    match result {
        Ok(text) => {
            app.compare.last_export = Some((text, true));
            if imported {
                app.refresh_runs();
            }
        }
        Err(e) => {
            app.compare.last_export = Some((format!("failed: {e}"), false));
            app.report("The export or import failed", e);
        }
    }
}

/// Draws the dialog when open.
pub fn modal(app: &mut StudioApp, ui: &mut Ui) {
    let Some(mut d) = app.compare.export.clone() else {
        return;
    };
    let mut close = false;
    let mut go = false;
    let runs_dir = app.runs_dir().to_path_buf();
    let modal = egui::Modal::new(egui::Id::unique("export-run")).show(ui.ctx(), |ui| {
        ui.set_max_width(560.0);
        ui.heading(format!("Export {}", d.id));
        for f in ExportChoice::ALL {
            let before = d.format;
            ui.radio_value(&mut d.format, f, RichText::new(f.name()).strong());
            ui.label(RichText::new(describe(f)).small());
            if d.format != before && d.out == default_out(&runs_dir, &d.id, before) {
                d.out = default_out(&runs_dir, &d.id, d.format);
            }
        }
        if d.format == ExportChoice::Job {
            ui.horizontal(|ui| {
                ui.label("model for transformers");
                ui.add(
                    egui::TextEdit::singleline(&mut d.job_model)
                        .desired_width(300.0)
                        .hint_text("the run's own; a folder or hub id for a GGUF base"),
                );
            });
        }
        ui.add_space(6.0);
        ui.horizontal(|ui| {
            ui.label("into");
            ui.add(egui::TextEdit::singleline(&mut d.out).desired_width(380.0));
            if ui.button("Choose folder…").clicked() {
                app.pick(PickPurpose::ExportFolder);
            }
        });
        ui.checkbox(&mut d.force, "replace the folder if it is not empty");
        ui.horizontal(|ui| {
            let ready = !d.out.trim().is_empty() && !app.compare.exporting;
            if ui.add_enabled(ready, egui::Button::new("Export")).clicked() {
                go = true;
                close = true;
            }
            if ui.button("Cancel").clicked() {
                close = true;
            }
        });
    });
    if go {
        start(app, d.clone());
    }
    app.compare.export = if close || modal.should_close() {
        None
    } else {
        Some(d)
    };
}

/// The line under the tab's heading: an export in progress, or how the last one went.
pub fn status_ui(app: &StudioApp, ui: &mut Ui) {
    if app.compare.exporting {
        ui.horizontal(|ui| {
            super::spinner::spinner(ui);
            ui.label("exporting or importing…");
        });
    } else if let Some((text, ok)) = &app.compare.last_export {
        let color = if *ok {
            egui::Color32::from_rgb(80, 180, 90)
        } else {
            ui.visuals().error_fg_color
        };
        ui.colored_label(color, text);
    }
}

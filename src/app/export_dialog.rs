//! The Compare tab's export dialog: a finished run written as a PEFT adapter folder, a merged
//! Hugging Face model folder, or llama.cpp's LoRA GGUF (as `peft-studio export` does), on a
//! helper thread; the outcome is shown in the tab.

use std::path::{Path, PathBuf};

use egui::{RichText, Ui};

use super::dialogs::PickPurpose;
use super::{StudioApp, TaskResult};
use crate::export::{ExportFormat, export_run};

/// The open dialog.
#[derive(Debug, Clone)]
pub struct ExportDialog {
    /// The run exported.
    pub id: String,
    /// The chosen format.
    pub format: ExportFormat,
    /// The output folder, as typed or picked.
    pub out: String,
    /// Replace a non-empty output folder.
    pub force: bool,
}

/// How the last export went: the message, and whether it succeeded.
pub type ExportOutcome = (String, bool);

/// What each format is, for the dialog.
fn describe(format: ExportFormat) -> &'static str {
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
fn default_out(runs_dir: &Path, id: &str, format: ExportFormat) -> String {
    let parent = runs_dir.parent().unwrap_or(runs_dir);
    parent
        .join("exports")
        .join(format!("{id}-{}", format.name()))
        .display()
        .to_string()
}

/// Opens the dialog for run `id`.
pub fn open(app: &mut StudioApp, id: &str) {
    let format = ExportFormat::Peft;
    app.compare.export = Some(ExportDialog {
        id: id.to_string(),
        format,
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
        let result = export_run(&run, d.format, &out, d.force)
            .map(|r| {
                let mut text =
                    format!("{} exported as {} into {}", d.id, r.format, r.out.display());
                if !r.notes.is_empty() {
                    text.push_str(&format!(" ({})", r.notes.join("; ")));
                }
                text
            })
            .map_err(|e| format!("{e:#}"));
        TaskResult::Exported(result)
    });
    if let Err(e) = spawned {
        app.compare.exporting = false;
        app.report("A helper thread could not start", e);
    }
}

/// Takes the outcome of an export.
pub fn finished(app: &mut StudioApp, result: Result<String, String>) {
    app.compare.exporting = false;
    match result {
        Ok(text) => app.compare.last_export = Some((text, true)),
        Err(e) => {
            app.compare.last_export = Some((format!("export failed: {e}"), false));
            app.report("The export failed", e);
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
        for f in ExportFormat::ALL {
            let before = d.format;
            ui.radio_value(&mut d.format, f, RichText::new(f.name()).strong());
            ui.label(RichText::new(describe(f)).small());
            if d.format != before && d.out == default_out(&runs_dir, &d.id, before) {
                d.out = default_out(&runs_dir, &d.id, d.format);
            }
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
            ui.label("exporting…");
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

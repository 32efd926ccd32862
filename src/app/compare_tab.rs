//! The Compare tab: every run in the store (the live one included) as a sortable, scrolling
//! table with its status (running, stopped, interrupted, failed) and colour; tick runs to
//! overlay their curves; a trainable-parameters-against-accuracy scatter; resume, open, re-run
//! or delete a run; the runs-folder setting.

use std::collections::{HashMap, HashSet};

use egui::{RichText, Ui};
use serde::{Deserialize, Serialize};

use super::StudioApp;
use super::dialogs::PickPurpose;
use super::plots::{self, Curves, ScatterPoint};
use crate::inspect::thousands;
use crate::train::{MetricLine, RunStatus, RunStore, RunSummary};

/// Sortable columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum SortColumn {
    /// Run name.
    Name,
    /// Method.
    Method,
    /// Rank.
    Rank,
    /// Trainable values.
    Trainable,
    /// Share of the model.
    Percent,
    /// Best eval accuracy.
    Best,
    /// Final eval accuracy.
    Final,
    /// Seconds per step.
    Speed,
    /// Peak memory.
    Memory,
    /// Status.
    Status,
    /// Start time.
    #[default]
    Date,
}

/// The tab's runtime state.
#[derive(Default)]
pub struct CompareState {
    /// Runs ticked for the overlay.
    pub selected: HashSet<String>,
    /// Each ticked run's curves, read once; a run whose metrics cannot be read keeps its error
    /// here (reported once, not re-read every frame).
    curves: HashMap<String, Result<Curves, String>>,
    confirm_delete: Option<String>,
    /// The export dialog, when open.
    pub(super) export: Option<super::export_dialog::ExportDialog>,
    /// An export is being written.
    pub(super) exporting: bool,
    /// How the last export went.
    pub(super) last_export: Option<super::export_dialog::ExportOutcome>,
}

impl CompareState {
    /// Drops selections and cached curves of runs that are gone.
    pub fn forget_missing(&mut self, runs: &[RunSummary]) {
        let ids: HashSet<&String> = runs.iter().map(|r| &r.id).collect();
        self.selected.retain(|id| ids.contains(id));
        self.curves.retain(|id, _| ids.contains(id));
    }

    /// Forgets the cached curves of `id` (its metrics changed: it was resumed or re-run).
    pub fn forget(&mut self, id: &str) {
        self.curves.remove(id);
    }

    /// A run's curves, read from the store the first time; `Err` on first failure carries the
    /// message to report, later calls give `Ok(None)`.
    fn curves_of(&mut self, store: &RunStore, id: &str) -> Result<Option<Curves>, String> {
        if !self.curves.contains_key(id) {
            let read = store
                .metrics(id)
                .map_err(|e| format!("{e:#}"))
                .map(|metrics| {
                    let mut c = Curves {
                        id: id.to_string(),
                        ..Default::default()
                    };
                    for m in metrics {
                        match m {
                            MetricLine::Step { step, loss, .. } => {
                                c.train_loss.push([step as f64, loss])
                            }
                            MetricLine::Eval(e) => {
                                c.eval_loss.push([e.step as f64, e.loss]);
                                c.eval_accuracy.push([e.step as f64, e.accuracy]);
                            }
                        }
                    }
                    c
                });
            let first_error = read.as_ref().err().cloned();
            self.curves.insert(id.to_string(), read);
            if let Some(e) = first_error {
                return Err(e);
            }
        }
        Ok(self.curves.get(id).and_then(|c| c.as_ref().ok()).cloned())
    }
}

impl StudioApp {
    /// Curves of the ticked runs (except `skip`, the live one), named by run name; a run whose
    /// metrics cannot be read is reported once.
    pub(super) fn compare_overlay(&mut self, skip: Option<&str>) -> Vec<Curves> {
        let mut ids: Vec<String> = self
            .compare
            .selected
            .iter()
            .filter(|id| Some(id.as_str()) != skip)
            .cloned()
            .collect();
        ids.sort();
        let mut out = Vec::new();
        for id in ids {
            match self.compare.curves_of(&self.store, &id) {
                Ok(Some(mut c)) => {
                    if let Some(r) = self.runs.iter().find(|r| r.id == id) {
                        c.name = r.name.clone();
                    } else {
                        c.name = id.clone();
                    }
                    out.push(c);
                }
                Ok(None) => {}
                Err(e) => self.report_once("A run's metrics could not be read", e),
            }
        }
        out
    }
}

fn acc(e: Option<crate::train::EvalPoint>) -> f64 {
    e.map_or(-1.0, |e| e.accuracy)
}

fn sort(runs: &mut [RunSummary], col: SortColumn, ascending: bool) {
    runs.sort_by(|a, b| {
        let o = match col {
            SortColumn::Name => a.name.cmp(&b.name),
            SortColumn::Method => a.method.cmp(&b.method),
            SortColumn::Rank => a.rank.cmp(&b.rank),
            SortColumn::Trainable => a.trainable.cmp(&b.trainable),
            SortColumn::Percent => a.trainable_percent().total_cmp(&b.trainable_percent()),
            SortColumn::Best => acc(a.best_eval).total_cmp(&acc(b.best_eval)),
            SortColumn::Final => acc(a.final_eval).total_cmp(&acc(b.final_eval)),
            SortColumn::Speed => a.secs_per_step.total_cmp(&b.secs_per_step),
            SortColumn::Memory => a.peak_rss_mib.total_cmp(&b.peak_rss_mib),
            SortColumn::Status => a.status.to_string().cmp(&b.status.to_string()),
            SortColumn::Date => a.started_at.cmp(&b.started_at),
        };
        if ascending { o } else { o.reverse() }
    });
}

enum Action {
    Export(String),
    Open(String),
    Rerun(String),
    Resume(String),
    Delete(String),
}

/// How a run's status reads in the table, and its colour.
fn status_cell(app: &StudioApp, ui: &Ui, r: &RunSummary) -> (String, egui::Color32) {
    let v = ui.visuals();
    let ok = egui::Color32::from_rgb(80, 180, 90);
    match r.status {
        RunStatus::Finished => ("finished".into(), ok),
        RunStatus::Running if app.live_run_id() == Some(r.id.as_str()) => (
            format!("running {}/{}", app.run.step, app.run.total_steps),
            v.hyperlink_color,
        ),
        // "running" in the store with no process behind it: killed mid-run.
        RunStatus::Running => ("interrupted".into(), v.warn_fg_color),
        RunStatus::Stopped => (
            format!("stopped at {}/{}", r.steps_done, r.total_steps),
            v.warn_fg_color,
        ),
        RunStatus::Failed => ("failed".into(), v.error_fg_color),
    }
}

/// The runs-folder setting.
fn settings_ui(app: &mut StudioApp, ui: &mut Ui) {
    egui::CollapsingHeader::new("Settings")
        .id_salt("compare-settings")
        .show(ui, |ui| {
            ui.horizontal_wrapped(|ui| {
                ui.label("Runs folder:");
                ui.label(RichText::new(app.runs_dir().display().to_string()).monospace());
                let busy = app.run.state.is_busy();
                if ui
                    .add_enabled(!busy, egui::Button::new("Choose…"))
                    .on_hover_text("store runs in another folder (remembered)")
                    .on_disabled_hover_text("a run is in progress")
                    .clicked()
                {
                    app.pick(PickPurpose::RunsFolder);
                }
            });
        });
}

fn table_ui(
    app: &mut StudioApp,
    ui: &mut Ui,
    runs: &[RunSummary],
    labels: &[String],
) -> Option<Action> {
    let (col, asc) = app.settings.sort;
    let mut action = None;
    egui::Grid::new("runs")
        .striped(true)
        .min_col_width(24.0)
        .show(ui, |ui| {
            let headers = [
                ("run", SortColumn::Name),
                ("method", SortColumn::Method),
                ("rank", SortColumn::Rank),
                ("trainable", SortColumn::Trainable),
                ("% of model", SortColumn::Percent),
                ("best acc", SortColumn::Best),
                ("final acc", SortColumn::Final),
                ("s/step", SortColumn::Speed),
                ("peak MiB", SortColumn::Memory),
                ("status", SortColumn::Status),
                ("date", SortColumn::Date),
            ];
            for (label, c) in headers {
                let arrow = if col == c {
                    if asc { " ^" } else { " v" }
                } else {
                    ""
                };
                if ui
                    .button(RichText::new(format!("{label}{arrow}")).strong())
                    .clicked()
                {
                    app.settings.sort = (c, if col == c { !asc } else { false });
                }
            }
            ui.label("");
            ui.end_row();
            for (r, label) in runs.iter().zip(labels) {
                let mut on = app.compare.selected.contains(&r.id);
                ui.horizontal(|ui| {
                    // The run's colour, as in every chart.
                    let (rect, _) =
                        ui.allocate_exact_size(egui::vec2(10.0, 10.0), egui::Sense::hover());
                    ui.painter().rect_filled(rect, 2.0, plots::run_color(&r.id));
                    if ui
                        .checkbox(&mut on, label)
                        .on_hover_text(format!("{} ({}): tick to overlay its curves", r.name, r.id))
                        .changed()
                    {
                        if on {
                            app.compare.selected.insert(r.id.clone());
                        } else {
                            app.compare.selected.remove(&r.id);
                        }
                    }
                });
                ui.label(&r.method);
                ui.label(r.rank.map_or("–".into(), |v| v.to_string()));
                ui.label(thousands(r.trainable));
                ui.label(format!("{:.3}%", r.trainable_percent()));
                let pct = |e: Option<crate::train::EvalPoint>| {
                    e.map_or("–".into(), |e| format!("{:.2}%", 100.0 * e.accuracy))
                };
                ui.label(pct(r.best_eval));
                ui.label(pct(r.final_eval));
                ui.label(format!("{:.3}", r.secs_per_step));
                ui.label(format!("{:.0}", r.peak_rss_mib));
                let (status, color) = status_cell(app, ui, r);
                let cell = ui.colored_label(color, status);
                if let Some(e) = &r.error {
                    cell.on_hover_text(e);
                }
                ui.label(
                    r.started_at
                        .get(..16)
                        .unwrap_or(&r.started_at)
                        .replace('T', " "),
                );
                ui.horizontal(|ui| {
                    if app.can_resume(r)
                        && ui
                            .add_enabled(
                                !app.run.state.is_busy(),
                                egui::Button::new("resume").small(),
                            )
                            .on_hover_text("continue from its last checkpoint")
                            .on_disabled_hover_text("a run is in progress")
                            .clicked()
                    {
                        action = Some(Action::Resume(r.id.clone()));
                    }
                    if ui
                        .small_button("open")
                        .on_hover_text(format!(
                            "open the run's folder: {}",
                            app.runs_dir().join(&r.id).display()
                        ))
                        .clicked()
                    {
                        action = Some(Action::Open(r.id.clone()));
                    }
                    let saved = matches!(r.status, RunStatus::Finished | RunStatus::Stopped);
                    if ui
                        .add_enabled(
                            saved && !app.compare.exporting,
                            egui::Button::new("export").small(),
                        )
                        .on_hover_text(
                            "write it as a PEFT adapter, a merged model folder or a llama.cpp LoRA GGUF",
                        )
                        .on_disabled_hover_text("only a finished or stopped run has something to export")
                        .clicked()
                    {
                        action = Some(Action::Export(r.id.clone()));
                    }
                    if ui
                        .small_button("re-run")
                        .on_hover_text("load this run's settings and train again")
                        .clicked()
                    {
                        action = Some(Action::Rerun(r.id.clone()));
                    }
                    let live = app.live_run_id() == Some(r.id.as_str());
                    if ui
                        .add_enabled(!live, egui::Button::new("delete").small())
                        .on_hover_text("delete this run")
                        .clicked()
                    {
                        action = Some(Action::Delete(r.id.clone()));
                    }
                });
                ui.end_row();
            }
        });
    action
}

fn apply(app: &mut StudioApp, action: Option<Action>) {
    match action {
        Some(Action::Export(id)) => super::export_dialog::open(app, &id),
        Some(Action::Open(id)) => app.open_run_folder(&id),
        Some(Action::Resume(id)) => {
            app.compare.forget(&id);
            app.resume_run(&id);
        }
        Some(Action::Rerun(id)) => match app.store.config(&id) {
            Ok(cfg) => {
                app.settings.config = cfg;
                app.form
                    .request_preview(&app.background, &app.settings.config);
                app.settings.tab = super::Tab::Train;
                app.start_training();
            }
            Err(e) => app.report("That run's settings cannot be read", format!("{e:#}")),
        },
        Some(Action::Delete(id)) => app.compare.confirm_delete = Some(id),
        None => {}
    }
}

/// Draws the tab.
pub fn show(app: &mut StudioApp, ui: &mut Ui) {
    egui::CentralPanel::default().show(ui, |ui| {
        ui.horizontal_wrapped(|ui| {
            ui.heading(format!("{} runs", app.runs.len()));
            if ui
                .button("Refresh")
                .on_hover_text(format!(
                    "re-read the run store ({})",
                    app.runs_dir().display()
                ))
                .clicked()
            {
                app.refresh_runs();
            }
            if ui
                .button("Import job output…")
                .on_hover_text(
                    "read a PEFT + accelerate job's results (its adapter and metrics) into the run store",
                )
                .clicked()
            {
                super::export_dialog::pick_job_output(app);
            }
        });
        settings_ui(app, ui);
        super::export_dialog::status_ui(app, ui);
        if app.runs.is_empty() {
            ui.label(format!(
                "No runs yet in {}: train one in the Fine-tune tab, then compare it here.",
                app.runs_dir().display()
            ));
            return;
        }
        let mut runs = app.runs.clone();
        let (col, asc) = app.settings.sort;
        sort(&mut runs, col, asc);
        let keys: Vec<(&str, &str, &str)> = runs
            .iter()
            .map(|r| (r.id.as_str(), r.name.as_str(), r.started_at.as_str()))
            .collect();
        let labels = plots::unique_labels(&keys);
        // At most ~45% of the height (scrolling inside), less when there are few runs; room
        // for the header, the rows and the horizontal scroll bar.
        let row_h = ui.spacing().interact_size.y + 2.0 * ui.spacing().item_spacing.y;
        let bar = ui.spacing().scroll.allocated_width() + 4.0;
        let table_h = (row_h * (runs.len() as f32 + 1.0) + bar)
            .min((ui.available_height() * 0.45).max(120.0));
        let action = egui::ScrollArea::both()
            .max_height(table_h)
            .auto_shrink([false, true])
            .id_salt("runs-table")
            .show(ui, |ui| table_ui(app, ui, &runs, &labels))
            .inner;
        apply(app, action);
        delete_modal(app, ui);
        super::export_dialog::modal(app, ui);
        ui.separator();
        let mut overlay = app.compare_overlay(None);
        for c in &mut overlay {
            if let Some(i) = runs.iter().position(|r| r.id == c.id) {
                c.name = labels[i].clone();
            }
        }
        let steps = plots::step_range(&overlay);
        let points: Vec<ScatterPoint> = runs
            .iter()
            .zip(&labels)
            .filter_map(|(r, label)| {
                r.best_eval.map(|e| ScatterPoint {
                    id: r.id.clone(),
                    name: label.clone(),
                    method: r.method.clone(),
                    trainable: r.trainable,
                    accuracy: e.accuracy,
                })
            })
            .collect();
        let (ema, log) = (app.settings.ema, app.settings.log_scale);
        let curves = |ui: &mut Ui, h: f32| {
            ui.label(RichText::new("Ticked runs").strong());
            if overlay.is_empty() {
                plots::placeholder(
                    ui,
                    h - 20.0,
                    "tick runs in the table to overlay their curves",
                );
            } else {
                plots::loss_plot(ui, "compare", &overlay, steps, ema, log, h * 0.5 - 20.0);
                plots::accuracy_plot(ui, "compare", &overlay, steps, h * 0.5 - 20.0);
            }
        };
        let scatter = |ui: &mut Ui, h: f32| {
            ui.label(RichText::new("Fewest parameters for the accuracy").strong());
            let key: Vec<&str> = plots::METHOD_MARKERS.iter().map(|(_, _, k)| *k).collect();
            ui.label(RichText::new(format!("markers: {}", key.join(", "))).small());
            plots::scatter(ui, &points, h - 40.0);
        };
        if ui.available_width() >= 900.0 {
            let h = (ui.available_height() - 10.0).max(180.0);
            ui.columns(2, |cols| {
                curves(&mut cols[0], h);
                scatter(&mut cols[1], h);
            });
        } else {
            // A small window: the charts one under the other, scrolling.
            egui::ScrollArea::vertical()
                .id_salt("compare-charts")
                .show(ui, |ui| {
                    curves(ui, 360.0);
                    scatter(ui, 300.0);
                });
        }
    });
}

fn delete_modal(app: &mut StudioApp, ui: &mut Ui) {
    let Some(id) = app.compare.confirm_delete.clone() else {
        return;
    };
    let mut close = false;
    let modal = egui::Modal::new(egui::Id::unique("confirm-delete")).show(ui.ctx(), |ui| {
        ui.heading("Delete this run?");
        ui.label(format!(
            "{} and everything in it (adapter, metrics) will be removed.",
            id
        ));
        ui.horizontal(|ui| {
            if ui.button("Delete").clicked() {
                if let Err(e) = app.store.delete(&id) {
                    app.report("The run could not be deleted", format!("{e:#}"));
                }
                close = true;
                app.refresh_runs();
            }
            if ui.button("Cancel").clicked() {
                close = true;
            }
        });
    });
    if close || modal.should_close() {
        app.compare.confirm_delete = None;
    }
}

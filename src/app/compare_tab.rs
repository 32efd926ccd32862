//! The Compare tab: every run in the store as a sortable table; tick runs to overlay their
//! curves; a trainable-parameters-against-accuracy scatter; open, re-run or delete a run.

use std::collections::{HashMap, HashSet};

use egui::{RichText, Ui};
use serde::{Deserialize, Serialize};

use super::StudioApp;
use super::plots::{self, Curves, ScatterPoint};
use crate::inspect::thousands;
use crate::train::{MetricLine, RunStore, RunSummary};

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
    curves: HashMap<String, Curves>,
    confirm_delete: Option<String>,
}

impl CompareState {
    /// Drops selections and cached curves of runs that are gone.
    pub fn forget_missing(&mut self, runs: &[RunSummary]) {
        let ids: HashSet<&String> = runs.iter().map(|r| &r.id).collect();
        self.selected.retain(|id| ids.contains(id));
        self.curves.retain(|id, _| ids.contains(id));
    }

    fn curves_of(&mut self, store: &RunStore, id: &str, name: &str) -> Option<Curves> {
        if !self.curves.contains_key(id) {
            let metrics = store.metrics(id).ok()?;
            let mut c = Curves {
                name: name.to_string(),
                ..Default::default()
            };
            for m in metrics {
                match m {
                    MetricLine::Step { step, loss, .. } => c.train_loss.push([step as f64, loss]),
                    MetricLine::Eval(e) => {
                        c.eval_loss.push([e.step as f64, e.loss]);
                        c.eval_accuracy.push([e.step as f64, e.accuracy]);
                    }
                }
            }
            self.curves.insert(id.to_string(), c);
        }
        self.curves.get(id).cloned()
    }

    /// Curves of the ticked runs (except `skip`, the live one).
    pub fn overlay_curves(&mut self, store: &RunStore, skip: Option<&str>) -> Vec<Curves> {
        let mut ids: Vec<String> = self
            .selected
            .iter()
            .filter(|id| Some(id.as_str()) != skip)
            .cloned()
            .collect();
        ids.sort();
        ids.iter()
            .filter_map(|id| self.curves_of(store, id, id))
            .collect()
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
    Open(String),
    Rerun(String),
    Delete(String),
}

/// Draws the tab.
pub fn show(app: &mut StudioApp, ui: &mut Ui) {
    egui::CentralPanel::default().show(ui, |ui| {
        ui.horizontal(|ui| {
            ui.heading(format!("{} runs", app.runs.len()));
            if ui
                .button("Refresh")
                .on_hover_text(format!(
                    "re-read the run store ({})",
                    app.store.root().display()
                ))
                .clicked()
            {
                app.refresh_runs();
            }
        });
        if app.runs.is_empty() {
            ui.label("No runs yet: train one in the Train tab, then compare it here.");
            return;
        }
        let mut runs = app.runs.clone();
        let (col, asc) = app.settings.sort;
        sort(&mut runs, col, asc);
        let mut action = None;
        let table_h = (ui.available_height() * 0.45).max(160.0);
        egui::ScrollArea::both()
            .max_height(table_h)
            .id_salt("runs-table")
            .show(ui, |ui| {
                egui::Grid::new("runs")
                    .striped(true)
                    .min_col_width(40.0)
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
                        for r in &runs {
                            let mut on = app.compare.selected.contains(&r.id);
                            if ui
                                .checkbox(&mut on, &r.name)
                                .on_hover_text(format!("{}: tick to overlay its curves", r.id))
                                .changed()
                            {
                                if on {
                                    app.compare.selected.insert(r.id.clone());
                                } else {
                                    app.compare.selected.remove(&r.id);
                                }
                            }
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
                            let status = ui.label(r.status.to_string());
                            if let Some(e) = &r.error {
                                status.on_hover_text(e);
                            }
                            ui.label(
                                r.started_at
                                    .get(..16)
                                    .unwrap_or(&r.started_at)
                                    .replace('T', " "),
                            );
                            ui.horizontal(|ui| {
                                if ui
                                    .small_button("open")
                                    .on_hover_text("open the run's folder")
                                    .clicked()
                                {
                                    action = Some(Action::Open(r.id.clone()));
                                }
                                if ui
                                    .small_button("re-run")
                                    .on_hover_text("load this run's settings and train again")
                                    .clicked()
                                {
                                    action = Some(Action::Rerun(r.id.clone()));
                                }
                                if ui
                                    .small_button("delete")
                                    .on_hover_text("delete this run")
                                    .clicked()
                                {
                                    action = Some(Action::Delete(r.id.clone()));
                                }
                            });
                            ui.end_row();
                        }
                    });
            });
        match action {
            Some(Action::Open(id)) => {
                let path = app.store.root().join(&id);
                if let Err(e) = open_folder(&path) {
                    app.report(
                        "The folder could not be opened",
                        format!("{}: {e}", path.display()),
                    );
                }
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
        delete_modal(app, ui);
        ui.separator();
        let selected: Vec<RunSummary> = runs
            .iter()
            .filter(|r| app.compare.selected.contains(&r.id))
            .cloned()
            .collect();
        let overlay: Vec<Curves> = selected
            .iter()
            .filter_map(|r| app.compare.curves_of(&app.store, &r.id, &r.name))
            .collect();
        let points: Vec<ScatterPoint> = runs
            .iter()
            .filter_map(|r| {
                r.best_eval.map(|e| ScatterPoint {
                    name: r.name.clone(),
                    method: r.method.clone(),
                    trainable: r.trainable,
                    accuracy: e.accuracy,
                })
            })
            .collect();
        let h = (ui.available_height() - 10.0).max(180.0);
        ui.columns(2, |cols| {
            cols[0].label(RichText::new("Ticked runs").strong());
            if overlay.is_empty() {
                cols[0].label("tick runs in the table to overlay their curves");
            } else {
                plots::loss_plot(
                    &mut cols[0],
                    "cmp-loss",
                    &overlay,
                    app.settings.ema,
                    app.settings.log_scale,
                    h * 0.5 - 20.0,
                );
                plots::accuracy_plot(&mut cols[0], "cmp-acc", &overlay, h * 0.5 - 20.0);
            }
            cols[1].label(RichText::new("Fewest parameters for the accuracy").strong());
            plots::scatter(&mut cols[1], &points, h - 20.0);
        });
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

/// Opens a folder in the desktop's file manager.
fn open_folder(path: &std::path::Path) -> std::io::Result<()> {
    let opener = if cfg!(target_os = "macos") {
        "open"
    } else if cfg!(target_os = "windows") {
        "explorer"
    } else {
        "xdg-open"
    };
    std::process::Command::new(opener)
        .arg(path)
        .spawn()
        .map(|_| ())
}

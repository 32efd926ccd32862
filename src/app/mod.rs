//! The studio window (eframe/egui): a Train tab (pick a model, data and method, train, watch
//! live curves) and a Compare tab (every run in the run store, sortable, overlaid, on a
//! parameters-vs-accuracy scatter).
//!
//! Nothing here trains or loads models: the engine's [`Worker`] does, on its own thread, and
//! file dialogs and dataset previews run on short-lived helper threads. The UI drains their
//! messages once per frame and repaints when one arrives.

mod background;
mod compare_tab;
mod form;
mod personalise_tab;
mod plots;
mod run_view;
mod train_tab;

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use background::{FilePicker, PickRequest, rfd_picker};
pub use personalise_tab::{GalleryRow, ModelState, PersonaliseSettings, PersonaliseState, Phase};
pub use run_view::{RunView, UiState};

use crate::train::{RunStore, RunSummary, TrainConfig};
use crate::worker::{Command, Event, Worker};
use background::{Background, TaskResult};

/// What the window remembers between launches (eframe storage). Every field has a default, so
/// state written by an older version never breaks a launch.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// The form: the last training configuration.
    pub config: TrainConfig,
    /// Dark theme.
    pub dark_mode: bool,
    /// EMA smoothing of the loss curves (0 = none).
    pub ema: f64,
    /// Logarithmic loss axis.
    pub log_scale: bool,
    /// Open tab.
    pub tab: Tab,
    /// Compare-table sort column and direction.
    pub sort: (compare_tab::SortColumn, bool),
    /// Last preset loaded or saved.
    pub last_preset: Option<PathBuf>,
    /// The Personalise tab: prompt, image count, seed, comparisons.
    pub personalise: PersonaliseSettings,
}

impl Default for Settings {
    fn default() -> Self {
        let mut config = TrainConfig::default();
        form::apply_method_defaults(&mut config, form::UiMethod::Lora, 64);
        config.optim.steps = Some(1000);
        config.optim.eval_every = 100;
        config.optim.batch_size = 64;
        config.optim.warmup_steps = 30;
        Self {
            config,
            dark_mode: true,
            ema: 0.6,
            log_scale: true,
            tab: Tab::Train,
            sort: (compare_tab::SortColumn::Date, false),
            last_preset: None,
            personalise: PersonaliseSettings::default(),
        }
    }
}

/// The window's tabs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Tab {
    /// Configure and run training.
    #[default]
    Train,
    /// Compare runs.
    Compare,
    /// Personalise a portrait generator from reference images (DiffLoRA).
    Personalise,
}

/// How the app is set up (tests use a temporary run store and a scripted file picker).
#[derive(Clone)]
pub struct AppOptions {
    /// The run store's folder.
    pub runs_dir: PathBuf,
    /// How files and folders are chosen.
    pub picker: FilePicker,
    /// Read and write eframe storage.
    pub persist: bool,
    /// The DiffLoRA personaliser the Personalise tab uses.
    pub personaliser_dir: PathBuf,
}

impl Default for AppOptions {
    fn default() -> Self {
        Self {
            runs_dir: PathBuf::from("runs"),
            picker: rfd_picker(),
            persist: true,
            personaliser_dir: crate::personalize::pipeline::builtin_dir(),
        }
    }
}

/// An error shown in the window: a sentence for the user, the details on demand.
#[derive(Debug, Clone)]
pub struct UiError {
    /// What failed, in words.
    pub title: String,
    /// The full error chain.
    pub details: String,
}

/// The application.
pub struct StudioApp {
    /// Persisted settings (the form included).
    pub settings: Settings,
    /// The current or last run.
    pub run: RunView,
    /// Runs in the store, newest first.
    pub runs: Vec<RunSummary>,
    /// Errors waiting to be read.
    pub errors: Vec<UiError>,
    /// The Personalise tab.
    pub personalise: PersonaliseState,
    store: RunStore,
    worker: Option<Worker>,
    background: Background,
    options: AppOptions,
    form: form::FormState,
    compare: compare_tab::CompareState,
}

impl StudioApp {
    /// Creates the app inside eframe: restores settings, starts the worker.
    pub fn new(cc: &eframe::CreationContext<'_>, options: AppOptions) -> Self {
        let settings: Settings = if options.persist {
            cc.storage
                .and_then(|s| eframe::get_value(s, eframe::APP_KEY))
                .unwrap_or_default()
        } else {
            Settings::default()
        };
        Self::with_settings(&cc.egui_ctx, settings, options)
    }

    /// Creates the app with given settings.
    pub fn with_settings(ctx: &egui::Context, settings: Settings, options: AppOptions) -> Self {
        ctx.set_visuals(if settings.dark_mode {
            egui::Visuals::dark()
        } else {
            egui::Visuals::light()
        });
        let store = RunStore::new(&options.runs_dir);
        let repaint = ctx.clone();
        let mut errors = Vec::new();
        let worker = match Worker::spawn(store.clone(), move || repaint.request_repaint()) {
            Ok(w) => Some(w),
            Err(e) => {
                errors.push(UiError {
                    title: "The training worker could not start".into(),
                    details: e.to_string(),
                });
                None
            }
        };
        let mut app = Self {
            settings,
            run: RunView::default(),
            runs: Vec::new(),
            errors,
            personalise: PersonaliseState::default(),
            store,
            worker,
            background: Background::new(ctx.clone()),
            options,
            form: form::FormState::default(),
            compare: compare_tab::CompareState::default(),
        };
        app.refresh_runs();
        app.form
            .request_preview(&app.background, &app.settings.config);
        app
    }

    /// Re-reads the run store.
    pub fn refresh_runs(&mut self) {
        let (runs, problems) = self.store.list();
        self.runs = runs;
        for p in problems {
            self.report("A run in the store could not be read", p);
        }
        self.compare.forget_missing(&self.runs);
    }

    /// Shows an error in the window.
    pub fn report(&mut self, title: impl Into<String>, details: impl Into<String>) {
        let e = UiError {
            title: title.into(),
            details: details.into(),
        };
        log::warn!("{}: {}", e.title, e.details);
        self.errors.push(e);
    }

    /// Asks the worker to train with the form's config (after checking it).
    pub fn start_training(&mut self) {
        if self.run.state.is_busy() {
            return;
        }
        let cfg = self.settings.config.clone();
        if let Err(e) = self.form.check(&cfg) {
            self.report("These settings cannot train", e);
            return;
        }
        match &self.worker {
            Some(w) => {
                self.run = RunView::starting(&cfg);
                w.send(Command::Start(Box::new(cfg)));
            }
            None => self.report(
                "Training is unavailable",
                "the worker thread is not running",
            ),
        }
    }

    fn send(&self, c: Command) {
        if let Some(w) = &self.worker {
            w.send(c);
        }
    }

    /// Drains the worker's and helper threads' messages (never blocks).
    pub fn poll(&mut self) {
        let mut events = Vec::new();
        if let Some(w) = &self.worker {
            while let Some(e) = w.try_recv() {
                events.push(e);
            }
        }
        for e in events {
            let finished = matches!(e, Event::RunFinished(_) | Event::RunFailed { .. });
            if let Event::RunFailed { error, .. } = &e {
                self.report("The run failed", error.clone());
            }
            if let Event::Refused(why) = &e {
                self.report("The worker refused", why.clone());
            }
            self.run.apply(e);
            if finished {
                self.refresh_runs();
            }
        }
        for r in self.background.drain() {
            self.handle_task(r);
        }
        personalise_tab::poll(self);
    }

    fn handle_task(&mut self, r: TaskResult) {
        match r {
            TaskResult::Picked(purpose, path) => form::handle_pick(self, purpose, path),
            TaskResult::Preview(generation, result) => self.form.set_preview(generation, result),
        }
    }

    /// Why the dataset preview failed, if it did.
    pub fn form_preview_error(&self) -> Option<String> {
        match &self.form.preview {
            Some(Err(e)) => Some(e.clone()),
            _ => None,
        }
    }

    /// Whether the dataset preview is loaded.
    pub fn form_preview_ready(&self) -> bool {
        matches!(self.form.preview, Some(Ok(_)))
    }

    /// Ticks a run for the overlay (as its checkbox in Compare does).
    pub fn select_for_overlay(&mut self, id: &str) {
        self.compare.selected.insert(id.to_string());
    }

    /// Chooses a built-in dataset (as its entry in the dataset menu does).
    pub fn select_builtin_dataset(&mut self, name: &str) {
        self.settings.config.data.source = crate::data::DataSource::Builtin { name: name.into() };
        self.form
            .request_preview(&self.background, &self.settings.config);
    }

    /// The settings as persisted.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The run store.
    pub fn store(&self) -> &RunStore {
        &self.store
    }

    fn errors_ui(&mut self, ui: &mut egui::Ui) {
        let mut dismiss = None;
        for (i, e) in self.errors.iter().enumerate() {
            egui::Frame::new()
                .fill(ui.visuals().error_fg_color.gamma_multiply(0.15))
                .stroke(egui::Stroke::new(1.0, ui.visuals().error_fg_color))
                .inner_margin(6.0)
                .corner_radius(4.0)
                .show(ui, |ui| {
                    ui.horizontal(|ui| {
                        ui.colored_label(
                            ui.visuals().error_fg_color,
                            format!("Error: {}", e.title),
                        );
                        if ui.small_button("Dismiss").clicked() {
                            dismiss = Some(i);
                        }
                    });
                    egui::CollapsingHeader::new("Details")
                        .id_salt(("error", i))
                        .show(ui, |ui| {
                            ui.label(egui::RichText::new(&e.details).monospace());
                        });
                });
        }
        if let Some(i) = dismiss {
            self.errors.remove(i);
        }
    }
}

impl eframe::App for StudioApp {
    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        self.poll();
        egui::Panel::top("tabs").show(ui, |ui| {
            ui.horizontal(|ui| {
                ui.heading("peft-studio");
                ui.separator();
                ui.selectable_value(&mut self.settings.tab, Tab::Train, "Fine-tune");
                ui.selectable_value(&mut self.settings.tab, Tab::Compare, "Compare");
                ui.selectable_value(&mut self.settings.tab, Tab::Personalise, "Personalise");
                ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
                    let label = if self.settings.dark_mode {
                        "Light theme"
                    } else {
                        "Dark theme"
                    };
                    if ui.button(label).clicked() {
                        self.settings.dark_mode = !self.settings.dark_mode;
                        ui.ctx().set_visuals(if self.settings.dark_mode {
                            egui::Visuals::dark()
                        } else {
                            egui::Visuals::light()
                        });
                    }
                });
            });
            if !self.errors.is_empty() {
                self.errors_ui(ui);
            }
        });
        match self.settings.tab {
            Tab::Train => train_tab::show(self, ui),
            Tab::Compare => compare_tab::show(self, ui),
            Tab::Personalise => personalise_tab::show(self, ui),
        }
    }

    fn save(&mut self, storage: &mut dyn eframe::Storage) {
        if self.options.persist {
            eframe::set_value(storage, eframe::APP_KEY, &self.settings);
        }
    }
}

impl Drop for StudioApp {
    fn drop(&mut self) {
        // Stop a run in progress so the worker can shut down promptly.
        self.send(Command::Stop);
    }
}

/// Opens the window (the binary's default command).
pub fn run_window() -> anyhow::Result<()> {
    let options = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default()
            .with_title("peft-studio")
            .with_inner_size([1280.0, 820.0])
            .with_min_inner_size([900.0, 600.0]),
        persist_window: true,
        ..Default::default()
    };
    eframe::run_native(
        "peft-studio",
        options,
        Box::new(|cc| Ok(Box::new(StudioApp::new(cc, AppOptions::default())))),
    )
    .map_err(|e| anyhow::anyhow!("could not open the window: {e}"))
}

/// A picker that answers from a list (for tests and scripted use).
pub fn scripted_picker(answers: Vec<Option<PathBuf>>) -> FilePicker {
    let answers = std::sync::Mutex::new(answers.into_iter());
    Arc::new(move |_req: PickRequest| answers.lock().ok().and_then(|mut a| a.next()).flatten())
}

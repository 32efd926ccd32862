//! The studio window (eframe/egui): a Fine-tune tab (pick a model, data and method, train,
//! watch live curves), a Compare tab (every run in the run store, sortable, overlaid, on a
//! parameters-vs-accuracy scatter; resume, re-run, open, delete; the runs-folder setting) and
//! a Personalise tab.
//!
//! Nothing here trains, personalises or loads models: the engine's [`Worker`] does, on its own
//! thread, one job at a time (a training run or a personalisation), and file dialogs, dataset
//! previews and the Personalise tab's light tasks run on short-lived helper threads. The UI
//! drains their messages once per frame. The window draws only when something changed: input, a message
//! (the worker's wake-ups are coalesced to at most one frame per [`EVENT_REPAINT`]), or an
//! animation (a spinner asks for a frame a few times a second); idle, it sleeps.

mod background;
mod compare_tab;
mod device_picker;
mod dialogs;
mod export_dialog;
mod form;
mod personalise_tab;
mod plots;
mod run_view;
mod spinner;
mod train_tab;
mod try_it_panel;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use dialogs::{
    FilePicker, PickPurpose, PickRequest, PickResult, init_logging, rfd_picker, scripted_picker,
    unavailable_picker,
};
pub use personalise_tab::{GalleryRow, ModelState, PersonaliseSettings, PersonaliseState, Phase};
pub use plots::{run_color, unique_labels};
pub use run_view::{RunView, UiState};
pub use try_it_panel::{Answer, AnswerStatus, TryItSettings, TryItView};

use crate::train::{RunStatus, RunStore, RunSummary, TrainConfig};
use crate::worker::{Command, Event, Runners, Worker};
use background::Background;
use dialogs::TypedPath;

/// The longest the window waits to draw after the worker reports something: events arriving
/// faster (a step every few milliseconds) share one frame. One frame a second keeps the
/// progress and curves live; more competes with training for the CPU (a frame of Mesa's
/// software renderer costs ~70 ms of CPU at 1280 x 820: at 2 frames a second the renderer
/// took a fifth of the training's CPU time). Input still redraws at once.
pub const EVENT_REPAINT: Duration = Duration::from_secs(1);

/// Why training cannot start while the Personalise tab's job runs (the worker runs one job at
/// a time).
const PERSONALISING: &str =
    "a personalisation is in progress: cancel it in the Personalise tab or wait for it to end";

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
    /// The run store's folder chosen in the settings (absolute); `None`: the default.
    pub runs_dir: Option<PathBuf>,
    /// The Fine-tune tab's side panel (the form) is shown.
    pub form_open: bool,
    /// The Try-it panel's prompt and length.
    pub try_it: TryItSettings,
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
            runs_dir: None,
            form_open: true,
            try_it: TryItSettings::default(),
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
    /// The run store's folder (made absolute at start; the settings may choose another).
    pub runs_dir: PathBuf,
    /// How files and folders are chosen.
    pub picker: FilePicker,
    /// Read and write eframe storage.
    pub persist: bool,
    /// The DiffLoRA personaliser the Personalise tab uses.
    pub personaliser_dir: PathBuf,
    /// What the worker trains and personalises with (stand-ins in tests).
    pub runners: Runners,
}

impl Default for AppOptions {
    fn default() -> Self {
        Self {
            runs_dir: PathBuf::from("runs"),
            picker: rfd_picker(),
            persist: true,
            personaliser_dir: crate::personalize::pipeline::builtin_dir(),
            runners: Runners::default(),
        }
    }
}

/// A result from a helper thread.
pub(crate) enum TaskResult {
    /// A dialog closed: the path, `None` if cancelled, or why no dialog could open.
    Picked(PickPurpose, PickResult),
    /// A dataset preview for form generation `u64`.
    Preview(u64, Result<form::DataPreview, String>),
    /// The folder opener failed (what to tell the user).
    OpenFailed(String),
    /// A run's export ended: what was written, or why it failed.
    Exported(Result<String, String>),
    /// A job's output was imported into the store: the new run, or why not.
    Imported(Result<String, String>),
    /// A task of the Personalise tab finished.
    Personalise(personalise_tab::Done),
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
    /// The Try-it panel's answers.
    pub try_it: TryItView,
    store: RunStore,
    worker: Option<Worker>,
    background: Background<TaskResult>,
    options: AppOptions,
    form: form::FormState,
    compare: compare_tab::CompareState,
    ctx: egui::Context,
    /// The typed-path box (no dialog could open).
    typed_path: Option<TypedPath>,
    /// A dialog of the Fine-tune or Compare tab is open.
    picking: bool,
    /// Store problems already reported (each is shown once).
    reported: HashSet<String>,
    /// The devices this binary can compute on here (read once at start).
    devices: Vec<crate::device::DeviceInfo>,
}

/// Starts the worker on `store`; its wake-ups ask for a frame within [`EVENT_REPAINT`].
fn spawn_worker(
    ctx: &egui::Context,
    store: &RunStore,
    runners: &Runners,
) -> Result<Worker, UiError> {
    let repaint = ctx.clone();
    Worker::spawn_runners(store.clone(), runners.clone(), move || {
        repaint.request_repaint_after(EVENT_REPAINT)
    })
    .map_err(|e| UiError {
        title: "The training worker could not start".into(),
        details: e.to_string(),
    })
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
        let runs_dir = dialogs::absolute(settings.runs_dir.as_ref().unwrap_or(&options.runs_dir));
        let store = RunStore::new(runs_dir);
        let mut errors = Vec::new();
        let worker = spawn_worker(ctx, &store, &options.runners)
            .map_err(|e| errors.push(e))
            .ok();
        let mut app = Self {
            settings,
            run: RunView::default(),
            runs: Vec::new(),
            errors,
            personalise: PersonaliseState::default(),
            try_it: TryItView::default(),
            store,
            worker,
            background: Background::new(ctx.clone()),
            options,
            form: form::FormState::default(),
            compare: compare_tab::CompareState::default(),
            ctx: ctx.clone(),
            typed_path: None,
            picking: false,
            devices: crate::device::available(),
            reported: HashSet::new(),
        };
        app.refresh_runs();
        app.form
            .request_preview(&app.background, &app.settings.config);
        app
    }

    /// Re-reads the run store; a folder that cannot be read is reported once, not at every
    /// refresh.
    pub fn refresh_runs(&mut self) {
        let (runs, problems) = self.store.list();
        self.runs = runs;
        for p in problems {
            self.report_once("A run in the store could not be read", p);
        }
        self.compare.forget_missing(&self.runs);
    }

    /// Shows an error unless the same one was shown before.
    pub fn report_once(&mut self, title: &str, details: String) {
        if self.reported.insert(format!("{title}\n{details}")) {
            self.report(title, details);
        }
    }

    /// The id of the run the worker is busy with, if any.
    pub fn live_run_id(&self) -> Option<&str> {
        self.run
            .run_id
            .as_deref()
            .filter(|_| self.run.state.is_busy())
    }

    /// Whether a stored run stopped before its last step and can continue: stopped, failed, or
    /// "running" with no process behind it (killed), with a checkpoint to start from.
    pub fn can_resume(&self, r: &RunSummary) -> bool {
        let interrupted = match r.status {
            RunStatus::Stopped | RunStatus::Failed => true,
            RunStatus::Running => {
                self.live_run_id() != Some(r.id.as_str()) && !self.store.is_training(&r.id)
            }
            RunStatus::Finished => false,
        };
        interrupted && has_checkpoint(&self.store.root().join(&r.id))
    }

    /// Continues stored run `id` from its checkpoint (as `train --resume` does).
    pub fn resume_run(&mut self, id: &str) {
        if self.run.state.is_busy() {
            self.report(
                "A run is in progress",
                "stop it before resuming another one",
            );
            return;
        }
        if self.personalise.is_busy() {
            self.report("A run cannot resume now", PERSONALISING);
            return;
        }
        let Some(summary) = self.runs.iter().find(|r| r.id == id).cloned() else {
            return;
        };
        let metrics = self.store.metrics(id).unwrap_or_default();
        match &self.worker {
            Some(w) => {
                self.run = RunView::resuming(&summary, &metrics);
                w.send(Command::ResumeRun(self.store.root().join(id)));
                self.settings.tab = Tab::Train;
            }
            None => self.report(
                "Training is unavailable",
                "the worker thread is not running",
            ),
        }
    }

    /// The run store's folder (absolute).
    pub fn runs_dir(&self) -> &Path {
        self.store.root()
    }

    /// Moves the run store to `dir` (created if missing); refused while the worker is busy (a
    /// run trains or a personalisation runs): the worker is replaced.
    pub fn set_runs_dir(&mut self, dir: PathBuf) {
        if self.run.state.is_busy() || self.personalise.is_busy() {
            self.report(
                "The runs folder cannot change now",
                "a run or a personalisation is in progress: stop it first",
            );
            return;
        }
        let dir = dialogs::absolute(&dir);
        if let Err(e) = std::fs::create_dir_all(&dir) {
            self.report(
                "That runs folder cannot be used",
                format!("{}: {e}", dir.display()),
            );
            return;
        }
        // Joins the idle worker before its successor starts on the new store.
        self.worker = None;
        self.store = RunStore::new(dir.clone());
        match spawn_worker(&self.ctx, &self.store, &self.options.runners) {
            Ok(w) => self.worker = Some(w),
            Err(e) => self.errors.push(e),
        }
        self.settings.runs_dir = Some(dir);
        self.run = RunView::default();
        self.refresh_runs();
    }

    /// Opens a stored run's folder in the file manager, or says why it cannot.
    pub fn open_run_folder(&mut self, id: &str) {
        let path = self.store.root().join(id);
        match dialogs::open_folder(&path) {
            Ok((mut child, program)) => {
                let shown = path.display().to_string();
                let waited = self.background.spawn("folder-opener", move || {
                    match child.wait() {
                        Ok(s) if s.success() => TaskResult::OpenFailed(String::new()),
                        Ok(s) => TaskResult::OpenFailed(format!(
                            "{program} found no program to open folders ({s}); the folder is {shown}"
                        )),
                        Err(e) => TaskResult::OpenFailed(format!(
                            "{program} did not finish ({e}); the folder is {shown}"
                        )),
                    }
                });
                if let Err(e) = waited {
                    log::warn!("{e}");
                }
            }
            Err(e) => self.report("The folder could not be opened", e),
        }
    }

    /// Asks for a path on a helper thread (the Fine-tune and Compare tabs' buttons).
    pub fn pick(&mut self, purpose: PickPurpose) {
        if self.picking {
            return;
        }
        self.picking = true;
        let picker = self.options.picker.clone();
        let spawned = self.background.spawn("file-dialog", move || {
            TaskResult::Picked(purpose, picker(purpose.request()))
        });
        if let Err(e) = spawned {
            self.picking = false;
            self.report("A helper thread could not start", e);
        }
    }

    /// No dialog could open: says why and offers the typed-path box instead.
    pub fn dialog_failed(&mut self, purpose: PickPurpose, why: String) {
        self.report_once(
            "No file dialog could open",
            format!("{why}. Type the path in the box below instead."),
        );
        self.typed_path = Some(TypedPath {
            purpose,
            text: String::new(),
        });
    }

    /// Whether the typed-path box is showing.
    pub fn typed_path_open(&self) -> bool {
        self.typed_path.is_some()
    }

    /// Delivers a chosen (or typed) path to what asked for it.
    pub fn deliver_path(&mut self, purpose: PickPurpose, path: PathBuf) {
        match purpose {
            PickPurpose::RunsFolder => self.set_runs_dir(path),
            PickPurpose::ExportFolder => export_dialog::use_picked_folder(self, path),
            PickPurpose::JobOutput => export_dialog::import_job(self, path),
            PickPurpose::ReferenceFolder
            | PickPurpose::ReferenceImage
            | PickPurpose::SaveImages
            | PickPurpose::SaveLora => personalise_tab::use_path(self, purpose, path),
            _ => form::handle_pick(self, purpose, path),
        }
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
        if self.personalise.is_busy() {
            self.report("Training cannot start now", PERSONALISING);
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

    /// Drains the worker's and helper threads' messages (never blocks): training and Try-it
    /// events, the personalisation job's events (to the Personalise tab), helper results.
    pub fn poll(&mut self) {
        let mut events = Vec::new();
        if let Some(w) = &self.worker {
            while let Some(e) = w.try_recv() {
                events.push(e);
            }
        }
        for e in events {
            // A started run is listed at once (its summary says "running").
            let listed = matches!(
                e,
                Event::RunStarted { .. } | Event::RunFinished(_) | Event::RunFailed { .. }
            );
            if let Event::RunFailed { error, .. } = &e {
                self.report("The run failed", error.clone());
            }
            if let Event::Refused(why) = &e {
                self.report("The worker refused", why.clone());
            }
            if let Event::TryIt(t) = &e {
                self.try_it.apply(t);
                continue;
            }
            if let Event::Personalise(p) = e {
                personalise_tab::apply(self, p);
                continue;
            }
            self.run.apply(e);
            if listed {
                self.refresh_runs();
            }
        }
        for r in self.background.drain() {
            self.handle_task(r);
        }
    }

    fn handle_task(&mut self, r: TaskResult) {
        match r {
            TaskResult::Picked(purpose, answer) => {
                self.picking = false;
                match answer {
                    Ok(Some(path)) => self.deliver_path(purpose, path),
                    Ok(None) => {}
                    Err(why) => self.dialog_failed(purpose, why),
                }
            }
            TaskResult::Preview(generation, result) => self.form.set_preview(generation, result),
            TaskResult::OpenFailed(why) => {
                if !why.is_empty() {
                    self.report("The folder could not be opened", why);
                }
            }
            TaskResult::Exported(result) => export_dialog::finished(self, result, false),
            TaskResult::Imported(result) => export_dialog::finished(self, result, true),
            TaskResult::Personalise(done) => personalise_tab::task_done(self, done),
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
                    ui.separator();
                    device_picker::show(ui, &mut self.settings.config.device, &self.devices);
                });
            });
            if !self.errors.is_empty() {
                self.errors_ui(ui);
            }
            if let Some((purpose, path)) = dialogs::typed_path_ui(ui, &mut self.typed_path) {
                self.deliver_path(purpose, path);
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
            .with_min_inner_size([640.0, 480.0]),
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

/// Whether a run folder holds a checkpoint to resume from (or the pieces a save interrupted
/// mid-way leaves, which the resume recovers).
fn has_checkpoint(run: &Path) -> bool {
    let layout = crate::train::layout::RunLayout::new(run);
    [None, Some("old"), Some("tmp")].into_iter().any(|suffix| {
        layout
            .checkpoint(suffix)
            .join(crate::train::checkpoint::META_FILE)
            .is_file()
    })
}

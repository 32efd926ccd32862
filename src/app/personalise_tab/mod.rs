//! The Personalise tab: DiffLoRA personalisation. Choose reference images (a folder, one image,
//! or a built-in sample person), type or pick a prompt, press Personalise, and get a gallery
//! with an identity score under each image. On request the same prompt and seed are drawn by the
//! base generator (no LoRA) and by a LoRA fine-tuned directly on the references (the test-time
//! tuning DiffLoRA replaces), each with its time. Images and the LoRA can be saved.
//!
//! The tab computes nothing. Personalising is a job of the worker, like training: the tab sends
//! [`Command::Personalise`] and applies the [`PersonaliseEvent`]s the window drains once per
//! frame (stage, progress, the galleries, a failure or the cancellation); Cancel sends
//! [`Command::CancelPersonalise`]. The worker runs one job at a time, so the tab refuses to
//! personalise while a training run is in progress (and the Fine-tune tab refuses to train
//! while a personalisation is). Loading the personaliser, rendering a sample person, reading
//! references and saving are short tasks on the window's helper threads, whose results come
//! back as [`TaskResult::Personalise`]; file dialogs are the window's ([`StudioApp::pick`]).
//! The tab's drawing is in [`view`].

mod view;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use egui::TextureHandle;
use image::RgbImage;
use serde::{Deserialize, Serialize};

pub use view::show;

use super::dialogs::PickPurpose;
use super::{StudioApp, TaskResult};
use crate::data::identity_folder::load_references;
use crate::device::DeviceChoice;
use crate::personalize::build::files;
use crate::personalize::commands::{SAMPLE_PEOPLE, contact_sheet, sample_person, save_png};
use crate::personalize::job::{PersonaliseEvent, PersonaliseRequest, PersonaliseResult};
use crate::personalize::pipeline::{Gallery, Personaliser};
use crate::personalize::progress::Stage;
use crate::worker::Command;

/// Prompts offered as chips next to the prompt field.
pub const PROMPT_PRESETS: [&str; 4] = [
    "smile, blue background",
    "surprised, face left, hat",
    "sad, light from the right",
    "neutral, green background, scarf",
];

/// What the Personalise tab remembers between launches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PersonaliseSettings {
    /// The prompt.
    pub prompt: String,
    /// Images per gallery (1–8).
    pub n: usize,
    /// Sampling seed.
    pub seed: u64,
    /// Also draw the gallery with the base generator (no LoRA).
    pub compare_base: bool,
    /// Also fine-tune a LoRA directly on the references and draw its gallery.
    pub compare_direct: bool,
}

impl Default for PersonaliseSettings {
    fn default() -> Self {
        Self {
            prompt: PROMPT_PRESETS[0].to_string(),
            n: 4,
            seed: 0,
            compare_base: false,
            compare_direct: false,
        }
    }
}

/// Where the personaliser stands.
pub enum ModelState {
    /// Not looked for yet (it is, the first time the tab shows).
    Unchecked,
    /// The folder holds no built personaliser.
    Missing(PathBuf),
    /// Loading on a helper thread.
    Loading,
    /// Loaded.
    Ready(Arc<Personaliser>),
    /// Loading failed (the error is in the window's error list too).
    Failed(String),
}

/// What the tab is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Nothing has run yet.
    Idle,
    /// The worker is personalising: the stage it last reported (`None`: not started yet).
    Busy(Option<Stage>),
    /// The last run finished.
    Finished,
    /// The last run failed or did not start (the error is in the window's error list).
    Failed,
    /// The last run was cancelled.
    Cancelled,
}

/// One gallery row: DiffLoRA, the base generator or the direct LoRA.
pub struct GalleryRow {
    /// The row's heading, with its mean score and seconds.
    pub title: String,
    /// The images and their identity scores.
    pub gallery: Gallery,
    /// What the attribute reader reads in it against the prompt (one line), when known.
    pub reading: Option<String>,
    textures: Vec<TextureHandle>,
}

impl GalleryRow {
    fn new(title: String, gallery: Gallery) -> Self {
        Self {
            title,
            gallery,
            reading: None,
            textures: Vec::new(),
        }
    }

    /// Replaces the images and scores; the textures are rebuilt on the next frame.
    pub fn replace_gallery(&mut self, gallery: Gallery) {
        self.gallery = gallery;
        self.textures.clear();
    }
}

/// A finished helper task of this tab.
pub(crate) enum Done {
    /// The personaliser in this folder loaded, or why not.
    Loaded((PathBuf, DeviceChoice), Result<Arc<Personaliser>, String>),
    /// New references (source in words, images), or why they could not be read.
    /// References read: where from, the images, the warnings about them.
    References(Result<(String, Vec<RgbImage>, Vec<String>), String>),
    /// A save finished: what was written, or (title, details) of the error.
    Saved(Result<String, (String, String)>),
}

/// The Personalise tab's state.
pub struct PersonaliseState {
    /// The personaliser.
    pub model: ModelState,
    /// The reference images (at the personaliser's image size).
    pub references: Vec<RgbImage>,
    /// Where they came from, in words.
    pub references_source: String,
    /// Problems with the references that do not stop personalisation.
    pub warnings: Vec<String>,
    /// What the tab is doing.
    pub phase: Phase,
    /// Cancel was pressed; the worker has not answered yet.
    pub cancelling: bool,
    /// The last save or cancellation, in words.
    pub note: Option<String>,
    /// The DiffLoRA gallery of the last run.
    pub diff: Option<GalleryRow>,
    /// The base generator's gallery of the last run.
    pub base: Option<GalleryRow>,
    /// The direct LoRA's gallery of the last run.
    pub direct: Option<GalleryRow>,
    /// The last run's result (its LoRA is what "Save LoRA" writes).
    pub result: Option<Arc<PersonaliseResult>>,
    ref_textures: Vec<TextureHandle>,
    reading: bool,
    saving: bool,
    loaded_from: Option<(PathBuf, DeviceChoice)>,
}

impl Default for PersonaliseState {
    fn default() -> Self {
        Self {
            model: ModelState::Unchecked,
            references: Vec::new(),
            references_source: String::new(),
            warnings: Vec::new(),
            phase: Phase::Idle,
            cancelling: false,
            note: None,
            diff: None,
            base: None,
            direct: None,
            result: None,
            ref_textures: Vec::new(),
            reading: false,
            saving: false,
            loaded_from: None,
        }
    }
}

impl PersonaliseState {
    /// Whether a run is in progress.
    pub fn is_busy(&self) -> bool {
        matches!(self.phase, Phase::Busy(_))
    }

    /// The stage the worker last reported, while a run is in progress.
    pub fn stage(&self) -> Option<Stage> {
        match self.phase {
            Phase::Busy(stage) => stage,
            _ => None,
        }
    }

    /// The loaded personaliser.
    pub fn personaliser(&self) -> Option<&Arc<Personaliser>> {
        match &self.model {
            ModelState::Ready(p) => Some(p),
            _ => None,
        }
    }

    /// Whether references are being read or a save is in progress.
    pub fn is_waiting(&self) -> bool {
        self.reading || self.saving
    }

    /// The state line shown above the gallery.
    pub fn state_line(&self) -> String {
        let mut s = match &self.phase {
            Phase::Idle if self.references.is_empty() => {
                "State: choose reference images".to_string()
            }
            Phase::Idle => "State: ready".to_string(),
            Phase::Busy(_) if self.cancelling => "State: cancelling...".to_string(),
            Phase::Busy(None) => "State: starting...".to_string(),
            Phase::Busy(Some(stage)) => format!("State: {stage}..."),
            Phase::Finished => "State: finished".to_string(),
            Phase::Failed => "State: failed".to_string(),
            Phase::Cancelled => "State: cancelled".to_string(),
        };
        if let Some(n) = &self.note {
            s += &format!("; {n}");
        }
        s
    }

    /// Clears the last run's results.
    fn clear_results(&mut self) {
        self.note = None;
        self.diff = None;
        self.base = None;
        self.direct = None;
        self.result = None;
    }
}

fn seconds(s: f64) -> String {
    if s < 1.0 {
        format!("{s:.2} s")
    } else {
        format!("{s:.1} s")
    }
}

/// Runs `f` under the worker's panic guard; the error (or panic) in words.
fn guarded<T>(f: impl FnOnce() -> anyhow::Result<T>) -> Result<T, String> {
    match crate::worker::guard(f) {
        Ok(r) => r.map_err(|e| format!("{e:#}")),
        Err(panic) => Err(format!("internal error: {panic}")),
    }
}

/// Runs `f` on one of the window's helper threads; its result comes back as a [`Done`].
fn spawn_task(app: &mut StudioApp, name: &str, f: impl FnOnce() -> Done + Send + 'static) -> bool {
    match app
        .background
        .spawn(name, move || TaskResult::Personalise(f()))
    {
        Ok(()) => true,
        Err(e) => {
            app.report("A helper thread could not start", e);
            false
        }
    }
}

/// Looks for the personaliser the first time (and whenever the folder or the device changes)
/// and loads it onto the chosen device on a helper thread.
fn ensure_model(app: &mut StudioApp) {
    let dir = app.options.personaliser_dir.clone();
    let choice = app.settings.config.device;
    let key = (dir.clone(), choice);
    if app.personalise.loaded_from.as_ref() == Some(&key) {
        return;
    }
    app.personalise.loaded_from = Some(key.clone());
    if !dir.join(files::PRESET).is_file() {
        app.personalise.model = ModelState::Missing(dir);
        return;
    }
    app.personalise.model = ModelState::Loading;
    let ok = spawn_task(app, "personaliser-load", move || {
        let loaded = guarded(|| Personaliser::load(&dir, &choice.resolve()?)).map(Arc::new);
        Done::Loaded(key, loaded)
    });
    if !ok {
        app.personalise.model = ModelState::Failed("the loading thread did not start".into());
    }
}

/// Applies a finished helper task.
pub(crate) fn task_done(app: &mut StudioApp, done: Done) {
    let s = &mut app.personalise;
    match done {
        Done::Loaded(key, _) if s.loaded_from.as_ref() != Some(&key) => {}
        Done::Loaded(_, Ok(p)) => s.model = ModelState::Ready(p),
        Done::Loaded((dir, _), Err(e)) => {
            s.model = ModelState::Failed(e.clone());
            let dir = dir.display().to_string();
            app.report(format!("The personaliser at {dir} could not be loaded"), e);
        }
        Done::References(Ok((source, images, warnings))) => {
            s.reading = false;
            s.warnings = warnings;
            s.references = images;
            s.references_source = source;
            s.ref_textures.clear();
            if s.phase == Phase::Failed {
                s.phase = Phase::Idle;
            }
        }
        Done::References(Err(e)) => {
            s.reading = false;
            app.report("The reference images could not be loaded", e);
        }
        Done::Saved(r) => {
            s.saving = false;
            match r {
                Ok(what) => s.note = Some(what),
                Err((title, e)) => app.report(title, e),
            }
        }
    }
}

/// Applies an event of the worker's personalisation job.
pub(crate) fn apply(app: &mut StudioApp, e: PersonaliseEvent) {
    let s = &mut app.personalise;
    match e {
        PersonaliseEvent::Progress(stage) => {
            if s.is_busy() {
                s.phase = Phase::Busy(Some(stage));
            }
        }
        PersonaliseEvent::Finished(r) => {
            s.cancelling = false;
            s.phase = Phase::Finished;
            show_result(s, r);
        }
        PersonaliseEvent::Failed(e) => {
            s.cancelling = false;
            s.phase = Phase::Failed;
            app.report("Personalisation failed", e);
        }
        PersonaliseEvent::Cancelled => {
            s.cancelling = false;
            s.phase = Phase::Cancelled;
        }
        PersonaliseEvent::Refused(why) => {
            s.cancelling = false;
            s.phase = Phase::Failed;
            app.report("Personalisation did not start", why);
        }
    }
}

/// Turns a finished job into the gallery rows.
fn show_result(s: &mut PersonaliseState, r: Arc<PersonaliseResult>) {
    let title = format!(
        "DiffLoRA (no fine-tuning): mean identity {:.2}; LoRA in {}, gallery in {}",
        r.diff.mean_score(),
        seconds(r.seconds.personalise_total),
        seconds(r.seconds.gallery)
    );
    let mut diff = GalleryRow::new(title, r.diff.clone());
    diff.reading = Some(r.reading.diff.clone());
    s.diff = Some(diff);
    s.base = r.base.as_ref().map(|g| {
        let title = format!(
            "Base generator (no LoRA): mean identity {:.2}; gallery in {}",
            g.mean_score(),
            seconds(g.seconds)
        );
        let mut row = GalleryRow::new(title, g.clone());
        row.reading = r.reading.base.clone();
        row
    });
    s.direct = r.direct.as_ref().map(|d| {
        let title = format!(
            "Direct LoRA fine-tuning: mean identity {:.2}; trained in {}, gallery in {}",
            d.gallery.mean_score(),
            seconds(d.train_seconds),
            seconds(d.gallery.seconds)
        );
        let mut row = GalleryRow::new(title, d.gallery.clone());
        row.reading = r.reading.direct.clone();
        row
    });
    s.result = Some(r);
}

/// Marks a reading of references begun and returns the personaliser's image size; `None`
/// (nothing begun) without a personaliser or while another reading runs.
fn start_reading(app: &mut StudioApp) -> Option<Arc<Personaliser>> {
    let p = app.personalise.personaliser()?.clone();
    if app.personalise.reading {
        return None;
    }
    app.personalise.reading = true;
    Some(p)
}

/// The references' warnings (the familiarity check runs the identity encoder: on the helper
/// thread, never the UI's).
fn with_warnings(
    p: &Personaliser,
    source: String,
    images: Vec<RgbImage>,
) -> anyhow::Result<(String, Vec<RgbImage>, Vec<String>)> {
    let warnings = p.reference_warnings(&images)?;
    Ok((source, images, warnings))
}

/// Replaces the references with built-in sample person `index` (as its button does).
pub fn choose_sample(app: &mut StudioApp, index: usize) {
    let Some(p) = start_reading(app) else {
        return;
    };
    let name = SAMPLE_PEOPLE[index % SAMPLE_PEOPLE.len()].0;
    if !spawn_task(app, "sample-person", move || {
        let res = guarded(|| {
            let images = sample_person(index, p.image_size());
            with_warnings(&p, format!("sample person {name}"), images)
        });
        Done::References(res)
    }) {
        app.personalise.reading = false;
    }
}

/// Reads the references at `path` (a folder or one image) on a helper thread.
fn read_references(app: &mut StudioApp, path: PathBuf) {
    let Some(p) = start_reading(app) else {
        return;
    };
    if !spawn_task(app, "references", move || {
        let res = guarded(|| {
            let images = load_references(&path, p.image_size())?;
            with_warnings(&p, path.display().to_string(), images)
        });
        Done::References(res)
    }) {
        app.personalise.reading = false;
    }
}

/// Uses a chosen (or typed) path for one of this tab's purposes.
pub fn use_path(app: &mut StudioApp, purpose: PickPurpose, path: PathBuf) {
    match purpose {
        PickPurpose::ReferenceFolder | PickPurpose::ReferenceImage => read_references(app, path),
        PickPurpose::SaveImages => save_to(app, SaveWhat::Images, path),
        PickPurpose::SaveLora => save_to(app, SaveWhat::Lora, path),
        _ => {}
    }
}

/// Why the Personalise button is off while training, in words.
pub const TRAINING_RUNS: &str =
    "a training run is in progress: personalise when it ends (or stop it)";

/// Asks the worker to personalise (as the Personalise button does): DiffLoRA, then the
/// comparisons asked for. Refused while a training run is in progress.
pub fn start(app: &mut StudioApp) {
    let s = &app.personalise;
    if s.is_busy() || s.references.is_empty() {
        return;
    }
    let Some(p) = s.personaliser().cloned() else {
        return;
    };
    if app.run.state.is_busy() {
        app.report("Personalisation cannot start now", TRAINING_RUNS);
        return;
    }
    let set = &app.settings.personalise;
    let request = PersonaliseRequest {
        personaliser: p,
        references: s.references.clone(),
        prompt: set.prompt.clone(),
        n: set.n.clamp(1, 8),
        seed: set.seed,
        compare_base: set.compare_base,
        compare_direct: set.compare_direct,
        out: None,
    };
    let Some(worker) = &app.worker else {
        app.report(
            "Personalisation is unavailable",
            "the worker thread is not running",
        );
        return;
    };
    worker.send(Command::Personalise(Box::new(request)));
    let s = &mut app.personalise;
    s.clear_results();
    s.cancelling = false;
    s.phase = Phase::Busy(None);
}

/// Asks the worker to cancel the run in progress (as the Cancel button does).
pub fn cancel(app: &mut StudioApp) {
    if app.personalise.is_busy() && !app.personalise.cancelling {
        app.personalise.cancelling = true;
        app.send(Command::CancelPersonalise);
    }
}

/// What to save.
#[derive(Clone, Copy, PartialEq, Eq)]
enum SaveWhat {
    Images,
    Lora,
}

/// Whether there is a result to save and nothing in the way.
fn can_save(app: &StudioApp) -> bool {
    let s = &app.personalise;
    s.result.is_some() && s.diff.is_some() && !s.is_busy() && !s.saving && !app.picking
}

/// Asks for the folder to save into (as the Save buttons do).
fn save(app: &mut StudioApp, what: SaveWhat) {
    if can_save(app) {
        app.pick(match what {
            SaveWhat::Images => PickPurpose::SaveImages,
            SaveWhat::Lora => PickPurpose::SaveLora,
        });
    }
}

/// Saves into `dir` on a helper thread.
fn save_to(app: &mut StudioApp, what: SaveWhat, dir: PathBuf) {
    let s = &app.personalise;
    if s.saving || s.is_busy() {
        return;
    }
    let (Some(p), Some(diff), Some(result)) =
        (s.personaliser().cloned(), &s.diff, s.result.clone())
    else {
        return;
    };
    let gallery = diff.gallery.images.clone();
    let mut rows = vec![s.references.clone(), gallery.clone()];
    for row in [&s.base, &s.direct].into_iter().flatten() {
        rows.push(row.gallery.images.clone());
    }
    app.personalise.saving = true;
    let ok = spawn_task(app, "personalise-save", move || {
        let res = match what {
            SaveWhat::Images => guarded(|| save_images(&dir, &gallery, &rows))
                .map(|()| {
                    format!(
                        "saved {} images and sheet.png to {}",
                        gallery.len(),
                        dir.display()
                    )
                })
                .map_err(|e| ("The images could not be saved".to_string(), e)),
            SaveWhat::Lora => guarded(|| p.save_adapter(&result.adapted, &dir))
                .map(|()| format!("saved the LoRA to {}", dir.display()))
                .map_err(|e| ("The LoRA could not be saved".to_string(), e)),
        };
        Done::Saved(res)
    });
    if !ok {
        app.personalise.saving = false;
    }
}

/// Writes `NN.png` for each gallery image and `sheet.png` (references above the galleries).
fn save_images(dir: &Path, gallery: &[RgbImage], rows: &[Vec<RgbImage>]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
    for (i, img) in gallery.iter().enumerate() {
        save_png(img, &dir.join(format!("{:02}.png", i + 1)))?;
    }
    let rows: Vec<&[RgbImage]> = rows.iter().map(|r| r.as_slice()).collect();
    save_png(&contact_sheet(&rows, 4), &dir.join("sheet.png"))
}

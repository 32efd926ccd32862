//! The Personalise tab: DiffLoRA personalisation. Choose reference images (a folder, one image,
//! or a built-in sample person), type or pick a prompt, press Personalise, and get a gallery
//! with an identity score under each image. On request the same prompt and seed are drawn by the
//! base generator (no LoRA) and by a LoRA fine-tuned directly on the references (the test-time
//! tuning DiffLoRA replaces), each with its time. Images and the LoRA can be saved.
//!
//! Loading the personaliser, rendering sample people, reading references, personalising, direct
//! fine-tuning and saving all run on named helper threads; their messages come back over a
//! channel that [`poll`] drains once per frame.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};
use egui::{RichText, TextureHandle, Ui};
use image::RgbImage;
use serde::{Deserialize, Serialize};

use super::StudioApp;
use super::dialogs::{FilePicker, PickPurpose, fixed_picker};
use crate::models::unet::Generator;
use crate::personalize::build::files;
use crate::personalize::commands::{SAMPLE_PEOPLE, contact_sheet, sample_person, save_png};
use crate::personalize::load_references;
use crate::personalize::pipeline::{
    Gallery, Personaliser, StageSeconds, merged, reference_warnings,
};

/// Prompts offered as chips next to the prompt field.
pub const PROMPT_PRESETS: [&str; 4] = [
    "smile, blue background",
    "surprised, face left, hat",
    "sad, light from the right",
    "neutral, green background, scarf",
];

/// Side of a reference thumbnail, in points.
const THUMB: f32 = 96.0;
/// Side of a gallery image, in points.
const TILE: f32 = 104.0;

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
    /// Personalising (or drawing a comparison): the stage in words.
    Busy(String),
    /// The last run finished.
    Finished,
    /// The last run failed (the error is in the window's error list).
    Failed,
}

/// One gallery row: DiffLoRA, the base generator or the direct LoRA.
pub struct GalleryRow {
    /// The row's heading, with its mean score and seconds.
    pub title: String,
    /// The images and their identity scores.
    pub gallery: Gallery,
    textures: Vec<TextureHandle>,
}

impl GalleryRow {
    fn new(title: String, gallery: Gallery) -> Self {
        Self {
            title,
            gallery,
            textures: Vec::new(),
        }
    }

    /// Replaces the images and scores; the textures are rebuilt on the next frame.
    pub fn replace_gallery(&mut self, gallery: Gallery) {
        self.gallery = gallery;
        self.textures.clear();
    }
}

/// The DiffLoRA result of a run.
struct Diff {
    adapted: Generator,
    gallery: Gallery,
    seconds: StageSeconds,
}

/// A message from a helper thread.
enum Msg {
    Loaded(Result<Arc<Personaliser>, String>),
    /// New references (source in words, images), or why they could not be read.
    References(Result<(String, Vec<RgbImage>), String>),
    PickCancelled,
    /// No dialog could open (for this purpose), and why.
    PickFailed(PickPurpose, String),
    Stage(String),
    Personalised(Result<Box<Diff>, String>),
    Base(Result<Gallery, String>),
    DirectProgress(usize, usize),
    Direct(Result<(Gallery, f64), String>),
    RunDone,
    /// A save finished: what was written, or why not (`None`: the dialog was cancelled).
    Saved(Option<Result<String, (String, String)>>),
}

/// Sends messages to the UI and wakes it up.
struct Reply {
    tx: Sender<Msg>,
    ctx: egui::Context,
}

impl Reply {
    fn send(&self, m: Msg) {
        // The window is closing if the receiver is gone: nothing to deliver.
        let _ = self.tx.send(m);
        self.ctx.request_repaint();
    }
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
    /// The last save, in words.
    pub note: Option<String>,
    /// The DiffLoRA gallery of the last run.
    pub diff: Option<GalleryRow>,
    /// The base generator's gallery of the last run.
    pub base: Option<GalleryRow>,
    /// The direct LoRA's gallery of the last run.
    pub direct: Option<GalleryRow>,
    /// Direct fine-tuning progress (step, total) while it trains.
    pub direct_progress: Option<(usize, usize)>,
    /// Seconds per stage of the last DiffLoRA run.
    pub seconds: Option<StageSeconds>,
    adapted: Option<Arc<Generator>>,
    ref_textures: Vec<TextureHandle>,
    picking: bool,
    saving: bool,
    loaded_from: Option<PathBuf>,
    tx: Sender<Msg>,
    rx: Receiver<Msg>,
}

impl Default for PersonaliseState {
    fn default() -> Self {
        let (tx, rx) = crossbeam_channel::unbounded();
        Self {
            model: ModelState::Unchecked,
            references: Vec::new(),
            references_source: String::new(),
            warnings: Vec::new(),
            phase: Phase::Idle,
            note: None,
            diff: None,
            base: None,
            direct: None,
            direct_progress: None,
            seconds: None,
            adapted: None,
            ref_textures: Vec::new(),
            picking: false,
            saving: false,
            loaded_from: None,
            tx,
            rx,
        }
    }
}

impl PersonaliseState {
    /// Whether a run is in progress.
    pub fn is_busy(&self) -> bool {
        matches!(self.phase, Phase::Busy(_))
    }

    /// The loaded personaliser.
    pub fn personaliser(&self) -> Option<&Arc<Personaliser>> {
        match &self.model {
            ModelState::Ready(p) => Some(p),
            _ => None,
        }
    }

    /// Whether a dialog or a save is in progress.
    pub fn is_waiting(&self) -> bool {
        self.picking || self.saving
    }

    /// The state line shown above the gallery.
    pub fn state_line(&self) -> String {
        let mut s = match &self.phase {
            Phase::Idle if self.references.is_empty() => {
                "State: choose reference images".to_string()
            }
            Phase::Idle => "State: ready".to_string(),
            Phase::Busy(stage) => format!("State: {stage}..."),
            Phase::Finished => "State: finished".to_string(),
            Phase::Failed => "State: failed".to_string(),
        };
        if let Some(n) = &self.note {
            s += &format!("; {n}");
        }
        s
    }

    /// Runs `f` on a named helper thread with a way to send messages back.
    fn spawn(
        &self,
        ctx: &egui::Context,
        name: &str,
        f: impl FnOnce(&Reply) + Send + 'static,
    ) -> Result<(), String> {
        let reply = Reply {
            tx: self.tx.clone(),
            ctx: ctx.clone(),
        };
        std::thread::Builder::new()
            .name(format!("peft-studio-{name}"))
            .spawn(move || f(&reply))
            .map(|_| ())
            .map_err(|e| format!("could not start the {name} thread: {e}"))
    }
}

fn seconds(s: f64) -> String {
    if s < 1.0 {
        format!("{s:.2} s")
    } else {
        format!("{s:.1} s")
    }
}

fn error_text(e: &anyhow::Error) -> String {
    format!("{e:#}")
}

/// Runs `f`, turning a panic into an error.
fn guarded<T>(f: impl FnOnce() -> anyhow::Result<T>) -> Result<T, String> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r.map_err(|e| error_text(&e)),
        Err(p) => Err(p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "the thread panicked".into())),
    }
}

fn spawn_or_report(
    app: &mut StudioApp,
    ctx: &egui::Context,
    name: &str,
    f: impl FnOnce(&Reply) + Send + 'static,
) -> bool {
    match app.personalise.spawn(ctx, name, f) {
        Ok(()) => true,
        Err(e) => {
            app.report("A helper thread could not start", e);
            false
        }
    }
}

/// Looks for the personaliser the first time (and whenever the folder option changes) and loads
/// it on a helper thread.
fn ensure_model(app: &mut StudioApp, ctx: &egui::Context) {
    let dir = app.options.personaliser_dir.clone();
    if app.personalise.loaded_from.as_ref() == Some(&dir) {
        return;
    }
    app.personalise.loaded_from = Some(dir.clone());
    if !dir.join(files::PRESET).is_file() {
        app.personalise.model = ModelState::Missing(dir);
        return;
    }
    app.personalise.model = ModelState::Loading;
    let ok = spawn_or_report(app, ctx, "personaliser-load", move |r| {
        let res = guarded(|| Personaliser::load(&dir)).map(Arc::new);
        r.send(Msg::Loaded(res));
    });
    if !ok {
        app.personalise.model = ModelState::Failed("the loading thread did not start".into());
    }
}

/// Drains the helper threads' messages (never blocks).
pub fn poll(app: &mut StudioApp) {
    let msgs: Vec<Msg> = app.personalise.rx.try_iter().collect();
    for m in msgs {
        handle(app, m);
    }
}

fn handle(app: &mut StudioApp, m: Msg) {
    let s = &mut app.personalise;
    match m {
        Msg::Loaded(Ok(p)) => s.model = ModelState::Ready(p),
        Msg::Loaded(Err(e)) => {
            s.model = ModelState::Failed(e.clone());
            let dir = app.options.personaliser_dir.display().to_string();
            app.report(format!("The personaliser at {dir} could not be loaded"), e);
        }
        Msg::References(Ok((source, images))) => {
            s.picking = false;
            s.warnings = reference_warnings(&images);
            s.references = images;
            s.references_source = source;
            s.ref_textures.clear();
            if s.phase == Phase::Failed {
                s.phase = Phase::Idle;
            }
        }
        Msg::References(Err(e)) => {
            s.picking = false;
            app.report("The reference images could not be loaded", e);
        }
        Msg::PickCancelled => s.picking = false,
        Msg::PickFailed(purpose, why) => {
            s.picking = false;
            s.saving = false;
            app.dialog_failed(purpose, why);
        }
        Msg::Stage(stage) => s.phase = Phase::Busy(stage),
        Msg::Personalised(Ok(d)) => {
            let d = *d;
            let title = format!(
                "DiffLoRA (no fine-tuning): mean identity {:.2}; LoRA in {}, gallery in {}",
                d.gallery.mean_score(),
                seconds(d.seconds.personalise_total),
                seconds(d.seconds.gallery)
            );
            s.diff = Some(GalleryRow::new(title, d.gallery));
            s.seconds = Some(d.seconds);
            s.adapted = Some(Arc::new(d.adapted));
        }
        Msg::Personalised(Err(e)) => {
            s.phase = Phase::Failed;
            app.report("Personalisation failed", e);
        }
        Msg::Base(Ok(g)) => {
            let title = format!(
                "Base generator (no LoRA): mean identity {:.2}; gallery in {}",
                g.mean_score(),
                seconds(g.seconds)
            );
            s.base = Some(GalleryRow::new(title, g));
        }
        Msg::Base(Err(e)) => app.report("The base generator's gallery failed", e),
        Msg::DirectProgress(step, total) => s.direct_progress = Some((step, total)),
        Msg::Direct(Ok((g, train))) => {
            s.direct_progress = None;
            let title = format!(
                "Direct LoRA fine-tuning: mean identity {:.2}; trained in {}, gallery in {}",
                g.mean_score(),
                seconds(train),
                seconds(g.seconds)
            );
            s.direct = Some(GalleryRow::new(title, g));
        }
        Msg::Direct(Err(e)) => {
            s.direct_progress = None;
            app.report("Direct LoRA fine-tuning failed", e);
        }
        Msg::RunDone => {
            if s.is_busy() {
                s.phase = Phase::Finished;
            }
        }
        Msg::Saved(r) => {
            s.saving = false;
            match r {
                None => {}
                Some(Ok(what)) => s.note = Some(what),
                Some(Err((title, e))) => app.report(title, e),
            }
        }
    }
}

/// Replaces the references with built-in sample person `index` (as its button does).
pub fn choose_sample(app: &mut StudioApp, ctx: &egui::Context, index: usize) {
    let Some(p) = app.personalise.personaliser() else {
        return;
    };
    if app.personalise.picking {
        return;
    }
    let size = p.image_size();
    app.personalise.picking = true;
    let name = SAMPLE_PEOPLE[index % SAMPLE_PEOPLE.len()].0;
    if !spawn_or_report(app, ctx, "sample-person", move |r| {
        let res = guarded(|| Ok(sample_person(index, size)))
            .map(|imgs| (format!("sample person {name}"), imgs));
        r.send(Msg::References(res));
    }) {
        app.personalise.picking = false;
    }
}

/// Asks for a reference folder (`folder`) or one image and loads it on a helper thread.
fn pick_references(app: &mut StudioApp, ctx: &egui::Context, folder: bool) {
    let picker = app.options.picker.clone();
    load_picked_references(app, ctx, folder, picker);
}

/// Loads references from the path `picker` answers, on a helper thread.
fn load_picked_references(
    app: &mut StudioApp,
    ctx: &egui::Context,
    folder: bool,
    picker: FilePicker,
) {
    let Some(p) = app.personalise.personaliser() else {
        return;
    };
    if app.personalise.picking {
        return;
    }
    let size = p.image_size();
    let purpose = if folder {
        PickPurpose::ReferenceFolder
    } else {
        PickPurpose::ReferenceImage
    };
    app.personalise.picking = true;
    if !spawn_or_report(app, ctx, "references", move |r| {
        let path = match picker(purpose.request()) {
            Ok(Some(path)) => path,
            Ok(None) => return r.send(Msg::PickCancelled),
            Err(why) => return r.send(Msg::PickFailed(purpose, why)),
        };
        let res = load_references(&path, size)
            .map(|imgs| (path.display().to_string(), imgs))
            .map_err(|e| e.to_string());
        r.send(Msg::References(res));
    }) {
        app.personalise.picking = false;
    }
}

/// Uses a typed path for one of this tab's purposes (no dialog could open).
pub fn use_path(app: &mut StudioApp, purpose: PickPurpose, path: PathBuf) {
    let ctx = app.ctx.clone();
    match purpose {
        PickPurpose::ReferenceFolder => load_picked_references(app, &ctx, true, fixed_picker(path)),
        PickPurpose::ReferenceImage => load_picked_references(app, &ctx, false, fixed_picker(path)),
        PickPurpose::SaveImages => save_with(app, &ctx, SaveWhat::Images, fixed_picker(path)),
        PickPurpose::SaveLora => save_with(app, &ctx, SaveWhat::Lora, fixed_picker(path)),
        _ => {}
    }
}

/// Starts a run (as the Personalise button does): DiffLoRA, then the comparisons asked for.
pub fn start(app: &mut StudioApp, ctx: &egui::Context) {
    let s = &app.personalise;
    if s.is_busy() || s.references.is_empty() {
        return;
    }
    let Some(p) = s.personaliser().cloned() else {
        return;
    };
    let refs = s.references.clone();
    let set = app.settings.personalise.clone();
    let n = set.n.clamp(1, 8);
    let s = &mut app.personalise;
    s.phase = Phase::Busy("starting".into());
    s.note = None;
    s.diff = None;
    s.base = None;
    s.direct = None;
    s.direct_progress = None;
    s.seconds = None;
    s.adapted = None;
    let started = spawn_or_report(app, ctx, "personalise", move |r| {
        run(&p, &refs, &set, n, r);
        r.send(Msg::RunDone);
    });
    if !started {
        app.personalise.phase = Phase::Failed;
    }
}

/// The work of one run, on the helper thread.
fn run(p: &Personaliser, refs: &[RgbImage], set: &PersonaliseSettings, n: usize, r: &Reply) {
    let (prompt, seed) = (set.prompt.as_str(), set.seed);
    r.send(Msg::Stage("encoding references, sampling LoRA".into()));
    let diff = guarded(|| {
        let (adapted, _, mut secs) = p.predict_lora(refs, seed)?;
        let t = Instant::now();
        let m = merged(&adapted)?;
        secs.merge += t.elapsed().as_secs_f64();
        secs.personalise_total =
            secs.encode_references + secs.sample_latent + secs.decode_lora + secs.merge;
        r.send(Msg::Stage("drawing gallery".into()));
        let gallery = p.gallery(&m, refs, prompt, n, seed)?;
        secs.gallery = gallery.seconds;
        Ok(Box::new(Diff {
            adapted,
            gallery,
            seconds: secs,
        }))
    });
    let failed = diff.is_err();
    r.send(Msg::Personalised(diff));
    if failed {
        return;
    }
    if set.compare_base {
        r.send(Msg::Stage("drawing the base generator's gallery".into()));
        let g = guarded(|| p.gallery(p.generator(), refs, prompt, n, seed));
        r.send(Msg::Base(g));
    }
    if set.compare_direct {
        r.send(Msg::Stage("fine-tuning a LoRA on the references".into()));
        let d = guarded(|| {
            let mut last = Instant::now();
            let (g, train) = p.direct_lora(refs, None, seed, &mut |step, total, _| {
                // At most ~8 updates a second (each redraws the window), and always the last.
                if step == total || last.elapsed() >= super::spinner::ANIMATION_PERIOD {
                    last = Instant::now();
                    r.send(Msg::DirectProgress(step, total));
                }
            })?;
            r.send(Msg::Stage("drawing the direct LoRA's gallery".into()));
            Ok((p.gallery(&g, refs, prompt, n, seed)?, train))
        });
        r.send(Msg::Direct(d));
    }
}

/// What to save.
#[derive(Clone, Copy, PartialEq, Eq)]
enum SaveWhat {
    Images,
    Lora,
}

fn save(app: &mut StudioApp, ctx: &egui::Context, what: SaveWhat) {
    let picker = app.options.picker.clone();
    save_with(app, ctx, what, picker);
}

/// Saves into the folder `picker` answers, on a helper thread.
fn save_with(app: &mut StudioApp, ctx: &egui::Context, what: SaveWhat, picker: FilePicker) {
    let s = &app.personalise;
    if s.saving || s.is_busy() {
        return;
    }
    let (Some(p), Some(diff), Some(adapted)) =
        (s.personaliser().cloned(), &s.diff, s.adapted.clone())
    else {
        return;
    };
    let gallery = diff.gallery.images.clone();
    let mut rows = vec![s.references.clone(), gallery.clone()];
    for row in [&s.base, &s.direct].into_iter().flatten() {
        rows.push(row.gallery.images.clone());
    }
    let purpose = match what {
        SaveWhat::Images => PickPurpose::SaveImages,
        SaveWhat::Lora => PickPurpose::SaveLora,
    };
    app.personalise.saving = true;
    let ok = spawn_or_report(app, ctx, "personalise-save", move |r| {
        let dir = match picker(purpose.request()) {
            Ok(Some(dir)) => dir,
            Ok(None) => return r.send(Msg::Saved(None)),
            Err(why) => return r.send(Msg::PickFailed(purpose, why)),
        };
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
            SaveWhat::Lora => guarded(|| p.save_adapter(&adapted, &dir))
                .map(|()| format!("saved the LoRA to {}", dir.display()))
                .map_err(|e| ("The LoRA could not be saved".to_string(), e)),
        };
        r.send(Msg::Saved(Some(res)));
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

fn texture(ctx: &egui::Context, name: String, img: &RgbImage) -> TextureHandle {
    let c = egui::ColorImage::from_rgb([img.width() as usize, img.height() as usize], img.as_raw());
    ctx.load_texture(name, c, egui::TextureOptions::NEAREST)
}

fn tile(ui: &mut Ui, tex: &TextureHandle, side: f32) {
    ui.add(egui::Image::from_texture(egui::load::SizedTexture::new(
        tex.id(),
        egui::vec2(side, side),
    )));
}

fn section(ui: &mut Ui, title: &str) {
    ui.add_space(6.0);
    ui.label(RichText::new(title).strong().size(15.0));
}

/// Draws the tab.
pub fn show(app: &mut StudioApp, ui: &mut Ui) {
    let ctx = ui.ctx().clone();
    ensure_model(app, &ctx);
    if app.settings.form_open {
        // As the Fine-tune form: a share of a small window, 360 px of a large one.
        let width = (ui.available_width() * 0.42).clamp(200.0, 360.0);
        egui::Panel::left("personalise-controls")
            .resizable(true)
            .default_size(width)
            .min_size(180.0)
            .show(ui, |ui| {
                egui::ScrollArea::vertical().show(ui, |ui| controls_ui(app, ui, &ctx));
            });
    }
    egui::CentralPanel::default().show(ui, |ui| {
        let (label, tip) = if app.settings.form_open {
            (
                "Hide controls",
                "hide the controls panel (more room for the gallery)",
            )
        } else {
            ("Show controls", "show the controls panel")
        };
        if ui.button(label).on_hover_text(tip).clicked() {
            app.settings.form_open = !app.settings.form_open;
        }
        egui::ScrollArea::vertical().show(ui, |ui| results_ui(app, ui, &ctx));
    });
}

fn model_line(app: &StudioApp, ui: &mut Ui) {
    match &app.personalise.model {
        ModelState::Unchecked | ModelState::Loading => {
            ui.horizontal(|ui| {
                super::spinner::spinner(ui);
                ui.label("Loading the personaliser...");
            });
        }
        ModelState::Missing(dir) => {
            ui.colored_label(
                ui.visuals().warn_fg_color,
                format!(
                    "No personaliser at {} - build it with `peft-studio difflora-build --preset presets/difflora-portraits.toml`",
                    dir.display()
                ),
            );
        }
        ModelState::Failed(_) => {
            ui.colored_label(
                ui.visuals().error_fg_color,
                "The personaliser could not be loaded (see the error above).",
            );
        }
        ModelState::Ready(p) => {
            let name = p
                .dir()
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_else(|| p.dir().display().to_string());
            ui.label(format!(
                "Personaliser: {name} ({} px images)",
                p.image_size()
            ))
            .on_hover_text(p.dir().display().to_string());
        }
    }
}

fn controls_ui(app: &mut StudioApp, ui: &mut Ui, ctx: &egui::Context) {
    section(ui, "Personaliser");
    model_line(app, ui);
    let ready = app.personalise.personaliser().is_some();
    let can_pick = ready && !app.personalise.picking && !app.personalise.is_busy();

    section(ui, "References");
    ui.label("Sample people:");
    ui.horizontal_wrapped(|ui| {
        for (i, (name, _)) in SAMPLE_PEOPLE.iter().enumerate() {
            if ui.add_enabled(can_pick, egui::Button::new(*name)).clicked() {
                choose_sample(app, ctx, i);
            }
        }
    });
    ui.horizontal(|ui| {
        if ui
            .add_enabled(can_pick, egui::Button::new("Open reference folder…"))
            .clicked()
        {
            pick_references(app, ctx, true);
        }
        if ui
            .add_enabled(can_pick, egui::Button::new("Open image…"))
            .clicked()
        {
            pick_references(app, ctx, false);
        }
    });
    if app.personalise.picking {
        ui.horizontal(|ui| {
            super::spinner::spinner(ui);
            ui.label("Reading references...");
        });
    }

    section(ui, "Prompt");
    let set = &mut app.settings.personalise;
    ui.add(
        egui::TextEdit::singleline(&mut set.prompt)
            .hint_text("e.g. smile, blue background")
            .desired_width(f32::INFINITY),
    );
    ui.horizontal_wrapped(|ui| {
        for chip in PROMPT_PRESETS {
            if ui.selectable_label(set.prompt == chip, chip).clicked() {
                set.prompt = chip.to_string();
            }
        }
    });
    ui.add(egui::Slider::new(&mut set.n, 1..=8).text("images"));
    ui.horizontal(|ui| {
        let l = ui.label("Seed");
        ui.add(egui::DragValue::new(&mut set.seed))
            .labelled_by(l.id);
    });
    ui.checkbox(&mut set.compare_base, "compare with base generator");
    ui.checkbox(
        &mut set.compare_direct,
        "compare with direct LoRA fine-tuning",
    );

    ui.add_space(8.0);
    let s = &app.personalise;
    let can_run = ready && !s.is_busy() && !s.picking && !s.references.is_empty();
    if ui
        .add_enabled(
            can_run,
            egui::Button::new(RichText::new("Personalise").strong()),
        )
        .clicked()
    {
        start(app, ctx);
    }
    let s = &app.personalise;
    let can_save = s.diff.is_some() && !s.is_busy() && !s.saving;
    ui.horizontal(|ui| {
        if ui
            .add_enabled(can_save, egui::Button::new("Save images…"))
            .clicked()
        {
            save(app, ctx, SaveWhat::Images);
        }
        if ui
            .add_enabled(can_save, egui::Button::new("Save LoRA…"))
            .clicked()
        {
            save(app, ctx, SaveWhat::Lora);
        }
    });
}

fn results_ui(app: &mut StudioApp, ui: &mut Ui, ctx: &egui::Context) {
    let s = &mut app.personalise;
    section(ui, "Reference images");
    if s.references.is_empty() {
        ui.label("No references yet: choose a sample person, a folder or an image.");
    } else {
        if s.ref_textures.len() != s.references.len() {
            s.ref_textures = s
                .references
                .iter()
                .enumerate()
                .map(|(i, img)| texture(ctx, format!("personalise-ref-{i}"), img))
                .collect();
        }
        ui.label(format!(
            "{} reference image{} from {}",
            s.references.len(),
            if s.references.len() == 1 { "" } else { "s" },
            s.references_source
        ));
        ui.horizontal_wrapped(|ui| {
            for t in &s.ref_textures {
                tile(ui, t, THUMB);
            }
        });
    }
    for w in &s.warnings {
        ui.colored_label(ui.visuals().warn_fg_color, format!("Warning: {w}"));
    }

    ui.add_space(8.0);
    ui.horizontal(|ui| {
        if s.is_busy() || s.saving {
            super::spinner::spinner(ui);
        }
        ui.label(RichText::new(s.state_line()).strong());
    });
    if let Some((step, total)) = s.direct_progress {
        ui.add(
            egui::ProgressBar::new(step as f32 / total.max(1) as f32)
                .text(format!("direct LoRA step {step}/{total}"))
                .desired_width(360.0),
        );
    }
    for (key, row) in [
        ("diff", &mut s.diff),
        ("base", &mut s.base),
        ("direct", &mut s.direct),
    ] {
        if let Some(row) = row {
            gallery_ui(ui, ctx, key, row);
        }
    }
}

fn gallery_ui(ui: &mut Ui, ctx: &egui::Context, key: &str, row: &mut GalleryRow) {
    if row.textures.len() != row.gallery.images.len() {
        row.textures = row
            .gallery
            .images
            .iter()
            .enumerate()
            .map(|(i, img)| texture(ctx, format!("personalise-{key}-{i}"), img))
            .collect();
    }
    ui.add_space(8.0);
    ui.label(RichText::new(&row.title).strong());
    ui.horizontal_wrapped(|ui| {
        for (t, score) in row.textures.iter().zip(&row.gallery.scores) {
            ui.vertical(|ui| {
                tile(ui, t, TILE);
                ui.label(format!("score {score:.2}"));
            });
        }
    });
}

//! Drawing the Personalise tab: the controls (personaliser, references, prompt, Personalise,
//! Cancel, Save) and the results (references, state line, progress of the worker's job,
//! galleries). Clicks call the actions of the parent module; nothing here computes. A spinner
//! turns only while something runs (the personaliser loading, references being read, a job or
//! a save in progress), so the idle tab asks for no frames.

use egui::{RichText, TextureHandle, Ui};
use image::RgbImage;

use super::{
    GalleryRow, ModelState, PROMPT_PRESETS, SaveWhat, StudioApp, TRAINING_RUNS, can_save, cancel,
    choose_sample, ensure_model, save, start,
};
use crate::app::dialogs::PickPurpose;
use crate::app::spinner::spinner;
use crate::personalize::commands::SAMPLE_PEOPLE;

/// Side of a reference thumbnail, in points.
const THUMB: f32 = 96.0;
/// Side of a gallery image, in points.
const TILE: f32 = 104.0;

fn texture(ctx: &egui::Context, name: String, img: &RgbImage) -> TextureHandle {
    let c = egui::ColorImage::from_rgb([img.width() as usize, img.height() as usize], img.as_raw());
    ctx.load_texture(name, c, egui::TextureOptions::NEAREST)
}

/// Draws `tex` about `side` points wide, at a whole number of screen pixels per image pixel
/// (nearest-neighbour enlargement stays even: a 64-pixel image in a 104-point tile would get
/// rows of one and two pixels).
fn tile(ui: &mut Ui, tex: &TextureHandle, side: f32) {
    let [w, h] = tex.size();
    let scale = whole_pixel_scale(w.max(h), side, ui.ctx().pixels_per_point());
    ui.add(egui::Image::from_texture(egui::load::SizedTexture::new(
        tex.id(),
        egui::vec2(w as f32 * scale, h as f32 * scale),
    )));
}

/// Points per image pixel that draw an image `image_pixels` wide close to `side` points with a
/// whole number (at least 1) of screen pixels per image pixel.
fn whole_pixel_scale(image_pixels: usize, side: f32, pixels_per_point: f32) -> f32 {
    let px = image_pixels.max(1) as f32;
    let screen_per_image = (side * pixels_per_point / px).round().max(1.0);
    screen_per_image / pixels_per_point
}

fn section(ui: &mut Ui, title: &str) {
    ui.add_space(6.0);
    ui.label(RichText::new(title).strong().size(15.0));
}

/// Draws the tab.
pub fn show(app: &mut StudioApp, ui: &mut Ui) {
    let ctx = ui.ctx().clone();
    ensure_model(app);
    if app.settings.form_open {
        // As the Fine-tune form: a share of a small window, 360 px of a large one.
        let width = (ui.available_width() * 0.42).clamp(200.0, 360.0);
        egui::Panel::left("personalise-controls")
            .resizable(true)
            .default_size(width)
            .min_size(180.0)
            .show(ui, |ui| {
                egui::ScrollArea::vertical().show(ui, |ui| controls_ui(app, ui));
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
                spinner(ui);
                ui.label("Loading the personaliser...");
            });
        }
        ModelState::Missing(dir) => {
            ui.colored_label(
                ui.visuals().warn_fg_color,
                format!(
                    "No personaliser at {} - build it with `peft-studio difflora-build --preset presets/difflora-portraits-64.toml`",
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

fn controls_ui(app: &mut StudioApp, ui: &mut Ui) {
    section(ui, "Personaliser");
    model_line(app, ui);
    let ready = app.personalise.personaliser().is_some();
    let s = &app.personalise;
    let can_pick = ready && !app.picking && !s.reading && !s.is_busy();

    section(ui, "References");
    ui.label("Sample people:");
    ui.horizontal_wrapped(|ui| {
        for (i, (name, _)) in SAMPLE_PEOPLE.iter().enumerate() {
            if ui.add_enabled(can_pick, egui::Button::new(*name)).clicked() {
                choose_sample(app, i);
            }
        }
    });
    ui.horizontal(|ui| {
        if ui
            .add_enabled(can_pick, egui::Button::new("Open reference folder…"))
            .clicked()
        {
            app.pick(PickPurpose::ReferenceFolder);
        }
        if ui
            .add_enabled(can_pick, egui::Button::new("Open image…"))
            .clicked()
        {
            app.pick(PickPurpose::ReferenceImage);
        }
    });
    if app.personalise.reading {
        ui.horizontal(|ui| {
            spinner(ui);
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
    if let Some(p) = app.personalise.personaliser() {
        let drawn = p.drawn_prompt(&set.prompt);
        if drawn.is_empty() {
            ui.weak("Drawn without a prompt: this personaliser was built on photos.");
        } else if drawn != set.prompt.trim() {
            ui.weak(format!("Drawn as: {drawn}"));
        }
    }
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
    let training = app.run.state.is_busy();
    let can_run = ready && !s.is_busy() && !s.reading && !s.references.is_empty() && !training;
    ui.horizontal(|ui| {
        let run = ui.add_enabled(
            can_run,
            egui::Button::new(RichText::new("Personalise").strong()),
        );
        if run.clicked() {
            start(app);
        }
        let busy = app.personalise.is_busy() && !app.personalise.cancelling;
        if ui
            .add_enabled(busy, egui::Button::new("Cancel"))
            .on_hover_text("stop at the next stage or step; nothing is kept")
            .clicked()
        {
            cancel(app);
        }
    });
    if training {
        ui.label(RichText::new(TRAINING_RUNS).small());
    }
    let can_save = can_save(app);
    ui.horizontal(|ui| {
        if ui
            .add_enabled(can_save, egui::Button::new("Save images…"))
            .clicked()
        {
            save(app, SaveWhat::Images);
        }
        if ui
            .add_enabled(can_save, egui::Button::new("Save LoRA…"))
            .clicked()
        {
            save(app, SaveWhat::Lora);
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
            spinner(ui);
        }
        ui.label(RichText::new(s.state_line()).strong());
    });
    if s.is_busy() {
        // The stage the worker reported last; stages without steps show an empty bar.
        let (fraction, text) = match s.stage() {
            Some(stage) => (stage.fraction().unwrap_or(0.0), stage.to_string()),
            None => (0.0, "waiting for the worker".to_string()),
        };
        ui.add(
            egui::ProgressBar::new(fraction)
                .text(text)
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
    if let Some(line) = &row.reading {
        ui.label(line);
    }
}

#[cfg(test)]
mod tests {
    use super::whole_pixel_scale;

    #[test]
    fn tiles_enlarge_by_whole_screen_pixels() {
        // 64-pixel images in a 104-point tile: 2 screen pixels each (128 points), not 1.625.
        assert_eq!(whole_pixel_scale(64, 104.0, 1.0) * 64.0, 128.0);
        assert_eq!(whole_pixel_scale(32, 104.0, 1.0) * 32.0, 96.0);
        // On a 1.5× display every image pixel is still a whole number of screen pixels.
        let s = whole_pixel_scale(64, 104.0, 1.5);
        assert_eq!(s * 1.5, (s * 1.5).round());
        assert_eq!(s * 1.5, 2.0);
        // An image larger than the tile is drawn at one screen pixel per image pixel.
        assert_eq!(whole_pixel_scale(512, 104.0, 1.0), 1.0);
    }
}

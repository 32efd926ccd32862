//! The work behind the `personalize` and `eval-personalize` commands (the binary only parses
//! arguments and prints).

use std::path::{Path, PathBuf};
use std::time::Instant;

use image::{Rgb, RgbImage};
use serde::Serialize;

use super::evaluate::{EvalReport, EvalSettings, evaluate};
use super::identity_folder::load_references;
use super::pipeline::{Personaliser, StageSeconds, reference_warnings};
use super::portrait::render_set;
use crate::peft::checkpoint::write_atomic;

/// What `personalize` writes to `report.json`.
#[derive(Debug, Clone, Serialize)]
pub struct PersonaliseReport {
    /// The personaliser folder used.
    pub model: String,
    /// The references folder or file.
    pub references: String,
    /// Number of reference images.
    pub reference_count: usize,
    /// The prompt.
    pub prompt: String,
    /// Images generated.
    pub n: usize,
    /// The seed.
    pub seed: u64,
    /// Identity score of each image (evaluation encoder, cosine to the fused references).
    pub identity_scores: Vec<f32>,
    /// Their mean.
    pub mean_identity_score: f32,
    /// Seconds per stage.
    pub seconds: StageSeconds,
    /// Seconds to load the personaliser and the references.
    pub load_seconds: f64,
    /// Problems with the references that did not stop the run.
    pub warnings: Vec<String>,
    /// The image files written.
    pub images: Vec<String>,
    /// The adapter folder written.
    pub adapter: String,
}

/// Saves `img` as PNG atomically.
pub fn save_png(img: &RgbImage, path: &Path) -> anyhow::Result<()> {
    let mut bytes = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)?;
    write_atomic(path, &bytes)?;
    Ok(())
}

/// Rows of images side by side, each scaled up `scale` times (nearest neighbour), on white,
/// for reports and notes.
pub fn contact_sheet(rows: &[&[RgbImage]], scale: u32) -> RgbImage {
    let side = rows
        .iter()
        .flat_map(|r| r.iter())
        .map(|i| i.width().max(i.height()))
        .max()
        .unwrap_or(1)
        * scale;
    let gap = 4;
    let cols = rows.iter().map(|r| r.len()).max().unwrap_or(0) as u32;
    let w = cols * (side + gap) + gap;
    let h = rows.len() as u32 * (side + gap) + gap;
    let mut sheet = RgbImage::from_pixel(w.max(1), h.max(1), Rgb([255, 255, 255]));
    for (r, row) in rows.iter().enumerate() {
        for (c, img) in row.iter().enumerate() {
            let big = image::imageops::resize(
                img,
                img.width() * scale,
                img.height() * scale,
                image::imageops::FilterType::Nearest,
            );
            let x = gap + c as u32 * (side + gap);
            let y = gap + r as u32 * (side + gap);
            image::imageops::replace(&mut sheet, &big, x as i64, y as i64);
        }
    }
    sheet
}

/// Built-in sample people: held-out synthetic identities (never in the LoRA bank or the
/// hypernetwork's data), four portraits each.
pub const SAMPLE_PEOPLE: [(&str, u64); 4] = [
    ("Ada", 2_000_101),
    ("Bo", 2_000_102),
    ("Cyd", 2_000_103),
    ("Dee", 2_000_104),
];

/// The four reference portraits of built-in sample person `index` at `size` pixels.
pub fn sample_person(index: usize, size: u32) -> Vec<RgbImage> {
    let (_, seed) = SAMPLE_PEOPLE[index % SAMPLE_PEOPLE.len()];
    render_set(seed, 4, size, 7).into_iter().map(|(_, i)| i).collect()
}

/// `personalize`: reads the references, personalises, writes `images/NN.png`,
/// `references.png` + `sheet.png` (references above the gallery), the adapter folder
/// `adapter/` and `report.json` into `out`. Returns the report.
pub fn personalize_command(
    model: &Path,
    refs: &Path,
    prompt: &str,
    n: usize,
    seed: u64,
    out: &Path,
) -> anyhow::Result<PersonaliseReport> {
    anyhow::ensure!(n > 0, "--n must be at least 1");
    let t = Instant::now();
    let personaliser = Personaliser::load(model)
        .map_err(|e| anyhow::anyhow!("cannot load the personaliser {}: {e}", model.display()))?;
    let references = load_references(refs, personaliser.image_size())?;
    let load_seconds = t.elapsed().as_secs_f64();
    let warnings = reference_warnings(&references);
    for w in &warnings {
        log::warn!("{w}");
    }
    let result = personaliser.personalise(&references, prompt, n, seed)?;
    // Everything is computed before anything is written: a failure leaves `out` as it was.
    let images_dir = out.join("images");
    std::fs::create_dir_all(&images_dir)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", images_dir.display()))?;
    let mut files = Vec::new();
    for (i, img) in result.gallery.images.iter().enumerate() {
        let p = images_dir.join(format!("{:02}.png", i + 1));
        save_png(img, &p)?;
        files.push(p.display().to_string());
    }
    save_png(
        &contact_sheet(&[&references, &result.gallery.images], 4),
        &out.join("sheet.png"),
    )?;
    let adapter = out.join("adapter");
    personaliser.save_adapter(&result.adapted, &adapter)?;
    let report = PersonaliseReport {
        model: model.display().to_string(),
        references: refs.display().to_string(),
        reference_count: references.len(),
        prompt: prompt.to_string(),
        n,
        seed,
        mean_identity_score: result.gallery.mean_score(),
        identity_scores: result.gallery.scores.clone(),
        seconds: result.seconds.clone(),
        load_seconds,
        warnings,
        images: files,
        adapter: adapter.display().to_string(),
    };
    write_atomic(
        &out.join("report.json"),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    Ok(report)
}

/// `eval-personalize`: evaluates and writes the markdown table and JSON next to each other
/// (`<out>.md`, `<out>.json`). Returns the report.
pub fn eval_command(
    model: &Path,
    settings: EvalSettings,
    out: &Path,
    progress: &mut dyn FnMut(usize, usize, &str),
) -> anyhow::Result<EvalReport> {
    let personaliser = Personaliser::load(model)
        .map_err(|e| anyhow::anyhow!("cannot load the personaliser {}: {e}", model.display()))?;
    let report = evaluate(&personaliser, settings, progress)?;
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let title = format!("eval-personalize: {}", model.display());
    write_atomic(&out.with_extension("md"), report.markdown(&title).as_bytes())?;
    write_atomic(
        &out.with_extension("json"),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    Ok(report)
}

/// The default evaluation output for a personaliser folder: `bench-results/eval-<name>`.
pub fn default_eval_out(model: &Path) -> PathBuf {
    let name = model
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "personaliser".into());
    PathBuf::from("bench-results").join(format!("eval-{name}"))
}

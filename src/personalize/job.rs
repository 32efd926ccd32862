//! A personalisation as one job: DiffLoRA for the references, then the comparisons asked for
//! (the base generator's gallery, a LoRA fine-tuned directly on the references), then, when
//! asked, the files. The worker runs it for the Personalise tab and the `personalize` command
//! runs it in its own process; both go through [`run`].
//!
//! Every stage and step is announced to a [`Progress`] callback that may cancel. Nothing is
//! written before everything is computed, the last chance to cancel comes just before the
//! first file, and every file is written atomically: a cancelled job writes nothing.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use image::RgbImage;

use super::attribute_reader::{AttributeReader, gallery_reading_line};
use super::commands::{check_writable_dir, contact_sheet, save_png};
use super::evaluate::MAX_IMAGES;
use super::pipeline::{Gallery, Personaliser, StageSeconds};
use super::progress::{GalleryKind, Progress, Stage, announce};
use crate::models::unet::Generator;

/// What to personalise, and how.
#[derive(Clone)]
pub struct PersonaliseRequest {
    /// The loaded personaliser (shared: the tab keeps it to read references and save).
    pub personaliser: Arc<Personaliser>,
    /// The reference images, at the personaliser's image size.
    pub references: Vec<RgbImage>,
    /// The prompt.
    pub prompt: String,
    /// Images per gallery (1 to [`MAX_IMAGES`]).
    pub n: usize,
    /// Sampling seed (also the direct LoRA's).
    pub seed: u64,
    /// Also draw the gallery with the base generator (no LoRA).
    pub compare_base: bool,
    /// Also fine-tune a LoRA directly on the references and draw its gallery.
    pub compare_direct: bool,
    /// Write the result into this folder (see [`write_outputs`]); `None`: write nothing.
    pub out: Option<PathBuf>,
}

impl std::fmt::Debug for PersonaliseRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PersonaliseRequest")
            .field("personaliser", &self.personaliser.dir())
            .field("references", &self.references.len())
            .field("prompt", &self.prompt)
            .field("n", &self.n)
            .field("seed", &self.seed)
            .field("compare_base", &self.compare_base)
            .field("compare_direct", &self.compare_direct)
            .field("out", &self.out)
            .finish()
    }
}

/// The direct-fine-tuning comparison.
#[derive(Debug, Clone)]
pub struct DirectResult {
    /// The gallery drawn with the directly fine-tuned LoRA.
    pub gallery: Gallery,
    /// Seconds the fine-tuning took.
    pub train_seconds: f64,
}

/// The files a job wrote.
#[derive(Debug, Clone)]
pub struct Written {
    /// `images/NN.png`, one per DiffLoRA gallery image.
    pub images: Vec<PathBuf>,
    /// `sheet.png`: the references above each gallery.
    pub sheet: PathBuf,
    /// `adapter/`: the predicted LoRA as a PEFT adapter folder.
    pub adapter: PathBuf,
}

/// What a finished job gives.
#[derive(Debug)]
pub struct PersonaliseResult {
    /// The generator with the predicted LoRA attached, unmerged (to save as an adapter).
    pub adapted: Generator,
    /// The predicted LoRA as a flat vector.
    pub lora: Vec<f32>,
    /// The DiffLoRA gallery.
    pub diff: Gallery,
    /// Seconds per DiffLoRA stage.
    pub seconds: StageSeconds,
    /// The base generator's gallery, when asked for.
    pub base: Option<Gallery>,
    /// The directly fine-tuned LoRA's gallery, when asked for.
    pub direct: Option<DirectResult>,
    /// The files written, when the request named a folder.
    pub written: Option<Written>,
    /// What the attribute reader reads in each gallery against the prompt (computed here, on
    /// the worker, not by the window).
    pub reading: ReaderLines,
}

/// One line per gallery: what the attribute reader reads in it against the prompt, e.g.
/// `reader: smile 4/4, face front 2/4, blue background 3/4, even light 4/4, hat 0/4`, or why
/// there is no reading.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReaderLines {
    /// The DiffLoRA gallery's.
    pub diff: String,
    /// The base generator's gallery's, when drawn.
    pub base: Option<String>,
    /// The direct LoRA's gallery's, when drawn.
    pub direct: Option<String>,
}

/// The reader's lines for the galleries of a job (see [`ReaderLines`]).
fn reader_lines(
    p: &Personaliser,
    prompt: &str,
    diff: &Gallery,
    base: Option<&Gallery>,
    direct: Option<&Gallery>,
) -> ReaderLines {
    let line: Box<dyn Fn(&Gallery) -> String> = if !p.preset().people.generator.is_synthetic() {
        Box::new(|_| "reader: reads renders only (this personaliser draws photos)".to_string())
    } else {
        match AttributeReader::load_beside(p.dir(), p.device()) {
            Ok(reader) => {
                Box::new(move |g| gallery_reading_line(reader.as_ref(), &g.images, prompt))
            }
            Err(e) => {
                let why = format!("reader: {e}");
                Box::new(move |_| why.clone())
            }
        }
    };
    ReaderLines {
        diff: line(diff),
        base: base.map(&line),
        direct: direct.map(&line),
    }
}

/// What the worker reports of a personalisation job.
#[derive(Debug, Clone)]
pub enum PersonaliseEvent {
    /// A stage began, or a step of one.
    Progress(Stage),
    /// The job ended with its galleries (shared: images travel once).
    Finished(Arc<PersonaliseResult>),
    /// The job failed (bad input, an error, a panic): what went wrong, in words.
    Failed(String),
    /// The job stopped on request before its end; it wrote nothing.
    Cancelled,
    /// The job did not start (a training run is in progress): why, in words.
    Refused(String),
}

/// Runs the job, announcing each stage and step to `progress` (a `Break` ends it with
/// [`Cancelled`](super::progress::Cancelled), writing nothing).
pub fn run(req: &PersonaliseRequest, progress: Progress<'_>) -> anyhow::Result<PersonaliseResult> {
    anyhow::ensure!(
        (1..=MAX_IMAGES).contains(&req.n),
        "{} images asked for: between 1 and {MAX_IMAGES} per gallery",
        req.n
    );
    if let Some(out) = &req.out {
        check_writable_dir(out, "the output folder")?;
    }
    let p = &req.personaliser;
    let (refs, prompt, n, seed) = (&req.references, req.prompt.as_str(), req.n, req.seed);
    let diff = p.personalise_with(refs, prompt, n, seed, progress)?;
    let base = if req.compare_base {
        let g = p.generator();
        Some(p.gallery_with(g, refs, prompt, n, seed, GalleryKind::Base, progress)?)
    } else {
        None
    };
    let direct = if req.compare_direct {
        let (g, train_seconds) = p.direct_lora(refs, None, seed, &mut |step, steps, _| {
            progress(Stage::DirectTuning { step, steps })
        })?;
        let gallery = p.gallery_with(&g, refs, prompt, n, seed, GalleryKind::Direct, progress)?;
        Some(DirectResult {
            gallery,
            train_seconds,
        })
    } else {
        None
    };
    let reading = reader_lines(
        p,
        prompt,
        &diff.gallery,
        base.as_ref(),
        direct.as_ref().map(|d| &d.gallery),
    );
    let mut result = PersonaliseResult {
        reading,
        adapted: diff.adapted,
        lora: diff.lora,
        diff: diff.gallery,
        seconds: diff.seconds,
        base,
        direct,
        written: None,
    };
    if let Some(out) = &req.out {
        // The last chance to cancel: from here the files are written to the end.
        announce(progress, Stage::Saving)?;
        result.written = Some(write_outputs(out, p, refs, &result)?);
    }
    Ok(result)
}

/// Writes `images/NN.png` (the DiffLoRA gallery; numbers above it that an earlier, larger run
/// left are removed), `sheet.png` (the references above each gallery) and `adapter/` (the
/// predicted LoRA) into `out`, each file atomically.
pub fn write_outputs(
    out: &Path,
    personaliser: &Personaliser,
    references: &[RgbImage],
    result: &PersonaliseResult,
) -> anyhow::Result<Written> {
    let images_dir = out.join("images");
    std::fs::create_dir_all(&images_dir)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", images_dir.display()))?;
    let mut images = Vec::new();
    for (i, img) in result.diff.images.iter().enumerate() {
        let path = images_dir.join(format!("{:02}.png", i + 1));
        save_png(img, &path)?;
        images.push(path);
    }
    remove_stale_gallery(&images_dir, images.len())?;
    let mut rows: Vec<&[RgbImage]> = vec![references, &result.diff.images];
    rows.extend(result.base.iter().map(|g| g.images.as_slice()));
    rows.extend(result.direct.iter().map(|d| d.gallery.images.as_slice()));
    let sheet = out.join("sheet.png");
    save_png(&contact_sheet(&rows, 4), &sheet)?;
    let adapter = out.join("adapter");
    personaliser.save_adapter(&result.adapted, &adapter)?;
    Ok(Written {
        images,
        sheet,
        adapter,
    })
}

/// Removes gallery images (`NN.png`) numbered above `n` that an earlier, larger run into the
/// same folder left, so the folder shows this run's gallery only.
fn remove_stale_gallery(images_dir: &Path, n: usize) -> anyhow::Result<()> {
    let entries = std::fs::read_dir(images_dir)
        .map_err(|e| anyhow::anyhow!("cannot list {}: {e}", images_dir.display()))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let stale = name
            .strip_suffix(".png")
            .filter(|stem| !stem.is_empty() && stem.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|stem| stem.parse::<usize>().ok())
            .is_some_and(|k| k > n || k == 0);
        if stale {
            let p = entry.path();
            std::fs::remove_file(&p)
                .map_err(|e| anyhow::anyhow!("cannot remove the old {}: {e}", p.display()))?;
        }
    }
    Ok(())
}

//! The work behind the `personalize` and `eval-personalize` commands (the binary only parses
//! arguments and prints).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::Device;
use image::{Rgb, RgbImage};
use serde::Serialize;

use super::comparison::{ComparisonRow, comparison_picture};
use super::evaluate::{
    EvalReport, EvalSettings, MAX_IMAGES, PersonEval, evaluate_shard, summarise,
};
use super::familiarity::Familiarity;
use super::job::{self, PersonaliseRequest};
use super::pipeline::{Personaliser, StageSeconds};
use crate::data::identity_folder::load_references;
use crate::data::portrait::render_set;
use crate::fsio::write_atomic;

/// Most worker processes of `eval-personalize --jobs`.
pub const MAX_JOBS: usize = 256;

/// What `personalize` writes to `report.json`.
#[derive(Debug, Clone, Serialize)]
pub struct PersonaliseReport {
    /// The personaliser folder used.
    pub model: String,
    /// The references folder or file.
    pub references: String,
    /// Number of reference images.
    pub reference_count: usize,
    /// The prompt as given.
    pub prompt: String,
    /// The prompt as the generator drew it ([`Personaliser::drawn_prompt`]: completed with
    /// the defaults of the attributes it does not name).
    pub drawn_prompt: String,
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
    /// Problems with the references that did not stop the run (photos unlike the
    /// personaliser's people among them).
    pub warnings: Vec<String>,
    /// How far the references sit from the people the personaliser knows, and the scale that
    /// is read against (`None`: its bank people could not be read).
    pub familiarity: Option<Familiarity>,
    /// The image files written.
    pub images: Vec<String>,
    /// The adapter folder written.
    pub adapter: String,
}

/// Saves `img` as PNG atomically.
pub fn save_png(img: &RgbImage, path: &Path) -> anyhow::Result<()> {
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )?;
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
    render_set(seed, 4, size, 7)
        .into_iter()
        .map(|(_, i)| i)
        .collect()
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
    device: &Device,
) -> anyhow::Result<PersonaliseReport> {
    anyhow::ensure!(
        (1..=MAX_IMAGES).contains(&n),
        "--n {n}: must be between 1 and {MAX_IMAGES}"
    );
    check_writable_dir(out, "--out")?;
    let t = Instant::now();
    let personaliser = Personaliser::load(model, device)
        .map_err(|e| anyhow::anyhow!("cannot load the personaliser {}: {e}", model.display()))?;
    let references = load_references(refs, personaliser.image_size())?;
    let load_seconds = t.elapsed().as_secs_f64();
    let familiarity = personaliser.familiarity(&references)?;
    let drawn_prompt = personaliser.drawn_prompt(prompt);
    let warnings = personaliser.reference_warnings(&references)?;
    for w in &warnings {
        log::warn!("{w}");
    }
    let request = PersonaliseRequest {
        personaliser: Arc::new(personaliser),
        references,
        prompt: prompt.to_string(),
        n,
        seed,
        compare_base: false,
        compare_direct: false,
        out: Some(out.to_path_buf()),
    };
    // The job computes everything before it writes: a failure leaves `out` as it was.
    let result = job::run(&request, &mut |stage| {
        log::debug!("{stage}");
        std::ops::ControlFlow::Continue(())
    })?;
    let written = result
        .written
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("the job wrote no files"))?;
    let report = PersonaliseReport {
        model: model.display().to_string(),
        references: refs.display().to_string(),
        reference_count: request.references.len(),
        prompt: prompt.to_string(),
        drawn_prompt,
        n,
        seed,
        mean_identity_score: result.diff.mean_score(),
        identity_scores: result.diff.scores.clone(),
        seconds: result.seconds.clone(),
        load_seconds,
        warnings,
        familiarity,
        images: written
            .images
            .iter()
            .map(|p| p.display().to_string())
            .collect(),
        adapter: written.adapter.display().to_string(),
    };
    write_atomic(
        &out.join("report.json"),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    Ok(report)
}

/// Checks, before any work, that files can be written into the folder `dir` (`option` names
/// it in the error): it is a folder or can be created, and the nearest existing folder on
/// its path accepts a new file. Creates nothing that stays.
pub fn check_writable_dir(dir: &Path, option: &str) -> anyhow::Result<()> {
    if dir.exists() && !dir.is_dir() {
        anyhow::bail!("{option} {}: exists and is not a folder", dir.display());
    }
    let mut existing = dir;
    while !existing.exists() {
        match existing.parent() {
            Some(p) if !p.as_os_str().is_empty() => existing = p,
            _ => {
                existing = Path::new(".");
                break;
            }
        }
    }
    if !existing.is_dir() {
        anyhow::bail!(
            "{option} {}: {} is not a folder",
            dir.display(),
            existing.display()
        );
    }
    let probe = existing.join(format!(".peft-studio-write-test-{}", std::process::id()));
    match std::fs::File::create(&probe) {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => anyhow::bail!(
            "{option} {}: cannot write in {}: {e}",
            dir.display(),
            existing.display()
        ),
    }
}

/// [`check_writable_dir`] for an output file: its folder must be writable and the path must
/// not be a folder.
pub fn check_writable_file(file: &Path, option: &str) -> anyhow::Result<()> {
    if file.is_dir() {
        anyhow::bail!(
            "{option} {}: is a folder, expected a file path",
            file.display()
        );
    }
    let dir = file
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    check_writable_dir(dir, option)
}

/// Where `eval-personalize` evaluates its people.
#[derive(Debug, Clone, Copy)]
pub enum EvalWorkers<'a> {
    /// In this process.
    InProcess,
    /// Split over `jobs` worker processes of the program `exe` (`eval-personalize --shard
    /// k/jobs`), each single-threaded unless `RAYON_NUM_THREADS` is set: the models are small,
    /// so one person per core is faster than every core on one person. The workers report
    /// their progress on this program's standard error, not through `progress`.
    Processes {
        /// The peft-studio program.
        exe: &'a Path,
        /// Worker processes.
        jobs: usize,
    },
}

/// `eval-personalize`: evaluates and writes the markdown table and JSON next to each other
/// (`<out>.md`, `<out>.json`). Returns the report.
pub fn eval_command(
    model: &Path,
    settings: EvalSettings,
    workers: EvalWorkers<'_>,
    out: &Path,
    device: &Device,
    progress: &mut dyn FnMut(usize, usize, &str),
) -> anyhow::Result<EvalReport> {
    settings.validate()?;
    if let EvalWorkers::Processes { jobs, .. } = workers {
        anyhow::ensure!(
            (1..=MAX_JOBS).contains(&jobs),
            "--jobs {jobs}: must be between 1 and {MAX_JOBS}"
        );
        anyhow::ensure!(
            jobs == 1 || device.is_cpu(),
            "--jobs {jobs} splits the evaluation over CPU processes; on {} give --jobs 1",
            crate::device::label(device)
        );
    }
    check_writable_file(&out.with_extension("md"), "--out")?;
    let people = match workers {
        EvalWorkers::Processes { exe, jobs } if jobs > 1 => {
            evaluate_in_processes(exe, model, settings, jobs)?
        }
        _ => {
            let personaliser = Personaliser::load(model, device).map_err(|e| {
                anyhow::anyhow!("cannot load the personaliser {}: {e}", model.display())
            })?;
            evaluate_shard(&personaliser, settings, 0, 1, progress)?
        }
    };
    let report = summarise(settings, &people)?;
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
    }
    let title = format!("eval-personalize: {}", model.display());
    let markdown = format!("{}\n{}", report.markdown(&title), machine_line(device));
    write_atomic(&out.with_extension("md"), markdown.as_bytes())?;
    write_atomic(
        &out.with_extension("json"),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    let mut rows: Vec<_> = people
        .iter()
        .filter_map(|p| p.picture.clone().map(|r| (p.index, r)))
        .collect();
    rows.sort_by_key(|(i, _)| *i);
    let rows: Vec<ComparisonRow> = rows.into_iter().map(|(_, r)| r).collect();
    if let Some(picture) = comparison_picture(&rows) {
        save_png(&picture, &comparison_picture_path(out))?;
    }
    Ok(report)
}

/// Where `eval-personalize --out OUT` puts its comparison picture: `OUT-people.png`
/// (references | DiffLoRA | direct LoRA | base, one row per person).
pub fn comparison_picture_path(out: &Path) -> PathBuf {
    let stem = out
        .file_stem()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    out.with_file_name(format!("{stem}-people.png"))
}

/// Where an evaluation ran, for its table: the CPU model (the seconds depend on it) and the
/// device; DiffLoRA has no PyTorch peer to run beside it.
fn machine_line(device: &Device) -> String {
    format!(
        "Measured on {}, device {}. No PyTorch + PEFT peer exists for personalisation (`../shared/peer` times MiniLM and SmolLM2 training steps), so the seconds are ours alone; direct LoRA fine-tuning is the in-project baseline.\n",
        crate::bench::machine::CpuInfo::detect().describe(),
        crate::device::label(device)
    )
}

/// Runs shards `0..jobs` of the evaluation as worker processes of `exe` and collects every
/// person's result; the error names the shard that failed.
fn evaluate_in_processes(
    exe: &Path,
    model: &Path,
    settings: EvalSettings,
    jobs: usize,
) -> anyhow::Result<Vec<PersonEval>> {
    let single_thread = std::env::var_os("RAYON_NUM_THREADS").is_none();
    let mut children = Vec::with_capacity(jobs);
    for k in 0..jobs {
        let mut cmd = std::process::Command::new(exe);
        cmd.arg("eval-personalize")
            .arg("--model")
            .arg(model)
            .args(["--refs", &settings.references.to_string()])
            .args(["--n", &settings.images.to_string()])
            .args(["--seed", &settings.seed.to_string()])
            .args(["--shard", &format!("{k}/{jobs}")])
            .args(["--device", "cpu"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit());
        if single_thread {
            cmd.env("RAYON_NUM_THREADS", "1");
        }
        let child = cmd.spawn().map_err(|e| {
            anyhow::anyhow!(
                "cannot start evaluation worker {k} ({}): {e}",
                exe.display()
            )
        })?;
        children.push(child);
    }
    let mut all = Vec::new();
    for (k, child) in children.into_iter().enumerate() {
        let output = child
            .wait_with_output()
            .map_err(|e| anyhow::anyhow!("evaluation worker {k}: {e}"))?;
        anyhow::ensure!(
            output.status.success(),
            "evaluation worker {k} of {jobs} failed ({})",
            output.status
        );
        let part: Vec<PersonEval> = serde_json::from_slice(&output.stdout)
            .map_err(|e| anyhow::anyhow!("evaluation worker {k}'s result: {e}"))?;
        all.extend(part);
    }
    Ok(all)
}

/// The default evaluation output for a personaliser folder: `bench-results/eval-<name>`.
pub fn default_eval_out(model: &Path) -> PathBuf {
    let name = model
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "personaliser".into());
    PathBuf::from("bench-results").join(format!("eval-{name}"))
}

/// Timings of one personaliser on the built-in sample people (`bench-personalize`).
#[derive(Debug, Clone, Serialize)]
pub struct PersonaliseBench {
    /// Median seconds from references to a merged LoRA (DiffLoRA).
    pub difflora_seconds: f64,
    /// Median seconds of direct LoRA fine-tuning on the same references (same recipe).
    pub direct_seconds: f64,
    /// Median seconds of a 4-image gallery.
    pub gallery4_seconds: f64,
    /// Median seconds of references to a 4-image gallery (DiffLoRA + gallery).
    pub end_to_end_seconds: f64,
    /// Peak resident memory of the process, MiB.
    pub peak_rss_mib: f64,
    /// People measured.
    pub people: usize,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Measures DiffLoRA against direct LoRA fine-tuning on each built-in sample person, and the
/// 4-image gallery; returns the numbers and a markdown table.
pub fn bench_personalize(
    model: &Path,
    device: &Device,
) -> anyhow::Result<(PersonaliseBench, String)> {
    let personaliser = Personaliser::load(model, device)
        .map_err(|e| anyhow::anyhow!("cannot load the personaliser {}: {e}", model.display()))?;
    let size = personaliser.image_size();
    // Warm-up (first-touch allocations, thread pools).
    personaliser.personalise(&sample_person(0, size), "smile", 1, 0)?;
    let (mut diff, mut direct, mut gallery, mut total) = (vec![], vec![], vec![], vec![]);
    for i in 0..SAMPLE_PEOPLE.len() {
        let refs = sample_person(i, size);
        let t = Instant::now();
        let r = personaliser.personalise(&refs, "smile, blue background", 4, i as u64)?;
        total.push(t.elapsed().as_secs_f64());
        diff.push(r.seconds.personalise_total);
        gallery.push(r.seconds.gallery);
        let (_, secs) = personaliser.direct_lora(&refs, None, i as u64, &mut |_, _, _| {
            std::ops::ControlFlow::Continue(())
        })?;
        direct.push(secs);
    }
    let b = PersonaliseBench {
        difflora_seconds: median(diff),
        direct_seconds: median(direct),
        gallery4_seconds: median(gallery),
        end_to_end_seconds: median(total),
        peak_rss_mib: crate::memory::peak_rss_bytes().map_or(0.0, crate::memory::mib),
        people: SAMPLE_PEOPLE.len(),
    };
    let recipe = personaliser.recipe();
    let table = format!(
        "# Personalisation speed ({})\n\n\
         Measured {} on {}; built-in sample people ({}), 4 references each, {} threads; \
         medians.\n\n\
         Peer: none. `../shared/peer` holds PyTorch + PEFT training steps for MiniLM and \
         SmolLM2 only; PEFT has no DiffLoRA and the peer has no diffusion model, so the \
         comparison here is DiffLoRA against this project's own direct LoRA fine-tuning, \
         measured in the same run on the same people.\n\n\
         | path | seconds |\n| --- | ---: |\n\
         | DiffLoRA: references → merged LoRA | {:.3} |\n\
         | direct LoRA fine-tuning ({} steps, batch {}, rank {}) | {:.2} |\n\
         | 4-image gallery ({}×{}, {} DDIM steps, guidance {}) | {:.2} |\n\
         | DiffLoRA end to end (references → 4-image gallery) | {:.2} |\n\n\
         DiffLoRA personalises {:.0}× faster than direct fine-tuning. Peak RSS {:.0} MiB.\n",
        model.display(),
        chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        crate::bench::machine::CpuInfo::detect().describe(),
        b.people,
        rayon::current_num_threads(),
        b.difflora_seconds,
        recipe.steps,
        recipe.batch,
        recipe.rank,
        b.direct_seconds,
        size,
        size,
        personaliser.preset().sampling.steps,
        personaliser.preset().sampling.guidance,
        b.gallery4_seconds,
        b.end_to_end_seconds,
        b.direct_seconds / b.difflora_seconds.max(1e-9),
        b.peak_rss_mib
    );
    Ok((b, table))
}

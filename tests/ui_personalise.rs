//! The Personalise tab driven by egui_kittest on a tiny personaliser built once per test
//! binary: a sample person personalised into a scored gallery (with the base generator and a
//! directly fine-tuned LoRA side by side), the worker's progress shown while it personalises
//! and Cancel stopping it, a window that sleeps when the tab is idle, a folder without images
//! reported in the window while the previous references stay, the LoRA and images saved
//! through the folder dialog, and a rendered snapshot of the tab.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crossbeam_channel::Receiver;
use egui::accesskit::Role;
use egui_kittest::Harness;
use egui_kittest::kittest::{NodeT, Queryable};
use peft_studio::app::{AppOptions, Phase, StudioApp, scripted_picker};
use peft_studio::personalize::build::{DiffLoraPreset, Stage, build};
use peft_studio::personalize::job;
use peft_studio::personalize::progress::{GalleryKind, Stage as JobStage};
use peft_studio::worker::{PersonaliseRunner, Runners};

mod ui_support;
use ui_support::run_until;

fn temp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "peft-studio-ui-personalise-{}-{name}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The tiny personaliser, built once for all the tests of this binary.
fn tiny_model() -> &'static Path {
    static MODEL: OnceLock<PathBuf> = OnceLock::new();
    MODEL.get_or_init(|| {
        let dir = temp("model").join("tiny-personaliser");
        build(
            &DiffLoraPreset::tiny(&dir),
            Stage::All,
            &candle_core::Device::Cpu,
            &mut |_, _, _, _| {},
        )
        .expect("the tiny personaliser builds");
        dir
    })
}

fn harness(dir: &Path, answers: Vec<Option<PathBuf>>) -> Harness<'static, StudioApp> {
    harness_on(dir, answers, tiny_model())
}

fn harness_on(
    dir: &Path,
    answers: Vec<Option<PathBuf>>,
    personaliser: &Path,
) -> Harness<'static, StudioApp> {
    harness_with(dir, answers, personaliser, Runners::default())
}

fn harness_with(
    dir: &Path,
    answers: Vec<Option<PathBuf>>,
    personaliser: &Path,
    runners: Runners,
) -> Harness<'static, StudioApp> {
    let options = AppOptions {
        runs_dir: dir.join("runs"),
        picker: scripted_picker(answers),
        persist: false,
        personaliser_dir: personaliser.to_path_buf(),
        runners,
    };
    Harness::builder()
        .with_size(egui::vec2(1280.0, 820.0))
        .build_eframe(move |cc| StudioApp::new(cc, options))
}

/// Opens the Personalise tab and waits for the personaliser.
fn open_tab(h: &mut Harness<'static, StudioApp>) {
    h.get_by_label("Personalise").click();
    h.run_steps(2);
    run_until(h, 30, "the personaliser", |a| {
        a.personalise.personaliser().is_some()
    });
}

/// Clicks a sample person's button and waits for the references.
fn choose_sample(h: &mut Harness<'static, StudioApp>, name: &str) {
    h.get_by_label(name).click();
    let source = format!("sample person {name}");
    run_until(h, 30, "the sample person", move |a| {
        a.personalise.references_source == source
    });
}

/// Presses Personalise (the button, not the tab).
fn press_personalise(h: &mut Harness<'static, StudioApp>) {
    h.get_all_by_label("Personalise")
        .last()
        .expect("the Personalise button")
        .click();
    h.run_steps(1);
}

/// Presses Personalise (the button, not the tab) and waits for the run to end.
fn personalise(h: &mut Harness<'static, StudioApp>) {
    press_personalise(h);
    run_until(h, 60, "the run", |a| !a.personalise.is_busy());
    assert_eq!(
        h.state().personalise.phase,
        Phase::Finished,
        "{:?}",
        h.state().errors
    );
    assert!(h.state().errors.is_empty(), "{:?}", h.state().errors);
}

/// The identity-score labels under the gallery images.
fn score_labels(h: &Harness<'static, StudioApp>) -> usize {
    h.query_all_by_label_contains("score ")
        .filter(|n| n.value().is_some_and(|l| l.starts_with("score ")))
        .count()
}

#[test]
fn personalise_a_sample_person_and_compare_with_the_base_generator() {
    let dir = temp("sample");
    let mut h = harness(&dir, vec![]);
    open_tab(&mut h);
    choose_sample(&mut h, "Ada");
    assert_eq!(h.state().personalise.references.len(), 4);
    h.get_by_label_contains("4 reference images from sample person Ada");
    personalise(&mut h);
    let p = &h.state().personalise;
    let diff = p.diff.as_ref().expect("the DiffLoRA gallery");
    assert_eq!(diff.gallery.images.len(), 4);
    assert_eq!(diff.gallery.scores.len(), 4);
    assert!(p.base.is_none() && p.direct.is_none());
    assert_eq!(score_labels(&h), 4);
    h.get_by_label_contains("State: finished");
    h.get_by_label_contains("DiffLoRA (no fine-tuning): mean identity");
    h.get_by_label_contains("LoRA in ");
    let score = format!("score {:.2}", diff.gallery.scores[0]);
    h.get_all_by_label(&score)
        .next()
        .expect("the first image's score");

    // With the base generator ticked, both rows appear, with the same number of images.
    h.get_by_label("compare with base generator").click();
    h.get_by_label("surprised, face left, hat").click();
    h.run_steps(2);
    assert!(h.state().settings.personalise.compare_base);
    assert_eq!(
        h.state().settings.personalise.prompt,
        "surprised, face left, hat"
    );
    personalise(&mut h);
    let p = &h.state().personalise;
    assert_eq!(p.diff.as_ref().unwrap().gallery.images.len(), 4);
    assert_eq!(
        p.base.as_ref().expect("the base row").gallery.images.len(),
        4
    );
    assert_eq!(score_labels(&h), 8);
    h.get_by_label_contains("Base generator (no LoRA): mean identity");
    h.get_by_label_contains("State: finished");
    drop(h);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The repaint the window last asked for.
fn repaint_delay(h: &Harness<'static, StudioApp>) -> Duration {
    h.output()
        .viewport_output
        .get(&egui::ViewportId::ROOT)
        .map_or(Duration::MAX, |v| v.repaint_delay)
}

/// The real personalisation, held at the first step of the DiffLoRA gallery until the test
/// sends on `gate`.
fn held_at_the_gallery(gate: Receiver<()>) -> PersonaliseRunner {
    Arc::new(move |req, progress| {
        job::run(req, &mut |stage| {
            let flow = progress(stage);
            if let JobStage::Drawing {
                gallery: GalleryKind::DiffLora,
                step: 1,
                ..
            } = stage
            {
                gate.recv().unwrap();
            }
            flow
        })
    })
}

/// Waits until the worker reports the first step of the DiffLoRA gallery.
fn wait_for_the_gallery_step(h: &mut Harness<'static, StudioApp>) {
    run_until(h, 60, "the gallery's first step", |a| {
        matches!(
            a.personalise.stage(),
            Some(JobStage::Drawing {
                gallery: GalleryKind::DiffLora,
                step: 1,
                ..
            })
        )
    });
}

#[test]
fn the_worker_s_progress_shows_then_the_gallery_and_cancel_stops_a_run() {
    let dir = temp("progress");
    let (open, gate) = crossbeam_channel::unbounded();
    let runners = Runners {
        personalise: held_at_the_gallery(gate),
        ..Runners::default()
    };
    let mut h = harness_with(&dir, vec![], tiny_model(), runners);
    open_tab(&mut h);
    choose_sample(&mut h, "Ada");
    assert!(h.get_by_label("Cancel").accesskit_node().is_disabled());
    // Idle: the window asks for no frames.
    h.run_steps(2);
    h.try_run().expect("the idle tab settles");
    assert!(
        repaint_delay(&h) > Duration::from_secs(10),
        "{:?}",
        repaint_delay(&h)
    );

    // Personalise: the stage and its progress while the worker draws, with Cancel on.
    press_personalise(&mut h);
    wait_for_the_gallery_step(&mut h);
    let bar = h.get_by_role(Role::ProgressIndicator);
    let text = bar.accesskit_node().label().unwrap_or_default();
    assert!(
        text.starts_with("drawing the DiffLoRA gallery (4 images): step 1/"),
        "{text}"
    );
    h.get_by_label_contains("State: drawing the DiffLoRA gallery");
    assert!(!h.get_by_label("Cancel").accesskit_node().is_disabled());
    assert!(h.state().personalise.diff.is_none());
    // A job runs: the spinner asks for a few frames a second, never every frame.
    h.try_run()
        .expect("a running job does not repaint continuously");
    let d = repaint_delay(&h);
    assert!(
        d >= Duration::from_millis(50) && d <= Duration::from_millis(250),
        "{d:?}"
    );
    // Then the gallery, and the progress is gone.
    open.send(()).unwrap();
    run_until(&mut h, 60, "the run", |a| !a.personalise.is_busy());
    assert_eq!(h.state().personalise.phase, Phase::Finished);
    assert!(h.state().errors.is_empty(), "{:?}", h.state().errors);
    assert_eq!(score_labels(&h), 4);
    h.get_by_label_contains("State: finished");
    assert!(h.query_by_role(Role::ProgressIndicator).is_none());
    h.run_steps(2);
    h.try_run().expect("the finished tab settles");
    assert!(repaint_delay(&h) > Duration::from_secs(10));

    // Cancel: the run ends as cancelled, without a gallery.
    press_personalise(&mut h);
    wait_for_the_gallery_step(&mut h);
    h.get_by_label("Cancel").click();
    h.run_steps(1);
    assert!(h.state().personalise.cancelling);
    h.get_by_label_contains("State: cancelling");
    open.send(()).unwrap();
    run_until(&mut h, 60, "the cancellation", |a| !a.personalise.is_busy());
    let p = &h.state().personalise;
    assert_eq!(p.phase, Phase::Cancelled);
    assert!(p.diff.is_none() && p.result.is_none());
    assert!(h.state().errors.is_empty(), "{:?}", h.state().errors);
    h.get_by_label_contains("State: cancelled");
    assert_eq!(score_labels(&h), 0);
    drop(h);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_folder_without_images_is_an_error_and_keeps_the_references() {
    let dir = temp("empty");
    let empty = dir.join("no-images");
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::write(empty.join("notes.txt"), "not an image").unwrap();
    let mut h = harness(&dir, vec![Some(empty)]);
    open_tab(&mut h);
    choose_sample(&mut h, "Bo");
    let before = h.state().personalise.references.clone();
    h.get_by_label("Open reference folder…").click();
    run_until(&mut h, 30, "the error", |a| !a.errors.is_empty());
    h.get_by_label_contains("The reference images could not be loaded");
    assert_eq!(h.state().personalise.references, before);
    h.get_by_label_contains("4 reference images from sample person Bo");
    // Still usable: personalising works, here with the direct LoRA alongside.
    h.get_by_label("Dismiss").click();
    h.run_steps(2);
    assert!(h.state().errors.is_empty());
    h.get_by_label("compare with direct LoRA fine-tuning")
        .click();
    h.run_steps(2);
    assert!(h.state().settings.personalise.compare_direct);
    personalise(&mut h);
    let p = &h.state().personalise;
    assert_eq!(p.diff.as_ref().unwrap().gallery.images.len(), 4);
    assert_eq!(
        p.direct
            .as_ref()
            .expect("the direct row")
            .gallery
            .images
            .len(),
        4
    );
    assert!(p.stage().is_none());
    h.get_by_label_contains("Direct LoRA fine-tuning: mean identity");
    h.get_by_label_contains("trained in ");
    assert_eq!(score_labels(&h), 8);
    drop(h);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn save_the_lora_and_the_images_through_the_dialog() {
    let dir = temp("save");
    let lora = dir.join("my-lora");
    let images = dir.join("my-images");
    let mut h = harness(&dir, vec![Some(lora.clone()), Some(images.clone())]);
    open_tab(&mut h);
    choose_sample(&mut h, "Cyd");
    h.state_mut().settings.personalise.n = 3;
    h.run_steps(1);
    personalise(&mut h);
    h.get_by_label("Save LoRA…").click();
    run_until(&mut h, 30, "the LoRA", |a| {
        a.personalise
            .note
            .as_ref()
            .is_some_and(|n| n.contains("saved the LoRA"))
    });
    assert!(h.state().errors.is_empty(), "{:?}", h.state().errors);
    assert!(lora.join("adapter_config.json").is_file());
    h.get_by_label_contains("saved the LoRA to");
    h.get_by_label("Save images…").click();
    run_until(&mut h, 30, "the images", |a| {
        a.personalise
            .note
            .as_ref()
            .is_some_and(|n| n.contains("sheet.png"))
    });
    for f in ["01.png", "02.png", "03.png", "sheet.png"] {
        assert!(images.join(f).is_file(), "{f} missing");
    }
    assert!(!images.join("04.png").exists());
    drop(h);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_missing_personaliser_is_explained() {
    let dir = temp("missing");
    let options = AppOptions {
        runs_dir: dir.join("runs"),
        picker: scripted_picker(vec![]),
        persist: false,
        personaliser_dir: dir.join("nowhere"),
        runners: Runners::default(),
    };
    let mut h = Harness::builder()
        .with_size(egui::vec2(1280.0, 820.0))
        .build_eframe(move |cc| StudioApp::new(cc, options));
    h.get_by_label("Personalise").click();
    h.run_steps(3);
    h.get_by_label_contains("No personaliser at");
    h.get_by_label_contains("difflora-build --preset presets/difflora-portraits-64.toml");
    assert!(h.state().errors.is_empty());
    drop(h);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Generated content differs between CPUs in the last bits of its floats (AVX-512 or not), so
/// the pictures and scores are compared with a tolerance against committed references, and the
/// layout snapshot shows masked tiles instead of them.
mod generated {
    use std::path::Path;

    use image::{RgbImage, RgbaImage};
    use peft_studio::personalize::pipeline::Gallery;

    /// Mean absolute difference allowed, in 8-bit levels per channel.
    const MEAN_LEVELS: f64 = 2.0;
    /// A channel value differing by more than this counts as a changed value…
    const CHANGED_LEVELS: u8 = 24;
    /// …and at most this share of the values may change.
    const CHANGED_SHARE: f64 = 0.02;
    /// Identity scores allowed to move by this much.
    const SCORE_TOLERANCE: f32 = 0.03;

    /// The rows side by side, one gallery a row.
    fn strip(rows: &[&Gallery]) -> RgbaImage {
        let (w, h) = rows[0].images[0].dimensions();
        let cols = rows.iter().map(|g| g.images.len()).max().unwrap_or(0) as u32;
        let mut out = RgbaImage::new(w * cols, h * rows.len() as u32);
        for (r, g) in rows.iter().enumerate() {
            for (c, img) in g.images.iter().enumerate() {
                for (x, y, p) in img.enumerate_pixels() {
                    let [red, green, blue] = p.0;
                    out.put_pixel(
                        c as u32 * w + x,
                        r as u32 * h + y,
                        image::Rgba([red, green, blue, 255]),
                    );
                }
            }
        }
        out
    }

    /// Compares the galleries with `tests/snapshots/NAME.png` and `NAME.json` (their scores)
    /// within the tolerances above; `UPDATE_SNAPSHOTS=1` rewrites the references.
    pub fn check(name: &str, rows: &[&Gallery]) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/snapshots");
        let png = dir.join(format!("{name}.png"));
        let json = dir.join(format!("{name}.json"));
        let current = strip(rows);
        let scores: Vec<Vec<f32>> = rows.iter().map(|g| g.scores.clone()).collect();
        if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
            current.save(&png).expect("write the reference picture");
            std::fs::write(&json, serde_json::to_string_pretty(&scores).unwrap())
                .expect("write the reference scores");
            return;
        }
        let reference = image::open(&png)
            .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_SNAPSHOTS=1 writes it)", png.display()))
            .to_rgba8();
        assert_eq!(reference.dimensions(), current.dimensions(), "gallery size");
        let (mut sum, mut changed, mut n) = (0u64, 0usize, 0usize);
        for (a, b) in reference.pixels().zip(current.pixels()) {
            for ch in 0..3 {
                let d = a.0[ch].abs_diff(b.0[ch]);
                sum += u64::from(d);
                changed += usize::from(d > CHANGED_LEVELS);
                n += 1;
            }
        }
        let mean = sum as f64 / n as f64;
        let share = changed as f64 / n as f64;
        assert!(
            mean <= MEAN_LEVELS && share <= CHANGED_SHARE,
            "the generated gallery moved from {}: mean difference {mean:.2} levels (at most \
             {MEAN_LEVELS}), {:.2}% of values by more than {CHANGED_LEVELS} (at most {:.0}%)",
            png.display(),
            100.0 * share,
            100.0 * CHANGED_SHARE
        );
        let text = std::fs::read_to_string(&json)
            .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_SNAPSHOTS=1 writes it)", json.display()));
        let expected: Vec<Vec<f32>> = serde_json::from_str(&text).expect("reference scores");
        assert_eq!(expected.len(), scores.len(), "rows of scores");
        for (e_row, s_row) in expected.iter().zip(&scores) {
            assert_eq!(e_row.len(), s_row.len(), "scores in a row");
            for (e, s) in e_row.iter().zip(s_row) {
                assert!(
                    (e - s).abs() <= SCORE_TOLERANCE,
                    "identity score {s} moved from {e} (tolerance {SCORE_TOLERANCE})"
                );
            }
        }
    }

    /// The gallery with each image replaced by a flat grey tile and fixed scores, so the layout
    /// snapshot does not depend on the CPU's floating point.
    pub fn masked(g: &Gallery) -> Gallery {
        Gallery {
            images: g
                .images
                .iter()
                .map(|img| RgbImage::from_pixel(img.width(), img.height(), image::Rgb([128; 3])))
                .collect(),
            scores: vec![0.5; g.scores.len()],
            seconds: g.seconds,
        }
    }
}

#[test]
fn snapshot_of_the_personalise_tab() {
    // The shipped personaliser: the picture shows what a user gets with one click.
    let dir = temp("snapshot");
    let builtin = peft_studio::personalize::pipeline::builtin_dir();
    let mut h = harness_on(&dir, vec![], &builtin);
    open_tab(&mut h);
    choose_sample(&mut h, "Dee");
    h.get_by_label("compare with base generator").click();
    h.run_steps(1);
    personalise(&mut h);
    {
        let p = &mut h.state_mut().personalise;
        let (diff, base) = (p.diff.as_mut().unwrap(), p.base.as_mut().unwrap());
        // The generated pictures and scores, within a tolerance of the committed ones.
        generated::check("personalise_gallery", &[&diff.gallery, &base.gallery]);
        // The worker read each gallery with the shipped attribute reader: one line per row
        // naming every prompt attribute with its count out of the gallery's images.
        for row in [&*diff, &*base] {
            let line = row.reading.as_deref().expect("a reader line");
            let n = row.gallery.images.len();
            assert!(line.starts_with("reader: "), "{line}");
            assert_eq!(line.matches(&format!("/{n}")).count(), 5, "{line}");
            eprintln!("{line}");
        }
        // Masked tiles and fixed times, so the layout snapshot is the same on every CPU and
        // from run to run.
        for (row, title) in [
            (
                diff,
                "DiffLoRA (no fine-tuning): mean identity 0.50; LoRA in 0.05 s, gallery in 0.31 s",
            ),
            (
                base,
                "Base generator (no LoRA): mean identity 0.50; gallery in 0.30 s",
            ),
        ] {
            let masked = generated::masked(&row.gallery);
            row.replace_gallery(masked);
            row.title = title.to_string();
            row.reading = Some(
                "reader: smile 2/4, face front 3/4, blue background 4/4, even light 4/4, no accessory 1/4"
                    .to_string(),
            );
        }
    }
    h.run_steps(4);
    h.snapshot("personalise_tab");
    drop(h);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Real photos given to the synthetic built-in personaliser: the tab warns, with the measure.
#[test]
fn real_photos_into_the_synthetic_personaliser_get_a_visible_warning() {
    let orl = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/orl_faces/s3");
    if !orl.is_dir() {
        eprintln!("skipped: {} is absent", orl.display());
        return;
    }
    let dir = temp("real-photos");
    let builtin = peft_studio::personalize::pipeline::builtin_dir();
    let mut h = harness_on(&dir, vec![Some(orl.clone())], &builtin);
    open_tab(&mut h);
    choose_sample(&mut h, "Ada");
    assert!(h.state().personalise.warnings.is_empty());
    h.get_by_label("Open reference folder…").click();
    let source = orl.display().to_string();
    run_until(&mut h, 30, "the photos", move |a| {
        a.personalise.references_source == source
    });
    h.run_steps(2);
    h.get_by_label_contains("Warning: these photos are unlike the pictures");
}

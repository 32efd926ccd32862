//! The Personalise tab driven by egui_kittest on a tiny personaliser built once per test
//! binary: a sample person personalised into a scored gallery (with the base generator and a
//! directly fine-tuned LoRA side by side), a folder without images reported in the window while
//! the previous references stay, the LoRA and images saved through the folder dialog, and a
//! rendered snapshot of the tab.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use peft_studio::app::{AppOptions, Phase, StudioApp, scripted_picker};
use peft_studio::personalize::build::{DiffLoraPreset, Stage, build};

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
    let options = AppOptions {
        runs_dir: dir.join("runs"),
        picker: scripted_picker(answers),
        persist: false,
        personaliser_dir: personaliser.to_path_buf(),
    };
    Harness::builder()
        .with_size(egui::vec2(1280.0, 820.0))
        .build_eframe(move |cc| StudioApp::new(cc, options))
}

fn run_until(
    h: &mut Harness<'static, StudioApp>,
    secs: u64,
    what: &str,
    cond: impl Fn(&StudioApp) -> bool,
) {
    let start = Instant::now();
    while !cond(h.state()) {
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "timed out waiting for {what}; errors: {:?}",
            h.state().errors
        );
        h.step();
        std::thread::sleep(Duration::from_millis(5));
    }
    h.step();
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

/// Presses Personalise (the button, not the tab) and waits for the run to end.
fn personalise(h: &mut Harness<'static, StudioApp>) {
    h.get_all_by_label("Personalise")
        .last()
        .expect("the Personalise button")
        .click();
    h.run_steps(1);
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
    assert!(p.direct_progress.is_none());
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
    };
    let mut h = Harness::builder()
        .with_size(egui::vec2(1280.0, 820.0))
        .build_eframe(move |cc| StudioApp::new(cc, options));
    h.get_by_label("Personalise").click();
    h.run_steps(3);
    h.get_by_label_contains("No personaliser at");
    h.get_by_label_contains("difflora-build --preset presets/difflora-portraits.toml");
    assert!(h.state().errors.is_empty());
    drop(h);
    let _ = std::fs::remove_dir_all(&dir);
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
    // Fixed times, so the picture does not change from run to run.
    {
        let p = &mut h.state_mut().personalise;
        for (row, title) in [
            (
                &mut p.diff,
                "DiffLoRA (no fine-tuning): mean identity {}; LoRA in 0.05 s, gallery in 0.31 s",
            ),
            (
                &mut p.base,
                "Base generator (no LoRA): mean identity {}; gallery in 0.30 s",
            ),
        ] {
            let row = row.as_mut().unwrap();
            row.title = title.replace("{}", &format!("{:.2}", row.gallery.mean_score()));
        }
    }
    h.run_steps(4);
    h.snapshot("personalise_tab");
    drop(h);
    let _ = std::fs::remove_dir_all(&dir);
}

//! The bad-input corpus's harness and fixtures: a tally of cases (each an input and a
//! substring its error must contain), tiny image folders, a copy of the tiny ViT to break.
#![allow(dead_code)]

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

/// Counts cases and collects the ones that did not end in the expected clean error.
#[derive(Default)]
pub struct Tally {
    /// Cases run.
    pub tried: usize,
    /// Clean errors holding the expected text.
    pub clean: usize,
    /// Panics caught.
    pub panics: usize,
    /// What went wrong, per bad case.
    pub problems: Vec<String>,
}

impl Tally {
    /// Runs `f`, which must fail with an error containing `needle` (case-insensitive).
    pub fn expect_err<T>(
        &mut self,
        case: &str,
        needle: &str,
        f: impl FnOnce() -> Result<T, String>,
    ) {
        self.tried += 1;
        match catch_unwind(AssertUnwindSafe(f)) {
            Ok(Ok(_)) => self.problems.push(format!("{case}: accepted")),
            Ok(Err(e)) if e.to_lowercase().contains(&needle.to_lowercase()) => {
                if repeats_os_text(&e) {
                    self.problems
                        .push(format!("{case}: OS error repeated: {e}"));
                } else {
                    self.clean += 1;
                }
            }
            Ok(Err(e)) => self
                .problems
                .push(format!("{case}: error lacks `{needle}`: {e}")),
            Err(_) => {
                self.panics += 1;
                self.problems.push(format!("{case}: panicked"));
            }
        }
    }

    /// Prints the tally and fails on any problem.
    pub fn finish(self, what: &str) {
        eprintln!(
            "{what}: {} cases tried, {} clean errors, {} panics, {} other problems",
            self.tried,
            self.clean,
            self.panics,
            self.problems.len() - self.panics
        );
        assert!(
            self.problems.is_empty(),
            "{} of {} cases failed:\n{}",
            self.problems.len(),
            self.tried,
            self.problems.join("\n")
        );
    }
}

/// Whether an `(os error N)` text appears twice (an error chain repeating its cause).
pub fn repeats_os_text(e: &str) -> bool {
    e.match_indices("(os error").count() > 1
}

/// A fresh folder under the system temp dir, removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    /// A new empty folder named after the test binary and `tag`.
    pub fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "peft-studio-bad-{}-{}-{tag}",
            env!("CARGO_CRATE_NAME"),
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    /// `rel` inside the folder, its parent folders created.
    pub fn path(&self, rel: &str) -> PathBuf {
        let p = self.0.join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        p
    }

    /// Writes `bytes` to `rel`; returns its path.
    pub fn write(&self, rel: &str, bytes: &[u8]) -> PathBuf {
        let p = self.path(rel);
        std::fs::write(&p, bytes).unwrap();
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `w`×`h` RGB image with a pattern from `seed`, encoded as `format`.
pub fn image_bytes(w: u32, h: u32, seed: u8, format: image::ImageFormat) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            (x as u8).wrapping_mul(31).wrapping_add(seed),
            (y as u8).wrapping_mul(17),
            seed.wrapping_mul(3),
        ])
    });
    let mut out = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut out), format)
        .unwrap();
    out
}

/// An image folder with `classes` sub-folders of `per` 8×8 PNGs each.
pub fn image_folder(s: &Scratch, rel: &str, classes: usize, per: usize) -> PathBuf {
    for c in 0..classes {
        for i in 0..per {
            s.write(
                &format!("{rel}/class{c}/{i}.png"),
                &image_bytes(8, 8, (c * 50 + i) as u8, image::ImageFormat::Png),
            );
        }
    }
    s.0.join(rel)
}

/// The test models folder.
pub fn models_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/models")
}

/// A copy of the tiny ViT (8×8×3 images) at `rel`, its `config.json` changed by `edit`.
pub fn tiny_vit_copy(
    s: &Scratch,
    rel: &str,
    edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>),
) -> PathBuf {
    let src = models_dir().join("tiny-vit");
    let dir = s.path(&format!("{rel}/x")).parent().unwrap().to_path_buf();
    std::fs::copy(src.join("model.safetensors"), dir.join("model.safetensors")).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(src.join("config.json")).unwrap()).unwrap();
    edit(cfg.as_object_mut().unwrap());
    std::fs::write(dir.join("config.json"), serde_json::to_vec(&cfg).unwrap()).unwrap();
    dir
}

/// A training preset: LoRA r2 on the model folder `model`, images from `data`, one step.
pub fn train_preset(model: &Path, data: &Path) -> String {
    format!(
        r#"[model.source]
kind = "folder"
path = "{}"

[data]
eval_fraction = 0.25

[data.source]
kind = "image-folder"
path = "{}"

[adapter]
method = "lora"
rank = 2

[optim]
steps = 1
batch_size = 2
eval_every = 1
warmup_steps = 0
"#,
        model.display(),
        data.display()
    )
}

//! The attribute reader: a small convolutional network, trained only on renders of the
//! portrait renderer, that names what a person sees in a portrait — the identity attributes
//! (hair style, hair colour, skin tone, glasses, facial hair) and the prompt attributes
//! (expression, head turn, background, lighting, accessory).
//!
//! It turns generated galleries into scores a person can check: *prompt adherence* (the share
//! of a prompt's attributes read back from the images drawn for it) and *identity agreement*
//! (the share of the reference person's identity attributes read back). The renderer knows
//! every attribute of every render, so the reader's training labels are exact.
//!
//! # Architecture
//!
//! The identity encoders' network, the layer kit's [`ConvTower`]: `stages` 3×3 convolution
//! stages (im2col + matmul, layer norm, GELU, 2×2 average pool) of `width·2^i` channels, the
//! flattened map projected to `hidden` features (layer norm, GELU), then one linear layer
//! (`head.out`) holding every attribute's logits side by side (one softmax head per
//! attribute). Images are (N, 3, S, S) in [-1, 1], like every other model
//! of the personaliser.
//!
//! The weights are stored as f16 (the reader is an instrument, not a model to fine-tune;
//! the build measures its held-out accuracy after that rounding) with the config as JSON in the
//! safetensors metadata under [`CONFIG_KEY`].

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{D, DType, Device, Tensor};
use image::RgbImage;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::tensors::images_to_tensor;
use crate::data::portrait::{
    Accessory, Attributes, Background, Expression, FacialHair, Glasses, HAIR_COLOURS, HairStyle,
    HeadTurn, Identity, Lighting, SKIN_TONES, render,
};
use crate::fsio::write_atomic;
use crate::models::kit::{
    ConvTower, Epochs, Fresh, ModelFile, ModelKind, Shuffle, WarmupCosine, save_model,
};
use crate::train::optim::{AdamW, AdamWParams};

/// Metadata key under which [`AttributeReader::save`] stores the config as JSON.
pub const CONFIG_KEY: &str = "attribute_reader_config";

/// A saved reader: the config under [`CONFIG_KEY`].
const READER_KIND: ModelKind = ModelKind {
    config_key: CONFIG_KEY,
    name: "attribute reader",
    format: None,
};

/// The reader's file inside a personaliser folder.
pub const READER_FILE: &str = "attribute_reader.safetensors";

/// The build's report beside it (per-attribute held-out accuracy, seconds).
pub const READER_REPORT_FILE: &str = "attribute_reader.json";

/// How to build the reader (said wherever a score needs it and it is missing).
pub const BUILD_HINT: &str =
    "peft-studio attribute-reader-build --preset presets/attribute-reader.toml";

/// Number of attributes the reader names.
pub const ATTRIBUTE_COUNT: usize = 10;

/// One class per attribute, in [`ATTRIBUTES`] order.
pub type Labels = [usize; ATTRIBUTE_COUNT];

/// What one attribute is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttributeSpec {
    /// Its name in reports.
    pub name: &'static str,
    /// Number of classes.
    pub classes: usize,
    /// True for attributes of the person (the rest are the prompt's).
    pub identity: bool,
}

const fn spec(name: &'static str, classes: usize, identity: bool) -> AttributeSpec {
    AttributeSpec {
        name,
        classes,
        identity,
    }
}

/// The attributes, identity ones first (indices [`IDENTITY_ATTRIBUTES`]), then the prompt's
/// ([`PROMPT_ATTRIBUTES`]).
pub const ATTRIBUTES: [AttributeSpec; ATTRIBUTE_COUNT] = [
    spec("hair style", HairStyle::ALL.len(), true),
    spec("hair colour", HAIR_COLOURS.len(), true),
    spec("skin tone", SKIN_TONES.len(), true),
    spec("glasses", Glasses::ALL.len(), true),
    spec("facial hair", FacialHair::ALL.len(), true),
    spec("expression", Expression::ALL.len(), false),
    spec("head turn", HeadTurn::ALL.len(), false),
    spec("background", Background::ALL.len(), false),
    spec("lighting", Lighting::ALL.len(), false),
    spec("accessory", Accessory::ALL.len(), false),
];

/// Indices of the identity attributes in [`ATTRIBUTES`].
pub const IDENTITY_ATTRIBUTES: std::ops::Range<usize> = 0..5;
/// Indices of the prompt attributes in [`ATTRIBUTES`].
pub const PROMPT_ATTRIBUTES: std::ops::Range<usize> = 5..10;

fn total_classes() -> usize {
    ATTRIBUTES.iter().map(|a| a.classes).sum()
}

/// The identity labels of the person `Identity::random(seed)`: hair style, hair colour and
/// skin tone (palette indices), glasses, facial hair.
pub fn identity_labels(seed: u64) -> [usize; 5] {
    let (id, skin, hair) = Identity::random_with_palette(seed);
    [
        id.hair_style.index(),
        hair,
        skin,
        id.glasses.index(),
        id.facial_hair.index(),
    ]
}

/// The prompt labels of `attrs`: expression, head turn, background, lighting, accessory.
pub fn prompt_labels(attrs: &Attributes) -> [usize; 5] {
    [
        attrs.expression.index(),
        attrs.head_turn.index(),
        attrs.background.index(),
        attrs.lighting.index(),
        attrs.accessory.index(),
    ]
}

/// Every label of a render of person `identity_seed` with `attrs`.
pub fn labels_of(identity_seed: u64, attrs: &Attributes) -> Labels {
    let mut l = [0; ATTRIBUTE_COUNT];
    l[..5].copy_from_slice(&identity_labels(identity_seed));
    l[5..].copy_from_slice(&prompt_labels(attrs));
    l
}

/// The words for class `class` of attribute `attr` (as a prompt would say it, e.g.
/// `"face left"`, `"blue background"`, `"light from the left"`, `"no accessory"`).
pub fn class_name(attr: usize, class: usize) -> String {
    match attr {
        0 => format!("{} hair", HairStyle::from_index(class).name()),
        1 => format!("{} hair", HAIR_COLOURS[class.min(HAIR_COLOURS.len() - 1)]),
        2 => SKIN_TONES[class.min(SKIN_TONES.len() - 1)].to_string(),
        3 => match Glasses::from_index(class) {
            Glasses::None => "no glasses".into(),
            g => format!("{} glasses", g.name()),
        },
        4 => match FacialHair::from_index(class) {
            FacialHair::None => "clean shaven".into(),
            f => f.name().into(),
        },
        5 => Expression::from_index(class).phrase(),
        6 => HeadTurn::from_index(class).phrase(),
        7 => Background::from_index(class).phrase(),
        8 => Lighting::from_index(class).phrase(),
        _ => Accessory::from_index(class).phrase(),
    }
}

/// `count` renders at `size` pixels of fresh people `first_seed + i`, each with random
/// attributes (seeded by `seed`), with their labels. Deterministic in the arguments.
pub fn labelled_renders(
    first_seed: u64,
    count: usize,
    size: u32,
    seed: u64,
) -> (Vec<RgbImage>, Vec<Labels>) {
    let items: Vec<(RgbImage, Labels)> = (0..count as u64)
        .into_par_iter()
        .map(|i| {
            let person = first_seed + i;
            let mut rng = StdRng::seed_from_u64(seed ^ person.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let attrs = Attributes::random(rng.random());
            let img = render(&Identity::random(person), &attrs, size, rng.random());
            (img, labels_of(person, &attrs))
        })
        .collect();
    items.into_iter().unzip()
}

/// Hyper-parameters of the reader and its training.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ReaderConfig {
    /// Side of the (square) input images; a multiple of `2^stages`. A build takes it from the
    /// personaliser's preset.
    pub image_size: usize,
    /// Channels of the first stage; stage `i` has `width·2^i`.
    pub width: usize,
    /// Convolution stages (each halves the resolution).
    pub stages: usize,
    /// Features of the hidden layer.
    pub hidden: usize,
    /// Optimiser steps.
    pub steps: usize,
    /// Images per step.
    pub batch: usize,
    /// Peak learning rate (linear warm-up, then cosine decay to 5 %).
    pub lr: f64,
    /// Decoupled weight decay of AdamW.
    pub weight_decay: f64,
    /// Seed of the initial weights and batches.
    pub seed: u64,
}

impl Default for ReaderConfig {
    fn default() -> Self {
        Self {
            image_size: 32,
            width: 16,
            stages: 3,
            hidden: 128,
            steps: 2000,
            batch: 64,
            lr: 3e-3,
            weight_decay: 0.01,
            seed: 0,
        }
    }
}

/// Errors naming the file at fault.
fn file_err(path: &Path, reason: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("attribute reader {}: {reason}", path.display())
}

impl ReaderConfig {
    /// Checks that the config describes a buildable reader.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            (1..=5).contains(&self.stages),
            "stages must be 1..=5, got {}",
            self.stages
        );
        let div = 1usize << self.stages;
        anyhow::ensure!(
            self.image_size > 0 && self.image_size.is_multiple_of(div),
            "image_size ({}) must be a positive multiple of 2^stages ({div})",
            self.image_size
        );
        anyhow::ensure!(
            self.width > 0 && self.hidden > 0 && self.batch > 0,
            "width, hidden and batch must be positive"
        );
        anyhow::ensure!(
            self.lr.is_finite() && self.lr > 0.0 && self.weight_decay.is_finite(),
            "lr must be positive and weight_decay finite"
        );
        Ok(())
    }

    /// The network: the identity encoders' tower with every attribute's logits as output.
    fn tower(&self) -> ConvTower {
        ConvTower {
            image_size: self.image_size,
            width: self.width,
            stages: self.stages,
            hidden: self.hidden,
            outputs: total_classes(),
            output: "out",
        }
    }

    /// Linear warm-up over a tenth of the steps (1 to 100), then cosine decay to 5 %.
    fn lr_schedule(&self) -> WarmupCosine {
        WarmupCosine {
            peak: self.lr,
            warmup: (self.steps / 10).clamp(1, 100),
            steps: self.steps,
            floor: 0.05,
        }
    }
}

/// Logits (B, total classes) of channels-last images (B, S, S, 3).
fn forward(cfg: &ReaderConfig, params: &[Tensor], x: &Tensor) -> anyhow::Result<Tensor> {
    Ok(cfg.tower().forward(params, x)?)
}

/// Channels-last f32 host copy of images in [-1, 1].
fn channels_last(images: &[RgbImage]) -> Vec<f32> {
    images
        .iter()
        .flat_map(|img| img.as_raw().iter().map(|&v| v as f32 / 127.5 - 1.0))
        .collect()
}

/// A trained attribute reader.
#[derive(Debug, Clone)]
pub struct AttributeReader {
    cfg: ReaderConfig,
    params: Vec<Tensor>,
    device: Device,
}

/// Images per forward pass when reading.
const READ_CHUNK: usize = 256;

impl AttributeReader {
    /// Trains a reader on `images` (all `cfg.image_size` square) with their labels, on
    /// `device`. `progress(step, loss)` after every step. Deterministic in `cfg.seed` (on one
    /// machine with one thread count).
    pub fn train(
        images: &[RgbImage],
        labels: &[Labels],
        cfg: &ReaderConfig,
        device: &Device,
        progress: &mut dyn FnMut(usize, f32),
    ) -> anyhow::Result<Self> {
        cfg.validate()?;
        anyhow::ensure!(
            !images.is_empty() && images.len() == labels.len(),
            "{} images and {} labels",
            images.len(),
            labels.len()
        );
        let s = cfg.image_size;
        for img in images {
            anyhow::ensure!(
                img.dimensions() == (s as u32, s as u32),
                "a training image is {}×{}, the reader reads {s}×{s}",
                img.width(),
                img.height()
            );
        }
        let host = channels_last(images);
        let per = s * s * 3;
        let n = images.len();
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        let mut fresh = Fresh::trainable(&mut rng, device);
        cfg.tower().build(&mut fresh)?;
        let vars = fresh.into_vars();
        let mut opt = AdamW::new(
            vars.clone(),
            AdamWParams {
                lr: cfg.lr,
                weight_decay: cfg.weight_decay,
                ..AdamWParams::default()
            },
        )?;
        let bsz = cfg.batch.min(n);
        let mut epochs = Epochs::new(n, Shuffle::FisherYates)?;
        let lr = cfg.lr_schedule();
        let mut batch = vec![0f32; bsz * per];
        let k = total_classes();
        for step in 0..cfg.steps {
            let mut onehot = vec![0f32; bsz * k];
            for j in 0..bsz {
                let idx = epochs.next_index(&mut rng);
                batch[j * per..(j + 1) * per].copy_from_slice(&host[idx * per..(idx + 1) * per]);
                let mut offset = 0;
                for (a, spec) in ATTRIBUTES.iter().enumerate() {
                    onehot[j * k + offset + labels[idx][a]] = 1.0;
                    offset += spec.classes;
                }
            }
            let x = Tensor::from_slice(&batch, (bsz, s, s, 3), device)?;
            let params: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            let logits = forward(cfg, &params, &x)?;
            let target = Tensor::from_vec(onehot, (bsz, k), device)?;
            let mut loss: Option<Tensor> = None;
            let mut offset = 0;
            for spec in &ATTRIBUTES {
                let lp = candle_nn::ops::log_softmax(
                    &logits.narrow(1, offset, spec.classes)?,
                    D::Minus1,
                )?;
                let t = target.narrow(1, offset, spec.classes)?;
                let l = ((lp * t)?.sum_all()? * (-1.0 / bsz as f64))?;
                loss = Some(match loss {
                    Some(acc) => (acc + l)?,
                    None => l,
                });
                offset += spec.classes;
            }
            let loss = loss.ok_or_else(|| anyhow::anyhow!("no attributes"))?;
            let grads = loss.backward()?;
            opt.params.lr = lr.lr_at(step);
            opt.step(&grads)?;
            progress(step, loss.to_scalar::<f32>()?);
        }
        Ok(Self {
            cfg: cfg.clone(),
            params: vars.iter().map(|v| v.as_tensor().detach()).collect(),
            device: device.clone(),
        })
    }

    /// The config it was trained with.
    pub fn config(&self) -> &ReaderConfig {
        &self.cfg
    }

    /// Side of the images it reads.
    pub fn image_size(&self) -> u32 {
        self.cfg.image_size as u32
    }

    /// The most likely class of every attribute of each image (all of the reader's size).
    pub fn read(&self, images: &[RgbImage]) -> anyhow::Result<Vec<Labels>> {
        let s = self.image_size();
        for (i, img) in images.iter().enumerate() {
            anyhow::ensure!(
                img.dimensions() == (s, s),
                "image {} is {}×{}; the attribute reader reads {s}×{s}",
                i + 1,
                img.width(),
                img.height()
            );
        }
        let mut out = Vec::with_capacity(images.len());
        for chunk in images.chunks(READ_CHUNK) {
            let x = images_to_tensor(chunk, &self.device)?
                .permute((0, 2, 3, 1))?
                .contiguous()?;
            let logits = forward(&self.cfg, &self.params, &x)?
                .to_device(&crate::device::HOST)?
                .to_dtype(DType::F32)?
                .to_vec2::<f32>()?;
            for row in logits {
                let mut labels = [0; ATTRIBUTE_COUNT];
                let mut offset = 0;
                for (a, spec) in ATTRIBUTES.iter().enumerate() {
                    let part = &row[offset..offset + spec.classes];
                    labels[a] = part
                        .iter()
                        .enumerate()
                        .max_by(|x, y| x.1.total_cmp(y.1))
                        .map_or(0, |(i, _)| i);
                    offset += spec.classes;
                }
                out.push(labels);
            }
        }
        Ok(out)
    }

    /// Writes the weights (f16) with the config in the metadata, atomically.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let mut tensors = Vec::new();
        for (name, t) in self.cfg.tower().named(&self.params) {
            tensors.push((name, t.to_dtype(DType::F16)?));
        }
        save_model(path, &READER_KIND, &self.cfg, &[], &tensors)
            .map_err(|e| anyhow::anyhow!("attribute reader {e}"))
    }

    /// Reads a reader written by [`save`](Self::save) onto `device`; the error names the file.
    pub fn load(path: &Path, device: &Device) -> anyhow::Result<Self> {
        let named = |e| anyhow::anyhow!("attribute reader {e}");
        let mut file = ModelFile::open(path, &READER_KIND, device).map_err(named)?;
        let cfg: ReaderConfig = file.config().map_err(named)?;
        cfg.validate().map_err(|e| file_err(path, e))?;
        let params = cfg.tower().build(&mut file).map_err(named)?;
        file.finish().map_err(named)?;
        Ok(Self {
            cfg,
            params,
            device: device.clone(),
        })
    }

    /// The reader of the personaliser folder `dir` ([`READER_FILE`]): `Ok(None)` when the
    /// file is not there, an error naming the file when it cannot be read.
    pub fn load_beside(dir: &Path, device: &Device) -> anyhow::Result<Option<Self>> {
        let path = dir.join(READER_FILE);
        if !path.exists() {
            return Ok(None);
        }
        Self::load(&path, device).map(Some)
    }
}

/// The share of readings equal to the truth, per attribute (NaN-free: 0 for no images).
pub fn accuracy_per_attribute(read: &[Labels], truth: &[Labels]) -> [f32; ATTRIBUTE_COUNT] {
    let mut hits = [0usize; ATTRIBUTE_COUNT];
    let n = read.len().min(truth.len());
    for (r, t) in read.iter().zip(truth) {
        for a in 0..ATTRIBUTE_COUNT {
            hits[a] += usize::from(r[a] == t[a]);
        }
    }
    hits.map(|h| if n == 0 { 0.0 } else { h as f32 / n as f32 })
}

/// Prompt adherence: the share of (image, prompt attribute) pairs the reader reads as the
/// prompt says. `prompts` holds each image's prompt attributes (one for all, or one each).
pub fn prompt_adherence(read: &[Labels], prompts: &[Attributes]) -> f32 {
    share(
        read,
        |i| prompts[i.min(prompts.len() - 1)],
        PROMPT_ATTRIBUTES,
        |a| prompt_labels(&a).to_vec(),
    )
}

/// The share of images whose five prompt attributes are all read as the prompt says.
pub fn prompt_all_correct(read: &[Labels], prompts: &[Attributes]) -> f32 {
    if read.is_empty() || prompts.is_empty() {
        return 0.0;
    }
    let hits = read
        .iter()
        .enumerate()
        .filter(|(i, r)| {
            let want = prompt_labels(&prompts[(*i).min(prompts.len() - 1)]);
            PROMPT_ATTRIBUTES.zip(want).all(|(a, w)| r[a] == w)
        })
        .count();
    hits as f32 / read.len() as f32
}

/// Identity agreement: the share of (image, identity attribute) pairs the reader reads as the
/// reference person's (`identity` from [`identity_labels`]).
pub fn identity_agreement(read: &[Labels], identity: &[usize; 5]) -> f32 {
    share(read, |_| *identity, IDENTITY_ATTRIBUTES, |l| l.to_vec())
}

fn share<T: Copy>(
    read: &[Labels],
    truth_of: impl Fn(usize) -> T,
    attrs: std::ops::Range<usize>,
    values: impl Fn(T) -> Vec<usize>,
) -> f32 {
    if read.is_empty() || attrs.is_empty() {
        return 0.0;
    }
    let mut hits = 0usize;
    for (i, r) in read.iter().enumerate() {
        let want = values(truth_of(i));
        hits += attrs.clone().zip(want).filter(|(a, w)| r[*a] == *w).count();
    }
    hits as f32 / (read.len() * attrs.len()) as f32
}

/// Per attribute of `attrs` (the prompt's), how many of the images the reader reads that way,
/// as one line: `reader: smile 4/4, face left 2/4, blue background 3/4, …`.
pub fn prompt_reading_line(read: &[Labels], attrs: &Attributes) -> String {
    let want = prompt_labels(attrs);
    let parts: Vec<String> = PROMPT_ATTRIBUTES
        .zip(want)
        .map(|(a, w)| {
            let hits = read.iter().filter(|r| r[a] == w).count();
            format!("{} {hits}/{}", class_name(a, w), read.len())
        })
        .collect();
    format!("reader: {}", parts.join(", "))
}

/// The reader's reading of a gallery drawn for `prompt` as one line (see
/// [`prompt_reading_line`]), or why there is none.
pub fn gallery_reading_line(
    reader: Option<&AttributeReader>,
    images: &[RgbImage],
    prompt: &str,
) -> String {
    let Some(reader) = reader else {
        return format!("reader: not built ({BUILD_HINT})");
    };
    if images.iter().any(|i| i.width() != reader.image_size()) {
        return format!("reader: reads {0}×{0} renders only", reader.image_size());
    }
    match reader.read(images) {
        Ok(read) => prompt_reading_line(&read, &Attributes::from_words(&[prompt])),
        Err(e) => format!("reader: {e}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Build
// ---------------------------------------------------------------------------------------------

/// The preset of `attribute-reader-build`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ReaderPreset {
    /// The personaliser folder (its preset gives the image size; the reader is written into
    /// it). Default: the built-in personaliser.
    #[serde(default)]
    pub personaliser: Option<PathBuf>,
    /// Identity seed of the first training person (one fresh person per render; keep the
    /// range away from the personaliser's people).
    pub train_first_seed: u64,
    /// Training renders.
    pub train_images: usize,
    /// Identity seed of the first held-out person.
    pub test_first_seed: u64,
    /// Held-out renders.
    pub test_images: usize,
    /// Seed of the renders' attributes.
    #[serde(default)]
    pub render_seed: u64,
    /// Where the markdown report goes.
    #[serde(default)]
    pub report: Option<PathBuf>,
    /// The network and its training (its image size is the personaliser's).
    #[serde(default)]
    pub reader: ReaderConfig,
}

impl ReaderPreset {
    /// Reads and checks a preset file; the error names the file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let p: Self =
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        anyhow::ensure!(
            p.train_images > 0 && p.test_images > 0,
            "{}: train_images and test_images must be positive",
            path.display()
        );
        let (a, b) = (p.train_first_seed, p.test_first_seed);
        anyhow::ensure!(
            a + p.train_images as u64 <= b || b + p.test_images as u64 <= a,
            "{}: the training and held-out identity seed ranges overlap",
            path.display()
        );
        Ok(p)
    }
}

/// What a build measured (written beside the reader as [`READER_REPORT_FILE`]).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ReaderReport {
    /// Image side.
    pub image_size: usize,
    /// Training renders.
    pub train_images: usize,
    /// Held-out renders (people never seen in training).
    pub test_images: usize,
    /// Held-out accuracy per attribute (name, share), measured with the saved (f16) weights.
    pub accuracy: Vec<(String, f32)>,
    /// The target per attribute.
    pub target: f32,
    /// Seconds to render the data.
    pub render_seconds: f64,
    /// Seconds to train.
    pub train_seconds: f64,
    /// CPU threads used.
    pub threads: usize,
    /// The CPU, in words.
    pub cpu: String,
    /// The file's size in bytes.
    pub file_bytes: u64,
    /// Last training loss (sum over attributes).
    pub final_loss: f32,
}

/// Target held-out accuracy per attribute.
pub const ACCURACY_TARGET: f32 = 0.95;

/// The CPU's model name (from `/proc/cpuinfo` where there is one).
pub fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

impl ReaderReport {
    /// The report as markdown.
    pub fn markdown(&self, preset: &Path, reader: &Path) -> String {
        use std::fmt::Write as _;
        let mut s = String::from("# Attribute reader\n\n");
        let _ = writeln!(
            s,
            "`peft-studio attribute-reader-build --preset {}` → `{}` ({} bytes, f16). Trained on {} renders of fresh people at {}×{}, measured on {} renders of {} other people (never seen in training). Rendering {:.0} s, training {:.0} s on {} threads ({}).\n",
            preset.display(),
            reader.display(),
            self.file_bytes,
            self.train_images,
            self.image_size,
            self.image_size,
            self.test_images,
            self.test_images,
            self.render_seconds,
            self.train_seconds,
            self.threads,
            self.cpu
        );
        s.push_str("| attribute | classes | held-out accuracy | target 95% |\n| --- | ---: | ---: | --- |\n");
        for ((name, acc), spec) in self.accuracy.iter().zip(&ATTRIBUTES) {
            let verdict = if *acc >= self.target {
                "met".to_string()
            } else {
                format!("missed by {:.1} points", 100.0 * (self.target - acc))
            };
            let _ = writeln!(
                s,
                "| {name} | {} | {:.1}% | {verdict} |",
                spec.classes,
                100.0 * acc
            );
        }
        s
    }
}

/// `attribute-reader-build`: renders the data, trains, saves the reader into the
/// personaliser folder with its report, and writes the markdown report. Returns the report
/// and the reader's path.
pub fn build_reader(
    preset_path: &Path,
    device: &Device,
    log: &mut dyn FnMut(&str),
) -> anyhow::Result<(ReaderReport, PathBuf)> {
    let preset = ReaderPreset::load(preset_path)?;
    let dir = preset
        .personaliser
        .clone()
        .unwrap_or_else(super::pipeline::builtin_dir);
    let pp = dir.join(super::files::PRESET);
    let text = std::fs::read_to_string(&pp).map_err(|e| {
        anyhow::anyhow!(
            "{}: {e} (the reader takes its image size from it)",
            pp.display()
        )
    })?;
    let personaliser: super::build::DiffLoraPreset =
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", pp.display()))?;
    let mut cfg = preset.reader.clone();
    cfg.image_size = personaliser.image_size as usize;
    cfg.validate()
        .map_err(|e| anyhow::anyhow!("{}: {e}", preset_path.display()))?;
    let size = personaliser.image_size;
    let t = Instant::now();
    let (train_x, train_y) = labelled_renders(
        preset.train_first_seed,
        preset.train_images,
        size,
        preset.render_seed,
    );
    let (test_x, test_y) = labelled_renders(
        preset.test_first_seed,
        preset.test_images,
        size,
        preset.render_seed.wrapping_add(1),
    );
    let render_seconds = t.elapsed().as_secs_f64();
    log(&format!(
        "rendered {} + {} images in {render_seconds:.1} s",
        train_x.len(),
        test_x.len()
    ));
    let t = Instant::now();
    let mut last = 0f32;
    let steps = cfg.steps;
    let reader = AttributeReader::train(&train_x, &train_y, &cfg, device, &mut |step, loss| {
        last = loss;
        if step % 100 == 0 || step + 1 == steps {
            log(&format!("step {step}/{steps}: loss {loss:.4}"));
        }
    })?;
    let train_seconds = t.elapsed().as_secs_f64();
    let path = dir.join(READER_FILE);
    reader.save(&path)?;
    // Measure what was saved (f16 weights).
    let saved = AttributeReader::load(&path, device)?;
    let acc = accuracy_per_attribute(&saved.read(&test_x)?, &test_y);
    let report = ReaderReport {
        image_size: cfg.image_size,
        train_images: train_x.len(),
        test_images: test_x.len(),
        accuracy: ATTRIBUTES
            .iter()
            .zip(acc)
            .map(|(a, v)| (a.name.to_string(), v))
            .collect(),
        target: ACCURACY_TARGET,
        render_seconds,
        train_seconds,
        threads: rayon::current_num_threads(),
        cpu: cpu_name(),
        file_bytes: std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0),
        final_loss: last,
    };
    write_atomic(
        &dir.join(READER_REPORT_FILE),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    if let Some(md) = &preset.report {
        if let Some(parent) = md.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)?;
        }
        write_atomic(md, report.markdown(preset_path, &path).as_bytes())?;
    }
    Ok((report, path))
}

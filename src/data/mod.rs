//! Datasets behind one shape: labelled images (IDX files, a folder per class, built-ins) or
//! labelled texts (CSV / JSONL), split into train and eval with a seed.
//!
//! [`load`] reads a [`DataConfig`]: it dispatches on the [`DataSource`], splits the samples
//! (the source's own held-out files where it has them, else a seeded shuffle), then applies the
//! caps. The same config always gives the same split. Errors ([`DataError`]) name the file, and
//! the column or line where there is one; user data never panics.
//!
//! - IDX files (MNIST's format), plain or gzip: [`read_idx_images`], [`read_idx_labels`].
//! - A folder with one sub-folder of images per class (png, jpeg, pnm, bmp, gif, webp, tiff).
//! - Texts with labels in `.csv` / `.tsv` (header row) or `.jsonl` files.
//! - Built-ins ([`BUILTIN_DATASETS`]) from the assets folder ([`assets_dir`]).
//!
//! The portraits of personalisation (DiffLoRA) are data too:
//!
//! - [`portrait`]: a procedural, deterministic renderer of synthetic cartoon faces. Every face
//!   comes from an [`Identity`](portrait::Identity) (the person: face shape, colours, hair,
//!   eyes, nose, mouth, facial hair, glasses) and [`Attributes`](portrait::Attributes) (what a
//!   text prompt can change: expression, head turn, background, lighting, accessory), so
//!   identity ground truth is exact.
//! - [`identity_folder`]: real photos laid out one sub-folder per person (like the ORL faces),
//!   and a folder of one person's reference photos.
//! - [`people`]: sets of people with their portraits, drawn by the renderer or read from an
//!   identity folder ([`PeopleSource`](people::PeopleSource)).

mod chat_template;
pub mod identity_folder;
mod idx;
mod image_folder;
mod instruct;
pub mod people;
pub mod portrait;
pub(crate) mod split;
mod text;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use chat_template::{CHATML, ChatTemplate, Message};
pub use idx::{IDX1_UBYTE_MAGIC, IDX3_UBYTE_MAGIC, IdxImages, read_idx_images, read_idx_labels};
pub use image_folder::IMAGE_EXTENSIONS;
pub(crate) use image_folder::{TRUNCATED_JPEG, jpeg_is_truncated};
pub use instruct::{
    InstructEncoder, InstructFile, InstructFormat, InstructRecord, InstructReport, InstructSet,
    Preview, PreviewSpan, RecordBody, SpanKind, TokenizedExample, exact_match, exact_match_rate,
    normalize_answer, parse_instruct, read_instruct_file,
};
pub use text::MAX_INT_LABEL;

/// Labelled images, pixels as bytes in N×C×H×W order.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageSet {
    /// Channels (1 grey, 3 RGB).
    pub channels: usize,
    /// Height in pixels.
    pub height: usize,
    /// Width in pixels.
    pub width: usize,
    /// N·C·H·W bytes.
    pub pixels: Vec<u8>,
    /// One class index per image.
    pub labels: Vec<u32>,
}

/// Labelled texts.
#[derive(Debug, Clone, PartialEq)]
pub struct TextSet {
    /// The texts.
    pub texts: Vec<String>,
    /// One class index per text.
    pub labels: Vec<u32>,
}

/// One split's samples.
#[derive(Debug, Clone, PartialEq)]
pub enum Samples {
    /// Images.
    Images(ImageSet),
    /// Texts.
    Texts(TextSet),
}

/// A loaded dataset.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// Display name.
    pub name: String,
    /// Class names, indexed by label.
    pub classes: Vec<String>,
    /// Training samples.
    pub train: Samples,
    /// Held-out samples.
    pub eval: Samples,
}

/// Where the data comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum DataSource {
    /// A built-in dataset from `assets/` (`mnist-5k`).
    Builtin {
        /// Its name.
        name: String,
    },
    /// IDX files (the MNIST format, optionally gzip-compressed).
    Idx {
        /// Training images (idx3).
        images: PathBuf,
        /// Training labels (idx1).
        labels: PathBuf,
        /// Held-out images; without them the eval split is cut from the training files.
        #[serde(default)]
        eval_images: Option<PathBuf>,
        /// Held-out labels.
        #[serde(default)]
        eval_labels: Option<PathBuf>,
    },
    /// One sub-folder per class holding image files.
    ImageFolder {
        /// The folder.
        path: PathBuf,
        /// Resize (centre-crop, then scale) to [height, width]; default: the first image's size.
        #[serde(default)]
        size: Option<[u32; 2]>,
        /// Convert to one grey channel.
        #[serde(default)]
        grayscale: bool,
    },
    /// A CSV or JSONL file of texts and labels.
    Text {
        /// The file (`.csv`, `.tsv`, `.jsonl`).
        path: PathBuf,
        /// Column holding the text.
        #[serde(default = "default_text_column")]
        text_column: String,
        /// Column holding the label (a string or an integer).
        #[serde(default = "default_label_column")]
        label_column: String,
    },
    /// Instruction, chat or plain-text data for a causal language model: JSON or JSONL in the
    /// Alpaca (`instruction`/`input`/`output`), chat (`messages`), ShareGPT (`conversations`)
    /// or `text` format.
    Instruct {
        /// The file.
        path: PathBuf,
        /// A held-out file; without it the eval split is cut from `path`.
        #[serde(default)]
        eval_path: Option<PathBuf>,
    },
}

fn default_text_column() -> String {
    "text".into()
}

fn default_label_column() -> String {
    "label".into()
}

/// A data source plus how to split and cap it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// Where the data comes from.
    pub source: DataSource,
    /// Share held out for evaluation when the source has no held-out split.
    pub eval_fraction: f64,
    /// Seed of the split.
    pub split_seed: u64,
    /// Keep at most this many training samples (after the split).
    pub max_train: Option<usize>,
    /// Keep at most this many eval samples.
    pub max_eval: Option<usize>,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            source: DataSource::Builtin {
                name: "mnist-5k".into(),
            },
            eval_fraction: 0.2,
            split_seed: 0,
            max_train: None,
            max_eval: None,
        }
    }
}

/// Why a dataset could not be loaded. Every message names the file (or folder) at fault, and
/// the column, field or line where there is one.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file or folder that does not exist.
    #[error("{what} not found: {}", path.display())]
    NotFound {
        /// The missing path.
        path: PathBuf,
        /// What it should have been ("IDX image file", "image folder", …).
        what: String,
    },
    /// A file that exists but cannot be read.
    #[error("cannot read {}: {message}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The system's reason.
        message: String,
    },
    /// A file that starts like gzip but does not inflate.
    #[error("{}: corrupt gzip data: {message}", path.display())]
    Gzip {
        /// The file.
        path: PathBuf,
        /// The decoder's reason.
        message: String,
    },
    /// An IDX file with the wrong magic number.
    #[error(
        "{}: not an {kind} file: magic number 0x{found:08x}, expected 0x{expected:08x}; {hint}",
        path.display()
    )]
    IdxMagic {
        /// The file.
        path: PathBuf,
        /// The kind expected ("idx3 image", "idx1 label").
        kind: String,
        /// The expected magic number.
        expected: u32,
        /// The magic number found.
        found: u32,
        /// What the magic number found looks like.
        hint: String,
    },
    /// An IDX file whose header and data disagree, or whose shape is unusable.
    #[error("{}: bad IDX shape: {message}", path.display())]
    IdxShape {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Image and label files with different counts.
    #[error(
        "{} holds {n_images} images but {} holds {n_labels} labels",
        images.display(),
        labels.display()
    )]
    CountMismatch {
        /// The image file.
        images: PathBuf,
        /// The label file.
        labels: PathBuf,
        /// Images in it.
        n_images: usize,
        /// Labels in it.
        n_labels: usize,
    },
    /// Held-out images whose size differs from the training images.
    #[error(
        "{}: images are {found_h}×{found_w}, but the training images are {train_h}×{train_w}",
        path.display()
    )]
    ShapeMismatch {
        /// The held-out file.
        path: PathBuf,
        /// Its image height.
        found_h: usize,
        /// Its image width.
        found_w: usize,
        /// The training height.
        train_h: usize,
        /// The training width.
        train_w: usize,
    },
    /// An image file that cannot be decoded.
    #[error("cannot read image {}: {message}", path.display())]
    Image {
        /// The image file.
        path: PathBuf,
        /// The decoder's reason.
        message: String,
    },
    /// A class folder without any image file.
    #[error(
        "class folder {} holds no images (hidden files are skipped; image extensions: {extensions})",
        path.display()
    )]
    EmptyClass {
        /// The class folder.
        path: PathBuf,
        /// The extensions looked for.
        extensions: String,
    },
    /// A text or label column that is not in the file.
    #[error("{}{at}: no {role} column '{column}'; columns found: {found}", path.display())]
    MissingColumn {
        /// The file.
        path: PathBuf,
        /// "text" or "label".
        role: String,
        /// The column asked for.
        column: String,
        /// The columns the file has, listed.
        found: String,
        /// Where (" (line 3)" for JSONL), or empty.
        at: String,
    },
    /// A malformed row or line.
    #[error("{}: line {line}: {message}", path.display())]
    BadRecord {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// A file type the loader does not read.
    #[error("{}: unsupported file type (expected {expected})", path.display())]
    UnsupportedFormat {
        /// The file.
        path: PathBuf,
        /// The types accepted.
        expected: String,
    },
    /// A dataset (or a file of it) without samples.
    #[error("{what}: the dataset is empty: {message}")]
    Empty {
        /// The file, folder or dataset.
        what: String,
        /// Details.
        message: String,
    },
    /// A built-in name that does not exist.
    #[error("unknown built-in dataset '{name}'; the built-ins are: {known}")]
    UnknownBuiltin {
        /// The name asked for.
        name: String,
        /// The built-ins, listed.
        known: String,
    },
    /// A config value out of range.
    #[error("data config: {field}: {message}")]
    InvalidConfig {
        /// The field.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// A chat template that does not compile or render, or a tokenizer config holding a bad
    /// one.
    #[error("chat template {origin}{at}: {message}")]
    Template {
        /// The file or source holding the template.
        origin: String,
        /// Where in it (", line 3"), or empty.
        at: String,
        /// What is wrong.
        message: String,
    },
    /// A malformed record of an instruction-data file (JSONL line or JSON array item).
    #[error("{}: {at}: {message}", path.display())]
    BadItem {
        /// The file.
        path: PathBuf,
        /// `line 3` (JSONL) or `record [3]` (JSON array, 0-based).
        at: String,
        /// What is wrong, naming the field.
        message: String,
    },
    /// Too few samples to split into train and eval.
    #[error("{what}: {message}")]
    Split {
        /// The dataset's source.
        what: String,
        /// What is wrong.
        message: String,
    },
    /// Instruction data given to a classifier.
    #[error(
        "{path}: instruction data trains a language model (llama, mistral, qwen2; e.g. smollm2-135m-instruct), not a classifier: pick such a model"
    )]
    NotForClassifier {
        /// The data file.
        path: String,
    },
}

/// The built-in datasets, by name (their files are in [`assets_dir`]`/data`).
pub const BUILTIN_DATASETS: &[&str] = &["mnist-5k"];

/// The assets folder: `$PEFT_STUDIO_ASSETS` if set, else `./assets` if it exists, else a folder
/// `assets` next to the executable or up to three levels above it (`target/release/peft-studio`,
/// `target/release/deps/…`), else the source tree's `assets` (`CARGO_MANIFEST_DIR/assets`).
pub fn assets_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PEFT_STUDIO_ASSETS")
        && !dir.is_empty()
    {
        return PathBuf::from(dir);
    }
    let local = PathBuf::from("assets");
    if local.is_dir() {
        return local;
    }
    if let Ok(exe) = std::env::current_exe() {
        let exe = exe.canonicalize().unwrap_or(exe);
        if let Some(dir) = exe.parent() {
            for ancestor in dir.ancestors().take(4) {
                let candidate = ancestor.join("assets");
                if candidate.is_dir() {
                    return candidate;
                }
            }
        }
    }
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/assets"))
}

/// Reads a whole file; a missing file is [`DataError::NotFound`] naming `what` it should be.
pub(crate) fn read_file(path: &Path, what: &str) -> Result<Vec<u8>, DataError> {
    std::fs::read(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            DataError::NotFound {
                path: path.to_path_buf(),
                what: what.into(),
            }
        } else {
            DataError::Io {
                path: path.to_path_buf(),
                message: e.to_string(),
            }
        }
    })
}

impl ImageSet {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no images.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Bytes per image (`channels·height·width`).
    pub fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// Image `i` as C×H×W bytes. Panics if `i` is out of range.
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.image_len();
        &self.pixels[i * n..(i + 1) * n]
    }

    /// The images at `idx`, in that order. Panics if an index is out of range.
    pub fn subset(&self, idx: &[usize]) -> ImageSet {
        let mut pixels = Vec::with_capacity(idx.len() * self.image_len());
        for &i in idx {
            pixels.extend_from_slice(self.image(i));
        }
        ImageSet {
            channels: self.channels,
            height: self.height,
            width: self.width,
            pixels,
            labels: idx.iter().map(|&i| self.labels[i]).collect(),
        }
    }
}

impl TextSet {
    /// Number of texts.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no texts.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The texts at `idx`, in that order. Panics if an index is out of range.
    pub fn subset(&self, idx: &[usize]) -> TextSet {
        TextSet {
            texts: idx.iter().map(|&i| self.texts[i].clone()).collect(),
            labels: idx.iter().map(|&i| self.labels[i]).collect(),
        }
    }
}

impl Samples {
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.labels().len()
    }

    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.labels().is_empty()
    }

    /// One class index per sample.
    pub fn labels(&self) -> &[u32] {
        match self {
            Samples::Images(s) => &s.labels,
            Samples::Texts(s) => &s.labels,
        }
    }

    /// The samples at `idx`, in that order. Panics if an index is out of range.
    pub fn subset(&self, idx: &[usize]) -> Samples {
        match self {
            Samples::Images(s) => Samples::Images(s.subset(idx)),
            Samples::Texts(s) => Samples::Texts(s.subset(idx)),
        }
    }

    /// Samples per class, for `num_classes` classes (labels beyond it are not counted).
    pub fn class_counts(&self, num_classes: usize) -> Vec<usize> {
        let mut counts = vec![0; num_classes];
        for &l in self.labels() {
            if let Some(c) = counts.get_mut(l as usize) {
                *c += 1;
            }
        }
        counts
    }
}

impl Dataset {
    /// Number of classes.
    pub fn num_classes(&self) -> usize {
        self.classes.len()
    }

    /// Samples per class in (train, eval).
    pub fn class_counts(&self) -> (Vec<usize>, Vec<usize>) {
        let n = self.num_classes();
        (self.train.class_counts(n), self.eval.class_counts(n))
    }
}

impl DataSource {
    /// A short description of the source for messages: the built-in name, file or folder.
    pub fn describe(&self) -> String {
        match self {
            DataSource::Builtin { name } => format!("built-in dataset '{name}'"),
            DataSource::Idx { images, .. } => images.display().to_string(),
            DataSource::ImageFolder { path, .. }
            | DataSource::Text { path, .. }
            | DataSource::Instruct { path, .. } => path.display().to_string(),
        }
    }
}

/// Loads the dataset a config describes: reads the source, splits it (the source's own
/// held-out files for built-ins and IDX with eval files, else a shuffle seeded by `split_seed`
/// holding out `eval_fraction`, at least one sample on each side), then keeps at most
/// `max_train` / `max_eval` samples (a seeded random subset, in source order).
/// The same config always gives the same dataset.
pub fn load(cfg: &DataConfig) -> Result<Dataset, DataError> {
    split::check_settings(cfg.eval_fraction, cfg.max_train, cfg.max_eval)?;
    let what = cfg.source.describe();
    let (name, classes, train, eval) = match &cfg.source {
        DataSource::Builtin { name } => {
            let (classes, train, eval) = load_builtin(name)?;
            (name.clone(), classes, train, Some(eval))
        }
        DataSource::Idx {
            images,
            labels,
            eval_images,
            eval_labels,
        } => {
            let train = load_idx_pair(images, labels)?;
            let eval = match (eval_images, eval_labels) {
                (Some(ei), Some(el)) => {
                    let eval = load_idx_pair(ei, el)?;
                    if (eval.height, eval.width) != (train.height, train.width) {
                        return Err(DataError::ShapeMismatch {
                            path: ei.clone(),
                            found_h: eval.height,
                            found_w: eval.width,
                            train_h: train.height,
                            train_w: train.width,
                        });
                    }
                    Some(eval)
                }
                (None, None) => None,
                (Some(_), None) => return Err(missing_pair("source.eval_labels", "eval_images")),
                (None, Some(_)) => return Err(missing_pair("source.eval_images", "eval_labels")),
            };
            let max = train
                .labels
                .iter()
                .chain(eval.iter().flat_map(|e| e.labels.iter()))
                .copied()
                .max()
                .unwrap_or(0);
            let classes = (0..=max).map(|c| c.to_string()).collect();
            (
                stem(images),
                classes,
                Samples::Images(train),
                eval.map(Samples::Images),
            )
        }
        DataSource::ImageFolder {
            path,
            size,
            grayscale,
        } => {
            let folder = image_folder::load(path, *size, *grayscale)?;
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| path.display().to_string());
            (name, folder.classes, Samples::Images(folder.images), None)
        }
        DataSource::Text {
            path,
            text_column,
            label_column,
        } => {
            let texts = text::load(path, text_column, label_column)?;
            (stem(path), texts.classes, Samples::Texts(texts.texts), None)
        }
        DataSource::Instruct { path, .. } => {
            return Err(DataError::NotForClassifier {
                path: path.display().to_string(),
            });
        }
    };
    let (train, eval) = match eval {
        Some(eval) => (train, eval),
        None => {
            let (t, e) =
                split::random_split(train.len(), cfg.eval_fraction, cfg.split_seed, &what)?;
            (train.subset(&t), train.subset(&e))
        }
    };
    let keep_train = split::cap(
        train.len(),
        cfg.max_train,
        cfg.split_seed,
        split::STREAM_CAP_TRAIN,
    );
    let keep_eval = split::cap(
        eval.len(),
        cfg.max_eval,
        cfg.split_seed,
        split::STREAM_CAP_EVAL,
    );
    let train = if keep_train.len() < train.len() {
        train.subset(&keep_train)
    } else {
        train
    };
    let eval = if keep_eval.len() < eval.len() {
        eval.subset(&keep_eval)
    } else {
        eval
    };
    Ok(Dataset {
        name,
        classes,
        train,
        eval,
    })
}

fn missing_pair(field: &str, given: &str) -> DataError {
    DataError::InvalidConfig {
        field: field.into(),
        message: format!("required when {given} is given (give both or neither)"),
    }
}

fn stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// Reads an idx3 image file and its idx1 label file into an [`ImageSet`] (1 channel).
pub fn load_idx_pair(images: &Path, labels: &Path) -> Result<ImageSet, DataError> {
    let im = read_idx_images(images)?;
    let lb = read_idx_labels(labels)?;
    if im.count != lb.len() {
        return Err(DataError::CountMismatch {
            images: images.to_path_buf(),
            labels: labels.to_path_buf(),
            n_images: im.count,
            n_labels: lb.len(),
        });
    }
    Ok(ImageSet {
        channels: 1,
        height: im.height,
        width: im.width,
        pixels: im.pixels,
        labels: lb.into_iter().map(u32::from).collect(),
    })
}

/// The files of a built-in: (classes, train, held-out).
fn load_builtin(name: &str) -> Result<(Vec<String>, Samples, Samples), DataError> {
    match name {
        "mnist-5k" => {
            let dir = assets_dir().join("data");
            let file = |f: &str| dir.join(f);
            let pair = |images: &str, labels: &str| {
                load_idx_pair(&file(images), &file(labels)).map_err(|e| match e {
                    DataError::NotFound { path, .. } => DataError::NotFound {
                        path,
                        what: "built-in mnist-5k file (run scripts/prepare-data.sh, or set \
                               PEFT_STUDIO_ASSETS to the assets folder)"
                            .into(),
                    },
                    other => other,
                })
            };
            let train = pair(
                "mnist5k-train-images-idx3-ubyte.gz",
                "mnist5k-train-labels-idx1-ubyte.gz",
            )?;
            let eval = pair(
                "mnist5k-heldout-images-idx3-ubyte.gz",
                "mnist5k-heldout-labels-idx1-ubyte.gz",
            )?;
            let classes = (0..10).map(|c| c.to_string()).collect();
            for (set, f) in [
                (&train, "mnist5k-train-labels-idx1-ubyte.gz"),
                (&eval, "mnist5k-heldout-labels-idx1-ubyte.gz"),
            ] {
                if let Some(pos) = set.labels.iter().position(|&l| l >= 10) {
                    return Err(DataError::IdxShape {
                        path: file(f),
                        message: format!("label {} at index {pos} is not a digit", set.labels[pos]),
                    });
                }
            }
            Ok((classes, Samples::Images(train), Samples::Images(eval)))
        }
        _ => Err(DataError::UnknownBuiltin {
            name: name.into(),
            known: BUILTIN_DATASETS.join(", "),
        }),
    }
}

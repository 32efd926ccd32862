//! Resolving a model: a built-in from `assets/`, a local Hugging Face folder
//! (`config.json`, `model.safetensors`, `tokenizer.json`), or a `config.json` alone (random
//! initialisation, for pretraining from scratch).

use std::path::{Path, PathBuf};

use candle_core::Device;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokenizers::Tokenizer;

use super::bert::BertClassifier;
use super::vit::VitClassifier;
use super::weights::WeightReader;
use super::{Classifier, ModelError};

/// Built-in models, as folders under `assets/models/`.
pub const BUILTIN_MODELS: &[(&str, &str)] = &[(
    "tiny-vit-fmnist",
    "a 4-layer ViT (hidden 64, 28×28×1 images, patch 7) pretrained by this project on Fashion-MNIST",
)];

/// Where a model comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum ModelSource {
    /// A built-in model from `assets/models/<name>`.
    Builtin {
        /// Its name (see [`BUILTIN_MODELS`]).
        name: String,
    },
    /// A local Hugging Face model folder.
    Folder {
        /// The folder.
        path: PathBuf,
    },
    /// A `config.json` alone: every weight initialised from the seed.
    Config {
        /// The config file.
        path: PathBuf,
    },
    /// A llama.cpp GGUF file (a language model with its tokenizer).
    Gguf {
        /// The file.
        path: PathBuf,
    },
}

impl Default for ModelSource {
    fn default() -> Self {
        ModelSource::Builtin {
            name: "tiny-vit-fmnist".into(),
        }
    }
}

impl ModelSource {
    /// A short name for tables and logs.
    pub fn display_name(&self) -> String {
        match self {
            ModelSource::Builtin { name } => name.clone(),
            ModelSource::Folder { path }
            | ModelSource::Config { path }
            | ModelSource::Gguf { path } => path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| path.display().to_string()),
        }
    }
}

/// A model ready to train, with its tokenizer (text models) and what was initialised.
pub struct LoadedModel {
    /// The model.
    pub model: Box<dyn Classifier>,
    /// The tokenizer (`tokenizer.json`), for text models from a folder.
    pub tokenizer: Option<Tokenizer>,
    /// Parameters that were initialised rather than loaded (the new head, for instance).
    pub initialised: Vec<String>,
}

fn read_json(path: &Path) -> Result<Value, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::File {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    serde_json::from_str(&text).map_err(|e| ModelError::File {
        path: path.display().to_string(),
        reason: format!("not valid JSON: {e}"),
    })
}

/// The folder of a built-in model.
pub fn builtin_folder(name: &str) -> Result<PathBuf, ModelError> {
    if !BUILTIN_MODELS.iter().any(|(n, _)| *n == name) {
        let names: Vec<&str> = BUILTIN_MODELS.iter().map(|(n, _)| *n).collect();
        return Err(ModelError::File {
            path: name.into(),
            reason: format!("not a built-in model (built-ins: {})", names.join(", ")),
        });
    }
    Ok(crate::data::assets_dir().join("models").join(name))
}

/// Loads a model onto `device` with a `num_labels`-way head. `fresh_head` re-initialises a
/// head the checkpoint has; `seed` seeds every initialisation.
pub fn load_model(
    source: &ModelSource,
    num_labels: usize,
    fresh_head: bool,
    seed: u64,
    device: &Device,
) -> Result<LoadedModel, ModelError> {
    let (config_path, weights, folder) = match source {
        ModelSource::Builtin { name } => {
            let f = builtin_folder(name)?;
            (
                f.join("config.json"),
                Some(f.join("model.safetensors")),
                Some(f),
            )
        }
        ModelSource::Folder { path } => (
            path.join("config.json"),
            Some(path.join("model.safetensors")),
            Some(path.clone()),
        ),
        ModelSource::Config { path } => (path.clone(), None, None),
        ModelSource::Gguf { path } => {
            return Err(ModelError::File {
                path: path.display().to_string(),
                reason: "a GGUF file holds a language model; a classifier needs a bert, roberta or vit folder".into(),
            });
        }
    };
    let v = read_json(&config_path)?;
    let shown = config_path.display().to_string();
    let model_type = v
        .get("model_type")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let prefix = match model_type.as_str() {
        "bert" => "bert.",
        "roberta" | "xlm-roberta" | "camembert" => "roberta.",
        "vit" => "vit.",
        other => {
            return Err(ModelError::File {
                path: shown,
                reason: format!("model_type `{other}` is not supported (bert, roberta, vit are)"),
            });
        }
    };
    if num_labels < 2 {
        return Err(ModelError::TooFewClasses(num_labels));
    }
    // Field ranges and a size check before anything is allocated.
    let arch = crate::arch::ArchSpec::from_config(&v, &shown, Some(num_labels))?;
    let bytes = (arch.total_params() as u64).saturating_mul(4);
    if let Some(available) = crate::memory::available_bytes()
        && bytes > available
    {
        return Err(ModelError::File {
            path: shown,
            reason: format!(
                "{}: {} parameters, {:.1} GiB as f32, more than the {:.1} GiB of memory available",
                arch.summary,
                crate::inspect::thousands(arch.total_params()),
                crate::memory::gib(bytes),
                crate::memory::gib(available)
            ),
        });
    }
    let std = v
        .get("initializer_range")
        .and_then(Value::as_f64)
        .unwrap_or(0.02) as f32;
    let mut reader = match &weights {
        Some(w) if w.is_file() => WeightReader::open(w, prefix, std, seed, device)?,
        Some(w) => {
            return Err(ModelError::File {
                path: w.display().to_string(),
                reason: "the model folder has no model.safetensors".into(),
            });
        }
        None => WeightReader::random(prefix, std, seed, device),
    };
    let model: Box<dyn Classifier> = if model_type == "vit" {
        Box::new(VitClassifier::load(
            &v,
            &shown,
            &mut reader,
            num_labels,
            fresh_head,
        )?)
    } else {
        Box::new(BertClassifier::load(
            &v,
            &shown,
            &mut reader,
            num_labels,
            fresh_head,
        )?)
    };
    let tokenizer = match (&folder, model_type.as_str()) {
        (Some(f), "bert" | "roberta" | "xlm-roberta" | "camembert") => {
            let t = f.join("tokenizer.json");
            if !t.is_file() {
                return Err(ModelError::File {
                    path: t.display().to_string(),
                    reason: "a text model folder needs its tokenizer.json".into(),
                });
            }
            Some(Tokenizer::from_file(&t).map_err(|e| ModelError::File {
                path: t.display().to_string(),
                reason: format!("cannot read the tokenizer: {e}"),
            })?)
        }
        _ => None,
    };
    Ok(LoadedModel {
        model,
        tokenizer,
        initialised: reader.initialised,
    })
}

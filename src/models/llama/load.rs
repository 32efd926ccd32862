//! Reading a LLaMA-family model from a local Hugging Face folder: `config.json` and
//! `model.safetensors`, or shards listed in `model.safetensors.index.json`. Weights stored as
//! f32, f16 or bf16 are converted to f32.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use candle_core::{Device, Tensor};
use serde_json::Value;

use super::config::LlamaConfig;
use super::model::LlamaModel;
use crate::device::HOST;
use crate::models::ModelError;
use crate::models::weights::WeightReader;

/// The index of a sharded checkpoint.
pub const SHARD_INDEX: &str = "model.safetensors.index.json";

fn file_err(path: &Path, reason: impl Into<String>) -> ModelError {
    ModelError::File {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

fn read_safetensors(path: &Path) -> Result<HashMap<String, Tensor>, ModelError> {
    candle_core::safetensors::load(path, &HOST)
        .map_err(|e| file_err(path, format!("cannot read the weights: {e}")))
}

/// Every tensor of the folder's checkpoint: `model.safetensors`, or the shards its
/// `model.safetensors.index.json` names. Returns the tensors and the file to name in errors.
pub fn read_checkpoint(
    dir: &Path,
) -> Result<(HashMap<String, Tensor>, std::path::PathBuf), ModelError> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok((read_safetensors(&single)?, single));
    }
    let index = dir.join(SHARD_INDEX);
    if !index.is_file() {
        return Err(file_err(
            dir,
            format!("the model folder has neither model.safetensors nor {SHARD_INDEX}"),
        ));
    }
    let text = std::fs::read_to_string(&index).map_err(|e| file_err(&index, e.to_string()))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| file_err(&index, format!("not valid JSON: {e}")))?;
    let Some(map) = v.get("weight_map").and_then(Value::as_object) else {
        return Err(file_err(
            &index,
            "field `weight_map` is missing or not an object",
        ));
    };
    let mut shards = BTreeSet::new();
    for (name, file) in map {
        let Some(f) = file.as_str() else {
            return Err(file_err(
                &index,
                format!("field `weight_map.{name}` must be a file name, found {file}"),
            ));
        };
        // A shard is a file beside the index, never a path elsewhere.
        if f.is_empty() || f.contains(['/', '\\']) || f == ".." {
            return Err(file_err(
                &index,
                format!("field `weight_map.{name}`: `{f}` is not a file name in the folder"),
            ));
        }
        shards.insert(f.to_string());
    }
    let mut tensors = HashMap::new();
    for shard in &shards {
        let path = dir.join(shard);
        if !path.is_file() {
            return Err(file_err(
                &path,
                format!("shard named by {SHARD_INDEX} is missing"),
            ));
        }
        tensors.extend(read_safetensors(&path)?);
    }
    for name in map.keys() {
        if !tensors.contains_key(name) {
            return Err(file_err(
                &index,
                format!("tensor `{name}` is listed in `weight_map` but in no shard"),
            ));
        }
    }
    Ok((tensors, index))
}

/// Loads the model in the Hugging Face folder `dir` onto `device`.
pub fn load_folder(dir: &Path, device: &Device) -> Result<LlamaModel, ModelError> {
    let config_path = dir.join("config.json");
    let config = LlamaConfig::from_file(&config_path)?;
    // Refuse a model whose f32 weights exceed the memory available, before reading them.
    let params = config.parameter_count();
    let bytes = (params as u64).saturating_mul(4);
    if let Some(available) = crate::memory::available_bytes()
        && bytes > available
    {
        return Err(file_err(
            &config_path,
            format!(
                "{} parameters, {:.1} GiB as f32, more than the {:.1} GiB of memory available",
                crate::inspect::thousands(params),
                crate::memory::gib(bytes),
                crate::memory::gib(available)
            ),
        ));
    }
    let (tensors, file) = read_checkpoint(dir)?;
    let mut r =
        WeightReader::from_tensors(tensors, &file, config.initializer_range as f32, 0, device)?;
    LlamaModel::load(&config, &mut r)
}

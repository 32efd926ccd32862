//! What a finished run leaves to use: writing the trained parts into its folder (`adapter/`,
//! `model/` or `head/`) and rebuilding the trained model from them.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;

use super::batches::EncodedSplit;
use super::config::{TrainConfig, TrainMode};
use super::layout::{HEAD_FILE, MODEL_CONFIG_FILE, MODEL_WEIGHTS_FILE, RunLayout};
use super::store::EvalPoint;
use super::trainer::{Prepared, load_data};
use super::work::{Classification, Work};
use crate::fsio;
use crate::models::{self, Classifier, LoadedModel, load_model};
use crate::peft::{load_adapter_with, save_adapter_with};

/// The `modules_to_save` of a model: its head's parameters.
type HeadTensors = Vec<(String, Vec<(String, Tensor)>)>;

fn head_tensors(model: &dyn Classifier) -> crate::peft::Result<HeadTensors> {
    model
        .head()
        .into_iter()
        .map(|l| {
            let mut params = vec![("weight".to_string(), l.base_weight()?.detach())];
            if let Some(b) = l.bias() {
                params.push(("bias".to_string(), b.detach()));
            }
            Ok((l.path().to_string(), params))
        })
        .collect()
}

/// Saves what a run trained: `adapter/` (adapter + head), `model/` (full fine-tuning, a
/// complete Hugging Face folder) or `head/` (head only).
pub fn save_trained(
    cfg: &TrainConfig,
    model: &dyn Classifier,
    run_path: &Path,
) -> anyhow::Result<()> {
    let layout = RunLayout::new(run_path);
    match cfg.mode {
        TrainMode::Adapter => {
            save_adapter_with(
                model,
                &cfg.adapter,
                &layout.adapter(),
                &head_tensors(model)?,
            )?;
        }
        TrainMode::Full => save_model(model, &layout.model())?,
        TrainMode::Head => {
            let dir = layout.head();
            fsio::create_dir_all(&dir)?;
            let mut t = Vec::new();
            for (module, params) in head_tensors(model)? {
                for (n, v) in params {
                    t.push((format!("{module}.{n}"), v));
                }
            }
            fsio::write_safetensors(&dir.join(HEAD_FILE), &t, HashMap::new())?;
        }
    }
    Ok(())
}

/// Writes a whole model as a Hugging Face folder: `config.json` and `model.safetensors`.
pub fn save_model(model: &dyn Classifier, dir: &Path) -> anyhow::Result<()> {
    fsio::create_dir_all(dir)?;
    let tensors = models::named_tensors(model)?;
    fsio::write_safetensors(&dir.join(MODEL_WEIGHTS_FILE), &tensors, HashMap::new())?;
    fsio::write_atomic(
        &dir.join(MODEL_CONFIG_FILE),
        serde_json::to_string_pretty(&model.config_json())?.as_bytes(),
    )?;
    Ok(())
}

/// Rebuilds a finished run's model from its folder (config, base model, saved adapter or
/// weights) and evaluates it on its eval split.
pub fn reload_and_evaluate(run_path: &Path) -> anyhow::Result<EvalPoint> {
    let cfg = TrainConfig::from_preset(&RunLayout::new(run_path).config(), &[])?;
    let p = prepare_frozen(&cfg, run_path)?;
    p.work.evaluate(cfg.optim.eval_batch_size, 0)
}

/// The run's trained model (no trainable variables), with its data encoded.
fn prepare_frozen(cfg: &TrainConfig, run_path: &Path) -> anyhow::Result<Prepared> {
    let layout = RunLayout::new(run_path);
    let device = cfg.device.resolve()?;
    let data = load_data(cfg, None)?;
    let (source, fresh) = match cfg.mode {
        TrainMode::Full => (
            models::ModelSource::Folder {
                path: layout.model(),
            },
            false,
        ),
        _ => (cfg.model.source.clone(), true),
    };
    let LoadedModel {
        mut model,
        tokenizer,
        ..
    } = load_model(&source, data.num_classes(), fresh, cfg.optim.seed, &device)?;
    let head_file = match cfg.mode {
        TrainMode::Adapter => {
            let (_, extra) = load_adapter_with(model.as_mut(), &layout.adapter())?;
            Some(extra)
        }
        TrainMode::Head => {
            let path = layout.head().join(HEAD_FILE);
            Some(fsio::parse_safetensors(
                &path,
                &fsio::read(&path)?,
                &device,
            )?)
        }
        TrainMode::Full => None,
    };
    if let Some(extra) = head_file {
        for l in model.head_mut() {
            let w = extra
                .get(&format!("{}.weight", l.path()))
                .ok_or_else(|| anyhow::anyhow!("the saved run lacks `{}.weight`", l.path()))?;
            let b = extra.get(&format!("{}.bias", l.path())).cloned();
            *l = crate::peft::AdaptedLinear::new(l.path().to_string(), w.clone(), b);
        }
    }
    let input = model.input();
    let train = EncodedSplit::new(&data.train, input, tokenizer.as_ref(), cfg.model.max_length)?;
    let eval = EncodedSplit::new(&data.eval, input, tokenizer.as_ref(), cfg.model.max_length)?;
    Ok(Prepared {
        total: models::parameter_count(model.as_ref()),
        work: Work::Classify(Box::new(Classification {
            model,
            data,
            train,
            eval,
            device,
        })),
        groups: Vec::new(),
        trainable: 0,
        initialised: Vec::new(),
        notes: Vec::new(),
    })
}

//! `--format peft`: a PEFT LoRA adapter folder (`adapter_config.json`,
//! `adapter_model.safetensors`) that `PeftModel.from_pretrained` loads onto the Hugging Face
//! model unchanged.
//!
//! Every adapter, whatever its method, is written as the plain LoRA of its learned change
//! `ΔW = B·A` (the factorisation of [`Adapter::lora_form`](crate::peft::linear::Adapter)):
//! LoRA exactly as trained (B carries the scale), SVFit and LoLDU as `(U·diag(Δσ), Vᵀ)` and
//! `(P·L·diag(Δz), U)` of their rank, PiSSA/OLoRA as a rank-2r pair. Modules of a lower rank
//! are zero-padded to the largest one, so one `r` and `lora_alpha = r` (scale 1) describe them
//! all: no `rank_pattern` is needed by PEFT, llama.cpp or any other reader.

use std::collections::BTreeSet;
use std::path::Path;

use candle_core::{DType, Tensor};
use serde_json::{Value, json};

use crate::fsio;
use crate::peft::checkpoint::{CONFIG_FILE, KEY_PREFIX, WEIGHTS_FILE};
use crate::peft::config::Method;
use crate::peft::linear::LinearLayers;

/// What PEFT needs to know beside the tensors.
#[derive(Debug, Clone, Default)]
pub struct PeftTarget {
    /// PEFT's `task_type`: `SEQ_CLS` (sequence classification), `CAUSAL_LM`, or none.
    pub task_type: Option<String>,
    /// `base_model_name_or_path`: the base model's folder or hub id.
    pub base_model: Option<String>,
    /// Modules trained fully (PEFT's `modules_to_save`): `(module, [(param, tensor)])`,
    /// stored as `base_model.model.<module>.<param>`, PEFT's saved key.
    pub modules_to_save: Vec<(String, Vec<(String, Tensor)>)>,
}

/// One layer's learned change as a LoRA pair, zero-padded to a common rank.
#[derive(Debug, Clone)]
pub struct LoraPair {
    /// Module path (`model.layers.0.self_attn.q_proj`).
    pub path: String,
    /// The method the layer was trained with.
    pub method: Method,
    /// The rank of the pair before padding.
    pub rank: usize,
    /// A (r × in), f32.
    pub a: Tensor,
    /// B (out × r), f32; `B·A` is the layer's learned change (scale 1).
    pub b: Tensor,
}

/// The learned change of every adapted layer of `model` as LoRA pairs of one rank (the
/// largest; smaller ones zero-padded). Fails when no layer carries an adapter.
pub fn lora_pairs(model: &(impl LinearLayers + ?Sized)) -> anyhow::Result<(Vec<LoraPair>, usize)> {
    let mut pairs = Vec::new();
    for layer in model.linears() {
        let Some(adapter) = layer.adapter() else {
            continue;
        };
        let (b, a) = adapter.lora_form()?;
        pairs.push(LoraPair {
            path: layer.path().to_string(),
            method: adapter.method(),
            rank: a.dims()[0],
            a: a.to_dtype(DType::F32)?.detach(),
            b: b.to_dtype(DType::F32)?.detach(),
        });
    }
    let Some(r) = pairs.iter().map(|p| p.rank).max() else {
        anyhow::bail!("the model carries no adapter to export");
    };
    for p in &mut pairs {
        if p.rank < r {
            let pad = r - p.rank;
            let (n, m) = (p.a.dims()[1], p.b.dims()[0]);
            let za = Tensor::zeros((pad, n), DType::F32, p.a.device())?;
            let zb = Tensor::zeros((m, pad), DType::F32, p.b.device())?;
            p.a = Tensor::cat(&[&p.a, &za], 0)?;
            p.b = Tensor::cat(&[&p.b, &zb], 1)?;
        }
    }
    Ok((pairs, r))
}

/// PEFT's `target_modules` for the adapted `paths` of a model whose linear layers are `all`:
/// the leaf names (`q_proj`, `v_proj`) when they pick exactly the adapted layers under PEFT's
/// suffix rule, else the full paths.
pub fn target_modules(paths: &[&str], all: &[&str]) -> Vec<String> {
    let leaves: BTreeSet<&str> = paths
        .iter()
        .map(|p| p.rsplit('.').next().unwrap_or(p))
        .collect();
    let adapted: BTreeSet<&str> = paths.iter().copied().collect();
    let exact = all.iter().all(|p| {
        let leaf = p.rsplit('.').next().unwrap_or(p);
        leaves.contains(leaf) == adapted.contains(p)
    });
    if exact {
        leaves.into_iter().map(String::from).collect()
    } else {
        adapted.into_iter().map(String::from).collect()
    }
}

/// What [`write_peft`] wrote.
#[derive(Debug, Clone)]
pub struct PeftSummary {
    /// The common rank `r` (and `lora_alpha`).
    pub rank: usize,
    /// Adapted modules.
    pub modules: usize,
    /// Methods of the adapted layers (a run has one).
    pub methods: Vec<Method>,
    /// `target_modules` as written.
    pub target_modules: Vec<String>,
}

/// Writes `model`'s adapters as a PEFT LoRA folder into `dir` (which must exist; the caller
/// makes the folder atomic, see [`super::staging`]).
pub fn write_peft(
    model: &(impl LinearLayers + ?Sized),
    target: &PeftTarget,
    dir: &Path,
) -> anyhow::Result<PeftSummary> {
    let (pairs, r) = lora_pairs(model)?;
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for p in &pairs {
        let key = format!("{KEY_PREFIX}{}", p.path);
        tensors.push((format!("{key}.lora_A.weight"), p.a.clone()));
        tensors.push((format!("{key}.lora_B.weight"), p.b.clone()));
    }
    for (module, params) in &target.modules_to_save {
        for (name, t) in params {
            tensors.push((
                format!("{KEY_PREFIX}{module}.{name}"),
                t.to_dtype(DType::F32)?.detach(),
            ));
        }
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let all: Vec<&str> = model.linears().iter().map(|l| l.path()).collect();
    let adapted: Vec<&str> = pairs.iter().map(|p| p.path.as_str()).collect();
    let targets = target_modules(&adapted, &all);
    let mut methods: Vec<Method> = Vec::new();
    for p in &pairs {
        if !methods.contains(&p.method) {
            methods.push(p.method);
        }
    }
    let modules_to_save: Vec<&str> = target
        .modules_to_save
        .iter()
        .map(|(m, _)| m.as_str())
        .collect();
    let config = json!({
        "peft_type": "LORA",
        "task_type": target.task_type,
        "base_model_name_or_path": target.base_model,
        "r": r,
        "lora_alpha": r,
        "target_modules": targets,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": false,
        "use_dora": false,
        "init_lora_weights": true,
        "fan_in_fan_out": false,
        "inference_mode": true,
        "modules_to_save": if modules_to_save.is_empty() { Value::Null } else { json!(modules_to_save) },
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": null,
        "layers_pattern": null,
        "revision": null,
    });
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    fsio::write_safetensors(&dir.join(WEIGHTS_FILE), &tensors, meta)?;
    fsio::write_atomic(
        &dir.join(CONFIG_FILE),
        serde_json::to_string_pretty(&config)?.as_bytes(),
    )?;
    Ok(PeftSummary {
        rank: r,
        modules: pairs.len(),
        methods,
        target_modules: targets,
    })
}

#[cfg(test)]
mod tests {
    use super::target_modules;

    #[test]
    fn leaf_names_only_when_they_pick_exactly_the_adapted_layers() {
        let all = [
            "l.0.q_proj",
            "l.0.k_proj",
            "l.0.v_proj",
            "l.1.q_proj",
            "l.1.v_proj",
        ];
        assert_eq!(
            target_modules(
                &["l.0.q_proj", "l.0.v_proj", "l.1.q_proj", "l.1.v_proj"],
                &all
            ),
            vec!["q_proj", "v_proj"]
        );
        // Only layer 0's q: the leaf `q_proj` would also pick layer 1's.
        assert_eq!(target_modules(&["l.0.q_proj"], &all), vec!["l.0.q_proj"]);
    }
}

//! `--format merged`: a Hugging Face model folder with every adapter folded into its weight
//! (`model.safetensors` under HF names, f32; `config.json`; the base model's tokenizer and
//! processor files copied), loadable by `transformers` like any checkpoint.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor};
use serde_json::{Value, json};

use crate::fsio;
use crate::models::llama::{DecoderFamily, LlamaModel};

/// The weights file of a merged folder.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// The config file of a merged folder.
pub const CONFIG_FILE: &str = "config.json";

/// Files of a base model folder that belong in a merged folder too (tokenizer, chat
/// template, generation defaults, image processor), copied when present.
pub const COPIED_FILES: [&str; 10] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "generation_config.json",
    "preprocessor_config.json",
];

/// Writes `tensors` (HF names) and `config` into `dir`, copying [`COPIED_FILES`] from `base`
/// when given. Returns the names of the copied files.
pub fn write_merged(
    tensors: &[(String, Tensor)],
    config: &Value,
    base: Option<&Path>,
    dir: &Path,
) -> anyhow::Result<Vec<String>> {
    let f32s = tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), t.to_dtype(DType::F32)?.detach())))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    fsio::write_safetensors(&dir.join(WEIGHTS_FILE), &f32s, meta)?;
    let mut config = config.clone();
    if let Some(o) = config.as_object_mut() {
        o.insert("torch_dtype".into(), json!("float32"));
    }
    fsio::write_atomic(
        &dir.join(CONFIG_FILE),
        serde_json::to_string_pretty(&config)?.as_bytes(),
    )?;
    let mut copied = Vec::new();
    if let Some(base) = base {
        for f in COPIED_FILES {
            let src = base.join(f);
            if src.is_file() {
                fsio::write_atomic(&dir.join(f), &fsio::read(&src)?)?;
                copied.push(f.to_string());
            }
        }
    }
    Ok(copied)
}

/// Every parameter of a LLaMA-family model by HF name, adapters merged (`lm_head.weight`
/// only when untied, as HF saves it).
pub fn llama_tensors(model: &LlamaModel) -> anyhow::Result<Vec<(String, Tensor)>> {
    let mut out = model.other_params();
    for l in crate::peft::linear::LinearLayers::linears(model) {
        out.push((format!("{}.weight", l.path()), l.effective_weight()?));
        if let Some(b) = l.bias() {
            out.push((format!("{}.bias", l.path()), b.detach()));
        }
    }
    if !model.config().tie_word_embeddings {
        out.push(("lm_head.weight".into(), model.lm_head().effective_weight()?));
    }
    Ok(out)
}

/// The HF `config.json` of a LLaMA-family model: the base folder's own (every field kept)
/// when `base` has one, else one written from the model's config.
pub fn llama_config_json(model: &LlamaModel, base: Option<&Path>) -> anyhow::Result<Value> {
    if let Some(path) = base.map(|b| b.join(CONFIG_FILE)).filter(|p| p.is_file()) {
        let text = fsio::read_to_string(&path)?;
        return serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}: not valid JSON: {e}", path.display()));
    }
    let c = model.config();
    let arch = match c.family {
        DecoderFamily::Llama => "LlamaForCausalLM",
        DecoderFamily::Mistral => "MistralForCausalLM",
        DecoderFamily::Qwen2 => "Qwen2ForCausalLM",
    };
    let mut v = json!({
        "architectures": [arch],
        "model_type": c.family.model_type(),
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "vocab_size": c.vocab_size,
        "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "tie_word_embeddings": c.tie_word_embeddings,
        "hidden_act": "silu",
        "initializer_range": c.initializer_range,
    });
    let o = v.as_object_mut().expect("a JSON object literal");
    if let Some(s) = c.rope_scaling {
        o.insert(
            "rope_scaling".into(),
            json!({
                "rope_type": "llama3",
                "factor": s.factor,
                "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings,
            }),
        );
    }
    match c.family {
        DecoderFamily::Qwen2 => {
            o.insert(
                "use_sliding_window".into(),
                json!(c.sliding_window.is_some()),
            );
            o.insert("sliding_window".into(), json!(c.sliding_window));
        }
        DecoderFamily::Mistral => {
            o.insert("sliding_window".into(), json!(c.sliding_window));
        }
        DecoderFamily::Llama => {
            o.insert("attention_bias".into(), json!(c.qkv_bias));
            o.insert("mlp_bias".into(), json!(c.mlp_bias));
        }
    }
    if let Some(b) = c.bos_token_id {
        o.insert("bos_token_id".into(), json!(b));
    }
    match c.eos_token_ids.as_slice() {
        [] => {}
        [one] => {
            o.insert("eos_token_id".into(), json!(one));
        }
        many => {
            o.insert("eos_token_id".into(), json!(many));
        }
    }
    Ok(v)
}

/// Writes a LLaMA-family model with its adapters merged as an HF folder into `dir`
/// (`base`: the folder it was loaded from, for its config and tokenizer).
pub fn write_merged_llama(
    model: &LlamaModel,
    base: Option<&Path>,
    dir: &Path,
) -> anyhow::Result<Vec<String>> {
    let tensors = llama_tensors(model)?;
    let config = llama_config_json(model, base)?;
    write_merged(&tensors, &config, base, dir)
}

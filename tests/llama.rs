//! The LLaMA-family decoder against candle-transformers' `llama`, `qwen2` and `mistral` on the
//! same tiny random weights (logits within 1e-4 at every position), the KV cache against the
//! full forward, checkpoint loading (sharded, f16) and config errors that name the field.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::{llama, mistral, qwen2};
use common::{TempDir, ids, max_diff, randn, random_weights, tiny_llama};
use peft_studio::models::llama::{KvCache, LlamaConfig, LlamaModel, load_folder};
use peft_studio::peft::linear::{LinearLayers, attach_adapters};
use peft_studio::peft::{AdapterConfig, Method, Targets};
use serde_json::{Value, json};

const TOL: f32 = 1e-4;

/// Writes `config.json` and `model.safetensors` for `v`; returns the parsed config and weights.
fn write_model(dir: &Path, v: &Value, seed: u64) -> (LlamaConfig, HashMap<String, Tensor>) {
    let cfg = LlamaConfig::from_json(v, "config.json").unwrap();
    let w = random_weights(&cfg, seed);
    std::fs::write(dir.join("config.json"), v.to_string()).unwrap();
    candle_core::safetensors::save(&w, dir.join("model.safetensors")).unwrap();
    (cfg, w)
}

fn max_abs(a: &Tensor) -> f32 {
    a.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// candle-transformers' llama: logits at each position, from each prefix (it returns the last
/// position's only).
fn llama_reference(v: &Value, w: &HashMap<String, Tensor>, ids: &Tensor) -> Tensor {
    let dev = Device::Cpu;
    let c: llama::LlamaConfig = serde_json::from_value(v.clone()).unwrap();
    let c = c.into_config(false);
    let vb = VarBuilder::from_tensors(w.clone(), DType::F32, &dev);
    let model = llama::Llama::load(vb, &c).unwrap();
    let t = ids.dim(1).unwrap();
    let rows: Vec<Tensor> = (1..=t)
        .map(|p| {
            let mut cache = llama::Cache::new(false, DType::F32, &c, &dev).unwrap();
            model
                .forward(&ids.narrow(1, 0, p).unwrap(), 0, &mut cache)
                .unwrap()
        })
        .collect();
    Tensor::stack(&rows, 1).unwrap()
}

fn check_llama(v: Value, seed: u64) -> LlamaModel {
    let dir = TempDir::new("llama");
    let (_, w) = write_model(&dir.0, &v, seed);
    let ours = load_folder(&dir.0, &candle_core::Device::Cpu).unwrap();
    let got = ours.forward(&ids(), None, false).unwrap();
    let want = llama_reference(&v, &w, &ids());
    assert_eq!(got.dims(), &[2, 7, 50]);
    assert!(max_abs(&want) > 0.5, "logits too small to compare");
    let d = max_diff(&got, &want);
    assert!(d < TOL, "max |ours − candle| = {d}");
    ours
}

#[test]
fn llama_gqa_untied_matches_candle_transformers() {
    let m = check_llama(tiny_llama("llama", false), 1);
    assert_eq!(m.linears().len(), 14);
    assert!(!m.config().tie_word_embeddings);
}

#[test]
fn llama_tied_multi_head_matches_candle_transformers() {
    let mut v = tiny_llama("llama", true);
    v["num_key_value_heads"] = json!(4);
    let m = check_llama(v, 2);
    // Tied: lm_head reads the embedding.
    let e = &m.other_params()[0].1;
    assert_eq!(
        max_diff(m.lm_head().base_weight().unwrap().as_ref(), e),
        0.0
    );
}

#[test]
fn llama3_rope_scaling_matches_candle_transformers() {
    // head_dim 8: wavelengths 6.3, 63, 628, 6283 against 64/4 and 64/1 → every branch.
    let mut v = tiny_llama("llama", false);
    v["rope_scaling"] = json!({
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64
    });
    let scaled = check_llama(v.clone(), 3);
    // The scaling changes the logits, so the comparison above could fail without it.
    v["rope_scaling"] = Value::Null;
    let dir = TempDir::new("llama-plain");
    write_model(&dir.0, &v, 3);
    let plain = load_folder(&dir.0, &candle_core::Device::Cpu).unwrap();
    let a = scaled.forward(&ids(), None, false).unwrap();
    let b = plain.forward(&ids(), None, false).unwrap();
    assert!(max_diff(&a, &b) > 1e-3);
}

fn qwen2_check(tied: bool, seed: u64) {
    let dir = TempDir::new("qwen2");
    let v = tiny_llama("qwen2", tied);
    let (cfg, w) = write_model(&dir.0, &v, seed);
    assert!(cfg.qkv_bias && !cfg.o_bias);
    assert!(w.contains_key("model.layers.1.self_attn.q_proj.bias"));
    let ours = load_folder(&dir.0, &candle_core::Device::Cpu).unwrap();
    let got = ours.forward(&ids(), None, false).unwrap();
    let c: qwen2::Config = serde_json::from_value(v.clone()).unwrap();
    let vb = VarBuilder::from_tensors(w.clone(), DType::F32, &Device::Cpu);
    let mut reference = qwen2::Model::new(&c, vb).unwrap();
    let hidden = reference.forward(&ids(), 0, None).unwrap();
    let head = w
        .get("lm_head.weight")
        .unwrap_or(&w["model.embed_tokens.weight"]);
    let want = hidden.broadcast_matmul(&head.t().unwrap()).unwrap();
    assert!(max_abs(&want) > 0.5);
    let d = max_diff(&got, &want);
    assert!(d < TOL, "max |ours − candle qwen2| = {d}");
}

#[test]
fn qwen2_biases_match_candle_transformers() {
    qwen2_check(false, 4);
    qwen2_check(true, 5);
}

#[test]
fn mistral_with_explicit_head_dim_matches_candle_transformers() {
    // head_dim 16 ≠ hidden / heads = 8: q_proj is 64×32.
    let dir = TempDir::new("mistral");
    let mut v = tiny_llama("mistral", false);
    v["head_dim"] = json!(16);
    let (cfg, w) = write_model(&dir.0, &v, 6);
    assert_eq!(cfg.head_dim, 16);
    let ours = load_folder(&dir.0, &candle_core::Device::Cpu).unwrap();
    let got = ours.forward(&ids(), None, false).unwrap();
    let c: mistral::Config = serde_json::from_value(v.clone()).unwrap();
    let vb = VarBuilder::from_tensors(w.clone(), DType::F32, &Device::Cpu);
    let mut reference = mistral::Model::new(&c, vb).unwrap();
    for p in 1..=7 {
        reference.clear_kv_cache();
        let want = reference
            .forward(&ids().narrow(1, 0, p).unwrap(), 0)
            .unwrap()
            .squeeze(1)
            .unwrap();
        let d = max_diff(&got.i((.., p - 1, ..)).unwrap(), &want);
        assert!(d < TOL, "position {p}: max |ours − candle mistral| = {d}");
    }
}

#[test]
fn kv_cache_decoding_equals_the_full_forward() {
    let dir = TempDir::new("kv");
    write_model(&dir.0, &tiny_llama("qwen2", false), 7);
    let m = load_folder(&dir.0, &candle_core::Device::Cpu).unwrap();
    let full = m.forward(&ids(), None, false).unwrap();
    let mut cache = KvCache::new();
    let mut parts = Vec::new();
    for (start, len) in [(0, 3), (3, 1), (4, 2), (6, 1)] {
        parts.push(
            m.forward_cached(&ids().narrow(1, start, len).unwrap(), &mut cache)
                .unwrap(),
        );
        assert_eq!(cache.len(), start + len);
    }
    let inc = Tensor::cat(&parts, 1).unwrap();
    assert!(max_diff(&inc, &full) < 1e-5);
    // Past max_position_embeddings (64) is an error, not a panic.
    let long = Tensor::zeros((1, 60), DType::U32, &Device::Cpu).unwrap();
    let e = m.forward_cached(&long, &mut cache).unwrap_err().to_string();
    assert!(e.contains("max_position_embeddings"), "{e}");
}

#[test]
fn padded_keys_are_hidden_and_bad_ids_are_errors() {
    let dir = TempDir::new("pad");
    write_model(&dir.0, &tiny_llama("llama", false), 8);
    let m = load_folder(&dir.0, &candle_core::Device::Cpu).unwrap();
    let short = Tensor::new(&[[3u32, 17, 42, 0]], &Device::Cpu).unwrap();
    let alone = m.forward(&short, None, false).unwrap();
    // The same row right-padded to 7 tokens, in a batch.
    let mask = Tensor::new(
        &[[1f32, 1., 1., 1., 0., 0., 0.], [1., 1., 1., 1., 1., 1., 1.]],
        &Device::Cpu,
    )
    .unwrap();
    let batch = m.forward(&ids(), Some(&mask), false).unwrap();
    let d = max_diff(&batch.i((0..1, 0..4, ..)).unwrap(), &alone);
    assert!(d < 1e-5, "{d}");
    let bad = Tensor::new(&[[3u32, 50]], &Device::Cpu).unwrap();
    let e = m.forward(&bad, None, false).unwrap_err().to_string();
    assert!(e.contains("50") && e.contains("vocab_size"), "{e}");
}

#[test]
fn adapters_target_hugging_face_module_paths() {
    let dir = TempDir::new("adapt");
    write_model(&dir.0, &tiny_llama("llama", false), 9);
    let mut m = load_folder(&dir.0, &candle_core::Device::Cpu).unwrap();
    let before = m.forward(&ids(), None, false).unwrap();
    let mut cfg = AdapterConfig::new(Method::Lora, 4);
    cfg.targets = Targets::List(vec!["q_proj".into(), "v_proj".into()]);
    let report = attach_adapters(&mut m, &cfg).unwrap();
    let paths: Vec<&str> = report.layers.iter().map(|l| l.0.as_str()).collect();
    assert_eq!(
        paths,
        [
            "model.layers.0.self_attn.q_proj",
            "model.layers.0.self_attn.v_proj",
            "model.layers.1.self_attn.q_proj",
            "model.layers.1.self_attn.v_proj",
        ]
    );
    // LoRA starts at ΔW = 0.
    let after = m.forward(&ids(), None, false).unwrap();
    assert!(max_diff(&before, &after) < 1e-5);
    // all-linear: the seven projections of each layer, never lm_head.
    let mut m = load_folder(&dir.0, &candle_core::Device::Cpu).unwrap();
    cfg.targets = Targets::Pattern("all-linear".into());
    let report = attach_adapters(&mut m, &cfg).unwrap();
    assert_eq!(report.layers.len(), 14);
    assert!(report.layers.iter().all(|l| l.0 != "lm_head"));
}

#[test]
fn sharded_f16_checkpoint_loads() {
    let dir = TempDir::new("shard");
    let v = tiny_llama("llama", false);
    let (_, w) = write_model(&dir.0, &v, 10);
    std::fs::remove_file(dir.0.join("model.safetensors")).unwrap();
    let half: HashMap<String, Tensor> = w
        .iter()
        .map(|(k, t)| (k.clone(), t.to_dtype(DType::F16).unwrap()))
        .collect();
    let (mut a, mut b) = (HashMap::new(), HashMap::new());
    let mut map = serde_json::Map::new();
    for (k, t) in &half {
        let file = if k.contains("layers.1") {
            "model-00002-of-00002.safetensors"
        } else {
            "model-00001-of-00002.safetensors"
        };
        map.insert(k.clone(), json!(file));
        if k.contains("layers.1") {
            &mut b
        } else {
            &mut a
        }
        .insert(k.clone(), t.clone());
    }
    candle_core::safetensors::save(&a, dir.0.join("model-00001-of-00002.safetensors")).unwrap();
    candle_core::safetensors::save(&b, dir.0.join("model-00002-of-00002.safetensors")).unwrap();
    let index = json!({"metadata": {}, "weight_map": map});
    std::fs::write(
        dir.0.join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let m = load_folder(&dir.0, &candle_core::Device::Cpu).unwrap();
    let got = m.forward(&ids(), None, false).unwrap();
    let rounded: HashMap<String, Tensor> = half
        .iter()
        .map(|(k, t)| (k.clone(), t.to_dtype(DType::F32).unwrap()))
        .collect();
    let want = llama_reference(&v, &rounded, &ids());
    assert!(max_diff(&got, &want) < TOL);
    // A shard the index names but the folder lacks.
    std::fs::remove_file(dir.0.join("model-00002-of-00002.safetensors")).unwrap();
    let e = load_folder(&dir.0, &candle_core::Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("model-00002-of-00002.safetensors"), "{e}");
}

#[test]
fn missing_and_misshapen_tensors_are_named() {
    let dir = TempDir::new("missing");
    let v = tiny_llama("llama", false);
    let (_, mut w) = write_model(&dir.0, &v, 11);
    w.remove("model.layers.1.mlp.up_proj.weight");
    candle_core::safetensors::save(&w, dir.0.join("model.safetensors")).unwrap();
    let e = load_folder(&dir.0, &candle_core::Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model.layers.1.mlp.up_proj.weight") && e.contains("missing"),
        "{e}"
    );
    w.insert(
        "model.layers.1.mlp.up_proj.weight".into(),
        randn(&[48, 31], 1.0, 0),
    );
    candle_core::safetensors::save(&w, dir.0.join("model.safetensors")).unwrap();
    let e = load_folder(&dir.0, &candle_core::Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("[48, 31]") && e.contains("[48, 32]"), "{e}");
    std::fs::remove_file(dir.0.join("model.safetensors")).unwrap();
    let e = load_folder(&dir.0, &candle_core::Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn bad_config_fields_are_named() {
    let cases: Vec<(&str, Value, &str)> = vec![
        ("model_type", json!("gpt2"), "gpt2"),
        ("hidden_size", Value::Null, "missing"),
        ("hidden_size", json!(-3), "non-negative integer"),
        ("num_key_value_heads", json!(3), "must divide"),
        ("num_attention_heads", json!(6), "must divide hidden_size"),
        ("head_dim", json!(7), "even"),
        ("vocab_size", json!(0), "between 1"),
        ("intermediate_size", json!("big"), "non-negative integer"),
        ("rms_norm_eps", json!(0.0), "(0, 1)"),
        ("rope_theta", json!(-1.0), "must be in"),
        ("hidden_act", json!("gelu"), "silu"),
        ("tie_word_embeddings", json!("yes"), "true or false"),
        ("attention_bias", json!(1), "true or false"),
        ("eos_token_id", json!("</s>"), "token id"),
        ("rope_scaling", json!(4), "object"),
        (
            "rope_scaling.rope_type",
            json!({"rope_type": "yarn", "factor": 2.0}),
            "llama3",
        ),
        (
            "rope_scaling.factor",
            json!({"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8}),
            "missing",
        ),
        (
            "rope_scaling.high_freq_factor",
            json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0, "original_max_position_embeddings": 8}),
            "greater than",
        ),
        (
            "rope_scaling.original_max_position_embeddings",
            json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}),
            "missing",
        ),
    ];
    for (field, value, expect) in cases {
        let mut v = tiny_llama("llama", false);
        let key = field.split('.').next().unwrap();
        if value.is_null() {
            v.as_object_mut().unwrap().remove(key);
        } else {
            v[key] = value;
        }
        let e = LlamaConfig::from_json(&v, "m/config.json")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("m/config.json") && e.contains(&format!("`{field}`")) && e.contains(expect),
            "{field}: {e}"
        );
    }
    // A file that is not JSON names the file.
    let dir = TempDir::new("badjson");
    let p = dir.write("config.json", b"{not json");
    let e = LlamaConfig::from_file(&p).unwrap_err().to_string();
    assert!(e.contains("config.json") && e.contains("JSON"), "{e}");
}

#[test]
fn defaults_follow_hugging_face() {
    let v = json!({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 10,
        "eos_token_id": [2, 7], "bos_token_id": 1});
    let c = LlamaConfig::from_json(&v, "c").unwrap();
    assert_eq!(c.num_key_value_heads, 4);
    assert_eq!(c.head_dim, 16);
    assert_eq!(c.rope_theta, 10_000.0);
    assert!(!c.tie_word_embeddings && !c.qkv_bias && c.rope_scaling.is_none());
    assert_eq!(c.eos_token_ids, [2, 7]);
    assert_eq!(c.bos_token_id, Some(1));
    let inv = c.inv_freq();
    assert_eq!(inv.len(), 8);
    assert!((inv[1] - 10_000f64.powf(-2.0 / 16.0)).abs() < 1e-12);
}

#[test]
fn parameter_counts_match_the_published_ones() {
    // SmolLM2-135M (tied) and LLaMA-2-7B (untied), from their config.json.
    let smol = json!({"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "vocab_size": 49152, "tie_word_embeddings": true, "rope_theta": 100000.0});
    let c = LlamaConfig::from_json(&smol, "smollm2").unwrap();
    assert_eq!(c.parameter_count(), 134_515_008);
    let llama2 = json!({"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
        "num_hidden_layers": 32, "num_attention_heads": 32, "vocab_size": 32000});
    let c = LlamaConfig::from_json(&llama2, "llama-2-7b").unwrap();
    assert_eq!(c.parameter_count(), 6_738_415_616);
    // The loaded model counts the same, biases included (qwen2, untied).
    let dir = TempDir::new("count");
    let (cfg, w) = write_model(&dir.0, &tiny_llama("qwen2", false), 12);
    let m = load_folder(&dir.0, &candle_core::Device::Cpu).unwrap();
    let stored: usize = w.values().map(Tensor::elem_count).sum();
    assert_eq!(m.parameter_count(), stored);
    assert_eq!(cfg.parameter_count(), stored);
}

#[test]
fn lm_loss_through_the_fused_head_equals_logits_then_cross_entropy() {
    use peft_studio::peft::linear::trainable_vars;
    use peft_studio::train::lm_batches::{LmExample, lm_batch, lm_loss, trained_logits};
    let dir = TempDir::new("lmloss");
    write_model(&dir.0, &tiny_llama("llama", true), 13);
    let mut m = load_folder(&dir.0, &candle_core::Device::Cpu).unwrap();
    let mut cfg = AdapterConfig::new(Method::Lora, 4);
    cfg.targets = Targets::List(vec!["q_proj".into(), "v_proj".into()]);
    attach_adapters(&mut m, &cfg).unwrap();
    // Uneven lengths: padded keys, and a prompt that is not trained.
    let a = LmExample {
        ids: vec![3, 17, 42, 0, 8, 49, 21],
        loss_mask: vec![false, false, true, true, true, true, true],
    };
    let b = LmExample {
        ids: vec![1, 30, 12, 5],
        loss_mask: vec![true; 4],
    };
    let batch = lm_batch(&[&a, &b], 0, &Device::Cpu).unwrap().unwrap();
    let fused = lm_loss(&m, &batch, true).unwrap();
    let logits = trained_logits(&m, &batch, true).unwrap();
    let plain = candle_nn::loss::cross_entropy(&logits, &batch.targets).unwrap();
    assert!(max_diff(&fused, &plain) < 1e-5);
    let (ga, gb) = (fused.backward().unwrap(), plain.backward().unwrap());
    let vars = trainable_vars(&m);
    assert!(!vars.is_empty());
    let mut largest = 0f32;
    for (name, v) in &vars {
        let (x, y) = (ga.get(v).unwrap(), gb.get(v).unwrap());
        assert!(max_diff(x, y) < 1e-5, "{name}: {}", max_diff(x, y));
        largest = largest.max(max_abs(y));
    }
    assert!(largest > 1e-4, "gradients too small to compare");
}

//! GGUF loading: tiny random models written as llama.cpp writes them (q/k rows permuted,
//! F32/F16/Q8_0/Q4_0/Q4_1 tensors) load to the same logits as the same weights from a
//! safetensors folder; errors name the key or tensor; the GGUF tokenizer; generation with the
//! KV cache (greedy against the full forward, top-k 1, seeds, stop tokens); and, when
//! downloaded, SmolLM2-135M-Instruct's GGUF against its f32 Hugging Face folder.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value as G};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use common::{TempDir, ids, max_diff, random_weights};
use peft_studio::models::llama::generate::{Sampler, full_logits};
use peft_studio::models::llama::gguf::{load_gguf, load_gguf_packed};
use peft_studio::models::llama::{
    GenerateOptions, LlamaConfig, LlmTokenizer, Sampling, StopReason, generate_text,
    generate_tokens, load_folder, load_language_model,
};
use serde_json::{Value, json};

/// A tiny config: hidden 32, 2 layers, 4 heads, 2 KV heads (head size 8), vocab 50.
fn tiny(model_type: &str, tied: bool) -> Value {
    json!({
        "model_type": model_type,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 50,
        "max_position_embeddings": 64,
        // A power of two: GGUF stores it as f32.
        "rms_norm_eps": 1.52587890625e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": tied,
        "bos_token_id": 1,
        "eos_token_id": 2,
    })
}

/// llama.cpp's `permute` (convert_hf_to_gguf.py), written out index by index: within each
/// head of size d, Hugging Face row `j·d/2 + i` is stored as row `2i + j`.
fn llama_cpp_permute(t: &Tensor, heads: usize) -> Tensor {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    let d = rows / heads;
    let mut order = vec![0u32; rows];
    for h in 0..heads {
        for i in 0..d / 2 {
            for j in 0..2 {
                order[h * d + 2 * i + j] = (h * d + j * (d / 2) + i) as u32;
            }
        }
    }
    let idx = Tensor::new(order, &Device::Cpu).unwrap();
    t.index_select(&idx, 0).unwrap()
}

/// The inverse of [`llama_cpp_permute`].
fn llama_cpp_unpermute(t: &Tensor, heads: usize) -> Tensor {
    let rows = t.dims()[0];
    let d = rows / heads;
    let mut order = vec![0u32; rows];
    for h in 0..heads {
        for i in 0..d / 2 {
            for j in 0..2 {
                order[h * d + j * (d / 2) + i] = (h * d + 2 * i + j) as u32;
            }
        }
    }
    let idx = Tensor::new(order, &Device::Cpu).unwrap();
    t.index_select(&idx, 0).unwrap()
}

/// GGUF name and storage type of each Hugging Face tensor: a mix of every type the loader
/// is promised to read.
fn gguf_name(hf: &str) -> (String, GgmlDType) {
    let map = [
        ("self_attn.q_proj", "attn_q", GgmlDType::Q8_0),
        ("self_attn.k_proj", "attn_k", GgmlDType::Q4_0),
        ("self_attn.v_proj", "attn_v", GgmlDType::F16),
        ("self_attn.o_proj", "attn_output", GgmlDType::Q4_1),
        ("mlp.gate_proj", "ffn_gate", GgmlDType::Q8_0),
        ("mlp.up_proj", "ffn_up", GgmlDType::F32),
        ("mlp.down_proj", "ffn_down", GgmlDType::Q4_1),
        ("input_layernorm", "attn_norm", GgmlDType::F32),
        ("post_attention_layernorm", "ffn_norm", GgmlDType::F32),
    ];
    match hf {
        "model.embed_tokens.weight" => ("token_embd.weight".into(), GgmlDType::Q8_0),
        "model.norm.weight" => ("output_norm.weight".into(), GgmlDType::F32),
        "lm_head.weight" => ("output.weight".into(), GgmlDType::F16),
        _ => {
            let rest = hf.strip_prefix("model.layers.").unwrap();
            let (layer, rest) = rest.split_once('.').unwrap();
            for (h, g, ty) in map {
                if let Some(suffix) = rest.strip_prefix(h) {
                    // Biases stay f32, as llama.cpp writes them.
                    let ty = if suffix == ".bias" {
                        GgmlDType::F32
                    } else {
                        ty
                    };
                    return (format!("blk.{layer}.{g}{suffix}"), ty);
                }
            }
            panic!("no GGUF name for {hf}")
        }
    }
}

/// The metadata llama.cpp writes for `c` (no tokenizer).
fn metadata(arch: &str, c: &LlamaConfig) -> Vec<(String, G)> {
    let k = |s: &str| format!("{arch}.{s}");
    vec![
        ("general.architecture".into(), G::String(arch.into())),
        (k("block_count"), G::U32(c.num_hidden_layers as u32)),
        (
            k("context_length"),
            G::U32(c.max_position_embeddings as u32),
        ),
        (k("embedding_length"), G::U32(c.hidden_size as u32)),
        (k("feed_forward_length"), G::U32(c.intermediate_size as u32)),
        (
            k("attention.head_count"),
            G::U32(c.num_attention_heads as u32),
        ),
        (
            k("attention.head_count_kv"),
            G::U32(c.num_key_value_heads as u32),
        ),
        (k("rope.freq_base"), G::F32(c.rope_theta as f32)),
        (
            k("attention.layer_norm_rms_epsilon"),
            G::F32(c.rms_norm_eps as f32),
        ),
        (k("rope.dimension_count"), G::U32(c.head_dim as u32)),
        ("tokenizer.ggml.bos_token_id".into(), G::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), G::U32(2)),
    ]
}

fn write_gguf(path: &Path, meta: &[(String, G)], tensors: &[(String, QTensor)]) {
    let mut f = std::fs::File::create(path).unwrap();
    let m: Vec<(&str, &G)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut f, &m, &t).unwrap();
}

/// The tensors of a GGUF of `w` (q/k permuted for llama), and the weights they hold back in
/// Hugging Face order (quantization error included) for the reference folder.
fn to_gguf(
    c: &LlamaConfig,
    arch: &str,
    w: &HashMap<String, Tensor>,
) -> (Vec<(String, QTensor)>, HashMap<String, Tensor>) {
    let mut names: Vec<&String> = w.keys().collect();
    names.sort();
    let mut tensors = Vec::new();
    let mut reference = HashMap::new();
    for hf in names {
        let (g, ty) = gguf_name(hf);
        let heads = if hf.contains(".q_proj.") {
            Some(c.num_attention_heads)
        } else if hf.contains(".k_proj.") {
            Some(c.num_key_value_heads)
        } else {
            None
        };
        let heads = heads.filter(|_| arch == "llama");
        let stored = match heads {
            Some(h) => llama_cpp_permute(&w[hf], h),
            None => w[hf].clone(),
        };
        let q = QTensor::quantize(&stored, ty).unwrap();
        let back = q.dequantize(&Device::Cpu).unwrap();
        let back = match heads {
            Some(h) => llama_cpp_unpermute(&back, h),
            None => back,
        };
        reference.insert(hf.clone(), back);
        tensors.push((g, q));
    }
    (tensors, reference)
}

/// Writes a tiny model both as `model.gguf` and as a safetensors folder `ref/` holding the
/// same (dequantized) weights; returns the GGUF's path.
fn tiny_pair(dir: &TempDir, v: &Value, arch: &str, seed: u64) -> (PathBuf, PathBuf) {
    let c = LlamaConfig::from_json(v, "config.json").unwrap();
    let w = random_weights(&c, seed);
    let (tensors, reference) = to_gguf(&c, arch, &w);
    let gguf = dir.path("model.gguf");
    write_gguf(&gguf, &metadata(arch, &c), &tensors);
    let folder = dir.path("ref/x").parent().unwrap().to_path_buf();
    std::fs::write(folder.join("config.json"), v.to_string()).unwrap();
    candle_core::safetensors::save(&reference, folder.join("model.safetensors")).unwrap();
    (gguf, folder)
}

fn assert_same_logits(v: &Value, arch: &str, seed: u64) {
    let dir = TempDir::new(arch);
    let (gguf, folder) = tiny_pair(&dir, v, arch, seed);
    let from_gguf = load_gguf(&gguf, &candle_core::Device::Cpu).unwrap();
    let from_folder = load_folder(&folder, &candle_core::Device::Cpu).unwrap();
    assert_eq!(from_gguf.config(), from_folder.config());
    let a = from_gguf.forward(&ids(), None, false).unwrap();
    let b = from_folder.forward(&ids(), None, false).unwrap();
    let d = max_diff(&a, &b);
    assert!(d < 1e-4, "{arch}: GGUF vs folder logits differ by {d}");
    // Kept packed as stored (QLoRA's base), the same logits.
    let packed = load_gguf_packed(&gguf, &candle_core::Device::Cpu).unwrap();
    let c = packed.forward(&ids(), None, false).unwrap();
    let d = max_diff(&c, &b);
    assert!(
        d < 1e-4,
        "{arch}: packed GGUF vs folder logits differ by {d}"
    );
    assert!(
        max_diff(&a, &a.zeros_like().unwrap()) > 1e-2,
        "logits are all zero"
    );
}

#[test]
fn llama_gguf_equals_the_folder_untied() {
    assert_same_logits(&tiny("llama", false), "llama", 10);
}

#[test]
fn llama_gguf_equals_the_folder_tied() {
    assert_same_logits(&tiny("llama", true), "llama", 20);
}

#[test]
fn qwen2_gguf_with_biases_equals_the_folder() {
    assert_same_logits(&tiny("qwen2", true), "qwen2", 30);
}

#[test]
fn without_unpermuting_the_logits_would_differ() {
    // Guards the test above: a GGUF whose q/k rows are stored unpermuted (as if the loader
    // skipped the step) must not match.
    let dir = TempDir::new("noperm");
    let v = tiny("llama", true);
    let c = LlamaConfig::from_json(&v, "config.json").unwrap();
    let w = random_weights(&c, 40);
    let (tensors, reference) = to_gguf(&c, "qwen2", &w); // qwen2: nothing permuted
    let gguf = dir.path("model.gguf");
    write_gguf(&gguf, &metadata("llama", &c), &tensors);
    let folder = dir.path("ref/x").parent().unwrap().to_path_buf();
    std::fs::write(folder.join("config.json"), v.to_string()).unwrap();
    candle_core::safetensors::save(&reference, folder.join("model.safetensors")).unwrap();
    let a = load_gguf(&gguf, &candle_core::Device::Cpu)
        .unwrap()
        .forward(&ids(), None, false)
        .unwrap();
    let b = load_folder(&folder, &candle_core::Device::Cpu)
        .unwrap()
        .forward(&ids(), None, false)
        .unwrap();
    assert!(max_diff(&a, &b) > 1e-3);
}

/// A tiny GGUF with metadata `meta` changed by `edit` and tensors filtered by `keep`.
fn broken_gguf(
    dir: &TempDir,
    edit: impl Fn(&mut Vec<(String, G)>),
    keep: impl Fn(&str) -> bool,
) -> PathBuf {
    let v = tiny("llama", true);
    let c = LlamaConfig::from_json(&v, "config.json").unwrap();
    let (tensors, _) = to_gguf(&c, "llama", &random_weights(&c, 50));
    let tensors: Vec<_> = tensors.into_iter().filter(|(n, _)| keep(n)).collect();
    let mut meta = metadata("llama", &c);
    edit(&mut meta);
    let p = dir.path("broken.gguf");
    write_gguf(&p, &meta, &tensors);
    p
}

fn load_err(p: &Path) -> String {
    load_gguf(p, &candle_core::Device::Cpu)
        .map(|_| ())
        .unwrap_err()
        .to_string()
}

#[test]
fn a_missing_tensor_is_named_with_the_file() {
    let dir = TempDir::new("missing");
    let p = broken_gguf(&dir, |_| {}, |n| n != "blk.1.ffn_up.weight");
    let e = load_err(&p);
    assert!(e.contains("`blk.1.ffn_up.weight` is missing"), "{e}");
    assert!(e.contains("broken.gguf"), "{e}");
}

#[test]
fn bad_metadata_names_the_key() {
    let dir = TempDir::new("meta");
    let drop_key = |key: &'static str| move |m: &mut Vec<(String, G)>| m.retain(|(k, _)| k != key);
    let p = broken_gguf(&dir, drop_key("llama.block_count"), |_| true);
    let e = load_err(&p);
    assert!(e.contains("`llama.block_count` is missing"), "{e}");

    let set = |key: &'static str, v: G| {
        move |m: &mut Vec<(String, G)>| {
            for (k, x) in m.iter_mut() {
                if k == key {
                    *x = v.clone();
                }
            }
        }
    };
    let p = broken_gguf(
        &dir,
        set("llama.attention.head_count_kv", G::U32(3)),
        |_| true,
    );
    let e = load_err(&p);
    assert!(e.contains("llama.attention.head_count_kv"), "{e}");
    assert!(e.contains("must divide"), "{e}");

    let p = broken_gguf(
        &dir,
        set("llama.embedding_length", G::String("x".into())),
        |_| true,
    );
    let e = load_err(&p);
    assert!(
        e.contains("`llama.embedding_length` must be a non-negative integer"),
        "{e}"
    );

    let p = broken_gguf(
        &dir,
        set("general.architecture", G::String("gpt9".into())),
        |_| true,
    );
    let e = load_err(&p);
    assert!(
        e.contains("general.architecture") && e.contains("gpt9"),
        "{e}"
    );

    let p = broken_gguf(&dir, |_| {}, |n| n != "token_embd.weight");
    let e = load_err(&p);
    assert!(e.contains("token_embd.weight"), "{e}");

    let not_gguf = dir.write("plain.gguf", b"this is not a gguf file at all");
    let e = load_err(&not_gguf);
    assert!(
        e.contains("plain.gguf") && e.contains("not a readable GGUF"),
        "{e}"
    );
}

/// GPT-2's byte → printable character map (byte-level BPE's alphabet).
fn byte_char(b: u8) -> char {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    if printable(b) {
        return b as char;
    }
    let rank = (0..b).filter(|x| !printable(*x)).count() as u32;
    char::from_u32(256 + rank).unwrap()
}

/// A GGUF holding only a byte-level BPE tokenizer: 256 byte tokens, merges for "he", "hel",
/// "hell", "hello", " hello" ("Ġhello"), and `<|im_start|>` / `<|im_end|>` control tokens.
fn tokenizer_gguf(dir: &TempDir, model: &str) -> PathBuf {
    tokenizer_gguf_pre(dir, model, "smollm")
}

fn tokenizer_gguf_pre(dir: &TempDir, model: &str, pre: &str) -> PathBuf {
    let mut tokens: Vec<String> = vec!["<|im_start|>".into(), "<|im_end|>".into()];
    tokens.extend((0..=255u8).map(|b| byte_char(b).to_string()));
    let merges = ["h e", "he l", "hel l", "hell o", "Ġ hello"];
    for m in merges {
        tokens.push(m.replace(' ', ""));
    }
    let mut types = vec![3i32, 3];
    types.resize(tokens.len(), 1);
    let s = |x: &str| G::String(x.into());
    let meta: Vec<(String, G)> = vec![
        ("general.architecture".into(), s("llama")),
        ("tokenizer.ggml.model".into(), s(model)),
        ("tokenizer.ggml.pre".into(), s(pre)),
        (
            "tokenizer.ggml.tokens".into(),
            G::Array(tokens.iter().map(|t| s(t)).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            G::Array(types.into_iter().map(G::I32).collect()),
        ),
        (
            "tokenizer.ggml.merges".into(),
            G::Array(merges.iter().map(|m| s(m)).collect()),
        ),
        ("tokenizer.ggml.bos_token_id".into(), G::U32(0)),
        ("tokenizer.ggml.eos_token_id".into(), G::U32(1)),
        ("tokenizer.chat_template".into(), s("{{ messages }}")),
    ];
    let p = dir.path(&format!("tok-{model}-{pre}.gguf"));
    write_gguf(&p, &meta, &[]);
    p
}

#[test]
fn the_gguf_tokenizer_is_byte_level_bpe_with_special_tokens() {
    use peft_studio::models::llama::gguf::GgufFile;
    let dir = TempDir::new("tok");
    let p = tokenizer_gguf(&dir, "gpt2");
    let tok = LlmTokenizer::from_gguf(&GgufFile::open(&p).unwrap()).unwrap();
    let id = |t: &str| tok.tokenizer.token_to_id(t).unwrap();
    let ids = tok
        .encode("<|im_start|>hello hello1<|im_end|>", false)
        .unwrap();
    assert_eq!(
        ids,
        vec![0, id("hello"), id("Ġhello"), id("1"), 1],
        "{:?}",
        tok.tokenizer.decode(&ids, false)
    );
    assert_eq!(tok.decode(&ids).unwrap(), "hello hello1");
    // Multi-byte characters round-trip through their bytes.
    let text = "é → 日本 🎉";
    assert_eq!(tok.decode(&tok.encode(text, false).unwrap()).unwrap(), text);
    assert_eq!(tok.bos, Some(0));
    assert_eq!(tok.eos, Some(1));
    assert_eq!(tok.stop_ids, vec![1]);
    assert_eq!(tok.chat_template.as_deref(), Some("{{ messages }}"));
    assert_eq!(tok.eos_token().as_deref(), Some("<|im_end|>"));
}

#[test]
fn every_supported_pre_tokenizer_builds() {
    use peft_studio::models::llama::gguf::GgufFile;
    let dir = TempDir::new("tok-pre");
    for pre in [
        "default",
        "gpt2",
        "smollm",
        "starcoder",
        "llama-bpe",
        "qwen2",
    ] {
        let p = tokenizer_gguf_pre(&dir, "gpt2", pre);
        let tok = LlmTokenizer::from_gguf(&GgufFile::open(&p).unwrap()).unwrap();
        let ids = tok
            .encode("<|im_start|>hello hello, it's 2024\n\n", false)
            .unwrap();
        assert_eq!(
            ids[..3],
            [
                0,
                tok.tokenizer.token_to_id("hello").unwrap(),
                tok.tokenizer.token_to_id("Ġhello").unwrap()
            ],
            "{pre}"
        );
        assert_eq!(
            tok.decode(&ids).unwrap(),
            "hello hello, it's 2024\n\n",
            "{pre}"
        );
    }
    let p = tokenizer_gguf_pre(&dir, "gpt2", "deepseek-coder");
    let e = LlmTokenizer::from_gguf(&GgufFile::open(&p).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("`tokenizer.ggml.pre` is `deepseek-coder`"),
        "{e}"
    );
}

#[test]
fn a_sentencepiece_gguf_tokenizer_is_refused_by_name() {
    use peft_studio::models::llama::gguf::GgufFile;
    let dir = TempDir::new("tok-sp");
    let p = tokenizer_gguf(&dir, "llama");
    let e = LlmTokenizer::from_gguf(&GgufFile::open(&p).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("`tokenizer.ggml.model` is `llama` (SentencePiece)"),
        "{e}"
    );
}

#[test]
fn text_streams_whole_characters_only() {
    use peft_studio::models::llama::generate::TextStream;
    use peft_studio::models::llama::gguf::GgufFile;
    let dir = TempDir::new("stream");
    let tok =
        LlmTokenizer::from_gguf(&GgufFile::open(&tokenizer_gguf(&dir, "gpt2")).unwrap()).unwrap();
    let ids = tok.encode("hello é🎉", false).unwrap();
    let mut s = TextStream::new();
    let mut pieces = Vec::new();
    for &id in &ids {
        if let Some(p) = s.push(&tok, id).unwrap() {
            pieces.push(p);
        }
    }
    assert!(s.finish(&tok).unwrap().is_none());
    // "é" is two byte tokens and "🎉" four: each comes out whole, once complete.
    assert_eq!(pieces, vec!["hello", " ", "é", "🎉"]);
    // An unfinished character is only given out by `finish`.
    let mut s = TextStream::new();
    assert_eq!(s.push(&tok, ids[ids.len() - 1]).unwrap(), None);
    assert_eq!(s.finish(&tok).unwrap().as_deref(), Some("\u{FFFD}"));
}

#[test]
fn transformers_5_rope_parameters_are_read() {
    let mut v = tiny("llama", true);
    v.as_object_mut().unwrap().remove("rope_theta");
    v["rope_parameters"] = json!({"rope_theta": 100000.0, "rope_type": "default"});
    let c = LlamaConfig::from_json(&v, "config.json").unwrap();
    assert_eq!(c.rope_theta, 100_000.0);
    assert_eq!(c.rope_scaling, None);
    v["rope_parameters"] = json!({"rope_theta": -1.0, "rope_type": "default"});
    let e = LlamaConfig::from_json(&v, "config.json")
        .unwrap_err()
        .to_string();
    assert!(e.contains("rope_parameters.rope_theta"), "{e}");
}

// --- generation on a tiny model -------------------------------------------------------------

fn tiny_model() -> peft_studio::models::llama::LlamaModel {
    let dir = TempDir::new("gen");
    let (gguf, _) = tiny_pair(&dir, &tiny("llama", false), "llama", 60);
    load_gguf(&gguf, &candle_core::Device::Cpu).unwrap()
}

fn greedy(n: usize) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: n,
        ..GenerateOptions::default()
    }
}

const PROMPT: [u32; 4] = [5, 11, 23, 7];

#[test]
fn greedy_with_the_cache_follows_the_full_forward() {
    let m = tiny_model();
    let out = generate_tokens(&m, &PROMPT, &greedy(12), &mut |_| true).unwrap();
    assert_eq!(out.tokens.len(), 12);
    assert_eq!(out.stop, StopReason::MaxTokens);
    assert_eq!(out.timings.new_tokens, 12);
    assert_eq!(out.timings.prompt_tokens, 4);
    let mut seq = PROMPT.to_vec();
    for &next in &out.tokens {
        let logits = full_logits(&m, &seq).unwrap();
        let last = logits.last().unwrap();
        let best = last.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        // The cached pick is the full forward's argmax (up to float noise between the paths).
        assert!(
            best - last[next as usize] < 1e-4,
            "after {seq:?}: picked {next} ({}), best {best}",
            last[next as usize]
        );
        seq.push(next);
    }
}

#[test]
fn top_k_one_is_greedy_and_seeds_reproduce() {
    let m = tiny_model();
    let run = |s: Sampling| {
        let opts = GenerateOptions {
            max_new_tokens: 16,
            sampling: s,
            stop_ids: vec![],
        };
        generate_tokens(&m, &PROMPT, &opts, &mut |_| true)
            .unwrap()
            .tokens
    };
    let g = run(Sampling::default());
    let top1 = run(Sampling {
        temperature: 1.0,
        top_k: Some(1),
        top_p: None,
        seed: 7,
    });
    assert_eq!(g, top1);
    let hot = |seed| Sampling {
        temperature: 1.5,
        top_k: Some(40),
        top_p: Some(0.95),
        seed,
    };
    let a = run(hot(1));
    assert_eq!(a, run(hot(1)));
    assert_ne!(a, run(hot(2)), "two seeds gave the same 16 sampled tokens");
    assert_ne!(a, g, "sampling at temperature 1.5 gave the greedy text");
}

#[test]
fn generation_stops_at_a_stop_token_and_leaves_it_out() {
    let m = tiny_model();
    let g = generate_tokens(&m, &PROMPT, &greedy(12), &mut |_| true)
        .unwrap()
        .tokens;
    // The first token not seen before position 3: generation must end right there.
    let k = (3..g.len()).find(|&i| !g[..i].contains(&g[i])).unwrap();
    let opts = GenerateOptions {
        stop_ids: vec![g[k]],
        ..greedy(12)
    };
    let mut seen = Vec::new();
    let out = generate_tokens(&m, &PROMPT, &opts, &mut |t| {
        seen.push(t);
        true
    })
    .unwrap();
    assert_eq!(out.stop, StopReason::StopToken(g[k]));
    assert_eq!(out.tokens, g[..k].to_vec());
    assert_eq!(seen, out.tokens);
    assert_eq!(out.timings.new_tokens, k + 1);
    // A callback returning false stops too.
    let mut n = 0;
    let out = generate_tokens(&m, &PROMPT, &greedy(12), &mut |_| {
        n += 1;
        n < 3
    })
    .unwrap();
    assert_eq!(out.stop, StopReason::Cancelled);
    assert_eq!(out.tokens, g[..3].to_vec());
}

#[test]
fn bad_options_are_named() {
    let m = tiny_model();
    let e = |o: GenerateOptions| {
        generate_tokens(&m, &PROMPT, &o, &mut |_| true)
            .unwrap_err()
            .to_string()
    };
    assert!(e(greedy(0)).contains("max_new_tokens"));
    let mut o = greedy(4);
    o.sampling.top_p = Some(1.5);
    assert!(e(o).contains("top_p must be in (0, 1], found 1.5"));
    let mut o = greedy(4);
    o.sampling.temperature = -1.0;
    assert!(e(o).contains("temperature"));
    let err = generate_tokens(&m, &[], &greedy(4), &mut |_| true).unwrap_err();
    assert!(err.to_string().contains("empty"));
    let long = vec![3u32; 64];
    let err = generate_tokens(&m, &long, &greedy(4), &mut |_| true).unwrap_err();
    assert!(err.to_string().contains("64 tokens"), "{err}");
}

#[test]
fn the_sampler_keeps_to_top_k_and_top_p() {
    let logits = [0.0f32, 3.0, 2.9, -1.0, 2.8];
    let mut s = Sampler::new(&Sampling {
        temperature: 1.0,
        top_k: Some(2),
        top_p: None,
        seed: 3,
    });
    let picks: Vec<u32> = (0..200).map(|_| s.sample(&logits)).collect();
    assert!(picks.iter().all(|&p| p == 1 || p == 2));
    assert!(picks.contains(&1) && picks.contains(&2));
    let mut s = Sampler::new(&Sampling {
        temperature: 1.0,
        top_k: None,
        top_p: Some(0.3),
        seed: 3,
    });
    assert!((0..50).all(|_| s.sample(&logits) == 1));
}

// --- SmolLM2-135M-Instruct (when downloaded) -------------------------------------------------

const PEER_FOLDER: &str = "/root/.cache/peft-peer/smollm2-135m-instruct-f32";

fn smollm2_files() -> Option<(PathBuf, PathBuf)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("downloads/smollm2-135m-instruct");
    let gguf = std::fs::read_dir(&dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "gguf"));
    let folder = PathBuf::from(PEER_FOLDER);
    match gguf {
        Some(g) if folder.join("model.safetensors").is_file() => Some((g, folder)),
        _ => {
            eprintln!(
                "skipped: needs downloads/smollm2-135m-instruct/*.gguf (scripts/fetch-models.sh) and {PEER_FOLDER} (shared/peer/setup.sh)"
            );
            None
        }
    }
}

#[test]
fn smollm2_gguf_equals_its_f32_folder() {
    let Some((gguf, folder)) = smollm2_files() else {
        return;
    };
    let a = load_language_model(&gguf, &candle_core::Device::Cpu).unwrap();
    let c = a.model.config();
    assert_eq!(
        (c.num_hidden_layers, c.hidden_size, c.num_attention_heads),
        (30, 576, 9)
    );
    assert_eq!(
        (c.num_key_value_heads, c.intermediate_size, c.vocab_size),
        (3, 1536, 49152)
    );
    assert_eq!(c.rope_theta, 100_000.0);
    assert!(c.tie_word_embeddings);
    assert_eq!(a.model.parameter_count(), 134_515_008);
    let b = load_language_model(&folder, &candle_core::Device::Cpu).unwrap();
    assert_eq!(a.model.config().rope_theta, b.model.config().rope_theta);

    let ids = a
        .tokenizer
        .encode("The capital of France is", false)
        .unwrap();
    let t = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let la = a.model.forward(&t, None, false).unwrap();
    let lb = b.model.forward(&t, None, false).unwrap();
    let d = max_diff(&la, &lb);
    eprintln!(
        "SmolLM2 GGUF vs f32 folder: max |logit diff| {d:.2e} over {} tokens",
        ids.len()
    );
    assert!(d < 1e-4, "SmolLM2 GGUF vs f32 folder logits differ by {d}");

    for s in [
        "<|im_start|>user\nHello<|im_end|>\n",
        "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n",
        "Héllo wörld, naïve café — 日本語 🎉 ∑ x²",
        "In 2024 there were 12345 cats, π ≈ 3.14159, call +1-555-0100.",
        "fn main() {\n    let x: Vec<u32> = (0..10).collect();\n\tprintln!(\"{x:?}\");\n}\n",
        "  leading spaces,\n\n\nnewlines   and trailing ",
    ] {
        let ga = a.tokenizer.encode(s, false).unwrap();
        let gb = b.tokenizer.encode(s, false).unwrap();
        assert_eq!(ga, gb, "token ids differ for {s:?}");
        assert_eq!(
            a.tokenizer.decode(&ga).unwrap(),
            b.tokenizer.decode(&gb).unwrap()
        );
    }
    assert_eq!(
        a.tokenizer
            .encode("<|im_start|>user\nHello<|im_end|>\n", false)
            .unwrap(),
        vec![1, 4093, 198, 19556, 2, 198]
    );
    assert_eq!((a.tokenizer.bos, a.tokenizer.eos), (Some(1), Some(2)));
    assert_eq!((b.tokenizer.bos, b.tokenizer.eos), (Some(1), Some(2)));
    assert!(a.tokenizer.is_stop(2) && b.tokenizer.is_stop(2));
    assert_eq!(
        a.tokenizer.chat_template.as_deref().map(str::trim),
        b.tokenizer.chat_template.as_deref().map(str::trim)
    );
}

#[test]
fn smollm2_streams_whole_characters_and_stops_at_im_end() {
    let Some((gguf, _)) = smollm2_files() else {
        return;
    };
    let lm = load_language_model(&gguf, &candle_core::Device::Cpu).unwrap();
    let tok = &lm.tokenizer;
    let template = peft_studio::train::causal_lm::chat_template(tok, &gguf)
        .unwrap()
        .expect("SmolLM2 has a chat template");
    let prompt = template
        .render(
            &[peft_studio::data::Message::new(
                "user",
                "What is the capital of France?",
            )],
            true,
        )
        .unwrap();
    let ids = tok.encode(&prompt, false).unwrap();
    let opts = GenerateOptions {
        max_new_tokens: 24,
        stop_ids: tok.stop_ids.clone(),
        ..GenerateOptions::default()
    };
    let mut pieces = String::new();
    let g = generate_text(&lm.model, tok, &ids, &opts, &mut |p| {
        assert!(!p.contains('\u{FFFD}'), "a piece split a character: {p:?}");
        pieces.push_str(p);
        true
    })
    .unwrap();
    assert_eq!(pieces, g.text);
    assert!(g.text.contains("Paris"), "{:?}", g.text);
    assert_eq!(g.stop, StopReason::StopToken(2), "{:?}", g.text);
    // A raw prompt in several scripts: the streamed pieces still add up to the text.
    let ids = tok
        .encode("Translate to Japanese and French: good morning →", true)
        .unwrap();
    let mut pieces = String::new();
    let g = generate_text(&lm.model, tok, &ids, &greedy(24), &mut |p| {
        pieces.push_str(p);
        true
    })
    .unwrap();
    assert_eq!(pieces, g.text);
}

#[test]
fn llama3_rope_scaling_is_read_from_rope_freqs() {
    let mut v = tiny("llama", true);
    v["rope_theta"] = json!(500000.0);
    v["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
    let c = LlamaConfig::from_json(&v, "config.json").unwrap();
    let scaled = c.inv_freq();
    let mut plain = c.clone();
    plain.rope_scaling = None;
    // llama.cpp's converter stores base / scaled frequency per pair of dimensions.
    let factors: Vec<f32> = plain
        .inv_freq()
        .iter()
        .zip(&scaled)
        .map(|(b, s)| (b / s) as f32)
        .collect();
    assert!(factors.iter().any(|f| *f > 7.9) && factors.iter().any(|f| *f > 1.01 && *f < 7.9));
    let w = random_weights(&c, 70);
    let (mut tensors, reference) = to_gguf(&c, "llama", &w);
    let freqs = Tensor::new(factors.as_slice(), &Device::Cpu).unwrap();
    tensors.push((
        "rope_freqs.weight".into(),
        QTensor::quantize(&freqs, GgmlDType::F32).unwrap(),
    ));
    let dir = TempDir::new("llama3");
    let gguf = dir.path("model.gguf");
    write_gguf(&gguf, &metadata("llama", &c), &tensors);
    let folder = dir.path("ref/x").parent().unwrap().to_path_buf();
    std::fs::write(folder.join("config.json"), v.to_string()).unwrap();
    candle_core::safetensors::save(&reference, folder.join("model.safetensors")).unwrap();
    let a = load_gguf(&gguf, &candle_core::Device::Cpu).unwrap();
    assert_eq!(a.config().rope_scaling, c.rope_scaling);
    let la = a.forward(&ids(), None, false).unwrap();
    let lb = load_folder(&folder, &candle_core::Device::Cpu)
        .unwrap()
        .forward(&ids(), None, false)
        .unwrap();
    assert!(max_diff(&la, &lb) < 1e-4);

    // Factors of another scheme are refused by name.
    let mut odd = factors.clone();
    odd[1] = 3.0;
    let (mut tensors, _) = to_gguf(&c, "llama", &w);
    let freqs = Tensor::new(odd.as_slice(), &Device::Cpu).unwrap();
    tensors.push((
        "rope_freqs.weight".into(),
        QTensor::quantize(&freqs, GgmlDType::F32).unwrap(),
    ));
    write_gguf(&gguf, &metadata("llama", &c), &tensors);
    let e = load_err(&gguf);
    assert!(e.contains("rope_freqs.weight"), "{e}");
}

/// QLoRA's base: a GGUF kept packed trains a LoRA exactly as the f32 model does (same loss,
/// same adapter gradients), holds far fewer bytes, and merging unpacks to the same outputs.
#[test]
fn a_packed_base_trains_lora_like_the_f32_base() {
    use peft_studio::peft::linear::{LinearLayers, attach_adapters, trainable_vars};
    use peft_studio::peft::{AdapterConfig, Method, Targets};
    let dir = TempDir::new("packed-lora");
    let (gguf, _) = tiny_pair(&dir, &tiny("llama", false), "llama", 40);
    let cfg = AdapterConfig {
        method: Method::Lora,
        rank: 4,
        targets: Targets::Pattern("all-linear".into()),
        ..AdapterConfig::default()
    };
    let mut dense = load_gguf(&gguf, &candle_core::Device::Cpu).unwrap();
    let mut packed = load_gguf_packed(&gguf, &candle_core::Device::Cpu).unwrap();
    attach_adapters(&mut dense, &cfg).unwrap();
    attach_adapters(&mut packed, &cfg).unwrap();
    // Every quantized or F16 weight stays packed under its adapter (F32 ones were never packed).
    let kinds: Vec<bool> = packed
        .linears()
        .iter()
        .filter(|l| l.adapter().is_some())
        .map(|l| l.packed_weight().is_some())
        .collect();
    assert_eq!(kinds.iter().filter(|k| **k).count(), 12, "{kinds:?}");
    let packed_bytes: usize = packed
        .linears()
        .iter()
        .filter_map(|l| l.packed_weight().map(|p| p.size_in_bytes()))
        .sum();
    let f32_bytes: usize = packed
        .linears()
        .iter()
        .filter(|l| l.packed_weight().is_some())
        .map(|l| l.shape().0 * l.shape().1 * 4)
        .sum();
    assert!(
        packed_bytes * 3 < f32_bytes,
        "{packed_bytes} vs {f32_bytes}"
    );

    // LoRA's B starts at zero: move it so that every gradient is non-zero.
    for m in [&dense, &packed] {
        for (i, (_, v)) in trainable_vars(m).into_iter().enumerate() {
            let t = common::randn(v.dims(), 0.1, 100 + i as u64);
            v.set(&t).unwrap();
        }
    }
    let loss = |m: &peft_studio::models::llama::LlamaModel| {
        m.forward(&ids(), None, true)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
    };
    let (ld, lp) = (loss(&dense), loss(&packed));
    let (a, b) = (
        ld.to_scalar::<f32>().unwrap(),
        lp.to_scalar::<f32>().unwrap(),
    );
    assert!((a - b).abs() < 1e-4 * a.abs().max(1.0), "loss {a} vs {b}");
    let (gd, gp) = (ld.backward().unwrap(), lp.backward().unwrap());
    for ((name, vd), (_, vp)) in trainable_vars(&dense)
        .iter()
        .zip(trainable_vars(&packed).iter())
    {
        let (x, y) = (gd.get(vd).unwrap(), gp.get(vp).unwrap());
        let d = max_diff(x, y);
        let scale = max_diff(x, &x.zeros_like().unwrap()).max(1e-6);
        assert!(
            d < 1e-3 * scale,
            "{name}: gradient differs by {d} (scale {scale})"
        );
    }

    // Merging unpacks the weight: the same outputs, then the same as the dense merge.
    let before = packed.forward(&ids(), None, false).unwrap();
    for l in packed.linears_mut() {
        l.merge().unwrap();
    }
    assert!(packed.linears().iter().all(|l| l.packed_weight().is_none()));
    let after = packed.forward(&ids(), None, false).unwrap();
    assert!(max_diff(&before, &after) < 1e-4);
}

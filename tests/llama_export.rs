//! Export of LLaMA-family models with adapters: PEFT folders read back with the same logits
//! (LoRA and SVFit), merged Hugging Face folders that load with the same logits, and
//! llama.cpp LoRA GGUF files read back (metadata, names, ggml shapes, and `lora_b·lora_a`
//! equal to llama.cpp's row permutation of the learned change). Plus the ignored
//! `interop_export`, which writes a PEFT adapter of a real model for `scripts/peft_interop.py`.

mod common;

use std::path::Path;

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use common::{TempDir, ids, max_diff, randn, tiny_llama};
use peft_studio::export::gguf_lora::{self, write_gguf_lora};
use peft_studio::export::merged::write_merged_llama;
use peft_studio::export::peft_adapter::{PeftTarget, write_peft};
use peft_studio::models::llama::{LlamaConfig, LlamaModel, load_folder};
use peft_studio::models::weights::WeightReader;
use peft_studio::peft::linear::{Adapter, LinearLayers, attach_adapters};
use peft_studio::peft::{AdapterConfig, Method, Targets, load_adapter};
use serde_json::{Value, json};

const TOL: f32 = 1e-4;

/// A random model of config `v`, as a Hugging Face folder in `dir` (written by the merged
/// exporter from a model without adapters), loaded back from it.
fn base_folder(v: &Value, dir: &Path, seed: u64) -> LlamaModel {
    let cfg = LlamaConfig::from_json(v, "tiny").unwrap();
    let mut r = WeightReader::random("", 0.2, seed, &Device::Cpu);
    let m = LlamaModel::load(&cfg, &mut r).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), v.to_string()).unwrap();
    std::fs::write(dir.join("tokenizer.json"), "{}").unwrap();
    write_merged_llama(&m, None, dir).unwrap();
    std::fs::write(dir.join("config.json"), v.to_string()).unwrap();
    load_folder(dir, &candle_core::Device::Cpu).unwrap()
}

/// Attaches `method` at rank 4 on `targets` and moves the trainable values away from their
/// start (LoRA's B is zero at first), so the adapter changes the logits.
fn adapt(m: &mut LlamaModel, method: Method, targets: &[&str], seed: u64) {
    let cfg = AdapterConfig {
        method,
        rank: 4,
        alpha: Some(8.0),
        targets: Targets::List(targets.iter().map(|s| s.to_string()).collect()),
        ..AdapterConfig::default()
    };
    attach_adapters(m, &cfg).unwrap();
    for (i, l) in m.linears().into_iter().enumerate() {
        match l.adapter() {
            Some(Adapter::Lora(a)) => {
                let d = a.b.as_tensor().dims().to_vec();
                a.b.set(&randn(&d, 0.3, seed + i as u64)).unwrap();
            }
            Some(Adapter::Diagonal(d)) => {
                let z = (d.z.as_tensor() + randn(d.z.dims(), 0.5, seed + i as u64)).unwrap();
                d.z.set(&z).unwrap();
            }
            None => {}
        }
    }
}

fn logits(m: &LlamaModel) -> Tensor {
    m.forward(&ids(), None, false).unwrap()
}

fn causal_lm(base: &Path) -> PeftTarget {
    PeftTarget {
        task_type: Some("CAUSAL_LM".into()),
        base_model: Some(base.display().to_string()),
        modules_to_save: Vec::new(),
    }
}

#[test]
fn peft_export_of_lora_and_svfit_reads_back_with_the_same_logits() {
    for (method, tied) in [
        (Method::Lora, false),
        (Method::Svfit, true),
        (Method::Loldu, false),
    ] {
        let tmp = TempDir::new("peft");
        let base = tmp.0.join("base");
        let mut m = base_folder(&tiny_llama("llama", tied), &base, 7);
        let before = logits(&m);
        adapt(&mut m, method, &["q_proj", "v_proj"], 100);
        let want = logits(&m);
        assert!(
            max_diff(&want, &before) > 1e-2,
            "{method}: the adapter must change the logits"
        );
        let out = tmp.0.join("peft");
        std::fs::create_dir_all(&out).unwrap();
        let s = write_peft(&m, &causal_lm(&base), &out).unwrap();
        assert_eq!((s.rank, s.modules), (4, 4), "{method}");
        assert_eq!(s.target_modules, vec!["q_proj", "v_proj"]);
        let cfg: Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(cfg["peft_type"], "LORA");
        assert_eq!(cfg["task_type"], "CAUSAL_LM");
        assert_eq!(cfg["r"], 4);
        assert_eq!(cfg["lora_alpha"], 4);
        let w = candle_core::safetensors::load(out.join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
        let a = &w["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"];
        let b = &w["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"];
        assert_eq!((a.dims(), b.dims()), (&[4usize, 32][..], &[16usize, 4][..]));
        assert_eq!(w.len(), 8);
        // Read back onto a fresh copy of the base: PEFT's LoRA with the same logits.
        let mut back = load_folder(&base, &candle_core::Device::Cpu).unwrap();
        let read = load_adapter(&mut back, &out).unwrap();
        assert_eq!((read.method, read.rank), (Method::Lora, 4));
        let got = logits(&back);
        let d = max_diff(&got, &want);
        assert!(d < TOL, "{method}: logits differ by {d}");
    }
}

#[test]
fn merged_export_loads_as_a_plain_model_with_the_same_logits() {
    for (family, tied) in [("llama", true), ("qwen2", false), ("mistral", false)] {
        let tmp = TempDir::new("merged");
        let base = tmp.0.join("base");
        let mut m = base_folder(&tiny_llama(family, tied), &base, 11);
        adapt(
            &mut m,
            Method::Lora,
            &["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
            5,
        );
        let want = logits(&m);
        let out = tmp.0.join("merged");
        std::fs::create_dir_all(&out).unwrap();
        let copied = write_merged_llama(&m, Some(&base), &out).unwrap();
        assert_eq!(copied, vec!["tokenizer.json"]);
        let back = load_folder(&out, &candle_core::Device::Cpu).unwrap();
        assert!(back.linears().iter().all(|l| l.adapter().is_none()));
        let d = max_diff(&logits(&back), &want);
        assert!(d < TOL, "{family}: merged logits differ by {d}");
        let w =
            candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
        assert_eq!(w.contains_key("lm_head.weight"), !tied, "{family}");
        // Without a base folder the config is written from the model's.
        let out2 = tmp.0.join("merged2");
        std::fs::create_dir_all(&out2).unwrap();
        write_merged_llama(&m, None, &out2).unwrap();
        let d = max_diff(
            &logits(&load_folder(&out2, &candle_core::Device::Cpu).unwrap()),
            &want,
        );
        assert!(
            d < TOL,
            "{family}: merged (own config) logits differ by {d}"
        );
    }
}

/// llama.cpp's permutation written independently: row `h·d + 2i + j` of the result is row
/// `h·d + j·d/2 + i` of the input.
fn permute_by_index(t: &Tensor, heads: usize) -> Tensor {
    let (rows, cols) = t.dims2().unwrap();
    let d = rows / heads;
    let v = t.to_vec2::<f32>().unwrap();
    let mut out = vec![0f32; rows * cols];
    for h in 0..heads {
        for i in 0..d / 2 {
            for j in 0..2 {
                let src = &v[h * d + j * (d / 2) + i];
                out[(h * d + 2 * i + j) * cols..][..cols].copy_from_slice(src);
            }
        }
    }
    Tensor::from_vec(out, (rows, cols), &Device::Cpu).unwrap()
}

/// The tensor `name` of a GGUF file as f32 (its candle shape: ggml's dims reversed).
fn gguf_tensor(path: &Path, c: &gguf_file::Content, name: &str) -> Tensor {
    let mut f = std::fs::File::open(path).unwrap();
    c.tensor(&mut f, name, &Device::Cpu)
        .unwrap()
        .dequantize(&Device::Cpu)
        .unwrap()
}

#[test]
fn gguf_lora_has_llama_cpp_names_shapes_metadata_and_permutation() {
    for (family, arch, permuted) in [
        ("llama", "llama", true),
        ("mistral", "llama", true),
        ("qwen2", "qwen2", false),
    ] {
        let tmp = TempDir::new("gguf");
        let base = tmp.0.join("base");
        let mut m = base_folder(&tiny_llama(family, false), &base, 3);
        adapt(
            &mut m,
            Method::Lora,
            &["q_proj", "k_proj", "v_proj", "up_proj"],
            9,
        );
        let path = tmp.0.join(gguf_lora::FILE_NAME);
        let s = write_gguf_lora(&m, &path).unwrap();
        assert_eq!((s.architecture.as_str(), s.rank, s.modules), (arch, 4, 8));
        let mut f = std::fs::File::open(&path).unwrap();
        let c = gguf_file::Content::read(&mut f).unwrap();
        let text = |k: &str| c.metadata[k].to_string().unwrap().clone();
        assert_eq!(text("general.architecture"), arch);
        assert_eq!(text("general.type"), "adapter");
        assert_eq!(text("adapter.type"), "lora");
        assert_eq!(c.metadata["adapter.lora.alpha"].to_f32().unwrap(), 4.0);
        assert_eq!(c.tensor_infos.len(), 16);
        for (path_, name) in [
            ("self_attn.q_proj", "attn_q"),
            ("self_attn.k_proj", "attn_k"),
            ("self_attn.v_proj", "attn_v"),
            ("mlp.up_proj", "ffn_up"),
        ] {
            for layer in 0..2 {
                let key = format!("blk.{layer}.{name}.weight");
                let lin = m
                    .linears()
                    .into_iter()
                    .find(|l| l.path() == format!("model.layers.{layer}.{path_}"))
                    .unwrap();
                let (out, inp) = lin.shape();
                // ggml shapes: lora_a [in, r], lora_b [r, out] (candle's are reversed).
                let ia = &c.tensor_infos[&format!("{key}.lora_a")];
                let ib = &c.tensor_infos[&format!("{key}.lora_b")];
                assert_eq!(ia.shape.dims(), &[4, inp], "{key}");
                assert_eq!(ib.shape.dims(), &[out, 4], "{key}");
                let a = gguf_tensor(&path, &c, &format!("{key}.lora_a"));
                let b = gguf_tensor(&path, &c, &format!("{key}.lora_b"));
                let delta = lin.delta_weight().unwrap();
                let heads = match name {
                    "attn_q" => Some(4),
                    "attn_k" => Some(2),
                    _ => None,
                };
                let want = match heads {
                    Some(h) if permuted => permute_by_index(&delta, h),
                    _ => delta,
                };
                let got = b.matmul(&a).unwrap();
                let d = max_diff(&got, &want);
                assert!(d < 1e-5, "{family} {key}: lora_b·lora_a differs by {d}");
                if heads.is_some() && permuted {
                    let plain = max_diff(&got, &lin.delta_weight().unwrap());
                    assert!(plain > 1e-3, "{family} {key}: rows must be permuted");
                }
            }
        }
    }
}

#[test]
fn gguf_lora_refuses_a_model_without_adapters() {
    let tmp = TempDir::new("gguf-none");
    let m = base_folder(&tiny_llama("llama", true), &tmp.0.join("base"), 1);
    let e = write_gguf_lora(&m, &tmp.0.join("x.gguf"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("no adapter"), "{e}");
}

/// Writes a PEFT export of a real model with a random non-zero LoRA (r 8 on q_proj, v_proj)
/// and `check_logits.json` beside it, for `scripts/peft_interop.py`. Needs
/// `PEFT_INTEROP_MODEL` (an HF folder) and `PEFT_INTEROP_OUT` (the export folder).
#[test]
#[ignore]
fn interop_export() {
    let (Ok(model), Ok(out)) = (
        std::env::var("PEFT_INTEROP_MODEL"),
        std::env::var("PEFT_INTEROP_OUT"),
    ) else {
        eprintln!("set PEFT_INTEROP_MODEL and PEFT_INTEROP_OUT");
        return;
    };
    let base = Path::new(&model);
    let mut m = load_folder(base, &candle_core::Device::Cpu).unwrap();
    let cfg = AdapterConfig {
        method: Method::Lora,
        rank: 8,
        alpha: Some(16.0),
        targets: Targets::List(vec!["q_proj".into(), "v_proj".into()]),
        ..AdapterConfig::default()
    };
    attach_adapters(&mut m, &cfg).unwrap();
    for (i, l) in m.linears().into_iter().enumerate() {
        if let Some(Adapter::Lora(a)) = l.adapter() {
            let d = a.b.as_tensor().dims().to_vec();
            a.b.set(&randn(&d, 0.05, 1000 + i as u64)).unwrap();
        }
    }
    let out = Path::new(&out);
    let _ = std::fs::remove_dir_all(out);
    std::fs::create_dir_all(out).unwrap();
    write_peft(&m, &causal_lm(base), out).unwrap();
    let ids: Vec<u32> = (0..24).map(|i| (i * 977 + 13) % 49_000).collect();
    let t = Tensor::from_vec(ids.clone(), (1, 24), &Device::Cpu).unwrap();
    let lg = m
        .forward(&t, None, false)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    peft_studio::export::check::write(out, "causal_lm", json!({ "input_ids": [ids] }), &lg)
        .unwrap();
    eprintln!("wrote {}", out.display());
}

#[test]
fn transformers5_rope_parameters_are_read() {
    // transformers 5 moved `rope_theta` (and the scaling) into `rope_parameters`, as in
    // SmolLM2's config.json; missing it would silently use RoPE base 10,000.
    let mut v = tiny_llama("llama", true);
    if let Some(o) = v.as_object_mut() {
        o.remove("rope_theta");
    }
    v["rope_parameters"] = json!({"rope_theta": 100000.0, "rope_type": "default"});
    let c = LlamaConfig::from_json(&v, "c").unwrap();
    assert_eq!(c.rope_theta, 100000.0);
    assert!(c.rope_scaling.is_none());
    v["rope_parameters"] = json!({"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0,
        "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
    let c = LlamaConfig::from_json(&v, "c").unwrap();
    assert_eq!(c.rope_theta, 500000.0);
    assert_eq!(c.rope_scaling.unwrap().factor, 8.0);
    v["rope_parameters"] = json!({"rope_theta": -1.0});
    let e = LlamaConfig::from_json(&v, "c").unwrap_err().to_string();
    assert!(e.contains("rope_parameters.rope_theta"), "{e}");
}

#[test]
fn export_llama_writes_every_format_atomically() {
    use peft_studio::export::{ExportFormat, export_llama};
    let tmp = TempDir::new("export-llama");
    let base = tmp.0.join("base");
    let mut m = base_folder(&tiny_llama("llama", true), &base, 21);
    adapt(&mut m, Method::Loldu, &["q_proj", "v_proj"], 4);
    for (format, file) in [
        (ExportFormat::Peft, "adapter_model.safetensors"),
        (ExportFormat::Merged, "model.safetensors"),
        (ExportFormat::GgufLora, gguf_lora::FILE_NAME),
    ] {
        let out = tmp.0.join(format.name());
        let r = export_llama(&m, Some(&base), format, &out, false).unwrap();
        assert!(out.join(file).is_file(), "{format}: {:?}", r.notes);
        let e = export_llama(&m, Some(&base), format, &out, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--force"), "{e}");
        export_llama(&m, Some(&base), format, &out, true).unwrap();
    }
    let left: Vec<_> = std::fs::read_dir(&tmp.0)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(left.is_empty(), "staging folders left: {left:?}");
}

//! `--format gguf-lora`: llama.cpp's LoRA adapter file (what its `convert_lora_to_gguf.py`
//! writes, loaded by `llama-cli --lora`): metadata `general.architecture` (the base's),
//! `general.type = adapter`, `adapter.type = lora`, `adapter.lora.alpha`; tensors
//! `blk.N.<name>.weight.lora_a` (ggml shape `[in, r]`) and `.lora_b` (`[r, out]`), f32.
//!
//! llama.cpp stores LLaMA's (and Mistral's) q and k projections with their rows permuted for
//! its RoPE layout (`convert_hf_to_gguf.py`'s `LlamaModel.permute`: within each head, the rows
//! `[first half | second half]` are interleaved). A LoRA's change `B·A` of those weights must
//! be permuted the same way, which permutes the rows of B and leaves A as is. Qwen2 is stored
//! unpermuted.

use std::path::Path;

use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{DType, Tensor};

use super::peft_adapter::lora_pairs;
use crate::fsio;
use crate::models::llama::{DecoderFamily, LlamaModel};

/// The file written inside the `--out` folder.
pub const FILE_NAME: &str = "adapter-lora.gguf";

/// llama.cpp's `general.architecture` for a family (Mistral converts as `llama`).
pub fn gguf_architecture(family: DecoderFamily) -> &'static str {
    match family {
        DecoderFamily::Llama | DecoderFamily::Mistral => "llama",
        DecoderFamily::Qwen2 => "qwen2",
    }
}

/// llama.cpp's tensor name for the weight of an HF module path
/// (`model.layers.3.self_attn.q_proj` → `blk.3.attn_q.weight`), or `None` for a module
/// llama.cpp's LLaMA graph has no LoRA slot for.
pub fn gguf_tensor_name(path: &str) -> Option<String> {
    let rest = path.strip_prefix("model.layers.")?;
    let (layer, module) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let name = match module {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{name}.weight"))
}

/// llama.cpp's row order for a q or k projection with `heads` heads: the rows of each head,
/// `[x₀ … x_{d/2−1} | y₀ … y_{d/2−1}]`, become `[x₀ y₀ x₁ y₁ …]`. `t` is (rows, cols) with
/// rows a multiple of 2·heads.
pub fn permute_rows(t: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (rows, cols) = t.dims2()?;
    if heads == 0 || !rows.is_multiple_of(2 * heads) {
        candle_core::bail!("{rows} rows cannot be split into {heads} heads of two halves");
    }
    t.reshape((heads, 2, rows / heads / 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))
}

/// What [`write_gguf_lora`] wrote.
#[derive(Debug, Clone)]
pub struct GgufSummary {
    /// `general.architecture`.
    pub architecture: String,
    /// The common rank (and `adapter.lora.alpha`: scale 1).
    pub rank: usize,
    /// Adapted modules written.
    pub modules: usize,
}

/// Writes the adapters of `model` as llama.cpp's LoRA GGUF file `path` (atomically).
pub fn write_gguf_lora(model: &LlamaModel, path: &Path) -> anyhow::Result<GgufSummary> {
    let c = model.config();
    let arch = gguf_architecture(c.family);
    let (pairs, r) = lora_pairs(model)?;
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    for p in &pairs {
        let Some(name) = gguf_tensor_name(&p.path) else {
            anyhow::bail!(
                "module `{}` has no LoRA slot in llama.cpp's {arch} graph",
                p.path
            );
        };
        let permute_heads = match (c.family, p.path.rsplit('.').next()) {
            (DecoderFamily::Qwen2, _) => None,
            (_, Some("q_proj")) => Some(c.num_attention_heads),
            (_, Some("k_proj")) => Some(c.num_key_value_heads),
            _ => None,
        };
        let b = match permute_heads {
            Some(h) => permute_rows(&p.b, h)?,
            None => p.b.clone(),
        };
        let a = p.a.to_dtype(DType::F32)?.contiguous()?;
        let b = b.to_dtype(DType::F32)?.contiguous()?;
        tensors.push((
            format!("{name}.lora_a"),
            QTensor::quantize(&a, GgmlDType::F32)?,
        ));
        tensors.push((
            format!("{name}.lora_b"),
            QTensor::quantize(&b, GgmlDType::F32)?,
        ));
    }
    let meta = [
        (
            "general.architecture",
            gguf_file::Value::String(arch.into()),
        ),
        ("general.type", gguf_file::Value::String("adapter".into())),
        (
            "general.name",
            gguf_file::Value::String("peft-studio LoRA".into()),
        ),
        ("adapter.type", gguf_file::Value::String("lora".into())),
        ("adapter.lora.alpha", gguf_file::Value::F32(r as f32)),
    ];
    let meta_refs: Vec<(&str, &gguf_file::Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut buf = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut buf, &meta_refs, &tensor_refs)
        .map_err(|e| anyhow::anyhow!("{}: cannot encode the GGUF file: {e}", path.display()))?;
    fsio::write_atomic(path, buf.get_ref())?;
    Ok(GgufSummary {
        architecture: arch.into(),
        rank: r,
        modules: pairs.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn names_follow_llama_cpp() {
        assert_eq!(
            gguf_tensor_name("model.layers.12.self_attn.o_proj").as_deref(),
            Some("blk.12.attn_output.weight")
        );
        assert_eq!(
            gguf_tensor_name("model.layers.0.mlp.down_proj").as_deref(),
            Some("blk.0.ffn_down.weight")
        );
        assert_eq!(gguf_tensor_name("lm_head"), None);
    }

    #[test]
    fn permutation_interleaves_the_halves_of_each_head() {
        // 2 heads of 4 rows: head rows [0 1 | 2 3] → [0 2 1 3].
        let t = Tensor::arange(0f32, 8.0, &Device::Cpu)
            .unwrap()
            .reshape((8, 1))
            .unwrap();
        let p = permute_rows(&t, 2).unwrap().flatten_all().unwrap();
        assert_eq!(
            p.to_vec1::<f32>().unwrap(),
            vec![0., 2., 1., 3., 4., 6., 5., 7.]
        );
        assert!(permute_rows(&t, 3).is_err());
    }
}

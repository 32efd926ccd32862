//! Reading a llama.cpp GGUF file (`general.architecture` llama or qwen2) into a
//! [`LlamaModel`]: the config from the metadata, every tensor dequantized to f32 (F32, F16,
//! Q8_0, Q4_0, Q4_1 and the other types candle reads) under its Hugging Face name.
//!
//! llama.cpp's converter stores the LLaMA q and k projections with the rows of each head
//! interleaved for its RoPE layout (`permute` in `convert_hf_to_gguf.py`); they are put back
//! in Hugging Face's `rotate_half` order here. Qwen2 files are stored unpermuted.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use crate::device::HOST;
use serde_json::json;

use super::config::{DecoderFamily, Llama3RopeScaling, LlamaConfig};
use super::model::LlamaModel;
use crate::arch::ArchError;
use crate::models::ModelError;
use crate::models::weights::WeightReader;
use crate::peft::PackedWeight;

/// An open GGUF file: its header (metadata and tensor directory) and a reader for the data.
pub struct GgufFile {
    path: String,
    content: Content,
    reader: BufReader<File>,
}

fn file_err(path: &str, reason: impl Into<String>) -> ModelError {
    ModelError::File {
        path: path.into(),
        reason: reason.into(),
    }
}

impl GgufFile {
    /// Opens `path` and reads its header.
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let shown = path.display().to_string();
        let file = File::open(path).map_err(|e| file_err(&shown, e.to_string()))?;
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader)
            .map_err(|e| file_err(&shown, format!("not a readable GGUF file: {e}")))?;
        Ok(Self {
            path: shown,
            content,
            reader,
        })
    }

    /// The file, as named in errors.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// A metadata value, if present.
    pub fn meta(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn missing(&self, key: &str) -> ModelError {
        file_err(&self.path, format!("metadata `{key}` is missing"))
    }

    fn wrong(&self, key: &str, expected: &str, v: &Value) -> ModelError {
        file_err(
            &self.path,
            format!(
                "metadata `{key}` must be {expected}, found a {:?}",
                v.value_type()
            ),
        )
    }

    /// An unsigned integer stored under any integer type.
    pub fn meta_u64(&self, key: &str) -> Result<Option<u64>, ModelError> {
        let Some(v) = self.meta(key) else {
            return Ok(None);
        };
        let n = match v {
            Value::U8(x) => Some(u64::from(*x)),
            Value::U16(x) => Some(u64::from(*x)),
            Value::U32(x) => Some(u64::from(*x)),
            Value::U64(x) => Some(*x),
            Value::I8(x) => u64::try_from(*x).ok(),
            Value::I16(x) => u64::try_from(*x).ok(),
            Value::I32(x) => u64::try_from(*x).ok(),
            Value::I64(x) => u64::try_from(*x).ok(),
            _ => None,
        };
        n.map(Some)
            .ok_or_else(|| self.wrong(key, "a non-negative integer", v))
    }

    /// A required unsigned integer.
    pub fn meta_u64_req(&self, key: &str) -> Result<u64, ModelError> {
        self.meta_u64(key)?.ok_or_else(|| self.missing(key))
    }

    /// A float (f32 or f64).
    pub fn meta_f64(&self, key: &str) -> Result<Option<f64>, ModelError> {
        match self.meta(key) {
            None => Ok(None),
            Some(Value::F32(x)) => Ok(Some(f64::from(*x))),
            Some(Value::F64(x)) => Ok(Some(*x)),
            Some(v) => Err(self.wrong(key, "a number", v)),
        }
    }

    /// A string.
    pub fn meta_str(&self, key: &str) -> Result<Option<&str>, ModelError> {
        match self.meta(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.wrong(key, "a string", v)),
        }
    }

    /// A boolean.
    pub fn meta_bool(&self, key: &str) -> Result<Option<bool>, ModelError> {
        match self.meta(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.wrong(key, "true or false", v)),
        }
    }

    /// An array.
    pub fn meta_array(&self, key: &str) -> Result<Option<&Vec<Value>>, ModelError> {
        match self.meta(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(v) => Err(self.wrong(key, "an array", v)),
        }
    }

    /// Whether the file holds a tensor of that (GGUF) name.
    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// The shape of a tensor (candle's order: rows first), if present.
    pub fn tensor_dims(&self, name: &str) -> Option<&[usize]> {
        self.content.tensor_infos.get(name).map(|t| t.shape.dims())
    }

    /// A tensor dequantized to f32.
    pub fn tensor(&mut self, name: &str) -> Result<Tensor, ModelError> {
        let q = self.qtensor(name)?;
        q.dequantize(&HOST).map_err(|e| {
            file_err(
                &self.path,
                format!("cannot dequantize tensor `{name}`: {e}"),
            )
        })
    }
}

impl GgufFile {
    /// Tensor `name` as stored (quantized blocks, or F32/F16).
    pub fn qtensor(&mut self, name: &str) -> Result<QTensor, ModelError> {
        if !self.has_tensor(name) {
            return Err(file_err(&self.path, format!("tensor `{name}` is missing")));
        }
        self.content
            .tensor(&mut self.reader, name, &HOST)
            .map_err(|e| file_err(&self.path, format!("cannot read tensor `{name}`: {e}")))
    }
}

/// Which Hugging Face config field each GGUF metadata key (after `{arch}.`) fills, to name
/// the key in the config's validation errors.
const FIELDS: [(&str, &str); 10] = [
    ("hidden_size", "embedding_length"),
    ("intermediate_size", "feed_forward_length"),
    ("num_hidden_layers", "block_count"),
    ("num_attention_heads", "attention.head_count"),
    ("num_key_value_heads", "attention.head_count_kv"),
    ("head_dim", "attention.key_length"),
    ("max_position_embeddings", "context_length"),
    ("rms_norm_eps", "attention.layer_norm_rms_epsilon"),
    ("rope_theta", "rope.freq_base"),
    ("vocab_size", "vocab_size"),
];

/// The decoder's config from the file's metadata.
pub fn config_from_gguf(g: &mut GgufFile) -> Result<LlamaConfig, ModelError> {
    let arch = g
        .meta_str("general.architecture")?
        .ok_or_else(|| g.missing("general.architecture"))?
        .to_string();
    let family = match arch.as_str() {
        "llama" => DecoderFamily::Llama,
        "qwen2" => DecoderFamily::Qwen2,
        other => {
            return Err(file_err(
                g.path(),
                format!("metadata `general.architecture` must be llama or qwen2, found `{other}`"),
            ));
        }
    };
    let key = |k: &str| format!("{arch}.{k}");
    let req = |k: &str| g.meta_u64_req(&key(k));
    let heads = req("attention.head_count")?;
    let mut cfg = json!({
        "model_type": family.model_type(),
        "hidden_size": req("embedding_length")?,
        "intermediate_size": req("feed_forward_length")?,
        "num_hidden_layers": req("block_count")?,
        "num_attention_heads": heads,
        "num_key_value_heads": g.meta_u64(&key("attention.head_count_kv"))?.unwrap_or(heads),
        "tie_word_embeddings": !g.has_tensor("output.weight"),
    });
    let set = |cfg: &mut serde_json::Value, field: &str, v: serde_json::Value| {
        cfg[field] = v;
    };
    if let Some(d) = g.meta_u64(&key("attention.key_length"))? {
        set(&mut cfg, "head_dim", json!(d));
    }
    if let Some(n) = g.meta_u64(&key("context_length"))? {
        set(&mut cfg, "max_position_embeddings", json!(n));
    }
    let eps_key = key("attention.layer_norm_rms_epsilon");
    let eps = g.meta_f64(&eps_key)?.ok_or_else(|| g.missing(&eps_key))?;
    set(&mut cfg, "rms_norm_eps", json!(eps));
    if let Some(theta) = g.meta_f64(&key("rope.freq_base"))? {
        set(&mut cfg, "rope_theta", json!(theta));
    }
    set(&mut cfg, "vocab_size", json!(vocab_size(g, &arch)?));
    for (field, k) in [
        ("bos_token_id", "tokenizer.ggml.bos_token_id"),
        ("eos_token_id", "tokenizer.ggml.eos_token_id"),
    ] {
        if let Some(id) = g.meta_u64(k)? {
            set(&mut cfg, field, json!(id));
        }
    }
    match g.meta_str(&key("rope.scaling.type"))? {
        None | Some("none") => {}
        Some(other) => {
            return Err(file_err(
                g.path(),
                format!(
                    "metadata `{}` is `{other}`: only LLaMA 3's frequency scaling (tensor `rope_freqs.weight`) is supported",
                    key("rope.scaling.type")
                ),
            ));
        }
    }
    let mut config = LlamaConfig::from_json(&cfg, g.path()).map_err(|e| match e {
        ArchError::Field {
            path,
            field,
            problem,
        } => {
            let gguf_key = FIELDS
                .iter()
                .find(|(f, _)| *f == field)
                .map_or_else(|| field.clone(), |(_, k)| key(k));
            ModelError::File {
                path,
                reason: format!("metadata `{gguf_key}` {problem}"),
            }
        }
        e => ModelError::Arch(e),
    })?;
    if let Some(rot) = g.meta_u64(&key("rope.dimension_count"))?
        && rot as usize != config.head_dim
    {
        return Err(file_err(
            g.path(),
            format!(
                "metadata `{}` is {rot}: rotary embeddings on part of a head (head size {}) are not supported",
                key("rope.dimension_count"),
                config.head_dim
            ),
        ));
    }
    config.rope_scaling = llama3_scaling(g, &config)?;
    Ok(config)
}

/// The vocabulary size: the token embedding's rows, which must agree with the tokenizer's
/// token list when both are present.
fn vocab_size(g: &GgufFile, arch: &str) -> Result<u64, ModelError> {
    let rows = g
        .tensor_dims("token_embd.weight")
        .and_then(|d| d.first().copied());
    let tokens = g
        .meta_array("tokenizer.ggml.tokens")?
        .map(|a| a.len() as u64);
    let declared = g.meta_u64(&format!("{arch}.vocab_size"))?;
    match (rows, tokens.or(declared)) {
        (Some(r), Some(t)) if r as u64 != t => Err(file_err(
            g.path(),
            format!(
                "tensor `token_embd.weight` has {r} rows but the vocabulary (`tokenizer.ggml.tokens`) has {t} tokens"
            ),
        )),
        (Some(r), _) => Ok(r as u64),
        (None, Some(t)) => Ok(t),
        (None, None) => Err(file_err(
            g.path(),
            "tensor `token_embd.weight` is missing (and metadata `tokenizer.ggml.tokens` too)",
        )),
    }
}

/// LLaMA 3 scaling from the per-frequency factors llama.cpp stores in `rope_freqs.weight`:
/// matched against the formula with Meta's constants (low 1, high 4, original context
/// 8192, the largest factor as `factor`); other factors are refused.
fn llama3_scaling(
    g: &mut GgufFile,
    c: &LlamaConfig,
) -> Result<Option<Llama3RopeScaling>, ModelError> {
    const NAME: &str = "rope_freqs.weight";
    let Some(dims) = g.tensor_dims(NAME) else {
        return Ok(None);
    };
    if dims != [c.head_dim / 2] {
        return Err(file_err(
            g.path(),
            format!(
                "tensor `{NAME}` has shape {dims:?}, expected [{}]",
                c.head_dim / 2
            ),
        ));
    }
    let factors = g.tensor(NAME)?.to_vec1::<f32>()?;
    let max = factors.iter().copied().fold(1.0f32, f32::max) as f64;
    if max <= 1.0 {
        return Ok(None);
    }
    let scaling = Llama3RopeScaling {
        factor: max,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192,
    };
    let mut probe = c.clone();
    probe.rope_scaling = None;
    let base = probe.inv_freq();
    probe.rope_scaling = Some(scaling);
    let scaled = probe.inv_freq();
    let agrees = base
        .iter()
        .zip(&scaled)
        .zip(&factors)
        .all(|((b, s), f)| ((b / *f as f64) - s).abs() <= 1e-4 * b.abs());
    if !agrees {
        return Err(file_err(
            g.path(),
            format!("tensor `{NAME}` holds RoPE frequency factors other than LLaMA 3's scaling"),
        ));
    }
    Ok(Some(scaling))
}

/// Undoes llama.cpp's q/k row permutation: within each of `heads` heads, stored row
/// `2i + j` is Hugging Face row `j · d/2 + i`. Works on weights (rows, in) and biases (rows).
pub fn unpermute_rows(t: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    if heads == 0 || !rows.is_multiple_of(2 * heads) {
        candle_core::bail!("{rows} rows cannot be split into {heads} heads of even size");
    }
    let half = rows / heads / 2;
    let rest: Vec<usize> = dims[1..].to_vec();
    let mut split = vec![heads, half, 2];
    split.extend(&rest);
    t.reshape(split)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)
}

/// llama.cpp's permutation (the inverse of [`unpermute_rows`]): what its converter writes.
pub fn permute_rows(t: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    if heads == 0 || !rows.is_multiple_of(2 * heads) {
        candle_core::bail!("{rows} rows cannot be split into {heads} heads of even size");
    }
    let half = rows / heads / 2;
    let mut split = vec![heads, 2, half];
    split.extend(&dims[1..]);
    t.reshape(split)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)
}

/// The (GGUF name, Hugging Face name) pairs a model of this config reads.
pub fn tensor_names(c: &LlamaConfig) -> Vec<(String, String)> {
    let mut v = vec![
        (
            "token_embd.weight".into(),
            "model.embed_tokens.weight".into(),
        ),
        ("output_norm.weight".into(), "model.norm.weight".into()),
    ];
    if !c.tie_word_embeddings {
        v.push(("output.weight".into(), "lm_head.weight".into()));
    }
    let linears = [
        ("attn_q", "self_attn.q_proj", c.qkv_bias),
        ("attn_k", "self_attn.k_proj", c.qkv_bias),
        ("attn_v", "self_attn.v_proj", c.qkv_bias),
        ("attn_output", "self_attn.o_proj", c.o_bias),
        ("ffn_gate", "mlp.gate_proj", c.mlp_bias),
        ("ffn_up", "mlp.up_proj", c.mlp_bias),
        ("ffn_down", "mlp.down_proj", c.mlp_bias),
    ];
    for i in 0..c.num_hidden_layers {
        for (g, h, bias) in linears {
            v.push((
                format!("blk.{i}.{g}.weight"),
                format!("model.layers.{i}.{h}.weight"),
            ));
            if bias {
                v.push((
                    format!("blk.{i}.{g}.bias"),
                    format!("model.layers.{i}.{h}.bias"),
                ));
            }
        }
        for (g, h) in [
            ("attn_norm", "input_layernorm"),
            ("ffn_norm", "post_attention_layernorm"),
        ] {
            v.push((
                format!("blk.{i}.{g}.weight"),
                format!("model.layers.{i}.{h}.weight"),
            ));
        }
    }
    v
}

/// Every weight of the model, dequantized to f32 under Hugging Face names, q and k rows in
/// Hugging Face order.
pub fn read_tensors(
    g: &mut GgufFile,
    c: &LlamaConfig,
) -> Result<HashMap<String, Tensor>, ModelError> {
    read_tensors_except(g, c, |_| false)
}

/// [`read_tensors`] without the tensors whose Hugging Face name `skip` picks.
fn read_tensors_except(
    g: &mut GgufFile,
    c: &LlamaConfig,
    skip: impl Fn(&str) -> bool,
) -> Result<HashMap<String, Tensor>, ModelError> {
    let mut names = tensor_names(c);
    if let Some((missing, _)) = names.iter().find(|(n, _)| !g.has_tensor(n)) {
        return Err(file_err(g.path(), format!("tensor `{missing}` is missing")));
    }
    names.retain(|(_, h)| !skip(h));
    let permuted = c.family == DecoderFamily::Llama;
    let mut out = HashMap::with_capacity(names.len());
    for (gname, hname) in names {
        let mut t = g.tensor(&gname)?;
        if let (true, Some(h)) = (permuted, permuted_heads(c, &hname)) {
            t = unpermute_rows(&t, h)
                .map_err(|e| file_err(g.path(), format!("tensor `{gname}`: {e}")))?;
        }
        out.insert(hname, t);
    }
    Ok(out)
}

/// The heads whose rows llama.cpp permuted in tensor `hname` (q_proj and k_proj weights and
/// biases), `None` for the others.
fn permuted_heads(c: &LlamaConfig, hname: &str) -> Option<usize> {
    if hname.contains(".q_proj.") {
        Some(c.num_attention_heads)
    } else if hname.contains(".k_proj.") {
        Some(c.num_key_value_heads)
    } else {
        None
    }
}

/// The row order that undoes llama.cpp's q/k permutation (row `i` of the result is row
/// `order[i]` of the stored tensor), as [`unpermute_rows`] does to a dense tensor.
fn unpermute_order(rows: usize, heads: usize) -> Vec<usize> {
    let half = rows / heads / 2;
    let mut order = Vec::with_capacity(rows);
    // Hugging Face row (h, i, j) of [heads, 2, half] is stored row (h, j, i) of
    // [heads, half, 2].
    for h in 0..heads {
        for i in 0..2 {
            for j in 0..half {
                order.push(h * 2 * half + j * 2 + i);
            }
        }
    }
    order
}

/// The model's linear-layer weights that are stored quantized (or F16), kept packed under
/// Hugging Face names (q and k rows in Hugging Face order); F32 ones are left out.
pub fn read_packed_linears(
    g: &mut GgufFile,
    c: &LlamaConfig,
) -> Result<HashMap<String, PackedWeight>, ModelError> {
    let permuted = c.family == DecoderFamily::Llama;
    let mut out = HashMap::new();
    for (gname, hname) in tensor_names(c) {
        if !hname.starts_with("model.layers.") || !hname.ends_with("_proj.weight") {
            continue;
        }
        let q = g.qtensor(&gname)?;
        if q.dtype() == GgmlDType::F32 {
            continue;
        }
        let bad = |e: candle_core::Error| file_err(g.path(), format!("tensor `{gname}`: {e}"));
        let mut p = PackedWeight::new(q).map_err(bad)?;
        if let (true, Some(h)) = (permuted, permuted_heads(c, &hname)) {
            p = p
                .permute_rows(&unpermute_order(p.dims().0, h))
                .map_err(bad)?;
        }
        out.insert(hname, p);
    }
    Ok(out)
}

/// Loads the model in the GGUF file `path` with its quantized (and F16) linear weights kept
/// as stored: QLoRA's recipe, a packed frozen base under f32 adapters. Outputs equal
/// [`load_gguf`]'s (the same dequantization, done per product); the embedding and norms are
/// f32.
pub fn load_gguf_packed(path: &Path, device: &Device) -> Result<LlamaModel, ModelError> {
    let mut g = GgufFile::open(path)?;
    let config = config_from_gguf(&mut g)?;
    let packed = read_packed_linears(&mut g, &config)?;
    let tensors = read_tensors_except(&mut g, &config, |h| packed.contains_key(h))?;
    let mut r =
        WeightReader::from_tensors(tensors, path, config.initializer_range as f32, 0, device)?
            .with_packed(packed);
    LlamaModel::load(&config, &mut r)
}

/// Loads the model in the GGUF file `path` onto `device`, weights dequantized to f32.
pub fn load_gguf(path: &Path, device: &Device) -> Result<LlamaModel, ModelError> {
    let mut g = GgufFile::open(path)?;
    let config = config_from_gguf(&mut g)?;
    let params = config.parameter_count();
    let bytes = (params as u64).saturating_mul(4);
    if let Some(available) = crate::memory::available_bytes()
        && bytes > available
    {
        return Err(file_err(
            g.path(),
            format!(
                "{} parameters, {:.1} GiB as f32, more than the {:.1} GiB of memory available",
                crate::inspect::thousands(params),
                crate::memory::gib(bytes),
                crate::memory::gib(available)
            ),
        ));
    }
    let tensors = read_tensors(&mut g, &config)?;
    let mut r =
        WeightReader::from_tensors(tensors, path, config.initializer_range as f32, 0, device)?;
    LlamaModel::load(&config, &mut r)
}

//! The decoder's hyper-parameters, read from a Hugging Face `config.json` of `model_type`
//! `llama`, `mistral` or `qwen2`, every field validated with an error that names it.

use serde_json::Value;

use crate::arch::ArchError;

/// The `model_type`s this decoder reads: one implementation, a few switches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecoderFamily {
    /// LLaMA (1, 2, 3), SmolLM, TinyLlama…: `attention_bias` and `mlp_bias` from the config.
    Llama,
    /// Mistral: LLaMA's layout, an optional `head_dim` and `sliding_window`.
    Mistral,
    /// Qwen2: biases on the q, k and v projections (not on `o_proj`).
    Qwen2,
}

impl DecoderFamily {
    /// The `model_type` value.
    pub fn model_type(self) -> &'static str {
        match self {
            DecoderFamily::Llama => "llama",
            DecoderFamily::Mistral => "mistral",
            DecoderFamily::Qwen2 => "qwen2",
        }
    }
}

/// LLaMA 3's frequency-dependent RoPE scaling (`rope_scaling` with `rope_type: "llama3"`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3RopeScaling {
    /// How much longer the context is than the original one.
    pub factor: f64,
    /// Wavelengths above `original_max_position_embeddings / low_freq_factor` are divided
    /// by `factor`.
    pub low_freq_factor: f64,
    /// Wavelengths below `original_max_position_embeddings / high_freq_factor` are kept.
    pub high_freq_factor: f64,
    /// The context length the model was pretrained with.
    pub original_max_position_embeddings: usize,
}

/// A LLaMA-family decoder's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// Which `model_type`.
    pub family: DecoderFamily,
    /// Hidden width.
    pub hidden_size: usize,
    /// SwiGLU width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention); divides `num_attention_heads`.
    pub num_key_value_heads: usize,
    /// Width of one head (even, for RoPE).
    pub head_dim: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Longest sequence RoPE tables are built for.
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// LLaMA 3 RoPE scaling, if any.
    pub rope_scaling: Option<Llama3RopeScaling>,
    /// `lm_head` shares the token embedding.
    pub tie_word_embeddings: bool,
    /// Biases on q, k and v.
    pub qkv_bias: bool,
    /// Bias on `o_proj`.
    pub o_bias: bool,
    /// Biases on the SwiGLU projections.
    pub mlp_bias: bool,
    /// Attention sees at most this many previous tokens (Mistral, Qwen2 with
    /// `use_sliding_window`).
    pub sliding_window: Option<usize>,
    /// End-of-sequence token ids (`eos_token_id`, a number or a list).
    pub eos_token_ids: Vec<u32>,
    /// Beginning-of-sequence token id.
    pub bos_token_id: Option<u32>,
    /// Std of weights initialised without a checkpoint.
    pub initializer_range: f64,
}

/// Allowed ranges of the size fields: beyond any model of these families, small enough that
/// every count fits in 64 bits.
const RANGES: [(&str, usize, usize); 8] = [
    ("hidden_size", 1, 1 << 16),
    ("intermediate_size", 1, 1 << 18),
    ("num_hidden_layers", 1, 1000),
    ("num_attention_heads", 1, 1 << 12),
    ("num_key_value_heads", 1, 1 << 12),
    ("head_dim", 2, 1 << 12),
    ("vocab_size", 1, 1 << 24),
    ("max_position_embeddings", 1, 1 << 24),
];

struct Reader<'a> {
    v: &'a Value,
    path: &'a str,
}

impl Reader<'_> {
    fn err(&self, field: &str, problem: impl Into<String>) -> ArchError {
        ArchError::Field {
            path: self.path.into(),
            field: field.into(),
            problem: problem.into(),
        }
    }

    /// A present, non-null value.
    fn get(&self, field: &str) -> Option<&Value> {
        self.v.get(field).filter(|x| !x.is_null())
    }

    fn usize_opt(&self, field: &str) -> Result<Option<usize>, ArchError> {
        let (lo, hi) = RANGES
            .iter()
            .find(|(f, _, _)| *f == field)
            .map_or((0, usize::MAX), |&(_, lo, hi)| (lo, hi));
        let Some(x) = self.get(field) else {
            return Ok(None);
        };
        let n = x
            .as_u64()
            .and_then(|u| usize::try_from(u).ok())
            .ok_or_else(|| self.err(field, format!("must be a non-negative integer, found {x}")))?;
        if !(lo..=hi).contains(&n) {
            return Err(self.err(field, format!("must be between {lo} and {hi}, found {n}")));
        }
        Ok(Some(n))
    }

    fn usize(&self, field: &str) -> Result<usize, ArchError> {
        self.usize_opt(field)?
            .ok_or_else(|| self.err(field, "is missing"))
    }

    /// A float in the open interval (lo, hi), or `default` when absent.
    fn f64_in(&self, field: &str, default: f64, lo: f64, hi: f64) -> Result<f64, ArchError> {
        let Some(x) = self.get(field) else {
            return Ok(default);
        };
        let f = x
            .as_f64()
            .ok_or_else(|| self.err(field, format!("must be a number, found {x}")))?;
        if !(f.is_finite() && f > lo && f < hi) {
            return Err(self.err(field, format!("must be in ({lo}, {hi}), found {f}")));
        }
        Ok(f)
    }

    fn bool(&self, field: &str, default: bool) -> Result<bool, ArchError> {
        match self.get(field) {
            None => Ok(default),
            Some(x) => x
                .as_bool()
                .ok_or_else(|| self.err(field, format!("must be true or false, found {x}"))),
        }
    }

    fn token_ids(&self, field: &str) -> Result<Vec<u32>, ArchError> {
        let one = |x: &Value| {
            x.as_u64()
                .and_then(|u| u32::try_from(u).ok())
                .ok_or_else(|| {
                    self.err(
                        field,
                        format!("must be a token id or a list of them, found {x}"),
                    )
                })
        };
        match self.get(field) {
            None => Ok(Vec::new()),
            Some(Value::Array(a)) => a.iter().map(one).collect(),
            Some(x) => Ok(vec![one(x)?]),
        }
    }
}

impl LlamaConfig {
    /// Reads `config.json` (`v`, shown as `path` in errors).
    pub fn from_json(v: &Value, path: &str) -> Result<Self, ArchError> {
        let f = Reader { v, path };
        let family = match v.get("model_type").and_then(Value::as_str) {
            Some("llama") => DecoderFamily::Llama,
            Some("mistral") => DecoderFamily::Mistral,
            Some("qwen2") => DecoderFamily::Qwen2,
            other => {
                return Err(f.err(
                    "model_type",
                    format!(
                        "must be llama, mistral or qwen2 for a causal language model, found {}",
                        other.map_or_else(|| "none".to_string(), |s| format!("`{s}`"))
                    ),
                ));
            }
        };
        let hidden = f.usize("hidden_size")?;
        let heads = f.usize("num_attention_heads")?;
        let kv_heads = f.usize_opt("num_key_value_heads")?.unwrap_or(heads);
        if heads % kv_heads != 0 {
            return Err(f.err(
                "num_key_value_heads",
                format!("({kv_heads}) must divide num_attention_heads ({heads})"),
            ));
        }
        let head_dim = match f.usize_opt("head_dim")? {
            Some(d) => d,
            None => {
                if hidden % heads != 0 {
                    return Err(f.err(
                        "num_attention_heads",
                        format!("({heads}) must divide hidden_size ({hidden})"),
                    ));
                }
                hidden / heads
            }
        };
        if head_dim % 2 != 0 {
            return Err(f.err(
                "head_dim",
                format!("must be even for rotary embeddings, found {head_dim} (hidden_size / num_attention_heads unless set)"),
            ));
        }
        match f.get("hidden_act").map(|x| x.as_str()) {
            None | Some(Some("silu" | "swish")) => {}
            Some(_) => {
                return Err(f.err(
                    "hidden_act",
                    format!("must be `silu` (SwiGLU), found {}", v["hidden_act"]),
                ));
            }
        }
        let default_positions = match family {
            DecoderFamily::Llama => 2048,
            DecoderFamily::Mistral => 4096 * 32,
            DecoderFamily::Qwen2 => 32768,
        };
        let max_positions = f
            .usize_opt("max_position_embeddings")?
            .unwrap_or(default_positions);
        let sliding_window = match family {
            DecoderFamily::Llama => None,
            DecoderFamily::Mistral => f.usize_opt("sliding_window")?,
            DecoderFamily::Qwen2 if f.bool("use_sliding_window", false)? => {
                f.usize_opt("sliding_window")?
            }
            DecoderFamily::Qwen2 => None,
        };
        if sliding_window == Some(0) {
            return Err(f.err("sliding_window", "must be at least 1, found 0"));
        }
        let (qkv_bias, o_bias, mlp_bias) = match family {
            DecoderFamily::Qwen2 => (true, false, false),
            _ => {
                let attn = f.bool("attention_bias", false)?;
                (attn, attn, f.bool("mlp_bias", false)?)
            }
        };
        let bos = f.token_ids("bos_token_id")?;
        if bos.len() > 1 {
            return Err(f.err("bos_token_id", "must be a single token id"));
        }
        Ok(Self {
            family,
            hidden_size: hidden,
            intermediate_size: f.usize("intermediate_size")?,
            num_hidden_layers: f.usize("num_hidden_layers")?,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            vocab_size: f.usize("vocab_size")?,
            max_position_embeddings: max_positions,
            rms_norm_eps: f.f64_in("rms_norm_eps", 1e-6, 0.0, 1.0)?,
            rope_theta: rope_theta(&f)?,
            rope_scaling: rope_scaling(&f)?,
            tie_word_embeddings: f.bool("tie_word_embeddings", false)?,
            qkv_bias,
            o_bias,
            mlp_bias,
            sliding_window,
            eos_token_ids: f.token_ids("eos_token_id")?,
            bos_token_id: bos.first().copied(),
            initializer_range: f.f64_in("initializer_range", 0.02, 0.0, 10.0)?,
        })
    }

    /// Reads a `config.json` file.
    pub fn from_file(path: &std::path::Path) -> Result<Self, ArchError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|cause| ArchError::Io {
            path: shown.clone(),
            cause,
        })?;
        let v: Value = serde_json::from_str(&text).map_err(|e| ArchError::Json {
            path: shown.clone(),
            reason: e.to_string(),
        })?;
        Self::from_json(&v, &shown)
    }

    /// Parameters of the pretrained model (`lm_head` counted once when tied), from the
    /// config alone; saturates rather than wrapping.
    pub fn parameter_count(&self) -> usize {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let mut layer = [h * q, 2 * h * kv, q * h, 3 * h * i, 2 * h]
            .iter()
            .fold(0usize, |a, &b| a.saturating_add(b));
        if self.qkv_bias {
            layer += q + 2 * kv;
        }
        if self.o_bias {
            layer += h;
        }
        if self.mlp_bias {
            layer += 2 * i + h;
        }
        let embeddings = if self.tie_word_embeddings { 1 } else { 2 };
        layer
            .saturating_mul(self.num_hidden_layers)
            .saturating_add(h)
            .saturating_add(v.saturating_mul(h).saturating_mul(embeddings))
    }

    /// The RoPE inverse frequencies (`head_dim / 2` of them), LLaMA 3 scaling applied.
    pub fn inv_freq(&self) -> Vec<f64> {
        let d = self.head_dim as f64;
        let base: Vec<f64> = (0..self.head_dim / 2)
            .map(|i| 1.0 / self.rope_theta.powf(2.0 * i as f64 / d))
            .collect();
        let Some(s) = self.rope_scaling else {
            return base;
        };
        let orig = s.original_max_position_embeddings as f64;
        let low_wavelen = orig / s.low_freq_factor;
        let high_wavelen = orig / s.high_freq_factor;
        base.into_iter()
            .map(|freq| {
                let wavelen = 2.0 * std::f64::consts::PI / freq;
                if wavelen < high_wavelen {
                    freq
                } else if wavelen > low_wavelen {
                    freq / s.factor
                } else {
                    let smooth = (orig / wavelen - s.low_freq_factor)
                        / (s.high_freq_factor - s.low_freq_factor);
                    (1.0 - smooth) * freq / s.factor + smooth * freq
                }
            })
            .collect()
    }
}

/// `rope_theta`, or `rope_parameters.rope_theta` (transformers 5 writes RoPE settings there).
fn rope_theta(f: &Reader) -> Result<f64, ArchError> {
    if f.get("rope_theta").is_none()
        && let Some(params) = f
            .get("rope_parameters")
            .filter(|p| p.get("rope_theta").is_some())
    {
        let inner = Reader {
            v: params,
            path: f.path,
        };
        return inner
            .f64_in("rope_theta", 10_000.0, 0.0, f64::MAX)
            .map_err(|e| match e {
                ArchError::Field {
                    path,
                    field,
                    problem,
                } => ArchError::Field {
                    path,
                    field: format!("rope_parameters.{field}"),
                    problem,
                },
                e => e,
            });
    }
    f.f64_in("rope_theta", 10_000.0, 0.0, f64::MAX)
}

/// `rope_scaling` (or transformers 5's `rope_parameters`): absent, null, `default`, or
/// `llama3` with its four fields.
fn rope_scaling(f: &Reader) -> Result<Option<Llama3RopeScaling>, ArchError> {
    let from_params = f.get("rope_scaling").is_none();
    let Some(rs) = f.get("rope_scaling").or_else(|| f.get("rope_parameters")) else {
        return Ok(None);
    };
    let Some(obj) = rs.as_object() else {
        return Err(f.err(
            "rope_scaling",
            format!("must be an object or null, found {rs}"),
        ));
    };
    let kind = obj
        .get("rope_type")
        .or_else(|| obj.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("");
    match kind {
        "default" => return Ok(None),
        "" if from_params => return Ok(None),
        "llama3" => {}
        other => {
            return Err(f.err(
                "rope_scaling.rope_type",
                format!("must be `llama3` or `default`, found `{other}`"),
            ));
        }
    }
    let inner = Reader {
        v: rs,
        path: f.path,
    };
    let named = |e: ArchError| match e {
        ArchError::Field {
            path,
            field,
            problem,
        } => ArchError::Field {
            path,
            field: format!("rope_scaling.{field}"),
            problem,
        },
        e => e,
    };
    let num = |field: &str| -> Result<f64, ArchError> {
        if inner.get(field).is_none() {
            return Err(named(inner.err(field, "is missing")));
        }
        inner.f64_in(field, 0.0, 0.0, 1e9).map_err(named)
    };
    let factor = num("factor")?;
    let low = num("low_freq_factor")?;
    let high = num("high_freq_factor")?;
    if high <= low {
        return Err(f.err(
            "rope_scaling.high_freq_factor",
            format!("({high}) must be greater than low_freq_factor ({low})"),
        ));
    }
    let orig = inner
        .usize("original_max_position_embeddings")
        .map_err(named)?;
    if orig == 0 {
        return Err(f.err(
            "rope_scaling.original_max_position_embeddings",
            "must be at least 1, found 0",
        ));
    }
    Ok(Some(Llama3RopeScaling {
        factor,
        low_freq_factor: low,
        high_freq_factor: high,
        original_max_position_embeddings: orig,
    }))
}

//! Model descriptions read from a Hugging Face `config.json`: every linear module's path and
//! shape, and the count of all other parameters. Enough to size an experiment (`inspect`)
//! before having the weights.
//!
//! Module paths follow Hugging Face: the bare model (`BertModel`, `RobertaModel`, `ViTModel`)
//! without a prefix, or, with a classification head, `bert.` / `roberta.` / `vit.` plus the head
//! (`classifier`, or RoBERTa's `classifier.dense` and `classifier.out_proj`).

use std::path::Path;

use serde::Serialize;
use serde_json::Value;

/// A linear layer of a model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LinearSpec {
    /// Module path.
    pub path: String,
    /// Output features m.
    pub out_features: usize,
    /// Input features n.
    pub in_features: usize,
    /// Whether it has a bias.
    pub bias: bool,
    /// Part of the classification head (trained fully, never adapted).
    pub head: bool,
}

impl LinearSpec {
    /// Weight plus bias values.
    pub fn params(&self) -> usize {
        self.out_features
            .saturating_mul(self.in_features)
            .saturating_add(if self.bias { self.out_features } else { 0 })
    }
}

/// The architecture families this project reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// BERT (and BERT-like sentence encoders such as MiniLM).
    Bert,
    /// RoBERTa.
    Roberta,
    /// Vision Transformer.
    Vit,
    /// LLaMA-family causal language model (`model_type` llama).
    Llama,
    /// Mistral (LLaMA's layout).
    Mistral,
    /// Qwen2 (q, k, v biases).
    Qwen2,
}

impl Family {
    /// Whether this is a LLaMA-family causal language model.
    pub fn is_causal_lm(self) -> bool {
        matches!(self, Family::Llama | Family::Mistral | Family::Qwen2)
    }
}

/// A model's shape: linear modules plus everything else.
#[derive(Debug, Clone, Serialize)]
pub struct ArchSpec {
    /// The config's `model_type`.
    pub family: Family,
    /// A short human description (e.g. `bert, 12 layers, hidden 768`).
    pub summary: String,
    /// Every linear module, in forward order.
    pub linears: Vec<LinearSpec>,
    /// Parameters outside linear modules (embeddings, layer norms, patch projection, tokens).
    pub other_params: usize,
}

/// Errors reading a model description; each names the file or field.
#[derive(Debug, thiserror::Error)]
pub enum ArchError {
    /// The file could not be read.
    #[error("{path}: {cause}")]
    Io {
        /// The file.
        path: String,
        /// Cause.
        cause: std::io::Error,
    },
    /// The file is not valid JSON.
    #[error("{path}: not valid JSON: {reason}")]
    Json {
        /// The file.
        path: String,
        /// Parser message.
        reason: String,
    },
    /// A field is missing or has the wrong type.
    #[error("{path}: field `{field}` {problem}")]
    Field {
        /// The file.
        path: String,
        /// Field name.
        field: String,
        /// What is wrong.
        problem: String,
    },
    /// `model_type` is not one this project reads.
    #[error(
        "{path}: model_type `{model_type}` is not supported (bert, roberta, vit, BERT-like encoders, and the causal language models llama, mistral, qwen2 are)"
    )]
    Unsupported {
        /// The file.
        path: String,
        /// The value found.
        model_type: String,
    },
    /// A model whose weights alone would not fit this machine's memory.
    #[error(
        "{path}: {fields}: {params} parameters, {gib:.1} GiB as f32, more than this machine's {mem_gib:.1} GiB of memory"
    )]
    TooLarge {
        /// The file.
        path: String,
        /// The size fields and their values, listed.
        fields: String,
        /// Parameters the config describes.
        params: String,
        /// Their size in GiB.
        gib: f64,
        /// The machine's memory in GiB.
        mem_gib: f64,
    },
    /// `--num-labels` out of range.
    #[error("--num-labels {0}: must be between 1 and {max}", max = MAX_LABELS)]
    NumLabels(usize),
    /// Neither a file, a folder with `config.json`, nor a built-in name.
    #[error("model `{0}`: no such file or folder, and not a built-in model ({builtins})", builtins = BUILTIN_CONFIGS.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", "))]
    NotFound(String),
}

/// Built-in model descriptions: the published `config.json` of well-known checkpoints, so a
/// user can size an experiment offline by name.
pub const BUILTIN_CONFIGS: [(&str, &str); 6] = [
    (
        "bert-base-uncased",
        r#"{"model_type":"bert","hidden_size":768,"num_hidden_layers":12,"num_attention_heads":12,"intermediate_size":3072,"vocab_size":30522,"max_position_embeddings":512,"type_vocab_size":2}"#,
    ),
    (
        "roberta-base",
        r#"{"model_type":"roberta","hidden_size":768,"num_hidden_layers":12,"num_attention_heads":12,"intermediate_size":3072,"vocab_size":50265,"max_position_embeddings":514,"type_vocab_size":1}"#,
    ),
    (
        "all-MiniLM-L6-v2",
        r#"{"model_type":"bert","hidden_size":384,"num_hidden_layers":6,"num_attention_heads":12,"intermediate_size":1536,"vocab_size":30522,"max_position_embeddings":512,"type_vocab_size":2}"#,
    ),
    (
        "vit-base-patch16-224",
        r#"{"model_type":"vit","hidden_size":768,"num_hidden_layers":12,"num_attention_heads":12,"intermediate_size":3072,"image_size":224,"patch_size":16,"num_channels":3,"qkv_bias":true}"#,
    ),
    (
        "llama-2-7b",
        r#"{"model_type":"llama","hidden_size":4096,"intermediate_size":11008,"num_hidden_layers":32,"num_attention_heads":32,"num_key_value_heads":32,"vocab_size":32000,"max_position_embeddings":4096,"rms_norm_eps":1e-5,"rope_theta":10000.0,"tie_word_embeddings":false,"hidden_act":"silu"}"#,
    ),
    (
        "smollm2-135m",
        r#"{"model_type":"llama","hidden_size":576,"intermediate_size":1536,"num_hidden_layers":30,"num_attention_heads":9,"num_key_value_heads":3,"vocab_size":49152,"max_position_embeddings":8192,"rms_norm_eps":1e-5,"rope_theta":100000.0,"tie_word_embeddings":true,"hidden_act":"silu"}"#,
    ),
];

/// Most classes a head may have (`--num-labels`, a dataset's classes).
pub const MAX_LABELS: usize = 1 << 20;

/// Allowed ranges of the size fields of a `config.json`: far beyond any model of these
/// families, small enough that every count fits in 64 bits.
const FIELD_RANGES: [(&str, usize, usize); 10] = [
    ("hidden_size", 1, 1 << 16),
    ("num_hidden_layers", 1, 1000),
    ("num_attention_heads", 1, 1 << 12),
    ("intermediate_size", 1, 1 << 18),
    ("vocab_size", 1, 1 << 24),
    ("max_position_embeddings", 1, 1 << 20),
    ("type_vocab_size", 1, 1 << 10),
    ("image_size", 1, 1 << 13),
    ("patch_size", 1, 1 << 13),
    ("num_channels", 1, 64),
];

struct Fields<'a> {
    v: &'a Value,
    path: &'a str,
}

impl Fields<'_> {
    fn usize(&self, field: &str) -> Result<usize, ArchError> {
        let (lo, hi) = FIELD_RANGES
            .iter()
            .find(|(f, _, _)| *f == field)
            .map_or((0, usize::MAX), |&(_, lo, hi)| (lo, hi));
        let bad = |problem: String| ArchError::Field {
            path: self.path.into(),
            field: field.into(),
            problem,
        };
        match self.v.get(field) {
            Some(x) => {
                let n = x
                    .as_u64()
                    .and_then(|u| usize::try_from(u).ok())
                    .ok_or_else(|| bad(format!("must be a non-negative integer, found {x}")))?;
                if !(lo..=hi).contains(&n) {
                    return Err(bad(format!("must be between {lo} and {hi}, found {n}")));
                }
                Ok(n)
            }
            None => Err(ArchError::Field {
                path: self.path.into(),
                field: field.into(),
                problem: "is missing".into(),
            }),
        }
    }
    fn usize_or(&self, field: &str, default: usize) -> Result<usize, ArchError> {
        if self.v.get(field).is_some() {
            self.usize(field)
        } else {
            Ok(default)
        }
    }
}

impl ArchSpec {
    /// Reads `--model`: a `config.json` file, a folder holding one, a `.gguf` file (its
    /// metadata), or a built-in name.
    /// `num_labels` adds a classification head.
    pub fn resolve(model: &str, num_labels: Option<usize>) -> Result<Self, ArchError> {
        let p = Path::new(model);
        if p.is_dir() {
            Self::from_file(&p.join("config.json"), num_labels)
        } else if p.is_file()
            && p.extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        {
            Self::from_gguf(p, num_labels)
        } else if p.is_file() {
            Self::from_file(p, num_labels)
        } else if let Some((name, json)) = BUILTIN_CONFIGS.iter().find(|(n, _)| *n == model) {
            let v: Value = serde_json::from_str(json).map_err(|e| ArchError::Json {
                path: (*name).into(),
                reason: e.to_string(),
            })?;
            Self::from_config(&v, name, num_labels)
        } else {
            Err(ArchError::NotFound(model.into()))
        }
    }

    /// Reads a `config.json` file.
    pub fn from_file(path: &Path, num_labels: Option<usize>) -> Result<Self, ArchError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|cause| ArchError::Io {
            path: shown.clone(),
            cause,
        })?;
        let v: Value = serde_json::from_str(&text).map_err(|e| ArchError::Json {
            path: shown.clone(),
            reason: e.to_string(),
        })?;
        Self::from_config(&v, &shown, num_labels)
    }

    /// Builds the description from a parsed `config.json` (`path` names it in errors).
    pub fn from_config(
        v: &Value,
        path: &str,
        num_labels: Option<usize>,
    ) -> Result<Self, ArchError> {
        if let Some(k) = num_labels
            && !(1..=MAX_LABELS).contains(&k)
        {
            return Err(ArchError::NumLabels(k));
        }
        let f = Fields { v, path };
        let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("");
        if matches!(model_type, "llama" | "mistral" | "qwen2") {
            return Self::from_decoder_config(v, path, num_labels);
        }
        let family = match model_type {
            "bert" => Family::Bert,
            "roberta" | "xlm-roberta" | "camembert" => Family::Roberta,
            "vit" => Family::Vit,
            other => {
                return Err(ArchError::Unsupported {
                    path: path.into(),
                    model_type: other.into(),
                });
            }
        };
        let h = f.usize("hidden_size")?;
        let layers = f.usize("num_hidden_layers")?;
        let heads = f.usize("num_attention_heads")?;
        let inter = f.usize_or("intermediate_size", 4 * h)?;
        if heads == 0 || h % heads != 0 {
            return Err(ArchError::Field {
                path: path.into(),
                field: "num_attention_heads".into(),
                problem: format!("({heads}) must divide hidden_size ({h})"),
            });
        }
        let lin = |path: String, out_features, in_features, bias| LinearSpec {
            path,
            out_features,
            in_features,
            bias,
            head: false,
        };
        let (prefix, attn) = match (family, num_labels.is_some()) {
            (Family::Bert, true) => ("bert.", "attention.self"),
            (Family::Roberta, true) => ("roberta.", "attention.self"),
            (Family::Vit, true) => ("vit.", "attention.attention"),
            (Family::Vit, false) => ("", "attention.attention"),
            // (The LLaMA family never reaches here: see `from_decoder_config`.)
            (_, _) => ("", "attention.self"),
        };
        let qkv_bias =
            family != Family::Vit || v.get("qkv_bias").and_then(Value::as_bool).unwrap_or(true);
        let mut linears = Vec::new();
        for i in 0..layers {
            let l = format!("{prefix}encoder.layer.{i}");
            for name in ["query", "key", "value"] {
                linears.push(lin(format!("{l}.{attn}.{name}"), h, h, qkv_bias));
            }
            linears.push(lin(format!("{l}.attention.output.dense"), h, h, true));
            linears.push(lin(format!("{l}.intermediate.dense"), inter, h, true));
            linears.push(lin(format!("{l}.output.dense"), h, inter, true));
        }
        // Two layer norms per block.
        let mut other = layers * 4 * h;
        let summary = match family {
            Family::Bert | Family::Roberta | Family::Llama | Family::Mistral | Family::Qwen2 => {
                let vocab = f.usize("vocab_size")?;
                let pos = f.usize_or("max_position_embeddings", 512)?;
                let types = f.usize_or("type_vocab_size", 2)?;
                other += (vocab + pos + types) * h + 2 * h;
                let pooler = matches!((family, num_labels), (_, None) | (Family::Bert, Some(_)));
                if pooler {
                    linears.push(lin(format!("{prefix}pooler.dense"), h, h, true));
                }
                format!("{model_type}, {layers} layers, hidden {h}, {heads} heads, vocab {vocab}")
            }
            Family::Vit => {
                let image = f.usize_or("image_size", 224)?;
                let patch = f.usize_or("patch_size", 16)?;
                let channels = f.usize_or("num_channels", 3)?;
                if patch == 0 || image % patch != 0 {
                    return Err(ArchError::Field {
                        path: path.into(),
                        field: "patch_size".into(),
                        problem: format!("({patch}) must divide image_size ({image})"),
                    });
                }
                let patches = (image / patch).pow(2);
                // cls token, positions, patch projection (a convolution), final layer norm.
                other += h + (patches + 1) * h + channels * patch * patch * h + h + 2 * h;
                if num_labels.is_none() {
                    linears.push(lin("pooler.dense".into(), h, h, true));
                }
                format!(
                    "vit, {layers} layers, hidden {h}, {heads} heads, {image}×{image}×{channels} images, patch {patch}"
                )
            }
        };
        if let Some(k) = num_labels {
            let mut head = |path: &str, out, inp| {
                let mut l = lin(path.into(), out, inp, true);
                l.head = true;
                linears.push(l);
            };
            if family == Family::Roberta {
                head("classifier.dense", h, h);
                head("classifier.out_proj", k, h);
            } else {
                head("classifier", k, h);
            }
        }
        let spec = ArchSpec {
            family,
            summary,
            linears,
            other_params: other,
        };
        spec.check_fits(path, v)?;
        Ok(spec)
    }

    /// A LLaMA-family causal language model's description: per layer `self_attn.{q,k,v,o}_proj`
    /// and `mlp.{gate,up,down}_proj` (PEFT's `all-linear` targets); the embedding, the norms
    /// and an untied `lm_head` (never adapted) count as other parameters. No memory check:
    /// sizing a model needs none of its weights.
    fn from_decoder_config(
        v: &Value,
        path: &str,
        num_labels: Option<usize>,
    ) -> Result<Self, ArchError> {
        let c = crate::models::llama::LlamaConfig::from_json(v, path)?;
        Self::from_llama(&c, path, num_labels)
    }

    /// Reads a GGUF file's header (llama.cpp's metadata; no weights are read).
    pub fn from_gguf(path: &Path, num_labels: Option<usize>) -> Result<Self, ArchError> {
        use crate::models::llama::gguf::{GgufFile, config_from_gguf};
        let shown = path.display().to_string();
        let c = GgufFile::open(path)
            .and_then(|mut g| config_from_gguf(&mut g))
            .map_err(|e| ArchError::Field {
                path: shown.clone(),
                field: "GGUF metadata".into(),
                problem: e.to_string(),
            })?;
        Self::from_llama(&c, &shown, num_labels)
    }

    /// A LLaMA-family decoder's description from its config (`path` names it in errors).
    pub fn from_llama(
        c: &crate::models::llama::LlamaConfig,
        path: &str,
        num_labels: Option<usize>,
    ) -> Result<Self, ArchError> {
        use crate::models::llama::DecoderFamily;
        if let Some(k) = num_labels {
            return Err(ArchError::Field {
                path: path.into(),
                field: "model_type".into(),
                problem: format!(
                    "is `{}`, a causal language model: --num-labels {k} applies to encoder classifiers only",
                    c.family.model_type()
                ),
            });
        }
        let family = match c.family {
            DecoderFamily::Llama => Family::Llama,
            DecoderFamily::Mistral => Family::Mistral,
            DecoderFamily::Qwen2 => Family::Qwen2,
        };
        let (h, inter) = (c.hidden_size, c.intermediate_size);
        let q = c.num_attention_heads * c.head_dim;
        let kv = c.num_key_value_heads * c.head_dim;
        let mut linears = Vec::new();
        for i in 0..c.num_hidden_layers {
            let a = format!("model.layers.{i}.self_attn");
            let m = format!("model.layers.{i}.mlp");
            let lin = |path: String, out_features, in_features, bias| LinearSpec {
                path,
                out_features,
                in_features,
                bias,
                head: false,
            };
            linears.push(lin(format!("{a}.q_proj"), q, h, c.qkv_bias));
            linears.push(lin(format!("{a}.k_proj"), kv, h, c.qkv_bias));
            linears.push(lin(format!("{a}.v_proj"), kv, h, c.qkv_bias));
            linears.push(lin(format!("{a}.o_proj"), h, q, c.o_bias));
            linears.push(lin(format!("{m}.gate_proj"), inter, h, c.mlp_bias));
            linears.push(lin(format!("{m}.up_proj"), inter, h, c.mlp_bias));
            linears.push(lin(format!("{m}.down_proj"), h, inter, c.mlp_bias));
        }
        let embeddings = if c.tie_word_embeddings { 1 } else { 2 };
        let other = c
            .vocab_size
            .saturating_mul(h)
            .saturating_mul(embeddings)
            .saturating_add((2 * c.num_hidden_layers + 1).saturating_mul(h));
        let summary = format!(
            "{}, {} layers, hidden {h}, {} heads ({} key/value), intermediate {inter}, vocab {}, {} lm_head",
            c.family.model_type(),
            c.num_hidden_layers,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.vocab_size,
            if c.tie_word_embeddings {
                "tied"
            } else {
                "untied"
            }
        );
        Ok(ArchSpec {
            family,
            summary,
            linears,
            other_params: other,
        })
    }

    /// PEFT's default `target_modules` for this family: `q_proj,v_proj` for the LLaMA
    /// family, `query,value` for the encoders.
    pub fn default_targets(&self) -> &'static str {
        if self.family.is_causal_lm() {
            "q_proj,v_proj"
        } else {
            "query,value"
        }
    }

    /// Refuses a model whose f32 weights alone exceed the machine's memory (`MemTotal`).
    fn check_fits(&self, path: &str, v: &Value) -> Result<(), ArchError> {
        let bytes = (self.total_params() as u64).saturating_mul(4);
        let Some(mem) = crate::memory::total_bytes() else {
            return Ok(());
        };
        if bytes <= mem {
            return Ok(());
        }
        let fields: Vec<String> = FIELD_RANGES
            .iter()
            .filter_map(|(f, _, _)| v.get(*f).map(|x| format!("{f} = {x}")))
            .collect();
        Err(ArchError::TooLarge {
            path: path.into(),
            fields: fields.join(", "),
            params: crate::inspect::thousands(self.total_params()),
            gib: crate::memory::gib(bytes),
            mem_gib: crate::memory::gib(mem),
        })
    }

    /// All parameters of the model (linear modules, head included, plus the rest); saturates
    /// rather than wrapping.
    pub fn total_params(&self) -> usize {
        self.linears
            .iter()
            .map(LinearSpec::params)
            .fold(self.other_params, usize::saturating_add)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_parameter_counts() {
        // The figures Hugging Face reports for these checkpoints.
        let bert = ArchSpec::resolve("bert-base-uncased", None).unwrap();
        assert_eq!(bert.total_params(), 109_482_240);
        let roberta = ArchSpec::resolve("roberta-base", None).unwrap();
        assert_eq!(roberta.total_params(), 124_645_632);
        let minilm = ArchSpec::resolve("all-MiniLM-L6-v2", None).unwrap();
        assert_eq!(minilm.total_params(), 22_713_216);
        let vit = ArchSpec::resolve("vit-base-patch16-224", None).unwrap();
        assert_eq!(vit.total_params(), 86_389_248);
    }

    #[test]
    fn llama_family_parameter_counts() {
        // LLaMA-2-7B as its paper and Hugging Face report it; SmolLM2-135M from its GGUF.
        let llama = ArchSpec::resolve("llama-2-7b", None).unwrap();
        assert_eq!(llama.total_params(), 6_738_415_616);
        assert!(llama.family.is_causal_lm());
        assert_eq!(llama.default_targets(), "q_proj,v_proj");
        let smol = ArchSpec::resolve("smollm2-135m", None).unwrap();
        assert_eq!(smol.total_params(), 134_515_008);
        assert_eq!(smol.linears.len(), 30 * 7);
        assert!(smol.linears.iter().all(|l| !l.path.contains("lm_head")));
        let e = ArchSpec::resolve("smollm2-135m", Some(2))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--num-labels"), "{e}");
    }

    #[test]
    fn qwen2_biases_and_mistral_head_dim_count() {
        let v: Value = serde_json::from_str(
            r#"{"model_type":"qwen2","hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"vocab_size":100,"tie_word_embeddings":true}"#,
        )
        .unwrap();
        let q = ArchSpec::from_config(&v, "q", None).unwrap();
        // per layer: q 64·64+64, k and v 64·32+32 each, o 64·64, mlp 3·64·128, norms 2·64.
        let layer = 64 * 64 + 64 + 2 * (64 * 32 + 32) + 64 * 64 + 3 * 64 * 128 + 2 * 64;
        assert_eq!(q.total_params(), 2 * layer + 64 + 100 * 64);
        let v: Value = serde_json::from_str(
            r#"{"model_type":"mistral","hidden_size":64,"intermediate_size":128,"num_hidden_layers":1,"num_attention_heads":4,"num_key_value_heads":2,"head_dim":32,"vocab_size":100}"#,
        )
        .unwrap();
        let m = ArchSpec::from_config(&v, "m", None).unwrap();
        let qp = m
            .linears
            .iter()
            .find(|l| l.path.ends_with("q_proj"))
            .unwrap();
        assert_eq!((qp.out_features, qp.in_features), (128, 64));
    }

    #[test]
    fn heads_follow_hugging_face_names() {
        let r = ArchSpec::resolve("roberta-base", Some(2)).unwrap();
        assert!(
            r.linears
                .iter()
                .any(|l| l.path == "roberta.encoder.layer.11.attention.self.value")
        );
        assert!(
            r.linears
                .iter()
                .any(|l| l.path == "classifier.out_proj" && l.head)
        );
        assert!(!r.linears.iter().any(|l| l.path.contains("pooler")));
        let v = ArchSpec::resolve("vit-base-patch16-224", Some(10)).unwrap();
        assert!(
            v.linears
                .iter()
                .any(|l| l.path == "vit.encoder.layer.0.attention.attention.query")
        );
        assert_eq!(v.total_params(), 85_806_346); // ViTForImageClassification, 10 labels
    }

    #[test]
    fn bad_configs_name_the_field() {
        let v: Value = serde_json::from_str(r#"{"model_type":"bert","hidden_size":768}"#).unwrap();
        let e = ArchSpec::from_config(&v, "x/config.json", None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("num_hidden_layers") && e.contains("x/config.json"),
            "{e}"
        );
        let v: Value = serde_json::from_str(r#"{"model_type":"gpt2"}"#).unwrap();
        assert!(
            ArchSpec::from_config(&v, "c", None)
                .unwrap_err()
                .to_string()
                .contains("gpt2")
        );
        assert!(ArchSpec::resolve("no-such-model", None).is_err());
    }
}

//! A causal language model's tokenizer, its special tokens and its chat template, read from
//! a Hugging Face folder (`tokenizer.json`, `tokenizer_config.json`, `chat_template.jinja`,
//! `generation_config.json`) or from a GGUF file's metadata (`tokenizer.ggml.*`, byte-level
//! BPE only), as one [`LlmTokenizer`].

use std::path::Path;

use serde_json::{Value, json};
use tokenizers::Tokenizer;

use super::gguf::GgufFile;
use crate::models::ModelError;

/// Texts of control tokens that end a turn, whatever the file calls its end-of-sequence
/// token (llama.cpp's end-of-generation list).
const END_TEXTS: [&str; 9] = [
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "<|eom_id|>",
    "</s>",
];

/// A tokenizer with the special tokens generation needs.
#[derive(Clone)]
pub struct LlmTokenizer {
    /// The text ↔ id mapping (special tokens included as added tokens).
    pub tokenizer: Tokenizer,
    /// Beginning-of-sequence token.
    pub bos: Option<u32>,
    /// The end-of-sequence token (what templates call `eos_token`).
    pub eos: Option<u32>,
    /// Every token that ends generation: `eos`, end-of-turn tokens, and control tokens such
    /// as `<|im_end|>` or `<|eot_id|>`.
    pub stop_ids: Vec<u32>,
    /// The chat template (jinja), if the model has one.
    pub chat_template: Option<String>,
}

impl std::fmt::Debug for LlmTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlmTokenizer")
            .field("vocab", &self.tokenizer.get_vocab_size(true))
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("stop_ids", &self.stop_ids)
            .field("chat_template", &self.chat_template.is_some())
            .finish()
    }
}

fn file_err(path: &Path, reason: impl Into<String>) -> ModelError {
    ModelError::File {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

impl LlmTokenizer {
    /// The tokens' ids for `text`; `add_special` adds what the tokenizer adds around a
    /// sequence (a BOS for LLaMA 3; nothing for ChatML models). A rendered chat template
    /// already holds its special tokens: encode it with `add_special` false.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>, ModelError> {
        self.tokenizer
            .encode(text, add_special)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| ModelError::File {
                path: "(tokenizer)".into(),
                reason: format!("cannot encode the text: {e}"),
            })
    }

    /// The text of `ids`, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String, ModelError> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| ModelError::File {
                path: "(tokenizer)".into(),
                reason: format!("cannot decode tokens: {e}"),
            })
    }

    /// Whether `id` ends generation.
    pub fn is_stop(&self, id: u32) -> bool {
        self.stop_ids.contains(&id)
    }

    /// The BOS token's text (for chat templates' `bos_token`).
    pub fn bos_token(&self) -> Option<String> {
        self.bos.and_then(|id| self.tokenizer.id_to_token(id))
    }

    /// The EOS token's text (for chat templates' `eos_token`).
    pub fn eos_token(&self) -> Option<String> {
        self.eos.and_then(|id| self.tokenizer.id_to_token(id))
    }

    /// Fills `stop_ids` from `eos`, `extra` and the control tokens named in [`END_TEXTS`].
    fn with_stops(mut self, extra: &[u32]) -> Self {
        let mut ids: Vec<u32> = self.eos.into_iter().chain(extra.iter().copied()).collect();
        for t in END_TEXTS {
            if let Some(id) = self.tokenizer.token_to_id(t) {
                ids.push(id);
            }
        }
        ids.sort_unstable();
        ids.dedup();
        self.stop_ids = ids;
        self
    }

    /// Reads a Hugging Face folder: `tokenizer.json` (required), the chat template from
    /// `chat_template.jinja` or `tokenizer_config.json`, the special tokens from
    /// `tokenizer_config.json`, `generation_config.json` and `config.json`.
    pub fn from_folder(dir: &Path) -> Result<Self, ModelError> {
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.is_file() {
            return Err(file_err(
                dir,
                "the model folder has no tokenizer.json (needed to generate text)",
            ));
        }
        let tokenizer = Tokenizer::from_file(&tok_path)
            .map_err(|e| file_err(&tok_path, format!("not a readable tokenizer: {e}")))?;
        let tc = read_json_opt(&dir.join("tokenizer_config.json"))?;
        let gc = read_json_opt(&dir.join("generation_config.json"))?;
        let cc = read_json_opt(&dir.join("config.json"))?;
        let named = |field: &str| -> Option<u32> {
            let v = tc.as_ref()?.get(field)?;
            let text = v.as_str().or_else(|| v.get("content")?.as_str())?;
            tokenizer.token_to_id(text)
        };
        let ids = |v: &Option<Value>, field: &str| -> Vec<u32> {
            match v.as_ref().and_then(|v| v.get(field)) {
                Some(Value::Array(a)) => a
                    .iter()
                    .filter_map(|x| x.as_u64().and_then(|u| u32::try_from(u).ok()))
                    .collect(),
                Some(x) => x
                    .as_u64()
                    .and_then(|u| u32::try_from(u).ok())
                    .into_iter()
                    .collect(),
                None => Vec::new(),
            }
        };
        let gen_eos = ids(&gc, "eos_token_id");
        let cfg_eos = ids(&cc, "eos_token_id");
        let eos = named("eos_token")
            .or_else(|| gen_eos.first().copied())
            .or_else(|| cfg_eos.first().copied());
        let bos = named("bos_token")
            .or_else(|| ids(&gc, "bos_token_id").first().copied())
            .or_else(|| ids(&cc, "bos_token_id").first().copied());
        let jinja = dir.join("chat_template.jinja");
        let chat_template = if jinja.is_file() {
            Some(std::fs::read_to_string(&jinja).map_err(|e| file_err(&jinja, e.to_string()))?)
        } else {
            tc.as_ref()
                .and_then(|v| v.get("chat_template"))
                .and_then(template_of)
        };
        let extra: Vec<u32> = gen_eos.into_iter().chain(cfg_eos).collect();
        Ok(Self {
            tokenizer,
            bos,
            eos,
            stop_ids: Vec::new(),
            chat_template,
        }
        .with_stops(&extra))
    }

    /// Builds the tokenizer from a GGUF file's metadata (`tokenizer.ggml.model` `gpt2`:
    /// byte-level BPE); other tokenizer models are refused with an error naming them.
    pub fn from_gguf(g: &GgufFile) -> Result<Self, ModelError> {
        let path = Path::new(g.path());
        let model = g.meta_str("tokenizer.ggml.model")?.ok_or_else(|| {
            file_err(
                path,
                "metadata `tokenizer.ggml.model` is missing: the file has no tokenizer",
            )
        })?;
        if model != "gpt2" {
            let what = match model {
                "llama" => " (SentencePiece)",
                "bert" => " (WordPiece)",
                _ => "",
            };
            return Err(file_err(
                path,
                format!(
                    "metadata `tokenizer.ggml.model` is `{model}`{what}: only `gpt2` (byte-level BPE) tokenizers are supported in GGUF files; use the model's Hugging Face folder instead"
                ),
            ));
        }
        let strings = |key: &str| -> Result<Vec<String>, ModelError> {
            let a = g
                .meta_array(key)?
                .ok_or_else(|| file_err(path, format!("metadata `{key}` is missing")))?;
            a.iter()
                .enumerate()
                .map(|(i, v)| {
                    v.to_string().cloned().map_err(|_| {
                        file_err(path, format!("metadata `{key}[{i}]` must be a string"))
                    })
                })
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges = strings("tokenizer.ggml.merges")?;
        let types: Vec<i64> = match g.meta_array("tokenizer.ggml.token_type")? {
            None => vec![1; tokens.len()],
            Some(a) => a
                .iter()
                .map(|v| v.to_i32().map(i64::from).unwrap_or(1))
                .collect(),
        };
        if types.len() != tokens.len() {
            return Err(file_err(
                path,
                format!(
                    "metadata `tokenizer.ggml.token_type` has {} entries for {} tokens",
                    types.len(),
                    tokens.len()
                ),
            ));
        }
        let id = |key: &str| -> Result<Option<u32>, ModelError> {
            let Some(v) = g.meta_u64(key)? else {
                return Ok(None);
            };
            match u32::try_from(v) {
                Ok(i) if (i as usize) < tokens.len() => Ok(Some(i)),
                _ => Err(file_err(
                    path,
                    format!(
                        "metadata `{key}` is {v}, outside the {} tokens",
                        tokens.len()
                    ),
                )),
            }
        };
        let bos = id("tokenizer.ggml.bos_token_id")?;
        let eos = id("tokenizer.ggml.eos_token_id")?;
        let extra: Vec<u32> = [
            id("tokenizer.ggml.eot_token_id")?,
            id("tokenizer.ggml.eom_token_id")?,
        ]
        .into_iter()
        .flatten()
        .collect();
        let add_bos = g
            .meta_bool("tokenizer.ggml.add_bos_token")?
            .unwrap_or(false);
        let pre = g.meta_str("tokenizer.ggml.pre")?.unwrap_or("default");
        let spec = tokenizer_json(
            &tokens,
            &types,
            &merges,
            pre,
            if add_bos { bos } else { None },
        )
        .map_err(|reason| file_err(path, reason))?;
        let bytes = serde_json::to_vec(&spec).map_err(|e| file_err(path, e.to_string()))?;
        let tokenizer = Tokenizer::from_bytes(bytes)
            .map_err(|e| file_err(path, format!("cannot build the tokenizer: {e}")))?;
        let chat_template = g.meta_str("tokenizer.chat_template")?.map(str::to_string);
        Ok(Self {
            tokenizer,
            bos,
            eos,
            stop_ids: Vec::new(),
            chat_template,
        }
        .with_stops(&extra))
    }
}

/// A chat template from `tokenizer_config.json`: a string, or a list of named templates
/// (the one named `default`, else the first).
fn template_of(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Array(list) => {
            let pick = list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .or_else(|| list.first())?;
            pick.get("template")?.as_str().map(str::to_string)
        }
        _ => None,
    }
}

fn read_json_opt(path: &Path) -> Result<Option<Value>, ModelError> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| file_err(path, e.to_string()))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| file_err(path, format!("not valid JSON: {e}")))
}

/// LLaMA 3's pre-tokenizer regex (llama.cpp `llama-bpe`).
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's pre-tokenizer regex: LLaMA 3's with single digits.
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The Hugging Face pre-tokenizer for llama.cpp's `tokenizer.ggml.pre`, and whether BPE
/// ignores merges for whole words in the vocabulary (LLaMA 3).
fn pre_tokenizer(pre: &str) -> Result<(Value, bool), String> {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |regex: &str| json!({"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false});
    Ok(match pre {
        "default" | "gpt2" | "gpt-2" => (byte_level(true), false),
        "smollm" | "starcoder" | "refact" => (
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
            false,
        ),
        "llama3" | "llama-v3" | "llama-bpe" => (
            json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_REGEX), byte_level(false)]}),
            true,
        ),
        "qwen2" => (
            json!({"type": "Sequence", "pretokenizers": [split(QWEN2_REGEX), byte_level(false)]}),
            false,
        ),
        other => {
            return Err(format!(
                "metadata `tokenizer.ggml.pre` is `{other}`: supported pre-tokenizers are default, gpt2, smollm, starcoder, refact, llama-bpe (llama3) and qwen2"
            ));
        }
    })
}

/// A `tokenizer.json` document for byte-level BPE: control (type 3) and user-defined (type
/// 4) tokens become added tokens, control ones special; `bos` is prepended when given.
fn tokenizer_json(
    tokens: &[String],
    types: &[i64],
    merges: &[String],
    pre: &str,
    bos: Option<u32>,
) -> Result<Value, String> {
    let (pre_tokenizer, ignore_merges) = pre_tokenizer(pre)?;
    let mut vocab = serde_json::Map::with_capacity(tokens.len());
    let mut added = Vec::new();
    for (i, (t, ty)) in tokens.iter().zip(types).enumerate() {
        vocab.insert(t.clone(), json!(i));
        if *ty == 3 || *ty == 4 {
            added.push(json!({
                "id": i, "content": t, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": *ty == 3,
            }));
        }
    }
    let pairs = merges
        .iter()
        .enumerate()
        .map(|(i, m)| {
            m.split_once(' ')
                .map(|(a, b)| json!([a, b]))
                .ok_or_else(|| format!("metadata `tokenizer.ggml.merges[{i}]` (`{m}`) is not two tokens separated by a space"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let post = match bos {
        Some(id) => {
            let text = &tokens[id as usize];
            json!({"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": text, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": text, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": text, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {text.as_str(): {"id": text, "ids": [id], "tokens": [text]}}})
        }
        None => Value::Null,
    };
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": false, "byte_fallback": false, "ignore_merges": ignore_merges,
            "vocab": vocab, "merges": pairs,
        },
    }))
}

//! A tiny chat model and data for tests that train and talk to a language model: random
//! LLaMA weights (hidden 32, 2 layers), a word-level tokenizer, ChatML, and chat records
//! whose every answer is "yes".

use std::path::{Path, PathBuf};

use candle_core::Device;
use peft_studio::data::{CHATML, DataSource};
use peft_studio::export::merged::write_merged_llama;
use peft_studio::models::ModelSource;
use peft_studio::models::llama::{LlamaConfig, LlamaModel};
use peft_studio::models::weights::WeightReader;
use peft_studio::peft::{Method, Targets};
use peft_studio::train::TrainConfig;

/// The tokenizer's words.
pub const WORDS: [&str; 20] = [
    "[UNK]",
    "<|im_start|>",
    "<|im_end|>",
    "system",
    "user",
    "assistant",
    "is",
    "the",
    "sky",
    "blue",
    "grass",
    "green",
    "snow",
    "white",
    "?",
    "yes",
    "no",
    "maybe",
    "what",
    "colour",
];

/// A chat model folder: random weights (hidden 32, 2 layers, vocabulary 50), a word-level
/// tokenizer over [`WORDS`], ChatML with `<|im_end|>` as the end token.
pub fn chat_model(dir: &Path) -> PathBuf {
    let v = super::tiny_llama("llama", true);
    let cfg = LlamaConfig::from_json(&v, "tiny").unwrap();
    let mut r = WeightReader::random("", 0.5, 11, &Device::Cpu);
    let m = LlamaModel::load(&cfg, &mut r).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    write_merged_llama(&m, None, dir).unwrap();
    std::fs::write(dir.join("config.json"), v.to_string()).unwrap();
    let decoder = serde_json::json!({"type": "WordPiece", "prefix": "##", "cleanup": false});
    let tokenizer = word_level_tokenizer(&WORDS, decoder);
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    let tc = serde_json::json!({"eos_token": "<|im_end|>", "chat_template": CHATML});
    std::fs::write(dir.join("tokenizer_config.json"), tc.to_string()).unwrap();
    dir.to_path_buf()
}

/// Chat data whose every answer is "yes".
pub fn yes_data(dir: &Path) -> PathBuf {
    let questions = [
        "is the sky blue ?",
        "is the grass green ?",
        "is the snow white ?",
        "what colour is the sky ?",
    ];
    let mut lines = String::new();
    for i in 0..24 {
        let q = questions[i % questions.len()];
        lines.push_str(
            &serde_json::json!({"messages": [
                {"role": "user", "content": q},
                {"role": "assistant", "content": "yes"}
            ]})
            .to_string(),
        );
        lines.push('\n');
    }
    let path = dir.join("yes.jsonl");
    std::fs::write(&path, lines).unwrap();
    path
}

/// A LoRA r4 run on q/v, lr 5e-2, batch 4, `steps` steps, scored on 2 held-out questions.
pub fn config(model: &Path, data: &Path, steps: usize) -> TrainConfig {
    let mut cfg = TrainConfig::default();
    cfg.model.source = ModelSource::Folder {
        path: model.to_path_buf(),
    };
    cfg.model.max_length = 32;
    cfg.data.source = DataSource::Instruct {
        path: data.to_path_buf(),
        eval_path: None,
    };
    cfg.adapter.method = Method::Lora;
    cfg.adapter.rank = 4;
    cfg.adapter.alpha = Some(8.0);
    cfg.adapter.targets = Targets::List(vec!["q_proj".into(), "v_proj".into()]);
    cfg.optim.lr = 5e-2;
    cfg.optim.steps = Some(steps);
    cfg.optim.epochs = None;
    cfg.optim.batch_size = 4;
    cfg.optim.eval_batch_size = 4;
    cfg.optim.eval_every = steps;
    cfg.optim.warmup_steps = 0;
    cfg.generation.questions = 2;
    cfg.generation.max_new_tokens = 4;
    cfg
}

/// A `tokenizer.json` for a word-level tokenizer over `words` (ids in order): `[UNK]`,
/// `<|im_start|>` and `<|im_end|>` (ids 0–2) are special tokens, words and each punctuation run
/// are tokens (`Whitespace` pre-tokenizer), unknown words are `[UNK]`.
pub fn word_level_tokenizer(words: &[&str], decoder: serde_json::Value) -> serde_json::Value {
    let vocab: serde_json::Map<String, serde_json::Value> = words
        .iter()
        .enumerate()
        .map(|(i, w)| (w.to_string(), serde_json::json!(i)))
        .collect();
    let special = |id: usize, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true})
    };
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(0, "[UNK]"), special(1, "<|im_start|>"), special(2, "<|im_end|>")],
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": decoder,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    })
}

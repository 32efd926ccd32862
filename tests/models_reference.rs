//! The models against an independent numpy implementation of Hugging Face's BERT, RoBERTa and
//! ViT (`scripts/model_reference.py`; weights and expected outputs in `tests/data/models/`).

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use common::rel_err;
use peft_studio::models::bert::BertClassifier;
use peft_studio::models::vit::VitClassifier;
use peft_studio::models::weights::WeightReader;
use peft_studio::models::{Batch, Classifier, ModelSource, load_model};
use peft_studio::peft::linear::LinearLayers;

fn dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/models")
        .join(name)
}

fn reference(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir(name).join("reference.safetensors"), &Device::Cpu).unwrap()
}

fn ids(t: &Tensor) -> Tensor {
    t.to_dtype(DType::U32).unwrap()
}

/// A tiny model's `config.json` and a reader of its weights (backbone prefix `prefix`).
fn open(name: &str, prefix: &str) -> (serde_json::Value, WeightReader) {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir(name).join("config.json")).unwrap())
            .unwrap();
    let r = WeightReader::open(
        &dir(name).join("model.safetensors"),
        prefix,
        0.02,
        0,
        &Device::Cpu,
    )
    .unwrap();
    (v, r)
}

fn load(name: &str, labels: usize) -> Box<dyn Classifier> {
    // The tiny models have no tokenizer: build from config and weights directly.
    if name.starts_with("tiny-vit") {
        let (v, mut r) = open(name, "vit.");
        Box::new(VitClassifier::load(&v, name, &mut r, labels, false).unwrap())
    } else {
        let prefix = if name.starts_with("tiny-roberta") {
            "roberta."
        } else {
            "bert."
        };
        let (v, mut r) = open(name, prefix);
        Box::new(BertClassifier::load(&v, name, &mut r, labels, false).unwrap())
    }
}

const TOL: f64 = 1e-4;

#[test]
fn bert_matches_the_reference() {
    let r = reference("tiny-bert");
    let (v, mut w) = open("tiny-bert", "bert.");
    let m = BertClassifier::load(&v, "tiny-bert", &mut w, 3, false).unwrap();
    assert!(
        w.initialised.is_empty(),
        "everything should load: {:?}",
        w.initialised
    );
    let mask = r["attention_mask"].to_dtype(DType::F32).unwrap();
    let hidden = m
        .encode(
            &ids(&r["input_ids"]),
            &mask,
            Some(&ids(&r["token_type_ids"])),
            false,
        )
        .unwrap();
    assert!(rel_err(&hidden, &r["last_hidden_state"]) < TOL);
    let pooled = m.pool(&hidden, false).unwrap().unwrap();
    assert!(rel_err(&pooled, &r["pooled"]) < TOL);
    // Without token types the classifier path runs through `forward_t`; check logits via the
    // same hidden state.
    let logits = m.head()[0].forward(&pooled).unwrap();
    assert!(
        rel_err(&logits, &r["logits"]) < TOL,
        "{}",
        rel_err(&logits, &r["logits"])
    );
}

#[test]
fn bare_bert_checkpoints_load_with_a_new_head() {
    let r = reference("tiny-bert-bare");
    let (v, mut w) = open("tiny-bert-bare", "bert.");
    let m = BertClassifier::load(&v, "tiny-bert-bare", &mut w, 2, false).unwrap();
    assert_eq!(
        w.initialised,
        ["classifier.weight", "classifier.bias"],
        "only the head is new"
    );
    let mask = r["attention_mask"].to_dtype(DType::F32).unwrap();
    let hidden = m
        .encode(
            &ids(&r["input_ids"]),
            &mask,
            Some(&ids(&r["token_type_ids"])),
            false,
        )
        .unwrap();
    assert!(rel_err(&hidden, &r["last_hidden_state"]) < TOL);
    assert!(
        m.linears()
            .iter()
            .any(|l| l.path() == "bert.encoder.layer.1.attention.self.value")
    );
}

#[test]
fn roberta_matches_the_reference() {
    let r = reference("tiny-roberta");
    let m = load("tiny-roberta", 2);
    let batch = Batch::Tokens {
        ids: ids(&r["input_ids"]),
        mask: r["attention_mask"].to_dtype(DType::F32).unwrap(),
    };
    let logits = m.forward_t(&batch, false).unwrap();
    assert!(
        rel_err(&logits, &r["logits"]) < TOL,
        "{}",
        rel_err(&logits, &r["logits"])
    );
}

#[test]
fn bert_classifier_forward_matches_without_token_types() {
    // Rows of tiny-bert whose token types are all zero give the reference logits through the
    // public classifier path as well.
    let r = reference("tiny-bert");
    let m = load("tiny-bert", 3);
    let types = r["token_type_ids"]
        .to_dtype(DType::F32)
        .unwrap()
        .sum(1)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let row = types
        .iter()
        .position(|&s| s == 0.0)
        .expect("a row without token types");
    let batch = Batch::Tokens {
        ids: ids(&r["input_ids"].narrow(0, row, 1).unwrap()),
        mask: r["attention_mask"]
            .narrow(0, row, 1)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap(),
    };
    let logits = m.forward_t(&batch, false).unwrap();
    assert!(rel_err(&logits, &r["logits"].narrow(0, row, 1).unwrap()) < TOL);
}

#[test]
fn vit_matches_the_reference_rgb_and_grey() {
    for (name, labels) in [("tiny-vit", 4), ("tiny-vit-gray", 10)] {
        let r = reference(name);
        let m = load(name, labels);
        let pixels = r["pixel_values"].to_dtype(DType::F32).unwrap();
        let logits = m.forward_t(&Batch::Images(pixels), false).unwrap();
        let err = rel_err(&logits, &r["logits"]);
        assert!(err < TOL, "{name}: {err}");
    }
}

#[test]
fn adapters_on_a_real_model_preserve_its_output_and_train_only_themselves() {
    use peft_studio::peft::linear::{attach_adapters, trainable_vars};
    use peft_studio::peft::{AdapterConfig, Method};
    let r = reference("tiny-vit");
    let pixels = r["pixel_values"].to_dtype(DType::F32).unwrap();
    for method in Method::ALL {
        let mut m = load("tiny-vit", 4);
        let before = m.forward_t(&Batch::Images(pixels.clone()), false).unwrap();
        let report = attach_adapters(m.as_mut(), &AdapterConfig::new(method, 4)).unwrap();
        assert_eq!(report.layers.len(), 4, "query and value of 2 layers");
        let after = m.forward_t(&Batch::Images(pixels.clone()), false).unwrap();
        assert!(rel_err(&after, &before) < 1e-5, "{method}");
        let vars = trainable_vars(m.as_ref());
        let loss = after.sqr().unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        for (name, v) in &vars {
            assert!(grads.get(v).is_some(), "{method}: {name} has no gradient");
        }
    }
}

#[test]
fn wrong_shapes_and_missing_files_are_named() {
    let tmp = std::env::temp_dir().join(format!("peft-studio-models-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir("tiny-vit").join("config.json")).unwrap(),
    )
    .unwrap();
    v["hidden_size"] = 32.into();
    v["num_attention_heads"] = 4.into();
    std::fs::write(tmp.join("config.json"), v.to_string()).unwrap();
    std::fs::copy(
        dir("tiny-vit").join("model.safetensors"),
        tmp.join("model.safetensors"),
    )
    .unwrap();
    let e = load_model(
        &ModelSource::Folder { path: tmp.clone() },
        4,
        false,
        0,
        &candle_core::Device::Cpu,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        e.contains("model.safetensors") && e.contains("vit.embeddings.cls_token"),
        "{e}"
    );
    std::fs::remove_file(tmp.join("model.safetensors")).unwrap();
    let e = load_model(
        &ModelSource::Folder { path: tmp.clone() },
        4,
        false,
        0,
        &candle_core::Device::Cpu,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("model.safetensors"), "{e}");
    let e = load_model(
        &ModelSource::Folder {
            path: tmp.join("nope"),
        },
        4,
        false,
        0,
        &candle_core::Device::Cpu,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("config.json"), "{e}");
    std::fs::remove_dir_all(&tmp).unwrap();
}

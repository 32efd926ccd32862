//! The real pretrained text model, all-MiniLM-L6-v2, on the SpamAssassin corpus. Both come
//! from `scripts/fetch-models.sh` (git-ignored `downloads/`); without them these tests skip.

use std::path::PathBuf;

use peft_studio::models::{ModelSource, load_model};
use peft_studio::peft::linear::attach_adapters;
use peft_studio::peft::{AdapterConfig, Method};
use peft_studio::train::batches::EncodedSplit;
use peft_studio::train::{NeverStop, RunStatus, RunStore, TrainConfig, train};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn available() -> bool {
    let ok = root()
        .join("downloads/all-MiniLM-L6-v2/model.safetensors")
        .is_file()
        && root().join("downloads/spam-assassin.jsonl").is_file();
    if !ok {
        eprintln!(
            "SKIPPED: all-MiniLM-L6-v2 or the spam corpus is absent; run scripts/fetch-models.sh"
        );
    }
    ok
}

#[test]
fn minilm_loads_and_adapters_preserve_its_output() {
    if !available() {
        return;
    }
    let source = ModelSource::Folder {
        path: root().join("downloads/all-MiniLM-L6-v2"),
    };
    let loaded = load_model(&source, 2, true, 0, &candle_core::Device::Cpu).unwrap();
    assert_eq!(
        peft_studio::models::parameter_count(loaded.model.as_ref()),
        22_713_216 + 384 * 2 + 2,
        "MiniLM's 22.7 M parameters plus a 2-way head"
    );
    let data = peft_studio::data::load(&peft_studio::data::DataConfig {
        source: peft_studio::data::DataSource::Text {
            path: root().join("downloads/spam-assassin.jsonl"),
            text_column: "text".into(),
            label_column: "label".into(),
        },
        max_eval: Some(8),
        ..Default::default()
    })
    .unwrap();
    let split = EncodedSplit::new(
        &data.eval,
        loaded.model.input(),
        loaded.tokenizer.as_ref(),
        64,
    )
    .unwrap();
    let idx: Vec<usize> = (0..split.len()).collect();
    let (batch, _) = split.batch(&idx, &candle_core::Device::Cpu).unwrap();
    let before = loaded.model.forward_t(&batch, false).unwrap();
    for method in Method::ALL {
        let mut m = load_model(&source, 2, true, 0, &candle_core::Device::Cpu)
            .unwrap()
            .model;
        let report = attach_adapters(m.as_mut(), &AdapterConfig::new(method, 8)).unwrap();
        assert_eq!(report.layers.len(), 12);
        let after = m.forward_t(&batch, false).unwrap();
        let d = (after - &before)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-3, "{method}: output moved by {d} at init");
    }
}

#[test]
fn lora_on_minilm_learns_spam() {
    if !available() {
        return;
    }
    let preset = root().join("presets/minilm-spam-lora.toml");
    let path = root().join("downloads/all-MiniLM-L6-v2");
    let data = root().join("downloads/spam-assassin.jsonl");
    let cfg = TrainConfig::from_preset(
        &preset,
        &[
            format!("model.source.path={:?}", path.display().to_string()),
            format!("data.source.path={:?}", data.display().to_string()),
            "optim.steps=40".into(),
            "optim.eval_every=40".into(),
            "optim.lr=2e-3".into(),
            "data.max_train=640".into(),
            "data.max_eval=200".into(),
        ],
    )
    .unwrap();
    let dir = std::env::temp_dir().join(format!("peft-studio-minilm-{}", std::process::id()));
    let store = RunStore::new(&dir);
    let s = train(&cfg, &store, &mut NeverStop, &mut |_| {}).unwrap();
    assert_eq!(s.status, RunStatus::Finished);
    let acc = s.final_eval.unwrap().accuracy;
    // The majority class (ham) is 69% of the corpus.
    assert!(acc > 0.8, "eval accuracy {acc}");
    std::fs::remove_dir_all(&dir).unwrap();
}

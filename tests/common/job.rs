//! A small text-classification task, its preset, and a finished PEFT + accelerate job (the
//! folder `export-job` writes, with the output `train.py` would leave) for the job tests.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use peft_studio::job::{ExportJobOptions, export_job};
use peft_studio::train::TrainConfig;
use serde_json::json;

use super::TempDir;

/// A labelled text file (40 rows, 2 classes) and a model folder with a BERT config.
pub fn text_task(t: &TempDir) -> (PathBuf, PathBuf) {
    let mut lines = String::new();
    for i in 0..40 {
        let label = if i % 3 == 0 { "spam" } else { "ham" };
        lines += &json!({ "text": format!("message number {i}"), "label": label }).to_string();
        lines.push('\n');
    }
    let data = t.write("data/texts.jsonl", lines.as_bytes());
    let model = t.path("model/config.json");
    std::fs::write(&model, r#"{"model_type": "bert"}"#).unwrap();
    (data, model.parent().unwrap().to_path_buf())
}

/// A LoRA/SVFit/LoLDU preset on the text task (`extra` goes in `[adapter]`).
pub fn preset(data: &Path, model: &Path, method: &str, extra: &str) -> TrainConfig {
    let text = format!(
        r#"name = "job test"
mode = "adapter"
[model]
source = {{ kind = "folder", path = "{}" }}
max_length = 48
[data]
source = {{ kind = "text", path = "{}" }}
eval_fraction = 0.25
split_seed = 3
[adapter]
method = "{method}"
rank = 6
targets = ["query", "value"]
{extra}
[optim]
lr = 0.004
head_lr = 0.002
warmup_steps = 5
schedule = "cosine"
batch_size = 6
grad_accum = 2
steps = 17
eval_every = 5
eval_batch_size = 10
seed = 11
"#,
        model.display(),
        data.display()
    );
    TrainConfig::from_toml_str(&text, "test.toml", &[]).unwrap()
}

/// A job folder exported from a LoRA preset, with the output its train.py would write.
pub fn finished_job(t: &TempDir) -> PathBuf {
    let (data, model) = text_task(t);
    let cfg = preset(&data, &model, "lora", "alpha = 12.0");
    let job = t.0.join("job");
    export_job(
        &cfg,
        Path::new("test.toml"),
        &job,
        &ExportJobOptions::default(),
    )
    .unwrap();
    let out = job.join("output");
    std::fs::create_dir_all(out.join("adapter")).unwrap();
    let mut metrics = String::new();
    for step in 1..=17 {
        metrics += &json!({"kind": "step", "step": step, "loss": 1.0 / step as f64,
                           "lr": 0.004, "secs": 0.5})
        .to_string();
        metrics.push('\n');
        if step % 5 == 0 || step == 17 {
            metrics += &json!({"kind": "eval", "step": step, "loss": 0.4,
                               "accuracy": if step == 10 { 0.9 } else { 0.8 }})
            .to_string();
            metrics.push('\n');
        }
    }
    std::fs::write(out.join("metrics.jsonl"), metrics).unwrap();
    std::fs::write(
        out.join("job_summary.json"),
        json!({"trainable": 1234, "total": 99999, "steps_done": 17, "total_steps": 17,
               "wall_secs": 12.5, "secs_per_step": 0.5, "peak_rss_mib": 700.0,
               "num_processes": 2, "distributed_type": "DistributedType.MULTI_CPU",
               "started_at": "2026-11-30T01:00:00+00:00"})
        .to_string(),
    )
    .unwrap();
    write_lora(&out.join("adapter"), "LORA");
    job
}

/// A PEFT adapter folder (`peft_type`) for the text task's model.
pub fn write_lora(dir: &Path, peft_type: &str) {
    let dev = Device::Cpu;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let key = "base_model.model.bert.encoder.layer.0.attention.self.query";
    tensors.insert(
        format!("{key}.lora_A.weight"),
        Tensor::zeros((6, 8), candle_core::DType::F32, &dev).unwrap(),
    );
    tensors.insert(
        format!("{key}.lora_B.weight"),
        Tensor::zeros((8, 6), candle_core::DType::F32, &dev).unwrap(),
    );
    tensors.insert(
        "base_model.model.classifier.weight".into(),
        Tensor::zeros((2, 8), candle_core::DType::F32, &dev).unwrap(),
    );
    candle_core::safetensors::save(&tensors, dir.join("adapter_model.safetensors")).unwrap();
    std::fs::write(
        dir.join("adapter_config.json"),
        json!({"peft_type": peft_type, "r": 6, "lora_alpha": 12.0,
               "target_modules": ["query", "value"], "modules_to_save": ["classifier"]})
        .to_string(),
    )
    .unwrap();
}

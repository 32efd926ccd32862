//! The MiniLM benchmark: the real trainer on all-MiniLM-L6-v2 (batch 16 × 64 tokens, AdamW), and
//! the peer's equivalent of each variant.

use std::path::{Path, PathBuf};

use super::StepStats;
use super::machine::ProcCounters;
use crate::device::DeviceChoice;

/// The model folder both sides read (from `scripts/fetch-models.sh`), relative to the repository.
pub const MINILM_DIR: &str = "downloads/all-MiniLM-L6-v2";

/// The corpus our side trains on (from `scripts/fetch-models.sh`).
pub const SPAM_DATA: &str = "downloads/spam-assassin.jsonl";

/// The MiniLM benchmark's variants: the preset each runs (under `presets/`); `-bf16` adds
/// `model.matmul_precision = "bf16"` (the frozen products in bf16 on AMX or AVX512-BF16; for
/// full fine-tuning every product of the trainable weights, as autocast does).
pub const MINILM_VARIANTS: [(&str, &str); 8] = [
    ("lora", "minilm-spam-lora.toml"),
    ("lora-bf16", "minilm-spam-lora.toml"),
    ("svfit", "minilm-spam-svfit.toml"),
    ("svfit-bf16", "minilm-spam-svfit.toml"),
    ("loldu", "minilm-spam-loldu.toml"),
    ("loldu-bf16", "minilm-spam-loldu.toml"),
    ("full", "minilm-spam-full.toml"),
    ("full-bf16", "minilm-spam-full.toml"),
];

/// The peer's `--mode` for a variant; `None` where PEFT has no such method (SVFit, LoLDU).
pub fn peer_mode(variant: &str) -> Option<&'static str> {
    match variant {
        "lora" | "lora-bf16" => Some("lora"),
        "full" | "full-bf16" => Some("full"),
        _ => None,
    }
}

/// The arguments of the peer's `minilm_step.py` for `mode`: the same batch (16 × 64), rank 8,
/// the same weights (our model folder), `threads` threads and `steps` timed steps after the first.
pub fn peer_args(mode: &str, steps: usize, threads: usize, model_dir: &Path) -> Vec<String> {
    vec![
        "--mode".into(),
        mode.into(),
        "--steps".into(),
        (steps + 1).to_string(),
        "--threads".into(),
        threads.to_string(),
        "--batch".into(),
        "16".into(),
        "--seq".into(),
        "64".into(),
        "--rank".into(),
        "8".into(),
        "--model-dir".into(),
        model_dir.display().to_string(),
    ]
}

/// Checks that the model, the corpus and the variant's preset are there (before any work).
pub fn check_inputs(variants: &[&str]) -> anyhow::Result<()> {
    for f in [
        PathBuf::from(MINILM_DIR).join("model.safetensors"),
        PathBuf::from(SPAM_DATA),
    ] {
        anyhow::ensure!(
            f.is_file(),
            "the MiniLM benchmark needs {}: run scripts/fetch-models.sh first (from the repository root)",
            f.display()
        );
    }
    for v in variants {
        let p = preset(v)?;
        anyhow::ensure!(p.is_file(), "preset {} is missing", p.display());
    }
    Ok(())
}

/// The preset of variant `v`.
pub fn preset(v: &str) -> anyhow::Result<PathBuf> {
    MINILM_VARIANTS
        .iter()
        .find(|(name, _)| *name == v)
        .map(|(_, p)| PathBuf::from("presets").join(p))
        .ok_or_else(|| {
            anyhow::anyhow!(
                "unknown MiniLM variant `{v}` (one of: {})",
                MINILM_VARIANTS.map(|(n, _)| n).join(", ")
            )
        })
}

/// One MiniLM variant: `steps` timed AdamW steps (after 2 warm-up steps) of the real trainer at
/// batch 16 × 64 tokens, from the variant's preset.
pub fn minilm(variant: &str, steps: usize, device: DeviceChoice) -> anyhow::Result<StepStats> {
    let preset = preset(variant)?;
    use crate::train::{Event, MetricLine, NeverStop, RunStore, TrainConfig};
    anyhow::ensure!(
        (1..=10_000).contains(&steps),
        "--steps must be 1 to 10000, got {steps}"
    );
    const WARMUP: usize = 2;
    let total = steps + WARMUP;
    let bf16 = super::split_precision(variant).1 == crate::peft::MatmulPrecision::Bf16;
    let overrides = [
        format!(
            "model.matmul_precision={}",
            if bf16 { "bf16" } else { "f32" }
        ),
        format!("device={device}"),
        format!("optim.steps={total}"),
        format!("optim.eval_every={total}"),
        "optim.batch_size=16".to_string(),
        "optim.grad_accum=1".to_string(),
        "model.max_length=64".to_string(),
        "data.max_train=400".to_string(),
        "data.max_eval=16".to_string(),
    ];
    let cfg = TrainConfig::from_preset(&preset, &overrides)?;
    let dir = std::env::temp_dir().join(format!("peft-studio-bench-{}", std::process::id()));
    let store = RunStore::new(&dir);
    // Counters over the timed steps only: after warm-up step WARMUP, after the last step.
    let (mut before, mut after) = (None, None);
    let mut on_event = |e: Event| {
        if let Event::Step { step, .. } = e {
            if step == WARMUP {
                before = ProcCounters::read();
            } else if step == total {
                after = ProcCounters::read();
            }
        }
    };
    let result = crate::train::train(&cfg, &store, &mut NeverStop, &mut on_event);
    let summary = match result {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e.into());
        }
    };
    let mut times: Vec<f64> = store
        .metrics(&summary.id)?
        .into_iter()
        .filter_map(|m| match m {
            MetricLine::Step { step, secs, .. } if step > WARMUP => Some(secs),
            _ => None,
        })
        .collect();
    let _ = std::fs::remove_dir_all(&dir);
    anyhow::ensure!(!times.is_empty(), "no timed step");
    times.sort_by(f64::total_cmp);
    let counters = before.zip(after).map(|(a, b)| b.since(&a, steps));
    Ok(StepStats {
        variant: if bf16 {
            format!("{} bf16", summary.name)
        } else {
            summary.name.clone()
        },
        steps,
        secs_per_step: times[times.len() / 2],
        best_secs: times[0],
        peak_rss_mib: summary.peak_rss_mib,
        trainable: summary.trainable,
        minor_faults_per_step: counters.map(|c| c.0),
        cpu_percent: counters.map(|c| c.1),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variants_map_to_presets_and_peer_modes() {
        assert_eq!(
            preset("lora").unwrap(),
            Path::new("presets/minilm-spam-lora.toml")
        );
        let err = preset("qlora").unwrap_err().to_string();
        assert!(
            err.contains("lora, lora-bf16, svfit, svfit-bf16, loldu, loldu-bf16, full, full-bf16"),
            "{err}"
        );
        assert_eq!(preset("lora-bf16").unwrap(), preset("lora").unwrap());
        assert_eq!(peer_mode("lora-bf16"), Some("lora"));
        assert_eq!(peer_mode("full"), Some("full"));
        assert_eq!(peer_mode("full-bf16"), Some("full"));
        assert_eq!(preset("full-bf16").unwrap(), preset("full").unwrap());
        assert_eq!(peer_mode("svfit"), None);
        let a = peer_args("lora", 5, 2, Path::new("/m"));
        assert_eq!(a[..6], ["--mode", "lora", "--steps", "6", "--threads", "2"]);
        assert_eq!(a.last().map(String::as_str), Some("/m"));
        assert!(minilm("lora", 0, DeviceChoice::Cpu).is_err());
    }
}

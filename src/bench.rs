//! Benchmarks: seconds per training step and peak resident memory, written as a table.
//!
//! Each variant runs in its own child process (`peft-studio bench <suite> --variant V`), so
//! every peak-memory figure is that variant's alone.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use serde::{Deserialize, Serialize};

use crate::memory;
use crate::peft::linear::{LayerSet, attach_adapters, trainable_vars};
use crate::peft::{AdaptedLinear, AdapterConfig, FrozenGrad, Method, Targets};

/// One measured variant.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepStats {
    /// What ran.
    pub variant: String,
    /// Timed steps.
    pub steps: usize,
    /// Median seconds per training step.
    pub secs_per_step: f64,
    /// Fastest step.
    pub best_secs: f64,
    /// Peak resident memory of the process, MiB.
    pub peak_rss_mib: f64,
    /// Trainable values.
    pub trainable: usize,
}

/// Shape of the frozen-backward benchmark: a stack of BERT-base-sized layers.
#[derive(Debug, Clone, Copy)]
pub struct StackShape {
    /// Width (768).
    pub width: usize,
    /// Layers (12).
    pub layers: usize,
    /// Batch (16).
    pub batch: usize,
    /// Tokens per sequence (64).
    pub tokens: usize,
}

impl Default for StackShape {
    fn default() -> Self {
        Self {
            width: 768,
            layers: 12,
            batch: 16,
            tokens: 64,
        }
    }
}

/// A stack of `layers` frozen `width×width` linear layers with GELU between them, each with a
/// LoRA r=8 (B set non-zero so every gradient is live).
pub fn lora_stack(shape: StackShape, mode: FrozenGrad, seed: u64) -> anyhow::Result<LayerSet> {
    let dev = Device::Cpu;
    let mut set = LayerSet::default();
    for i in 0..shape.layers {
        let w = seeded_normal(&[shape.width, shape.width], 0.02, seed + i as u64, &dev)?;
        let b = Tensor::zeros(shape.width, DType::F32, &dev)?;
        let mut l = AdaptedLinear::new(format!("layers.{i}.dense"), w, Some(b));
        l.set_frozen_grad(mode);
        set.layers.push(l);
    }
    let mut cfg = AdapterConfig::new(Method::Lora, 8);
    cfg.targets = Targets::List(vec!["dense".into()]);
    cfg.seed = seed;
    attach_adapters(&mut set, &cfg)?;
    for (name, var) in trainable_vars(&set) {
        if name.ends_with("lora_B") {
            let dims = var.dims().to_vec();
            var.set(&seeded_normal(&dims, 0.01, seed ^ 77, &dev)?)?;
        }
    }
    Ok(set)
}

/// Reproducible N(0, std²) values.
pub fn seeded_normal(dims: &[usize], std: f32, seed: u64, dev: &Device) -> anyhow::Result<Tensor> {
    use rand::SeedableRng;
    use rand_distr::{Distribution, Normal};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let d = Normal::new(0.0f32, std)?;
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n).map(|_| d.sample(&mut rng)).collect();
    Ok(Tensor::from_vec(v, dims, dev)?)
}

/// Forward through the stack: `gelu(layer(x))` for every layer.
pub fn stack_forward(set: &LayerSet, x: &Tensor) -> anyhow::Result<Tensor> {
    let mut y = x.clone();
    for l in &set.layers {
        y = l.forward_t(&y, true)?.gelu()?;
    }
    Ok(y)
}

/// Times `steps` AdamW steps (after `warmup`) on the LoRA stack with the given frozen path.
pub fn frozen_backward(mode: FrozenGrad, steps: usize, warmup: usize) -> anyhow::Result<StepStats> {
    let shape = StackShape::default();
    let set = lora_stack(shape, mode, 1)?;
    let vars: Vec<_> = trainable_vars(&set).into_iter().map(|(_, v)| v).collect();
    let trainable = vars.iter().map(|v| v.elem_count()).sum();
    let mut opt = AdamW::new(
        vars,
        ParamsAdamW {
            lr: 1e-4,
            ..Default::default()
        },
    )?;
    let x = seeded_normal(
        &[shape.batch, shape.tokens, shape.width],
        1.0,
        9,
        &Device::Cpu,
    )?;
    let mut times = Vec::new();
    for i in 0..warmup + steps {
        let t = Instant::now();
        let loss = stack_forward(&set, &x)?.sqr()?.mean_all()?;
        opt.backward_step(&loss)?;
        if i >= warmup {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(StepStats {
        variant: match mode {
            FrozenGrad::Plain => "plain candle matmul (frozen W gradient computed)".into(),
            FrozenGrad::Skip => "frozen-matmul custom op (input gradient only)".into(),
        },
        steps,
        secs_per_step: times[times.len() / 2],
        best_secs: times[0],
        peak_rss_mib: memory::peak_rss_bytes()
            .map(memory::mib)
            .unwrap_or(f64::NAN),
        trainable,
    })
}

/// A markdown table of measured variants.
pub fn markdown_table(title: &str, rows: &[StepStats]) -> String {
    let mut s = format!(
        "## {title}\n\n| variant | trainable | s/step (median) | s/step (best) | peak RSS (MiB) |\n| --- | ---: | ---: | ---: | ---: |\n"
    );
    for r in rows {
        s += &format!(
            "| {} | {} | {:.3} | {:.3} | {:.0} |\n",
            r.variant,
            crate::inspect::thousands(r.trainable),
            r.secs_per_step,
            r.best_secs,
            r.peak_rss_mib
        );
    }
    s
}

/// The MiniLM benchmark's variants: the preset each runs (under `presets/`).
pub const MINILM_VARIANTS: [(&str, &str); 4] = [
    ("lora", "minilm-spam-lora.toml"),
    ("svfit", "minilm-spam-svfit.toml"),
    ("loldu", "minilm-spam-loldu.toml"),
    ("full", "minilm-spam-full.toml"),
];

/// One MiniLM variant: `steps` timed AdamW steps (after 2 warm-up steps) of the real trainer at
/// batch 16 × 64 tokens, from the preset at `preset`.
pub fn minilm(preset: &std::path::Path, steps: usize) -> anyhow::Result<StepStats> {
    use crate::train::{MetricLine, NeverStop, RunStore, TrainConfig};
    let total = steps + 2;
    let overrides = [
        format!("optim.steps={total}"),
        format!("optim.eval_every={total}"),
        "optim.batch_size=16".to_string(),
        "optim.grad_accum=1".to_string(),
        "model.max_length=64".to_string(),
        "data.max_train=400".to_string(),
        "data.max_eval=16".to_string(),
    ];
    let cfg = TrainConfig::from_preset(preset, &overrides)?;
    let dir = std::env::temp_dir().join(format!("peft-studio-bench-{}", std::process::id()));
    let store = RunStore::new(&dir);
    let summary = crate::train::train(&cfg, &store, &mut NeverStop, &mut |_| {})?;
    let mut times: Vec<f64> = store
        .metrics(&summary.id)?
        .into_iter()
        .filter_map(|m| match m {
            MetricLine::Step { step, secs, .. } if step > 2 => Some(secs),
            _ => None,
        })
        .collect();
    let _ = std::fs::remove_dir_all(&dir);
    anyhow::ensure!(!times.is_empty(), "no timed step");
    times.sort_by(f64::total_cmp);
    Ok(StepStats {
        variant: summary.name.clone(),
        steps,
        secs_per_step: times[times.len() / 2],
        best_secs: times[0],
        peak_rss_mib: summary.peak_rss_mib,
        trainable: summary.trainable,
    })
}

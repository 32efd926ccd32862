//! The frozen-backward benchmark: a LoRA r=8 training step on a stack of BERT-base-sized frozen
//! layers, with candle's plain matmul backward or the frozen-matmul op.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};

use super::StepStats;
use super::machine::ProcCounters;
use crate::memory;
use crate::peft::linear::{LayerSet, attach_adapters, trainable_vars};
use crate::peft::{AdaptedLinear, AdapterConfig, FrozenGrad, Method, Targets};

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
pub fn lora_stack(
    shape: StackShape,
    mode: FrozenGrad,
    seed: u64,
    dev: &Device,
) -> anyhow::Result<LayerSet> {
    let mut set = LayerSet::default();
    for i in 0..shape.layers {
        let w = seeded_normal(&[shape.width, shape.width], 0.02, seed + i as u64, dev)?;
        let b = Tensor::zeros(shape.width, DType::F32, dev)?;
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
            var.set(&seeded_normal(&dims, 0.01, seed ^ 77, dev)?)?;
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
/// `steps` must be at least 1.
pub fn frozen_backward(
    mode: FrozenGrad,
    steps: usize,
    warmup: usize,
    device: &Device,
) -> anyhow::Result<StepStats> {
    anyhow::ensure!(
        steps >= 1,
        "the benchmark needs at least 1 timed step, got {steps}"
    );
    let shape = StackShape::default();
    let set = lora_stack(shape, mode, 1, device)?;
    let vars: Vec<_> = trainable_vars(&set).into_iter().map(|(_, v)| v).collect();
    let trainable = vars.iter().map(|v| v.elem_count()).sum();
    let mut opt = AdamW::new(
        vars,
        ParamsAdamW {
            lr: 1e-4,
            ..Default::default()
        },
    )?;
    let x = seeded_normal(&[shape.batch, shape.tokens, shape.width], 1.0, 9, device)?;
    let mut times = Vec::new();
    let mut before = None;
    for i in 0..warmup + steps {
        if i == warmup {
            before = ProcCounters::read();
        }
        let t = Instant::now();
        let loss = stack_forward(&set, &x)?.sqr()?.mean_all()?;
        opt.backward_step(&loss)?;
        // A GPU queues work: the step ends when its kernels have run.
        device.synchronize()?;
        if i >= warmup {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    let counters = before
        .zip(ProcCounters::read())
        .map(|(a, b)| b.since(&a, steps));
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
        minor_faults_per_step: counters.map(|c| c.0),
        cpu_percent: counters.map(|c| c.1),
    })
}

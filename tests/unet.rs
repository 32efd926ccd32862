//! Tests of `peft_studio::models::unet`: the prompt vocabulary, shapes, adapters on the UNet's
//! attention projections, a short training run, DDIM sampling and save/load.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use peft_studio::data::portrait::{Attributes, Identity, render};
use peft_studio::diffusion::DdimConfig;
use peft_studio::models::unet::{Generator, PromptVocab, UnetConfig};
use peft_studio::peft::linear::{LinearLayers, attach_adapters, trainable_vars};
use peft_studio::peft::{AdapterConfig, Method, Targets};
use rand::SeedableRng;
use rand::rngs::StdRng;

fn max_abs(a: &Tensor) -> f64 {
    a.to_dtype(DType::F64)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    max_abs(&(a - b).unwrap()) / max_abs(b).max(1e-12)
}

fn tiny() -> Generator {
    Generator::new(UnetConfig::tiny(), &Device::Cpu).unwrap()
}

fn noisy_batch(b: usize, seed: u64) -> Tensor {
    let mut rng = StdRng::seed_from_u64(seed);
    peft_studio::diffusion::seeded_normal((b, 3, 32, 32), DType::F32, &Device::Cpu, &mut rng)
        .unwrap()
}

/// (4, 3, 32, 32) images in [-1, 1] and their prompts: four identities, random attributes.
fn portraits() -> (Tensor, Vec<String>) {
    let mut data = Vec::new();
    let mut prompts = Vec::new();
    for id in 0..4u64 {
        let identity = Identity::random(100 + id);
        for k in 0..1u64 {
            let attrs = Attributes::random(10 * id + k);
            let img = render(&identity, &attrs, 32, id * 7 + k);
            let mut chw = vec![0f32; 3 * 32 * 32];
            for (x, y, p) in img.enumerate_pixels() {
                for c in 0..3 {
                    chw[c * 1024 + y as usize * 32 + x as usize] = p[c] as f32 / 127.5 - 1.0;
                }
            }
            data.extend(chw);
            prompts.push(attrs.prompt());
        }
    }
    let n = prompts.len();
    (
        Tensor::from_vec(data, (n, 3, 32, 32), &Device::Cpu).unwrap(),
        prompts,
    )
}

fn lora_config() -> AdapterConfig {
    AdapterConfig {
        targets: Targets::List(vec![
            "to_q".into(),
            "to_k".into(),
            "to_v".into(),
            "to_out".into(),
        ]),
        ..AdapterConfig::new(Method::Lora, 4)
    }
}

#[test]
fn vocabulary_covers_random_prompts() {
    let vocab = PromptVocab::portraits(16);
    for seed in 0..200 {
        let prompt = Attributes::random(seed).prompt();
        let ids = vocab.encode(&prompt);
        assert_eq!(ids.len(), 16);
        assert_eq!(ids[0], PromptVocab::BOS);
        assert!(
            !ids.contains(&PromptVocab::UNK),
            "unknown word in `{prompt}`"
        );
        let words = PromptVocab::tokenize(&prompt).len();
        assert!(words < 16, "`{prompt}` has {words} words");
        assert!(ids[1..=words].iter().all(|&i| i > PromptVocab::BOS));
        assert!(ids[words + 1..].iter().all(|&i| i == PromptVocab::PAD));
    }
    assert_eq!(vocab.encode("Zebra, SMILE")[1], PromptVocab::UNK);
    assert_eq!(vocab.encode("Zebra, SMILE")[2], vocab.id("smile"));
    assert_eq!(vocab.encode("")[1..], vec![PromptVocab::PAD; 15][..]);
    assert!(vocab.len() <= UnetConfig::tiny().vocab_size);
}

#[test]
fn forward_keeps_shape_and_config_checks() {
    let g = tiny();
    let x = noisy_batch(2, 1);
    let out = g
        .predict(&x, &[10, 900], &["smile, face left", ""])
        .unwrap();
    assert_eq!(out.dims(), &[2, 3, 32, 32]);
    assert!(max_abs(&out).is_finite());
    // Bad inputs are errors, not panics.
    assert!(g.predict(&x, &[10], &["a", "b"]).is_err());
    assert!(
        g.predict(&noisy_batch(1, 2).narrow(3, 0, 31).unwrap(), &[1], &["a"])
            .is_err()
    );
    let bad = UnetConfig {
        norm_groups: 5,
        ..UnetConfig::tiny()
    };
    assert!(Generator::new(bad, &Device::Cpu).is_err());
    eprintln!(
        "parameters: tiny {}, default {}",
        g.parameter_count(),
        Generator::new(UnetConfig::default(), &Device::Cpu)
            .unwrap()
            .parameter_count()
    );
}

#[test]
fn lora_on_attention_projections() {
    let mut g = tiny();
    let x = noisy_batch(2, 3);
    let prompts = ["sad, red background", "hat"];
    let before = g.predict(&x, &[5, 500], &prompts).unwrap();
    let report = attach_adapters(g.unet_mut(), &lora_config()).unwrap();
    // Attention at level 1: 1 down + 1 mid + 2 up transformers, 2 attentions × 4 projections.
    assert_eq!(report.layers.len(), 4 * 2 * 4);
    assert!(report.layers.iter().all(|l| l.0.contains(".attn")));
    assert!(
        g.text_encoder()
            .linears()
            .iter()
            .all(|l| l.adapter().is_none())
    );
    let after = g.predict(&x, &[5, 500], &prompts).unwrap();
    let rel = rel_diff(&after, &before);
    assert!(rel < 1e-5, "output changed at init: {rel}");

    let vars = trainable_vars(g.unet());
    assert_eq!(vars.len(), 2 * 32);
    let (images, prompts) = portraits();
    let mut rng = StdRng::seed_from_u64(0);
    let loss = g.loss(&images, &prompts, &mut rng).unwrap();
    let grads = loss.backward().unwrap();
    let mut nonzero = 0;
    for (name, v) in &vars {
        let gr = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        if max_abs(gr) > 0.0 {
            nonzero += 1;
        }
    }
    // lora_B starts at zero, so lora_A's gradient is zero at init; lora_B's is not.
    assert!(
        nonzero >= 32,
        "only {nonzero} adapter variables got a gradient"
    );
    // Nothing else is a variable: the frozen weights get no gradient.
    for l in g.unet().linears() {
        assert!(
            grads.get(l.base_weight().unwrap().as_ref()).is_none(),
            "{}",
            l.path()
        );
    }
}

#[test]
fn training_lowers_the_loss() {
    let start = Instant::now();
    let mut g = tiny();
    let vars: Vec<_> = g
        .trainable_vars()
        .unwrap()
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    let again = g.trainable_vars().unwrap();
    assert_eq!(vars.len(), again.len());
    let mut opt = AdamW::new(
        vars,
        ParamsAdamW {
            lr: 2e-3,
            weight_decay: 0.0,
            ..Default::default()
        },
    )
    .unwrap();
    let (images, prompts) = portraits();
    let mut rng = StdRng::seed_from_u64(7);
    let steps = 60;
    let mut losses = Vec::new();
    for _ in 0..steps {
        let loss = g.loss(&images, &prompts, &mut rng).unwrap();
        losses.push(loss.to_scalar::<f32>().unwrap());
        opt.backward_step(&loss).unwrap();
    }
    let first: f32 = losses[..10].iter().sum::<f32>() / 10.0;
    let last: f32 = losses[steps - 10..].iter().sum::<f32>() / 10.0;
    eprintln!(
        "loss first10 {first:.4} last10 {last:.4} ({steps} steps, {:.1} s)",
        start.elapsed().as_secs_f64()
    );
    assert!(losses.iter().all(|l| l.is_finite()));
    // Measured: 1.015 -> 0.28 (ratio 0.28) with this seed; 0.5 leaves a wide margin.
    assert!(last < 0.5 * first, "loss {first} -> {last}");
}

#[test]
fn ddim_sampling_is_seeded() {
    let g = tiny();
    let cfg = |seed| DdimConfig {
        steps: 4,
        seed,
        ..Default::default()
    };
    let a = g.sample("smile, blue background", 2, &cfg(1), 3.0).unwrap();
    let b = g.sample("smile, blue background", 2, &cfg(1), 3.0).unwrap();
    let c = g.sample("smile, blue background", 2, &cfg(2), 3.0).unwrap();
    assert_eq!(a.dims(), &[2, 3, 32, 32]);
    assert_eq!(max_abs(&(&a - &b).unwrap()), 0.0);
    assert!(max_abs(&(&a - &c).unwrap()) > 1e-3);
    assert!(max_abs(&a) <= 1.0);
    let plain = g.sample("smile", 1, &cfg(1), 1.0).unwrap();
    assert_eq!(plain.dims(), &[1, 3, 32, 32]);
    assert!(max_abs(&plain).is_finite());
    assert!(g.sample("smile", 0, &cfg(1), 1.0).is_err());
}

#[test]
fn save_load_round_trip() {
    let mut g = tiny();
    // An attached adapter saves as plain (merged) weights.
    attach_adapters(g.unet_mut(), &lora_config()).unwrap();
    let dir = std::env::temp_dir().join(format!("unet-roundtrip-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("generator.safetensors");
    g.save(&path).unwrap();
    let h = Generator::load(&path, &Device::Cpu).unwrap();
    assert_eq!(h.config(), g.config());
    let x = noisy_batch(2, 9);
    let p = ["surprised, face right", "no accessory"];
    let a = g.predict(&x, &[3, 333], &p).unwrap();
    let b = h.predict(&x, &[3, 333], &p).unwrap();
    // The weights are stored as f16: predictions agree to its rounding (and differ at all,
    // so the file is not f32), and a second save/load round trip is exact.
    let rounding = rel_diff(&b, &a);
    assert!(rounding < 5e-3 && rounding > 0.0, "{rounding}");
    let again_path = dir.join("generator-again.safetensors");
    h.save(&again_path).unwrap();
    let again = Generator::load(&again_path, &Device::Cpu).unwrap();
    assert_eq!(
        rel_diff(&again.predict(&x, &[3, 333], &p).unwrap(), &b),
        0.0
    );
    let stored = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    assert!(stored.values().all(|t| t.dtype() == DType::F16));
    let names: Vec<String> = h
        .named_tensors()
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert!(names.contains(
        &"down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight".to_string()
    ));
    assert!(names.contains(&"text_model.embeddings.token_embedding.weight".to_string()));
    assert!(Generator::load(&dir.join("missing.safetensors"), &Device::Cpu).is_err());
    std::fs::remove_dir_all(&dir).ok();
}

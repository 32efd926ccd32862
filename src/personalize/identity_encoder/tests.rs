//! Tests of the identity encoder on rendered portraits: it learns identities whatever the
//! attributes, saves and loads exactly, is deterministic per seed and refuses bad inputs; and a
//! hand-run measure of the default configuration.

use std::collections::HashMap;

use candle_core::{Device, Tensor};

use super::*;
use crate::data::portrait::{Attributes, IDENTITY_DIMS, Identity, render};
use crate::personalize::images_to_tensor;

/// Identities `first..first + ids` × `per` portraits with random attributes; `variant` picks other
/// attribute and render seeds. Returns (images, labels, identity vectors per image).
fn portraits(
    first: usize,
    ids: usize,
    per: usize,
    variant: u64,
) -> (Tensor, Vec<usize>, Vec<Vec<f32>>) {
    let mut imgs = Vec::new();
    let mut labels = Vec::new();
    let mut truth = Vec::new();
    for i in first..first + ids {
        let id = Identity::random(7000 + i as u64);
        for j in 0..per {
            let s = variant * 1_000_003 + (i * 1000 + j) as u64;
            imgs.push(render(&id, &Attributes::random(s), 32, s ^ 0x5555));
            labels.push(i);
            truth.push(id.to_vector());
        }
    }
    (
        images_to_tensor(&imgs, &Device::Cpu).unwrap(),
        labels,
        truth,
    )
}

fn flat(v: &[Vec<f32>]) -> Tensor {
    Tensor::from_vec(v.concat(), (v.len(), IDENTITY_DIMS), &Device::Cpu).unwrap()
}

/// Test MSE of `reg` on `emb` against `truth`, and of the mean of `fit_truth`.
fn regression_mse(
    reg: &ParamRegressor,
    emb: &Tensor,
    fit_truth: &[Vec<f32>],
    truth: &[Vec<f32>],
) -> (f32, f32) {
    let y = flat(truth);
    let mse = |p: &Tensor| {
        (p - &y)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let mean_pred = flat(fit_truth)
        .mean_keepdim(0)
        .unwrap()
        .broadcast_as(y.dims())
        .unwrap()
        .contiguous()
        .unwrap();
    (mse(&reg.predict(emb).unwrap()), mse(&mean_pred))
}

fn small_cfg() -> EncoderConfig {
    EncoderConfig {
        width: 12,
        hidden: 96,
        steps: 60,
        batch: 32,
        ..EncoderConfig::default()
    }
}

fn mean_cosines(emb: &Tensor, labels: &[usize]) -> (f32, f32) {
    let sim = emb
        .matmul(&emb.t().unwrap())
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let (mut same, mut ns, mut diff, mut nd) = (0.0, 0, 0.0, 0);
    for i in 0..labels.len() {
        for j in 0..labels.len() {
            if i == j {
                continue;
            }
            if labels[i] == labels[j] {
                same += sim[i][j];
                ns += 1;
            } else {
                diff += sim[i][j];
                nd += 1;
            }
        }
    }
    (same / ns as f32, diff / nd as f32)
}

#[test]
fn learns_identities_invariant_to_attributes() {
    let (train, labels, fit_truth) = portraits(0, 12, 10, 0);
    let cfg = small_cfg();
    let t0 = std::time::Instant::now();
    let mut losses = Vec::new();
    let enc = IdentityEncoder::train(&train, &labels, &cfg, &mut |_, l| losses.push(l)).unwrap();
    eprintln!("trained in {:.2?}", t0.elapsed());
    assert_eq!(losses.len(), cfg.steps);
    let first: f32 = losses[..10].iter().sum::<f32>() / 10.0;
    let last: f32 = losses[losses.len() - 10..].iter().sum::<f32>() / 10.0;
    assert!(last < 0.5 * first, "loss {first} → {last}");

    let (test, test_labels, test_truth) = portraits(0, 12, 6, 1);
    let acc = centroid_accuracy(&enc, &train, &labels, &test, &test_labels).unwrap();
    let emb = enc.embed(&test).unwrap();
    let loo = verification_accuracy_of(&emb, &test_labels).unwrap();
    let (same, diff) = mean_cosines(&emb, &test_labels);
    eprintln!("held-out centroid acc {acc}, LOO {loo}, cos same {same} diff {diff}");
    assert!(acc >= 0.6, "nearest-centroid accuracy {acc} (chance 1/12)");
    assert!(same > diff + 0.25, "same {same} vs different {diff}");

    // Unit rows.
    let norms = emb.sqr().unwrap().sum(1).unwrap().to_vec1::<f32>().unwrap();
    assert!(norms.iter().all(|n| (n - 1.0).abs() < 1e-4), "{norms:?}");
    assert_eq!(emb.dims(), &[72, cfg.embed_dim]);

    // Fused similarity: same person above another person.
    let a = test.narrow(0, 0, 3).unwrap();
    let b = test.narrow(0, 3, 3).unwrap();
    let other = test.narrow(0, 6, 3).unwrap();
    let s_same = enc.similarity(&a, &b).unwrap();
    let s_other = enc.similarity(&a, &other).unwrap();
    assert!(s_same > s_other, "{s_same} vs {s_other}");

    // Save → load gives identical embeddings; a missing tensor is named.
    let dir = std::env::temp_dir().join(format!("idenc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("enc.safetensors");
    enc.save(&path).unwrap();
    let back = IdentityEncoder::load(&path, &Device::Cpu).unwrap();
    assert_eq!(back.config(), enc.config());
    let e2 = back.embed(&test).unwrap();
    let d = (&emb - &e2).unwrap().abs().unwrap().max_all().unwrap();
    assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);

    let bytes = std::fs::read(&path).unwrap();
    let mut tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap();
    tensors.remove("head.fc2.bias");
    let meta: HashMap<String, String> = [(
        CONFIG_KEY.to_string(),
        serde_json::to_string(enc.config()).unwrap(),
    )]
    .into();
    let broken = dir.join("broken.safetensors");
    safetensors::serialize_to_file(
        tensors.iter().map(|(n, t)| (n.as_str(), t)),
        Some(meta),
        &broken,
    )
    .unwrap();
    let err = IdentityEncoder::load(&broken, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("head.fc2.bias") && err.contains("missing"),
        "{err}"
    );
    assert!(IdentityEncoder::load(&dir.join("none.safetensors"), &Device::Cpu).is_err());
    std::fs::remove_dir_all(&dir).ok();

    // ParamRegressor on embeddings beats the mean predictor at recovering the identity
    // parameters of new pictures of the same people.
    let reg = ParamRegressor::fit(&enc.embed(&train).unwrap(), &flat(&fit_truth), 1.0).unwrap();
    let (m_reg, m_mean) = regression_mse(&reg, &emb, &fit_truth, &test_truth);
    eprintln!("identity params MSE: regressor {m_reg}, mean {m_mean}");
    assert!(m_reg < 0.6 * m_mean, "regressor {m_reg} vs mean {m_mean}");
}

#[test]
fn training_is_deterministic_per_seed() {
    let (imgs, labels, _) = portraits(0, 4, 4, 2);
    let cfg = EncoderConfig {
        width: 8,
        hidden: 32,
        embed_dim: 16,
        steps: 6,
        batch: 8,
        ..EncoderConfig::default()
    };
    let run = |cfg: &EncoderConfig| {
        let mut losses = Vec::new();
        let enc = IdentityEncoder::train(&imgs, &labels, cfg, &mut |_, l| losses.push(l)).unwrap();
        (losses, enc.embed(&imgs).unwrap().to_vec2::<f32>().unwrap())
    };
    let (l1, e1) = run(&cfg);
    let (l2, e2) = run(&cfg);
    assert_eq!(l1, l2);
    assert_eq!(e1, e2);
    let (l3, _) = run(&EncoderConfig { seed: 1, ..cfg });
    assert_ne!(l1, l3);
}

#[test]
fn rejects_bad_inputs() {
    let (imgs, labels, _) = portraits(0, 2, 2, 3);
    let cfg = EncoderConfig {
        steps: 1,
        ..EncoderConfig::default()
    };
    let mut nop = |_: usize, _: f32| {};
    let err = IdentityEncoder::train(&imgs, &labels[..3], &cfg, &mut nop).unwrap_err();
    assert!(matches!(err, EncoderError::Input(_)), "{err}");
    let err = IdentityEncoder::train(&imgs, &[0, 0, 0, 0], &cfg, &mut nop).unwrap_err();
    assert!(matches!(err, EncoderError::Input(_)), "{err}");
    let small = imgs.narrow(2, 0, 16).unwrap();
    let err = IdentityEncoder::train(&small, &labels, &cfg, &mut nop).unwrap_err();
    assert!(err.to_string().contains("images"), "{err}");
    let bad = EncoderConfig {
        image_size: 30,
        ..cfg.clone()
    };
    assert!(matches!(bad.validate(), Err(EncoderError::Config(_))));
    let parsed: std::result::Result<EncoderConfig, _> =
        serde_json::from_str(r#"{"steps": 3, "bogus": 1}"#);
    assert!(parsed.is_err());
    let parsed: EncoderConfig = serde_json::from_str(r#"{"steps": 3}"#).unwrap();
    assert_eq!(parsed.steps, 3);
    assert_eq!(parsed.embed_dim, EncoderConfig::default().embed_dim);
}

/// The default config on 48 identities × 12 portraits: training time and accuracy on new
/// pictures of the same people and on unseen people. Run with
/// `cargo test --release --lib personalize::identity_encoder::tests -- --ignored --nocapture`.
#[test]
#[ignore]
fn quality_of_the_default_config() {
    let (train, labels, truth) = portraits(0, 48, 12, 10);
    let cfg = EncoderConfig::default();
    let t0 = std::time::Instant::now();
    let mut last = 0.0;
    let enc = IdentityEncoder::train(&train, &labels, &cfg, &mut |s, l| {
        last = l;
        if s % 100 == 0 {
            eprintln!("step {s} loss {l:.3} ({:.1?})", t0.elapsed());
        }
    })
    .unwrap();
    let train_time = t0.elapsed();
    let (test, test_labels, test_truth) = portraits(0, 48, 8, 11);
    let acc = centroid_accuracy(&enc, &train, &labels, &test, &test_labels).unwrap();
    let emb = enc.embed(&test).unwrap();
    let loo_seen = verification_accuracy_of(&emb, &test_labels).unwrap();
    let (same, diff) = mean_cosines(&emb, &test_labels);
    // Unseen people: 24 other identities.
    let (unseen, ul, _) = portraits(48, 24, 10, 12);
    let ue = enc.embed(&unseen).unwrap();
    let loo_unseen = verification_accuracy_of(&ue, &ul).unwrap();
    let (usame, udiff) = mean_cosines(&ue, &ul);
    let reg = ParamRegressor::fit(&enc.embed(&train).unwrap(), &flat(&truth), 1.0).unwrap();
    let (m_reg, m_mean) = regression_mse(&reg, &emb, &truth, &test_truth);
    eprintln!(
        "default config: train {train_time:.1?} ({} steps, final loss {last:.3}); \
         seen ids new pictures: centroid acc {acc:.3}, LOO {loo_seen:.3}, cos same {same:.3} \
         diff {diff:.3}; unseen 24 ids: LOO {loo_unseen:.3}, cos same {usame:.3} diff \
         {udiff:.3}; params MSE regressor {m_reg:.4} vs mean {m_mean:.4}",
        cfg.steps
    );
    assert!(acc > 0.5);
}

//! Tests of the hypernetwork: fusing embeddings, the autoencoder and the denoiser (quality on
//! toy data, determinism, save/load and damaged files, bad settings), and a hand-run timing.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

use super::autoencoder::relative_error;
use super::*;
use crate::models::kit::KitError;

fn randn(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| rng.sample::<f32, _>(StandardNormal))
        .collect()
}

fn temp_file(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("peft_hyper_{}_{name}", std::process::id()))
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    max_abs(&(a - b).unwrap())
}

/// Rewrites a saved file with `edit` applied to its tensors (metadata kept).
fn rewrite(path: &Path, out: &Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let bytes = std::fs::read(path).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = header.metadata().clone();
    let mut tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap();
    edit(&mut tensors);
    let bytes = safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), meta).unwrap();
    std::fs::write(out, bytes).unwrap();
}

#[test]
fn fuse_embeddings_is_normalised_mean() {
    let e = Tensor::new(&[[1f32, 0.0, 0.0], [0.0, 1.0, 0.0]], &Device::Cpu).unwrap();
    let f = fuse_embeddings(&e).unwrap().to_vec1::<f32>().unwrap();
    let h = std::f32::consts::FRAC_1_SQRT_2;
    for (a, b) in f.iter().zip([h, h, 0.0]) {
        assert!((a - b).abs() < 1e-6, "{f:?}");
    }
    let e = Tensor::new(&[[3f32, 4.0], [3.0, 4.0], [6.0, 8.0]], &Device::Cpu).unwrap();
    let f = fuse_embeddings(&e).unwrap().to_vec1::<f32>().unwrap();
    assert!(
        (f[0] - 0.6).abs() < 1e-6 && (f[1] - 0.8).abs() < 1e-6,
        "{f:?}"
    );
    // Random rows: unit norm, and the training loop's fast path agrees.
    let mut rng = StdRng::seed_from_u64(3);
    let data = randn(&mut rng, 4 * 7);
    let e = Tensor::from_vec(data.clone(), (4, 7), &Device::Cpu).unwrap();
    let f = fuse_embeddings(&e).unwrap().to_vec1::<f32>().unwrap();
    let norm: f32 = f.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-5, "norm {norm}");
    let rows: Vec<&[f32]> = data.chunks(7).collect();
    let g = fuse_rows(&rows, 7);
    for (a, b) in f.iter().zip(&g) {
        assert!((a - b).abs() < 1e-6);
    }
    assert!(fuse_embeddings(&Tensor::zeros((0, 3), DType::F32, &Device::Cpu).unwrap()).is_err());
    assert!(fuse_embeddings(&Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap()).is_err());
}

/// `n` vectors of dimension `d` on a 4-d nonlinear manifold, plus an offset.
fn manifold(n: usize, d: usize, seed: u64) -> Tensor {
    let mut rng = StdRng::seed_from_u64(seed);
    let a = randn(&mut rng, 4 * d);
    let offset = randn(&mut rng, d);
    let mut out = Vec::with_capacity(n * d);
    for _ in 0..n {
        let c = randn(&mut rng, 4);
        for k in 0..d {
            let s: f32 = (0..4).map(|i| a[i * d + k] * c[i]).sum();
            out.push((0.7 * s).tanh() + 0.3 * offset[k]);
        }
    }
    Tensor::from_vec(out, (n, d), &Device::Cpu).unwrap()
}

fn small_ae_config() -> AutoencoderConfig {
    AutoencoderConfig {
        latent_dim: 8,
        hidden: 128,
        steps: 500,
        batch: 40,
        lr: 3e-3,
        seed: 11,
        ..AutoencoderConfig::default()
    }
}

#[test]
fn autoencoder_reconstructs_a_low_dimensional_manifold() {
    let v = manifold(40, 300, 5);
    let cfg = small_ae_config();
    let start = std::time::Instant::now();
    let mut losses = Vec::new();
    let ae = LoraAutoencoder::train(&v, &cfg, &mut |_, l| losses.push(l)).unwrap();
    let train_time = start.elapsed();
    assert_eq!(losses.len(), cfg.steps);
    let err = ae.reconstruction_error(&v).unwrap();
    let mean = v.mean_keepdim(0).unwrap().broadcast_as(v.shape()).unwrap();
    let baseline = relative_error(&mean, &v).unwrap();
    eprintln!(
        "autoencoder: relative error {err:.4} (mean predictor {baseline:.4}), \
         final loss {:.5}, trained in {train_time:?}",
        losses.last().unwrap()
    );
    assert!(err < 0.1, "relative reconstruction error {err}");
    assert!(
        err < 0.2 * baseline,
        "error {err} vs mean predictor {baseline}"
    );

    let z = ae.encode(&v).unwrap();
    assert_eq!(z.dims(), &[40, 8]);
    assert_eq!(ae.decode(&z).unwrap().dims(), &[40, 300]);
    assert_eq!((ae.latent_dim(), ae.input_dim()), (8, 300));
    assert!(matches!(
        ae.encode(&Tensor::zeros((2, 299), DType::F32, &Device::Cpu).unwrap()),
        Err(HyperError::Shape { .. })
    ));
    assert!(matches!(
        ae.decode(&Tensor::zeros((2, 7), DType::F32, &Device::Cpu).unwrap()),
        Err(HyperError::Shape { .. })
    ));
}

/// A cap on the principal directions keeps the ones of largest variance: fewer rows, the
/// same leading coordinates, and it is saved with the configuration.
#[test]
fn autoencoder_principal_directions_can_be_capped() {
    let v = manifold(12, 50, 9);
    let cfg = AutoencoderConfig {
        latent_dim: 4,
        hidden: 16,
        steps: 5,
        batch: 8,
        ..AutoencoderConfig::default()
    };
    let all = LoraAutoencoder::train(&v, &cfg, &mut |_, _| {}).unwrap();
    assert!(
        all.principal_dim() > 3 && all.principal_dim() <= 11,
        "at most N − 1"
    );
    let capped_cfg = AutoencoderConfig {
        max_principal_dims: Some(3),
        ..cfg.clone()
    };
    let capped = LoraAutoencoder::train(&v, &capped_cfg, &mut |_, _| {}).unwrap();
    assert_eq!(capped.principal_dim(), 3);
    assert_eq!(capped.input_dim(), all.input_dim());
    let path = temp_file("ae_capped.safetensors");
    capped.save(&path).unwrap();
    let back = LoraAutoencoder::load(&path, &Device::Cpu).unwrap();
    assert_eq!(back.principal_dim(), 3);
    assert_eq!(back.config(), &capped_cfg);
    std::fs::remove_file(&path).ok();
    let zero = AutoencoderConfig {
        max_principal_dims: Some(0),
        ..cfg
    };
    assert!(zero.validate().is_err());
}

#[test]
fn autoencoder_training_is_deterministic_and_saves() {
    let v = manifold(12, 50, 9);
    let cfg = AutoencoderConfig {
        latent_dim: 4,
        hidden: 32,
        steps: 30,
        batch: 8,
        seed: 2,
        ..AutoencoderConfig::default()
    };
    let a = LoraAutoencoder::train(&v, &cfg, &mut |_, _| {}).unwrap();
    let b = LoraAutoencoder::train(&v, &cfg, &mut |_, _| {}).unwrap();
    let za = a.encode(&v).unwrap();
    assert_eq!(max_abs_diff(&za, &b.encode(&v).unwrap()), 0.0);
    let c = LoraAutoencoder::train(
        &v,
        &AutoencoderConfig {
            seed: 3,
            ..cfg.clone()
        },
        &mut |_, _| {},
    )
    .unwrap();
    assert!(max_abs_diff(&za, &c.encode(&v).unwrap()) > 0.0);

    let path = temp_file("ae.safetensors");
    a.save(&path).unwrap();
    let back = LoraAutoencoder::load(&path, &Device::Cpu).unwrap();
    assert_eq!(back.config(), &cfg);
    // The basis is stored as f16: outputs agree to f16 rounding, and a second save/load
    // round trip is exact.
    let zb = back.encode(&v).unwrap();
    assert!(
        max_abs_diff(&za, &zb) <= 2e-3 * max_abs(&za),
        "{}",
        max_abs_diff(&za, &zb)
    );
    let (da, db) = (a.decode(&za).unwrap(), back.decode(&za).unwrap());
    assert!(
        max_abs_diff(&da, &db) <= 2e-3 * max_abs(&da),
        "{}",
        max_abs_diff(&da, &db)
    );
    let again_path = temp_file("ae_again.safetensors");
    back.save(&again_path).unwrap();
    let again = LoraAutoencoder::load(&again_path, &Device::Cpu).unwrap();
    assert_eq!(max_abs_diff(&zb, &again.encode(&v).unwrap()), 0.0);
    assert_eq!(max_abs_diff(&db, &again.decode(&za).unwrap()), 0.0);
    std::fs::remove_file(&again_path).ok();

    let bad = temp_file("ae_missing.safetensors");
    rewrite(&path, &bad, |t| {
        t.remove("dec.0.w");
    });
    let err = LoraAutoencoder::load(&bad, &Device::Cpu).unwrap_err();
    assert!(
        matches!(err, HyperError::Weights(KitError::MissingTensor { .. })),
        "{err}"
    );
    assert!(err.to_string().contains("dec.0.w") && err.to_string().contains("ae_missing"));

    rewrite(&path, &bad, |t| {
        t.insert(
            "enc.1.b".into(),
            Tensor::zeros(5, DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let err = LoraAutoencoder::load(&bad, &Device::Cpu).unwrap_err();
    assert!(
        matches!(err, HyperError::Weights(KitError::TensorShape { .. })),
        "{err}"
    );
    assert!(err.to_string().contains("enc.1.b"), "{err}");

    rewrite(&path, &bad, |t| {
        let nan = Tensor::new(&[f32::NAN], &Device::Cpu).unwrap();
        t.insert("stats.std".into(), nan);
    });
    let err = LoraAutoencoder::load(&bad, &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("stats.std"), "{err}");

    rewrite(&path, &bad, |t| {
        t.insert(
            "extra".into(),
            Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let err = LoraAutoencoder::load(&bad, &Device::Cpu).unwrap_err();
    assert!(
        matches!(err, HyperError::Weights(KitError::UnexpectedTensor { .. })),
        "{err}"
    );

    // A denoiser file is not an autoencoder; a missing file names its path.
    assert!(LatentDenoiser::load(&path, &Device::Cpu).is_err());
    let missing = temp_file("nope.safetensors");
    let err = LoraAutoencoder::load(&missing, &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("nope.safetensors"), "{err}");
    for p in [path, bad] {
        let _ = std::fs::remove_file(p);
    }
}

#[test]
fn autoencoder_rejects_bad_settings() {
    let v = manifold(4, 10, 1);
    for cfg in [
        AutoencoderConfig {
            latent_dim: 0,
            ..AutoencoderConfig::default()
        },
        AutoencoderConfig {
            lr: f64::NAN,
            ..AutoencoderConfig::default()
        },
        AutoencoderConfig {
            input_noise: -1.0,
            ..AutoencoderConfig::default()
        },
    ] {
        assert!(matches!(
            LoraAutoencoder::train(&v, &cfg, &mut |_, _| {}),
            Err(HyperError::InvalidConfig { .. })
        ));
    }
    let flat = Tensor::zeros(10, DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(
        LoraAutoencoder::train(&flat, &AutoencoderConfig::default(), &mut |_, _| {}),
        Err(HyperError::Shape { .. })
    ));
    let cfg: std::result::Result<AutoencoderConfig, _> =
        serde_json::from_str(r#"{"latent_dim": 4, "bogus": 1}"#);
    assert!(cfg.is_err());
    let cfg: AutoencoderConfig = serde_json::from_str(r#"{"latent_dim": 4}"#).unwrap();
    assert_eq!(cfg.hidden, 256);
}

/// 6 identities, 3 latents each (close to the identity's own), 5 embeddings each (a tight
/// cluster around the identity's direction).
struct Toy {
    latents: Tensor,
    rows: Vec<usize>,
    embs: Vec<Tensor>,
    centres: Vec<Vec<f32>>,
}

fn toy(ids: usize, l: usize, e: usize) -> Toy {
    let mut rng = StdRng::seed_from_u64(17);
    let mut lat = Vec::new();
    let mut rows = Vec::new();
    let mut embs = Vec::new();
    let mut centres = Vec::new();
    for i in 0..ids {
        let c: Vec<f32> = randn(&mut rng, l).iter().map(|x| 2.0 * x + 1.0).collect();
        for _ in 0..3 {
            let jitter = randn(&mut rng, l);
            lat.extend(c.iter().zip(&jitter).map(|(a, j)| a + 0.05 * j));
            rows.push(i);
        }
        centres.push(c);
        let dir = randn(&mut rng, e);
        let mut data = Vec::new();
        for _ in 0..5 {
            let v: Vec<f32> = randn(&mut rng, e)
                .iter()
                .zip(&dir)
                .map(|(n, d)| d + 0.25 * n)
                .collect();
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            data.extend(v.iter().map(|x| x / norm));
        }
        embs.push(Tensor::from_vec(data, (5, e), &Device::Cpu).unwrap());
    }
    let n = rows.len();
    Toy {
        latents: Tensor::from_vec(lat, (n, l), &Device::Cpu).unwrap(),
        rows,
        embs,
        centres,
    }
}

fn toy_config() -> DenoiserConfig {
    DenoiserConfig {
        hidden: 64,
        layers: 2,
        time_dim: 16,
        steps: 800,
        batch: 32,
        lr: 2e-3,
        max_refs: 3,
        seed: 4,
        ..DenoiserConfig::default()
    }
}

#[test]
fn denoiser_generates_the_identity_latent() {
    let toy = toy(6, 8, 16);
    let cfg = toy_config();
    let start = std::time::Instant::now();
    let mut last = f32::NAN;
    let dn = LatentDenoiser::train(&toy.latents, &toy.rows, &toy.embs, &cfg, &mut |_, l| {
        last = l
    })
    .unwrap();
    let train_time = start.elapsed();
    assert_eq!((dn.config().latent_dim, dn.config().cond_dim), (8, 16));
    let conds: Vec<Tensor> = toy
        .embs
        .iter()
        .map(|e| fuse_embeddings(e).unwrap())
        .collect();
    let cond = Tensor::stack(&conds, 0).unwrap();
    let start = std::time::Instant::now();
    let s = dn.sample(&cond, 1).unwrap();
    let sample_time = start.elapsed();
    assert_eq!(s.dims(), &[6, 8]);
    let s = s.to_vec2::<f32>().unwrap();
    let mut correct = 0;
    let mut ratio = Vec::new();
    for (k, row) in s.iter().enumerate() {
        let d: Vec<f32> = toy
            .centres
            .iter()
            .map(|c| {
                c.iter()
                    .zip(row)
                    .map(|(a, b)| (a - b).powi(2))
                    .sum::<f32>()
                    .sqrt()
            })
            .collect();
        let nearest = (0..d.len()).min_by(|&a, &b| d[a].total_cmp(&d[b])).unwrap();
        correct += usize::from(nearest == k);
        let other = (0..d.len())
            .filter(|&i| i != k)
            .map(|i| d[i])
            .fold(f32::INFINITY, f32::min);
        ratio.push(d[k] / other);
    }
    eprintln!(
        "denoiser: {correct}/6 nearest, own/other distance ratios {ratio:?}, \
         final loss {last:.4}, trained in {train_time:?}, sampled in {sample_time:?}"
    );
    assert!(
        correct >= 5,
        "only {correct}/6 samples nearest their identity"
    );

    // Single references (not seen fused the same way) still land on their identity.
    let single: Vec<Tensor> = toy.embs.iter().map(|e| e.get(0).unwrap()).collect();
    let single = dn.sample(&Tensor::stack(&single, 0).unwrap(), 2).unwrap();
    let single = single.to_vec2::<f32>().unwrap();
    let hits = single
        .iter()
        .enumerate()
        .filter(|(k, row)| {
            let d = |c: &Vec<f32>| {
                c.iter()
                    .zip(row.iter())
                    .map(|(a, b)| (a - b).powi(2))
                    .sum::<f32>()
            };
            (0..6).all(|i| i == *k || d(&toy.centres[*k]) < d(&toy.centres[i]))
        })
        .count();
    eprintln!("denoiser: {hits}/6 nearest from a single reference");
    assert!(hits >= 5);
}

/// Guidance runs the conditional and unconditional passes as one batch; it equals the two
/// passes run apart, combined as classifier-free guidance does.
#[test]
fn guided_prediction_equals_two_separate_passes() {
    let toy = toy(3, 8, 16);
    let cfg = DenoiserConfig {
        steps: 20,
        ..toy_config()
    };
    let dn =
        LatentDenoiser::train(&toy.latents, &toy.rows, &toy.embs, &cfg, &mut |_, _| {}).unwrap();
    let mut rng = StdRng::seed_from_u64(9);
    let x = Tensor::from_vec(randn(&mut rng, 3 * 8), (3, 8), &Device::Cpu).unwrap();
    let cond = Tensor::from_vec(randn(&mut rng, 3 * 16), (3, 16), &Device::Cpu).unwrap();
    let t = [900, 500, 20];
    let both = Tensor::cat(&[&cond, &cond.zeros_like().unwrap()], 0).unwrap();
    let batched = dn.guided_eps(&x, &t, &both, 3.0).unwrap();
    let c = dn.eps(&x, &t, &cond).unwrap();
    let u = dn.eps(&x, &t, &cond.zeros_like().unwrap()).unwrap();
    let apart = (&u + ((&c - &u).unwrap() * 3.0).unwrap()).unwrap();
    assert!(
        max_abs(&(&c - &u).unwrap()) > 1e-3,
        "the condition must matter"
    );
    assert!(max_abs_diff(&batched, &apart) < 1e-5);
}

#[test]
fn denoiser_is_deterministic_and_saves() {
    let toy = toy(3, 4, 8);
    let cfg = DenoiserConfig {
        hidden: 16,
        layers: 1,
        time_dim: 8,
        steps: 40,
        batch: 8,
        sample_steps: 5,
        seed: 9,
        ..DenoiserConfig::default()
    };
    let a =
        LatentDenoiser::train(&toy.latents, &toy.rows, &toy.embs, &cfg, &mut |_, _| {}).unwrap();
    let b =
        LatentDenoiser::train(&toy.latents, &toy.rows, &toy.embs, &cfg, &mut |_, _| {}).unwrap();
    let conds: Vec<Tensor> = toy
        .embs
        .iter()
        .map(|e| fuse_embeddings(e).unwrap())
        .collect();
    let cond = Tensor::stack(&conds, 0).unwrap();
    let s = a.sample(&cond, 7).unwrap();
    assert_eq!(max_abs_diff(&s, &a.sample(&cond, 7).unwrap()), 0.0);
    assert_eq!(max_abs_diff(&s, &b.sample(&cond, 7).unwrap()), 0.0);
    assert!(max_abs_diff(&s, &a.sample(&cond, 8).unwrap()) > 1e-6);

    let path = temp_file("dn.safetensors");
    a.save(&path).unwrap();
    let back = LatentDenoiser::load(&path, &Device::Cpu).unwrap();
    assert_eq!(back.config(), a.config());
    // The network is stored as f16, the standardisation as f32: samples agree to f16
    // rounding, and a second save/load round trip is exact.
    let sb = back.sample(&cond, 7).unwrap();
    let moved = max_abs_diff(&s, &sb);
    assert!(moved > 0.0 && moved <= 5e-3 * max_abs(&s), "{moved}");
    let stored = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    for (name, t) in &stored {
        let expected = if name.starts_with("stats.") {
            DType::F32
        } else {
            DType::F16
        };
        assert_eq!(t.dtype(), expected, "{name}");
    }
    let again_path = temp_file("dn_again.safetensors");
    back.save(&again_path).unwrap();
    let again = LatentDenoiser::load(&again_path, &Device::Cpu).unwrap();
    assert_eq!(max_abs_diff(&sb, &again.sample(&cond, 7).unwrap()), 0.0);
    std::fs::remove_file(&again_path).ok();

    let bad = temp_file("dn_bad.safetensors");
    rewrite(&path, &bad, |t| {
        t.remove("block.0.cond.w");
    });
    let err = LatentDenoiser::load(&bad, &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("block.0.cond.w"), "{err}");
    rewrite(&path, &bad, |t| {
        t.insert(
            "stats.mean".into(),
            Tensor::zeros((1, 5), DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let err = LatentDenoiser::load(&bad, &Device::Cpu).unwrap_err();
    assert!(
        matches!(err, HyperError::Weights(KitError::TensorShape { .. })),
        "{err}"
    );
    assert!(err.to_string().contains("stats.mean"), "{err}");
    assert!(LoraAutoencoder::load(&path, &Device::Cpu).is_err());
    for p in [path, bad] {
        let _ = std::fs::remove_file(p);
    }

    // Bad inputs are errors, not panics.
    assert!(matches!(
        a.sample(&Tensor::zeros((2, 7), DType::F32, &Device::Cpu).unwrap(), 0),
        Err(HyperError::Shape { .. })
    ));
    let short = &toy.rows[..toy.rows.len() - 1];
    assert!(matches!(
        LatentDenoiser::train(&toy.latents, short, &toy.embs, &cfg, &mut |_, _| {}),
        Err(HyperError::InvalidInput(_))
    ));
    let mut wrong = toy.rows.clone();
    wrong[0] = 3;
    assert!(matches!(
        LatentDenoiser::train(&toy.latents, &wrong, &toy.embs, &cfg, &mut |_, _| {}),
        Err(HyperError::InvalidInput(_))
    ));
    let bad_cfg = DenoiserConfig {
        latent_dim: 5,
        ..cfg.clone()
    };
    assert!(matches!(
        LatentDenoiser::train(&toy.latents, &toy.rows, &toy.embs, &bad_cfg, &mut |_, _| {}),
        Err(HyperError::InvalidConfig { .. })
    ));
    let bad_cfg = DenoiserConfig { time_dim: 7, ..cfg };
    assert!(matches!(
        LatentDenoiser::train(&toy.latents, &toy.rows, &toy.embs, &bad_cfg, &mut |_, _| {}),
        Err(HyperError::InvalidConfig { .. })
    ));
}

mod timing {
    use super::*;

    /// Step time at a realistic size (D = 20,000, N = 100, default widths); run by hand with
    /// `cargo test --release --lib personalize::hyper::tests::timing -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn autoencoder_step_time_at_realistic_size() {
        let (n, d) = (100, 20_000);
        let mut rng = StdRng::seed_from_u64(1);
        let data: Vec<f32> = (0..n * d)
            .map(|_| rng.sample::<f32, _>(StandardNormal))
            .collect();
        let v = Tensor::from_vec(data, (n, d), &Device::Cpu).unwrap();
        let cfg = AutoencoderConfig {
            steps: 20,
            ..AutoencoderConfig::default()
        };
        let start = std::time::Instant::now();
        LoraAutoencoder::train(&v, &cfg, &mut |_, _| {}).unwrap();
        eprintln!(
            "autoencoder: {:.1} ms/step at D = {d}, batch {}, hidden {}",
            start.elapsed().as_secs_f64() * 1e3 / cfg.steps as f64,
            cfg.batch,
            cfg.hidden
        );
        let toy_l = 32;
        let lat = Tensor::from_vec(
            (0..n * toy_l)
                .map(|_| rng.sample::<f32, _>(StandardNormal))
                .collect::<Vec<f32>>(),
            (n, toy_l),
            &Device::Cpu,
        )
        .unwrap();
        let emb = Tensor::from_vec(
            (0..10 * 128)
                .map(|_| rng.sample::<f32, _>(StandardNormal))
                .collect::<Vec<f32>>(),
            (10, 128),
            &Device::Cpu,
        )
        .unwrap();
        let rows: Vec<usize> = (0..n).map(|j| j % 10).collect();
        let embs: Vec<Tensor> = (0..10).map(|_| emb.clone()).collect();
        let cfg = DenoiserConfig {
            steps: 100,
            ..DenoiserConfig::default()
        };
        let start = std::time::Instant::now();
        LatentDenoiser::train(&lat, &rows, &embs, &cfg, &mut |_, _| {}).unwrap();
        eprintln!(
            "denoiser: {:.2} ms/step at L = {toy_l}, E = 128, default widths",
            start.elapsed().as_secs_f64() * 1e3 / cfg.steps as f64
        );
    }
}

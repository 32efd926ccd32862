//! The image codec of a latent generator: shapes, training lowers the reconstruction error,
//! latent statistics, save/load, exact resume, and a latent generator that trains on latents
//! and draws images of the codec's size.

mod common;

use candle_core::{DType, Device, Tensor};
use common::TempDir;
use peft_studio::data::people::synthetic_person;
use peft_studio::diffusion::DdimConfig;
use peft_studio::models::unet::{CodecConfig, Generator, ImageCodec, UnetConfig};
use peft_studio::personalize::generator_training::{
    DecoderRefinement, GeneratorTraining, refine_decoder, train_codec, train_generator,
};
use peft_studio::personalize::images_to_tensor;
use rand::SeedableRng;

fn tiny_codec() -> CodecConfig {
    CodecConfig {
        image_size: 32,
        widths: vec![8, 16],
        ..CodecConfig::default()
    }
}

/// Renders of `people` people, `per` each, at 32 × 32, with their prompts.
fn renders(people: u64, per: usize) -> (Tensor, Vec<String>) {
    let people: Vec<_> = (0..people)
        .map(|i| synthetic_person(i, per, 32, 0))
        .collect();
    let images: Vec<_> = people.iter().flat_map(|p| p.images.clone()).collect();
    let prompts = people.iter().flat_map(|p| p.prompts.clone()).collect();
    (images_to_tensor(&images, &Device::Cpu).unwrap(), prompts)
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn mean_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn shapes_and_validation() {
    let codec = ImageCodec::new(tiny_codec(), &Device::Cpu).unwrap();
    let (x, _) = renders(1, 2);
    let z = codec.encode(&x).unwrap();
    assert_eq!(z.dims(), [2, 4, 16, 16]);
    let y = codec.decode(&z).unwrap();
    assert_eq!(y.dims(), [2, 3, 32, 32]);
    assert!(max_abs(&y) <= 1.0);
    // Many images are encoded in chunks: the same latents as one image at a time.
    let (many, _) = renders(35, 2);
    let zs = codec.encode(&many).unwrap();
    assert_eq!(zs.dims(), [70, 4, 16, 16]);
    for i in [0, 63, 64, 69] {
        let one = codec.encode(&many.narrow(0, i, 1).unwrap()).unwrap();
        let d = (zs.narrow(0, i, 1).unwrap() - one).unwrap();
        assert!(max_abs(&d) < 1e-5, "image {i}");
    }
    let err = codec.encode(&x.narrow(2, 0, 16).unwrap()).unwrap_err();
    assert!(err.to_string().contains("(B, 3, 32, 32)"), "{err}");
    let err = codec.decode(&x).unwrap_err();
    assert!(err.to_string().contains("(B, 4, 16, 16)"), "{err}");
    let bad = CodecConfig {
        image_size: 30,
        widths: vec![8, 16, 16],
        ..CodecConfig::default()
    };
    let err = ImageCodec::new(bad, &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("image_size 30"), "{err}");
    let bad = CodecConfig {
        widths: vec![8, 12],
        ..tiny_codec()
    };
    let err = ImageCodec::new(bad, &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("norm_groups 8"), "{err}");
}

#[test]
fn training_reconstructs_renders_and_scales_latents_to_unit_std() {
    let (x, _) = renders(8, 2);
    let training = GeneratorTraining {
        steps: 60,
        batch: 8,
        lr: 3e-3,
        warmup: 5,
        checkpoint_every: 0,
        ..GeneratorTraining::default()
    };
    let untrained = ImageCodec::new(tiny_codec(), &Device::Cpu).unwrap();
    let before =
        mean_abs(&(untrained.decode(&untrained.encode(&x).unwrap()).unwrap() - &x).unwrap());
    let mut losses = Vec::new();
    let codec = train_codec(&tiny_codec(), &x, &training, None, &mut |_, _, l| {
        losses.push(l)
    })
    .unwrap();
    assert_eq!(losses.len(), 60);
    let after = mean_abs(&(codec.decode(&codec.encode(&x).unwrap()).unwrap() - &x).unwrap());
    assert!(
        after < 0.65 * before,
        "mean absolute error {before} before, {after} after training"
    );
    // The statistics give the measured latents unit standard deviation.
    let z = codec.encode(&x).unwrap().flatten_all().unwrap();
    let mean = z.mean_all().unwrap().to_scalar::<f32>().unwrap();
    let var = z
        .broadcast_sub(&Tensor::new(mean, &Device::Cpu).unwrap())
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!((var.sqrt() - 1.0).abs() < 1e-3, "latent std {}", var.sqrt());
    let (_, bound) = codec.latent_statistics().unwrap();
    assert!((bound - max_abs(&z)).abs() < 1e-4, "bound {bound}");
}

#[test]
fn save_load_round_trip_and_errors_name_the_tensor() {
    let dir = TempDir::new("codec-save");
    let (x, _) = renders(2, 2);
    let mut codec = ImageCodec::new(tiny_codec(), &Device::Cpu).unwrap();
    codec.set_latent_statistics(&x).unwrap();
    let path = dir.path("codec.safetensors");
    codec.save(&path).unwrap();
    let loaded = ImageCodec::load(&path, &Device::Cpu).unwrap();
    assert_eq!(loaded.config(), codec.config());
    assert_eq!(
        loaded.latent_statistics().unwrap(),
        codec.latent_statistics().unwrap()
    );
    let d = (loaded.encode(&x).unwrap() - codec.encode(&x).unwrap()).unwrap();
    assert_eq!(max_abs(&d), 0.0);
    // A file without one tensor names it.
    let mut tensors = codec.named_tensors();
    tensors.retain(|(n, _)| n != "decoder.conv_out.weight");
    let meta = [(
        "codec_config".to_string(),
        serde_json::to_string(codec.config()).unwrap(),
    )]
    .into();
    let broken = dir.path("broken.safetensors");
    peft_studio::fsio::write_safetensors(&broken, &tensors, meta).unwrap();
    let err = ImageCodec::load(&broken, &Device::Cpu).unwrap_err();
    assert!(
        err.to_string().contains("decoder.conv_out.weight") && err.to_string().contains("broken"),
        "{err}"
    );
}

#[test]
fn codec_training_resumes_exactly() {
    let dir = TempDir::new("codec-resume");
    let (x, _) = renders(3, 2);
    let training = GeneratorTraining {
        steps: 4,
        batch: 2,
        warmup: 1,
        checkpoint_every: 2,
        ..GeneratorTraining::default()
    };
    let mut straight = Vec::new();
    let a = train_codec(&tiny_codec(), &x, &training, None, &mut |_, _, l| {
        straight.push(l)
    })
    .unwrap();
    let ckpt = dir.path("codec.ckpt");
    let interrupted = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        train_codec(&tiny_codec(), &x, &training, Some(&ckpt), &mut |s, _, _| {
            assert!(s < 3, "session ended")
        })
    }));
    assert!(interrupted.is_err());
    let mut resumed = Vec::new();
    let b = train_codec(&tiny_codec(), &x, &training, Some(&ckpt), &mut |s, _, l| {
        resumed.push((s, l))
    })
    .unwrap();
    assert_eq!(resumed.iter().map(|r| r.0).collect::<Vec<_>>(), [3, 4]);
    assert_eq!(resumed[0].1, straight[2]);
    assert_eq!(resumed[1].1, straight[3]);
    let d = (a.encode(&x).unwrap() - b.encode(&x).unwrap()).unwrap();
    assert_eq!(max_abs(&d), 0.0);
    let other = CodecConfig {
        widths: vec![16, 16],
        ..tiny_codec()
    };
    let err = train_codec(&other, &x, &training, Some(&ckpt), &mut |_, _, _| {}).unwrap_err();
    assert!(
        err.to_string().contains("another image codec architecture"),
        "{err}"
    );
}

/// Sharpening the decoder lowers the reconstruction error and leaves the encoder and the
/// latent statistics exactly as they were (the latent space a generator learned); its edge
/// term is the error of the image differences; an interrupted refinement resumes exactly.
#[test]
fn decoder_refinement_keeps_the_encoder_and_resumes_exactly() {
    let dir = TempDir::new("codec-refine");
    let (x, _) = renders(4, 2);
    let quick = GeneratorTraining {
        steps: 20,
        batch: 4,
        lr: 2e-3,
        warmup: 2,
        ..GeneratorTraining::default()
    };
    let codec = train_codec(&tiny_codec(), &x, &quick, None, &mut |_, _, _| {}).unwrap();
    let error =
        |c: &ImageCodec| mean_abs(&(c.decode(&c.encode(&x).unwrap()).unwrap() - &x).unwrap());
    let refinement = DecoderRefinement {
        training: GeneratorTraining {
            steps: 60,
            checkpoint_every: 30,
            ..quick.clone()
        },
        edge_weight: 1.0,
        latent_noise: 0.1,
    };
    let mut straight = Vec::new();
    let sharp = refine_decoder(codec.clone(), &x, &refinement, None, &mut |_, _, l| {
        straight.push(l)
    })
    .unwrap();
    assert!(
        error(&sharp) < 0.9 * error(&codec),
        "error {} before, {} after",
        error(&codec),
        error(&sharp)
    );
    assert_eq!(
        sharp.latent_statistics().unwrap(),
        codec.latent_statistics().unwrap()
    );
    let dz = (sharp.encode(&x).unwrap() - codec.encode(&x).unwrap()).unwrap();
    assert_eq!(max_abs(&dz), 0.0, "the encoder changed");
    let changed = codec
        .named_tensors()
        .iter()
        .zip(sharp.named_tensors())
        .filter(|((_, a), (_, b))| max_abs(&(a - b).unwrap()) > 0.0)
        .map(|((n, _), _)| n.clone())
        .collect::<Vec<_>>();
    assert!(
        !changed.is_empty() && changed.iter().all(|n| n.starts_with("decoder.")),
        "{changed:?}"
    );

    // The edge term: zero weight gives the plain error, a positive one adds the differences'.
    let z = codec.encode_unscaled(&x).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let (plain, value) = codec.decoder_loss(&z, &x, 0.0, 0.0, &mut rng).unwrap();
    assert_eq!(plain.to_scalar::<f32>().unwrap(), value);
    let (with_edges, _) = codec.decoder_loss(&z, &x, 0.0, 2.0, &mut rng).unwrap();
    let y = codec.decode(&codec.encode(&x).unwrap()).unwrap();
    let unclamped_diff = (&y - &x).unwrap();
    let dx = (unclamped_diff.narrow(3, 1, 31).unwrap() - unclamped_diff.narrow(3, 0, 31).unwrap())
        .unwrap();
    let dy = (unclamped_diff.narrow(2, 1, 31).unwrap() - unclamped_diff.narrow(2, 0, 31).unwrap())
        .unwrap();
    let expected = value + (mean_abs(&dx) + mean_abs(&dy));
    let got = with_edges.to_scalar::<f32>().unwrap();
    // `decode` clamps to [-1, 1] and the loss does not: a freshly trained codec barely leaves it.
    assert!(
        (got - expected).abs() < 0.02 * expected,
        "{got} vs {expected}"
    );

    let ckpt = dir.path("refine.ckpt");
    let interrupted = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        refine_decoder(
            codec.clone(),
            &x,
            &refinement,
            Some(&ckpt),
            &mut |s, _, _| assert!(s <= 30, "session ended"),
        )
    }));
    assert!(interrupted.is_err());
    let mut resumed = Vec::new();
    let again = refine_decoder(
        codec.clone(),
        &x,
        &refinement,
        Some(&ckpt),
        &mut |s, _, l| resumed.push((s, l)),
    )
    .unwrap();
    assert_eq!(resumed.first().map(|r| r.0), Some(31));
    assert_eq!(resumed[0].1, straight[30]);
    let d = (again.decode(&z).unwrap() - sharp.decode(&z).unwrap()).unwrap();
    assert_eq!(max_abs(&d), 0.0);
}

fn latent_unet(codec: &CodecConfig) -> UnetConfig {
    UnetConfig {
        image_size: codec.latent_size(),
        channels: codec.latent_channels,
        codec: Some(codec.clone()),
        ..UnetConfig::tiny()
    }
}

#[test]
fn a_latent_generator_trains_on_latents_and_draws_images() {
    let dir = TempDir::new("latent-generator");
    let (x, prompts) = renders(3, 2);
    let quick = GeneratorTraining {
        steps: 3,
        batch: 2,
        warmup: 1,
        checkpoint_every: 2,
        ..GeneratorTraining::default()
    };
    let codec = train_codec(&tiny_codec(), &x, &quick, None, &mut |_, _, _| {}).unwrap();
    let cfg = latent_unet(&tiny_codec());
    // Without its trained codec a latent generator refuses to train.
    let err = train_generator(
        &cfg,
        None,
        &x,
        &prompts,
        &quick,
        None,
        &mut |_, _, _| {},
        &mut |_| Ok(()),
    )
    .unwrap_err();
    assert!(err.to_string().contains("image codec"), "{err}");
    let mut previews = 0;
    let g = train_generator(
        &cfg,
        Some(codec.clone()),
        &x,
        &prompts,
        &quick,
        Some(&dir.path("gen.ckpt")),
        &mut |_, _, l| assert!(l.is_finite()),
        &mut |g| {
            previews += 1;
            assert_eq!(g.image_size(), 32);
            Ok(())
        },
    )
    .unwrap();
    assert_eq!(previews, 2, "after the checkpoints at steps 2 and 3");
    assert_eq!(g.image_size(), 32);
    // The loss on images equals the loss on their latents (same random draws).
    use rand::SeedableRng;
    let l_img = g
        .loss(&x, &prompts, &mut rand::rngs::StdRng::seed_from_u64(7))
        .unwrap();
    let z = g.to_latents(&x).unwrap();
    assert_eq!(z.dims(), [6, 4, 16, 16]);
    let l_lat = g
        .latent_loss_from(&z, &prompts, &mut rand::rngs::StdRng::seed_from_u64(7), 0)
        .unwrap();
    assert_eq!(max_abs(&(l_img - l_lat).unwrap()), 0.0);
    // Samples are images of the codec's size within [-1, 1]; the sampler clips latents to the
    // codec's bound.
    let ddim = DdimConfig {
        steps: 3,
        prediction: cfg.prediction,
        clip_x0: Some(g.x0_bound().unwrap()),
        seed: 1,
        ..DdimConfig::default()
    };
    let drawn = g.sample("smile", 2, &ddim, 2.0).unwrap();
    assert_eq!(drawn.dims(), [2, 3, 32, 32]);
    assert!(max_abs(&drawn) <= 1.0);
    assert_eq!(
        g.x0_bound().unwrap(),
        codec.latent_statistics().unwrap().1 as f64
    );
    // Saved with its codec (kept f32, the UNet stored as f16): the loaded generator predicts
    // the same noise to f16 rounding, with the very same codec, and a second save/load round
    // trip draws the very same images.
    let path = dir.path("generator.safetensors");
    g.save(&path).unwrap();
    let loaded = Generator::load(&path, &Device::Cpu).unwrap();
    let noisy = z.narrow(0, 0, 2).unwrap();
    let two = &prompts[..2];
    let (p_saved, p_loaded) = (
        g.predict(&noisy, &[5, 700], two).unwrap(),
        loaded.predict(&noisy, &[5, 700], two).unwrap(),
    );
    let moved = max_abs(&(&p_saved - &p_loaded).unwrap()) / max_abs(&p_saved);
    assert!(moved < 5e-3, "{moved}");
    let again = loaded.sample("smile", 2, &ddim, 2.0).unwrap();
    let again_path = dir.path("generator-again.safetensors");
    loaded.save(&again_path).unwrap();
    let reloaded = Generator::load(&again_path, &Device::Cpu).unwrap();
    let third = reloaded.sample("smile", 2, &ddim, 2.0).unwrap();
    assert_eq!(max_abs(&(&again - &third).unwrap()), 0.0);
    let stored = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    for (name, t) in &stored {
        let expected = if name.starts_with("codec.") {
            DType::F32
        } else {
            DType::F16
        };
        assert_eq!(t.dtype(), expected, "{name}");
    }
    let carried = loaded.codec().unwrap().named_tensors();
    for ((name, a), (_, b)) in carried.iter().zip(codec.named_tensors().iter()) {
        assert_eq!(max_abs(&(a - b).unwrap()), 0.0, "{name}");
    }
    assert_eq!(loaded.parameter_count(), g.parameter_count());
    // A codec of another configuration is refused.
    let mut other = Generator::new(cfg.clone(), &Device::Cpu).unwrap();
    let wrong = ImageCodec::new(
        CodecConfig {
            seed: 9,
            ..tiny_codec()
        },
        &Device::Cpu,
    )
    .unwrap();
    assert!(other.set_codec(wrong).is_err());
    // The UNet must diffuse the codec's latent shape.
    let mut bad = cfg;
    bad.image_size = 32;
    let err = Generator::new(bad, &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("latent side 16"), "{err}");
}

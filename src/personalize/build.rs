//! Building a DiffLoRA personaliser from a preset, stage by stage: the base generator, the
//! identity-oriented LoRA bank, the identity encoders, the LoRA autoencoder and the latent
//! denoiser. Every stage writes its result into the preset's output folder and is skipped when
//! that result exists, and the long stages checkpoint, so an interrupted build resumes where it
//! stopped by running the same command again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::bank::{LoraBank, LoraRecipe, build_bank};
use super::codec_stages::{build_codec, build_decoder, load_codec, load_sharp_codec};
use super::commands::{contact_sheet, save_png};
use super::ensemble::{PredictionConfig, member_config, member_file};
use super::generator_training::{DecoderRefinement, GeneratorTraining, train_generator};
use super::hyper::{AutoencoderConfig, DenoiserConfig, LatentDenoiser, LoraAutoencoder};
use super::identity_encoder::{
    EncoderConfig, IdentityEncoder, ParamRegressor, centroid_accuracy_of,
};
use super::tensors::{images_to_tensor, tensor_to_images};
use crate::data::people::{PeopleSource, PersonImages};
use crate::data::portrait::IDENTITY_DIMS;
use crate::fsio::write_atomic;
use crate::models::unet::{CodecConfig, Generator, UnetConfig};

pub use super::files;

/// Which people each stage uses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeopleRoles {
    /// People the base generator is trained on (identity is not controllable by the prompt).
    pub generator: PeopleSource,
    /// People of the LoRA bank (the hypernetwork's training identities).
    pub bank: PeopleSource,
    /// People the conditioning identity encoder is trained on (the generator's when absent).
    #[serde(default)]
    pub encoder: Option<PeopleSource>,
    /// People the evaluation identity encoder is trained on (it plays no part in conditioning).
    pub eval_encoder: PeopleSource,
    /// Held-out people for `eval-personalize`: never in the bank or the hypernetwork's data.
    pub eval: PeopleSource,
}

/// Everything that defines a personaliser: data, architectures and training recipes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiffLoraPreset {
    /// Output folder of the built personaliser.
    pub out: PathBuf,
    /// Side of the square images.
    pub image_size: u32,
    /// The people of each role.
    pub people: PeopleRoles,
    /// The generator's architecture.
    #[serde(default)]
    pub unet: UnetConfig,
    /// The generator's training.
    #[serde(default)]
    pub generator_training: GeneratorTraining,
    /// The image codec's training (a latent generator, `unet.codec` set, only).
    #[serde(default)]
    pub codec_training: GeneratorTraining,
    /// Sharpening of the codec's decoder after its training (a latent generator only; none:
    /// the codec is used as trained).
    #[serde(default)]
    pub decoder_refinement: Option<DecoderRefinement>,
    /// The recipe of every identity LoRA (bank and direct fine-tuning).
    #[serde(default)]
    pub lora: LoraRecipe,
    /// The conditioning identity encoder.
    #[serde(default)]
    pub encoder: EncoderConfig,
    /// The evaluation identity encoder (train it differently: another seed and shape).
    #[serde(default)]
    pub eval_encoder: EncoderConfig,
    /// The LoRA autoencoder.
    #[serde(default)]
    pub autoencoder: AutoencoderConfig,
    /// The latent denoiser (`latent_dim` and `cond_dim` are set from the autoencoder and the
    /// encoder).
    #[serde(default)]
    pub denoiser: DenoiserConfig,
    /// How the LoRA is predicted: denoiser ensemble, samples, strength.
    #[serde(default)]
    pub prediction: PredictionConfig,
    /// How personalisation samples.
    #[serde(default)]
    pub sampling: SamplingConfig,
}

/// How galleries are drawn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingConfig {
    /// DDIM steps of the image generator.
    pub steps: usize,
    /// Classifier-free guidance scale (1: none).
    pub guidance: f64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            steps: 20,
            guidance: 2.0,
        }
    }
}

impl DiffLoraPreset {
    /// Reads a preset file; errors name the file and the bad field.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read preset {}: {e}", path.display()))?;
        let preset: Self =
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("preset {}: {e}", path.display()))?;
        preset
            .validate()
            .map_err(|e| anyhow::anyhow!("preset {}: {e:#}", path.display()))?;
        Ok(preset)
    }
}

impl DiffLoraPreset {
    /// [`tiny`](Self::tiny) with a latent generator: a tiny image codec (32 × 32 to
    /// 4 × 16 × 16) trained for a few steps before the UNet.
    pub fn tiny_latent(out: &Path) -> Self {
        let codec = CodecConfig {
            image_size: 32,
            widths: vec![8, 16],
            ..CodecConfig::default()
        };
        let mut preset = Self::tiny(out);
        preset.unet.image_size = codec.latent_size();
        preset.unet.channels = codec.latent_channels;
        preset.unet.codec = Some(codec);
        preset.decoder_refinement = Some(DecoderRefinement {
            training: GeneratorTraining {
                steps: 3,
                batch: 4,
                checkpoint_every: 2,
                ..GeneratorTraining::default()
            },
            ..DecoderRefinement::default()
        });
        preset
    }

    /// A very small personaliser that builds in seconds (tests, UI development): a tiny
    /// generator trained for a few steps, a bank of 3 synthetic people, brief encoders and
    /// hypernetwork. Its outputs are meaningless; the plumbing is real.
    pub fn tiny(out: &Path) -> Self {
        let synthetic =
            |first_seed: u64, count: usize, images_per_person: usize| PeopleSource::Synthetic {
                first_seed,
                count,
                images_per_person,
                render_seed: 0,
            };
        Self {
            out: out.to_path_buf(),
            image_size: 32,
            people: PeopleRoles {
                generator: synthetic(0, 8, 2),
                bank: synthetic(1_000_000, 3, 4),
                encoder: Some(synthetic(4_000_000, 4, 3)),
                eval_encoder: synthetic(3_000_000, 4, 3),
                eval: synthetic(2_000_000, 2, 3),
            },
            unet: UnetConfig::tiny(),
            generator_training: GeneratorTraining {
                steps: 3,
                batch: 4,
                checkpoint_every: 2,
                ..GeneratorTraining::default()
            },
            codec_training: GeneratorTraining {
                steps: 3,
                batch: 4,
                checkpoint_every: 2,
                ..GeneratorTraining::default()
            },
            decoder_refinement: None,
            lora: LoraRecipe {
                steps: 2,
                batch: 2,
                per_person: 2,
                images_per_lora: 3,
                ..LoraRecipe::default()
            },
            encoder: EncoderConfig {
                steps: 3,
                batch: 8,
                ..EncoderConfig::default()
            },
            eval_encoder: EncoderConfig {
                steps: 3,
                batch: 8,
                seed: 1,
                ..EncoderConfig::default()
            },
            autoencoder: AutoencoderConfig {
                latent_dim: 4,
                hidden: 16,
                steps: 5,
                batch: 4,
                ..AutoencoderConfig::default()
            },
            denoiser: DenoiserConfig {
                hidden: 16,
                layers: 1,
                time_dim: 8,
                steps: 5,
                batch: 4,
                sample_steps: 3,
                ..DenoiserConfig::default()
            },
            prediction: PredictionConfig {
                members: 2,
                samples: 2,
                lora_strength: 1.5,
            },
            sampling: SamplingConfig {
                steps: 3,
                guidance: 2.0,
            },
        }
    }
}

/// The stages of a build, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Stage {
    /// A latent generator's image codec (nothing to do for a pixel generator).
    Codec,
    /// Sharpening of the image codec's decoder (when the preset asks for it).
    Decoder,
    /// The base text-to-image generator.
    Generator,
    /// The identity-oriented LoRA bank.
    Bank,
    /// The conditioning and evaluation identity encoders.
    Encoders,
    /// The LoRA autoencoder.
    Autoencoder,
    /// The conditional latent denoiser.
    Denoiser,
    /// Every stage in order.
    All,
}

/// Reports what a build is doing: `(stage, step, total, loss)`.
pub type BuildProgress<'a> = &'a mut dyn FnMut(&str, usize, usize, f32);

/// Stacks the images and prompts of `people`.
pub fn stack_people(
    people: &[PersonImages],
    device: &Device,
) -> anyhow::Result<(Tensor, Vec<String>)> {
    let images: Vec<image::RgbImage> = people.iter().flat_map(|p| p.images.clone()).collect();
    let prompts: Vec<String> = people.iter().flat_map(|p| p.prompts.clone()).collect();
    Ok((images_to_tensor(&images, device)?, prompts))
}

/// Runs the stages of `preset` up to and including `stage` ([`Stage::All`]: every stage),
/// skipping finished ones.
pub fn build(
    preset: &DiffLoraPreset,
    stage: Stage,
    device: &Device,
    progress: BuildProgress<'_>,
) -> anyhow::Result<()> {
    build_stages(preset, stage, false, device, progress)
}

/// [`build`]; with `only`, just `stage` runs (its inputs must exist). Every stage computes on
/// `device`.
pub fn build_stages(
    preset: &DiffLoraPreset,
    stage: Stage,
    only: bool,
    device: &Device,
    progress: BuildProgress<'_>,
) -> anyhow::Result<()> {
    let out = &preset.out;
    std::fs::create_dir_all(out)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", out.display()))?;
    let text = toml::to_string(preset)?;
    write_atomic(&out.join(files::PRESET), text.as_bytes())?;
    let order = [
        Stage::Codec,
        Stage::Decoder,
        Stage::Generator,
        Stage::Bank,
        Stage::Encoders,
        Stage::Autoencoder,
        Stage::Denoiser,
    ];
    let last = order
        .iter()
        .position(|s| *s == stage)
        .unwrap_or(order.len() - 1);
    let first = if only && stage != Stage::All { last } else { 0 };
    for s in &order[first..=last] {
        let t = Instant::now();
        // What this stage measures; merged into the file's report when it ran, so builds of
        // other stages running beside this one (in other processes) keep their figures.
        let mut report = BuildReport::default();
        let ran = match s {
            Stage::Codec => build_codec(preset, &mut report, device, progress)?,
            Stage::Decoder => build_decoder(preset, &mut report, device, progress)?,
            Stage::Generator => build_generator(preset, device, progress)?,
            Stage::Bank => build_lora_bank(preset, device, progress)?,
            Stage::Encoders => build_encoders(preset, &mut report, device, progress)?,
            Stage::Autoencoder => build_autoencoder(preset, &mut report, device, progress)?,
            Stage::Denoiser => build_denoiser(preset, device, progress)?,
            Stage::All => false,
        };
        if ran {
            let path = out.join(files::BUILD_REPORT);
            let mut saved = BuildReport::load(&path);
            saved.absorb(report);
            saved
                .seconds
                .insert(format!("{s:?}").to_lowercase(), t.elapsed().as_secs_f64());
            saved.save(&path)?;
        }
    }
    Ok(())
}

/// What a build measured, kept in the output folder.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct BuildReport {
    /// Wall seconds of each stage that ran (a resumed stage counts its last part).
    pub seconds: BTreeMap<String, f64>,
    /// Nearest-centroid identity accuracy of each encoder on held-out images of its people.
    pub encoder_accuracy: BTreeMap<String, f32>,
    /// Relative reconstruction error of the LoRA autoencoder on the bank.
    pub autoencoder_error: Option<f32>,
    /// Mean absolute error (in [-1, 1] units) of the image codec on held-out renders.
    pub codec_error: Option<f32>,
    /// The same error after the decoder's sharpening.
    pub sharp_codec_error: Option<f32>,
}

impl BuildReport {
    fn load(path: &Path) -> Self {
        std::fs::read_to_string(path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default()
    }

    /// Takes every figure `other` has (a stage's findings) over this one's.
    fn absorb(&mut self, other: BuildReport) {
        let BuildReport {
            seconds,
            encoder_accuracy,
            autoencoder_error,
            codec_error,
            sharp_codec_error,
        } = other;
        self.seconds.extend(seconds);
        self.encoder_accuracy.extend(encoder_accuracy);
        for (mine, theirs) in [
            (&mut self.autoencoder_error, autoencoder_error),
            (&mut self.codec_error, codec_error),
            (&mut self.sharp_codec_error, sharp_codec_error),
        ] {
            if theirs.is_some() {
                *mine = theirs;
            }
        }
    }

    fn save(&self, path: &Path) -> anyhow::Result<()> {
        write_atomic(path, serde_json::to_string_pretty(self)?.as_bytes())?;
        Ok(())
    }
}

fn build_generator(
    preset: &DiffLoraPreset,
    device: &Device,
    progress: BuildProgress<'_>,
) -> anyhow::Result<bool> {
    let path = preset.out.join(files::GENERATOR);
    if path.exists() {
        return Ok(false);
    }
    let people = preset.people.generator.load(preset.image_size)?;
    let (images, prompts) = stack_people(&people, device)?;
    log::info!(
        "generator: {} images of {} people",
        prompts.len(),
        people.len()
    );
    let checkpoint = preset.out.join(files::GENERATOR_CHECKPOINT);
    let codec = match &preset.unet.codec {
        Some(_) => Some(load_codec(preset, device)?),
        None => None,
    };
    let generator: Generator = train_generator(
        &preset.unet,
        codec,
        &images,
        &prompts,
        &preset.generator_training,
        Some(&checkpoint),
        &mut |step, total, loss| progress("generator", step, total, loss),
        &mut |g| draw_generator_preview(g, &preset.out.join(files::GENERATOR_PREVIEW)),
    )?;
    let mut generator = generator;
    if let Some(sharp) = load_sharp_codec(preset, device)? {
        generator.set_codec(sharp)?;
        draw_generator_preview(&generator, &preset.out.join(files::GENERATOR_PREVIEW))?;
    }
    generator.save(&path)?;
    // The final checkpoint stays: raise `generator_training.steps`, delete the generator file
    // and build again to train longer from where this run ended.
    Ok(true)
}

/// Prompts of the generator preview, one row each.
const PREVIEW_PROMPTS: [&str; 4] = [
    "smile, face front, blue background, even light, no accessory",
    "surprised, face left, yellow background, light from the left, hat",
    "sad, face right, green background, light from the top, scarf",
    "neutral, face front, purple background, light from the right, earrings",
];

/// Draws four samples of each preview prompt (20 DDIM steps, guidance 2, seed 0) into `path`,
/// enlarged 3×, so a long generator training can be looked at while it runs.
pub fn draw_generator_preview(generator: &Generator, path: &Path) -> anyhow::Result<()> {
    let ddim = crate::diffusion::DdimConfig {
        steps: 20,
        eta: 0.0,
        prediction: generator.config().prediction,
        clip_x0: Some(generator.x0_bound()?),
        seed: 0,
    };
    let mut rows = Vec::with_capacity(PREVIEW_PROMPTS.len());
    for prompt in PREVIEW_PROMPTS {
        rows.push(tensor_to_images(&generator.sample(prompt, 4, &ddim, 2.0)?)?);
    }
    let rows: Vec<&[image::RgbImage]> = rows.iter().map(|r| r.as_slice()).collect();
    save_png(&contact_sheet(&rows, 3), path)
}

pub(super) fn load_generator(
    preset: &DiffLoraPreset,
    device: &Device,
) -> anyhow::Result<Generator> {
    let path = preset.out.join(files::GENERATOR);
    Generator::load(&path, device)
        .map_err(|e| anyhow::anyhow!("{e} (build the `generator` stage first)"))
}

fn build_lora_bank(
    preset: &DiffLoraPreset,
    device: &Device,
    progress: BuildProgress<'_>,
) -> anyhow::Result<bool> {
    let path = preset.out.join(files::BANK);
    let people = preset.people.bank.load(preset.image_size)?;
    let done = LoraBank::load(&path)
        .map(|b| b.vectors.len() == people.len() * preset.lora.per_person)
        .unwrap_or(false);
    if done {
        return Ok(false);
    }
    let generator = load_generator(preset, device)?;
    build_bank(
        &generator,
        &people,
        &preset.lora,
        &path,
        &mut |i, n, loss| progress("lora-bank", i, n, loss),
    )?;
    Ok(true)
}

/// Images and identity labels of `people`.
fn labelled(people: &[PersonImages], device: &Device) -> anyhow::Result<(Tensor, Vec<usize>)> {
    let (images, _) = stack_people(people, device)?;
    let labels = people
        .iter()
        .enumerate()
        .flat_map(|(i, p)| std::iter::repeat_n(i, p.images.len()))
        .collect();
    Ok((images, labels))
}

/// Trains an encoder on every image but the last of each person and reports its
/// nearest-centroid accuracy on those last images.
fn train_encoder(
    name: &str,
    people: &[PersonImages],
    cfg: &EncoderConfig,
    device: &Device,
    progress: BuildProgress<'_>,
) -> anyhow::Result<(IdentityEncoder, f32)> {
    let (images, labels) = labelled(people, device)?;
    let mut train_idx = Vec::new();
    let mut test_idx = Vec::new();
    let mut offset = 0;
    for p in people {
        let k = p.images.len();
        train_idx.extend((offset..offset + k - 1).map(|i| i as u32));
        test_idx.push((offset + k - 1) as u32);
        offset += k;
    }
    let take = |idx: &[u32]| -> anyhow::Result<(Tensor, Vec<usize>)> {
        let t = images.index_select(&Tensor::from_slice(idx, idx.len(), device)?, 0)?;
        Ok((t, idx.iter().map(|&i| labels[i as usize]).collect()))
    };
    let (train_x, train_y) = take(&train_idx)?;
    let (test_x, test_y) = take(&test_idx)?;
    let total = cfg.steps;
    let encoder = IdentityEncoder::train(&train_x, &train_y, cfg, &mut |s, l| {
        progress(name, s, total, l)
    })?;
    // Nearest centroid of the training images of each person, tested on the held-out ones.
    let train_e = encoder.embed(&train_x)?;
    let test_e = encoder.embed(&test_x)?;
    let accuracy = centroid_accuracy_of(&train_e, &train_y, &test_e, &test_y)?;
    Ok((encoder, accuracy))
}

fn build_encoders(
    preset: &DiffLoraPreset,
    report: &mut BuildReport,
    device: &Device,
    progress: BuildProgress<'_>,
) -> anyhow::Result<bool> {
    let mut ran = false;
    let path = preset.out.join(files::ENCODER);
    if !path.exists() {
        let source = preset
            .people
            .encoder
            .as_ref()
            .unwrap_or(&preset.people.generator);
        let people = source.load(preset.image_size)?;
        let (encoder, acc) = train_encoder(
            "identity-encoder",
            &people,
            &preset.encoder,
            device,
            progress,
        )?;
        encoder.save(&path)?;
        report
            .encoder_accuracy
            .insert("identity_encoder".into(), acc);
        ran = true;
    }
    let path = preset.out.join(files::EVAL_ENCODER);
    if !path.exists() {
        let people = preset.people.eval_encoder.load(preset.image_size)?;
        let (encoder, acc) = train_encoder(
            "eval-encoder",
            &people,
            &preset.eval_encoder,
            device,
            progress,
        )?;
        if preset.people.eval_encoder.is_synthetic() {
            let (images, _) = stack_people(&people, device)?;
            let params: Vec<f32> = people
                .iter()
                .flat_map(|p| {
                    let v = p.params.clone().unwrap_or_default();
                    std::iter::repeat_n(v, p.images.len()).flatten()
                })
                .collect();
            let targets = Tensor::from_vec(params, (images.dim(0)?, IDENTITY_DIMS), device)?;
            let reg = ParamRegressor::fit(&encoder.embed(&images)?, &targets, 1e-2)?;
            reg.save(&preset.out.join(files::PARAM_REGRESSOR))?;
        }
        encoder.save(&path)?;
        report.encoder_accuracy.insert("eval_encoder".into(), acc);
        ran = true;
    }
    Ok(ran)
}

fn load_bank(preset: &DiffLoraPreset) -> anyhow::Result<LoraBank> {
    let path = preset.out.join(files::BANK);
    LoraBank::load(&path).map_err(|e| anyhow::anyhow!("{e} (build the `bank` stage first)"))
}

fn build_autoencoder(
    preset: &DiffLoraPreset,
    report: &mut BuildReport,
    device: &Device,
    progress: BuildProgress<'_>,
) -> anyhow::Result<bool> {
    let path = preset.out.join(files::AUTOENCODER);
    if path.exists() {
        return Ok(false);
    }
    let bank = load_bank(preset)?;
    let vectors = bank.matrix(device)?;
    let total = preset.autoencoder.steps;
    let ae = LoraAutoencoder::train(&vectors, &preset.autoencoder, &mut |s, l| {
        progress("lora-autoencoder", s, total, l)
    })?;
    report.autoencoder_error = Some(ae.reconstruction_error(&vectors)?);
    ae.save(&path)?;
    Ok(true)
}

fn build_denoiser(
    preset: &DiffLoraPreset,
    device: &Device,
    progress: BuildProgress<'_>,
) -> anyhow::Result<bool> {
    preset.prediction.validate()?;
    let members = preset.prediction.members;
    let missing: Vec<usize> = (0..members)
        .filter(|&m| !member_file(&preset.out, m).exists())
        .collect();
    if missing.is_empty() {
        return Ok(false);
    }
    let bank = load_bank(preset)?;
    let ae = LoraAutoencoder::load(&preset.out.join(files::AUTOENCODER), device)?;
    let encoder = IdentityEncoder::load(&preset.out.join(files::ENCODER), device)?;
    let people = preset.people.bank.load(preset.image_size)?;
    anyhow::ensure!(
        people.iter().map(|p| &p.name).eq(bank.people.iter()),
        "the bank's people differ from the preset's `people.bank`; rebuild the bank"
    );
    let latents = ae.encode(&bank.matrix(device)?)?;
    let embeddings = people
        .iter()
        .map(|p| Ok(encoder.embed(&images_to_tensor(&p.images, device)?)?))
        .collect::<anyhow::Result<Vec<Tensor>>>()?;
    let mut cfg = preset.denoiser.clone();
    cfg.latent_dim = ae.latent_dim();
    cfg.cond_dim = encoder.embed_dim();
    let total = cfg.steps;
    // Each member is saved as soon as it is trained, so an interrupted build keeps them.
    for m in missing {
        let label = if members == 1 {
            "latent-denoiser".to_string()
        } else {
            format!("latent-denoiser {}/{members}", m + 1)
        };
        let den = LatentDenoiser::train(
            &latents,
            &bank.person,
            &embeddings,
            &member_config(&cfg, m),
            &mut |s, l| progress(&label, s, total, l),
        )?;
        den.save(&member_file(&preset.out, m))?;
    }
    Ok(true)
}

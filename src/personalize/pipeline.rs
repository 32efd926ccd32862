//! Personalisation with a built DiffLoRA personaliser: reference portraits → identity
//! embedding → sampled LoRA latent → decoded LoRA → merged into the generator → a gallery for
//! the prompt, with no fine-tuning. The two comparison paths live here too: the base generator
//! (no LoRA) and a LoRA fine-tuned directly on the references (what DiffLoRA replaces).

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};
use image::RgbImage;
use serde::{Deserialize, Serialize};

use super::bank::{LoraBank, LoraLayout, LoraRecipe, train_lora, with_fresh_lora};
use super::build::DiffLoraPreset;
use super::ensemble::{DenoiserEnsemble, scale_lora_update};
use super::familiarity::{FAMILIARITY_FILE, Familiarity, FamiliarityStats};
use super::files;
use super::hyper::LoraAutoencoder;
use super::identity_encoder::{IdentityEncoder, ParamRegressor};
use super::progress::{Cancelled, GalleryKind, Progress, Stage, announce, ignore};
use super::tensors::{images_to_tensor, tensor_to_images};
use crate::data::portrait::Attributes;
use crate::diffusion::DdimConfig;
use crate::models::unet::Generator;
use crate::peft::checkpoint::save_adapter;
use crate::peft::linear::LinearLayers;

/// Folder of the built-in personaliser, relative to the assets folder.
pub const BUILTIN_PERSONALISER: &str = "models/difflora-portraits-64";

/// The built-in personaliser's folder (`assets/models/difflora-portraits-64`).
pub fn builtin_dir() -> PathBuf {
    crate::data::assets_dir().join(BUILTIN_PERSONALISER)
}

/// Seconds spent in each stage of one personalisation.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StageSeconds {
    /// Embedding and fusing the references.
    pub encode_references: f64,
    /// Sampling the LoRA latent with the conditional denoiser.
    pub sample_latent: f64,
    /// Decoding the latent to LoRA weights.
    pub decode_lora: f64,
    /// Loading the LoRA into the generator and merging it.
    pub merge: f64,
    /// References to merged LoRA: the sum of the four above.
    pub personalise_total: f64,
    /// Drawing the gallery.
    pub gallery: f64,
}

/// A generated gallery with an identity score per image.
#[derive(Debug, Clone)]
pub struct Gallery {
    /// The images.
    pub images: Vec<RgbImage>,
    /// Cosine similarity of each image to the fused references under the evaluation encoder
    /// (an encoder that played no part in conditioning).
    pub scores: Vec<f32>,
    /// Seconds to draw the gallery.
    pub seconds: f64,
}

impl Gallery {
    /// Mean identity score.
    pub fn mean_score(&self) -> f32 {
        self.scores.iter().sum::<f32>() / self.scores.len().max(1) as f32
    }
}

/// The result of [`Personaliser::personalise`].
pub struct Personalised {
    /// The generator with the predicted LoRA attached, unmerged (to save as an adapter).
    pub adapted: Generator,
    /// The generator with the LoRA merged into its weights (what the gallery was drawn with).
    pub merged: Generator,
    /// The predicted LoRA as a flat vector.
    pub lora: Vec<f32>,
    /// The gallery.
    pub gallery: Gallery,
    /// Seconds per stage.
    pub seconds: StageSeconds,
}

/// Checks of a reference set: problems that do not stop personalisation.
pub fn reference_warnings(refs: &[RgbImage]) -> Vec<String> {
    let mut w = Vec::new();
    if refs.len() == 1 {
        w.push(
            "only one reference image: the identity estimate is rough (3–5 photos work better)"
                .to_string(),
        );
    }
    if refs.len() > 1 && refs.windows(2).all(|p| p[0] == p[1]) {
        w.push("all reference images are identical".to_string());
    }
    w
}

/// The familiarity statistics of the personaliser in `dir`: its file, or computed from the
/// preset's bank people and written there (where the folder is writable). `None`, logged, when
/// neither works (a photo folder that moved).
fn familiarity_stats(dir: &Path, preset: &DiffLoraPreset) -> Option<FamiliarityStats> {
    let path = dir.join(FAMILIARITY_FILE);
    if path.is_file() {
        match FamiliarityStats::read(&path) {
            Ok(s) if s.scale().image_size == preset.image_size => return Some(s),
            Ok(_) => log::warn!(
                "{}: made for another image size; recomputing",
                path.display()
            ),
            Err(e) => log::warn!("{e:#}; recomputing"),
        }
    }
    let computed = preset
        .people
        .bank
        .load(preset.image_size)
        .map_err(anyhow::Error::from)
        .and_then(|people| FamiliarityStats::from_people(&people, 0));
    match computed {
        Ok(s) => {
            if let Err(e) = s.write(&path) {
                log::info!("familiarity statistics not saved: {e:#}");
            }
            Some(s)
        }
        Err(e) => {
            log::warn!("no familiarity check for {}: {e:#}", dir.display());
            None
        }
    }
}

/// A built personaliser: generator, encoders, LoRA autoencoder and latent denoiser.
pub struct Personaliser {
    dir: PathBuf,
    device: Device,
    preset: DiffLoraPreset,
    generator: Generator,
    encoder: IdentityEncoder,
    eval_encoder: IdentityEncoder,
    regressor: Option<ParamRegressor>,
    autoencoder: LoraAutoencoder,
    denoisers: DenoiserEnsemble,
    layout: LoraLayout,
    /// What the conditioning encoder knows of the bank people (`None`: they could not be read).
    familiarity: Option<FamiliarityStats>,
}

impl Personaliser {
    /// Loads the personaliser built into `dir` by `difflora-build` onto `device`; the error
    /// names the missing or bad file.
    pub fn load(dir: &Path, device: &Device) -> anyhow::Result<Self> {
        let device = device.clone();
        let file = |name: &str| dir.join(name);
        let preset_path = file(files::PRESET);
        let text = std::fs::read_to_string(&preset_path).map_err(|e| {
            anyhow::anyhow!("{}: {e} (not a built personaliser)", preset_path.display())
        })?;
        let preset: DiffLoraPreset =
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", preset_path.display()))?;
        let generator = Generator::load(&file(files::GENERATOR), &device)?;
        let encoder = IdentityEncoder::load(&file(files::ENCODER), &device)?;
        let eval_encoder = IdentityEncoder::load(&file(files::EVAL_ENCODER), &device)?;
        let regressor = if file(files::PARAM_REGRESSOR).exists() {
            Some(ParamRegressor::load(&file(files::PARAM_REGRESSOR))?)
        } else {
            None
        };
        let autoencoder = LoraAutoencoder::load(&file(files::AUTOENCODER), &device)?;
        preset
            .prediction
            .validate()
            .map_err(|e| anyhow::anyhow!("{}: {e}", preset_path.display()))?;
        let denoisers = DenoiserEnsemble::load(dir, preset.prediction.members, &device)?;
        let layout = LoraLayout::of_model(with_fresh_lora(&generator, &preset.lora)?.unet())?;
        anyhow::ensure!(
            layout.len() == autoencoder.input_dim(),
            "{}: the autoencoder reads {} values, the generator's LoRA layout has {}",
            file(files::AUTOENCODER).display(),
            autoencoder.input_dim(),
            layout.len()
        );
        let familiarity = familiarity_stats(dir, &preset);
        Ok(Self {
            dir: dir.to_path_buf(),
            device,
            preset,
            generator,
            encoder,
            eval_encoder,
            regressor,
            autoencoder,
            denoisers,
            layout,
            familiarity,
        })
    }

    /// How familiar `refs` are to this personaliser (see [`super::familiarity`]); `None` when
    /// its bank people could not be read (a photo folder that moved).
    pub fn familiarity(&self, refs: &[RgbImage]) -> anyhow::Result<Option<Familiarity>> {
        let Some(stats) = &self.familiarity else {
            return Ok(None);
        };
        Ok(Some(stats.measure(refs)?))
    }

    /// Every warning about a reference set: [`reference_warnings`], and photos unlike the
    /// people this personaliser knows.
    pub fn reference_warnings(&self, refs: &[RgbImage]) -> anyhow::Result<Vec<String>> {
        let mut w = reference_warnings(refs);
        w.extend(self.familiarity(refs)?.and_then(|f| f.warning()));
        Ok(w)
    }

    /// Where it computes.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The conditioning identity encoder.
    pub fn encoder(&self) -> &IdentityEncoder {
        &self.encoder
    }

    /// The folder it was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The preset it was built from.
    pub fn preset(&self) -> &DiffLoraPreset {
        &self.preset
    }

    /// Side of the images it reads and draws.
    pub fn image_size(&self) -> u32 {
        self.preset.image_size
    }

    /// The prompt as the generator draws it. A generator built on synthetic portraits was
    /// trained on prompts naming all five attributes, so a partial prompt is completed with the
    /// defaults of the attributes it does not mention (`"smile, blue background"` →
    /// `"smile, face front, blue background, even light, no accessory"`; unknown words are
    /// dropped): partial prompts, never seen in training, were followed far less often. A
    /// generator built on photos knows only the empty prompt.
    pub fn drawn_prompt(&self, prompt: &str) -> String {
        if self.preset.people.generator.is_synthetic() {
            Attributes::from_words(&[prompt]).prompt()
        } else {
            String::new()
        }
    }

    /// The base generator.
    pub fn generator(&self) -> &Generator {
        &self.generator
    }

    /// The LoRA recipe (layout and direct fine-tuning).
    pub fn recipe(&self) -> &LoraRecipe {
        &self.preset.lora
    }

    /// The flat LoRA layout.
    pub fn layout(&self) -> &LoraLayout {
        &self.layout
    }

    /// The evaluation encoder.
    pub fn eval_encoder(&self) -> &IdentityEncoder {
        &self.eval_encoder
    }

    /// The identity-parameter regressor (synthetic personalisers only).
    pub fn regressor(&self) -> Option<&ParamRegressor> {
        self.regressor.as_ref()
    }

    /// The LoRA bank, when the folder still holds it.
    pub fn bank(&self) -> Option<LoraBank> {
        LoraBank::load(&self.dir.join(files::BANK)).ok()
    }

    /// The reference images as a tensor, checked.
    pub fn references_tensor(&self, refs: &[RgbImage]) -> anyhow::Result<Tensor> {
        anyhow::ensure!(!refs.is_empty(), "no reference images");
        let s = self.image_size();
        for (i, r) in refs.iter().enumerate() {
            anyhow::ensure!(
                r.dimensions() == (s, s),
                "reference {} is {}×{}; references must be {s}×{s} (load them with load_references)",
                i + 1,
                r.width(),
                r.height()
            );
        }
        Ok(images_to_tensor(refs, &self.device)?)
    }

    /// References → LoRA (no fine-tuning): the generator with the predicted LoRA attached,
    /// the flat vector, and the seconds of each stage (the gallery's left at 0).
    pub fn predict_lora(
        &self,
        refs: &[RgbImage],
        seed: u64,
    ) -> anyhow::Result<(Generator, Vec<f32>, StageSeconds)> {
        self.predict_lora_with(refs, seed, &mut ignore)
    }

    /// [`predict_lora`](Self::predict_lora), announcing each stage to `progress` first (a
    /// `Break` stops with [`Cancelled`]).
    pub fn predict_lora_with(
        &self,
        refs: &[RgbImage],
        seed: u64,
        progress: Progress<'_>,
    ) -> anyhow::Result<(Generator, Vec<f32>, StageSeconds)> {
        let mut secs = StageSeconds::default();
        announce(progress, Stage::EncodingReferences)?;
        let t = Instant::now();
        let x = self.references_tensor(refs)?;
        let cond = self.encoder.fuse(&x)?.unsqueeze(0)?;
        secs.encode_references = t.elapsed().as_secs_f64();
        announce(progress, Stage::SamplingLatent)?;
        let t = Instant::now();
        let z = self
            .denoisers
            .predict(&cond, seed, self.preset.prediction.samples)?;
        secs.sample_latent = t.elapsed().as_secs_f64();
        announce(progress, Stage::DecodingLora)?;
        let t = Instant::now();
        let mut v = self.autoencoder.decode(&z)?.squeeze(0)?.to_vec1::<f32>()?;
        scale_lora_update(
            &self.layout,
            &mut v,
            self.preset.prediction.lora_strength as f32,
        )?;
        secs.decode_lora = t.elapsed().as_secs_f64();
        announce(progress, Stage::Merging)?;
        let t = Instant::now();
        let g = with_fresh_lora(&self.generator, &self.preset.lora)?;
        self.layout.unflatten_into(g.unet(), &v)?;
        secs.merge = t.elapsed().as_secs_f64();
        Ok((g, v, secs))
    }

    /// The full DiffLoRA path: predict the LoRA, merge it, draw `n` images for `prompt`.
    pub fn personalise(
        &self,
        refs: &[RgbImage],
        prompt: &str,
        n: usize,
        seed: u64,
    ) -> anyhow::Result<Personalised> {
        self.personalise_with(refs, prompt, n, seed, &mut ignore)
    }

    /// [`personalise`](Self::personalise), announcing each stage and drawing step to
    /// `progress` first (a `Break` stops with [`Cancelled`]).
    pub fn personalise_with(
        &self,
        refs: &[RgbImage],
        prompt: &str,
        n: usize,
        seed: u64,
        progress: Progress<'_>,
    ) -> anyhow::Result<Personalised> {
        let (adapted, lora, mut seconds) = self.predict_lora_with(refs, seed, progress)?;
        let t = Instant::now();
        let merged = merged(&adapted)?;
        seconds.merge += t.elapsed().as_secs_f64();
        seconds.personalise_total =
            seconds.encode_references + seconds.sample_latent + seconds.decode_lora + seconds.merge;
        let gallery = self.gallery_with(
            &merged,
            refs,
            prompt,
            n,
            seed,
            GalleryKind::DiffLora,
            progress,
        )?;
        seconds.gallery = gallery.seconds;
        Ok(Personalised {
            adapted,
            merged,
            lora,
            gallery,
            seconds,
        })
    }

    /// The test-time-tuning path DiffLoRA replaces: a LoRA of the same recipe trained on the
    /// references (with `prompts` when known, else the empty prompt). Returns the generator
    /// with the LoRA merged and the training seconds. `progress(step, steps, loss)` after each
    /// step; `Break` stops with [`Cancelled`].
    pub fn direct_lora(
        &self,
        refs: &[RgbImage],
        prompts: Option<&[String]>,
        seed: u64,
        progress: &mut dyn FnMut(usize, usize, f32) -> ControlFlow<()>,
    ) -> anyhow::Result<(Generator, f64)> {
        let t = Instant::now();
        let x = self.references_tensor(refs)?;
        let prompts: Vec<String> = match prompts {
            Some(p) => p.to_vec(),
            None => vec![String::new(); refs.len()],
        };
        let g = train_lora(
            &self.generator,
            &x,
            &prompts,
            &self.preset.lora,
            seed,
            progress,
        )?;
        let g = merged(&g)?;
        Ok((g, t.elapsed().as_secs_f64()))
    }

    /// Draws `n` images for `prompt` with `generator` (the base one, or one with a LoRA) and
    /// scores each against `refs` with the evaluation encoder.
    pub fn gallery(
        &self,
        generator: &Generator,
        refs: &[RgbImage],
        prompt: &str,
        n: usize,
        seed: u64,
    ) -> anyhow::Result<Gallery> {
        let kind = GalleryKind::Base;
        self.gallery_with(generator, refs, prompt, n, seed, kind, &mut ignore)
    }

    /// [`gallery`](Self::gallery), announcing each drawing step of gallery `kind` to
    /// `progress` first (a `Break` stops with [`Cancelled`]).
    #[allow(clippy::too_many_arguments)]
    pub fn gallery_with(
        &self,
        generator: &Generator,
        refs: &[RgbImage],
        prompt: &str,
        n: usize,
        seed: u64,
        kind: GalleryKind,
        progress: Progress<'_>,
    ) -> anyhow::Result<Gallery> {
        anyhow::ensure!(n > 0, "asked for an empty gallery");
        let t = Instant::now();
        let ddim = DdimConfig {
            steps: self.preset.sampling.steps,
            eta: 0.0,
            prediction: generator.config().prediction,
            clip_x0: Some(generator.x0_bound()?),
            seed,
        };
        let prompt = self.drawn_prompt(prompt);
        let out = generator.sample_with(
            &prompt,
            n,
            &ddim,
            self.preset.sampling.guidance,
            &mut |step, steps| {
                progress(Stage::Drawing {
                    gallery: kind,
                    images: n,
                    step,
                    steps,
                })
            },
        )?;
        let out = out.ok_or(Cancelled)?;
        let seconds = t.elapsed().as_secs_f64();
        let images = tensor_to_images(&out)?;
        let scores = self.identity_scores(&out, &self.references_tensor(refs)?)?;
        Ok(Gallery {
            images,
            scores,
            seconds,
        })
    }

    /// Cosine similarity of each image of `images` (N, 3, S, S) to the fused `refs` under the
    /// evaluation encoder.
    pub fn identity_scores(&self, images: &Tensor, refs: &Tensor) -> anyhow::Result<Vec<f32>> {
        let r = self.eval_encoder.fuse(refs)?;
        let e = self.eval_encoder.embed(images)?;
        Ok(e.matmul(&r.unsqueeze(1)?)?.squeeze(1)?.to_vec1::<f32>()?)
    }

    /// Saves the LoRA of `adapted` (unmerged) as a PEFT adapter folder.
    pub fn save_adapter(&self, adapted: &Generator, dir: &Path) -> anyhow::Result<()> {
        save_adapter(adapted.unet(), &self.preset.lora.adapter_config(), dir)?;
        Ok(())
    }
}

/// A copy of `g` with every adapter merged into its layer's weight.
pub fn merged(g: &Generator) -> anyhow::Result<Generator> {
    let mut m = g.clone();
    for l in m.unet_mut().linears_mut() {
        if l.adapter().is_some() && !l.is_merged() {
            l.merge()?;
        }
    }
    Ok(m)
}

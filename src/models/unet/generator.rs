//! Text encoder + UNet + noise schedule + tokenizer: training loss and DDIM sampling.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::diffusion::{DdimConfig, NoiseSchedule, ddim_sample, guided, seeded_normal};
use crate::fsio::{read_safetensors, write_safetensors};
use crate::models::kit::half_precision;
use crate::peft::AdaptedLinear;
use crate::peft::linear::LinearLayers;

use super::blocks::*;
use super::codec::ImageCodec;
use super::config::*;
use super::net::*;
use super::text::*;
use super::vocab::*;
use super::{Result, UnetError};

// ---------------------------------------------------------------------------------------------
// Generator
// ---------------------------------------------------------------------------------------------

/// Metadata key of the config JSON in a saved generator.
pub(crate) const CONFIG_KEY: &str = "unet_config";

/// Name prefix of a latent generator's codec tensors in a saved generator.
const CODEC_PREFIX: &str = "codec.";

/// Text encoder + UNet + noise schedule + tokenizer: trains with the DDPM ε-loss and samples
/// with DDIM and classifier-free guidance.
#[derive(Debug, Clone)]
pub struct Generator {
    pub(crate) cfg: UnetConfig,
    pub(crate) vocab: PromptVocab,
    pub(crate) text: TextEncoder,
    pub(crate) unet: Unet,
    pub(crate) schedule: NoiseSchedule,
    pub(crate) device: Device,
    /// The image codec of a latent generator (frozen; trained on its own beforehand).
    pub(crate) codec: Option<ImageCodec>,
}

impl Generator {
    /// A freshly initialised generator (deterministic in `cfg.seed`) on `device`, with the
    /// portrait vocabulary ([`PromptVocab::portraits`]).
    pub fn new(cfg: UnetConfig, device: &Device) -> Result<Self> {
        cfg.validate()?;
        let vocab = PromptVocab::portraits(cfg.max_tokens);
        if vocab.len() > cfg.vocab_size {
            return Err(UnetError::Config(format!(
                "vocab_size {} is smaller than the vocabulary ({} ids)",
                cfg.vocab_size,
                vocab.len()
            )));
        }
        let mut init = Init {
            rng: StdRng::seed_from_u64(cfg.seed),
            device: device.clone(),
        };
        let text = TextEncoder::new(&cfg, &mut init)?;
        let unet = Unet::new(&cfg, &mut init)?;
        let schedule = NoiseSchedule::new(cfg.schedule)?;
        let codec = match &cfg.codec {
            Some(c) => Some(ImageCodec::new(c.clone(), device)?),
            None => None,
        };
        Ok(Self {
            cfg,
            vocab,
            text,
            unet,
            schedule,
            device: device.clone(),
            codec,
        })
    }

    /// Installs the trained image codec of a latent generator; its configuration must be the
    /// generator's `codec`.
    pub fn set_codec(&mut self, codec: ImageCodec) -> Result<()> {
        if self.cfg.codec.as_ref() != Some(codec.config()) {
            return Err(UnetError::Config(format!(
                "the codec's configuration {:?} is not the generator's {:?}",
                codec.config(),
                self.cfg.codec
            )));
        }
        self.codec = Some(codec);
        Ok(())
    }

    /// The image codec of a latent generator.
    pub fn codec(&self) -> Option<&ImageCodec> {
        self.codec.as_ref()
    }

    /// Side of the images the generator takes and draws.
    pub fn image_size(&self) -> usize {
        self.cfg.pixel_size()
    }

    /// What the UNet diffuses for `images` (B, C, S, S) in [-1, 1]: the images themselves, or
    /// a latent generator's latents (without gradient).
    pub fn to_latents(&self, images: &Tensor) -> Result<Tensor> {
        let Some(codec) = &self.codec else {
            return Ok(images.to_dtype(DType::F32)?);
        };
        codec.encode(images)
    }

    /// The bound a sampler clips predicted clean values to: 1 for pixels, the largest
    /// |latent| seen in the codec's training for a latent generator.
    pub fn x0_bound(&self) -> Result<f64> {
        match &self.codec {
            Some(c) => Ok(c.latent_statistics()?.1 as f64),
            None => Ok(1.0),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &UnetConfig {
        &self.cfg
    }

    /// The tokenizer.
    pub fn vocab(&self) -> &PromptVocab {
        &self.vocab
    }

    /// The noise schedule.
    pub fn schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The UNet (attach adapters to it with `attach_adapters(generator.unet_mut(), …)`).
    pub fn unet(&self) -> &Unet {
        &self.unet
    }

    /// The UNet, mutably.
    pub fn unet_mut(&mut self) -> &mut Unet {
        &mut self.unet
    }

    /// The text encoder.
    pub fn text_encoder(&self) -> &TextEncoder {
        &self.text
    }

    /// The text encoder, mutably.
    pub fn text_encoder_mut(&mut self) -> &mut TextEncoder {
        &mut self.text
    }

    /// Text states (B, T, d) and mask (B, T) of `prompts` (the empty string is the
    /// unconditional prompt); `train` enables adapter dropout.
    pub fn encode_text<S: AsRef<str>>(
        &self,
        prompts: &[S],
        train: bool,
    ) -> Result<(Tensor, Tensor)> {
        let (ids, mask) = self.vocab.encode_batch(prompts, &self.device)?;
        let states = self.text.forward(&ids, &mask, train)?;
        Ok((states, mask))
    }

    /// The ε-prediction (B, C, H, W) for `x_t` at timesteps `t` under `prompts` (one each).
    pub fn predict<S: AsRef<str>>(
        &self,
        x_t: &Tensor,
        t: &[usize],
        prompts: &[S],
    ) -> Result<Tensor> {
        let (text, mask) = self.encode_text(prompts, false)?;
        self.unet.forward(&self.schedule, x_t, t, &text, &mask)
    }

    /// The DDPM loss (a scalar, of the configured prediction) on clean `images` (B, C, H, W) in [-1, 1] with one
    /// prompt each. Timesteps, noise and prompt dropping (probability `p_uncond`, replaced by
    /// the empty prompt) are drawn from `rng`.
    pub fn loss<R: Rng + ?Sized>(
        &self,
        images: &Tensor,
        prompts: &[String],
        rng: &mut R,
    ) -> Result<Tensor> {
        self.loss_from(images, prompts, rng, 0)
    }

    /// [`loss`](Self::loss) with timesteps drawn from `min_t..T` only (identity LoRAs train on
    /// the noisier part of the schedule, where the prompt leaves the face undetermined).
    pub fn loss_from<R: Rng + ?Sized>(
        &self,
        images: &Tensor,
        prompts: &[String],
        rng: &mut R,
        min_t: usize,
    ) -> Result<Tensor> {
        let latents = self.to_latents(images)?;
        self.latent_loss_from(&latents, prompts, rng, min_t)
    }

    /// [`loss_from`](Self::loss_from) on what the UNet diffuses ([`to_latents`](Self::to_latents)
    /// of the images, computed once for a whole data set by the caller).
    pub fn latent_loss_from<R: Rng + ?Sized>(
        &self,
        images: &Tensor,
        prompts: &[String],
        rng: &mut R,
        min_t: usize,
    ) -> Result<Tensor> {
        let b = match images.dims() {
            [b, ..] if *b > 0 => *b,
            d => return Err(UnetError::Shape(format!("images {d:?} hold no batch"))),
        };
        if prompts.len() != b {
            return Err(UnetError::Shape(format!(
                "{} prompts for a batch of {b} images",
                prompts.len()
            )));
        }
        let images = images.to_dtype(DType::F32)?;
        let steps = self.schedule.steps();
        if min_t >= steps {
            return Err(UnetError::Config(format!(
                "min_t {min_t} is not below the schedule's {steps} steps"
            )));
        }
        let t: Vec<usize> = (0..b).map(|_| rng.random_range(min_t..steps)).collect();
        let noise = seeded_normal(images.shape(), DType::F32, &self.device, rng)?;
        let x_t = self.schedule.q_sample(&images, &noise, &t)?;
        let prompts: Vec<&str> = prompts
            .iter()
            .map(|p| {
                if rng.random::<f64>() < self.cfg.p_uncond {
                    ""
                } else {
                    p.as_str()
                }
            })
            .collect();
        let (text, mask) = self.encode_text(&prompts, true)?;
        let out = self
            .unet
            .forward_t(&self.schedule, &x_t, &t, &text, &mask, true)?;
        Ok(self
            .schedule
            .ddpm_loss(&out, &images, &noise, &t, self.cfg.prediction)?)
    }

    /// `n` images (n, C, S, S) for `prompt` by DDIM (`ddim.prediction` must be the config's), with
    /// classifier-free guidance `guidance` (1 = conditional only, no extra pass). The result is
    /// clamped to [-1, 1] and deterministic in `ddim.seed`.
    pub fn sample(
        &self,
        prompt: &str,
        n: usize,
        ddim: &DdimConfig,
        guidance: f64,
    ) -> Result<Tensor> {
        let drawn = self.sample_with(prompt, n, ddim, guidance, &mut |_, _| {
            ControlFlow::Continue(())
        })?;
        drawn.ok_or_else(|| UnetError::Config("sampling stopped".into()))
    }

    /// [`sample`](Self::sample), calling `on_step(step, steps)` before each DDIM step (1-based,
    /// all `n` images at once); `Break` stops before that step and gives `Ok(None)`. The
    /// images drawn to the end are the same as `sample`'s.
    pub fn sample_with(
        &self,
        prompt: &str,
        n: usize,
        ddim: &DdimConfig,
        guidance: f64,
        on_step: &mut dyn FnMut(usize, usize) -> ControlFlow<()>,
    ) -> Result<Option<Tensor>> {
        if ddim.prediction != self.cfg.prediction {
            return Err(UnetError::Config(format!(
                "the generator predicts {:?}; set ddim.prediction to match",
                self.cfg.prediction
            )));
        }
        if n == 0 {
            return Err(UnetError::Shape("asked for 0 samples".into()));
        }
        if !guidance.is_finite() {
            return Err(UnetError::Config(format!(
                "guidance {guidance} is not finite"
            )));
        }
        let cond: Vec<&str> = vec![prompt; n];
        let (ctext, cmask) = self.encode_text(&cond, false)?;
        let with_uncond = guidance != 1.0;
        let (text, mask) = if with_uncond {
            let (utext, umask) = self.encode_text(&vec![""; n], false)?;
            (
                Tensor::cat(&[&ctext, &utext], 0)?,
                Tensor::cat(&[&cmask, &umask], 0)?,
            )
        } else {
            (ctext, cmask)
        };
        let s = self.cfg.image_size;
        let shape = (n, self.cfg.channels, s, s);
        let steps = ddim.steps;
        let (mut step, mut stopped) = (0, false);
        let out = ddim_sample(
            &self.schedule,
            shape,
            DType::F32,
            &self.device,
            ddim,
            |x, t| {
                step += 1;
                if on_step(step, steps).is_break() {
                    stopped = true;
                    return Err(candle_core::Error::Msg("sampling stopped".into()));
                }
                let run = || -> Result<Tensor> {
                    if with_uncond {
                        let x2 = Tensor::cat(&[x, x], 0)?;
                        let t2: Vec<usize> = t.iter().chain(t.iter()).copied().collect();
                        let o = self.unet.forward(&self.schedule, &x2, &t2, &text, &mask)?;
                        Ok(guided(&o.narrow(0, 0, n)?, &o.narrow(0, n, n)?, guidance)?.detach())
                    } else {
                        Ok(self
                            .unet
                            .forward(&self.schedule, x, t, &text, &mask)?
                            .detach())
                    }
                };
                run().map_err(|e| candle_core::Error::Msg(e.to_string()))
            },
        );
        match (out, &self.codec) {
            (Err(_), _) if stopped => Ok(None),
            (out, None) => Ok(Some(out?.clamp(-1.0, 1.0)?)),
            (out, Some(codec)) => Ok(Some(codec.decode(&out?)?)),
        }
    }

    pub(crate) fn all_params(&self) -> Vec<&Param> {
        let mut v = Vec::new();
        self.text.params(&mut v);
        self.unet.params(&mut v);
        v
    }

    pub(crate) fn all_params_mut(&mut self) -> Vec<&mut Param> {
        let mut v = Vec::new();
        self.text.params_mut(&mut v);
        self.unet.params_mut(&mut v);
        v
    }

    pub(crate) fn all_linears_mut(&mut self) -> Vec<&mut AdaptedLinear> {
        let mut v = self.text.linears_mut();
        v.extend(self.unet.linears_mut());
        v
    }

    /// Makes every weight trainable (full training; adapters are removed) and returns all
    /// variables by name. Calling it again returns the same variables.
    pub fn trainable_vars(&mut self) -> Result<Vec<(String, Var)>> {
        let mut vars = Vec::new();
        for p in self.all_params_mut() {
            vars.push(p.make_trainable()?);
        }
        for l in self.all_linears_mut() {
            let current = l.trainable_vars();
            if l.adapter().is_none() && !current.is_empty() {
                vars.extend(current);
            } else {
                vars.extend(l.make_trainable()?);
            }
        }
        Ok(vars)
    }

    /// Every weight by stable name (adapters merged into their layers' weights).
    pub fn named_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out: Vec<(String, Tensor)> = self
            .all_params()
            .into_iter()
            .map(|p| (p.name.clone(), p.t.detach()))
            .collect();
        for l in self.text.linears().into_iter().chain(self.unet.linears()) {
            out.push((format!("{}.weight", l.path()), l.effective_weight()?));
            if let Some(b) = l.bias() {
                out.push((format!("{}.bias", l.path()), b.detach()));
            }
        }
        if let Some(codec) = &self.codec {
            out.extend(
                codec
                    .named_tensors()
                    .into_iter()
                    .map(|(n, t)| (format!("{CODEC_PREFIX}{n}"), t)),
            );
        }
        Ok(out)
    }

    /// Number of weights (adapters excluded).
    pub fn parameter_count(&self) -> usize {
        let p: usize = self.all_params().iter().map(|p| p.t.elem_count()).sum();
        let l: usize = self
            .text
            .linears()
            .into_iter()
            .chain(self.unet.linears())
            .map(|l| {
                let (m, n) = l.shape();
                m * n + l.bias().map_or(0, |b| b.elem_count())
            })
            .sum();
        p + l + self.codec.as_ref().map_or(0, ImageCodec::parameter_count)
    }

    /// Writes every weight ([`named_tensors`](Self::named_tensors)) to a safetensors file, with
    /// the config as JSON in the metadata. The text encoder's and the UNet's weights are
    /// stored as f16, as diffusion models are shipped (half the file; images drawn by the
    /// loaded generator stay within a few thousandths of the original's); the codec's stay
    /// f32, so a codec put into the file is carried bit for bit. [`load`](Self::load) reads
    /// everything back as f32.
    pub fn save(&self, path: &Path) -> Result<()> {
        let file_err = |reason: String| UnetError::File {
            path: path.display().to_string(),
            reason,
        };
        let json = serde_json::to_string(&self.cfg).map_err(|e| file_err(e.to_string()))?;
        let meta: HashMap<String, String> = [(CONFIG_KEY.to_string(), json)].into();
        let (codec, rest): (Vec<_>, Vec<_>) = self
            .named_tensors()?
            .into_iter()
            .partition(|(name, _)| name.starts_with(CODEC_PREFIX));
        let mut tensors = half_precision(&rest)?;
        tensors.extend(codec);
        write_safetensors(path, &tensors, meta).map_err(|e| file_err(e.reason()))
    }

    /// Reads a generator written by [`save`](Self::save) onto `device`; every tensor must be
    /// present with the config's shape.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let file_err = |reason: String| UnetError::File {
            path: path.display().to_string(),
            reason,
        };
        let (mut tensors, json) = read_safetensors(path, CONFIG_KEY, "generator", device)
            .map_err(|e| file_err(e.reason()))?;
        if let Some(name) = crate::models::weights::first_non_finite(&tensors)? {
            return Err(file_err(format!(
                "tensor `{name}` holds NaN or infinite values"
            )));
        }
        let cfg: UnetConfig =
            serde_json::from_str(&json).map_err(|e| file_err(format!("bad config: {e}")))?;
        let mut g = Self::new(cfg, device)?;
        let mut take = |name: &str, dims: &[usize]| -> Result<Tensor> {
            let t = tensors
                .remove(name)
                .ok_or_else(|| file_err(format!("tensor `{name}` is missing")))?;
            if t.dims() != dims {
                return Err(file_err(format!(
                    "tensor `{name}` has shape {:?}, expected {dims:?}",
                    t.dims()
                )));
            }
            Ok(t.to_dtype(DType::F32)?)
        };
        for p in g.all_params_mut() {
            let dims = p.t.dims().to_vec();
            p.t = take(&p.name, &dims)?;
        }
        for l in g.all_linears_mut() {
            let (m, n) = l.shape();
            let w = take(&format!("{}.weight", l.path()), &[m, n])?;
            let b = take(&format!("{}.bias", l.path()), &[m])?;
            *l = AdaptedLinear::new(l.path().to_string(), w, Some(b));
        }
        if let Some(codec) = &mut g.codec {
            codec.load_from(&mut tensors, CODEC_PREFIX, &path.display().to_string())?;
        }
        Ok(g)
    }
}

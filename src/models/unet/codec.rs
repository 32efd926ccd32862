//! The image codec of a latent generator: a convolutional autoencoder that maps an image
//! (B, 3, S, S) in [-1, 1] to a latent (B, L, S/f, S/f) and back, as Stable Diffusion's VAE does
//! for its UNet. Diffusing in the latent costs far less per step than in pixels (f = 4 turns a
//! 64 × 64 image into 16 × 16), and the decoder's convolutions draw the sharp edges that a
//! small pixel UNet smears.
//!
//! It is deterministic (no KL term): the encoder's output is kept small by a penalty on its
//! mean square, the decoder learns to tolerate the generator's imperfect latents from noise
//! added to the latents during training, and after training the latents are scaled to unit
//! standard deviation ([`ImageCodec::set_latent_statistics`]) so the noise schedule fits them.
//! Module names follow diffusers' `AutoencoderKL` (`encoder.down_blocks.0.resnets.0.conv1`,
//! `decoder.up_blocks.1.upsamplers.0.conv`, …).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::diffusion::seeded_normal;

use super::blocks::*;
use super::net::upsample2;
use super::{Result, UnetError};

/// Architecture and loss settings of the [`ImageCodec`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CodecConfig {
    /// Side of the square images (divisible by 2^(levels − 1)).
    pub image_size: usize,
    /// Image channels (3 for RGB).
    pub channels: usize,
    /// Channels of the latent.
    pub latent_channels: usize,
    /// Channels of each resolution level, full resolution first; every level but the last
    /// halves the side.
    pub widths: Vec<usize>,
    /// Groups of every group norm (divides every width).
    pub norm_groups: usize,
    /// Weight of the latent's mean square in the loss.
    pub latent_penalty: f64,
    /// Standard deviation of the noise added to the latents before decoding in training,
    /// relative to the batch's latent standard deviation.
    pub decoder_noise: f64,
    /// Seed of the weight initialisation.
    pub seed: u64,
}

impl Default for CodecConfig {
    /// 64 × 64 RGB to 4 × 16 × 16, widths 16/32/64.
    fn default() -> Self {
        Self {
            image_size: 64,
            channels: 3,
            latent_channels: 4,
            widths: vec![16, 32, 64],
            norm_groups: 8,
            latent_penalty: 1e-3,
            decoder_noise: 0.1,
            seed: 0,
        }
    }
}

impl CodecConfig {
    /// How many times smaller the latent's side is than the image's.
    pub fn factor(&self) -> usize {
        1 << self.widths.len().saturating_sub(1)
    }

    /// Side of the latent.
    pub fn latent_size(&self) -> usize {
        self.image_size / self.factor()
    }

    /// Checks every field; the message names the first bad one.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(UnetError::Config(format!("codec: {m}")));
        if self.widths.is_empty() || self.widths.contains(&0) {
            return bad("widths must be non-empty with positive entries".into());
        }
        if self.channels == 0 || self.latent_channels == 0 {
            return bad("channels and latent_channels must be > 0".into());
        }
        let f = self.factor();
        if self.image_size == 0 || !self.image_size.is_multiple_of(f) {
            return bad(format!(
                "image_size {} must be a positive multiple of {f} ({} levels)",
                self.image_size,
                self.widths.len()
            ));
        }
        if self.norm_groups == 0
            || self
                .widths
                .iter()
                .any(|w| !w.is_multiple_of(self.norm_groups))
        {
            return bad(format!(
                "norm_groups {} must divide every width {:?}",
                self.norm_groups, self.widths
            ));
        }
        if !(self.latent_penalty >= 0.0 && self.latent_penalty.is_finite()) {
            return bad(format!(
                "latent_penalty {} must be ≥ 0",
                self.latent_penalty
            ));
        }
        if !(self.decoder_noise >= 0.0 && self.decoder_noise.is_finite()) {
            return bad(format!("decoder_noise {} must be ≥ 0", self.decoder_noise));
        }
        Ok(())
    }
}

/// A residual block without a time embedding: norm, SiLU, 3 × 3 conv, twice, plus the input
/// (through a 1 × 1 conv when the width changes).
#[derive(Debug, Clone)]
struct CodecBlock {
    norm1: GroupNorm,
    conv1: Conv,
    norm2: GroupNorm,
    conv2: Conv,
    shortcut: Option<Conv>,
}

impl CodecBlock {
    fn new(init: &mut Init, path: &str, inp: usize, out: usize, g: usize) -> Result<Self> {
        Ok(Self {
            norm1: init.group_norm(&format!("{path}.norm1"), inp, g)?,
            conv1: init.conv(&format!("{path}.conv1"), out, inp, 3, 1)?,
            norm2: init.group_norm(&format!("{path}.norm2"), out, g)?,
            conv2: init.conv(&format!("{path}.conv2"), out, out, 3, 1)?,
            shortcut: if inp != out {
                Some(init.conv(&format!("{path}.conv_shortcut"), out, inp, 1, 1)?)
            } else {
                None
            },
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward(x)?.silu()?)?;
        let h = self.conv2.forward(&self.norm2.forward(&h)?.silu()?)?;
        let skip = match &self.shortcut {
            Some(s) => s.forward(x)?,
            None => x.clone(),
        };
        Ok((skip + h)?)
    }

    fn params<'a>(&'a self, out: &mut Vec<&'a Param>) {
        self.norm1.params(out);
        self.conv1.params(out);
        self.norm2.params(out);
        self.conv2.params(out);
        if let Some(s) = &self.shortcut {
            s.params(out);
        }
    }

    fn params_mut<'a>(&'a mut self, out: &mut Vec<&'a mut Param>) {
        self.norm1.params_mut(out);
        self.conv1.params_mut(out);
        self.norm2.params_mut(out);
        self.conv2.params_mut(out);
        if let Some(s) = &mut self.shortcut {
            s.params_mut(out);
        }
    }
}

/// One resolution level: a change of resolution and width (except at the first level: in the
/// encoder a stride-2 conv, in the decoder ×2 nearest upsampling and a conv), then a residual
/// block at the new width. Changing the width with the resolution keeps every convolution at
/// full resolution narrow, which is where the cost is.
#[derive(Debug, Clone)]
struct CodecLevel {
    resample: Option<Conv>,
    block: CodecBlock,
}

impl Module for CodecLevel {
    fn params<'a>(&'a self, v: &mut Vec<&'a Param>) {
        if let Some(c) = &self.resample {
            c.params(v);
        }
        self.block.params(v);
    }

    fn params_mut<'a>(&'a mut self, v: &mut Vec<&'a mut Param>) {
        if let Some(c) = &mut self.resample {
            c.params_mut(v);
        }
        self.block.params_mut(v);
    }
}

/// The encoder's modules: image to latent.
#[derive(Debug, Clone)]
struct CodecEncoder {
    conv_in: Conv,
    levels: Vec<CodecLevel>,
    mid: CodecBlock,
    norm: GroupNorm,
    conv_out: Conv,
}

impl CodecEncoder {
    fn params<'a>(&'a self, v: &mut Vec<&'a Param>) {
        self.conv_in.params(v);
        for l in &self.levels {
            l.params(v);
        }
        self.mid.params(v);
        self.norm.params(v);
        self.conv_out.params(v);
    }

    fn params_mut<'a>(&'a mut self, v: &mut Vec<&'a mut Param>) {
        self.conv_in.params_mut(v);
        for l in &mut self.levels {
            l.params_mut(v);
        }
        self.mid.params_mut(v);
        self.norm.params_mut(v);
        self.conv_out.params_mut(v);
    }
}

/// The decoder's modules: latent to image.
#[derive(Debug, Clone)]
struct CodecDecoder {
    conv_in: Conv,
    mid: CodecBlock,
    levels: Vec<CodecLevel>,
    norm: GroupNorm,
    conv_out: Conv,
}

impl CodecDecoder {
    fn params<'a>(&'a self, v: &mut Vec<&'a Param>) {
        self.conv_in.params(v);
        self.mid.params(v);
        for l in &self.levels {
            l.params(v);
        }
        self.norm.params(v);
        self.conv_out.params(v);
    }

    fn params_mut<'a>(&'a mut self, v: &mut Vec<&'a mut Param>) {
        self.conv_in.params_mut(v);
        self.mid.params_mut(v);
        for l in &mut self.levels {
            l.params_mut(v);
        }
        self.norm.params_mut(v);
        self.conv_out.params_mut(v);
    }
}

/// The convolutional autoencoder between images and latents (see the module doc).
#[derive(Debug, Clone)]
pub struct ImageCodec {
    cfg: CodecConfig,
    encoder: CodecEncoder,
    decoder: CodecDecoder,
    /// `[scale, bound]`: latents are multiplied by `scale` after encoding (divided before
    /// decoding), and `bound` is the largest |value| of a scaled training latent.
    stats: Param,
}

/// Images per encoder pass when encoding many (bounds the activations' memory).
const ENCODE_CHUNK: usize = 64;

/// Name of the latent statistics tensor.
const STATS: &str = "latent_statistics";

impl ImageCodec {
    /// A freshly initialised codec (deterministic in `cfg.seed`) on `device`, latent scale 1.
    pub fn new(cfg: CodecConfig, device: &Device) -> Result<Self> {
        cfg.validate()?;
        let mut init = Init {
            rng: StdRng::seed_from_u64(cfg.seed),
            device: device.clone(),
        };
        let (w, g, levels) = (&cfg.widths, cfg.norm_groups, cfg.widths.len());
        let last = w[levels - 1];
        let enc_in = init.conv("encoder.conv_in", w[0], cfg.channels, 3, 1)?;
        let mut enc_levels = Vec::with_capacity(levels);
        for (i, &wi) in w.iter().enumerate() {
            let p = format!("encoder.down_blocks.{i}");
            enc_levels.push(CodecLevel {
                resample: if i > 0 {
                    Some(init.conv(&format!("{p}.downsamplers.0.conv"), wi, w[i - 1], 3, 2)?)
                } else {
                    None
                },
                block: CodecBlock::new(&mut init, &format!("{p}.resnets.0"), wi, wi, g)?,
            });
        }
        let enc_mid = CodecBlock::new(&mut init, "encoder.mid_block.resnets.0", last, last, g)?;
        let enc_norm = init.group_norm("encoder.conv_norm_out", last, g)?;
        let enc_out = init.conv("encoder.conv_out", cfg.latent_channels, last, 3, 1)?;
        let dec_in = init.conv("decoder.conv_in", last, cfg.latent_channels, 3, 1)?;
        let dec_mid = CodecBlock::new(&mut init, "decoder.mid_block.resnets.0", last, last, g)?;
        let mut dec_levels = Vec::with_capacity(levels);
        for (k, &wj) in w.iter().rev().enumerate() {
            let p = format!("decoder.up_blocks.{k}");
            dec_levels.push(CodecLevel {
                resample: if k > 0 {
                    let prev = w[levels - k];
                    Some(init.conv(&format!("{p}.upsamplers.0.conv"), wj, prev, 3, 1)?)
                } else {
                    None
                },
                block: CodecBlock::new(&mut init, &format!("{p}.resnets.0"), wj, wj, g)?,
            });
        }
        let dec_norm = init.group_norm("decoder.conv_norm_out", w[0], g)?;
        let dec_out = init.conv("decoder.conv_out", cfg.channels, w[0], 3, 1)?;
        let stats = Param {
            name: STATS.into(),
            t: Tensor::new(&[1f32, 1.0], device)?,
            var: None,
        };
        Ok(Self {
            cfg,
            encoder: CodecEncoder {
                conv_in: enc_in,
                levels: enc_levels,
                mid: enc_mid,
                norm: enc_norm,
                conv_out: enc_out,
            },
            decoder: CodecDecoder {
                conv_in: dec_in,
                mid: dec_mid,
                levels: dec_levels,
                norm: dec_norm,
                conv_out: dec_out,
            },
            stats,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &CodecConfig {
        &self.cfg
    }

    /// `(scale, bound)` of the latents (see [`set_latent_statistics`](Self::set_latent_statistics)).
    pub fn latent_statistics(&self) -> Result<(f32, f32)> {
        let v = self.stats.t.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        Ok((v[0], v[1]))
    }

    /// Measures the encoder's output on `images` (any number, encoded in chunks) and sets the
    /// scale that gives the latents unit standard deviation, and the bound of the scaled
    /// latents (the sampler clips predicted latents to it).
    pub fn set_latent_statistics(&mut self, images: &Tensor) -> Result<(f32, f32)> {
        let n = images.dim(0)?;
        if n == 0 {
            return Err(UnetError::Shape(
                "no images to measure the latents on".into(),
            ));
        }
        let (mut sum, mut sq, mut count, mut max) = (0f64, 0f64, 0f64, 0f32);
        let v = self
            .encode_unscaled(images)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        for x in v {
            sum += x as f64;
            sq += (x as f64) * (x as f64);
            count += 1.0;
            max = max.max(x.abs());
        }
        let mean = sum / count;
        let std = (sq / count - mean * mean).max(1e-12).sqrt();
        let scale = (1.0 / std) as f32;
        let bound = max * scale;
        self.stats.t = Tensor::new(&[scale, bound], self.stats.t.device())?;
        Ok((scale, bound))
    }

    fn check_images(&self, images: &Tensor) -> Result<()> {
        let s = self.cfg.image_size;
        match images.dims() {
            [_, c, h, w] if *c == self.cfg.channels && *h == s && *w == s => Ok(()),
            d => Err(UnetError::Shape(format!(
                "the codec takes (B, {}, {s}, {s}) images, got {d:?}",
                self.cfg.channels
            ))),
        }
    }

    /// The encoder's output before scaling.
    fn encode_raw(&self, images: &Tensor) -> Result<Tensor> {
        self.check_images(images)?;
        let e = &self.encoder;
        let mut h = e.conv_in.forward(&images.to_dtype(DType::F32)?)?;
        for level in &e.levels {
            if let Some(down) = &level.resample {
                h = down.forward(&h)?;
            }
            h = level.block.forward(&h)?;
        }
        let h = e.mid.forward(&h)?;
        e.conv_out.forward(&e.norm.forward(&h)?.silu()?)
    }

    /// The decoder's image from an unscaled latent.
    fn decode_raw(&self, z: &Tensor) -> Result<Tensor> {
        let d = &self.decoder;
        let mut h = d.mid.forward(&d.conv_in.forward(z)?)?;
        for level in &d.levels {
            if let Some(up) = &level.resample {
                h = up.forward(&upsample2(&h)?)?;
            }
            h = level.block.forward(&h)?;
        }
        d.conv_out.forward(&d.norm.forward(&h)?.silu()?)
    }

    /// Scaled latents (B, L, S/f, S/f) of `images` (B, C, S, S) in [-1, 1], without gradient
    /// (any B: encoded in chunks).
    pub fn encode(&self, images: &Tensor) -> Result<Tensor> {
        let (scale, _) = self.latent_statistics()?;
        Ok((self.encode_unscaled(images)? * scale as f64)?)
    }

    /// Images (B, C, S, S) from scaled latents, clamped to [-1, 1].
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let (scale, _) = self.latent_statistics()?;
        let l = self.cfg.latent_size();
        match latents.dims() {
            [_, c, h, w] if *c == self.cfg.latent_channels && *h == l && *w == l => {}
            d => {
                return Err(UnetError::Shape(format!(
                    "the codec decodes (B, {}, {l}, {l}) latents, got {d:?}",
                    self.cfg.latent_channels
                )));
            }
        }
        let z = (latents.to_dtype(DType::F32)? / scale as f64)?;
        Ok(self.decode_raw(&z)?.clamp(-1.0, 1.0)?)
    }

    /// The training loss on `images`: mean absolute reconstruction error (the decoder sees the
    /// latent plus noise of `decoder_noise` × its standard deviation) plus `latent_penalty` ×
    /// the latent's mean square. Returns `(loss, reconstruction error)`.
    pub fn loss<R: Rng + ?Sized>(&self, images: &Tensor, rng: &mut R) -> Result<(Tensor, f32)> {
        let images = images.to_dtype(DType::F32)?;
        let z = self.encode_raw(&images)?;
        let penalty = z.sqr()?.mean_all()?;
        let z_in = if self.cfg.decoder_noise > 0.0 {
            let std = penalty.to_scalar::<f32>()?.sqrt() as f64;
            let noise = seeded_normal(z.shape(), DType::F32, z.device(), rng)?;
            (&z + (noise * (self.cfg.decoder_noise * std))?)?
        } else {
            z
        };
        let recon = (self.decode_raw(&z_in)? - &images)?.abs()?.mean_all()?;
        let value = recon.to_scalar::<f32>()?;
        let loss = (recon + (penalty * self.cfg.latent_penalty)?)?;
        Ok((loss, value))
    }

    /// Every weight, the encoder's first (the order of the optimiser's state in a checkpoint).
    fn params(&self) -> Vec<&Param> {
        let mut v = Vec::new();
        self.encoder.params(&mut v);
        self.decoder.params(&mut v);
        v
    }

    fn params_mut(&mut self) -> Vec<&mut Param> {
        let mut v = Vec::new();
        self.encoder.params_mut(&mut v);
        self.decoder.params_mut(&mut v);
        v
    }

    /// Makes only the decoder's weights trainable (the encoder, and so the latent space the
    /// generator learned, stays as it is) and returns them by name. Every weight is first
    /// detached from the variables of an earlier training, which a clone of this codec shares:
    /// training the decoder leaves such a clone as it was.
    pub fn decoder_trainable_vars(&mut self) -> Result<Vec<(String, Var)>> {
        for p in self.params_mut() {
            p.var = None;
            p.t = p.t.detach();
        }
        let mut v = Vec::new();
        self.decoder.params_mut(&mut v);
        v.into_iter().map(|p| p.make_trainable()).collect()
    }

    /// The encoder's latents of `images` before scaling (as the decoder's training sees them),
    /// without gradient; any number of images, encoded `ENCODE_CHUNK` at a time.
    pub fn encode_unscaled(&self, images: &Tensor) -> Result<Tensor> {
        let n = images.dim(0)?;
        if n <= ENCODE_CHUNK {
            return Ok(self.encode_raw(images)?.detach());
        }
        let mut parts = Vec::with_capacity(n.div_ceil(ENCODE_CHUNK));
        for start in (0..n).step_by(ENCODE_CHUNK) {
            let chunk = images.narrow(0, start, (n - start).min(ENCODE_CHUNK))?;
            parts.push(self.encode_raw(&chunk)?.detach());
        }
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// The loss that sharpens the decoder alone: from unscaled latents `z` (of
    /// [`encode_unscaled`](Self::encode_unscaled)) plus noise of `noise` × their standard
    /// deviation, the mean absolute error to `images` plus `edge_weight` × the mean absolute
    /// error of their horizontal and vertical differences (which is what a blurred edge gets
    /// wrong). Returns `(loss, reconstruction error)`.
    pub fn decoder_loss<R: Rng + ?Sized>(
        &self,
        z: &Tensor,
        images: &Tensor,
        noise: f64,
        edge_weight: f64,
        rng: &mut R,
    ) -> Result<(Tensor, f32)> {
        let images = images.to_dtype(DType::F32)?;
        let z_in = if noise > 0.0 {
            let std = z.sqr()?.mean_all()?.to_scalar::<f32>()?.sqrt() as f64;
            let n = seeded_normal(z.shape(), DType::F32, z.device(), rng)?;
            (z + (n * (noise * std))?)?
        } else {
            z.clone()
        };
        let diff = (self.decode_raw(&z_in)? - &images)?;
        let recon = diff.abs()?.mean_all()?;
        let value = recon.to_scalar::<f32>()?;
        if edge_weight == 0.0 {
            return Ok((recon, value));
        }
        // The difference of differences equals the error of the differences.
        let s = self.cfg.image_size;
        let dx = (diff.narrow(3, 1, s - 1)? - diff.narrow(3, 0, s - 1)?)?;
        let dy = (diff.narrow(2, 1, s - 1)? - diff.narrow(2, 0, s - 1)?)?;
        let edges = ((dx.abs()?.mean_all()? + dy.abs()?.mean_all()?)? * 0.5)?;
        Ok(((recon + (edges * edge_weight)?)?, value))
    }

    /// Makes every weight trainable (the latent statistics stay fixed) and returns the
    /// variables by name. Calling it again returns the same variables.
    pub fn trainable_vars(&mut self) -> Result<Vec<(String, Var)>> {
        self.params_mut()
            .into_iter()
            .map(|p| p.make_trainable())
            .collect()
    }

    /// Every weight by name, the latent statistics included.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out: Vec<(String, Tensor)> = self
            .params()
            .into_iter()
            .map(|p| (p.name.clone(), p.t.detach()))
            .collect();
        out.push((STATS.into(), self.stats.t.clone()));
        out
    }

    /// Number of weights.
    pub fn parameter_count(&self) -> usize {
        self.params().iter().map(|p| p.t.elem_count()).sum()
    }

    /// Replaces every weight from `tensors` (names of [`named_tensors`](Self::named_tensors),
    /// each prefixed by `prefix`); `file` names the source in errors.
    pub fn load_from(
        &mut self,
        tensors: &mut HashMap<String, Tensor>,
        prefix: &str,
        file: &str,
    ) -> Result<()> {
        let mut take = |name: &str, dims: &[usize]| -> Result<Tensor> {
            let key = format!("{prefix}{name}");
            let t = tensors.remove(&key).ok_or_else(|| UnetError::File {
                path: file.into(),
                reason: format!("tensor `{key}` is missing"),
            })?;
            if t.dims() != dims {
                return Err(UnetError::File {
                    path: file.into(),
                    reason: format!("tensor `{key}` has shape {:?}, expected {dims:?}", t.dims()),
                });
            }
            Ok(t.to_dtype(DType::F32)?)
        };
        for p in self.params_mut() {
            let dims = p.t.dims().to_vec();
            p.t = take(&p.name, &dims)?;
            p.var = None;
        }
        self.stats.t = take(STATS, &[2])?;
        let (scale, bound) = self.latent_statistics()?;
        if !(scale.is_finite() && scale > 0.0 && bound.is_finite() && bound > 0.0) {
            return Err(UnetError::File {
                path: file.into(),
                reason: format!("{prefix}{STATS} [{scale}, {bound}] must be positive and finite"),
            });
        }
        Ok(())
    }
}

/// Metadata key of the config JSON in a saved codec.
pub(crate) const CODEC_CONFIG_KEY: &str = "codec_config";

impl ImageCodec {
    /// Writes every weight and the latent statistics to a safetensors file, with the config as
    /// JSON in the metadata.
    pub fn save(&self, path: &std::path::Path) -> Result<()> {
        let file_err = |reason: String| UnetError::File {
            path: path.display().to_string(),
            reason,
        };
        let json = serde_json::to_string(&self.cfg).map_err(|e| file_err(e.to_string()))?;
        let meta: HashMap<String, String> = [(CODEC_CONFIG_KEY.to_string(), json)].into();
        crate::fsio::write_safetensors(path, &self.named_tensors(), meta)
            .map_err(|e| file_err(e.reason()))
    }

    /// Reads a codec written by [`save`](Self::save) onto `device`.
    pub fn load(path: &std::path::Path, device: &Device) -> Result<Self> {
        let file = path.display().to_string();
        let (mut tensors, json) =
            crate::fsio::read_safetensors(path, CODEC_CONFIG_KEY, "image codec", device).map_err(
                |e| UnetError::File {
                    path: file.clone(),
                    reason: e.reason(),
                },
            )?;
        let cfg: CodecConfig = serde_json::from_str(&json).map_err(|e| UnetError::File {
            path: file.clone(),
            reason: format!("bad codec config: {e}"),
        })?;
        let mut codec = Self::new(cfg, device)?;
        codec.load_from(&mut tensors, "", &file)?;
        Ok(codec)
    }
}

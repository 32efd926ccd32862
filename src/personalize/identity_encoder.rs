//! The identity encoder of DiffLoRA (see `METHODS.md`): maps a portrait to a unit-norm
//! embedding such that pictures of one person embed close together, whatever the expression,
//! head turn, background, lighting or accessory.
//!
//! - [`IdentityEncoder`]: a small convolutional network trained from scratch on labelled
//!   portraits (a class per person) with a normalised-softmax (CosFace) head; after training
//!   the head is dropped and the embeddings are compared by cosine similarity.
//! - [`ParamRegressor`]: closed-form ridge regression from embeddings to numeric targets (the
//!   24 ground-truth identity parameters of synthetic portraits).
//! - [`verification_accuracy`], [`centroid_accuracy`]: nearest-centroid identity accuracy.
//!
//! # Architecture
//!
//! Images (N, 3, S, S) in [-1, 1] are read channels-last. Each of `stages` stages is a 3×3
//! convolution (im2col + matmul, whose backward is matmuls and slices, fast on CPU), a layer
//! norm over the channels, GELU and a 2×2 average pool; stage `i` has `width·2^i` channels.
//! The final (S/2^stages)² map is flattened, projected to `hidden` features (layer norm, GELU)
//! and then to `embed_dim`, and L2-normalised. The fused ops of [`crate::models::ops`] give
//! real gradients for layer norm and GELU.
//!
//! Training is deterministic in the seed: the initial weights, batches and augmentations all
//! come from one [`StdRng`].

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{CpuStorage, CustomOp1, D, DType, Device, Layout, Shape, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::fsio::{read_safetensors, write_atomic, write_safetensors};
use crate::models::ops::{gelu_erf, layer_norm};
use crate::train::optim::{AdamW, AdamWParams};

/// Metadata key under which [`IdentityEncoder::save`] stores the config as JSON.
pub const CONFIG_KEY: &str = "identity_encoder_config";

/// Layer-norm epsilon of every norm of the encoder.
const LN_EPS: f64 = 1e-5;

/// Images per forward pass in [`IdentityEncoder::embed`].
const EMBED_CHUNK: usize = 256;

/// Errors of the identity encoder; each names the file, tensor or shape at fault.
#[derive(Debug, thiserror::Error)]
pub enum EncoderError {
    /// A tensor operation failed.
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    /// Reading or writing a file failed.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// A tensor does not have the expected shape.
    #[error("tensor `{name}` has shape {got:?}, expected {expected}")]
    Shape {
        /// Which tensor (an argument or a stored weight).
        name: String,
        /// Its shape.
        got: Vec<usize>,
        /// What was expected, in words.
        expected: String,
    },
    /// The configuration is unusable.
    #[error("invalid encoder config: {0}")]
    Config(String),
    /// The inputs are inconsistent (labels, sizes, too few examples).
    #[error("invalid input: {0}")]
    Input(String),
}

/// Result of this module.
pub type Result<T, E = EncoderError> = std::result::Result<T, E>;

fn shape_err(name: &str, t: &Tensor, expected: impl Into<String>) -> EncoderError {
    EncoderError::Shape {
        name: name.into(),
        got: t.dims().to_vec(),
        expected: expected.into(),
    }
}

/// Hyper-parameters of the encoder and its training.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct EncoderConfig {
    /// Side of the (square) input images; must be divisible by `2^stages`.
    pub image_size: usize,
    /// Channels of the first convolution stage; stage `i` has `width·2^i`.
    pub width: usize,
    /// Convolution stages (each halves the resolution).
    pub stages: usize,
    /// Features of the hidden layer between the flattened map and the embedding.
    pub hidden: usize,
    /// Length of the embedding.
    pub embed_dim: usize,
    /// Optimiser steps.
    pub steps: usize,
    /// Images per step.
    pub batch: usize,
    /// Peak learning rate (linear warm-up, then cosine decay to 5 %).
    pub lr: f64,
    /// Decoupled weight decay of AdamW.
    pub weight_decay: f64,
    /// Scale of the normalised-softmax logits.
    pub scale: f64,
    /// Additive cosine margin (CosFace) subtracted from the true class's cosine.
    pub margin: f64,
    /// Random horizontal flips, small shifts and brightness/contrast jitter while training.
    pub augment: bool,
    /// Seed of the initial weights, batches and augmentations.
    pub seed: u64,
}

impl Default for EncoderConfig {
    fn default() -> Self {
        Self {
            image_size: 32,
            width: 24,
            stages: 3,
            hidden: 256,
            embed_dim: 64,
            steps: 600,
            batch: 64,
            lr: 2e-3,
            weight_decay: 0.01,
            scale: 16.0,
            margin: 0.2,
            augment: true,
            seed: 0,
        }
    }
}

impl EncoderConfig {
    /// Checks that the config describes a buildable, trainable encoder.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(EncoderError::Config(m));
        if self.stages == 0 || self.stages > 6 {
            return bad(format!("stages must be 1..=6, got {}", self.stages));
        }
        let div = 1usize << self.stages;
        if self.image_size == 0 || !self.image_size.is_multiple_of(div) {
            return bad(format!(
                "image_size ({}) must be a positive multiple of 2^stages ({div})",
                self.image_size
            ));
        }
        if self.width == 0 || self.hidden == 0 || self.embed_dim == 0 {
            return bad("width, hidden and embed_dim must be positive".into());
        }
        if self.batch == 0 {
            return bad("batch must be positive".into());
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(format!("lr must be positive, got {}", self.lr));
        }
        if !(self.scale.is_finite() && self.scale > 0.0) {
            return bad(format!("scale must be positive, got {}", self.scale));
        }
        if !(self.margin.is_finite() && self.weight_decay.is_finite()) {
            return bad("margin and weight_decay must be finite".into());
        }
        Ok(())
    }

    fn stage_channels(&self, i: usize) -> usize {
        self.width << i
    }

    /// Names and shapes of every weight, in the network's order.
    fn param_specs(&self) -> Vec<(String, Vec<usize>)> {
        let mut v = Vec::new();
        let mut cin = 3;
        for i in 0..self.stages {
            let c = self.stage_channels(i);
            v.push((format!("stage{i}.conv.weight"), vec![9 * cin, c]));
            v.push((format!("stage{i}.conv.bias"), vec![c]));
            v.push((format!("stage{i}.norm.weight"), vec![c]));
            v.push((format!("stage{i}.norm.bias"), vec![c]));
            cin = c;
        }
        let side = self.image_size >> self.stages;
        let flat = side * side * cin;
        v.push(("head.fc1.weight".into(), vec![flat, self.hidden]));
        v.push(("head.fc1.bias".into(), vec![self.hidden]));
        v.push(("head.norm.weight".into(), vec![self.hidden]));
        v.push(("head.norm.bias".into(), vec![self.hidden]));
        v.push(("head.fc2.weight".into(), vec![self.hidden, self.embed_dim]));
        v.push(("head.fc2.bias".into(), vec![self.embed_dim]));
        v
    }
}

/// Normal(0, std²) values from `rng`.
fn normal_vec(rng: &mut StdRng, n: usize, std: f64) -> Result<Vec<f32>> {
    let d = Normal::new(0.0f32, std as f32)
        .map_err(|e| EncoderError::Config(format!("initialisation: {e}")))?;
    Ok((0..n).map(|_| d.sample(rng)).collect())
}

/// Initial value of a weight: He-normal for matrices (fan-in = rows), 1 for norm weights,
/// 0 for biases.
fn init_param(name: &str, dims: &[usize], rng: &mut StdRng, dev: &Device) -> Result<Tensor> {
    let n: usize = dims.iter().product();
    Ok(if name.ends_with("norm.weight") {
        Tensor::ones(dims, DType::F32, dev)?
    } else if name.ends_with("bias") {
        Tensor::zeros(dims, DType::F32, dev)?
    } else {
        let gain = if name.starts_with("head.fc2") {
            1.0
        } else {
            2.0
        };
        let std = (gain / dims[0] as f64).sqrt();
        Tensor::from_vec(normal_vec(rng, n, std)?, dims, dev)?
    })
}

/// Row-wise L2 normalisation of (N, E).
fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = (x.sqr()?.sum_keepdim(D::Minus1)? + 1e-12)?.sqrt()?;
    Ok(x.broadcast_div(&norm)?)
}

/// The contiguous f32 data of a CPU tensor argument of a custom op.
fn cpu_f32<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{op}: only f32 is supported");
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{op}: the input must be contiguous");
    };
    Ok(&v[a..b])
}

/// 3×3 patches of a channels-last (B, H, W, C) map with zero padding 1: (B, H, W, 9·C), the
/// patch laid out as (dy, dx, c). Its backward ([`Col2Im`]) sums the patches back.
struct Im2Col;

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "identity-im2col"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_f32(s, l, "im2col")?;
        let (b, h, w, c) = l.shape().dims4()?;
        let mut out = vec![0f32; b * h * w * 9 * c];
        out.par_chunks_mut(w * 9 * c)
            .enumerate()
            .for_each(|(row, o)| {
                let (n, y) = (row / h, row % h);
                for dy in 0..3 {
                    let sy = y as i64 + dy as i64 - 1;
                    if sy < 0 || sy >= h as i64 {
                        continue;
                    }
                    let src = &x[(n * h + sy as usize) * w * c..][..w * c];
                    for xx in 0..w {
                        for dx in 0..3 {
                            let sx = xx as i64 + dx as i64 - 1;
                            if sx < 0 || sx >= w as i64 {
                                continue;
                            }
                            let at = xx * 9 * c + (dy * 3 + dx) * c;
                            o[at..at + c].copy_from_slice(&src[sx as usize * c..][..c]);
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((b, h, w, 9 * c))))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let (_, _, _, c) = arg.dims4()?;
        Ok(Some(col2im(grad, c)?))
    }
}

/// The adjoint of [`Im2Col`]: (B, H, W, 9·C) → (B, H, W, C). Its backward is [`Im2Col`].
struct Col2Im {
    c: usize,
}

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "identity-col2im"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = cpu_f32(s, l, "col2im")?;
        let (b, h, w, k) = l.shape().dims4()?;
        let c = self.c;
        if k != 9 * c {
            candle_core::bail!("col2im: {k} columns for {c} channels");
        }
        let mut out = vec![0f32; b * h * w * c];
        // Each output row y gathers from input rows y-1, y, y+1 (no write conflicts).
        out.par_chunks_mut(w * c).enumerate().for_each(|(row, o)| {
            let (n, y) = (row / h, row % h);
            for dy in 0..3 {
                // Output pixel (y, x) was read by patch (y + 1 - dy, x + 1 - dx) at (dy, dx).
                let py = y as i64 + 1 - dy as i64;
                if py < 0 || py >= h as i64 {
                    continue;
                }
                let src = &g[(n * h + py as usize) * w * k..][..w * k];
                for xx in 0..w {
                    for dx in 0..3 {
                        let px = xx as i64 + 1 - dx as i64;
                        if px < 0 || px >= w as i64 {
                            continue;
                        }
                        let at = px as usize * k + (dy * 3 + dx) * c;
                        let dst = &mut o[xx * c..(xx + 1) * c];
                        dst.iter_mut()
                            .zip(&src[at..at + c])
                            .for_each(|(d, v)| *d += v);
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((b, h, w, c))))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(im2col(grad)?))
    }
}

/// Whether an op on `x` runs as a composition of standard candle ops (the GPU path): the
/// kernels here implement `cpu_fwd` only.
fn composed(x: &Tensor) -> bool {
    !x.device().is_cpu()
}

/// 3×3 patches of a channels-last (B, H, W, C) map with zero padding 1: (B, H, W, 9·C), the
/// patch laid out as (dy, dx, c). The kernel for f32 on the CPU, else [`im2col_composed`].
pub(crate) fn im2col(x: &Tensor) -> candle_core::Result<Tensor> {
    if composed(x) || x.dtype() != DType::F32 {
        im2col_composed(x)
    } else {
        x.contiguous()?.apply_op1(Im2Col)
    }
}

/// [`im2col`] as standard candle ops: the zero-padded map's nine shifted (H, W) views,
/// concatenated along the channels. Autograd gives the backward (narrow and cat).
pub(crate) fn im2col_composed(x: &Tensor) -> candle_core::Result<Tensor> {
    let (_, h, w, _) = x.dims4()?;
    let xp = x.pad_with_zeros(1, 1, 1)?.pad_with_zeros(2, 1, 1)?;
    let mut shifted = Vec::with_capacity(9);
    for dy in 0..3 {
        for dx in 0..3 {
            shifted.push(xp.narrow(1, dy, h)?.narrow(2, dx, w)?);
        }
    }
    Tensor::cat(&shifted, 3)
}

/// The adjoint of [`im2col`], (B, H, W, 9·C) → (B, H, W, C): every pixel sums the patch
/// entries that read it. The kernel for f32 on the CPU, else [`col2im_composed`].
pub(crate) fn col2im(g: &Tensor, c: usize) -> candle_core::Result<Tensor> {
    if composed(g) || g.dtype() != DType::F32 {
        col2im_composed(g, c)
    } else {
        g.contiguous()?.apply_op1(Col2Im { c })
    }
}

/// [`col2im`] as standard candle ops: patch slot (dy, dx) of pixel (y, x) read pixel
/// (y + dy − 1, x + dx − 1), so each slot's (B, H, W, C) slice, zero-padded and shifted back by
/// (dy, dx), is added to the result.
pub(crate) fn col2im_composed(g: &Tensor, c: usize) -> candle_core::Result<Tensor> {
    let (_, h, w, k) = g.dims4()?;
    if k != 9 * c {
        candle_core::bail!("col2im: {k} columns for {c} channels");
    }
    let mut out: Option<Tensor> = None;
    for dy in 0..3 {
        for dx in 0..3 {
            let part = g
                .narrow(3, (dy * 3 + dx) * c, c)?
                .pad_with_zeros(1, 1, 1)?
                .pad_with_zeros(2, 1, 1)?
                .narrow(1, 2 - dy, h)?
                .narrow(2, 2 - dx, w)?;
            out = Some(match out {
                Some(o) => (o + part)?,
                None => part,
            });
        }
    }
    out.ok_or_else(|| candle_core::Error::Msg("col2im: no patch slots".into()))
}

/// 3×3, stride-1, zero-padded convolution of channels-last `x` (B, H, W, C) with `w`
/// (9·C, O) laid out as (dy, dx, c): returns (B·H·W, O) without the bias.
fn conv3x3(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (b, h, wd, c) = x.dims4()?;
    let cols = im2col(x)?;
    Ok(cols.reshape((b * h * wd, 9 * c))?.matmul(w)?)
}

/// The network's weights, in [`EncoderConfig::param_specs`] order.
#[derive(Debug, Clone)]
struct Net {
    params: Vec<Tensor>,
}

impl Net {
    /// Embeddings (B, E), unit rows, of channels-last images (B, S, S, 3).
    fn forward(&self, cfg: &EncoderConfig, x: &Tensor) -> Result<Tensor> {
        let (b, _, _, _) = x.dims4()?;
        let mut p = self.params.iter();
        let mut next = || {
            p.next()
                .ok_or_else(|| EncoderError::Config("the network has too few weights".into()))
        };
        let mut x = x.clone();
        let mut side = cfg.image_size;
        for i in 0..cfg.stages {
            let c = cfg.stage_channels(i);
            let (w, bias, nw, nb) = (next()?, next()?, next()?, next()?);
            let y = conv3x3(&x, w)?.broadcast_add(bias)?;
            let y = gelu_erf(&layer_norm(&y, nw, nb, LN_EPS)?)?;
            let half = side / 2;
            x = (y.reshape((b, half, 2, half, 2, c))?.sum(4)?.sum(2)? * 0.25)?;
            side = half;
        }
        let flat = x.reshape((b, ()))?;
        let (w1, b1, nw, nb, w2, b2) = (next()?, next()?, next()?, next()?, next()?, next()?);
        let h = flat.matmul(w1)?.broadcast_add(b1)?;
        let h = gelu_erf(&layer_norm(&h, nw, nb, LN_EPS)?)?;
        let e = h.matmul(w2)?.broadcast_add(b2)?;
        l2_normalize(&e)
    }
}

/// Checks that `images` is (N, 3, S, S) for the config's S.
fn check_images(images: &Tensor, cfg: &EncoderConfig) -> Result<usize> {
    let s = cfg.image_size;
    match images.dims() {
        &[n, 3, h, w] if h == s && w == s => Ok(n),
        _ => Err(shape_err(
            "images",
            images,
            format!("(N, 3, {s}, {s}) images in [-1, 1]"),
        )),
    }
}

/// A trained identity encoder: portrait → unit-norm embedding.
#[derive(Debug, Clone)]
pub struct IdentityEncoder {
    cfg: EncoderConfig,
    net: Net,
    device: Device,
}

/// Random augmentation of one channels-last image `src` (S, S, 3) into `dst`.
fn augment_into(src: &[f32], dst: &mut [f32], s: usize, rng: &mut StdRng) {
    let flip = rng.random_bool(0.5);
    let dx: i64 = rng.random_range(-2..=2);
    let dy: i64 = rng.random_range(-2..=2);
    let contrast: f32 = rng.random_range(0.85..1.15);
    let brightness: f32 = rng.random_range(-0.1..0.1);
    let last = s as i64 - 1;
    for y in 0..s {
        let sy = (y as i64 - dy).clamp(0, last) as usize;
        for x in 0..s {
            let xx = if flip { s - 1 - x } else { x };
            let sx = (xx as i64 - dx).clamp(0, last) as usize;
            for c in 0..3 {
                let v = src[(sy * s + sx) * 3 + c];
                dst[(y * s + x) * 3 + c] = (v * contrast + brightness).clamp(-1.0, 1.0);
            }
        }
    }
}

/// The learning rate at `step` (0-based): linear warm-up, then cosine decay to 5 %.
fn lr_at(cfg: &EncoderConfig, step: usize) -> f64 {
    let warm = (cfg.steps / 10).clamp(1, 50);
    if step < warm {
        return cfg.lr * (step + 1) as f64 / warm as f64;
    }
    let t = (step - warm) as f64 / (cfg.steps.saturating_sub(warm)).max(1) as f64;
    cfg.lr * (0.05 + 0.95 * 0.5 * (1.0 + (std::f64::consts::PI * t).cos()))
}

impl IdentityEncoder {
    /// Trains an encoder on `images` (N, 3, S, S) in [-1, 1] with one identity label per
    /// image (any `usize` values; at least two distinct identities). `progress` is called
    /// after every step with the step index and the batch loss. Deterministic in
    /// `cfg.seed` (on one machine with one thread count).
    pub fn train(
        images: &Tensor,
        labels: &[usize],
        cfg: &EncoderConfig,
        progress: &mut dyn FnMut(usize, f32),
    ) -> Result<Self> {
        cfg.validate()?;
        let n = check_images(images, cfg)?;
        if labels.len() != n {
            return Err(EncoderError::Input(format!(
                "{} labels for {n} images",
                labels.len()
            )));
        }
        let classes: BTreeMap<usize, usize> = {
            let mut m = BTreeMap::new();
            for &l in labels {
                m.insert(l, 0);
            }
            for (i, v) in m.values_mut().enumerate() {
                *v = i;
            }
            m
        };
        let k = classes.len();
        if k < 2 {
            return Err(EncoderError::Input(format!(
                "training needs at least two identities, got {k}"
            )));
        }
        let class_of: Vec<u32> = labels.iter().map(|l| classes[l] as u32).collect();
        let device = images.device().clone();
        let s = cfg.image_size;
        let per = s * s * 3;
        // Channels-last copy of every image on the host, for fast batch assembly.
        let host: Vec<f32> = images
            .to_dtype(DType::F32)?
            .permute((0, 2, 3, 1))?
            .contiguous()?
            .flatten_all()?
            .to_vec1()?;

        let mut rng = StdRng::seed_from_u64(cfg.seed);
        let specs = cfg.param_specs();
        let mut vars = Vec::with_capacity(specs.len() + 1);
        for (name, dims) in &specs {
            vars.push(Var::from_tensor(&init_param(
                name, dims, &mut rng, &device,
            )?)?);
        }
        let centers = Var::from_tensor(&Tensor::from_vec(
            normal_vec(&mut rng, k * cfg.embed_dim, 1.0)?,
            (k, cfg.embed_dim),
            &device,
        )?)?;
        let mut all = vars.clone();
        all.push(centers.clone());
        let mut opt = AdamW::new(
            all,
            AdamWParams {
                lr: cfg.lr,
                weight_decay: cfg.weight_decay,
                ..AdamWParams::default()
            },
        )?;

        let bsz = cfg.batch.min(n);
        let mut order: Vec<usize> = (0..n).collect();
        let mut cursor = n;
        let mut batch = vec![0f32; bsz * per];
        let mut targets = vec![0u32; bsz];
        for step in 0..cfg.steps {
            for j in 0..bsz {
                if cursor == n {
                    // Fisher-Yates shuffle per epoch.
                    for i in (1..n).rev() {
                        let r = rng.random_range(0..=i);
                        order.swap(i, r);
                    }
                    cursor = 0;
                }
                let idx = order[cursor];
                cursor += 1;
                targets[j] = class_of[idx];
                let src = &host[idx * per..(idx + 1) * per];
                let dst = &mut batch[j * per..(j + 1) * per];
                if cfg.augment {
                    augment_into(src, dst, s, &mut rng);
                } else {
                    dst.copy_from_slice(src);
                }
            }
            let x = Tensor::from_slice(&batch, (bsz, s, s, 3), &device)?;
            let net = Net {
                params: vars.iter().map(|v| v.as_tensor().clone()).collect(),
            };
            let emb = net.forward(cfg, &x)?;
            let w = l2_normalize(centers.as_tensor())?;
            let cos = emb.matmul(&w.t()?)?;
            let t = Tensor::from_slice(&targets, bsz, &device)?;
            let onehot = {
                let mut v = vec![0f32; bsz * k];
                for (j, &c) in targets.iter().enumerate() {
                    v[j * k + c as usize] = 1.0;
                }
                Tensor::from_vec(v, (bsz, k), &device)?
            };
            let logits = ((cos - (onehot * cfg.margin)?)? * cfg.scale)?;
            let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
            let picked = logp.gather(&t.unsqueeze(1)?, 1)?;
            let loss = (picked.mean_all()? * -1.0)?;
            let grads = loss.backward()?;
            opt.params.lr = lr_at(cfg, step);
            opt.step(&grads)?;
            progress(step, loss.to_scalar::<f32>()?);
        }
        Ok(Self {
            cfg: cfg.clone(),
            net: Net {
                params: vars.iter().map(|v| v.as_tensor().detach()).collect(),
            },
            device,
        })
    }

    /// Embeddings (N, `embed_dim`) with unit rows of `images` (N, 3, S, S) in [-1, 1];
    /// computed in chunks, without gradient tracking. N = 0 gives a (0, E) tensor.
    pub fn embed(&self, images: &Tensor) -> Result<Tensor> {
        let n = check_images(images, &self.cfg)?;
        if n == 0 {
            return Ok(Tensor::zeros(
                (0, self.cfg.embed_dim),
                DType::F32,
                &self.device,
            )?);
        }
        let images = images
            .detach()
            .to_device(&self.device)?
            .to_dtype(DType::F32)?;
        let mut out = Vec::with_capacity(n.div_ceil(EMBED_CHUNK));
        for start in (0..n).step_by(EMBED_CHUNK) {
            let len = EMBED_CHUNK.min(n - start);
            let x = images
                .narrow(0, start, len)?
                .permute((0, 2, 3, 1))?
                .contiguous()?;
            out.push(self.net.forward(&self.cfg, &x)?.detach());
        }
        Ok(Tensor::cat(&out, 0)?)
    }

    /// The fused identity of an image set: the mean embedding, L2-normalised, (E,).
    pub fn fuse(&self, images: &Tensor) -> Result<Tensor> {
        let n = check_images(images, &self.cfg)?;
        if n == 0 {
            return Err(EncoderError::Input("no images to fuse".into()));
        }
        let mean = self.embed(images)?.mean_keepdim(0)?;
        Ok(l2_normalize(&mean)?.squeeze(0)?)
    }

    /// Cosine similarity between the fused embeddings ([`fuse`](Self::fuse)) of image sets
    /// `a` and `b`, each (N, 3, S, S) with N ≥ 1.
    pub fn similarity(&self, a: &Tensor, b: &Tensor) -> Result<f32> {
        let fa = self.fuse(a)?;
        let fb = self.fuse(b)?;
        Ok((fa * fb)?.sum_all()?.to_scalar::<f32>()?)
    }

    /// The configuration the encoder was trained with.
    pub fn config(&self) -> &EncoderConfig {
        &self.cfg
    }

    /// Length of the embeddings.
    pub fn embed_dim(&self) -> usize {
        self.cfg.embed_dim
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Writes the weights to a safetensors file (atomically), with the config as JSON in the
    /// metadata under [`CONFIG_KEY`].
    pub fn save(&self, path: &Path) -> Result<()> {
        let file_err = |reason: String| EncoderError::File {
            path: path.display().to_string(),
            reason,
        };
        let tensors: Vec<(String, Tensor)> = self
            .cfg
            .param_specs()
            .into_iter()
            .zip(&self.net.params)
            .map(|((name, _), t)| (name, t.clone()))
            .collect();
        let json = serde_json::to_string(&self.cfg).map_err(|e| file_err(e.to_string()))?;
        let meta: HashMap<String, String> = [(CONFIG_KEY.to_string(), json)].into();
        write_safetensors(path, &tensors, meta).map_err(|e| file_err(e.reason()))
    }

    /// Reads an encoder written by [`save`](Self::save) onto `device`; every weight must be
    /// present with the config's shape.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let file_err = |reason: String| EncoderError::File {
            path: path.display().to_string(),
            reason,
        };
        let (mut tensors, json) = read_safetensors(path, CONFIG_KEY, "identity encoder", device)
            .map_err(|e| file_err(e.reason()))?;
        if let Some(name) = crate::models::weights::first_non_finite(&tensors)? {
            return Err(file_err(format!(
                "tensor `{name}` holds NaN or infinite values"
            )));
        }
        let cfg: EncoderConfig =
            serde_json::from_str(&json).map_err(|e| file_err(format!("bad config: {e}")))?;
        cfg.validate().map_err(|e| file_err(e.to_string()))?;
        let mut params = Vec::new();
        for (name, dims) in cfg.param_specs() {
            let t = tensors
                .remove(&name)
                .ok_or_else(|| file_err(format!("tensor `{name}` is missing")))?;
            if t.dims() != dims.as_slice() {
                return Err(file_err(format!(
                    "tensor `{name}` has shape {:?}, expected {dims:?}",
                    t.dims()
                )));
            }
            params.push(t.to_dtype(DType::F32)?);
        }
        Ok(Self {
            cfg,
            net: Net { params },
            device: device.clone(),
        })
    }
}

/// Rows of a 2-D f32 tensor as `Vec<Vec<f32>>`, checking it is (N, `cols`) when given.
fn rows_of(t: &Tensor, name: &str, cols: Option<usize>) -> Result<Vec<Vec<f32>>> {
    let ok = match (t.dims(), cols) {
        (&[_, c], Some(want)) => c == want,
        (&[_, _], None) => true,
        _ => false,
    };
    if !ok {
        let expected = match cols {
            Some(c) => format!("(N, {c})"),
            None => "a 2-D (N, D) tensor".into(),
        };
        return Err(shape_err(name, t, expected));
    }
    Ok(t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.to_vec2()?)
}

/// Fraction of `queries` whose nearest class centroid (by cosine; centroids are the
/// normalised mean embeddings of `gallery` per label) has the right label. Queries whose
/// label has no gallery image count as wrong.
pub fn centroid_accuracy_of(
    gallery: &Tensor,
    gallery_labels: &[usize],
    queries: &Tensor,
    query_labels: &[usize],
) -> Result<f32> {
    let g = rows_of(gallery, "gallery embeddings", None)?;
    let e = g.first().map_or(0, Vec::len);
    let q = rows_of(queries, "query embeddings", Some(e))?;
    if g.len() != gallery_labels.len() || q.len() != query_labels.len() {
        return Err(EncoderError::Input(format!(
            "{} gallery labels for {} embeddings, {} query labels for {} embeddings",
            gallery_labels.len(),
            g.len(),
            query_labels.len(),
            q.len()
        )));
    }
    if q.is_empty() {
        return Err(EncoderError::Input("no queries".into()));
    }
    let mut sums: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    for (row, &l) in g.iter().zip(gallery_labels) {
        let s = sums.entry(l).or_insert_with(|| vec![0.0; e]);
        s.iter_mut().zip(row).for_each(|(a, &b)| *a += b as f64);
    }
    let centroids: Vec<(usize, Vec<f64>)> = sums
        .into_iter()
        .map(|(l, mut v)| {
            let n = v.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
            v.iter_mut().for_each(|x| *x /= n);
            (l, v)
        })
        .collect();
    let mut right = 0usize;
    for (row, &l) in q.iter().zip(query_labels) {
        let best = centroids
            .iter()
            .map(|(cl, c)| {
                let s: f64 = c.iter().zip(row).map(|(a, &b)| a * b as f64).sum();
                (s, *cl)
            })
            .max_by(|a, b| a.0.total_cmp(&b.0));
        if best.is_some_and(|(_, cl)| cl == l) {
            right += 1;
        }
    }
    Ok(right as f32 / q.len() as f32)
}

/// Nearest-centroid accuracy of `encoder` on held-out `queries` given a labelled `gallery`
/// (all (N, 3, S, S) images), see [`centroid_accuracy_of`].
pub fn centroid_accuracy(
    encoder: &IdentityEncoder,
    gallery: &Tensor,
    gallery_labels: &[usize],
    queries: &Tensor,
    query_labels: &[usize],
) -> Result<f32> {
    centroid_accuracy_of(
        &encoder.embed(gallery)?,
        gallery_labels,
        &encoder.embed(queries)?,
        query_labels,
    )
}

/// Leave-one-out nearest-centroid accuracy of embeddings (N, E) with `labels`: each image is
/// assigned to the label whose centroid (its own label's centroid excludes it) is most
/// cosine-similar. Only images whose label has at least two images are scored.
pub fn verification_accuracy_of(embeddings: &Tensor, labels: &[usize]) -> Result<f32> {
    let x = rows_of(embeddings, "embeddings", None)?;
    if x.len() != labels.len() {
        return Err(EncoderError::Input(format!(
            "{} labels for {} embeddings",
            labels.len(),
            x.len()
        )));
    }
    let e = x.first().map_or(0, Vec::len);
    let mut sums: BTreeMap<usize, (Vec<f64>, usize)> = BTreeMap::new();
    for (row, &l) in x.iter().zip(labels) {
        let s = sums.entry(l).or_insert_with(|| (vec![0.0; e], 0));
        s.0.iter_mut().zip(row).for_each(|(a, &b)| *a += b as f64);
        s.1 += 1;
    }
    let cos = |c: &[f64], row: &[f32]| -> f64 {
        let n = c.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
        c.iter().zip(row).map(|(a, &b)| a * b as f64).sum::<f64>() / n
    };
    let (mut right, mut scored) = (0usize, 0usize);
    for (row, &l) in x.iter().zip(labels) {
        let (own_sum, own_n) = &sums[&l];
        if *own_n < 2 {
            continue;
        }
        scored += 1;
        let own: Vec<f64> = own_sum
            .iter()
            .zip(row)
            .map(|(a, &b)| a - b as f64)
            .collect();
        let own_score = cos(&own, row);
        let beaten = sums
            .iter()
            .any(|(&cl, (c, _))| cl != l && cos(c, row) > own_score);
        if !beaten {
            right += 1;
        }
    }
    if scored == 0 {
        return Err(EncoderError::Input(
            "no identity has two or more images to verify".into(),
        ));
    }
    Ok(right as f32 / scored as f32)
}

/// Leave-one-out nearest-centroid identity accuracy of `encoder` on `images` (N, 3, S, S)
/// with one label per image (see [`verification_accuracy_of`]); chance is about 1 / the
/// number of identities.
pub fn verification_accuracy(
    encoder: &IdentityEncoder,
    images: &Tensor,
    labels: &[usize],
) -> Result<f32> {
    verification_accuracy_of(&encoder.embed(images)?, labels)
}

/// Ridge regression with a bias from embeddings (N, E) to targets (N, P), fitted in closed
/// form: `W = (XcᵀXc + λI)⁻¹ XcᵀYc` on centred data, `b = ȳ − x̄ W`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ParamRegressor {
    /// Input width E.
    pub inputs: usize,
    /// Output width P.
    pub outputs: usize,
    /// The ridge penalty it was fitted with.
    pub lambda: f64,
    /// Weights, E×P row-major.
    pub weights: Vec<f32>,
    /// Bias, P values.
    pub bias: Vec<f32>,
}

/// Solves `a x = b` for symmetric positive-definite `a` (n×n, row-major) and `m` right-hand
/// sides `b` (n×m, row-major) by Cholesky; `None` when `a` is not positive definite.
fn cholesky_solve(mut a: Vec<f64>, mut b: Vec<f64>, n: usize, m: usize) -> Option<Vec<f64>> {
    for j in 0..n {
        let mut d = a[j * n + j];
        for k in 0..j {
            d -= a[j * n + k] * a[j * n + k];
        }
        if !(d > 0.0 && d.is_finite()) {
            return None;
        }
        let d = d.sqrt();
        a[j * n + j] = d;
        for i in j + 1..n {
            let mut s = a[i * n + j];
            for k in 0..j {
                s -= a[i * n + k] * a[j * n + k];
            }
            a[i * n + j] = s / d;
        }
    }
    // L y = b, then Lᵀ x = y, column by column.
    for c in 0..m {
        for i in 0..n {
            let mut s = b[i * m + c];
            for k in 0..i {
                s -= a[i * n + k] * b[k * m + c];
            }
            b[i * m + c] = s / a[i * n + i];
        }
        for i in (0..n).rev() {
            let mut s = b[i * m + c];
            for k in i + 1..n {
                s -= a[k * n + i] * b[k * m + c];
            }
            b[i * m + c] = s / a[i * n + i];
        }
    }
    Some(b)
}

impl ParamRegressor {
    /// Fits embeddings (N, E) to targets (N, P) with ridge penalty `lambda` > 0 (on the
    /// weights, not the bias).
    pub fn fit(embeddings: &Tensor, targets: &Tensor, lambda: f64) -> Result<Self> {
        if !(lambda.is_finite() && lambda > 0.0) {
            return Err(EncoderError::Input(format!(
                "the ridge penalty must be positive, got {lambda}"
            )));
        }
        let x = rows_of(embeddings, "embeddings", None)?;
        let y = rows_of(targets, "targets", None)?;
        if x.len() != y.len() || x.is_empty() {
            return Err(EncoderError::Input(format!(
                "{} embeddings and {} targets: need the same positive number",
                x.len(),
                y.len()
            )));
        }
        let n = x.len();
        let (e, p) = (x[0].len(), y[0].len());
        let mean = |rows: &[Vec<f32>], d: usize| -> Vec<f64> {
            let mut m = vec![0.0; d];
            for r in rows {
                m.iter_mut().zip(r).for_each(|(a, &b)| *a += b as f64);
            }
            m.iter_mut().for_each(|a| *a /= n as f64);
            m
        };
        let (mx, my) = (mean(&x, e), mean(&y, p));
        let mut a = vec![0.0f64; e * e];
        let mut b = vec![0.0f64; e * p];
        let mut xc = vec![0.0f64; e];
        for (xr, yr) in x.iter().zip(&y) {
            xc.iter_mut()
                .zip(xr.iter().zip(&mx))
                .for_each(|(c, (&v, m))| *c = v as f64 - m);
            for i in 0..e {
                let xi = xc[i];
                for j in 0..e {
                    a[i * e + j] += xi * xc[j];
                }
                for j in 0..p {
                    b[i * p + j] += xi * (yr[j] as f64 - my[j]);
                }
            }
        }
        for i in 0..e {
            a[i * e + i] += lambda;
        }
        let w = cholesky_solve(a, b, e, p).ok_or_else(|| {
            EncoderError::Input("the ridge system is not positive definite".into())
        })?;
        let bias: Vec<f32> = (0..p)
            .map(|j| (my[j] - (0..e).map(|i| mx[i] * w[i * p + j]).sum::<f64>()) as f32)
            .collect();
        Ok(Self {
            inputs: e,
            outputs: p,
            lambda,
            weights: w.into_iter().map(|v| v as f32).collect(),
            bias,
        })
    }

    /// Predictions (N, P) for embeddings (N, E), on the embeddings' device.
    pub fn predict(&self, embeddings: &Tensor) -> Result<Tensor> {
        match embeddings.dims() {
            &[_, e] if e == self.inputs => {}
            _ => {
                return Err(shape_err(
                    "embeddings",
                    embeddings,
                    format!("(N, {})", self.inputs),
                ));
            }
        }
        if self.weights.len() != self.inputs * self.outputs || self.bias.len() != self.outputs {
            return Err(EncoderError::Input(format!(
                "the regressor holds {} weights and {} biases for {}×{}",
                self.weights.len(),
                self.bias.len(),
                self.inputs,
                self.outputs
            )));
        }
        let dev = embeddings.device();
        let w = Tensor::from_slice(&self.weights, (self.inputs, self.outputs), dev)?;
        let b = Tensor::from_slice(&self.bias, self.outputs, dev)?;
        Ok(embeddings
            .to_dtype(DType::F32)?
            .matmul(&w)?
            .broadcast_add(&b)?)
    }

    /// Writes the regressor as JSON (atomically).
    pub fn save(&self, path: &Path) -> Result<()> {
        let file_err = |reason: String| EncoderError::File {
            path: path.display().to_string(),
            reason,
        };
        let text = serde_json::to_string(self).map_err(|e| file_err(e.to_string()))?;
        write_atomic(path, text.as_bytes()).map_err(|e| file_err(e.reason()))
    }

    /// Reads a regressor written by [`save`](Self::save).
    pub fn load(path: &Path) -> Result<Self> {
        let file_err = |reason: String| EncoderError::File {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| file_err(e.to_string()))?;
        let r: Self =
            serde_json::from_str(&text).map_err(|e| file_err(format!("bad regressor: {e}")))?;
        if r.weights.len() != r.inputs * r.outputs || r.bias.len() != r.outputs {
            return Err(file_err(format!(
                "{} weights and {} biases do not fit {}×{}",
                r.weights.len(),
                r.bias.len(),
                r.inputs,
                r.outputs
            )));
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
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
        let enc =
            IdentityEncoder::train(&train, &labels, &cfg, &mut |_, l| losses.push(l)).unwrap();
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
    fn im2col_conv_matches_the_composite_version_with_gradients() {
        let dev = Device::Cpu;
        let mut rng = StdRng::seed_from_u64(3);
        let mk = |rng: &mut StdRng, dims: &[usize]| {
            let n = dims.iter().product();
            Var::from_tensor(
                &Tensor::from_vec(normal_vec(rng, n, 1.0).unwrap(), dims, &dev).unwrap(),
            )
            .unwrap()
        };
        let x = mk(&mut rng, &[2, 5, 4, 3]);
        let w = mk(&mut rng, &[27, 4]);
        let g = Tensor::from_vec(
            normal_vec(&mut rng, 2 * 5 * 4 * 4, 1.0).unwrap(),
            (40, 4),
            &dev,
        )
        .unwrap();
        let ours = conv3x3(x.as_tensor(), w.as_tensor()).unwrap();
        // Reference: candle's conv2d on channels-first data.
        let wk = w
            .as_tensor()
            .reshape((3, 3, 3, 4))
            .unwrap()
            .permute((3, 2, 0, 1))
            .unwrap()
            .contiguous()
            .unwrap();
        let theirs = x
            .as_tensor()
            .permute((0, 3, 1, 2))
            .unwrap()
            .contiguous()
            .unwrap()
            .conv2d(&wk, 1, 1, 1, 1)
            .unwrap()
            .permute((0, 2, 3, 1))
            .unwrap()
            .reshape((40, 4))
            .unwrap();
        let diff = |a: &Tensor, b: &Tensor| {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert!(diff(&ours, &theirs) < 1e-4);
        let ga = (ours * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (theirs * &g)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in [&x, &w] {
            assert!(diff(ga.get(v).unwrap(), gb.get(v).unwrap()) < 1e-3);
        }
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
            let enc =
                IdentityEncoder::train(&imgs, &labels, cfg, &mut |_, l| losses.push(l)).unwrap();
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

    #[test]
    fn param_regressor_recovers_a_linear_map() {
        let mut rng = StdRng::seed_from_u64(5);
        let (n, e, p) = (200, 8, 3);
        let x = normal_vec(&mut rng, n * e, 1.0).unwrap();
        let w = normal_vec(&mut rng, e * p, 1.0).unwrap();
        let bias = [0.5f32, -1.0, 2.0];
        let noise = normal_vec(&mut rng, n * p, 0.01).unwrap();
        let mut y = vec![0f32; n * p];
        for r in 0..n {
            for j in 0..p {
                let mut s = bias[j] + noise[r * p + j];
                for i in 0..e {
                    s += x[r * e + i] * w[i * p + j];
                }
                y[r * p + j] = s;
            }
        }
        let xt = Tensor::from_vec(x, (n, e), &Device::Cpu).unwrap();
        let yt = Tensor::from_vec(y, (n, p), &Device::Cpu).unwrap();
        let reg = ParamRegressor::fit(&xt, &yt, 1e-3).unwrap();
        for (a, b) in reg.weights.iter().zip(&w) {
            assert!((a - b).abs() < 0.01, "{a} vs {b}");
        }
        for (a, b) in reg.bias.iter().zip(&bias) {
            assert!((a - b).abs() < 0.01, "{a} vs {b}");
        }
        let err = (reg.predict(&xt).unwrap() - &yt)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(err < 0.05, "{err}");
        // Round trip through a file.
        let path = std::env::temp_dir().join(format!("ridge-{}.json", std::process::id()));
        reg.save(&path).unwrap();
        assert_eq!(ParamRegressor::load(&path).unwrap(), reg);
        std::fs::remove_file(&path).ok();
        // Wrong widths and a zero penalty are errors.
        assert!(reg.predict(&yt).is_err());
        assert!(ParamRegressor::fit(&xt, &yt, 0.0).is_err());
        assert!(ParamRegressor::fit(&xt, &yt.narrow(0, 0, 10).unwrap(), 1.0).is_err());
    }

    /// The default config on 48 identities × 12 portraits: training time and accuracy on new
    /// pictures of the same people and on unseen people. Run with
    /// `cargo test --release --lib personalize::identity_encoder -- --ignored --nocapture`.
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

    /// The GPU path of the patch ops: `im2col_composed` and `col2im_composed` equal the CPU
    /// kernels, forward and gradients (1e-5 relative), on ragged maps; the entry functions on
    /// every test device give the CPU kernels' results.
    #[test]
    fn the_composed_patch_ops_equal_the_kernels_with_gradients() {
        let rel = |a: &Tensor, b: &Tensor| {
            let a = a.to_device(&Device::Cpu).unwrap();
            let d = (&a - b).unwrap().abs().unwrap().max_all().unwrap();
            let s = b.abs().unwrap().max_all().unwrap();
            d.to_scalar::<f32>().unwrap() / s.to_scalar::<f32>().unwrap().max(1.0)
        };
        let mut rng = StdRng::seed_from_u64(11);
        for (b, h, w, c) in [(2, 5, 4, 3), (1, 1, 1, 1), (1, 3, 7, 2), (3, 2, 6, 5)] {
            let x = Tensor::from_vec(
                normal_vec(&mut rng, b * h * w * c, 1.0).unwrap(),
                (b, h, w, c),
                &Device::Cpu,
            )
            .unwrap();
            let cols = Tensor::from_vec(
                normal_vec(&mut rng, b * h * w * 9 * c, 1.0).unwrap(),
                (b, h, w, 9 * c),
                &Device::Cpu,
            )
            .unwrap();
            // (input, output weighting) of each op.
            let r_fwd = Tensor::from_vec(
                normal_vec(&mut rng, b * h * w * 9 * c, 1.0).unwrap(),
                (b, h, w, 9 * c),
                &Device::Cpu,
            )
            .unwrap();
            let r_adj = x.clone();
            type Op = fn(&Tensor, usize) -> candle_core::Result<Tensor>;
            let ops: [(&str, &Tensor, &Tensor, Op, Op); 2] = [
                (
                    "im2col",
                    &x,
                    &r_fwd,
                    |t, _| t.contiguous()?.apply_op1(Im2Col),
                    |t, _| im2col_composed(t),
                ),
                (
                    "col2im",
                    &cols,
                    &r_adj,
                    |t, c| t.contiguous()?.apply_op1(Col2Im { c }),
                    |t, c| col2im_composed(t, c),
                ),
            ];
            for (name, input, r, kernel, comp) in ops {
                let run = |f: &dyn Fn(&Tensor) -> candle_core::Result<Tensor>, dev: &Device| {
                    let v = Var::from_tensor(&input.to_device(dev).unwrap()).unwrap();
                    let y = f(v.as_tensor()).unwrap();
                    let g = (&y * r.to_device(dev).unwrap())
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .backward()
                        .unwrap();
                    let gx = g.get(&v).unwrap().to_device(&Device::Cpu).unwrap();
                    (y.to_device(&Device::Cpu).unwrap(), gx)
                };
                let (want, want_g) = run(&|t| kernel(t, c), &Device::Cpu);
                let entry = |t: &Tensor| match name {
                    "im2col" => im2col(t),
                    _ => col2im(t, c),
                };
                let mut got = vec![("composed".to_string(), run(&|t| comp(t, c), &Device::Cpu))];
                for dev in crate::device::test_devices() {
                    got.push((crate::device::label(&dev), run(&entry, &dev)));
                }
                for (label, (y, g)) in got {
                    let (ey, eg) = (rel(&y, &want), rel(&g, &want_g));
                    assert!(
                        ey < 1e-5,
                        "{name} {label} {b}×{h}×{w}×{c}: output differs by {ey}"
                    );
                    assert!(
                        eg < 1e-5,
                        "{name} {label} {b}×{h}×{w}×{c}: gradient differs by {eg}"
                    );
                }
            }
        }
    }
}

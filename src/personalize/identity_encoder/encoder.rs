//! The identity encoder itself: training with a normalised-softmax (CosFace) head, embedding
//! and fusing portraits, and its weights file.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{D, DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{CONFIG_KEY, EncoderConfig, EncoderError, Result, l2_normalize, shape_err};
use crate::models::kit::{
    Epochs, Fresh, Init, ModelFile, ModelKind, ParamSource, Shuffle, WarmupCosine, save_model,
};
use crate::train::optim::{AdamW, AdamWParams};

/// Images per forward pass in [`IdentityEncoder::embed`].
const EMBED_CHUNK: usize = 256;

/// A saved encoder: the config under [`CONFIG_KEY`].
const ENCODER_KIND: ModelKind = ModelKind {
    config_key: CONFIG_KEY,
    name: "identity encoder",
    format: None,
};

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
    /// The network's weights, in [`ConvTower::param_specs`](crate::models::kit::ConvTower::param_specs) order.
    params: Vec<Tensor>,
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
        let tower = cfg.tower();
        let mut fresh = Fresh::trainable(&mut rng, &device);
        let weights = tower.build(&mut fresh)?.len();
        // The class centres of the normalised-softmax head (dropped after training).
        fresh.param("centers", &[k, cfg.embed_dim], Init::Normal(1.0))?;
        let all = fresh.into_vars();
        let (vars, centers) = (&all[..weights], &all[weights]);
        let mut opt = AdamW::new(
            all.clone(),
            AdamWParams {
                lr: cfg.lr,
                weight_decay: cfg.weight_decay,
                ..AdamWParams::default()
            },
        )?;

        let bsz = cfg.batch.min(n);
        let mut epochs = Epochs::new(n, Shuffle::FisherYates)?;
        let lr = WarmupCosine {
            peak: cfg.lr,
            warmup: (cfg.steps / 10).clamp(1, 50),
            steps: cfg.steps,
            floor: 0.05,
        };
        let mut batch = vec![0f32; bsz * per];
        let mut targets = vec![0u32; bsz];
        for step in 0..cfg.steps {
            for j in 0..bsz {
                let idx = epochs.next_index(&mut rng);
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
            let params: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            let emb = l2_normalize(&tower.forward(&params, &x)?)?;
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
            opt.params.lr = lr.lr_at(step);
            opt.step(&grads)?;
            progress(step, loss.to_scalar::<f32>()?);
        }
        Ok(Self {
            cfg: cfg.clone(),
            params: vars.iter().map(|v| v.as_tensor().detach()).collect(),
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
            let e = l2_normalize(&self.cfg.tower().forward(&self.params, &x)?)?;
            out.push(e.detach());
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
        let tensors = self.cfg.tower().named(&self.params);
        Ok(save_model(path, &ENCODER_KIND, &self.cfg, &[], &tensors)?)
    }

    /// Reads an encoder written by [`save`](Self::save) onto `device`; every weight must be
    /// present with the config's shape and finite values, and nothing else may be in the file.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let mut file = ModelFile::open(path, &ENCODER_KIND, device)?;
        let cfg: EncoderConfig = file.config()?;
        cfg.validate()
            .map_err(|e| file.error(format!("bad configuration: {e}")))?;
        let params = cfg.tower().build(&mut file)?;
        file.finish()?;
        Ok(Self {
            cfg,
            params,
            device: device.clone(),
        })
    }
}

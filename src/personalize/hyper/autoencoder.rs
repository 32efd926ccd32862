//! The LoRA autoencoder of the hypernetwork: flat LoRA vectors (D values) ↔ small latents
//! (L values), through the principal subspace of the training vectors and an MLP with SiLU.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

use super::{
    HyperError, Result, check_finite, check_loss, check_lr, check_matrix, check_nonneg,
    check_positive, dense, lr_schedule,
};
use crate::diffusion::seeded_normal;
use crate::models::kit::{
    Dense, Epochs, Fresh, ModelFile, ModelKind, ParamSource, Shuffle, save_model,
};
use crate::train::optim::{AdamW, AdamWParams};

/// A saved [`LoraAutoencoder`]: the configuration under `config`, the format tag
/// `peft-studio/lora-autoencoder/v1`.
const AE_KIND: ModelKind = ModelKind {
    config_key: "config",
    name: "LoRA autoencoder",
    format: Some("peft-studio/lora-autoencoder/v1"),
};
/// Metadata key of the autoencoder's input dimension.
const INPUT_DIM_KEY: &str = "input_dim";
/// Metadata key of the autoencoder's number of principal directions.
const PRINCIPAL_DIM_KEY: &str = "principal_dim";

/// Settings of [`LoraAutoencoder::train`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AutoencoderConfig {
    /// Size L of the latent.
    pub latent_dim: usize,
    /// Width of the hidden layer of the encoder and of the decoder.
    pub hidden: usize,
    /// Optimiser steps.
    pub steps: usize,
    /// Vectors per step (drawn from shuffled epochs, so it may exceed the number of vectors).
    pub batch: usize,
    /// Peak learning rate of AdamW (cosine decay to a tenth of it).
    pub lr: f64,
    /// AdamW's decoupled weight decay.
    pub weight_decay: f64,
    /// Std of the Gaussian noise added to the standardised input during training.
    pub input_noise: f64,
    /// Std of the Gaussian noise added to the latent during training.
    pub latent_noise: f64,
    /// Weight of the penalty on the mean square of the latent, which keeps the latent near
    /// unit scale so that `latent_noise` stays meaningful.
    pub latent_penalty: f64,
    /// Seed of the initial weights, the batches and the noise.
    pub seed: u64,
    /// Keep at most this many principal directions of the training vectors (those of largest
    /// variance); none: all of them (up to N − 1). The saved basis is most of the file (r × D
    /// values), so a cap keeps a personaliser with long LoRA vectors small; the directions left
    /// out are not represented (their share of the variance adds to the reconstruction error).
    pub max_principal_dims: Option<usize>,
}

impl Default for AutoencoderConfig {
    fn default() -> Self {
        Self {
            latent_dim: 32,
            hidden: 256,
            steps: 2000,
            batch: 64,
            lr: 1e-3,
            weight_decay: 0.0,
            input_noise: 0.01,
            latent_noise: 0.05,
            latent_penalty: 1e-4,
            seed: 0,
            max_principal_dims: None,
        }
    }
}

impl AutoencoderConfig {
    /// Checks every setting.
    pub fn validate(&self) -> Result<()> {
        check_positive("latent_dim", self.latent_dim)?;
        check_positive("hidden", self.hidden)?;
        check_positive("steps", self.steps)?;
        check_positive("batch", self.batch)?;
        check_lr("lr", self.lr)?;
        check_nonneg("weight_decay", self.weight_decay)?;
        check_nonneg("input_noise", self.input_noise)?;
        check_nonneg("latent_noise", self.latent_noise)?;
        check_nonneg("latent_penalty", self.latent_penalty)?;
        if let Some(cap) = self.max_principal_dims {
            check_positive("max_principal_dims", cap)?;
        }
        Ok(())
    }
}

/// The autoencoder's layers: `enc.0` (r → hidden), `enc.1` (hidden → L), `dec.0` (L → hidden),
/// `dec.1` (hidden → r), SiLU between; r is the number of principal coordinates.
#[derive(Clone, Debug)]
struct AeNet {
    enc0: Dense,
    enc1: Dense,
    dec0: Dense,
    dec1: Dense,
}

impl AeNet {
    fn build(r: usize, cfg: &AutoencoderConfig, src: &mut dyn ParamSource) -> Result<Self> {
        let (h, l) = (cfg.hidden, cfg.latent_dim);
        Ok(Self {
            enc0: dense(src, "enc.0", r, h, 1.0)?,
            enc1: dense(src, "enc.1", h, l, 1.0)?,
            dec0: dense(src, "dec.0", l, h, 1.0)?,
            dec1: dense(src, "dec.1", h, r, 1.0)?,
        })
    }

    fn encode(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.enc1.forward(&self.enc0.forward(x)?.silu()?)
    }

    fn decode(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        self.dec1.forward(&self.dec0.forward(z)?.silu()?)
    }

    fn named(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for l in [&self.enc0, &self.enc1, &self.dec0, &self.dec1] {
            l.push_named(&mut out);
        }
        out
    }

    fn detach(&self) -> Self {
        Self {
            enc0: self.enc0.detach(),
            enc1: self.enc1.detach(),
            dec0: self.dec0.detach(),
            dec1: self.dec1.detach(),
        }
    }
}

/// Eigenvalues of the Gram matrix below this fraction of the largest are dropped from the
/// principal basis (numerically zero directions).
const BASIS_REL_EIGEN_FLOOR: f64 = 1e-10;

/// An orthonormal basis (r, D) of the row space of `x` (N, D), ordered by decreasing variance,
/// from the eigendecomposition of the f64 Gram matrix `x·xᵀ` (N × N, cheap for N ≪ D); at most
/// `max_rows` rows when given. Returns one all-zero row if `x` is zero.
fn principal_basis(x: &Tensor, max_rows: Option<usize>) -> Result<Tensor> {
    let (_, d) = x.dims2()?;
    let x64 = x.to_dtype(DType::F64)?;
    let gram = x64.matmul(&x64.t()?)?;
    let n = gram.dims()[0];
    let mat = crate::peft::decompose::tensor_to_mat(&gram)?;
    let eig = crate::peft::decompose::thin_svd(&mat, n)
        .map_err(|e| HyperError::InvalidInput(format!("principal basis: {e}")))?;
    let top = eig.s.first().copied().unwrap_or(0.0);
    let mut keep: Vec<usize> = (0..eig.s.len())
        .filter(|&i| top > 0.0 && eig.s[i] > BASIS_REL_EIGEN_FLOOR * top)
        .collect();
    if let Some(max) = max_rows {
        keep.truncate(max);
    }
    if keep.is_empty() {
        return Ok(Tensor::zeros((1, d), DType::F32, x.device())?);
    }
    // Row i of the basis is uᵢᵀ·X / √λᵢ.
    let r = keep.len();
    let mut coef = Vec::with_capacity(r * n);
    for &i in &keep {
        let inv = 1.0 / eig.s[i].sqrt();
        coef.extend((0..n).map(|j| eig.u[(j, i)] * inv));
    }
    let coef = Tensor::from_vec(coef, (r, n), x.device())?;
    Ok(coef.matmul(&x64)?.to_dtype(DType::F32)?)
}

/// Compresses flat LoRA vectors (D values) to latents (L values) and back.
///
/// Vectors are standardised internally with the per-coordinate mean and one global std of the
/// training vectors (a global std keeps the loss proportional to the error in LoRA space), then
/// projected onto the principal subspace of the training vectors (r ≤ N − 1 orthonormal
/// directions) and scaled to unit RMS; an MLP `r → hidden → L → hidden → r` with SiLU works on
/// those coordinates. This is exactly a `D → hidden → L → hidden → D` MLP whose first-layer
/// weights and last-layer outputs are restricted to the span of the training data (where every
/// training vector lies), at a cost per step independent of D. Components of new vectors
/// outside that span are not represented. [`decode`](Self::decode) returns vectors in LoRA
/// space again.
#[derive(Clone, Debug)]
pub struct LoraAutoencoder {
    cfg: AutoencoderConfig,
    input_dim: usize,
    /// Per-coordinate mean, shape (1, D).
    mean: Tensor,
    /// Global std, shape (1,).
    std: Tensor,
    /// Orthonormal principal directions, shape (r, D).
    basis: Tensor,
    /// Its transpose, contiguous, shape (D, r).
    basis_t: Tensor,
    /// RMS of the principal coordinates, shape (1,).
    coef_scale: Tensor,
    net: AeNet,
}

impl LoraAutoencoder {
    /// Trains an autoencoder on `vectors` (N, D) (converted to f32; trained on its device),
    /// calling `progress(step, loss)` after every step (1-based; the loss is the mean squared
    /// reconstruction error per coordinate of the standardised vectors). Deterministic given
    /// `cfg.seed`.
    pub fn train(
        vectors: &Tensor,
        cfg: &AutoencoderConfig,
        progress: &mut dyn FnMut(usize, f32),
    ) -> Result<Self> {
        cfg.validate()?;
        let (n, d) = check_matrix("the LoRA vectors", vectors, None)?;
        let device = vectors.device().clone();
        let v = vectors.to_dtype(DType::F32)?;
        check_finite("the LoRA vectors", &v)?;
        let mean = v.mean_keepdim(0)?;
        let centred = v.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_all()?.to_scalar::<f32>()?;
        let standardised = var.sqrt() > 1e-12;
        let std = if standardised { var.sqrt() } else { 1.0 };
        let x = (centred / f64::from(std))?;

        let basis = principal_basis(&x, cfg.max_principal_dims)?;
        let basis_t = basis.t()?.contiguous()?;
        let r = basis.dims()[0];
        let coords = x.matmul(&basis_t)?;
        let coords_mean_square = coords.sqr()?.mean_all()?.to_scalar::<f32>()?;
        if standardised {
            // `x` is standardised to mean square 1, so its total square is N·D.
            let kept = coords_mean_square * r as f32 / d as f32;
            log::info!(
                "LoRA autoencoder: {r} principal directions hold {:.1}% of the vectors' variance",
                100.0 * kept
            );
        }
        let rms = coords_mean_square.sqrt();
        let scale = if rms > 1e-12 { rms } else { 1.0 };
        let c = (coords / f64::from(scale))?;
        // Loss per standardised coordinate = mean square error of `c` · scale² · r / D.
        let loss_factor = f64::from(scale).powi(2) * r as f64 / d as f64;
        // Isotropic noise of std σ in D dimensions projects to std σ on each orthonormal
        // direction; its component outside the span never reaches the network.
        let input_noise = cfg.input_noise / f64::from(scale);

        let mut rng = StdRng::seed_from_u64(cfg.seed);
        let mut fresh = Fresh::trainable(&mut rng, &device);
        let net = AeNet::build(r, cfg, &mut fresh)?;
        let vars = fresh.into_vars();
        let mut opt = AdamW::new(
            vars,
            AdamWParams {
                lr: cfg.lr,
                weight_decay: cfg.weight_decay,
                ..AdamWParams::default()
            },
        )?;
        let mut epochs = Epochs::new(n, Shuffle::Rand)?;
        let schedule = lr_schedule(cfg.lr, cfg.steps);
        for step in 0..cfg.steps {
            let idx: Vec<u32> = epochs
                .next_batch(cfg.batch, &mut rng)
                .into_iter()
                .map(|i| i as u32)
                .collect();
            let idx = Tensor::from_vec(idx, cfg.batch, &device)?;
            let cb = c.index_select(&idx, 0)?;
            let mut input = cb.clone();
            if input_noise > 0.0 {
                let noise = seeded_normal((cfg.batch, r), DType::F32, &device, &mut rng)?;
                input = (input + (noise * input_noise)?)?;
            }
            let z = net.encode(&input)?;
            let mut zn = z.clone();
            if cfg.latent_noise > 0.0 {
                let noise =
                    seeded_normal((cfg.batch, cfg.latent_dim), DType::F32, &device, &mut rng)?;
                zn = (zn + (noise * cfg.latent_noise)?)?;
            }
            let out = net.decode(&zn)?;
            let rec = (out - &cb)?.sqr()?.mean_all()?;
            let loss = if cfg.latent_penalty > 0.0 {
                (&rec + (z.sqr()?.mean_all()? * cfg.latent_penalty)?)?
            } else {
                rec.clone()
            };
            let grads = loss.backward()?;
            opt.params.lr = schedule.lr_at(step);
            opt.step(&grads)?;
            let rec = (f64::from(rec.to_scalar::<f32>()?) * loss_factor) as f32;
            check_loss(step + 1, rec)?;
            progress(step + 1, rec);
        }
        Ok(Self {
            cfg: cfg.clone(),
            input_dim: d,
            mean,
            std: Tensor::new(&[std], &device)?,
            basis,
            basis_t,
            coef_scale: Tensor::new(&[scale], &device)?,
            net: net.detach(),
        })
    }

    /// The configuration it was trained with.
    pub fn config(&self) -> &AutoencoderConfig {
        &self.cfg
    }

    /// Size L of the latent.
    pub fn latent_dim(&self) -> usize {
        self.cfg.latent_dim
    }

    /// Size D of the LoRA vectors.
    pub fn input_dim(&self) -> usize {
        self.input_dim
    }

    /// Number r of principal directions of the training vectors the network works on.
    pub fn principal_dim(&self) -> usize {
        self.basis.dims()[0]
    }

    /// The device of the weights.
    pub fn device(&self) -> &Device {
        self.mean.device()
    }

    /// Latents (B, L) of LoRA vectors `v` (B, D).
    pub fn encode(&self, v: &Tensor) -> Result<Tensor> {
        check_matrix("the LoRA vectors", v, Some(self.input_dim))?;
        let v = v.to_dtype(DType::F32)?.to_device(self.device())?;
        let x = v.broadcast_sub(&self.mean)?.broadcast_div(&self.std)?;
        let c = x.matmul(&self.basis_t)?.broadcast_div(&self.coef_scale)?;
        Ok(self.net.encode(&c)?)
    }

    /// LoRA vectors (B, D), in LoRA space, of latents `z` (B, L).
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        check_matrix("the latents", z, Some(self.cfg.latent_dim))?;
        let z = z.to_dtype(DType::F32)?.to_device(self.device())?;
        let c = self.net.decode(&z)?.broadcast_mul(&self.coef_scale)?;
        let x = c.matmul(&self.basis)?;
        Ok(x.broadcast_mul(&self.std)?.broadcast_add(&self.mean)?)
    }

    /// The relative reconstruction error `‖decode(encode(v)) − v‖ / ‖v‖`, averaged over the
    /// rows of `v` (B, D).
    pub fn reconstruction_error(&self, v: &Tensor) -> Result<f32> {
        let rec = self.decode(&self.encode(v)?)?;
        let v = v.to_dtype(DType::F32)?.to_device(self.device())?;
        relative_error(&rec, &v)
    }

    /// Saves the weights, the standardisation, the principal basis and the configuration to
    /// one safetensors file. The basis (most of the file: r × D values) is stored as f16, which
    /// halves the file; its orthonormal rows keep a relative error of about 5e-4, far below the
    /// autoencoder's own reconstruction error. [`load`](Self::load) reads it back as f32.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors = self.net.named();
        tensors.push(("stats.mean".to_string(), self.mean.clone()));
        tensors.push(("stats.std".to_string(), self.std.clone()));
        tensors.push(("basis".to_string(), self.basis.to_dtype(DType::F16)?));
        tensors.push(("basis.scale".to_string(), self.coef_scale.clone()));
        let extra = [
            (INPUT_DIM_KEY, self.input_dim.to_string()),
            (PRINCIPAL_DIM_KEY, self.principal_dim().to_string()),
        ];
        Ok(save_model(path, &AE_KIND, &self.cfg, &extra, &tensors)?)
    }

    /// Loads an autoencoder written by [`save`](Self::save) onto `device`; every tensor must be
    /// present with the shape the stored configuration implies.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let mut file = ModelFile::open(path, &AE_KIND, device)?;
        let cfg: AutoencoderConfig = file.config()?;
        cfg.validate()
            .map_err(|e| file.error(format!("bad configuration: {e}")))?;
        let d: usize = file.meta_json(INPUT_DIM_KEY)?;
        let r: usize = file.meta_json(PRINCIPAL_DIM_KEY)?;
        if d == 0 || r == 0 {
            return Err(file
                .error(format!("input_dim = {d}, principal_dim = {r}"))
                .into());
        }
        let net = AeNet::build(r, &cfg, &mut file)?;
        let mean = file.take("stats.mean", &[1, d])?;
        let std = file.take("stats.std", &[1])?;
        let basis = file.take("basis", &[r, d])?;
        let coef_scale = file.take("basis.scale", &[1])?;
        file.finish()?;
        Ok(Self {
            cfg,
            input_dim: d,
            mean,
            std,
            basis_t: basis.t()?.contiguous()?,
            basis,
            coef_scale,
            net,
        })
    }
}

/// Mean over rows of `‖a − b‖ / ‖b‖` for matrices of equal shape.
pub(super) fn relative_error(a: &Tensor, b: &Tensor) -> Result<f32> {
    let num = (a - b)?.sqr()?.sum(1)?.sqrt()?;
    let den = b.sqr()?.sum(1)?.sqrt()?.clamp(1e-12f32, f32::MAX)?;
    Ok((num / den)?.mean_all()?.to_scalar::<f32>()?)
}

//! DiffLoRA's hypernetwork (see `METHODS.md`, "DiffLoRA"): the pieces that turn reference-image
//! embeddings into LoRA weights without any fine-tuning at use time.
//!
//! - [`fuse_embeddings`]: several reference embeddings of one person → one condition vector
//!   (mean of the rows, L2-normalised).
//! - [`LoraAutoencoder`]: compresses a flat LoRA vector (D values) to a small latent (L values)
//!   and back. An MLP `D → hidden → L` / `L → hidden → D` with SiLU, trained on standardised
//!   vectors with a reconstruction loss and noise augmentation of the input and of the latent.
//! - [`LatentDenoiser`]: a conditional diffusion model over (standardised) autoencoder latents,
//!   conditioned on the fused identity embedding; DDPM ε-prediction training, DDIM sampling.
//!
//! Everything random (initial weights, batches, noise) is drawn from a `StdRng` seeded from the
//! configuration, so training and sampling are reproducible per seed. Models are saved as one
//! safetensors file each, with the configuration as JSON in the file's metadata; loading checks
//! every tensor's name and shape and names the file and the tensor in any error.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::device::HOST;
use crate::diffusion::{
    DdimConfig, DiffusionError, NoiseSchedule, Prediction, ScheduleConfig, ScheduleKind,
    ddim_sample, guided, seeded_normal,
};
use crate::fsio::write_atomic;
use crate::train::optim::{AdamW, AdamWParams};

/// Errors of the hypernetwork: bad settings, bad inputs, diverged training, bad files.
#[derive(Debug, thiserror::Error)]
pub enum HyperError {
    /// A configuration value is out of range.
    #[error("invalid setting `{field}` = {value}: {why}")]
    InvalidConfig {
        /// The configuration field.
        field: &'static str,
        /// Its value, as text.
        value: String,
        /// What is wrong with it.
        why: String,
    },
    /// An input tensor has the wrong shape.
    #[error("{what} has shape {got:?}, expected {expected}")]
    Shape {
        /// Which input.
        what: String,
        /// Its shape.
        got: Vec<usize>,
        /// The expected shape, in words.
        expected: String,
    },
    /// Inputs that are inconsistent with each other (indices out of range, empty sets …).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// An input holds NaN or infinite values.
    #[error("{0} holds NaN or infinite values")]
    NonFinite(String),
    /// The training loss became NaN or infinite.
    #[error("training diverged at step {step}: the loss is {loss}")]
    Diverged {
        /// The step (1-based).
        step: usize,
        /// The loss value.
        loss: f32,
    },
    /// A file cannot be read or written, or is not a file of the expected kind.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// A saved model lacks a tensor.
    #[error("{path}: tensor `{tensor}` is missing")]
    MissingTensor {
        /// The file.
        path: String,
        /// The tensor name.
        tensor: String,
    },
    /// A saved tensor has the wrong shape.
    #[error("{path}: tensor `{tensor}` has shape {got:?}, expected {expected:?}")]
    TensorShape {
        /// The file.
        path: String,
        /// The tensor name.
        tensor: String,
        /// Its shape in the file.
        got: Vec<usize>,
        /// The shape the configuration implies.
        expected: Vec<usize>,
    },
    /// A saved tensor holds NaN or infinite values.
    #[error("{path}: tensor `{tensor}` holds NaN or infinite values")]
    CorruptTensor {
        /// The file.
        path: String,
        /// The tensor name.
        tensor: String,
    },
    /// A saved model holds a tensor that the configuration does not use.
    #[error("{path}: unexpected tensor `{tensor}` (not part of this model)")]
    UnexpectedTensor {
        /// The file.
        path: String,
        /// The tensor name.
        tensor: String,
    },
    /// An error of the diffusion utilities.
    #[error(transparent)]
    Diffusion(#[from] DiffusionError),
    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result type of the hypernetwork.
pub type Result<T> = std::result::Result<T, HyperError>;

/// Metadata key of the file kind.
const FORMAT_KEY: &str = "format";
/// Metadata key of the configuration JSON.
const CONFIG_KEY: &str = "config";
/// Metadata key of the autoencoder's input dimension.
const INPUT_DIM_KEY: &str = "input_dim";
/// Metadata key of the autoencoder's number of principal directions.
const PRINCIPAL_DIM_KEY: &str = "principal_dim";
/// File kind of a saved [`LoraAutoencoder`].
const AE_FORMAT: &str = "peft-studio/lora-autoencoder/v1";
/// File kind of a saved [`LatentDenoiser`].
const DENOISER_FORMAT: &str = "peft-studio/latent-denoiser/v1";
/// The learning rate decays (cosine) to this fraction of the configured one.
const FINAL_LR_FRACTION: f64 = 0.1;

/// Fuses the embeddings of several references of one person, `e` of shape (n, E) with n ≥ 1,
/// into one condition vector of shape (E,): the mean of the rows, L2-normalised (a zero mean
/// stays zero).
pub fn fuse_embeddings(e: &Tensor) -> candle_core::Result<Tensor> {
    let dims = e.dims();
    if dims.len() != 2 || dims[0] == 0 || dims[1] == 0 {
        candle_core::bail!("fuse_embeddings expects a tensor (n, E) with n, E ≥ 1, got {dims:?}");
    }
    let mean = e.to_dtype(DType::F32)?.mean(0)?;
    let norm = mean.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
    let mean = (mean / f64::from(norm.max(1e-12)))?;
    mean.to_dtype(e.dtype())
}

/// [`fuse_embeddings`] on plain rows (the training loop's fast path).
fn fuse_rows(rows: &[&[f32]], dim: usize) -> Vec<f32> {
    let mut acc = vec![0f32; dim];
    for r in rows {
        for (a, v) in acc.iter_mut().zip(r.iter()) {
            *a += v;
        }
    }
    let n = rows.len().max(1) as f32;
    acc.iter_mut().for_each(|a| *a /= n);
    let norm = acc.iter().map(|a| a * a).sum::<f32>().sqrt().max(1e-12);
    acc.iter_mut().for_each(|a| *a /= norm);
    acc
}

// ---------------------------------------------------------------------------------------------
// Shared building blocks
// ---------------------------------------------------------------------------------------------

/// How a parameter starts.
#[derive(Clone, Copy)]
enum Init {
    /// Normal with std `gain / √fan_in` (fan_in is the first dimension).
    Normal(f64),
    /// All zeros.
    Zeros,
}

/// A dense layer `y = x·W + b` with `W` of shape (in, out).
#[derive(Clone, Debug)]
struct Dense {
    name: String,
    w: Tensor,
    b: Tensor,
}

/// Where parameters come from: fresh trainable variables, or a loaded file.
type Make<'a> = dyn FnMut(&str, &[usize], Init) -> Result<Tensor> + 'a;

impl Dense {
    fn build(
        make: &mut Make,
        name: &str,
        fan_in: usize,
        fan_out: usize,
        gain: f64,
    ) -> Result<Self> {
        let w = make(&format!("{name}.w"), &[fan_in, fan_out], Init::Normal(gain))?;
        let b = make(&format!("{name}.b"), &[fan_out], Init::Zeros)?;
        Ok(Self {
            name: name.to_string(),
            w,
            b,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.matmul(&self.w)?.broadcast_add(&self.b)
    }

    fn push_named(&self, out: &mut Vec<(String, Tensor)>) {
        out.push((format!("{}.w", self.name), self.w.clone()));
        out.push((format!("{}.b", self.name), self.b.clone()));
    }

    fn detach(&self) -> Self {
        Self {
            name: self.name.clone(),
            w: self.w.detach(),
            b: self.b.detach(),
        }
    }
}

/// Creates trainable variables with seeded initial values, remembering them for the optimiser.
struct VarMaker<'a> {
    device: &'a Device,
    rng: &'a mut StdRng,
    vars: Vec<Var>,
}

impl VarMaker<'_> {
    fn make(&mut self, _name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
        let t = match init {
            Init::Zeros => Tensor::zeros(shape, DType::F32, self.device)?,
            Init::Normal(gain) => {
                let fan_in = shape.first().copied().unwrap_or(1).max(1) as f64;
                (seeded_normal(shape, DType::F32, self.device, self.rng)? * (gain / fan_in.sqrt()))?
            }
        };
        let v = Var::from_tensor(&t)?;
        let t = v.as_tensor().clone();
        self.vars.push(v);
        Ok(t)
    }
}

/// Cycles through shuffled permutations of `0..n` (a fresh shuffle each epoch).
struct Batches {
    perm: Vec<u32>,
    pos: usize,
}

impl Batches {
    fn new(n: usize) -> Self {
        Self {
            perm: (0..n as u32).collect(),
            pos: n,
        }
    }

    fn next(&mut self, size: usize, rng: &mut StdRng) -> Vec<u32> {
        let mut out = Vec::with_capacity(size);
        while out.len() < size {
            if self.pos >= self.perm.len() {
                self.perm.shuffle(rng);
                self.pos = 0;
            }
            out.push(self.perm[self.pos]);
            self.pos += 1;
        }
        out
    }
}

/// Cosine decay from `lr` to `FINAL_LR_FRACTION · lr` over `steps`.
fn lr_at(lr: f64, step: usize, steps: usize) -> f64 {
    let frac = step as f64 / steps.max(1) as f64;
    let cos = 0.5 * (1.0 + (std::f64::consts::PI * frac).cos());
    lr * (FINAL_LR_FRACTION + (1.0 - FINAL_LR_FRACTION) * cos)
}

fn invalid(field: &'static str, value: impl std::fmt::Display, why: &str) -> HyperError {
    HyperError::InvalidConfig {
        field,
        value: value.to_string(),
        why: why.to_string(),
    }
}

fn check_positive(field: &'static str, v: usize) -> Result<()> {
    if v == 0 {
        return Err(invalid(field, v, "must be at least 1"));
    }
    Ok(())
}

fn check_lr(field: &'static str, v: f64) -> Result<()> {
    if !(v.is_finite() && v > 0.0) {
        return Err(invalid(field, v, "must be finite and > 0"));
    }
    Ok(())
}

fn check_nonneg(field: &'static str, v: f64) -> Result<()> {
    if !(v.is_finite() && v >= 0.0) {
        return Err(invalid(field, v, "must be finite and ≥ 0"));
    }
    Ok(())
}

/// Checks that `t` has rank 2 with both dimensions ≥ 1 (and the second equal to `cols` if
/// given), returning (rows, cols).
fn check_matrix(what: &str, t: &Tensor, cols: Option<usize>) -> Result<(usize, usize)> {
    let dims = t.dims();
    let expected = match cols {
        Some(c) => format!("(B, {c}) with B ≥ 1"),
        None => "(N, D) with N, D ≥ 1".to_string(),
    };
    match *dims {
        [r, c] if r > 0 && c > 0 && cols.is_none_or(|want| want == c) => Ok((r, c)),
        _ => Err(HyperError::Shape {
            what: what.to_string(),
            got: dims.to_vec(),
            expected,
        }),
    }
}

fn check_finite(what: &str, t: &Tensor) -> Result<()> {
    let s = t
        .abs()?
        .sum_all()?
        .to_dtype(DType::F32)?
        .to_scalar::<f32>()?;
    if !s.is_finite() {
        return Err(HyperError::NonFinite(what.to_string()));
    }
    Ok(())
}

fn check_loss(step: usize, loss: f32) -> Result<()> {
    if !loss.is_finite() {
        return Err(HyperError::Diverged { step, loss });
    }
    Ok(())
}

fn file_err(path: &Path, reason: impl Into<String>) -> HyperError {
    HyperError::File {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

/// Writes named tensors (on the CPU; f16 ones as f16, the rest as f32) plus metadata to a
/// safetensors file, atomically.
fn save_file(
    path: &Path,
    meta: HashMap<String, String>,
    tensors: &[(String, Tensor)],
) -> Result<()> {
    let cpu: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| {
            // f16 tensors stay f16 (the autoencoder's basis); everything else is written as f32.
            let dtype = if t.dtype() == DType::F16 {
                DType::F16
            } else {
                DType::F32
            };
            let t = t.to_device(&HOST)?.to_dtype(dtype)?.contiguous()?;
            Ok((n.clone(), t))
        })
        .collect::<Result<_>>()?;
    let bytes = safetensors::serialize(cpu.iter().map(|(n, t)| (n.as_str(), t)), Some(meta))
        .map_err(|e| file_err(path, format!("cannot serialise the weights: {e}")))?;
    write_atomic(path, &bytes).map_err(|e| file_err(path, format!("cannot write: {}", e.reason())))
}

/// A safetensors file being loaded: its metadata and the tensors not yet taken.
struct Loaded {
    path: String,
    meta: HashMap<String, String>,
    tensors: HashMap<String, Tensor>,
}

impl Loaded {
    fn open(path: &Path, device: &Device, format: &str) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| file_err(path, format!("cannot read: {e}")))?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| file_err(path, format!("not a safetensors file: {e}")))?;
        let meta = header.metadata().clone().unwrap_or_default();
        match meta.get(FORMAT_KEY) {
            Some(f) if f == format => {}
            Some(f) => {
                return Err(file_err(
                    path,
                    format!("is a `{f}` file, expected a `{format}` file"),
                ));
            }
            None => {
                return Err(file_err(
                    path,
                    format!("no `{FORMAT_KEY}` metadata: not a `{format}` file"),
                ));
            }
        }
        let tensors = candle_core::safetensors::load_buffer(&bytes, device)
            .map_err(|e| file_err(path, format!("cannot read the tensors: {e}")))?;
        Ok(Self {
            path: path.display().to_string(),
            meta,
            tensors,
        })
    }

    fn meta_json<T: DeserializeOwned>(&self, key: &str) -> Result<T> {
        let raw = self.meta.get(key).ok_or_else(|| HyperError::File {
            path: self.path.clone(),
            reason: format!("no `{key}` metadata"),
        })?;
        serde_json::from_str(raw).map_err(|e| HyperError::File {
            path: self.path.clone(),
            reason: format!("bad `{key}` metadata: {e}"),
        })
    }

    fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self
            .tensors
            .remove(name)
            .ok_or_else(|| HyperError::MissingTensor {
                path: self.path.clone(),
                tensor: name.to_string(),
            })?;
        if t.dims() != shape {
            return Err(HyperError::TensorShape {
                path: self.path.clone(),
                tensor: name.to_string(),
                got: t.dims().to_vec(),
                expected: shape.to_vec(),
            });
        }
        let t = t.to_dtype(DType::F32)?;
        let s = t.abs()?.sum_all()?.to_scalar::<f32>()?;
        if !s.is_finite() {
            return Err(HyperError::CorruptTensor {
                path: self.path.clone(),
                tensor: name.to_string(),
            });
        }
        Ok(t)
    }

    /// Errors if a tensor was left over (not part of the model).
    fn finish(self) -> Result<()> {
        let mut left: Vec<&String> = self.tensors.keys().collect();
        left.sort();
        match left.first() {
            Some(name) => Err(HyperError::UnexpectedTensor {
                path: self.path.clone(),
                tensor: (*name).clone(),
            }),
            None => Ok(()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// LoRA autoencoder
// ---------------------------------------------------------------------------------------------

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
        check_nonneg("latent_penalty", self.latent_penalty)
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
    fn build(r: usize, cfg: &AutoencoderConfig, make: &mut Make) -> Result<Self> {
        let (h, l) = (cfg.hidden, cfg.latent_dim);
        Ok(Self {
            enc0: Dense::build(make, "enc.0", r, h, 1.0)?,
            enc1: Dense::build(make, "enc.1", h, l, 1.0)?,
            dec0: Dense::build(make, "dec.0", l, h, 1.0)?,
            dec1: Dense::build(make, "dec.1", h, r, 1.0)?,
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
/// from the eigendecomposition of the f64 Gram matrix `x·xᵀ` (N × N, cheap for N ≪ D). Returns
/// one all-zero row if `x` is zero.
fn principal_basis(x: &Tensor) -> Result<Tensor> {
    let (_, d) = x.dims2()?;
    let x64 = x.to_dtype(DType::F64)?;
    let gram = x64.matmul(&x64.t()?)?;
    let n = gram.dims()[0];
    let mat = crate::peft::decompose::tensor_to_mat(&gram)?;
    let eig = crate::peft::decompose::thin_svd(&mat, n)
        .map_err(|e| HyperError::InvalidInput(format!("principal basis: {e}")))?;
    let top = eig.s.first().copied().unwrap_or(0.0);
    let keep: Vec<usize> = (0..eig.s.len())
        .filter(|&i| top > 0.0 && eig.s[i] > BASIS_REL_EIGEN_FLOOR * top)
        .collect();
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
        let std = if var.sqrt() > 1e-12 { var.sqrt() } else { 1.0 };
        let x = (centred / f64::from(std))?;

        let basis = principal_basis(&x)?;
        let basis_t = basis.t()?.contiguous()?;
        let r = basis.dims()[0];
        let coords = x.matmul(&basis_t)?;
        let rms = coords.sqr()?.mean_all()?.to_scalar::<f32>()?.sqrt();
        let scale = if rms > 1e-12 { rms } else { 1.0 };
        let c = (coords / f64::from(scale))?;
        // Loss per standardised coordinate = mean square error of `c` · scale² · r / D.
        let loss_factor = f64::from(scale).powi(2) * r as f64 / d as f64;
        // Isotropic noise of std σ in D dimensions projects to std σ on each orthonormal
        // direction; its component outside the span never reaches the network.
        let input_noise = cfg.input_noise / f64::from(scale);

        let mut rng = StdRng::seed_from_u64(cfg.seed);
        let mut maker = VarMaker {
            device: &device,
            rng: &mut rng,
            vars: Vec::new(),
        };
        let net = AeNet::build(r, cfg, &mut |name, shape, init| {
            maker.make(name, shape, init)
        })?;
        let vars = std::mem::take(&mut maker.vars);
        let mut opt = AdamW::new(
            vars,
            AdamWParams {
                lr: cfg.lr,
                weight_decay: cfg.weight_decay,
                ..AdamWParams::default()
            },
        )?;
        let mut batches = Batches::new(n);
        for step in 0..cfg.steps {
            let idx = batches.next(cfg.batch, &mut rng);
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
            opt.params.lr = lr_at(cfg.lr, step, cfg.steps);
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
        let cfg = serde_json::to_string(&self.cfg).map_err(|e| file_err(path, e.to_string()))?;
        let meta: HashMap<String, String> = [
            (FORMAT_KEY.to_string(), AE_FORMAT.to_string()),
            (CONFIG_KEY.to_string(), cfg),
            (INPUT_DIM_KEY.to_string(), self.input_dim.to_string()),
            (
                PRINCIPAL_DIM_KEY.to_string(),
                self.principal_dim().to_string(),
            ),
        ]
        .into();
        save_file(path, meta, &tensors)
    }

    /// Loads an autoencoder written by [`save`](Self::save) onto `device`; every tensor must be
    /// present with the shape the stored configuration implies.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let mut file = Loaded::open(path, device, AE_FORMAT)?;
        let cfg: AutoencoderConfig = file.meta_json(CONFIG_KEY)?;
        cfg.validate()
            .map_err(|e| file_err(path, format!("bad configuration: {e}")))?;
        let d: usize = file.meta_json(INPUT_DIM_KEY)?;
        let r: usize = file.meta_json(PRINCIPAL_DIM_KEY)?;
        if d == 0 || r == 0 {
            return Err(file_err(
                path,
                format!("input_dim = {d}, principal_dim = {r}"),
            ));
        }
        let net = AeNet::build(r, &cfg, &mut |name, shape, _| file.take(name, shape))?;
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
fn relative_error(a: &Tensor, b: &Tensor) -> Result<f32> {
    let num = (a - b)?.sqr()?.sum(1)?.sqrt()?;
    let den = b.sqr()?.sum(1)?.sqrt()?.clamp(1e-12f32, f32::MAX)?;
    Ok((num / den)?.mean_all()?.to_scalar::<f32>()?)
}

// ---------------------------------------------------------------------------------------------
// Conditional latent denoiser
// ---------------------------------------------------------------------------------------------

/// Settings of [`LatentDenoiser::train`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DenoiserConfig {
    /// Size L of the latents; 0 (the default) takes it from the training data, any other
    /// value must match it.
    pub latent_dim: usize,
    /// Size E of the condition embeddings; 0 (the default) takes it from the training data,
    /// any other value must match it.
    pub cond_dim: usize,
    /// Width of the residual MLP.
    pub hidden: usize,
    /// Number of residual blocks.
    pub layers: usize,
    /// Size of the sinusoidal timestep embedding (even).
    pub time_dim: usize,
    /// Optimiser steps.
    pub steps: usize,
    /// Examples per step.
    pub batch: usize,
    /// Peak learning rate of AdamW (cosine decay to a tenth of it).
    pub lr: f64,
    /// The DDPM noise schedule.
    pub schedule: ScheduleConfig,
    /// DDIM steps of [`LatentDenoiser::sample`] (η = 0).
    pub sample_steps: usize,
    /// Each training example fuses a random subset of 1..=`max_refs` of its identity's
    /// reference embeddings.
    pub max_refs: usize,
    /// Std of the Gaussian noise added to each coordinate of the (internally √E-scaled, so
    /// unit-scale) condition during training.
    pub cond_noise: f64,
    /// Probability of training an example with the null (all-zero) condition, which enables
    /// classifier-free guidance.
    pub p_uncond: f64,
    /// Classifier-free guidance scale of [`LatentDenoiser::sample`] (1 = no guidance; other
    /// values need `p_uncond > 0` to mean anything).
    pub guidance: f64,
    /// Bound of the predicted x0 during sampling, in standardised units; `None` (the default)
    /// uses 1.5 × the largest |value| of the standardised training latents (at least 1).
    pub clip_x0: Option<f64>,
    /// Seed of the initial weights, the batches, the reference subsets and the noise.
    pub seed: u64,
}

impl Default for DenoiserConfig {
    fn default() -> Self {
        Self {
            latent_dim: 0,
            cond_dim: 0,
            hidden: 256,
            layers: 3,
            time_dim: 64,
            steps: 3000,
            batch: 64,
            lr: 1e-3,
            schedule: ScheduleConfig {
                kind: ScheduleKind::Cosine,
                steps: 1000,
            },
            sample_steps: 10,
            max_refs: 5,
            cond_noise: 0.0,
            p_uncond: 0.0,
            guidance: 1.0,
            clip_x0: None,
            seed: 0,
        }
    }
}

impl DenoiserConfig {
    /// Checks every setting (`latent_dim` and `cond_dim` may still be 0 here).
    pub fn validate(&self) -> Result<()> {
        check_positive("hidden", self.hidden)?;
        check_positive("time_dim", self.time_dim)?;
        if !self.time_dim.is_multiple_of(2) {
            return Err(invalid("time_dim", self.time_dim, "must be even"));
        }
        check_positive("steps", self.steps)?;
        check_positive("batch", self.batch)?;
        check_lr("lr", self.lr)?;
        check_positive("schedule.steps", self.schedule.steps)?;
        check_positive("sample_steps", self.sample_steps)?;
        if self.sample_steps > self.schedule.steps {
            return Err(invalid(
                "sample_steps",
                self.sample_steps,
                &format!("must not exceed schedule.steps = {}", self.schedule.steps),
            ));
        }
        check_positive("max_refs", self.max_refs)?;
        check_nonneg("cond_noise", self.cond_noise)?;
        if !(self.p_uncond.is_finite() && (0.0..1.0).contains(&self.p_uncond)) {
            return Err(invalid("p_uncond", self.p_uncond, "must be in [0, 1)"));
        }
        if !self.guidance.is_finite() {
            return Err(invalid("guidance", self.guidance, "must be finite"));
        }
        if let Some(c) = self.clip_x0
            && !(c.is_finite() && c > 0.0)
        {
            return Err(invalid("clip_x0", c, "must be finite and > 0"));
        }
        Ok(())
    }
}

/// One residual block: `h + lin1(silu(lin0(silu(h)) + cond(e)))`.
#[derive(Clone, Debug)]
struct Block {
    lin0: Dense,
    cond: Dense,
    lin1: Dense,
}

/// The denoiser's layers: `emb.0`, `emb.1` (timestep ⊕ condition → hidden), `in` (L → hidden),
/// the residual blocks `block.k.*`, `out` (hidden → L).
#[derive(Clone, Debug)]
struct DenoiserNet {
    emb0: Dense,
    emb1: Dense,
    input: Dense,
    blocks: Vec<Block>,
    out: Dense,
}

impl DenoiserNet {
    fn build(cfg: &DenoiserConfig, make: &mut Make) -> Result<Self> {
        let h = cfg.hidden;
        let emb0 = Dense::build(make, "emb.0", cfg.time_dim + cfg.cond_dim, h, 1.0)?;
        let emb1 = Dense::build(make, "emb.1", h, h, 1.0)?;
        let input = Dense::build(make, "in", cfg.latent_dim, h, 1.0)?;
        let blocks = (0..cfg.layers)
            .map(|k| {
                Ok(Block {
                    lin0: Dense::build(make, &format!("block.{k}.0"), h, h, 1.0)?,
                    cond: Dense::build(make, &format!("block.{k}.cond"), h, h, 1.0)?,
                    lin1: Dense::build(make, &format!("block.{k}.1"), h, h, 0.3)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let out = Dense::build(make, "out", h, cfg.latent_dim, 0.3)?;
        Ok(Self {
            emb0,
            emb1,
            input,
            blocks,
            out,
        })
    }

    /// ε̂ of shape (B, L) from `x` (B, L), the timestep embedding (B, time_dim) and the scaled
    /// condition (B, E).
    fn forward(&self, x: &Tensor, temb: &Tensor, cond: &Tensor) -> candle_core::Result<Tensor> {
        let e = Tensor::cat(&[temb, cond], 1)?;
        let e = self.emb1.forward(&self.emb0.forward(&e)?.silu()?)?.silu()?;
        let mut h = self.input.forward(x)?;
        for b in &self.blocks {
            let inner = (b.lin0.forward(&h.silu()?)? + b.cond.forward(&e)?)?;
            h = (&h + b.lin1.forward(&inner.silu()?)?)?;
        }
        self.out.forward(&h.silu()?)
    }

    fn named(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for l in [&self.emb0, &self.emb1, &self.input] {
            l.push_named(&mut out);
        }
        for b in &self.blocks {
            for l in [&b.lin0, &b.cond, &b.lin1] {
                l.push_named(&mut out);
            }
        }
        self.out.push_named(&mut out);
        out
    }

    fn detach(&self) -> Self {
        Self {
            emb0: self.emb0.detach(),
            emb1: self.emb1.detach(),
            input: self.input.detach(),
            blocks: self
                .blocks
                .iter()
                .map(|b| Block {
                    lin0: b.lin0.detach(),
                    cond: b.cond.detach(),
                    lin1: b.lin1.detach(),
                })
                .collect(),
            out: self.out.detach(),
        }
    }
}

/// A conditional diffusion model over LoRA latents: given fused identity embeddings, it samples
/// latents (to be decoded by the [`LoraAutoencoder`]).
///
/// Latents are standardised per coordinate internally (mean and floored std of the training
/// latents), so the diffusion sees unit-scale data; the condition is multiplied by √E so its
/// coordinates are unit-scale too. The network is an ε-predicting residual MLP: the timestep
/// embedding and the condition are embedded together and added inside every block.
#[derive(Clone, Debug)]
pub struct LatentDenoiser {
    cfg: DenoiserConfig,
    schedule: NoiseSchedule,
    /// Per-coordinate mean of the training latents, shape (1, L).
    mean: Tensor,
    /// Per-coordinate std of the training latents, shape (1, L).
    std: Tensor,
    /// Largest |value| of the standardised training latents, shape (1,).
    absmax: Tensor,
    net: DenoiserNet,
}

impl LatentDenoiser {
    /// Trains a denoiser on `latents` (N, L): row j belongs to identity `row_identity[j]`, whose
    /// per-image embeddings are `identity_embeddings[row_identity[j]]` (n_i, E). Each training
    /// example takes a row, fuses ([`fuse_embeddings`]) a random subset of 1..=`max_refs` of its
    /// identity's embeddings, and learns to predict the noise added to the (standardised) latent
    /// under that condition. Calls `progress(step, loss)` after every step (1-based).
    /// Deterministic given `cfg.seed`; trains on the device of `latents`.
    pub fn train(
        latents: &Tensor,
        row_identity: &[usize],
        identity_embeddings: &[Tensor],
        cfg: &DenoiserConfig,
        progress: &mut dyn FnMut(usize, f32),
    ) -> Result<Self> {
        cfg.validate()?;
        let (n, l) = check_matrix("the latents", latents, None)?;
        let device = latents.device().clone();
        let lat = latents.to_dtype(DType::F32)?;
        check_finite("the latents", &lat)?;
        if row_identity.len() != n {
            return Err(HyperError::InvalidInput(format!(
                "{} identity indices for {n} latent rows",
                row_identity.len()
            )));
        }
        let e_dim = match identity_embeddings.first() {
            Some(t) => t.dims().get(1).copied().unwrap_or(0),
            None => return Err(HyperError::InvalidInput("no identity embeddings".into())),
        };
        let mut embs: Vec<Vec<Vec<f32>>> = Vec::with_capacity(identity_embeddings.len());
        for (i, t) in identity_embeddings.iter().enumerate() {
            let what = format!("the embeddings of identity {i}");
            let dims = t.dims();
            if dims.len() != 2 || dims[1] != e_dim || e_dim == 0 {
                return Err(HyperError::Shape {
                    what,
                    got: dims.to_vec(),
                    expected: format!("(n, {e_dim}) with E ≥ 1"),
                });
            }
            let t = t.to_dtype(DType::F32)?;
            check_finite(&what, &t)?;
            embs.push(t.to_device(&HOST)?.to_vec2::<f32>()?);
        }
        for (j, &i) in row_identity.iter().enumerate() {
            match embs.get(i) {
                None => {
                    return Err(HyperError::InvalidInput(format!(
                        "row {j} names identity {i}, but only {} identities have embeddings",
                        embs.len()
                    )));
                }
                Some(e) if e.is_empty() => {
                    return Err(HyperError::InvalidInput(format!(
                        "identity {i} (of row {j}) has no embeddings"
                    )));
                }
                Some(_) => {}
            }
        }
        let mut cfg = cfg.clone();
        for (field, want, got) in [
            ("latent_dim", &mut cfg.latent_dim, l),
            ("cond_dim", &mut cfg.cond_dim, e_dim),
        ] {
            if *want == 0 {
                *want = got;
            } else if *want != got {
                return Err(invalid(field, *want, &format!("the data has {got}")));
            }
        }

        // Standardisation (per coordinate, std floored).
        let rows = lat.to_device(&HOST)?.to_vec2::<f32>()?;
        let mut mean = vec![0f64; l];
        for r in &rows {
            mean.iter_mut()
                .zip(r)
                .for_each(|(m, v)| *m += f64::from(*v));
        }
        mean.iter_mut().for_each(|m| *m /= n as f64);
        let mut std = vec![0f64; l];
        for r in &rows {
            for ((s, v), m) in std.iter_mut().zip(r).zip(&mean) {
                *s += (f64::from(*v) - m).powi(2);
            }
        }
        std.iter_mut().for_each(|s| *s = (*s / n as f64).sqrt());
        let avg_std = std.iter().sum::<f64>() / l as f64;
        let floor = if avg_std > 1e-12 { 1e-3 * avg_std } else { 1.0 };
        std.iter_mut().for_each(|s| *s = s.max(floor));
        let mut absmax = 0f64;
        let mut standard = Vec::with_capacity(n * l);
        for r in &rows {
            for ((v, m), s) in r.iter().zip(&mean).zip(&std) {
                let x = (f64::from(*v) - m) / s;
                absmax = absmax.max(x.abs());
                standard.push(x as f32);
            }
        }
        let x0_all = Tensor::from_vec(standard, (n, l), &device)?;
        let to_row = |v: &[f64]| -> Result<Tensor> {
            let v: Vec<f32> = v.iter().map(|x| *x as f32).collect();
            Ok(Tensor::from_vec(v, (1, l), &device)?)
        };
        let (mean_t, std_t) = (to_row(&mean)?, to_row(&std)?);
        let absmax_t = Tensor::new(&[absmax as f32], &device)?;

        let schedule = NoiseSchedule::new(cfg.schedule)?;
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        let mut maker = VarMaker {
            device: &device,
            rng: &mut rng,
            vars: Vec::new(),
        };
        let net = DenoiserNet::build(&cfg, &mut |name, shape, init| maker.make(name, shape, init))?;
        let vars = std::mem::take(&mut maker.vars);
        let mut opt = AdamW::new(
            vars,
            AdamWParams {
                lr: cfg.lr,
                weight_decay: 0.0,
                ..AdamWParams::default()
            },
        )?;
        let cond_scale = (e_dim as f32).sqrt();
        let mut batches = Batches::new(n);
        let b = cfg.batch;
        for step in 0..cfg.steps {
            let idx = batches.next(b, &mut rng);
            let mut cond = Vec::with_capacity(b * e_dim);
            for &j in &idx {
                if cfg.p_uncond > 0.0 && rng.random::<f64>() < cfg.p_uncond {
                    cond.extend(std::iter::repeat_n(0f32, e_dim));
                    continue;
                }
                let set = &embs[row_identity[j as usize]];
                let k = rng.random_range(1..=cfg.max_refs.min(set.len()));
                let picked: Vec<&[f32]> = rand::seq::index::sample(&mut rng, set.len(), k)
                    .iter()
                    .map(|i| set[i].as_slice())
                    .collect();
                let fused = fuse_rows(&picked, e_dim);
                for v in fused {
                    let noise = if cfg.cond_noise > 0.0 {
                        cfg.cond_noise as f32 * rng.sample::<f32, _>(StandardNormal)
                    } else {
                        0.0
                    };
                    cond.push(v * cond_scale + noise);
                }
            }
            let cond = Tensor::from_vec(cond, (b, e_dim), &device)?;
            let idx = Tensor::from_vec(idx, b, &device)?;
            let x0 = x0_all.index_select(&idx, 0)?;
            let noise = seeded_normal((b, l), DType::F32, &device, &mut rng)?;
            let t = schedule.sample_timesteps(b, &mut rng);
            let xt = schedule.q_sample(&x0, &noise, &t)?;
            let temb = schedule.timestep_embedding(&t, cfg.time_dim, DType::F32, &device)?;
            let out = net.forward(&xt, &temb, &cond)?;
            let loss = schedule.ddpm_loss(&out, &x0, &noise, &t, Prediction::Epsilon)?;
            let grads = loss.backward()?;
            opt.params.lr = lr_at(cfg.lr, step, cfg.steps);
            opt.step(&grads)?;
            let loss = loss.to_scalar::<f32>()?;
            check_loss(step + 1, loss)?;
            progress(step + 1, loss);
        }
        Ok(Self {
            cfg,
            schedule,
            mean: mean_t,
            std: std_t,
            absmax: absmax_t,
            net: net.detach(),
        })
    }

    /// The configuration (with `latent_dim` and `cond_dim` filled in from the training data).
    pub fn config(&self) -> &DenoiserConfig {
        &self.cfg
    }

    /// The device of the weights.
    pub fn device(&self) -> &Device {
        self.mean.device()
    }

    /// The x0 clip bound used by sampling, in standardised units.
    pub fn clip_bound(&self) -> Result<f64> {
        match self.cfg.clip_x0 {
            Some(c) => Ok(c),
            None => {
                let m = self
                    .absmax
                    .to_vec1::<f32>()?
                    .first()
                    .copied()
                    .unwrap_or(1.0);
                Ok((1.5 * f64::from(m)).max(1.0))
            }
        }
    }

    /// Samples latents (B, L), in the autoencoder's latent space, for conditions `cond` (B, E)
    /// (fused, L2-normalised embeddings as from [`fuse_embeddings`]) by DDIM with
    /// `sample_steps` steps, η = 0 and the configured guidance. Deterministic in `seed`.
    pub fn sample(&self, cond: &Tensor, seed: u64) -> Result<Tensor> {
        self.sample_guided(cond, seed, self.cfg.guidance)
    }

    /// [`sample`](Self::sample) with an explicit classifier-free guidance `scale` (1 = none; the
    /// unconditional branch uses the all-zero condition, meaningful if trained with
    /// `p_uncond > 0`).
    pub fn sample_guided(&self, cond: &Tensor, seed: u64, scale: f64) -> Result<Tensor> {
        if !scale.is_finite() {
            return Err(invalid("guidance", scale, "must be finite"));
        }
        let (b, _) = check_matrix("the identity condition", cond, Some(self.cfg.cond_dim))?;
        let device = self.device().clone();
        let cond = cond.to_dtype(DType::F32)?.to_device(&device)?;
        check_finite(
            "the identity condition (the references' fused embedding)",
            &cond,
        )?;
        let cond = (cond * (self.cfg.cond_dim as f64).sqrt())?;
        let uncond = cond.zeros_like()?;
        let ddim = DdimConfig {
            steps: self.cfg.sample_steps,
            eta: 0.0,
            prediction: Prediction::Epsilon,
            clip_x0: Some(self.clip_bound()?),
            seed,
        };
        let schedule = &self.schedule;
        let time_dim = self.cfg.time_dim;
        let x = ddim_sample(
            schedule,
            (b, self.cfg.latent_dim),
            DType::F32,
            &device,
            &ddim,
            |x, t| {
                let temb = schedule
                    .timestep_embedding(t, time_dim, DType::F32, &device)
                    .map_err(candle_core::Error::wrap)?;
                let out = self.net.forward(x, &temb, &cond)?;
                if scale == 1.0 {
                    return Ok(out);
                }
                let un = self.net.forward(x, &temb, &uncond)?;
                guided(&out, &un, scale).map_err(candle_core::Error::wrap)
            },
        )?;
        Ok(x.broadcast_mul(&self.std)?.broadcast_add(&self.mean)?)
    }

    /// Saves the weights, the standardisation and the configuration to one safetensors file.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors = self.net.named();
        tensors.push(("stats.mean".to_string(), self.mean.clone()));
        tensors.push(("stats.std".to_string(), self.std.clone()));
        tensors.push(("stats.absmax".to_string(), self.absmax.clone()));
        let cfg = serde_json::to_string(&self.cfg).map_err(|e| file_err(path, e.to_string()))?;
        let meta: HashMap<String, String> = [
            (FORMAT_KEY.to_string(), DENOISER_FORMAT.to_string()),
            (CONFIG_KEY.to_string(), cfg),
        ]
        .into();
        save_file(path, meta, &tensors)
    }

    /// Loads a denoiser written by [`save`](Self::save) onto `device`; every tensor must be
    /// present with the shape the stored configuration implies.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let mut file = Loaded::open(path, device, DENOISER_FORMAT)?;
        let cfg: DenoiserConfig = file.meta_json(CONFIG_KEY)?;
        cfg.validate()
            .and_then(|_| check_positive("latent_dim", cfg.latent_dim))
            .and_then(|_| check_positive("cond_dim", cfg.cond_dim))
            .map_err(|e| file_err(path, format!("bad configuration: {e}")))?;
        let schedule = NoiseSchedule::new(cfg.schedule)?;
        let net = DenoiserNet::build(&cfg, &mut |name, shape, _| file.take(name, shape))?;
        let l = cfg.latent_dim;
        let mean = file.take("stats.mean", &[1, l])?;
        let std = file.take("stats.std", &[1, l])?;
        let absmax = file.take("stats.absmax", &[1])?;
        file.finish()?;
        Ok(Self {
            cfg,
            schedule,
            mean,
            std,
            absmax,
            net,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let bytes =
            safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), meta).unwrap();
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
        assert!(
            fuse_embeddings(&Tensor::zeros((0, 3), DType::F32, &Device::Cpu).unwrap()).is_err()
        );
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
        assert!(matches!(err, HyperError::MissingTensor { .. }), "{err}");
        assert!(err.to_string().contains("dec.0.w") && err.to_string().contains("ae_missing"));

        rewrite(&path, &bad, |t| {
            t.insert(
                "enc.1.b".into(),
                Tensor::zeros(5, DType::F32, &Device::Cpu).unwrap(),
            );
        });
        let err = LoraAutoencoder::load(&bad, &Device::Cpu).unwrap_err();
        assert!(matches!(err, HyperError::TensorShape { .. }), "{err}");
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
        assert!(matches!(err, HyperError::UnexpectedTensor { .. }), "{err}");

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
        let a = LatentDenoiser::train(&toy.latents, &toy.rows, &toy.embs, &cfg, &mut |_, _| {})
            .unwrap();
        let b = LatentDenoiser::train(&toy.latents, &toy.rows, &toy.embs, &cfg, &mut |_, _| {})
            .unwrap();
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
        assert_eq!(max_abs_diff(&s, &back.sample(&cond, 7).unwrap()), 0.0);

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
        assert!(matches!(err, HyperError::TensorShape { .. }), "{err}");
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
}

#[cfg(test)]
mod timing {
    use super::*;

    /// Step time at a realistic size (D = 20,000, N = 100, default widths); run by hand with
    /// `cargo test --release --lib personalize::hyper::timing -- --ignored --nocapture`.
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

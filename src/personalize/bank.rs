//! The identity-oriented LoRA bank: LoRAs of one fixed layout trained on single identities,
//! stored as flat vectors with their ordered layout (DiffLoRA's training set).
//!
//! Every LoRA of a bank starts from the same initialisation (`LoraRecipe::init_seed`: the same
//! A matrices, B = 0) and the k-th LoRA of every person uses the same batch, timestep and noise
//! sequence; only the person's images differ. LoRA vectors are otherwise not comparable (any
//! invertible r×r mix of A and B gives the same update), so this is what makes the bank a
//! smooth function of identity that a hypernetwork can learn.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::progress::Cancelled;
use super::tensors::images_to_tensor;
use crate::data::people::PersonImages;
use crate::device::HOST;
use crate::fsio::{read_safetensors, write_safetensors};
use crate::models::unet::Generator;
use crate::peft::linear::{Adapter, LinearLayers, attach_adapters};
use crate::peft::{AdapterConfig, Method, Targets};
use crate::train::optim::{AdamW, AdamWParams};

/// How one identity LoRA is trained (the bank's and direct fine-tuning's recipe).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraRecipe {
    /// LoRA rank.
    pub rank: usize,
    /// LoRA alpha (scale = alpha / rank).
    pub alpha: f64,
    /// Target modules of the UNet (PEFT suffix rule).
    pub targets: Vec<String>,
    /// Optimiser steps.
    pub steps: usize,
    /// Images per step.
    pub batch: usize,
    /// Learning rate (constant).
    pub lr: f64,
    /// Seed of the shared A initialisation.
    pub init_seed: u64,
    /// Bank: LoRAs per person, each on another image subset and seed.
    pub per_person: usize,
    /// Bank: images of the person each LoRA sees (all when larger than the person's set).
    pub images_per_lora: usize,
    /// Train on timesteps `min_timestep..T` only (the noisy range, where identity decides
    /// the target).
    pub min_timestep: usize,
}

impl Default for LoraRecipe {
    fn default() -> Self {
        Self {
            rank: 4,
            alpha: 4.0,
            targets: ["to_q", "to_k", "to_v", "to_out"]
                .map(String::from)
                .to_vec(),
            steps: 60,
            batch: 8,
            lr: 5e-3,
            init_seed: 0,
            per_person: 2,
            images_per_lora: 8,
            min_timestep: 0,
        }
    }
}

impl LoraRecipe {
    /// The adapter config of this recipe.
    pub fn adapter_config(&self) -> AdapterConfig {
        AdapterConfig {
            method: Method::Lora,
            rank: self.rank,
            alpha: Some(self.alpha),
            targets: Targets::List(self.targets.clone()),
            seed: self.init_seed,
            ..AdapterConfig::default()
        }
    }
}

/// One tensor of a flattened LoRA.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayoutEntry {
    /// PEFT-style key, e.g. `mid.transformer.attn1.to_q.lora_A.weight`.
    pub key: String,
    /// Its shape.
    pub shape: Vec<usize>,
}

/// The ordered (key, shape) list that gives a flat LoRA vector its meaning.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoraLayout {
    /// Entries in vector order.
    pub entries: Vec<LayoutEntry>,
}

/// Errors of LoRA flattening and the bank file; every message names the key or file.
#[derive(Debug, thiserror::Error)]
pub enum BankError {
    /// A vector or model does not fit the layout.
    #[error("LoRA layout mismatch: {0}")]
    Layout(String),
    /// Reading or writing a bank file failed.
    #[error("bank {path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, BankError>;

fn lora_layers(model: &(impl LinearLayers + ?Sized)) -> Vec<(String, Var, Var)> {
    model
        .linears()
        .into_iter()
        .filter_map(|l| match l.adapter() {
            Some(Adapter::Lora(a)) => Some((l.path().to_string(), a.a.clone(), a.b.clone())),
            _ => None,
        })
        .collect()
}

impl LoraLayout {
    /// The layout of the LoRA adapters attached to `model` (A then B of each layer, in layer
    /// order).
    pub fn of_model(model: &(impl LinearLayers + ?Sized)) -> Result<Self> {
        let mut entries = Vec::new();
        for (path, a, b) in lora_layers(model) {
            entries.push(LayoutEntry {
                key: format!("{path}.lora_A.weight"),
                shape: a.dims().to_vec(),
            });
            entries.push(LayoutEntry {
                key: format!("{path}.lora_B.weight"),
                shape: b.dims().to_vec(),
            });
        }
        if entries.is_empty() {
            return Err(BankError::Layout("the model has no LoRA adapter".into()));
        }
        Ok(Self { entries })
    }

    /// Values in one flat vector.
    pub fn len(&self) -> usize {
        self.entries
            .iter()
            .map(|e| e.shape.iter().product::<usize>())
            .sum()
    }

    /// True when the layout holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The LoRA adapters of `model` as one flat vector in this layout's order.
    pub fn flatten(&self, model: &(impl LinearLayers + ?Sized)) -> Result<Vec<f32>> {
        let here = Self::of_model(model)?;
        if &here != self {
            return Err(BankError::Layout(
                "the model's adapters differ from the layout".into(),
            ));
        }
        let mut out = Vec::with_capacity(self.len());
        for (_, a, b) in lora_layers(model) {
            out.extend(
                a.as_tensor()
                    .flatten_all()?
                    .to_dtype(DType::F32)?
                    .to_vec1::<f32>()?,
            );
            out.extend(
                b.as_tensor()
                    .flatten_all()?
                    .to_dtype(DType::F32)?
                    .to_vec1::<f32>()?,
            );
        }
        Ok(out)
    }

    /// Writes the flat vector `flat` into `model`'s LoRA adapters (which must have this
    /// layout); the model is unchanged on error.
    pub fn unflatten_into(&self, model: &(impl LinearLayers + ?Sized), flat: &[f32]) -> Result<()> {
        if flat.len() != self.len() {
            return Err(BankError::Layout(format!(
                "vector of {} values, the layout holds {}",
                flat.len(),
                self.len()
            )));
        }
        let here = Self::of_model(model)?;
        if &here != self {
            let first = self
                .entries
                .iter()
                .zip(here.entries.iter().map(Some).chain(std::iter::repeat(None)))
                .find(|(a, b)| Some(*a) != *b)
                .map(|(a, _)| a.key.clone())
                .unwrap_or_default();
            return Err(BankError::Layout(format!(
                "the model's adapters differ from the layout (first difference at `{first}`)"
            )));
        }
        let mut offset = 0;
        for (_, a, b) in lora_layers(model) {
            for v in [a, b] {
                let n = v.elem_count();
                let t = Tensor::from_slice(&flat[offset..offset + n], v.shape(), v.device())?
                    .to_dtype(v.dtype())?;
                v.set(&t)?;
                offset += n;
            }
        }
        Ok(())
    }
}

/// A copy of `base` with fresh LoRA adapters of `recipe` on its UNet.
pub fn with_fresh_lora(base: &Generator, recipe: &LoraRecipe) -> anyhow::Result<Generator> {
    let mut g = base.clone();
    attach_adapters(g.unet_mut(), &recipe.adapter_config())?;
    Ok(g)
}

/// Trains a fresh LoRA of `recipe` on `images` (N, C, S, S in [-1, 1]) with their prompts;
/// batches, timesteps and noise depend only on `seed` and the step. Returns the generator
/// with the trained adapter attached (unmerged). `progress(step, total, loss)` after each step;
/// `Break` stops the training with a [`Cancelled`] error.
pub fn train_lora(
    base: &Generator,
    images: &Tensor,
    prompts: &[String],
    recipe: &LoraRecipe,
    seed: u64,
    progress: &mut dyn FnMut(usize, usize, f32) -> ControlFlow<()>,
) -> anyhow::Result<Generator> {
    let n = images.dim(0)?;
    anyhow::ensure!(n > 0, "no images to train a LoRA on");
    anyhow::ensure!(
        prompts.len() == n,
        "{} prompts for {n} images",
        prompts.len()
    );
    let g = with_fresh_lora(base, recipe)?;
    let vars: Vec<Var> = crate::peft::linear::trainable_vars(g.unet())
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    let mut opt = AdamW::new(
        vars,
        AdamWParams {
            lr: recipe.lr,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let device = images.device();
    // A latent generator's images are encoded once, not at every step.
    let latents = g.to_latents(images)?;
    for step in 0..recipe.steps {
        let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(0x2545_F491) ^ (step as u64) << 20);
        let idx: Vec<u32> = (0..recipe.batch)
            .map(|_| rng.random_range(0..n) as u32)
            .collect();
        let batch =
            latents.index_select(&Tensor::from_vec(idx.clone(), recipe.batch, device)?, 0)?;
        let batch_prompts: Vec<String> = idx.iter().map(|&i| prompts[i as usize].clone()).collect();
        let loss = g.latent_loss_from(&batch, &batch_prompts, &mut rng, recipe.min_timestep)?;
        let value = loss.to_scalar::<f32>()?;
        anyhow::ensure!(
            value.is_finite(),
            "LoRA loss became {value} at step {}",
            step + 1
        );
        opt.step(&loss.backward()?)?;
        if progress(step + 1, recipe.steps, value).is_break() {
            return Err(Cancelled.into());
        }
    }
    Ok(g)
}

/// The LoRA bank: flat vectors, the person each belongs to, the layout and the recipe.
#[derive(Debug, Clone)]
pub struct LoraBank {
    /// The layout of every vector.
    pub layout: LoraLayout,
    /// The recipe the LoRAs were trained with.
    pub recipe: LoraRecipe,
    /// Names of the bank's people.
    pub people: Vec<String>,
    /// One flat LoRA each.
    pub vectors: Vec<Vec<f32>>,
    /// Index into `people` of each vector.
    pub person: Vec<usize>,
}

const META_KEY: &str = "lora_bank";

#[derive(Serialize, Deserialize)]
struct BankMeta {
    layout: LoraLayout,
    recipe: LoraRecipe,
    people: Vec<String>,
    person: Vec<usize>,
}

impl LoraBank {
    /// The vectors as one (N, D) tensor.
    pub fn matrix(&self, device: &Device) -> Result<Tensor> {
        let d = self.layout.len();
        let flat: Vec<f32> = self.vectors.iter().flatten().copied().collect();
        Ok(Tensor::from_vec(flat, (self.vectors.len(), d), device)?)
    }

    /// Writes the bank atomically (safetensors: `vectors`, metadata: layout, recipe, people).
    pub fn save(&self, path: &Path) -> Result<()> {
        let err = |reason: String| BankError::File {
            path: path.display().to_string(),
            reason,
        };
        let meta = BankMeta {
            layout: self.layout.clone(),
            recipe: self.recipe.clone(),
            people: self.people.clone(),
            person: self.person.clone(),
        };
        let json = serde_json::to_string(&meta).map_err(|e| err(e.to_string()))?;
        let m = if self.vectors.is_empty() {
            Tensor::zeros((0, self.layout.len()), DType::F32, &HOST)?
        } else {
            self.matrix(&HOST)?
        };
        write_safetensors(
            path,
            &[("vectors".to_string(), m)],
            HashMap::from([(META_KEY.to_string(), json)]),
        )
        .map_err(|e| err(e.reason()))
    }

    /// Reads a bank written by [`save`](Self::save).
    pub fn load(path: &Path) -> Result<Self> {
        let err = |reason: String| BankError::File {
            path: path.display().to_string(),
            reason,
        };
        let (tensors, json) =
            read_safetensors(path, META_KEY, "LoRA bank", &HOST).map_err(|e| err(e.reason()))?;
        let meta: BankMeta = serde_json::from_str(&json).map_err(|e| err(e.to_string()))?;
        let m = tensors
            .get("vectors")
            .ok_or_else(|| err("tensor `vectors` is missing".into()))?;
        let (n, d) = m.dims2().map_err(|e| err(format!("`vectors`: {e}")))?;
        if d != meta.layout.len() || n != meta.person.len() {
            return Err(err(format!(
                "`vectors` is {n}×{d}; the layout holds {} values and {} rows are listed",
                meta.layout.len(),
                meta.person.len()
            )));
        }
        if meta.person.iter().any(|&p| p >= meta.people.len()) {
            return Err(err("a row names a person outside the list".into()));
        }
        let vectors = m
            .to_vec2::<f32>()
            .map_err(|e| err(format!("`vectors`: {e}")))?;
        Ok(Self {
            layout: meta.layout,
            recipe: meta.recipe,
            people: meta.people,
            vectors,
            person: meta.person,
        })
    }
}

/// Builds (or continues) the bank at `path`: `recipe.per_person` LoRAs for each person, the
/// k-th on a seeded subset of `images_per_lora` of their images with seed k. The bank is saved
/// after every LoRA, so a restart skips what is done. `progress(done, total, loss)` after each
/// LoRA (loss: its last-10-steps mean).
pub fn build_bank(
    base: &Generator,
    people: &[PersonImages],
    recipe: &LoraRecipe,
    path: &Path,
    progress: &mut dyn FnMut(usize, usize, f32),
) -> anyhow::Result<LoraBank> {
    anyhow::ensure!(!people.is_empty(), "the bank needs people");
    let names: Vec<String> = people.iter().map(|p| p.name.clone()).collect();
    let layout = LoraLayout::of_model(with_fresh_lora(base, recipe)?.unet())?;
    let mut bank = if path.exists() {
        let mut b = LoraBank::load(path)?;
        // More people may be added at the end: the existing LoRAs keep their meaning.
        anyhow::ensure!(
            b.layout == layout && b.recipe == *recipe && names.starts_with(&b.people),
            "{} was built with another layout, recipe or people; delete it to rebuild",
            path.display()
        );
        b.people = names;
        log::info!("resuming the LoRA bank at {} LoRAs", b.vectors.len());
        b
    } else {
        LoraBank {
            layout,
            recipe: recipe.clone(),
            people: names,
            vectors: Vec::new(),
            person: Vec::new(),
        }
    };
    let total = people.len() * recipe.per_person;
    let device = base.device().clone();
    for job in bank.vectors.len()..total {
        let (p, k) = (job / recipe.per_person, job % recipe.per_person);
        let person = &people[p];
        let mut order: Vec<usize> = (0..person.images.len()).collect();
        order.shuffle(&mut StdRng::seed_from_u64(k as u64 * 7919 + 1));
        order.truncate(recipe.images_per_lora.max(1));
        let imgs: Vec<image::RgbImage> = order.iter().map(|&i| person.images[i].clone()).collect();
        let prompts: Vec<String> = order.iter().map(|&i| person.prompts[i].clone()).collect();
        let images = images_to_tensor(&imgs, &device)?;
        let mut losses = Vec::new();
        let g = train_lora(base, &images, &prompts, recipe, k as u64, &mut |_, _, l| {
            losses.push(l);
            ControlFlow::Continue(())
        })?;
        let tail = &losses[losses.len().saturating_sub(10)..];
        let mean = tail.iter().sum::<f32>() / tail.len().max(1) as f32;
        bank.vectors.push(bank.layout.flatten(g.unet())?);
        bank.person.push(p);
        bank.save(path)?;
        progress(job + 1, total, mean);
    }
    Ok(bank)
}

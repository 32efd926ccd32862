//! Up-front checks of a [`DiffLoraPreset`]: every stage's steps, batches, learning rates and
//! people counts in range, so `difflora-build` refuses a bad preset before it trains anything
//! (and never saves, say, an untrained generator).

use super::build::DiffLoraPreset;
use crate::data::people::PeopleSource;

/// Most optimiser steps of one build stage.
pub const MAX_STAGE_STEPS: usize = 10_000_000;
/// Largest batch of one build stage.
pub const MAX_STAGE_BATCH: usize = 1 << 14;
/// Largest image side a personaliser may use.
pub const MAX_IMAGE_SIZE: u32 = 1024;
/// Most people or images per person a synthetic source may render.
pub const MAX_PEOPLE: usize = 1_000_000;

fn count(field: &str, v: usize, lo: usize, hi: usize) -> anyhow::Result<()> {
    anyhow::ensure!(
        (lo..=hi).contains(&v),
        "{field}: must be between {lo} and {hi}, got {v}"
    );
    Ok(())
}

fn rate(field: &str, v: f64) -> anyhow::Result<()> {
    anyhow::ensure!(
        v.is_finite() && v > 0.0,
        "{field}: must be a positive number, got {v}"
    );
    Ok(())
}

fn non_negative(field: &str, v: f64) -> anyhow::Result<()> {
    anyhow::ensure!(
        v.is_finite() && v >= 0.0,
        "{field}: must be a number ≥ 0, got {v}"
    );
    Ok(())
}

fn people(field: &str, p: &PeopleSource) -> anyhow::Result<()> {
    match p {
        PeopleSource::Synthetic {
            count: n,
            images_per_person,
            ..
        } => {
            count(&format!("{field}.count"), *n, 1, MAX_PEOPLE)?;
            count(
                &format!("{field}.images_per_person"),
                *images_per_person,
                1,
                MAX_PEOPLE,
            )
        }
        PeopleSource::Folder { count: n, .. } => match n {
            Some(n) => count(&format!("{field}.count"), *n, 1, MAX_PEOPLE),
            None => Ok(()),
        },
    }
}

impl DiffLoraPreset {
    /// Checks every stage's settings; the error names the field, its value and the range.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            (8..=MAX_IMAGE_SIZE).contains(&self.image_size),
            "image_size: must be between 8 and {MAX_IMAGE_SIZE}, got {}",
            self.image_size
        );
        anyhow::ensure!(
            self.unet.pixel_size() as u32 == self.image_size,
            "{} {} differs from image_size {}",
            if self.unet.codec.is_some() {
                "unet.codec.image_size"
            } else {
                "unet.image_size"
            },
            self.unet.pixel_size(),
            self.image_size
        );
        for (field, encoder) in [
            ("encoder", &self.encoder),
            ("eval_encoder", &self.eval_encoder),
        ] {
            anyhow::ensure!(
                encoder.image_size == self.image_size as usize,
                "{field}.image_size {} differs from image_size {}",
                encoder.image_size,
                self.image_size
            );
        }
        self.unet
            .validate()
            .map_err(|e| anyhow::anyhow!("unet: {e}"))?;
        let r = &self.people;
        people("people.generator", &r.generator)?;
        people("people.bank", &r.bank)?;
        if let Some(e) = &r.encoder {
            people("people.encoder", e)?;
        }
        people("people.eval_encoder", &r.eval_encoder)?;
        people("people.eval", &r.eval)?;
        if self.unet.codec.is_some() {
            let c = &self.codec_training;
            count("codec_training.steps", c.steps, 1, MAX_STAGE_STEPS)
                .map_err(|e| e.context("an untrained codec would be saved"))?;
            count("codec_training.batch", c.batch, 1, 4096)?;
        }
        if let Some(d) = &self.decoder_refinement {
            anyhow::ensure!(
                self.unet.codec.is_some(),
                "decoder_refinement: only a latent generator (unet.codec) has a decoder to sharpen"
            );
            count(
                "decoder_refinement.training.steps",
                d.training.steps,
                1,
                MAX_STAGE_STEPS,
            )?;
            count(
                "decoder_refinement.training.batch",
                d.training.batch,
                1,
                4096,
            )?;
            rate("decoder_refinement.training.lr", d.training.lr)?;
            non_negative("decoder_refinement.edge_weight", d.edge_weight)?;
            non_negative("decoder_refinement.latent_noise", d.latent_noise)?;
        }
        let g = &self.generator_training;
        count("generator_training.steps", g.steps, 1, MAX_STAGE_STEPS)
            .map_err(|e| e.context("an untrained generator would be saved"))?;
        count("generator_training.batch", g.batch, 1, MAX_STAGE_BATCH)?;
        rate("generator_training.lr", g.lr)?;
        non_negative("generator_training.weight_decay", g.weight_decay)?;
        let l = &self.lora;
        count("lora.rank", l.rank, 1, 4096)?;
        rate("lora.alpha", l.alpha)?;
        anyhow::ensure!(
            !l.targets.is_empty(),
            "lora.targets: give at least one module"
        );
        count("lora.steps", l.steps, 1, MAX_STAGE_STEPS)?;
        count("lora.batch", l.batch, 1, MAX_STAGE_BATCH)?;
        rate("lora.lr", l.lr)?;
        count("lora.per_person", l.per_person, 1, 1000)?;
        count("lora.images_per_lora", l.images_per_lora, 1, MAX_PEOPLE)?;
        count(
            "lora.min_timestep",
            l.min_timestep,
            0,
            self.unet.schedule.steps.saturating_sub(1),
        )?;
        for (name, e) in [
            ("encoder", &self.encoder),
            ("eval_encoder", &self.eval_encoder),
        ] {
            e.validate()
                .map_err(|err| anyhow::anyhow!("{name}: {err}"))?;
            count(&format!("{name}.steps"), e.steps, 1, MAX_STAGE_STEPS)?;
        }
        self.autoencoder
            .validate()
            .map_err(|e| anyhow::anyhow!("autoencoder: {e}"))?;
        self.denoiser
            .validate()
            .map_err(|e| anyhow::anyhow!("denoiser: {e}"))?;
        self.prediction.validate()?;
        count(
            "sampling.steps",
            self.sampling.steps,
            1,
            self.unet.schedule.steps,
        )?;
        non_negative("sampling.guidance", self.sampling.guidance)?;
        Ok(())
    }
}

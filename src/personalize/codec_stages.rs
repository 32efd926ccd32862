//! The build stages of a latent generator's image codec: its training (`codec`) and the
//! sharpening of its decoder (`decoder`), with their previews.

use candle_core::{DType, Device, Tensor};

use super::build::{
    BuildProgress, BuildReport, DiffLoraPreset, draw_generator_preview, load_generator,
    stack_people,
};
use super::commands::{contact_sheet, save_png};
use super::files;
use super::generator_training::{refine_decoder, train_codec};
use super::tensors::{images_to_tensor, tensor_to_images};
use crate::models::unet::ImageCodec;

/// The codec as the `codec` stage trained it (the generator trains on its encoder's latents).
pub(super) fn load_codec(preset: &DiffLoraPreset, device: &Device) -> anyhow::Result<ImageCodec> {
    let path = preset.out.join(files::CODEC);
    ImageCodec::load(&path, device)
        .map_err(|e| anyhow::anyhow!("{e} (build the `codec` stage first)"))
}

/// Trains a latent generator's image codec on the generator's people and writes its preview
/// (held-out renders of the evaluation people above their reconstructions).
pub(super) fn build_codec(
    preset: &DiffLoraPreset,
    report: &mut BuildReport,
    device: &Device,
    progress: BuildProgress<'_>,
) -> anyhow::Result<bool> {
    let Some(cfg) = &preset.unet.codec else {
        return Ok(false);
    };
    let path = preset.out.join(files::CODEC);
    if path.exists() {
        return Ok(false);
    }
    let people = preset.people.generator.load(preset.image_size)?;
    let (images, _) = stack_people(&people, device)?;
    log::info!(
        "image codec: {} images of {} people",
        images.dim(0)?,
        people.len()
    );
    let codec = train_codec(
        cfg,
        &images,
        &preset.codec_training,
        Some(&preset.out.join(files::CODEC_CHECKPOINT)),
        &mut |step, total, loss| progress("codec", step, total, loss),
    )?;
    codec.save(&path)?;
    let renders = held_out_renders(preset)?;
    let originals = images_to_tensor(&renders, device)?;
    let decoded = codec.decode(&codec.encode(&originals)?)?;
    let error = mean_abs_error(&decoded, &originals)?;
    report.codec_error = Some(error);
    log::info!(
        "image codec: mean absolute error {error:.4} on {} held-out renders",
        renders.len()
    );
    let reconstructions = tensor_to_images(&decoded)?;
    let sheet = contact_sheet(&[&renders, &reconstructions], 4);
    save_png(&sheet, &preset.out.join(files::CODEC_PREVIEW))?;
    Ok(true)
}

/// The sharpened codec when the `decoder` stage has written it.
pub(super) fn load_sharp_codec(
    preset: &DiffLoraPreset,
    device: &Device,
) -> anyhow::Result<Option<ImageCodec>> {
    let path = preset.out.join(files::SHARP_CODEC);
    if preset.decoder_refinement.is_none() || !path.exists() {
        return Ok(None);
    }
    Ok(Some(ImageCodec::load(&path, device)?))
}

/// Sharpens the codec's decoder on the generator's people (once), writes its preview (held-out
/// renders, the codec's and the sharpened codec's reconstructions) and puts it into the
/// generator file when that exists with another decoder (a generator trained beside this
/// stage, or before it).
pub(super) fn build_decoder(
    preset: &DiffLoraPreset,
    report: &mut BuildReport,
    device: &Device,
    progress: BuildProgress<'_>,
) -> anyhow::Result<bool> {
    let Some(refinement) = &preset.decoder_refinement else {
        return Ok(false);
    };
    let path = preset.out.join(files::SHARP_CODEC);
    let trained = !path.exists();
    if trained {
        let codec = load_codec(preset, device)?;
        let people = preset.people.generator.load(preset.image_size)?;
        let (images, _) = stack_people(&people, device)?;
        log::info!("decoder refinement: {} images", images.dim(0)?);
        let sharp = refine_decoder(
            codec.clone(),
            &images,
            refinement,
            Some(&preset.out.join(files::SHARP_CODEC_CHECKPOINT)),
            &mut |step, total, loss| progress("decoder", step, total, loss),
        )?;
        sharp.save(&path)?;
        let renders = held_out_renders(preset)?;
        let originals = images_to_tensor(&renders, device)?;
        let before = codec.decode(&codec.encode(&originals)?)?;
        let after = sharp.decode(&sharp.encode(&originals)?)?;
        let error = mean_abs_error(&after, &originals)?;
        report.sharp_codec_error = Some(error);
        log::info!(
            "decoder refinement: mean absolute error {:.4} → {error:.4} on {} held-out renders",
            mean_abs_error(&before, &originals)?,
            renders.len()
        );
        let (before, after) = (tensor_to_images(&before)?, tensor_to_images(&after)?);
        let sheet = contact_sheet(&[&renders, &before, &after], 4);
        save_png(&sheet, &preset.out.join(files::SHARP_CODEC_PREVIEW))?;
    }
    let generator_path = preset.out.join(files::GENERATOR);
    if generator_path.exists() {
        let mut generator = load_generator(preset, device)?;
        let sharp = ImageCodec::load(&path, device)?;
        let carried = generator
            .codec()
            .map(|c| c.named_tensors())
            .unwrap_or_default();
        if !same_tensors(&carried, &sharp.named_tensors())? {
            log::info!(
                "putting the sharpened decoder into {}",
                generator_path.display()
            );
            generator.set_codec(sharp)?;
            generator.save(&generator_path)?;
            draw_generator_preview(&generator, &preset.out.join(files::GENERATOR_PREVIEW))?;
        }
    }
    Ok(trained)
}

/// The first render of each of the first 8 held-out people.
fn held_out_renders(preset: &DiffLoraPreset) -> anyhow::Result<Vec<image::RgbImage>> {
    let held_out = preset.people.eval.load(preset.image_size)?;
    Ok(held_out
        .iter()
        .take(8)
        .filter_map(|p| p.images.first().cloned())
        .collect())
}

fn mean_abs_error(a: &Tensor, b: &Tensor) -> anyhow::Result<f32> {
    Ok((a - b)?.abs()?.mean_all()?.to_scalar::<f32>()?)
}

/// Whether two named tensor lists hold the same names and values.
fn same_tensors(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> anyhow::Result<bool> {
    if a.len() != b.len() {
        return Ok(false);
    }
    for ((na, ta), (nb, tb)) in a.iter().zip(b) {
        if na != nb || ta.dims() != tb.dims() {
            return Ok(false);
        }
        let d = (ta.to_dtype(DType::F32)? - tb.to_dtype(DType::F32)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        if d != 0.0 {
            return Ok(false);
        }
    }
    Ok(true)
}

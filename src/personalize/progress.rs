//! Where a personalisation stands ([`Stage`]) and how whoever drives it stops it: every stage
//! and step is announced to a [`Progress`] callback, whose `Break` ends the work with a
//! [`Cancelled`] error before anything more is computed or written.

use std::ops::ControlFlow;

/// Announces each stage and step; `Break` cancels the work (it then fails with [`Cancelled`]).
pub type Progress<'a> = &'a mut dyn FnMut(Stage) -> ControlFlow<()>;

/// The error of work stopped on request (find it with `anyhow::Error::is::<Cancelled>()`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("cancelled")]
pub struct Cancelled;

/// Which gallery is being drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GalleryKind {
    /// With the LoRA DiffLoRA predicted.
    DiffLora,
    /// With the base generator (no LoRA).
    Base,
    /// With the LoRA fine-tuned directly on the references.
    Direct,
}

impl GalleryKind {
    /// The gallery's name in a sentence.
    pub fn name(self) -> &'static str {
        match self {
            GalleryKind::DiffLora => "the DiffLoRA gallery",
            GalleryKind::Base => "the base generator's gallery",
            GalleryKind::Direct => "the direct LoRA's gallery",
        }
    }
}

/// A stage of a personalisation, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Embedding and fusing the reference images.
    EncodingReferences,
    /// Sampling the LoRA latent with the conditional denoiser.
    SamplingLatent,
    /// Decoding the latent to LoRA weights.
    DecodingLora,
    /// Loading the LoRA into the generator and merging it.
    Merging,
    /// Drawing a gallery of `images` images: DDIM step `step` of `steps` (all images at once).
    Drawing {
        /// Which gallery.
        gallery: GalleryKind,
        /// Images in it.
        images: usize,
        /// Step about to run (1-based).
        step: usize,
        /// Steps in all.
        steps: usize,
    },
    /// Fine-tuning a LoRA directly on the references: step `step` of `steps` done.
    DirectTuning {
        /// Steps done (1-based).
        step: usize,
        /// Steps in all.
        steps: usize,
    },
    /// Writing the result files.
    Saving,
}

impl Stage {
    /// How far the stage is (0–1), for stages made of steps.
    pub fn fraction(&self) -> Option<f32> {
        match *self {
            Stage::Drawing { step, steps, .. } | Stage::DirectTuning { step, steps } => {
                Some(step as f32 / steps.max(1) as f32)
            }
            _ => None,
        }
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stage::EncodingReferences => f.write_str("encoding the references"),
            Stage::SamplingLatent => f.write_str("generating the LoRA weights"),
            Stage::DecodingLora => f.write_str("decoding the LoRA weights"),
            Stage::Merging => f.write_str("merging the LoRA into the generator"),
            Stage::Drawing {
                gallery,
                images,
                step,
                steps,
            } => write!(
                f,
                "drawing {} ({images} image{}): step {step}/{steps}",
                gallery.name(),
                if *images == 1 { "" } else { "s" }
            ),
            Stage::DirectTuning { step, steps } => {
                write!(
                    f,
                    "fine-tuning a LoRA on the references: step {step}/{steps}"
                )
            }
            Stage::Saving => f.write_str("saving"),
        }
    }
}

/// Announces `stage`; `Err(Cancelled)` when the callback says stop.
pub fn announce(progress: Progress<'_>, stage: Stage) -> anyhow::Result<()> {
    match progress(stage) {
        ControlFlow::Continue(()) => Ok(()),
        ControlFlow::Break(()) => Err(Cancelled.into()),
    }
}

/// A callback that never stops and ignores every stage.
pub fn ignore(_: Stage) -> ControlFlow<()> {
    ControlFlow::Continue(())
}

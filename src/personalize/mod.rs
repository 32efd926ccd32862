//! Personalised image generation (DiffLoRA, see `METHODS.md`): a few portraits of a person in,
//! that person's LoRA for the portrait generator out, without fine-tuning at use time.
//!
//! The portraits themselves are data: the synthetic renderer, the identity folders of real
//! photos and the sets of people built from them live in [`crate::data`]
//! ([`portrait`](crate::data::portrait), [`identity_folder`](crate::data::identity_folder),
//! [`people`](crate::data::people)). The generator is [`crate::models::unet`]; the small models
//! here are built from the layer kit [`crate::models::kit`].
//!
//! - [`generator_training`] pre-trains the generator; [`bank`] trains the identity-oriented
//!   LoRA bank; [`identity_encoder`] embeds portraits so that one person's pictures embed
//!   close together; [`hyper`] holds the hypernetwork (LoRA autoencoder and conditional latent
//!   denoiser), [`ensemble`] its prediction from several denoisers.
//! - [`build`] trains a personaliser from a preset (checked up front by [`preset_checks`]) into
//!   a folder whose file names [`files`] lists; [`pipeline`] loads and runs it, [`job`] runs
//!   one personalisation end to end (the worker's job and the `personalize` command's), with
//!   the stages of [`progress`], and [`commands`] holds the command-line work (options and
//!   output folders checked before any work).
//! - [`attribute_reader`] names the attributes a person sees in a portrait (trained on renders
//!   only) for prompt adherence and identity agreement; [`evaluate`] scores personalisers;
//!   [`familiarity`] warns about references far from what a personaliser knows;
//!   [`image_stats`] holds the Fréchet distance of the evaluation.

pub mod attribute_reader;
pub mod bank;
pub mod build;
mod codec_stages;
pub mod commands;
pub mod comparison;
pub mod ensemble;
pub mod evaluate;
pub mod familiarity;
pub mod files;
pub mod generator_training;
pub mod hyper;
pub mod identity_encoder;
pub mod image_stats;
pub mod job;
pub mod pipeline;
pub mod preset_checks;
pub mod progress;
pub mod tensors;

pub use tensors::{images_to_tensor, tensor_to_images};

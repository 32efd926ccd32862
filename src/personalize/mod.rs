//! Data for personalisation (DiffLoRA, see `METHODS.md`): portraits with known identity.
//!
//! - [`portrait`]: a procedural, deterministic renderer of synthetic cartoon faces. Every face
//!   comes from an [`Identity`] (the person: face shape, colours, hair, eyes, nose, mouth,
//!   facial hair, glasses) and [`Attributes`] (what a text prompt can change: expression, head
//!   turn, background, lighting, accessory), so identity ground truth is exact.
//! - [`identity_folder`]: the loader for real photos laid out one sub-folder per person (like the
//!   ORL faces), and for a folder of one person's reference photos.
//! - [`build`] trains a personaliser from a preset (checked up front by [`preset_checks`]) into
//!   a folder whose file names [`files`] lists; [`pipeline`] loads and runs it, [`job`] runs
//!   one personalisation end to end (the worker's job and the `personalize` command's), with
//!   the stages of [`progress`], and [`commands`] holds the command-line work (options and
//!   output folders checked before any work).
//! - [`attribute_reader`] names the attributes a person sees in a portrait (trained on renders
//!   only) for prompt adherence and identity agreement; [`image_stats`] holds the Fréchet
//!   distance of the evaluation.

pub mod attribute_reader;
pub mod bank;
pub mod build;
pub mod commands;
pub mod ensemble;
pub mod evaluate;
pub mod familiarity;
pub mod files;
pub mod generator_training;
pub mod hyper;
pub mod identity_encoder;
pub mod identity_folder;
pub mod image_stats;
pub mod job;
pub mod people;
pub mod pipeline;
pub mod portrait;
pub mod preset_checks;
pub mod progress;
pub mod tensors;

pub use identity_folder::{
    IMAGE_EXTENSIONS, IdentityError, MIN_IMAGE_SIDE, Person, load_identity_folder, load_references,
    natural_cmp,
};
pub use portrait::{
    Accessory, Attributes, Background, Expression, FacialHair, Glasses, HairStyle, HeadTurn,
    IDENTITY_DIMS, Identity, Lighting, render, render_set,
};
pub use tensors::{images_to_tensor, tensor_to_images};

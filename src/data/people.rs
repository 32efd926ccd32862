//! Sets of people with their portraits: synthetic identities drawn by the renderer, or real
//! photos from an identity folder. Every personalisation stage (generator, LoRA bank, encoders,
//! evaluation) reads its people through [`PeopleSource`].

use std::path::PathBuf;

use image::RgbImage;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::identity_folder::{IdentityError, load_identity_folder};
use super::portrait::{Identity, render_set};

/// One person's portraits, each with the prompt that describes what the image shows (empty
/// when unknown, as for real photos).
#[derive(Debug, Clone)]
pub struct PersonImages {
    /// A name for reports (`synthetic-1000007`, or the photo folder's name).
    pub name: String,
    /// The portraits, all the same size.
    pub images: Vec<RgbImage>,
    /// One prompt per image.
    pub prompts: Vec<String>,
    /// The ground-truth identity parameters (synthetic people only).
    pub params: Option<Vec<f32>>,
}

/// Where a set of people comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum PeopleSource {
    /// `count` synthetic identities `Identity::random(first_seed + i)`, each drawn
    /// `images_per_person` times with random attributes (the attributes' prompt is the image's
    /// prompt).
    Synthetic {
        /// Identity seed of the first person; ranges of different roles must not overlap.
        first_seed: u64,
        /// Number of people.
        count: usize,
        /// Portraits per person.
        images_per_person: usize,
        /// Seed of the attributes and render jitter.
        #[serde(default)]
        render_seed: u64,
    },
    /// The sub-folders of an identity folder in natural order: `skip` of them are passed over,
    /// then `count` (all the rest when absent) are taken. Prompts are empty.
    Folder {
        /// The identity folder (one sub-folder per person).
        path: PathBuf,
        /// People to pass over first.
        #[serde(default)]
        skip: usize,
        /// People to take (the rest when absent).
        #[serde(default)]
        count: Option<usize>,
    },
}

impl PeopleSource {
    /// Draws or reads the people at `size`×`size` pixels.
    ///
    /// # Errors
    /// The identity folder's errors (naming the folder or file), or a folder with fewer people
    /// than asked for.
    pub fn load(&self, size: u32) -> Result<Vec<PersonImages>, IdentityError> {
        match self {
            PeopleSource::Synthetic {
                first_seed,
                count,
                images_per_person,
                render_seed,
            } => Ok((0..*count as u64)
                .into_par_iter()
                .map(|i| synthetic_person(first_seed + i, *images_per_person, size, *render_seed))
                .collect()),
            PeopleSource::Folder { path, skip, count } => {
                let people = load_identity_folder(path, size)?;
                let available = people.len().saturating_sub(*skip);
                let take = count.unwrap_or(available);
                if take == 0 || take > available {
                    return Err(IdentityError::TooFewPeople {
                        path: path.clone(),
                        asked: take,
                        skip: *skip,
                        have: people.len(),
                    });
                }
                Ok(people
                    .into_iter()
                    .skip(*skip)
                    .take(take)
                    .map(|p| PersonImages {
                        prompts: vec![String::new(); p.images.len()],
                        name: p.name,
                        images: p.images,
                        params: None,
                    })
                    .collect())
            }
        }
    }

    /// True for rendered identities (which have ground-truth parameters and prompts).
    pub fn is_synthetic(&self) -> bool {
        matches!(self, PeopleSource::Synthetic { .. })
    }
}

/// `count` portraits of the synthetic person `identity_seed` with their prompts.
pub fn synthetic_person(identity_seed: u64, count: usize, size: u32, seed: u64) -> PersonImages {
    let set = render_set(
        identity_seed,
        count,
        size,
        seed ^ identity_seed.rotate_left(17),
    );
    PersonImages {
        name: format!("synthetic-{identity_seed}"),
        prompts: set.iter().map(|(a, _)| a.prompt()).collect(),
        images: set.into_iter().map(|(_, img)| img).collect(),
        params: Some(Identity::random(identity_seed).to_vector()),
    }
}

//! How familiar a set of reference photos is to a personaliser: how far they sit from the
//! pictures of the people it was built on (its LoRA bank), against how far those people's own
//! pictures sit. A real photo given to the synthetic personaliser lands far outside what it
//! knows, and the portraits predicted from it mean little: the user is warned, with the measure.
//!
//! The measure: the bank's images span a subspace of pixel space, its leading
//! [`COMPONENTS`] principal components; a picture's distance is the root-mean-square of what
//! those components leave unexplained (pixels in `[0, 1]`), and a set's is the mean over its
//! pictures. The bank people's own sets (their first [`SET_SIZE`] pictures) give the scale: the
//! warning is raised above the farthest bank person's distance times [`MARGIN`].
//!
//! Why pixels and not the identity encoder's embeddings: on the built-in personaliser, the
//! embeddings of ORL's greyscale photos fall inside the spread of synthetic people's (their
//! distances overlap), while the pixel-space residual separates them (4-picture sets: the 192
//! held-out synthetic people 0.029–0.073, the 32 ORL people 0.081–0.165, bank people at most
//! 0.076).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor};
use image::RgbImage;
use serde::{Deserialize, Serialize};

use crate::data::people::PersonImages;
use crate::device::HOST;
use crate::fsio::{read_safetensors, write_safetensors};
use crate::peft::decompose::{mat_to_tensor, top_svd};

/// The file a personaliser keeps the statistics in (computed once from its bank people).
pub const FAMILIARITY_FILE: &str = "familiarity.safetensors";

/// Principal components kept.
pub const COMPONENTS: usize = 64;

/// Fewest bank pictures the statistics are made from: with fewer, every bank picture lies in
/// the span and nothing can be told apart (a personaliser that small gets no check).
pub const MIN_PICTURES: usize = 64;

/// Pictures per bank person in the reference scale (as many as a user typically gives).
pub const SET_SIZE: usize = 4;

/// How far past the farthest bank person a set may sit before it is called unfamiliar. 1: on
/// the built-in personaliser the gap between held-out synthetic people (at most 0.073) and real
/// photos (at least 0.081) holds the farthest bank person (0.076) and little more.
pub const MARGIN: f32 = 1.0;

const META_KEY: &str = "familiarity";

/// What the personaliser's pictures span, summarised from the bank people.
#[derive(Debug, Clone)]
pub struct FamiliarityStats {
    /// The mean picture, (S·S·3,), pixels in `[0, 1]`.
    mean: Tensor,
    /// The leading principal components as columns, (S·S·3, k).
    components: Tensor,
    /// The scale: the bank people's distances.
    scale: Scale,
}

/// The bank people's own distances.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scale {
    /// Median.
    pub known_median: f32,
    /// Largest.
    pub known_max: f32,
    /// Bank people measured.
    pub people: usize,
    /// Side of the square pictures.
    pub image_size: u32,
}

/// One reference set's distance, with the scale it is read against.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Familiarity {
    /// The set's distance from the personaliser's pictures.
    pub distance: f32,
    /// The bank people's median distance.
    pub known_median: f32,
    /// Above this the set is unfamiliar (`known_max × MARGIN`).
    pub threshold: f32,
    /// Whether the set is within the threshold.
    pub familiar: bool,
}

impl Familiarity {
    /// The warning shown when the set is unfamiliar; `None` when it is familiar.
    pub fn warning(&self) -> Option<String> {
        (!self.familiar).then(|| {
            format!(
                "these photos are unlike the pictures this personaliser was built on (distance {:.3}; its own people: median {:.3}, warning above {:.3}): the portraits will not look like them. Use a personaliser built on photos like these (README: Personalisation)",
                self.distance, self.known_median, self.threshold
            )
        })
    }
}

/// Pictures as rows (N, S·S·3) of `[0, 1]` values, on the host.
fn rows(images: &[RgbImage]) -> anyhow::Result<Tensor> {
    anyhow::ensure!(!images.is_empty(), "no pictures");
    let len = images[0].as_raw().len();
    let mut data = Vec::with_capacity(images.len() * len);
    for img in images {
        anyhow::ensure!(
            img.as_raw().len() == len,
            "the pictures differ in size ({}×{} among them)",
            img.width(),
            img.height()
        );
        data.extend(img.as_raw().iter().map(|&b| b as f32 / 255.0));
    }
    Ok(Tensor::from_vec(data, (images.len(), len), &HOST)?)
}

impl FamiliarityStats {
    /// Summarises `people` (the bank); `seed` seeds the randomised SVD.
    pub fn from_people(people: &[PersonImages], seed: u64) -> anyhow::Result<Self> {
        anyhow::ensure!(!people.is_empty(), "no people to summarise");
        let all: Vec<RgbImage> = people.iter().flat_map(|p| p.images.clone()).collect();
        anyhow::ensure!(
            all.len() >= MIN_PICTURES,
            "{} bank pictures: at least {MIN_PICTURES} are needed to tell familiar photos from others",
            all.len()
        );
        let image_size = all[0].width();
        let x = rows(&all)?;
        let mean = x.mean(0)?;
        let centred = crate::peft::decompose::tensor_to_mat(&x.broadcast_sub(&mean)?)?;
        // At most a quarter of the pictures: the span must not simply contain every one of them.
        let k = COMPONENTS.min(all.len() / 4).min(centred.ncols());
        let svd = top_svd(&centred, k, seed)?;
        let components = mat_to_tensor(svd.v.as_ref(), DType::F32, &HOST)?;
        let mut stats = Self {
            mean,
            components,
            scale: Scale {
                known_median: 0.0,
                known_max: 0.0,
                people: people.len(),
                image_size,
            },
        };
        let mut known: Vec<f32> = people
            .iter()
            .map(|p| stats.distance(&p.images[..p.images.len().min(SET_SIZE)]))
            .collect::<anyhow::Result<_>>()?;
        known.sort_by(f32::total_cmp);
        stats.scale.known_median = known[known.len() / 2];
        stats.scale.known_max = known[known.len() - 1];
        Ok(stats)
    }

    /// The scale the statistics read distances against.
    pub fn scale(&self) -> &Scale {
        &self.scale
    }

    /// The mean distance of `images` from the subspace.
    fn distance(&self, images: &[RgbImage]) -> anyhow::Result<f32> {
        let x = rows(images)?;
        anyhow::ensure!(
            x.dim(1)? == self.mean.dim(0)?,
            "the pictures are {}×{}; this personaliser's are {s}×{s}",
            images[0].width(),
            images[0].height(),
            s = self.scale.image_size
        );
        let c = x.broadcast_sub(&self.mean)?;
        let explained = c.matmul(&self.components)?.matmul(&self.components.t()?)?;
        let per_picture = (c - explained)?.sqr()?.mean(1)?.sqrt()?;
        Ok(per_picture.mean_all()?.to_scalar::<f32>()?)
    }

    /// How familiar the references `refs` are.
    pub fn measure(&self, refs: &[RgbImage]) -> anyhow::Result<Familiarity> {
        let distance = self.distance(refs)?;
        let threshold = self.scale.known_max * MARGIN;
        Ok(Familiarity {
            distance,
            known_median: self.scale.known_median,
            threshold,
            familiar: distance <= threshold,
        })
    }

    /// Reads the statistics file `path`.
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let (tensors, json) = read_safetensors(path, META_KEY, "familiarity statistics", &HOST)?;
        let scale: Scale =
            serde_json::from_str(&json).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let get = |name: &str| -> anyhow::Result<Tensor> {
            Ok(tensors
                .get(name)
                .ok_or_else(|| anyhow::anyhow!("{}: tensor `{name}` is missing", path.display()))?
                .to_dtype(DType::F32)?)
        };
        let (mean, components) = (get("mean")?, get("components")?);
        let side = scale.image_size as usize;
        anyhow::ensure!(
            mean.dims() == [side * side * 3] && components.dim(0)? == side * side * 3,
            "{}: shapes {:?} and {:?} do not fit {side}×{side} pictures",
            path.display(),
            mean.dims(),
            components.dims()
        );
        Ok(Self {
            mean,
            components,
            scale,
        })
    }

    /// Writes the statistics file `path` atomically (components in f16: plenty for a residual).
    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        write_safetensors(
            path,
            &[
                ("mean".to_string(), self.mean.clone()),
                (
                    "components".to_string(),
                    self.components.to_dtype(DType::F16)?,
                ),
            ],
            HashMap::from([(META_KEY.to_string(), serde_json::to_string(&self.scale)?)]),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// People whose pictures vary along two directions only: left/right halves brightness.
    fn striped(seed: u64, n: usize) -> PersonImages {
        let images = (0..n as u64)
            .map(|i| {
                let (a, b) = (
                    ((seed * 37 + i * 11) % 200) as u8,
                    ((seed * 53 + i * 7) % 200) as u8,
                );
                RgbImage::from_fn(8, 8, |x, _| image::Rgb(if x < 4 { [a; 3] } else { [b; 3] }))
            })
            .collect();
        PersonImages {
            name: format!("p{seed}"),
            images,
            prompts: vec![String::new(); n],
            params: None,
        }
    }

    #[test]
    fn pictures_in_the_span_are_familiar_and_others_are_not() {
        let few: Vec<PersonImages> = (0..12).map(|s| striped(s, 5)).collect();
        let err = FamiliarityStats::from_people(&few, 0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("60 bank pictures"), "{err}");
        let people: Vec<PersonImages> = (0..16).map(|s| striped(s, 5)).collect();
        let stats = FamiliarityStats::from_people(&people, 0).unwrap();
        assert!(stats.scale().known_max < 1e-3, "{:?}", stats.scale());
        let new = striped(99, 4);
        assert!(stats.measure(&new.images).unwrap().familiar);
        let noise: Vec<RgbImage> = (0..4)
            .map(|i| {
                RgbImage::from_fn(8, 8, |x, y| {
                    image::Rgb([((x * 31 + y * 17 + i * 5) % 255) as u8, 0, 90])
                })
            })
            .collect();
        let f = stats.measure(&noise).unwrap();
        assert!(!f.familiar && f.distance > 0.05, "{f:?}");
        assert!(f.warning().unwrap().contains("unlike the pictures"));
        let small = vec![RgbImage::new(4, 4)];
        let err = stats.measure(&small).unwrap_err().to_string();
        assert!(err.contains("4×4") && err.contains("8×8"), "{err}");
        let dir = std::env::temp_dir().join(format!("peft-familiarity-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(FAMILIARITY_FILE);
        stats.write(&path).unwrap();
        let back = FamiliarityStats::read(&path).unwrap();
        assert_eq!(back.scale(), stats.scale());
        let again = back.measure(&noise).unwrap();
        assert!((again.distance - f.distance).abs() < 1e-3 * f.distance.max(1.0));
        std::fs::write(&path, b"not safetensors").unwrap();
        let err = format!("{:#}", FamiliarityStats::read(&path).unwrap_err());
        assert!(err.contains(FAMILIARITY_FILE), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! The evaluation's picture of held-out people: one row per person, their references, then the
//! first image of DiffLoRA's, direct LoRA fine-tuning's and the base generator's galleries
//! (same prompt and seed), enlarged with nearest-neighbour scaling, so the three paths can be
//! compared at a glance (`eval-personalize` writes it beside its table).

use image::{Rgb, RgbImage};

use super::commands::contact_sheet;
use serde::{Deserialize, Serialize};

/// People shown in the picture (the first ones of the evaluation set).
pub const PICTURE_PEOPLE: usize = 8;

/// Enlargement of every image in the picture.
const SCALE: u32 = 3;

/// One person's row, as raw RGB bytes (it travels between evaluation processes as JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComparisonRow {
    /// Width and height of every image.
    pub side: u32,
    /// The reference images.
    pub references: Vec<Vec<u8>>,
    /// The first image of DiffLoRA's, direct fine-tuning's and the base generator's galleries.
    pub generated: [Vec<u8>; 3],
}

impl ComparisonRow {
    /// The row of `references` and the first images of the three galleries; `None` when a
    /// gallery is empty or the images differ in size.
    pub fn new(
        references: &[RgbImage],
        difflora: &[RgbImage],
        direct: &[RgbImage],
        base: &[RgbImage],
    ) -> Option<Self> {
        let first = |g: &[RgbImage]| g.first().cloned();
        let generated = [first(difflora)?, first(direct)?, first(base)?];
        let side = generated[0].width();
        let all_square = references
            .iter()
            .chain(&generated)
            .all(|i| i.width() == side && i.height() == side);
        if !all_square {
            return None;
        }
        Some(Self {
            side,
            references: references.iter().map(|i| i.as_raw().clone()).collect(),
            generated: generated.map(RgbImage::into_raw),
        })
    }

    /// One of the row's images (blank where its bytes do not fill the side).
    fn image(&self, bytes: &[u8]) -> RgbImage {
        RgbImage::from_raw(self.side, self.side, bytes.to_vec())
            .unwrap_or_else(|| RgbImage::from_pixel(self.side, self.side, Rgb([255, 255, 255])))
    }
}

/// The picture of `rows` (one person each): references | DiffLoRA | direct LoRA | base, a blank
/// cell between the references and the generated images, every image enlarged 3× on white
/// ([`contact_sheet`]). `None` without rows.
pub fn comparison_picture(rows: &[ComparisonRow]) -> Option<RgbImage> {
    let side = rows.iter().map(|r| r.side).max()?;
    let refs = rows.iter().map(|r| r.references.len()).max()?;
    let blank = RgbImage::from_pixel(side, side, Rgb([255, 255, 255]));
    let cells: Vec<Vec<RgbImage>> = rows
        .iter()
        .map(|row| {
            let mut cells: Vec<RgbImage> = row.references.iter().map(|b| row.image(b)).collect();
            cells.resize(refs + 1, blank.clone());
            cells.extend(row.generated.iter().map(|b| row.image(b)));
            cells
        })
        .collect();
    let cells: Vec<&[RgbImage]> = cells.iter().map(Vec::as_slice).collect();
    Some(contact_sheet(&cells, SCALE))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flat(side: u32, v: u8) -> RgbImage {
        RgbImage::from_pixel(side, side, Rgb([v, v, v]))
    }

    #[test]
    fn rows_place_references_then_the_three_paths_enlarged() {
        let refs = [flat(4, 10), flat(4, 20)];
        let row = ComparisonRow::new(&refs, &[flat(4, 30)], &[flat(4, 40)], &[flat(4, 50)])
            .expect("a row");
        // Survives the trip between processes.
        let row: ComparisonRow =
            serde_json::from_str(&serde_json::to_string(&row).unwrap()).unwrap();
        let pic = comparison_picture(&[row.clone(), row]).expect("a picture");
        let cell = 4 * SCALE + 4;
        assert_eq!(pic.width(), 4 + 6 * cell);
        assert_eq!(pic.height(), 4 + 2 * cell);
        let at = |x: u32, y: u32| pic.get_pixel(x, y).0[0];
        // Each image's value fills its enlarged square, in order, on both rows.
        for r in 0..2 {
            let y = 4 + r * cell + 5;
            assert_eq!(at(4 + 5, y), 10);
            assert_eq!(at(4 + cell + 5, y), 20);
            for (k, v) in [30, 40, 50].into_iter().enumerate() {
                assert_eq!(at(4 + 3 * cell + k as u32 * cell + 5, y), v);
            }
        }
        // White between the references and the generated images.
        assert_eq!(at(4 + 2 * cell + 5, 10), 255);
        // An empty gallery or mixed sizes give no row.
        assert!(ComparisonRow::new(&refs, &[], &[flat(4, 1)], &[flat(4, 1)]).is_none());
        assert!(ComparisonRow::new(&refs, &[flat(8, 1)], &[flat(8, 1)], &[flat(8, 1)]).is_none());
        assert!(comparison_picture(&[]).is_none());
    }
}

//! Real portraits with identities: one sub-folder per person.
//!
//! The layout is the one of the ORL faces (`s1/1.pgm … s32/10.pgm`) and the one the app
//! accepts for any user's own identity data set:
//!
//! ```text
//! people/
//!   alice/  1.jpg 2.png …
//!   bob/    a.pgm b.pgm …
//! ```
//!
//! Any common image format is read (PNG, JPEG, PNM/PGM, BMP, GIF, WebP, TIFF), greyscale
//! included (replicated to RGB; an alpha channel is dropped). Every image is centre-cropped to a
//! square and resized to `size`×`size` with a Lanczos filter. Hidden files and folders (names
//! starting with `.`) and files that are not images (by extension) are skipped. Nothing read
//! from disk can panic: every failure is an [`IdentityError`] naming the file or folder.

use std::cmp::Ordering;
use std::path::{Path, PathBuf};

use image::imageops::FilterType;
use image::{DynamicImage, GenericImageView, ImageReader, RgbImage};
use rayon::prelude::*;

/// Images smaller than this on either side are refused ([`IdentityError::TooSmall`]).
pub const MIN_IMAGE_SIDE: u32 = 16;

/// File extensions (lower-case) read as images: the same list as the dataset loader's.
pub use crate::data::IMAGE_EXTENSIONS;

/// One person of an identity folder.
#[derive(Debug, Clone)]
pub struct Person {
    /// The sub-folder's name (e.g. `s7`).
    pub name: String,
    /// The person's images, `size`×`size` RGB, in natural order of their file names.
    pub images: Vec<RgbImage>,
}

/// What can go wrong reading identity folders or reference photos; every case names the path.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The folder (or file) does not exist.
    #[error("not found: {}", .0.display())]
    MissingFolder(PathBuf),
    /// A folder was expected but this is a file (or something else).
    #[error("not a folder: {}", .0.display())]
    NotAFolder(PathBuf),
    /// Listing a folder or opening a file failed.
    #[error("cannot read {}: {cause}", .path.display())]
    Io {
        /// The folder or file.
        path: PathBuf,
        /// The underlying error.
        /// (Shown in the message, so not chained as a source: it would print twice.)
        cause: std::io::Error,
    },
    /// A folder (a person's sub-folder, or a folder of references) holds no images.
    #[error("no images in {}", .0.display())]
    NoImages(PathBuf),
    /// An identity folder holds no person sub-folders.
    #[error("no person sub-folders in {} (expected one sub-folder of images per person)", .0.display())]
    NoPersons(PathBuf),
    /// An identity folder holds fewer people than a configuration asks for.
    #[error("{} holds {have} people; {asked} were asked for after skipping {skip}", .path.display())]
    TooFewPeople {
        /// The identity folder.
        path: PathBuf,
        /// People asked for.
        asked: usize,
        /// People passed over first.
        skip: usize,
        /// People in the folder.
        have: usize,
    },
    /// A JPEG file cut short (decoders would fill the rest with grey).
    #[error("{}: {}", .0.display(), crate::data::TRUNCATED_JPEG)]
    Truncated(PathBuf),
    /// An image could not be decoded (corrupt, truncated, or an unsupported variant).
    #[error("cannot decode image {}: {cause}", .path.display())]
    Image {
        /// The image file.
        path: PathBuf,
        /// The decoder's error.
        /// (Shown in the message, so not chained as a source: it would print twice.)
        cause: image::ImageError,
    },
    /// An image is smaller than [`MIN_IMAGE_SIDE`] on a side.
    #[error(
        "image {} is too small: {width}×{height} (at least {min}×{min} needed)",
        .path.display(),
        min = MIN_IMAGE_SIDE
    )]
    TooSmall {
        /// The image file.
        path: PathBuf,
        /// Its width.
        width: u32,
        /// Its height.
        height: u32,
    },
    /// The requested output size is zero.
    #[error("invalid image size {0}: must be at least 1")]
    InvalidSize(u32),
}

/// Compares two names in natural order: runs of digits compare as numbers (`s2` < `s10`),
/// other text case-insensitively; ties fall back to plain byte order.
pub fn natural_cmp(a: &str, b: &str) -> Ordering {
    fn chunks(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut start = 0;
        let mut digit: Option<bool> = None;
        for (i, c) in s.char_indices() {
            let d = c.is_ascii_digit();
            if digit.is_some_and(|prev| prev != d) {
                out.push((digit == Some(true), &s[start..i]));
                start = i;
            }
            digit = Some(d);
        }
        if start < s.len() {
            out.push((digit == Some(true), &s[start..]));
        }
        out
    }
    let ca = chunks(a);
    let cb = chunks(b);
    for (x, y) in ca.iter().zip(cb.iter()) {
        let ord = match (x, y) {
            ((true, x), (true, y)) => {
                let xt = x.trim_start_matches('0');
                let yt = y.trim_start_matches('0');
                xt.len().cmp(&yt.len()).then_with(|| xt.cmp(yt))
            }
            ((_, x), (_, y)) => x.to_lowercase().cmp(&y.to_lowercase()),
        };
        if ord != Ordering::Equal {
            return ord;
        }
    }
    ca.len().cmp(&cb.len()).then_with(|| a.cmp(b))
}

fn is_hidden(name: &str) -> bool {
    name.starts_with('.') || name == "__MACOSX"
}

fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// The visible entries of a folder, `(name, path, is_dir)`, in natural order of names.
fn list_dir(dir: &Path) -> Result<Vec<(String, PathBuf, bool)>, IdentityError> {
    let io = |cause| IdentityError::Io {
        path: dir.to_path_buf(),
        cause,
    };
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if is_hidden(&name) {
            continue;
        }
        let path = entry.path();
        // `is_dir` follows symbolic links; a broken link counts as a (skipped) file.
        let is_dir = path.is_dir();
        out.push((name, path, is_dir));
    }
    out.sort_by(|a, b| natural_cmp(&a.0, &b.0));
    Ok(out)
}

/// The image files directly inside `dir`, in natural order.
fn image_files(dir: &Path) -> Result<Vec<PathBuf>, IdentityError> {
    Ok(list_dir(dir)?
        .into_iter()
        .filter(|(_, p, is_dir)| !is_dir && has_image_extension(p))
        .map(|(_, p, _)| p)
        .collect())
}

/// Reads one image and makes it a centred `size`×`size` RGB square.
fn load_square(path: &Path, size: u32) -> Result<RgbImage, IdentityError> {
    let io = |cause| IdentityError::Io {
        path: path.to_path_buf(),
        cause,
    };
    let bytes = std::fs::read(path).map_err(io)?;
    if crate::data::jpeg_is_truncated(&bytes) {
        return Err(IdentityError::Truncated(path.to_path_buf()));
    }
    let mut reader = ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(io)?;
    if reader.format().is_none()
        && let Ok(f) = image::ImageFormat::from_path(path)
    {
        reader.set_format(f);
    }
    let img = reader.decode().map_err(|cause| IdentityError::Image {
        path: path.to_path_buf(),
        cause,
    })?;
    square(&img, size, path)
}

fn square(img: &DynamicImage, size: u32, path: &Path) -> Result<RgbImage, IdentityError> {
    let (w, h) = img.dimensions();
    if w < MIN_IMAGE_SIDE || h < MIN_IMAGE_SIDE {
        return Err(IdentityError::TooSmall {
            path: path.to_path_buf(),
            width: w,
            height: h,
        });
    }
    let side = w.min(h);
    let mut crop = img.crop_imm((w - side) / 2, (h - side) / 2, side, side);
    // Very large photos: shrink with an area filter first (fast), then finish with Lanczos.
    if side > size.saturating_mul(4) {
        let mid = size.saturating_mul(2);
        crop = crop.thumbnail_exact(mid, mid);
    }
    let rgb = crop.to_rgb8();
    if rgb.width() == size && rgb.height() == size {
        return Ok(rgb);
    }
    Ok(image::imageops::resize(
        &rgb,
        size,
        size,
        FilterType::Lanczos3,
    ))
}

/// Loads an identity folder: one sub-folder per person, each holding that person's images.
///
/// Persons are sorted in natural order of their folder names (`s2` before `s10`), images in
/// natural order of their file names; every image becomes `size`×`size` RGB (centre-cropped
/// square, Lanczos resize, greyscale replicated). Files at the top level and hidden entries are
/// ignored; inside a person's folder, files without an image extension and sub-folders are
/// ignored.
///
/// # Errors
/// [`IdentityError::MissingFolder`] / [`IdentityError::NotAFolder`] for a bad `path`;
/// [`IdentityError::NoPersons`] when it has no sub-folders; [`IdentityError::NoImages`] naming
/// a person's folder without images; [`IdentityError::Image`] for a corrupt image and
/// [`IdentityError::TooSmall`] for one under [`MIN_IMAGE_SIDE`] pixels on a side (both name the
/// file); [`IdentityError::Io`] when reading fails; [`IdentityError::InvalidSize`] for
/// `size == 0`.
pub fn load_identity_folder(path: &Path, size: u32) -> Result<Vec<Person>, IdentityError> {
    if size == 0 {
        return Err(IdentityError::InvalidSize(size));
    }
    check_folder(path)?;
    let mut people: Vec<(String, Vec<PathBuf>)> = Vec::new();
    for (name, dir, is_dir) in list_dir(path)? {
        if !is_dir {
            continue;
        }
        let files = image_files(&dir)?;
        if files.is_empty() {
            return Err(IdentityError::NoImages(dir));
        }
        people.push((name, files));
    }
    if people.is_empty() {
        return Err(IdentityError::NoPersons(path.to_path_buf()));
    }
    let jobs: Vec<(usize, &PathBuf)> = people
        .iter()
        .enumerate()
        .flat_map(|(i, (_, files))| files.iter().map(move |f| (i, f)))
        .collect();
    let loaded: Vec<Result<RgbImage, IdentityError>> =
        jobs.par_iter().map(|(_, f)| load_square(f, size)).collect();
    let mut out: Vec<Person> = people
        .iter()
        .map(|(name, files)| Person {
            name: name.clone(),
            images: Vec::with_capacity(files.len()),
        })
        .collect();
    // The first error in file order wins, so the reported file is deterministic.
    for ((i, _), img) in jobs.iter().zip(loaded) {
        out[*i].images.push(img?);
    }
    Ok(out)
}

/// Loads one person's reference photos: every image directly inside the folder `path`
/// (natural order; hidden files, non-images and sub-folders skipped), or the single image
/// `path` when it is a file (read whatever its extension). Each becomes `size`×`size` RGB as in
/// [`load_identity_folder`].
///
/// # Errors
/// [`IdentityError::MissingFolder`] when `path` does not exist, [`IdentityError::NoImages`]
/// for a folder without images, and the per-image errors of [`load_identity_folder`].
pub fn load_references(path: &Path, size: u32) -> Result<Vec<RgbImage>, IdentityError> {
    if size == 0 {
        return Err(IdentityError::InvalidSize(size));
    }
    if !path.exists() {
        return Err(IdentityError::MissingFolder(path.to_path_buf()));
    }
    if !path.is_dir() {
        return Ok(vec![load_square(path, size)?]);
    }
    let files = image_files(path)?;
    if files.is_empty() {
        return Err(IdentityError::NoImages(path.to_path_buf()));
    }
    files
        .par_iter()
        .map(|f| load_square(f, size))
        .collect::<Vec<_>>()
        .into_iter()
        .collect()
}

fn check_folder(path: &Path) -> Result<(), IdentityError> {
    if !path.exists() {
        return Err(IdentityError::MissingFolder(path.to_path_buf()));
    }
    if !path.is_dir() {
        return Err(IdentityError::NotAFolder(path.to_path_buf()));
    }
    Ok(())
}

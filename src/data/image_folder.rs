//! A folder holding one sub-folder of images per class.

use std::path::{Path, PathBuf};

use image::imageops::{self, FilterType};
use image::{ImageBuffer, ImageReader, Pixel};

use super::{DataError, ImageSet};

/// File extensions (lower case) read as images.
pub const IMAGE_EXTENSIONS: &[&str] = &[
    "png", "jpg", "jpeg", "pgm", "pbm", "ppm", "pnm", "pam", "bmp", "gif", "webp", "tif", "tiff",
];

/// The images of a folder, with the class names (the sub-folder names, sorted).
pub(crate) struct Folder {
    pub classes: Vec<String>,
    pub images: ImageSet,
}

fn is_hidden(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_none_or(|n| n.starts_with('.'))
}

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

fn list_dir(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let io = |e: std::io::Error| DataError::Io {
        path: dir.to_path_buf(),
        message: e.to_string(),
    };
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        if !is_hidden(&path) {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

/// Lists (class name, image files) per class, checking that every class has images.
fn scan(root: &Path) -> Result<Vec<(String, Vec<PathBuf>)>, DataError> {
    if !root.exists() {
        return Err(DataError::NotFound {
            path: root.to_path_buf(),
            what: "image folder".into(),
        });
    }
    if !root.is_dir() {
        return Err(DataError::InvalidConfig {
            field: "source.path".into(),
            message: format!(
                "{} is not a folder (an image folder holds one sub-folder per class)",
                root.display()
            ),
        });
    }
    let mut classes = Vec::new();
    for dir in list_dir(root)?.into_iter().filter(|p| p.is_dir()) {
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let files: Vec<PathBuf> = list_dir(&dir)?
            .into_iter()
            .filter(|p| p.is_file() && is_image(p))
            .collect();
        if files.is_empty() {
            return Err(DataError::EmptyClass {
                path: dir,
                extensions: IMAGE_EXTENSIONS.join(", "),
            });
        }
        classes.push((name, files));
    }
    if classes.is_empty() {
        return Err(DataError::Empty {
            what: root.display().to_string(),
            message: "no class sub-folders (put the images of each class in a sub-folder named \
                      after the class)"
                .into(),
        });
    }
    Ok(classes)
}

fn decode(path: &Path) -> Result<image::DynamicImage, DataError> {
    let err = |message: String| DataError::Image {
        path: path.to_path_buf(),
        message,
    };
    let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    if jpeg_is_truncated(&bytes) {
        return Err(err(TRUNCATED_JPEG.into()));
    }
    let mut reader = ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| err(e.to_string()))?;
    if reader.format().is_none()
        && let Ok(f) = image::ImageFormat::from_path(path)
    {
        reader.set_format(f);
    }
    reader.decode().map_err(|e| err(e.to_string()))
}

/// What a truncated JPEG is reported as.
pub(crate) const TRUNCATED_JPEG: &str =
    "the JPEG file is truncated (it ends before its end-of-image marker); re-export or remove it";

/// Whether `bytes` are a JPEG cut short: no end-of-image marker (FF D9) after its last
/// start-of-scan (FF DA). Decoders fill the missing part with grey without complaint.
/// (Inside the scan data a 0xFF byte is always followed by 0x00 or a restart marker, so FF D9
/// there is the real end; an embedded thumbnail's markers come before the main scan.)
pub(crate) fn jpeg_is_truncated(bytes: &[u8]) -> bool {
    if !bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        return false;
    }
    let Some(sos) = bytes.windows(2).rposition(|w| w == [0xFF, 0xDA]) else {
        return true;
    };
    !bytes[sos..].windows(2).any(|w| w == [0xFF, 0xD9])
}

/// Centre-crops `img` to the aspect ratio `th:tw`, then resizes it to `th`×`tw` (Triangle).
fn fit<P>(img: ImageBuffer<P, Vec<u8>>, th: u32, tw: u32) -> ImageBuffer<P, Vec<u8>>
where
    P: Pixel<Subpixel = u8> + 'static,
{
    let (w, h) = img.dimensions();
    if (w, h) == (tw, th) {
        return img;
    }
    // Crop to the target aspect ratio: compare w/h with tw/th in integers.
    let (cw, ch) = if (w as u64) * (th as u64) > (h as u64) * (tw as u64) {
        // Too wide.
        let cw = ((h as u64 * tw as u64 + th as u64 / 2) / th as u64).clamp(1, w as u64) as u32;
        (cw, h)
    } else {
        let ch = ((w as u64 * th as u64 + tw as u64 / 2) / tw as u64).clamp(1, h as u64) as u32;
        (w, ch)
    };
    let (x, y) = ((w - cw) / 2, (h - ch) / 2);
    let cropped = imageops::crop_imm(&img, x, y, cw, ch);
    if (cw, ch) == (tw, th) {
        cropped.to_image()
    } else {
        imageops::resize(&*cropped, tw, th, FilterType::Triangle)
    }
}

/// One image as C×H×W bytes.
fn to_planar(img: image::DynamicImage, grayscale: bool, th: u32, tw: u32) -> Vec<u8> {
    if grayscale {
        fit(img.to_luma8(), th, tw).into_raw()
    } else {
        let rgb = fit(img.to_rgb8(), th, tw).into_raw();
        let plane = (th as usize) * (tw as usize);
        let mut out = vec![0u8; 3 * plane];
        for (i, px) in rgb.chunks_exact(3).enumerate() {
            out[i] = px[0];
            out[plane + i] = px[1];
            out[2 * plane + i] = px[2];
        }
        out
    }
}

/// Decodes, converts and resizes one image; a decoder panic becomes an error naming the file.
fn convert_one(path: &Path, grayscale: bool, th: u32, tw: u32) -> Result<Vec<u8>, DataError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        decode(path).map(|img| to_planar(img, grayscale, th, tw))
    }))
    .unwrap_or_else(|_| {
        Err(DataError::Image {
            path: path.to_path_buf(),
            message: "the image decoder crashed on this file".into(),
        })
    })
}

/// Decodes, converts and resizes every image, using all cores, keeping the file order.
fn convert_all(
    files: &[(PathBuf, u32)],
    grayscale: bool,
    th: u32,
    tw: u32,
) -> Result<Vec<Vec<u8>>, DataError> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 16);
    let chunk = files.len().div_ceil(threads).max(1);
    let results: Vec<Result<Vec<Vec<u8>>, DataError>> = std::thread::scope(|s| {
        let handles: Vec<_> = files
            .chunks(chunk)
            .map(|part| {
                s.spawn(move || {
                    part.iter()
                        .map(|(p, _)| convert_one(p, grayscale, th, tw))
                        .collect::<Result<Vec<_>, _>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(DataError::Image {
                        path: PathBuf::from("<image decoder>"),
                        message: "the image decoder panicked".into(),
                    })
                })
            })
            .collect()
    });
    let mut out = Vec::with_capacity(files.len());
    for r in results {
        out.extend(r?);
    }
    Ok(out)
}

/// Largest image side the loader resizes to.
pub const MAX_SIDE: u32 = 4096;

/// Loads an image folder: class names are the sorted sub-folder names (hidden ones skipped);
/// every image is converted to 1 (grey) or 3 (RGB) channels, centre-cropped to the target
/// aspect ratio and resized to `size` = [height, width] or, without it, to the first image's size.
pub(crate) fn load(
    root: &Path,
    size: Option<[u32; 2]>,
    grayscale: bool,
) -> Result<Folder, DataError> {
    if let Some([h, w]) = size
        && !((1..=MAX_SIDE).contains(&h) && (1..=MAX_SIDE).contains(&w))
    {
        return Err(DataError::InvalidConfig {
            field: "source.size".into(),
            message: format!("[{h}, {w}]: height and width must be between 1 and {MAX_SIDE}"),
        });
    }
    let classes = scan(root)?;
    let files: Vec<(PathBuf, u32)> = classes
        .iter()
        .enumerate()
        .flat_map(|(c, (_, fs))| fs.iter().map(move |f| (f.clone(), c as u32)))
        .collect();
    let [th, tw] = match size {
        Some(s) => s,
        None => {
            // `scan` guarantees at least one file.
            let first = &files[0].0;
            let (w, h) = ImageReader::open(first)
                .and_then(|r| r.with_guessed_format())
                .map_err(|e| e.to_string())
                .and_then(|r| r.into_dimensions().map_err(|e| e.to_string()))
                .map_err(|message| DataError::Image {
                    path: first.clone(),
                    message,
                })?;
            [h, w]
        }
    };
    let channels: u64 = if grayscale { 1 } else { 3 };
    let bytes = (files.len() as u64)
        .saturating_mul(channels)
        .saturating_mul(u64::from(th))
        .saturating_mul(u64::from(tw));
    if th > MAX_SIDE || tw > MAX_SIDE || crate::memory::available_bytes().is_some_and(|a| bytes > a)
    {
        return Err(DataError::InvalidConfig {
            field: "source.size".into(),
            message: format!(
                "{} images at {th}×{tw} would take {:.1} GiB (sides up to {MAX_SIDE}, within the memory available); set a smaller size = [height, width]",
                files.len(),
                crate::memory::gib(bytes)
            ),
        });
    }
    let images = convert_all(&files, grayscale, th, tw)?;
    let channels = if grayscale { 1 } else { 3 };
    let mut pixels = Vec::with_capacity(images.len() * channels * (th as usize) * (tw as usize));
    for im in images {
        pixels.extend_from_slice(&im);
    }
    Ok(Folder {
        classes: classes.into_iter().map(|(n, _)| n).collect(),
        images: ImageSet {
            channels,
            height: th as usize,
            width: tw as usize,
            pixels,
            labels: files.iter().map(|(_, c)| *c).collect(),
        },
    })
}

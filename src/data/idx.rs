//! IDX files (the MNIST format), plain or gzip-compressed.
//!
//! An IDX file is a big-endian header — two zero bytes, a type byte (0x08: unsigned byte), the
//! number of dimensions, then one u32 per dimension — followed by the data. Only unsigned-byte
//! images (idx3, magic 0x00000803) and labels (idx1, magic 0x00000801) are read here.

use std::io::Read;
use std::path::Path;

use flate2::read::MultiGzDecoder;

use super::{DataError, read_file};

/// Magic number of an idx3 unsigned-byte file (images).
pub const IDX3_UBYTE_MAGIC: u32 = 0x0000_0803;
/// Magic number of an idx1 unsigned-byte file (labels).
pub const IDX1_UBYTE_MAGIC: u32 = 0x0000_0801;

/// Images read from an idx3 file: `count` greyscale images of `height`×`width` bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct IdxImages {
    /// Number of images.
    pub count: usize,
    /// Rows per image.
    pub height: usize,
    /// Columns per image.
    pub width: usize,
    /// `count·height·width` bytes, image after image, row-major.
    pub pixels: Vec<u8>,
}

/// Reads a file whole, inflating it when it starts with the gzip magic bytes (1f 8b),
/// whatever its extension.
pub(crate) fn read_maybe_gzip(path: &Path, what: &str) -> Result<Vec<u8>, DataError> {
    let raw = read_file(path, what)?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        // Half the memory available: a gzip bomb is an error, not an abort.
        let limit = crate::memory::available_bytes().map_or(4 << 30, |a| a / 2);
        let mut out = Vec::with_capacity(raw.len().saturating_mul(4));
        MultiGzDecoder::new(raw.as_slice())
            .take(limit.saturating_add(1))
            .read_to_end(&mut out)
            .map_err(|e| DataError::Gzip {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        if out.len() as u64 > limit {
            return Err(DataError::Gzip {
                path: path.to_path_buf(),
                message: format!(
                    "inflates to more than {:.1} GiB, half the memory available",
                    crate::memory::gib(limit)
                ),
            });
        }
        Ok(out)
    } else {
        Ok(raw)
    }
}

fn describe_magic(magic: u32) -> String {
    match magic {
        IDX3_UBYTE_MAGIC => "this is an idx3 image file".into(),
        IDX1_UBYTE_MAGIC => "this is an idx1 label file".into(),
        m if m >> 16 == 0 && (m >> 8) & 0xff != 0x08 => format!(
            "this IDX file holds data of type 0x{:02x}; only unsigned bytes (0x08) are supported",
            (m >> 8) & 0xff
        ),
        m if m >> 16 == 0 => format!("this IDX file has {} dimension(s)", m & 0xff),
        _ => "this is not an IDX file: its first two bytes must be zero".into(),
    }
}

/// Parses the header of `data`: checks the magic, returns the dimensions and the payload.
fn parse<'a>(
    path: &Path,
    data: &'a [u8],
    expected: u32,
    kind: &str,
) -> Result<(Vec<usize>, &'a [u8]), DataError> {
    if data.len() < 4 {
        return Err(DataError::IdxShape {
            path: path.to_path_buf(),
            message: format!(
                "the file holds {} byte(s), too few for an IDX header",
                data.len()
            ),
        });
    }
    let magic = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
    if magic != expected {
        return Err(DataError::IdxMagic {
            path: path.to_path_buf(),
            kind: kind.into(),
            expected,
            found: magic,
            hint: describe_magic(magic),
        });
    }
    let ndims = (magic & 0xff) as usize;
    let header = 4 + 4 * ndims;
    if data.len() < header {
        return Err(DataError::IdxShape {
            path: path.to_path_buf(),
            message: format!(
                "truncated header: {ndims} dimension(s) need {header} bytes, the file holds {}",
                data.len()
            ),
        });
    }
    let dims: Vec<usize> = (0..ndims)
        .map(|d| {
            let o = 4 + 4 * d;
            u32::from_be_bytes([data[o], data[o + 1], data[o + 2], data[o + 3]]) as usize
        })
        .collect();
    let payload = &data[header..];
    let expected_len = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| DataError::IdxShape {
            path: path.to_path_buf(),
            message: format!("dimensions {dims:?} overflow"),
        })?;
    if payload.len() != expected_len {
        let shape = dims
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join("×");
        return Err(DataError::IdxShape {
            path: path.to_path_buf(),
            message: format!(
                "the header declares {shape} = {expected_len} data bytes, but the file holds {} \
                 ({})",
                payload.len(),
                if payload.len() < expected_len {
                    "truncated"
                } else {
                    "trailing bytes"
                }
            ),
        });
    }
    Ok((dims, payload))
}

/// Reads an idx3 unsigned-byte image file (N×H×W), plain or gzip.
pub fn read_idx_images(path: &Path) -> Result<IdxImages, DataError> {
    let data = read_maybe_gzip(path, "IDX image file")?;
    let (dims, payload) = parse(path, &data, IDX3_UBYTE_MAGIC, "idx3 image")?;
    let (count, height, width) = (dims[0], dims[1], dims[2]);
    if count == 0 {
        return Err(DataError::Empty {
            what: path.display().to_string(),
            message: "the IDX file holds no images".into(),
        });
    }
    if height == 0 || width == 0 {
        return Err(DataError::IdxShape {
            path: path.to_path_buf(),
            message: format!("images of {height}×{width} pixels"),
        });
    }
    Ok(IdxImages {
        count,
        height,
        width,
        pixels: payload.to_vec(),
    })
}

/// Reads an idx1 unsigned-byte label file, plain or gzip.
pub fn read_idx_labels(path: &Path) -> Result<Vec<u8>, DataError> {
    let data = read_maybe_gzip(path, "IDX label file")?;
    let (_, payload) = parse(path, &data, IDX1_UBYTE_MAGIC, "idx1 label")?;
    if payload.is_empty() {
        return Err(DataError::Empty {
            what: path.display().to_string(),
            message: "the IDX file holds no labels".into(),
        });
    }
    Ok(payload.to_vec())
}

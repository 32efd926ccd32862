//! Files on disk, written so that a killed process never leaves a half-written one behind:
//! [`write_atomic`] (a temporary file beside the target, then a rename), the safetensors
//! helpers ([`write_safetensors`], [`read_safetensors`]), SHA-256 [`FileDigest`]s that let a
//! reader tell a damaged file from a good one, and [`fault_point`], the test hook that makes
//! the process abort at a named point (`PEFT_STUDIO_FAULT_AT`) so the fault tests can kill it
//! inside a save.
//!
//! Errors are [`FsError`]s, each naming its file.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{Device, Tensor};

use crate::device::HOST;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Why a file could not be written, read or trusted. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The operating system refused (missing, no permission, disk full …).
    #[error("{}: {error}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause (kept out of the error chain so it is printed once).
        error: std::io::Error,
    },
    /// The file exists but its contents are not what they should be.
    #[error("{}: {reason}", path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

impl FsError {
    /// The file at fault.
    pub fn path(&self) -> &Path {
        match self {
            FsError::Io { path, .. } | FsError::Format { path, .. } => path,
        }
    }

    /// What went wrong, without the file's name (for callers that name the file themselves).
    pub fn reason(&self) -> String {
        match self {
            FsError::Io { error, .. } => error.to_string(),
            FsError::Format { reason, .. } => reason.clone(),
        }
    }

    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> FsError + '_ {
        move |error| FsError::Io {
            path: path.to_path_buf(),
            error,
        }
    }

    fn format(path: &Path, reason: impl Into<String>) -> FsError {
        FsError::Format {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
}

/// Shorthand for results of this module.
pub type Result<T, E = FsError> = std::result::Result<T, E>;

/// The temporary file [`write_atomic`] writes before renaming it over `path`: unique per
/// process, so two writers never share one.
pub fn temp_path(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(format!(".tmp{}", std::process::id()));
    path.with_file_name(name)
}

/// Writes `bytes` to `path` atomically: a temporary file beside it (flushed to the disk), then
/// a rename. A reader sees the old contents or the new ones, never a mix. Errors name `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_path(path);
    let written =
        std::fs::File::create(&tmp).and_then(|mut f| f.write_all(bytes).and_then(|_| f.sync_all()));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(FsError::io(path)(e));
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    fault_point(&format!("write-atomic:{name}"));
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        FsError::io(path)(e)
    })
}

/// Reads a whole file; the error names it.
pub fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(FsError::io(path))
}

/// Reads a whole text file; the error names it.
pub fn read_to_string(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(FsError::io(path))
}

/// Creates a folder and its parents; the error names it.
pub fn create_dir_all(path: &Path) -> Result<()> {
    std::fs::create_dir_all(path).map_err(FsError::io(path))
}

/// Removes a folder and everything in it; a folder that is not there is no error.
pub fn remove_dir_all(path: &Path) -> Result<()> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(FsError::io(path)(e)),
        _ => Ok(()),
    }
}

/// Renames `from` to `to`; the error names both.
pub fn rename(from: &Path, to: &Path) -> Result<()> {
    std::fs::rename(from, to).map_err(|error| FsError::Io {
        path: from.to_path_buf(),
        error: std::io::Error::new(
            error.kind(),
            format!("cannot rename to {}: {error}", to.display()),
        ),
    })
}

/// The size and SHA-256 of a file as written, recorded beside it so a reader can tell a
/// damaged file (flipped bytes, cut short) from the one that was written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    /// Size in bytes.
    pub bytes: u64,
    /// SHA-256 of the contents, lowercase hex.
    pub sha256: String,
}

impl FileDigest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        let hash = Sha256::digest(bytes);
        Self {
            bytes: bytes.len() as u64,
            sha256: hash.iter().map(|b| format!("{b:02x}")).collect(),
        }
    }

    /// Checks that `bytes`, read from `path`, are the ones this digest was taken of.
    pub fn verify(&self, path: &Path, bytes: &[u8]) -> Result<()> {
        if bytes.len() as u64 != self.bytes {
            return Err(FsError::format(
                path,
                format!(
                    "damaged: {} bytes, but {} were written (cut short or overwritten)",
                    bytes.len(),
                    self.bytes
                ),
            ));
        }
        let found = Self::of(bytes);
        if found.sha256 != self.sha256 {
            return Err(FsError::format(
                path,
                format!(
                    "damaged: its SHA-256 is {}…, but {}… was recorded when it was written (the contents changed)",
                    &found.sha256[..12],
                    self.sha256.get(..12).unwrap_or(&self.sha256)
                ),
            ));
        }
        Ok(())
    }
}

/// The bytes of a safetensors file holding `tensors` (moved to the CPU, made contiguous) and
/// string `metadata`; `path` only names the file in errors.
pub fn safetensors_bytes(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: HashMap<String, String>,
) -> Result<Vec<u8>> {
    let cpu: Vec<(&str, Tensor)> = tensors
        .iter()
        .map(|(n, t)| Ok((n.as_str(), t.to_device(&HOST)?.contiguous()?)))
        .collect::<candle_core::Result<_>>()
        .map_err(|e| FsError::format(path, format!("cannot gather the tensors: {e}")))?;
    let meta = (!metadata.is_empty()).then_some(metadata);
    safetensors::serialize(cpu.iter().map(|(n, t)| (*n, t)), meta)
        .map_err(|e| FsError::format(path, format!("cannot serialise the tensors: {e}")))
}

/// Writes `tensors` and string `metadata` to the safetensors file `path` atomically.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: HashMap<String, String>,
) -> Result<()> {
    write_safetensors_digest(path, tensors, metadata).map(|_| ())
}

/// [`write_safetensors`], returning the written file's digest.
pub fn write_safetensors_digest(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: HashMap<String, String>,
) -> Result<FileDigest> {
    let bytes = safetensors_bytes(path, tensors, metadata)?;
    let digest = FileDigest::of(&bytes);
    write_atomic(path, &bytes)?;
    Ok(digest)
}

/// Parses the bytes of a safetensors file read from `path` into tensors on `device`.
pub fn parse_safetensors(
    path: &Path,
    bytes: &[u8],
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| FsError::format(path, format!("not a safetensors file: {e}")))?;
    candle_core::safetensors::load_buffer(bytes, device)
        .map_err(|e| FsError::format(path, format!("cannot read the tensors: {e}")))
}

/// Reads the safetensors file `path`: its tensors on `device` and the metadata value under
/// `key` (`what` names the expected kind of file in the error).
pub fn read_safetensors(
    path: &Path,
    key: &str,
    what: &str,
    device: &Device,
) -> Result<(HashMap<String, Tensor>, String)> {
    let bytes = read(path)?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| FsError::format(path, format!("not a safetensors file: {e}")))?;
    let value = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get(key))
        .cloned()
        .ok_or_else(|| FsError::format(path, format!("no `{key}` metadata: not a saved {what}")))?;
    let tensors = parse_safetensors(path, &bytes, device)?;
    Ok((tensors, value))
}

/// The environment variable naming the [`fault_point`] at which the process aborts.
pub const FAULT_ENV: &str = "PEFT_STUDIO_FAULT_AT";

/// Test hook: when `PEFT_STUDIO_FAULT_AT` is `name` (or `name@n`, the n-th time the point is
/// reached), the process aborts here at once, as if killed: no destructor runs, no buffer is
/// flushed. The fault tests use it to stop a save between any two of its operations. Without
/// the variable this is one load of a cached value.
pub fn fault_point(name: &str) {
    static TARGET: OnceLock<Option<(String, usize)>> = OnceLock::new();
    static HITS: AtomicUsize = AtomicUsize::new(0);
    let target = TARGET.get_or_init(|| {
        let v = std::env::var(FAULT_ENV).ok()?;
        Some(match v.rsplit_once('@') {
            Some((n, k)) => (n.to_string(), k.parse().unwrap_or(1)),
            None => (v, 1),
        })
    });
    if let Some((point, nth)) = target
        && point == name
        && HITS.fetch_add(1, Ordering::SeqCst) + 1 == *nth
    {
        eprintln!("{FAULT_ENV}: aborting at `{name}`");
        std::process::abort();
    }
}

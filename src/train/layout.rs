//! What a run folder holds, by name, and the lock that keeps two processes out of one.
//!
//! [`RunLayout`] is the one place that knows the file names of `runs/<id>/`; everything else
//! asks it for paths. [`RunLock`] is an exclusive lock on the folder's `run.lock` (released by
//! the operating system when its process ends, however it ends), holding the owner's pid so a
//! refused process can say who has the folder.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// `config.toml`: exactly what ran.
pub const CONFIG_FILE: &str = "config.toml";
/// `metrics.jsonl`: one line per step and evaluation.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// `summary.json`: the [`RunSummary`](super::RunSummary).
pub const SUMMARY_FILE: &str = "summary.json";
/// `adapter/`: the trained adapter and head (a PEFT-style folder).
pub const ADAPTER_DIR: &str = "adapter";
/// `model/`: the fully fine-tuned model (a Hugging Face folder).
pub const MODEL_DIR: &str = "model";
/// `head/`: the trained head (head-only runs).
pub const HEAD_DIR: &str = "head";
/// The head's weights inside [`HEAD_DIR`].
pub const HEAD_FILE: &str = "head.safetensors";
/// The weights inside [`MODEL_DIR`].
pub const MODEL_WEIGHTS_FILE: &str = "model.safetensors";
/// The Hugging Face config inside [`MODEL_DIR`].
pub const MODEL_CONFIG_FILE: &str = "config.json";
/// `checkpoint/`: the latest resumable state (see [`super::checkpoint`]).
pub const CHECKPOINT_DIR: &str = "checkpoint";
/// `run.lock`: held by the process training the run.
pub const LOCK_FILE: &str = "run.lock";

/// The paths of one run folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunLayout {
    root: PathBuf,
}

impl RunLayout {
    /// The run folder `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The folder itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The run's id: its folder's name.
    pub fn id(&self) -> Option<String> {
        self.root
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
    }

    /// `config.toml`.
    pub fn config(&self) -> PathBuf {
        self.root.join(CONFIG_FILE)
    }

    /// `metrics.jsonl`.
    pub fn metrics(&self) -> PathBuf {
        self.root.join(METRICS_FILE)
    }

    /// `summary.json`.
    pub fn summary(&self) -> PathBuf {
        self.root.join(SUMMARY_FILE)
    }

    /// `adapter/`.
    pub fn adapter(&self) -> PathBuf {
        self.root.join(ADAPTER_DIR)
    }

    /// `model/`.
    pub fn model(&self) -> PathBuf {
        self.root.join(MODEL_DIR)
    }

    /// `head/`.
    pub fn head(&self) -> PathBuf {
        self.root.join(HEAD_DIR)
    }

    /// `checkpoint/`, or its save-in-progress siblings: `checkpoint.tmp/` (`suffix` "tmp") and
    /// `checkpoint.old/` ("old").
    pub fn checkpoint(&self, suffix: Option<&str>) -> PathBuf {
        match suffix {
            None => self.root.join(CHECKPOINT_DIR),
            Some(s) => self.root.join(format!("{CHECKPOINT_DIR}.{s}")),
        }
    }

    /// `run.lock`.
    pub fn lock(&self) -> PathBuf {
        self.root.join(LOCK_FILE)
    }
}

/// Why a run folder could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process trains the run.
    #[error(
        "{}: another peft-studio process (pid {pid}) is training this run; wait for it to end or stop it first",
        folder.display()
    )]
    Busy {
        /// The run folder.
        folder: PathBuf,
        /// The other process, as it recorded itself (`?` if unknown).
        pid: String,
    },
    /// The lock file could not be opened or written.
    #[error("{}: cannot lock the run folder: {error}", path.display())]
    Io {
        /// The lock file.
        path: PathBuf,
        /// The cause.
        error: std::io::Error,
    },
}

/// An exclusive lock on a run folder, held until dropped (or the process ends).
#[derive(Debug)]
pub struct RunLock {
    _file: File,
}

impl RunLock {
    /// Locks the run folder of `layout`, or says which process holds it.
    pub fn acquire(layout: &RunLayout) -> Result<Self, LockError> {
        let path = layout.lock();
        let io = |error| LockError::Io {
            path: path.clone(),
            error,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                let pid = pid.trim();
                return Err(LockError::Busy {
                    folder: layout.root().to_path_buf(),
                    pid: if pid.is_empty() { "?" } else { pid }.to_string(),
                });
            }
            Err(TryLockError::Error(e)) => return Err(io(e)),
        }
        file.set_len(0)
            .and_then(|_| file.rewind())
            .and_then(|_| write!(file, "{}", std::process::id()))
            .and_then(|_| file.flush())
            .map_err(io)?;
        Ok(Self { _file: file })
    }

    /// Whether a process (this one included) trains the run now: its lock is held. A run
    /// whose summary says `running` but whose lock is free was interrupted.
    pub fn is_held(layout: &RunLayout) -> bool {
        let Ok(file) = File::open(layout.lock()) else {
            return false;
        };
        matches!(file.try_lock(), Err(TryLockError::WouldBlock))
    }
}

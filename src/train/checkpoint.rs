//! A run's resumable state, `checkpoint/`: `state.safetensors` (the trainable values and the
//! optimiser's moments) and `state.json` ([`CheckpointMeta`]: the step, the optimiser step
//! counts, the training seconds, and the size and SHA-256 of `state.safetensors`).
//!
//! A save writes `checkpoint.tmp/` in full (`state.json` last), then swaps it in by two renames
//! (`checkpoint/` → `checkpoint.old/`, `checkpoint.tmp/` → `checkpoint/`) and removes the old
//! one. A kill at any instant leaves at least one complete copy among the three folders;
//! [`load`] verifies every one present, takes the newest that passes and puts it back in
//! place as `checkpoint/`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::layout::RunLayout;
use crate::device::HOST;
use crate::fsio::{self, FileDigest, FsError, fault_point};

/// The tensors of a checkpoint.
pub const STATE_FILE: &str = "state.safetensors";
/// The metadata of a checkpoint.
pub const META_FILE: &str = "state.json";

/// `state.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    /// Optimiser steps done when it was written.
    pub step: usize,
    /// Steps the run plans (absent in checkpoints of older versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_steps: Option<usize>,
    /// Steps of each parameter group's optimiser (each equals `step`).
    pub optimizer_steps: Vec<usize>,
    /// Seconds spent in training steps so far.
    pub train_secs: f64,
    /// Size and SHA-256 of each file beside it (absent in checkpoints of older versions).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub files: BTreeMap<String, FileDigest>,
}

/// A checkpoint read back and verified.
#[derive(Debug)]
pub struct Checkpoint {
    /// Its metadata.
    pub meta: CheckpointMeta,
    /// Its tensors, by name.
    pub tensors: HashMap<String, Tensor>,
    /// The `state.safetensors` it was read from (for error messages).
    pub state_path: PathBuf,
}

fn bad(path: &Path, reason: impl Into<String>) -> FsError {
    FsError::Format {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// A whole, non-negative number at `field` of `v` (`what` names it in the message).
fn count(path: &Path, v: &Value, what: &str) -> Result<usize, FsError> {
    match v {
        Value::Null => Err(bad(path, format!("`{what}` is missing"))),
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                usize::try_from(u).map_err(|_| bad(path, format!("`{what}` is {u}: too large")))
            } else if n.as_i64().is_some_and(|i| i < 0) || n.as_f64().is_some_and(|f| f < 0.0) {
                Err(bad(
                    path,
                    format!("`{what}` is {n}: a step count cannot be negative"),
                ))
            } else {
                Err(bad(path, format!("`{what}` is {n}: not a whole number")))
            }
        }
        other => Err(bad(
            path,
            format!("`{what}` is {other}: not a whole number"),
        )),
    }
}

impl CheckpointMeta {
    /// Parses `state.json` (read from `path`) of a run planning `total_steps` steps, checking
    /// every field; errors name the file and the field.
    pub fn parse(path: &Path, text: &str, total_steps: usize) -> Result<Self, FsError> {
        let v: Value =
            serde_json::from_str(text).map_err(|e| bad(path, format!("not valid JSON: {e}")))?;
        if !v.is_object() {
            return Err(bad(path, "not a JSON object"));
        }
        let step = count(path, &v["step"], "step")?;
        if step > total_steps {
            return Err(bad(
                path,
                format!(
                    "`step` is {step} > total {total_steps}: the run has only {total_steps} steps"
                ),
            ));
        }
        let total = match &v["total_steps"] {
            Value::Null => None,
            t => Some(count(path, t, "total_steps")?),
        };
        if let Some(t) = total
            && t != total_steps
        {
            return Err(bad(
                path,
                format!(
                    "`total_steps` is {t}, but the run has {total_steps}: not this run's checkpoint"
                ),
            ));
        }
        let optimizer_steps = match &v["optimizer_steps"] {
            Value::Array(a) if !a.is_empty() => a
                .iter()
                .enumerate()
                .map(|(i, x)| {
                    let what = format!("optimizer_steps[{i}]");
                    let n = count(path, x, &what)?;
                    if n != step {
                        return Err(bad(
                            path,
                            format!("`{what}` is {n}, but `step` is {step}: every optimiser steps once per step"),
                        ));
                    }
                    Ok(n)
                })
                .collect::<Result<Vec<_>, _>>()?,
            Value::Null => return Err(bad(path, "`optimizer_steps` is missing")),
            other => {
                return Err(bad(
                    path,
                    format!("`optimizer_steps` is {other}: not a list of step counts"),
                ));
            }
        };
        let train_secs = match &v["train_secs"] {
            Value::Null => 0.0,
            Value::Number(n) => match n.as_f64() {
                Some(s) if s.is_finite() && s >= 0.0 => s,
                _ => {
                    return Err(bad(
                        path,
                        format!("`train_secs` is {n}: must be a number of seconds ≥ 0"),
                    ));
                }
            },
            other => {
                return Err(bad(
                    path,
                    format!("`train_secs` is {other}: must be a number of seconds ≥ 0"),
                ));
            }
        };
        let files = match &v["files"] {
            Value::Null => BTreeMap::new(),
            f => {
                serde_json::from_value(f.clone()).map_err(|e| bad(path, format!("`files`: {e}")))?
            }
        };
        Ok(Self {
            step,
            total_steps: total,
            optimizer_steps,
            train_secs,
            files,
        })
    }
}

/// Writes a checkpoint of `tensors` with `meta` (its `files` filled in here) as the run's
/// `checkpoint/`, swapping out the previous one so that a kill at any instant leaves a
/// complete one (see the module's documentation).
pub fn save(
    layout: &RunLayout,
    mut meta: CheckpointMeta,
    tensors: Vec<(String, Tensor)>,
) -> Result<(), FsError> {
    let dir = layout.checkpoint(None);
    let tmp = layout.checkpoint(Some("tmp"));
    let old = layout.checkpoint(Some("old"));
    fault_point("checkpoint-begin");
    fsio::remove_dir_all(&tmp)?;
    fsio::create_dir_all(&tmp)?;
    let mut tensors = tensors;
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let digest = fsio::write_safetensors_digest(&tmp.join(STATE_FILE), &tensors, HashMap::new())?;
    fault_point("checkpoint-tensors-written");
    meta.files = BTreeMap::from([(STATE_FILE.to_string(), digest)]);
    let text = serde_json::to_string_pretty(&meta)
        .map_err(|e| bad(&tmp.join(META_FILE), e.to_string()))?;
    fsio::write_atomic(&tmp.join(META_FILE), text.as_bytes())?;
    fault_point("checkpoint-tmp-complete");
    fsio::remove_dir_all(&old)?;
    fault_point("checkpoint-old-cleared");
    if dir.exists() {
        fsio::rename(&dir, &old)?;
    }
    fault_point("checkpoint-rename-1");
    fsio::rename(&tmp, &dir)?;
    fault_point("checkpoint-rename-2");
    fsio::remove_dir_all(&old)?;
    fault_point("checkpoint-done");
    Ok(())
}

/// Reads and verifies the checkpoint folder `dir` of a run planning `total_steps` steps.
/// `log` hears of a checkpoint too old to carry checksums.
fn read_verified(
    dir: &Path,
    total_steps: usize,
    log: &mut dyn FnMut(String),
) -> Result<Checkpoint, FsError> {
    let meta_path = dir.join(META_FILE);
    let meta = CheckpointMeta::parse(&meta_path, &fsio::read_to_string(&meta_path)?, total_steps)?;
    let state_path = dir.join(STATE_FILE);
    let bytes = fsio::read(&state_path)?;
    match meta.files.get(STATE_FILE) {
        Some(d) => d.verify(&state_path, &bytes)?,
        None if meta.files.is_empty() => log(format!(
            "{}: written by an older version without checksums; not verified",
            meta_path.display()
        )),
        None => {
            return Err(bad(
                &meta_path,
                format!("`files` has no record of {STATE_FILE}"),
            ));
        }
    }
    let tensors = fsio::parse_safetensors(&state_path, &bytes, &HOST)?;
    Ok(Checkpoint {
        meta,
        tensors,
        state_path,
    })
}

/// The run's newest complete, verified checkpoint, put back in place as `checkpoint/` (a save
/// cut short by a kill is finished or undone); `None` when the run has none. A damaged
/// `checkpoint/` with no good copy beside it is an error naming the damaged file; copies
/// passed over are reported through `log`.
pub fn load(
    layout: &RunLayout,
    total_steps: usize,
    log: &mut dyn FnMut(String),
) -> Result<Option<Checkpoint>, FsError> {
    let slots = [None, Some("tmp"), Some("old")];
    let mut best: Option<(usize, Checkpoint)> = None;
    let mut main_error = None;
    for (k, suffix) in slots.iter().enumerate() {
        let dir = layout.checkpoint(*suffix);
        if !dir.exists() {
            continue;
        }
        let read = if dir.is_dir() {
            read_verified(&dir, total_steps, log)
        } else {
            Err(bad(&dir, "not a folder"))
        };
        match read {
            Ok(c) => {
                if best.as_ref().is_none_or(|(_, b)| c.meta.step > b.meta.step) {
                    best = Some((k, c));
                }
            }
            Err(e) if suffix.is_none() => main_error = Some(e),
            Err(e) => log(format!("{}: passed over ({})", dir.display(), e.reason())),
        }
    }
    let Some((k, chosen)) = best else {
        return match main_error {
            Some(e) => Err(bad(
                e.path(),
                format!(
                    "{}; the run cannot resume from it (delete {} to start the run again from step 0)",
                    e.reason(),
                    layout.checkpoint(None).display()
                ),
            )),
            None => Ok(None),
        };
    };
    if let Some(e) = &main_error {
        log(format!(
            "{e}; resuming from {} instead (step {})",
            layout.checkpoint(slots[k]).display(),
            chosen.meta.step
        ));
    }
    put_in_place(layout, slots[k])?;
    Ok(Some(chosen))
}

/// Makes the copy in slot `chosen` (`None`: `checkpoint/`, `"tmp"`, `"old"`) the run's
/// `checkpoint/` and removes the others, in an order that keeps it whole at every instant.
fn put_in_place(layout: &RunLayout, chosen: Option<&str>) -> Result<(), FsError> {
    let dir = layout.checkpoint(None);
    let tmp = layout.checkpoint(Some("tmp"));
    let old = layout.checkpoint(Some("old"));
    match chosen {
        None => {
            fsio::remove_dir_all(&tmp)?;
            fsio::remove_dir_all(&old)?;
        }
        Some("tmp") => {
            fsio::remove_dir_all(&old)?;
            if dir.exists() {
                fsio::rename(&dir, &old)?;
            }
            fault_point("recover-rename-1");
            fsio::rename(&tmp, &dir)?;
            fault_point("recover-rename-2");
            fsio::remove_dir_all(&old)?;
        }
        Some(_) => {
            fsio::remove_dir_all(&tmp)?;
            fsio::remove_dir_all(&dir)?;
            fault_point("recover-removed");
            fsio::rename(&old, &dir)?;
        }
    }
    Ok(())
}

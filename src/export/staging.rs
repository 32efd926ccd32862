//! The output folder of an export, written atomically: everything goes into a staging folder
//! beside `--out`, which replaces `--out` by a rename only once complete. A killed export
//! leaves `--out` as it was (plus a hidden staging folder the next export removes).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use crate::fsio;

/// A staging folder for `out`; dropped without [`commit`](Staging::commit), it is removed.
#[derive(Debug)]
pub struct Staging {
    out: PathBuf,
    tmp: PathBuf,
    committed: bool,
}

/// A hidden sibling of `out` named `.<name>.<tag>`.
fn sibling(out: &Path, tag: &str) -> PathBuf {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "export".into());
    out.with_file_name(format!(".{name}.{tag}"))
}

impl Staging {
    /// Checks that `out` may be written (absent, an empty folder, or any folder with
    /// `force`), then creates the empty staging folder beside it.
    pub fn begin(out: &Path, force: bool) -> anyhow::Result<Self> {
        if out.as_os_str().is_empty() || out.file_name().is_none() {
            bail!("--out `{}`: not a folder name", out.display());
        }
        if out.is_file() {
            bail!(
                "--out {}: is a file; give a folder (it is created)",
                out.display()
            );
        }
        if out.is_dir() {
            let non_empty = std::fs::read_dir(out)
                .with_context(|| format!("--out {}: cannot list the folder", out.display()))?
                .next()
                .is_some();
            if non_empty && !force {
                bail!(
                    "--out {}: the folder is not empty; pass --force to replace it",
                    out.display()
                );
            }
        }
        if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
            fsio::create_dir_all(parent)?;
        }
        let tmp = sibling(out, &format!("export-tmp-{}", std::process::id()));
        fsio::remove_dir_all(&tmp)?;
        fsio::create_dir_all(&tmp)?;
        Ok(Self {
            out: out.to_path_buf(),
            tmp,
            committed: false,
        })
    }

    /// The folder to write into.
    pub fn dir(&self) -> &Path {
        &self.tmp
    }

    /// Puts the staged folder in place of `out` (an existing `out` is moved aside first and
    /// removed after).
    pub fn commit(mut self) -> anyhow::Result<()> {
        crate::fsio::fault_point("export-staged");
        let old = sibling(&self.out, &format!("export-old-{}", std::process::id()));
        let had_old = self.out.exists();
        if had_old {
            fsio::remove_dir_all(&old)?;
            fsio::rename(&self.out, &old)?;
        }
        if let Err(e) = fsio::rename(&self.tmp, &self.out) {
            if had_old {
                let _ = std::fs::rename(&old, &self.out);
            }
            return Err(e.into());
        }
        self.committed = true;
        if had_old {
            fsio::remove_dir_all(&old)?;
        }
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("peft-studio-staging-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn refuses_a_non_empty_folder_without_force_and_replaces_it_with() {
        let root = scratch("force");
        let out = root.join("out");
        std::fs::create_dir_all(&out).unwrap();
        std::fs::write(out.join("old.txt"), "old").unwrap();
        let e = Staging::begin(&out, false).unwrap_err().to_string();
        assert!(e.contains("not empty") && e.contains("--force"), "{e}");
        let s = Staging::begin(&out, true).unwrap();
        std::fs::write(s.dir().join("new.txt"), "new").unwrap();
        s.commit().unwrap();
        assert!(out.join("new.txt").is_file());
        assert!(!out.join("old.txt").exists());
        let left: Vec<_> = std::fs::read_dir(&root).unwrap().collect();
        assert_eq!(left.len(), 1, "no staging folder is left behind");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn an_abandoned_export_leaves_nothing() {
        let root = scratch("drop");
        let out = root.join("out");
        {
            let s = Staging::begin(&out, false).unwrap();
            std::fs::write(s.dir().join("half.txt"), "x").unwrap();
        }
        assert!(!out.exists());
        assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0);
        std::fs::remove_dir_all(&root).unwrap();
    }
}

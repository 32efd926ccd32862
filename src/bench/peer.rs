//! The PyTorch + PEFT peer of the side-by-side benchmarks (`../shared/peer`): where its venv
//! and scripts are, and one timed run of a script that prints one JSON line.
//!
//! The venv is `$PEER_VENV` (default `~/.cache/peft-peer`, made by the peer's `setup.sh`); the
//! scripts are in `$PEER_DIR`, else the first of `../shared/peer` and `shared/peer` (relative to
//! the working directory) that holds them.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

/// A usable peer: its Python and its scripts' folder.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Peer {
    /// `<venv>/bin/python`.
    pub python: PathBuf,
    /// The folder holding `minilm_step.py`.
    pub scripts: PathBuf,
}

/// One peer run's figures (the fields of `minilm_step.py`'s JSON line that the tables use).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerStats {
    /// Median seconds per step after the first.
    pub secs_per_step: f64,
    /// Fastest step.
    pub best_secs: f64,
    /// Peak RSS of the peer process, MiB.
    pub peak_rss_mib: f64,
    /// Trainable values.
    pub trainable: usize,
    /// Timed steps.
    pub steps: usize,
    /// torch / transformers / peft versions and thread count, as the peer printed them.
    pub versions: String,
}

impl Peer {
    /// Finds the peer, or says why there is none (the reason goes into the table).
    pub fn find(script: &str) -> Result<Self, String> {
        let venv = match std::env::var_os("PEER_VENV") {
            Some(v) => PathBuf::from(v),
            None => match std::env::var_os("HOME") {
                Some(h) => Path::new(&h).join(".cache/peft-peer"),
                None => return Err("PEER_VENV is not set and there is no HOME".into()),
            },
        };
        let python = venv.join("bin/python");
        if !python.is_file() {
            return Err(format!(
                "no peer venv: {} does not exist (run ../shared/peer/setup.sh, or set PEER_VENV)",
                python.display()
            ));
        }
        let candidates: Vec<PathBuf> = match std::env::var_os("PEER_DIR") {
            Some(d) => vec![PathBuf::from(d)],
            None => vec![
                PathBuf::from("../shared/peer"),
                PathBuf::from("shared/peer"),
            ],
        };
        let scripts = candidates
            .iter()
            .find(|d| d.join(script).is_file())
            .ok_or_else(|| {
                format!(
                    "no peer script {script} in {} (set PEER_DIR)",
                    candidates
                        .iter()
                        .map(|d| d.display().to_string())
                        .collect::<Vec<_>>()
                        .join(" or ")
                )
            })?;
        let scripts = scripts.canonicalize().unwrap_or_else(|_| scripts.clone());
        Ok(Self { python, scripts })
    }

    /// Runs `script` with `args` on `threads` threads and reads its JSON line.
    pub fn run(&self, script: &str, args: &[String], threads: usize) -> anyhow::Result<PeerStats> {
        let output = Command::new(&self.python)
            .arg(self.scripts.join(script))
            .args(args)
            .env("OMP_NUM_THREADS", threads.to_string())
            .env("MKL_NUM_THREADS", threads.to_string())
            .output()
            .map_err(|e| anyhow::anyhow!("starting the peer {}: {e}", self.python.display()))?;
        if !output.status.success() {
            let err = String::from_utf8_lossy(&output.stderr);
            let tail: Vec<&str> = err.lines().rev().take(8).collect();
            anyhow::bail!(
                "the peer {script} failed ({}): {}",
                output.status,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        let line = stdout
            .lines()
            .rev()
            .find(|l| l.trim_start().starts_with('{'))
            .ok_or_else(|| anyhow::anyhow!("the peer {script} printed no JSON line"))?;
        parse_stats(line).map_err(|e| anyhow::anyhow!("reading the peer {script}'s JSON: {e}"))
    }
}

/// Reads the peer's JSON line.
pub fn parse_stats(line: &str) -> Result<PeerStats, String> {
    let v: serde_json::Value = serde_json::from_str(line).map_err(|e| e.to_string())?;
    let num = |k: &str| {
        v.get(k)
            .and_then(serde_json::Value::as_f64)
            .ok_or_else(|| format!("field `{k}` is missing or not a number"))
    };
    let text = |k: &str| match v.get(k) {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Null) | None => "-".into(),
        Some(other) => other.to_string(),
    };
    if v.get("task").and_then(serde_json::Value::as_str) == Some("generate") {
        // llm_step.py --generate: one generation, timed as seconds per new token.
        let per_token = num("generate_s")? / num("new_tokens")?.max(1.0);
        return Ok(PeerStats {
            secs_per_step: per_token,
            best_secs: per_token,
            peak_rss_mib: num("peak_rss_mib")?,
            trainable: 0,
            steps: 1,
            versions: format!(
                "torch {}, transformers {}, {} threads",
                text("torch"),
                text("transformers"),
                text("threads")
            ),
        });
    }
    // minilm_step.py prints milliseconds, llm_step.py seconds.
    let (secs_per_step, best_secs) = match num("median_ms_after_first") {
        Ok(ms) => (ms / 1000.0, num("min_ms")? / 1000.0),
        Err(_) if v.get("median_s_per_step").is_some() => {
            (num("median_s_per_step")?, num("min_s_per_step")?)
        }
        Err(e) => return Err(e),
    };
    Ok(PeerStats {
        secs_per_step,
        best_secs,
        peak_rss_mib: num("peak_rss_mib")?,
        trainable: num("trainable_params")? as usize,
        steps: num("steps")? as usize,
        versions: format!(
            "torch {}, transformers {}, peft {}, {} threads",
            text("torch"),
            text("transformers"),
            text("peft"),
            text("threads")
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peer_s_generation_line_gives_seconds_per_new_token() {
        let line = r#"{"torch": "2.15.0", "transformers": "5.24.0", "threads": 2, "task": "generate", "new_tokens": 64, "generate_s": 3.2, "tokens_per_s": 20.0, "peak_rss_mib": 900.0}"#;
        let s = parse_stats(line).unwrap();
        assert!((s.secs_per_step - 0.05).abs() < 1e-12);
        assert_eq!((s.trainable, s.steps), (0, 1));
        assert_eq!(s.peak_rss_mib, 900.0);
        let no_time = line.replace(r#""generate_s": 3.2, "#, "");
        assert!(parse_stats(&no_time).unwrap_err().contains("generate_s"));
    }

    #[test]
    fn peer_json_line_parses_and_missing_fields_are_named() {
        let line = r#"{"mode": "lora", "torch": "2.9.1", "transformers": "4.57", "peft": "0.17", "threads": 2, "steps": 6, "trainable_params": 74498, "median_ms_after_first": 700.5, "min_ms": 650.0, "peak_rss_mib": 1250.0}"#;
        let s = parse_stats(line).unwrap();
        assert!((s.secs_per_step - 0.7005).abs() < 1e-12);
        assert!((s.best_secs - 0.65).abs() < 1e-12);
        assert_eq!((s.trainable, s.steps), (74498, 6));
        assert_eq!(
            s.versions,
            "torch 2.9.1, transformers 4.57, peft 0.17, 2 threads"
        );
        let err = parse_stats(r#"{"min_ms": 1}"#).unwrap_err();
        assert!(err.contains("median_ms_after_first"), "{err}");
        assert!(parse_stats("not json").is_err());
        let llm = r#"{"steps": 4, "timed_steps": 3, "trainable_params": 460800, "median_s_per_step": 7.9, "min_s_per_step": 6.9, "peak_rss_mib": 3900.0}"#;
        let s = parse_stats(llm).unwrap();
        assert_eq!((s.secs_per_step, s.best_secs), (7.9, 6.9));
    }
}

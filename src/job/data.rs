//! The run's data as JSONL inside the job folder, split exactly as peft-studio splits it:
//! `{"text", "label"}` lines for classification, `{"messages"}` (or `{"text"}`) lines for a
//! language model.

use std::io::Write;
use std::path::Path;

use serde_json::json;

use crate::data::{self, DataSource, RecordBody, Samples, read_instruct_file, split};
use crate::train::TrainConfig;

/// The converted splits.
#[derive(Debug, Clone)]
pub struct Converted {
    /// Class names (classification; empty for a language model).
    pub classes: Vec<String>,
    /// JSONL lines of the training split.
    pub train: Vec<String>,
    /// JSONL lines of the held-out split.
    pub eval: Vec<String>,
    /// Remarks for the user.
    pub notes: Vec<String>,
}

/// Text classification data: the split and caps of [`data::load`].
pub fn classification(cfg: &TrainConfig) -> anyhow::Result<Converted> {
    let ds = data::load(&cfg.data)?;
    let lines = |s: &Samples| -> anyhow::Result<Vec<String>> {
        match s {
            Samples::Texts(t) => Ok(t
                .texts
                .iter()
                .zip(&t.labels)
                .map(|(text, label)| json!({ "text": text, "label": label }).to_string())
                .collect()),
            Samples::Images(_) => anyhow::bail!(
                "{}: image data; export-job hands over text classification and language-model runs only",
                cfg.data.source.describe()
            ),
        }
    };
    Ok(Converted {
        train: lines(&ds.train)?,
        eval: lines(&ds.eval)?,
        classes: ds.classes,
        notes: Vec::new(),
    })
}

/// Instruction (or plain-text) data: the training file and the held-out file, or a seeded
/// split of the training file, then the caps; records as chat `messages` or `text`.
pub fn instruct(cfg: &TrainConfig) -> anyhow::Result<Converted> {
    let DataSource::Instruct { path, eval_path } = &cfg.data.source else {
        anyhow::bail!(
            "{}: a language model trains on instruction data (data kind \"instruct\")",
            cfg.data.source.describe()
        );
    };
    let d = &cfg.data;
    let to_lines = |body: &[RecordBody]| -> Vec<String> {
        body.iter()
            .map(|b| match b {
                RecordBody::Chat(messages) => json!({ "messages": messages }).to_string(),
                RecordBody::Text(t) => json!({ "text": t }).to_string(),
            })
            .collect()
    };
    let bodies = |p: &Path| -> anyhow::Result<Vec<RecordBody>> {
        Ok(read_instruct_file(p)?
            .records
            .into_iter()
            .map(|r| r.body)
            .collect())
    };
    let all = bodies(path)?;
    let mut notes = Vec::new();
    let (train, eval) = match eval_path {
        Some(e) => (all, bodies(e)?),
        None => {
            let (t, e) = split::random_split(
                all.len(),
                d.eval_fraction,
                d.split_seed,
                &path.display().to_string(),
            )?;
            notes.push(format!(
                "{}: split by record; peft-studio splits after dropping records with no trained token within max_length, so the two splits can differ where such records exist",
                path.display()
            ));
            (
                t.iter().map(|&i| all[i].clone()).collect(),
                e.iter().map(|&i| all[i].clone()).collect(),
            )
        }
    };
    let cap = |v: Vec<RecordBody>, max, stream| -> Vec<RecordBody> {
        let keep = split::cap(v.len(), max, d.split_seed, stream);
        if keep.len() == v.len() {
            v
        } else {
            keep.into_iter().map(|i| v[i].clone()).collect()
        }
    };
    let train = cap(train, d.max_train, split::STREAM_CAP_TRAIN);
    let eval = cap(eval, d.max_eval, split::STREAM_CAP_EVAL);
    anyhow::ensure!(
        !train.is_empty() && !eval.is_empty(),
        "{}: {} training and {} held-out records: both need at least one",
        path.display(),
        train.len(),
        eval.len()
    );
    Ok(Converted {
        classes: Vec::new(),
        train: to_lines(&train),
        eval: to_lines(&eval),
        notes,
    })
}

/// Writes `lines` as a JSONL file.
pub fn write_jsonl(path: &Path, lines: &[String]) -> anyhow::Result<()> {
    let mut text = String::with_capacity(lines.iter().map(|l| l.len() + 1).sum());
    for l in lines {
        text.push_str(l);
        text.push('\n');
    }
    let mut f =
        std::fs::File::create(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    f.write_all(text.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

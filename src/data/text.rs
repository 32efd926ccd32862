//! Texts with labels from a CSV / TSV file (header row) or a JSONL file (one object a line).

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::Value;

use super::{DataError, TextSet, read_file};

/// Most classes an integer label column may declare (labels `0..=MAX_INT_LABEL`).
pub const MAX_INT_LABEL: u64 = 65_535;

/// A label as read, before classes are assigned.
enum RawLabel {
    Int(u64),
    Str(String),
}

/// Texts with their class names.
pub(crate) struct Texts {
    pub classes: Vec<String>,
    pub texts: TextSet,
}

fn list(found: &[String]) -> String {
    if found.is_empty() {
        "none".into()
    } else {
        found
            .iter()
            .map(|c| format!("'{c}'"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// A string label: an integer when it is all ASCII digits, else a trimmed class name.
fn label_from_str(s: &str) -> Option<RawLabel> {
    let t = s.trim();
    if t.is_empty() {
        None
    } else if t.bytes().all(|b| b.is_ascii_digit()) {
        Some(match t.parse::<u64>() {
            Ok(v) => RawLabel::Int(v),
            Err(_) => RawLabel::Str(t.to_string()),
        })
    } else {
        Some(RawLabel::Str(t.to_string()))
    }
}

/// Loads a `.csv`, `.tsv` or `.jsonl` (`.ndjson`) file.
pub(crate) fn load(path: &Path, text_col: &str, label_col: &str) -> Result<Texts, DataError> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase())
        .unwrap_or_default();
    let (texts, raw, lines) = match ext.as_str() {
        "csv" => read_delimited(path, b',', text_col, label_col)?,
        "tsv" => read_delimited(path, b'\t', text_col, label_col)?,
        "jsonl" | "ndjson" => read_jsonl(path, text_col, label_col)?,
        _ => {
            return Err(DataError::UnsupportedFormat {
                path: path.to_path_buf(),
                expected: ".csv, .tsv or .jsonl".into(),
            });
        }
    };
    if texts.is_empty() {
        return Err(DataError::Empty {
            what: path.display().to_string(),
            message: "no rows of data".into(),
        });
    }
    let (classes, labels) = assign_classes(path, label_col, raw, &lines)?;
    Ok(Texts {
        classes,
        texts: TextSet { texts, labels },
    })
}

/// Integers → classes "0".."max"; otherwise all labels are names, sorted alphabetically.
fn assign_classes(
    path: &Path,
    label_col: &str,
    raw: Vec<RawLabel>,
    lines: &[usize],
) -> Result<(Vec<String>, Vec<u32>), DataError> {
    if raw.iter().all(|r| matches!(r, RawLabel::Int(_))) {
        let mut max = 0;
        for (r, &line) in raw.iter().zip(lines) {
            if let RawLabel::Int(v) = *r {
                if v > MAX_INT_LABEL {
                    return Err(DataError::BadRecord {
                        path: path.to_path_buf(),
                        line,
                        message: format!(
                            "integer label {v} in column '{label_col}' is too large \
                             (integer labels are class indices 0..={MAX_INT_LABEL})"
                        ),
                    });
                }
                max = max.max(v);
            }
        }
        let classes = (0..=max).map(|v| v.to_string()).collect();
        let labels = raw
            .iter()
            .map(|r| match r {
                RawLabel::Int(v) => *v as u32,
                RawLabel::Str(_) => 0,
            })
            .collect();
        Ok((classes, labels))
    } else {
        let names: Vec<String> = raw
            .into_iter()
            .map(|r| match r {
                RawLabel::Int(v) => v.to_string(),
                RawLabel::Str(s) => s,
            })
            .collect();
        let classes: Vec<String> = names
            .iter()
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let labels = names
            .iter()
            .map(|n| classes.binary_search(n).map_or(0, |i| i as u32))
            .collect();
        Ok((classes, labels))
    }
}

type Columns = (Vec<String>, Vec<RawLabel>, Vec<usize>);

fn read_delimited(
    path: &Path,
    delimiter: u8,
    text_col: &str,
    label_col: &str,
) -> Result<Columns, DataError> {
    let data = read_file(path, "text file")?;
    let mut rdr = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .has_headers(true)
        .flexible(false)
        .from_reader(data.as_slice());
    let csv_err = |e: csv::Error| {
        let line = e.position().map_or(0, |p| p.line() as usize);
        DataError::BadRecord {
            path: path.to_path_buf(),
            line,
            message: match e.kind() {
                csv::ErrorKind::UnequalLengths {
                    expected_len, len, ..
                } => format!("{len} field(s), but the header has {expected_len}"),
                _ => e.to_string(),
            },
        }
    };
    let headers: Vec<String> = rdr
        .byte_headers()
        .map_err(csv_err)?
        .iter()
        .map(|h| {
            String::from_utf8_lossy(h)
                .trim_start_matches('\u{feff}')
                .trim()
                .to_string()
        })
        .collect();
    let find = |col: &str, role: &str| {
        headers
            .iter()
            .position(|h| h == col)
            .ok_or_else(|| DataError::MissingColumn {
                path: path.to_path_buf(),
                role: role.into(),
                column: col.into(),
                found: list(&headers),
                at: String::new(),
            })
    };
    let ti = find(text_col, "text")?;
    let li = find(label_col, "label")?;
    let (mut texts, mut labels, mut lines) = (Vec::new(), Vec::new(), Vec::new());
    let mut record = csv::ByteRecord::new();
    while rdr.read_byte_record(&mut record).map_err(csv_err)? {
        let line = record.position().map_or(0, |p| p.line() as usize);
        // Skip fully blank rows (a lone empty field).
        if record.len() == 1 && record.get(0).is_some_and(|f| f.is_empty()) {
            continue;
        }
        let field = |i: usize| String::from_utf8_lossy(record.get(i).unwrap_or_default());
        let label = label_from_str(&field(li)).ok_or_else(|| DataError::BadRecord {
            path: path.to_path_buf(),
            line,
            message: format!("empty label in column '{label_col}'"),
        })?;
        texts.push(field(ti).into_owned());
        labels.push(label);
        lines.push(line);
    }
    Ok((texts, labels, lines))
}

fn read_jsonl(path: &Path, text_col: &str, label_col: &str) -> Result<Columns, DataError> {
    let data = read_file(path, "text file")?;
    let content = String::from_utf8_lossy(&data);
    let (mut texts, mut labels, mut lines) = (Vec::new(), Vec::new(), Vec::new());
    for (i, raw_line) in content.lines().enumerate() {
        let line = i + 1;
        let raw_line = raw_line.trim_start_matches('\u{feff}').trim();
        if raw_line.is_empty() {
            continue;
        }
        let bad = |message: String| DataError::BadRecord {
            path: path.to_path_buf(),
            line,
            message,
        };
        let value: Value = serde_json::from_str(raw_line).map_err(|e| bad(json_error(&e)))?;
        let Value::Object(obj) = value else {
            return Err(bad(format!(
                "expected a JSON object, found {}",
                json_kind(&value)
            )));
        };
        let missing = |col: &str, role: &str| DataError::MissingColumn {
            path: path.to_path_buf(),
            role: role.into(),
            column: col.into(),
            found: list(&obj.keys().cloned().collect::<Vec<_>>()),
            at: format!(" (line {line})"),
        };
        let text = match obj.get(text_col) {
            None => return Err(missing(text_col, "text")),
            Some(Value::String(s)) => s.clone(),
            Some(v) => {
                return Err(bad(format!(
                    "field '{text_col}' must be a string, found {}",
                    json_kind(v)
                )));
            }
        };
        let label = match obj.get(label_col) {
            None => return Err(missing(label_col, "label")),
            Some(Value::String(s)) => label_from_str(s)
                .ok_or_else(|| bad(format!("empty label in field '{label_col}'")))?,
            Some(Value::Number(n)) => match n.as_u64() {
                Some(v) => RawLabel::Int(v),
                None => match n.as_f64() {
                    Some(f) if f >= 0.0 && f.fract() == 0.0 && f <= u64::MAX as f64 => {
                        RawLabel::Int(f as u64)
                    }
                    _ => {
                        return Err(bad(format!(
                            "label {n} in field '{label_col}' is not a non-negative integer \
                             (use a string for named classes)"
                        )));
                    }
                },
            },
            Some(v) => {
                return Err(bad(format!(
                    "field '{label_col}' must be a string or a non-negative integer, found {}",
                    json_kind(v)
                )));
            }
        };
        texts.push(text);
        labels.push(label);
        lines.push(line);
    }
    Ok((texts, labels, lines))
}

/// serde_json's message without its " at line 1 column N" (the line is ours).
fn json_error(e: &serde_json::Error) -> String {
    let msg = e.to_string();
    let msg = msg.rfind(" at line ").map_or(msg.as_str(), |i| &msg[..i]);
    format!("invalid JSON at column {}: {msg}", e.column())
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

//! Reading instruction-data files: a JSON array or JSONL, in one of four formats per file.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::super::chat_template::Message;
use super::super::{DataError, read_file};

/// The record formats understood, told apart by a key field of the first record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstructFormat {
    /// `{"instruction", "input"?, "output", "system"?}` (Stanford Alpaca): one user turn
    /// (`instruction`, then `input` on a new line when not empty) and one assistant turn.
    Alpaca,
    /// `{"messages": [{"role", "content"}]}` (OpenAI / TRL conversational), roles `system`,
    /// `user`, `assistant`.
    Chat,
    /// `{"conversations": [{"from", "value"}], "system"?}`; `from` is `human`/`user`,
    /// `gpt`/`assistant` or `system`.
    ShareGpt,
    /// `{"prompt", "completion"}` (TRL's prompt-completion): strings (a user turn and an
    /// assistant turn) or lists of `{role, content}` messages.
    PromptCompletion,
    /// `{"text"}`: continued pre-training; every token is trained.
    Text,
}

impl InstructFormat {
    /// The formats, in the order their key fields are looked for.
    pub const ALL: [InstructFormat; 5] = [
        Self::Chat,
        Self::ShareGpt,
        Self::Alpaca,
        Self::PromptCompletion,
        Self::Text,
    ];

    /// The field that marks a record of this format.
    pub fn key(self) -> &'static str {
        match self {
            Self::Alpaca => "instruction",
            Self::Chat => "messages",
            Self::ShareGpt => "conversations",
            Self::PromptCompletion => "prompt",
            Self::Text => "text",
        }
    }

    /// Its name for people ("Alpaca", "chat", …).
    pub fn name(self) -> &'static str {
        match self {
            Self::Alpaca => "Alpaca",
            Self::Chat => "chat",
            Self::ShareGpt => "ShareGPT",
            Self::PromptCompletion => "prompt-completion",
            Self::Text => "plain text",
        }
    }

    /// The format whose key field `obj` has.
    fn of(obj: &Map<String, Value>) -> Option<Self> {
        Self::ALL.into_iter().find(|f| obj.contains_key(f.key()))
    }
}

/// What one record holds.
#[derive(Debug, Clone, PartialEq)]
pub enum RecordBody {
    /// A conversation with at least one assistant turn.
    Chat(Vec<Message>),
    /// A text trained on as a whole.
    Text(String),
}

/// One record and where it is in its file.
#[derive(Debug, Clone, PartialEq)]
pub struct InstructRecord {
    /// `line 3` (JSONL, 1-based) or `record [3]` (JSON array, 0-based).
    pub at: String,
    /// Its content.
    pub body: RecordBody,
}

/// A parsed instruction-data file.
#[derive(Debug, Clone, PartialEq)]
pub struct InstructFile {
    /// The file.
    pub path: PathBuf,
    /// The format of its records.
    pub format: InstructFormat,
    /// The records, in file order.
    pub records: Vec<InstructRecord>,
}

/// Reads a `.json` (an array of records) or `.jsonl` file (one record a line); the layout is
/// told from the content (a file starting with `[` is an array).
pub fn read_instruct_file(path: &Path) -> Result<InstructFile, DataError> {
    let bytes = read_file(path, "instruction data file")?;
    let text = String::from_utf8(bytes).map_err(|e| DataError::BadItem {
        path: path.to_path_buf(),
        at: format!("byte {}", e.utf8_error().valid_up_to()),
        message: "the file is not UTF-8 text".into(),
    })?;
    parse_instruct(path, &text)
}

/// Parses the content of an instruction-data file; `path` names it in errors.
pub fn parse_instruct(path: &Path, content: &str) -> Result<InstructFile, DataError> {
    let content = content.trim_start_matches('\u{feff}');
    let bad = |at: String, message: String| DataError::BadItem {
        path: path.to_path_buf(),
        at,
        message,
    };
    // (location, value) of every record.
    let mut items: Vec<(String, Value)> = Vec::new();
    if content.trim_start().starts_with('[') {
        let values: Vec<Value> = serde_json::from_str(content).map_err(|e| {
            bad(
                format!("line {}", e.line()),
                format!(
                    "invalid JSON at column {}: {}",
                    e.column(),
                    strip_position(&e)
                ),
            )
        })?;
        items.extend(
            values
                .into_iter()
                .enumerate()
                .map(|(i, v)| (format!("record [{i}]"), v)),
        );
    } else {
        for (i, line) in content.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let at = format!("line {}", i + 1);
            let value: Value = serde_json::from_str(line).map_err(|e| {
                bad(
                    at.clone(),
                    format!(
                        "invalid JSON at column {}: {}",
                        e.column(),
                        strip_position(&e)
                    ),
                )
            })?;
            items.push((at, value));
        }
    }
    if items.is_empty() {
        return Err(DataError::Empty {
            what: path.display().to_string(),
            message: "no records (expected a JSON array of objects or one JSON object a line)"
                .into(),
        });
    }
    let mut format = None;
    let mut records = Vec::with_capacity(items.len());
    for (at, value) in items {
        let Value::Object(obj) = value else {
            return Err(bad(
                at,
                format!("expected a JSON object, found {}", kind(&value)),
            ));
        };
        let own = InstructFormat::of(&obj);
        let file_format = match (format, own) {
            (None, Some(f)) => {
                format = Some(f);
                f
            }
            (None, None) => {
                return Err(bad(
                    at,
                    format!(
                        "cannot tell the format: expected a field 'messages' (chat), \
                         'conversations' (ShareGPT), 'instruction' (Alpaca), 'prompt' \
                         (prompt-completion) or 'text' (plain text); fields found: {}",
                        keys(&obj)
                    ),
                ));
            }
            (Some(f), Some(o)) if o != f => {
                return Err(bad(
                    at,
                    format!(
                        "mixed formats: this record is {} (it has field '{}'), but the file's \
                         first record is {} (field '{}'); use one format per file",
                        o.name(),
                        o.key(),
                        f.name(),
                        f.key()
                    ),
                ));
            }
            (Some(f), _) => f,
        };
        let body = parse_record(file_format, &obj).map_err(|m| bad(at.clone(), m))?;
        records.push(InstructRecord { at, body });
    }
    Ok(InstructFile {
        path: path.to_path_buf(),
        format: format.unwrap_or(InstructFormat::Text),
        records,
    })
}

/// One record of a known format; the error names the field.
fn parse_record(format: InstructFormat, obj: &Map<String, Value>) -> Result<RecordBody, String> {
    match format {
        InstructFormat::Text => Ok(RecordBody::Text(required_str(obj, "text", format)?)),
        InstructFormat::Alpaca => {
            let mut messages = Vec::new();
            if let Some(system) = optional_str(obj, "system")? {
                messages.push(Message::new("system", system));
            }
            let mut prompt = required_str(obj, "instruction", format)?;
            if let Some(input) = optional_str(obj, "input")? {
                prompt.push('\n');
                prompt.push_str(&input);
            }
            messages.push(Message::new("user", prompt));
            messages.push(Message::new(
                "assistant",
                required_str(obj, "output", format)?,
            ));
            Ok(RecordBody::Chat(messages))
        }
        InstructFormat::Chat => {
            let messages = parse_messages(required_array(obj, "messages", format)?, "messages")?;
            check_turns(&messages, "messages")?;
            Ok(RecordBody::Chat(messages))
        }
        InstructFormat::PromptCompletion => {
            let mut messages = prompt_or_completion(obj, "prompt", "user", format)?;
            messages.extend(prompt_or_completion(
                obj,
                "completion",
                "assistant",
                format,
            )?);
            check_turns(&messages, "completion")?;
            Ok(RecordBody::Chat(messages))
        }
        InstructFormat::ShareGpt => {
            let turns = required_array(obj, "conversations", format)?;
            let mut messages = Vec::with_capacity(turns.len() + 1);
            if let Some(system) = optional_str(obj, "system")? {
                messages.push(Message::new("system", system));
            }
            for (i, turn) in turns.iter().enumerate() {
                let field = format!("conversations[{i}]");
                let turn = as_object(turn, &field)?;
                let from = turn_str(turn, &field, "from")?;
                let role = match from.as_str() {
                    "human" | "user" => "user",
                    "gpt" | "assistant" => "assistant",
                    "system" => "system",
                    _ => {
                        return Err(format!(
                            "field '{field}.from': unknown role '{from}' (expected human, gpt \
                             or system)"
                        ));
                    }
                };
                messages.push(Message::new(role, turn_str(turn, &field, "value")?));
            }
            check_turns(&messages, "conversations")?;
            Ok(RecordBody::Chat(messages))
        }
    }
}

/// `{role, content}` messages of the field named `field`.
fn parse_messages(turns: &[Value], field: &str) -> Result<Vec<Message>, String> {
    let mut messages = Vec::with_capacity(turns.len());
    for (i, turn) in turns.iter().enumerate() {
        let at = format!("{field}[{i}]");
        let turn = as_object(turn, &at)?;
        let role = turn_str(turn, &at, "role")?;
        if !matches!(role.as_str(), "system" | "user" | "assistant") {
            return Err(format!(
                "field '{at}.role': unknown role '{role}' (expected system, user or assistant)"
            ));
        }
        let content = turn_str(turn, &at, "content")?;
        messages.push(Message::new(role, content));
    }
    Ok(messages)
}

/// A prompt-completion field: a string (one turn of `role`) or a list of messages.
fn prompt_or_completion(
    obj: &Map<String, Value>,
    field: &str,
    role: &str,
    format: InstructFormat,
) -> Result<Vec<Message>, String> {
    match obj.get(field) {
        Some(Value::Array(_)) => parse_messages(required_array(obj, field, format)?, field),
        _ => Ok(vec![Message::new(role, required_str(obj, field, format)?)]),
    }
}

/// A conversation needs an assistant turn to train on.
fn check_turns(messages: &[Message], field: &str) -> Result<(), String> {
    if messages.iter().any(|m| m.role == "assistant") {
        Ok(())
    } else {
        Err(format!(
            "field '{field}': no assistant turn (nothing to train on)"
        ))
    }
}

fn required_str(
    obj: &Map<String, Value>,
    field: &str,
    format: InstructFormat,
) -> Result<String, String> {
    match obj.get(field) {
        None => Err(format!(
            "missing field '{field}' (the file is in the {} format); fields found: {}",
            format.name(),
            keys(obj)
        )),
        Some(Value::String(s)) if s.trim().is_empty() => Err(format!("field '{field}' is empty")),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(v) => Err(format!(
            "field '{field}' must be a string{}, found {}",
            if format == InstructFormat::PromptCompletion {
                " or a list of messages"
            } else {
                ""
            },
            kind(v)
        )),
    }
}

/// An optional string field: absent, null or empty is `None`.
fn optional_str(obj: &Map<String, Value>, field: &str) -> Result<Option<String>, String> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(v) => Err(format!(
            "field '{field}' must be a string, found {}",
            kind(v)
        )),
    }
}

fn required_array<'a>(
    obj: &'a Map<String, Value>,
    field: &str,
    format: InstructFormat,
) -> Result<&'a [Value], String> {
    match obj.get(field) {
        None => Err(format!(
            "missing field '{field}' (the file is in the {} format)",
            format.name()
        )),
        Some(Value::Array(a)) if a.is_empty() => Err(format!("field '{field}' is empty")),
        Some(Value::Array(a)) => Ok(a),
        Some(v) => Err(format!(
            "field '{field}' must be an array, found {}",
            kind(v)
        )),
    }
}

fn as_object<'a>(v: &'a Value, field: &str) -> Result<&'a Map<String, Value>, String> {
    match v {
        Value::Object(o) => Ok(o),
        _ => Err(format!(
            "field '{field}' must be an object, found {}",
            kind(v)
        )),
    }
}

/// A non-empty string field of a turn.
fn turn_str(turn: &Map<String, Value>, at: &str, field: &str) -> Result<String, String> {
    match turn.get(field) {
        None => Err(format!("missing field '{at}.{field}'")),
        Some(Value::String(s)) if s.trim().is_empty() => {
            Err(format!("field '{at}.{field}' is empty"))
        }
        Some(Value::String(s)) => Ok(s.clone()),
        Some(v) => Err(format!(
            "field '{at}.{field}' must be a string, found {}",
            kind(v)
        )),
    }
}

fn keys(obj: &Map<String, Value>) -> String {
    if obj.is_empty() {
        "none".into()
    } else {
        obj.keys()
            .map(|k| format!("'{k}'"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// serde_json's message without its " at line L column C".
fn strip_position(e: &serde_json::Error) -> String {
    let msg = e.to_string();
    msg.rfind(" at line ")
        .map_or(msg.clone(), |i| msg[..i].to_string())
}

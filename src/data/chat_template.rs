//! Chat templates: the Jinja templates Hugging Face tokenizers carry, rendered with minijinja
//! the way `transformers`' `apply_chat_template` renders them.
//!
//! Conventions followed (from `transformers.utils.chat_template_utils`):
//! - the environment trims blocks and strips their leading whitespace (`trim_blocks`,
//!   `lstrip_blocks`), drops one trailing newline of the source, and has loop controls
//!   (`{% break %}`, `{% continue %}`);
//! - variables: `messages` (a list of `{role, content}`), `add_generation_prompt`,
//!   `bos_token`, `eos_token` and the other `*_token` strings of `tokenizer_config.json`,
//!   `tools` and `documents` (both `none`);
//! - `raise_exception(message)` fails the render with the message, `strftime_now(format)`
//!   formats the local time, `tojson` writes JSON as Python's `json.dumps(ensure_ascii=False)`
//!   does, and Python's string/dict/list methods (`.strip()`, `.startswith()`, `.items()`, …)
//!   work.
//!
//! Sources: a model folder ([`ChatTemplate::from_model_dir`]: `chat_template.jinja`, else
//! `tokenizer_config.json`'s `chat_template`, a string or a list of `{name, template}` of which
//! `default` is used), or a string ([`ChatTemplate::new`], e.g. a GGUF's
//! `tokenizer.chat_template`). Errors ([`DataError::Template`]) name the file (or the string's
//! origin) and the template line.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, Error, ErrorKind, Value};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use super::{DataError, read_file};

/// The template's name inside its environment.
const NAME: &str = "chat_template";

/// ChatML (`<|im_start|>role\ncontent<|im_end|>\n`), the template of SmolLM2, Qwen2 and many
/// fine-tunes: a fallback for a model folder without a template of its own.
pub const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + \
'\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}\
{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text of the turn.
    pub content: String,
}

impl Message {
    /// A message with this role and content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A compiled chat template with the special tokens it is rendered with.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    origin: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
    extra_tokens: BTreeMap<String, String>,
}

impl ChatTemplate {
    /// Compiles `source`; `origin` names it in errors (a file path, "GGUF metadata", …).
    /// A syntax error is [`DataError::Template`] naming `origin` and the line.
    pub fn new(
        source: impl Into<String>,
        origin: impl Into<String>,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self, DataError> {
        let source = source.into();
        let origin = origin.into();
        let env = environment(&source).map_err(|e| template_error(&origin, &e))?;
        Ok(Self {
            env,
            source,
            origin,
            bos_token,
            eos_token,
            extra_tokens: BTreeMap::new(),
        })
    }

    /// The template of a Hugging Face model folder: `chat_template.jinja` if present, else the
    /// `chat_template` of `tokenizer_config.json`; the special tokens come from
    /// `tokenizer_config.json`. `Ok(None)` when the folder has no template (a base model).
    pub fn from_model_dir(dir: &Path) -> Result<Option<Self>, DataError> {
        let config_path = dir.join("tokenizer_config.json");
        let config = if config_path.is_file() {
            Some(read_json_object(&config_path)?)
        } else {
            None
        };
        let jinja = dir.join("chat_template.jinja");
        let (source, origin) = if jinja.is_file() {
            let bytes = read_file(&jinja, "chat template")?;
            let text = String::from_utf8(bytes).map_err(|_| DataError::Template {
                origin: jinja.display().to_string(),
                at: String::new(),
                message: "the file is not UTF-8 text".into(),
            })?;
            (text, jinja.display().to_string())
        } else if let Some(cfg) = &config {
            match template_from_config(&config_path, cfg)? {
                Some(t) => (t, config_path.display().to_string()),
                None => return Ok(None),
            }
        } else {
            return Ok(None);
        };
        let mut template = Self::new(source, origin, None, None)?;
        if let Some(cfg) = &config {
            template.set_tokens_from_config(cfg);
        }
        Ok(Some(template))
    }

    /// Reads a `tokenizer_config.json` on its own: its `chat_template` (`Ok(None)` if it has
    /// none) and special tokens.
    pub fn from_tokenizer_config(path: &Path) -> Result<Option<Self>, DataError> {
        let cfg = read_json_object(path)?;
        let Some(source) = template_from_config(path, &cfg)? else {
            return Ok(None);
        };
        let mut template = Self::new(source, path.display().to_string(), None, None)?;
        template.set_tokens_from_config(&cfg);
        Ok(Some(template))
    }

    /// Takes `bos_token`, `eos_token` and every other `*_token` string (or `{content}` object)
    /// of a tokenizer config.
    fn set_tokens_from_config(&mut self, cfg: &serde_json::Map<String, Json>) {
        for (key, value) in cfg {
            if !key.ends_with("_token") {
                continue;
            }
            let token = match value {
                Json::String(s) => Some(s.clone()),
                Json::Object(o) => o.get("content").and_then(Json::as_str).map(str::to_string),
                _ => None,
            };
            let Some(token) = token else { continue };
            match key.as_str() {
                "bos_token" => self.bos_token = Some(token),
                "eos_token" => self.eos_token = Some(token),
                _ => {
                    self.extra_tokens.insert(key.clone(), token);
                }
            }
        }
    }

    /// The template's source text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Where the template came from (a file path or the origin given to [`ChatTemplate::new`]).
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The `bos_token` it is rendered with.
    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    /// The `eos_token` it is rendered with (the end of an assistant turn in most templates).
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// Renders a conversation; with `add_generation_prompt` the text ends where the assistant's
    /// answer starts. Errors (an undefined variable, a `raise_exception`) name the line.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, DataError> {
        let template = self
            .env
            .get_template(NAME)
            .map_err(|e| template_error(&self.origin, &e))?;
        let mut ctx: BTreeMap<String, Value> = BTreeMap::new();
        for (k, v) in &self.extra_tokens {
            ctx.insert(k.clone(), Value::from(v.as_str()));
        }
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| {
                Value::from_pairs([
                    ("role", Value::from(m.role.as_str())),
                    ("content", Value::from(m.content.as_str())),
                ])
            })
            .collect();
        ctx.insert("messages".into(), Value::from(messages));
        ctx.insert(
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        );
        ctx.insert("bos_token".into(), token_value(&self.bos_token));
        ctx.insert("eos_token".into(), token_value(&self.eos_token));
        ctx.insert("tools".into(), Value::from(()));
        ctx.insert("documents".into(), Value::from(()));
        template
            .render(Value::from_pairs(ctx))
            .map_err(|e| template_error(&self.origin, &e))
    }
}

/// An absent special token renders as Jinja's undefined (empty text), as in `transformers`
/// where the key is then missing.
fn token_value(token: &Option<String>) -> Value {
    token.as_deref().map_or(Value::UNDEFINED, Value::from)
}

/// The environment `transformers` renders chat templates in, holding `source`.
fn environment(source: &str) -> Result<Environment<'static>, Error> {
    let mut env = Environment::new();
    env.set_syntax(
        SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .keep_trailing_newline(false)
            .build()?,
    );
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env.add_filter("tojson", tojson);
    env.add_template_owned(NAME, source.to_string())?;
    Ok(env)
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(
        ErrorKind::InvalidOperation,
        format!("the template raised an exception: {message}"),
    ))
}

fn strftime_now(format: String) -> Result<Value, Error> {
    use chrono::format::{Item, StrftimeItems};
    let items: Vec<Item> = StrftimeItems::new(&format).collect();
    if items.iter().any(|i| matches!(i, Item::Error)) {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now: invalid format '{format}'"),
        ));
    }
    let now = chrono::Local::now();
    Ok(Value::from(
        now.format_with_items(items.into_iter()).to_string(),
    ))
}

/// `tojson` as `transformers` defines it: `json.dumps(x, ensure_ascii=False, indent=indent,
/// separators=separators, sort_keys=sort_keys)`; no HTML escaping.
fn tojson(value: &Value, indent: Option<Value>, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = match indent.or(kwargs.get::<Option<Value>>("indent")?) {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => Some(usize::try_from(v.clone()).map_err(|_| {
            Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: indent must be a non-negative integer, not {v}"),
            )
        })?),
    };
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    let _: Option<Value> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_json(&mut out, value, indent, sort_keys, 0)?;
    Ok(Value::from_safe_string(out))
}

fn write_json(
    out: &mut String,
    value: &Value,
    indent: Option<usize>,
    sort_keys: bool,
    depth: usize,
) -> Result<(), Error> {
    let (item_sep, newline) = match indent {
        Some(n) => (",", Some(n)),
        None => (", ", None),
    };
    let break_line = |out: &mut String, level: usize| {
        if let Some(n) = newline {
            out.push('\n');
            out.push_str(&" ".repeat(n * level));
        }
    };
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if let Some(i) = value.as_i64() {
                let _ = write!(out, "{i}");
            } else {
                let f = f64::try_from(value.clone()).unwrap_or(f64::NAN);
                if f.is_finite() && f.fract() == 0.0 && f.abs() < 1e16 {
                    let _ = write!(out, "{f:.1}");
                } else {
                    let _ = write!(out, "{f}");
                }
            }
        }
        ValueKind::String => out.push_str(
            &serde_json::to_string(value.as_str().unwrap_or_default()).unwrap_or_default(),
        ),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                break_line(out, depth + 1);
                write_json(out, item, indent, sort_keys, depth + 1)?;
            }
            break_line(out, depth);
            out.push(']');
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = value.try_iter()?.collect();
            if sort_keys {
                keys.sort();
            }
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                break_line(out, depth + 1);
                let key_text = match key.as_str() {
                    Some(s) => s.to_string(),
                    None => key.to_string(),
                };
                out.push_str(&serde_json::to_string(&key_text).unwrap_or_default());
                out.push_str(": ");
                let item = value.get_item(key)?;
                write_json(out, &item, indent, sort_keys, depth + 1)?;
            }
            break_line(out, depth);
            out.push('}');
        }
        _ => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: cannot write a {} as JSON", value.kind()),
            ));
        }
    }
    Ok(())
}

/// A minijinja error as [`DataError::Template`]: kind, detail and line.
fn template_error(origin: &str, e: &Error) -> DataError {
    let message = match e.detail() {
        Some(d) => format!("{}: {d}", e.kind()),
        None => e.kind().to_string(),
    };
    let at = e.line().map_or(String::new(), |l| format!(", line {l}"));
    DataError::Template {
        origin: origin.to_string(),
        at,
        message,
    }
}

fn read_json_object(path: &Path) -> Result<serde_json::Map<String, Json>, DataError> {
    let bytes = read_file(path, "tokenizer config")?;
    match serde_json::from_slice::<Json>(&bytes) {
        Ok(Json::Object(o)) => Ok(o),
        Ok(_) => Err(DataError::Template {
            origin: path.display().to_string(),
            at: String::new(),
            message: "expected a JSON object".into(),
        }),
        Err(e) => Err(DataError::Template {
            origin: path.display().to_string(),
            at: format!(", line {}", e.line()),
            message: format!("invalid JSON: {e}"),
        }),
    }
}

/// `chat_template` of a tokenizer config: a string, or a list of `{name, template}` of which
/// the one named `default` is used. `Ok(None)` if there is none.
fn template_from_config(
    path: &Path,
    cfg: &serde_json::Map<String, Json>,
) -> Result<Option<String>, DataError> {
    let bad = |message: String| DataError::Template {
        origin: path.display().to_string(),
        at: String::new(),
        message,
    };
    match cfg.get("chat_template") {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(Json::Array(list)) => {
            let mut names = Vec::new();
            for (i, entry) in list.iter().enumerate() {
                let name = entry.get("name").and_then(Json::as_str);
                let template = entry.get("template").and_then(Json::as_str);
                match (name, template) {
                    (Some("default"), Some(t)) => return Ok(Some(t.to_string())),
                    (Some(n), Some(_)) => names.push(format!("'{n}'")),
                    _ => {
                        return Err(bad(format!(
                            "chat_template[{i}] must be an object with string fields \
                             'name' and 'template'"
                        )));
                    }
                }
            }
            Err(bad(format!(
                "chat_template lists no template named 'default' (found: {})",
                if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(", ")
                }
            )))
        }
        Some(_) => Err(bad(
            "chat_template must be a string or a list of {name, template} objects".into(),
        )),
    }
}

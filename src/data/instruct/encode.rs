//! Tokenising instruction records with a loss mask over the assistant's tokens.
//!
//! A conversation is rendered whole (`add_generation_prompt = false`). For every assistant
//! turn `i`, the trained text runs from the end of `render(messages[..i], true)` (where the
//! answer starts) to the end of `render(messages[..=i], false)`, cut just after the template's
//! `eos_token` when the turn holds it (so `content<|im_end|>` is trained, the newline after it
//! is not), else with trailing whitespace left out. Token positions come from tokenising the
//! text up to each boundary and checking the result is a prefix of the whole tokenisation;
//! when it is not (a token merging across the boundary) the token offsets decide, and a token
//! straddling the boundary stays masked, so prompt text is never trained. A template whose
//! prefixes are not prefixes of the whole (one that rewrites earlier turns) falls back to
//! finding the answer's text in the rendering.

use rayon::prelude::*;
use tokenizers::Tokenizer;

use super::super::DataError;
use super::super::chat_template::{ChatTemplate, Message};
use super::read::{InstructFile, InstructRecord, RecordBody};

/// Byte ranges of tokens in the text they came from.
type Offsets = Vec<(usize, usize)>;

/// Notes listing examples name at most this many.
const NOTE_EXAMPLES: usize = 5;

/// One example ready for the trainer.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizedExample {
    /// Token ids, at most `max_length`.
    pub ids: Vec<u32>,
    /// Per token: whether the loss covers it as a target (the assistant's tokens; all of a
    /// plain text). Token `t` is predicted from the logits at position `t - 1`, so a causal-LM
    /// loss uses `logits[..n-1]` against `ids[1..]` where `loss_mask[1..]` holds (HF's
    /// `labels` with -100 where the mask is false, shifted inside the model); `loss_mask[0]`
    /// can never be a target.
    pub loss_mask: Vec<bool>,
    /// The conversation before the last assistant turn, for generation-based evaluation
    /// (render it with `add_generation_prompt = true`); empty for plain text.
    pub prompt_messages: Vec<Message>,
    /// The last assistant turn's text, the reference answer; `None` for plain text.
    pub reference: Option<String>,
    /// Whether the example was cut at `max_length`.
    pub truncated: bool,
    /// Where the record is in its file (`line 3`, `record [3]`).
    pub at: String,
}

impl TokenizedExample {
    /// Number of trained tokens.
    pub fn trained_tokens(&self) -> usize {
        self.loss_mask.iter().filter(|&&m| m).count()
    }
}

/// What tokenising a file gave.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct InstructReport {
    /// Records read.
    pub records: usize,
    /// Examples kept.
    pub examples: usize,
    /// Tokens in the kept examples (after truncation).
    pub tokens: usize,
    /// Trained tokens in the kept examples.
    pub trained_tokens: usize,
    /// Kept examples cut at `max_length`.
    pub truncated: usize,
    /// Examples dropped because none of their assistant tokens was left (all past
    /// `max_length`, or the answer could not be located in the rendering).
    pub dropped: usize,
    /// The longest example before truncation, in tokens.
    pub longest: usize,
    /// Assistant turns whose boundaries came from token offsets (tokenisation not prefix-stable).
    pub offset_masked_turns: usize,
    /// Assistant turns not found in the rendering (left masked).
    pub unlocated_turns: usize,
    /// The length examples were cut at.
    pub max_length: usize,
    /// Sentences for people: truncation, drops, fallbacks.
    pub notes: Vec<String>,
}

/// Tokenised examples and the report on them.
#[derive(Debug, Clone)]
pub struct InstructSet {
    /// The kept examples, in file order.
    pub examples: Vec<TokenizedExample>,
    /// Counts and notes.
    pub report: InstructReport,
}

/// What a span of a preview is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanKind {
    /// Prompt, system or user text: in the input, not trained.
    Masked,
    /// The assistant's text: trained.
    Trained,
    /// Past `max_length`: cut off.
    Cut,
}

/// A run of rendered text of one kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreviewSpan {
    /// The text.
    pub text: String,
    /// What it is.
    pub kind: SpanKind,
}

/// One example as the model sees it, in spans to colour.
#[derive(Debug, Clone, PartialEq)]
pub struct Preview {
    /// The rendered text, in order, split where the kind changes.
    pub spans: Vec<PreviewSpan>,
    /// Tokens before truncation.
    pub tokens: usize,
    /// Trained tokens after truncation.
    pub trained_tokens: usize,
}

/// A record rendered and tokenised in full (before truncation).
struct Full {
    text: String,
    ids: Vec<u32>,
    offsets: Vec<(usize, usize)>,
    mask: Vec<bool>,
    offset_masked: usize,
    unlocated: usize,
}

/// Turns records into [`TokenizedExample`]s.
pub struct InstructEncoder<'a> {
    tokenizer: &'a Tokenizer,
    template: Option<&'a ChatTemplate>,
    max_length: usize,
}

impl<'a> InstructEncoder<'a> {
    /// An encoder cutting examples at `max_length` tokens (at least 2). Conversations need a
    /// `template`; plain text does not (its end gets the template's `eos_token` when there
    /// is one).
    pub fn new(
        tokenizer: &'a Tokenizer,
        template: Option<&'a ChatTemplate>,
        max_length: usize,
    ) -> Result<Self, DataError> {
        if max_length < 2 {
            return Err(DataError::InvalidConfig {
                field: "max_length".into(),
                message: format!("{max_length} is too short (at least 2 tokens)"),
            });
        }
        Ok(Self {
            tokenizer,
            template,
            max_length,
        })
    }

    /// Tokenises every record of a file (in parallel, on rayon's pool: call it from a worker
    /// thread); examples left with no trained token are dropped and counted. An error (a
    /// template that fails on a record) is the first in file order.
    pub fn encode_file(&self, file: &InstructFile) -> Result<InstructSet, DataError> {
        let mut report = InstructReport {
            records: file.records.len(),
            max_length: self.max_length,
            ..Default::default()
        };
        let mut examples = Vec::with_capacity(file.records.len());
        let (mut truncated_at, mut dropped_at) = (Vec::new(), Vec::new());
        // Records are encoded in parallel; results (and the first error) stay in file order.
        let encoded: Vec<Result<(TokenizedExample, usize, usize, usize), DataError>> = file
            .records
            .par_iter()
            .map(|record| {
                let full = self.full(record, file)?;
                let counts = (full.ids.len(), full.offset_masked, full.unlocated);
                Ok((self.finish(record, full), counts.0, counts.1, counts.2))
            })
            .collect();
        for item in encoded {
            let (ex, len, offset_masked, unlocated) = item?;
            report.longest = report.longest.max(len);
            report.offset_masked_turns += offset_masked;
            report.unlocated_turns += unlocated;
            if ex.trained_tokens() == 0 {
                report.dropped += 1;
                dropped_at.push(ex.at.clone());
                continue;
            }
            if ex.truncated {
                report.truncated += 1;
                truncated_at.push(ex.at.clone());
            }
            report.tokens += ex.ids.len();
            report.trained_tokens += ex.trained_tokens();
            examples.push(ex);
        }
        report.examples = examples.len();
        let path = file.path.display();
        if report.truncated > 0 {
            report.notes.push(format!(
                "{path}: {} of {} examples are longer than {} tokens and were cut at the end \
                 (the longest has {} tokens; {})",
                report.truncated,
                report.records,
                self.max_length,
                report.longest,
                first_few(&truncated_at)
            ));
        }
        if report.dropped > 0 {
            report.notes.push(format!(
                "{path}: {} examples dropped: none of their assistant tokens is within the \
                 first {} tokens ({}); raise max_length to keep them",
                report.dropped,
                self.max_length,
                first_few(&dropped_at)
            ));
        }
        if report.offset_masked_turns > 0 {
            report.notes.push(format!(
                "{path}: for {} assistant turns the tokenisation merges across the start or end \
                 of the answer; the token straddling it is not trained",
                report.offset_masked_turns
            ));
        }
        if report.unlocated_turns > 0 {
            report.notes.push(format!(
                "{path}: {} assistant turns could not be found in the template's rendering and \
                 are not trained",
                report.unlocated_turns
            ));
        }
        if examples.is_empty() {
            return Err(DataError::Empty {
                what: path.to_string(),
                message: format!(
                    "no example has an assistant token within max_length {}",
                    self.max_length
                ),
            });
        }
        Ok(InstructSet { examples, report })
    }

    /// Tokenises one record of `file` (cut at `max_length`).
    pub fn encode(
        &self,
        record: &InstructRecord,
        file: &InstructFile,
    ) -> Result<TokenizedExample, DataError> {
        let full = self.full(record, file)?;
        Ok(self.finish(record, full))
    }

    /// One record as text spans: masked, trained, and cut (past `max_length`).
    pub fn preview(
        &self,
        record: &InstructRecord,
        file: &InstructFile,
    ) -> Result<Preview, DataError> {
        let full = self.full(record, file)?;
        let mut spans: Vec<PreviewSpan> = Vec::new();
        let mut pos = 0;
        let mut push = |text: &str, kind: SpanKind| {
            if text.is_empty() {
                return;
            }
            match spans.last_mut() {
                Some(last) if last.kind == kind => last.text.push_str(text),
                _ => spans.push(PreviewSpan {
                    text: text.to_string(),
                    kind,
                }),
            }
        };
        let mut kind = SpanKind::Masked;
        for (t, &(_, end)) in full.offsets.iter().enumerate() {
            kind = if t >= self.max_length {
                SpanKind::Cut
            } else if full.mask[t] {
                SpanKind::Trained
            } else {
                SpanKind::Masked
            };
            if end > pos
                && let Some(text) = full.text.get(pos..end)
            {
                push(text, kind);
                pos = end;
            }
        }
        if let Some(rest) = full.text.get(pos..) {
            push(rest, kind);
        }
        let n = full.ids.len().min(self.max_length);
        Ok(Preview {
            tokens: full.ids.len(),
            trained_tokens: full.mask[..n].iter().filter(|&&m| m).count(),
            spans,
        })
    }

    /// The token ids of a prompt for generation: `messages` rendered with
    /// `add_generation_prompt = true` (no truncation).
    pub fn encode_prompt(&self, messages: &[Message]) -> Result<Vec<u32>, DataError> {
        let template = self.template()?;
        let text = template.render(messages, true)?;
        Ok(self.tokenize(&text, false, template.origin())?.0)
    }

    fn template(&self) -> Result<&'a ChatTemplate, DataError> {
        self.template.ok_or_else(|| DataError::InvalidConfig {
            field: "chat template".into(),
            message: "the model has no chat template, which conversation data (chat, ShareGPT, \
                      Alpaca) needs; use an instruct model, or plain-text ('text') data"
                .into(),
        })
    }

    /// Cuts a full encoding at `max_length`.
    fn finish(&self, record: &InstructRecord, full: Full) -> TokenizedExample {
        let truncated = full.ids.len() > self.max_length;
        let n = full.ids.len().min(self.max_length);
        let (prompt_messages, reference) = match &record.body {
            RecordBody::Text(_) => (Vec::new(), None),
            RecordBody::Chat(messages) => {
                match messages.iter().rposition(|m| m.role == "assistant") {
                    Some(i) => (messages[..i].to_vec(), Some(messages[i].content.clone())),
                    None => (messages.clone(), None),
                }
            }
        };
        let mut ids = full.ids;
        let mut loss_mask = full.mask;
        ids.truncate(n);
        loss_mask.truncate(n);
        TokenizedExample {
            ids,
            loss_mask,
            prompt_messages,
            reference,
            truncated,
            at: record.at.clone(),
        }
    }

    fn tokenize(
        &self,
        text: &str,
        add_special_tokens: bool,
        what: &str,
    ) -> Result<(Vec<u32>, Offsets), DataError> {
        let enc = self
            .tokenizer
            .encode(text, add_special_tokens)
            .map_err(|e| DataError::InvalidConfig {
                field: "tokenizer".into(),
                message: format!("cannot tokenise {what}: {e}"),
            })?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    /// Renders and tokenises a record, masking all but the assistant's tokens.
    fn full(&self, record: &InstructRecord, file: &InstructFile) -> Result<Full, DataError> {
        let what = format!("{} {}", file.path.display(), record.at);
        let in_record = |e: DataError| match e {
            DataError::Template {
                origin,
                at,
                message,
            } => DataError::Template {
                origin,
                at,
                message: format!("{message} (rendering {what})"),
            },
            other => other,
        };
        match &record.body {
            RecordBody::Text(text) => {
                let mut text = text.clone();
                if let Some(eos) = self.template.and_then(|t| t.eos_token())
                    && self.tokenizer.token_to_id(eos).is_some()
                {
                    text.push_str(eos);
                }
                let (ids, offsets) = self.tokenize(&text, true, &what)?;
                let mask = vec![true; ids.len()];
                Ok(Full {
                    text,
                    ids,
                    offsets,
                    mask,
                    offset_masked: 0,
                    unlocated: 0,
                })
            }
            RecordBody::Chat(messages) => {
                let template = self.template()?;
                let text = template.render(messages, false).map_err(in_record)?;
                let (ids, offsets) = self.tokenize(&text, false, &what)?;
                let mut full = Full {
                    mask: vec![false; ids.len()],
                    text,
                    ids,
                    offsets,
                    offset_masked: 0,
                    unlocated: 0,
                };
                let mut search_from = 0;
                for (i, m) in messages.iter().enumerate() {
                    if m.role != "assistant" {
                        continue;
                    }
                    let span = answer_span(template, messages, i, &full.text, search_from)
                        .map_err(in_record)?;
                    match span {
                        Some((start, end)) => {
                            search_from = end;
                            self.mark(&mut full, start, end, &what)?;
                        }
                        None => full.unlocated += 1,
                    }
                }
                Ok(full)
            }
        }
    }

    /// Marks the tokens of bytes `start..end` of the rendering as trained.
    fn mark(&self, full: &mut Full, start: usize, end: usize, what: &str) -> Result<(), DataError> {
        let (head, _) = self.tokenize(&full.text[..start], false, what)?;
        let (upto, _) = self.tokenize(&full.text[..end], false, what)?;
        if full.ids.starts_with(&head) && full.ids.starts_with(&upto) && head.len() <= upto.len() {
            for m in &mut full.mask[head.len()..upto.len()] {
                *m = true;
            }
        } else {
            full.offset_masked += 1;
            for (m, &(a, b)) in full.mask.iter_mut().zip(&full.offsets) {
                if a >= start && b <= end && b > a {
                    *m = true;
                }
            }
        }
        Ok(())
    }
}

/// Byte range of assistant turn `i`'s trained text in `text` (the whole rendering); `None`
/// when it cannot be found.
fn answer_span(
    template: &ChatTemplate,
    messages: &[Message],
    i: usize,
    text: &str,
    search_from: usize,
) -> Result<Option<(usize, usize)>, DataError> {
    let prompt = template.render(&messages[..i], true)?;
    let upto = template.render(&messages[..=i], false)?;
    let eos = template.eos_token().filter(|e| !e.is_empty());
    if text.starts_with(&upto) && upto.starts_with(&prompt) && prompt.len() >= search_from {
        let start = prompt.len();
        let turn = &upto[start..];
        let len = match eos.and_then(|e| turn.rfind(e).map(|p| p + e.len())) {
            Some(l) => l,
            None => turn.trim_end().len(),
        };
        return Ok((len > 0).then_some((start, start + len)));
    }
    // Not prefix-stable: find the answer's text after the previous turn.
    let content = &messages[i].content;
    let Some(found) = text
        .get(search_from..)
        .and_then(|t| t.find(content.as_str()))
    else {
        return Ok(None);
    };
    let start = search_from + found;
    let mut end = start + content.len();
    if let Some(e) = eos
        && text[end..].starts_with(e)
    {
        end += e.len();
    }
    Ok(Some((start, end)))
}

fn first_few(at: &[String]) -> String {
    let mut s = at
        .iter()
        .take(NOTE_EXAMPLES)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if at.len() > NOTE_EXAMPLES {
        s.push_str(&format!(" and {} more", at.len() - NOTE_EXAMPLES));
    }
    s
}

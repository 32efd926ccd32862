//! Instruction data for causal language models: files in the formats people bring, turned into
//! token ids with a loss mask through the model's chat template.
//!
//! - [`read_instruct_file`] reads a JSON array or a JSONL file of Alpaca, chat, ShareGPT,
//!   prompt-completion or plain-text records ([`InstructFormat`], detected from the first record) into
//!   conversations ([`InstructRecord`]). A bad record is [`DataError::BadItem`] naming the
//!   file, the line (JSONL) or array index, and the field.
//! - [`InstructEncoder`] renders each conversation with a [`ChatTemplate`](super::ChatTemplate)
//!   and tokenises it; the loss covers the assistant's tokens only (every assistant turn, up
//!   to and including the end-of-turn token), as TRL's assistant-only loss and LLaMA-Factory
//!   do; plain text is trained on every token. Examples are cut at `max_length` (keeping the
//!   start) and counted in an [`InstructReport`]; [`InstructEncoder::preview`] shows one
//!   example as prompt / trained / cut spans.
//! - [`exact_match`] scores a generated answer against the reference.

mod encode;
mod metric;
mod read;

pub use encode::{
    InstructEncoder, InstructReport, InstructSet, Preview, PreviewSpan, SpanKind, TokenizedExample,
};
pub use metric::{exact_match, exact_match_rate, normalize_answer};
pub use read::{
    InstructFile, InstructFormat, InstructRecord, RecordBody, parse_instruct, read_instruct_file,
};

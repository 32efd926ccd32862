//! Instruction data: the four record formats, assistant-only loss masks (exact token
//! positions on a word-level tokenizer built here), truncation, previews, the bad-record
//! corpus, chat templates (HF conventions, tokenizer_config.json variants, errors), and — when
//! the SmolLM2-135M-Instruct folder is present — equality with transformers'
//! `apply_chat_template` and TRL's assistant mask (tests/reference/chat_smollm2.json, made by
//! scripts/reference_chat.py).

mod common;

use std::path::{Path, PathBuf};

use peft_studio::data::{
    CHATML, ChatTemplate, DataError, InstructEncoder, InstructFile, InstructFormat, Message,
    RecordBody, SpanKind, exact_match, parse_instruct, read_instruct_file,
};
use tokenizers::Tokenizer;

const SMOLLM2_DIR: &str = "/root/.cache/peft-peer/smollm2-135m-instruct-f32";

/// A word-level tokenizer: `<|im_start|>`/`<|im_end|>` are special tokens, words and each
/// punctuation run are tokens (`Whitespace` pre-tokenizer), unknown words are `[UNK]`.
fn tiny_tokenizer() -> Tokenizer {
    let words = [
        "[UNK]",
        "<|im_start|>",
        "<|im_end|>",
        "system",
        "user",
        "assistant",
        "hello",
        "there",
        "hi",
        "what",
        "is",
        "2",
        "+",
        "?",
        "4",
        "and",
        "3",
        "5",
        "be",
        "brief",
        "yes",
        "no",
        "ok",
        "the",
        "sky",
        "blue",
        ".",
        "!",
        ":",
        "!!",
        ":!!",
        "A",
        "U",
        "END",
    ];
    let json = common::chat::word_level_tokenizer(&words, serde_json::Value::Null);
    Tokenizer::from_bytes(json.to_string().as_bytes()).expect("tiny tokenizer")
}

fn chatml() -> ChatTemplate {
    ChatTemplate::new(CHATML, "ChatML", None, Some("<|im_end|>".into())).unwrap()
}

fn parse(content: &str) -> InstructFile {
    parse_instruct(Path::new("data.jsonl"), content).unwrap()
}

fn tokens(tok: &Tokenizer, ids: &[u32]) -> Vec<String> {
    ids.iter()
        .map(|&i| tok.id_to_token(i).unwrap_or_default())
        .collect()
}

/// The tokens the loss covers.
fn trained(tok: &Tokenizer, ids: &[u32], mask: &[bool]) -> Vec<String> {
    assert_eq!(ids.len(), mask.len());
    ids.iter()
        .zip(mask)
        .filter(|(_, m)| **m)
        .map(|(&i, _)| tok.id_to_token(i).unwrap_or_default())
        .collect()
}

fn positions(mask: &[bool]) -> Vec<usize> {
    mask.iter()
        .enumerate()
        .filter(|(_, m)| **m)
        .map(|(i, _)| i)
        .collect()
}

/// A fresh folder under the temp dir, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("peft-studio-instruct-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn write(&self, name: &str, content: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, content).unwrap();
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn chat_single_turn_trains_the_answer_and_end_of_turn_only() {
    let tok = tiny_tokenizer();
    let tpl = chatml();
    let file = parse(
        r#"{"messages": [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hi"}]}"#,
    );
    assert_eq!(file.format, InstructFormat::Chat);
    let enc = InstructEncoder::new(&tok, Some(&tpl), 64).unwrap();
    let ex = enc.encode(&file.records[0], &file).unwrap();
    assert_eq!(
        tokens(&tok, &ex.ids),
        [
            "<|im_start|>",
            "user",
            "hello",
            "there",
            "<|im_end|>",
            "<|im_start|>",
            "assistant",
            "hi",
            "<|im_end|>"
        ]
    );
    assert_eq!(positions(&ex.loss_mask), [7, 8]);
    assert_eq!(ex.reference.as_deref(), Some("hi"));
    assert_eq!(ex.prompt_messages, [Message::new("user", "hello there")]);
    assert!(!ex.truncated);
    assert_eq!(ex.at, "line 1");
    // The generation prompt ends where the answer starts.
    let prompt = enc.encode_prompt(&ex.prompt_messages).unwrap();
    assert_eq!(prompt, ex.ids[..7]);
}

#[test]
fn multi_turn_trains_every_assistant_turn() {
    let tok = tiny_tokenizer();
    let tpl = chatml();
    let file = parse(
        r#"{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is 2 + 2 ?"}, {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 2 + 3 ?"}, {"role": "assistant", "content": "5 ."}]}"#,
    );
    let enc = InstructEncoder::new(&tok, Some(&tpl), 64).unwrap();
    let ex = enc.encode(&file.records[0], &file).unwrap();
    let t = tokens(&tok, &ex.ids);
    // system turn 0..=4, user 5..=13, assistant 14..=17, user 18..=25, assistant 26..=30.
    assert_eq!(t[16], "4");
    assert_eq!(t[28], "5");
    assert_eq!(positions(&ex.loss_mask), [16, 17, 28, 29, 30]);
    assert_eq!(
        trained(&tok, &ex.ids, &ex.loss_mask),
        ["4", "<|im_end|>", "5", ".", "<|im_end|>"]
    );
    assert_eq!(ex.reference.as_deref(), Some("5 ."));
    assert_eq!(ex.prompt_messages.len(), 4);
}

#[test]
fn alpaca_records_become_one_exchange() {
    let tok = tiny_tokenizer();
    let tpl = chatml();
    let file = parse(concat!(
        r#"{"instruction": "what is 2 + 2", "input": "be brief", "output": "4", "system": "ok"}"#,
        "\n",
        r#"{"instruction": "hello", "input": "", "output": "hi there"}"#,
        "\n"
    ));
    assert_eq!(file.format, InstructFormat::Alpaca);
    let RecordBody::Chat(m) = &file.records[0].body else {
        panic!("a chat")
    };
    assert_eq!(
        m,
        &[
            Message::new("system", "ok"),
            Message::new("user", "what is 2 + 2\nbe brief"),
            Message::new("assistant", "4"),
        ]
    );
    let enc = InstructEncoder::new(&tok, Some(&tpl), 64).unwrap();
    let set = enc.encode_file(&file).unwrap();
    assert_eq!(set.examples.len(), 2);
    let b = &set.examples[1];
    // <|im_start|> user hello <|im_end|> <|im_start|> assistant hi there <|im_end|>
    assert_eq!(positions(&b.loss_mask), [6, 7, 8]);
    assert_eq!(b.prompt_messages, [Message::new("user", "hello")]);
    assert_eq!(set.report.trained_tokens, 2 + 3);
    assert_eq!(set.report.examples, 2);
    assert_eq!(
        set.report.tokens,
        set.examples.iter().map(|e| e.ids.len()).sum::<usize>()
    );
}

#[test]
fn sharegpt_maps_roles_and_system() {
    let tok = tiny_tokenizer();
    let tpl = chatml();
    let file = parse(
        r#"{"system": "be brief", "conversations": [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "hi"}, {"from": "human", "value": "the sky ?"}, {"from": "gpt", "value": "blue"}]}"#,
    );
    assert_eq!(file.format, InstructFormat::ShareGpt);
    let RecordBody::Chat(m) = &file.records[0].body else {
        panic!("a chat")
    };
    let roles: Vec<&str> = m.iter().map(|m| m.role.as_str()).collect();
    assert_eq!(roles, ["system", "user", "assistant", "user", "assistant"]);
    let enc = InstructEncoder::new(&tok, Some(&tpl), 64).unwrap();
    let ex = enc.encode(&file.records[0], &file).unwrap();
    assert_eq!(
        trained(&tok, &ex.ids, &ex.loss_mask),
        ["hi", "<|im_end|>", "blue", "<|im_end|>"]
    );
}

#[test]
fn prompt_completion_strings_and_messages() {
    let tok = tiny_tokenizer();
    let tpl = chatml();
    let file = parse(concat!(
        r#"{"prompt": "hello there", "completion": "hi"}"#,
        "\n",
        r#"{"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}], "completion": [{"role": "assistant", "content": "yes"}]}"#,
    ));
    assert_eq!(file.format, InstructFormat::PromptCompletion);
    let enc = InstructEncoder::new(&tok, Some(&tpl), 64).unwrap();
    let set = enc.encode_file(&file).unwrap();
    assert_eq!(positions(&set.examples[0].loss_mask), [7, 8]);
    let b = &set.examples[1];
    assert_eq!(trained(&tok, &b.ids, &b.loss_mask), ["yes", "<|im_end|>"]);
    assert_eq!(b.prompt_messages.len(), 2);
}

#[test]
fn plain_text_trains_every_token_and_ends_with_eos() {
    let tok = tiny_tokenizer();
    let tpl = chatml();
    let file = parse(r#"{"text": "the sky is blue ."}"#);
    assert_eq!(file.format, InstructFormat::Text);
    let enc = InstructEncoder::new(&tok, Some(&tpl), 64).unwrap();
    let ex = enc.encode(&file.records[0], &file).unwrap();
    assert_eq!(
        tokens(&tok, &ex.ids),
        ["the", "sky", "is", "blue", ".", "<|im_end|>"]
    );
    assert!(ex.loss_mask.iter().all(|&m| m));
    assert_eq!(ex.reference, None);
    // Without a template there is no end-of-text token to add.
    let enc = InstructEncoder::new(&tok, None, 64).unwrap();
    let ex = enc.encode(&file.records[0], &file).unwrap();
    assert_eq!(ex.ids.len(), 5);
}

#[test]
fn conversations_need_a_template() {
    let tok = tiny_tokenizer();
    let file = parse(r#"{"instruction": "hello", "output": "hi"}"#);
    let enc = InstructEncoder::new(&tok, None, 64).unwrap();
    let err = enc.encode(&file.records[0], &file).unwrap_err().to_string();
    assert!(err.contains("no chat template"), "{err}");
    assert!(InstructEncoder::new(&tok, None, 1).is_err());
}

#[test]
fn json_arrays_read_like_jsonl_with_indices() {
    let file = parse_instruct(
        Path::new("data.json"),
        r#" [ {"text": "hello"}, {"text": "hi there"} ] "#,
    )
    .unwrap();
    assert_eq!(file.records.len(), 2);
    assert_eq!(file.records[1].at, "record [1]");
    let err = parse_instruct(
        Path::new("data.json"),
        r#"[{"text": "hello"}, {"text": 3}]"#,
    )
    .unwrap_err()
    .to_string();
    assert_eq!(
        err,
        "data.json: record [1]: field 'text' must be a string, found a number"
    );
}

#[test]
fn truncation_keeps_the_start_counts_and_drops() {
    let tok = tiny_tokenizer();
    let tpl = chatml();
    let file = parse(concat!(
        // 9 tokens, answer at 7..=8: fits in 9.
        r#"{"messages": [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hi"}]}"#,
        "\n",
        // 11 tokens, answer "yes no ok" at 7..=10: cut at 9 keeps "yes no".
        r#"{"messages": [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "yes no ok"}]}"#,
        "\n",
        // 13 tokens, answer at 11..=12: all cut at 9, dropped.
        r#"{"messages": [{"role": "user", "content": "what is 2 + 2 ?"}, {"role": "assistant", "content": "4"}]}"#,
        "\n"
    ));
    let enc = InstructEncoder::new(&tok, Some(&tpl), 9).unwrap();
    let set = enc.encode_file(&file).unwrap();
    let r = &set.report;
    assert_eq!(
        (r.records, r.examples, r.truncated, r.dropped),
        (3, 2, 1, 1)
    );
    assert_eq!(r.longest, 13);
    assert_eq!(r.tokens, 18);
    assert_eq!(r.trained_tokens, 2 + 2);
    let cut = &set.examples[1];
    assert!(cut.truncated);
    assert_eq!(trained(&tok, &cut.ids, &cut.loss_mask), ["yes", "no"]);
    assert_eq!(r.notes.len(), 2, "{:?}", r.notes);
    assert!(r.notes[0].contains("1 of 3 examples are longer than 9 tokens"));
    assert!(r.notes[1].contains("1 examples dropped") && r.notes[1].contains("line 3"));
    // Nothing left at all: an error, not an empty set.
    let enc = InstructEncoder::new(&tok, Some(&tpl), 4).unwrap();
    let err = enc.encode_file(&file).unwrap_err();
    assert!(matches!(err, DataError::Empty { .. }), "{err}");
    assert!(err.to_string().contains("max_length 4"), "{err}");
}

#[test]
fn preview_splits_masked_trained_and_cut_text() {
    let tok = tiny_tokenizer();
    let tpl = chatml();
    let file = parse(
        r#"{"messages": [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "yes no ok"}]}"#,
    );
    let enc = InstructEncoder::new(&tok, Some(&tpl), 9).unwrap();
    let p = enc.preview(&file.records[0], &file).unwrap();
    let kinds: Vec<SpanKind> = p.spans.iter().map(|s| s.kind).collect();
    assert_eq!(kinds, [SpanKind::Masked, SpanKind::Trained, SpanKind::Cut]);
    assert_eq!(
        p.spans[0].text,
        "<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant"
    );
    assert_eq!(p.spans[1].text, "\nyes no");
    assert_eq!(p.spans[2].text, " ok<|im_end|>\n");
    assert_eq!((p.tokens, p.trained_tokens), (11, 2));
    let whole: String = p.spans.iter().map(|s| s.text.as_str()).collect();
    assert_eq!(
        whole,
        tpl.render(
            &[
                Message::new("user", "hello there"),
                Message::new("assistant", "yes no ok"),
            ],
            false
        )
        .unwrap()
    );
}

#[test]
fn merged_boundary_tokens_stay_masked() {
    // "A:" followed directly by the answer "!! yes": the word-level tokenizer makes one token
    // ":!!" across the boundary, so the prefix's tokens are not a prefix of the whole; the
    // straddling token must not be trained.
    let tok = tiny_tokenizer();
    let src = "{% for m in messages %}{% if m.role == 'user' %}U {{ m.content }}\n{% else %}A:{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}A:{% endif %}";
    let tpl = ChatTemplate::new(src, "test", None, Some("<|im_end|>".into())).unwrap();
    let file = parse(
        r#"{"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "!! yes"}]}"#,
    );
    let enc = InstructEncoder::new(&tok, Some(&tpl), 64).unwrap();
    let set = enc.encode_file(&file).unwrap();
    let ex = &set.examples[0];
    assert_eq!(
        tokens(&tok, &ex.ids),
        ["U", "hello", "A", ":!!", "yes", "<|im_end|>"]
    );
    assert_eq!(positions(&ex.loss_mask), [4, 5]);
    assert_eq!(set.report.offset_masked_turns, 1);
    assert_eq!(set.report.notes.len(), 1);
}

#[test]
fn templates_that_rewrite_earlier_turns_fall_back_to_finding_the_answer() {
    // Ends every rendering with END unless prompting: a prefix rendering is then not a prefix
    // of the whole, so each answer is found by its text.
    let tok = tiny_tokenizer();
    let src = "{% for m in messages %}<|im_start|>{{ m.role }} {{ m.content }}<|im_end|>{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant {% else %}END{% endif %}";
    let tpl = ChatTemplate::new(src, "test", None, Some("<|im_end|>".into())).unwrap();
    let file = parse(
        r#"{"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}, {"role": "user", "content": "the sky ?"}, {"role": "assistant", "content": "blue"}]}"#,
    );
    let enc = InstructEncoder::new(&tok, Some(&tpl), 64).unwrap();
    let set = enc.encode_file(&file).unwrap();
    let ex = &set.examples[0];
    assert_eq!(
        trained(&tok, &ex.ids, &ex.loss_mask),
        ["hi", "<|im_end|>", "blue", "<|im_end|>"]
    );
    assert_eq!(tokens(&tok, &ex.ids).last().unwrap(), "END");
}

/// Every bad record must fail with the file, the place and the field in the message.
#[test]
fn bad_records_name_file_line_and_field() {
    let u = r#"{"role": "user", "content": "hello"}"#;
    let a = r#"{"role": "assistant", "content": "hi"}"#;
    let cases: Vec<(String, &[&str])> = vec![
        (
            format!("{{\"messages\": [{u}, {a}]}}\n{{\"messages\": [{u}, {{\"role\": \"assistant\"}}]}}"),
            &["bad.jsonl: line 2:", "missing field 'messages[1].content'"],
        ),
        (
            format!("{{\"messages\": [{u}, {{\"role\": \"assistant\", \"content\": 7}}]}}"),
            &["line 1:", "'messages[1].content' must be a string, found a number"],
        ),
        (
            format!("{{\"messages\": [{u}, {{\"role\": \"assistant\", \"content\": \" \"}}]}}"),
            &["line 1:", "'messages[1].content' is empty"],
        ),
        (
            format!("{{\"messages\": [{u}, {{\"role\": \"tool\", \"content\": \"x\"}}]}}"),
            &["line 1:", "'messages[1].role'", "unknown role 'tool'"],
        ),
        (
            format!("{{\"messages\": [{u}]}}"),
            &["line 1:", "'messages'", "no assistant turn"],
        ),
        (
            "{\"messages\": []}".into(),
            &["line 1:", "field 'messages' is empty"],
        ),
        (
            "{\"messages\": \"hello\"}".into(),
            &["line 1:", "'messages' must be an array, found a string"],
        ),
        (
            format!("{{\"messages\": [{u}, \"hi\"]}}"),
            &["line 1:", "'messages[1]' must be an object, found a string"],
        ),
        (
            format!("{{\"messages\": [{u}, {a}]}}\n\n{{\"instruction\": \"x\", \"output\": \"y\"}}"),
            &["line 3:", "mixed formats", "'instruction'", "first record is chat"],
        ),
        (
            "{\"instruction\": \"x\", \"output\": \"y\"}\n{\"instruction\": \"x\"}".into(),
            &["line 2:", "missing field 'output'", "Alpaca"],
        ),
        (
            "{\"instruction\": \"\", \"output\": \"y\"}".into(),
            &["line 1:", "field 'instruction' is empty"],
        ),
        (
            "{\"instruction\": \"x\", \"input\": 3, \"output\": \"y\"}".into(),
            &["line 1:", "field 'input' must be a string, found a number"],
        ),
        (
            "{\"conversations\": [{\"from\": \"human\", \"value\": \"x\"}, {\"from\": \"bot\", \"value\": \"y\"}]}".into(),
            &["line 1:", "'conversations[1].from'", "unknown role 'bot'"],
        ),
        (
            "{\"conversations\": [{\"from\": \"human\", \"value\": \"x\"}]}".into(),
            &["line 1:", "no assistant turn"],
        ),
        (
            "{\"text\": \"ok\"}\n{\"text\": null}".into(),
            &["line 2:", "field 'text' must be a string, found null"],
        ),
        (
            "{\"text\": \"ok\"}\n{\"text\": \"ok\"".into(),
            &["line 2:", "invalid JSON at column"],
        ),
        (
            "{\"question\": \"x\", \"answer\": \"y\"}".into(),
            &["line 1:", "cannot tell the format", "'answer', 'question'"],
        ),
        (
            "{\"prompt\": \"x\", \"completion\": 5}".into(),
            &["line 1:", "'completion' must be a string or a list of messages, found a number"],
        ),
        (
            "{\"prompt\": [{\"role\": \"user\", \"content\": \"x\"}]}".into(),
            &["line 1:", "missing field 'completion'", "prompt-completion"],
        ),
        ("[1, 2]".into(), &["record [0]:", "expected a JSON object, found a number"]),
        (
            "[{\"text\": \"ok\"},\n {\"text\": \"ok\"".into(),
            &["bad.jsonl: line 2:", "invalid JSON"],
        ),
        ("\n  \n".into(), &["bad.jsonl", "no records"]),
        ("".into(), &["bad.jsonl", "no records"]),
    ];
    let dir = Scratch::new("bad");
    for (content, needles) in &cases {
        let path = dir.write("bad.jsonl", content);
        let err = match read_instruct_file(&path) {
            Ok(f) => panic!("accepted {content:?}: {f:?}"),
            Err(e) => e.to_string(),
        };
        for needle in *needles {
            assert!(
                err.contains(needle),
                "{content:?}\n -> {err}\n lacks {needle:?}"
            );
        }
    }
    let missing = read_instruct_file(&dir.0.join("nope.jsonl")).unwrap_err();
    assert!(matches!(missing, DataError::NotFound { .. }), "{missing}");
    let binary = dir.write("bin.jsonl", "");
    std::fs::write(&binary, [0xff, 0xfe, 0x00]).unwrap();
    assert!(
        read_instruct_file(&binary)
            .unwrap_err()
            .to_string()
            .contains("not UTF-8")
    );
}

#[test]
fn template_errors_name_origin_and_line() {
    let err = ChatTemplate::new(
        "line one\n{% for m in messages %}\n{{ m.content }",
        "tpl.jinja",
        None,
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.starts_with("chat template tpl.jinja, line 3: syntax error"),
        "{err}"
    );

    let src = "{% for m in messages %}\n{% if m.role == 'tool' %}\n{{ raise_exception('no tools here') }}\n{% endif %}{{ m.content }}{% endfor %}";
    let tpl = ChatTemplate::new(src, "tpl.jinja", None, None).unwrap();
    let err = tpl
        .render(&[Message::new("tool", "x")], false)
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "chat template tpl.jinja, line 3: invalid operation: the template raised an exception: \
         no tools here"
    );

    let tpl = ChatTemplate::new("{{ messages[0].nope.deeper }}", "t", None, None).unwrap();
    let err = tpl.render(&[Message::new("user", "x")], false).unwrap_err();
    assert!(err.to_string().contains("t, line 1"), "{err}");

    // A record's template error says which record was being rendered.
    let tok = tiny_tokenizer();
    let file = parse(
        r#"{"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]}"#,
    );
    let bad = ChatTemplate::new(
        "{{ raise_exception('only ' + messages[0].role) }}",
        "b.jinja",
        None,
        None,
    )
    .unwrap();
    let enc = InstructEncoder::new(&tok, Some(&bad), 64).unwrap();
    let err = enc.encode(&file.records[0], &file).unwrap_err().to_string();
    assert!(err.contains("b.jinja, line 1"), "{err}");
    assert!(
        err.contains("only user") && err.contains("data.jsonl line 1"),
        "{err}"
    );
}

#[test]
fn hf_environment_features() {
    // trim_blocks / lstrip_blocks: no stray newlines or indentation from block tags.
    let src = "{% for m in messages %}\n    {% if m.role == 'user' %}\nQ: {{ m.content | trim }}\n    {% else %}\nA: {{ m.content }}\n    {% endif %}\n{% endfor %}\n";
    let tpl = ChatTemplate::new(src, "t", None, None).unwrap();
    let msgs = [
        Message::new("user", "  hello "),
        Message::new("assistant", "hi"),
    ];
    assert_eq!(tpl.render(&msgs, false).unwrap(), "Q: hello\nA: hi\n");

    // Loop controls, Python string methods, namespace, tojson as json.dumps.
    let src = "{% set ns = namespace(n=0) %}{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}{% set ns.n = ns.n + 1 %}{{ m.content.strip().upper() }}{% if m.content.startswith('b') %}{% break %}{% endif %};{% endfor %}|{{ ns.n }}|{{ messages[0] | tojson }}|{{ {'a': [1, 2.5, none, true], 'é': '<x>'} | tojson }}";
    let tpl = ChatTemplate::new(src, "t", None, None).unwrap();
    let msgs = [
        Message::new("system", "s"),
        Message::new("user", " a "),
        Message::new("assistant", "b"),
        Message::new("user", "c"),
    ];
    assert_eq!(
        tpl.render(&msgs, false).unwrap(),
        "A;B|2|{\"role\": \"system\", \"content\": \"s\"}|{\"a\": [1, 2.5, null, true], \"é\": \"<x>\"}"
    );
    // tojson with indent, as json.dumps(indent=2).
    let tpl = ChatTemplate::new("{{ messages[0] | tojson(indent=2) }}", "t", None, None).unwrap();
    assert_eq!(
        tpl.render(&msgs[..1], false).unwrap(),
        "{\n  \"role\": \"system\",\n  \"content\": \"s\"\n}"
    );

    // Special tokens, tools (none), strftime_now.
    let src = "{{ bos_token }}{% if tools is none %}[no tools]{% endif %}{{ strftime_now('%Y') | length }}{{ eos_token }}";
    let tpl = ChatTemplate::new(src, "t", Some("<s>".into()), Some("</s>".into())).unwrap();
    assert_eq!(tpl.render(&[], false).unwrap(), "<s>[no tools]4</s>");
    let tpl = ChatTemplate::new("{{ strftime_now('%Q') }}", "t", None, None).unwrap();
    assert!(
        tpl.render(&[], false)
            .unwrap_err()
            .to_string()
            .contains("strftime_now")
    );
    // An absent token renders empty, like a missing key in transformers.
    let tpl = ChatTemplate::new("[{{ bos_token }}]", "t", None, None).unwrap();
    assert_eq!(tpl.render(&[], false).unwrap(), "[]");
}

#[test]
fn tokenizer_config_variants() {
    let dir = Scratch::new("cfg");
    let tpl = "{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}{{ eos_token }}";
    let msgs = [Message::new("user", "x")];

    // A string template; tokens as strings or as AddedToken objects.
    dir.write(
        "tokenizer_config.json",
        &serde_json::json!({
            "chat_template": tpl,
            "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": false},
            "eos_token": "</s>",
            "pad_token": null,
        })
        .to_string(),
    );
    let t = ChatTemplate::from_model_dir(&dir.0).unwrap().unwrap();
    assert_eq!(t.render(&msgs, false).unwrap(), "<s>x</s>");
    assert_eq!((t.bos_token(), t.eos_token()), (Some("<s>"), Some("</s>")));
    assert!(t.origin().ends_with("tokenizer_config.json"));

    // A list of named templates: "default" is used.
    dir.write(
        "tokenizer_config.json",
        &serde_json::json!({
            "chat_template": [
                {"name": "tool_use", "template": "TOOLS"},
                {"name": "default", "template": tpl},
            ],
            "eos_token": "</s>",
        })
        .to_string(),
    );
    let t = ChatTemplate::from_model_dir(&dir.0).unwrap().unwrap();
    assert_eq!(t.render(&msgs, false).unwrap(), "x</s>");

    // chat_template.jinja wins over the config's template, and keeps the config's tokens.
    dir.write(
        "chat_template.jinja",
        "J{{ messages[0].content }}{{ eos_token }}\n",
    );
    let t = ChatTemplate::from_model_dir(&dir.0).unwrap().unwrap();
    assert_eq!(t.render(&msgs, false).unwrap(), "Jx</s>");
    assert!(t.origin().ends_with("chat_template.jinja"));
    std::fs::remove_file(dir.0.join("chat_template.jinja")).unwrap();

    // No template at all: a base model.
    dir.write("tokenizer_config.json", r#"{"eos_token": "</s>"}"#);
    assert!(ChatTemplate::from_model_dir(&dir.0).unwrap().is_none());
    let empty = Scratch::new("empty");
    assert!(ChatTemplate::from_model_dir(&empty.0).unwrap().is_none());

    // Bad configs name the file.
    let bad: [(&str, &str); 4] = [
        (
            r#"{"chat_template": [{"name": "tool_use", "template": "T"}]}"#,
            "no template named 'default' (found: 'tool_use')",
        ),
        (
            r#"{"chat_template": [{"name": "default"}]}"#,
            "chat_template[0] must be an object with string fields",
        ),
        (r#"{"chat_template": 3}"#, "must be a string or a list"),
        ("{\"chat_template\": \n\"x", "line 2: invalid JSON"),
    ];
    for (content, needle) in bad {
        let p = dir.write("tokenizer_config.json", content);
        let err = ChatTemplate::from_model_dir(&dir.0)
            .unwrap_err()
            .to_string();
        assert!(err.contains(&p.display().to_string()), "{err}");
        assert!(err.contains(needle), "{content} -> {err}");
    }
    dir.write("tokenizer_config.json", r#"{"chat_template": "{% if %}"}"#);
    let err = ChatTemplate::from_tokenizer_config(&dir.0.join("tokenizer_config.json"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tokenizer_config.json, line 1: syntax error"),
        "{err}"
    );
}

#[test]
fn exact_match_normalises() {
    assert!(exact_match(" Spam.", "spam"));
    assert!(exact_match("HAM!\n", "ham"));
    assert!(!exact_match("It is spam", "spam"));
}

// ---- With SmolLM2-135M-Instruct (skipped when the folder is absent) -----------------------

fn smollm2() -> Option<(Tokenizer, ChatTemplate)> {
    let dir = Path::new(SMOLLM2_DIR);
    if !dir.join("tokenizer.json").is_file() {
        println!("note: {SMOLLM2_DIR} absent; skipping the SmolLM2 reference checks");
        return None;
    }
    let tok = Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let tpl = ChatTemplate::from_model_dir(dir)
        .unwrap()
        .expect("a chat template");
    Some((tok, tpl))
}

fn reference_cases() -> Vec<serde_json::Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/chat_smollm2.json");
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    doc["cases"].as_array().unwrap().clone()
}

/// The engine against transformers' jinja2 environment, on committed renderings: SmolLM2's
/// own template and templates in the styles of Llama 3 and Mistral, plus one exercising
/// namespaces, loop controls, tojson and Python string methods. Needs no model files.
#[test]
fn engine_renders_like_transformers() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/chat_smollm2.json");
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let token = |k: &str| doc[k].as_str().map(str::to_string);
    let (bos, eos) = (token("bos_token"), token("eos_token"));
    let smollm2 = ChatTemplate::new(
        doc["smollm2_chat_template"].as_str().unwrap(),
        "SmolLM2 chat_template.jinja",
        bos.clone(),
        eos.clone(),
    )
    .unwrap();
    let mut checked = 0;
    for case in doc["cases"].as_array().unwrap() {
        let messages: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
        assert_eq!(
            smollm2.render(&messages, false).unwrap(),
            case["text"].as_str().unwrap()
        );
        assert_eq!(
            smollm2
                .render(&messages[..messages.len() - 1], true)
                .unwrap(),
            case["prompt_text"].as_str().unwrap()
        );
        checked += 2;
    }
    let cases: Vec<Vec<Message>> = serde_json::from_value(doc["style_cases"].clone()).unwrap();
    for r in doc["style_renderings"].as_array().unwrap() {
        let name = r["template"].as_str().unwrap();
        let source = doc["style_templates"][name].as_str().unwrap();
        let tpl = ChatTemplate::new(source, name, bos.clone(), eos.clone()).unwrap();
        let messages = &cases[r["case"].as_u64().unwrap() as usize];
        let add_gen = r["add_generation_prompt"].as_bool().unwrap();
        assert_eq!(
            tpl.render(messages, add_gen).unwrap(),
            r["text"].as_str().unwrap(),
            "{name}, case {}, add_generation_prompt {add_gen}",
            r["case"]
        );
        checked += 1;
    }
    assert_eq!(checked, 8 + 12);
    // The Mistral-style template refuses roles that do not alternate, naming its line.
    let tpl = ChatTemplate::new(
        doc["style_templates"]["mistral_style"].as_str().unwrap(),
        "mistral_style",
        bos,
        eos,
    )
    .unwrap();
    let err = tpl
        .render(
            &[Message::new("user", "a"), Message::new("user", "b")],
            false,
        )
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("mistral_style, line 11") && err.contains("must alternate"),
        "{err}"
    );
}

#[test]
fn smollm2_renders_and_masks_like_transformers_and_trl() {
    let cases = reference_cases();
    assert_eq!(cases.len(), 4);
    let Some((tok, tpl)) = smollm2() else { return };
    assert_eq!(tpl.eos_token(), Some("<|im_end|>"));
    let enc = InstructEncoder::new(&tok, Some(&tpl), 4096).unwrap();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let messages: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
        assert_eq!(
            tpl.render(&messages, false).unwrap(),
            case["text"].as_str().unwrap(),
            "{name}: text"
        );
        assert_eq!(
            tpl.render(&messages[..messages.len() - 1], true).unwrap(),
            case["prompt_text"].as_str().unwrap(),
            "{name}: prompt text"
        );
        let line = serde_json::json!({ "messages": messages }).to_string();
        let file = parse(&line);
        let ex = enc.encode(&file.records[0], &file).unwrap();
        let ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        let mask: Vec<bool> = case["assistant_mask"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64() == Some(1))
            .collect();
        assert_eq!(ex.ids, ids, "{name}: ids");
        assert_eq!(ex.loss_mask, mask, "{name}: assistant mask");
        assert!(ex.trained_tokens() > 0);
    }
}

#[test]
fn spam_chat_task_files_when_fetched() {
    let dl = Path::new(env!("CARGO_MANIFEST_DIR")).join("downloads");
    let (train, eval) = (
        dl.join("spam-chat-train.jsonl"),
        dl.join("spam-chat-eval.jsonl"),
    );
    if !train.is_file() || !eval.is_file() {
        println!(
            "note: downloads/spam-chat-*.jsonl absent (scripts/fetch-models.sh --data-only); skipping"
        );
        return;
    }
    let eval = read_instruct_file(&eval).unwrap();
    assert_eq!(eval.format, InstructFormat::Chat);
    assert_eq!(eval.records.len(), 400);
    let Some((tok, tpl)) = smollm2() else { return };
    let enc = InstructEncoder::new(&tok, Some(&tpl), 256).unwrap();
    let set = enc.encode_file(&eval).unwrap();
    assert_eq!(set.report.dropped, 0);
    let spam = set
        .examples
        .iter()
        .filter(|e| e.reference.as_deref() == Some("spam"))
        .count();
    assert_eq!(spam, 200);
    for ex in &set.examples {
        // "spam"/"ham" is one or two tokens, then <|im_end|>.
        assert!((2..=3).contains(&ex.trained_tokens()), "{}", ex.at);
    }
    println!(
        "spam-chat eval: {} examples, {} tokens (mean {:.0}, longest {})",
        set.report.examples,
        set.report.tokens,
        set.report.tokens as f64 / set.report.examples as f64,
        set.report.longest
    );
    let started = std::time::Instant::now();
    let train = read_instruct_file(&train).unwrap();
    let set = enc.encode_file(&train).unwrap();
    println!(
        "spam-chat train: {} examples, {} tokens, {} truncated at 256, {} dropped; read and \
         encoded in {:.2} s",
        set.report.examples,
        set.report.tokens,
        set.report.truncated,
        set.report.dropped,
        started.elapsed().as_secs_f64()
    );
    assert!(set.report.examples > 5000);
}

//! "Try it": a prompt answered by the base and the fine-tuned model, on a tiny chat model
//! written here (random LLaMA weights, a word-level tokenizer, ChatML). Checked: answers
//! between steps leave training exactly as it was; the base answer is the base model's (the
//! adapter switched off and back on); a finished run answers as `generate --adapter` does; a
//! paused run answers and stays paused; bad targets fail with the path named.

mod common;

use common::chat::{chat_model, config, yes_data};

use std::path::Path;
use std::time::Duration;

use peft_studio::data::Message;
use peft_studio::models::ModelSource;
use peft_studio::models::llama::{GenerateOptions, generate_text, load_language_model};
use peft_studio::train::causal_lm::{apply_trained, trained_at};
use peft_studio::train::try_it::{Side, TryItEvent, TryItRequest, TryItSession, TryItTarget};
use peft_studio::train::{
    Control, Controller, Event, NeverStop, Phase, RunStore, TrainConfig, train,
};
use peft_studio::worker::{Command, Worker};

const PROMPT: &str = "is the sky blue ?";

fn request(id: u64, target: TryItTarget) -> TryItRequest {
    TryItRequest {
        id,
        prompt: PROMPT.into(),
        max_new_tokens: 6,
        target,
        device: peft_studio::device::DeviceChoice::Cpu,
    }
}

/// What one request reported: per side, the label and the streamed text (checked to equal
/// the pieces' concatenation and to have ended with `Done`), or why it was unavailable.
#[derive(Debug, Default)]
struct Answers {
    base: Option<(String, String)>,
    tuned: Option<(String, String)>,
    unavailable: Vec<(Side, String)>,
    failed: Option<String>,
}

fn collect(events: &[TryItEvent], id: u64) -> Answers {
    let mut a = Answers::default();
    let mut open: Option<(Side, String, String)> = None;
    for e in events.iter().filter(|e| e.id() == id) {
        match e {
            TryItEvent::Started { side, label, .. } => {
                assert!(open.is_none(), "a side started before the last ended");
                open = Some((*side, label.clone(), String::new()));
            }
            TryItEvent::Text { side, piece, .. } => {
                let o = open.as_mut().expect("text before Started");
                assert_eq!(o.0, *side);
                o.2.push_str(piece);
            }
            TryItEvent::Done { side, tokens, .. } => {
                let (s, label, text) = open.take().expect("Done before Started");
                assert_eq!(s, *side);
                assert!(*tokens >= 1);
                let slot = match side {
                    Side::Base => &mut a.base,
                    Side::Tuned => &mut a.tuned,
                };
                *slot = Some((label, text.trim().to_string()));
            }
            TryItEvent::Unavailable { side, reason, .. } => {
                a.unavailable.push((*side, reason.clone()))
            }
            TryItEvent::Failed { error, .. } => a.failed = Some(error.clone()),
        }
    }
    assert!(open.is_none(), "a side never finished");
    a
}

/// The greedy answer `generate --model MODEL [--adapter RUN]` gives to [`PROMPT`].
fn reference_answer(model: &Path, run: Option<&Path>) -> String {
    let mut lm = load_language_model(model, &candle_core::Device::Cpu).unwrap();
    if let Some(run) = run {
        apply_trained(&mut lm, &trained_at(run).unwrap()).unwrap();
    }
    let template = peft_studio::train::causal_lm::chat_template(&lm.tokenizer, model)
        .unwrap()
        .unwrap();
    let prompt = template
        .render(&[Message::new("user", PROMPT)], true)
        .unwrap();
    let ids = lm.tokenizer.encode(&prompt, false).unwrap();
    let opts = GenerateOptions {
        max_new_tokens: 6,
        stop_ids: lm.tokenizer.stop_ids.clone(),
        ..GenerateOptions::default()
    };
    generate_text(&lm.model, &lm.tokenizer, &ids, &opts, &mut |_| true)
        .unwrap()
        .text
        .trim()
        .to_string()
}

/// Asks before the given steps (serving once per step), else goes on.
struct AskBefore {
    steps: Vec<usize>,
    next_step: usize,
    pending: Vec<TryItRequest>,
}

impl Controller for AskBefore {
    fn check(&mut self) -> Control {
        if let Some(i) = self.steps.iter().position(|&s| s == self.next_step) {
            self.steps.remove(i);
            self.pending.push(request(
                self.next_step as u64,
                TryItTarget::Run("unused".into()),
            ));
            return Control::Serve;
        }
        self.next_step += 1;
        Control::Continue
    }

    fn take_try_it(&mut self) -> Vec<TryItRequest> {
        std::mem::take(&mut self.pending)
    }
}

#[test]
fn answers_between_steps_leave_training_unchanged_and_the_base_answer_is_the_base_models() {
    let dir = common::TempDir::new("try-it-steps");
    let model = chat_model(&dir.path("model"));
    let data = yes_data(&dir.0);
    let cfg = config(&model, &data, 8);

    let plain_store = RunStore::new(dir.path("plain"));
    let plain = train(&cfg, &plain_store, &mut NeverStop, &mut |_| {}).unwrap();

    let asked_store = RunStore::new(dir.path("asked"));
    let mut events = Vec::new();
    let mut ctl = AskBefore {
        steps: vec![3, 7],
        next_step: 1,
        pending: Vec::new(),
    };
    let asked = train(&cfg, &asked_store, &mut ctl, &mut |e| {
        if let Event::TryIt(t) = e {
            events.push(t)
        }
    })
    .unwrap();
    assert!(ctl.steps.is_empty(), "both questions were asked");

    // Generating between steps (the adapter off for the base answer, then on again) changes
    // nothing of the training: every step's loss is the same as without questions.
    let (a, b) = (
        common::step_losses(&plain_store, &plain.id),
        common::step_losses(&asked_store, &asked.id),
    );
    assert_eq!(a.len(), 8);
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() < 1e-9, "losses {a:?} vs {b:?}");
    }

    let base = reference_answer(&model, None);
    for (id, done) in [(3u64, 2usize), (7, 6)] {
        let got = collect(&events, id);
        assert!(got.failed.is_none(), "{got:?}");
        let (label, text) = got.base.expect("a base answer");
        assert_eq!(label, "base model (adapter off)");
        assert_eq!(text, base, "the base answer is the base model's");
        let (label, _) = got.tuned.expect("a fine-tuned answer");
        assert_eq!(label, format!("fine-tuned so far: step {done} of 8"));
    }
}

#[test]
fn a_finished_run_answers_as_generate_with_its_adapter_does() {
    let dir = common::TempDir::new("try-it-run");
    let model = chat_model(&dir.path("model"));
    let data = yes_data(&dir.0);
    let store = RunStore::new(dir.path("runs"));
    let run = train(
        &config(&model, &data, 12),
        &store,
        &mut NeverStop,
        &mut |_| {},
    )
    .unwrap();
    let run_dir = store.root().join(&run.id);

    let mut session = TryItSession::new();
    let mut events = Vec::new();
    session.serve(&request(1, TryItTarget::Run(run_dir.clone())), &mut |e| {
        events.push(e)
    });
    // The same model answers the next prompt without loading again.
    session.serve(&request(2, TryItTarget::Run(run_dir.clone())), &mut |e| {
        events.push(e)
    });
    let base = reference_answer(&model, None);
    let tuned = reference_answer(&model, Some(&run_dir));
    // Twelve steps on "yes" answers: the fine-tuned model says it, the random base does not.
    assert_eq!(tuned, "yes");
    assert_ne!(base, "yes");
    for id in [1, 2] {
        let got = collect(&events, id);
        assert!(got.failed.is_none(), "{got:?}");
        assert_eq!(got.base.as_ref().map(|b| b.1.as_str()), Some(base.as_str()));
        let (label, text) = got.tuned.expect("a fine-tuned answer");
        assert_eq!(text, tuned);
        assert!(label.contains(&run.id), "{label}");
    }

    // The base model alone: its answer, and the other side says why it has none.
    let mut events = Vec::new();
    let target = TryItTarget::Model(ModelSource::Folder {
        path: model.clone(),
    });
    session.serve(&request(3, target), &mut |e| events.push(e));
    let got = collect(&events, 3);
    assert_eq!(got.base.map(|b| b.1), Some(base));
    assert!(got.tuned.is_none());
    assert_eq!(got.unavailable.len(), 1);
    assert_eq!(got.unavailable[0].0, Side::Tuned);
}

#[test]
fn bad_targets_fail_naming_the_folder() {
    let dir = common::TempDir::new("try-it-bad");
    let mut session = TryItSession::new();
    let missing = dir.path("no-such-run");
    let mut events = Vec::new();
    session.serve(&request(1, TryItTarget::Run(missing.clone())), &mut |e| {
        events.push(e)
    });
    let error = collect(&events, 1).failed.expect("a failure");
    assert!(error.contains(&missing.display().to_string()), "{error}");

    // A run that trained a classifier.
    let run = dir.path("classifier-run");
    std::fs::create_dir_all(&run).unwrap();
    let cfg = TrainConfig::default();
    std::fs::write(run.join("config.toml"), cfg.to_toml()).unwrap();
    let mut events = Vec::new();
    session.serve(&request(2, TryItTarget::Run(run.clone())), &mut |e| {
        events.push(e)
    });
    let error = collect(&events, 2).failed.expect("a failure");
    assert!(error.contains("classifier"), "{error}");
}

fn next_event(w: &Worker) -> Event {
    w.events()
        .recv_timeout(Duration::from_secs(120))
        .expect("the worker answers within two minutes")
}

#[test]
fn a_paused_run_answers_and_stays_paused_then_the_idle_worker_answers_with_the_run() {
    let dir = common::TempDir::new("try-it-worker");
    let model = chat_model(&dir.path("model"));
    let data = yes_data(&dir.0);
    let store = RunStore::new(dir.path("runs"));
    let w = Worker::spawn(store.clone(), || {}).unwrap();
    w.send(Command::Start(Box::new(config(&model, &data, 6))));
    loop {
        if let Event::Step { .. } = next_event(&w) {
            break;
        }
    }
    w.send(Command::Pause);
    loop {
        if let Event::Phase(Phase::Paused) = next_event(&w) {
            break;
        }
    }
    w.send(Command::TryIt(request(
        5,
        TryItTarget::Run("unused while training".into()),
    )));
    let mut events = Vec::new();
    let mut done = 0;
    while done < 2 {
        match next_event(&w) {
            Event::TryIt(t) => {
                done += matches!(t, TryItEvent::Done { .. }) as usize;
                assert!(!matches!(t, TryItEvent::Failed { .. }), "{t:?}");
                events.push(t);
            }
            Event::Step { step, .. } => panic!("step {step} ran while paused"),
            _ => {}
        }
    }
    let got = collect(&events, 5);
    assert!(got.tuned.unwrap().0.starts_with("fine-tuned so far: step "));
    w.send(Command::Resume);
    let summary = loop {
        match next_event(&w) {
            Event::RunFinished(s) => break s,
            Event::RunFailed { error, .. } => panic!("{error}"),
            _ => {}
        }
    };
    assert_eq!(summary.steps_done, 6);

    // Idle, the worker loads the run to answer.
    w.send(Command::TryIt(request(
        6,
        TryItTarget::Run(store.root().join(&summary.id)),
    )));
    let mut events = Vec::new();
    while events
        .iter()
        .filter(|e| matches!(e, TryItEvent::Done { .. }))
        .count()
        < 2
    {
        if let Event::TryIt(t) = next_event(&w) {
            assert!(!matches!(t, TryItEvent::Failed { .. }), "{t:?}");
            events.push(t);
        }
    }
    let got = collect(&events, 6);
    assert!(got.base.is_some() && got.tuned.is_some());
}

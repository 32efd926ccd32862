//! The Fine-tune tab's "Try it" panel (language models): a prompt box, and the base model's
//! and the fine-tuned model's answers side by side, streamed in as the worker writes them.
//! During a run the run answers between steps with its adapter as trained so far; afterwards
//! the worker loads the finished run. Nothing here generates: the panel sends
//! [`Command::TryIt`] and shows the [`TryItEvent`]s that come back.

use std::collections::HashMap;

use egui::{RichText, Ui};
use serde::{Deserialize, Serialize};

use super::{StudioApp, UiState};
use crate::train::RunStatus;
use crate::train::try_it::{MAX_NEW_TOKENS, Side, TryItEvent, TryItRequest, TryItTarget};
use crate::worker::Command;

/// What the panel remembers between launches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TryItSettings {
    /// The prompt.
    pub prompt: String,
    /// Most new tokens per answer.
    pub max_new_tokens: usize,
}

impl Default for TryItSettings {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            max_new_tokens: 64,
        }
    }
}

/// Where one side's answer stands.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum AnswerStatus {
    /// Not asked yet.
    #[default]
    Empty,
    /// Asked; nothing has come back.
    Waiting,
    /// Text is arriving.
    Streaming,
    /// Finished: tokens, speed and why it ended, in words.
    Done(String),
    /// This side cannot answer, and why.
    Unavailable(String),
    /// The request failed.
    Failed(String),
}

/// One side's answer.
#[derive(Debug, Clone, Default)]
pub struct Answer {
    /// Which model answered, in words.
    pub label: String,
    /// The text so far.
    pub text: String,
    /// Where it stands.
    pub status: AnswerStatus,
}

impl Answer {
    fn is_over(&self) -> bool {
        matches!(
            self.status,
            AnswerStatus::Empty
                | AnswerStatus::Done(_)
                | AnswerStatus::Unavailable(_)
                | AnswerStatus::Failed(_)
        )
    }
}

/// The panel's state: the request in flight and both answers.
#[derive(Debug, Default)]
pub struct TryItView {
    next_id: u64,
    /// The request being answered.
    pending: Option<u64>,
    /// The base model's answer.
    pub base: Answer,
    /// The fine-tuned model's answer.
    pub tuned: Answer,
    /// Whether each run trains a language model (read once from its config).
    run_is_lm: HashMap<String, bool>,
    /// The finished run whose answers are compared (`None`: the base model alone).
    chosen: Option<String>,
    /// The window's current run when last drawn (a newly finished one becomes the choice).
    last_current: Option<String>,
}

impl TryItView {
    /// Whether an answer is still coming.
    pub fn is_waiting(&self) -> bool {
        self.pending.is_some()
    }

    /// Takes an event of the request in flight (others are from an earlier request: dropped).
    pub fn apply(&mut self, e: &TryItEvent) {
        if self.pending != Some(e.id()) {
            return;
        }
        match e {
            TryItEvent::Started { side, label, .. } => {
                let a = self.side_mut(*side);
                a.label = label.clone();
                a.status = AnswerStatus::Streaming;
            }
            TryItEvent::Text { side, piece, .. } => self.side_mut(*side).text.push_str(piece),
            TryItEvent::Done {
                side,
                tokens,
                tokens_per_s,
                stop,
                ..
            } => {
                self.side_mut(*side).status = AnswerStatus::Done(format!(
                    "{tokens} tokens at {tokens_per_s:.1} tokens/s, {stop}"
                ))
            }
            TryItEvent::Unavailable { side, reason, .. } => {
                self.side_mut(*side).status = AnswerStatus::Unavailable(reason.clone())
            }
            TryItEvent::Failed { error, .. } => {
                for a in [&mut self.base, &mut self.tuned] {
                    if !a.is_over() {
                        a.status = AnswerStatus::Failed(error.clone());
                    }
                }
            }
        }
        if self.base.is_over() && self.tuned.is_over() {
            self.pending = None;
        }
    }

    fn side_mut(&mut self, side: Side) -> &mut Answer {
        match side {
            Side::Base => &mut self.base,
            Side::Tuned => &mut self.tuned,
        }
    }

    /// Starts a request: both answers wait.
    fn ask(
        &mut self,
        prompt: &str,
        max_new_tokens: usize,
        target: TryItTarget,
        device: crate::device::DeviceChoice,
    ) -> TryItRequest {
        self.next_id += 1;
        self.pending = Some(self.next_id);
        for a in [&mut self.base, &mut self.tuned] {
            *a = Answer {
                status: AnswerStatus::Waiting,
                ..Answer::default()
            };
        }
        TryItRequest {
            id: self.next_id,
            prompt: prompt.to_string(),
            max_new_tokens,
            target,
            device,
        }
    }
}

/// Whether run `id` of the app's store trains a language model (cached per run).
fn run_is_lm(app: &mut StudioApp, id: &str) -> bool {
    if let Some(v) = app.try_it.run_is_lm.get(id) {
        return *v;
    }
    let v = app
        .store
        .config(id)
        .ok()
        .and_then(|c| crate::train::causal_lm::is_language_model(&c.model.source).ok())
        .unwrap_or(false);
    app.try_it.run_is_lm.insert(id.to_string(), v);
    v
}

/// The store's finished or stopped language-model runs, newest first: (id, name).
fn finished_lm_runs(app: &mut StudioApp) -> Vec<(String, String)> {
    let done: Vec<(String, String)> = app
        .runs
        .iter()
        .filter(|r| matches!(r.status, RunStatus::Finished | RunStatus::Stopped))
        .map(|r| (r.id.clone(), r.name.clone()))
        .collect();
    done.into_iter()
        .filter(|(id, _)| run_is_lm(app, id))
        .collect()
}

/// The current run, when it trains a language model.
fn current_lm_run(app: &mut StudioApp) -> Option<String> {
    let id = app.run.run_id.clone()?;
    run_is_lm(app, &id).then_some(id)
}

/// Who answers a prompt now, and that in words.
fn target(app: &mut StudioApp) -> (TryItTarget, String) {
    let current = current_lm_run(app);
    if let Some(id) = &current
        && app.run.state.is_busy()
    {
        return (
            TryItTarget::Run(app.store.root().join(id)),
            format!(
                "{}: the run answers between steps, with its adapter as trained so far",
                app.run.name
            ),
        );
    }
    // A run that just finished becomes the one compared.
    if current != app.try_it.last_current {
        app.try_it.last_current = current.clone();
        if current.is_some() && matches!(app.run.state, UiState::Finished | UiState::Stopped) {
            app.try_it.chosen = current;
        }
    }
    if let Some(id) = app.try_it.chosen.clone() {
        if app.runs.iter().any(|r| r.id == id) {
            return (
                TryItTarget::Run(app.store.root().join(&id)),
                format!("fine-tuned: {id}"),
            );
        }
        app.try_it.chosen = None;
    }
    (
        TryItTarget::Model(app.settings.config.model.source.clone()),
        format!(
            "{}: no fine-tuned run chosen (train one, or pick a finished run)",
            app.settings.config.model.source.display_name()
        ),
    )
}

/// The run chooser: finished language-model runs, or the base model alone.
fn run_choice_ui(app: &mut StudioApp, ui: &mut Ui) {
    if app.run.state.is_busy() && current_lm_run(app).is_some() {
        return;
    }
    let runs = finished_lm_runs(app);
    if runs.is_empty() {
        return;
    }
    let shown = app
        .try_it
        .chosen
        .clone()
        .unwrap_or_else(|| "none: the base model alone".into());
    ui.label("compare with");
    egui::ComboBox::from_id_salt("try_it_run")
        .selected_text(shown)
        .show_ui(ui, |ui| {
            ui.selectable_value(&mut app.try_it.chosen, None, "none: the base model alone");
            for (id, name) in runs {
                ui.selectable_value(&mut app.try_it.chosen, Some(id.clone()), &id)
                    .on_hover_text(name);
            }
        });
}

/// Whether the panel belongs on the tab: the form's model, or the current run's, is a
/// language model.
pub fn wanted(app: &mut StudioApp) -> bool {
    let source = app.settings.config.model.source.clone();
    app.form.is_language_model(&source)
        || current_lm_run(app).is_some()
        || app.try_it.chosen.is_some()
}

/// Draws the panel.
pub fn show(app: &mut StudioApp, ui: &mut Ui) {
    let (target, who) = target(app);
    ui.add_space(4.0);
    ui.horizontal_wrapped(|ui| {
        ui.label(RichText::new("Try it").strong().size(15.0));
        ui.label(RichText::new(who).small());
        run_choice_ui(app, ui);
    });
    let edit = ui.add(
        egui::TextEdit::multiline(&mut app.settings.try_it.prompt)
            .desired_rows(2)
            .desired_width(f32::INFINITY)
            .hint_text("a message for the model, e.g. a question like those in your data"),
    );
    let ctrl_enter =
        edit.has_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter) && i.modifiers.command);
    ui.horizontal(|ui| {
        let can_ask = app.worker.is_some()
            && !app.try_it.is_waiting()
            && !app.settings.try_it.prompt.trim().is_empty();
        let ask = ui
            .add_enabled(can_ask, egui::Button::new("Ask both"))
            .on_hover_text(
                "the base model and the fine-tuned one answer the same prompt (greedy; Ctrl+Enter)",
            );
        ui.label("max new tokens");
        ui.add(
            egui::DragValue::new(&mut app.settings.try_it.max_new_tokens).range(1..=MAX_NEW_TOKENS),
        );
        if app.try_it.is_waiting() && app.run.state.is_busy() {
            ui.label(RichText::new("the run answers after its current step").small());
        }
        if (ask.clicked() || ctrl_enter) && can_ask {
            let s = &app.settings.try_it;
            let device = app.settings.config.device;
            let req = app
                .try_it
                .ask(s.prompt.trim(), s.max_new_tokens, target, device);
            app.send(Command::TryIt(req));
        }
    });
    ui.columns(2, |cols| {
        answer_ui(&mut cols[0], "Base model", &app.try_it.base, "try_it_base");
        answer_ui(
            &mut cols[1],
            "Fine-tuned",
            &app.try_it.tuned,
            "try_it_tuned",
        );
    });
}

/// The least height of an answer's box (the panel can be dragged taller).
const ANSWER_HEIGHT: f32 = 110.0;

fn answer_ui(ui: &mut Ui, title: &str, a: &Answer, id: &str) {
    ui.horizontal_wrapped(|ui| {
        ui.label(RichText::new(title).strong());
        if !a.label.is_empty() {
            ui.label(RichText::new(format!("({})", a.label)).small());
        }
    });
    let (note, color) = match &a.status {
        AnswerStatus::Empty => (String::new(), ui.visuals().weak_text_color()),
        AnswerStatus::Waiting => ("waiting…".into(), ui.visuals().weak_text_color()),
        AnswerStatus::Streaming => ("answering…".into(), ui.visuals().weak_text_color()),
        AnswerStatus::Done(s) => (s.clone(), ui.visuals().weak_text_color()),
        AnswerStatus::Unavailable(s) => (s.clone(), ui.visuals().weak_text_color()),
        AnswerStatus::Failed(s) => (format!("failed: {s}"), ui.visuals().error_fg_color),
    };
    egui::ScrollArea::vertical()
        .id_salt(id)
        .min_scrolled_height(ANSWER_HEIGHT)
        .max_height((ui.available_height() - 22.0).max(ANSWER_HEIGHT))
        .stick_to_bottom(true)
        .show(ui, |ui| {
            ui.set_min_height(ANSWER_HEIGHT);
            ui.add(egui::Label::new(RichText::new(&a.text).monospace()).wrap());
        });
    if !note.is_empty() {
        ui.colored_label(color, RichText::new(note).small());
    }
}

//! The background worker: a named thread that takes [`Command`]s and sends [`Event`]s over
//! crossbeam channels. All heavy work (loading, training, saving) happens here, never on the
//! UI thread. A panic inside a run becomes [`Event::RunFailed`], never a dead thread; stop and
//! pause are honoured between steps; the worker ends when told to or when the other side of
//! the channel is gone. Between runs it answers Try-it prompts ([`Command::TryIt`]). A panicking run is recorded as failed in its folder; if even that
//! fails, the reason is sent once as [`Event::Log`].

use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, TryRecvError};

use crate::train::store::{read_summary, write_summary};
use crate::train::try_it::{TryItEvent, TryItRequest, TryItSession};
use crate::train::{
    Control, Controller, Phase, RunFailure, RunStatus, RunStore, RunSummary, TrainConfig,
};

/// What the UI (or a test) asks of the worker.
#[derive(Debug, Clone)]
pub enum Command {
    /// Train with this config (refused while a run is in progress).
    Start(Box<TrainConfig>),
    /// Continue the run in this folder from its last checkpoint, as `train --resume` does
    /// (refused while a run is in progress).
    ResumeRun(PathBuf),
    /// Stop the current run after the current step; its metrics so far are kept.
    Stop,
    /// Pause the current run between steps.
    Pause,
    /// Resume a paused run.
    Resume,
    /// Answer a prompt with the base and the fine-tuned model ("Try it"): the run in progress
    /// answers between steps with the model it is training; otherwise the request's target
    /// is loaded (and kept for the next prompt).
    TryIt(TryItRequest),
    /// End the worker thread (stopping any run first).
    Shutdown,
}

pub use crate::train::Event;

/// The function that performs a run (the real trainer, or a stand-in in tests).
pub type Runner = Arc<
    dyn Fn(
            &TrainConfig,
            &RunStore,
            &mut dyn Controller,
            &mut dyn FnMut(Event),
        ) -> Result<RunSummary, RunFailure>
        + Send
        + Sync,
>;

/// A run the worker performs.
enum Job {
    Train(Box<TrainConfig>),
    Resume(PathBuf),
}

/// Handle of the worker thread. Dropping it shuts the worker down.
pub struct Worker {
    commands: Sender<Command>,
    events: Receiver<Event>,
    thread: Option<JoinHandle<()>>,
}

/// Polls the command channel between steps.
struct ChannelController<'a> {
    commands: &'a Receiver<Command>,
    send: &'a dyn Fn(Event),
    shutdown: bool,
    paused: bool,
    try_it: Vec<TryItRequest>,
}

impl Controller for ChannelController<'_> {
    fn check(&mut self) -> Control {
        loop {
            let cmd = if self.paused {
                match self.commands.recv() {
                    Ok(c) => c,
                    Err(_) => return Control::Stop,
                }
            } else {
                match self.commands.try_recv() {
                    Ok(c) => c,
                    // Waiting requests are taken by the trainer after every check.
                    Err(TryRecvError::Empty) => return Control::Continue,
                    Err(TryRecvError::Disconnected) => return Control::Stop,
                }
            };
            match cmd {
                Command::Stop => return Control::Stop,
                Command::Shutdown => {
                    self.shutdown = true;
                    return Control::Stop;
                }
                Command::Pause if !self.paused => {
                    self.paused = true;
                    (self.send)(Event::Phase(Phase::Paused));
                }
                Command::Resume if self.paused => {
                    self.paused = false;
                    (self.send)(Event::Phase(Phase::Training));
                    return Control::Continue;
                }
                Command::TryIt(req) => {
                    self.try_it.push(req);
                    // A paused run answers at once and stays paused.
                    if self.paused {
                        return Control::Serve;
                    }
                }
                Command::Start(_) | Command::ResumeRun(_) => {
                    (self.send)(Event::Refused("a run is in progress: stop it first".into()))
                }
                Command::Pause | Command::Resume => {}
            }
        }
    }

    fn take_try_it(&mut self) -> Vec<TryItRequest> {
        std::mem::take(&mut self.try_it)
    }
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

impl Worker {
    /// Starts the worker with the real trainer. `notify` runs after every event (e.g. to ask
    /// egui for a repaint).
    pub fn spawn(store: RunStore, notify: impl Fn() + Send + 'static) -> std::io::Result<Self> {
        Self::spawn_with(store, Arc::new(crate::train::train), notify)
    }

    /// Starts the worker with a given runner.
    pub fn spawn_with(
        store: RunStore,
        runner: Runner,
        notify: impl Fn() + Send + 'static,
    ) -> std::io::Result<Self> {
        let (cmd_tx, cmd_rx) = crossbeam_channel::unbounded::<Command>();
        let (ev_tx, ev_rx) = crossbeam_channel::unbounded::<Event>();
        let thread = std::thread::Builder::new()
            .name("peft-studio-worker".into())
            .spawn(move || {
                let send = |e: Event| {
                    // The UI side is gone: nothing left to tell.
                    let _ = ev_tx.send(e);
                    notify();
                };
                let mut try_it = TryItSession::new();
                while let Ok(cmd) = cmd_rx.recv() {
                    let job = match cmd {
                        Command::Start(cfg) => Job::Train(cfg),
                        Command::ResumeRun(path) => Job::Resume(path),
                        Command::TryIt(req) => {
                            serve_try_it(&mut try_it, &req, &send);
                            continue;
                        }
                        Command::Shutdown => break,
                        Command::Stop | Command::Pause | Command::Resume => continue,
                    };
                    // The run needs the memory more than the next prompt.
                    try_it.unload();
                    let mut ctl = ChannelController {
                        commands: &cmd_rx,
                        send: &send,
                        shutdown: false,
                        paused: false,
                        try_it: Vec::new(),
                    };
                    let mut started: Option<String> = None;
                    let mut emit = |e: Event| {
                        if let Event::RunStarted { run_id, .. } = &e {
                            started = Some(run_id.clone());
                        }
                        send(e);
                    };
                    let result = std::panic::catch_unwind(AssertUnwindSafe(|| match &job {
                        Job::Train(cfg) => runner(cfg, &store, &mut ctl, &mut emit),
                        Job::Resume(path) => crate::train::resume(path, &mut ctl, &mut emit),
                    }));
                    match result {
                        Ok(Ok(summary)) => send(Event::RunFinished(Box::new(summary))),
                        Ok(Err(f)) => send(Event::RunFailed {
                            error: format!("{:#}", f.error),
                            summary: f.summary,
                        }),
                        Err(p) => {
                            let error = format!("internal error: {}", panic_text(&*p));
                            let summary = match started.as_deref() {
                                Some(id) => match mark_failed(&store, id, &error) {
                                    Ok(s) => Some(Box::new(s)),
                                    Err(e) => {
                                        send(Event::Log(format!(
                                            "could not record the failure of run {id}: {e:#}"
                                        )));
                                        None
                                    }
                                },
                                None => None,
                            };
                            send(Event::RunFailed { error, summary });
                        }
                    }
                    if ctl.shutdown {
                        break;
                    }
                }
            })?;
        Ok(Self {
            commands: cmd_tx,
            events: ev_rx,
            thread: Some(thread),
        })
    }

    /// Sends a command (ignored if the worker has ended).
    pub fn send(&self, c: Command) {
        let _ = self.commands.send(c);
    }

    /// The next event, if one is waiting (never blocks).
    pub fn try_recv(&self) -> Option<Event> {
        self.events.try_recv().ok()
    }

    /// The event channel (for blocking receives in tests and the CLI).
    pub fn events(&self) -> &Receiver<Event> {
        &self.events
    }

    /// Whether the worker thread is still alive.
    pub fn is_alive(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }
}

/// Answers a Try-it request outside a run; a panic becomes the request's failure (and the
/// loaded model, possibly half-changed, is dropped).
fn serve_try_it(session: &mut TryItSession, req: &TryItRequest, send: &dyn Fn(Event)) {
    let served = std::panic::catch_unwind(AssertUnwindSafe(|| {
        session.serve(req, &mut |e| send(Event::TryIt(e)))
    }));
    if let Err(p) = served {
        session.unload();
        send(Event::TryIt(TryItEvent::Failed {
            id: req.id,
            error: format!("internal error: {}", panic_text(&*p)),
        }));
    }
}

/// Records a run that panicked after it started as failed; returns the updated summary, or
/// why it could not be recorded (for the caller to report).
fn mark_failed(store: &RunStore, id: &str, error: &str) -> anyhow::Result<RunSummary> {
    let layout = store.layout(id);
    let mut s = read_summary(&layout)?;
    s.status = RunStatus::Failed;
    s.error = Some(error.to_string());
    write_summary(&layout, &s)?;
    Ok(s)
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

//! The background worker: a named thread that takes [`Command`]s and sends [`Event`]s over
//! crossbeam channels. All heavy work (loading, training, saving, personalising) happens here,
//! never on the UI thread. One job at a time: a training run or a personalisation
//! ([`Command::Personalise`]); a command for the other kind of job is refused while one runs
//! (a training command with [`Event::RunFailed`], a personalisation with
//! [`PersonaliseEvent::Refused`]), never queued. Every job runs under the same panic guard
//! ([`guard`]): a panic becomes [`Event::RunFailed`] or [`PersonaliseEvent::Failed`], never a
//! dead thread. Stop, pause and cancel are honoured between steps; the worker ends when told to
//! or when the other side of the channel is gone. Between jobs it answers Try-it prompts
//! ([`Command::TryIt`]); prompts sent during a personalisation wait for its end. A panicking
//! run is recorded as failed in its folder; if even that fails, the reason is sent once as
//! [`Event::Log`].

use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, TryRecvError};

use crate::personalize::job::{PersonaliseEvent, PersonaliseRequest, PersonaliseResult};
use crate::personalize::progress::{Cancelled, Progress, Stage};
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
    /// Personalise: DiffLoRA for the references, the comparisons asked for, the files when a
    /// folder is named. Progress, the result, a failure or the cancellation come back as
    /// [`Event::Personalise`]. Refused while a training run is in progress.
    Personalise(Box<PersonaliseRequest>),
    /// Cancel the personalisation in progress at its next stage or step (it writes nothing);
    /// ignored when none runs.
    CancelPersonalise,
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

/// The function that performs a personalisation (the real job, or a stand-in in tests): it
/// announces every stage and step to the progress callback, which may cancel.
pub type PersonaliseRunner = Arc<
    dyn Fn(&PersonaliseRequest, Progress<'_>) -> anyhow::Result<PersonaliseResult> + Send + Sync,
>;

/// What the worker runs its jobs with.
#[derive(Clone)]
pub struct Runners {
    /// Training runs.
    pub train: Runner,
    /// Personalisations.
    pub personalise: PersonaliseRunner,
}

impl Default for Runners {
    /// The real trainer and the real personalisation job.
    fn default() -> Self {
        Self {
            train: Arc::new(crate::train::train),
            personalise: Arc::new(crate::personalize::job::run),
        }
    }
}

/// A run the worker performs.
enum Job {
    Train(Box<TrainConfig>),
    Resume(PathBuf),
}

/// Why a personalisation cannot start while a training run is in progress.
const TRAINING_IN_PROGRESS: &str =
    "a training run is in progress: stop it or wait for it to end, then personalise";
/// Why a training run cannot start while a personalisation is in progress.
const PERSONALISING: &str =
    "a personalisation is in progress: cancel it or wait for it to end, then train";

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
                Command::Personalise(_) => (self.send)(Event::Personalise(
                    PersonaliseEvent::Refused(TRAINING_IN_PROGRESS.into()),
                )),
                Command::Pause | Command::Resume | Command::CancelPersonalise => {}
            }
        }
    }

    fn take_try_it(&mut self) -> Vec<TryItRequest> {
        std::mem::take(&mut self.try_it)
    }
}

/// Polls the command channel between the stages and steps of a personalisation.
struct JobControl<'a> {
    commands: &'a Receiver<Command>,
    send: &'a dyn Fn(Event),
    /// Commands to carry out after the job (Try-it prompts).
    later: &'a mut VecDeque<Command>,
    cancel: bool,
    shutdown: bool,
}

impl JobControl<'_> {
    /// Takes the waiting commands; whether the job should stop.
    fn cancelled(&mut self) -> bool {
        loop {
            match self.commands.try_recv() {
                Ok(Command::CancelPersonalise) => self.cancel = true,
                Ok(Command::Shutdown) | Err(TryRecvError::Disconnected) => {
                    self.shutdown = true;
                    self.cancel = true;
                }
                Ok(Command::Start(_) | Command::ResumeRun(_)) => (self.send)(Event::RunFailed {
                    error: PERSONALISING.into(),
                    summary: None,
                }),
                Ok(Command::Personalise(_)) => (self.send)(Event::Personalise(
                    PersonaliseEvent::Refused("a personalisation is already in progress".into()),
                )),
                Ok(c @ Command::TryIt(_)) => self.later.push_back(c),
                Ok(Command::Stop | Command::Pause | Command::Resume) => {}
                Err(TryRecvError::Empty) => return self.cancel || self.shutdown,
            }
        }
    }
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// The worker's panic guard: runs `f`, turning a panic into `Err` with its message. Every job
/// (training, personalising, a Try-it prompt) runs inside it.
pub fn guard<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(AssertUnwindSafe(f)).map_err(|p| panic_text(&*p))
}

impl Worker {
    /// Starts the worker with the real trainer and personalisation job. `notify` runs after
    /// every event (e.g. to ask egui for a repaint).
    pub fn spawn(store: RunStore, notify: impl Fn() + Send + 'static) -> std::io::Result<Self> {
        Self::spawn_runners(store, Runners::default(), notify)
    }

    /// Starts the worker with a given training runner (and the real personalisation job).
    pub fn spawn_with(
        store: RunStore,
        runner: Runner,
        notify: impl Fn() + Send + 'static,
    ) -> std::io::Result<Self> {
        let runners = Runners {
            train: runner,
            ..Runners::default()
        };
        Self::spawn_runners(store, runners, notify)
    }

    /// Starts the worker with given runners (stand-ins in tests).
    pub fn spawn_runners(
        store: RunStore,
        runners: Runners,
        notify: impl Fn() + Send + 'static,
    ) -> std::io::Result<Self> {
        let (cmd_tx, cmd_rx) = crossbeam_channel::unbounded::<Command>();
        let (ev_tx, ev_rx) = crossbeam_channel::unbounded::<Event>();
        let thread = std::thread::Builder::new()
            .name("peft-studio-worker".into())
            .spawn(move || {
                // The jobs compute on this thread and one pool of the configured size, as the
                // command line does.
                crate::threads::with_compute_pool("worker", move || {
                    serve(&store, &runners, &cmd_rx, &ev_tx, &notify)
                })
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

/// The worker thread's loop: carries out commands one at a time until `Shutdown` or until the
/// command channel closes, sending events (and calling `notify` after each).
fn serve(
    store: &RunStore,
    runners: &Runners,
    cmd_rx: &Receiver<Command>,
    ev_tx: &Sender<Event>,
    notify: &(impl Fn() + Send),
) {
    let send = |e: Event| {
        // The UI side is gone: nothing left to tell.
        let _ = ev_tx.send(e);
        notify();
    };
    let mut try_it = TryItSession::new();
    // Commands that arrived during a personalisation, to carry out after it.
    let mut later = VecDeque::new();
    while let Some(cmd) = later.pop_front().or_else(|| cmd_rx.recv().ok()) {
        let job = match cmd {
            Command::Start(cfg) => Job::Train(cfg),
            Command::ResumeRun(path) => Job::Resume(path),
            Command::TryIt(req) => {
                serve_try_it(&mut try_it, &req, &send);
                continue;
            }
            Command::Personalise(req) => {
                let mut ctl = JobControl {
                    commands: cmd_rx,
                    send: &send,
                    later: &mut later,
                    cancel: false,
                    shutdown: false,
                };
                personalise(&runners.personalise, &req, &mut ctl);
                if ctl.shutdown {
                    break;
                }
                continue;
            }
            Command::Shutdown => break,
            Command::Stop | Command::Pause | Command::Resume | Command::CancelPersonalise => {
                continue;
            }
        };
        // The run needs the memory more than the next prompt.
        try_it.unload();
        let mut ctl = ChannelController {
            commands: cmd_rx,
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
        let result = guard(|| match &job {
            Job::Train(cfg) => (runners.train)(cfg, store, &mut ctl, &mut emit),
            Job::Resume(path) => crate::train::resume(path, &mut ctl, &mut emit),
        });
        match result {
            Ok(Ok(summary)) => send(Event::RunFinished(Box::new(summary))),
            Ok(Err(f)) => send(Event::RunFailed {
                error: format!("{:#}", f.error),
                summary: f.summary,
            }),
            Err(panic) => {
                let error = format!("internal error: {panic}");
                let summary = match started.as_deref() {
                    Some(id) => match mark_failed(store, id, &error) {
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
}

/// Answers a Try-it request outside a run; a panic becomes the request's failure (and the
/// loaded model, possibly half-changed, is dropped).
fn serve_try_it(session: &mut TryItSession, req: &TryItRequest, send: &dyn Fn(Event)) {
    let served = guard(|| session.serve(req, &mut |e| send(Event::TryIt(e))));
    if let Err(panic) = served {
        session.unload();
        send(Event::TryIt(TryItEvent::Failed {
            id: req.id,
            error: format!("internal error: {panic}"),
        }));
    }
}

/// Runs a personalisation under the panic guard and sends its progress and its end: the
/// result, the failure (a panic included) or the cancellation. Commands are taken at every
/// stage and step (see [`JobControl`]).
fn personalise(runner: &PersonaliseRunner, req: &PersonaliseRequest, ctl: &mut JobControl<'_>) {
    let send = ctl.send;
    let result = guard(|| {
        runner(req, &mut |stage: Stage| {
            if ctl.cancelled() {
                return ControlFlow::Break(());
            }
            send(Event::Personalise(PersonaliseEvent::Progress(stage)));
            ControlFlow::Continue(())
        })
    });
    let end = match result {
        Ok(Ok(r)) => PersonaliseEvent::Finished(Arc::new(r)),
        Ok(Err(e)) if e.is::<Cancelled>() => PersonaliseEvent::Cancelled,
        Ok(Err(e)) => PersonaliseEvent::Failed(format!("{e:#}")),
        Err(panic) => PersonaliseEvent::Failed(format!("internal error: {panic}")),
    };
    send(Event::Personalise(end));
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

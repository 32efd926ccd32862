//! Short-lived named helper threads for blocking work the UI must not do (file dialogs, dataset
//! previews, waiting on a folder opener). Results come back over a channel, drained once per
//! frame; each one wakes the UI once. Generic over the result type, so this module depends on
//! no tab.

use crossbeam_channel::{Receiver, Sender};

/// Spawns helper threads and collects their results of type `T`.
pub struct Background<T> {
    tx: Sender<T>,
    rx: Receiver<T>,
    ctx: egui::Context,
}

impl<T: Send + 'static> Background<T> {
    /// A new collector that repaints `ctx` when a result arrives.
    pub fn new(ctx: egui::Context) -> Self {
        let (tx, rx) = crossbeam_channel::unbounded();
        Self { tx, rx, ctx }
    }

    /// Runs `f` on a named thread; its result arrives through [`drain`](Self::drain).
    pub fn spawn(&self, name: &str, f: impl FnOnce() -> T + Send + 'static) -> Result<(), String> {
        let tx = self.tx.clone();
        let ctx = self.ctx.clone();
        std::thread::Builder::new()
            .name(format!("peft-studio-{name}"))
            .spawn(move || {
                let r = f();
                // The window is closing if the receiver is gone: nothing to deliver.
                let _ = tx.send(r);
                ctx.request_repaint();
            })
            .map(|_| ())
            .map_err(|e| format!("could not start the {name} thread: {e}"))
    }

    /// Results that have arrived.
    pub fn drain(&self) -> Vec<T> {
        self.rx.try_iter().collect()
    }
}

//! Short-lived named helper threads for blocking work the UI must not do: native file dialogs
//! and dataset previews. Results come back over a channel, drained once per frame.

use std::path::PathBuf;
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};

use super::form::{DataPreview, PickPurpose};

/// What kind of path to ask the user for.
#[derive(Debug, Clone)]
pub enum PickRequest {
    /// An existing folder.
    Folder {
        /// Dialog title.
        title: String,
    },
    /// An existing file with one of these extensions.
    OpenFile {
        /// Dialog title.
        title: String,
        /// (filter name, extensions).
        filters: Vec<(String, Vec<String>)>,
    },
    /// A file to write.
    SaveFile {
        /// Dialog title.
        title: String,
        /// Suggested file name.
        default_name: String,
    },
}

/// Chooses a path (blocking); called on a helper thread, never on the UI thread.
pub type FilePicker = Arc<dyn Fn(PickRequest) -> Option<PathBuf> + Send + Sync>;

/// The native dialogs (rfd: the XDG desktop portal, or zenity).
pub fn rfd_picker() -> FilePicker {
    Arc::new(|req| match req {
        PickRequest::Folder { title } => rfd::FileDialog::new().set_title(title).pick_folder(),
        PickRequest::OpenFile { title, filters } => {
            let mut d = rfd::FileDialog::new().set_title(title);
            for (name, exts) in &filters {
                d = d.add_filter(name, exts);
            }
            d.pick_file()
        }
        PickRequest::SaveFile {
            title,
            default_name,
        } => rfd::FileDialog::new()
            .set_title(title)
            .set_file_name(default_name)
            .save_file(),
    })
}

/// A result from a helper thread.
pub enum TaskResult {
    /// A dialog closed (`None`: cancelled).
    Picked(PickPurpose, Option<PathBuf>),
    /// A dataset preview for form generation `u64`.
    Preview(u64, Result<DataPreview, String>),
}

/// Spawns helper threads and collects their results.
pub struct Background {
    tx: Sender<TaskResult>,
    rx: Receiver<TaskResult>,
    ctx: egui::Context,
}

impl Background {
    /// A new collector that repaints `ctx` when a result arrives.
    pub fn new(ctx: egui::Context) -> Self {
        let (tx, rx) = crossbeam_channel::unbounded();
        Self { tx, rx, ctx }
    }

    /// Runs `f` on a named thread; its result arrives through [`drain`](Self::drain).
    pub fn spawn(&self, name: &str, f: impl FnOnce() -> TaskResult + Send + 'static) {
        let tx = self.tx.clone();
        let ctx = self.ctx.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("peft-studio-{name}"))
            .spawn(move || {
                let r = f();
                // The window is closing if the receiver is gone: nothing to deliver.
                let _ = tx.send(r);
                ctx.request_repaint();
            });
        if let Err(e) = spawned {
            log::error!("could not start the {name} thread: {e}");
        }
    }

    /// Results that have arrived.
    pub fn drain(&self) -> Vec<TaskResult> {
        self.rx.try_iter().collect()
    }
}

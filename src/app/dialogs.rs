//! Choosing paths and opening folders: the native file dialogs (rfd), what each button asks
//! for, a typed-path fallback when no dialog can open (no XDG portal, no zenity), and opening a
//! folder in the desktop's file manager with an honest message when nothing can.
//!
//! This module knows nothing of the tabs: a [`PickPurpose`] names what a path is for, and the
//! app delivers the chosen path to the tab that asked.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use log::Log;

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

impl PickRequest {
    /// The dialog's title.
    pub fn title(&self) -> &str {
        match self {
            PickRequest::Folder { title }
            | PickRequest::OpenFile { title, .. }
            | PickRequest::SaveFile { title, .. } => title,
        }
    }
}

/// What a dialog answered: a path, `Ok(None)` when cancelled, or why no dialog could open.
pub type PickResult = Result<Option<PathBuf>, String>;

/// Chooses a path (blocking); called on a helper thread, never on the UI thread.
pub type FilePicker = Arc<dyn Fn(PickRequest) -> PickResult + Send + Sync>;

/// What a chosen path is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PickPurpose {
    /// A model folder.
    ModelFolder,
    /// A GGUF model file (llama.cpp's format).
    ModelFile,
    /// A dataset file (IDX images, CSV, JSONL).
    DatasetFile,
    /// A folder of class sub-folders.
    DatasetFolder,
    /// A preset to load.
    LoadPreset,
    /// Where to save the preset.
    SavePreset,
    /// A folder of reference photos (Personalise).
    ReferenceFolder,
    /// One reference photo (Personalise).
    ReferenceImage,
    /// Where to save the personalised gallery.
    SaveImages,
    /// Where to save the personalised LoRA.
    SaveLora,
    /// The folder of the run store.
    RunsFolder,
    /// Where a run's export goes (Compare).
    ExportFolder,
    /// A PEFT + accelerate job's folder after it ran, to import (Compare).
    JobOutput,
}

impl PickPurpose {
    /// The dialog this purpose opens.
    pub fn request(self) -> PickRequest {
        let folder = |t: &str| PickRequest::Folder { title: t.into() };
        let open = |t: &str, filters: Vec<(&str, &[&str])>| PickRequest::OpenFile {
            title: t.into(),
            filters: filters
                .into_iter()
                .map(|(n, e)| (n.to_string(), e.iter().map(|s| s.to_string()).collect()))
                .collect(),
        };
        match self {
            PickPurpose::ModelFolder => {
                folder("Open a Hugging Face model folder (config.json, model.safetensors)")
            }
            PickPurpose::ModelFile => open(
                "Open a GGUF language model (llama.cpp's format)",
                vec![("GGUF", &["gguf"])],
            ),
            PickPurpose::DatasetFolder => {
                folder("Open a folder with one sub-folder of images per class")
            }
            PickPurpose::DatasetFile => open(
                "Open a dataset: CSV/JSONL text, or IDX images",
                vec![
                    ("Text (CSV, JSONL)", &["csv", "tsv", "jsonl"]),
                    ("IDX images", &["gz", "idx3-ubyte", "ubyte"]),
                ],
            ),
            PickPurpose::LoadPreset => open("Load a preset", vec![("Presets", &["toml"])]),
            PickPurpose::SavePreset => PickRequest::SaveFile {
                title: "Save the preset".into(),
                default_name: "my-preset.toml".into(),
            },
            PickPurpose::ReferenceFolder => {
                folder("Open a folder of reference photos of one person")
            }
            PickPurpose::ReferenceImage => open(
                "Open a reference photo",
                vec![("Images", crate::data::IMAGE_EXTENSIONS)],
            ),
            PickPurpose::SaveImages => folder("Save the gallery images into a folder"),
            PickPurpose::SaveLora => folder("Save the LoRA (PEFT adapter) into a folder"),
            PickPurpose::RunsFolder => folder("Choose the folder where runs are stored"),
            PickPurpose::ExportFolder => folder("Choose the folder to export the run into"),
            PickPurpose::JobOutput => {
                folder("Open a job folder (or its output/) after train.py ran")
            }
        }
    }
}

thread_local! {
    /// The last error rfd logged on this thread (rfd reports a dialog that could not open only
    /// through `log`).
    static DIALOG_ERROR: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Whether a program is on `PATH`.
fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

/// Why no dialog can open on this desktop, if that is known before trying (Linux: no D-Bus
/// session for the XDG portal and no zenity).
fn known_unavailable() -> Option<String> {
    if !cfg!(target_os = "linux") {
        return None;
    }
    let bus = std::env::var_os("DBUS_SESSION_BUS_ADDRESS").is_some()
        || std::env::var_os("XDG_RUNTIME_DIR").is_some_and(|d| Path::new(&d).join("bus").exists());
    (!bus && !on_path("zenity")).then(|| {
        "no file dialog is available: there is no D-Bus session for the XDG desktop portal \
         and zenity is not installed"
            .to_string()
    })
}

/// The native dialogs (rfd: the XDG desktop portal, or zenity). When none can open, the answer
/// is an error saying why (the window then offers a typed path).
pub fn rfd_picker() -> FilePicker {
    Arc::new(|req| {
        if let Some(why) = known_unavailable() {
            return Err(why);
        }
        DIALOG_ERROR.with(|e| e.borrow_mut().take());
        let picked = match req {
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
        };
        match (picked, DIALOG_ERROR.with(|e| e.borrow_mut().take())) {
            (None, Some(why)) => Err(format!(
                "no file dialog could open (the XDG desktop portal is unavailable and so is \
                 zenity): {why}"
            )),
            (picked, _) => Ok(picked),
        }
    })
}

/// A picker that answers from a list (for tests and scripted use).
pub fn scripted_picker(answers: Vec<Option<PathBuf>>) -> FilePicker {
    let answers = std::sync::Mutex::new(answers.into_iter());
    Arc::new(move |_req: PickRequest| Ok(answers.lock().ok().and_then(|mut a| a.next()).flatten()))
}

/// A picker on a desktop where no dialog can open (for tests).
pub fn unavailable_picker(why: &str) -> FilePicker {
    let why = why.to_string();
    Arc::new(move |_req: PickRequest| Err(why.clone()))
}

/// The logger of the window: `env_logger` (default level `warn`), which also records rfd's
/// errors so a dialog that could not open becomes an error in the window, not only a line on
/// stderr.
struct DialogLogger {
    inner: env_logger::Logger,
}

fn is_dialog_error(m: &log::Metadata<'_>) -> bool {
    m.level() == log::Level::Error && m.target().starts_with("rfd")
}

impl Log for DialogLogger {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        is_dialog_error(m) || self.inner.enabled(m)
    }

    fn log(&self, record: &log::Record<'_>) {
        if is_dialog_error(record.metadata()) {
            let text = record.args().to_string();
            DIALOG_ERROR.with(|e| *e.borrow_mut() = Some(text));
        }
        if self.inner.enabled(record.metadata()) {
            self.inner.log(record);
        }
    }

    fn flush(&self) {
        self.inner.flush();
    }
}

/// Installs the program's logger, the window's and the commands' (once; later calls do
/// nothing).
pub fn init_logging() {
    let inner =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).build();
    let level = inner.filter().max(log::LevelFilter::Error);
    if log::set_boxed_logger(Box::new(DialogLogger { inner })).is_ok() {
        log::set_max_level(level);
    }
}

/// The program that opens folders on this platform.
fn opener() -> &'static str {
    if cfg!(target_os = "macos") {
        "open"
    } else if cfg!(target_os = "windows") {
        "explorer"
    } else {
        "xdg-open"
    }
}

/// `path` made absolute (unchanged if that fails).
pub fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// Starts the desktop's file manager on `path`; the error says what is missing and names the
/// folder (absolute) so the user can go there by hand. The child is returned so its exit
/// status can be checked off the UI thread.
pub fn open_folder(path: &Path) -> Result<(std::process::Child, String), String> {
    open_folder_with(opener(), path)
}

/// [`open_folder`] with a given opener program.
fn open_folder_with(program: &str, path: &Path) -> Result<(std::process::Child, String), String> {
    let abs = absolute(path);
    if !abs.is_dir() {
        return Err(format!("the folder {} does not exist", abs.display()));
    }
    match std::process::Command::new(program).arg(&abs).spawn() {
        Ok(child) => Ok((child, program.to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(format!(
            "no program to open folders ({program} is not installed); the folder is {}",
            abs.display()
        )),
        Err(e) => Err(format!(
            "{program} could not start ({e}); the folder is {}",
            abs.display()
        )),
    }
}

/// The typed-path fallback shown when no dialog could open.
#[derive(Debug, Clone)]
pub struct TypedPath {
    /// What the path is for.
    pub purpose: PickPurpose,
    /// The text typed so far.
    pub text: String,
}

/// Draws the typed-path box; returns the path when Open is pressed. `open` becomes `None` when
/// the user cancels.
pub fn typed_path_ui(
    ui: &mut egui::Ui,
    open: &mut Option<TypedPath>,
) -> Option<(PickPurpose, PathBuf)> {
    let t = open.as_mut()?;
    let mut chosen = None;
    let mut cancel = false;
    egui::Frame::new()
        .stroke(egui::Stroke::new(1.0, ui.visuals().warn_fg_color))
        .inner_margin(6.0)
        .corner_radius(4.0)
        .show(ui, |ui| {
            ui.label(format!(
                "Type the path for: {}",
                t.purpose.request().title()
            ));
            ui.horizontal_wrapped(|ui| {
                let edit = ui.add(
                    egui::TextEdit::singleline(&mut t.text)
                        .hint_text("/path/to/file or folder")
                        .desired_width(320.0),
                );
                let enter = edit.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter));
                let typed = !t.text.trim().is_empty();
                if (ui.add_enabled(typed, egui::Button::new("Open")).clicked() || enter) && typed {
                    chosen = Some((t.purpose, absolute(Path::new(t.text.trim()))));
                }
                if ui.button("Cancel").clicked() {
                    cancel = true;
                }
            });
        });
    if chosen.is_some() || cancel {
        *open = None;
    }
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_folder_and_a_missing_opener_are_named() {
        let missing = std::env::temp_dir().join("peft-studio-no-such-folder-xyz");
        let e = open_folder(&missing).unwrap_err();
        assert!(
            e.contains("does not exist") && e.contains("no-such-folder"),
            "{e}"
        );
        let here = std::env::temp_dir();
        let e = open_folder_with("peft-studio-no-such-opener", &here).unwrap_err();
        assert!(e.contains("no program to open folders"), "{e}");
        assert!(e.contains(&absolute(&here).display().to_string()), "{e}");
    }

    #[test]
    fn every_purpose_has_a_titled_dialog() {
        for p in [
            PickPurpose::ModelFolder,
            PickPurpose::ModelFile,
            PickPurpose::ExportFolder,
            PickPurpose::JobOutput,
            PickPurpose::DatasetFile,
            PickPurpose::DatasetFolder,
            PickPurpose::LoadPreset,
            PickPurpose::SavePreset,
            PickPurpose::ReferenceFolder,
            PickPurpose::ReferenceImage,
            PickPurpose::SaveImages,
            PickPurpose::SaveLora,
            PickPurpose::RunsFolder,
        ] {
            assert!(!p.request().title().is_empty());
        }
    }
}

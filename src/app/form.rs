//! The Train tab's form logic: methods and their defaults, target groups, rank limits, the
//! trainable-parameter estimate, dataset previews, presets and the CLI command.

use std::path::PathBuf;

use crate::arch::ArchSpec;
use crate::data::{self, DataSource, Samples};
use crate::models::ModelSource;
use crate::models::hub::builtin_folder;
use crate::peft::{Init, Method, Targets};
use crate::train::{TrainConfig, TrainMode};

use super::background::Background;
use super::dialogs::PickPurpose;
use super::{StudioApp, TaskResult};

/// The five choices of the method selector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UiMethod {
    /// LoRA.
    Lora,
    /// SVFit.
    Svfit,
    /// LoLDU.
    Loldu,
    /// Full fine-tuning baseline.
    Full,
    /// Head-only baseline.
    Head,
}

impl UiMethod {
    /// All, in display order.
    pub const ALL: [UiMethod; 5] = [
        UiMethod::Lora,
        UiMethod::Svfit,
        UiMethod::Loldu,
        UiMethod::Full,
        UiMethod::Head,
    ];

    /// Button label.
    pub fn label(self) -> &'static str {
        match self {
            UiMethod::Lora => "LoRA",
            UiMethod::Svfit => "SVFit",
            UiMethod::Loldu => "LoLDU",
            UiMethod::Full => "Full fine-tuning",
            UiMethod::Head => "Head only",
        }
    }

    /// One-line explanation shown on hover.
    pub fn help(self) -> &'static str {
        match self {
            UiMethod::Lora => {
                "Low-rank update B·A added to each targeted weight (Hugging Face PEFT's LoRA)."
            }
            UiMethod::Svfit => {
                "Only the top-r singular values of each targeted weight train (SVD)."
            }
            UiMethod::Loldu => {
                "Only the first r pivots of an LU decomposition of each targeted weight train."
            }
            UiMethod::Full => "Baseline: every parameter trains.",
            UiMethod::Head => "Baseline: only the classification head trains (a linear probe).",
        }
    }

    /// The selector entry of an adapter method.
    pub fn of_adapter(m: Method) -> Self {
        match m {
            Method::Lora => UiMethod::Lora,
            Method::Svfit => UiMethod::Svfit,
            Method::Loldu => UiMethod::Loldu,
        }
    }

    /// The method a config describes.
    pub fn of(cfg: &TrainConfig) -> Self {
        match cfg.mode {
            TrainMode::Full => UiMethod::Full,
            TrainMode::Head => UiMethod::Head,
            TrainMode::Adapter => Self::of_adapter(cfg.adapter.method),
        }
    }
}

/// Switches the config to `m` with that method's defaults (METHODS.md's practical defaults:
/// SVFit and LoLDU need far higher learning rates than LoRA, LoLDU's kept conservative, no
/// weight decay on z). `max_rank` is the largest rank the targeted modules allow.
pub fn apply_method_defaults(cfg: &mut TrainConfig, m: UiMethod, max_rank: usize) {
    let a = &mut cfg.adapter;
    a.init = None;
    a.energy_threshold = None;
    a.relu = false;
    a.trainable_scale = false;
    a.use_rslora = false;
    cfg.optim.head_lr = Some(1e-2);
    match m {
        UiMethod::Lora => {
            cfg.mode = TrainMode::Adapter;
            a.method = Method::Lora;
            a.rank = 8.min(max_rank.max(1));
            a.alpha = Some(2.0 * a.rank as f64);
            cfg.optim.lr = 5e-3;
        }
        UiMethod::Svfit => {
            cfg.mode = TrainMode::Adapter;
            a.method = Method::Svfit;
            a.rank = max_rank.max(1);
            a.alpha = None;
            cfg.optim.lr = 5e-2;
        }
        UiMethod::Loldu => {
            cfg.mode = TrainMode::Adapter;
            a.method = Method::Loldu;
            a.rank = max_rank.max(1);
            a.alpha = None;
            a.trainable_scale = true;
            cfg.optim.lr = 1e-2;
        }
        UiMethod::Full => {
            cfg.mode = TrainMode::Full;
            cfg.optim.lr = 1e-3;
            cfg.optim.head_lr = None;
        }
        UiMethod::Head => {
            cfg.mode = TrainMode::Head;
            cfg.optim.lr = 1e-2;
            cfg.optim.head_lr = None;
        }
    }
    cfg.optim.diagonal_weight_decay = 0.0;
    if is_language_model(&cfg.model.source) {
        cfg.optim.lr = language_model_lr(cfg);
        cfg.optim.head_lr = None;
    }
}

/// The learning rate of the chosen method on a language model, measured on SmolLM2's built-in
/// task (40 steps of batch 8 at a constant rate; `bench-results/smollm2-spam-accuracy.md`):
/// LoRA 1e-3 (84.4% exact match), SVFit 0.25 (70.3%; 3.1% at 0.02), LoLDU 5e-3 (68.8%), full
/// fine-tuning 5e-5 (95.3%).
pub fn language_model_lr(cfg: &TrainConfig) -> f64 {
    match (cfg.mode, cfg.adapter.method) {
        (TrainMode::Full, _) => 5e-5,
        (TrainMode::Adapter, Method::Svfit) => 0.25,
        (TrainMode::Adapter, Method::Loldu) => 5e-3,
        _ => 1e-3,
    }
}

/// A group of linear modules the user can tick as a target.
#[derive(Debug, Clone)]
pub struct TargetGroup {
    /// Checkbox label (PEFT's name).
    pub name: String,
    /// The full-match regular expression of the group.
    pub pattern: String,
    /// Module paths in it.
    pub modules: Vec<String>,
    /// min(m, n) over its modules.
    pub max_rank: usize,
}

/// The module groups of a model: every distinct path with its layer index removed.
pub fn target_groups(arch: &ArchSpec) -> Vec<TargetGroup> {
    let mut groups: Vec<TargetGroup> = Vec::new();
    for l in arch.linears.iter().filter(|l| !l.head) {
        // `bert.encoder.layer.3.attention.self.query` → `attention.self.query`.
        let parts: Vec<&str> = l.path.split('.').collect();
        let tail = match parts.iter().position(|p| p.parse::<usize>().is_ok()) {
            Some(i) => parts[i + 1..].join("."),
            // Outside the layer stack (e.g. `bert.pooler.dense`): the last two names.
            None => parts[parts.len().saturating_sub(2)..].join("."),
        };
        let name = match tail.rsplit('.').next() {
            Some(last @ ("query" | "key" | "value")) => last.to_string(),
            _ => tail.clone(),
        };
        let escaped = regex::escape(&tail);
        let in_stack = parts.iter().any(|p| p.parse::<usize>().is_ok());
        // Right after the layer index, so `output.dense` never matches `attention.output.dense`.
        let pattern = if in_stack {
            format!(r".*\.\d+\.{escaped}")
        } else {
            format!(r"(.*\.)?{escaped}")
        };
        let r = l.out_features.min(l.in_features);
        match groups.iter_mut().find(|g| g.name == name) {
            Some(g) => {
                g.modules.push(l.path.clone());
                g.max_rank = g.max_rank.min(r);
            }
            None => groups.push(TargetGroup {
                name,
                pattern,
                modules: vec![l.path.clone()],
                max_rank: r,
            }),
        }
    }
    groups
}

/// Which groups the targets select (a group counts when its every module matches).
pub fn selected_groups(targets: &Targets, groups: &[TargetGroup]) -> Vec<bool> {
    let Ok(m) = targets.matcher() else {
        return vec![false; groups.len()];
    };
    groups
        .iter()
        .map(|g| g.modules.iter().all(|p| m.matches(p)))
        .collect()
}

/// The largest rank every ticked group of `groups` allows (the smallest `min(out, in)` of the
/// targeted modules), or `None` when `targets` ticks none of them.
pub fn full_rank_of_targets(targets: &Targets, groups: &[TargetGroup]) -> Option<usize> {
    groups
        .iter()
        .zip(selected_groups(targets, groups))
        .filter(|(_, ticked)| *ticked)
        .map(|(g, _)| g.max_rank)
        .min()
}

/// Targets for the ticked groups: PEFT's list form when the names are unambiguous suffixes,
/// else a regular expression that matches exactly those groups.
pub fn targets_for(groups: &[TargetGroup], ticked: &[bool]) -> Targets {
    let chosen: Vec<&TargetGroup> = groups
        .iter()
        .zip(ticked)
        .filter(|(_, t)| **t)
        .map(|(g, _)| g)
        .collect();
    let all_paths: Vec<&String> = groups.iter().flat_map(|g| g.modules.iter()).collect();
    let list = Targets::List(chosen.iter().map(|g| g.name.clone()).collect());
    if let Ok(m) = list.matcher() {
        let wanted: std::collections::HashSet<&String> =
            chosen.iter().flat_map(|g| g.modules.iter()).collect();
        if all_paths.iter().all(|p| m.matches(p) == wanted.contains(p)) {
            return list;
        }
    }
    Targets::Pattern(
        chosen
            .iter()
            .map(|g| g.pattern.clone())
            .collect::<Vec<_>>()
            .join("|"),
    )
}

/// What the form shows of a dataset.
#[derive(Default, Debug, Clone)]
pub struct DataPreview {
    /// Name and split sizes.
    pub summary: String,
    /// Class names.
    pub classes: Vec<String>,
    /// Training examples per class.
    pub train_counts: Vec<usize>,
    /// Eval examples per class.
    pub eval_counts: Vec<usize>,
    /// A few images: (width, height, RGBA bytes).
    pub images: Vec<(usize, usize, Vec<u8>)>,
    /// A few texts with their class.
    pub rows: Vec<(String, String)>,
    /// Instruction data for a language model: the first record as the model reads it (its
    /// chat template rendered), in runs of masked, trained and cut text; empty otherwise.
    pub spans: Vec<(String, data::SpanKind)>,
    /// Why `spans` is empty when it was asked for (e.g. the model's tokenizer is missing).
    pub spans_note: Option<String>,
}

/// The preview of instruction data: its format, size and the first conversations' turns.
fn instruct_preview(
    cfg: &data::DataConfig,
    model: &crate::train::ModelConfig,
) -> Option<Result<DataPreview, String>> {
    let data::DataSource::Instruct { path, eval_path } = &cfg.source else {
        return None;
    };
    let read = || -> Result<DataPreview, String> {
        let file = data::read_instruct_file(path).map_err(|e| e.to_string())?;
        let held_out = match eval_path {
            Some(p) => format!(
                ", {} held out in {}",
                data::read_instruct_file(p)
                    .map_err(|e| e.to_string())?
                    .records
                    .len(),
                p.display()
            ),
            None => format!(", {:.0}% held out", cfg.eval_fraction * 100.0),
        };
        let mut rows = Vec::new();
        for r in file.records.iter().take(2) {
            match &r.body {
                data::RecordBody::Chat(messages) => {
                    for m in messages {
                        rows.push((m.content.chars().take(160).collect(), m.role.clone()));
                    }
                }
                data::RecordBody::Text(t) => {
                    rows.push((t.chars().take(160).collect(), "text".into()))
                }
            }
        }
        let (spans, spans_note) = match rendered_spans(model, &file) {
            Ok(s) => (s, None),
            Err(e) => (Vec::new(), Some(e)),
        };
        Ok(DataPreview {
            summary: format!(
                "{}: {} records ({}){held_out}; the loss covers the assistant's turns",
                stem_of(path),
                file.records.len(),
                file.format.name()
            ),
            rows,
            spans,
            spans_note,
            ..DataPreview::default()
        })
    };
    Some(read())
}

/// The first record of `file` rendered with `model`'s tokenizer and chat template, in runs of
/// masked (prompt), trained (answer) and cut (past `max_length`) text.
fn rendered_spans(
    model: &crate::train::ModelConfig,
    file: &data::InstructFile,
) -> Result<Vec<(String, data::SpanKind)>, String> {
    use crate::models::llama::LlmTokenizer;
    use crate::models::llama::gguf::GgufFile;
    let path = crate::train::causal_lm::model_path(&model.source).map_err(|e| format!("{e:#}"))?;
    let tok = if path.is_dir() {
        LlmTokenizer::from_folder(&path)
    } else {
        GgufFile::open(&path).and_then(|g| LlmTokenizer::from_gguf(&g))
    }
    .map_err(|e| e.to_string())?;
    let template =
        crate::train::causal_lm::chat_template(&tok, &path).map_err(|e| format!("{e:#}"))?;
    let encoder = data::InstructEncoder::new(&tok.tokenizer, template.as_ref(), model.max_length)
        .map_err(|e| e.to_string())?;
    let Some(first) = file.records.first() else {
        return Ok(Vec::new());
    };
    let p = encoder.preview(first, file).map_err(|e| e.to_string())?;
    Ok(p.spans.into_iter().map(|s| (s.text, s.kind)).collect())
}

fn stem_of(path: &std::path::Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

fn build_preview(
    cfg: &data::DataConfig,
    model: &crate::train::ModelConfig,
) -> Result<DataPreview, String> {
    if let Some(p) = instruct_preview(cfg, model) {
        return p;
    }
    let d = data::load(cfg).map_err(|e| e.to_string())?;
    let (train_counts, eval_counts) = d.class_counts();
    let mut images = Vec::new();
    let mut rows = Vec::new();
    match &d.train {
        Samples::Images(s) => {
            for i in 0..s.len().min(8) {
                let px = s.image(i);
                let mut rgba = Vec::with_capacity(s.width * s.height * 4);
                for p in 0..s.width * s.height {
                    let (r, g, b) = if s.channels == 1 {
                        (px[p], px[p], px[p])
                    } else {
                        let plane = s.width * s.height;
                        (px[p], px[plane + p], px[2 * plane + p])
                    };
                    rgba.extend_from_slice(&[r, g, b, 255]);
                }
                images.push((s.width, s.height, rgba));
            }
        }
        Samples::Texts(s) => {
            for i in 0..s.texts.len().min(5) {
                let label = d
                    .classes
                    .get(s.labels[i] as usize)
                    .cloned()
                    .unwrap_or_default();
                rows.push((s.texts[i].chars().take(160).collect(), label));
            }
        }
    }
    Ok(DataPreview {
        summary: format!(
            "{}: {} train / {} eval, {} classes",
            d.name,
            d.train.len(),
            d.eval.len(),
            d.classes.len()
        ),
        classes: d.classes,
        train_counts,
        eval_counts,
        images,
        rows,
        ..DataPreview::default()
    })
}

/// The form's runtime state.
#[derive(Default)]
pub struct FormState {
    generation: u64,
    /// The latest preview, or why it failed.
    pub preview: Option<Result<DataPreview, String>>,
    /// Textures of the preview images.
    pub textures: Vec<egui::TextureHandle>,
    /// Model description cache: (source, num_labels) → description or error.
    arch: Option<((ModelSource, usize), Result<ArchSpec, String>)>,
    /// Language-model cache: source → whether it is one.
    language_model: Option<(ModelSource, bool)>,
}

impl FormState {
    /// Loads a preview of the config's dataset on a helper thread.
    pub fn request_preview(&mut self, bg: &Background<TaskResult>, cfg: &TrainConfig) {
        self.generation += 1;
        let generation = self.generation;
        self.textures.clear();
        let data = cfg.data.clone();
        let model = cfg.model.clone();
        let spawned = bg.spawn("preview", move || {
            TaskResult::Preview(generation, build_preview(&data, &model))
        });
        self.preview = match spawned {
            Ok(()) => None,
            Err(e) => Some(Err(e)),
        };
    }

    /// Stores a preview unless a newer one was requested.
    pub fn set_preview(&mut self, generation: u64, r: Result<DataPreview, String>) {
        if generation == self.generation {
            self.preview = Some(r);
            self.textures.clear();
        }
    }

    /// Classes in the previewed dataset (10 until a preview is there).
    pub fn num_classes(&self) -> usize {
        match &self.preview {
            Some(Ok(p)) => p.classes.len().max(2),
            _ => 10,
        }
    }

    /// The model's description (from its `config.json` only; cached).
    pub fn arch(&mut self, source: &ModelSource, num_labels: usize) -> Result<ArchSpec, String> {
        let key = (source.clone(), num_labels);
        if let Some((k, v)) = &self.arch
            && *k == key
        {
            return v.clone();
        }
        let v = if is_language_model(source) {
            language_model_arch(source)
        } else {
            config_path(source)
                .map_err(|e| e.to_string())
                .and_then(|p| {
                    ArchSpec::resolve(&p.display().to_string(), Some(num_labels))
                        .map_err(|e| e.to_string())
                })
        };
        self.arch = Some((key, v.clone()));
        v
    }

    /// Whether `source` is a causal language model (cached: a folder's `config.json` is read
    /// once per choice, not every frame).
    pub fn is_language_model(&mut self, source: &ModelSource) -> bool {
        if let Some((k, v)) = &self.language_model
            && k == source
        {
            return *v;
        }
        let v = is_language_model(source);
        self.language_model = Some((source.clone(), v));
        v
    }

    /// Checks what the worker would refuse, with a message for the user.
    pub fn check(&mut self, cfg: &TrainConfig) -> Result<(), String> {
        cfg.validate()?;
        if let Some(Err(e)) = &self.preview {
            return Err(format!("the dataset cannot be read: {e}"));
        }
        let arch = self.arch(&cfg.model.source, self.num_classes())?;
        if cfg.mode == TrainMode::Adapter {
            crate::inspect::inspect(&arch, &cfg.adapter).map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

/// Whether `source` is a causal language model (unreadable sources count as classifiers:
/// their own error is shown).
pub fn is_language_model(source: &ModelSource) -> bool {
    crate::train::causal_lm::is_language_model(source).unwrap_or(false)
}

/// A language model's description: the built-in SmolLM2's known shape (once fetched), or a
/// folder's `config.json`.
fn language_model_arch(source: &ModelSource) -> Result<ArchSpec, String> {
    use crate::models::llama::language_model::{SMOLLM2_NAME, smollm2_fetch_hint, smollm2_path};
    match source {
        ModelSource::Builtin { name } if name == SMOLLM2_NAME => {
            if smollm2_path().is_none() {
                return Err(smollm2_fetch_hint());
            }
            ArchSpec::resolve("smollm2-135m", None).map_err(|e| e.to_string())
        }
        ModelSource::Folder { path } => {
            ArchSpec::resolve(&path.display().to_string(), None).map_err(|e| e.to_string())
        }
        ModelSource::Gguf { path } => ArchSpec::from_gguf(path, None).map_err(|e| e.to_string()),
        _ => Err("not a language model".into()),
    }
}

/// Settings that suit a language model on instruction data: LoRA r8 on q_proj/v_proj (PEFT's
/// default), the built-in spam-or-ham task when fetched (unless instruction data is already
/// chosen), 256 tokens, short runs. SVFit and LoLDU take the full rank of the narrowest target
/// (192 on SmolLM2, where their learning rates were measured), as choosing them in the form does.
pub fn use_language_model_defaults(cfg: &mut TrainConfig) {
    cfg.mode = TrainMode::Adapter;
    cfg.adapter.targets = crate::peft::Targets::List(vec!["q_proj".into(), "v_proj".into()]);
    let full_rank = language_model_arch(&cfg.model.source)
        .ok()
        .and_then(|arch| full_rank_of_targets(&cfg.adapter.targets, &target_groups(&arch)));
    cfg.adapter.rank = match (cfg.adapter.method, full_rank) {
        (Method::Svfit | Method::Loldu, Some(r)) => r,
        (_, Some(r)) => cfg.adapter.rank.min(64).min(r),
        (_, None) => cfg.adapter.rank.min(64),
    };
    cfg.model.max_length = 256;
    cfg.optim.lr = language_model_lr(cfg);
    cfg.optim.batch_size = 8;
    cfg.optim.eval_batch_size = 8;
    cfg.optim.steps = Some(40);
    cfg.optim.epochs = None;
    cfg.optim.eval_every = 20;
    // Short runs learn more at a constant rate (84% vs 70% exact match on the spam task).
    cfg.optim.warmup_steps = 0;
    cfg.optim.schedule = crate::train::Schedule::Constant;
    cfg.optim.max_grad_norm = None;
    cfg.data.max_eval = Some(64);
    let train = crate::data::assets_dir()
        .parent()
        .map(|root| root.join("downloads/spam-chat-train.jsonl"));
    let has_instruct_data = matches!(cfg.data.source, DataSource::Instruct { .. });
    if let Some(train) = train.filter(|p| p.is_file() && !has_instruct_data) {
        cfg.data.source = DataSource::Instruct {
            eval_path: Some(train.with_file_name("spam-chat-eval.jsonl")),
            path: train,
        };
    }
}

/// The `config.json` of a model source.
pub fn config_path(source: &ModelSource) -> Result<PathBuf, crate::models::ModelError> {
    Ok(match source {
        ModelSource::Builtin { name } => builtin_folder(name)?.join("config.json"),
        ModelSource::Folder { path } => path.join("config.json"),
        ModelSource::Config { path } => path.clone(),
        ModelSource::Gguf { path } => path.clone(),
    })
}

/// Applies a path chosen for one of the form's purposes (the others are ignored).
pub fn handle_pick(app: &mut StudioApp, purpose: PickPurpose, path: PathBuf) {
    let cfg = &mut app.settings.config;
    match purpose {
        PickPurpose::ModelFolder => {
            if !path.join("config.json").is_file() {
                app.report(
                    "That folder is not a model",
                    format!("{}: no config.json (a Hugging Face model folder has config.json and model.safetensors)", path.display()),
                );
                return;
            }
            let was_lm = is_language_model(&cfg.model.source);
            cfg.model.source = ModelSource::Folder { path };
            if !was_lm && is_language_model(&cfg.model.source) {
                use_language_model_defaults(cfg);
                app.form.request_preview(&app.background, cfg);
            }
        }
        PickPurpose::ModelFile => {
            let was_lm = is_language_model(&cfg.model.source);
            cfg.model.source = ModelSource::Gguf { path };
            if !was_lm {
                use_language_model_defaults(cfg);
                app.form.request_preview(&app.background, cfg);
            }
        }
        PickPurpose::DatasetFolder => {
            cfg.data.source = DataSource::ImageFolder {
                path,
                size: None,
                grayscale: false,
            };
            app.form.request_preview(&app.background, cfg);
        }
        PickPurpose::DatasetFile => {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().to_lowercase())
                .unwrap_or_default();
            cfg.data.source = if name.contains("idx3") || name.contains("images") {
                let labels = PathBuf::from(
                    path.display()
                        .to_string()
                        .replace("images-idx3", "labels-idx1")
                        .replace("images", "labels"),
                );
                DataSource::Idx {
                    images: path,
                    labels,
                    eval_images: None,
                    eval_labels: None,
                }
            } else if is_language_model(&cfg.model.source) {
                DataSource::Instruct {
                    path,
                    eval_path: None,
                }
            } else {
                DataSource::Text {
                    path,
                    text_column: "text".into(),
                    label_column: "label".into(),
                }
            };
            app.form.request_preview(&app.background, cfg);
        }
        PickPurpose::LoadPreset => match TrainConfig::from_preset(&path, &[]) {
            Ok(c) => {
                *cfg = c;
                app.settings.last_preset = Some(path);
                app.form
                    .request_preview(&app.background, &app.settings.config);
            }
            Err(e) => app.report("The preset cannot be loaded", e.to_string()),
        },
        PickPurpose::SavePreset => {
            let text = cfg.to_toml();
            match crate::fsio::write_atomic(&path, text.as_bytes()) {
                Ok(()) => app.settings.last_preset = Some(path),
                Err(e) => app.report("The preset cannot be saved", e.to_string()),
            }
        }
        PickPurpose::ReferenceFolder
        | PickPurpose::ReferenceImage
        | PickPurpose::SaveImages
        | PickPurpose::SaveLora
        | PickPurpose::RunsFolder
        | PickPurpose::ExportFolder
        | PickPurpose::JobOutput => {}
    }
}

/// The command line that runs this config: `peft-studio train` with a `--set` for every value
/// that differs from the defaults, quoted for a POSIX shell.
pub fn cli_command(cfg: &TrainConfig) -> String {
    let mut cmd = String::from("peft-studio train");
    for s in cli_overrides(cfg) {
        cmd.push_str(" --set ");
        cmd.push_str(&shell_quote(&s));
    }
    cmd
}

/// The `key=value` overrides that turn the defaults into `cfg`.
pub fn cli_overrides(cfg: &TrainConfig) -> Vec<String> {
    let mut sets = Vec::new();
    if let (Ok(toml::Value::Table(cur)), Ok(toml::Value::Table(def))) = (
        toml::Value::try_from(cfg),
        toml::Value::try_from(TrainConfig::default()),
    ) {
        diff("", &cur, &def, &mut sets);
    }
    sets
}

/// `s` as one POSIX shell word.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn diff(prefix: &str, cur: &toml::Table, def: &toml::Table, out: &mut Vec<String>) {
    for (k, v) in cur {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match (v, def.get(k)) {
            (toml::Value::Table(c), Some(toml::Value::Table(d))) if k != "source" => {
                diff(&key, c, d, out)
            }
            (v, Some(d)) if v == d => {}
            (v, _) => out.push(format!("{key}={}", inline(v))),
        }
    }
}

fn inline(v: &toml::Value) -> String {
    match v {
        toml::Value::Table(t) => {
            let items: Vec<String> = t
                .iter()
                .map(|(k, v)| format!("{k} = {}", inline(v)))
                .collect();
            format!("{{ {} }}", items.join(", "))
        }
        toml::Value::Array(a) => {
            format!("[{}]", a.iter().map(inline).collect::<Vec<_>>().join(", "))
        }
        other => other.to_string(),
    }
}

/// Initialisers the chosen method offers.
pub fn inits(m: UiMethod) -> &'static [Init] {
    match m {
        UiMethod::Lora => Method::Lora.inits(),
        UiMethod::Svfit => Method::Svfit.inits(),
        UiMethod::Loldu => Method::Loldu.inits(),
        UiMethod::Full | UiMethod::Head => &[],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cli_command_reproduces_the_form() {
        let mut cfg = TrainConfig::default();
        apply_method_defaults(&mut cfg, UiMethod::Loldu, 64);
        cfg.adapter.targets = Targets::Pattern(r".*\.(query|key)".into());
        cfg.optim.steps = Some(321);
        cfg.data.source = DataSource::Text {
            path: "data/x.jsonl".into(),
            text_column: "body".into(),
            label_column: "label".into(),
        };
        let back = TrainConfig::from_toml_str("", "cli", &cli_overrides(&cfg)).unwrap();
        assert_eq!(back, cfg);
        assert!(cli_command(&cfg).starts_with("peft-studio train --set '"));
        assert_eq!(cli_command(&TrainConfig::default()), "peft-studio train");
        // A value holding a quote survives the shell: sh -c 'printf %s <quoted>'.
        let tricky = "adapter.targets='.*\\.(query)'";
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("printf %s {}", shell_quote(tricky)))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), tricky);
    }

    /// On a language model each method starts from the learning rate measured on SmolLM2's
    /// task, whether the model or the method is chosen first; classifiers keep their own.
    #[test]
    fn language_models_get_the_measured_learning_rate_of_each_method() {
        let mut cfg = TrainConfig::default();
        apply_method_defaults(&mut cfg, UiMethod::Svfit, 64);
        assert_eq!(cfg.optim.lr, 5e-2, "a classifier's SVFit rate");
        cfg.model.source = ModelSource::Builtin {
            name: crate::models::llama::language_model::SMOLLM2_NAME.into(),
        };
        use_language_model_defaults(&mut cfg);
        assert_eq!(cfg.optim.lr, 0.25, "SVFit chosen, then the language model");
        for (m, lr) in [
            (UiMethod::Lora, 1e-3),
            (UiMethod::Loldu, 5e-3),
            (UiMethod::Full, 5e-5),
            (UiMethod::Svfit, 0.25),
        ] {
            apply_method_defaults(&mut cfg, m, 192);
            assert_eq!(cfg.optim.lr, lr, "{m:?} on a language model");
            assert_eq!(cfg.optim.head_lr, None);
        }
    }

    /// SVFit or LoLDU chosen on an encoder (full rank 384 there), then a language model: the
    /// rank becomes the language model's full rank over q_proj/v_proj, not a clamp of the old one.
    #[test]
    fn switching_to_a_language_model_keeps_the_diagonal_methods_at_full_rank() {
        let folder = ModelSource::Folder {
            path: "tests/reference/llama_tiny/llama_gqa_untied".into(),
        };
        for m in [UiMethod::Svfit, UiMethod::Loldu, UiMethod::Lora] {
            let mut cfg = TrainConfig::default();
            apply_method_defaults(&mut cfg, m, 384);
            cfg.model.source = folder.clone();
            use_language_model_defaults(&mut cfg);
            // q_proj 32×32, v_proj 16×32 (2 KV heads of 8): the narrowest allows 16.
            let want = if m == UiMethod::Lora { 8 } else { 16 };
            assert_eq!(cfg.adapter.rank, want, "{m:?}");
        }
    }

    #[test]
    fn target_groups_round_trip() {
        let arch = ArchSpec::resolve("bert-base-uncased", Some(2)).unwrap();
        let groups = target_groups(&arch);
        let names: Vec<&str> = groups.iter().map(|g| g.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "query",
                "key",
                "value",
                "attention.output.dense",
                "intermediate.dense",
                "output.dense",
                "pooler.dense"
            ]
        );
        // query + value is PEFT's list form.
        let mut ticked = vec![false; groups.len()];
        ticked[0] = true;
        ticked[2] = true;
        let t = targets_for(&groups, &ticked);
        assert_eq!(t, Targets::List(vec!["query".into(), "value".into()]));
        assert_eq!(selected_groups(&t, &groups), ticked);
        // The FFN output alone needs a pattern: `output.dense` also ends `attention.output.dense`.
        let mut ticked = vec![false; groups.len()];
        ticked[5] = true;
        let t = targets_for(&groups, &ticked);
        assert!(matches!(t, Targets::Pattern(_)), "{t:?}");
        assert_eq!(selected_groups(&t, &groups), ticked);
    }
}

//! [`TrainConfig`]: everything a run needs, as the presets (TOML), the window and the command
//! line write it.

use serde::{Deserialize, Serialize};

use crate::data::DataConfig;
use crate::device::DeviceChoice;
use crate::models::ModelSource;
use crate::peft::{AdapterConfig, Method};

/// What trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TrainMode {
    /// An adapter (the `[adapter]` section) plus the classification head.
    #[default]
    Adapter,
    /// Every parameter (the full fine-tuning baseline).
    Full,
    /// The classification head alone (the linear-probe baseline).
    Head,
}

/// Learning-rate schedule after the warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Linear decay to zero.
    #[default]
    Linear,
    /// Cosine decay to zero.
    Cosine,
    /// Constant.
    Constant,
}

impl Schedule {
    /// The learning-rate multiplier at `step` (1-based) of `total`, after `warmup` steps of
    /// linear warm-up.
    ///
    /// ```
    /// use peft_studio::train::Schedule;
    /// assert_eq!(Schedule::Linear.factor(5, 10, 10), 0.5); // warming up
    /// assert_eq!(Schedule::Linear.factor(10, 10, 0), 0.1);
    /// assert_eq!(Schedule::Constant.factor(7, 10, 0), 1.0);
    /// ```
    pub fn factor(self, step: usize, total: usize, warmup: usize) -> f64 {
        if step <= warmup && warmup > 0 {
            return step as f64 / warmup as f64;
        }
        let span = total.saturating_sub(warmup).max(1) as f64;
        let done = (step.saturating_sub(warmup)) as f64;
        let left = ((span - done + 1.0) / span).clamp(0.0, 1.0);
        match self {
            Schedule::Constant => 1.0,
            Schedule::Linear => left,
            Schedule::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * (1.0 - left)).cos()),
        }
    }
}

/// The model to fine-tune.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// Where it comes from.
    pub source: ModelSource,
    /// Re-initialise the classification head even when the checkpoint has a matching one.
    pub new_head: bool,
    /// Text models: tokens per sequence after truncation.
    pub max_length: usize,
    /// A GGUF language model trained with an adapter keeps its quantized linear weights as
    /// stored (QLoRA's recipe: the frozen base stays 4-bit under f32 adapters; outputs are
    /// the same, memory lower); `false` dequantizes them to f32 at load.
    pub packed_base: bool,
    /// The precision of the frozen base's matrix products: `f32` (default) or `bf16` (bf16
    /// operands with f32 sums on Intel AMX or AVX512-BF16, where the CPU has either; f32
    /// elsewhere). Adapters, gradients and optimizer state stay f32.
    pub matmul_precision: crate::peft::MatmulPrecision,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            source: ModelSource::default(),
            new_head: true,
            max_length: 64,
            packed_base: true,
            matmul_precision: crate::peft::MatmulPrecision::F32,
        }
    }
}

/// Optimisation settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// The head's learning rate (default: `lr`).
    pub head_lr: Option<f64>,
    /// AdamW weight decay of weights and LoRA factors.
    pub weight_decay: f64,
    /// Weight decay of SVFit/LoLDU's z (default 0: decay would shrink the pre-trained weight).
    pub diagonal_weight_decay: f64,
    /// Linear warm-up steps.
    pub warmup_steps: usize,
    /// Decay after the warm-up.
    pub schedule: Schedule,
    /// Clip the global gradient norm to this (none: no clipping).
    pub max_grad_norm: Option<f64>,
    /// Micro-batches accumulated per optimiser step.
    pub grad_accum: usize,
    /// Examples per micro-batch.
    pub batch_size: usize,
    /// Optimiser steps (a preset gives this or `epochs`, not both; set in code, it takes
    /// precedence).
    pub steps: Option<usize>,
    /// Passes over the training split, when `steps` is not set: the run takes
    /// ⌈epochs · training examples / (batch_size · grad_accum)⌉ steps.
    pub epochs: Option<f64>,
    /// Evaluate every this many steps (and at the end).
    pub eval_every: usize,
    /// Examples per evaluation batch.
    pub eval_batch_size: usize,
    /// Seed of initialisation and batch order.
    pub seed: u64,
    /// Save a checkpoint (trainable values and optimiser state) every this many steps, so
    /// `peft-studio train --resume <run folder>` can continue after an interruption.
    pub checkpoint_every: Option<usize>,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            head_lr: None,
            weight_decay: 0.01,
            diagonal_weight_decay: 0.0,
            warmup_steps: 10,
            schedule: Schedule::Linear,
            max_grad_norm: Some(1.0),
            grad_accum: 1,
            batch_size: 32,
            steps: Some(200),
            epochs: None,
            eval_every: 50,
            eval_batch_size: 250,
            seed: 0,
            checkpoint_every: None,
        }
    }
}

/// One training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// A name for tables and plots (default: method and rank).
    pub name: Option<String>,
    /// What trains.
    pub mode: TrainMode,
    /// Where it computes: `auto` (a GPU when the binary has a GPU backend and one is present,
    /// else the CPU), `cpu`, `cuda:N` or `metal:N`.
    pub device: DeviceChoice,
    /// The model.
    pub model: ModelConfig,
    /// The data.
    pub data: DataConfig,
    /// The adapter (mode `adapter`).
    pub adapter: AdapterConfig,
    /// Optimisation.
    pub optim: OptimConfig,
    /// Language models: how held-out answers are generated and scored.
    pub generation: GenerationEval,
}

/// How a language model's held-out answers are generated and scored at each evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GenerationEval {
    /// Held-out questions answered (greedy) and scored by exact match at each evaluation; 0
    /// scores next-token accuracy instead.
    pub questions: usize,
    /// The longest answer generated, in tokens.
    pub max_new_tokens: usize,
}

impl Default for GenerationEval {
    fn default() -> Self {
        Self {
            questions: 32,
            max_new_tokens: 16,
        }
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            name: None,
            mode: TrainMode::Adapter,
            device: DeviceChoice::Auto,
            model: ModelConfig::default(),
            data: DataConfig::default(),
            adapter: AdapterConfig::default(),
            optim: OptimConfig::default(),
            generation: GenerationEval::default(),
        }
    }
}

/// Errors reading a preset; each names the file and the key.
#[derive(Debug, thiserror::Error)]
pub enum PresetError {
    /// The file could not be read.
    #[error("{path}: {cause}")]
    Io {
        /// The preset.
        path: String,
        /// Cause.
        cause: std::io::Error,
    },
    /// Bad TOML or a bad field.
    #[error("{path}: {reason}")]
    Invalid {
        /// The preset (or `--set`).
        path: String,
        /// What is wrong.
        reason: String,
    },
}

impl TrainConfig {
    /// A short label: the name, or e.g. `lora r8`, `full fine-tuning`, `head only`.
    pub fn label(&self) -> String {
        if let Some(n) = &self.name {
            return n.clone();
        }
        match self.mode {
            TrainMode::Adapter => format!("{} r{}", self.adapter.method, self.adapter.rank),
            TrainMode::Full => "full fine-tuning".into(),
            TrainMode::Head => "head only".into(),
        }
    }

    /// The method column of tables: `lora`, `svfit`, `loldu`, `full` or `head`.
    pub fn method_name(&self) -> String {
        match self.mode {
            TrainMode::Adapter => self.adapter.method.name().into(),
            TrainMode::Full => "full".into(),
            TrainMode::Head => "head".into(),
        }
    }

    /// The adapter method, in adapter mode.
    pub fn adapter_method(&self) -> Option<Method> {
        (self.mode == TrainMode::Adapter).then_some(self.adapter.method)
    }

    /// Reads a preset and applies `key=value` overrides (dotted keys, TOML values; a value
    /// that is not valid TOML is taken as a string).
    pub fn from_preset(path: &std::path::Path, overrides: &[String]) -> Result<Self, PresetError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|cause| PresetError::Io {
            path: shown.clone(),
            cause,
        })?;
        Self::from_toml_str(&text, &shown, overrides)
    }

    /// [`from_preset`](Self::from_preset) from TOML text.
    pub fn from_toml_str(
        text: &str,
        shown: &str,
        overrides: &[String],
    ) -> Result<Self, PresetError> {
        let invalid = |reason: String| PresetError::Invalid {
            path: shown.to_string(),
            reason,
        };
        let mut value: toml::Table = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        let mut set_keys = Vec::new();
        for o in overrides {
            let (key, raw) = o
                .split_once('=')
                .ok_or_else(|| invalid(format!("--set `{o}`: expected key=value")))?;
            let parsed: toml::Value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or_else(|| toml::Value::String(raw.to_string()));
            set_dotted(&mut value, key.trim(), parsed)
                .map_err(|e| invalid(format!("--set `{o}`: {e}")))?;
            set_keys.push(key.trim().to_string());
        }
        let epochs_only = steps_or_epochs(&mut value, &set_keys).map_err(invalid)?;
        let mut cfg: TrainConfig = toml::Value::Table(value)
            .try_into()
            .map_err(|e: toml::de::Error| invalid(e.to_string()))?;
        if epochs_only {
            cfg.optim.steps = None;
        }
        cfg.validate().map_err(invalid)?;
        Ok(cfg)
    }

    /// Checks values that do not depend on the model or data: every number in its range
    /// (see [`limits`](super::limits)), the adapter's settings.
    pub fn validate(&self) -> Result<(), String> {
        super::limits::check_numbers(self)?;
        if self.mode == TrainMode::Adapter {
            self.adapter
                .validate()
                .map_err(|e| format!("adapter: {e}"))?;
        }
        Ok(())
    }

    /// The config as TOML (what `config.toml` of a run holds, and what presets look like).
    pub fn to_toml(&self) -> String {
        let mut c = self.clone();
        if c.optim.steps.is_some() {
            // `steps` takes precedence; a preset holds one of the two.
            c.optim.epochs = None;
        }
        toml::to_string_pretty(&c).unwrap_or_else(|e| format!("# could not serialise: {e}\n"))
    }
}

/// Settles `optim.steps` against `optim.epochs`: a `--set` of one drops the preset's other;
/// both in one place is an error. Returns whether `epochs` alone is given (the default
/// `steps` must then not apply).
fn steps_or_epochs(table: &mut toml::Table, set_keys: &[String]) -> Result<bool, String> {
    let Some(optim) = table.get_mut("optim").and_then(toml::Value::as_table_mut) else {
        return Ok(false);
    };
    let set = |k: &str| set_keys.iter().any(|s| s == &format!("optim.{k}"));
    match (set("steps"), set("epochs")) {
        (true, false) => {
            optim.remove("epochs");
        }
        (false, true) => {
            optim.remove("steps");
        }
        _ => {}
    }
    match (optim.contains_key("steps"), optim.contains_key("epochs")) {
        (true, true) => Err(
            "optim: give steps or epochs, not both (epochs sets steps = ⌈epochs · training examples / (batch_size · grad_accum)⌉)"
                .into(),
        ),
        (false, true) => Ok(true),
        _ => Ok(false),
    }
}

fn set_dotted(table: &mut toml::Table, key: &str, value: toml::Value) -> Result<(), String> {
    let mut parts = key.split('.').peekable();
    let mut cur = table;
    while let Some(part) = parts.next() {
        if parts.peek().is_none() {
            cur.insert(part.to_string(), value);
            return Ok(());
        }
        let entry = cur
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = entry
            .as_table_mut()
            .ok_or_else(|| format!("`{part}` is not a section"))?;
    }
    Err("empty key".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_and_errors_name_the_key() {
        let cfg = TrainConfig::from_toml_str(
            "[adapter]\nmethod = \"svfit\"\nrank = 4\n",
            "p.toml",
            &[
                "adapter.rank=8".into(),
                "optim.lr=0.02".into(),
                "name=my run".into(),
            ],
        )
        .unwrap();
        assert_eq!(cfg.adapter.rank, 8);
        assert_eq!(cfg.optim.lr, 0.02);
        assert_eq!(cfg.name.as_deref(), Some("my run"));
        let e = TrainConfig::from_toml_str("[optim]\nlr = -1.0\n", "p.toml", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("p.toml") && e.contains("optim.lr"), "{e}");
        let e = TrainConfig::from_toml_str("[optim]\nlrr = 1.0\n", "p.toml", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("lrr"), "{e}");
        let e = TrainConfig::from_toml_str("", "p.toml", &["adapter.rank=0".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("rank"), "{e}");
        let round = TrainConfig::from_toml_str(&cfg.to_toml(), "x", &[]).unwrap();
        assert_eq!(round, cfg);
    }

    #[test]
    fn schedules() {
        assert!((Schedule::Cosine.factor(11, 20, 10) - 1.0).abs() < 1e-9);
        assert!(Schedule::Cosine.factor(20, 20, 10) < 0.05);
        assert_eq!(Schedule::Linear.factor(1, 1, 0), 1.0);
    }
}

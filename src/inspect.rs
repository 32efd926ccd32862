//! `peft-studio inspect`: per-module shapes and trainable counts of a model with an adapter,
//! from its description alone (no weights needed).

use serde::Serialize;

use crate::arch::ArchSpec;
use crate::peft::PeftError;
use crate::peft::config::{AdapterConfig, Method};

/// One adapted module.
#[derive(Debug, Clone, Serialize)]
pub struct ModuleCount {
    /// Module path.
    pub path: String,
    /// Output features.
    pub out_features: usize,
    /// Input features.
    pub in_features: usize,
    /// Rank.
    pub rank: usize,
    /// Trainable values.
    pub trainable: usize,
    /// Frozen values the adapter adds (its factors).
    pub adapter_buffers: usize,
}

/// Parameter counts of a model carrying an adapter.
#[derive(Debug, Clone, Serialize)]
pub struct InspectReport {
    /// Model summary.
    pub model: String,
    /// Adapter method.
    pub method: Method,
    /// Configured rank.
    pub rank: usize,
    /// Targets as written.
    pub targets: String,
    /// Every adapted module.
    pub modules: Vec<ModuleCount>,
    /// Trainable adapter values.
    pub adapter_trainable: usize,
    /// Trainable values of the classification head (trained fully).
    pub head_trainable: usize,
    /// All trainable values (adapter + head).
    pub trainable: usize,
    /// Frozen values: the pre-trained model less its head.
    pub frozen: usize,
    /// Frozen factor values the adapters keep beside the weights (SVFit, LoLDU, PiSSA).
    pub adapter_buffers: usize,
    /// All parameters: the model plus the adapter's trainable values.
    pub total: usize,
    /// 100 · trainable / total.
    pub trainable_percent: f64,
}

/// Counts the trainable values `cfg` gives `arch`. Fails when a rank does not fit a module
/// or the targets match nothing.
pub fn inspect(arch: &ArchSpec, cfg: &AdapterConfig) -> Result<InspectReport, PeftError> {
    cfg.validate()?;
    if cfg.energy_threshold.is_some() {
        return Err(PeftError::Config(
            "energy_threshold picks each rank from the weights' singular values; inspect reads no weights, so give a fixed rank".into(),
        ));
    }
    let matcher = cfg.targets.matcher()?;
    let mut modules = Vec::new();
    for l in arch
        .linears
        .iter()
        .filter(|l| !l.head && matcher.matches(&l.path))
    {
        let (m, n, r) = (l.out_features, l.in_features, cfg.rank);
        if r > m.min(n) {
            return Err(PeftError::Rank {
                layer: l.path.clone(),
                rank: r,
                m,
                n,
            });
        }
        modules.push(ModuleCount {
            path: l.path.clone(),
            out_features: m,
            in_features: n,
            rank: r,
            trainable: cfg.trainable_for(m, n, r),
            adapter_buffers: cfg.frozen_extra_for(m, n, r),
        });
    }
    if modules.is_empty() {
        let examples: Vec<&str> = arch
            .linears
            .iter()
            .filter(|l| !l.head)
            .take(6)
            .map(|l| l.path.as_str())
            .collect();
        return Err(PeftError::NoTarget {
            targets: cfg.targets.describe(),
            examples: examples.join(", "),
        });
    }
    let adapter_trainable: usize = modules.iter().map(|m| m.trainable).sum();
    let head_trainable: usize = arch
        .linears
        .iter()
        .filter(|l| l.head)
        .map(|l| l.params())
        .sum();
    let model_total = arch.total_params();
    let total = model_total + adapter_trainable;
    let trainable = adapter_trainable + head_trainable;
    Ok(InspectReport {
        model: arch.summary.clone(),
        method: cfg.method,
        rank: cfg.rank,
        targets: cfg.targets.describe(),
        adapter_buffers: modules.iter().map(|m| m.adapter_buffers).sum(),
        modules,
        adapter_trainable,
        head_trainable,
        trainable,
        frozen: model_total - head_trainable,
        total,
        trainable_percent: 100.0 * trainable as f64 / total as f64,
    })
}

/// Formats a count with thousands separators (`294,912`).
pub fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

impl InspectReport {
    /// The human-readable table `inspect` prints.
    pub fn to_text(&self) -> String {
        let mut s = format!(
            "model: {}\nadapter: {} rank {} on `{}`\n\n",
            self.model, self.method, self.rank, self.targets
        );
        let w = self
            .modules
            .iter()
            .map(|m| m.path.len())
            .max()
            .unwrap_or(6)
            .max(6);
        s += &format!(
            "{:<w$}  {:>11}  {:>5}  {:>10}\n",
            "module", "shape", "rank", "trainable"
        );
        for m in &self.modules {
            s += &format!(
                "{:<w$}  {:>11}  {:>5}  {:>10}\n",
                m.path,
                format!("{}×{}", m.out_features, m.in_features),
                m.rank,
                thousands(m.trainable)
            );
        }
        s += &format!(
            "\n{} adapted modules\ntrainable: {}",
            self.modules.len(),
            thousands(self.trainable)
        );
        if self.head_trainable > 0 {
            s += &format!(
                " (adapter {} + head {})",
                thousands(self.adapter_trainable),
                thousands(self.head_trainable)
            );
        }
        s += &format!(
            "\nfrozen: {}\ntotal: {}\ntrainable%: {:.4}\n",
            thousands(self.frozen),
            thousands(self.total),
            self.trainable_percent
        );
        if self.adapter_buffers > 0 {
            s += &format!(
                "adapter factors (frozen buffers beside the weights): {}\n",
                thousands(self.adapter_buffers)
            );
        }
        s
    }
}

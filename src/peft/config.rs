//! [`AdapterConfig`]: which adapter, where, and how it starts (serde; TOML and JSON).

use regex::Regex;
use serde::{Deserialize, Serialize};

use super::PeftError;

/// The adapter method, as named in `METHODS.md`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Low-rank update `s·B·A` (Hugging Face PEFT's LoRA).
    Lora,
    /// Thin SVD of the weight; only the top-r singular values train.
    Svfit,
    /// LU with partial pivoting; only the first r pivots (the diagonal) train.
    Loldu,
}

impl Method {
    /// Every method, in display order.
    pub const ALL: [Method; 3] = [Method::Lora, Method::Svfit, Method::Loldu];

    /// The initialiser used when the config names none.
    pub fn default_init(self) -> Init {
        match self {
            Method::Lora => Init::Kaiming,
            Method::Svfit => Init::Svd,
            Method::Loldu => Init::Lu,
        }
    }

    /// The initialisers this method accepts.
    pub fn inits(self) -> &'static [Init] {
        match self {
            Method::Lora => &[Init::Kaiming, Init::Gaussian, Init::Pissa],
            Method::Svfit => &[Init::Svd],
            Method::Loldu => &[
                Init::Lu,
                Init::Uniform,
                Init::Normal,
                Init::Constant,
                Init::Ones,
                Init::Zeros,
            ],
        }
    }

    /// Lower-case name (`lora`, `svfit`, `loldu`).
    pub fn name(self) -> &'static str {
        match self {
            Method::Lora => "lora",
            Method::Svfit => "svfit",
            Method::Loldu => "loldu",
        }
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Method {
    type Err = PeftError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "lora" => Ok(Method::Lora),
            "svfit" => Ok(Method::Svfit),
            "loldu" => Ok(Method::Loldu),
            other => Err(PeftError::Config(format!(
                "unknown method `{other}`: expected lora, svfit or loldu"
            ))),
        }
    }
}

/// How the adapter's values start. Names follow PEFT (`init_lora_weights`) and the LoLDU
/// authors' code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Init {
    /// LoRA: A ~ Kaiming-uniform (a = √5), B = 0 (PEFT's default).
    Kaiming,
    /// LoRA: A ~ N(0, (1/r)²), B = 0.
    Gaussian,
    /// LoRA: principal singular vectors (PiSSA); the base becomes `W − s·B·A`.
    Pissa,
    /// SVFit: z₀ = Σ_r / s (the only SVFit initialiser).
    Svd,
    /// LoLDU: z₀ = D_r, the first r pivots.
    Lu,
    /// LoLDU: z₀ ~ U(−|mean D_r|/2, +|mean D_r|/2).
    Uniform,
    /// LoLDU: z₀ ~ N(mean D_r, std D_r).
    Normal,
    /// LoLDU: z₀ = mean D_r.
    Constant,
    /// LoLDU: z₀ = 1.
    Ones,
    /// LoLDU: z₀ = 0.
    Zeros,
}

impl Init {
    /// Lower-case name as written in configs.
    pub fn name(self) -> &'static str {
        match self {
            Init::Kaiming => "kaiming",
            Init::Gaussian => "gaussian",
            Init::Pissa => "pissa",
            Init::Svd => "svd",
            Init::Lu => "lu",
            Init::Uniform => "uniform",
            Init::Normal => "normal",
            Init::Constant => "constant",
            Init::Ones => "ones",
            Init::Zeros => "zeros",
        }
    }
}

impl std::fmt::Display for Init {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Which modules get an adapter, with PEFT's matching rules.
///
/// - A list: a module path matches an entry when it equals it or ends with `.entry`.
/// - A single string: a full regular-expression match on the module path, except the special
///   value `all-linear` (every linear layer but the classification head, as PEFT does).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Targets {
    /// Module-name suffixes.
    List(Vec<String>),
    /// A regular expression, or `all-linear`.
    Pattern(String),
}

impl Default for Targets {
    fn default() -> Self {
        Targets::List(vec!["query".into(), "value".into()])
    }
}

/// Module paths treated as a classification head by `all-linear` (never adapted, trained
/// fully instead, like PEFT's `modules_to_save`).
pub const HEAD_NAMES: [&str; 3] = ["classifier", "score", "lm_head"];

/// A compiled [`Targets`] ready to test module paths.
#[derive(Debug, Clone)]
pub enum TargetMatcher {
    /// Suffix entries.
    List(Vec<String>),
    /// Full-match regular expression.
    Regex(Regex),
    /// All linear layers except heads.
    AllLinear,
}

impl TargetMatcher {
    /// Does this module path get an adapter?
    pub fn matches(&self, path: &str) -> bool {
        match self {
            TargetMatcher::List(entries) => entries
                .iter()
                .any(|e| path == e || path.ends_with(&format!(".{e}"))),
            TargetMatcher::Regex(re) => re.is_match(path),
            TargetMatcher::AllLinear => !path.split('.').any(|part| HEAD_NAMES.contains(&part)),
        }
    }
}

impl Targets {
    /// Compiles the rule; a bad regular expression is an error naming it.
    pub fn matcher(&self) -> Result<TargetMatcher, PeftError> {
        match self {
            Targets::List(v) if v.is_empty() => {
                Err(PeftError::Config("targets: the list is empty".into()))
            }
            Targets::List(v) => Ok(TargetMatcher::List(v.clone())),
            Targets::Pattern(p) if p == "all-linear" => Ok(TargetMatcher::AllLinear),
            Targets::Pattern(p) => {
                let re = Regex::new(&format!("^(?:{p})$")).map_err(|e| {
                    PeftError::Config(format!(
                        "targets: `{p}` is not a valid regular expression: {e}"
                    ))
                })?;
                Ok(TargetMatcher::Regex(re))
            }
        }
    }

    /// Parses a command-line value: `query,value` is a list, `re:<regex>` a pattern,
    /// `all-linear` the special pattern.
    pub fn parse_cli(s: &str) -> Targets {
        if s == "all-linear" {
            Targets::Pattern(s.into())
        } else if let Some(re) = s.strip_prefix("re:") {
            Targets::Pattern(re.into())
        } else {
            Targets::List(
                s.split(',')
                    .map(|t| t.trim().to_string())
                    .filter(|t| !t.is_empty())
                    .collect(),
            )
        }
    }

    /// Human-readable form for messages.
    pub fn describe(&self) -> String {
        match self {
            Targets::List(v) => v.join(","),
            Targets::Pattern(p) => p.clone(),
        }
    }
}

/// Everything that defines an adapter, independent of any model.
///
/// ```
/// use peft_studio::peft::{AdapterConfig, Method};
/// let cfg: AdapterConfig = toml::from_str("method = \"loldu\"\nrank = 16").unwrap();
/// assert_eq!(cfg.method, Method::Loldu);
/// assert_eq!(cfg.scale_for_rank(16), 1.0); // alpha defaults to the rank
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdapterConfig {
    /// The adapter method.
    pub method: Method,
    /// The rank r (ignored by SVFit when `energy_threshold` is set).
    pub rank: usize,
    /// Scale numerator: `s = alpha / r` (or `alpha / √r` with rsLoRA). Defaults to the rank.
    pub alpha: Option<f64>,
    /// Which modules to adapt.
    pub targets: Targets,
    /// Initialiser; the method's default when absent.
    pub init: Option<Init>,
    /// Dropout probability on the adapter branch's input (training only).
    pub dropout: f64,
    /// rsLoRA: `s = alpha / √r`.
    pub use_rslora: bool,
    /// SVFit / LoLDU: the scalar s trains too (r + 1 values per matrix).
    pub trainable_scale: bool,
    /// SVFit / LoLDU: apply ReLU to z in the forward.
    pub relu: bool,
    /// SVFit: choose r per matrix as the smallest holding this share of Σσ² (e.g. 0.99).
    pub energy_threshold: Option<f64>,
    /// LoLDU: a pivot with |D| below `pivot_epsilon · max|W|` is refused.
    pub pivot_epsilon: f64,
    /// Seed of the random initialisers (combined with each module's path).
    pub seed: u64,
}

impl Default for AdapterConfig {
    fn default() -> Self {
        Self {
            method: Method::Lora,
            rank: 8,
            alpha: None,
            targets: Targets::default(),
            init: None,
            dropout: 0.0,
            use_rslora: false,
            trainable_scale: false,
            relu: false,
            energy_threshold: None,
            pivot_epsilon: 1e-7,
            seed: 0,
        }
    }
}

impl AdapterConfig {
    /// A config for `method` at `rank` with every other field at its default.
    pub fn new(method: Method, rank: usize) -> Self {
        Self {
            method,
            rank,
            ..Self::default()
        }
    }

    /// The initialiser in force (the configured one or the method's default).
    pub fn init(&self) -> Init {
        self.init.unwrap_or(self.method.default_init())
    }

    /// `alpha`, defaulting to the configured rank.
    pub fn alpha(&self) -> f64 {
        self.alpha.unwrap_or(self.rank as f64)
    }

    /// The scale s for a module of rank `r` (`alpha / r`, or `alpha / √r` with rsLoRA).
    pub fn scale_for_rank(&self, r: usize) -> f64 {
        let alpha = self.alpha.unwrap_or(r as f64);
        if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        }
    }

    /// Checks the fields that do not depend on a model.
    pub fn validate(&self) -> Result<(), PeftError> {
        let bad = |msg: String| Err(PeftError::Config(msg));
        if self.rank == 0 && self.energy_threshold.is_none() {
            return bad("rank: must be at least 1".into());
        }
        if let Some(a) = self.alpha
            && !(a.is_finite() && a > 0.0)
        {
            return bad(format!("alpha: must be a positive number, got {a}"));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(format!("dropout: must be in [0, 1), got {}", self.dropout));
        }
        let init = self.init();
        if !self.method.inits().contains(&init) {
            let allowed: Vec<&str> = self.method.inits().iter().map(|i| i.name()).collect();
            return bad(format!(
                "init: `{init}` is not an initialiser of {}; expected one of {}",
                self.method,
                allowed.join(", ")
            ));
        }
        if self.method == Method::Lora && (self.trainable_scale || self.relu) {
            return bad("trainable_scale and relu apply to svfit and loldu only".into());
        }
        if let Some(t) = self.energy_threshold {
            if self.method != Method::Svfit {
                return bad("energy_threshold applies to svfit only".into());
            }
            if !(t > 0.0 && t <= 1.0) {
                return bad(format!("energy_threshold: must be in (0, 1], got {t}"));
            }
        }
        if !(self.pivot_epsilon >= 0.0 && self.pivot_epsilon.is_finite()) {
            return bad(format!(
                "pivot_epsilon: must be a non-negative number, got {}",
                self.pivot_epsilon
            ));
        }
        self.targets.matcher().map(|_| ())
    }

    /// Trainable values one adapted `m×n` matrix gets at rank `r`.
    pub fn trainable_for(&self, m: usize, n: usize, r: usize) -> usize {
        match self.method {
            Method::Lora => r * (m + n),
            Method::Svfit | Method::Loldu => r + usize::from(self.trainable_scale),
        }
    }

    /// Frozen values the adapter adds beside the base weight (its factors), for a `m×n` matrix.
    pub fn frozen_extra_for(&self, m: usize, n: usize, r: usize) -> usize {
        match (self.method, self.init()) {
            (Method::Lora, Init::Pissa) => r * (m + n),
            (Method::Lora, _) => 0,
            (Method::Svfit | Method::Loldu, _) => r * (m + n) + r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_matches_suffix_only_on_dot_boundary() {
        let m = Targets::parse_cli("query,value").matcher().unwrap();
        assert!(m.matches("encoder.layer.0.attention.self.query"));
        assert!(m.matches("value"));
        assert!(!m.matches("encoder.layer.0.attention.self.myquery"));
        assert!(!m.matches("encoder.layer.0.attention.self.key"));
    }

    #[test]
    fn regex_is_a_full_match() {
        let m = Targets::Pattern(r".*\.(query|key)".into())
            .matcher()
            .unwrap();
        assert!(m.matches("layer.0.query"));
        assert!(!m.matches("layer.0.query.extra"));
    }

    #[test]
    fn all_linear_skips_heads() {
        let m = Targets::parse_cli("all-linear").matcher().unwrap();
        assert!(m.matches("bert.encoder.layer.0.output.dense"));
        assert!(!m.matches("classifier"));
        assert!(!m.matches("classifier.out_proj"));
    }

    #[test]
    fn validation_names_the_field() {
        let mut c = AdapterConfig::new(Method::Lora, 0);
        assert!(c.validate().unwrap_err().to_string().contains("rank"));
        c.rank = 4;
        c.init = Some(Init::Lu);
        assert!(c.validate().unwrap_err().to_string().contains("init"));
        c.init = None;
        c.trainable_scale = true;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("trainable_scale")
        );
        let bad: Result<AdapterConfig, _> = toml::from_str("method = \"lora\"\nrnak = 3");
        assert!(bad.unwrap_err().to_string().contains("rnak"));
    }

    #[test]
    fn json_and_toml_round_trip() {
        let mut c = AdapterConfig::new(Method::Svfit, 32);
        c.energy_threshold = Some(0.99);
        c.targets = Targets::Pattern(".*query".into());
        let t = toml::to_string(&c).unwrap();
        assert_eq!(toml::from_str::<AdapterConfig>(&t).unwrap(), c);
        let j = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<AdapterConfig>(&j).unwrap(), c);
    }
}

//! A benchmark run as recorded (JSON) and as shown (markdown): per round and variant our figures
//! and the peer's, summarised as the median over rounds, with ratios.

use serde::{Deserialize, Serialize};

use super::StepStats;
use super::machine::CpuInfo;
use super::peer::PeerStats;

/// One variant in one round.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoundResult {
    /// Round (1-based).
    pub round: usize,
    /// Variant key (`lora`, `full`, …).
    pub variant: String,
    /// Our figures.
    pub ours: StepStats,
    /// The peer's, when it ran.
    pub peer: Option<PeerStats>,
    /// Why the peer's figures are missing for a variant it covers (a failed run).
    #[serde(default)]
    pub peer_error: Option<String>,
}

/// A whole `bench` invocation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchRun {
    /// Suite name (`minilm`, `frozen-backward`).
    pub suite: String,
    /// Table title.
    pub title: String,
    /// When it ran (UTC, RFC 3339).
    pub date: String,
    /// The CPU.
    pub cpu: CpuInfo,
    /// Where ours computed (`cpu`, `cuda:0 — NVIDIA H200 (139.8 GiB)`); empty in records
    /// from before the setting existed (the CPU).
    #[serde(default)]
    pub device: String,
    /// Threads of both sides.
    pub threads: usize,
    /// Timed steps per variant and round.
    pub steps: usize,
    /// Rounds.
    pub rounds: usize,
    /// Whether this suite has a peer at all.
    pub has_peer: bool,
    /// The peer's `python` (when found).
    pub peer_python: Option<String>,
    /// Why no peer ran (when none did).
    pub peer_missing: Option<String>,
    /// Every measurement in the order taken.
    pub results: Vec<RoundResult>,
}

/// Median of a non-empty list (mean of the middle two for an even count).
pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        s[n / 2]
    } else {
        0.5 * (s[n / 2 - 1] + s[n / 2])
    }
}

/// One variant summarised over rounds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    /// Variant key.
    pub variant: String,
    /// Its display name.
    pub name: String,
    /// Trainable values (ours).
    pub trainable: usize,
    /// Our s/step per round.
    pub ours_rounds: Vec<f64>,
    /// Median of `ours_rounds`.
    pub ours_secs: f64,
    /// Our largest peak RSS over rounds, MiB.
    pub ours_rss_mib: f64,
    /// The peer's s/step per round (empty when it did not run).
    pub peer_rounds: Vec<f64>,
    /// Median of `peer_rounds`.
    pub peer_secs: Option<f64>,
    /// The peer's largest peak RSS, MiB.
    pub peer_rss_mib: Option<f64>,
    /// ours / peer time.
    pub time_ratio: Option<f64>,
    /// ours / peer peak RSS.
    pub rss_ratio: Option<f64>,
    /// Median minor page faults per step (ours).
    pub faults_per_step: Option<f64>,
    /// Median CPU % of one core (ours).
    pub cpu_percent: Option<f64>,
    /// Our best single step.
    pub best_secs: f64,
}

impl BenchRun {
    /// Variants in first-run order.
    fn variants(&self) -> Vec<String> {
        let mut v: Vec<String> = Vec::new();
        for r in &self.results {
            if !v.contains(&r.variant) {
                v.push(r.variant.clone());
            }
        }
        v
    }

    /// Per-variant summaries.
    pub fn summaries(&self) -> Vec<Summary> {
        self.variants()
            .into_iter()
            .map(|variant| {
                let rs: Vec<&RoundResult> = self
                    .results
                    .iter()
                    .filter(|r| r.variant == variant)
                    .collect();
                let ours_rounds: Vec<f64> = rs.iter().map(|r| r.ours.secs_per_step).collect();
                let peer_rounds: Vec<f64> = rs
                    .iter()
                    .filter_map(|r| r.peer.as_ref().map(|p| p.secs_per_step))
                    .collect();
                let opt_median = |v: Vec<f64>| (!v.is_empty()).then(|| median(&v));
                let ours_secs = median(&ours_rounds);
                let ours_rss = rs.iter().map(|r| r.ours.peak_rss_mib).fold(0.0, f64::max);
                let peer_secs = opt_median(peer_rounds.clone());
                let peer_rss = rs
                    .iter()
                    .filter_map(|r| r.peer.as_ref().map(|p| p.peak_rss_mib))
                    .reduce(f64::max);
                Summary {
                    name: rs[0].ours.variant.clone(),
                    trainable: rs[0].ours.trainable,
                    time_ratio: peer_secs.map(|p| ours_secs / p),
                    rss_ratio: peer_rss.map(|p| ours_rss / p),
                    faults_per_step: opt_median(
                        rs.iter()
                            .filter_map(|r| r.ours.minor_faults_per_step)
                            .collect(),
                    ),
                    cpu_percent: opt_median(rs.iter().filter_map(|r| r.ours.cpu_percent).collect()),
                    best_secs: rs
                        .iter()
                        .map(|r| r.ours.best_secs)
                        .fold(f64::INFINITY, f64::min),
                    variant,
                    ours_rounds,
                    ours_secs,
                    ours_rss_mib: ours_rss,
                    peer_rounds,
                    peer_secs,
                    peer_rss_mib: peer_rss,
                }
            })
            .collect()
    }

    /// The markdown report.
    pub fn markdown(&self) -> String {
        let sums = self.summaries();
        let mut s = format!("## {}\n\n", self.title);
        s += &format!(
            "Measured {} on {}{}; {} threads{}; {} round(s) of {} timed steps per \
             variant{}. s/step: median of the per-round medians (per-round figures in brackets).\n\n",
            self.date,
            self.cpu.describe(),
            match self.device.as_str() {
                "" | "cpu" => String::new(),
                d => format!(", peft-studio on {d}"),
            },
            self.threads,
            if self.has_peer { " for both sides" } else { "" },
            self.rounds,
            self.steps,
            if self.has_peer {
                ", ours and the peer alternating"
            } else {
                ""
            }
        );
        if self.has_peer {
            match (
                &self.peer_missing,
                self.results.iter().find_map(|r| r.peer.as_ref()),
            ) {
                (None, Some(p)) => {
                    let (script, weights) = if self.suite == "smollm2" {
                        (
                            "llm_step.py",
                            "the f32 folder the peer's setup.sh writes from the SmolLM2 GGUF",
                        )
                    } else {
                        ("minilm_step.py", "`downloads/all-MiniLM-L6-v2`")
                    };
                    s += &format!(
                        "Peer: PyTorch + PEFT ({}), `{script}` on the same weights \
                         ({weights}), the same batch and AdamW.\n\n",
                        p.versions
                    );
                    if self.results.iter().any(|r| r.variant == "generate") {
                        s += &super::llm::generate_note();
                    }
                }
                (Some(why), _) => {
                    s += &format!(
                        "**No peer ran**: {why}. The peer columns are empty; no figure from \
                         another machine or run is quoted.\n\n"
                    )
                }
                (None, None) => {
                    s += "**No peer figure was obtained** (every peer run failed, see below).\n\n"
                }
            }
            s += &self.side_by_side_table(&sums);
        } else {
            s += &plain_table(&sums);
        }
        s += "\npeft-studio over the timed steps:\n\n| variant | best s/step | minor page faults / step | CPU (% of one core) |\n| --- | ---: | ---: | ---: |\n";
        for x in &sums {
            s += &format!(
                "| {} | {:.3} | {} | {} |\n",
                x.name,
                x.best_secs,
                x.faults_per_step
                    .map_or(
                        "-".into(),
                        |f| crate::inspect::thousands(f.round() as usize)
                    ),
                x.cpu_percent.map_or("-".into(), |c| format!("{c:.0}"))
            );
        }
        for r in &self.results {
            if let Some(e) = &r.peer_error {
                s += &format!(
                    "\nPeer run failed (round {}, {}): {e}\n",
                    r.round, r.variant
                );
            }
        }
        s
    }

    fn side_by_side_table(&self, sums: &[Summary]) -> String {
        // A method PEFT lacks is set against our LoRA r8 at the same matmul precision.
        let lora_like = |variant: &str| {
            let key = match super::split_precision(variant).1 {
                crate::peft::MatmulPrecision::Bf16 => "lora-bf16",
                crate::peft::MatmulPrecision::F32 => "lora",
            };
            sums.iter().find(|x| x.variant == key)
        };
        let mut s = String::from(
            "| variant | trainable | peft-studio s/step | peer s/step | time ratio (ours / peer) | peft-studio peak RSS (MiB) | peer peak RSS (MiB) | RSS ratio |\n\
             | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
        );
        for x in sums {
            let has_peer_mode = super::minilm::peer_mode(&x.variant).is_some();
            let (peer_time, ratio) = match (x.peer_secs, has_peer_mode) {
                (Some(p), _) => (
                    format!("{p:.3} ({})", rounds(&x.peer_rounds)),
                    x.time_ratio.map_or("-".into(), |r| format!("**{r:.2}×**")),
                ),
                (None, true) => ("no peer".into(), "-".into()),
                (None, false) => (
                    "- (PEFT has no such method)".into(),
                    match lora_like(&x.variant) {
                        Some(l) if l.ours_secs > 0.0 => {
                            format!("{:.2}× our {}", x.ours_secs / l.ours_secs, l.name)
                        }
                        _ => "-".into(),
                    },
                ),
            };
            s += &format!(
                "| {} | {} | {:.3} ({}) | {} | {} | {:.0} | {} | {} |\n",
                x.name,
                crate::inspect::thousands(x.trainable),
                x.ours_secs,
                rounds(&x.ours_rounds),
                peer_time,
                ratio,
                x.ours_rss_mib,
                x.peer_rss_mib.map_or("-".into(), |p| format!("{p:.0}")),
                x.rss_ratio.map_or("-".into(), |r| format!("{r:.2}×")),
            );
        }
        s
    }
}

fn rounds(v: &[f64]) -> String {
    v.iter()
        .map(|x| format!("{x:.3}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn plain_table(sums: &[Summary]) -> String {
    let mut s = String::from(
        "| variant | trainable | s/step (median) | peak RSS (MiB) |\n| --- | ---: | ---: | ---: |\n",
    );
    for x in sums {
        s += &format!(
            "| {} | {} | {:.3} ({}) | {:.0} |\n",
            x.name,
            crate::inspect::thousands(x.trainable),
            x.ours_secs,
            rounds(&x.ours_rounds),
            x.ours_rss_mib
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(name: &str, secs: f64, rss: f64) -> StepStats {
        StepStats {
            variant: name.into(),
            steps: 3,
            secs_per_step: secs,
            best_secs: secs * 0.9,
            peak_rss_mib: rss,
            trainable: 1000,
            minor_faults_per_step: Some(12.0),
            cpu_percent: Some(190.0),
        }
    }

    fn peer(secs: f64) -> PeerStats {
        PeerStats {
            secs_per_step: secs,
            best_secs: secs,
            peak_rss_mib: 1200.0,
            trainable: 1000,
            steps: 3,
            versions: "torch 2".into(),
        }
    }

    fn run(peer_missing: Option<&str>) -> BenchRun {
        let with_peer = peer_missing.is_none();
        let mut results = Vec::new();
        for round in 1..=2 {
            results.push(RoundResult {
                round,
                variant: "lora".into(),
                ours: stats("LoRA r8", 0.4 + 0.02 * round as f64, 500.0),
                peer: with_peer.then(|| peer(0.8)),
                peer_error: None,
            });
            results.push(RoundResult {
                round,
                variant: "svfit".into(),
                ours: stats("SVFit r384", 0.42, 520.0),
                peer: None,
                peer_error: None,
            });
            results.push(RoundResult {
                round,
                variant: "lora-bf16".into(),
                ours: stats("LoRA r8 bf16", 0.2, 500.0),
                peer: with_peer.then(|| peer(0.8)),
                peer_error: None,
            });
            results.push(RoundResult {
                round,
                variant: "svfit-bf16".into(),
                ours: stats("SVFit r384 bf16", 0.22, 520.0),
                peer: None,
                peer_error: None,
            });
        }
        BenchRun {
            suite: "minilm".into(),
            title: "t".into(),
            date: "d".into(),
            cpu: CpuInfo::parse("processor : 0\nmodel name : Test CPU\nflags : avx2 fma\n"),
            device: String::new(),
            threads: 2,
            steps: 3,
            rounds: 2,
            has_peer: true,
            peer_python: None,
            peer_missing: peer_missing.map(String::from),
            results,
        }
    }

    #[test]
    fn side_by_side_summary_gives_medians_and_ratios() {
        let r = run(None);
        let s = r.summaries();
        assert_eq!(s.len(), 4);
        assert!((s[0].ours_secs - 0.43).abs() < 1e-12);
        assert!((s[0].time_ratio.unwrap() - 0.43 / 0.8).abs() < 1e-12);
        assert!((s[0].rss_ratio.unwrap() - 500.0 / 1200.0).abs() < 1e-12);
        assert!(s[1].time_ratio.is_none());
        let md = r.markdown();
        assert!(md.contains("Test CPU"), "{md}");
        assert!(md.contains("**0.54×**"), "{md}");
        assert!(md.contains("0.98× our LoRA r8 |"), "{md}");
        // bf16 against bf16.
        assert!(md.contains("1.10× our LoRA r8 bf16 |"), "{md}");
        assert!(md.contains("0.420, 0.440"), "{md}");
        // The JSON round-trips.
        let back: BenchRun = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back.results.len(), 8);
    }

    #[test]
    fn without_a_peer_the_table_says_so_and_quotes_nothing() {
        let md = run(Some("no peer venv")).markdown();
        assert!(md.contains("**No peer ran**: no peer venv"), "{md}");
        assert!(md.contains("| no peer | - |"), "{md}");
        assert!(!md.contains("PyTorch + PEFT ("), "{md}");
    }

    #[test]
    fn median_of_even_and_odd_lists() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0]), 2.5);
        assert!(median(&[]).is_nan());
    }
}

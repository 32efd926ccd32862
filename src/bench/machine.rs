//! What a benchmark figure depends on besides the code: the CPU (model and vector extensions)
//! and this process's counters (minor page faults, CPU time) from `/proc`.

use std::time::Instant;

use serde::{Deserialize, Serialize};

/// The CPU a benchmark ran on, from `/proc/cpuinfo`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuInfo {
    /// `model name` of the first processor (empty when unknown).
    pub model: String,
    /// Logical CPUs listed.
    pub logical_cpus: usize,
    /// AVX2 present.
    pub avx2: bool,
    /// AVX-512 (foundation) present.
    pub avx512f: bool,
    /// FMA present.
    pub fma: bool,
}

impl CpuInfo {
    /// Reads `/proc/cpuinfo`; an empty description where it cannot be read.
    pub fn detect() -> Self {
        std::fs::read_to_string("/proc/cpuinfo")
            .map(|t| Self::parse(&t))
            .unwrap_or_default()
    }

    /// Parses the text of `/proc/cpuinfo`.
    pub fn parse(text: &str) -> Self {
        let value = |line: &str| line.split_once(':').map(|(_, v)| v.trim().to_string());
        let mut info = Self::default();
        let mut flags_seen = false;
        for line in text.lines() {
            let key = line.split(':').next().unwrap_or("").trim();
            match key {
                "processor" => info.logical_cpus += 1,
                "model name" if info.model.is_empty() => {
                    info.model = value(line).unwrap_or_default();
                }
                "flags" if !flags_seen => {
                    flags_seen = true;
                    let flags = value(line).unwrap_or_default();
                    let has = |f: &str| flags.split_whitespace().any(|x| x == f);
                    info.avx2 = has("avx2");
                    info.avx512f = has("avx512f");
                    info.fma = has("fma");
                }
                _ => {}
            }
        }
        info
    }

    /// One line for a results table: `Intel(R) Xeon(R) … (2 logical CPUs; AVX2 yes, AVX-512 no, FMA yes)`.
    pub fn describe(&self) -> String {
        let yn = |b: bool| if b { "yes" } else { "no" };
        let model = if self.model.is_empty() {
            "unknown CPU model"
        } else {
            &self.model
        };
        format!(
            "{model} ({} logical CPUs; AVX2 {}, AVX-512 {}, FMA {})",
            self.logical_cpus,
            yn(self.avx2),
            yn(self.avx512f),
            yn(self.fma)
        )
    }
}

/// Minor page faults and CPU time of this process (all threads) at one instant.
#[derive(Debug, Clone, Copy)]
pub struct ProcCounters {
    minor_faults: u64,
    /// utime + stime, in clock ticks.
    cpu_ticks: u64,
    at: Instant,
}

/// Clock ticks per second of `/proc/self/stat` (`USER_HZ`, 100 on every Linux x86-64 build).
const TICKS_PER_SEC: f64 = 100.0;

impl ProcCounters {
    /// Reads `/proc/self/stat`; `None` where it is unavailable.
    pub fn read() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        Self::parse(&stat, Instant::now())
    }

    fn parse(stat: &str, at: Instant) -> Option<Self> {
        // Fields after the command name (which may hold spaces), from field 3 (`state`) on.
        let rest = &stat[stat.rfind(')')? + 1..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let num = |i: usize| f.get(i)?.parse::<u64>().ok();
        Some(Self {
            minor_faults: num(7)?,
            cpu_ticks: num(11)? + num(12)?,
            at,
        })
    }

    /// (minor page faults per step, CPU use in % of one core) since `earlier`, over `steps`.
    pub fn since(&self, earlier: &Self, steps: usize) -> (f64, f64) {
        let faults = self.minor_faults.saturating_sub(earlier.minor_faults) as f64;
        let cpu = self.cpu_ticks.saturating_sub(earlier.cpu_ticks) as f64 / TICKS_PER_SEC;
        let wall = self.at.duration_since(earlier.at).as_secs_f64();
        let pct = if wall > 0.0 { 100.0 * cpu / wall } else { 0.0 };
        (faults / steps.max(1) as f64, pct)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpuinfo_parses_model_and_flags() {
        let text = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse2 avx2 fma\n\n\
                    processor\t: 1\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse2 avx2 fma\n";
        let c = CpuInfo::parse(text);
        assert_eq!(c.model, "AMD EPYC 7B13");
        assert_eq!(c.logical_cpus, 2);
        assert!(c.avx2 && c.fma && !c.avx512f);
        assert!(c.describe().contains("AVX-512 no"));
        let x = CpuInfo::parse("processor : 0\nflags : avx512f avx2\n");
        assert!(x.avx512f && !x.fma);
        assert!(x.describe().starts_with("unknown CPU model"));
    }

    #[test]
    fn proc_stat_parses_faults_and_cpu_time() {
        let at = Instant::now();
        let a = ProcCounters::parse("42 (peft studio) R 1 2 3 4 5 6 1000 0 0 0 200 50 0 0", at)
            .unwrap();
        assert_eq!((a.minor_faults, a.cpu_ticks), (1000, 250));
        let b = ProcCounters {
            minor_faults: 1400,
            cpu_ticks: 450,
            at: at + std::time::Duration::from_secs(1),
        };
        let (faults, pct) = b.since(&a, 4);
        assert_eq!(faults, 100.0);
        assert!((pct - 200.0).abs() < 1e-9);
        assert!(ProcCounters::parse("garbage", at).is_none());
    }
}

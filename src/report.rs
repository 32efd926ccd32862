//! Comparison tables of runs: markdown, CSV and a PNG of the loss curves.

use std::path::Path;

use crate::inspect::thousands;
use crate::plot::{Series, line_chart};
use crate::train::{MetricLine, RunSummary};

/// Column headers of the comparison table.
pub const HEADERS: [&str; 10] = [
    "run",
    "method",
    "rank",
    "trainable",
    "% of total",
    "eval acc (final)",
    "eval acc (best)",
    "s/step",
    "peak RSS (MiB)",
    "status",
];

fn cells(s: &RunSummary) -> [String; 10] {
    let acc = |e: Option<crate::train::EvalPoint>| {
        e.map_or("–".into(), |e| format!("{:.2}%", 100.0 * e.accuracy))
    };
    [
        s.name.clone(),
        s.method.clone(),
        s.rank.map_or("–".into(), |r| r.to_string()),
        thousands(s.trainable),
        format!("{:.3}%", s.trainable_percent()),
        acc(s.final_eval),
        acc(s.best_eval),
        format!("{:.3}", s.secs_per_step),
        format!("{:.0}", s.peak_rss_mib),
        s.status.to_string(),
    ]
}

/// The table as markdown.
pub fn markdown(runs: &[RunSummary]) -> String {
    let mut s = format!("| {} |\n|", HEADERS.join(" | "));
    s += &" --- |".repeat(HEADERS.len());
    s.push('\n');
    for r in runs {
        s += &format!("| {} |\n", cells(r).join(" | "));
    }
    s
}

/// The table as CSV (raw numbers).
pub fn csv(runs: &[RunSummary]) -> anyhow::Result<String> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record([
        "id",
        "run",
        "method",
        "rank",
        "trainable",
        "total",
        "trainable_percent",
        "final_eval_accuracy",
        "best_eval_accuracy",
        "final_eval_loss",
        "secs_per_step",
        "peak_rss_mib",
        "wall_secs",
        "status",
    ])?;
    for r in runs {
        let opt = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.6}"));
        w.write_record([
            r.id.clone(),
            r.name.clone(),
            r.method.clone(),
            r.rank.map_or(String::new(), |v| v.to_string()),
            r.trainable.to_string(),
            r.total.to_string(),
            format!("{:.6}", r.trainable_percent()),
            opt(r.final_eval.map(|e| e.accuracy)),
            opt(r.best_eval.map(|e| e.accuracy)),
            opt(r.final_eval.map(|e| e.loss)),
            format!("{:.6}", r.secs_per_step),
            format!("{:.1}", r.peak_rss_mib),
            format!("{:.2}", r.wall_secs),
            r.status.to_string(),
        ])?;
    }
    Ok(String::from_utf8(
        w.into_inner().map_err(|e| anyhow::anyhow!("{e}"))?,
    )?)
}

/// A plain-text table for the terminal.
pub fn text_table(runs: &[RunSummary]) -> String {
    let rows: Vec<[String; 10]> = runs.iter().map(cells).collect();
    let mut widths: Vec<usize> = HEADERS.iter().map(|h| h.chars().count()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| -> String {
        cells
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (c, w))| {
                let pad = w - c.chars().count();
                if i == 0 || i == 1 || i == 9 {
                    format!("{c}{}", " ".repeat(pad))
                } else {
                    format!("{}{c}", " ".repeat(pad))
                }
            })
            .collect::<Vec<_>>()
            .join("  ")
    };
    let mut s = line(HEADERS.to_vec());
    s.push('\n');
    for r in &rows {
        s += &line(r.iter().map(String::as_str).collect());
        s.push('\n');
    }
    s
}

/// Smoothed training-loss curves of the runs as a PNG (log scale).
pub fn loss_png(path: &Path, runs: &[(RunSummary, Vec<MetricLine>)]) -> anyhow::Result<()> {
    let series: Vec<Series> = runs
        .iter()
        .map(|(s, m)| {
            let mut ema = None;
            let points = m
                .iter()
                .filter_map(|l| match l {
                    MetricLine::Step { step, loss, .. } => {
                        let v = match ema {
                            None => *loss,
                            Some(prev) => 0.9 * prev + 0.1 * loss,
                        };
                        ema = Some(v);
                        Some((*step as f64, v))
                    }
                    MetricLine::Eval(_) => None,
                })
                .collect();
            Series {
                name: s.name.clone(),
                points,
            }
        })
        .collect();
    line_chart(path, "training loss (EMA 0.9)", "loss", &series, true)
}

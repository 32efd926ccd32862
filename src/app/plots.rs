//! Curves (egui_plot): training and eval loss with EMA smoothing and a log scale, eval
//! accuracy on the same step axis, runs overlaid in their own colours (the legend toggles
//! each), and the trainable-parameters-against-accuracy scatter.
//!
//! A run's colour comes from its id, so it is the same in every chart and table and survives
//! re-sorting; its label adds the start time to the name, so two runs called "LoRA r8" are two
//! legend entries.

use egui::Color32;
use egui_plot::{
    Corner, GridInput, GridMark, HoverPosition, Legend, Line, MarkerShape, Plot, PlotPoints, Points,
};

/// One run's curves.
#[derive(Debug, Clone, Default)]
pub struct Curves {
    /// Run id (its colour); empty for a run that has not started yet.
    pub id: String,
    /// Legend name (unique among the curves drawn together).
    pub name: String,
    /// (step, training loss).
    pub train_loss: Vec<[f64; 2]>,
    /// (step, eval loss).
    pub eval_loss: Vec<[f64; 2]>,
    /// (step, eval accuracy).
    pub eval_accuracy: Vec<[f64; 2]>,
}

impl Curves {
    /// The colour of the run.
    pub fn color(&self) -> Color32 {
        run_color(&self.id)
    }

    fn steps(&self) -> impl Iterator<Item = f64> + '_ {
        self.train_loss
            .iter()
            .chain(&self.eval_loss)
            .chain(&self.eval_accuracy)
            .map(|p| p[0])
    }
}

/// Exponential moving average with weight `alpha` on the past (0: the raw curve).
pub fn ema(points: &[[f64; 2]], alpha: f64) -> Vec<[f64; 2]> {
    let mut out = Vec::with_capacity(points.len());
    let mut acc: Option<f64> = None;
    for p in points {
        let v = match acc {
            None => p[1],
            Some(a) => alpha * a + (1.0 - alpha) * p[1],
        };
        acc = Some(v);
        out.push([p[0], v]);
    }
    out
}

fn log_points(points: Vec<[f64; 2]>, log: bool) -> Vec<[f64; 2]> {
    if log {
        points
            .into_iter()
            .filter(|p| p[1] > 0.0)
            .map(|p| [p[0], p[1].log10()])
            .collect()
    } else {
        points
    }
}

/// The colour of run `id`: a hue from a hash of the id (FNV-1a), the same in every chart and
/// table and whatever the order; grey for a run without an id yet.
pub fn run_color(id: &str) -> Color32 {
    if id.is_empty() {
        return Color32::from_gray(150);
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // Spread nearby hashes: the top bits pick the hue, the next ones a slight lightness shift.
    let hue = (h >> 40) as f32 / (1u64 << 24) as f32;
    let value = 0.80 + 0.15 * ((h >> 32) & 0xff) as f32 / 255.0;
    egui::ecolor::Hsva::new(hue, 0.70, value, 1.0).into()
}

/// `HH:MM` (or `HH:MM:SS` with `seconds`) of a run's start, from its id
/// (`YYYYMMDD-HHMMSS-…`) or, failing that, its RFC 3339 start time.
fn start_time(id: &str, started_at: &str, seconds: bool) -> Option<String> {
    let b = id.as_bytes();
    let stamped = b.len() >= 15
        && b[..8].iter().all(u8::is_ascii_digit)
        && b[8] == b'-'
        && b[9..15].iter().all(u8::is_ascii_digit);
    let (h, m, s) = if stamped {
        (&id[9..11], &id[11..13], &id[13..15])
    } else {
        let t = started_at.split('T').nth(1)?;
        (t.get(0..2)?, t.get(3..5)?, t.get(6..8)?)
    };
    Some(if seconds {
        format!("{h}:{m}:{s}")
    } else {
        format!("{h}:{m}")
    })
}

/// Legend labels for runs `(id, name, started_at)`: the name and start time, with the
/// seconds and then the id added where two would otherwise read the same.
pub fn unique_labels(runs: &[(&str, &str, &str)]) -> Vec<String> {
    let label = |(id, name, at): &(&str, &str, &str), seconds| match start_time(id, at, seconds) {
        Some(t) => format!("{name} · {t}"),
        None => name.to_string(),
    };
    let mut out: Vec<String> = runs.iter().map(|r| label(r, false)).collect();
    let clashes = |out: &[String], i: usize| out.iter().filter(|o| **o == out[i]).count() > 1;
    let first: Vec<bool> = (0..out.len()).map(|i| clashes(&out, i)).collect();
    for (i, clash) in first.into_iter().enumerate() {
        if clash {
            out[i] = label(&runs[i], true);
        }
    }
    let second: Vec<bool> = (0..out.len()).map(|i| clashes(&out, i)).collect();
    for (i, clash) in second.into_iter().enumerate() {
        if clash && !runs[i].0.is_empty() {
            out[i] = format!("{} ({})", runs[i].1, runs[i].0);
        }
    }
    out
}

/// The step range covered by any of the curves, if any has a point.
pub fn step_range(runs: &[Curves]) -> Option<(f64, f64)> {
    let mut steps = runs.iter().flat_map(Curves::steps);
    let first = steps.next()?;
    Some(steps.fold((first, first), |(lo, hi), s| (lo.min(s), hi.max(s))))
}

/// An empty chart: a frame of the chart's size with a line of text, instead of axes around
/// nothing.
pub fn placeholder(ui: &mut egui::Ui, height: f32, text: &str) {
    let width = ui.available_width();
    let (rect, _) =
        ui.allocate_exact_size(egui::vec2(width, height.max(40.0)), egui::Sense::hover());
    let visuals = ui.visuals();
    ui.painter().rect_stroke(
        rect,
        4.0,
        egui::Stroke::new(1.0, visuals.widgets.noninteractive.bg_stroke.color),
        egui::StrokeKind::Inside,
    );
    ui.painter().text(
        rect.center(),
        egui::Align2::CENTER_CENTER,
        text,
        egui::FontId::proportional(14.0),
        visuals.weak_text_color(),
    );
}

/// Both step charts show `range` (the loss and accuracy charts share it) and pan and zoom
/// together.
fn step_axis<'a>(plot: Plot<'a>, group: &str, range: (f64, f64)) -> Plot<'a> {
    let (lo, hi) = if range.1 > range.0 {
        range
    } else {
        (range.0 - 1.0, range.0 + 1.0)
    };
    plot.include_x(lo)
        .include_x(hi)
        .link_axis(egui::Id::unique(("steps", group)), [true, false])
        .link_cursor(egui::Id::unique(("steps", group)), [true, false])
}

/// The loss plot: each run's smoothed training loss (solid) and eval loss (dashed), on the
/// step range `steps` (shared with the accuracy chart of the same `group`).
#[allow(clippy::too_many_arguments)]
pub fn loss_plot(
    ui: &mut egui::Ui,
    group: &str,
    runs: &[Curves],
    steps: Option<(f64, f64)>,
    smoothing: f64,
    log: bool,
    height: f32,
) {
    let Some(range) = steps else {
        placeholder(ui, height, "loss: no data yet");
        return;
    };
    let formatter = move |v: f64| {
        if log {
            format!("{:.3}", 10f64.powf(v))
        } else {
            format!("{v:.3}")
        }
    };
    let plot = Plot::new(format!("{group}-loss"))
        .height(height)
        .legend(Legend::default().position(Corner::RightTop))
        .x_axis_label("step")
        .y_axis_label(if log { "loss (log scale)" } else { "loss" })
        .y_axis_formatter(move |mark, _| formatter(mark.value))
        .label_formatter(move |pos: &HoverPosition<'_>| {
            let (name, p) = match pos {
                HoverPosition::NearDataPoint {
                    plot_name,
                    position,
                    ..
                } => (plot_name.to_string(), *position),
                HoverPosition::Elsewhere { position } => (String::new(), *position),
            };
            let y = if log { 10f64.powf(p.y) } else { p.y };
            Some(format!("{name}\nstep {:.0}\nloss {y:.4}", p.x))
        });
    step_axis(plot, group, range).show(ui, |plot| {
        for r in runs {
            let c = r.color();
            let train = log_points(ema(&r.train_loss, smoothing), log);
            if !train.is_empty() {
                plot.line(
                    Line::new(format!("{} (train)", r.name), PlotPoints::from(train))
                        .color(c)
                        .width(1.5),
                );
            }
            if !r.eval_loss.is_empty() {
                let eval = log_points(r.eval_loss.clone(), log);
                plot.line(
                    Line::new(format!("{} (eval)", r.name), PlotPoints::from(eval))
                        .color(c)
                        .style(egui_plot::LineStyle::dashed_loose())
                        .width(1.5),
                );
            }
        }
    });
}

/// The eval-accuracy plot, on the step range `steps` (shared with the loss chart).
pub fn accuracy_plot(
    ui: &mut egui::Ui,
    group: &str,
    runs: &[Curves],
    steps: Option<(f64, f64)>,
    height: f32,
) {
    let Some(range) = steps else {
        placeholder(ui, height, "eval accuracy: no data yet");
        return;
    };
    let plot = Plot::new(format!("{group}-accuracy"))
        .height(height)
        .legend(Legend::default().position(Corner::RightBottom))
        .x_axis_label("step")
        .y_axis_label("eval accuracy")
        .include_y(0.0)
        .include_y(1.0)
        .y_axis_formatter(|mark, _| format!("{:.0}%", 100.0 * mark.value))
        .label_formatter(|pos: &HoverPosition<'_>| {
            let (name, p) = match pos {
                HoverPosition::NearDataPoint {
                    plot_name,
                    position,
                    ..
                } => (plot_name.to_string(), *position),
                HoverPosition::Elsewhere { position } => (String::new(), *position),
            };
            Some(format!(
                "{name}\nstep {:.0}\naccuracy {:.2}%",
                p.x,
                100.0 * p.y
            ))
        });
    step_axis(plot, group, range).show(ui, |plot| {
        for r in runs {
            if r.eval_accuracy.is_empty() {
                continue;
            }
            plot.line(
                Line::new(r.name.clone(), PlotPoints::from(r.eval_accuracy.clone()))
                    .color(r.color())
                    .width(1.5),
            );
            plot.points(
                Points::new(r.name.clone(), PlotPoints::from(r.eval_accuracy.clone()))
                    .color(r.color())
                    .radius(2.5),
            );
        }
    });
}

/// One point of the scatter.
pub struct ScatterPoint {
    /// Run id (its colour).
    pub id: String,
    /// Its label.
    pub name: String,
    /// Method column.
    pub method: String,
    /// Trainable values.
    pub trainable: usize,
    /// Best eval accuracy.
    pub accuracy: f64,
}

/// The marker of each method, and its name in the key.
pub const METHOD_MARKERS: [(&str, MarkerShape, &str); 5] = [
    ("lora", MarkerShape::Circle, "circle LoRA"),
    ("svfit", MarkerShape::Diamond, "diamond SVFit"),
    ("loldu", MarkerShape::Up, "triangle LoLDU"),
    ("full", MarkerShape::Square, "square full"),
    ("head", MarkerShape::Cross, "cross head"),
];

fn marker(method: &str) -> MarkerShape {
    METHOD_MARKERS
        .iter()
        .find(|(m, _, _)| *m == method)
        .map_or(MarkerShape::Asterisk, |(_, s, _)| *s)
}

/// Grid marks at 1, 2 and 5 × 10^k on a log10 axis (decades drawn strongest).
fn log10_marks(input: GridInput) -> Vec<GridMark> {
    let (lo, hi) = input.bounds;
    let mut marks = Vec::new();
    if !(lo.is_finite() && hi.is_finite()) || hi <= lo {
        return marks;
    }
    let few = hi - lo > 3.0;
    for k in (lo.floor() as i32 - 1)..=(hi.ceil() as i32) {
        for (m, step) in [(1.0f64, 1.0), (2.0, 0.3), (5.0, 0.3)] {
            if few && m != 1.0 {
                continue;
            }
            let v = f64::from(k) + m.log10();
            if v >= lo && v <= hi {
                marks.push(GridMark {
                    value: v,
                    step_size: step,
                });
            }
        }
    }
    marks
}

/// Trainable parameters (log axis) against best accuracy: one colour per run (as in the
/// table and the curves), one marker per method, each point labelled; bounds padded so no
/// point sits on an edge and labels have room on the right.
pub fn scatter(ui: &mut egui::Ui, points: &[ScatterPoint], height: f32) {
    let shown: Vec<&ScatterPoint> = points.iter().filter(|p| p.trainable > 0).collect();
    if shown.is_empty() {
        placeholder(ui, height, "no evaluated runs yet");
        return;
    }
    let xs = shown.iter().map(|p| (p.trainable as f64).log10());
    let (x_lo, x_hi) = xs.fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(x), hi.max(x)));
    let ys = shown.iter().map(|p| p.accuracy);
    let (y_lo, y_hi) = ys.fold((f64::MAX, f64::MIN), |(lo, hi), y| (lo.min(y), hi.max(y)));
    let x_span = (x_hi - x_lo).max(1.0);
    let y_pad = ((y_hi - y_lo) * 0.15).max(0.03);
    Plot::new("scatter")
        .height(height)
        .x_axis_label("trainable parameters (log scale)")
        .y_axis_label("best eval accuracy")
        .include_x(x_lo - 0.15 * x_span)
        // Room for the labels, which sit right of their points.
        .include_x(x_hi + 0.45 * x_span)
        .include_y((y_lo - y_pad).max(0.0))
        .include_y((y_hi + y_pad).min(1.0))
        .x_grid_spacer(log10_marks)
        .x_axis_formatter(|mark, _| {
            crate::inspect::thousands(10f64.powf(mark.value).round() as usize)
        })
        .y_axis_formatter(|mark, _| format!("{:.0}%", 100.0 * mark.value))
        .label_formatter(|pos: &HoverPosition<'_>| match pos {
            HoverPosition::NearDataPoint {
                plot_name,
                position,
                ..
            } => Some(format!(
                "{plot_name}\n{} trainable\naccuracy {:.2}%",
                crate::inspect::thousands(10f64.powf(position.x).round() as usize),
                100.0 * position.y
            )),
            HoverPosition::Elsewhere { .. } => None,
        })
        .show(ui, |plot| {
            for p in &shown {
                let at = [(p.trainable as f64).log10(), p.accuracy];
                plot.points(
                    Points::new(p.name.clone(), PlotPoints::from(vec![at]))
                        .color(run_color(&p.id))
                        .shape(marker(&p.method))
                        .filled(true)
                        .radius(5.0),
                );
                // No name: labels stay out of the legend.
                plot.text(
                    egui_plot::Text::new(
                        "",
                        egui_plot::PlotPoint::new(at[0], at[1]),
                        egui::RichText::new(format!("  {}", p.name)).small(),
                    )
                    .anchor(egui::Align2::LEFT_CENTER),
                );
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colours_follow_the_id_not_the_order() {
        assert_eq!(
            run_color("20261129-010000-lora-r8"),
            run_color("20261129-010000-lora-r8")
        );
        assert_ne!(
            run_color("20261129-010000-lora-r8"),
            run_color("20261129-010001-lora-r8")
        );
        assert_eq!(run_color(""), Color32::from_gray(150));
    }

    #[test]
    fn two_runs_with_one_name_get_two_labels() {
        let runs = [
            ("20261129-101500-lora-r8", "lora r8", ""),
            ("20261129-101512-lora-r8", "lora r8", ""),
            ("20261129-101512-lora-r8-2", "lora r8", ""),
            ("20261129-113000-svfit", "svfit", ""),
            ("fake", "head", "2026-11-29T01:06:00+00:00"),
        ];
        let labels = unique_labels(&runs);
        assert_eq!(labels[3], "svfit · 11:30");
        assert_eq!(labels[4], "head · 01:06");
        assert_eq!(labels[0], "lora r8 · 10:15:00");
        let distinct: std::collections::HashSet<&String> = labels.iter().collect();
        assert_eq!(distinct.len(), labels.len(), "{labels:?}");
    }

    #[test]
    fn the_shared_step_range_spans_every_curve() {
        let c = Curves {
            train_loss: vec![[1.0, 2.0], [105.0, 1.0]],
            eval_accuracy: vec![[100.0, 0.5], [108.0, 0.6]],
            ..Default::default()
        };
        assert_eq!(step_range(&[c]), Some((1.0, 108.0)));
        assert_eq!(step_range(&[Curves::default()]), None);
    }

    #[test]
    fn log_marks_fall_on_round_numbers() {
        let marks = log10_marks(GridInput {
            bounds: (2.5, 5.3),
            base_step_size: 0.01,
        });
        let values: Vec<i64> = marks
            .iter()
            .map(|m| 10f64.powf(m.value).round() as i64)
            .collect();
        assert!(
            values.contains(&1000) && values.contains(&100_000),
            "{values:?}"
        );
        assert!(
            values.contains(&500) && values.contains(&2000),
            "{values:?}"
        );
    }
}

//! Curves (egui_plot): training and eval loss with EMA smoothing and a log scale, eval
//! accuracy, earlier runs overlaid in their own colours (the legend toggles each), and the
//! trainable-parameters-against-accuracy scatter.

use egui::Color32;
use egui_plot::{Corner, HoverPosition, Legend, Line, Plot, PlotPoints, Points};

/// One run's curves.
#[derive(Debug, Clone, Default)]
pub struct Curves {
    /// Legend name.
    pub name: String,
    /// (step, training loss).
    pub train_loss: Vec<[f64; 2]>,
    /// (step, eval loss).
    pub eval_loss: Vec<[f64; 2]>,
    /// (step, eval accuracy).
    pub eval_accuracy: Vec<[f64; 2]>,
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

/// A colour per index, stable across frames.
pub fn color(i: usize) -> Color32 {
    const C: [Color32; 8] = [
        Color32::from_rgb(31, 119, 180),
        Color32::from_rgb(255, 127, 14),
        Color32::from_rgb(44, 160, 44),
        Color32::from_rgb(214, 39, 40),
        Color32::from_rgb(148, 103, 189),
        Color32::from_rgb(140, 86, 75),
        Color32::from_rgb(227, 119, 194),
        Color32::from_rgb(188, 189, 34),
    ];
    C[i % C.len()]
}

/// The loss plot: each run's smoothed training loss (solid) and eval loss (dashed points).
pub fn loss_plot(
    ui: &mut egui::Ui,
    id: &str,
    runs: &[Curves],
    smoothing: f64,
    log: bool,
    height: f32,
) {
    let formatter = move |v: f64| {
        if log {
            format!("{:.3}", 10f64.powf(v))
        } else {
            format!("{v:.3}")
        }
    };
    Plot::new(id)
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
        })
        .show(ui, |plot| {
            for (i, r) in runs.iter().enumerate() {
                let c = color(i);
                let train = log_points(ema(&r.train_loss, smoothing), log);
                plot.line(
                    Line::new(format!("{} (train)", r.name), PlotPoints::from(train))
                        .color(c)
                        .width(1.5),
                );
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

/// The eval-accuracy plot.
pub fn accuracy_plot(ui: &mut egui::Ui, id: &str, runs: &[Curves], height: f32) {
    Plot::new(id)
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
        })
        .show(ui, |plot| {
            for (i, r) in runs.iter().enumerate() {
                if r.eval_accuracy.is_empty() {
                    continue;
                }
                plot.line(
                    Line::new(r.name.clone(), PlotPoints::from(r.eval_accuracy.clone()))
                        .color(color(i))
                        .width(1.5),
                );
                plot.points(
                    Points::new(r.name.clone(), PlotPoints::from(r.eval_accuracy.clone()))
                        .color(color(i))
                        .radius(2.5),
                );
            }
        });
}

/// One point of the scatter: (label, method, trainable, accuracy).
pub struct ScatterPoint {
    /// Run name.
    pub name: String,
    /// Method column.
    pub method: String,
    /// Trainable values.
    pub trainable: usize,
    /// Best eval accuracy.
    pub accuracy: f64,
}

/// Trainable parameters (log axis) against accuracy, one colour per method.
pub fn scatter(ui: &mut egui::Ui, points: &[ScatterPoint], height: f32) {
    let methods = ["lora", "svfit", "loldu", "full", "head"];
    Plot::new("scatter")
        .height(height)
        .legend(Legend::default().position(Corner::RightBottom))
        .x_axis_label("trainable parameters (log scale)")
        .y_axis_label("best eval accuracy")
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
            for (mi, m) in methods.iter().enumerate() {
                let pts: Vec<[f64; 2]> = points
                    .iter()
                    .filter(|p| p.method == *m && p.trainable > 0)
                    .map(|p| [(p.trainable as f64).log10(), p.accuracy])
                    .collect();
                if !pts.is_empty() {
                    plot.points(
                        Points::new(m.to_string(), PlotPoints::from(pts))
                            .color(color(mi))
                            .radius(5.0),
                    );
                }
            }
            for p in points.iter().filter(|p| p.trainable > 0) {
                // No name: labels stay out of the legend.
                plot.text(
                    egui_plot::Text::new(
                        "",
                        egui_plot::PlotPoint::new((p.trainable as f64).log10(), p.accuracy),
                        egui::RichText::new(format!("  {}", p.name)).small(),
                    )
                    .anchor(egui::Align2::LEFT_CENTER),
                );
            }
        });
}

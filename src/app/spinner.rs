//! A loading spinner that does not keep the window busy: egui's own spinner asks for a repaint
//! every frame (60 a second, a core of software rendering); this one asks for the next frame
//! a few times a second, and the window sleeps in between.

use std::time::Duration;

/// How often an animation redraws.
pub const ANIMATION_PERIOD: Duration = Duration::from_millis(150);

/// Draws a spinner and schedules the next frame after [`ANIMATION_PERIOD`].
pub fn spinner(ui: &mut egui::Ui) -> egui::Response {
    let size = ui.style().spacing.interact_size.y;
    let (rect, response) = ui.allocate_exact_size(egui::vec2(size, size), egui::Sense::hover());
    if ui.is_rect_visible(rect) {
        ui.ctx().request_repaint_after(ANIMATION_PERIOD);
        let color = ui.visuals().strong_text_color();
        let radius = rect.height().min(rect.width()) * 0.5 - 2.0;
        let time = ui.input(|i| i.time);
        let start = time * std::f64::consts::TAU;
        let end = start + 240f64.to_radians() * time.sin();
        // The same shape as egui's spinner.
        let n = (radius.round() as u32).clamp(8, 128);
        let points: Vec<egui::Pos2> = (0..n)
            .map(|i| {
                let a = start + (end - start) * f64::from(i) / f64::from(n);
                let (sin, cos) = a.sin_cos();
                rect.center() + radius * egui::vec2(cos as f32, sin as f32)
            })
            .collect();
        ui.painter()
            .add(egui::Shape::line(points, egui::Stroke::new(3.0, color)));
    }
    response
}

//! What the window tests share: stepping a kittest harness until the app reaches a state.

use std::time::{Duration, Instant};

use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use peft_studio::app::StudioApp;

/// Steps `h` until `cond` holds (then one frame more), failing after `secs` seconds with
/// `what`, the run's state and step, the window's errors and the run's log.
pub fn run_until(
    h: &mut Harness<'static, StudioApp>,
    secs: u64,
    what: &str,
    cond: impl Fn(&StudioApp) -> bool,
) {
    let start = Instant::now();
    while !cond(h.state()) {
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "timed out waiting for {what}; state {:?} at step {}; errors: {:?}; log: {:?}",
            h.state().run.state,
            h.state().run.step,
            h.state().errors,
            h.state().run.log
        );
        h.step();
        std::thread::sleep(Duration::from_millis(5));
    }
    h.step();
}

/// Masks the "runs are saved in …" line of the form for a snapshot: its path depends on the
/// machine's temporary folder and the test's process id. The mask runs from the line's start to
/// the edge of the form panel (just left of the "Hide form" button), so it has the same size
/// whatever the path's length or where the window cuts it off.
#[allow(dead_code)]
pub fn mask_runs_folder(h: &mut Harness<'static, StudioApp>) {
    let line = h.get_by_label_contains("runs are saved in").rect();
    let panel_edge = h.get_by_label("Hide form").rect().left() - 2.0;
    h.mask(egui::Rect::from_min_max(
        line.min,
        egui::pos2(panel_edge.max(line.max.x), line.max.y),
    ));
}

//! What the window tests share: stepping a kittest harness until the app reaches a state.

use std::time::{Duration, Instant};

use egui_kittest::Harness;
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

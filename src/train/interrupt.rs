//! Stopping a command-line run from outside: SIGINT (Ctrl-C) and SIGTERM set a flag that
//! [`SignalStop`], a [`Controller`], reads between steps, so the run stops cleanly (summary
//! `stopped`, checkpoint written, resumable). A second signal ends the process at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use signal_hook::consts::{SIGINT, SIGTERM};

use super::events::{Control, Controller};

/// A controller that says stop once SIGINT or SIGTERM has arrived.
#[derive(Debug, Clone)]
pub struct SignalStop {
    signal: Arc<AtomicUsize>,
}

impl SignalStop {
    /// Installs the handlers for SIGINT and SIGTERM (for the rest of the process).
    pub fn install() -> std::io::Result<Self> {
        let signal = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(AtomicBool::new(false));
        for sig in [SIGINT, SIGTERM] {
            // Registered first, so it sees the flag as the previous signal left it: the
            // second signal exits at once, with the shell's code for it.
            signal_hook::flag::register_conditional_shutdown(sig, 128 + sig, Arc::clone(&seen))?;
            signal_hook::flag::register(sig, Arc::clone(&seen))?;
            signal_hook::flag::register_usize(sig, Arc::clone(&signal), sig as usize)?;
        }
        Ok(Self { signal })
    }

    /// The signal that arrived (2 SIGINT, 15 SIGTERM), if any.
    pub fn received(&self) -> Option<i32> {
        match self.signal.load(Ordering::SeqCst) {
            0 => None,
            s => Some(s as i32),
        }
    }

    /// The signal's name, for messages.
    pub fn name(signal: i32) -> &'static str {
        match signal {
            SIGINT => "SIGINT",
            SIGTERM => "SIGTERM",
            _ => "a signal",
        }
    }
}

impl Controller for SignalStop {
    fn check(&mut self) -> Control {
        if self.received().is_some() {
            Control::Stop
        } else {
            Control::Continue
        }
    }
}

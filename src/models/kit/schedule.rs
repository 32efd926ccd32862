//! The learning-rate schedule of every DiffLoRA training loop: linear warm-up to a peak, then
//! cosine decay to a floor.

/// Linear warm-up over `warmup` steps to `peak`, then cosine decay to `floor · peak` at
/// `steps` (and after).
///
/// The hypernetwork uses no warm-up and a floor of 0.1; the identity encoders a warm-up of a
/// tenth of the steps (at most 50) and a floor of 0.05; the attribute reader the same with at
/// most 100 warm-up steps; the generator's `GeneratorTraining::lr_at` is this schedule with
/// its own warm-up and a floor of 0.1.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WarmupCosine {
    /// The learning rate at the end of the warm-up.
    pub peak: f64,
    /// Warm-up steps: step `s < warmup` has `peak · (s + 1) / warmup`.
    pub warmup: usize,
    /// Total steps; the decay reaches the floor here.
    pub steps: usize,
    /// The final learning rate as a fraction of the peak.
    pub floor: f64,
}

impl WarmupCosine {
    /// The learning rate at `step` (0-based).
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.peak * (step + 1) as f64 / self.warmup as f64;
        }
        let span = self.steps.saturating_sub(self.warmup).max(1) as f64;
        let t = ((step - self.warmup) as f64 / span).min(1.0);
        let cos = 0.5 * (1.0 + (std::f64::consts::PI * t).cos());
        self.peak * (self.floor + (1.0 - self.floor) * cos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warm_up_then_cosine_to_the_floor() {
        let s = WarmupCosine {
            peak: 2e-3,
            warmup: 10,
            steps: 110,
            floor: 0.05,
        };
        assert_eq!(s.lr_at(0), 2e-3 / 10.0);
        assert_eq!(s.lr_at(4), 2e-3 * 5.0 / 10.0);
        assert_eq!(s.lr_at(9), 2e-3);
        assert_eq!(s.lr_at(10), 2e-3, "the peak at the end of the warm-up");
        let mid = s.lr_at(60);
        assert!((mid - 2e-3 * 0.525).abs() < 1e-15, "{mid}");
        assert!((s.lr_at(110) - 1e-4).abs() < 1e-15);
        assert_eq!(s.lr_at(110), s.lr_at(500), "the floor after the end");
        let mut last = f64::INFINITY;
        for step in 10..=110 {
            let lr = s.lr_at(step);
            assert!(lr <= last && lr >= 1e-4 - 1e-15, "step {step}: {lr}");
            last = lr;
        }

        // The formulas the training loops used before the kit, value for value.
        let encoder = |lr: f64, steps: usize, step: usize| {
            let warm = (steps / 10).clamp(1, 50);
            if step < warm {
                return lr * (step + 1) as f64 / warm as f64;
            }
            let t = (step - warm) as f64 / (steps.saturating_sub(warm)).max(1) as f64;
            lr * (0.05 + 0.95 * 0.5 * (1.0 + (std::f64::consts::PI * t).cos()))
        };
        let hyper = |lr: f64, step: usize, steps: usize| {
            let frac = step as f64 / steps.max(1) as f64;
            let cos = 0.5 * (1.0 + (std::f64::consts::PI * frac).cos());
            lr * (0.1 + (1.0 - 0.1) * cos)
        };
        for steps in [1, 7, 600, 1000] {
            let e = WarmupCosine {
                peak: 2e-3,
                warmup: (steps / 10).clamp(1, 50),
                steps,
                floor: 0.05,
            };
            let h = WarmupCosine {
                peak: 1e-3,
                warmup: 0,
                steps,
                floor: 0.1,
            };
            for step in 0..steps {
                assert_eq!(e.lr_at(step), encoder(2e-3, steps, step));
                assert_eq!(h.lr_at(step), hyper(1e-3, step, steps));
            }
        }
    }
}

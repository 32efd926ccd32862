//! The renderer's own random numbers: SplitMix64, whose stream is fixed forever, so a seed
//! gives the same portrait on every platform and with every version of the `rand` crate.

/// SplitMix64: tiny, fast, and its stream is fixed forever (deterministic renders).
#[derive(Debug, Clone)]
pub(super) struct SplitMix64(u64);

impl SplitMix64 {
    pub(super) fn new(seed: u64, stream: u64) -> Self {
        let mut s = SplitMix64(seed ^ stream.wrapping_mul(0xA076_1D64_78BD_642F));
        // Discard one output so that nearby seeds decorrelate immediately.
        s.next_u64();
        s
    }

    pub(super) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub(super) fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform in `[lo, hi)`.
    pub(super) fn range(&mut self, (lo, hi): (f32, f32)) -> f32 {
        lo + (hi - lo) * self.unit()
    }

    /// Uniform index in `0..n` (`n > 0`).
    pub(super) fn index(&mut self, n: usize) -> usize {
        ((self.next_u64() >> 33) % n.max(1) as u64) as usize
    }

    /// An index drawn with the given relative weights.
    pub(super) fn weighted(&mut self, weights: &[f32]) -> usize {
        let total: f32 = weights.iter().sum();
        let mut x = self.unit() * total;
        for (i, w) in weights.iter().enumerate() {
            if x < *w {
                return i;
            }
            x -= w;
        }
        weights.len().saturating_sub(1)
    }
}

/// Mixes two words into one seed (for per-item seeds derived from a base seed).
pub(super) fn mix_seed(a: u64, b: u64) -> u64 {
    let mut s = SplitMix64::new(a, b.wrapping_add(0x5851_F42D_4C95_7F2D));
    s.next_u64()
}

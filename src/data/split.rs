//! Seeded, portable splitting and capping.
//!
//! The generator is SplitMix64 with an unbiased bounded draw and a Fisher–Yates shuffle, written
//! here rather than borrowed from `rand` so that a given seed yields the same split on every
//! platform and with every future version of the dependencies.

use super::DataError;

/// SplitMix64: tiny, fast, and fully specified.
#[derive(Debug, Clone)]
pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator from a seed and a stream tag (distinct tags give unrelated sequences).
    pub(crate) fn new(seed: u64, stream: u64) -> Self {
        let mut g = SplitMix64(seed ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03));
        // Warm up so that nearby seeds diverge immediately.
        g.next_u64();
        g
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`), without modulo bias.
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0);
        // Reject the top partial bucket.
        let limit = u64::MAX - (u64::MAX - n + 1) % n;
        loop {
            let x = self.next_u64();
            if x <= limit {
                return x % n;
            }
        }
    }

    /// Fisher–Yates shuffle.
    pub(crate) fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
}

/// Stream tags, one per use of the seed.
pub(crate) const STREAM_SPLIT: u64 = 1;
pub(crate) const STREAM_CAP_TRAIN: u64 = 2;
pub(crate) const STREAM_CAP_EVAL: u64 = 3;

/// Checks `eval_fraction` and the caps of a config before any file is read.
pub(crate) fn check_settings(
    eval_fraction: f64,
    max_train: Option<usize>,
    max_eval: Option<usize>,
) -> Result<(), DataError> {
    if !(eval_fraction.is_finite() && eval_fraction > 0.0 && eval_fraction < 1.0) {
        return Err(DataError::InvalidConfig {
            field: "eval_fraction".into(),
            message: format!("must be between 0 and 1 (exclusive), got {eval_fraction}"),
        });
    }
    for (field, cap) in [("max_train", max_train), ("max_eval", max_eval)] {
        if cap == Some(0) {
            return Err(DataError::InvalidConfig {
                field: field.into(),
                message: "must be at least 1 (leave it out for no cap)".into(),
            });
        }
    }
    Ok(())
}

/// Splits `0..n` into (train, eval) index lists by a seeded shuffle; both lists come back in
/// ascending order. The eval share is `round(n · eval_fraction)`, clamped so that each side
/// holds at least one sample.
pub(crate) fn random_split(
    n: usize,
    eval_fraction: f64,
    seed: u64,
    what: &str,
) -> Result<(Vec<usize>, Vec<usize>), DataError> {
    if n < 2 {
        return Err(DataError::Split {
            what: what.into(),
            message: format!(
                "{n} sample(s) cannot be split into train and eval: at least 2 are needed"
            ),
        });
    }
    let n_eval = ((n as f64 * eval_fraction).round() as usize).clamp(1, n - 1);
    let mut perm: Vec<usize> = (0..n).collect();
    SplitMix64::new(seed, STREAM_SPLIT).shuffle(&mut perm);
    let mut eval = perm[..n_eval].to_vec();
    let mut train = perm[n_eval..].to_vec();
    eval.sort_unstable();
    train.sort_unstable();
    Ok((train, eval))
}

/// At most `max` of `0..n`, chosen by a seeded shuffle (so a cap keeps the class mix), in
/// ascending order; all of them when `max` is `None` or not below `n`.
pub(crate) fn cap(n: usize, max: Option<usize>, seed: u64, stream: u64) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    match max {
        Some(m) if m < n => {
            SplitMix64::new(seed, stream).shuffle(&mut idx);
            idx.truncate(m);
            idx.sort_unstable();
            idx
        }
        _ => idx,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shuffle_is_a_permutation_and_seeded() {
        let mut a: Vec<usize> = (0..100).collect();
        let mut b = a.clone();
        SplitMix64::new(7, 1).shuffle(&mut a);
        SplitMix64::new(7, 1).shuffle(&mut b);
        assert_eq!(a, b);
        let mut c = a.clone();
        c.sort_unstable();
        assert_eq!(c, (0..100).collect::<Vec<_>>());
        let mut d: Vec<usize> = (0..100).collect();
        SplitMix64::new(8, 1).shuffle(&mut d);
        assert_ne!(a, d);
    }

    #[test]
    fn split_sizes() {
        let (t, e) = random_split(10, 0.2, 0, "x").unwrap();
        assert_eq!((t.len(), e.len()), (8, 2));
        let (t, e) = random_split(2, 0.01, 0, "x").unwrap();
        assert_eq!((t.len(), e.len()), (1, 1));
        let (t, e) = random_split(3, 0.99, 0, "x").unwrap();
        assert_eq!((t.len(), e.len()), (1, 2));
        assert!(random_split(1, 0.5, 0, "x").is_err());
    }
}

//! Seeded batch order: epoch by epoch through shuffled permutations ([`Epochs`]), or keyed by
//! the step alone ([`step_rng`], [`draw_indices`]) for runs that resume from a checkpoint.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::{KitError, Result};

/// How an epoch's permutation is drawn. Both are fixed algorithms; they differ in the stream
/// of draws, and each model keeps the one it was trained with so that its training stays
/// reproducible value for value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shuffle {
    /// Fisher–Yates from the back: for `i` from `n − 1` down to 1, swap `i` with
    /// `rng.random_range(0..=i)` (the identity encoders and the attribute reader).
    FisherYates,
    /// `rand`'s `SliceRandom::shuffle` (the hypernetwork's autoencoder and denoiser).
    Rand,
}

/// Cycles through permutations of `0..n`, a fresh one at the start of every epoch (the first
/// one included), drawn from the caller's generator at that moment: draws made between
/// indices (noise, augmentation) keep their place in the stream, so a run is reproducible per
/// seed.
#[derive(Clone, Debug)]
pub struct Epochs {
    order: Vec<usize>,
    pos: usize,
    shuffle: Shuffle,
}

impl Epochs {
    /// Epochs over `n` ≥ 1 examples.
    pub fn new(n: usize, shuffle: Shuffle) -> Result<Self> {
        if n == 0 {
            return Err(KitError::Input("no examples to draw batches from".into()));
        }
        Ok(Self {
            order: (0..n).collect(),
            pos: n,
            shuffle,
        })
    }

    /// The next example, starting a new epoch first when the current one is used up.
    pub fn next_index<R: Rng + ?Sized>(&mut self, rng: &mut R) -> usize {
        if self.pos >= self.order.len() {
            match self.shuffle {
                Shuffle::FisherYates => {
                    for i in (1..self.order.len()).rev() {
                        let j = rng.random_range(0..=i);
                        self.order.swap(i, j);
                    }
                }
                Shuffle::Rand => self.order.shuffle(rng),
            }
            self.pos = 0;
        }
        let i = self.order[self.pos];
        self.pos += 1;
        i
    }

    /// The next `size` examples (crossing into the next epoch when needed, so `size` may
    /// exceed the number of examples).
    pub fn next_batch<R: Rng + ?Sized>(&mut self, size: usize, rng: &mut R) -> Vec<usize> {
        (0..size).map(|_| self.next_index(rng)).collect()
    }
}

/// The generator of step `step` (0-based) of a run seeded `seed`. A step's batch and noise
/// drawn from it depend only on `(seed, step)`, so a run resumed from a checkpoint draws
/// exactly what an uninterrupted one would (the generator's training).
pub fn step_rng(seed: u64, step: usize) -> StdRng {
    StdRng::seed_from_u64(seed.wrapping_mul(0x9E37_79B9) ^ step as u64)
}

/// `size` indices drawn uniformly from `0..n` (n ≥ 1) with replacement.
pub fn draw_indices<R: Rng + ?Sized>(rng: &mut R, n: usize, size: usize) -> Result<Vec<u32>> {
    if n == 0 {
        return Err(KitError::Input("no examples to draw batches from".into()));
    }
    Ok((0..size).map(|_| rng.random_range(0..n) as u32).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(seed: u64, shuffle: Shuffle, n: usize, batch: usize, steps: usize) -> Vec<Vec<usize>> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut epochs = Epochs::new(n, shuffle).unwrap();
        (0..steps)
            .map(|_| epochs.next_batch(batch, &mut rng))
            .collect()
    }

    #[test]
    fn epochs_are_seeded_permutations() {
        for shuffle in [Shuffle::FisherYates, Shuffle::Rand] {
            let a = run(5, shuffle, 10, 4, 15);
            assert_eq!(
                a,
                run(5, shuffle, 10, 4, 15),
                "{shuffle:?}: same seed, same batches"
            );
            assert_ne!(a, run(6, shuffle, 10, 4, 15), "{shuffle:?}: another seed");
            // Every epoch (10 consecutive indices) is a permutation of 0..10.
            let flat: Vec<usize> = a.concat();
            for epoch in flat.chunks(10) {
                let mut e = epoch.to_vec();
                e.sort_unstable();
                assert_eq!(e, (0..10).collect::<Vec<_>>(), "{shuffle:?}");
            }
            // The batch of step s is the same whether the run stops there or goes on.
            let short = run(5, shuffle, 10, 4, 7);
            assert_eq!(short[..], a[..7]);
            // A batch larger than the data crosses epochs.
            assert_eq!(run(1, shuffle, 3, 7, 1)[0].len(), 7);
        }
        assert_ne!(
            run(5, Shuffle::FisherYates, 10, 4, 3),
            run(5, Shuffle::Rand, 10, 4, 3)
        );
        assert!(Epochs::new(0, Shuffle::Rand).is_err());

        // The identity encoder's loop before the kit, index for index.
        let mut rng = StdRng::seed_from_u64(9);
        let (n, mut order, mut cursor) = (6, (0..6).collect::<Vec<usize>>(), 6);
        let mut old = Vec::new();
        for _ in 0..20 {
            if cursor == n {
                for i in (1..n).rev() {
                    let r = rng.random_range(0..=i);
                    order.swap(i, r);
                }
                cursor = 0;
            }
            old.push(order[cursor]);
            cursor += 1;
        }
        assert_eq!(run(9, Shuffle::FisherYates, 6, 20, 1)[0], old);
    }

    #[test]
    fn step_keyed_batches_depend_only_on_seed_and_step() {
        let at = |seed, step| draw_indices(&mut step_rng(seed, step), 50, 8).unwrap();
        assert_eq!(at(3, 17), at(3, 17));
        assert_ne!(at(3, 17), at(3, 18));
        assert_ne!(at(3, 17), at(4, 17));
        assert!(at(3, 17).iter().all(|&i| i < 50));
        assert!(draw_indices(&mut step_rng(0, 0), 0, 1).is_err());
    }
}

//! Decompositions on the CPU with `faer`, and tensor ⇄ matrix conversion.
//!
//! - [`lu_truncated`]: LU with partial row pivoting that stops after r elimination steps
//!   (O(m·n·r)) and returns LoLDU's factors in original row order.
//! - [`thin_svd`], [`randomized_svd`] and [`top_svd`] (which picks between them).
//!
//! All run in f64; callers convert to the model's dtype afterwards.

use crate::device::HOST;
use candle_core::{DType, Device, Tensor};
use faer::Mat;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

/// A decomposition failure, without the layer name (callers add it).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecomposeError {
    /// A pivot too small to divide by.
    #[error(
        "pivot {step} is {value:.3e}, below the threshold {threshold:.3e}: the weight is singular or nearly so at this rank (lower the rank or the pivot_epsilon)"
    )]
    TinyPivot {
        /// Elimination step (0-based).
        step: usize,
        /// The pivot's value.
        value: f64,
        /// The threshold it fell under.
        threshold: f64,
    },
    /// A forced pivot order that does not fit the matrix.
    #[error("stored pivot order is invalid: {0}")]
    BadPivots(String),
    /// faer's SVD did not converge, or the input holds NaN/inf.
    #[error("SVD failed: {0}")]
    Svd(String),
    /// Rank out of range.
    #[error("rank {rank} is impossible for a {m}×{n} matrix")]
    Rank {
        /// Requested rank.
        rank: usize,
        /// Rows.
        m: usize,
        /// Columns.
        n: usize,
    },
}

/// Converts a 2-D tensor to an f64 `faer` matrix.
pub fn tensor_to_mat(t: &Tensor) -> candle_core::Result<Mat<f64>> {
    let (m, n) = t.dims2()?;
    let data = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    Ok(Mat::from_fn(m, n, |i, j| data[i * n + j]))
}

/// Converts a `faer` matrix to a tensor of `dtype` on `device`.
pub fn mat_to_tensor(
    m: faer::MatRef<'_, f64>,
    dtype: DType,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let (rows, cols) = (m.nrows(), m.ncols());
    let mut data = Vec::with_capacity(rows * cols);
    for i in 0..rows {
        for j in 0..cols {
            data.push(m[(i, j)]);
        }
    }
    Tensor::from_vec(data, (rows, cols), &HOST)?
        .to_dtype(dtype)?
        .to_device(device)
}

/// Converts a slice to a 1-D tensor of `dtype` on `device`.
pub fn vec_to_tensor(v: &[f64], dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
    Tensor::from_slice(v, v.len(), &HOST)?
        .to_dtype(dtype)?
        .to_device(device)
}

/// LoLDU's factors of `W = P·L·U`, truncated to the first r pivots.
#[derive(Debug, Clone)]
pub struct TruncatedLu {
    /// `P·L_r` (m×r): L's first r columns in the original row order.
    pub left: Mat<f64>,
    /// `D_r`: the first r pivots.
    pub diag: Vec<f64>,
    /// `U₁[:r, :]` (r×n): U's first r rows divided row-wise by D (unit upper-trapezoidal).
    pub right: Mat<f64>,
    /// Row order after r steps: position i of the eliminated matrix holds original row
    /// `perm[i]`. Its first r entries are the pivot rows, in order.
    pub perm: Vec<usize>,
}

/// LU with partial row pivoting of `w` (m×n), stopped after `rank` elimination steps.
///
/// A pivot with `|D| < pivot_epsilon · max|W|` is refused, never divided through. With
/// `forced_pivots` (original row indices, one per step, e.g. [`TruncatedLu::perm`]'s first r
/// entries) the pivot order is replayed instead of searched, which rebuilds saved factors
/// exactly.
///
/// ```
/// use faer::Mat;
/// use peft_studio::peft::decompose::lu_truncated;
/// let w = Mat::from_fn(3, 2, |i, j| [[1.0, 2.0], [4.0, 3.0], [2.0, 1.0]][i][j]);
/// let lu = lu_truncated(&w, 2, 1e-12, None).unwrap();
/// assert_eq!(lu.perm[0], 1); // the largest entry of column 0 is on row 1
/// assert_eq!(lu.diag[0], 4.0);
/// ```
pub fn lu_truncated(
    w: &Mat<f64>,
    rank: usize,
    pivot_epsilon: f64,
    forced_pivots: Option<&[usize]>,
) -> Result<TruncatedLu, DecomposeError> {
    let (m, n) = (w.nrows(), w.ncols());
    if rank == 0 || rank > m.min(n) {
        return Err(DecomposeError::Rank { rank, m, n });
    }
    if let Some(p) = forced_pivots {
        if p.len() < rank {
            return Err(DecomposeError::BadPivots(format!(
                "{} pivots stored, {rank} needed",
                p.len()
            )));
        }
        if let Some(bad) = p.iter().find(|&&i| i >= m) {
            return Err(DecomposeError::BadPivots(format!(
                "row {bad} is outside 0..{m}"
            )));
        }
    }
    // Row-major working copy: the eliminated matrix, rows in `perm` order.
    let mut a: Vec<f64> = Vec::with_capacity(m * n);
    let mut max_abs = 0.0f64;
    for i in 0..m {
        for j in 0..n {
            let v = w[(i, j)];
            max_abs = max_abs.max(v.abs());
            a.push(v);
        }
    }
    let threshold = pivot_epsilon * max_abs;
    let mut perm: Vec<usize> = (0..m).collect();
    for j in 0..rank {
        let p = match forced_pivots {
            Some(forced) => perm[j..]
                .iter()
                .position(|&row| row == forced[j])
                .map(|pos| pos + j)
                .ok_or_else(|| {
                    DecomposeError::BadPivots(format!("row {} is used twice", forced[j]))
                })?,
            None => {
                let mut best = j;
                for i in j + 1..m {
                    if a[i * n + j].abs() > a[best * n + j].abs() {
                        best = i;
                    }
                }
                best
            }
        };
        if p != j {
            for c in 0..n {
                a.swap(j * n + c, p * n + c);
            }
            perm.swap(j, p);
        }
        let pivot = a[j * n + j];
        if !(pivot.abs() >= threshold && pivot != 0.0 && pivot.is_finite()) {
            return Err(DecomposeError::TinyPivot {
                step: j,
                value: pivot,
                threshold,
            });
        }
        let (top, bottom) = a.split_at_mut((j + 1) * n);
        let pivot_row = &top[j * n..(j + 1) * n];
        for row in bottom.chunks_exact_mut(n) {
            let l = row[j] / pivot;
            row[j] = l;
            if l != 0.0 {
                for (x, &u) in row[j + 1..].iter_mut().zip(&pivot_row[j + 1..]) {
                    *x -= l * u;
                }
            }
        }
    }
    let mut left = Mat::<f64>::zeros(m, rank);
    for (pos, &orig) in perm.iter().enumerate() {
        for c in 0..rank.min(pos + 1) {
            left[(orig, c)] = if c == pos { 1.0 } else { a[pos * n + c] };
        }
    }
    let diag: Vec<f64> = (0..rank).map(|j| a[j * n + j]).collect();
    let right = Mat::from_fn(rank, n, |i, j| match j.cmp(&i) {
        std::cmp::Ordering::Less => 0.0,
        std::cmp::Ordering::Equal => 1.0,
        std::cmp::Ordering::Greater => a[i * n + j] / diag[i],
    });
    Ok(TruncatedLu {
        left,
        diag,
        right,
        perm,
    })
}

/// The leading r singular triplets `W ≈ U·diag(S)·Vᵀ`, in descending order of S.
#[derive(Debug, Clone)]
pub struct TopSvd {
    /// m×r left singular vectors.
    pub u: Mat<f64>,
    /// r singular values, descending.
    pub s: Vec<f64>,
    /// n×r right singular vectors (so `V_rᵀ` is its transpose).
    pub v: Mat<f64>,
}

impl TopSvd {
    /// Flips each (uᵢ, vᵢ) pair so that uᵢ's largest-magnitude entry is positive: a canonical
    /// sign, so runs and implementations can be compared.
    pub fn canonicalize_signs(&mut self) {
        for c in 0..self.s.len() {
            let mut best = 0;
            for i in 0..self.u.nrows() {
                if self.u[(i, c)].abs() > self.u[(best, c)].abs() {
                    best = i;
                }
            }
            if self.u[(best, c)] < 0.0 {
                for i in 0..self.u.nrows() {
                    self.u[(i, c)] = -self.u[(i, c)];
                }
                for i in 0..self.v.nrows() {
                    self.v[(i, c)] = -self.v[(i, c)];
                }
            }
        }
    }
}

/// Exact thin SVD truncated to `rank` (`rank = min(m, n)` keeps everything).
pub fn thin_svd(w: &Mat<f64>, rank: usize) -> Result<TopSvd, DecomposeError> {
    let (m, n) = (w.nrows(), w.ncols());
    if rank == 0 || rank > m.min(n) {
        return Err(DecomposeError::Rank { rank, m, n });
    }
    let svd = w
        .thin_svd()
        .map_err(|e| DecomposeError::Svd(format!("{e:?}")))?;
    let s_all = svd.S().column_vector();
    let mut s: Vec<f64> = (0..rank).map(|i| s_all[i]).collect();
    let u = svd.U().subcols(0, rank).to_owned();
    let v = svd.V().subcols(0, rank).to_owned();
    // faer returns non-increasing values; keep the contract explicit.
    debug_assert!(s.windows(2).all(|p| p[0] >= p[1]));
    s.iter_mut().for_each(|x| *x = x.max(0.0));
    let mut out = TopSvd { u, s, v };
    out.canonicalize_signs();
    Ok(out)
}

/// All singular values of `w`, descending.
pub fn singular_values(w: &Mat<f64>) -> Result<Vec<f64>, DecomposeError> {
    w.singular_values()
        .map_err(|e| DecomposeError::Svd(format!("{e:?}")))
}

/// The smallest r with `Σ_{i≤r} σᵢ² ≥ τ · Σ σᵢ²` (SVFit's energy rule).
pub fn rank_for_energy(singular_values: &[f64], threshold: f64) -> usize {
    let total: f64 = singular_values.iter().map(|s| s * s).sum();
    let mut acc = 0.0;
    for (i, s) in singular_values.iter().enumerate() {
        acc += s * s;
        if acc >= threshold * total * (1.0 - 1e-12) {
            return i + 1;
        }
    }
    singular_values.len().max(1)
}

/// Randomised SVD (Halko, Martinsson & Tropp 2011): a Gaussian sketch with `oversample`
/// extra columns and `power_iters` re-orthonormalised power iterations, then an exact SVD of
/// the small projected matrix. Seeded, so the result is reproducible.
pub fn randomized_svd(
    w: &Mat<f64>,
    rank: usize,
    oversample: usize,
    power_iters: usize,
    seed: u64,
) -> Result<TopSvd, DecomposeError> {
    let (m, n) = (w.nrows(), w.ncols());
    if rank == 0 || rank > m.min(n) {
        return Err(DecomposeError::Rank { rank, m, n });
    }
    let l = (rank + oversample).min(m.min(n));
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let omega = Mat::from_fn(n, l, |_, _| -> f64 { StandardNormal.sample(&mut rng) });
    let mut q = orthonormal_basis(&(w * &omega));
    for _ in 0..power_iters {
        let z = orthonormal_basis(&(w.transpose() * &q));
        q = orthonormal_basis(&(w * &z));
    }
    let b = q.transpose() * w; // l×n
    let small = b
        .thin_svd()
        .map_err(|e| DecomposeError::Svd(format!("{e:?}")))?;
    let u = &q * small.U().subcols(0, rank);
    let s_all = small.S().column_vector();
    let s = (0..rank).map(|i| s_all[i].max(0.0)).collect();
    let v = small.V().subcols(0, rank).to_owned();
    let mut out = TopSvd { u, s, v };
    out.canonicalize_signs();
    Ok(out)
}

fn orthonormal_basis(y: &Mat<f64>) -> Mat<f64> {
    y.qr().compute_thin_Q()
}

/// Above this many elements, and for a rank at most a quarter of min(m, n), [`top_svd`] uses
/// the randomised SVD.
pub const RANDOMIZED_SVD_MIN_ELEMENTS: usize = 1024 * 1024;

/// The leading `rank` singular triplets: exact for small matrices or large ranks, randomised
/// (8 power iterations, 16 extra columns) for large matrices at small ranks.
pub fn top_svd(w: &Mat<f64>, rank: usize, seed: u64) -> Result<TopSvd, DecomposeError> {
    let (m, n) = (w.nrows(), w.ncols());
    if m * n >= RANDOMIZED_SVD_MIN_ELEMENTS && rank * 4 <= m.min(n) {
        randomized_svd(w, rank, 16, 8, seed)
    } else {
        thin_svd(w, rank)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(m: usize, n: usize, seed: u64) -> Mat<f64> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        Mat::from_fn(m, n, |_, _| -> f64 { StandardNormal.sample(&mut rng) })
    }

    fn max_abs_diff(a: &Mat<f64>, b: &Mat<f64>) -> f64 {
        let mut d = 0.0f64;
        for i in 0..a.nrows() {
            for j in 0..a.ncols() {
                d = d.max((a[(i, j)] - b[(i, j)]).abs());
            }
        }
        d
    }

    fn lu_product(lu: &TruncatedLu) -> Mat<f64> {
        let r = lu.diag.len();
        let scaled = Mat::from_fn(r, lu.right.ncols(), |i, j| lu.diag[i] * lu.right[(i, j)]);
        &lu.left * &scaled
    }

    #[test]
    fn full_lu_reconstructs_every_shape() {
        for (m, n) in [(9, 9), (12, 7), (7, 12), (1, 5), (5, 1)] {
            let w = random(m, n, (m * 31 + n) as u64);
            let lu = lu_truncated(&w, m.min(n), 1e-12, None).unwrap();
            let err = max_abs_diff(&lu_product(&lu), &w);
            assert!(err < 1e-12, "{m}×{n}: {err}");
        }
    }

    #[test]
    fn truncated_left_factor_equals_full_lus() {
        let w = random(10, 8, 3);
        let full = lu_truncated(&w, 8, 1e-12, None).unwrap();
        let part = lu_truncated(&w, 3, 1e-12, None).unwrap();
        for i in 0..10 {
            for j in 0..3 {
                assert!((full.left[(i, j)] - part.left[(i, j)]).abs() < 1e-12);
            }
        }
        assert_eq!(full.diag[..3], part.diag[..]);
    }

    #[test]
    fn matches_faers_lu() {
        // faer: P·A = L·U; ours: A = P·L·U with left = P·L.
        let w = random(11, 11, 5);
        let ours = lu_truncated(&w, 11, 1e-12, None).unwrap();
        let theirs = w.partial_piv_lu();
        let (l, u) = (theirs.L(), theirs.U());
        for j in 0..11 {
            assert!((ours.diag[j] - u[(j, j)]).abs() < 1e-10);
        }
        let p = theirs.P();
        let fwd = p.arrays().0;
        for (pos, &orig) in fwd.iter().enumerate() {
            for j in 0..11 {
                assert!((ours.left[(orig, j)] - l[(pos, j)]).abs() < 1e-10);
            }
        }
    }

    #[test]
    fn forced_pivots_rebuild_exactly() {
        let w = random(8, 6, 9);
        let a = lu_truncated(&w, 4, 1e-12, None).unwrap();
        let b = lu_truncated(&w, 4, 1e-12, Some(&a.perm[..4])).unwrap();
        assert_eq!(a.perm, b.perm);
        assert_eq!(max_abs_diff(&a.left, &b.left), 0.0);
        assert_eq!(max_abs_diff(&a.right, &b.right), 0.0);
        assert!(lu_truncated(&w, 4, 1e-12, Some(&[0, 0, 1, 2])).is_err());
        assert!(lu_truncated(&w, 4, 1e-12, Some(&[0, 1])).is_err());
    }

    #[test]
    fn singular_matrix_is_refused() {
        let mut w = random(6, 6, 1);
        for j in 0..6 {
            w[(5, j)] = w[(0, j)] + w[(1, j)];
        }
        let err = lu_truncated(&w, 6, 1e-9, None).unwrap_err();
        assert!(
            matches!(err, DecomposeError::TinyPivot { step: 5, .. }),
            "{err}"
        );
        assert!(lu_truncated(&w, 5, 1e-9, None).is_ok());
        assert!(lu_truncated(&Mat::zeros(3, 3), 1, 0.0, None).is_err());
    }

    #[test]
    fn svd_reconstructs_every_shape() {
        for (m, n) in [(9, 9), (12, 7), (7, 12)] {
            let w = random(m, n, 17);
            let k = m.min(n);
            let svd = thin_svd(&w, k).unwrap();
            let us = Mat::from_fn(m, k, |i, j| svd.u[(i, j)] * svd.s[j]);
            let rec = &us * svd.v.transpose();
            assert!(max_abs_diff(&rec, &w) < 1e-12);
            assert!(svd.s.windows(2).all(|p| p[0] >= p[1]));
        }
    }

    #[test]
    fn randomized_svd_finds_the_top_of_a_low_rank_matrix() {
        let (m, n, k) = (300, 200, 10);
        let w = &random(m, k, 1) * &random(k, n, 2);
        let noise = random(m, n, 3);
        let w = Mat::from_fn(m, n, |i, j| w[(i, j)] + 1e-3 * noise[(i, j)]);
        let exact = thin_svd(&w, 5).unwrap();
        let approx = randomized_svd(&w, 5, 10, 4, 7).unwrap();
        for i in 0..5 {
            assert!((exact.s[i] - approx.s[i]).abs() / exact.s[i] < 1e-6);
            for row in 0..m {
                assert!((exact.u[(row, i)] - approx.u[(row, i)]).abs() < 1e-4);
            }
        }
    }

    #[test]
    fn energy_rank() {
        assert_eq!(rank_for_energy(&[3.0, 1.0, 0.1], 0.89), 1); // 9 / 10.01 = 0.899
        assert_eq!(rank_for_energy(&[3.0, 1.0, 0.1], 0.9), 2);
        assert_eq!(rank_for_energy(&[3.0, 1.0, 0.1], 0.9995), 3);
        assert_eq!(rank_for_energy(&[1.0, 1.0, 1.0, 1.0], 0.5), 2);
    }
}

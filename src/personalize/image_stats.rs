//! Set-level image statistics: the Fréchet distance between two sets of feature vectors
//! (the FID formula, here in the evaluation encoder's feature space):
//!
//! `d² = ‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2·(Σ₁^½ Σ₂ Σ₁^½)^½)`
//!
//! with sample means μ and covariances Σ (denominator n − 1). The matrix square roots come
//! from a cyclic Jacobi eigen-decomposition in f64 (the matrices are symmetric and small);
//! negative eigenvalues from rounding are clamped to 0.

/// Mean and covariance (denominator n − 1; zero for one sample) of the rows of `x`, all of
/// length `d`.
fn mean_cov(x: &[Vec<f32>], d: usize) -> (Vec<f64>, Vec<f64>) {
    let n = x.len();
    let mut mean = vec![0f64; d];
    for row in x {
        for (m, v) in mean.iter_mut().zip(row) {
            *m += f64::from(*v) / n as f64;
        }
    }
    let mut cov = vec![0f64; d * d];
    if n > 1 {
        for row in x {
            for i in 0..d {
                let a = f64::from(row[i]) - mean[i];
                for j in i..d {
                    cov[i * d + j] += a * (f64::from(row[j]) - mean[j]) / (n - 1) as f64;
                }
            }
        }
        for i in 0..d {
            for j in 0..i {
                cov[i * d + j] = cov[j * d + i];
            }
        }
    }
    (mean, cov)
}

/// Eigenvalues and eigenvectors (columns of the returned row-major `d×d` matrix) of the
/// symmetric `a` (row-major, `d×d`), by cyclic Jacobi rotations.
pub fn symmetric_eigen(a: &[f64], d: usize) -> (Vec<f64>, Vec<f64>) {
    let mut a = a.to_vec();
    let mut v = vec![0f64; d * d];
    for i in 0..d {
        v[i * d + i] = 1.0;
    }
    let scale: f64 = a
        .iter()
        .map(|x| x * x)
        .sum::<f64>()
        .sqrt()
        .max(f64::MIN_POSITIVE);
    for _sweep in 0..100 {
        let off: f64 = (0..d)
            .flat_map(|i| (0..d).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i * d + j] * a[i * d + j])
            .sum::<f64>()
            .sqrt();
        if off <= 1e-14 * scale {
            break;
        }
        for p in 0..d {
            for q in p + 1..d {
                let apq = a[p * d + q];
                if apq.abs() <= 1e-300 {
                    continue;
                }
                let theta = (a[q * d + q] - a[p * d + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..d {
                    let akp = a[k * d + p];
                    let akq = a[k * d + q];
                    a[k * d + p] = c * akp - s * akq;
                    a[k * d + q] = s * akp + c * akq;
                }
                for k in 0..d {
                    let apk = a[p * d + k];
                    let aqk = a[q * d + k];
                    a[p * d + k] = c * apk - s * aqk;
                    a[q * d + k] = s * apk + c * aqk;
                }
                for k in 0..d {
                    let vkp = v[k * d + p];
                    let vkq = v[k * d + q];
                    v[k * d + p] = c * vkp - s * vkq;
                    v[k * d + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    ((0..d).map(|i| a[i * d + i]).collect(), v)
}

/// The symmetric positive semi-definite square root of symmetric `a` (`d×d`, row-major).
fn sqrtm_psd(a: &[f64], d: usize) -> Vec<f64> {
    let (w, v) = symmetric_eigen(a, d);
    let mut out = vec![0f64; d * d];
    for (k, wk) in w.iter().enumerate() {
        let s = wk.max(0.0).sqrt();
        if s == 0.0 {
            continue;
        }
        for i in 0..d {
            let vik = v[i * d + k] * s;
            for j in 0..d {
                out[i * d + j] += vik * v[j * d + k];
            }
        }
    }
    out
}

fn matmul(a: &[f64], b: &[f64], d: usize) -> Vec<f64> {
    let mut out = vec![0f64; d * d];
    for i in 0..d {
        for k in 0..d {
            let aik = a[i * d + k];
            if aik == 0.0 {
                continue;
            }
            for j in 0..d {
                out[i * d + j] += aik * b[k * d + j];
            }
        }
    }
    out
}

/// The Fréchet distance (squared, as FID reports it) between the Gaussians fitted to the
/// feature sets `a` and `b` (rows of one length). Symmetric, 0 for identical sets.
pub fn frechet_distance(a: &[Vec<f32>], b: &[Vec<f32>]) -> anyhow::Result<f64> {
    anyhow::ensure!(
        !a.is_empty() && !b.is_empty(),
        "the Fréchet distance needs two non-empty feature sets ({} and {} rows)",
        a.len(),
        b.len()
    );
    let d = a[0].len();
    anyhow::ensure!(
        a.iter().chain(b).all(|r| r.len() == d),
        "feature rows of different lengths"
    );
    let (m1, s1) = mean_cov(a, d);
    let (m2, s2) = mean_cov(b, d);
    let mean_term: f64 = m1.iter().zip(&m2).map(|(x, y)| (x - y) * (x - y)).sum();
    let r1 = sqrtm_psd(&s1, d);
    let mut m = matmul(&matmul(&r1, &s2, d), &r1, d);
    // Symmetrise against rounding before the eigen-decomposition.
    for i in 0..d {
        for j in 0..i {
            let avg = 0.5 * (m[i * d + j] + m[j * d + i]);
            m[i * d + j] = avg;
            m[j * d + i] = avg;
        }
    }
    let (w, _) = symmetric_eigen(&m, d);
    let tr_sqrt: f64 = w.iter().map(|x| x.max(0.0).sqrt()).sum();
    let tr1: f64 = (0..d).map(|i| s1[i * d + i]).sum();
    let tr2: f64 = (0..d).map(|i| s2[i * d + i]).sum();
    Ok((mean_term + tr1 + tr2 - 2.0 * tr_sqrt).max(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gaussian_set(n: usize, d: usize, shift: f32, seed: u64) -> Vec<Vec<f32>> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n)
            .map(|_| {
                (0..d)
                    .map(|k| shift + (1.0 + k as f32 * 0.1) * (rng.random::<f32>() - 0.5))
                    .collect()
            })
            .collect()
    }

    #[test]
    fn frechet_is_zero_for_identical_sets() {
        let a = gaussian_set(200, 8, 0.0, 1);
        let d = frechet_distance(&a, &a).unwrap();
        assert!(d.abs() < 1e-9, "{d}");
    }

    #[test]
    fn frechet_is_symmetric_and_grows_with_a_shift() {
        let a = gaussian_set(300, 6, 0.0, 1);
        let b = gaussian_set(300, 6, 0.0, 2);
        let c = gaussian_set(300, 6, 0.5, 3);
        let ab = frechet_distance(&a, &b).unwrap();
        let ba = frechet_distance(&b, &a).unwrap();
        assert!((ab - ba).abs() < 1e-9 * ab.max(1.0), "{ab} vs {ba}");
        let ac = frechet_distance(&a, &c).unwrap();
        assert!(ac > ab + 1.0, "shifted {ac} vs same distribution {ab}");
        // A shift of 0.5 in each of 6 coordinates adds about 6·0.25 = 1.5.
        assert!((ac - 1.5).abs() < 0.3, "{ac}");
    }

    #[test]
    fn frechet_matches_a_hand_computed_2d_case() {
        // a: points (±1, 0), (0, ±1): mean 0, covariance diag(2/3, 2/3).
        let a = vec![
            vec![1.0, 0.0],
            vec![-1.0, 0.0],
            vec![0.0, 1.0],
            vec![0.0, -1.0],
        ];
        // b: points (3 ± 2, 1), (3, 1 ± 1): mean (3, 1), covariance diag(8/3, 2/3).
        let b = vec![
            vec![5.0, 1.0],
            vec![1.0, 1.0],
            vec![3.0, 2.0],
            vec![3.0, 0.0],
        ];
        // ‖μ₁−μ₂‖² = 10; tr = 2/3+2/3 + 8/3+2/3 − 2(√(16/9) + √(4/9)) = 14/3 − 2·2 = 2/3.
        let expected = 10.0 + 2.0 / 3.0;
        let d = frechet_distance(&a, &b).unwrap();
        assert!((d - expected).abs() < 1e-9, "{d} vs {expected}");
    }

    #[test]
    fn frechet_handles_correlated_covariances() {
        // Σ₁ = [[2, 1], [1, 2]], Σ₂ = I (2 × 2): tr(Σ₁^½) = √3 + 1.
        let s1 = [2.0, 1.0, 1.0, 2.0];
        let (w, _) = symmetric_eigen(&s1, 2);
        let mut w = w;
        w.sort_by(f64::total_cmp);
        assert!(
            (w[0] - 1.0).abs() < 1e-12 && (w[1] - 3.0).abs() < 1e-12,
            "{w:?}"
        );
        let r = sqrtm_psd(&s1, 2);
        let back = matmul(&r, &r, 2);
        for (x, y) in back.iter().zip(s1) {
            assert!((x - y).abs() < 1e-12);
        }
    }

    #[test]
    fn frechet_rejects_empty_or_ragged_sets() {
        assert!(frechet_distance(&[], &[vec![1.0]]).is_err());
        assert!(frechet_distance(&[vec![1.0, 2.0]], &[vec![1.0]]).is_err());
    }
}

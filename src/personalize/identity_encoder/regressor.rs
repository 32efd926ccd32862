//! Ridge regression from embeddings to numeric targets, fitted in closed form (the identity
//! parameters of synthetic portraits from their embeddings).

use std::path::Path;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::{EncoderError, Result, rows_of, shape_err};
use crate::fsio::write_atomic;

/// Ridge regression with a bias from embeddings (N, E) to targets (N, P), fitted in closed
/// form: `W = (XcᵀXc + λI)⁻¹ XcᵀYc` on centred data, `b = ȳ − x̄ W`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ParamRegressor {
    /// Input width E.
    pub inputs: usize,
    /// Output width P.
    pub outputs: usize,
    /// The ridge penalty it was fitted with.
    pub lambda: f64,
    /// Weights, E×P row-major.
    pub weights: Vec<f32>,
    /// Bias, P values.
    pub bias: Vec<f32>,
}

/// Solves `a x = b` for symmetric positive-definite `a` (n×n, row-major) and `m` right-hand
/// sides `b` (n×m, row-major) by Cholesky; `None` when `a` is not positive definite.
fn cholesky_solve(mut a: Vec<f64>, mut b: Vec<f64>, n: usize, m: usize) -> Option<Vec<f64>> {
    for j in 0..n {
        let mut d = a[j * n + j];
        for k in 0..j {
            d -= a[j * n + k] * a[j * n + k];
        }
        if !(d > 0.0 && d.is_finite()) {
            return None;
        }
        let d = d.sqrt();
        a[j * n + j] = d;
        for i in j + 1..n {
            let mut s = a[i * n + j];
            for k in 0..j {
                s -= a[i * n + k] * a[j * n + k];
            }
            a[i * n + j] = s / d;
        }
    }
    // L y = b, then Lᵀ x = y, column by column.
    for c in 0..m {
        for i in 0..n {
            let mut s = b[i * m + c];
            for k in 0..i {
                s -= a[i * n + k] * b[k * m + c];
            }
            b[i * m + c] = s / a[i * n + i];
        }
        for i in (0..n).rev() {
            let mut s = b[i * m + c];
            for k in i + 1..n {
                s -= a[k * n + i] * b[k * m + c];
            }
            b[i * m + c] = s / a[i * n + i];
        }
    }
    Some(b)
}

impl ParamRegressor {
    /// Fits embeddings (N, E) to targets (N, P) with ridge penalty `lambda` > 0 (on the
    /// weights, not the bias).
    pub fn fit(embeddings: &Tensor, targets: &Tensor, lambda: f64) -> Result<Self> {
        if !(lambda.is_finite() && lambda > 0.0) {
            return Err(EncoderError::Input(format!(
                "the ridge penalty must be positive, got {lambda}"
            )));
        }
        let x = rows_of(embeddings, "embeddings", None)?;
        let y = rows_of(targets, "targets", None)?;
        if x.len() != y.len() || x.is_empty() {
            return Err(EncoderError::Input(format!(
                "{} embeddings and {} targets: need the same positive number",
                x.len(),
                y.len()
            )));
        }
        let n = x.len();
        let (e, p) = (x[0].len(), y[0].len());
        let mean = |rows: &[Vec<f32>], d: usize| -> Vec<f64> {
            let mut m = vec![0.0; d];
            for r in rows {
                m.iter_mut().zip(r).for_each(|(a, &b)| *a += b as f64);
            }
            m.iter_mut().for_each(|a| *a /= n as f64);
            m
        };
        let (mx, my) = (mean(&x, e), mean(&y, p));
        let mut a = vec![0.0f64; e * e];
        let mut b = vec![0.0f64; e * p];
        let mut xc = vec![0.0f64; e];
        for (xr, yr) in x.iter().zip(&y) {
            xc.iter_mut()
                .zip(xr.iter().zip(&mx))
                .for_each(|(c, (&v, m))| *c = v as f64 - m);
            for i in 0..e {
                let xi = xc[i];
                for j in 0..e {
                    a[i * e + j] += xi * xc[j];
                }
                for j in 0..p {
                    b[i * p + j] += xi * (yr[j] as f64 - my[j]);
                }
            }
        }
        for i in 0..e {
            a[i * e + i] += lambda;
        }
        let w = cholesky_solve(a, b, e, p).ok_or_else(|| {
            EncoderError::Input("the ridge system is not positive definite".into())
        })?;
        let bias: Vec<f32> = (0..p)
            .map(|j| (my[j] - (0..e).map(|i| mx[i] * w[i * p + j]).sum::<f64>()) as f32)
            .collect();
        Ok(Self {
            inputs: e,
            outputs: p,
            lambda,
            weights: w.into_iter().map(|v| v as f32).collect(),
            bias,
        })
    }

    /// Predictions (N, P) for embeddings (N, E), on the embeddings' device.
    pub fn predict(&self, embeddings: &Tensor) -> Result<Tensor> {
        match embeddings.dims() {
            &[_, e] if e == self.inputs => {}
            _ => {
                return Err(shape_err(
                    "embeddings",
                    embeddings,
                    format!("(N, {})", self.inputs),
                ));
            }
        }
        if self.weights.len() != self.inputs * self.outputs || self.bias.len() != self.outputs {
            return Err(EncoderError::Input(format!(
                "the regressor holds {} weights and {} biases for {}×{}",
                self.weights.len(),
                self.bias.len(),
                self.inputs,
                self.outputs
            )));
        }
        let dev = embeddings.device();
        let w = Tensor::from_slice(&self.weights, (self.inputs, self.outputs), dev)?;
        let b = Tensor::from_slice(&self.bias, self.outputs, dev)?;
        Ok(embeddings
            .to_dtype(DType::F32)?
            .matmul(&w)?
            .broadcast_add(&b)?)
    }

    /// Writes the regressor as JSON (atomically).
    pub fn save(&self, path: &Path) -> Result<()> {
        let file_err = |reason: String| EncoderError::File {
            path: path.display().to_string(),
            reason,
        };
        let text = serde_json::to_string(self).map_err(|e| file_err(e.to_string()))?;
        write_atomic(path, text.as_bytes()).map_err(|e| file_err(e.reason()))
    }

    /// Reads a regressor written by [`save`](Self::save).
    pub fn load(path: &Path) -> Result<Self> {
        let file_err = |reason: String| EncoderError::File {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| file_err(e.to_string()))?;
        let r: Self =
            serde_json::from_str(&text).map_err(|e| file_err(format!("bad regressor: {e}")))?;
        if r.weights.len() != r.inputs * r.outputs || r.bias.len() != r.outputs {
            return Err(file_err(format!(
                "{} weights and {} biases do not fit {}×{}",
                r.weights.len(),
                r.bias.len(),
                r.inputs,
                r.outputs
            )));
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::kit::normal_values as normal_vec;
    use candle_core::Device;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn param_regressor_recovers_a_linear_map() {
        let mut rng = StdRng::seed_from_u64(5);
        let (n, e, p) = (200, 8, 3);
        let x = normal_vec(&mut rng, n * e, 1.0).unwrap();
        let w = normal_vec(&mut rng, e * p, 1.0).unwrap();
        let bias = [0.5f32, -1.0, 2.0];
        let noise = normal_vec(&mut rng, n * p, 0.01).unwrap();
        let mut y = vec![0f32; n * p];
        for r in 0..n {
            for j in 0..p {
                let mut s = bias[j] + noise[r * p + j];
                for i in 0..e {
                    s += x[r * e + i] * w[i * p + j];
                }
                y[r * p + j] = s;
            }
        }
        let xt = Tensor::from_vec(x, (n, e), &Device::Cpu).unwrap();
        let yt = Tensor::from_vec(y, (n, p), &Device::Cpu).unwrap();
        let reg = ParamRegressor::fit(&xt, &yt, 1e-3).unwrap();
        for (a, b) in reg.weights.iter().zip(&w) {
            assert!((a - b).abs() < 0.01, "{a} vs {b}");
        }
        for (a, b) in reg.bias.iter().zip(&bias) {
            assert!((a - b).abs() < 0.01, "{a} vs {b}");
        }
        let err = (reg.predict(&xt).unwrap() - &yt)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(err < 0.05, "{err}");
        // Round trip through a file.
        let path = std::env::temp_dir().join(format!("ridge-{}.json", std::process::id()));
        reg.save(&path).unwrap();
        assert_eq!(ParamRegressor::load(&path).unwrap(), reg);
        std::fs::remove_file(&path).ok();
        // Wrong widths and a zero penalty are errors.
        assert!(reg.predict(&yt).is_err());
        assert!(ParamRegressor::fit(&xt, &yt, 0.0).is_err());
        assert!(ParamRegressor::fit(&xt, &yt.narrow(0, 0, 10).unwrap(), 1.0).is_err());
    }
}

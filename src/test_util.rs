//! Helpers shared by the library's unit tests (integration tests have `tests/common`).

use candle_core::{DType, Tensor};

/// The largest |a − b| of two tensors of one shape and float dtype, in f64 (exact for f32 and
/// f64 tensors).
pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .and_then(|d| d.abs()?.max_all()?.to_dtype(DType::F64)?.to_scalar::<f64>())
        .expect("tensors of one shape and float dtype")
}

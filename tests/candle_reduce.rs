//! The vendored candle's sum over leading dimensions (`vendor/reduce-sum.patch`): the same
//! additions in the same order as the general path, so the same values bit for bit, for every
//! shape that reaches it, and the other paths unchanged.

use candle_core::{DType, Device, Tensor};

fn values(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as u32).wrapping_mul(2_654_435_761) >> 9) as f32 / 4.0e6 - 1.0)
        .collect()
}

/// The rows of `v` (`inner` values each) added up row after row: the general path's order.
fn rows_summed_in_order(v: &[f32], inner: usize) -> Vec<f32> {
    let mut out = vec![0f32; inner];
    for row in v.chunks_exact(inner) {
        for (o, &x) in out.iter_mut().zip(row) {
            *o += x;
        }
    }
    out
}

#[test]
fn a_sum_over_leading_dimensions_equals_the_in_order_sum_exactly() {
    let dev = Device::Cpu;
    for (shape, dims, inner) in [
        (vec![1024, 384], vec![0], 384),
        (vec![4, 5, 6], vec![0, 1], 6),
        (vec![4, 5, 6], vec![0], 30),
        (vec![1, 7], vec![0], 7),
        (vec![3, 1], vec![0], 1),
    ] {
        let n: usize = shape.iter().product();
        let v = values(n);
        let t = Tensor::from_vec(v.clone(), shape.as_slice(), &dev).unwrap();
        let got = t
            .sum_keepdim(dims.as_slice())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(
            got,
            rows_summed_in_order(&v, inner),
            "{shape:?} over {dims:?}"
        );
        // f64 takes the same path.
        let t64 = t.to_dtype(DType::F64).unwrap();
        let got64 = t64.sum(dims.as_slice()).unwrap().flatten_all().unwrap();
        let want64: Vec<f64> = (0..inner)
            .map(|j| v.iter().skip(j).step_by(inner).map(|&x| f64::from(x)).sum())
            .collect();
        for (g, w) in got64.to_vec1::<f64>().unwrap().iter().zip(&want64) {
            assert!((g - w).abs() <= 1e-9, "{shape:?} f64: {g} vs {w}");
        }
    }
}

#[test]
fn other_reductions_keep_their_paths_and_values() {
    let dev = Device::Cpu;
    let v = values(4 * 5 * 6);
    let t = Tensor::from_vec(v.clone(), (4, 5, 6), &dev).unwrap();
    // The middle dimension (general path).
    let mid = t.sum(1).unwrap().to_vec2::<f32>().unwrap();
    for (i, row) in mid.iter().enumerate() {
        for (k, &got) in row.iter().enumerate() {
            let want: f32 = (0..5).map(|j| v[i * 30 + j * 6 + k]).sum();
            assert!((got - want).abs() <= 1e-5, "({i}, {k}): {got} vs {want}");
        }
    }
    // A transposed (strided) input over its leading dimension.
    let tt = Tensor::from_vec(v[..30].to_vec(), (5, 6), &dev)
        .unwrap()
        .t()
        .unwrap();
    let got = tt.sum(0).unwrap().to_vec1::<f32>().unwrap();
    for (j, &g) in got.iter().enumerate() {
        let want: f32 = v[j * 6..j * 6 + 6].iter().sum();
        assert!((g - want).abs() <= 1e-5, "{j}: {g} vs {want}");
    }
    // No rows: zeros of the kept shape.
    let empty = Tensor::zeros((0, 3), DType::F32, &dev).unwrap();
    assert_eq!(
        empty.sum(0).unwrap().to_vec1::<f32>().unwrap(),
        vec![0.0; 3]
    );
}

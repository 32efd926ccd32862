//! A trainable weight's products in bf16 with f32 sums, as PyTorch's autocast runs a `Linear`:
//! with `model.matmul_precision = "bf16"` on a CPU with a bf16 kernel (AMX or AVX512-BF16),
//! full fine-tuning's `x·Wᵀ`, its input gradient `g·W` and its weight gradient `gᵀ·x` take
//! bf16 operands; the weights, their gradients and AdamW's state stay f32. In f32 (the default)
//! the product is candle's matmul, unchanged.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

use super::frozen::{bf16_for, frozen_product, frozen_product_no_grad};

/// `x·Wᵀ` as a custom op: arg1 is x (rows×k), arg2 is `Wᵀ` (k×m, any strides); the forward
/// and both gradients are products in the thread's [`MatmulPrecision`](super::MatmulPrecision).
struct MixedMatmul;

impl CustomOp2 for MixedMatmul {
    fn name(&self) -> &'static str {
        "mixed-precision-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        match (s1, s2) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => {
                let (rows, _) = l1.shape().dims2()?;
                let (_, m) = l2.shape().dims2()?;
                let out = frozen_product(a, l1, b, l2, None)?;
                Ok((CpuStorage::F32(out), Shape::from((rows, m))))
            }
            _ => candle_core::bail!("mixed-precision matmul: f32 operands only"),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        wt: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let dx = frozen_product_no_grad(&grad, &wt.t()?)?;
        let dwt = frozen_product_no_grad(&x.t()?, &grad)?;
        Ok((Some(dx), Some(dwt)))
    }
}

/// `x·Wᵀ` for a 2-D `x` (rows×k) and a trainable `W` (m×k): in bf16 with f32 sums when this
/// thread asked for bf16 and the CPU has a kernel for it (see the module doc), else candle's
/// matmul.
pub(crate) fn trainable_product(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (rows, _) = x.dims2()?;
    let (m, k) = w.dims2()?;
    let mixed = x.device().is_cpu()
        && x.dtype() == DType::F32
        && w.dtype() == DType::F32
        && bf16_for(rows)
        && bf16_for(m.min(k));
    if mixed {
        x.apply_op2(&w.t()?, MixedMatmul)
    } else {
        x.matmul(&w.t()?)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;
    use crate::peft::{MatmulPrecision, MatmulPrecisionGuard};

    fn values(shape: (usize, usize), seed: u64) -> Tensor {
        let n = shape.0 * shape.1;
        let v: Vec<f32> = (0..n)
            .map(|i| {
                let h = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed;
                ((h >> 40) % 2001) as f32 / 1000.0 - 1.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// (y, dx, dw) of `sum(y ⊙ g)` with y = x·Wᵀ under `precision`.
    fn product_and_grads(precision: MatmulPrecision) -> [Vec<f32>; 3] {
        let _guard = MatmulPrecisionGuard::set(precision);
        let x = Var::from_tensor(&values((40, 48), 1)).unwrap();
        let w = Var::from_tensor(&values((24, 48), 2)).unwrap();
        let g = values((40, 24), 3);
        let y = trainable_product(x.as_tensor(), w.as_tensor()).unwrap();
        let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        [
            flat(&y),
            flat(grads.get(x.as_tensor()).unwrap()),
            flat(grads.get(w.as_tensor()).unwrap()),
        ]
    }

    #[test]
    fn bf16_products_and_gradients_follow_the_f32_ones() {
        let f32_run = product_and_grads(MatmulPrecision::F32);
        // In f32 it is candle's matmul, exactly.
        let x = values((40, 48), 1);
        let w = values((24, 48), 2);
        let want = x.matmul(&w.t().unwrap()).unwrap();
        assert_eq!(
            f32_run[0],
            want.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        if !crate::bf16_gemm::available() {
            eprintln!("skipped the bf16 part: this CPU has neither AMX nor AVX512-BF16");
            return;
        }
        let bf16_run = product_and_grads(MatmulPrecision::Bf16);
        for (what, (a, b)) in ["y", "dx", "dw"].iter().zip(f32_run.iter().zip(&bf16_run)) {
            let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
            let worst = a.iter().zip(b).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
            // bf16 operands: 8 significant bits, about 2⁻⁸ of the terms' size per product.
            assert!(worst <= 0.02 * scale, "{what}: {worst} against {scale}");
            assert!(a != b, "{what}: the bf16 path did not run");
        }
    }
}

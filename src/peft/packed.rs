//! A frozen weight kept as stored: a GGUF file's quantized blocks (Q4_0, Q4_1, Q8_0, F16, …)
//! instead of f32, as QLoRA keeps its 4-bit base under f32 adapters.
//!
//! [`packed_linear`] computes `y = x·Wᵀ` by dequantizing W (the same function that turns the
//! file into f32 at load, so the result equals the f32 model's) into a buffer that lives for
//! the one product, and its backward does the same for `g·W`: only the packed bytes stay
//! resident, never an f32 copy of the base. The gradient of x is the only one computed.
//!
//! The op implements `cpu_fwd` only; on a GPU [`packed_linear`] dequantizes W onto the input's
//! device and multiplies with standard candle ops ([`packed_linear_composed`]).

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, CustomOp1, Device, Layout, Result, Shape, Tensor};

use super::fused_lora::FrozenWeight;

/// A frozen out×in weight in its stored (usually quantized) form.
#[derive(Debug, Clone)]
pub struct PackedWeight {
    q: Arc<QTensor>,
}

impl PackedWeight {
    /// Wraps a 2-D (out×in) quantized tensor.
    pub fn new(q: QTensor) -> Result<Self> {
        if q.shape().rank() != 2 {
            candle_core::bail!("a packed weight is 2-D, got shape {:?}", q.shape());
        }
        Ok(Self { q: Arc::new(q) })
    }

    /// The packed tensor, shared.
    pub(crate) fn shared(&self) -> Arc<QTensor> {
        self.q.clone()
    }

    /// (out, in).
    pub fn dims(&self) -> (usize, usize) {
        let d = self.q.shape().dims();
        (d[0], d[1])
    }

    /// The storage type (`q4_1`, `f16`, …).
    pub fn dtype(&self) -> GgmlDType {
        self.q.dtype()
    }

    /// Bytes the packed weight occupies.
    pub fn size_in_bytes(&self) -> usize {
        self.q.storage_size_in_bytes()
    }

    /// The weight as f32 (a new tensor each call).
    pub fn dequantize(&self) -> Result<Tensor> {
        self.q.dequantize(&Device::Cpu)
    }

    /// The weight as f32 on `device` (a new tensor each call).
    pub fn dequantize_on(&self, device: &Device) -> Result<Tensor> {
        self.q.dequantize(device)
    }

    /// The same weight with its rows reordered by `order` (row `i` of the result is row
    /// `order[i]`), blocks untouched: quantization blocks run along a row.
    pub fn permute_rows(&self, order: &[usize]) -> Result<Self> {
        let (rows, cols) = self.dims();
        if order.len() != rows {
            candle_core::bail!("permute_rows: {} indices for {rows} rows", order.len());
        }
        let dtype = self.dtype();
        let row_bytes = cols / dtype.block_size() * dtype.type_size();
        let data = self.q.data()?;
        let mut out = Vec::with_capacity(data.len());
        for &i in order {
            let Some(row) = data.get(i * row_bytes..(i + 1) * row_bytes) else {
                candle_core::bail!("permute_rows: row {i} of {rows}");
            };
            out.extend_from_slice(row);
        }
        let q = candle_core::quantized::ggml_file::qtensor_from_ggml(
            dtype,
            &out,
            vec![rows, cols],
            &Device::Cpu,
        )?;
        Self::new(q)
    }
}

/// `x·Wᵀ` with W packed: arg is x (rows×in, f32, contiguous).
struct PackedMatmul {
    w: FrozenWeight,
}

impl CustomOp1 for PackedMatmul {
    fn name(&self) -> &'static str {
        "packed-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(x) = s else {
            candle_core::bail!("packed matmul: the input must be f32");
        };
        let (rows, _) = l.shape().dims2()?;
        let (out_features, _) = self.w.dims()?;
        let y = self.w.forward_cpu(x, l, None)?;
        Ok((CpuStorage::F32(y), Shape::from((rows, out_features))))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.w.input_grad(grad)?))
    }
}

/// Whether a product with input `x` runs as standard candle ops on the device (the GPU path):
/// the fused kernel here implements `cpu_fwd` only.
fn composed(x: &Tensor) -> bool {
    !x.device().is_cpu()
}

/// `x·Wᵀ` (x of any rank, last dimension `in`) with a packed W; the backward yields the
/// gradient of x alone. Fused on the CPU; on a GPU [`packed_linear_composed`].
pub fn packed_linear(x: &Tensor, w: &PackedWeight) -> Result<Tensor> {
    let (m, n) = w.dims();
    let dims = x.dims();
    let Some((&last, lead)) = dims.split_last() else {
        candle_core::bail!("packed linear: the input is a scalar");
    };
    if last != n {
        candle_core::bail!(
            "packed linear: input has {last} features, the weight {m}×{n} expects {n}"
        );
    }
    if composed(x) {
        return packed_linear_composed(x, w);
    }
    let rows: usize = lead.iter().product();
    let x2 = x
        .to_dtype(candle_core::DType::F32)?
        .reshape((rows, n))?
        .contiguous()?;
    let y = x2.apply_op1(PackedMatmul {
        w: FrozenWeight::Packed(w.q.clone()),
    })?;
    let mut out_dims = lead.to_vec();
    out_dims.push(m);
    y.reshape(out_dims)
}

/// [`packed_linear`] as standard candle ops on x's device (the GPU path): W dequantized onto
/// that device for this product, then the frozen product of
/// [`frozen_linear_composed`](super::frozen::frozen_linear_composed) (x's gradient alone; bf16
/// when the thread asked for it). The f32 copy of W lives until the backward pass has run.
pub fn packed_linear_composed(x: &Tensor, w: &PackedWeight) -> Result<Tensor> {
    let x = x.to_dtype(candle_core::DType::F32)?;
    FrozenWeight::Packed(w.q.clone()).forward_composed(&x, None)
}

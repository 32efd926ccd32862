//! The frozen path of an adapted layer: `y = x·Wᵀ` whose backward yields the gradient of x
//! only.
//!
//! candle 0.11's `matmul` backward computes (and keeps until the `GradStore` drops) the
//! gradient of both operands, even when one is a frozen weight: a third more FLOPs per linear
//! layer and a model-sized gradient store, the very memory PEFT exists to save. [`frozen_linear`]
//! runs the same matmul kernel through a [`CustomOp2`] whose backward returns `(Some(g·W), None)`.
//!
//! On a GPU the product is candle's own matmul of the device's storage (see
//! [`frozen_linear_composed`]), in bf16 when the thread asked for [`MatmulPrecision::Bf16`].

use crate::bf16_gemm::Kernel;
use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp2, CustomOp3, DType, Device, Layout, MetalStorage, Result,
    Shape, Tensor,
};

/// Whether a product with input `x` runs as standard candle ops on the device (the GPU path):
/// the fused kernels here implement `cpu_fwd` only.
fn composed(x: &Tensor) -> bool {
    !x.device().is_cpu()
}

/// How the backward pass treats a frozen weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FrozenGrad {
    /// Only the input's gradient is computed (the default).
    #[default]
    Skip,
    /// candle's plain `matmul`: the weight's gradient is computed too and thrown away. Kept for
    /// comparisons and benchmarks.
    Plain,
}

/// The precision of the frozen weights' matrix products (PyTorch's
/// `set_float32_matmul_precision`, for the frozen base only: adapters, gradients and optimizer
/// state stay f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MatmulPrecision {
    /// f32 products (the default; equal to the reference implementations).
    #[default]
    F32,
    /// bf16 operands, f32 sums, on Intel AMX (Xeon 4th generation and later) or AVX512-BF16
    /// (AMD Zen 4 and later) where the CPU has either, f32 on other CPUs; on a GPU the frozen
    /// weight's products run in bf16 (input and weight cast to bf16, the product cast back to
    /// f32).
    Bf16,
}

impl MatmulPrecision {
    /// What this machine runs for this setting, in words (for logs and the form).
    pub fn describe(self) -> &'static str {
        match self {
            MatmulPrecision::F32 => "f32",
            MatmulPrecision::Bf16 => match crate::bf16_gemm::kernel() {
                Some(Kernel::Amx) => "bf16 on AMX (f32 sums)",
                Some(Kernel::Avx512Bf16) => "bf16 on AVX512-BF16 (f32 sums)",
                None => "f32 (bf16 was asked for, but this CPU has neither AMX nor AVX512-BF16)",
            },
        }
    }

    /// What `device` runs for this setting, in words: [`describe`](Self::describe) on the CPU.
    pub fn describe_on(self, device: &Device) -> &'static str {
        match self {
            _ if device.is_cpu() => self.describe(),
            MatmulPrecision::F32 => "f32",
            MatmulPrecision::Bf16 => "bf16 frozen products on the GPU (f32 adapters and gradients)",
        }
    }
}

thread_local! {
    static PRECISION: std::cell::Cell<MatmulPrecision> =
        const { std::cell::Cell::new(MatmulPrecision::F32) };
}

/// Sets the frozen products' precision on this thread until the guard drops (ops run on the
/// thread that applies them, so a run sets it on its own thread).
#[must_use = "the precision reverts when the guard drops"]
pub struct MatmulPrecisionGuard(MatmulPrecision);

impl MatmulPrecisionGuard {
    /// Applies `precision` to this thread's frozen products.
    pub fn set(precision: MatmulPrecision) -> Self {
        Self(PRECISION.replace(precision))
    }
}

impl Drop for MatmulPrecisionGuard {
    fn drop(&mut self) {
        PRECISION.set(self.0);
    }
}

/// Whether a frozen product with `rows` output rows runs in bf16 on this thread.
pub(crate) fn bf16_for(rows: usize) -> bool {
    rows >= 16 && PRECISION.get() == MatmulPrecision::Bf16 && crate::bf16_gemm::available()
}

/// The dtype of a frozen product on the device: bf16 when this thread asked for
/// [`MatmulPrecision::Bf16`], else the input's.
fn device_product_dtype(x: &Tensor) -> DType {
    match PRECISION.get() {
        MatmulPrecision::Bf16 => DType::BF16,
        MatmulPrecision::F32 => x.dtype(),
    }
}

/// `a·b (+ bias rows)` where b is a frozen weight (or its transpose): f32 through gemm, or
/// bf16 (AMX or AVX512-BF16) when this thread asked for [`MatmulPrecision::Bf16`].
pub(crate) fn frozen_product(
    a: &[f32],
    la: &Layout,
    b: &[f32],
    lb: &Layout,
    bias: Option<&[f32]>,
) -> Result<Vec<f32>> {
    let (m, k, n) = gemm_dims(a, la, b, lb)?;
    if !bf16_for(m) {
        return gemm_f32(a, la, b, lb, bias);
    }
    let strided = |data, l: &Layout| crate::bf16_gemm::Strided {
        data,
        start: l.start_offset(),
        rs: l.stride()[0],
        cs: l.stride()[1],
    };
    let mut out = match bias {
        Some(bias) => bias_rows(bias, m, n)?,
        None => vec![0f32; m * n],
    };
    crate::bf16_gemm::gemm_bf16(
        strided(a, la),
        strided(b, lb),
        (m, k, n),
        &mut out,
        bias.is_some(),
    );
    Ok(out)
}

/// `x·W`ᵀ as a custom op: arg1 is x (rows×k, contiguous), arg2 is `Wᵀ` (k×m, any strides candle's matmul
/// accepts). With `frozen` the product follows the thread's [`MatmulPrecision`] (arg2 is a
/// frozen weight); without, it is always f32 (an adapter's product applied without a backward).
/// The backward returns the gradient of x, and with `weight_grad` that of `Wᵀ` too (`xᵀ·g`, a
/// product in the same precision): full fine-tuning's trainable weight in bf16, as PyTorch's
/// autocast runs a `Linear`.
struct FrozenMatmul {
    frozen: bool,
    weight_grad: bool,
}

/// The product of a frozen weight.
const FROZEN: FrozenMatmul = FrozenMatmul {
    frozen: true,
    weight_grad: false,
};

/// The product of a trainable weight in the thread's precision (both gradients).
const TRAINABLE: FrozenMatmul = FrozenMatmul {
    frozen: true,
    weight_grad: true,
};

impl FrozenMatmul {
    fn dims(l1: &Layout, l2: &Layout) -> Result<(usize, usize, usize)> {
        let (rows, k) = l1.shape().dims2()?;
        let (k2, m) = l2.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("frozen matmul: input has {k} features but the weight expects {k2}");
        }
        Ok((rows, k, m))
    }

    fn fwd<S: BackendStorage>(s1: &S, l1: &Layout, s2: &S, l2: &Layout) -> Result<(S, Shape)> {
        let (rows, k, m) = Self::dims(l1, l2)?;
        let out = s1.matmul(s2, (1, rows, m, k), l1, l2)?;
        Ok((out, Shape::from((rows, m))))
    }

    fn cpu(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        match (s1, s2) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => {
                let (rows, _, m) = Self::dims(l1, l2)?;
                let out = if self.frozen {
                    frozen_product(a, l1, b, l2, None)?
                } else {
                    gemm_f32(a, l1, b, l2, None)?
                };
                Ok((CpuStorage::F32(out), Shape::from((rows, m))))
            }
            _ => Self::fwd(s1, l1, s2, l2),
        }
    }
}

/// `a·b` for 2-D f32 operands of any strides, straight into gemm with an output that is never
/// zeroed first (candle's matmul zeroes it, then overwrites it). With `bias` (one value per
/// output column) the output starts as the bias rows and gemm accumulates onto them.
pub(crate) fn gemm_f32(
    a: &[f32],
    la: &Layout,
    b: &[f32],
    lb: &Layout,
    bias: Option<&[f32]>,
) -> Result<Vec<f32>> {
    let (m, _, n) = gemm_dims(a, la, b, lb)?;
    let (mut out, read_dst) = match bias {
        Some(bias) => (bias_rows(bias, m, n)?, true),
        None => (Vec::with_capacity(m * n), false),
    };
    // SAFETY: `gemm_dims` checked the operands' layouts against their buffers; `out` has room
    // for m·n values, and gemm writes every one of them before reading any when `read_dst` is
    // false (alpha is then zero for the first pass over k), or reads the bias rows written above.
    unsafe {
        run_gemm(out.as_mut_ptr(), read_dst, a, la, b, lb, 1.0);
        out.set_len(m * n);
    }
    Ok(out)
}

/// m rows of `bias` (one value per output column: n of them), for a product to accumulate onto.
fn bias_rows(bias: &[f32], m: usize, n: usize) -> Result<Vec<f32>> {
    if bias.len() != n {
        candle_core::bail!("matmul: {} bias values for {n} outputs", bias.len());
    }
    Ok(bias.repeat(m))
}

/// `dst += beta·a·b` for 2-D f32 operands of any strides; `dst` is the m×n row-major product's
/// place.
pub(crate) fn gemm_f32_acc(
    dst: &mut [f32],
    a: &[f32],
    la: &Layout,
    b: &[f32],
    lb: &Layout,
    beta: f32,
) -> Result<()> {
    let (m, _, n) = gemm_dims(a, la, b, lb)?;
    if dst.len() != m * n {
        candle_core::bail!("matmul: {} outputs for a {m}×{n} product", dst.len());
    }
    // SAFETY: layouts checked by `gemm_dims`; `dst` holds exactly m·n initialised values.
    unsafe { run_gemm(dst.as_mut_ptr(), true, a, la, b, lb, beta) };
    Ok(())
}

/// (m, k, n) of `a·b`, after checking that the inner sizes agree and that every element each
/// layout addresses lies inside its buffer.
fn gemm_dims(a: &[f32], la: &Layout, b: &[f32], lb: &Layout) -> Result<(usize, usize, usize)> {
    let (m, k) = la.shape().dims2()?;
    let (k2, n) = lb.shape().dims2()?;
    if k != k2 {
        candle_core::bail!("matmul: {m}×{k} times {k2}×{n}");
    }
    let (sa, sb) = (la.stride(), lb.stride());
    let reach = |start: usize, rows: usize, cols: usize, st: &[usize]| {
        start + rows.saturating_sub(1) * st[0] + cols.saturating_sub(1) * st[1]
    };
    if m * k > 0 && reach(la.start_offset(), m, k, sa) >= a.len()
        || k * n > 0 && reach(lb.start_offset(), k, n, sb) >= b.len()
    {
        candle_core::bail!("matmul: an operand's layout runs past its storage");
    }
    Ok((m, k, n))
}

/// `dst = (read_dst ? dst : 0) + beta·a·b` through gemm, on candle's thread count.
///
/// # Safety
/// The layouts must have passed [`gemm_dims`]; `dst` must have room for m·n values, initialised
/// when `read_dst`.
unsafe fn run_gemm(
    dst: *mut f32,
    read_dst: bool,
    a: &[f32],
    la: &Layout,
    b: &[f32],
    lb: &Layout,
    beta: f32,
) {
    let (m, k) = (la.dims()[0], la.dims()[1]);
    let n = lb.dims()[1];
    let (sa, sb) = (la.stride(), lb.stride());
    let threads = candle_core::utils::get_num_threads();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the caller vouches for the layouts and `dst` (see above).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            n as isize,
            read_dst,
            a.as_ptr().add(la.start_offset()),
            sa[1] as isize,
            sa[0] as isize,
            b.as_ptr().add(lb.start_offset()),
            sb[1] as isize,
            sb[0] as isize,
            if read_dst { 1.0 } else { 0.0 },
            beta,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// `g·W` for the input gradient of `x·Wᵀ` (`wt` is `Wᵀ`): a frozen product.
pub(crate) fn input_grad(grad: &Tensor, wt: &Tensor) -> Result<Tensor> {
    product_in_precision(&grad.contiguous()?, &wt.t()?)
}

/// `a·b` in the thread's [`MatmulPrecision`] (bf16 operands with f32 sums when it is bf16),
/// recorded without a backward pass: the frozen weights' products, and the products a bf16 run
/// takes in bf16 as autocast would (trained weights' gradients, SVFit's and LoLDU's per-step
/// weight and z's gradient).
pub(crate) fn product_in_precision(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    // The frozen matmul's forward is exactly `a·b`; applied without a backward it records nothing.
    a.apply_op2_no_bwd(b, &FROZEN)
}

/// `a·b` of two 2-D tensors in f32, recorded without a backward pass (adapter gradients).
pub(crate) fn matmul_no_grad(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let f32_product = FrozenMatmul {
        frozen: false,
        weight_grad: false,
    };
    a.apply_op2_no_bwd(b, &f32_product)
}

/// `x·Wᵀ` on the CPU for a rows×k `x` and `wt = Wᵀ` (k×m), as a custom op's forward.
pub(crate) fn frozen_matmul_cpu(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
) -> Result<(CpuStorage, Shape)> {
    FROZEN.cpu(s1, l1, s2, l2)
}

impl CustomOp2 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu(s1, l1, s2, l2)
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        Self::fwd(s1, l1, s2, l2)
    }

    fn metal_fwd(
        &self,
        s1: &MetalStorage,
        l1: &Layout,
        s2: &MetalStorage,
        l2: &Layout,
    ) -> Result<(MetalStorage, Shape)> {
        Self::fwd(s1, l1, s2, l2)
    }

    fn bwd(
        &self,
        x: &Tensor,
        wt: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let weight_grad = if self.weight_grad {
            Some(product_in_precision(&x.t()?, &grad)?)
        } else {
            None
        };
        Ok((Some(input_grad(&grad, wt)?), weight_grad))
    }
}

/// `x·Wᵀ + b` in one op (f32 CPU): the bias is added in place, and the backward yields the
/// gradient of x only, so a frozen bias costs no full-size gradient buffer either.
struct FrozenMatmulBias;

impl CustomOp3 for FrozenMatmulBias {
    fn name(&self) -> &'static str {
        "frozen-matmul-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let Some((b0, b1)) = l3.contiguous_offsets() else {
            candle_core::bail!("frozen matmul with bias: the bias must be contiguous");
        };
        if let (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(b)) = (s1, s2, s3) {
            let (rows, _, m) = FrozenMatmul::dims(l1, l2)?;
            let y = frozen_product(x, l1, w, l2, Some(&b[b0..b1]))?;
            return Ok((CpuStorage::F32(y), Shape::from((rows, m))));
        }
        let (out, shape) = FrozenMatmul::fwd(s1, l1, s2, l2)?;
        let (CpuStorage::F32(mut y), CpuStorage::F32(b)) = (out, s3) else {
            candle_core::bail!("frozen matmul with bias: only f32 is supported");
        };
        let b = &b[b0..b1];
        let m = b.len();
        y.chunks_exact_mut(m)
            .for_each(|row| row.iter_mut().zip(b).for_each(|(y, b)| *y += b));
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        wt: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        Ok((Some(input_grad(grad, wt)?), None, None))
    }
}

/// `x·Wᵀ + b` for a frozen weight and bias: fused on the CPU in f32; on a GPU
/// [`frozen_linear_composed`]; else [`frozen_linear`] plus a broadcast add.
pub fn frozen_linear_bias(x: &Tensor, w: &Tensor, b: &Tensor, mode: FrozenGrad) -> Result<Tensor> {
    if mode == FrozenGrad::Skip && (composed(x) || w.dtype() != x.dtype()) {
        return frozen_linear_composed(x, w, Some(b));
    }
    let fused = mode == FrozenGrad::Skip
        && x.dtype() == DType::F32
        && w.dtype() == DType::F32
        && b.dtype() == DType::F32;
    if !fused {
        return frozen_linear(x, w, mode)?.broadcast_add(b);
    }
    let (m, n) = w.dims2()?;
    let dims = x.dims();
    let Some((&last, lead)) = dims.split_last() else {
        candle_core::bail!("frozen linear: the input is a scalar");
    };
    if last != n || b.dims() != [m] {
        candle_core::bail!(
            "frozen linear: input has {last} features and bias {:?}, the weight {m}×{n} expects {n} and [{m}]",
            b.dims()
        );
    }
    let rows: usize = lead.iter().product();
    let y = x.reshape((rows, n))?.contiguous()?.apply_op3(
        &w.t()?,
        &b.contiguous()?,
        FrozenMatmulBias,
    )?;
    let mut out_dims = lead.to_vec();
    out_dims.push(m);
    y.reshape(out_dims)
}

/// `x·Wᵀ` for `x` of shape (…, n) and a frozen `w` of shape (m, n); returns (…, m).
///
/// With [`FrozenGrad::Skip`] the backward pass computes the gradient of `x` only; on a GPU the
/// product is [`frozen_linear_composed`].
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use peft_studio::peft::{frozen_linear, FrozenGrad};
/// let w = Tensor::new(&[[1f32, 2.], [3., 4.], [5., 6.]], &Device::Cpu)?;
/// let x = Var::new(&[[1f32, 1.]], &Device::Cpu)?;
/// let y = frozen_linear(x.as_tensor(), &w, FrozenGrad::Skip)?;
/// assert_eq!(y.to_vec2::<f32>()?, [[3., 7., 11.]]);
/// let g = y.sum_all()?.backward()?;
/// assert_eq!(g.get(&x).unwrap().to_vec2::<f32>()?, [[9., 12.]]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn frozen_linear(x: &Tensor, w: &Tensor, mode: FrozenGrad) -> Result<Tensor> {
    // A weight stored in another dtype (bf16 on a GPU) is multiplied as the precision says.
    if mode == FrozenGrad::Skip && (composed(x) || w.dtype() != x.dtype()) {
        return frozen_linear_composed(x, w, None);
    }
    let (m, n) = w.dims2()?;
    let dims = x.dims();
    let Some((&last, lead)) = dims.split_last() else {
        candle_core::bail!("frozen linear: the input is a scalar");
    };
    if last != n {
        candle_core::bail!(
            "frozen linear: input has {last} features, the weight {m}×{n} expects {n}"
        );
    }
    let rows: usize = lead.iter().product();
    let x2 = x.reshape((rows, n))?;
    let y = match mode {
        FrozenGrad::Skip => x2.contiguous()?.apply_op2(&w.t()?, FROZEN)?,
        // A trainable weight (full fine-tuning) in the thread's precision.
        FrozenGrad::Plain => trainable_product(&x2, w)?,
    };
    let mut out_dims = lead.to_vec();
    out_dims.push(m);
    y.reshape(out_dims)
}

/// `x·Wᵀ` for a 2-D `x` (rows×k) and a trainable `W` (m×k): the forward and both gradients in
/// bf16 with f32 sums when this thread asked for [`MatmulPrecision::Bf16`] and the CPU has a
/// kernel for it (full fine-tuning under `model.matmul_precision = "bf16"`; weights, gradients
/// and AdamW stay f32), else candle's matmul, unchanged.
pub(crate) fn trainable_product(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (rows, _) = x.dims2()?;
    if x.device().is_cpu() && x.dtype() == DType::F32 && w.dtype() == DType::F32 && bf16_for(rows) {
        x.apply_op2(&w.t()?, TRAINABLE)
    } else {
        x.matmul(&w.t()?)
    }
}

/// `x·Wᵀ` as the backend's own matmul (candle's `BackendStorage::matmul`, the kernel behind
/// `Tensor::matmul` on every device), with a backward that yields x's gradient alone: arg1 is x
/// (rows×k, contiguous), arg2 `Wᵀ` (k×m). The GPU path of the frozen product; on the CPU it
/// runs the same storage matmul (the reference the tests compare with the fused kernels).
///
/// candle's `matmul` backward would also form the weight's m×k gradient and keep it in the
/// gradient store: a model-sized buffer per step for nothing.
struct DeviceMatmul;

impl CustomOp2 for DeviceMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul-device"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        FrozenMatmul::fwd(s1, l1, s2, l2)
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        FrozenMatmul::fwd(s1, l1, s2, l2)
    }

    fn metal_fwd(
        &self,
        s1: &MetalStorage,
        l1: &Layout,
        s2: &MetalStorage,
        l2: &Layout,
    ) -> Result<(MetalStorage, Shape)> {
        FrozenMatmul::fwd(s1, l1, s2, l2)
    }

    fn bwd(
        &self,
        _x: &Tensor,
        wt: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let gx = grad
            .to_dtype(wt.dtype())?
            .contiguous()?
            .apply_op2_no_bwd(&wt.t()?, &DeviceMatmul)?;
        Ok((Some(gx), None))
    }
}

/// `x·Wᵀ (+ b)` for `x` (…, n) and a frozen `w` (m, n) as standard ops on `x`'s device: the
/// GPU path of [`frozen_linear`], [`frozen_linear_bias`] and the fused LoRA and packed products.
/// The product is the backend's matmul and its backward yields x's gradient alone (neither the
/// weight nor the bias get one). With [`MatmulPrecision::Bf16`] set on this thread, x and W are
/// cast to bf16 for the product (and its backward) and the result back to x's dtype; the bias
/// is added after, in x's dtype.
pub fn frozen_linear_composed(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (m, n) = w.dims2()?;
    let dims = x.dims();
    let Some((&last, lead)) = dims.split_last() else {
        candle_core::bail!("frozen linear: the input is a scalar");
    };
    if last != n || bias.is_some_and(|b| b.dims() != [m]) {
        candle_core::bail!(
            "frozen linear: input has {last} features and bias {:?}, the weight {m}×{n} expects {n} and [{m}]",
            bias.map(|b| b.dims().to_vec())
        );
    }
    let rows: usize = lead.iter().product();
    let dtype = device_product_dtype(x);
    let x2 = x.reshape((rows, n))?.to_dtype(dtype)?.contiguous()?;
    let wt = w.detach().to_dtype(dtype)?.t()?;
    let mut y = x2.apply_op2(&wt, DeviceMatmul)?.to_dtype(x.dtype())?;
    if let Some(b) = bias {
        y = y.broadcast_add(&b.detach().to_dtype(x.dtype())?)?;
    }
    let mut out_dims = lead.to_vec();
    out_dims.push(m);
    y.reshape(out_dims)
}

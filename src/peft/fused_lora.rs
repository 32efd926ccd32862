//! LoRA's forward in one op: `y = x·Wᵀ (+ b) + s·(x·Aᵀ)·Bᵀ`, with W frozen.
//!
//! Written as candle ops, the branch keeps three output-sized tensors alive until the backward
//! pass (`(x·Aᵀ)·Bᵀ`, its scaled copy, and the sum with the base output) beside the base output
//! itself; in a 30-layer language model with LoRA on q and v that is about 280 MB of a training
//! step's peak memory. [`lora_linear`] writes the output once (the base product, then the branch
//! accumulated onto it by gemm) and its backward recomputes `x·Aᵀ` (rank r, cheap). Gradients:
//! `dx = g·W + s·(g·B)·A`, `dA = s·(g·B)ᵀ·x`, `dB = s·gᵀ·(x·Aᵀ)`.
//!
//! The op implements `cpu_fwd` only; on a GPU [`lora_linear`] computes the same with standard
//! candle ops ([`lora_linear_composed`]), whose backward is candle's autograd.

use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{CpuStorage, CustomOp3, Device, Layout, Result, Shape, Storage, Tensor};

use super::frozen::{
    frozen_linear_composed, frozen_product, gemm_f32, gemm_f32_acc, matmul_no_grad,
    product_in_precision,
};

/// Whether a product with input `x` runs as standard candle ops on the device (the GPU path):
/// the fused kernels here implement `cpu_fwd` only.
fn composed(x: &Tensor) -> bool {
    !x.device().is_cpu()
}

/// A frozen weight W (out×in) as the fused ops read it.
#[derive(Debug, Clone)]
pub(crate) enum FrozenWeight {
    /// W in f32.
    Dense(Tensor),
    /// W packed as stored (GGUF), dequantized per product.
    Packed(Arc<QTensor>),
}

impl FrozenWeight {
    /// W as an f32 tensor on the CPU (a fresh one for a packed weight).
    fn dense(&self) -> Result<Tensor> {
        self.dense_on(&Device::Cpu)
    }

    /// W as an f32 tensor on `device`: a dense weight moved there if it lives elsewhere, a
    /// packed one dequantized (a fresh tensor each call).
    pub(crate) fn dense_on(&self, device: &Device) -> Result<Tensor> {
        match self {
            FrozenWeight::Dense(w) => w.to_device(device),
            FrozenWeight::Packed(q) => q.dequantize(device),
        }
    }

    /// `x·Wᵀ (+ bias)` for `x` (…, in) as standard candle ops on x's device
    /// ([`frozen_linear_composed`], W dequantized onto that device when packed): the GPU path
    /// of the fused products. The backward yields x's gradient alone.
    pub(crate) fn forward_composed(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        frozen_linear_composed(x, &self.dense_on(x.device())?, bias)
    }

    /// (out, in).
    pub(crate) fn dims(&self) -> Result<(usize, usize)> {
        match self {
            FrozenWeight::Dense(w) => w.dims2(),
            FrozenWeight::Packed(q) => q.shape().dims2(),
        }
    }

    /// `g·W`, the input gradient of `x·Wᵀ`, recorded without a backward pass.
    pub(crate) fn input_grad(&self, g: &Tensor) -> Result<Tensor> {
        product_in_precision(&g.contiguous()?, &self.dense()?)
    }

    /// `x·Wᵀ (+ bias)` for a rows×in f32 `x` on the CPU.
    pub(crate) fn forward_cpu(
        &self,
        x: &[f32],
        lx: &Layout,
        bias: Option<&Tensor>,
    ) -> Result<Vec<f32>> {
        let w = self.dense()?;
        let (storage, wl) = w.storage_and_layout();
        let Storage::Cpu(CpuStorage::F32(wd)) = &*storage else {
            candle_core::bail!("fused linear: the frozen weight must be f32 on the CPU");
        };
        let Some(bias) = bias else {
            return frozen_product(x, lx, wd, &wl.transpose(0, 1)?, None);
        };
        let (bs, bl) = bias.storage_and_layout();
        let (Storage::Cpu(CpuStorage::F32(bd)), Some((b0, b1))) = (&*bs, bl.contiguous_offsets())
        else {
            candle_core::bail!("fused linear: the bias must be contiguous f32 on the CPU");
        };
        frozen_product(x, lx, wd, &wl.transpose(0, 1)?, Some(&bd[b0..b1]))
    }
}

/// The op: args x (rows×in), A (r×in), B (out×r).
struct FusedLora {
    weight: FrozenWeight,
    bias: Option<Tensor>,
    scale: f64,
}

impl CustomOp3 for FusedLora {
    fn name(&self) -> &'static str {
        "fused-lora-linear"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sa: &CpuStorage,
        la: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(x), CpuStorage::F32(a), CpuStorage::F32(b)) = (sx, sa, sb) else {
            candle_core::bail!("fused LoRA: x, A and B must be f32");
        };
        let (rows, _) = lx.shape().dims2()?;
        let (r, _) = la.shape().dims2()?;
        let (m, _) = self.weight.dims()?;
        let mut y = self.weight.forward_cpu(x, lx, self.bias.as_ref())?;
        let h = gemm_f32(x, lx, a, &la.transpose(0, 1)?, None)?;
        let lh = Layout::contiguous((rows, r));
        gemm_f32_acc(&mut y, &h, &lh, b, &lb.transpose(0, 1)?, self.scale as f32)?;
        Ok((CpuStorage::F32(y), Shape::from((rows, m))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let gb = matmul_no_grad(&g, b)?;
        // An input that no trained value reaches (the first adapted layer's, below which all
        // is frozen) needs no gradient: skip its product with W, as autograd does.
        let dx = if x.track_op() {
            Some((self.weight.input_grad(&g)? + (matmul_no_grad(&gb, a)? * self.scale)?)?)
        } else {
            None
        };
        let da = (matmul_no_grad(&gb.t()?, x)? * self.scale)?;
        let h = matmul_no_grad(x, &a.t()?)?;
        let db = (matmul_no_grad(&g.t()?, &h)? * self.scale)?;
        Ok((dx, Some(da), Some(db)))
    }
}

/// `x·Wᵀ (+ bias) + scale·(x·Aᵀ)·Bᵀ` for `x` of shape (…, in); gradients reach x, A and B
/// (never W or the bias). One fused op for f32 on the CPU; on a GPU [`lora_linear_composed`].
pub(crate) fn lora_linear(
    x: &Tensor,
    weight: &FrozenWeight,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let (m, n) = weight.dims()?;
    let dims = x.dims();
    let Some((&last, lead)) = dims.split_last() else {
        candle_core::bail!("fused LoRA: the input is a scalar");
    };
    if last != n || a.dims().get(1) != Some(&n) || b.dims().first() != Some(&m) {
        candle_core::bail!(
            "fused LoRA: input of {last} features, A {:?} and B {:?} for a {m}×{n} weight",
            a.dims(),
            b.dims()
        );
    }
    if composed(x) {
        return lora_linear_composed(x, weight, bias, a, b, scale);
    }
    let rows: usize = lead.iter().product();
    let op = FusedLora {
        weight: weight.clone(),
        bias: bias.map(Tensor::contiguous).transpose()?,
        scale,
    };
    let y =
        x.reshape((rows, n))?
            .contiguous()?
            .apply_op3(&a.contiguous()?, &b.contiguous()?, op)?;
    let mut out = lead.to_vec();
    out.push(m);
    y.reshape(out)
}

/// [`lora_linear`] as standard candle ops on x's device (the GPU path): the frozen product
/// ([`FrozenWeight::forward_composed`]) plus the branch `scale·(x·Aᵀ)·Bᵀ`, autograd giving the
/// gradients of x, A and B.
pub(crate) fn lora_linear_composed(
    x: &Tensor,
    weight: &FrozenWeight,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let base = weight.forward_composed(x, bias)?;
    let x2 = x.reshape(((), a.dim(1)?))?;
    let branch = (x2.matmul(&a.t()?)?.matmul(&b.t()?)? * scale)?;
    let branch = branch.reshape(base.shape())?;
    base + branch
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor, Var};

    use crate::peft::{AdaptedLinear, Adapter, AdapterConfig, PackedWeight};

    fn randn(shape: &[usize], std: f32) -> Tensor {
        Tensor::randn(0f32, std, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a - b).unwrap().abs().unwrap().flatten_all().unwrap();
        d.max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    /// A LoRA layer (rank 3, alpha 6) whose B is random, so the branch is not zero.
    fn lora_layer(packed: bool, bias: Option<Tensor>) -> (AdaptedLinear, Tensor) {
        let w = randn(&[12, 64], 0.3);
        let (mut layer, dense) = if packed {
            let p = PackedWeight::new(QTensor::quantize(&w, GgmlDType::Q8_0).unwrap()).unwrap();
            let dense = p.dequantize().unwrap();
            (AdaptedLinear::new_packed("l", p, bias), dense)
        } else {
            (AdaptedLinear::new("l", w.clone(), bias), w)
        };
        let cfg = AdapterConfig {
            rank: 3,
            alpha: Some(6.0),
            ..Default::default()
        };
        layer.attach(&cfg).unwrap();
        let Some(Adapter::Lora(l)) = layer.adapter() else {
            panic!("not a LoRA layer");
        };
        l.b.set(&randn(&[12, 3], 0.5)).unwrap();
        (layer, dense)
    }

    #[test]
    fn the_fused_forward_and_its_gradients_equal_the_separate_ops() {
        for (packed, bias) in [
            (false, None),
            (false, Some(randn(&[12], 1.0))),
            (true, None),
        ] {
            let (layer, w) = lora_layer(packed, bias.clone());
            let Some(Adapter::Lora(l)) = layer.adapter() else {
                panic!("not a LoRA layer");
            };
            assert!(layer.fused_weight().is_some());
            let x = Var::from_tensor(&randn(&[2, 5, 64], 1.0)).unwrap();
            let r = randn(&[2, 5, 12], 1.0);
            let ours = layer.forward_t(x.as_tensor(), true).unwrap();
            let (a, b) = (l.a.as_tensor(), l.b.as_tensor());
            let h = x.as_tensor().broadcast_matmul(&a.t().unwrap()).unwrap();
            let branch = (h.broadcast_matmul(&b.t().unwrap()).unwrap() * l.scale).unwrap();
            let mut theirs =
                (x.as_tensor().broadcast_matmul(&w.t().unwrap()).unwrap() + branch).unwrap();
            if let Some(bias) = &bias {
                theirs = theirs.broadcast_add(bias).unwrap();
            }
            let d = max_diff(&ours, &theirs);
            assert!(d < 1e-4, "packed {packed}: outputs differ by {d}");
            let go = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let gt = (&theirs * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for (name, v) in [("x", &x), ("A", &l.a), ("B", &l.b)] {
                let d = max_diff(go.get(v).unwrap(), gt.get(v).unwrap());
                assert!(
                    d < 1e-3,
                    "packed {packed}: gradient of {name} differs by {d}"
                );
            }
        }
    }

    /// The first adapted layer's input comes from frozen values only: its gradient is not
    /// computed (none is stored), and A's and B's equal those of a run where x is trained.
    #[test]
    fn an_input_no_trained_value_reaches_gets_no_gradient() {
        let (layer, _) = lora_layer(false, Some(randn(&[12], 1.0)));
        let Some(Adapter::Lora(l)) = layer.adapter() else {
            panic!("not a LoRA layer");
        };
        let frozen_x = randn(&[2, 5, 64], 1.0);
        let trained_x = Var::from_tensor(&frozen_x).unwrap();
        let r = randn(&[2, 5, 12], 1.0);
        let grads = |x: &Tensor| {
            let y = layer.forward_t(x, true).unwrap();
            (&y * &r).unwrap().sum_all().unwrap().backward().unwrap()
        };
        let (gf, gt) = (grads(&frozen_x), grads(trained_x.as_tensor()));
        assert!(gf.get(&frozen_x).is_none(), "a frozen input got a gradient");
        assert!(gt.get(trained_x.as_tensor()).is_some());
        for (name, v) in [("A", &l.a), ("B", &l.b)] {
            let d = max_diff(gf.get(v).unwrap(), gt.get(v).unwrap());
            assert!(d == 0.0, "gradient of {name} differs by {d}");
        }
    }

    #[test]
    fn dropout_in_training_takes_the_unfused_path_and_evaluation_the_fused_one() {
        let (mut layer, _) = lora_layer(false, None);
        let cfg = AdapterConfig {
            rank: 3,
            alpha: Some(6.0),
            dropout: 0.5,
            ..Default::default()
        };
        layer.attach(&cfg).unwrap();
        let Some(Adapter::Lora(l)) = layer.adapter() else {
            panic!("not a LoRA layer");
        };
        l.b.set(&randn(&[12, 3], 0.5)).unwrap();
        let x = randn(&[64, 64], 1.0);
        // Dropout makes two training passes differ; evaluation (fused) is deterministic and
        // equals the base plus the whole branch.
        let t1 = layer.forward_t(&x, true).unwrap();
        let t2 = layer.forward_t(&x, true).unwrap();
        assert!(max_diff(&t1, &t2) > 1e-3);
        let e = layer.forward_t(&x, false).unwrap();
        let want = (x
            .matmul(&layer.base_weight().unwrap().t().unwrap())
            .unwrap()
            + x.matmul(&layer.delta_weight().unwrap().t().unwrap())
                .unwrap())
        .unwrap();
        assert!(max_diff(&e, &want) < 1e-4);
    }

    /// The GPU path: `lora_linear_composed` equals the fused op on the CPU, forward (1e-5
    /// relative) and the gradients of x, A and B (1e-4), for dense, dense-with-bias and packed
    /// weights and ragged shapes; W and the bias get no gradient on either path. The entry
    /// function on every test device gives the CPU op's result.
    #[test]
    fn the_composed_lora_product_equals_the_fused_op() {
        use super::{FrozenWeight, lora_linear, lora_linear_composed};
        use std::sync::Arc;
        let rel = |a: &Tensor, b: &Tensor| {
            let a = a.to_device(&Device::Cpu).unwrap();
            let s = b
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            max_diff(&a, b) / s.max(1.0)
        };
        for (packed, with_bias, x_shape, rank) in [
            (false, false, &[2, 5, 64][..], 3),
            (false, true, &[7, 64], 1),
            (true, false, &[3, 64], 4),
            (true, true, &[1, 1, 64], 2),
        ] {
            let (m, n) = (13, 64);
            let w = randn(&[m, n], 0.3);
            let bias = with_bias.then(|| randn(&[m], 1.0));
            let weight = if packed {
                FrozenWeight::Packed(Arc::new(QTensor::quantize(&w, GgmlDType::Q8_0).unwrap()))
            } else {
                FrozenWeight::Dense(w.clone())
            };
            let x = randn(x_shape, 1.0);
            let a = randn(&[rank, n], 0.3);
            let b = randn(&[m, rank], 0.5);
            let mut rdims = x_shape.to_vec();
            *rdims.last_mut().unwrap() = m;
            let r = randn(&rdims, 1.0);
            let run = |dev: &Device, composed: bool| {
                let vars: Vec<Var> = [&x, &a, &b]
                    .iter()
                    .map(|t| Var::from_tensor(&t.to_device(dev).unwrap()).unwrap())
                    .collect();
                let wv = Var::from_tensor(&w.to_device(dev).unwrap()).unwrap();
                let weight = match &weight {
                    FrozenWeight::Dense(_) => FrozenWeight::Dense(wv.as_tensor().clone()),
                    p => p.clone(),
                };
                let bias = bias
                    .as_ref()
                    .map(|t| Var::from_tensor(&t.to_device(dev).unwrap()).unwrap());
                let f = if composed {
                    lora_linear_composed
                } else {
                    lora_linear
                };
                let (xt, at, bt) = (
                    vars[0].as_tensor(),
                    vars[1].as_tensor(),
                    vars[2].as_tensor(),
                );
                let y = f(
                    xt,
                    &weight,
                    bias.as_ref().map(|v| v.as_tensor()),
                    at,
                    bt,
                    1.7,
                )
                .unwrap();
                let g = (&y * r.to_device(dev).unwrap())
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                assert!(g.get(&wv).is_none(), "the frozen weight got a gradient");
                if let Some(bv) = &bias {
                    assert!(g.get(bv).is_none(), "the frozen bias got a gradient");
                }
                let cpu = |t: &Tensor| t.to_device(&Device::Cpu).unwrap();
                let grads: Vec<Tensor> = vars.iter().map(|v| cpu(g.get(v).unwrap())).collect();
                (cpu(&y), grads)
            };
            let (want, want_g) = run(&Device::Cpu, false);
            let mut got = vec![("composed".to_string(), run(&Device::Cpu, true))];
            for dev in crate::device::test_devices() {
                got.push((crate::device::label(&dev), run(&dev, false)));
            }
            for (label, (y, g)) in got {
                let e = rel(&y, &want);
                assert!(
                    e < 1e-5,
                    "packed {packed}, bias {with_bias}, {label}: output differs by {e}"
                );
                for (i, (a, b)) in g.iter().zip(&want_g).enumerate() {
                    let e = rel(a, b);
                    assert!(
                        e < 1e-4,
                        "packed {packed}, {label}: gradient {i} differs by {e}"
                    );
                }
            }
        }
    }
}

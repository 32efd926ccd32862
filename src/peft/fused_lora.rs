//! LoRA's forward in one op: `y = x·Wᵀ (+ b) + s·(x·Aᵀ)·Bᵀ`, with W frozen.
//!
//! Written as candle ops, the branch keeps three output-sized tensors alive until the backward
//! pass (`(x·Aᵀ)·Bᵀ`, its scaled copy, and the sum with the base output) beside the base output
//! itself; in a 30-layer language model with LoRA on q and v that is about 280 MB of a training
//! step's peak memory. [`lora_linear`] writes the output once (the base product, then the branch
//! accumulated onto it by gemm) and its backward recomputes `x·Aᵀ` (rank r, cheap). Gradients:
//! `dx = g·W + s·(g·B)·A`, `dA = s·(g·B)ᵀ·x`, `dB = s·gᵀ·(x·Aᵀ)`.

use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{CpuStorage, CustomOp3, Device, Layout, Result, Shape, Storage, Tensor};

use super::frozen::{
    frozen_product, frozen_product_no_grad, gemm_f32, gemm_f32_acc, matmul_no_grad,
};

/// A frozen weight W (out×in) as the fused CPU ops read it.
#[derive(Debug, Clone)]
pub(crate) enum FrozenWeight {
    /// W in f32.
    Dense(Tensor),
    /// W packed as stored (GGUF), dequantized per product.
    Packed(Arc<QTensor>),
}

impl FrozenWeight {
    /// W as an f32 tensor (a fresh one for a packed weight).
    fn dense(&self) -> Result<Tensor> {
        match self {
            FrozenWeight::Dense(w) => Ok(w.clone()),
            FrozenWeight::Packed(q) => q.dequantize(&Device::Cpu),
        }
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
        frozen_product_no_grad(&g.contiguous()?, &self.dense()?)
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
        let dx = (self.weight.input_grad(&g)? + (matmul_no_grad(&gb, a)? * self.scale)?)?;
        let da = (matmul_no_grad(&gb.t()?, x)? * self.scale)?;
        let h = matmul_no_grad(x, &a.t()?)?;
        let db = (matmul_no_grad(&g.t()?, &h)? * self.scale)?;
        Ok((Some(dx), Some(da), Some(db)))
    }
}

/// `x·Wᵀ (+ bias) + scale·(x·Aᵀ)·Bᵀ` for `x` of shape (…, in), f32 on the CPU; gradients
/// reach x, A and B (never W or the bias).
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
}

//! Building blocks of the generator: seeded initialisation, parameters, dense and
//! convolution layers, norms, attention and MLPs.

use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;

use crate::models::kit::{self, conv3x3};
use crate::models::ops::{gelu_erf, layer_norm, masked_softmax};
use crate::peft::AdaptedLinear;

use super::{Result, UnetError};

// ---------------------------------------------------------------------------------------------
// Building blocks
// ---------------------------------------------------------------------------------------------

/// One named parameter outside the linear layers.
#[derive(Debug, Clone)]
pub(crate) struct Param {
    pub(crate) name: String,
    pub(crate) t: Tensor,
    pub(crate) var: Option<Var>,
}

impl Param {
    pub(crate) fn make_trainable(&mut self) -> Result<(String, Var)> {
        let v = match &self.var {
            Some(v) => v.clone(),
            None => {
                let v = Var::from_tensor(&self.t.to_dtype(DType::F32)?)?;
                self.t = v.as_tensor().clone();
                self.var = Some(v.clone());
                v
            }
        };
        Ok((self.name.clone(), v))
    }
}

/// Seeded initialiser (deterministic order of calls gives deterministic weights).
pub(crate) struct Init {
    pub(crate) rng: StdRng,
    pub(crate) device: Device,
}

impl Init {
    pub(crate) fn normal(&mut self, name: String, dims: &[usize], std: f64) -> Result<Param> {
        self.param(name, dims, kit::Init::Normal(std))
    }

    pub(crate) fn constant(&mut self, name: String, dims: &[usize], value: f64) -> Result<Param> {
        self.param(name, dims, kit::Init::Constant(value))
    }

    /// A parameter drawn by the layer kit (one seeded draw per value, in order).
    fn param(&mut self, name: String, dims: &[usize], init: kit::Init) -> Result<Param> {
        let t = kit::draw(init, dims, &mut self.rng, &self.device)
            .map_err(|e| UnetError::Config(format!("{name}: {e}")))?;
        Ok(Param { name, t, var: None })
    }

    pub(crate) fn linear(&mut self, path: String, out: usize, inp: usize) -> Result<AdaptedLinear> {
        let w = self.normal(String::new(), &[out, inp], 1.0 / (inp as f64).sqrt())?;
        let b = Tensor::zeros(out, DType::F32, &self.device)?;
        Ok(AdaptedLinear::new(path, w.t, Some(b)))
    }

    pub(crate) fn dense(&mut self, path: &str, out: usize, inp: usize) -> Result<Dense> {
        Ok(Dense {
            w: self.normal(
                format!("{path}.weight"),
                &[out, inp],
                1.0 / (inp as f64).sqrt(),
            )?,
            b: self.constant(format!("{path}.bias"), &[out], 0.0)?,
        })
    }

    pub(crate) fn conv(
        &mut self,
        path: &str,
        out: usize,
        inp: usize,
        k: usize,
        stride: usize,
    ) -> Result<Conv> {
        Ok(Conv {
            w: self.normal(
                format!("{path}.weight"),
                &[out, inp, k, k],
                1.0 / ((inp * k * k) as f64).sqrt(),
            )?,
            b: self.constant(format!("{path}.bias"), &[out], 0.0)?,
            stride,
            padding: k / 2,
        })
    }

    pub(crate) fn group_norm(&mut self, path: &str, c: usize, groups: usize) -> Result<GroupNorm> {
        Ok(GroupNorm {
            w: self.constant(format!("{path}.weight"), &[c], 1.0)?,
            b: self.constant(format!("{path}.bias"), &[c], 0.0)?,
            groups,
        })
    }

    pub(crate) fn layer_norm(&mut self, path: &str, d: usize) -> Result<Ln> {
        Ok(Ln {
            w: self.constant(format!("{path}.weight"), &[d], 1.0)?,
            b: self.constant(format!("{path}.bias"), &[d], 0.0)?,
        })
    }
}

/// Visits parameters and linear layers of a module tree.
pub(crate) trait Module {
    fn params<'a>(&'a self, out: &mut Vec<&'a Param>);
    fn params_mut<'a>(&'a mut self, out: &mut Vec<&'a mut Param>);
    fn lin<'a>(&'a self, _out: &mut Vec<&'a AdaptedLinear>) {}
    fn lin_mut<'a>(&'a mut self, _out: &mut Vec<&'a mut AdaptedLinear>) {}
}

macro_rules! params_of {
    ($($f:ident),*) => {
        fn params<'a>(&'a self, out: &mut Vec<&'a Param>) {
            $( out.push(&self.$f); )*
        }
        fn params_mut<'a>(&'a mut self, out: &mut Vec<&'a mut Param>) {
            $( out.push(&mut self.$f); )*
        }
    };
}

#[derive(Debug, Clone)]
pub(crate) struct Dense {
    pub(crate) w: Param,
    pub(crate) b: Param,
}

impl Dense {
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.matmul(&self.w.t.t()?)?.broadcast_add(&self.b.t)?)
    }
}

impl Module for Dense {
    params_of!(w, b);
}

#[derive(Debug, Clone)]
pub(crate) struct Conv {
    pub(crate) w: Param,
    pub(crate) b: Param,
    pub(crate) stride: usize,
    pub(crate) padding: usize,
}

impl Conv {
    /// Convolution as im2col + matmul (shifted views of the padded input, concatenated along
    /// channels): its backward is matmuls and slices, much faster on CPU than candle's
    /// transposed-convolution backward. Output side `(H + 2p − k)/s + 1`.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (o, i, k, _) = self.w.t.dims4()?;
        let (b, c, h, w) = x.dims4()?;
        if c != i {
            return Err(UnetError::Shape(format!(
                "conv expects {i} channels, got {:?}",
                x.dims()
            )));
        }
        let (s, p) = (self.stride, self.padding);
        if k == 3 && s == 1 && p == 1 {
            // Channels-last im2col kernel (one gather, its backward one scatter) instead of
            // nine shifted copies and their concatenation.
            let xl = x.permute((0, 2, 3, 1))?.contiguous()?;
            let wmat = self.w.t.permute((0, 2, 3, 1))?.reshape((o, 9 * i))?;
            let y = conv3x3(&xl, &wmat.t()?)?.broadcast_add(&self.b.t)?;
            return Ok(y
                .reshape((b, h, w, o))?
                .permute((0, 3, 1, 2))?
                .contiguous()?);
        }
        let ho = (h + 2 * p - k) / s + 1;
        let wo = (w + 2 * p - k) / s + 1;
        let cols = if k == 1 && s == 1 && p == 0 {
            x.reshape((b, c, h * w))?
        } else {
            let xp = x.pad_with_zeros(2, p, p + s)?.pad_with_zeros(3, p, p + s)?;
            let mut shifted = Vec::with_capacity(k * k);
            for dy in 0..k {
                for dx in 0..k {
                    let v = xp.narrow(2, dy, s * ho)?.narrow(3, dx, s * wo)?;
                    let v = if s == 1 {
                        v
                    } else {
                        v.reshape((b, c, ho, s, wo, s))?
                            .narrow(3, 0, 1)?
                            .narrow(5, 0, 1)?
                    };
                    shifted.push(v.reshape((b, c, ho * wo))?);
                }
            }
            Tensor::cat(&shifted, 1)?
        };
        let wmat = self.w.t.permute((0, 2, 3, 1))?.reshape((o, k * k * i))?;
        let y = wmat.broadcast_matmul(&cols)?.reshape((b, o, ho, wo))?;
        Ok(y.broadcast_add(&self.b.t.reshape((1, o, 1, 1))?)?)
    }
}

impl Module for Conv {
    params_of!(w, b);
}

#[derive(Debug, Clone)]
pub(crate) struct GroupNorm {
    pub(crate) w: Param,
    pub(crate) b: Param,
    pub(crate) groups: usize,
}

impl GroupNorm {
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let g = self.groups;
        // Group norm = layer norm over each group's values (the fused kernel, with its one-pass
        // backward), then the per-channel affine.
        let n = (c / g) * h * w;
        let ones = Tensor::ones(n, x.dtype(), x.device())?;
        let zeros = Tensor::zeros(n, x.dtype(), x.device())?;
        let xn = layer_norm(&x.reshape((b, g, n))?, &ones, &zeros, 1e-5)?.reshape((b, c, h, w))?;
        Ok(xn
            .broadcast_mul(&self.w.t.reshape((1, c, 1, 1))?)?
            .broadcast_add(&self.b.t.reshape((1, c, 1, 1))?)?)
    }
}

impl Module for GroupNorm {
    params_of!(w, b);
}

#[derive(Debug, Clone)]
pub(crate) struct Ln {
    pub(crate) w: Param,
    pub(crate) b: Param,
}

impl Ln {
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(layer_norm(x, &self.w.t, &self.b.t, 1e-5)?)
    }
}

impl Module for Ln {
    params_of!(w, b);
}

/// `(1 − mask)·(−1e9)`: the additive attention bias of a (B, T) 0/1 mask.
pub(crate) fn mask_bias(mask: &Tensor) -> Result<Tensor> {
    Ok(((mask.ones_like()? - mask)? * -1e9)?)
}

/// Multi-head attention with four [`AdaptedLinear`] projections.
#[derive(Debug, Clone)]
pub(crate) struct Attention {
    pub(crate) q: AdaptedLinear,
    pub(crate) k: AdaptedLinear,
    pub(crate) v: AdaptedLinear,
    pub(crate) o: AdaptedLinear,
    pub(crate) heads: usize,
}

impl Attention {
    pub(crate) fn new(
        init: &mut Init,
        path: &str,
        names: [&str; 4],
        dim: usize,
        ctx: usize,
        heads: usize,
    ) -> Result<Self> {
        Ok(Self {
            q: init.linear(format!("{path}.{}", names[0]), dim, dim)?,
            k: init.linear(format!("{path}.{}", names[1]), dim, ctx)?,
            v: init.linear(format!("{path}.{}", names[2]), dim, ctx)?,
            o: init.linear(format!("{path}.{}", names[3]), dim, dim)?,
            heads,
        })
    }

    /// `x` (B, N, C) attends to `ctx` (B, T, D); `bias` (B, T) masks keys.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        ctx: &Tensor,
        bias: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        let t = ctx.dim(1)?;
        let h = self.heads;
        let dh = c / h;
        let split = |y: Tensor, len: usize| -> Result<Tensor> {
            Ok(y.reshape((b, len, h, dh))?.transpose(1, 2)?.contiguous()?)
        };
        let q = split(self.q.forward_t(x, train)?, n)?;
        let k = split(self.k.forward_t(ctx, train)?, t)?;
        let v = split(self.v.forward_t(ctx, train)?, t)?;
        let scores = q.matmul(&k.transpose(2, 3)?.contiguous()?)?;
        let probs = masked_softmax(&scores, bias, 1.0 / (dh as f64).sqrt())?;
        let o = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, n, c))?;
        Ok(self.o.forward_t(&o, train)?)
    }
}

impl Module for Attention {
    fn params<'a>(&'a self, _out: &mut Vec<&'a Param>) {}
    fn params_mut<'a>(&'a mut self, _out: &mut Vec<&'a mut Param>) {}
    fn lin<'a>(&'a self, out: &mut Vec<&'a AdaptedLinear>) {
        out.extend([&self.q, &self.k, &self.v, &self.o]);
    }
    fn lin_mut<'a>(&'a mut self, out: &mut Vec<&'a mut AdaptedLinear>) {
        out.extend([&mut self.q, &mut self.k, &mut self.v, &mut self.o]);
    }
}

/// A two-layer GELU MLP of [`AdaptedLinear`]s.
#[derive(Debug, Clone)]
pub(crate) struct Mlp {
    pub(crate) fc1: AdaptedLinear,
    pub(crate) fc2: AdaptedLinear,
}

impl Mlp {
    pub(crate) fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let h = gelu_erf(&self.fc1.forward_t(x, train)?)?;
        Ok(self.fc2.forward_t(&h, train)?)
    }
}

impl Module for Mlp {
    fn params<'a>(&'a self, _out: &mut Vec<&'a Param>) {}
    fn params_mut<'a>(&'a mut self, _out: &mut Vec<&'a mut Param>) {}
    fn lin<'a>(&'a self, out: &mut Vec<&'a AdaptedLinear>) {
        out.extend([&self.fc1, &self.fc2]);
    }
    fn lin_mut<'a>(&'a mut self, out: &mut Vec<&'a mut AdaptedLinear>) {
        out.extend([&mut self.fc1, &mut self.fc2]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// Every convolution shape the generator and its codec use (3 × 3 stride 1 on the im2col
    /// kernel, stride 2 and 1 × 1 on the shifted-view path) equals candle's `conv2d`, forward and
    /// gradients of input, weight and bias.
    #[test]
    fn conv_equals_candle_conv2d_with_gradients() {
        let dev = Device::Cpu;
        let mut init = Init {
            rng: StdRng::seed_from_u64(1),
            device: dev.clone(),
        };
        for (k, stride, side) in [(3, 1, 6), (3, 2, 8), (1, 1, 5)] {
            let mut conv = init.conv("c", 5, 3, k, stride).unwrap();
            conv.b.t = init.normal("b".into(), &[5], 0.5).unwrap().t;
            let (_, w) = conv.w.make_trainable().unwrap();
            let (_, b) = conv.b.make_trainable().unwrap();
            let x = Var::from_tensor(&init.normal("x".into(), &[2, 3, side, side], 1.0).unwrap().t)
                .unwrap();
            let ours = conv.forward(x.as_tensor()).unwrap();
            let reference = x
                .as_tensor()
                .conv2d(w.as_tensor(), k / 2, stride, 1, 1)
                .unwrap()
                .broadcast_add(&b.as_tensor().reshape((1, 5, 1, 1)).unwrap())
                .unwrap();
            assert_eq!(ours.dims(), reference.dims(), "k {k} stride {stride}");
            let probe = init.normal("p".into(), ours.dims(), 1.0).unwrap().t;
            let g1 = (&ours * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let g2 = (&reference * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let close = |a: &Tensor, b: &Tensor, what: &str| {
                let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
                let d = d.to_scalar::<f32>().unwrap();
                assert!(d < 1e-4, "k {k} stride {stride} {what}: {d}");
            };
            close(&ours, &reference, "output");
            for (v, what) in [(&x, "dx"), (&w, "dw"), (&b, "db")] {
                close(
                    g1.get(v.as_tensor()).unwrap(),
                    g2.get(v.as_tensor()).unwrap(),
                    what,
                );
            }
        }
    }
}

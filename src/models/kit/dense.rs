//! The dense layer `y = x·W + b`, built from a [`ParamSource`].

use candle_core::Tensor;

use super::Result;
use super::init::{Init, ParamSource};

/// How a dense layer's tensors are named and laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DenseLayout {
    /// `{name}.w` of shape (in, out) and `{name}.b`: `y = x·W + b` (the hypernetwork's).
    InOut,
    /// `{name}.weight` of shape (out, in) and `{name}.bias`: `y = x·Wᵀ + b` (PyTorch's
    /// `nn.Linear`, the UNet's).
    Torch,
}

impl DenseLayout {
    fn names(self, name: &str) -> (String, String) {
        match self {
            DenseLayout::InOut => (format!("{name}.w"), format!("{name}.b")),
            DenseLayout::Torch => (format!("{name}.weight"), format!("{name}.bias")),
        }
    }
}

/// A dense layer: weight and bias, with the name its tensors are stored under.
#[derive(Clone, Debug)]
pub struct Dense {
    name: String,
    layout: DenseLayout,
    w: Tensor,
    b: Tensor,
}

impl Dense {
    /// Asks `src` for the layer `name` (`fan_in` → `fan_out`): the weight first, normal with std
    /// `gain / √fan_in` ([`Init::scaled`]), then the bias, zeros.
    pub fn build(
        src: &mut dyn ParamSource,
        name: &str,
        fan_in: usize,
        fan_out: usize,
        gain: f64,
        layout: DenseLayout,
    ) -> Result<Self> {
        let (wn, bn) = layout.names(name);
        let dims = match layout {
            DenseLayout::InOut => [fan_in, fan_out],
            DenseLayout::Torch => [fan_out, fan_in],
        };
        let w = src.param(&wn, &dims, Init::scaled(gain, fan_in))?;
        let b = src.param(&bn, &[fan_out], Init::ZEROS)?;
        Ok(Self {
            name: name.to_string(),
            layout,
            w,
            b,
        })
    }

    /// `x·W + b` for `x` of shape (B, in).
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self.layout {
            DenseLayout::InOut => x.matmul(&self.w)?.broadcast_add(&self.b),
            DenseLayout::Torch => x.matmul(&self.w.t()?)?.broadcast_add(&self.b),
        }
    }

    /// The weight, as stored.
    pub fn weight(&self) -> &Tensor {
        &self.w
    }

    /// The bias.
    pub fn bias(&self) -> &Tensor {
        &self.b
    }

    /// Appends the weight and the bias, by their stored names, to `out`.
    pub fn push_named(&self, out: &mut Vec<(String, Tensor)>) {
        let (wn, bn) = self.layout.names(&self.name);
        out.push((wn, self.w.clone()));
        out.push((bn, self.b.clone()));
    }

    /// The same layer cut from the autograd graph (what a trained model keeps).
    pub fn detach(&self) -> Self {
        Self {
            name: self.name.clone(),
            layout: self.layout,
            w: self.w.detach(),
            b: self.b.detach(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::kit::Fresh;
    use candle_core::Device;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn both_layouts_compute_the_same_map() {
        let dev = Device::Cpu;
        let mut rng = StdRng::seed_from_u64(3);
        let mut fresh = Fresh::frozen(&mut rng, &dev);
        let a = Dense::build(&mut fresh, "a", 5, 3, 1.0, DenseLayout::InOut).unwrap();
        let mut rng = StdRng::seed_from_u64(3);
        let mut fresh = Fresh::frozen(&mut rng, &dev);
        let t = Dense::build(&mut fresh, "t", 5, 3, 1.0, DenseLayout::Torch).unwrap();
        assert_eq!(a.weight().dims(), &[5, 3]);
        assert_eq!(t.weight().dims(), &[3, 5]);
        let mut named = Vec::new();
        a.push_named(&mut named);
        t.push_named(&mut named);
        let names: Vec<&str> = named.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["a.w", "a.b", "t.weight", "t.bias"]);
        // With the Torch layer's weight set to the transpose, the outputs agree.
        let t = Dense {
            w: a.weight().t().unwrap().contiguous().unwrap(),
            ..t
        };
        let x = Tensor::arange(0f32, 10.0, &dev)
            .unwrap()
            .reshape((2, 5))
            .unwrap();
        let (ya, yt) = (a.forward(&x).unwrap(), t.forward(&x).unwrap());
        let d = (ya - yt).unwrap().abs().unwrap().max_all().unwrap();
        assert!(d.to_scalar::<f32>().unwrap() < 1e-5);
        assert!(
            a.detach()
                .bias()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .all(|&v| v == 0.0)
        );
    }
}

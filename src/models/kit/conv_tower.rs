//! The small convolutional network of the identity encoders and the attribute reader.

use candle_core::Tensor;

use super::im2col::conv3x3;
use super::init::{Init, ParamSource};
use super::{KitError, Result};
use crate::models::ops::{gelu_erf, layer_norm};

/// Layer-norm epsilon of every norm of the tower.
const LN_EPS: f64 = 1e-5;

/// A convolutional network on channels-last (B, S, S, 3) images: `stages` stages, each a 3×3
/// convolution ([`conv3x3`]), a layer norm over the channels, GELU and a 2×2 average pool
/// (stage `i` has `width·2^i` channels), then the flattened (S/2^stages)² map projected to
/// `hidden` features (layer norm, GELU) and to `outputs`.
///
/// Its weights, in order: `stage{i}.conv.weight` (9·C_in, C), `stage{i}.conv.bias`,
/// `stage{i}.norm.weight`, `stage{i}.norm.bias` per stage, then `head.fc1.weight`,
/// `head.fc1.bias`, `head.norm.weight`, `head.norm.bias`, `head.{output}.weight`,
/// `head.{output}.bias`. Matrices start He-normal (gain 2 before a GELU, 1 for the output
/// layer; the fan-in is the number of rows), norm weights at 1, biases at 0.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConvTower {
    /// Side of the (square) input images, a multiple of `2^stages`.
    pub image_size: usize,
    /// Channels of the first stage.
    pub width: usize,
    /// Convolution stages (each halves the resolution).
    pub stages: usize,
    /// Features of the hidden layer.
    pub hidden: usize,
    /// Width of the output.
    pub outputs: usize,
    /// Name of the output layer (`head.{output}.*`).
    pub output: &'static str,
}

impl ConvTower {
    /// Channels of stage `i`.
    pub fn stage_channels(&self, i: usize) -> usize {
        self.width << i
    }

    /// Name, shape and initialisation of every weight, in the network's order.
    pub fn param_specs(&self) -> Vec<(String, Vec<usize>, Init)> {
        let mut v = Vec::new();
        let mut cin = 3;
        for i in 0..self.stages {
            let c = self.stage_channels(i);
            v.push((
                format!("stage{i}.conv.weight"),
                vec![9 * cin, c],
                Init::he(2.0, 9 * cin),
            ));
            v.push((format!("stage{i}.conv.bias"), vec![c], Init::ZEROS));
            v.push((format!("stage{i}.norm.weight"), vec![c], Init::ONES));
            v.push((format!("stage{i}.norm.bias"), vec![c], Init::ZEROS));
            cin = c;
        }
        let side = self.image_size >> self.stages;
        let flat = side * side * cin;
        let (h, out) = (self.hidden, self.outputs);
        v.push(("head.fc1.weight".into(), vec![flat, h], Init::he(2.0, flat)));
        v.push(("head.fc1.bias".into(), vec![h], Init::ZEROS));
        v.push(("head.norm.weight".into(), vec![h], Init::ONES));
        v.push(("head.norm.bias".into(), vec![h], Init::ZEROS));
        let o = self.output;
        v.push((format!("head.{o}.weight"), vec![h, out], Init::he(1.0, h)));
        v.push((format!("head.{o}.bias"), vec![out], Init::ZEROS));
        v
    }

    /// Asks `src` for every weight, in order.
    pub fn build(&self, src: &mut dyn ParamSource) -> Result<Vec<Tensor>> {
        self.param_specs()
            .into_iter()
            .map(|(name, dims, init)| src.param(&name, &dims, init))
            .collect()
    }

    /// The weights `params` (in [`param_specs`](Self::param_specs) order) by name.
    pub fn named(&self, params: &[Tensor]) -> Vec<(String, Tensor)> {
        self.param_specs()
            .into_iter()
            .zip(params)
            .map(|((name, _, _), t)| (name, t.clone()))
            .collect()
    }

    /// Outputs (B, `outputs`) of channels-last images `x` (B, S, S, 3), with the weights
    /// `params` in [`param_specs`](Self::param_specs) order.
    pub fn forward(&self, params: &[Tensor], x: &Tensor) -> Result<Tensor> {
        let want = 4 * self.stages + 6;
        if params.len() != want {
            return Err(KitError::Input(format!(
                "the network has {} weights, expected {want}",
                params.len()
            )));
        }
        let (b, _, _, _) = x.dims4()?;
        let mut x = x.clone();
        let mut side = self.image_size;
        for (i, p) in params[..4 * self.stages].chunks(4).enumerate() {
            let c = self.stage_channels(i);
            let y = conv3x3(&x, &p[0])?.broadcast_add(&p[1])?;
            let y = gelu_erf(&layer_norm(&y, &p[2], &p[3], LN_EPS)?)?;
            let half = side / 2;
            x = (y.reshape((b, half, 2, half, 2, c))?.sum(4)?.sum(2)? * 0.25)?;
            side = half;
        }
        let p = &params[4 * self.stages..];
        let flat = x.reshape((b, ()))?;
        let h = flat.matmul(&p[0])?.broadcast_add(&p[1])?;
        let h = gelu_erf(&layer_norm(&h, &p[2], &p[3], LN_EPS)?)?;
        Ok(h.matmul(&p[4])?.broadcast_add(&p[5])?)
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
    fn a_fresh_tower_runs_and_is_seeded() {
        let tower = ConvTower {
            image_size: 8,
            width: 4,
            stages: 2,
            hidden: 6,
            outputs: 5,
            output: "out",
        };
        let specs = tower.param_specs();
        assert_eq!(specs.len(), 14);
        assert_eq!(specs[4].1, vec![36, 8]);
        assert_eq!(
            specs[8],
            ("head.fc1.weight".into(), vec![32, 6], Init::he(2.0, 32))
        );
        assert_eq!(specs[12].0, "head.out.weight");
        let make = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            tower
                .build(&mut Fresh::frozen(&mut rng, &Device::Cpu))
                .unwrap()
        };
        let p = make(1);
        let x = Tensor::ones((3, 8, 8, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
        let y = tower.forward(&p, &x).unwrap();
        assert_eq!(y.dims(), &[3, 5]);
        let again = tower.forward(&make(1), &x).unwrap();
        let other = tower.forward(&make(2), &x).unwrap();
        let diff = |a: &Tensor, b: &Tensor| {
            let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
            d.to_scalar::<f32>().unwrap()
        };
        assert_eq!(diff(&y, &again), 0.0);
        assert!(diff(&y, &other) > 0.0);
        assert_eq!(tower.named(&p)[13].0, "head.out.bias");
        assert!(tower.forward(&p[..13], &x).is_err());
    }
}

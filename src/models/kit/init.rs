//! Seeded initial values, and the sources a model's parameters come from while it is built.
//!
//! A model is built by asking a [`ParamSource`] for each parameter by name, shape and [`Init`],
//! in a fixed order. [`Fresh`] draws new values from the caller's seeded generator (one `f32`
//! standard-normal draw per value, in order, so the same seed gives the same model); a saved
//! file ([`ModelFile`](super::ModelFile)) hands back the stored tensor after checking it. The
//! same builder therefore serves training and loading, and the names can never disagree.

use candle_core::{Device, Tensor, Var};
use rand::Rng;
use rand_distr::{Distribution, Normal};

use super::{KitError, Result};

/// How a parameter starts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// Every value equal to this one.
    Constant(f64),
    /// Independent draws from N(0, std²), the std given here.
    Normal(f64),
}

impl Init {
    /// All zeros (biases).
    pub const ZEROS: Init = Init::Constant(0.0);
    /// All ones (norm weights).
    pub const ONES: Init = Init::Constant(1.0);

    /// Normal with std `gain / √fan_in` (the hypernetwork's and the UNet's dense layers).
    pub fn scaled(gain: f64, fan_in: usize) -> Init {
        Init::Normal(gain / (fan_in.max(1) as f64).sqrt())
    }

    /// Normal with std `√(gain / fan_in)`: He's initialisation with gain 2 (the layers of the
    /// identity encoders and the attribute reader before a GELU), gain 1 for an output layer.
    pub fn he(gain: f64, fan_in: usize) -> Init {
        Init::Normal((gain / fan_in.max(1) as f64).sqrt())
    }
}

/// `n` draws from N(0, std²) as `f32`, in order (`std` finite and ≥ 0).
pub fn normal_values<R: Rng + ?Sized>(rng: &mut R, n: usize, std: f64) -> Result<Vec<f32>> {
    if !(std.is_finite() && std >= 0.0) {
        return Err(KitError::Init(format!(
            "the std of a normal must be finite and ≥ 0, got {std}"
        )));
    }
    let d = Normal::new(0.0f32, std as f32)
        .map_err(|e| KitError::Init(format!("normal with std {std}: {e}")))?;
    Ok((0..n).map(|_| d.sample(rng)).collect())
}

/// An f32 tensor of shape `dims` on `device` that starts as `init` says; normal values are
/// drawn from `rng` (constants draw nothing).
pub fn draw<R: Rng + ?Sized>(
    init: Init,
    dims: &[usize],
    rng: &mut R,
    device: &Device,
) -> Result<Tensor> {
    Ok(match init {
        Init::Constant(v) => Tensor::full(v as f32, dims, device)?,
        Init::Normal(std) => {
            let n = dims.iter().product();
            Tensor::from_vec(normal_values(rng, n, std)?, dims, device)?
        }
    })
}

/// Where a model's parameters come from while it is built: fresh seeded values ([`Fresh`]) or
/// a saved file ([`ModelFile`](super::ModelFile)).
pub trait ParamSource {
    /// The parameter `name` of shape `dims`, starting as `init` says (a file ignores `init`,
    /// checks the stored tensor's shape and values and returns it as f32).
    fn param(&mut self, name: &str, dims: &[usize], init: Init) -> Result<Tensor>;
}

/// Fresh parameters drawn from a seeded generator in the order they are asked for. Trainable
/// ones ([`Fresh::trainable`]) are [`Var`]s, collected for the optimiser.
pub struct Fresh<'r, R: ?Sized> {
    rng: &'r mut R,
    device: Device,
    trainable: bool,
    vars: Vec<(String, Var)>,
}

impl<'r, R: Rng + ?Sized> Fresh<'r, R> {
    /// Trainable parameters on `device`, drawn from `rng`.
    pub fn trainable(rng: &'r mut R, device: &Device) -> Self {
        Self {
            rng,
            device: device.clone(),
            trainable: true,
            vars: Vec::new(),
        }
    }

    /// Plain tensors (not variables) on `device`, drawn from `rng`.
    pub fn frozen(rng: &'r mut R, device: &Device) -> Self {
        Self {
            trainable: false,
            ..Self::trainable(rng, device)
        }
    }

    /// The generator the values are drawn from (to draw something else in between).
    pub fn rng(&mut self) -> &mut R {
        self.rng
    }

    /// The trainable variables made so far, by name, in the order they were asked for.
    pub fn named_vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// The trainable variables, in the order they were asked for (what the optimiser takes);
    /// the generator is free again.
    pub fn into_vars(self) -> Vec<Var> {
        self.vars.into_iter().map(|(_, v)| v).collect()
    }
}

impl<R: Rng + ?Sized> ParamSource for Fresh<'_, R> {
    fn param(&mut self, name: &str, dims: &[usize], init: Init) -> Result<Tensor> {
        let t = draw(init, dims, self.rng, &self.device)
            .map_err(|e| KitError::Init(format!("`{name}`: {e}")))?;
        if !self.trainable {
            return Ok(t);
        }
        let v = Var::from_tensor(&t)?;
        let t = v.as_tensor().clone();
        self.vars.push((name.to_string(), v));
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;
    use rand_distr::StandardNormal;

    #[test]
    fn seeded_init_is_reproducible_and_scaled() {
        let dev = Device::Cpu;
        let build = |seed: u64| {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut fresh = Fresh::trainable(&mut rng, &dev);
            let w = fresh.param("w", &[64, 32], Init::scaled(2.0, 64)).unwrap();
            let b = fresh.param("b", &[32], Init::ZEROS).unwrap();
            let n = fresh.param("n", &[32], Init::ONES).unwrap();
            let names: Vec<String> = fresh.named_vars().iter().map(|(n, _)| n.clone()).collect();
            assert_eq!(names, ["w", "b", "n"]);
            assert_eq!(fresh.into_vars().len(), 3);
            (
                w.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                b.to_vec1::<f32>().unwrap(),
                n.to_vec1::<f32>().unwrap(),
            )
        };
        let (w1, b1, n1) = build(7);
        let (w2, _, _) = build(7);
        let (w3, _, _) = build(8);
        assert_eq!(w1, w2, "same seed, same values");
        assert_ne!(w1, w3, "another seed, other values");
        assert!(b1.iter().all(|&v| v == 0.0) && n1.iter().all(|&v| v == 1.0));
        let std = (w1.iter().map(|v| v * v).sum::<f32>() / w1.len() as f32).sqrt();
        let want = 2.0 / 8.0;
        assert!((std - want).abs() < 0.02, "std {std}, expected {want}");

        // The values are the generator's standard-normal draws times the std, in order (what
        // the hypernetwork drew before the kit, and what `normal_values` draws).
        let mut rng = StdRng::seed_from_u64(7);
        let scale = (2.0 / 64f64.sqrt()) as f32;
        for v in &w1 {
            let z: f32 = rng.sample(StandardNormal);
            assert_eq!(*v, z * scale);
        }
        let mut rng = StdRng::seed_from_u64(7);
        assert_eq!(normal_values(&mut rng, w1.len(), 0.25).unwrap(), w1);
        assert_eq!(Init::he(2.0, 8), Init::Normal(0.5));

        // Frozen parameters are plain tensors; a bad std is an error naming the parameter.
        let mut rng = StdRng::seed_from_u64(1);
        let mut frozen = Fresh::frozen(&mut rng, &dev);
        let t = frozen.param("x", &[2, 2], Init::Normal(1.0)).unwrap();
        assert!(!t.is_variable());
        let err = frozen.param("bad", &[2], Init::Normal(-1.0)).unwrap_err();
        assert!(err.to_string().contains("`bad`"), "{err}");
        assert!(frozen.into_vars().is_empty());
    }
}

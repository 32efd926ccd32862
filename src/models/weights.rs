//! Reading weights by name from safetensors files, with shape checks and, for modules a
//! checkpoint lacks, seeded initialisation.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};

use super::ModelError;
use crate::device::HOST;
use crate::peft::PackedWeight;

/// How a parameter is initialised when the checkpoint lacks it.
#[derive(Debug, Clone, Copy)]
pub enum Fill {
    /// N(0, σ²) with the config's `initializer_range` σ.
    Normal,
    /// Zeros (biases).
    Zeros,
    /// Ones (layer-norm weights).
    Ones,
}

/// Weights of one checkpoint (or none: everything initialised), looked up by name.
pub struct WeightReader {
    tensors: HashMap<String, Tensor>,
    file: String,
    /// Prefix the checkpoint uses for the backbone (`bert.`, `roberta.`, `vit.`, or none).
    ckpt_prefix: String,
    /// Prefix this project uses for the backbone.
    own_prefix: String,
    rng: rand::rngs::StdRng,
    std: f32,
    device: Device,
    /// Names that were initialised rather than loaded.
    pub initialised: Vec<String>,
    /// Weights kept as stored (quantized), taken by [`take_packed`](Self::take_packed).
    packed: HashMap<String, PackedWeight>,
}

impl WeightReader {
    /// Adds weights kept packed as stored (a GGUF file's quantized linears), read by
    /// [`take_packed`](Self::take_packed) instead of [`get`](Self::get).
    pub fn with_packed(mut self, packed: HashMap<String, PackedWeight>) -> Self {
        self.packed = packed;
        self
    }

    /// The packed weight `name`, if there is one, checked against `dims`.
    pub fn take_packed(
        &mut self,
        name: &str,
        dims: (usize, usize),
    ) -> Result<Option<PackedWeight>, ModelError> {
        let Some(mut p) = self.packed.remove(name) else {
            return Ok(None);
        };
        if !self.device.is_cpu() {
            p = packed_onto(&p, &self.device)?;
        }
        if p.dims() != dims {
            return Err(ModelError::Weights {
                file: self.file.clone(),
                problem: format!(
                    "tensor `{name}` has shape {:?}, expected {dims:?}",
                    p.dims()
                ),
            });
        }
        Ok(Some(p))
    }

    /// Reads `file`; the backbone's names are looked up with `own_prefix` or without it.
    pub fn open(
        file: &Path,
        own_prefix: &str,
        std: f32,
        seed: u64,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let tensors =
            candle_core::safetensors::load(file, &HOST).map_err(|e| ModelError::File {
                path: file.display().to_string(),
                reason: format!("cannot read the weights: {e}"),
            })?;
        check_finite(&tensors, file)?;
        let probe = ["embeddings.word_embeddings.weight", "embeddings.cls_token"];
        let ckpt_prefix = if probe
            .iter()
            .any(|p| tensors.contains_key(&format!("{own_prefix}{p}")))
        {
            own_prefix.to_string()
        } else if probe.iter().any(|p| tensors.contains_key(*p)) {
            String::new()
        } else {
            return Err(ModelError::Weights {
                file: file.display().to_string(),
                problem: format!(
                    "no embeddings found under `{own_prefix}embeddings.` or `embeddings.`: not a checkpoint of this architecture"
                ),
            });
        };
        Ok(Self {
            tensors,
            file: file.display().to_string(),
            ckpt_prefix,
            own_prefix: own_prefix.into(),
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            std,
            device: device.clone(),
            initialised: Vec::new(),
            packed: HashMap::new(),
        })
    }

    /// Tensors already read (`file` names them in errors), looked up by their exact names:
    /// for checkpoints whose names need no prefix mapping (the LLaMA family's `model.…`).
    pub fn from_tensors(
        tensors: HashMap<String, Tensor>,
        file: &Path,
        std: f32,
        seed: u64,
        device: &Device,
    ) -> Result<Self, ModelError> {
        check_finite(&tensors, file)?;
        Ok(Self {
            tensors,
            file: file.display().to_string(),
            ckpt_prefix: String::new(),
            own_prefix: String::new(),
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            std,
            device: device.clone(),
            initialised: Vec::new(),
            packed: HashMap::new(),
        })
    }

    /// No checkpoint: every parameter is initialised (a model from its config alone).
    pub fn random(own_prefix: &str, std: f32, seed: u64, device: &Device) -> Self {
        Self {
            tensors: HashMap::new(),
            file: "(random initialisation)".into(),
            ckpt_prefix: own_prefix.into(),
            own_prefix: own_prefix.into(),
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            std,
            device: device.clone(),
            initialised: Vec::new(),
            packed: HashMap::new(),
        }
    }

    /// Whether the reader holds a checkpoint.
    pub fn has_checkpoint(&self) -> bool {
        !self.tensors.is_empty()
    }

    fn stored_name(&self, name: &str) -> String {
        match name.strip_prefix(&self.own_prefix) {
            Some(rest) if !self.own_prefix.is_empty() => format!("{}{rest}", self.ckpt_prefix),
            _ => name.to_string(),
        }
    }

    fn fill(&mut self, dims: &[usize], fill: Fill) -> Result<Tensor, ModelError> {
        Ok(match fill {
            Fill::Zeros => Tensor::zeros(dims, DType::F32, &self.device)?,
            Fill::Ones => Tensor::ones(dims, DType::F32, &self.device)?,
            Fill::Normal => {
                let n: usize = dims.iter().product();
                let d = Normal::new(0.0f32, self.std).map_err(|e| ModelError::Weights {
                    file: self.file.clone(),
                    problem: format!("initializer_range: {e}"),
                })?;
                let v: Vec<f32> = (0..n).map(|_| d.sample(&mut self.rng)).collect();
                Tensor::from_vec(v, dims, &self.device)?
            }
        })
    }

    /// A backbone parameter: required when a checkpoint is open.
    pub fn get(&mut self, name: &str, dims: &[usize], fill: Fill) -> Result<Tensor, ModelError> {
        if !self.has_checkpoint() {
            self.initialised.push(name.into());
            return self.fill(dims, fill);
        }
        self.lookup(name, dims)?.ok_or_else(|| ModelError::Weights {
            file: self.file.clone(),
            problem: format!("tensor `{}` is missing", self.stored_name(name)),
        })
    }

    /// An optional parameter (a head, BERT's pooler): loaded when present with the right
    /// shape, otherwise initialised and recorded in [`initialised`](Self::initialised).
    /// `fresh` always initialises.
    pub fn get_or_init(
        &mut self,
        name: &str,
        dims: &[usize],
        fill: Fill,
        fresh: bool,
    ) -> Result<Tensor, ModelError> {
        if !fresh
            && let Some(t) = self.tensors.get(&self.stored_name(name))
            && t.dims() == dims
        {
            self.check_dtype(&self.stored_name(name), t)?;
            return Ok(t.to_dtype(DType::F32)?.to_device(&self.device)?);
        }
        self.initialised.push(name.into());
        self.fill(dims, fill)
    }

    fn lookup(&self, name: &str, dims: &[usize]) -> Result<Option<Tensor>, ModelError> {
        let stored = self.stored_name(name);
        let Some(t) = self.tensors.get(&stored) else {
            return Ok(None);
        };
        if t.dims() != dims {
            return Err(ModelError::Weights {
                file: self.file.clone(),
                problem: format!(
                    "tensor `{stored}` has shape {:?}, the config says {dims:?}",
                    t.dims()
                ),
            });
        }
        self.check_dtype(&stored, t)?;
        Ok(Some(t.to_dtype(DType::F32)?.to_device(&self.device)?))
    }

    fn check_dtype(&self, stored: &str, t: &Tensor) -> Result<(), ModelError> {
        if t.dtype().is_float() {
            return Ok(());
        }
        Err(ModelError::Weights {
            file: self.file.clone(),
            problem: format!(
                "tensor `{stored}` is stored as {:?}; weights must be floating point (f32, f16, bf16 or f64)",
                t.dtype()
            ),
        })
    }
}

/// A packed weight's bytes copied onto `device`, where candle's quantized kernels multiply
/// them.
fn packed_onto(p: &PackedWeight, device: &Device) -> candle_core::Result<PackedWeight> {
    use candle_core::quantized::{QStorage, QTensor};
    let q = p.shared();
    let storage = QStorage::from_data(q.data()?, device, q.dtype())?;
    PackedWeight::new(QTensor::new(storage, q.shape().clone())?)
}

/// The first tensor (in name order) holding NaN or infinite values, if any.
pub fn first_non_finite(tensors: &HashMap<String, Tensor>) -> candle_core::Result<Option<String>> {
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    for name in names {
        let t = &tensors[name];
        if t.dtype().is_float() && !all_finite(t)? {
            return Ok(Some(name.clone()));
        }
    }
    Ok(None)
}

/// Values per piece when a tensor is checked through f64 (8 MiB of f64 at a time).
const FINITE_CHUNK: usize = 1 << 20;

/// Whether every value of the float tensor `t` is finite. An f32 tensor in contiguous host
/// memory is read in place; any other is checked a piece at a time (the sum of |x| in f64 is
/// finite exactly when every value is), so the check never holds a second copy of a large
/// tensor (a whole-tensor f64 copy of SmolLM2's embedding is 226 MB, twice with its |x|).
fn all_finite(t: &Tensor) -> candle_core::Result<bool> {
    let in_place = crate::device::with_host_f32(t, |values| {
        values
            .chunks(1024)
            .all(|c| c.iter().fold(true, |ok, x| ok & x.is_finite()))
    });
    if let Some(finite) = in_place {
        return Ok(finite);
    }
    let flat = t.flatten_all()?;
    let n = flat.elem_count();
    let mut start = 0;
    while start < n {
        let len = FINITE_CHUNK.min(n - start);
        let sum = flat
            .narrow(0, start, len)?
            .to_dtype(DType::F64)?
            .abs()?
            .sum_all()?
            .to_scalar::<f64>()?;
        if !sum.is_finite() {
            return Ok(false);
        }
        start += len;
    }
    Ok(true)
}

/// Fails on the first tensor holding NaN or infinite values, naming it and the file.
pub fn check_finite(tensors: &HashMap<String, Tensor>, file: &Path) -> Result<(), ModelError> {
    match first_non_finite(tensors)? {
        Some(name) => Err(ModelError::Weights {
            file: file.display().to_string(),
            problem: format!("tensor `{name}` holds NaN or infinite values"),
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(name: &str, t: Tensor) -> HashMap<String, Tensor> {
        HashMap::from([(name.to_string(), t)])
    }

    #[test]
    fn non_finite_values_are_found_in_every_layout_and_dtype() {
        let dev = Device::Cpu;
        // Past one f64 piece, the bad value last: every piece is read.
        let n = FINITE_CHUNK + 17;
        let mut v = vec![0.5f32; n];
        assert_eq!(
            first_non_finite(&one("w", Tensor::from_vec(v.clone(), n, &dev).unwrap())).unwrap(),
            None
        );
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            v[n - 1] = bad;
            let t = Tensor::from_vec(v.clone(), n, &dev).unwrap();
            for dtype in [DType::F32, DType::F16, DType::BF16] {
                let t = t.to_dtype(dtype).unwrap();
                let found = first_non_finite(&one("w", t)).unwrap();
                assert_eq!(found.as_deref(), Some("w"), "{bad} in {dtype:?}");
            }
        }
        // A transposed (non-contiguous) f32 view, and an offset into its storage.
        let mut m = vec![1.0f32; 6 * 4];
        m[23] = f32::NAN;
        let t = Tensor::from_vec(m, (6, 4), &dev).unwrap();
        assert!(!t.t().unwrap().is_contiguous());
        assert!(
            first_non_finite(&one("t", t.t().unwrap()))
                .unwrap()
                .is_some()
        );
        assert!(
            first_non_finite(&one("r", t.narrow(0, 5, 1).unwrap()))
                .unwrap()
                .is_some()
        );
        assert!(
            first_non_finite(&one("r", t.narrow(0, 0, 5).unwrap()))
                .unwrap()
                .is_none()
        );
        // Integer tensors are not checked; the first bad tensor in name order is named.
        let mut two = one("b", t.clone());
        two.insert("a".into(), t);
        two.insert("ids".into(), Tensor::new(&[1u32, 2], &dev).unwrap());
        assert_eq!(first_non_finite(&two).unwrap().as_deref(), Some("a"));
    }
}

//! A model as one safetensors file: its tensors by name, and its configuration as JSON in the
//! file's metadata (plus, for some kinds, a `format` tag and a few other values).
//!
//! [`save_model`] writes the file atomically. [`ModelFile::open`] checks the file's kind;
//! [`ModelFile::config`] reads the configuration back, and the model is rebuilt from it by
//! taking every tensor it needs ([`ModelFile::take`], or the file as a
//! [`ParamSource`]), which checks the name, the shape and the values;
//! [`ModelFile::finish`] refuses tensors left over. Every error names the file, and the
//! tensor where one is at fault.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::init::{Init, ParamSource};
use super::{KitError, Result};
use crate::fsio;

/// Metadata key of the file's kind, for kinds that carry one ([`ModelKind::format`]).
pub const FORMAT_KEY: &str = "format";

/// What kind of model a file holds: where its configuration is, how errors name the kind, and
/// the `format` tag it carries, if any.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelKind {
    /// Metadata key of the configuration JSON.
    pub config_key: &'static str,
    /// The kind in words, for errors ("identity encoder").
    pub name: &'static str,
    /// The value under [`FORMAT_KEY`] a file of this kind carries (checked on opening), or
    /// `None` for kinds recognised by their configuration key alone.
    pub format: Option<&'static str>,
}

/// Writes `tensors` (as they are: the caller picks each one's dtype) to the safetensors file
/// `path` atomically, with `config` as JSON under the kind's configuration key, the kind's
/// format tag, and the `extra` metadata.
pub fn save_model<C: Serialize + ?Sized>(
    path: &Path,
    kind: &ModelKind,
    config: &C,
    extra: &[(&str, String)],
    tensors: &[(String, Tensor)],
) -> Result<()> {
    let json = serde_json::to_string(config)
        .map_err(|e| KitError::file(path, format!("cannot write the configuration: {e}")))?;
    let mut meta: HashMap<String, String> = extra
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    meta.insert(kind.config_key.to_string(), json);
    if let Some(format) = kind.format {
        meta.insert(FORMAT_KEY.to_string(), format.to_string());
    }
    fsio::write_safetensors(path, tensors, meta).map_err(|e| KitError::file(path, e.reason()))
}

/// `tensors` with every floating-point tensor rounded to f16, for files whose weights lose
/// nothing that matters at half precision (a relative rounding error of about 5e-4 per value).
/// Loading ([`ModelFile::take`] and the models' own loaders) reads them back as f32, so a
/// second save of a loaded model writes the same values.
pub fn half_precision(tensors: &[(String, Tensor)]) -> candle_core::Result<Vec<(String, Tensor)>> {
    tensors
        .iter()
        .map(|(name, t)| {
            let t = if t.dtype().is_float() {
                t.to_dtype(DType::F16)?
            } else {
                t.clone()
            };
            Ok((name.clone(), t))
        })
        .collect()
}

/// A saved model being loaded: its metadata and the tensors not yet taken.
#[derive(Debug)]
pub struct ModelFile {
    path: PathBuf,
    kind: ModelKind,
    meta: HashMap<String, String>,
    tensors: HashMap<String, Tensor>,
}

impl ModelFile {
    /// Reads the file `path` (its tensors onto `device`) and checks that it is of `kind`: the
    /// format tag, if the kind has one, and the configuration key.
    pub fn open(path: &Path, kind: &ModelKind, device: &Device) -> Result<Self> {
        let bytes = fsio::read(path)
            .map_err(|e| KitError::file(path, format!("cannot read: {}", e.reason())))?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| KitError::file(path, format!("not a safetensors file: {e}")))?;
        let meta = header.metadata().clone().unwrap_or_default();
        if let Some(format) = kind.format {
            match meta.get(FORMAT_KEY) {
                Some(f) if f == format => {}
                Some(f) => {
                    return Err(KitError::file(
                        path,
                        format!("is a `{f}` file, expected a `{format}` file"),
                    ));
                }
                None => {
                    return Err(KitError::file(
                        path,
                        format!("no `{FORMAT_KEY}` metadata: not a `{format}` file"),
                    ));
                }
            }
        }
        if !meta.contains_key(kind.config_key) {
            return Err(KitError::file(
                path,
                format!(
                    "no `{}` metadata: not a saved {}",
                    kind.config_key, kind.name
                ),
            ));
        }
        let tensors = fsio::parse_safetensors(path, &bytes, device)
            .map_err(|e| KitError::file(path, e.reason()))?;
        Ok(Self {
            path: path.to_path_buf(),
            kind: *kind,
            meta,
            tensors,
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A [`KitError::File`] naming this file.
    pub fn error(&self, reason: impl Into<String>) -> KitError {
        KitError::file(&self.path, reason)
    }

    /// The configuration stored with the model.
    pub fn config<C: DeserializeOwned>(&self) -> Result<C> {
        self.meta_json(self.kind.config_key)
    }

    /// The metadata value under `key`, parsed as JSON.
    pub fn meta_json<T: DeserializeOwned>(&self, key: &str) -> Result<T> {
        let raw = self
            .meta
            .get(key)
            .ok_or_else(|| self.error(format!("no `{key}` metadata")))?;
        serde_json::from_str(raw).map_err(|e| self.error(format!("bad `{key}` metadata: {e}")))
    }

    /// Takes the tensor `name`, which must have shape `dims` and finite values, as f32.
    pub fn take(&mut self, name: &str, dims: &[usize]) -> Result<Tensor> {
        let path = self.path.display().to_string();
        let t = self
            .tensors
            .remove(name)
            .ok_or_else(|| KitError::MissingTensor {
                path: path.clone(),
                tensor: name.to_string(),
            })?;
        if t.dims() != dims {
            return Err(KitError::TensorShape {
                path,
                tensor: name.to_string(),
                got: t.dims().to_vec(),
                expected: dims.to_vec(),
            });
        }
        if !t.dtype().is_float() {
            return Err(self.error(format!(
                "tensor `{name}` is {:?}, not floating point",
                t.dtype()
            )));
        }
        let sum = t
            .to_dtype(DType::F64)?
            .abs()?
            .sum_all()?
            .to_scalar::<f64>()?;
        if !sum.is_finite() {
            return Err(KitError::CorruptTensor {
                path,
                tensor: name.to_string(),
            });
        }
        Ok(t.to_dtype(DType::F32)?)
    }

    /// Errors if a tensor was left over (not part of the model).
    pub fn finish(self) -> Result<()> {
        let mut left: Vec<&String> = self.tensors.keys().collect();
        left.sort();
        match left.first() {
            Some(name) => Err(KitError::UnexpectedTensor {
                path: self.path.display().to_string(),
                tensor: (*name).clone(),
            }),
            None => Ok(()),
        }
    }
}

impl ParamSource for ModelFile {
    fn param(&mut self, name: &str, dims: &[usize], _init: Init) -> Result<Tensor> {
        self.take(name, dims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::kit::{Dense, DenseLayout, Fresh};
    use rand::SeedableRng;
    use rand::rngs::StdRng;
    use serde::Deserialize;

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Cfg {
        width: usize,
        seed: u64,
    }

    const KIND: ModelKind = ModelKind {
        config_key: "test_config",
        name: "test model",
        format: Some("peft-studio/test/v1"),
    };

    fn build(src: &mut dyn ParamSource, cfg: &Cfg) -> Result<(Dense, Tensor)> {
        let d = Dense::build(src, "fc", 3, cfg.width, 1.0, DenseLayout::InOut)?;
        let s = src.param("scale", &[1], Init::ONES)?;
        Ok((d, s))
    }

    fn named(d: &Dense, s: &Tensor) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        d.push_named(&mut out);
        out.push(("scale".into(), s.clone()));
        out
    }

    /// A change to a file's tensors.
    type Edit = dyn Fn(&mut HashMap<String, Tensor>);

    /// Rewrites the file at `from` into `to` with `edit` applied to its tensors.
    fn rewrite(from: &Path, to: &Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) {
        let bytes = std::fs::read(from).unwrap();
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let meta = header.metadata().clone();
        let mut t = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap();
        edit(&mut t);
        let bytes = safetensors::serialize(t.iter().map(|(n, t)| (n.as_str(), t)), meta).unwrap();
        std::fs::write(to, bytes).unwrap();
    }

    #[test]
    fn save_then_load_restores_tensors_and_config() {
        let dir = std::env::temp_dir().join(format!("kit-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("model.safetensors");
        let cfg = Cfg { width: 4, seed: 11 };
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        let (d, s) = build(&mut Fresh::frozen(&mut rng, &Device::Cpu), &cfg).unwrap();
        let extra = [("note", "\"kept\"".to_string())];
        save_model(&path, &KIND, &cfg, &extra, &named(&d, &s)).unwrap();

        let mut file = ModelFile::open(&path, &KIND, &Device::Cpu).unwrap();
        let back: Cfg = file.config().unwrap();
        assert_eq!(back, cfg);
        assert_eq!(file.meta_json::<String>("note").unwrap(), "kept");
        let (d2, s2) = build(&mut file, &back).unwrap();
        file.finish().unwrap();
        for ((n1, t1), (n2, t2)) in named(&d, &s).iter().zip(&named(&d2, &s2)) {
            assert_eq!(n1, n2);
            let a = t1.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(
                a,
                t2.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                "{n1}"
            );
        }

        // A missing tensor, a wrong shape, NaN values and a tensor too many: each error names
        // the file and the tensor.
        let bad = dir.join("bad.safetensors");
        let load = |p: &Path| -> Result<()> {
            let mut f = ModelFile::open(p, &KIND, &Device::Cpu)?;
            let cfg: Cfg = f.config()?;
            build(&mut f, &cfg)?;
            f.finish()
        };
        let cases: [(&str, Box<Edit>); 4] = [
            ("fc.w", Box::new(|t| drop(t.remove("fc.w")))),
            (
                "fc.b",
                Box::new(|t| {
                    t.insert(
                        "fc.b".into(),
                        Tensor::zeros(5, DType::F32, &Device::Cpu).unwrap(),
                    );
                }),
            ),
            (
                "scale",
                Box::new(|t| {
                    let nan = Tensor::new(&[f32::NAN], &Device::Cpu).unwrap();
                    t.insert("scale".into(), nan);
                }),
            ),
            (
                "extra",
                Box::new(|t| {
                    t.insert(
                        "extra".into(),
                        Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap(),
                    );
                }),
            ),
        ];
        for (tensor, edit) in cases {
            rewrite(&path, &bad, |t| edit(t));
            let err = load(&bad).unwrap_err().to_string();
            assert!(
                err.contains("bad.safetensors") && err.contains(tensor),
                "{err}"
            );
        }
        let err = load(&bad).unwrap_err();
        assert!(matches!(err, KitError::UnexpectedTensor { .. }), "{err}");

        // A configuration that does not fit the tensors: the shape error names the tensor.
        let wide = Cfg { width: 5, seed: 11 };
        let mut file = ModelFile::open(&path, &KIND, &Device::Cpu).unwrap();
        let err = build(&mut file, &wide).unwrap_err();
        assert!(matches!(err, KitError::TensorShape { .. }), "{err}");
        assert!(err.to_string().contains("fc.w") && err.to_string().contains("model.safetensors"));

        // Another kind, a file without the tag, a missing file.
        let other = ModelKind {
            format: Some("peft-studio/other/v1"),
            ..KIND
        };
        let err = ModelFile::open(&path, &other, &Device::Cpu).unwrap_err();
        assert!(
            err.to_string()
                .contains("expected a `peft-studio/other/v1` file"),
            "{err}"
        );
        let untagged = ModelKind {
            config_key: "other_config",
            name: "other model",
            format: None,
        };
        let err = ModelFile::open(&path, &untagged, &Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("not a saved other model"), "{err}");
        let err = ModelFile::open(&dir.join("none.safetensors"), &KIND, &Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("none.safetensors"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }
}

//! Where tensors compute. A run, a generation or a personalisation chooses its device once
//! ([`DeviceChoice::resolve`]) and passes the [`Device`] down; files are read into and written
//! from [`HOST`] memory.
//!
//! `auto` takes the first GPU when the binary was built with a GPU backend (`--features cuda`,
//! `--features metal`) and one is present, else the CPU; the default build has no GPU backend, so
//! there `auto` is always the CPU.

use std::fmt;
use std::str::FromStr;

use candle_core::Device;
use serde::{Deserialize, Serialize};

/// Host memory: where files are parsed into and serialised from before and after a tensor moves
/// to the compute device.
pub const HOST: Device = Device::Cpu;

/// Runs `f` on the values of `t` in place when `t` is a contiguous f32 tensor in host memory
/// (no copy, no conversion); `None` for any other tensor, whose caller takes candle's general
/// path.
pub fn with_host_f32<R>(t: &candle_core::Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    use candle_core::{CpuStorage, Storage};
    let (storage, layout) = t.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(values)), Some((start, end))) => Some(f(&values[start..end])),
        _ => None,
    }
}

/// A device setting, as written in presets, on the command line (`--device`) and in the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceChoice {
    /// The first GPU when this binary can use one and one is present, else the CPU.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// NVIDIA GPU number N (`cuda:N`).
    Cuda(usize),
    /// Apple GPU number N (`metal:N`).
    Metal(usize),
}

/// A device that cannot be used: a malformed setting, or a GPU this binary or machine lacks.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The text is not a device setting.
    #[error("device `{0}` is not one of auto, cpu, cuda, cuda:N, metal, metal:N")]
    Unknown(String),
    /// The binary was built without the backend.
    #[error(
        "device {choice}: this binary was built without {backend} support (build it with {how})"
    )]
    NotBuilt {
        /// The setting asked for.
        choice: DeviceChoice,
        /// "CUDA" or "Metal".
        backend: &'static str,
        /// How to get a binary that has it.
        how: &'static str,
    },
    /// The backend is there, but the device could not be opened.
    #[error("device {choice} could not be opened: {reason}")]
    Open {
        /// The setting asked for.
        choice: DeviceChoice,
        /// What the backend said.
        reason: String,
    },
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
            Self::Metal(n) => write!(f, "metal:{n}"),
        }
    }
}

impl FromStr for DeviceChoice {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let text = s.trim().to_ascii_lowercase();
        let ordinal = |rest: &str| -> Result<usize, DeviceError> {
            match rest {
                "" => Ok(0),
                _ => rest
                    .strip_prefix(':')
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(|| DeviceError::Unknown(s.to_string())),
            }
        };
        match text.as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            t if t.starts_with("cuda") => Ok(Self::Cuda(ordinal(&t[4..])?)),
            t if t.starts_with("metal") => Ok(Self::Metal(ordinal(&t[5..])?)),
            _ => Err(DeviceError::Unknown(s.to_string())),
        }
    }
}

impl TryFrom<String> for DeviceChoice {
    type Error = DeviceError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<DeviceChoice> for String {
    fn from(c: DeviceChoice) -> Self {
        c.to_string()
    }
}

impl DeviceChoice {
    /// Opens the device. `Auto` never fails: without a usable GPU it is the CPU.
    pub fn resolve(self) -> Result<Device, DeviceError> {
        match self {
            Self::Auto => Ok(auto_device()),
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(n) => open_cuda(self, n),
            Self::Metal(n) => open_metal(self, n),
        }
    }
}

/// The first GPU this binary can use, else the CPU.
fn auto_device() -> Device {
    if cuda_device_count() > 0
        && let Ok(d) = open_cuda(DeviceChoice::Cuda(0), 0)
    {
        return d;
    }
    if cfg!(feature = "metal")
        && let Ok(d) = open_metal(DeviceChoice::Metal(0), 0)
    {
        return d;
    }
    Device::Cpu
}

#[cfg(feature = "cuda")]
fn open_cuda(choice: DeviceChoice, n: usize) -> Result<Device, DeviceError> {
    Device::new_cuda(n).map_err(|e| DeviceError::Open {
        choice,
        reason: e.to_string(),
    })
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(choice: DeviceChoice, _n: usize) -> Result<Device, DeviceError> {
    Err(DeviceError::NotBuilt {
        choice,
        backend: "CUDA",
        how: "scripts/build-cuda.sh",
    })
}

#[cfg(feature = "metal")]
fn open_metal(choice: DeviceChoice, n: usize) -> Result<Device, DeviceError> {
    Device::new_metal(n).map_err(|e| DeviceError::Open {
        choice,
        reason: e.to_string(),
    })
}

#[cfg(not(feature = "metal"))]
fn open_metal(choice: DeviceChoice, _n: usize) -> Result<Device, DeviceError> {
    Err(DeviceError::NotBuilt {
        choice,
        backend: "Metal",
        how: "cargo build --release --features metal, on macOS",
    })
}

/// NVIDIA GPUs the driver reports; 0 without CUDA support, driver or GPU.
pub fn cuda_device_count() -> usize {
    #[cfg(feature = "cuda")]
    {
        use candle_core::cuda_backend::cudarc::driver::CudaContext;
        // Counting needs an initialised driver; a machine without one has no GPU to offer.
        if candle_core::cuda_backend::cudarc::driver::result::init().is_err() {
            return 0;
        }
        CudaContext::device_count().map_or(0, |n| n.max(0) as usize)
    }
    #[cfg(not(feature = "cuda"))]
    0
}

/// A device the user can pick, with what the window and the logs show about it.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceInfo {
    /// The setting that selects it.
    pub choice: DeviceChoice,
    /// Its name: the CPU model, or the GPU's name.
    pub name: String,
    /// Its memory in bytes, where known (GPUs).
    pub memory_bytes: Option<u64>,
}

impl DeviceInfo {
    /// One line: `cuda:0 — NVIDIA H200 (139.8 GiB)` or `cpu — Intel(R) Xeon(R) …`.
    pub fn describe(&self) -> String {
        match self.memory_bytes {
            Some(b) => format!(
                "{} — {} ({:.1} GiB)",
                self.choice,
                self.name,
                b as f64 / (1u64 << 30) as f64
            ),
            None => format!("{} — {}", self.choice, self.name),
        }
    }
}

/// The devices this binary can compute on here: the CPU first, then each GPU.
pub fn available() -> Vec<DeviceInfo> {
    let cpu = crate::bench::machine::CpuInfo::detect();
    let mut list = vec![DeviceInfo {
        choice: DeviceChoice::Cpu,
        name: if cpu.model.is_empty() {
            "CPU".to_string()
        } else {
            format!("{} ({} threads)", cpu.model, cpu.logical_cpus)
        },
        memory_bytes: None,
    }];
    list.extend(cuda_devices());
    list
}

#[cfg(feature = "cuda")]
fn cuda_devices() -> Vec<DeviceInfo> {
    use candle_core::cuda_backend::cudarc::driver::CudaContext;
    (0..cuda_device_count())
        .filter_map(|n| {
            let ctx = CudaContext::new(n).ok()?;
            Some(DeviceInfo {
                choice: DeviceChoice::Cuda(n),
                name: ctx.name().unwrap_or_else(|_| "NVIDIA GPU".into()),
                memory_bytes: ctx.total_mem().ok().map(|b| b as u64),
            })
        })
        .collect()
}

#[cfg(not(feature = "cuda"))]
fn cuda_devices() -> Vec<DeviceInfo> {
    Vec::new()
}

/// A short name for logs and tables: `cpu`, `cuda:0`, `metal:0`.
pub fn label(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// The devices tests run on: the CPU, and the first GPU where this binary and machine have one.
/// Device-parametrised tests loop over it, so they run on the GPU where there is one and skip it
/// (with a line saying so) where there is none.
pub fn test_devices() -> Vec<Device> {
    let mut devices = vec![Device::Cpu];
    match DeviceChoice::Cuda(0).resolve() {
        Ok(d) => devices.push(d),
        Err(e) => eprintln!("GPU part skipped: {e}"),
    }
    devices
}

#[cfg(test)]
mod tests {
    #[test]
    fn host_f32_values_are_read_in_place_only_when_contiguous() {
        use candle_core::{DType, Tensor};
        let t = Tensor::arange(0f32, 12.0, &HOST)
            .unwrap()
            .reshape((3, 4))
            .unwrap();
        assert_eq!(
            with_host_f32(&t, |v| v.to_vec()),
            Some((0..12).map(|i| i as f32).collect())
        );
        // A contiguous view starting inside the storage: its own values, not the storage's.
        let rows = t.narrow(0, 1, 2).unwrap();
        assert_eq!(
            with_host_f32(&rows, |v| v.to_vec()),
            Some((4..12).map(|i| i as f32).collect())
        );
        assert_eq!(
            with_host_f32(&t.t().unwrap(), |v| v.len()),
            None,
            "transposed"
        );
        assert_eq!(
            with_host_f32(&t.narrow(1, 0, 2).unwrap(), |v| v.len()),
            None,
            "strided"
        );
        assert_eq!(
            with_host_f32(&t.to_dtype(DType::F64).unwrap(), |v| v.len()),
            None,
            "f64"
        );
    }

    use super::*;

    #[test]
    fn settings_parse_and_print_back() {
        for (text, want) in [
            ("auto", DeviceChoice::Auto),
            ("CPU", DeviceChoice::Cpu),
            ("cuda", DeviceChoice::Cuda(0)),
            ("cuda:1", DeviceChoice::Cuda(1)),
            (" metal:0 ", DeviceChoice::Metal(0)),
        ] {
            let got: DeviceChoice = text.parse().unwrap();
            assert_eq!(got, want, "{text}");
            assert_eq!(got.to_string().parse::<DeviceChoice>().unwrap(), got);
        }
        for bad in ["gpu", "cuda:", "cuda:x", "cuda1", "tpu:0", ""] {
            let err = bad.parse::<DeviceChoice>().unwrap_err().to_string();
            assert!(err.contains(&format!("`{bad}`")), "{err}");
        }
    }

    #[test]
    fn a_preset_reads_and_writes_the_setting_as_text() {
        #[derive(Serialize, Deserialize)]
        struct S {
            device: DeviceChoice,
        }
        let s: S = toml::from_str("device = \"cuda:2\"").unwrap();
        assert_eq!(s.device, DeviceChoice::Cuda(2));
        assert_eq!(toml::to_string(&s).unwrap().trim(), "device = \"cuda:2\"");
        let err = toml::from_str::<S>("device = \"gpu\"")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("gpu"), "{err}");
    }

    #[test]
    fn cpu_and_auto_always_resolve() {
        assert!(DeviceChoice::Cpu.resolve().unwrap().is_cpu());
        let auto = DeviceChoice::Auto.resolve().unwrap();
        assert_eq!(auto.is_cpu(), cuda_device_count() == 0);
        assert_eq!(label(&Device::Cpu), "cpu");
        let list = available();
        assert_eq!(list[0].choice, DeviceChoice::Cpu);
        assert!(list[0].describe().starts_with("cpu — "));
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn a_gpu_in_a_cpu_build_says_how_to_build_one() {
        let err = DeviceChoice::Cuda(0).resolve().unwrap_err().to_string();
        assert!(
            err.contains("cuda:0") && err.contains("scripts/build-cuda.sh"),
            "{err}"
        );
        assert_eq!(test_devices().len(), 1);
    }
}

//! Shared checks of the GPU-path tests: an op's composition of standard candle ops (its GPU
//! path) against its fused CPU kernel, forward and gradients, on the CPU; and its entry
//! function on every test device against the CPU kernel.

#![allow(dead_code)]

use candle_core::{Device, Tensor, Var};

/// One input of an op: a tensor, and whether it trains (a `Var` whose gradient is compared).
pub struct Input {
    /// The value (on the CPU).
    pub value: Tensor,
    /// Whether it is a `Var` whose gradient the checks compare.
    pub trains: bool,
}

/// A trained input.
pub fn var(value: Tensor) -> Input {
    Input {
        value,
        trains: true,
    }
}

/// A constant input (a mask, targets, a frozen weight).
pub fn fixed(value: Tensor) -> Input {
    Input {
        value,
        trains: false,
    }
}

/// Standard-normal values of `shape`, times `std`, on the CPU.
pub fn randn(shape: &[usize], std: f32) -> Tensor {
    Tensor::randn(0f32, std, shape, &Device::Cpu).unwrap()
}

/// The largest |a − b| over the largest |b| (at least 1): a relative error for values of
/// scale ≥ 1, an absolute one below.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a = a.to_device(&Device::Cpu).unwrap();
    let b = b.to_device(&Device::Cpu).unwrap();
    let a = a.to_dtype(candle_core::DType::F32).unwrap();
    let b = b.to_dtype(candle_core::DType::F32).unwrap();
    let diff = (&a - &b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let scale = b
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff.is_finite(), "non-finite difference");
    diff / scale.max(1.0)
}

/// Asserts [`rel_err`]`(a, b) <= tol`.
pub fn assert_close(what: &str, a: &Tensor, b: &Tensor, tol: f32) {
    let e = rel_err(a, b);
    assert!(e <= tol, "{what}: differ by {e} (tolerance {tol})");
}

/// The output of `f` on `inputs` moved to `device` (trained ones as fresh `Var`s) and the
/// gradients of `Σ y⊙r` for the trained inputs (`None` where the op gave none), all back on
/// the CPU. `r` gives the weighting for the output's shape.
pub fn run(
    device: &Device,
    inputs: &[Input],
    r: &dyn Fn(&[usize]) -> Tensor,
    f: &dyn Fn(&[Tensor]) -> Tensor,
) -> (Tensor, Vec<Option<Tensor>>) {
    let vars: Vec<Option<Var>> = inputs
        .iter()
        .map(|i| {
            i.trains
                .then(|| Var::from_tensor(&i.value.to_device(device).unwrap()).unwrap())
        })
        .collect();
    let args: Vec<Tensor> = inputs
        .iter()
        .zip(&vars)
        .map(|(i, v)| match v {
            Some(v) => v.as_tensor().clone(),
            None => i.value.to_device(device).unwrap(),
        })
        .collect();
    let y = f(&args);
    let weights = r(y.dims()).to_device(device).unwrap();
    let grads = (y.to_dtype(candle_core::DType::F32).unwrap() * weights)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let g = vars
        .iter()
        .map(|v| {
            v.as_ref()
                .and_then(|v| grads.get(v))
                .map(|g| g.to_device(&Device::Cpu).unwrap())
        })
        .collect();
    (y.to_device(&Device::Cpu).unwrap(), g)
}

/// Checks an op three ways: `composed` (its GPU path) on the CPU against `entry` on the CPU
/// (the fused kernel), forward within `fwd_tol` and every trained input's gradient within
/// `grad_tol` (relative, see [`rel_err`]; an input without a gradient on one path must have
/// none on the other); then `entry` on each of
/// [`peft_studio::device::test_devices`] against the same CPU result (a GPU's is its composed
/// path).
pub fn check(
    what: &str,
    inputs: &[Input],
    entry: &dyn Fn(&[Tensor]) -> Tensor,
    composed: &dyn Fn(&[Tensor]) -> Tensor,
    fwd_tol: f32,
    grad_tol: f32,
) {
    let cpu = Device::Cpu;
    // One weighting of the output for every run, so the gradients compare.
    let r_cache = std::sync::Mutex::new(None::<Tensor>);
    let r = |dims: &[usize]| -> Tensor {
        let mut c = r_cache.lock().unwrap();
        if c.as_ref().is_none_or(|t| t.dims() != dims) {
            *c = Some(randn(dims, 1.0));
        }
        c.clone().unwrap()
    };
    let (want, want_g) = run(&cpu, inputs, &r, entry);
    let compare = |label: &str, (got, got_g): (Tensor, Vec<Option<Tensor>>)| {
        assert_close(&format!("{what} ({label}) output"), &got, &want, fwd_tol);
        for (i, (a, b)) in got_g.iter().zip(&want_g).enumerate() {
            match (a, b) {
                (Some(a), Some(b)) => {
                    assert_close(&format!("{what} ({label}) gradient {i}"), a, b, grad_tol)
                }
                (None, None) => {}
                _ => panic!(
                    "{what} ({label}): input {i} has a gradient on one path only ({} vs {})",
                    a.is_some(),
                    b.is_some()
                ),
            }
        }
    };
    compare("composed, cpu", run(&cpu, inputs, &r, composed));
    for device in peft_studio::device::test_devices() {
        let label = peft_studio::device::label(&device);
        compare(&format!("entry, {label}"), run(&device, inputs, &r, entry));
    }
}

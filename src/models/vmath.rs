//! Branch-free f32 `erf` and `exp` that compile to SIMD loops, and the exact GELU built on them.
//!
//! libm's (and candle's) scalar `erff`/`expf` take branches per element and never vectorise;
//! in a MiniLM training step they cost more than the GELU's memory traffic. Here `erf` is the
//! rational approximation Eigen, XLA and PyTorch's vectorised CPU kernels use
//! (`x·P(x²)/Q(x²)` on `[-4, 4]`, ±1 beyond), and `exp` is Cephes' `expf` (range reduction by
//! ln 2, a degree-6 polynomial, the exponent set by integer arithmetic). Both are within 1e-6
//! absolute of the exact functions over the whole real line (see the tests), use no fused
//! multiply-add (so every CPU gets the same bits), and the slice kernels are compiled a second
//! and third time for AVX2 + FMA and AVX-512, picked at run time.

use std::mem::MaybeUninit;

/// `1/√2`.
const SQRT_HALF: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// `1/√(2π)`.
const INV_SQRT_2PI: f32 = 0.398_942_3;

/// erf(x), absolute error below 1e-6 for every finite x (NaN stays NaN).
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    // `clamp` keeps NaN (unlike `max`/`min`) and compiles to two compares and selects.
    let c = x.clamp(-4.0, 4.0);
    let x2 = c * c;
    let mut p = -2.726_142_3e-10f32;
    p = p * x2 + 2.770_681_4e-8;
    p = p * x2 + -2.101_024e-6;
    p = p * x2 + -5.692_506_4e-5;
    p = p * x2 + -7.349_906_3e-4;
    p = p * x2 + -2.954_6e-3;
    p = p * x2 + -1.609_603_3e-2;
    let mut q = -1.456_607_2e-5f32;
    q = q * x2 + -2.133_740_6e-4;
    q = q * x2 + -1.682_827e-3;
    q = q * x2 + -7.373_329_3e-3;
    q = q * x2 + -1.426_473_9e-2;
    let r = c * p / q;
    // The rational form overshoots ±1 by a few ulp near the clamp.
    r.clamp(-1.0, 1.0)
}

/// e^x, relative error about 2e-7; 0 below −87 (e^−87 ≈ 1.6e-38, where f32 turns subnormal),
/// `e^88` above 88 (the arguments here are softmax logits and GELU's −x²/2).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two so that n·C1 is exact.
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5·2²³ rounds to the nearest integer without a branch or a call.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(-87.0, 88.0);
    let n = (xc * LOG2E + ROUND) - ROUND;
    let r = xc - n * C1 - n * C2;
    let mut y = 1.987_569_1e-4f32;
    y = y * r + 1.398_2e-3;
    y = y * r + 8.333_452e-3;
    y = y * r + 4.166_579_6e-2;
    y = y * r + 0.166_666_65;
    y = y * r + 0.5;
    y = y * r * r + r + 1.0;
    // 2ⁿ from the exponent bits (n ∈ [−126, 127] after the clamp).
    let pow2 = f32::from_bits((((n as i32) + 127).max(1) as u32) << 23);
    if x < -87.0 { 0.0 } else { y * pow2 }
}

/// The exact GELU, `x·Φ(x)`.
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * SQRT_HALF))
}

/// d/dx of the exact GELU, `Φ(x) + x·φ(x)`.
#[inline(always)]
pub fn gelu_grad(x: f32) -> f32 {
    let cdf = 0.5 * (1.0 + erf(x * SQRT_HALF));
    let pdf = INV_SQRT_2PI * exp(-0.5 * x * x);
    cdf + x * pdf
}

/// Defines `pub fn $name` over slices that runs the body compiled for AVX-512, AVX2 + FMA or
/// the baseline, whichever this CPU has.
macro_rules! simd_kernel {
    ($(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),*) $body:block) => {
        $(#[$doc])*
        pub fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                fn avx512($($arg: $ty),*) {
                    body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) {
                    body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has the features the function was compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: as above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

simd_kernel! {
    /// `out[i] = gelu(x[i])` over the common length.
    fn gelu_slice(x: &[f32], out: &mut [MaybeUninit<f32>]) {
        for (o, &v) in out.iter_mut().zip(x) {
            o.write(gelu(v));
        }
    }
}

simd_kernel! {
    /// `out[i] = g[i]·gelu'(x[i])` over the common length.
    fn gelu_backward_slice(x: &[f32], g: &[f32], out: &mut [MaybeUninit<f32>]) {
        for ((o, &v), &g) in out.iter_mut().zip(x).zip(g) {
            o.write(g * gelu_grad(v));
        }
    }
}

simd_kernel! {
    /// `out[i] = exp(x[i] − shift)` over the common length.
    fn exp_shifted_slice(x: &[f32], shift: f32, out: &mut [MaybeUninit<f32>]) {
        for (o, &v) in out.iter_mut().zip(x) {
            o.write(exp(v - shift));
        }
    }
}

simd_kernel! {
    /// `x[i] = exp(x[i] − shift)`.
    fn exp_shifted_in_place(x: &mut [f32], shift: f32) {
        for v in x.iter_mut() {
            *v = exp(*v - shift);
        }
    }
}

/// The logistic sigmoid `1/(1 + e^−x)` (0 and 1 in the far tails, never NaN for finite x).
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

simd_kernel! {
    /// SwiGLU: `out[i] = silu(gate[i])·up[i]` with `silu(x) = x·σ(x)`, over the common length.
    fn silu_mul_slice(gate: &[f32], up: &[f32], out: &mut [MaybeUninit<f32>]) {
        for ((o, &a), &b) in out.iter_mut().zip(gate).zip(up) {
            o.write(a * sigmoid(a) * b);
        }
    }
}

simd_kernel! {
    /// SwiGLU's backward for incoming gradient `g`: `d_gate = g·up·σ(a)·(1 + a·(1 − σ(a)))`
    /// and `d_up = g·silu(a)`, where `a = gate[i]`.
    fn silu_mul_backward_slice(
        gate: &[f32],
        up: &[f32],
        g: &[f32],
        d_gate: &mut [MaybeUninit<f32>],
        d_up: &mut [MaybeUninit<f32>]
    ) {
        let n = gate.len().min(up.len()).min(g.len()).min(d_gate.len()).min(d_up.len());
        for i in 0..n {
            let a = gate[i];
            let s = sigmoid(a);
            d_gate[i].write(g[i] * up[i] * (s * (1.0 + a * (1.0 - s))));
            d_up[i].write(g[i] * a * s);
        }
    }
}

simd_kernel! {
    /// `*max = max(x)` (−∞ for an empty slice), in 16 lanes so that it vectorises.
    fn max_slice(x: &[f32], max: &mut f32) {
        let mut acc = [f32::NEG_INFINITY; 16];
        let mut it = x.chunks_exact(16);
        for c in &mut it {
            for j in 0..16 {
                acc[j] = acc[j].max(c[j]);
            }
        }
        let m = it.remainder().iter().copied().fold(f32::NEG_INFINITY, f32::max);
        *max = acc.iter().copied().fold(m, f32::max);
    }
}

simd_kernel! {
    /// `*sum = Σ exp(x[i] − shift)`, in 16 lanes so that it vectorises.
    fn sum_exp_shifted(x: &[f32], shift: f32, sum: &mut f32) {
        let mut acc = [0f32; 16];
        let mut it = x.chunks_exact(16);
        for c in &mut it {
            for j in 0..16 {
                acc[j] += exp(c[j] - shift);
            }
        }
        let s: f32 = it.remainder().iter().map(|&v| exp(v - shift)).sum();
        *sum = s + acc.iter().sum::<f32>();
    }
}

/// A slice whose every element has been written, as plain values.
///
/// # Safety
/// Every element of `s` must be initialised.
pub unsafe fn assume_init_mut(s: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    // SAFETY: MaybeUninit<f32> has f32's layout, and the caller vouches for initialisation.
    unsafe { &mut *(s as *mut [MaybeUninit<f32>] as *mut [f32]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Points over the real line: dense on [−10, 10], then growing into the tails, both signs,
    /// plus the special values.
    fn sweep() -> Vec<f32> {
        let mut v: Vec<f32> = (-200_000..=200_000).map(|i| i as f32 * 5e-5).collect();
        let mut t = 10.0f32;
        while t < 1e30 {
            v.push(t);
            v.push(-t);
            t *= 1.01;
        }
        v.extend([
            0.0,
            -0.0,
            1e-30,
            -1e-30,
            f32::MAX,
            f32::MIN,
            f32::MIN_POSITIVE,
        ]);
        v
    }

    fn erf64(x: f64) -> f64 {
        candle_core::cpu::erf::erf_f64(x)
    }

    #[test]
    fn erf_is_within_1e6_of_the_exact_function_everywhere() {
        let mut worst = (0.0f64, 0.0f32);
        for x in sweep() {
            let e = (erf(x) as f64 - erf64(x as f64)).abs();
            if e > worst.0 {
                worst = (e, x);
            }
        }
        assert!(worst.0 <= 1e-6, "erf off by {} at {}", worst.0, worst.1);
        assert!(erf(f32::NAN).is_nan());
        assert!((erf(f32::INFINITY) - 1.0).abs() < 1e-6);
        assert!((erf(f32::NEG_INFINITY) + 1.0).abs() < 1e-6);
    }

    #[test]
    fn exp_is_accurate_over_its_range() {
        for x in sweep() {
            let got = exp(x) as f64;
            let want = (x as f64).clamp(-1e3, 88.0).exp();
            if x < -87.0 {
                assert_eq!(got, 0.0, "exp({x})");
            } else {
                let rel = (got - want).abs() / want;
                assert!(rel < 1e-6, "exp({x}) = {got}, want {want} (rel {rel})");
            }
        }
    }

    #[test]
    fn gelu_and_its_gradient_match_the_f64_reference() {
        let phi = |x: f64| 0.5 * (1.0 + erf64(x / std::f64::consts::SQRT_2));
        let pdf = |x: f64| (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
        for x in sweep() {
            let xd = x as f64;
            // Absolute 1e-6, relative for large |x| (where x itself carries f32 rounding).
            let tol = 1e-6 * xd.abs().max(1.0);
            let f = gelu(x) as f64 - xd * phi(xd);
            assert!(f.abs() <= tol, "gelu({x}) off by {f}");
            let d = gelu_grad(x) as f64 - (phi(xd) + xd * pdf(xd));
            assert!(d.abs() <= 1e-6, "gelu'({x}) off by {d}");
        }
    }

    #[test]
    fn slice_kernels_match_the_scalar_functions() {
        let x: Vec<f32> = sweep().into_iter().step_by(97).collect();
        let g: Vec<f32> = (0..x.len()).map(|i| (i % 7) as f32 - 3.0).collect();
        let mut a = vec![MaybeUninit::uninit(); x.len()];
        gelu_slice(&x, &mut a);
        let mut b = vec![MaybeUninit::uninit(); x.len()];
        gelu_backward_slice(&x, &g, &mut b);
        let mut c = vec![MaybeUninit::uninit(); x.len()];
        exp_shifted_slice(&x, 1.5, &mut c);
        // SAFETY: the kernel wrote every element.
        let c = unsafe { assume_init_mut(&mut c) };
        let mut d = x.clone();
        exp_shifted_in_place(&mut d, 1.5);
        assert_eq!(c, d);
        for i in 0..x.len() {
            // SAFETY: the kernels wrote every element.
            let (ai, bi) = unsafe { (a[i].assume_init(), b[i].assume_init()) };
            assert_eq!(ai.to_bits(), gelu(x[i]).to_bits(), "gelu at {}", x[i]);
            assert_eq!(bi.to_bits(), (g[i] * gelu_grad(x[i])).to_bits());
            assert_eq!(c[i].to_bits(), exp(x[i] - 1.5).to_bits());
        }
    }
}

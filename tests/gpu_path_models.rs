//! The GPU paths of the models' fused kernels (`models::ops`, `models::lm_ops`,
//! `models::attention`): each composition of standard candle ops in `models::composed` equals
//! the fused CPU kernel, forward and gradients, on small and ragged shapes; and each entry
//! function gives the CPU kernel's result on every test device (the GPU part runs where a CUDA
//! build has a GPU).

mod gpu_path_support;

use candle_core::{DType, Device, Tensor};
use gpu_path_support::{assert_close, check, fixed, randn, var};
use peft_studio::models::{attention, composed, lm_ops, ops};

/// Relative forward tolerance of element-wise and per-row ops.
const FWD: f32 = 1e-5;
/// Relative forward tolerance of long reductions (matmuls, attention, losses over many rows).
const FWD_LONG: f32 = 1e-4;
/// Relative gradient tolerance.
const GRAD: f32 = 1e-4;

#[test]
fn softmax_composed_equals_the_kernel() {
    for shape in [&[3, 5, 7][..], &[2, 33], &[1, 1, 4, 129]] {
        check(
            &format!("softmax {shape:?}"),
            &[var(randn(shape, 2.0))],
            &|a| ops::softmax_last_dim(&a[0]).unwrap(),
            &|a| composed::softmax_last_dim(&a[0]).unwrap(),
            FWD,
            GRAD,
        );
    }
}

#[test]
fn masked_softmax_composed_equals_the_kernel_with_and_without_a_mask() {
    let (b, h, tq, tk) = (2, 3, 4, 5);
    let mask = Tensor::new(
        &[[0f32, 0., 0., -1e9, -1e9], [0., 0., 0., 0., 0.]],
        &Device::Cpu,
    )
    .unwrap();
    for bias in [Some(mask), None] {
        let with = bias.is_some();
        let mut inputs = vec![var(randn(&[b, h, tq, tk], 2.0))];
        inputs.extend(bias.map(fixed));
        check(
            &format!("masked softmax (mask {with})"),
            &inputs,
            &|a| ops::masked_softmax(&a[0], a.get(1), 0.37).unwrap(),
            &|a| composed::masked_softmax(&a[0], a.get(1), 0.37).unwrap(),
            FWD,
            GRAD,
        );
    }
    // Ragged: one batch row, odd sizes, a padded tail.
    let mut m = vec![0f32; 9];
    m[7] = -1e9;
    m[8] = -1e9;
    check(
        "masked softmax ragged",
        &[
            var(randn(&[1, 5, 3, 9], 3.0)),
            fixed(Tensor::from_vec(m, (1, 9), &Device::Cpu).unwrap()),
        ],
        &|a| ops::masked_softmax(&a[0], Some(&a[1]), 1.0).unwrap(),
        &|a| composed::masked_softmax(&a[0], Some(&a[1]), 1.0).unwrap(),
        FWD,
        GRAD,
    );
}

#[test]
fn gelu_composed_equals_the_kernel() {
    for shape in [&[4, 33][..], &[3, 7, 11]] {
        check(
            &format!("gelu {shape:?}"),
            &[var(randn(shape, 2.0))],
            &|a| ops::gelu_erf(&a[0]).unwrap(),
            &|a| composed::gelu_erf(&a[0]).unwrap(),
            FWD,
            GRAD,
        );
    }
}

#[test]
fn layer_norm_composed_equals_the_kernel_for_trained_and_frozen_parameters() {
    let d = 17;
    for trains in [true, false] {
        let param = |t: Tensor| if trains { var(t) } else { fixed(t) };
        check(
            &format!("layer norm (parameters train: {trains})"),
            &[
                var((randn(&[2, 5, d], 3.0) + 1.0).unwrap()),
                param((randn(&[d], 0.2) + 1.0).unwrap()),
                param(randn(&[d], 0.2)),
            ],
            &|a| ops::layer_norm(&a[0], &a[1], &a[2], 1e-5).unwrap(),
            &|a| composed::layer_norm(&a[0], &a[1], &a[2], 1e-5).unwrap(),
            FWD,
            GRAD,
        );
    }
}

#[test]
fn rms_norm_composed_equals_the_kernel() {
    for (shape, trains) in [
        (&[2, 5, 16][..], true),
        (&[3, 7, 19], true),
        (&[1, 19], false),
    ] {
        let d = shape[shape.len() - 1];
        let w = (randn(&[d], 0.3) + 1.0).unwrap();
        check(
            &format!("rms norm {shape:?}"),
            &[
                var((randn(shape, 2.0) + 0.5).unwrap()),
                if trains { var(w) } else { fixed(w) },
            ],
            &|a| lm_ops::rms_norm(&a[0], &a[1], 1e-5).unwrap(),
            &|a| composed::rms_norm(&a[0], &a[1], 1e-5).unwrap(),
            FWD,
            GRAD,
        );
    }
}

#[test]
fn rope_composed_equals_the_kernel() {
    for (b, t, h, d) in [(2, 5, 3, 8), (1, 7, 2, 6), (3, 1, 1, 2)] {
        let ang = randn(&[t, d / 2], 2.0);
        check(
            &format!("rope b{b} t{t} h{h} d{d}"),
            &[
                var(randn(&[b, t, h, d], 1.0)),
                fixed(ang.cos().unwrap()),
                fixed(ang.sin().unwrap()),
            ],
            &|a| lm_ops::rope_heads(&a[0], &a[1], &a[2]).unwrap(),
            &|a| composed::rope_heads(&a[0], &a[1], &a[2]).unwrap(),
            FWD,
            GRAD,
        );
    }
}

#[test]
fn swiglu_composed_equals_the_kernel() {
    for shape in [&[4, 37][..], &[2, 3, 5]] {
        check(
            &format!("swiglu {shape:?}"),
            &[var(randn(shape, 3.0)), var(randn(shape, 1.0))],
            &|a| lm_ops::swiglu(&a[0], &a[1]).unwrap(),
            &|a| composed::swiglu(&a[0], &a[1]).unwrap(),
            FWD,
            GRAD,
        );
    }
}

#[test]
fn swiglu_down_equals_the_composed_gate_then_the_layer_for_dense_and_packed_weights() {
    use candle_core::quantized::{GgmlDType, QTensor};
    use peft_studio::peft::{AdaptedLinear, PackedWeight};
    let w = randn(&[24, 64], 0.2);
    let packed = PackedWeight::new(QTensor::quantize(&w, GgmlDType::Q8_0).unwrap()).unwrap();
    // The layer on the inputs' device: the dense weight moved there, the packed one kept as
    // stored (its product dequantizes onto the input's device).
    let layer = |is_packed: bool, device: &Device| {
        if is_packed {
            AdaptedLinear::new_packed("down", packed.clone(), None)
        } else {
            AdaptedLinear::new("down", w.to_device(device).unwrap(), None)
        }
    };
    for is_packed in [false, true] {
        check(
            &format!("swiglu down (packed {is_packed})"),
            &[var(randn(&[2, 3, 64], 2.0)), var(randn(&[2, 3, 64], 1.0))],
            &|a| {
                let down = layer(is_packed, a[0].device());
                lm_ops::swiglu_down(&a[0], &a[1], &down, true).unwrap()
            },
            &|a| {
                let down = layer(is_packed, a[0].device());
                down.forward_t(&composed::swiglu(&a[0], &a[1]).unwrap(), true)
                    .unwrap()
            },
            FWD_LONG,
            GRAD,
        );
    }
}

#[test]
fn cross_entropy_composed_equals_the_kernel_and_rejects_the_same_targets() {
    for (n, v) in [(6, 41), (1, 3), (33, 7)] {
        let t: Vec<u32> = (0..n as u32).map(|i| (i * 5 + 2) % v as u32).collect();
        check(
            &format!("cross-entropy {n}×{v}"),
            &[
                var(randn(&[n, v], 3.0)),
                fixed(Tensor::new(t.as_slice(), &Device::Cpu).unwrap()),
            ],
            &|a| lm_ops::cross_entropy(&a[0], &a[1]).unwrap(),
            &|a| composed::cross_entropy(&a[0], &a[1]).unwrap(),
            FWD,
            GRAD,
        );
    }
    // The class ids must lie inside the vocabulary on both paths (no ignored index: every row
    // counts).
    let logits = randn(&[3, 5], 1.0);
    let bad = Tensor::new(&[0u32, 5, 1], &Device::Cpu).unwrap();
    for e in [
        lm_ops::cross_entropy(&logits, &bad).unwrap_err(),
        composed::cross_entropy(&logits, &bad).unwrap_err(),
    ] {
        assert!(
            e.to_string().contains("target 5 is outside the 5 classes"),
            "{e}"
        );
    }
}

#[test]
fn frozen_head_cross_entropy_composed_equals_the_kernel() {
    // 300 rows: past one block of the fused kernel, the last one partial.
    for (n, h, v) in [(13, 12, 37), (300, 12, 37)] {
        let t: Vec<u32> = (0..n as u32).map(|i| (i * 7) % v as u32).collect();
        check(
            &format!("frozen head cross-entropy {n}×{h}, {v} classes"),
            &[
                var(randn(&[n, h], 1.0)),
                fixed(randn(&[v, h], 0.5)),
                fixed(Tensor::new(t.as_slice(), &Device::Cpu).unwrap()),
            ],
            &|a| lm_ops::frozen_head_cross_entropy(&a[0], &a[1], &a[2]).unwrap(),
            &|a| composed::frozen_head_cross_entropy(&a[0], &a[1], &a[2]).unwrap(),
            FWD_LONG,
            GRAD,
        );
    }
    // The head's weight gets no gradient on the composed path either.
    let w = candle_core::Var::from_tensor(&randn(&[5, 4], 0.5)).unwrap();
    let x = candle_core::Var::from_tensor(&randn(&[3, 4], 1.0)).unwrap();
    let t = Tensor::new(&[0u32, 4, 2], &Device::Cpu).unwrap();
    let loss = composed::frozen_head_cross_entropy(x.as_tensor(), w.as_tensor(), &t).unwrap();
    let g = loss.backward().unwrap();
    assert!(g.get(&x).is_some() && g.get(&w).is_none());
}

#[test]
fn causal_attention_composed_equals_the_kernel_with_gqa_padding_and_windows() {
    let pad = |b: usize, t: usize, padded: usize| {
        let mut m = vec![1f32; b * t];
        // The first sequence's last `padded` keys are padding.
        m[t - padded..t].iter_mut().for_each(|x| *x = 0.0);
        Tensor::from_vec(m, (b, t), &Device::Cpu).unwrap()
    };
    // (B, H, H_kv, T, d), padded keys of the first sequence, window.
    let cases = [
        (2, 6, 2, 7, 8, Some(2), None),
        (2, 6, 2, 7, 8, Some(2), Some(3)),
        (1, 3, 1, 5, 4, None, None),
        (2, 4, 4, 9, 6, None, Some(1)),
        (1, 2, 2, 1, 2, None, None),
        // Every key of the first sequence padded but the first.
        (3, 5, 5, 6, 3, Some(5), None),
    ];
    for (b, h, hkv, t, d, padded, window) in cases {
        let mut inputs = vec![
            var(randn(&[b, h, t, d], 1.0)),
            var(randn(&[b, hkv, t, d], 1.0)),
            var(randn(&[b, hkv, t, d], 1.0)),
        ];
        inputs.extend(padded.map(|p| fixed(pad(b, t, p))));
        check(
            &format!("attention b{b} h{h}/{hkv} t{t} d{d} pad {padded:?} window {window:?}"),
            &inputs,
            &|a| attention::causal_attention(&a[0], &a[1], &a[2], a.get(3), 0.35, window).unwrap(),
            &|a| composed::causal_attention(&a[0], &a[1], &a[2], a.get(3), 0.35, window).unwrap(),
            FWD_LONG,
            GRAD,
        );
    }
}

#[test]
fn entry_functions_keep_taking_the_composed_path_for_other_dtypes() {
    // Half inputs on the CPU never reach an f32 kernel: they compose, as on a GPU.
    let x = randn(&[3, 9], 1.0);
    let h = x.to_dtype(DType::BF16).unwrap();
    let want = ops::softmax_last_dim(&x).unwrap();
    assert_close(
        "bf16 softmax",
        &ops::softmax_last_dim(&h).unwrap(),
        &want,
        1e-2,
    );
    assert_close(
        "bf16 gelu",
        &ops::gelu_erf(&h).unwrap(),
        &ops::gelu_erf(&x).unwrap(),
        2e-2,
    );
}

//! The GPU paths of the adapters' fused products (`peft::frozen`, `peft::packed`,
//! `peft::diagonal`): each composition of standard candle ops equals the fused CPU op, forward
//! and gradients, and gives no gradient to a frozen weight or bias (even a `Var`); each entry
//! function gives the CPU op's result on every test device. The fused LoRA op's composition is checked by the
//! unit tests of `peft::fused_lora`.

mod gpu_path_support;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor, Var};
use gpu_path_support::{assert_close, check, fixed, randn, rel_err, var};
use peft_studio::peft::diagonal::Scale;
use peft_studio::peft::frozen::{frozen_linear_bias, frozen_linear_composed};
use peft_studio::peft::packed::packed_linear_composed;
use peft_studio::peft::{
    AdaptedLinear, Adapter, AdapterConfig, DiagonalAdapter, FrozenGrad, MatmulPrecision,
    MatmulPrecisionGuard, Method, PackedWeight, frozen_linear, packed_linear,
};

/// Relative forward tolerance of the products.
const FWD: f32 = 1e-4;
/// Relative gradient tolerance.
const GRAD: f32 = 1e-4;

#[test]
fn the_frozen_product_composed_equals_the_kernel_and_trains_neither_weight_nor_bias() {
    for (x_shape, m) in [(&[2, 5, 24][..], 12), (&[7, 13], 5), (&[1, 3], 1)] {
        let n = x_shape[x_shape.len() - 1];
        check(
            &format!("frozen linear {x_shape:?} → {m}"),
            &[var(randn(x_shape, 1.0)), fixed(randn(&[m, n], 0.3))],
            &|a| frozen_linear(&a[0], &a[1], FrozenGrad::Skip).unwrap(),
            &|a| frozen_linear_composed(&a[0], &a[1], None).unwrap(),
            FWD,
            GRAD,
        );
        check(
            &format!("frozen linear with bias {x_shape:?} → {m}"),
            &[
                var(randn(x_shape, 1.0)),
                fixed(randn(&[m, n], 0.3)),
                fixed(randn(&[m], 1.0)),
            ],
            &|a| frozen_linear_bias(&a[0], &a[1], &a[2], FrozenGrad::Skip).unwrap(),
            &|a| frozen_linear_composed(&a[0], &a[1], Some(&a[2])).unwrap(),
            FWD,
            GRAD,
        );
    }
    // A weight and bias that are Vars get no gradient from the composed product.
    let w = Var::from_tensor(&randn(&[4, 6], 0.3)).unwrap();
    let b = Var::from_tensor(&randn(&[4], 0.3)).unwrap();
    let x = Var::from_tensor(&randn(&[3, 6], 1.0)).unwrap();
    let y = frozen_linear_composed(x.as_tensor(), w.as_tensor(), Some(b.as_tensor())).unwrap();
    let g = y.sum_all().unwrap().backward().unwrap();
    assert!(g.get(&x).is_some() && g.get(&w).is_none() && g.get(&b).is_none());
}

#[test]
fn the_bf16_frozen_product_follows_the_f32_one_and_differs_from_it() {
    let x = randn(&[40, 48], 1.0);
    let w = randn(&[20, 48], 0.3);
    let f32_y = frozen_linear(&x, &w, FrozenGrad::Skip).unwrap();
    let _bf16 = MatmulPrecisionGuard::set(MatmulPrecision::Bf16);
    let bf16_y = frozen_linear_composed(&x, &w, None).unwrap();
    assert_eq!(bf16_y.dtype(), candle_core::DType::F32);
    let e = rel_err(&bf16_y, &f32_y);
    assert!(e < 2e-2, "bf16 differs from f32 by {e}");
    assert!(e > 1e-7, "the bf16 product ran in f32");
    // Gradients (x's only) in mixed-precision tolerance; on a GPU the entry runs the bf16 path.
    check(
        "bf16 frozen linear",
        &[var(x), fixed(w)],
        &|a| frozen_linear(&a[0], &a[1], FrozenGrad::Skip).unwrap(),
        &|a| frozen_linear_composed(&a[0], &a[1], None).unwrap(),
        2e-2,
        2e-2,
    );
}

#[test]
fn the_packed_product_composed_equals_the_kernel() {
    for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_0, GgmlDType::F16] {
        let w = randn(&[11, 64], 0.2);
        let p = PackedWeight::new(QTensor::quantize(&w, dtype).unwrap()).unwrap();
        for shape in [&[2, 3, 64][..], &[5, 64]] {
            check(
                &format!("packed linear {dtype:?} {shape:?}"),
                &[var(randn(shape, 1.0))],
                &|a| packed_linear(&a[0], &p).unwrap(),
                &|a| packed_linear_composed(&a[0], &p).unwrap(),
                FWD,
                GRAD,
            );
        }
        // The dequantized weight on a device is the CPU's.
        for device in peft_studio::device::test_devices() {
            assert_close(
                "dequantized weight",
                &p.dequantize_on(&device).unwrap(),
                &p.dequantize().unwrap(),
                0.0,
            );
        }
    }
}

/// The adapter with its tensors on `device` and fresh Vars for z and a trainable scale.
fn diagonal_on(d: &DiagonalAdapter, device: &Device) -> DiagonalAdapter {
    let mv = |t: &Tensor| t.to_device(device).unwrap();
    DiagonalAdapter {
        left: mv(&d.left),
        right: mv(&d.right),
        z: Var::from_tensor(&mv(d.z.as_tensor())).unwrap(),
        z0: mv(&d.z0),
        scale: match &d.scale {
            Scale::Fixed(s) => Scale::Fixed(*s),
            Scale::Trainable(v) => Scale::Trainable(Var::from_tensor(&mv(v.as_tensor())).unwrap()),
        },
        ..d.clone()
    }
}

/// The merged forward's output and the gradients of x, z and the scale (when it trains) of
/// `Σ y⊙r`, on the CPU.
fn merged_run(
    d: &DiagonalAdapter,
    x: &Tensor,
    w_res: &Tensor,
    bias: Option<&Tensor>,
    r: &Tensor,
    composed: bool,
) -> (Tensor, Vec<Tensor>) {
    let dev = x.device();
    let x = Var::from_tensor(x).unwrap();
    let (w_res, bias) = (
        w_res.to_device(dev).unwrap(),
        bias.map(|b| b.to_device(dev).unwrap()),
    );
    let y = if composed {
        d.merged_forward_composed(x.as_tensor(), &w_res, bias.as_ref())
    } else {
        d.merged_forward(x.as_tensor(), &w_res, bias.as_ref())
    }
    .unwrap();
    let g = (&y * r.to_device(dev).unwrap())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let mut vars = vec![x, d.z.clone()];
    vars.extend(d.vars().into_iter().skip(1).map(|(_, v)| v));
    let cpu = |t: &Tensor| t.to_device(&Device::Cpu).unwrap();
    let grads = vars
        .iter()
        .map(|v| cpu(g.get(v).expect("a trained tensor got no gradient")))
        .collect();
    (cpu(&y), grads)
}

#[test]
fn the_merged_diagonal_forward_composed_equals_the_kernel() {
    let cpu = Device::Cpu;
    for (method, trainable_scale, with_bias) in [
        (Method::Svfit, true, true),
        (Method::Loldu, false, false),
        (Method::Loldu, true, true),
    ] {
        let (m, n, rows) = (13, 9, 11);
        let w = randn(&[m, n], 0.3);
        let b = with_bias.then(|| randn(&[m], 0.1));
        let mut layer = AdaptedLinear::new("q", w, b.clone());
        let mut cfg = AdapterConfig::new(method, n);
        cfg.trainable_scale = trainable_scale;
        layer.attach(&cfg).unwrap();
        let Some(Adapter::Diagonal(d)) = layer.adapter() else {
            panic!("no diagonal adapter");
        };
        d.z.set(&(d.z.as_tensor() * 1.3).unwrap()).unwrap();
        let w_res = layer.base_weight().unwrap().into_owned();
        let x = randn(&[rows, n], 1.0);
        let r = randn(&[rows, m], 1.0);
        let what = format!("{method:?} (scale trains {trainable_scale}, bias {with_bias})");
        let (want, want_g) = merged_run(&diagonal_on(d, &cpu), &x, &w_res, b.as_ref(), &r, false);
        let mut runs = vec![(
            "composed, cpu".to_string(),
            merged_run(&diagonal_on(d, &cpu), &x, &w_res, b.as_ref(), &r, true),
        )];
        for device in peft_studio::device::test_devices() {
            let dd = diagonal_on(d, &device);
            let xd = x.to_device(&device).unwrap();
            runs.push((
                format!("entry, {}", peft_studio::device::label(&device)),
                merged_run(&dd, &xd, &w_res, b.as_ref(), &r, false),
            ));
        }
        for (label, (y, g)) in runs {
            assert_close(&format!("{what} {label} output"), &y, &want, FWD);
            assert_eq!(g.len(), want_g.len());
            for (i, (a, b)) in g.iter().zip(&want_g).enumerate() {
                assert_close(&format!("{what} {label} gradient {i}"), a, b, GRAD);
            }
        }
    }
}

/// The GPU's mixed-precision storage: a frozen base kept in bf16 (half its bytes) gives the f32
/// layer's output within bf16 rounding, in either product precision, the adapter still trains
/// (its gradients follow the f32 layer's), and the output head and trainable weights stay f32.
#[test]
fn a_frozen_base_stored_in_bf16_matches_f32_and_the_adapter_still_trains() {
    use peft_studio::peft::linear::{LinearLayers, store_frozen_weights, trainable_vars};
    struct Two(Vec<AdaptedLinear>);
    impl LinearLayers for Two {
        fn linears(&self) -> Vec<&AdaptedLinear> {
            self.0.iter().collect()
        }
        fn linears_mut(&mut self) -> Vec<&mut AdaptedLinear> {
            self.0.iter_mut().collect()
        }
    }
    let (m, n) = (24, 40);
    let w = randn(&[m, n], 0.3);
    let x = randn(&[3, 5, n], 1.0);
    let bias = randn(&[m], 0.1);
    let lora_b = randn(&[m, 4], 0.2);
    let layers = |bf16: bool| {
        let mut set = Two(vec![
            AdaptedLinear::new("q_proj".to_string(), w.clone(), Some(bias.clone())),
            AdaptedLinear::new("lm_head".to_string(), w.clone(), None),
        ]);
        let mut cfg = AdapterConfig::new(Method::Lora, 4);
        cfg.targets = peft_studio::peft::Targets::List(vec!["q_proj".into()]);
        peft_studio::peft::linear::attach_adapters(&mut set, &cfg).unwrap();
        for (name, v) in trainable_vars(&set) {
            if name.ends_with("lora_B") {
                v.set(&lora_b).unwrap();
            }
        }
        let saved = if bf16 {
            store_frozen_weights(&mut set, candle_core::DType::BF16).unwrap()
        } else {
            0
        };
        (set, saved)
    };
    let (f32_set, _) = layers(false);
    let (bf16_set, saved) = layers(true);
    assert_eq!(saved, m * n * 2, "only q_proj's weight is converted");
    assert_eq!(
        bf16_set.0[0].base_weight().unwrap().dtype(),
        candle_core::DType::BF16
    );
    assert_eq!(
        bf16_set.0[1].base_weight().unwrap().dtype(),
        candle_core::DType::F32,
        "the output head stays f32"
    );
    for precision in [MatmulPrecision::F32, MatmulPrecision::Bf16] {
        let _p = MatmulPrecisionGuard::set(precision);
        let run = |set: &Two| {
            let y = set.0[0].forward_t(&x, true).unwrap();
            assert_eq!(y.dtype(), candle_core::DType::F32);
            let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            let g: Vec<Tensor> = trainable_vars(set)
                .iter()
                .map(|(_, v)| grads.get(v).expect("the adapter gets a gradient").clone())
                .collect();
            (y, g)
        };
        let (y32, g32) = run(&f32_set);
        let (y16, g16) = run(&bf16_set);
        assert_close(&format!("output, {precision:?}"), &y16, &y32, 2e-2);
        for (a, b) in g16.iter().zip(&g32) {
            assert_close(&format!("adapter gradient, {precision:?}"), a, b, 3e-2);
        }
    }
}

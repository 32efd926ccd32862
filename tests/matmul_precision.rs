//! `model.matmul_precision = "bf16"`: the frozen base's products in bf16 with f32 sums on Intel
//! AMX or AVX512-BF16. Where the CPU has either, a run's losses follow the f32 run's within mixed-precision
//! tolerance and differ from them (the bf16 path ran); elsewhere the setting falls back to f32
//! (identical losses) and the log says why.

mod common;

use common::chat::{chat_model, config, yes_data};

use candle_core::{Device, Tensor, Var};
use peft_studio::bf16_gemm;
use peft_studio::peft::{FrozenGrad, MatmulPrecision, MatmulPrecisionGuard, frozen_linear};
use peft_studio::train::{Event, NeverStop, RunStore, train};

#[test]
fn a_bf16_run_follows_the_f32_run_and_says_what_the_cpu_runs() {
    let dir = common::TempDir::new("bf16-run");
    let model = chat_model(&dir.path("model"));
    let data = yes_data(&dir.0);
    let f32_cfg = config(&model, &data, 6);
    let mut bf16_cfg = f32_cfg.clone();
    bf16_cfg.model.matmul_precision = MatmulPrecision::Bf16;

    let store = RunStore::new(dir.path("runs"));
    let plain = train(&f32_cfg, &store, &mut NeverStop, &mut |_| {}).unwrap();
    let mut logs = Vec::new();
    let bf16 = train(&bf16_cfg, &store, &mut NeverStop, &mut |e| {
        if let Event::Log(l) = e {
            logs.push(l)
        }
    })
    .unwrap();
    let (a, b) = (
        common::step_losses(&store, &plain.id),
        common::step_losses(&store, &bf16.id),
    );
    assert_eq!((a.len(), b.len()), (6, 6));
    let said = logs
        .iter()
        .find(|l| l.contains("model.matmul_precision"))
        .unwrap_or_else(|| panic!("no precision line in {logs:?}"));
    if let Some(kernel) = bf16_gemm::kernel() {
        assert!(
            said.contains(&format!("bf16 on {}", kernel.name())),
            "{said}"
        );
        assert!(
            a.iter().zip(&b).any(|(x, y)| x != y),
            "bf16 losses are the f32 ones: the bf16 path did not run"
        );
        // The first step starts from the same weights: only rounding separates the losses.
        // Later steps follow diverging (high learning-rate) trajectories, so looser, and the
        // bf16 run must learn as the f32 run does.
        assert!(
            (a[0] - b[0]).abs() <= 0.01 * a[0],
            "f32 {a:?} vs bf16 {b:?}"
        );
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 0.1 * x.abs(), "f32 {a:?} vs bf16 {b:?}");
        }
        assert!(b[5] < 0.5 * b[0], "the bf16 run did not learn: {b:?}");
    } else {
        assert!(said.contains("neither AMX nor AVX512-BF16"), "{said}");
        for (x, y) in a.iter().zip(&b) {
            assert!(
                (x - y).abs() < 1e-9,
                "without a bf16 kernel bf16 runs f32: {a:?} vs {b:?}"
            );
        }
    }
}

fn values(shape: (usize, usize), seed: u64) -> Tensor {
    let n = shape.0 * shape.1;
    let v: Vec<f32> = (0..n)
        .map(|i| {
            let h = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed;
            ((h >> 40) % 2001) as f32 / 1000.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// (y, dx, dw) of `sum(y ⊙ g)` with y = x·Wᵀ for a trainable W (full fine-tuning's product)
/// under `precision`.
fn trainable_product_and_grads(precision: MatmulPrecision) -> [Vec<f32>; 3] {
    let _guard = MatmulPrecisionGuard::set(precision);
    let x = Var::from_tensor(&values((40, 48), 1)).unwrap();
    let w = Var::from_tensor(&values((24, 48), 2)).unwrap();
    let g = values((40, 24), 3);
    let y = frozen_linear(x.as_tensor(), w.as_tensor(), FrozenGrad::Plain).unwrap();
    let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    [
        flat(&y),
        flat(grads.get(x.as_tensor()).unwrap()),
        flat(grads.get(w.as_tensor()).unwrap()),
    ]
}

/// Full fine-tuning's products: in f32 exactly candle's matmul; in bf16 (where the CPU has a
/// kernel) the product and both gradients within bf16's precision of the f32 ones, and not
/// equal to them (the bf16 path ran).
#[test]
fn a_trainable_weight_s_bf16_product_and_gradients_follow_the_f32_ones() {
    let f32_run = trainable_product_and_grads(MatmulPrecision::F32);
    let want = values((40, 48), 1)
        .matmul(&values((24, 48), 2).t().unwrap())
        .unwrap();
    assert_eq!(
        f32_run[0],
        want.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
    if !bf16_gemm::available() {
        eprintln!("skipped the bf16 part: this CPU has neither AMX nor AVX512-BF16");
        return;
    }
    let bf16_run = trainable_product_and_grads(MatmulPrecision::Bf16);
    for (what, (a, b)) in ["y", "dx", "dw"].iter().zip(f32_run.iter().zip(&bf16_run)) {
        let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = a.iter().zip(b).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
        // bf16 operands: 8 significant bits, about 2⁻⁸ of the terms' size per product.
        assert!(worst <= 0.02 * scale, "{what}: {worst} against {scale}");
        assert!(a != b, "{what}: the bf16 path did not run");
    }
}

/// (y, dx, dz) of `sum(y ⊙ g)` for a full-rank diagonal adapter (SVFit or LoLDU) on its
/// merged path (one product with the weight formed per step) under `precision`.
fn diagonal_product_and_grads(
    method: peft_studio::peft::Method,
    precision: MatmulPrecision,
) -> [Vec<f32>; 3] {
    use peft_studio::peft::{AdaptedLinear, Adapter, AdapterConfig};
    let _guard = MatmulPrecisionGuard::set(precision);
    let mut layer = AdaptedLinear::new("q", values((32, 32), 4), None);
    layer.attach(&AdapterConfig::new(method, 32)).unwrap();
    let Some(Adapter::Diagonal(d)) = layer.adapter() else {
        panic!("no diagonal adapter");
    };
    // Away from z₀, so the learned part of the weight is live.
    d.z.set(&(d.z.as_tensor() * 1.3).unwrap()).unwrap();
    let x = Var::from_tensor(&values((96, 32), 5)).unwrap();
    let g = values((96, 32), 6);
    let y = layer.forward(x.as_tensor()).unwrap();
    let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    [
        flat(&y),
        flat(grads.get(x.as_tensor()).unwrap()),
        flat(grads.get(&d.z).unwrap()),
    ]
}

/// SVFit's and LoLDU's merged step in bf16 (the formed weight, its product and z's gradient
/// products, as autocast would run them): within bf16's precision of the f32 step, and not
/// equal to it (the bf16 path ran).
#[test]
fn a_diagonal_adapter_s_bf16_step_follows_the_f32_one() {
    use peft_studio::peft::Method;
    if !bf16_gemm::available() {
        eprintln!("skipped: this CPU has neither AMX nor AVX512-BF16");
        return;
    }
    for method in [Method::Svfit, Method::Loldu] {
        let f32_run = diagonal_product_and_grads(method, MatmulPrecision::F32);
        let bf16_run = diagonal_product_and_grads(method, MatmulPrecision::Bf16);
        for (what, (a, b)) in ["y", "dx", "dz"].iter().zip(f32_run.iter().zip(&bf16_run)) {
            let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
            let worst = a.iter().zip(b).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
            assert!(
                worst <= 0.02 * scale,
                "{method:?} {what}: {worst} against {scale}"
            );
            assert!(a != b, "{method:?} {what}: the bf16 path did not run");
        }
    }
}

//! The adapters' contract from METHODS.md: output preserved at init, merge = unmerged,
//! unmerge restores, disable gives the pre-trained layer, the LoRA export reproduces the
//! learned change, only adapter variables train, gradients match finite differences.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::*;
use peft_studio::peft::diagonal::Scale;
use peft_studio::peft::{Adapter, AdapterConfig, FrozenGrad, Init, Method, frozen_linear};

/// Moves every trainable variable away from its start so the adapter does something.
fn perturb(layer: &peft_studio::peft::AdaptedLinear, seed: u64) {
    for (i, (_, v)) in layer.trainable_vars().into_iter().enumerate() {
        let noise = randn(v.dims(), 0.3, seed + i as u64);
        v.set(&(v.as_tensor() + noise).unwrap()).unwrap();
    }
}

#[test]
fn every_init_preserves_the_base_output() {
    for (m, n) in [(24, 16), (16, 24), (20, 20)] {
        for (method, init) in every_method_and_init() {
            for r in [1, 4, m.min(n)] {
                let mut l = layer(m, n, 7);
                let x = randn(&[3, 5, n], 1.0, 8);
                let before = l.forward(&x).unwrap();
                l.attach(&config(method, init, r)).unwrap();
                let after = l.forward(&x).unwrap();
                let err = rel_err(&after, &before);
                assert!(err < 1e-5, "{method}/{init} r={r} {m}×{n}: {err}");
            }
        }
    }
}

#[test]
fn merge_unmerge_disable_and_export() {
    for (method, init) in every_method_and_init() {
        for trainable_scale in [false, true] {
            if method == Method::Lora && trainable_scale {
                continue;
            }
            let mut l = layer(18, 12, 3);
            let x = randn(&[7, 12], 1.0, 4);
            let pre = l.forward(&x).unwrap();
            let w_pre = l.base_weight().unwrap().into_owned();
            let mut cfg = config(method, init, 5);
            cfg.trainable_scale = trainable_scale;
            l.attach(&cfg).unwrap();
            perturb(&l, 11);
            let unmerged = l.forward(&x).unwrap();
            let base_unmerged = l.base_weight().unwrap().into_owned();
            let tag = format!("{method}/{init} trainable_scale={trainable_scale}");
            assert!(
                rel_err(&unmerged, &pre) > 1e-2,
                "{tag}: the perturbation changed nothing"
            );

            // delta_weight is W_eff − W, and the PEFT export reproduces it.
            let delta = l.delta_weight().unwrap();
            let w_eff = l.effective_weight().unwrap();
            assert!(
                rel_err(&(&w_pre + &delta).unwrap(), &w_eff) < 1e-5,
                "{tag}: W + ΔW ≠ W_eff"
            );
            let (b, a) = l.adapter().unwrap().lora_form().unwrap();
            assert!(
                rel_err(&b.matmul(&a).unwrap(), &delta) < 1e-5,
                "{tag}: export ≠ ΔW"
            );
            let bias = l.bias().unwrap().clone();
            let direct = x
                .matmul(&w_eff.t().unwrap())
                .unwrap()
                .broadcast_add(&bias)
                .unwrap();
            assert!(
                rel_err(&unmerged, &direct) < 1e-5,
                "{tag}: forward ≠ x·W_effᵀ"
            );

            l.merge().unwrap();
            assert!(l.is_merged());
            assert!(
                rel_err(&l.forward(&x).unwrap(), &unmerged) < 1e-5,
                "{tag}: merged ≠ unmerged"
            );
            l.unmerge().unwrap();
            assert!(
                rel_err(l.base_weight().unwrap().as_ref(), &base_unmerged) < 1e-6,
                "{tag}: unmerge did not restore"
            );
            assert!(rel_err(&l.forward(&x).unwrap(), &unmerged) < 1e-5, "{tag}");

            l.set_disabled(true).unwrap();
            assert!(
                rel_err(&l.forward(&x).unwrap(), &pre) < 1e-5,
                "{tag}: disable ≠ pre-trained"
            );
            assert!(
                rel_err(&l.pretrained_weight().unwrap(), &w_pre) < 1e-5,
                "{tag}"
            );
            l.set_disabled(false).unwrap();
            assert!(
                rel_err(&l.forward(&x).unwrap(), &unmerged) < 1e-5,
                "{tag}: re-enable"
            );

            l.detach().unwrap();
            assert!(
                rel_err(l.base_weight().unwrap().as_ref(), &w_pre) < 1e-5,
                "{tag}: detach"
            );
        }
    }
}

#[test]
fn only_adapter_variables_receive_gradients() {
    for method in Method::ALL {
        let mut l = layer(10, 8, 5);
        let mut cfg = AdapterConfig::new(method, 3);
        cfg.trainable_scale = method != Method::Lora;
        l.attach(&cfg).unwrap();
        let x = Var::from_tensor(&randn(&[4, 8], 1.0, 6)).unwrap();
        let loss = l
            .forward(x.as_tensor())
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        let vars = l.trainable_vars();
        // LoRA: A and B; SVFit/LoLDU: z and the trainable scale.
        assert_eq!(vars.len(), 2);
        for (name, v) in &vars {
            assert!(grads.get(v).is_some(), "{method}: {name} got no gradient");
        }
        assert!(
            grads.get(x.as_tensor()).is_some(),
            "{method}: input got no gradient"
        );
        // The frozen tensors are not variables and get no gradient entry.
        assert!(grads.get(l.base_weight().unwrap().as_ref()).is_none());
        if let Some(Adapter::Diagonal(d)) = l.adapter() {
            assert!(grads.get(&d.left).is_none() && grads.get(&d.right).is_none());
        }
        let n_trainable = l.trainable_count();
        let want = cfg.trainable_for(10, 8, 3);
        assert_eq!(n_trainable, want, "{method}");
    }
}

/// L = Σ g ⊙ tanh(y): non-linear, so finite differences test more than linearity.
fn loss(l: &peft_studio::peft::AdaptedLinear, x: &Tensor, g: &Tensor) -> Tensor {
    (l.forward(x).unwrap().tanh().unwrap() * g)
        .unwrap()
        .sum_all()
        .unwrap()
}

#[test]
fn gradients_match_central_finite_differences() {
    for method in Method::ALL {
        let mut l = layer(9, 7, 21);
        let mut cfg = AdapterConfig::new(method, 3);
        cfg.alpha = Some(6.0);
        cfg.trainable_scale = method != Method::Lora;
        l.attach(&cfg).unwrap();
        perturb(&l, 40);
        let x = randn(&[4, 7], 0.5, 22);
        let g = randn(&[4, 9], 1.0, 23);
        let grads = loss(&l, &x, &g).backward().unwrap();
        for (name, var) in l.trainable_vars() {
            let analytic = grads
                .get(&var)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let start = var
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let eps = 1e-2f32;
            let mut worst = 0.0f32;
            let scale = analytic.iter().map(|a| a.abs()).fold(1e-3, f32::max);
            for i in 0..start.len() {
                let at = |delta: f32| {
                    let mut v = start.clone();
                    v[i] += delta;
                    var.set(&Tensor::from_vec(v, var.dims(), &Device::Cpu).unwrap())
                        .unwrap();
                    loss(&l, &x, &g)
                        .to_dtype(DType::F64)
                        .unwrap()
                        .to_scalar::<f64>()
                        .unwrap()
                };
                let fd = ((at(eps) - at(-eps)) / (2.0 * eps as f64)) as f32;
                worst = worst.max((fd - analytic[i]).abs() / scale);
            }
            var.set(&Tensor::from_vec(start, var.dims(), &Device::Cpu).unwrap())
                .unwrap();
            assert!(
                worst < 5e-3,
                "{method} {name}: finite differences off by {worst}"
            );
        }
    }
}

#[test]
fn frozen_op_gives_the_same_gradients_as_plain_matmul() {
    let mut grads_by_mode = Vec::new();
    for mode in [FrozenGrad::Plain, FrozenGrad::Skip] {
        let set = peft_studio::bench::lora_stack(
            peft_studio::bench::StackShape {
                width: 32,
                layers: 3,
                batch: 2,
                tokens: 5,
            },
            mode,
            3,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let x = randn(&[2, 5, 32], 1.0, 4);
        let loss = peft_studio::bench::stack_forward(&set, &x)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        let mut gs = Vec::new();
        for (name, v) in peft_studio::peft::linear::trainable_vars(&set) {
            gs.push((name, grads.get(&v).unwrap().clone()));
        }
        grads_by_mode.push(gs);
    }
    assert_eq!(grads_by_mode[0].len(), 6);
    for ((name, a), (_, b)) in grads_by_mode[0].iter().zip(&grads_by_mode[1]) {
        let err = rel_err(a, b);
        assert!(err < 1e-6, "{name}: {err}");
        assert!(
            a.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0
        );
    }
    // And the input gradient of the op itself equals matmul's.
    let w = randn(&[6, 4], 1.0, 1);
    let x = Var::from_tensor(&randn(&[3, 2, 4], 1.0, 2)).unwrap();
    let plain = frozen_linear(x.as_tensor(), &w, FrozenGrad::Plain).unwrap();
    let skip = frozen_linear(x.as_tensor(), &w, FrozenGrad::Skip).unwrap();
    assert!(rel_err(&plain, &skip) < 1e-7);
    let gp = plain.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    let gs = skip.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    assert!(rel_err(gs.get(&x).unwrap(), gp.get(&x).unwrap()) < 1e-6);
}

#[test]
fn trainable_scale_and_relu_behave() {
    let mut l = layer(8, 8, 2);
    let mut cfg = AdapterConfig::new(Method::Svfit, 8);
    cfg.trainable_scale = true;
    cfg.relu = true;
    l.attach(&cfg).unwrap();
    assert_eq!(l.trainable_count(), 9);
    let Some(Adapter::Diagonal(d)) = l.adapter() else {
        panic!("not diagonal")
    };
    assert!(matches!(d.scale, Scale::Trainable(_)));
    // ReLU: a negative z contributes nothing.
    let z = d.z.as_tensor().to_vec1::<f32>().unwrap();
    let mut neg = z.clone();
    neg[0] = -5.0;
    d.z.set(&Tensor::new(neg.as_slice(), &Device::Cpu).unwrap())
        .unwrap();
    let x = randn(&[2, 8], 1.0, 3);
    let y_neg = l.forward(&x).unwrap();
    let mut zero = z.clone();
    zero[0] = 0.0;
    d.z.set(&Tensor::new(zero.as_slice(), &Device::Cpu).unwrap())
        .unwrap();
    assert!(rel_err(&l.forward(&x).unwrap(), &y_neg) < 1e-6);
}

#[test]
fn energy_threshold_picks_the_rank() {
    // A weight with singular values 10, 1, 0.1, ...: 99% of the energy is in the first.
    let u = peft_studio::peft::decompose::thin_svd(
        &peft_studio::peft::decompose::tensor_to_mat(&randn(&[6, 6], 1.0, 5)).unwrap(),
        6,
    )
    .unwrap();
    let s = [10.0, 1.0, 0.1, 0.01, 0.001, 0.0001];
    let w = faer::Mat::from_fn(6, 6, |i, j| {
        (0..6)
            .map(|k| u.u[(i, k)] * s[k] * u.v[(j, k)])
            .sum::<f64>()
    });
    let w =
        peft_studio::peft::decompose::mat_to_tensor(w.as_ref(), DType::F32, &Device::Cpu).unwrap();
    let mut l = peft_studio::peft::AdaptedLinear::new("q", w, None);
    let mut cfg = AdapterConfig::new(Method::Svfit, 6);
    cfg.energy_threshold = Some(0.99);
    l.attach(&cfg).unwrap();
    assert_eq!(l.adapter().unwrap().rank(), 1);
    cfg.energy_threshold = Some(0.9999);
    l.detach().unwrap();
    l.attach(&cfg).unwrap();
    assert_eq!(l.adapter().unwrap().rank(), 2);
}

#[test]
fn bad_input_gives_clear_errors() {
    let mut l = layer(6, 4, 1);
    let e = l
        .attach(&AdapterConfig::new(Method::Lora, 0))
        .unwrap_err()
        .to_string();
    assert!(e.contains("rank"), "{e}");
    let e = l
        .attach(&AdapterConfig::new(Method::Svfit, 5))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("block.0.attn.query") && e.contains("rank 5"),
        "{e}"
    );
    assert!(
        l.adapter().is_none(),
        "a failed attach must leave the layer as it was"
    );

    // A singular weight: LoLDU refuses with the layer's name instead of dividing by ~0.
    let mut w = randn(&[5, 5], 1.0, 2).to_vec2::<f32>().unwrap();
    w[4] = w[0].iter().zip(&w[1]).map(|(a, b)| a + b).collect();
    let w = Tensor::new(w, &Device::Cpu).unwrap();
    let mut s = peft_studio::peft::AdaptedLinear::new("enc.layer.3.value", w, None);
    let e = s
        .attach(&AdapterConfig::new(Method::Loldu, 5))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("enc.layer.3.value") && e.contains("pivot"),
        "{e}"
    );
    s.attach(&AdapterConfig::new(Method::Loldu, 4)).unwrap();

    // Targets that match nothing name what the model has.
    let mut set = peft_studio::peft::LayerSet {
        layers: vec![layer(4, 4, 1)],
    };
    let mut cfg = AdapterConfig::new(Method::Lora, 2);
    cfg.targets = peft_studio::peft::Targets::List(vec!["nope".into()]);
    let e = peft_studio::peft::linear::attach_adapters(&mut set, &cfg)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("nope") && e.contains("block.0.attn.query"),
        "{e}"
    );
    assert!(set.layers[0].adapter().is_none());
    let mut cfg = AdapterConfig::new(Method::Lora, 2);
    cfg.init = Some(Init::Lu);
    assert!(l.attach(&cfg).unwrap_err().to_string().contains("init"));
}

#[test]
fn half_precision_base_keeps_an_f32_branch() {
    let mut l = peft_studio::peft::AdaptedLinear::new(
        "q",
        randn(&[8, 6], 0.5, 1).to_dtype(DType::BF16).unwrap(),
        None,
    );
    let x = randn(&[3, 6], 1.0, 2).to_dtype(DType::BF16).unwrap();
    let before = l.forward(&x).unwrap();
    l.attach(&AdapterConfig::new(Method::Loldu, 6)).unwrap();
    let after = l.forward(&x).unwrap();
    assert_eq!(after.dtype(), DType::BF16);
    assert!(rel_err(&after, &before) < 2e-2);
    let Some(Adapter::Diagonal(d)) = l.adapter() else {
        panic!()
    };
    assert_eq!(d.z.dtype(), DType::F32);
}

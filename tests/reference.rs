//! Rust results against an independent numpy/scipy implementation of METHODS.md
//! (`scripts/reference.py`, outputs committed in `tests/data/reference.safetensors`).

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use common::rel_err;
use peft_studio::peft::decompose::{lu_truncated, mat_to_tensor, tensor_to_mat, thin_svd};
use peft_studio::peft::{AdaptedLinear, Adapter, AdapterConfig, Init, Method};

const RANK: usize = 4;
const ALPHA: f64 = 8.0;
const SHAPES: [&str; 3] = ["tall", "wide", "square"];

fn reference() -> HashMap<String, Tensor> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/reference.safetensors"
    );
    candle_core::safetensors::load(path, &Device::Cpu).expect("tests/data/reference.safetensors")
}

fn get<'a>(r: &'a HashMap<String, Tensor>, key: &str) -> &'a Tensor {
    r.get(key)
        .unwrap_or_else(|| panic!("reference lacks {key}"))
}

fn f32(t: &Tensor) -> Tensor {
    t.to_dtype(DType::F32).unwrap()
}

#[test]
fn loldu_factors_match_scipy_lu() {
    let r = reference();
    for name in SHAPES {
        let w = tensor_to_mat(get(&r, &format!("{name}.w"))).unwrap();
        let k = w.nrows().min(w.ncols());
        for rank in [RANK, k] {
            let lu = lu_truncated(&w, rank, 1e-12, None).unwrap();
            let p = format!("{name}.lu{rank}");
            let left = mat_to_tensor(lu.left.as_ref(), DType::F64, &Device::Cpu).unwrap();
            let right = mat_to_tensor(lu.right.as_ref(), DType::F64, &Device::Cpu).unwrap();
            let diag = Tensor::new(lu.diag.as_slice(), &Device::Cpu).unwrap();
            assert!(
                rel_err(&left, get(&r, &format!("{p}.left"))) < 1e-12,
                "{p}.left"
            );
            assert!(
                rel_err(&right, get(&r, &format!("{p}.right"))) < 1e-12,
                "{p}.right"
            );
            assert!(
                rel_err(&diag, get(&r, &format!("{p}.diag"))) < 1e-12,
                "{p}.diag"
            );
        }
    }
}

#[test]
fn svfit_factors_match_numpy_svd() {
    let r = reference();
    for name in SHAPES {
        let w = tensor_to_mat(get(&r, &format!("{name}.w"))).unwrap();
        let k = w.nrows().min(w.ncols());
        let svd = thin_svd(&w, k).unwrap();
        let u = mat_to_tensor(svd.u.as_ref(), DType::F64, &Device::Cpu).unwrap();
        let v = mat_to_tensor(svd.v.as_ref(), DType::F64, &Device::Cpu).unwrap();
        let s = Tensor::new(svd.s.as_slice(), &Device::Cpu).unwrap();
        assert!(
            rel_err(&s, get(&r, &format!("{name}.svd.s"))) < 1e-12,
            "{name}.s"
        );
        assert!(
            rel_err(&u, get(&r, &format!("{name}.svd.u"))) < 1e-10,
            "{name}.u"
        );
        assert!(
            rel_err(&v, get(&r, &format!("{name}.svd.v"))) < 1e-10,
            "{name}.v"
        );
    }
}

fn layer_for(r: &HashMap<String, Tensor>, name: &str, method: Method, init: Init) -> AdaptedLinear {
    let mut l = AdaptedLinear::new(
        "ref",
        f32(get(r, &format!("{name}.w"))),
        Some(f32(get(r, &format!("{name}.bias")))),
    );
    let cfg = AdapterConfig {
        method,
        rank: RANK,
        alpha: Some(ALPHA),
        init: Some(init),
        ..AdapterConfig::default()
    };
    l.attach(&cfg).unwrap();
    l
}

#[test]
fn pissa_init_matches() {
    let r = reference();
    for name in SHAPES {
        let l = layer_for(&r, name, Method::Lora, Init::Pissa);
        let Some(Adapter::Lora(a)) = l.adapter() else {
            panic!()
        };
        assert!(
            rel_err(a.a.as_tensor(), get(&r, &format!("{name}.pissa.a"))) < 1e-5,
            "{name} A"
        );
        assert!(
            rel_err(a.b.as_tensor(), get(&r, &format!("{name}.pissa.b"))) < 1e-5,
            "{name} B"
        );
        assert!(
            rel_err(
                l.base_weight().unwrap().as_ref(),
                get(&r, &format!("{name}.pissa.base"))
            ) < 1e-5,
            "{name} base"
        );
    }
}

/// Forward with `x` as a variable; returns (y, grads, x).
fn run(
    l: &AdaptedLinear,
    r: &HashMap<String, Tensor>,
    name: &str,
) -> (Tensor, candle_core::backprop::GradStore, Var) {
    let x = Var::from_tensor(&f32(get(r, &format!("{name}.x")))).unwrap();
    let y = l.forward(x.as_tensor()).unwrap();
    let loss = (&y * f32(get(r, &format!("{name}.g"))))
        .unwrap()
        .sum_all()
        .unwrap();
    (y, loss.backward().unwrap(), x)
}

#[test]
fn lora_forward_and_backward_match() {
    let r = reference();
    for name in SHAPES {
        let l = layer_for(&r, name, Method::Lora, Init::Kaiming);
        let Some(Adapter::Lora(a)) = l.adapter() else {
            panic!()
        };
        a.a.set(&f32(get(&r, &format!("{name}.lora.a")))).unwrap();
        a.b.set(&f32(get(&r, &format!("{name}.lora.b")))).unwrap();
        let (y, g, x) = run(&l, &r, name);
        let p = format!("{name}.lora");
        assert!(rel_err(&y, get(&r, &format!("{p}.y"))) < 1e-5, "{p}.y");
        assert!(
            rel_err(g.get(&a.a).unwrap(), get(&r, &format!("{p}.da"))) < 1e-5,
            "{p}.da"
        );
        assert!(
            rel_err(g.get(&a.b).unwrap(), get(&r, &format!("{p}.db"))) < 1e-5,
            "{p}.db"
        );
        assert!(
            rel_err(g.get(&x).unwrap(), get(&r, &format!("{p}.dx"))) < 1e-5,
            "{p}.dx"
        );
    }
}

#[test]
fn svfit_and_loldu_forward_and_backward_match() {
    let r = reference();
    for name in SHAPES {
        for (method, init) in [(Method::Svfit, Init::Svd), (Method::Loldu, Init::Lu)] {
            let p = format!("{name}.{method}");
            let mut l = AdaptedLinear::new(
                "ref",
                f32(get(&r, &format!("{name}.w"))),
                Some(f32(get(&r, &format!("{name}.bias")))),
            );
            let cfg = AdapterConfig {
                method,
                rank: RANK,
                alpha: Some(ALPHA),
                init: Some(init),
                trainable_scale: true,
                ..AdapterConfig::default()
            };
            l.attach(&cfg).unwrap();
            let Some(Adapter::Diagonal(d)) = l.adapter() else {
                panic!()
            };
            d.z.set(&f32(get(&r, &format!("{p}.z")))).unwrap();
            let (y, g, x) = run(&l, &r, name);
            let scale = match &d.scale {
                peft_studio::peft::diagonal::Scale::Trainable(s) => s.clone(),
                _ => panic!("scale should train"),
            };
            assert!(rel_err(&y, get(&r, &format!("{p}.y"))) < 1e-5, "{p}.y");
            assert!(
                rel_err(g.get(&d.z).unwrap(), get(&r, &format!("{p}.dz"))) < 1e-4,
                "{p}.dz"
            );
            assert!(
                rel_err(g.get(&scale).unwrap(), get(&r, &format!("{p}.ds"))) < 1e-4,
                "{p}.ds"
            );
            assert!(
                rel_err(g.get(&x).unwrap(), get(&r, &format!("{p}.dx"))) < 1e-5,
                "{p}.dx"
            );
        }
    }
}

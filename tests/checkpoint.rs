//! Saving, loading and exporting adapters.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use peft_studio::peft::checkpoint::{CONFIG_FILE, WEIGHTS_FILE};
use peft_studio::peft::linear::attach_adapters;
use peft_studio::peft::{
    AdaptedLinear, AdapterConfig, Init, LayerSet, Method, Targets, export_lora, load_adapter,
    save_adapter,
};

/// A two-block toy model with query/key/value layers.
fn model(seed: u64) -> LayerSet {
    let mut layers = Vec::new();
    for b in 0..2 {
        for (i, name) in ["query", "key", "value"].iter().enumerate() {
            let s = seed + (b * 3 + i) as u64 * 10;
            layers.push(AdaptedLinear::new(
                format!("encoder.layer.{b}.attention.self.{name}"),
                randn(&[12, 10], 0.5, s),
                Some(randn(&[12], 0.1, s + 1)),
            ));
        }
    }
    LayerSet { layers }
}

fn outputs(m: &LayerSet, x: &Tensor) -> Vec<Tensor> {
    m.layers.iter().map(|l| l.forward(x).unwrap()).collect()
}

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("peft-studio-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn perturb_all(m: &LayerSet) {
    for (i, (_, v)) in peft_studio::peft::linear::trainable_vars(m)
        .into_iter()
        .enumerate()
    {
        v.set(&(v.as_tensor() + randn(v.dims(), 0.2, 100 + i as u64)).unwrap())
            .unwrap();
    }
}

#[test]
fn save_load_round_trip_for_every_method_and_init() {
    let x = randn(&[3, 10], 1.0, 5);
    for (method, init) in every_method_and_init() {
        let mut cfg = config(method, init, 4);
        cfg.trainable_scale = method != Method::Lora;
        cfg.seed = 3;
        let mut trained = model(1);
        attach_adapters(&mut trained, &cfg).unwrap();
        perturb_all(&trained);
        let dir = tmp(&format!("{method}-{init}"));
        save_adapter(&trained, &cfg, &dir).unwrap();
        assert!(dir.join(CONFIG_FILE).is_file() && dir.join(WEIGHTS_FILE).is_file());
        assert!(
            std::fs::read_dir(&dir).unwrap().count() == 2,
            "temporary files left behind"
        );

        let mut fresh = model(1);
        let loaded_cfg = load_adapter(&mut fresh, &dir).unwrap();
        assert_eq!(loaded_cfg, cfg);
        for (a, b) in outputs(&trained, &x).iter().zip(outputs(&fresh, &x)) {
            assert!(
                rel_err(&b, a) < 1e-5,
                "{method}/{init}: reloaded output differs"
            );
        }
        assert_eq!(
            fresh
                .layers
                .iter()
                .map(|l| l.trainable_count())
                .sum::<usize>(),
            trained
                .layers
                .iter()
                .map(|l| l.trainable_count())
                .sum::<usize>()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn lora_uses_pefts_keys_and_config_fields() {
    let mut m = model(2);
    let cfg = AdapterConfig::new(Method::Lora, 4);
    attach_adapters(&mut m, &cfg).unwrap();
    let dir = tmp("peft-keys");
    save_adapter(&m, &cfg, &dir).unwrap();
    let t = candle_core::safetensors::load(dir.join(WEIGHTS_FILE), &Device::Cpu).unwrap();
    let a = &t["base_model.model.encoder.layer.1.attention.self.value.lora_A.weight"];
    let b = &t["base_model.model.encoder.layer.1.attention.self.value.lora_B.weight"];
    assert_eq!(a.dims(), [4, 10]);
    assert_eq!(b.dims(), [12, 4]);
    assert_eq!(t.len(), 8, "query and value of two blocks, A and B each");
    let c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(CONFIG_FILE)).unwrap()).unwrap();
    assert_eq!(c["peft_type"], "LORA");
    assert_eq!(c["r"], 4);
    assert_eq!(c["lora_alpha"], 4.0);
    assert_eq!(c["target_modules"], serde_json::json!(["query", "value"]));
    assert_eq!(c["init_lora_weights"], true);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_config_written_by_peft_loads() {
    let mut m = model(3);
    let cfg = AdapterConfig::new(Method::Lora, 2);
    attach_adapters(&mut m, &cfg).unwrap();
    perturb_all(&m);
    let dir = tmp("peft-written");
    save_adapter(&m, &cfg, &dir).unwrap();
    // What PEFT itself writes: no `peft_studio` section.
    std::fs::write(
        dir.join(CONFIG_FILE),
        r#"{"peft_type":"LORA","r":2,"lora_alpha":2,"target_modules":["value","query"],"lora_dropout":0.05,"bias":"none","init_lora_weights":true,"task_type":"SEQ_CLS"}"#,
    )
    .unwrap();
    let mut fresh = model(3);
    let c = load_adapter(&mut fresh, &dir).unwrap();
    assert_eq!((c.method, c.rank, c.dropout), (Method::Lora, 2, 0.05));
    let x = randn(&[2, 10], 1.0, 1);
    for (a, b) in outputs(&m, &x).iter().zip(outputs(&fresh, &x)) {
        assert!(rel_err(&b, a) < 1e-6);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn export_is_a_plain_lora_reproducing_the_change() {
    for (method, init) in [
        (Method::Svfit, Init::Svd),
        (Method::Loldu, Init::Lu),
        (Method::Lora, Init::Pissa),
    ] {
        let mut m = model(4);
        let mut cfg = config(method, init, 3);
        cfg.targets = Targets::Pattern(r".*\.(query|key)".into());
        attach_adapters(&mut m, &cfg).unwrap();
        perturb_all(&m);
        let dir = tmp(&format!("export-{method}"));
        export_lora(&m, &dir).unwrap();
        let t = candle_core::safetensors::load(dir.join(WEIGHTS_FILE), &Device::Cpu).unwrap();
        let c: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join(CONFIG_FILE)).unwrap()).unwrap();
        assert_eq!(c["peft_type"], "LORA");
        assert_eq!(c["r"], c["lora_alpha"], "scale 1");
        // Apply the export to the pre-trained weights as PEFT would: W + B·A.
        let fresh = model(4);
        let x = randn(&[2, 10], 1.0, 9);
        for (adapted, base) in m.layers.iter().zip(&fresh.layers) {
            let key = format!("base_model.model.{}", base.path());
            let y_adapted = adapted.forward(&x).unwrap();
            match (
                t.get(&format!("{key}.lora_A.weight")),
                t.get(&format!("{key}.lora_B.weight")),
            ) {
                (Some(a), Some(b)) => {
                    let w = (base.base_weight().unwrap().as_ref() + b.matmul(a).unwrap()).unwrap();
                    let y = x
                        .matmul(&w.t().unwrap())
                        .unwrap()
                        .broadcast_add(base.bias().unwrap())
                        .unwrap();
                    assert!(rel_err(&y, &y_adapted) < 1e-5, "{method} {key}");
                }
                _ => assert!(adapted.adapter().is_none(), "{key} missing from the export"),
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn loading_names_everything_that_does_not_fit() {
    let mut m = model(5);
    let cfg = AdapterConfig::new(Method::Lora, 4);
    attach_adapters(&mut m, &cfg).unwrap();
    let dir = tmp("mismatch");
    save_adapter(&m, &cfg, &dir).unwrap();

    // A model whose value layers are wider, and which lacks block 1.
    let mut other = model(5);
    other.layers.retain(|l| !l.path().contains("layer.1"));
    for l in other
        .layers
        .iter_mut()
        .filter(|l| l.path().ends_with("value"))
    {
        *l = AdaptedLinear::new(l.path().to_string(), randn(&[16, 10], 0.5, 1), None);
    }
    let e = load_adapter(&mut other, &dir).unwrap_err().to_string();
    assert!(
        e.contains("encoder.layer.1.attention.self.query") && e.contains("does not exist"),
        "{e}"
    );
    assert!(
        e.contains("encoder.layer.0.attention.self.value") && e.contains("16×10"),
        "{e}"
    );
    assert!(
        other.layers.iter().all(|l| l.adapter().is_none()),
        "a failed load changed the model"
    );

    // Different base weights: SVFit detects that its factors no longer fit.
    let mut cfg = AdapterConfig::new(Method::Svfit, 4);
    cfg.targets = Targets::List(vec!["query".into()]);
    let mut m = model(6);
    attach_adapters(&mut m, &cfg).unwrap();
    let dir2 = tmp("other-base");
    save_adapter(&m, &cfg, &dir2).unwrap();
    let e = load_adapter(&mut model(99), &dir2).unwrap_err().to_string();
    assert!(e.contains("base weight differs"), "{e}");

    // Missing or corrupt files name the file.
    let e = load_adapter(&mut model(5), &tmp("nothing"))
        .unwrap_err()
        .to_string();
    assert!(e.contains(CONFIG_FILE), "{e}");
    std::fs::write(dir.join(WEIGHTS_FILE), b"not a safetensors file").unwrap();
    let e = load_adapter(&mut model(5), &dir).unwrap_err().to_string();
    assert!(e.contains(WEIGHTS_FILE), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&dir2).unwrap();
}

#[test]
fn loldu_stores_the_row_order_as_integers() {
    let mut m = model(7);
    let cfg = AdapterConfig::new(Method::Loldu, 5);
    attach_adapters(&mut m, &cfg).unwrap();
    let dir = tmp("perm");
    save_adapter(&m, &cfg, &dir).unwrap();
    let t = candle_core::safetensors::load(dir.join(WEIGHTS_FILE), &Device::Cpu).unwrap();
    let perm = &t["base_model.model.encoder.layer.0.attention.self.query.loldu.perm"];
    assert_eq!(perm.dtype(), DType::I64);
    let mut p = perm.to_vec1::<i64>().unwrap();
    p.sort();
    assert_eq!(p, (0..12).collect::<Vec<i64>>());
    std::fs::remove_dir_all(&dir).unwrap();
}

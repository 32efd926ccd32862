//! The bad-input corpus, through the library: presets and `--set`, `config.json`, inspect's
//! options, model folders and safetensors, training settings checked against the data.
//! Every case must end in an error naming the field, file or value — never a panic, never
//! silent acceptance. (Data files, images and personalisation: `bad_inputs_data.rs`; the real
//! binary: `bad_inputs_cli.rs`.)

mod bad;

use bad::{Scratch, Tally, image_folder, tiny_vit_copy, train_preset};
use peft_studio::arch::ArchSpec;
use peft_studio::inspect::inspect;
use peft_studio::peft::{AdapterConfig, Method, Targets};
use peft_studio::train::{NeverStop, RunStore, TrainConfig, train};
use serde_json::json;

fn from_set(o: &str) -> Result<TrainConfig, String> {
    TrainConfig::from_toml_str("", "p.toml", &[o.to_string()]).map_err(|e| e.to_string())
}

#[test]
fn presets_and_overrides() {
    let mut t = Tally::default();
    let cases: &[(&str, &str)] = &[
        ("optim.lr=0", "optim.lr"),
        ("optim.lr=-1", "optim.lr"),
        ("optim.lr=nan", "optim.lr"),
        ("optim.lr=inf", "optim.lr"),
        ("optim.head_lr=-1", "optim.head_lr"),
        ("optim.head_lr=0", "optim.head_lr"),
        ("optim.head_lr=nan", "optim.head_lr"),
        ("optim.weight_decay=-0.1", "optim.weight_decay"),
        ("optim.weight_decay=nan", "optim.weight_decay"),
        ("optim.weight_decay=inf", "optim.weight_decay"),
        (
            "optim.diagonal_weight_decay=-1",
            "optim.diagonal_weight_decay",
        ),
        (
            "optim.diagonal_weight_decay=nan",
            "optim.diagonal_weight_decay",
        ),
        ("optim.max_grad_norm=-1", "optim.max_grad_norm"),
        ("optim.max_grad_norm=0", "optim.max_grad_norm"),
        ("optim.max_grad_norm=nan", "optim.max_grad_norm"),
        ("optim.batch_size=0", "optim.batch_size"),
        ("optim.batch_size=1000000000", "optim.batch_size"),
        ("optim.batch_size=-5", "batch_size"),
        ("optim.batch_size=2.5", "batch_size"),
        ("optim.eval_batch_size=0", "optim.eval_batch_size"),
        ("optim.eval_batch_size=99999999", "optim.eval_batch_size"),
        ("optim.grad_accum=0", "optim.grad_accum"),
        ("optim.grad_accum=100000000", "optim.grad_accum"),
        ("optim.steps=0", "optim.steps"),
        ("optim.steps=100000000000", "optim.steps"),
        ("optim.epochs=nan", "optim.epochs"),
        ("optim.epochs=-1", "optim.epochs"),
        ("optim.epochs=0", "optim.epochs"),
        ("optim.epochs=inf", "optim.epochs"),
        ("optim.epochs=1e9", "optim.epochs"),
        ("optim.eval_every=0", "optim.eval_every"),
        ("optim.checkpoint_every=0", "optim.checkpoint_every"),
        ("optim.warmup_steps=100000000000", "optim.warmup_steps"),
        ("optim.schedule=\"sawtooth\"", "sawtooth"),
        ("optim.seed=-1", "seed"),
        ("optim.lrr=1", "lrr"),
        ("model.max_length=0", "model.max_length"),
        ("model.max_length=1", "model.max_length"),
        ("model.max_length=10000000", "model.max_length"),
        ("model.new_head=\"maybe\"", "new_head"),
        ("model.source.kind=\"cloud\"", "cloud"),
        ("data.eval_fraction=0", "eval_fraction"),
        ("data.eval_fraction=1", "eval_fraction"),
        ("data.eval_fraction=nan", "eval_fraction"),
        ("data.eval_fraction=-0.2", "eval_fraction"),
        ("data.max_train=0", "data.max_train"),
        ("data.max_eval=0", "data.max_eval"),
        (
            "data.source={ kind = \"image-folder\", path = \"x\", size = [0, 8] }",
            "data.source.size",
        ),
        (
            "data.source={ kind = \"image-folder\", path = \"x\", size = [100000, 100000] }",
            "data.source.size",
        ),
        ("adapter.rank=0", "rank"),
        ("adapter.alpha=-2", "alpha"),
        ("adapter.alpha=nan", "alpha"),
        ("adapter.dropout=1", "dropout"),
        ("adapter.dropout=nan", "dropout"),
        ("adapter.method=\"dora\"", "dora"),
        ("adapter.init=\"bogus\"", "bogus"),
        ("adapter.targets=\"re:(\"", "("),
        ("adapter.energy_threshold=0.5", "energy_threshold"),
        ("adapter.pivot_epsilon=-1", "pivot_epsilon"),
        ("mode=\"everything\"", "everything"),
        ("optim", "key=value"),
        ("optim.lr.x=1", "optim.lr"),
        ("optim.lr.x.y=1", "optim.lr"),
    ];
    for (o, needle) in cases {
        t.expect_err(&format!("--set {o}"), needle, || from_set(o));
    }
    let texts: &[(&str, &str, &str)] = &[
        ("toml syntax", "[optim\nlr = 1", "p.toml"),
        ("lr as text", "[optim]\nlr = \"fast\"", "lr"),
        ("unknown section", "[optimiser]\nlr = 0.1", "optimiser"),
        ("unknown top key", "epochs = 3", "epochs"),
        (
            "steps and epochs",
            "[optim]\nsteps = 10\nepochs = 2.0",
            "not both",
        ),
        ("negative steps", "[optim]\nsteps = -3", "steps"),
        ("steps as float", "[optim]\nsteps = 1.5", "steps"),
        ("rank as text", "[adapter]\nrank = \"eight\"", "rank"),
        ("bad data kind", "[data.source]\nkind = \"s3\"", "s3"),
        (
            "idx without labels",
            "[data.source]\nkind = \"idx\"\nimages = \"a\"",
            "labels",
        ),
        (
            "text source without path",
            "[data.source]\nkind = \"text\"",
            "path",
        ),
        ("head_lr NaN", "[optim]\nhead_lr = nan", "optim.head_lr"),
    ];
    for (name, text, needle) in texts {
        t.expect_err(name, needle, || {
            TrainConfig::from_toml_str(text, "p.toml", &[]).map_err(|e| e.to_string())
        });
    }
    t.expect_err("missing preset", "nope.toml", || {
        TrainConfig::from_preset(std::path::Path::new("/nonexistent/nope.toml"), &[])
            .map_err(|e| e.to_string())
    });
    t.finish("presets and --set");
}

#[test]
fn epochs_set_the_step_count() {
    let cfg = from_set("optim.epochs=2.5").unwrap();
    assert_eq!(cfg.optim.steps, None, "epochs replaces the default steps");
    assert_eq!(cfg.optim.epochs, Some(2.5));
    // A --set of steps overrides a preset's epochs, and the other way round.
    let c = TrainConfig::from_toml_str("[optim]\nepochs = 3.0", "p", &["optim.steps=7".into()])
        .unwrap();
    assert_eq!((c.optim.steps, c.optim.epochs), (Some(7), None));
    let c =
        TrainConfig::from_toml_str("[optim]\nsteps = 9", "p", &["optim.epochs=1".into()]).unwrap();
    assert_eq!((c.optim.steps, c.optim.epochs), (None, Some(1.0)));
    // ⌈epochs · n / (batch · accum)⌉, and the config round-trips through its TOML.
    assert_eq!(peft_studio::train::limits::total_steps(&c, 100), Ok(4)); // 100 / 32
    let mut c2 = c.clone();
    c2.optim.epochs = Some(2.5);
    c2.optim.grad_accum = 2;
    assert_eq!(peft_studio::train::limits::total_steps(&c2, 100), Ok(4)); // 250 / 64
    let back = TrainConfig::from_toml_str(&c.to_toml(), "x", &[]).unwrap();
    assert_eq!(back, c);
}

fn arch(v: serde_json::Value, labels: Option<usize>) -> Result<ArchSpec, String> {
    ArchSpec::from_config(&v, "cfg/config.json", labels).map_err(|e| e.to_string())
}

fn bert(edit: &[(&str, serde_json::Value)]) -> serde_json::Value {
    let mut v = json!({"model_type":"bert","hidden_size":64,"num_hidden_layers":2,
        "num_attention_heads":4,"intermediate_size":128,"vocab_size":100});
    for (k, x) in edit {
        v[*k] = x.clone();
    }
    v
}

#[test]
fn model_configs_and_inspect() {
    let mut t = Tally::default();
    let cases: Vec<(&str, serde_json::Value, Option<usize>, &str)> = vec![
        (
            "a million layers",
            bert(&[("num_hidden_layers", json!(1_000_000))]),
            None,
            "num_hidden_layers",
        ),
        (
            "zero layers",
            bert(&[("num_hidden_layers", json!(0))]),
            None,
            "num_hidden_layers",
        ),
        (
            "hidden 0",
            bert(&[("hidden_size", json!(0))]),
            None,
            "hidden_size",
        ),
        (
            "hidden huge",
            bert(&[("hidden_size", json!(1u64 << 40))]),
            None,
            "hidden_size",
        ),
        (
            "hidden negative",
            bert(&[("hidden_size", json!(-64))]),
            None,
            "hidden_size",
        ),
        (
            "hidden float",
            bert(&[("hidden_size", json!(64.5))]),
            None,
            "hidden_size",
        ),
        (
            "hidden text",
            bert(&[("hidden_size", json!("64"))]),
            None,
            "hidden_size",
        ),
        (
            "heads 0",
            bert(&[("num_attention_heads", json!(0))]),
            None,
            "num_attention_heads",
        ),
        (
            "heads not dividing",
            bert(&[("num_attention_heads", json!(5))]),
            None,
            "num_attention_heads",
        ),
        (
            "intermediate huge",
            bert(&[("intermediate_size", json!(u64::MAX))]),
            None,
            "intermediate_size",
        ),
        (
            "vocab 0",
            bert(&[("vocab_size", json!(0))]),
            None,
            "vocab_size",
        ),
        (
            "vocab huge",
            bert(&[("vocab_size", json!(1u64 << 40))]),
            None,
            "vocab_size",
        ),
        (
            "positions huge",
            bert(&[("max_position_embeddings", json!(1u64 << 40))]),
            None,
            "max_position_embeddings",
        ),
        (
            "no model_type",
            json!({"hidden_size": 64}),
            None,
            "model_type",
        ),
        ("gpt2", bert(&[("model_type", json!("gpt2"))]), None, "gpt2"),
        (
            "missing vocab",
            json!({"model_type":"bert","hidden_size":64,"num_hidden_layers":2,"num_attention_heads":4}),
            None,
            "vocab_size",
        ),
        ("0 labels", bert(&[]), Some(0), "--num-labels"),
        (
            "u64::MAX labels",
            bert(&[]),
            Some(usize::MAX),
            "--num-labels",
        ),
        (
            "vit patch 0",
            json!({"model_type":"vit","hidden_size":64,"num_hidden_layers":2,"num_attention_heads":4,"patch_size":0}),
            None,
            "patch_size",
        ),
        (
            "vit patch not dividing",
            json!({"model_type":"vit","hidden_size":64,"num_hidden_layers":2,"num_attention_heads":4,"image_size":30,"patch_size":7}),
            None,
            "patch_size",
        ),
        (
            "vit 1000 channels",
            json!({"model_type":"vit","hidden_size":64,"num_hidden_layers":2,"num_attention_heads":4,"num_channels":1000}),
            None,
            "num_channels",
        ),
        (
            "vit image huge",
            json!({"model_type":"vit","hidden_size":64,"num_hidden_layers":2,"num_attention_heads":4,"image_size":1_000_000}),
            None,
            "image_size",
        ),
        (
            "too large for memory",
            bert(&[
                ("hidden_size", json!(65536)),
                ("num_hidden_layers", json!(1000)),
                ("num_attention_heads", json!(64)),
                ("intermediate_size", json!(262144)),
            ]),
            None,
            "GiB",
        ),
    ];
    for (name, v, labels, needle) in cases {
        t.expect_err(name, needle, || arch(v, labels));
    }
    let s = Scratch::new("inspect");
    let files: &[(&str, &[u8], &str)] = &[
        ("invalid JSON", b"{\"model_type\": ", "not valid JSON"),
        ("empty file", b"", "not valid JSON"),
        ("binary junk", &[0xff, 0xfe, 0x00, 0x12], "config.json"),
        ("array", b"[1, 2]", "model_type"),
    ];
    for (name, bytes, needle) in files {
        let p = s.write(&format!("{name}/config.json"), bytes);
        t.expect_err(name, needle, || {
            ArchSpec::resolve(p.to_str().unwrap(), None).map_err(|e| e.to_string())
        });
    }
    t.expect_err("unknown model name", "no-such-model", || {
        ArchSpec::resolve("no-such-model", None).map_err(|e| e.to_string())
    });
    let base = ArchSpec::resolve("bert-base-uncased", Some(2)).unwrap();
    let adapter = |method, rank, targets: &str| AdapterConfig {
        method,
        rank,
        targets: Targets::parse_cli(targets),
        ..AdapterConfig::default()
    };
    let inspect_cases: Vec<(&str, AdapterConfig, &str)> = vec![
        ("rank 0", adapter(Method::Lora, 0, "query,value"), "rank"),
        (
            "rank above the layer",
            adapter(Method::Lora, 769, "query,value"),
            "769",
        ),
        (
            "rank u64::MAX",
            adapter(Method::Svfit, usize::MAX, "query"),
            "rank",
        ),
        (
            "targets match nothing",
            adapter(Method::Lora, 4, "nope"),
            "nope",
        ),
        ("bad regex", adapter(Method::Lora, 4, "re:(("), "(("),
        (
            "energy threshold",
            AdapterConfig {
                energy_threshold: Some(0.9),
                ..adapter(Method::Svfit, 4, "query")
            },
            "energy_threshold",
        ),
        (
            "alpha NaN",
            AdapterConfig {
                alpha: Some(f64::NAN),
                ..adapter(Method::Lora, 4, "query")
            },
            "alpha",
        ),
    ];
    for (name, cfg, needle) in inspect_cases {
        t.expect_err(name, needle, || {
            inspect(&base, &cfg).map_err(|e| e.to_string())
        });
    }
    t.finish("config.json and inspect");
}

#[test]
fn training_inputs_fail_before_a_run_folder_exists() {
    let s = Scratch::new("train");
    let data = image_folder(&s, "imgs", 2, 4);
    let one_class = image_folder(&s, "one", 1, 6);
    let model = tiny_vit_copy(&s, "vit", |_| {});
    let store = RunStore::new(s.0.join("runs"));
    let base = train_preset(&model, &data);
    // The fixtures are sound: the base preset trains.
    let cfg = TrainConfig::from_toml_str(&base, "base", &[]).unwrap();
    train(&cfg, &store, &mut NeverStop, &mut |_| {}).expect("the base preset trains");
    let runs_before = std::fs::read_dir(store.root()).unwrap().count();

    let mut t = Tally::default();
    let run = |text: &str, o: &[String]| -> Result<(), String> {
        let cfg = TrainConfig::from_toml_str(text, "p.toml", o).map_err(|e| e.to_string())?;
        train(&cfg, &store, &mut NeverStop, &mut |_| {})
            .map(|_| ())
            .map_err(|f| f.to_string())
    };
    let sets: &[(&str, &str)] = &[
        ("optim.batch_size=7", "optim.batch_size = 7"),
        ("optim.batch_size=60000", "optim.batch_size"),
        ("data.max_train=1", "optim.batch_size"),
        (
            "model.source.path=\"/nonexistent/model\"",
            "/nonexistent/model",
        ),
        (
            "data.source.path=\"/nonexistent/imgs\"",
            "/nonexistent/imgs",
        ),
        (
            "model.source={ kind = \"builtin\", name = \"gpt5\" }",
            "gpt5",
        ),
        ("adapter.rank=17", "17"),
        ("adapter.targets=[\"nope\"]", "nope"),
    ];
    for (o, needle) in sets {
        t.expect_err(&format!("train --set {o}"), needle, || {
            run(&base, &[o.to_string()])
        });
    }
    let one = train_preset(&model, &one_class);
    t.expect_err("one-class data", "1 class", || run(&one, &[]));
    t.expect_err("one-class data names the dataset", "one", || run(&one, &[]));

    // Broken config.json files.
    let edits: Vec<(&str, serde_json::Value, &str)> = vec![
        ("num_hidden_layers", json!(1_000_000), "num_hidden_layers"),
        ("hidden_size", json!(0), "hidden_size"),
        ("num_attention_heads", json!(3), "num_attention_heads"),
        ("layer_norm_eps", json!(-1.0), "layer_norm_eps"),
        ("initializer_range", json!(1e9), "initializer_range"),
        ("hidden_act", json!("swish9"), "swish9"),
        ("model_type", json!("t5"), "t5"),
        ("image_size", json!(12), "shape"),
    ];
    for (k, v, needle) in edits {
        let m = tiny_vit_copy(&s, &format!("cfg-{k}"), |c| {
            c.insert(k.into(), v.clone());
        });
        t.expect_err(&format!("config.json {k} = {v}"), needle, || {
            run(&train_preset(&m, &data), &[])
        });
    }

    let giant = tiny_vit_copy(&s, "cfg-giant", |c| {
        for (k, v) in [
            ("hidden_size", 4096),
            ("num_hidden_layers", 1000),
            ("num_attention_heads", 16),
            ("intermediate_size", 16384),
        ] {
            c.insert(k.into(), v.into());
        }
    });
    t.expect_err("config.json larger than memory", "GiB", || {
        run(&train_preset(&giant, &data), &[])
    });

    // Broken weights.
    let weights = |name: &str, bytes: &dyn Fn(Vec<u8>) -> Vec<u8>| {
        let m = tiny_vit_copy(&s, name, |_| {});
        let f = m.join("model.safetensors");
        let b = std::fs::read(&f).unwrap();
        std::fs::write(&f, bytes(b)).unwrap();
        m
    };
    let broken: Vec<(&str, std::path::PathBuf, &str)> = vec![
        (
            "empty safetensors",
            weights("w-empty", &|_| Vec::new()),
            "model.safetensors",
        ),
        (
            "truncated safetensors",
            weights("w-cut", &|b| b[..b.len() / 2].to_vec()),
            "model.safetensors",
        ),
        (
            "junk safetensors",
            weights("w-junk", &|b| vec![7u8; b.len()]),
            "model.safetensors",
        ),
        (
            "header length beyond the file",
            weights("w-len", &|mut b| {
                b[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
                b
            }),
            "model.safetensors",
        ),
        (
            "header not JSON",
            weights("w-head", &|mut b| {
                b[8] = b'#';
                b
            }),
            "model.safetensors",
        ),
        ("NaN weights", nan_weights(&s), "holds NaN"),
        ("missing tensor", drop_tensor(&s), "is missing"),
        ("integer weights", int_weights(&s), "floating point"),
        (
            "wrong shape",
            edit_tensors(&s, "w-shape", |t| {
                let name = "vit.encoder.layer.0.attention.attention.value.weight";
                let z = candle_core::Tensor::zeros(
                    (16, 15),
                    candle_core::DType::F32,
                    &candle_core::Device::Cpu,
                );
                t.insert(name.into(), z.unwrap());
            }),
            "[16, 15]",
        ),
        (
            "no weights file",
            {
                let m = tiny_vit_copy(&s, "w-none", |_| {});
                std::fs::remove_file(m.join("model.safetensors")).unwrap();
                m
            },
            "model.safetensors",
        ),
    ];
    for (name, m, needle) in broken {
        t.expect_err(name, needle, || run(&train_preset(&m, &data), &[]));
    }
    t.finish("training inputs");
    assert_eq!(
        std::fs::read_dir(store.root()).unwrap().count(),
        runs_before,
        "no bad input leaves a run folder"
    );
}

/// A tiny-ViT copy whose first weight holds a NaN.
fn nan_weights(s: &Scratch) -> std::path::PathBuf {
    edit_tensors(s, "w-nan", |t| {
        let name = "vit.encoder.layer.0.attention.attention.query.weight";
        let w = t[name].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut w = w;
        w[3] = f32::NAN;
        let dims = t[name].dims().to_vec();
        t.insert(
            name.into(),
            candle_core::Tensor::from_vec(w, dims, &candle_core::Device::Cpu).unwrap(),
        );
    })
}

/// A tiny-ViT copy whose query weight is stored as integers.
fn int_weights(s: &Scratch) -> std::path::PathBuf {
    edit_tensors(s, "w-int", |t| {
        let name = "vit.encoder.layer.0.attention.attention.query.weight";
        let w = t[name].to_dtype(candle_core::DType::I64).unwrap();
        t.insert(name.into(), w);
    })
}

/// A tiny-ViT copy without one attention weight.
fn drop_tensor(s: &Scratch) -> std::path::PathBuf {
    edit_tensors(s, "w-drop", |t| {
        t.remove("vit.encoder.layer.1.attention.attention.key.weight");
    })
}

fn edit_tensors(
    s: &Scratch,
    name: &str,
    edit: impl FnOnce(&mut std::collections::HashMap<String, candle_core::Tensor>),
) -> std::path::PathBuf {
    let m = tiny_vit_copy(s, name, |_| {});
    let f = m.join("model.safetensors");
    let mut t = candle_core::safetensors::load(&f, &candle_core::Device::Cpu).unwrap();
    edit(&mut t);
    candle_core::safetensors::save(&t, &f).unwrap();
    m
}

//! The bad-input corpus, part two: data files (JSONL, CSV, TSV, IDX, image folders), reference
//! photos, DiffLoRA presets and the personalisation commands' options. Each case must end in
//! an error naming the file, line, field or option — never a panic, never silent acceptance.

mod bad;

use std::path::{Path, PathBuf};

use bad::{Scratch, Tally, image_bytes};
use peft_studio::data::identity_folder::load_references;
use peft_studio::data::{DataConfig, DataSource, load};
use peft_studio::personalize::build::DiffLoraPreset;
use peft_studio::personalize::commands::{EvalWorkers, eval_command, personalize_command};
use peft_studio::personalize::evaluate::EvalSettings;

fn text(path: PathBuf) -> Result<(), String> {
    load(&DataConfig {
        source: DataSource::Text {
            path,
            text_column: "text".into(),
            label_column: "label".into(),
        },
        ..DataConfig::default()
    })
    .map(|_| ())
    .map_err(|e| e.to_string())
}

fn folder(path: PathBuf, size: Option<[u32; 2]>) -> Result<(), String> {
    load(&DataConfig {
        source: DataSource::ImageFolder {
            path,
            size,
            grayscale: false,
        },
        ..DataConfig::default()
    })
    .map(|_| ())
    .map_err(|e| e.to_string())
}

fn idx(images: PathBuf, labels: PathBuf) -> Result<(), String> {
    load(&DataConfig {
        source: DataSource::Idx {
            images,
            labels,
            eval_images: None,
            eval_labels: None,
        },
        ..DataConfig::default()
    })
    .map(|_| ())
    .map_err(|e| e.to_string())
}

/// A JPEG cut before its end-of-image marker.
fn truncated_jpeg() -> Vec<u8> {
    let b = image_bytes(40, 40, 9, image::ImageFormat::Jpeg);
    b[..b.len() * 2 / 3].to_vec()
}

#[test]
fn data_files() {
    let s = Scratch::new("data");
    let mut t = Tally::default();
    let good = "{\"text\": \"a\", \"label\": 0}\n{\"text\": \"b\", \"label\": 1}\n";
    let jsonl: &[(&str, String, &str)] = &[
        (
            "bad JSON line 3",
            format!("{good}{{\"text\": \"c\",\n"),
            "line 3",
        ),
        ("array line", format!("{good}[1, 2]\n"), "line 3"),
        (
            "missing label",
            format!("{good}{{\"text\": \"c\"}}\n"),
            "line 3",
        ),
        (
            "missing text",
            format!("{good}{{\"label\": 1}}\n"),
            "'text'",
        ),
        (
            "text a number",
            format!("{good}{{\"text\": 5, \"label\": 1}}\n"),
            "line 3",
        ),
        (
            "negative label",
            format!("{good}{{\"text\": \"c\", \"label\": -1}}\n"),
            "line 3",
        ),
        (
            "fractional label",
            format!("{good}{{\"text\": \"c\", \"label\": 1.5}}\n"),
            "line 3",
        ),
        (
            "label object",
            format!("{good}{{\"text\": \"c\", \"label\": {{}}}}\n"),
            "line 3",
        ),
        (
            "empty label",
            format!("{good}{{\"text\": \"c\", \"label\": \" \"}}\n"),
            "line 3",
        ),
        (
            "huge label",
            format!("{good}{{\"text\": \"c\", \"label\": 99999999999}}\n"),
            "too large",
        ),
        ("empty file", String::new(), "empty"),
        ("blank lines only", "\n\n  \n".into(), "empty"),
        (
            "text null",
            format!("{good}{{\"text\": null, \"label\": 1}}\n"),
            "line 3",
        ),
    ];
    for (name, body, needle) in jsonl {
        let p = s.write(&format!("{name}.jsonl"), body.as_bytes());
        t.expect_err(name, needle, || text(p));
    }
    let csv: &[(&str, &str, &[u8], &str)] = &[
        ("csv short row", "csv", b"text,label\na,0\nb\n", "line 3"),
        ("csv long row", "csv", b"text,label\na,0\nb,1,2\n", "line 3"),
        ("csv no label column", "csv", b"text,kind\na,0\n", "'label'"),
        ("csv no text column", "csv", b"body,label\na,0\n", "'text'"),
        ("csv empty label", "csv", b"text,label\na,0\nb,\n", "line 3"),
        ("csv header only", "csv", b"text,label\n", "empty"),
        ("csv empty", "csv", b"", "csv empty.csv"),
        ("tsv short row", "tsv", b"text\tlabel\na\t0\nb\n", "line 3"),
        ("unsupported extension", "parquet", b"PAR1", ".csv"),
        (
            "csv unterminated quote",
            "csv",
            b"text,label\n\"a,0\nb,1\n",
            "csv",
        ),
    ];
    for (name, ext, body, needle) in csv {
        let p = s.write(&format!("{name}.{ext}"), body);
        t.expect_err(name, needle, || text(p));
    }
    t.expect_err("missing text file", "no-such.jsonl", || {
        text(s.0.join("no-such.jsonl"))
    });
    t.expect_err("folder as text file", "csv-dir", || {
        std::fs::create_dir_all(s.0.join("csv-dir.csv")).unwrap();
        text(s.0.join("csv-dir.csv"))
    });

    // IDX.
    let labels = s.write("l.idx1", &[0, 0, 8, 1, 0, 0, 0, 2, 0, 1]);
    let mut images = vec![0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 2];
    images.extend([0u8; 8]);
    let good_images = s.write("i.idx3", &images);
    let idx_cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("idx wrong magic", vec![1, 2, 3, 4, 0, 0, 0, 0], "magic"),
        ("idx truncated", images[..20].to_vec(), "i-cut"),
        (
            "idx labels as images",
            vec![0, 0, 8, 1, 0, 0, 0, 2, 0, 1],
            "magic",
        ),
        (
            "idx zero images",
            vec![0, 0, 8, 3, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 2],
            "no images",
        ),
        (
            "idx huge dims",
            vec![
                0, 0, 8, 3, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255,
            ],
            "i-cut",
        ),
        ("idx bad gzip", vec![0x1f, 0x8b, 8, 0, 1, 2, 3], "gzip"),
    ];
    for (name, bytes, needle) in idx_cases {
        let p = s.write(&format!("{}/i-cut.idx3", name.replace(' ', "-")), &bytes);
        t.expect_err(name, needle, || idx(p, labels.clone()));
    }
    let three = s.write("l3.idx1", &[0, 0, 8, 1, 0, 0, 0, 3, 0, 1, 1]);
    t.expect_err("idx count mismatch", "labels", || {
        idx(good_images.clone(), three)
    });
    t.expect_err("idx images as labels", "magic", || {
        idx(good_images.clone(), good_images.clone())
    });

    // Image folders.
    let png = |seed| image_bytes(8, 8, seed, image::ImageFormat::Png);
    type Files = Vec<(&'static str, Vec<u8>)>;
    let img_cases: Vec<(&str, Files, Option<[u32; 2]>, &str)> = vec![
        ("no class folders", vec![("x.png", png(1))], None, "class"),
        (
            "empty class",
            vec![("a/1.png", png(1)), ("b/notes.txt", b"x".to_vec())],
            None,
            "holds no images",
        ),
        (
            "corrupt png",
            vec![("a/1.png", png(1)), ("b/2.png", b"not a png".to_vec())],
            None,
            "2.png",
        ),
        (
            "truncated jpeg",
            vec![("a/1.png", png(1)), ("b/2.jpg", truncated_jpeg())],
            None,
            "truncated",
        ),
        (
            "zero size",
            vec![("a/1.png", png(1)), ("b/2.png", png(2))],
            Some([0, 8]),
            "size",
        ),
        (
            "huge size",
            vec![("a/1.png", png(1)), ("b/2.png", png(2))],
            Some([100_000, 100_000]),
            "size",
        ),
        (
            "empty png file",
            vec![("a/1.png", png(1)), ("b/2.png", Vec::new())],
            None,
            "2.png",
        ),
    ];
    for (name, files, size, needle) in img_cases {
        let root = s.0.join(name.replace(' ', "-"));
        for (rel, bytes) in &files {
            s.write(&format!("{}/{rel}", name.replace(' ', "-")), bytes);
        }
        t.expect_err(name, needle, || folder(root, size));
    }
    t.expect_err("missing image folder", "no-such-folder", || {
        folder(s.0.join("no-such-folder"), None)
    });
    t.expect_err("unknown built-in", "cifar", || {
        load(&DataConfig {
            source: DataSource::Builtin {
                name: "cifar".into(),
            },
            ..DataConfig::default()
        })
        .map(|_| ())
        .map_err(|e| e.to_string())
    });
    t.finish("data files");
}

#[test]
fn reference_photos() {
    let s = Scratch::new("refs");
    let mut t = Tally::default();
    let only = s.write("trunc/only.jpg", &truncated_jpeg());
    t.expect_err("truncated JPEG as the only reference", "only.jpg", || {
        load_references(only.parent().unwrap(), 32).map_err(|e| e.to_string())
    });
    t.expect_err("truncated JPEG as a file", "truncated", || {
        load_references(&only, 32).map_err(|e| e.to_string())
    });
    let tiny = s.write("tiny/a.png", &image_bytes(4, 4, 1, image::ImageFormat::Png));
    t.expect_err("tiny image", "a.png", || {
        load_references(tiny.parent().unwrap(), 32).map_err(|e| e.to_string())
    });
    let junk = s.write("junk/a.jpg", b"hello");
    t.expect_err("junk .jpg", "a.jpg", || {
        load_references(junk.parent().unwrap(), 32).map_err(|e| e.to_string())
    });
    std::fs::create_dir_all(s.0.join("empty")).unwrap();
    t.expect_err("empty folder", "no images", || {
        load_references(&s.0.join("empty"), 32).map_err(|e| e.to_string())
    });
    t.expect_err("missing folder", "not found", || {
        load_references(&s.0.join("missing"), 32).map_err(|e| e.to_string())
    });
    t.expect_err("size 0", "size", || {
        load_references(&s.0.join("tiny"), 0).map_err(|e| e.to_string())
    });
    // A sound JPEG is read.
    let ok = s.write(
        "ok/a.jpg",
        &image_bytes(40, 40, 3, image::ImageFormat::Jpeg),
    );
    assert_eq!(load_references(ok.parent().unwrap(), 32).unwrap().len(), 1);
    t.finish("reference photos");
}

/// The tiny preset with `key` (dotted) set to `value`, written to a file.
fn preset_with(s: &Scratch, name: &str, key: &str, value: toml::Value) -> PathBuf {
    let out = s.0.join("built");
    let mut table: toml::Table =
        toml::from_str(&toml::to_string(&DiffLoraPreset::tiny(&out)).unwrap()).unwrap();
    let mut cur = &mut table;
    let parts: Vec<&str> = key.split('.').collect();
    for p in &parts[..parts.len() - 1] {
        cur = cur.get_mut(*p).and_then(|v| v.as_table_mut()).unwrap();
    }
    cur.insert(parts[parts.len() - 1].into(), value);
    s.write(
        &format!("{name}.toml"),
        toml::to_string(&table).unwrap().as_bytes(),
    )
}

#[test]
fn personalisation_presets_and_options() {
    let s = Scratch::new("personalise");
    let mut t = Tally::default();
    use toml::Value::{Float, Integer};
    let ok = preset_with(&s, "ok", "sampling.steps", Integer(3));
    DiffLoraPreset::load(&ok).expect("the tiny preset is valid");
    let cases: Vec<(&str, toml::Value, &str)> = vec![
        (
            "generator_training.steps",
            Integer(0),
            "generator_training.steps",
        ),
        (
            "generator_training.batch",
            Integer(0),
            "generator_training.batch",
        ),
        (
            "generator_training.lr",
            Float(f64::NAN),
            "generator_training.lr",
        ),
        (
            "generator_training.weight_decay",
            Float(-1.0),
            "generator_training.weight_decay",
        ),
        ("lora.rank", Integer(0), "lora.rank"),
        ("lora.steps", Integer(0), "lora.steps"),
        ("lora.lr", Float(-0.1), "lora.lr"),
        ("lora.alpha", Float(f64::INFINITY), "lora.alpha"),
        ("lora.min_timestep", Integer(1_000_000), "lora.min_timestep"),
        ("people.bank.count", Integer(0), "people.bank.count"),
        (
            "people.generator.images_per_person",
            Integer(0),
            "people.generator.images_per_person",
        ),
        ("encoder.steps", Integer(0), "encoder.steps"),
        ("autoencoder.batch", Integer(0), "batch"),
        ("denoiser.lr", Float(f64::NAN), "lr"),
        ("prediction.members", Integer(0), "prediction.members"),
        ("prediction.lora_strength", Float(-1.0), "lora_strength"),
        ("sampling.steps", Integer(0), "sampling.steps"),
        ("sampling.guidance", Float(f64::NAN), "sampling.guidance"),
        ("image_size", Integer(0), "image_size"),
        ("unet.image_size", Integer(16), "unet.image_size"),
    ];
    for (key, value, needle) in cases {
        let p = preset_with(&s, key, key, value.clone());
        t.expect_err(&format!("{key} = {value}"), needle, || {
            DiffLoraPreset::load(&p)
                .map(|_| ())
                .map_err(|e| format!("{e:#}"))
        });
    }
    t.expect_err("unknown preset key", "colour", || {
        let p = preset_with(&s, "colour", "colour", Integer(1));
        DiffLoraPreset::load(&p)
            .map(|_| ())
            .map_err(|e| format!("{e:#}"))
    });
    t.expect_err("missing preset", "none.toml", || {
        DiffLoraPreset::load(Path::new("/nonexistent/none.toml"))
            .map(|_| ())
            .map_err(|e| format!("{e:#}"))
    });

    // Options are checked before the personaliser loads (the model path here is bogus).
    let model = s.0.join("no-model");
    let refs = s.0.join("no-refs");
    let out = s.0.join("out");
    let file = s.write("a-file", b"x");
    let personalise = |n: usize, out: &Path| {
        personalize_command(&model, &refs, "", n, 0, out, &candle_core::Device::Cpu)
            .map(|_| ())
            .map_err(|e| format!("{e:#}"))
    };
    t.expect_err("--n 0", "--n 0", || personalise(0, &out));
    t.expect_err("--n 100000", "between 1 and", || personalise(100_000, &out));
    t.expect_err("--out a file", "not a folder", || personalise(4, &file));
    t.expect_err("--out under a file", "not a folder", || {
        personalise(4, &file.join("sub"))
    });
    t.expect_err("--out unwritable", "cannot write", || {
        personalise(4, Path::new("/proc/peft-studio-out"))
    });
    t.expect_err("missing personaliser", "no-model", || personalise(4, &out));
    let eval = |refs: usize, images: usize, workers: EvalWorkers<'_>, out: &Path| {
        let settings = EvalSettings {
            references: refs,
            images,
            seed: 0,
        };
        eval_command(
            &model,
            settings,
            workers,
            out,
            &candle_core::Device::Cpu,
            &mut |_, _, _| {},
        )
        .map(|_| ())
        .map_err(|e| format!("{e:#}"))
    };
    let exe = Path::new("peft-studio");
    t.expect_err("eval --refs 0", "--refs 0", || {
        eval(0, 4, EvalWorkers::InProcess, &out)
    });
    t.expect_err("eval --n 100000", "--n 100000", || {
        eval(4, 100_000, EvalWorkers::InProcess, &out)
    });
    t.expect_err("eval --jobs 100000", "--jobs", || {
        eval(4, 4, EvalWorkers::Processes { exe, jobs: 100_000 }, &out)
    });
    t.expect_err("eval --out unwritable", "cannot write", || {
        eval(4, 4, EvalWorkers::InProcess, Path::new("/proc/peft-eval/x"))
    });
    t.expect_err("eval --out a folder", "is a folder", || {
        std::fs::create_dir_all(s.0.join("dir.md")).unwrap();
        eval(4, 4, EvalWorkers::InProcess, &s.0.join("dir"))
    });
    t.finish("personalisation presets and options");
}

/// The built-in personaliser with `file` replaced by `edit` of its bytes (the others linked).
fn broken_personaliser(
    s: &Scratch,
    tag: &str,
    file: &str,
    edit: impl FnOnce(&mut Vec<u8>),
) -> PathBuf {
    let src = peft_studio::personalize::pipeline::builtin_dir()
        .canonicalize()
        .unwrap();
    let dir = s.0.join(format!("{tag}-{file}"));
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        if e.file_name() != file {
            std::os::unix::fs::symlink(e.path(), dir.join(e.file_name())).unwrap();
        }
    }
    let mut bytes = std::fs::read(src.join(file)).unwrap();
    edit(&mut bytes);
    std::fs::write(dir.join(file), bytes).unwrap();
    dir
}

/// Writes a NaN into the first value of the tensor stored first in a safetensors buffer.
fn nan_first_value(b: &mut [u8]) {
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&b[8..8 + n]).unwrap();
    let (_, first) = header
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .min_by_key(|(_, v)| v["data_offsets"][0].as_u64().unwrap())
        .unwrap();
    let at = 8 + n + first["data_offsets"][0].as_u64().unwrap() as usize;
    let nan: &[u8] = match first["dtype"].as_str().unwrap() {
        "F32" => &[0, 0, 0xC0, 0x7F],
        "F16" => &[0, 0x7E],
        "BF16" => &[0xC0, 0x7F],
        other => panic!("unexpected dtype {other}"),
    };
    b[at..at + nan.len()].copy_from_slice(nan);
}

#[test]
fn damaged_personaliser_folders() {
    use peft_studio::personalize::pipeline::Personaliser;
    let s = Scratch::new("damaged");
    let mut t = Tally::default();
    let load = |dir: PathBuf| {
        Personaliser::load(&dir, &candle_core::Device::Cpu)
            .map(|_| ())
            .map_err(|e| format!("{e:#}"))
    };
    for file in [
        "generator.safetensors",
        "identity_encoder.safetensors",
        "eval_encoder.safetensors",
        "lora_autoencoder.safetensors",
        "latent_denoiser.safetensors",
    ] {
        let dir = broken_personaliser(&s, "nan", file, |b| nan_first_value(b));
        t.expect_err(&format!("NaN in {file}"), file, || {
            load(dir).map_err(|e| {
                if e.contains("NaN") {
                    e
                } else {
                    format!("no NaN named: {e}")
                }
            })
        });
        let dir = broken_personaliser(&s, "cut", file, |b| b.truncate(b.len() / 2));
        t.expect_err(&format!("truncated {file}"), file, || load(dir));
    }
    let dir = broken_personaliser(&s, "bad", "preset.toml", |b| b.extend_from_slice(b"\n[[["));
    t.expect_err("broken preset.toml", "preset.toml", || load(dir));
    t.finish("damaged personaliser folders");
}

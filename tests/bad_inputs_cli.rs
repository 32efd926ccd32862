//! The bad-input corpus through the real binary: each case must exit non-zero on its own
//! (no signal: no SIGABRT), print `error:` with the expected text once, and never panic. Also
//! the behaviours the corpus found wrong: `compare` exits non-zero when a preset fails, and
//! `personalize` into a used folder leaves only the new gallery.

mod bad;

use std::path::Path;
use std::process::Command;

use bad::{Scratch, image_bytes, image_folder, repeats_os_text, tiny_vit_copy, train_preset};

/// Runs the binary in `dir`; returns (exit code, stderr). A signal gives code `None`.
fn run(dir: &Path, args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_peft-studio"))
        .args(args)
        .current_dir(dir)
        .env(
            "PEFT_STUDIO_ASSETS",
            Path::new(env!("CARGO_MANIFEST_DIR")).join("assets"),
        )
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Checks one failing invocation; returns a problem, if any.
fn check(dir: &Path, args: &[&str], needle: &str) -> Option<String> {
    let (code, err) = run(dir, args);
    let case = args.join(" ");
    match code {
        None => Some(format!("{case}: killed by a signal: {err}")),
        Some(0) => Some(format!("{case}: exited 0")),
        Some(_) if err.contains("panicked") => Some(format!("{case}: panicked: {err}")),
        Some(_) if !err.to_lowercase().contains(&needle.to_lowercase()) => {
            Some(format!("{case}: stderr lacks `{needle}`: {err}"))
        }
        Some(_) if repeats_os_text(&err) => Some(format!("{case}: OS error repeated: {err}")),
        Some(_) => None,
    }
}

#[test]
fn bad_input_through_the_binary() {
    let s = Scratch::new("cli");
    let dir = &s.0;
    let data = image_folder(&s, "imgs", 2, 4);
    let one_class = image_folder(&s, "one", 1, 6);
    let vit = tiny_vit_copy(&s, "vit", |_| {});
    let huge = tiny_vit_copy(&s, "huge", |c| {
        c.insert("num_hidden_layers".into(), 1_000_000.into());
    });
    let good = s.write("good.toml", train_preset(&vit, &data).as_bytes());
    let one = s.write("one.toml", train_preset(&vit, &one_class).as_bytes());
    let huge_preset = s.write("huge.toml", train_preset(&huge, &data).as_bytes());
    let refs = s.path("refs/only.jpg");
    let jpeg = image_bytes(40, 40, 5, image::ImageFormat::Jpeg);
    std::fs::write(&refs, &jpeg[..jpeg.len() / 2]).unwrap();
    let mut zero_gen: toml::Table = toml::from_str(
        &toml::to_string(&peft_studio::personalize::build::DiffLoraPreset::tiny(
            &dir.join("built"),
        ))
        .unwrap(),
    )
    .unwrap();
    zero_gen["generator_training"]
        .as_table_mut()
        .unwrap()
        .insert("steps".into(), 0.into());
    let zero_gen = s.write("zero.toml", toml::to_string(&zero_gen).unwrap().as_bytes());
    let (g, o, h, z) = (
        good.to_str().unwrap(),
        one.to_str().unwrap(),
        huge_preset.to_str().unwrap(),
        zero_gen.to_str().unwrap(),
    );
    let huge_cfg = huge.join("config.json");
    let refs_dir = refs.parent().unwrap().to_str().unwrap();
    let inspect = [
        "inspect",
        "--model",
        "bert-base-uncased",
        "--method",
        "lora",
    ];
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            [&inspect[..], &["--rank", "8", "--num-labels", "0"]].concat(),
            "--num-labels 0",
        ),
        (
            [
                &inspect[..],
                &["--rank", "8", "--num-labels", "18446744073709551615"],
            ]
            .concat(),
            "--num-labels",
        ),
        ([&inspect[..], &["--rank", "0"]].concat(), "rank"),
        (
            [&inspect[..], &["--rank", "8", "--targets", "re:(("]].concat(),
            "((",
        ),
        ([&inspect[..], &["--rank", "800"]].concat(), "800"),
        (
            vec![
                "inspect",
                "--model",
                huge_cfg.to_str().unwrap(),
                "--method",
                "lora",
                "--rank",
                "4",
            ],
            "num_hidden_layers",
        ),
        (
            vec![
                "inspect", "--model", "nope", "--method", "lora", "--rank", "4",
            ],
            "nope",
        ),
        (
            vec![
                "inspect",
                "--model",
                "bert-base-uncased",
                "--method",
                "dora",
                "--rank",
                "4",
            ],
            "dora",
        ),
        (
            vec![
                "train",
                "--preset",
                g,
                "--set",
                "optim.batch_size=1000000000",
            ],
            "optim.batch_size",
        ),
        (
            vec!["train", "--preset", g, "--set", "optim.batch_size=7"],
            "optim.batch_size = 7",
        ),
        (
            vec!["train", "--preset", g, "--set", "optim.epochs=nan"],
            "optim.epochs",
        ),
        (
            vec!["train", "--preset", g, "--set", "optim.head_lr=-1"],
            "optim.head_lr",
        ),
        (
            vec!["train", "--preset", g, "--set", "optim.max_grad_norm=-1"],
            "optim.max_grad_norm",
        ),
        (
            vec!["train", "--preset", g, "--set", "model.max_length=0"],
            "model.max_length",
        ),
        (
            vec!["train", "--preset", g, "--set", "optim.weight_decay=nan"],
            "optim.weight_decay",
        ),
        (vec!["train", "--preset", g, "--set", "optim"], "key=value"),
        (
            vec!["train", "--preset", "/nonexistent/p.toml"],
            "/nonexistent/p.toml",
        ),
        (vec!["train", "--preset", h], "num_hidden_layers"),
        (vec!["train", "--preset", o], "1 class"),
        (
            vec!["compare", "--preset", g, "--preset", "/nonexistent/q.toml"],
            "q.toml",
        ),
        (
            vec![
                "personalize",
                "--refs",
                refs_dir,
                "--out",
                "o",
                "--n",
                "100000",
            ],
            "--n 100000",
        ),
        (
            vec!["personalize", "--refs", refs_dir, "--out", "/proc/peft-out"],
            "cannot write",
        ),
        (
            vec!["personalize", "--refs", refs_dir, "--out", "gallery"],
            "truncated",
        ),
        (vec!["eval-personalize", "--jobs", "0"], "--jobs 0"),
        (vec!["eval-personalize", "--refs", "0"], "--refs 0"),
        (
            vec!["eval-personalize", "--out", "/proc/peft-eval/x"],
            "cannot write",
        ),
        (
            vec!["bench-personalize", "--out", "/proc/peft-bench/x.md"],
            "cannot write",
        ),
        (
            vec!["difflora-build", "--preset", z],
            "generator_training.steps",
        ),
        (
            vec!["difflora-build", "--preset", "/nonexistent/d.toml"],
            "d.toml",
        ),
    ];
    let mut problems = Vec::new();
    for (args, needle) in &cases {
        problems.extend(check(dir, args, needle));
    }
    // No bad input left a run folder behind (let alone one marked running).
    let runs = dir.join("runs");
    let left = std::fs::read_dir(&runs).map_or(0, |d| d.count());
    if left > 0 {
        problems.push(format!("{left} run folder(s) left in {}", runs.display()));
    }
    eprintln!(
        "binary: {} cases tried, {} clean errors, {} problems",
        cases.len(),
        cases.len() - problems.len(),
        problems.len()
    );
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn compare_exits_non_zero_when_a_preset_fails() {
    let s = Scratch::new("compare");
    let vit = tiny_vit_copy(&s, "vit", |_| {});
    let good = s.write(
        "good.toml",
        train_preset(&vit, &image_folder(&s, "imgs", 2, 4)).as_bytes(),
    );
    let one = s.write(
        "one.toml",
        train_preset(&vit, &image_folder(&s, "one", 1, 6)).as_bytes(),
    );
    let (code, err) = run(
        &s.0,
        &[
            "compare",
            "--preset",
            good.to_str().unwrap(),
            "--preset",
            one.to_str().unwrap(),
        ],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("1 of 2 presets failed"), "{err}");
    // The finished run still gets its table.
    let compare_dirs = std::fs::read_dir(s.0.join("runs"))
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("compare-"))
        .count();
    assert_eq!(compare_dirs, 1, "{err}");
}

#[test]
fn personalize_into_a_used_folder_keeps_only_the_new_gallery() {
    use peft_studio::personalize::commands::personalize_command;
    use peft_studio::personalize::pipeline::builtin_dir;
    let s = Scratch::new("regallery");
    let refs = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/samples/ada");
    let out = s.0.join("out");
    personalize_command(
        &builtin_dir(),
        &refs,
        "",
        3,
        0,
        &out,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    std::fs::write(out.join("images/notes.txt"), "mine").unwrap();
    let r = personalize_command(
        &builtin_dir(),
        &refs,
        "",
        1,
        0,
        &out,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let mut names: Vec<String> = std::fs::read_dir(out.join("images"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["01.png", "notes.txt"],
        "old gallery images removed, others kept"
    );
    assert_eq!(r.images.len(), 1);
}

//! The `peft-studio` binary's `inspect` command, from a Hugging Face config.json alone.

use std::process::Command;

fn inspect(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_peft-studio"))
        .arg("inspect")
        .args(args)
        .output()
        .expect("running peft-studio");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const ROBERTA: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/data/roberta-base/config.json"
);

fn json_counts(args: &[&str]) -> (u64, u64) {
    let mut all = args.to_vec();
    all.push("--json");
    let (ok, out, err) = inspect(&all);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("one JSON object");
    (
        v["trainable"].as_u64().unwrap(),
        v["total"].as_u64().unwrap(),
    )
}

#[test]
fn roberta_base_counts_from_its_config() {
    let base = ["--model", ROBERTA, "--targets", "query,value"];
    let with = |extra: &[&'static str]| -> Vec<&str> {
        base.iter().copied().chain(extra.iter().copied()).collect()
    };
    let (t, total) = json_counts(&with(&["--method", "lora", "--rank", "8"]));
    assert_eq!(t, 294_912);
    assert_eq!(total, 124_645_632 + 294_912);
    assert_eq!(
        json_counts(&with(&["--method", "svfit", "--rank", "768"])).0,
        18_432
    );
    assert_eq!(
        json_counts(&with(&["--method", "loldu", "--rank", "768"])).0,
        18_432
    );
    assert_eq!(
        json_counts(&with(&[
            "--method",
            "loldu",
            "--rank",
            "768",
            "--trainable-scale"
        ]))
        .0,
        18_456
    );
    // The model folder works as well as the file.
    let folder = ROBERTA.trim_end_matches("/config.json");
    assert_eq!(
        json_counts(&["--model", folder, "--method", "lora", "--rank", "8"]).0,
        294_912
    );
}

#[test]
fn text_output_lists_modules_and_totals() {
    let (ok, out, _) = inspect(&["--model", ROBERTA, "--method", "lora", "--rank", "8"]);
    assert!(ok);
    assert!(out.contains("encoder.layer.11.attention.self.value"));
    assert!(out.contains("768×768"));
    assert!(out.contains("trainable: 294,912"));
    assert!(out.contains("24 adapted modules"));
}

#[test]
fn vit_with_a_head() {
    let cfg = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/vit-small-config.json"
    );
    let (ok, out, err) = inspect(&[
        "--model",
        cfg,
        "--method",
        "lora",
        "--rank",
        "4",
        "--num-labels",
        "10",
        "--json",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    // 4 layers × (query, value) × 4·(64+64), plus the head 64·10+10 trained fully.
    assert_eq!(v["adapter_trainable"], 4 * 2 * 4 * 128);
    assert_eq!(v["head_trainable"], 650);
    assert_eq!(v["trainable"], 4 * 2 * 4 * 128 + 650);
    assert!(
        v["modules"][0]["path"]
            .as_str()
            .unwrap()
            .starts_with("vit.encoder.layer.0.attention.attention.query")
    );
}

#[test]
fn bad_input_is_a_clear_error() {
    let (ok, _, err) = inspect(&["--model", ROBERTA, "--method", "lora", "--rank", "0"]);
    assert!(!ok && err.contains("rank"), "{err}");
    let (ok, _, err) = inspect(&["--model", ROBERTA, "--method", "svfit", "--rank", "769"]);
    assert!(
        !ok && err.contains("rank 769") && err.contains("query"),
        "{err}"
    );
    let (ok, _, err) = inspect(&[
        "--model",
        ROBERTA,
        "--method",
        "lora",
        "--rank",
        "8",
        "--targets",
        "qkv",
    ]);
    assert!(
        !ok && err.contains("qkv") && err.contains("match no"),
        "{err}"
    );
    let (ok, _, err) = inspect(&[
        "--model",
        "/no/such/config.json",
        "--method",
        "lora",
        "--rank",
        "8",
    ]);
    assert!(!ok && err.contains("/no/such/config.json"), "{err}");
    assert!(!err.contains("panicked"));
}

#[test]
fn llama_family_counts_give_the_papers_ratios() {
    const LLAMA2_7B: u64 = 6_738_415_616;
    let lm = |extra: &[&'static str]| -> (u64, u64) {
        let mut a = vec!["--model", "llama-2-7b"];
        a.extend_from_slice(extra);
        json_counts(&a)
    };
    // PEFT's default targets for LLaMA (q_proj, v_proj): 64 modules of 4096×4096.
    assert_eq!(
        lm(&["--method", "lora", "--rank", "8"]),
        (4_194_304, LLAMA2_7B + 4_194_304)
    );
    // all-linear: every projection of the 32 layers, never lm_head.
    assert_eq!(
        lm(&["--method", "lora", "--rank", "8", "--targets", "all-linear"]).0,
        19_988_480
    );
    // SVFit and LoLDU train r values per module.
    assert_eq!(lm(&["--method", "svfit", "--rank", "8"]).0, 64 * 8);
    assert_eq!(lm(&["--method", "loldu", "--rank", "8"]).0, 64 * 8);
    assert_eq!(
        json_counts(&["--model", "smollm2-135m", "--method", "lora", "--rank", "8"]),
        (460_800, 134_515_008 + 460_800)
    );
    // A config.json of model_type qwen2 (written by transformers): hidden 32, 2 layers,
    // 4 heads of 8, 2 KV heads; LoRA r4 on q (32×32) and v (16×32).
    let qwen = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/reference/llama_tiny/qwen2_biases/config.json"
    );
    let (t, _) = json_counts(&["--model", qwen, "--method", "lora", "--rank", "4"]);
    assert_eq!(t, 2 * (4 * (32 + 32) + 4 * (16 + 32)));
    let (ok, out, _) = inspect(&["--model", "llama-2-7b", "--method", "lora", "--rank", "8"]);
    assert!(
        ok && out.contains("model.layers.31.self_attn.v_proj") && out.contains("untied lm_head")
    );
    let (ok, _, err) = inspect(&[
        "--model",
        "smollm2-135m",
        "--method",
        "lora",
        "--rank",
        "8",
        "--num-labels",
        "2",
    ]);
    assert!(!ok && err.contains("--num-labels"), "{err}");
}

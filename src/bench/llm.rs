//! The SmolLM2-135M benchmark: a causal-LM training step (batch 4 × 256 tokens, every token
//! trained, AdamW) with LoRA r=8 on q_proj/v_proj (on the f32 folder, or QLoRA-style on the
//! packed Q4_1 GGUF) or full fine-tuning, and greedy generation; the peer's `llm_step.py` on
//! the same f32 weights beside each.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Var};
use rand::{Rng, SeedableRng};

use super::StepStats;
use super::machine::ProcCounters;
use super::split_precision;
use crate::models::llama::{LlamaModel, load_folder};
use crate::peft::linear::{attach_adapters, trainable_vars};
use crate::peft::{AdapterConfig, MatmulPrecisionGuard, Method, Targets};
use crate::train::lm_batches::{LmExample, lm_batch, lm_loss};
use crate::train::optim::{AdamW, AdamWParams};

/// The variants: LoRA r=8 on q_proj/v_proj; the same LoRA on the built-in Q4_1 GGUF with its
/// base kept packed (QLoRA's recipe; the peer runs its f32 LoRA beside it: PEFT's QLoRA needs
/// bitsandbytes and CUDA); both with `model.matmul_precision = "bf16"` (`-bf16`: the frozen
/// base's products in bf16 on AMX or AVX512-BF16, f32 where the CPU has neither; the peer
/// runs its f32 LoRA beside them); full fine-tuning; `generate`: a greedy chat answer of
/// [`GENERATE_TOKENS`] tokens (the peer's `--generate`), timed as seconds per new token.
pub const LLM_VARIANTS: [&str; 6] = [
    "lora",
    "qlora",
    "lora-bf16",
    "qlora-bf16",
    "full",
    "generate",
];

/// The `generate` variant's user message (rendered with the model's chat template).
pub const GENERATE_PROMPT: &str = "Write a short poem about the sea.";

/// New tokens the `generate` variant produces (the end token ignored on both sides, as the
/// peer's `--ignore-eos` does, so both time the same number).
pub const GENERATE_TOKENS: usize = 64;

/// The peer's `--mode` for a variant.
fn peer_mode(variant: &str) -> &str {
    match split_precision(variant).0 {
        "qlora" => "lora",
        v => v,
    }
}

/// Sequences per step and tokens per sequence (the peer's defaults).
pub const BATCH: (usize, usize) = (4, 256);

/// The f32 Hugging Face folder both sides read: `$PEER_VENV/smollm2-135m-instruct-f32`, which the
/// peer's `setup.sh` writes from the same GGUF peft-studio ships.
pub fn model_dir() -> anyhow::Result<PathBuf> {
    let venv = match std::env::var_os("PEER_VENV") {
        Some(v) => PathBuf::from(v),
        None => std::env::var_os("HOME")
            .map(|h| Path::new(&h).join(".cache/peft-peer"))
            .ok_or_else(|| anyhow::anyhow!("PEER_VENV is not set and there is no HOME"))?,
    };
    let dir = venv.join("smollm2-135m-instruct-f32");
    anyhow::ensure!(
        dir.join("config.json").is_file(),
        "the SmolLM2 benchmark needs {}: run ../shared/peer/setup.sh (or set PEER_VENV)",
        dir.display()
    );
    Ok(dir)
}

/// The peer's arguments for `variant`: same batch, rank, targets, weights and threads (for
/// `generate`: the same prompt and number of new tokens).
pub fn peer_args(variant: &str, steps: usize, threads: usize, model_dir: &Path) -> Vec<String> {
    if variant == "generate" {
        return vec![
            "--generate".into(),
            "--prompt".into(),
            GENERATE_PROMPT.into(),
            "--max-new-tokens".into(),
            GENERATE_TOKENS.to_string(),
            "--ignore-eos".into(),
            "--threads".into(),
            threads.to_string(),
            "--model-dir".into(),
            model_dir.display().to_string(),
        ];
    }
    let (b, t) = BATCH;
    vec![
        "--mode".into(),
        peer_mode(variant).into(),
        "--steps".into(),
        (steps + 1).to_string(),
        "--threads".into(),
        threads.to_string(),
        "--batch".into(),
        b.to_string(),
        "--seq".into(),
        t.to_string(),
        "--rank".into(),
        "8".into(),
        "--model-dir".into(),
        model_dir.display().to_string(),
    ]
}

/// The trainable variables of `variant` on `model`.
fn trainable(model: &mut LlamaModel, variant: &str) -> anyhow::Result<Vec<Var>> {
    match variant {
        "lora" | "qlora" => {
            let cfg = AdapterConfig {
                method: Method::Lora,
                rank: 8,
                alpha: Some(16.0),
                targets: Targets::List(vec!["q_proj".into(), "v_proj".into()]),
                ..AdapterConfig::default()
            };
            attach_adapters(model, &cfg)?;
            Ok(trainable_vars(model).into_iter().map(|(_, v)| v).collect())
        }
        "full" => Ok(model
            .train_everything()?
            .into_iter()
            .map(|(_, v)| v)
            .collect()),
        other => anyhow::bail!(
            "unknown variant `{other}` (one of: {})",
            LLM_VARIANTS.join(", ")
        ),
    }
}

/// One variant: `steps` timed AdamW steps after one warm-up step, on seeded random tokens.
pub fn llm_step(variant: &str, steps: usize, device: &Device) -> anyhow::Result<StepStats> {
    anyhow::ensure!(
        (1..=10_000).contains(&steps),
        "--steps must be 1 to 10000, got {steps}"
    );
    let dir = model_dir()?;
    if variant == "generate" {
        return generation(&dir, device);
    }
    let name = variant;
    let (variant, precision) = split_precision(variant);
    let _precision = MatmulPrecisionGuard::set(precision);
    let mut model = if variant == "qlora" {
        let gguf = crate::models::llama::smollm2_path()
            .ok_or_else(|| anyhow::anyhow!("{}", crate::models::llama::smollm2_fetch_hint()))?;
        crate::models::llama::load_gguf_packed(&gguf, device)?
    } else {
        load_folder(&dir, device)?
    };
    let vars = trainable(&mut model, variant)?;
    let count: usize = vars.iter().map(|v| v.elem_count()).sum();
    let mut opt = AdamW::new(
        vars,
        AdamWParams {
            lr: 1e-4,
            ..Default::default()
        },
    )?;
    let (b, t) = BATCH;
    let vocab = model.config().vocab_size as u32;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let examples: Vec<LmExample> = (0..b)
        .map(|_| LmExample {
            ids: (0..t).map(|_| rng.random_range(0..vocab)).collect(),
            loss_mask: vec![true; t],
        })
        .collect();
    let refs: Vec<&LmExample> = examples.iter().collect();
    let batch = lm_batch(&refs, 0, device)?
        .ok_or_else(|| anyhow::anyhow!("the benchmark batch has no trained token"))?;
    crate::memory::reset_peak_rss();
    let mut times = Vec::with_capacity(steps);
    let mut before = None;
    for step in 0..=steps {
        if step == 1 {
            before = ProcCounters::read();
        }
        let t0 = Instant::now();
        let loss = lm_loss(&model, &batch, true)?;
        let grads = loss.backward()?;
        opt.step(&grads)?;
        drop(grads);
        // A GPU queues work: the step ends when its kernels have run.
        device.synchronize()?;
        if step > 0 {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    let counters = before
        .zip(ProcCounters::read())
        .map(|(a, b)| b.since(&a, steps));
    times.sort_by(f64::total_cmp);
    Ok(StepStats {
        variant: format!("SmolLM2-135M {name}"),
        steps,
        secs_per_step: times[times.len() / 2],
        best_secs: times[0],
        peak_rss_mib: crate::memory::peak_rss_bytes()
            .map(crate::memory::mib)
            .unwrap_or(0.0),
        trainable: count,
        minor_faults_per_step: counters.map(|c| c.0),
        cpu_percent: counters.map(|c| c.1),
    })
}

/// What the `generate` row of a table measures (a paragraph).
pub fn generate_note() -> String {
    format!(
        "The generate row: one greedy chat answer of {GENERATE_TOKENS} new tokens to \
         \"{GENERATE_PROMPT}\" per round on each side (the end token ignored on both, \
         `--generate --ignore-eos` for the peer), in seconds per new token, the prompt's forward \
         pass included (the peer's `generate_s`); its \"s/step\" columns are s/token.\n\n"
    )
}

/// The `generate` variant: one greedy answer of [`GENERATE_TOKENS`] new tokens to
/// [`GENERATE_PROMPT`] on the f32 folder in `dir`, timed from the prompt's forward pass to the
/// last token (what the peer's `generate_s` covers); "s/step" is seconds per new token.
fn generation(dir: &Path, device: &Device) -> anyhow::Result<StepStats> {
    use crate::data::Message;
    use crate::models::llama::{GenerateOptions, generate_tokens, load_language_model};
    let lm = load_language_model(dir, device)?;
    let template = crate::train::causal_lm::chat_template(&lm.tokenizer, dir)?
        .ok_or_else(|| anyhow::anyhow!("{}: the model has no chat template", dir.display()))?;
    let prompt = template.render(&[Message::new("user", GENERATE_PROMPT)], true)?;
    let ids = lm.tokenizer.encode(&prompt, false)?;
    // No stop tokens: always GENERATE_TOKENS, like the peer's --ignore-eos.
    let opts = GenerateOptions {
        max_new_tokens: GENERATE_TOKENS,
        ..GenerateOptions::default()
    };
    crate::memory::reset_peak_rss();
    let before = ProcCounters::read();
    let out = generate_tokens(&lm.model, &ids, &opts, &mut |_| true)?;
    let counters = before
        .zip(ProcCounters::read())
        .map(|(a, b)| b.since(&a, 1));
    let t = out.timings;
    anyhow::ensure!(
        t.new_tokens == GENERATE_TOKENS,
        "generated {} tokens",
        t.new_tokens
    );
    let per_token = (t.prompt_secs + t.decode_secs) / t.new_tokens as f64;
    Ok(StepStats {
        variant: format!("SmolLM2-135M generate ({GENERATE_TOKENS} greedy tokens; s per token)"),
        steps: 1,
        secs_per_step: per_token,
        best_secs: per_token,
        peak_rss_mib: crate::memory::peak_rss_bytes()
            .map(crate::memory::mib)
            .unwrap_or(0.0),
        trainable: 0,
        minor_faults_per_step: counters.map(|c| c.0),
        cpu_percent: counters.map(|c| c.1),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generate_variant_asks_the_peer_for_the_same_answer() {
        let a = peer_args("generate", 3, 2, Path::new("/m"));
        let at = |flag: &str| a.iter().position(|x| x == flag).map(|i| a[i + 1].as_str());
        assert!(a.contains(&"--generate".to_string()));
        assert!(a.contains(&"--ignore-eos".to_string()));
        assert_eq!(at("--prompt"), Some(GENERATE_PROMPT));
        assert_eq!(at("--max-new-tokens"), Some("64"));
        assert_eq!(at("--threads"), Some("2"));
        assert_eq!(at("--model-dir"), Some("/m"));
        // Training variants keep the training arguments.
        assert!(!peer_args("lora", 3, 2, Path::new("/m")).contains(&"--generate".to_string()));
        assert!(generate_note().contains("64 new tokens"));
    }
}

//! `peft-studio generate`: load a language model, render the prompt, stream the answer to
//! stdout, then print the speed to stderr.

use std::io::Write;

use anyhow::Context;
use peft_studio::data::Message;
use peft_studio::models::llama::{
    GenerateOptions, Sampling, StopReason, generate_text, load_language_model, resolve_model,
};
use peft_studio::train::causal_lm::{apply_trained, chat_template, trained_at};

/// Arguments of `generate`.
#[derive(clap::Args)]
pub struct GenerateArgs {
    /// A model folder, a .gguf file, or the built-in name `smollm2-135m-instruct`.
    #[arg(long)]
    model: String,
    /// The user's message (or, with --raw, the exact text to continue).
    #[arg(long)]
    prompt: String,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// 0 = greedy; above 0 samples.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Sample among the k most likely tokens.
    #[arg(long)]
    top_k: Option<usize>,
    /// Sample among the most likely tokens summing to probability p.
    #[arg(long)]
    top_p: Option<f64>,
    /// Sampler seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Use the prompt as is, without the chat template.
    #[arg(long)]
    raw: bool,
    /// A fine-tuned run folder (or an adapter folder, or a fully fine-tuned model folder) to
    /// apply to the model.
    #[arg(long)]
    adapter: Option<std::path::PathBuf>,
    /// Where it computes: auto (a GPU when this binary has CUDA and one is present, else the
    /// CPU), cpu, cuda:N.
    #[arg(long, default_value = "auto")]
    device: peft_studio::device::DeviceChoice,
}

/// Runs the command.
pub fn run(a: GenerateArgs) -> anyhow::Result<()> {
    let mut opts = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        sampling: Sampling {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            seed: a.seed,
        },
        stop_ids: Vec::new(),
    };
    // Bad options fail before the model loads.
    opts.validate()?;
    if a.temperature == 0.0 && (a.top_k.is_some() || a.top_p.is_some()) {
        anyhow::bail!(
            "--top-k and --top-p apply to sampling: give --temperature above 0 (0, the default, is greedy)"
        );
    }
    let trained = a.adapter.as_deref().map(trained_at).transpose()?;
    let path = resolve_model(&a.model).map_err(anyhow::Error::msg)?;
    let device = a.device.resolve()?;
    let mut lm = load_language_model(&path, &device)
        .with_context(|| format!("loading {}", path.display()))?;
    if let Some(t) = &trained {
        apply_trained(&mut lm, t)?;
    }
    let tok = &lm.tokenizer;
    let ids = if a.raw {
        tok.encode(&a.prompt, true)?
    } else {
        let template = chat_template(tok, &path)?.ok_or_else(|| {
            anyhow::anyhow!(
                "{}: the model has no chat template; give --raw to continue the prompt as plain text",
                path.display()
            )
        })?;
        let prompt = template.render(&[Message::new("user", a.prompt.as_str())], true)?;
        tok.encode(&prompt, false)?
    };
    opts.stop_ids = tok.stop_ids.clone();
    let mut out = std::io::stdout().lock();
    let g = generate_text(&lm.model, tok, &ids, &opts, &mut |piece| {
        // A closed stdout (`| head`) stops generating.
        out.write_all(piece.as_bytes())
            .and_then(|()| out.flush())
            .is_ok()
    })?;
    let _ = writeln!(out).and_then(|()| out.flush());
    let t = g.timings;
    let why = match g.stop {
        StopReason::StopToken(_) => "end token",
        StopReason::MaxTokens => "max new tokens",
        StopReason::ContextFull => "context full",
        StopReason::Cancelled => "output closed",
    };
    eprintln!(
        "{} prompt tokens at {:.1} tokens/s; {} new tokens ({why}) at {:.1} tokens/s ({:.1} tokens/s with the prompt)",
        t.prompt_tokens,
        t.prompt_tokens_per_s(),
        t.new_tokens,
        t.decode_tokens_per_s(),
        t.overall_tokens_per_s()
    );
    Ok(())
}

//! Text generation with the KV cache: greedy or sampled (temperature, top-k, top-p, seeded),
//! stopping at an end token or a length, streaming text pieces as they form.

use std::time::Instant;

use candle_core::Tensor;
use rand::{Rng, SeedableRng};

use super::model::{KvCache, LlamaModel};
use super::tokenizer::LlmTokenizer;
use crate::models::ModelError;

/// What is wrong with a generation request, or the model failing.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// An option outside its range.
    #[error("{name} {problem}")]
    Option {
        /// The option.
        name: &'static str,
        /// Allowed range and the value found.
        problem: String,
    },
    /// The prompt has no tokens.
    #[error("the prompt is empty: nothing to continue")]
    EmptyPrompt,
    /// The prompt does not fit the model's context.
    #[error("the prompt has {tokens} tokens, the model's context holds {context}")]
    PromptTooLong {
        /// Prompt tokens.
        tokens: usize,
        /// `max_position_embeddings`.
        context: usize,
    },
    /// Tokenizer or weights.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// How the next token is chosen.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    /// 0 picks the most likely token (greedy); above 0 divides the logits before sampling.
    pub temperature: f64,
    /// Sample among the `k` most likely tokens only.
    pub top_k: Option<usize>,
    /// Sample among the most likely tokens whose probabilities sum to at least `p`.
    pub top_p: Option<f64>,
    /// Seed of the sampler: the same seed, model and prompt give the same text.
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 0,
        }
    }
}

/// A generation request.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    /// Most tokens to generate (an end token counts).
    pub max_new_tokens: usize,
    /// Token choice.
    pub sampling: Sampling,
    /// Tokens that end generation (not part of the text): usually the tokenizer's
    /// [`stop_ids`](LlmTokenizer::stop_ids).
    pub stop_ids: Vec<u32>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_new_tokens: 128,
            sampling: Sampling::default(),
            stop_ids: Vec::new(),
        }
    }
}

impl GenerateOptions {
    /// Checks every option's range.
    pub fn validate(&self) -> Result<(), GenerateError> {
        let bad = |name, problem: String| Err(GenerateError::Option { name, problem });
        if self.max_new_tokens == 0 {
            return bad("max_new_tokens", "must be at least 1, found 0".into());
        }
        let t = self.sampling.temperature;
        if !(t.is_finite() && (0.0..=100.0).contains(&t)) {
            return bad(
                "temperature",
                format!("must be between 0 and 100, found {t}"),
            );
        }
        if self.sampling.top_k == Some(0) {
            return bad("top_k", "must be at least 1, found 0".into());
        }
        if let Some(p) = self.sampling.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return bad("top_p", format!("must be in (0, 1], found {p}"));
        }
        Ok(())
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The model produced this end token.
    StopToken(u32),
    /// `max_new_tokens` were generated.
    MaxTokens,
    /// The model's context is full.
    ContextFull,
    /// The callback asked to stop.
    Cancelled,
}

/// Token counts and seconds of one generation.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Timings {
    /// Tokens of the prompt.
    pub prompt_tokens: usize,
    /// Tokens generated, an end token included.
    pub new_tokens: usize,
    /// Seconds reading the prompt (one forward over it) and choosing the first token.
    pub prompt_secs: f64,
    /// Seconds of the one-token steps after that.
    pub decode_secs: f64,
    /// One-token forward passes after the prompt's.
    pub decode_steps: usize,
}

impl Timings {
    /// Prompt tokens per second.
    pub fn prompt_tokens_per_s(&self) -> f64 {
        rate(self.prompt_tokens, self.prompt_secs)
    }

    /// Generation speed: one-token steps per second.
    pub fn decode_tokens_per_s(&self) -> f64 {
        rate(self.decode_steps, self.decode_secs)
    }

    /// New tokens per second of the whole call, prompt included (what `transformers`'
    /// `generate` timings give).
    pub fn overall_tokens_per_s(&self) -> f64 {
        rate(self.new_tokens, self.prompt_secs + self.decode_secs)
    }
}

fn rate(n: usize, secs: f64) -> f64 {
    if secs > 0.0 { n as f64 / secs } else { 0.0 }
}

/// Generated token ids.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenGeneration {
    /// The new tokens, the end token left out.
    pub tokens: Vec<u32>,
    /// Why it ended.
    pub stop: StopReason,
    /// Counts and seconds.
    pub timings: Timings,
}

/// Generated text.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// The new text (special tokens left out).
    pub text: String,
    /// The new tokens, the end token left out.
    pub tokens: Vec<u32>,
    /// Why it ended.
    pub stop: StopReason,
    /// Counts and seconds.
    pub timings: Timings,
}

/// Chooses tokens from logits.
#[derive(Debug, Clone)]
pub struct Sampler {
    sampling: Sampling,
    rng: rand::rngs::StdRng,
}

/// The index of the largest value (the first of equal ones); NaN never wins.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] || logits[best].is_nan() {
            best = i;
        }
    }
    best as u32
}

impl Sampler {
    /// A sampler seeded with `sampling.seed`.
    pub fn new(sampling: &Sampling) -> Self {
        Self {
            sampling: sampling.clone(),
            rng: rand::rngs::StdRng::seed_from_u64(sampling.seed),
        }
    }

    /// The next token for one position's logits.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let s = &self.sampling;
        if s.temperature <= 0.0 || s.top_k == Some(1) || logits.len() < 2 {
            return argmax(logits);
        }
        // Candidates, most likely first (ties by lower id).
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        let key = |i: &u32| {
            let x = logits[*i as usize];
            if x.is_nan() { f32::NEG_INFINITY } else { x }
        };
        order.sort_by(|a, b| key(b).total_cmp(&key(a)).then(a.cmp(b)));
        if let Some(k) = s.top_k {
            order.truncate(k.max(1));
        }
        let top = key(&order[0]) as f64;
        let mut probs: Vec<f64> = order
            .iter()
            .map(|i| ((key(i) as f64 - top) / s.temperature).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if let Some(p) = s.top_p {
            let mut cum = 0.0;
            let mut keep = probs.len();
            for (n, q) in probs.iter().enumerate() {
                cum += q;
                if cum >= p {
                    keep = n + 1;
                    break;
                }
            }
            probs.truncate(keep);
            order.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let mut u = self.rng.random::<f64>() * total;
        for (i, q) in order.iter().zip(&probs) {
            if u < *q {
                return *i;
            }
            u -= q;
        }
        order[order.len() - 1]
    }
}

/// The logits of the last position of (1, T, V) as a vector.
fn last_logits(logits: &Tensor) -> candle_core::Result<Vec<f32>> {
    let t = logits.dim(1)?;
    logits
        .narrow(1, t - 1, 1)?
        .squeeze(1)?
        .squeeze(0)?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1()
}

/// Generates tokens after `prompt`, calling `on_token` with each new one (not end tokens);
/// `on_token` returning false stops.
pub fn generate_tokens(
    model: &LlamaModel,
    prompt: &[u32],
    opts: &GenerateOptions,
    on_token: &mut dyn FnMut(u32) -> bool,
) -> Result<TokenGeneration, GenerateError> {
    opts.validate()?;
    if prompt.is_empty() {
        return Err(GenerateError::EmptyPrompt);
    }
    let context = model.config().max_position_embeddings;
    if prompt.len() >= context {
        return Err(GenerateError::PromptTooLong {
            tokens: prompt.len(),
            context,
        });
    }
    let dev = model.device().clone();
    let mut sampler = Sampler::new(&opts.sampling);
    let mut cache = KvCache::new();
    let mut timings = Timings {
        prompt_tokens: prompt.len(),
        ..Timings::default()
    };
    let start = Instant::now();
    let ids = Tensor::from_slice(prompt, (1, prompt.len()), &dev)?;
    let mut logits = last_logits(&model.forward_cached(&ids, &mut cache)?)?;
    let mut tokens = Vec::new();
    let mut prompt_done = false;
    let mut decode_start = start;
    let stop = loop {
        let id = sampler.sample(&logits);
        if !prompt_done {
            timings.prompt_secs = start.elapsed().as_secs_f64();
            prompt_done = true;
            decode_start = Instant::now();
        }
        timings.new_tokens += 1;
        if opts.stop_ids.contains(&id) {
            break StopReason::StopToken(id);
        }
        tokens.push(id);
        if !on_token(id) {
            break StopReason::Cancelled;
        }
        if timings.new_tokens >= opts.max_new_tokens {
            break StopReason::MaxTokens;
        }
        if cache.len() >= context {
            break StopReason::ContextFull;
        }
        let next = Tensor::from_slice(&[id], (1, 1), &dev)?;
        logits = last_logits(&model.forward_cached(&next, &mut cache)?)?;
        timings.decode_steps += 1;
    };
    timings.decode_secs = decode_start.elapsed().as_secs_f64();
    Ok(TokenGeneration {
        tokens,
        stop,
        timings,
    })
}

/// Turns tokens into text pieces as they complete: a piece is given out only once its
/// characters are whole (byte-level tokens can end inside a UTF-8 character).
#[derive(Debug, Default, Clone)]
pub struct TextStream {
    tokens: Vec<u32>,
    /// Start of the tokens decoded together (context for the next piece).
    prev: usize,
    /// End of the tokens already given out.
    cur: usize,
}

impl TextStream {
    /// An empty stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a token; returns the new text if some completed.
    pub fn push(&mut self, tok: &LlmTokenizer, id: u32) -> Result<Option<String>, ModelError> {
        let before = tok.decode(&self.tokens[self.prev..self.cur])?;
        self.tokens.push(id);
        let now = tok.decode(&self.tokens[self.prev..])?;
        if now.len() > before.len()
            && !now.ends_with('\u{FFFD}')
            && let Some(piece) = now.get(before.len()..)
            && now.starts_with(&before)
        {
            self.prev = self.cur;
            self.cur = self.tokens.len();
            return Ok(Some(piece.to_string()));
        }
        Ok(None)
    }

    /// The text not given out yet (an incomplete character at the very end included).
    pub fn finish(&mut self, tok: &LlmTokenizer) -> Result<Option<String>, ModelError> {
        let before = tok.decode(&self.tokens[self.prev..self.cur])?;
        let now = tok.decode(&self.tokens[self.prev..])?;
        self.prev = self.cur;
        self.cur = self.tokens.len();
        Ok(now
            .get(before.len()..)
            .filter(|p| !p.is_empty() && now.starts_with(&before))
            .map(str::to_string))
    }
}

/// Generates text after `prompt` (token ids), giving `on_text` each piece of text as it
/// forms; `on_text` returning false stops.
pub fn generate_text(
    model: &LlamaModel,
    tok: &LlmTokenizer,
    prompt: &[u32],
    opts: &GenerateOptions,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> Result<Generation, GenerateError> {
    let mut stream = TextStream::new();
    let mut failure: Option<ModelError> = None;
    let out = generate_tokens(model, prompt, opts, &mut |id| match stream.push(tok, id) {
        Ok(Some(piece)) => on_text(&piece),
        Ok(None) => true,
        Err(e) => {
            failure = Some(e);
            false
        }
    })?;
    if let Some(e) = failure {
        return Err(e.into());
    }
    if let Some(rest) = stream.finish(tok)? {
        on_text(&rest);
    }
    Ok(Generation {
        text: tok.decode(&out.tokens)?,
        tokens: out.tokens,
        stop: out.stop,
        timings: out.timings,
    })
}

/// The logits of every position for `ids` in one forward pass, as rows (tests compare the
/// cached generation against it).
pub fn full_logits(model: &LlamaModel, ids: &[u32]) -> candle_core::Result<Vec<Vec<f32>>> {
    let t = Tensor::from_slice(ids, (1, ids.len()), model.device())?;
    model
        .forward(&t, None, false)?
        .squeeze(0)?
        .to_dtype(candle_core::DType::F32)?
        .to_vec2()
}

//! The LLaMA-family causal language model: token embedding, pre-norm decoder layers
//! (grouped-query attention with RoPE, SwiGLU), final RMSNorm and `lm_head`, with Hugging
//! Face module paths so adapters target `model.layers.N.self_attn.q_proj` and friends.

use candle_core::{DType, Device, Result, Tensor, Var};

use super::config::LlamaConfig;
use crate::models::ModelError;
use crate::models::attention::{causal_attention, fused_attention_applies};
use crate::models::composed::repeat_kv;
use crate::models::lm_ops::{rms_norm, rope_heads, swiglu_down};
use crate::models::ops::softmax_last_dim;
use crate::models::weights::{Fill, WeightReader};
use crate::peft::{AdaptedLinear, PeftError, linear::LinearLayers};

/// Additive mask value for positions a query may not see (finite: a fully masked row stays
/// free of NaN).
const MASKED: f32 = -1e9;

fn peft_err(e: PeftError) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

/// Keys and values of the tokens seen so far, per layer, for incremental decoding.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl KvCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Tokens cached so far: the position of the next token.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets every token.
    pub fn clear(&mut self) {
        self.layers.clear();
        self.len = 0;
    }
}

/// One decoder layer.
#[derive(Debug, Clone)]
struct DecoderLayer {
    q: AdaptedLinear,
    k: AdaptedLinear,
    v: AdaptedLinear,
    o: AdaptedLinear,
    gate: AdaptedLinear,
    up: AdaptedLinear,
    down: AdaptedLinear,
    input_norm: (String, Tensor),
    post_norm: (String, Tensor),
}

fn linear(
    r: &mut WeightReader,
    path: String,
    out: usize,
    inp: usize,
    bias: bool,
) -> std::result::Result<AdaptedLinear, ModelError> {
    let b = if bias {
        Some(r.get(&format!("{path}.bias"), &[out], Fill::Zeros)?)
    } else {
        None
    };
    let name = format!("{path}.weight");
    if let Some(p) = r.take_packed(&name, (out, inp))? {
        return Ok(AdaptedLinear::new_packed(path, p, b));
    }
    let w = r.get(&name, &[out, inp], Fill::Normal)?;
    Ok(AdaptedLinear::new(path, w, b))
}

fn norm(
    r: &mut WeightReader,
    path: String,
    d: usize,
) -> std::result::Result<(String, Tensor), ModelError> {
    let w = r.get(&format!("{path}.weight"), &[d], Fill::Ones)?;
    Ok((path, w))
}

impl DecoderLayer {
    fn load(
        r: &mut WeightReader,
        c: &LlamaConfig,
        i: usize,
    ) -> std::result::Result<Self, ModelError> {
        let p = format!("model.layers.{i}");
        let (h, q_out) = (c.hidden_size, c.num_attention_heads * c.head_dim);
        let kv_out = c.num_key_value_heads * c.head_dim;
        let a = format!("{p}.self_attn");
        let m = format!("{p}.mlp");
        let inter = c.intermediate_size;
        Ok(Self {
            q: linear(r, format!("{a}.q_proj"), q_out, h, c.qkv_bias)?,
            k: linear(r, format!("{a}.k_proj"), kv_out, h, c.qkv_bias)?,
            v: linear(r, format!("{a}.v_proj"), kv_out, h, c.qkv_bias)?,
            o: linear(r, format!("{a}.o_proj"), h, q_out, c.o_bias)?,
            gate: linear(r, format!("{m}.gate_proj"), inter, h, c.mlp_bias)?,
            up: linear(r, format!("{m}.up_proj"), inter, h, c.mlp_bias)?,
            down: linear(r, format!("{m}.down_proj"), h, inter, c.mlp_bias)?,
            input_norm: norm(r, format!("{p}.input_layernorm"), h)?,
            post_norm: norm(r, format!("{p}.post_attention_layernorm"), h)?,
        })
    }

    fn linears(&self) -> [&AdaptedLinear; 7] {
        [
            &self.q, &self.k, &self.v, &self.o, &self.gate, &self.up, &self.down,
        ]
    }

    fn linears_mut(&mut self) -> [&mut AdaptedLinear; 7] {
        [
            &mut self.q,
            &mut self.k,
            &mut self.v,
            &mut self.o,
            &mut self.gate,
            &mut self.up,
            &mut self.down,
        ]
    }
}

/// Per-forward context shared by the layers.
struct Step<'a> {
    cos: &'a Tensor,
    sin: &'a Tensor,
    /// (B or 1, 1, T, T_total) additive mask; `None` when the fused attention runs.
    bias: Option<&'a Tensor>,
    /// (B, T) 1 for tokens, 0 for padding (the fused attention's mask).
    pad: Option<&'a Tensor>,
    train: bool,
}

/// A LLaMA / Mistral / Qwen2 causal language model whose linear layers carry adapters.
#[derive(Debug, Clone)]
pub struct LlamaModel {
    config: LlamaConfig,
    embed: Tensor,
    layers: Vec<DecoderLayer>,
    norm: Tensor,
    /// `lm_head`; when tied its weight is the token embedding (shared storage).
    lm_head: AdaptedLinear,
    inv_freq: Vec<f64>,
}

impl LlamaModel {
    /// Builds the model from its config and a weight reader (checkpoint names
    /// `model.embed_tokens.weight`, `model.layers.N.…`, `model.norm.weight`, `lm_head.weight`).
    pub fn load(c: &LlamaConfig, r: &mut WeightReader) -> std::result::Result<Self, ModelError> {
        let h = c.hidden_size;
        let embed = r.get(
            "model.embed_tokens.weight",
            &[c.vocab_size, h],
            Fill::Normal,
        )?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| DecoderLayer::load(r, c, i))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let norm = r.get("model.norm.weight", &[h], Fill::Ones)?;
        let lm_head = if c.tie_word_embeddings {
            AdaptedLinear::new("lm_head", embed.clone(), None)
        } else {
            linear(r, "lm_head".into(), c.vocab_size, h, false)?
        };
        Ok(Self {
            config: c.clone(),
            embed,
            layers,
            norm,
            lm_head,
            inv_freq: c.inv_freq(),
        })
    }

    /// The model's config.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        self.embed.device()
    }

    /// The output projection (not among [`LinearLayers::linears`]: PEFT's `all-linear`
    /// excludes it).
    pub fn lm_head(&self) -> &AdaptedLinear {
        &self.lm_head
    }

    /// Logits (B, T, vocab) for token ids (B, T) u32 at positions 0…T−1. `mask` (B, T), 1 for
    /// tokens and 0 for padding, hides padded keys; `train` enables adapter dropout.
    pub fn forward(&self, ids: &Tensor, mask: Option<&Tensor>, train: bool) -> Result<Tensor> {
        let hidden = self.run(ids, mask, 0, None, train)?;
        self.logits(&hidden, train)
    }

    /// Logits (B, T, vocab) for the next tokens `ids` (B, T) after those in `cache`, which
    /// then holds them too. Equals [`forward`](Self::forward) on the whole sequence.
    pub fn forward_cached(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let offset = cache.len;
        let hidden = self.run(ids, None, offset, Some(cache), false)?;
        self.logits(&hidden, false)
    }

    /// Final-norm hidden states (B, T, hidden).
    pub fn hidden_states(
        &self,
        ids: &Tensor,
        mask: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        self.run(ids, mask, 0, None, train)
    }

    fn logits(&self, hidden: &Tensor, train: bool) -> Result<Tensor> {
        self.lm_head.forward_t(hidden, train).map_err(peft_err)
    }

    fn run(
        &self,
        ids: &Tensor,
        mask: Option<&Tensor>,
        offset: usize,
        mut cache: Option<&mut KvCache>,
        train: bool,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (b, t) = ids.dims2()?;
        if t == 0 {
            candle_core::bail!("an empty sequence has no logits");
        }
        let total = offset + t;
        if total > c.max_position_embeddings {
            candle_core::bail!(
                "sequence of {total} tokens is longer than the model's max_position_embeddings ({})",
                c.max_position_embeddings
            );
        }
        let ids = ids.to_dtype(DType::U32)?;
        let max_id = ids.max_all()?.to_scalar::<u32>()? as usize;
        if max_id >= c.vocab_size {
            candle_core::bail!(
                "token id {max_id} is outside the vocabulary (vocab_size {})",
                c.vocab_size
            );
        }
        let dev = self.device();
        let (cos, sin) = self.rope_tables(offset, t, dev)?;
        // The fused attention covers whole sequences (no cache); cached decoding keeps the
        // composite path. PEFT_STUDIO_COMPOSITE_ATTENTION forces it, for benchmarks.
        let fused = cache.is_none()
            && offset == 0
            && self.embed.device().is_cpu()
            && std::env::var_os("PEFT_STUDIO_COMPOSITE_ATTENTION").is_none();
        let bias = if fused {
            None
        } else {
            Some(self.mask_bias(b, t, offset, mask, dev)?)
        };
        let step = Step {
            cos: &cos,
            sin: &sin,
            bias: bias.as_ref(),
            pad: mask,
            train,
        };
        if let Some(cache) = cache.as_deref_mut() {
            cache.layers.resize(self.layers.len(), None);
        }
        let mut x = self
            .embed
            .embedding(&ids.flatten_all()?)?
            .reshape((b, t, ()))?;
        for (i, layer) in self.layers.iter().enumerate() {
            let kv = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            x = self.layer_forward(layer, &x, &step, kv)?;
        }
        if let Some(cache) = cache {
            cache.len = total;
        }
        rms_norm(&x, &self.norm, c.rms_norm_eps)
    }

    /// cos and sin (T, head_dim / 2) for positions `offset…offset+t`.
    fn rope_tables(&self, offset: usize, t: usize, dev: &Device) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(t * half);
        let mut sin = Vec::with_capacity(t * half);
        for p in offset..offset + t {
            for f in &self.inv_freq {
                let a = p as f64 * f;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        Ok((
            Tensor::from_vec(cos, (t, half), dev)?,
            Tensor::from_vec(sin, (t, half), dev)?,
        ))
    }

    /// Additive mask (B or 1, 1, T, offset+T): query i (position offset+i) sees key j when
    /// j ≤ offset+i, within the sliding window if any, and the key is not padding.
    fn mask_bias(
        &self,
        b: usize,
        t: usize,
        offset: usize,
        mask: Option<&Tensor>,
        dev: &Device,
    ) -> Result<Tensor> {
        let total = offset + t;
        let window = self.config.sliding_window.unwrap_or(usize::MAX);
        let mut v = Vec::with_capacity(t * total);
        for i in 0..t {
            let q = offset + i;
            for j in 0..total {
                let seen = j <= q && q - j < window;
                v.push(if seen { 0.0 } else { MASKED });
            }
        }
        let causal = Tensor::from_vec(v, (1, 1, t, total), dev)?;
        match mask {
            None => Ok(causal),
            Some(m) => {
                if m.dims() != [b, total] {
                    candle_core::bail!(
                        "attention mask of shape {:?} for {b} sequences of {total} tokens",
                        m.dims()
                    );
                }
                let m = m.to_dtype(DType::F32)?;
                let pad = ((m.ones_like()? - m)? * MASKED as f64)?.reshape((b, 1, 1, total))?;
                causal.broadcast_add(&pad)
            }
        }
    }

    fn layer_forward(
        &self,
        l: &DecoderLayer,
        x: &Tensor,
        s: &Step,
        kv: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, d) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let hn = rms_norm(x, &l.input_norm.1, c.rms_norm_eps)?;
        // (B, T, n, d) as the projection writes it; the rotary kernel transposes for free.
        let proj = |lin: &AdaptedLinear, n: usize| -> Result<Tensor> {
            lin.forward_t(&hn, s.train)
                .map_err(peft_err)?
                .reshape((b, t, n, d))
        };
        let q = rope_heads(&proj(&l.q, nh)?, s.cos, s.sin)?;
        let mut k = rope_heads(&proj(&l.k, nkv)?, s.cos, s.sin)?;
        let mut v = proj(&l.v, nkv)?.transpose(1, 2)?.contiguous()?;
        if let Some(slot) = kv {
            if let Some((pk, pv)) = slot.as_ref() {
                k = Tensor::cat(&[pk, &k], 2)?;
                v = Tensor::cat(&[pv, &v], 2)?;
            }
            *slot = Some((k.clone(), v.clone()));
        }
        let scale = 1.0 / (d as f64).sqrt();
        let ctx = match s.bias {
            None if fused_attention_applies(&q) => {
                let window = c.sliding_window;
                causal_attention(&q, &k, &v, s.pad, scale, window)?
            }
            bias => {
                let bias = match bias {
                    Some(bias) => bias.clone(),
                    None => self.mask_bias(b, t, 0, s.pad, x.device())?,
                };
                let k = repeat_kv(&k, nh / nkv)?;
                let v = repeat_kv(&v, nh / nkv)?;
                let scores = (q.matmul(&k.t()?)? * scale)?;
                let probs = softmax_last_dim(&scores.broadcast_add(&bias)?.contiguous()?)?;
                probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, nh * d))?
            }
        };
        let x = (x + l.o.forward_t(&ctx, s.train).map_err(peft_err)?)?;
        let hn = rms_norm(&x, &l.post_norm.1, c.rms_norm_eps)?;
        let gate = l.gate.forward_t(&hn, s.train).map_err(peft_err)?;
        let up = l.up.forward_t(&hn, s.train).map_err(peft_err)?;
        let ff = swiglu_down(&gate, &up, &l.down, s.train)?;
        x + ff
    }

    /// Parameters outside linear layers (embedding, RMSNorm weights), by Hugging Face name.
    pub fn other_params(&self) -> Vec<(String, Tensor)> {
        let mut v = vec![("model.embed_tokens.weight".to_string(), self.embed.clone())];
        for l in &self.layers {
            for (n, w) in [&l.input_norm, &l.post_norm] {
                v.push((format!("{n}.weight"), w.clone()));
            }
        }
        v.push(("model.norm.weight".into(), self.norm.clone()));
        v
    }

    /// Makes every parameter trainable (full fine-tuning) and returns the variables by Hugging
    /// Face name; a tied `lm_head` trains the embedding's variable (listed once).
    pub fn train_everything(&mut self) -> std::result::Result<Vec<(String, Var)>, ModelError> {
        let mut vars = Vec::new();
        for l in self.linears_mut() {
            vars.extend(l.make_trainable()?);
        }
        let embed = Var::from_tensor(&self.embed.to_dtype(DType::F32)?)?;
        self.embed = embed.as_tensor().clone();
        if self.config.tie_word_embeddings {
            self.lm_head.share_trainable(&embed)?;
        } else {
            vars.extend(self.lm_head.make_trainable()?);
        }
        vars.push(("model.embed_tokens.weight".into(), embed));
        let mut norms = Vec::new();
        for l in &mut self.layers {
            norms.push(&mut l.input_norm);
            norms.push(&mut l.post_norm);
        }
        for (name, w) in norms {
            let v = Var::from_tensor(&w.to_dtype(DType::F32)?)?;
            *w = v.as_tensor().clone();
            vars.push((format!("{name}.weight"), v));
        }
        let v = Var::from_tensor(&self.norm.to_dtype(DType::F32)?)?;
        self.norm = v.as_tensor().clone();
        vars.push(("model.norm.weight".into(), v));
        Ok(vars)
    }

    /// Parameters of the pretrained model (`lm_head` counted once when tied).
    pub fn parameter_count(&self) -> usize {
        let lin: usize = self
            .linears()
            .into_iter()
            .map(|l| {
                let (m, n) = l.shape();
                m * n + l.bias().map_or(0, Tensor::elem_count)
            })
            .sum();
        let head = if self.config.tie_word_embeddings {
            0
        } else {
            let (m, n) = self.lm_head.shape();
            m * n
        };
        let other: usize = self
            .other_params()
            .iter()
            .map(|(_, t)| t.elem_count())
            .sum();
        lin + head + other
    }
}

impl LinearLayers for LlamaModel {
    fn linears(&self) -> Vec<&AdaptedLinear> {
        self.layers.iter().flat_map(|l| l.linears()).collect()
    }

    fn linears_mut(&mut self) -> Vec<&mut AdaptedLinear> {
        self.layers
            .iter_mut()
            .flat_map(|l| l.linears_mut())
            .collect()
    }
}

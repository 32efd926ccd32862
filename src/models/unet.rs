//! A small text-conditioned UNet image generator for DiffLoRA (see `METHODS.md`): a prompt
//! tokenizer over the portrait vocabulary ([`PromptVocab`]), a small transformer text encoder
//! ([`TextEncoder`]), a UNet denoiser with spatial transformer blocks ([`Unet`]) and the bundle
//! that trains and samples them ([`Generator`]).
//!
//! Module paths follow Stable Diffusion's diffusers UNet (`down_blocks.1.attentions.0.
//! transformer_blocks.0.attn1.to_q`, `mid_block.…`, `up_blocks.…`) and CLIP's text model
//! (`text_model.encoder.layers.0.self_attn.q_proj`), with one deviation: the attention output
//! projection is `…attn1.to_out` (diffusers writes `to_out.0`), so the PEFT target list
//! `["to_q", "to_k", "to_v", "to_out"]` matches it. Every linear layer of the transformer
//! blocks is an [`AdaptedLinear`]; convolutions, norms, embeddings and the time MLP are plain
//! tensors. [`Unet`]'s [`LinearLayers`] lists only the UNet's own linear layers; the text
//! encoder is a separate [`LinearLayers`] (adapt it through [`Generator::text_encoder_mut`]).

use std::collections::{BTreeSet, HashMap};
use std::ops::ControlFlow;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

use super::ops::{gelu_erf, layer_norm, masked_softmax};
use crate::data::portrait::{Accessory, Attributes, Background, Expression, HeadTurn, Lighting};
use crate::diffusion::{
    DdimConfig, DiffusionError, NoiseSchedule, Prediction, ScheduleConfig, ScheduleKind,
    ddim_sample, guided, seeded_normal,
};
use crate::fsio::{read_safetensors, write_safetensors};
use crate::peft::linear::LinearLayers;
use crate::peft::{AdaptedLinear, PeftError};

/// Errors of the generator; each says which field, tensor or file is wrong.
#[derive(Debug, thiserror::Error)]
pub enum UnetError {
    /// An invalid configuration field.
    #[error("unet config: {0}")]
    Config(String),
    /// An input of the wrong shape.
    #[error("unet input: {0}")]
    Shape(String),
    /// A weights file could not be read, written or matched to the model.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// An adapted layer failed.
    #[error(transparent)]
    Peft(#[from] PeftError),
    /// The diffusion utilities refused an argument.
    #[error(transparent)]
    Diffusion(#[from] DiffusionError),
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, UnetError>;

/// Architecture and training settings of the [`Generator`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UnetConfig {
    /// Side of the square images (divisible by 2^(levels − 1)).
    pub image_size: usize,
    /// Image channels (3 for RGB).
    pub channels: usize,
    /// Channels of the first level.
    pub base_channels: usize,
    /// Channel multiplier of each resolution level (one level per entry).
    pub channel_mult: Vec<usize>,
    /// Residual blocks per level on the way down (the way up has one more).
    pub layers_per_block: usize,
    /// Levels (indices into `channel_mult`) with a spatial transformer after each residual
    /// block; the middle block always has one.
    pub attention_levels: Vec<usize>,
    /// Attention heads of the UNet's transformer blocks.
    pub heads: usize,
    /// Groups of every group norm (divides every channel count).
    pub norm_groups: usize,
    /// Width of the text encoder's token states.
    pub text_dim: usize,
    /// Transformer blocks of the text encoder.
    pub text_layers: usize,
    /// Attention heads of the text encoder.
    pub text_heads: usize,
    /// Rows of the token embedding (at least the vocabulary's size).
    pub vocab_size: usize,
    /// Tokens per prompt, including the leading `<bos>`.
    pub max_tokens: usize,
    /// Width of the timestep embedding MLP.
    pub time_embed_dim: usize,
    /// The DDPM noise schedule.
    pub schedule: ScheduleConfig,
    /// What the UNet predicts: `epsilon` (the noise) or `v` (the velocity; its target at high
    /// noise is the image itself, so identity shapes the loss where the prompt cannot).
    pub prediction: Prediction,
    /// Probability of training on the empty prompt (classifier-free guidance).
    pub p_uncond: f64,
    /// Seed of the weight initialisation.
    pub seed: u64,
}

impl Default for UnetConfig {
    /// 32×32 RGB, widths 32/64, two residual blocks per level, attention at 16×16, a
    /// two-block text encoder of width 64, a cosine schedule of 1000 steps.
    fn default() -> Self {
        Self {
            image_size: 32,
            channels: 3,
            base_channels: 32,
            channel_mult: vec![1, 2],
            layers_per_block: 2,
            attention_levels: vec![1],
            heads: 4,
            norm_groups: 8,
            text_dim: 64,
            text_layers: 2,
            text_heads: 4,
            vocab_size: 64,
            max_tokens: 16,
            time_embed_dim: 128,
            schedule: ScheduleConfig {
                kind: ScheduleKind::Cosine,
                steps: 1000,
            },
            prediction: Prediction::Epsilon,
            p_uncond: 0.1,
            seed: 0,
        }
    }
}

impl UnetConfig {
    /// A very small configuration for tests: widths 16/32, one residual block per level, a
    /// one-block text encoder of width 32.
    pub fn tiny() -> Self {
        Self {
            base_channels: 16,
            layers_per_block: 1,
            heads: 2,
            text_dim: 32,
            text_layers: 1,
            text_heads: 2,
            time_embed_dim: 64,
            ..Self::default()
        }
    }

    /// Channels of each level.
    pub fn level_channels(&self) -> Vec<usize> {
        self.channel_mult
            .iter()
            .map(|m| m * self.base_channels)
            .collect()
    }

    /// Checks every field; the message names the first bad one.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(UnetError::Config(m));
        if self.channel_mult.is_empty() || self.channel_mult.contains(&0) {
            return bad("channel_mult must be non-empty with positive entries".into());
        }
        if self.channels == 0 || self.base_channels == 0 || self.layers_per_block == 0 {
            return bad("channels, base_channels and layers_per_block must be > 0".into());
        }
        let levels = self.channel_mult.len();
        let factor = 1usize << (levels - 1);
        if self.image_size == 0 || !self.image_size.is_multiple_of(factor) {
            return bad(format!(
                "image_size {} must be a positive multiple of {factor} ({levels} levels)",
                self.image_size
            ));
        }
        if let Some(l) = self.attention_levels.iter().find(|&&l| l >= levels) {
            return bad(format!(
                "attention level {l} does not exist ({levels} levels)"
            ));
        }
        let ch = self.level_channels();
        if self.norm_groups == 0 || ch.iter().any(|c| !c.is_multiple_of(self.norm_groups)) {
            return bad(format!(
                "norm_groups {} must divide every level's channels {ch:?}",
                self.norm_groups
            ));
        }
        if self.heads == 0 || ch.iter().any(|c| !c.is_multiple_of(self.heads)) {
            return bad(format!(
                "heads {} must divide every level's channels",
                self.heads
            ));
        }
        if self.text_heads == 0
            || self.text_dim == 0
            || !self.text_dim.is_multiple_of(self.text_heads)
        {
            return bad(format!(
                "text_heads {} must divide text_dim {}",
                self.text_heads, self.text_dim
            ));
        }
        if self.max_tokens < 2 {
            return bad("max_tokens must be ≥ 2 (<bos> and one word)".into());
        }
        if self.time_embed_dim == 0 || !self.base_channels.is_multiple_of(2) {
            return bad("time_embed_dim must be > 0 and base_channels even".into());
        }
        if !(0.0..=1.0).contains(&self.p_uncond) {
            return bad(format!("p_uncond {} must lie in [0, 1]", self.p_uncond));
        }
        if self.schedule.steps == 0 {
            return bad("schedule.steps must be > 0".into());
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Tokenizer
// ---------------------------------------------------------------------------------------------

/// A word-level prompt tokenizer over a fixed vocabulary. Ids 0, 1 and 2 are `<pad>`, `<unk>`
/// and `<bos>`; words follow in the order given. Text is lower-cased and split at every
/// character that is not a letter or digit (commas, whitespace, punctuation).
#[derive(Debug, Clone, PartialEq)]
pub struct PromptVocab {
    words: Vec<String>,
    index: HashMap<String, u32>,
    max_tokens: usize,
}

impl PromptVocab {
    /// Padding id.
    pub const PAD: u32 = 0;
    /// Id of words outside the vocabulary.
    pub const UNK: u32 = 1;
    /// Id of the token that starts every prompt (the whole of the empty prompt).
    pub const BOS: u32 = 2;

    /// A vocabulary of `words` (lower-cased, duplicates dropped) encoding to `max_tokens` ids.
    pub fn new<S: AsRef<str>>(words: impl IntoIterator<Item = S>, max_tokens: usize) -> Self {
        let mut all: Vec<String> = vec!["<pad>".into(), "<unk>".into(), "<bos>".into()];
        let mut index: HashMap<String, u32> = all
            .iter()
            .enumerate()
            .map(|(i, w)| (w.clone(), i as u32))
            .collect();
        for w in words {
            let w = w.as_ref().to_lowercase();
            if w.is_empty() || index.contains_key(&w) {
                continue;
            }
            index.insert(w.clone(), all.len() as u32);
            all.push(w);
        }
        Self {
            words: all,
            index,
            max_tokens: max_tokens.max(1),
        }
    }

    /// Every word [`Attributes::prompt`] can write (collected from all attribute
    /// combinations, sorted), plus a few generic portrait words.
    pub fn portraits(max_tokens: usize) -> Self {
        let mut set = BTreeSet::new();
        for &expression in Expression::ALL {
            for &head_turn in HeadTurn::ALL {
                for &background in Background::ALL {
                    for &lighting in Lighting::ALL {
                        for &accessory in Accessory::ALL {
                            let a = Attributes {
                                expression,
                                head_turn,
                                background,
                                lighting,
                                accessory,
                            };
                            set.extend(Self::tokenize(&a.prompt()));
                        }
                    }
                }
            }
        }
        let extra = ["a", "photo", "portrait", "of", "person", "with", "and"];
        set.extend(extra.iter().map(|w| w.to_string()));
        Self::new(set, max_tokens)
    }

    /// The words of `text`: lower-case, split at non-alphanumeric characters.
    pub fn tokenize(text: &str) -> Vec<String> {
        text.split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
            .map(str::to_lowercase)
            .collect()
    }

    /// Number of ids (special tokens included).
    pub fn len(&self) -> usize {
        self.words.len()
    }

    /// Whether the vocabulary holds no ids (never: the special tokens are always there).
    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    /// Ids per encoded prompt.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// The id of `word` (lower-cased), or [`Self::UNK`].
    pub fn id(&self, word: &str) -> u32 {
        self.index
            .get(&word.to_lowercase())
            .copied()
            .unwrap_or(Self::UNK)
    }

    /// The word of `id`, if any.
    pub fn word(&self, id: u32) -> Option<&str> {
        self.words.get(id as usize).map(String::as_str)
    }

    /// `[<bos>, word ids…, <pad>…]`, exactly `max_tokens` long (extra words are dropped).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut ids = vec![Self::BOS];
        ids.extend(Self::tokenize(text).iter().map(|w| self.id(w)));
        ids.truncate(self.max_tokens);
        ids.resize(self.max_tokens, Self::PAD);
        ids
    }

    /// Ids (B, T) u32 and mask (B, T) f32 (1 for tokens, 0 for padding) of several prompts.
    pub fn encode_batch<S: AsRef<str>>(
        &self,
        prompts: &[S],
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let t = self.max_tokens;
        let ids: Vec<u32> = prompts
            .iter()
            .flat_map(|p| self.encode(p.as_ref()))
            .collect();
        let mask: Vec<f32> = ids
            .iter()
            .map(|&i| if i == Self::PAD { 0.0 } else { 1.0 })
            .collect();
        let b = prompts.len();
        Ok((
            Tensor::from_vec(ids, (b, t), device)?,
            Tensor::from_vec(mask, (b, t), device)?,
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// Building blocks
// ---------------------------------------------------------------------------------------------

/// One named parameter outside the linear layers.
#[derive(Debug, Clone)]
struct Param {
    name: String,
    t: Tensor,
    var: Option<Var>,
}

impl Param {
    fn make_trainable(&mut self) -> Result<(String, Var)> {
        let v = match &self.var {
            Some(v) => v.clone(),
            None => {
                let v = Var::from_tensor(&self.t.to_dtype(DType::F32)?)?;
                self.t = v.as_tensor().clone();
                self.var = Some(v.clone());
                v
            }
        };
        Ok((self.name.clone(), v))
    }
}

/// Seeded initialiser (deterministic order of calls gives deterministic weights).
struct Init {
    rng: StdRng,
    device: Device,
}

impl Init {
    fn normal(&mut self, name: String, dims: &[usize], std: f64) -> Result<Param> {
        let n: usize = dims.iter().product();
        let d = Normal::new(0.0f32, std as f32)
            .map_err(|e| UnetError::Config(format!("init std {std}: {e}")))?;
        let v: Vec<f32> = (0..n).map(|_| d.sample(&mut self.rng)).collect();
        Ok(Param {
            name,
            t: Tensor::from_vec(v, dims, &self.device)?,
            var: None,
        })
    }

    fn constant(&mut self, name: String, dims: &[usize], value: f64) -> Result<Param> {
        Ok(Param {
            name,
            t: (Tensor::ones(dims, DType::F32, &self.device)? * value)?,
            var: None,
        })
    }

    fn linear(&mut self, path: String, out: usize, inp: usize) -> Result<AdaptedLinear> {
        let w = self.normal(String::new(), &[out, inp], 1.0 / (inp as f64).sqrt())?;
        let b = Tensor::zeros(out, DType::F32, &self.device)?;
        Ok(AdaptedLinear::new(path, w.t, Some(b)))
    }

    fn dense(&mut self, path: &str, out: usize, inp: usize) -> Result<Dense> {
        Ok(Dense {
            w: self.normal(
                format!("{path}.weight"),
                &[out, inp],
                1.0 / (inp as f64).sqrt(),
            )?,
            b: self.constant(format!("{path}.bias"), &[out], 0.0)?,
        })
    }

    fn conv(
        &mut self,
        path: &str,
        out: usize,
        inp: usize,
        k: usize,
        stride: usize,
    ) -> Result<Conv> {
        Ok(Conv {
            w: self.normal(
                format!("{path}.weight"),
                &[out, inp, k, k],
                1.0 / ((inp * k * k) as f64).sqrt(),
            )?,
            b: self.constant(format!("{path}.bias"), &[out], 0.0)?,
            stride,
            padding: k / 2,
        })
    }

    fn group_norm(&mut self, path: &str, c: usize, groups: usize) -> Result<GroupNorm> {
        Ok(GroupNorm {
            w: self.constant(format!("{path}.weight"), &[c], 1.0)?,
            b: self.constant(format!("{path}.bias"), &[c], 0.0)?,
            groups,
        })
    }

    fn layer_norm(&mut self, path: &str, d: usize) -> Result<Ln> {
        Ok(Ln {
            w: self.constant(format!("{path}.weight"), &[d], 1.0)?,
            b: self.constant(format!("{path}.bias"), &[d], 0.0)?,
        })
    }
}

/// Visits parameters and linear layers of a module tree.
trait Module {
    fn params<'a>(&'a self, out: &mut Vec<&'a Param>);
    fn params_mut<'a>(&'a mut self, out: &mut Vec<&'a mut Param>);
    fn lin<'a>(&'a self, _out: &mut Vec<&'a AdaptedLinear>) {}
    fn lin_mut<'a>(&'a mut self, _out: &mut Vec<&'a mut AdaptedLinear>) {}
}

macro_rules! params_of {
    ($($f:ident),*) => {
        fn params<'a>(&'a self, out: &mut Vec<&'a Param>) {
            $( out.push(&self.$f); )*
        }
        fn params_mut<'a>(&'a mut self, out: &mut Vec<&'a mut Param>) {
            $( out.push(&mut self.$f); )*
        }
    };
}

#[derive(Debug, Clone)]
struct Dense {
    w: Param,
    b: Param,
}

impl Dense {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.matmul(&self.w.t.t()?)?.broadcast_add(&self.b.t)?)
    }
}

impl Module for Dense {
    params_of!(w, b);
}

#[derive(Debug, Clone)]
struct Conv {
    w: Param,
    b: Param,
    stride: usize,
    padding: usize,
}

impl Conv {
    /// Convolution as im2col + matmul (shifted views of the padded input, concatenated along
    /// channels): its backward is matmuls and slices, much faster on CPU than candle's
    /// transposed-convolution backward. Output side `(H + 2p − k)/s + 1`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (o, i, k, _) = self.w.t.dims4()?;
        let (b, c, h, w) = x.dims4()?;
        if c != i {
            return Err(UnetError::Shape(format!(
                "conv expects {i} channels, got {:?}",
                x.dims()
            )));
        }
        let (s, p) = (self.stride, self.padding);
        let ho = (h + 2 * p - k) / s + 1;
        let wo = (w + 2 * p - k) / s + 1;
        let cols = if k == 1 && s == 1 && p == 0 {
            x.reshape((b, c, h * w))?
        } else {
            let xp = x.pad_with_zeros(2, p, p + s)?.pad_with_zeros(3, p, p + s)?;
            let mut shifted = Vec::with_capacity(k * k);
            for dy in 0..k {
                for dx in 0..k {
                    let v = xp.narrow(2, dy, s * ho)?.narrow(3, dx, s * wo)?;
                    let v = if s == 1 {
                        v
                    } else {
                        v.reshape((b, c, ho, s, wo, s))?
                            .narrow(3, 0, 1)?
                            .narrow(5, 0, 1)?
                    };
                    shifted.push(v.reshape((b, c, ho * wo))?);
                }
            }
            Tensor::cat(&shifted, 1)?
        };
        let wmat = self.w.t.permute((0, 2, 3, 1))?.reshape((o, k * k * i))?;
        let y = wmat.broadcast_matmul(&cols)?.reshape((b, o, ho, wo))?;
        Ok(y.broadcast_add(&self.b.t.reshape((1, o, 1, 1))?)?)
    }
}

impl Module for Conv {
    params_of!(w, b);
}

#[derive(Debug, Clone)]
struct GroupNorm {
    w: Param,
    b: Param,
    groups: usize,
}

impl GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let g = self.groups;
        // Group norm = layer norm over each group's values (the fused kernel, with its one-pass
        // backward), then the per-channel affine.
        let n = (c / g) * h * w;
        let ones = Tensor::ones(n, x.dtype(), x.device())?;
        let zeros = Tensor::zeros(n, x.dtype(), x.device())?;
        let xn = layer_norm(&x.reshape((b, g, n))?, &ones, &zeros, 1e-5)?.reshape((b, c, h, w))?;
        Ok(xn
            .broadcast_mul(&self.w.t.reshape((1, c, 1, 1))?)?
            .broadcast_add(&self.b.t.reshape((1, c, 1, 1))?)?)
    }
}

impl Module for GroupNorm {
    params_of!(w, b);
}

#[derive(Debug, Clone)]
struct Ln {
    w: Param,
    b: Param,
}

impl Ln {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(layer_norm(x, &self.w.t, &self.b.t, 1e-5)?)
    }
}

impl Module for Ln {
    params_of!(w, b);
}

/// `(1 − mask)·(−1e9)`: the additive attention bias of a (B, T) 0/1 mask.
fn mask_bias(mask: &Tensor) -> Result<Tensor> {
    Ok(((mask.ones_like()? - mask)? * -1e9)?)
}

/// Multi-head attention with four [`AdaptedLinear`] projections.
#[derive(Debug, Clone)]
struct Attention {
    q: AdaptedLinear,
    k: AdaptedLinear,
    v: AdaptedLinear,
    o: AdaptedLinear,
    heads: usize,
}

impl Attention {
    fn new(
        init: &mut Init,
        path: &str,
        names: [&str; 4],
        dim: usize,
        ctx: usize,
        heads: usize,
    ) -> Result<Self> {
        Ok(Self {
            q: init.linear(format!("{path}.{}", names[0]), dim, dim)?,
            k: init.linear(format!("{path}.{}", names[1]), dim, ctx)?,
            v: init.linear(format!("{path}.{}", names[2]), dim, ctx)?,
            o: init.linear(format!("{path}.{}", names[3]), dim, dim)?,
            heads,
        })
    }

    /// `x` (B, N, C) attends to `ctx` (B, T, D); `bias` (B, T) masks keys.
    fn forward(
        &self,
        x: &Tensor,
        ctx: &Tensor,
        bias: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        let t = ctx.dim(1)?;
        let h = self.heads;
        let dh = c / h;
        let split = |y: Tensor, len: usize| -> Result<Tensor> {
            Ok(y.reshape((b, len, h, dh))?.transpose(1, 2)?.contiguous()?)
        };
        let q = split(self.q.forward_t(x, train)?, n)?;
        let k = split(self.k.forward_t(ctx, train)?, t)?;
        let v = split(self.v.forward_t(ctx, train)?, t)?;
        let scores = q.matmul(&k.transpose(2, 3)?.contiguous()?)?;
        let probs = masked_softmax(&scores, bias, 1.0 / (dh as f64).sqrt())?;
        let o = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, n, c))?;
        Ok(self.o.forward_t(&o, train)?)
    }
}

impl Module for Attention {
    fn params<'a>(&'a self, _out: &mut Vec<&'a Param>) {}
    fn params_mut<'a>(&'a mut self, _out: &mut Vec<&'a mut Param>) {}
    fn lin<'a>(&'a self, out: &mut Vec<&'a AdaptedLinear>) {
        out.extend([&self.q, &self.k, &self.v, &self.o]);
    }
    fn lin_mut<'a>(&'a mut self, out: &mut Vec<&'a mut AdaptedLinear>) {
        out.extend([&mut self.q, &mut self.k, &mut self.v, &mut self.o]);
    }
}

/// A two-layer GELU MLP of [`AdaptedLinear`]s.
#[derive(Debug, Clone)]
struct Mlp {
    fc1: AdaptedLinear,
    fc2: AdaptedLinear,
}

impl Mlp {
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let h = gelu_erf(&self.fc1.forward_t(x, train)?)?;
        Ok(self.fc2.forward_t(&h, train)?)
    }
}

impl Module for Mlp {
    fn params<'a>(&'a self, _out: &mut Vec<&'a Param>) {}
    fn params_mut<'a>(&'a mut self, _out: &mut Vec<&'a mut Param>) {}
    fn lin<'a>(&'a self, out: &mut Vec<&'a AdaptedLinear>) {
        out.extend([&self.fc1, &self.fc2]);
    }
    fn lin_mut<'a>(&'a mut self, out: &mut Vec<&'a mut AdaptedLinear>) {
        out.extend([&mut self.fc1, &mut self.fc2]);
    }
}

// ---------------------------------------------------------------------------------------------
// Text encoder
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct TextLayer {
    ln1: Ln,
    attn: Attention,
    ln2: Ln,
    mlp: Mlp,
}

impl Module for TextLayer {
    fn params<'a>(&'a self, out: &mut Vec<&'a Param>) {
        self.ln1.params(out);
        self.ln2.params(out);
    }
    fn params_mut<'a>(&'a mut self, out: &mut Vec<&'a mut Param>) {
        self.ln1.params_mut(out);
        self.ln2.params_mut(out);
    }
    fn lin<'a>(&'a self, out: &mut Vec<&'a AdaptedLinear>) {
        self.attn.lin(out);
        self.mlp.lin(out);
    }
    fn lin_mut<'a>(&'a mut self, out: &mut Vec<&'a mut AdaptedLinear>) {
        self.attn.lin_mut(out);
        self.mlp.lin_mut(out);
    }
}

/// A small CLIP-like text encoder: token embedding + learned positions + pre-LN transformer
/// blocks (bidirectional self-attention over the non-padding tokens) + a final layer norm.
/// Its linear layers are `text_model.encoder.layers.{i}.self_attn.{q,k,v,out}_proj` and
/// `….mlp.fc1/fc2`.
#[derive(Debug, Clone)]
pub struct TextEncoder {
    token_embedding: Param,
    position_embedding: Param,
    layers: Vec<TextLayer>,
    final_ln: Ln,
    dim: usize,
}

impl TextEncoder {
    fn new(cfg: &UnetConfig, init: &mut Init) -> Result<Self> {
        let d = cfg.text_dim;
        let p = "text_model";
        let token_embedding = init.normal(
            format!("{p}.embeddings.token_embedding.weight"),
            &[cfg.vocab_size, d],
            0.5,
        )?;
        let position_embedding = init.normal(
            format!("{p}.embeddings.position_embedding.weight"),
            &[cfg.max_tokens, d],
            0.5,
        )?;
        let mut layers = Vec::new();
        for i in 0..cfg.text_layers {
            let lp = format!("{p}.encoder.layers.{i}");
            layers.push(TextLayer {
                ln1: init.layer_norm(&format!("{lp}.layer_norm1"), d)?,
                attn: Attention::new(
                    init,
                    &format!("{lp}.self_attn"),
                    ["q_proj", "k_proj", "v_proj", "out_proj"],
                    d,
                    d,
                    cfg.text_heads,
                )?,
                ln2: init.layer_norm(&format!("{lp}.layer_norm2"), d)?,
                mlp: Mlp {
                    fc1: init.linear(format!("{lp}.mlp.fc1"), 4 * d, d)?,
                    fc2: init.linear(format!("{lp}.mlp.fc2"), d, 4 * d)?,
                },
            });
        }
        let final_ln = init.layer_norm(&format!("{p}.final_layer_norm"), d)?;
        Ok(Self {
            token_embedding,
            position_embedding,
            layers,
            final_ln,
            dim: d,
        })
    }

    /// Width of the output states.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Token states (B, T, d) of ids (B, T) u32 with mask (B, T) f32 (1 = token, 0 = padding);
    /// `train` enables adapter dropout. Ids must lie below the embedding's rows and T must not
    /// exceed the position table.
    pub fn forward(&self, ids: &Tensor, mask: &Tensor, train: bool) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if b == 0 || t == 0 {
            return Err(UnetError::Shape(format!("ids {:?} are empty", ids.dims())));
        }
        let (rows, _) = self.token_embedding.t.dims2()?;
        let max_t = self.position_embedding.t.dim(0)?;
        if t > max_t || mask.dims() != [b, t] {
            return Err(UnetError::Shape(format!(
                "ids {:?} / mask {:?}: expected (B, T ≤ {max_t}) for both",
                ids.dims(),
                mask.dims()
            )));
        }
        let max_id = ids
            .to_dtype(DType::U32)?
            .flatten_all()?
            .max(0)?
            .to_scalar::<u32>()?;
        if max_id as usize >= rows {
            return Err(UnetError::Shape(format!(
                "token id {max_id} outside the embedding's {rows} rows"
            )));
        }
        let x = self
            .token_embedding
            .t
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, self.dim))?;
        let pos = self.position_embedding.t.narrow(0, 0, t)?;
        let mut x = x.broadcast_add(&pos)?;
        let bias = mask_bias(&mask.to_dtype(DType::F32)?)?;
        for l in &self.layers {
            let h = l.ln1.forward(&x)?;
            x = (&x + l.attn.forward(&h, &h, Some(&bias), train)?)?;
            let h = l.ln2.forward(&x)?;
            x = (&x + l.mlp.forward(&h, train)?)?;
        }
        self.final_ln.forward(&x)
    }
}

impl Module for TextEncoder {
    fn params<'a>(&'a self, out: &mut Vec<&'a Param>) {
        out.push(&self.token_embedding);
        out.push(&self.position_embedding);
        for l in &self.layers {
            l.params(out);
        }
        self.final_ln.params(out);
    }
    fn params_mut<'a>(&'a mut self, out: &mut Vec<&'a mut Param>) {
        out.push(&mut self.token_embedding);
        out.push(&mut self.position_embedding);
        for l in &mut self.layers {
            l.params_mut(out);
        }
        self.final_ln.params_mut(out);
    }
    fn lin<'a>(&'a self, out: &mut Vec<&'a AdaptedLinear>) {
        for l in &self.layers {
            l.lin(out);
        }
    }
    fn lin_mut<'a>(&'a mut self, out: &mut Vec<&'a mut AdaptedLinear>) {
        for l in &mut self.layers {
            l.lin_mut(out);
        }
    }
}

impl LinearLayers for TextEncoder {
    fn linears(&self) -> Vec<&AdaptedLinear> {
        let mut v = Vec::new();
        self.lin(&mut v);
        v
    }
    fn linears_mut(&mut self) -> Vec<&mut AdaptedLinear> {
        let mut v = Vec::new();
        self.lin_mut(&mut v);
        v
    }
}

// ---------------------------------------------------------------------------------------------
// UNet
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct ResBlock {
    norm1: GroupNorm,
    conv1: Conv,
    time_emb_proj: Dense,
    norm2: GroupNorm,
    conv2: Conv,
    shortcut: Option<Conv>,
}

impl ResBlock {
    fn new(
        init: &mut Init,
        path: &str,
        inp: usize,
        out: usize,
        temb: usize,
        g: usize,
    ) -> Result<Self> {
        Ok(Self {
            norm1: init.group_norm(&format!("{path}.norm1"), inp, g)?,
            conv1: init.conv(&format!("{path}.conv1"), out, inp, 3, 1)?,
            time_emb_proj: init.dense(&format!("{path}.time_emb_proj"), out, temb)?,
            norm2: init.group_norm(&format!("{path}.norm2"), out, g)?,
            conv2: init.conv(&format!("{path}.conv2"), out, out, 3, 1)?,
            shortcut: if inp != out {
                Some(init.conv(&format!("{path}.conv_shortcut"), out, inp, 1, 1)?)
            } else {
                None
            },
        })
    }

    fn forward(&self, x: &Tensor, temb: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward(x)?.silu()?)?;
        let (b, c, _, _) = h.dims4()?;
        let t = self
            .time_emb_proj
            .forward(&temb.silu()?)?
            .reshape((b, c, 1, 1))?;
        let h = h.broadcast_add(&t)?;
        let h = self.conv2.forward(&self.norm2.forward(&h)?.silu()?)?;
        let skip = match &self.shortcut {
            Some(s) => s.forward(x)?,
            None => x.clone(),
        };
        Ok((skip + h)?)
    }
}

impl Module for ResBlock {
    fn params<'a>(&'a self, out: &mut Vec<&'a Param>) {
        self.norm1.params(out);
        self.conv1.params(out);
        self.time_emb_proj.params(out);
        self.norm2.params(out);
        self.conv2.params(out);
        if let Some(s) = &self.shortcut {
            s.params(out);
        }
    }
    fn params_mut<'a>(&'a mut self, out: &mut Vec<&'a mut Param>) {
        self.norm1.params_mut(out);
        self.conv1.params_mut(out);
        self.time_emb_proj.params_mut(out);
        self.norm2.params_mut(out);
        self.conv2.params_mut(out);
        if let Some(s) = &mut self.shortcut {
            s.params_mut(out);
        }
    }
}

/// Stable Diffusion's spatial transformer with one basic block: group norm, `proj_in`,
/// self-attention (`attn1`), cross-attention to the text (`attn2`), a GELU feed-forward
/// (`ff.net.0.proj`, `ff.net.2`), `proj_out`, plus the residual.
#[derive(Debug, Clone)]
struct SpatialTransformer {
    norm: GroupNorm,
    proj_in: AdaptedLinear,
    norm1: Ln,
    attn1: Attention,
    norm2: Ln,
    attn2: Attention,
    norm3: Ln,
    ff: Mlp,
    proj_out: AdaptedLinear,
}

impl SpatialTransformer {
    fn new(
        init: &mut Init,
        path: &str,
        c: usize,
        text_dim: usize,
        heads: usize,
        g: usize,
    ) -> Result<Self> {
        let b = format!("{path}.transformer_blocks.0");
        let names = ["to_q", "to_k", "to_v", "to_out"];
        Ok(Self {
            norm: init.group_norm(&format!("{path}.norm"), c, g)?,
            proj_in: init.linear(format!("{path}.proj_in"), c, c)?,
            norm1: init.layer_norm(&format!("{b}.norm1"), c)?,
            attn1: Attention::new(init, &format!("{b}.attn1"), names, c, c, heads)?,
            norm2: init.layer_norm(&format!("{b}.norm2"), c)?,
            attn2: Attention::new(init, &format!("{b}.attn2"), names, c, text_dim, heads)?,
            norm3: init.layer_norm(&format!("{b}.norm3"), c)?,
            ff: Mlp {
                fc1: init.linear(format!("{b}.ff.net.0.proj"), 4 * c, c)?,
                fc2: init.linear(format!("{b}.ff.net.2"), c, 4 * c)?,
            },
            proj_out: init.linear(format!("{path}.proj_out"), c, c)?,
        })
    }

    fn forward(&self, x: &Tensor, text: &Tensor, bias: &Tensor, train: bool) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let tokens = self
            .norm
            .forward(x)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let mut y = self.proj_in.forward_t(&tokens, train)?;
        let n = self.norm1.forward(&y)?;
        y = (&y + self.attn1.forward(&n, &n, None, train)?)?;
        let n = self.norm2.forward(&y)?;
        y = (&y + self.attn2.forward(&n, text, Some(bias), train)?)?;
        let n = self.norm3.forward(&y)?;
        y = (&y + self.ff.forward(&n, train)?)?;
        let y = self.proj_out.forward_t(&y, train)?;
        let y = y.transpose(1, 2)?.contiguous()?.reshape((b, c, h, w))?;
        Ok((x + y)?)
    }
}

impl Module for SpatialTransformer {
    fn params<'a>(&'a self, out: &mut Vec<&'a Param>) {
        self.norm.params(out);
        self.norm1.params(out);
        self.norm2.params(out);
        self.norm3.params(out);
    }
    fn params_mut<'a>(&'a mut self, out: &mut Vec<&'a mut Param>) {
        self.norm.params_mut(out);
        self.norm1.params_mut(out);
        self.norm2.params_mut(out);
        self.norm3.params_mut(out);
    }
    fn lin<'a>(&'a self, out: &mut Vec<&'a AdaptedLinear>) {
        out.push(&self.proj_in);
        self.attn1.lin(out);
        self.attn2.lin(out);
        self.ff.lin(out);
        out.push(&self.proj_out);
    }
    fn lin_mut<'a>(&'a mut self, out: &mut Vec<&'a mut AdaptedLinear>) {
        out.push(&mut self.proj_in);
        self.attn1.lin_mut(out);
        self.attn2.lin_mut(out);
        self.ff.lin_mut(out);
        out.push(&mut self.proj_out);
    }
}

/// One step of the UNet: a residual block, optionally followed by a spatial transformer.
#[derive(Debug, Clone)]
struct Stage {
    res: ResBlock,
    attn: Option<SpatialTransformer>,
}

impl Stage {
    fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        text: &Tensor,
        bias: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        let h = self.res.forward(x, temb)?;
        match &self.attn {
            Some(a) => a.forward(&h, text, bias, train),
            None => Ok(h),
        }
    }
}

impl Module for Stage {
    fn params<'a>(&'a self, out: &mut Vec<&'a Param>) {
        self.res.params(out);
        if let Some(a) = &self.attn {
            a.params(out);
        }
    }
    fn params_mut<'a>(&'a mut self, out: &mut Vec<&'a mut Param>) {
        self.res.params_mut(out);
        if let Some(a) = &mut self.attn {
            a.params_mut(out);
        }
    }
    fn lin<'a>(&'a self, out: &mut Vec<&'a AdaptedLinear>) {
        if let Some(a) = &self.attn {
            a.lin(out);
        }
    }
    fn lin_mut<'a>(&'a mut self, out: &mut Vec<&'a mut AdaptedLinear>) {
        if let Some(a) = &mut self.attn {
            a.lin_mut(out);
        }
    }
}

#[derive(Debug, Clone)]
struct Level {
    stages: Vec<Stage>,
    /// Downsampler (stride-2 conv) on the way down, upsampler (nearest ×2 + conv) on the way up.
    resample: Option<Conv>,
}

impl Module for Level {
    fn params<'a>(&'a self, out: &mut Vec<&'a Param>) {
        for s in &self.stages {
            s.params(out);
        }
        if let Some(r) = &self.resample {
            r.params(out);
        }
    }
    fn params_mut<'a>(&'a mut self, out: &mut Vec<&'a mut Param>) {
        for s in &mut self.stages {
            s.params_mut(out);
        }
        if let Some(r) = &mut self.resample {
            r.params_mut(out);
        }
    }
    fn lin<'a>(&'a self, out: &mut Vec<&'a AdaptedLinear>) {
        for s in &self.stages {
            s.lin(out);
        }
    }
    fn lin_mut<'a>(&'a mut self, out: &mut Vec<&'a mut AdaptedLinear>) {
        for s in &mut self.stages {
            s.lin_mut(out);
        }
    }
}

/// Nearest-neighbour ×2 upsampling by broadcasting (differentiable).
fn upsample2(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    Ok(x.reshape((b, c, h, 1, w, 1))?
        .broadcast_as((b, c, h, 2, w, 2))?
        .reshape((b, c, 2 * h, 2 * w))?)
}

/// The text-conditioned UNet denoiser (diffusers layout: `conv_in`, `time_embedding`,
/// `down_blocks`, `mid_block`, `up_blocks`, `conv_norm_out`, `conv_out`). Its
/// [`LinearLayers`] are the linear layers of every spatial transformer (`proj_in`,
/// `attn1/attn2.to_q/to_k/to_v/to_out`, `ff.net.0.proj`, `ff.net.2`, `proj_out`), not the text
/// encoder's.
#[derive(Debug, Clone)]
pub struct Unet {
    conv_in: Conv,
    time_1: Dense,
    time_2: Dense,
    down: Vec<Level>,
    mid: Vec<Stage>,
    up: Vec<Level>,
    norm_out: GroupNorm,
    conv_out: Conv,
    base_channels: usize,
    channels: usize,
    text_dim: usize,
    levels: usize,
}

impl Unet {
    fn new(cfg: &UnetConfig, init: &mut Init) -> Result<Self> {
        let ch = cfg.level_channels();
        let g = cfg.norm_groups;
        let te = cfg.time_embed_dim;
        let levels = ch.len();
        let transformer = |init: &mut Init,
                           path: &str,
                           c: usize,
                           on: bool|
         -> Result<Option<SpatialTransformer>> {
            if on {
                Ok(Some(SpatialTransformer::new(
                    init,
                    path,
                    c,
                    cfg.text_dim,
                    cfg.heads,
                    g,
                )?))
            } else {
                Ok(None)
            }
        };
        let conv_in = init.conv("conv_in", ch[0], cfg.channels, 3, 1)?;
        let time_1 = init.dense("time_embedding.linear_1", te, cfg.base_channels)?;
        let time_2 = init.dense("time_embedding.linear_2", te, te)?;
        let mut skips = vec![ch[0]];
        let mut cur = ch[0];
        let mut down = Vec::new();
        for (i, &c) in ch.iter().enumerate() {
            let attn = cfg.attention_levels.contains(&i);
            let mut stages = Vec::new();
            for j in 0..cfg.layers_per_block {
                let p = format!("down_blocks.{i}");
                stages.push(Stage {
                    res: ResBlock::new(init, &format!("{p}.resnets.{j}"), cur, c, te, g)?,
                    attn: transformer(init, &format!("{p}.attentions.{j}"), c, attn)?,
                });
                cur = c;
                skips.push(cur);
            }
            let resample = if i + 1 < levels {
                skips.push(cur);
                Some(init.conv(
                    &format!("down_blocks.{i}.downsamplers.0.conv"),
                    cur,
                    cur,
                    3,
                    2,
                )?)
            } else {
                None
            };
            down.push(Level { stages, resample });
        }
        let mid = vec![
            Stage {
                res: ResBlock::new(init, "mid_block.resnets.0", cur, cur, te, g)?,
                attn: transformer(init, "mid_block.attentions.0", cur, true)?,
            },
            Stage {
                res: ResBlock::new(init, "mid_block.resnets.1", cur, cur, te, g)?,
                attn: None,
            },
        ];
        let mut up = Vec::new();
        for k in 0..levels {
            let i = levels - 1 - k;
            let c = ch[i];
            let attn = cfg.attention_levels.contains(&i);
            let mut stages = Vec::new();
            for j in 0..=cfg.layers_per_block {
                let s = skips.pop().unwrap_or(0);
                let p = format!("up_blocks.{k}");
                stages.push(Stage {
                    res: ResBlock::new(init, &format!("{p}.resnets.{j}"), cur + s, c, te, g)?,
                    attn: transformer(init, &format!("{p}.attentions.{j}"), c, attn)?,
                });
                cur = c;
            }
            let resample = if i > 0 {
                Some(init.conv(&format!("up_blocks.{k}.upsamplers.0.conv"), cur, cur, 3, 1)?)
            } else {
                None
            };
            up.push(Level { stages, resample });
        }
        let norm_out = init.group_norm("conv_norm_out", cur, g)?;
        let conv_out = init.conv("conv_out", cfg.channels, cur, 3, 1)?;
        Ok(Self {
            conv_in,
            time_1,
            time_2,
            down,
            mid,
            up,
            norm_out,
            conv_out,
            base_channels: cfg.base_channels,
            channels: cfg.channels,
            text_dim: cfg.text_dim,
            levels,
        })
    }

    /// Evaluation forward, see [`forward_t`](Self::forward_t).
    pub fn forward(
        &self,
        schedule: &NoiseSchedule,
        x_t: &Tensor,
        t: &[usize],
        text: &Tensor,
        text_mask: &Tensor,
    ) -> Result<Tensor> {
        self.forward_t(schedule, x_t, t, text, text_mask, false)
    }

    /// The prediction (B, C, H, W) for noisy images `x_t` (B, C, H, W) at timesteps `t` (one
    /// per example, in `0..schedule.steps()`), conditioned on text states (B, T, d_text) with
    /// mask (B, T) (1 = token, 0 = padding). H and W must be multiples of 2^(levels − 1).
    /// `train` enables adapter dropout.
    pub fn forward_t(
        &self,
        schedule: &NoiseSchedule,
        x_t: &Tensor,
        t: &[usize],
        text: &Tensor,
        text_mask: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        let (b, c, h, w) = x_t
            .dims4()
            .map_err(|_| UnetError::Shape(format!("x_t {:?} is not (B, C, H, W)", x_t.dims())))?;
        let f = 1usize << (self.levels - 1);
        if c != self.channels || !h.is_multiple_of(f) || !w.is_multiple_of(f) || h == 0 || w == 0 {
            return Err(UnetError::Shape(format!(
                "x_t {:?}: expected {} channels and sides that are multiples of {f}",
                x_t.dims(),
                self.channels
            )));
        }
        let (tb, tt, td) = text
            .dims3()
            .map_err(|_| UnetError::Shape(format!("text {:?} is not (B, T, d)", text.dims())))?;
        if tb != b || td != self.text_dim || text_mask.dims() != [b, tt] || t.len() != b {
            return Err(UnetError::Shape(format!(
                "batch {b}: text {:?} (want (B, T, {})), mask {:?}, {} timesteps",
                text.dims(),
                self.text_dim,
                text_mask.dims(),
                t.len()
            )));
        }
        let emb = schedule.timestep_embedding(t, self.base_channels, DType::F32, x_t.device())?;
        let temb = self.time_2.forward(&self.time_1.forward(&emb)?.silu()?)?;
        let bias = mask_bias(&text_mask.to_dtype(DType::F32)?)?;
        let mut x = self.conv_in.forward(&x_t.to_dtype(DType::F32)?)?;
        let mut hs = vec![x.clone()];
        for level in &self.down {
            for s in &level.stages {
                x = s.forward(&x, &temb, text, &bias, train)?;
                hs.push(x.clone());
            }
            if let Some(d) = &level.resample {
                x = d.forward(&x)?;
                hs.push(x.clone());
            }
        }
        for s in &self.mid {
            x = s.forward(&x, &temb, text, &bias, train)?;
        }
        for level in &self.up {
            for s in &level.stages {
                let skip = hs
                    .pop()
                    .ok_or_else(|| UnetError::Shape("skip connections exhausted".into()))?;
                x = s.forward(&Tensor::cat(&[&x, &skip], 1)?, &temb, text, &bias, train)?;
            }
            if let Some(u) = &level.resample {
                x = u.forward(&upsample2(&x)?)?;
            }
        }
        self.conv_out.forward(&self.norm_out.forward(&x)?.silu()?)
    }
}

impl Module for Unet {
    fn params<'a>(&'a self, out: &mut Vec<&'a Param>) {
        self.conv_in.params(out);
        self.time_1.params(out);
        self.time_2.params(out);
        for l in &self.down {
            l.params(out);
        }
        for s in &self.mid {
            s.params(out);
        }
        for l in &self.up {
            l.params(out);
        }
        self.norm_out.params(out);
        self.conv_out.params(out);
    }
    fn params_mut<'a>(&'a mut self, out: &mut Vec<&'a mut Param>) {
        self.conv_in.params_mut(out);
        self.time_1.params_mut(out);
        self.time_2.params_mut(out);
        for l in &mut self.down {
            l.params_mut(out);
        }
        for s in &mut self.mid {
            s.params_mut(out);
        }
        for l in &mut self.up {
            l.params_mut(out);
        }
        self.norm_out.params_mut(out);
        self.conv_out.params_mut(out);
    }
    fn lin<'a>(&'a self, out: &mut Vec<&'a AdaptedLinear>) {
        for l in &self.down {
            l.lin(out);
        }
        for s in &self.mid {
            s.lin(out);
        }
        for l in &self.up {
            l.lin(out);
        }
    }
    fn lin_mut<'a>(&'a mut self, out: &mut Vec<&'a mut AdaptedLinear>) {
        for l in &mut self.down {
            l.lin_mut(out);
        }
        for s in &mut self.mid {
            s.lin_mut(out);
        }
        for l in &mut self.up {
            l.lin_mut(out);
        }
    }
}

impl LinearLayers for Unet {
    fn linears(&self) -> Vec<&AdaptedLinear> {
        let mut v = Vec::new();
        self.lin(&mut v);
        v
    }
    fn linears_mut(&mut self) -> Vec<&mut AdaptedLinear> {
        let mut v = Vec::new();
        self.lin_mut(&mut v);
        v
    }
}

// ---------------------------------------------------------------------------------------------
// Generator
// ---------------------------------------------------------------------------------------------

/// Metadata key of the config JSON in a saved generator.
const CONFIG_KEY: &str = "unet_config";

/// Text encoder + UNet + noise schedule + tokenizer: trains with the DDPM ε-loss and samples
/// with DDIM and classifier-free guidance.
#[derive(Debug, Clone)]
pub struct Generator {
    cfg: UnetConfig,
    vocab: PromptVocab,
    text: TextEncoder,
    unet: Unet,
    schedule: NoiseSchedule,
    device: Device,
}

impl Generator {
    /// A freshly initialised generator (deterministic in `cfg.seed`) on `device`, with the
    /// portrait vocabulary ([`PromptVocab::portraits`]).
    pub fn new(cfg: UnetConfig, device: &Device) -> Result<Self> {
        cfg.validate()?;
        let vocab = PromptVocab::portraits(cfg.max_tokens);
        if vocab.len() > cfg.vocab_size {
            return Err(UnetError::Config(format!(
                "vocab_size {} is smaller than the vocabulary ({} ids)",
                cfg.vocab_size,
                vocab.len()
            )));
        }
        let mut init = Init {
            rng: StdRng::seed_from_u64(cfg.seed),
            device: device.clone(),
        };
        let text = TextEncoder::new(&cfg, &mut init)?;
        let unet = Unet::new(&cfg, &mut init)?;
        let schedule = NoiseSchedule::new(cfg.schedule)?;
        Ok(Self {
            cfg,
            vocab,
            text,
            unet,
            schedule,
            device: device.clone(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &UnetConfig {
        &self.cfg
    }

    /// The tokenizer.
    pub fn vocab(&self) -> &PromptVocab {
        &self.vocab
    }

    /// The noise schedule.
    pub fn schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The UNet (attach adapters to it with `attach_adapters(generator.unet_mut(), …)`).
    pub fn unet(&self) -> &Unet {
        &self.unet
    }

    /// The UNet, mutably.
    pub fn unet_mut(&mut self) -> &mut Unet {
        &mut self.unet
    }

    /// The text encoder.
    pub fn text_encoder(&self) -> &TextEncoder {
        &self.text
    }

    /// The text encoder, mutably.
    pub fn text_encoder_mut(&mut self) -> &mut TextEncoder {
        &mut self.text
    }

    /// Text states (B, T, d) and mask (B, T) of `prompts` (the empty string is the
    /// unconditional prompt); `train` enables adapter dropout.
    pub fn encode_text<S: AsRef<str>>(
        &self,
        prompts: &[S],
        train: bool,
    ) -> Result<(Tensor, Tensor)> {
        let (ids, mask) = self.vocab.encode_batch(prompts, &self.device)?;
        let states = self.text.forward(&ids, &mask, train)?;
        Ok((states, mask))
    }

    /// The ε-prediction (B, C, H, W) for `x_t` at timesteps `t` under `prompts` (one each).
    pub fn predict<S: AsRef<str>>(
        &self,
        x_t: &Tensor,
        t: &[usize],
        prompts: &[S],
    ) -> Result<Tensor> {
        let (text, mask) = self.encode_text(prompts, false)?;
        self.unet.forward(&self.schedule, x_t, t, &text, &mask)
    }

    /// The DDPM loss (a scalar, of the configured prediction) on clean `images` (B, C, H, W) in [-1, 1] with one
    /// prompt each. Timesteps, noise and prompt dropping (probability `p_uncond`, replaced by
    /// the empty prompt) are drawn from `rng`.
    pub fn loss<R: Rng + ?Sized>(
        &self,
        images: &Tensor,
        prompts: &[String],
        rng: &mut R,
    ) -> Result<Tensor> {
        self.loss_from(images, prompts, rng, 0)
    }

    /// [`loss`](Self::loss) with timesteps drawn from `min_t..T` only (identity LoRAs train on
    /// the noisier part of the schedule, where the prompt leaves the face undetermined).
    pub fn loss_from<R: Rng + ?Sized>(
        &self,
        images: &Tensor,
        prompts: &[String],
        rng: &mut R,
        min_t: usize,
    ) -> Result<Tensor> {
        let b = match images.dims() {
            [b, ..] if *b > 0 => *b,
            d => return Err(UnetError::Shape(format!("images {d:?} hold no batch"))),
        };
        if prompts.len() != b {
            return Err(UnetError::Shape(format!(
                "{} prompts for a batch of {b} images",
                prompts.len()
            )));
        }
        let images = images.to_dtype(DType::F32)?;
        let steps = self.schedule.steps();
        if min_t >= steps {
            return Err(UnetError::Config(format!(
                "min_t {min_t} is not below the schedule's {steps} steps"
            )));
        }
        let t: Vec<usize> = (0..b).map(|_| rng.random_range(min_t..steps)).collect();
        let noise = seeded_normal(images.shape(), DType::F32, &self.device, rng)?;
        let x_t = self.schedule.q_sample(&images, &noise, &t)?;
        let prompts: Vec<&str> = prompts
            .iter()
            .map(|p| {
                if rng.random::<f64>() < self.cfg.p_uncond {
                    ""
                } else {
                    p.as_str()
                }
            })
            .collect();
        let (text, mask) = self.encode_text(&prompts, true)?;
        let out = self
            .unet
            .forward_t(&self.schedule, &x_t, &t, &text, &mask, true)?;
        Ok(self
            .schedule
            .ddpm_loss(&out, &images, &noise, &t, self.cfg.prediction)?)
    }

    /// `n` images (n, C, S, S) for `prompt` by DDIM (`ddim.prediction` must be the config's), with
    /// classifier-free guidance `guidance` (1 = conditional only, no extra pass). The result is
    /// clamped to [-1, 1] and deterministic in `ddim.seed`.
    pub fn sample(
        &self,
        prompt: &str,
        n: usize,
        ddim: &DdimConfig,
        guidance: f64,
    ) -> Result<Tensor> {
        let drawn = self.sample_with(prompt, n, ddim, guidance, &mut |_, _| {
            ControlFlow::Continue(())
        })?;
        drawn.ok_or_else(|| UnetError::Config("sampling stopped".into()))
    }

    /// [`sample`](Self::sample), calling `on_step(step, steps)` before each DDIM step (1-based,
    /// all `n` images at once); `Break` stops before that step and gives `Ok(None)`. The
    /// images drawn to the end are the same as `sample`'s.
    pub fn sample_with(
        &self,
        prompt: &str,
        n: usize,
        ddim: &DdimConfig,
        guidance: f64,
        on_step: &mut dyn FnMut(usize, usize) -> ControlFlow<()>,
    ) -> Result<Option<Tensor>> {
        if ddim.prediction != self.cfg.prediction {
            return Err(UnetError::Config(format!(
                "the generator predicts {:?}; set ddim.prediction to match",
                self.cfg.prediction
            )));
        }
        if n == 0 {
            return Err(UnetError::Shape("asked for 0 samples".into()));
        }
        if !guidance.is_finite() {
            return Err(UnetError::Config(format!(
                "guidance {guidance} is not finite"
            )));
        }
        let cond: Vec<&str> = vec![prompt; n];
        let (ctext, cmask) = self.encode_text(&cond, false)?;
        let with_uncond = guidance != 1.0;
        let (text, mask) = if with_uncond {
            let (utext, umask) = self.encode_text(&vec![""; n], false)?;
            (
                Tensor::cat(&[&ctext, &utext], 0)?,
                Tensor::cat(&[&cmask, &umask], 0)?,
            )
        } else {
            (ctext, cmask)
        };
        let s = self.cfg.image_size;
        let shape = (n, self.cfg.channels, s, s);
        let steps = ddim.steps;
        let (mut step, mut stopped) = (0, false);
        let out = ddim_sample(
            &self.schedule,
            shape,
            DType::F32,
            &self.device,
            ddim,
            |x, t| {
                step += 1;
                if on_step(step, steps).is_break() {
                    stopped = true;
                    return Err(candle_core::Error::Msg("sampling stopped".into()));
                }
                let run = || -> Result<Tensor> {
                    if with_uncond {
                        let x2 = Tensor::cat(&[x, x], 0)?;
                        let t2: Vec<usize> = t.iter().chain(t.iter()).copied().collect();
                        let o = self.unet.forward(&self.schedule, &x2, &t2, &text, &mask)?;
                        Ok(guided(&o.narrow(0, 0, n)?, &o.narrow(0, n, n)?, guidance)?.detach())
                    } else {
                        Ok(self
                            .unet
                            .forward(&self.schedule, x, t, &text, &mask)?
                            .detach())
                    }
                };
                run().map_err(|e| candle_core::Error::Msg(e.to_string()))
            },
        );
        match out {
            Err(_) if stopped => Ok(None),
            out => Ok(Some(out?.clamp(-1.0, 1.0)?)),
        }
    }

    fn all_params(&self) -> Vec<&Param> {
        let mut v = Vec::new();
        self.text.params(&mut v);
        self.unet.params(&mut v);
        v
    }

    fn all_params_mut(&mut self) -> Vec<&mut Param> {
        let mut v = Vec::new();
        self.text.params_mut(&mut v);
        self.unet.params_mut(&mut v);
        v
    }

    fn all_linears_mut(&mut self) -> Vec<&mut AdaptedLinear> {
        let mut v = self.text.linears_mut();
        v.extend(self.unet.linears_mut());
        v
    }

    /// Makes every weight trainable (full training; adapters are removed) and returns all
    /// variables by name. Calling it again returns the same variables.
    pub fn trainable_vars(&mut self) -> Result<Vec<(String, Var)>> {
        let mut vars = Vec::new();
        for p in self.all_params_mut() {
            vars.push(p.make_trainable()?);
        }
        for l in self.all_linears_mut() {
            let current = l.trainable_vars();
            if l.adapter().is_none() && !current.is_empty() {
                vars.extend(current);
            } else {
                vars.extend(l.make_trainable()?);
            }
        }
        Ok(vars)
    }

    /// Every weight by stable name (adapters merged into their layers' weights).
    pub fn named_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out: Vec<(String, Tensor)> = self
            .all_params()
            .into_iter()
            .map(|p| (p.name.clone(), p.t.detach()))
            .collect();
        for l in self.text.linears().into_iter().chain(self.unet.linears()) {
            out.push((format!("{}.weight", l.path()), l.effective_weight()?));
            if let Some(b) = l.bias() {
                out.push((format!("{}.bias", l.path()), b.detach()));
            }
        }
        Ok(out)
    }

    /// Number of weights (adapters excluded).
    pub fn parameter_count(&self) -> usize {
        let p: usize = self.all_params().iter().map(|p| p.t.elem_count()).sum();
        let l: usize = self
            .text
            .linears()
            .into_iter()
            .chain(self.unet.linears())
            .map(|l| {
                let (m, n) = l.shape();
                m * n + l.bias().map_or(0, |b| b.elem_count())
            })
            .sum();
        p + l
    }

    /// Writes every weight ([`named_tensors`](Self::named_tensors)) to a safetensors file, with
    /// the config as JSON in the metadata.
    pub fn save(&self, path: &Path) -> Result<()> {
        let file_err = |reason: String| UnetError::File {
            path: path.display().to_string(),
            reason,
        };
        let json = serde_json::to_string(&self.cfg).map_err(|e| file_err(e.to_string()))?;
        let meta: HashMap<String, String> = [(CONFIG_KEY.to_string(), json)].into();
        write_safetensors(path, &self.named_tensors()?, meta).map_err(|e| file_err(e.reason()))
    }

    /// Reads a generator written by [`save`](Self::save) onto `device`; every tensor must be
    /// present with the config's shape.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let file_err = |reason: String| UnetError::File {
            path: path.display().to_string(),
            reason,
        };
        let (mut tensors, json) = read_safetensors(path, CONFIG_KEY, "generator", device)
            .map_err(|e| file_err(e.reason()))?;
        if let Some(name) = super::weights::first_non_finite(&tensors)? {
            return Err(file_err(format!(
                "tensor `{name}` holds NaN or infinite values"
            )));
        }
        let cfg: UnetConfig =
            serde_json::from_str(&json).map_err(|e| file_err(format!("bad config: {e}")))?;
        let mut g = Self::new(cfg, device)?;
        let mut take = |name: &str, dims: &[usize]| -> Result<Tensor> {
            let t = tensors
                .remove(name)
                .ok_or_else(|| file_err(format!("tensor `{name}` is missing")))?;
            if t.dims() != dims {
                return Err(file_err(format!(
                    "tensor `{name}` has shape {:?}, expected {dims:?}",
                    t.dims()
                )));
            }
            Ok(t.to_dtype(DType::F32)?)
        };
        for p in g.all_params_mut() {
            let dims = p.t.dims().to_vec();
            p.t = take(&p.name, &dims)?;
        }
        for l in g.all_linears_mut() {
            let (m, n) = l.shape();
            let w = take(&format!("{}.weight", l.path()), &[m, n])?;
            let b = take(&format!("{}.bias", l.path()), &[m])?;
            *l = AdaptedLinear::new(l.path().to_string(), w, Some(b));
        }
        Ok(g)
    }
}

//! The transformer encoder block shared by BERT, RoBERTa (post-LN) and ViT (pre-LN).

use candle_core::{Result, Tensor};
use serde_json::Value;

use super::ModelError;
use super::ops::{layer_norm, masked_softmax};
use super::weights::{Fill, WeightReader};
use crate::peft::AdaptedLinear;

/// Hyper-parameters read from `config.json`.
#[derive(Debug, Clone)]
pub struct EncoderConfig {
    /// Hidden width.
    pub hidden: usize,
    /// Number of blocks.
    pub layers: usize,
    /// Attention heads.
    pub heads: usize,
    /// FFN width.
    pub intermediate: usize,
    /// Layer-norm epsilon.
    pub eps: f64,
    /// Activation of the FFN.
    pub act: Activation,
    /// Std of initialised weights.
    pub init_std: f32,
}

/// FFN activations of Hugging Face configs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `gelu`: the exact, erf-based GELU.
    Gelu,
    /// `gelu_new` / `gelu_pytorch_tanh`: the tanh approximation.
    GeluTanh,
    /// `relu`.
    Relu,
}

impl Activation {
    fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Activation::Gelu => super::ops::gelu_erf(x),
            Activation::GeluTanh => x.gelu(),
            Activation::Relu => x.relu(),
        }
    }
}

/// Reads an unsigned field, with a default when absent.
pub fn field_usize(
    v: &Value,
    path: &str,
    field: &str,
    default: Option<usize>,
) -> std::result::Result<usize, ModelError> {
    match (v.get(field), default) {
        (Some(x), _) => x
            .as_u64()
            .map(|u| u as usize)
            .ok_or_else(|| ModelError::File {
                path: path.into(),
                reason: format!("field `{field}` must be a non-negative integer, found {x}"),
            }),
        (None, Some(d)) => Ok(d),
        (None, None) => Err(ModelError::File {
            path: path.into(),
            reason: format!("field `{field}` is missing"),
        }),
    }
}

impl EncoderConfig {
    /// Reads the encoder fields of `config.json` (`path` names it in errors).
    pub fn from_json(
        v: &Value,
        path: &str,
        default_eps: f64,
    ) -> std::result::Result<Self, ModelError> {
        let hidden = field_usize(v, path, "hidden_size", None)?;
        let heads = field_usize(v, path, "num_attention_heads", None)?;
        if heads == 0 || hidden % heads != 0 {
            return Err(ModelError::File {
                path: path.into(),
                reason: format!("num_attention_heads ({heads}) must divide hidden_size ({hidden})"),
            });
        }
        let act = match v
            .get("hidden_act")
            .and_then(Value::as_str)
            .unwrap_or("gelu")
        {
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "relu" => Activation::Relu,
            other => {
                return Err(ModelError::File {
                    path: path.into(),
                    reason: format!(
                        "hidden_act `{other}` is not supported (gelu, gelu_new, relu are)"
                    ),
                });
            }
        };
        let eps = v
            .get("layer_norm_eps")
            .and_then(Value::as_f64)
            .unwrap_or(default_eps);
        if !(eps.is_finite() && eps > 0.0 && eps < 1.0) {
            return Err(ModelError::File {
                path: path.into(),
                reason: format!("field `layer_norm_eps` must be in (0, 1), found {eps}"),
            });
        }
        let init_std = v
            .get("initializer_range")
            .and_then(Value::as_f64)
            .unwrap_or(0.02);
        if !(init_std.is_finite() && (0.0..=10.0).contains(&init_std)) {
            return Err(ModelError::File {
                path: path.into(),
                reason: format!("field `initializer_range` must be in [0, 10], found {init_std}"),
            });
        }
        Ok(Self {
            hidden,
            layers: field_usize(v, path, "num_hidden_layers", None)?,
            heads,
            intermediate: field_usize(v, path, "intermediate_size", Some(4 * hidden))?,
            eps,
            act,
            init_std: init_std as f32,
        })
    }
}

/// Where the block puts its layer norms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormPlacement {
    /// BERT/RoBERTa: after each residual add.
    Post,
    /// ViT: before attention and before the FFN.
    Pre,
}

/// One encoder block.
#[derive(Debug, Clone)]
pub struct Block {
    pub(crate) query: AdaptedLinear,
    pub(crate) key: AdaptedLinear,
    pub(crate) value: AdaptedLinear,
    pub(crate) attn_out: AdaptedLinear,
    pub(crate) intermediate: AdaptedLinear,
    pub(crate) output: AdaptedLinear,
    pub(crate) ln1: (String, Tensor, Tensor),
    pub(crate) ln2: (String, Tensor, Tensor),
    heads: usize,
    eps: f64,
    act: Activation,
    norm: NormPlacement,
}

/// Loads a linear layer `path` (out×in) from the reader.
pub fn linear(
    r: &mut WeightReader,
    path: &str,
    out: usize,
    inp: usize,
    bias: bool,
) -> std::result::Result<AdaptedLinear, ModelError> {
    let w = r.get(&format!("{path}.weight"), &[out, inp], Fill::Normal)?;
    let b = if bias {
        Some(r.get(&format!("{path}.bias"), &[out], Fill::Zeros)?)
    } else {
        None
    };
    Ok(AdaptedLinear::new(path, w, b))
}

/// Loads a layer norm's (weight, bias) under `path`.
pub fn norm(
    r: &mut WeightReader,
    path: &str,
    d: usize,
) -> std::result::Result<(String, Tensor, Tensor), ModelError> {
    Ok((
        path.to_string(),
        r.get(&format!("{path}.weight"), &[d], Fill::Ones)?,
        r.get(&format!("{path}.bias"), &[d], Fill::Zeros)?,
    ))
}

impl Block {
    /// Loads block `prefix` (e.g. `bert.encoder.layer.3`). `attn` is the attention module's
    /// name (`attention.self` or `attention.attention`), `ln` the two norms' names.
    pub fn load(
        r: &mut WeightReader,
        c: &EncoderConfig,
        prefix: &str,
        attn: &str,
        ln: [&str; 2],
        qkv_bias: bool,
        norm_at: NormPlacement,
    ) -> std::result::Result<Self, ModelError> {
        let h = c.hidden;
        Ok(Self {
            query: linear(r, &format!("{prefix}.{attn}.query"), h, h, qkv_bias)?,
            key: linear(r, &format!("{prefix}.{attn}.key"), h, h, qkv_bias)?,
            value: linear(r, &format!("{prefix}.{attn}.value"), h, h, qkv_bias)?,
            attn_out: linear(r, &format!("{prefix}.attention.output.dense"), h, h, true)?,
            intermediate: linear(
                r,
                &format!("{prefix}.intermediate.dense"),
                c.intermediate,
                h,
                true,
            )?,
            output: linear(
                r,
                &format!("{prefix}.output.dense"),
                h,
                c.intermediate,
                true,
            )?,
            ln1: norm(r, &format!("{prefix}.{}", ln[0]), h)?,
            ln2: norm(r, &format!("{prefix}.{}", ln[1]), h)?,
            heads: c.heads,
            eps: c.eps,
            act: c.act,
            norm: norm_at,
        })
    }

    /// The block's linear layers in forward order.
    pub fn linears(&self) -> [&AdaptedLinear; 6] {
        [
            &self.query,
            &self.key,
            &self.value,
            &self.attn_out,
            &self.intermediate,
            &self.output,
        ]
    }

    /// The same, mutably.
    pub fn linears_mut(&mut self) -> [&mut AdaptedLinear; 6] {
        [
            &mut self.query,
            &mut self.key,
            &mut self.value,
            &mut self.attn_out,
            &mut self.intermediate,
            &mut self.output,
        ]
    }

    /// The two layer norms' parameters by name.
    pub fn norms_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        let (n1, w1, b1) = &mut self.ln1;
        let (n2, w2, b2) = &mut self.ln2;
        vec![
            (format!("{n1}.weight"), w1),
            (format!("{n1}.bias"), b1),
            (format!("{n2}.weight"), w2),
            (format!("{n2}.bias"), b2),
        ]
    }

    /// Read-only copy of [`norms_mut`](Self::norms_mut).
    pub fn norms(&self) -> Vec<(String, Tensor)> {
        let (n1, w1, b1) = &self.ln1;
        let (n2, w2, b2) = &self.ln2;
        vec![
            (format!("{n1}.weight"), w1.clone()),
            (format!("{n1}.bias"), b1.clone()),
            (format!("{n2}.weight"), w2.clone()),
            (format!("{n2}.bias"), b2.clone()),
        ]
    }

    fn attention(&self, x: &Tensor, mask_bias: Option<&Tensor>, train: bool) -> Result<Tensor> {
        let (b, t, h) = x.dims3()?;
        let dh = h / self.heads;
        let split = |l: &AdaptedLinear| -> Result<Tensor> {
            l.forward_t(x, train)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?
                .reshape((b, t, self.heads, dh))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split(&self.query)?;
        let k = split(&self.key)?;
        let v = split(&self.value)?;
        let scores = q.matmul(&k.t()?)?;
        let probs = masked_softmax(&scores, mask_bias, 1.0 / (dh as f64).sqrt())?;
        let ctx = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, h))?;
        self.attn_out
            .forward_t(&ctx, train)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))
    }

    fn ffn(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let err = |e: crate::peft::PeftError| candle_core::Error::Msg(e.to_string());
        let h = self.intermediate.forward_t(x, train).map_err(err)?;
        self.output
            .forward_t(&self.act.apply(&h)?, train)
            .map_err(err)
    }

    /// Runs the block on (B, T, H); `mask_bias` is (B, T) with 0 for tokens and a large
    /// negative number for padding.
    pub fn forward(&self, x: &Tensor, mask_bias: Option<&Tensor>, train: bool) -> Result<Tensor> {
        let ln = |x: &Tensor, p: &(String, Tensor, Tensor)| layer_norm(x, &p.1, &p.2, self.eps);
        match self.norm {
            NormPlacement::Post => {
                let a = self.attention(x, mask_bias, train)?;
                let x = ln(&(x + a)?, &self.ln1)?;
                let f = self.ffn(&x, train)?;
                ln(&(x + f)?, &self.ln2)
            }
            NormPlacement::Pre => {
                let a = self.attention(&ln(x, &self.ln1)?, mask_bias, train)?;
                let x = (x + a)?;
                let f = self.ffn(&ln(&x, &self.ln2)?, train)?;
                x + f
            }
        }
    }
}

/// Additive attention bias (B, T) from a (B, T) mask of 1/0: 0 for tokens, −10⁹ for padding.
pub fn mask_bias(mask: &Tensor) -> Result<Tensor> {
    (mask.ones_like()? - mask)? * -1e9
}

/// Position `0` of every sequence: (B, T, H) → (B, H).
pub fn first_token(x: &Tensor) -> Result<Tensor> {
    x.narrow(1, 0, 1)?.squeeze(1)
}

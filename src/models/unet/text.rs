//! The CLIP-like text encoder.

use candle_core::{DType, Tensor};

use crate::peft::AdaptedLinear;
use crate::peft::linear::LinearLayers;

use super::blocks::*;
use super::config::*;
use super::{Result, UnetError};

// ---------------------------------------------------------------------------------------------
// Text encoder
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub(crate) struct TextLayer {
    pub(crate) ln1: Ln,
    pub(crate) attn: Attention,
    pub(crate) ln2: Ln,
    pub(crate) mlp: Mlp,
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
    pub(crate) token_embedding: Param,
    pub(crate) position_embedding: Param,
    pub(crate) layers: Vec<TextLayer>,
    pub(crate) final_ln: Ln,
    pub(crate) dim: usize,
}

impl TextEncoder {
    pub(crate) fn new(cfg: &UnetConfig, init: &mut Init) -> Result<Self> {
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

//! The text-conditioned UNet denoiser: residual blocks, spatial transformers, levels.

use candle_core::{DType, Tensor};

use crate::diffusion::NoiseSchedule;
use crate::peft::AdaptedLinear;
use crate::peft::linear::LinearLayers;

use super::blocks::*;
use super::config::*;
use super::{Result, UnetError};

// ---------------------------------------------------------------------------------------------
// UNet
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub(crate) struct ResBlock {
    pub(crate) norm1: GroupNorm,
    pub(crate) conv1: Conv,
    pub(crate) time_emb_proj: Dense,
    pub(crate) norm2: GroupNorm,
    pub(crate) conv2: Conv,
    pub(crate) shortcut: Option<Conv>,
}

impl ResBlock {
    pub(crate) fn new(
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

    pub(crate) fn forward(&self, x: &Tensor, temb: &Tensor) -> Result<Tensor> {
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
pub(crate) struct SpatialTransformer {
    pub(crate) norm: GroupNorm,
    pub(crate) proj_in: AdaptedLinear,
    pub(crate) norm1: Ln,
    pub(crate) attn1: Attention,
    pub(crate) norm2: Ln,
    pub(crate) attn2: Attention,
    pub(crate) norm3: Ln,
    pub(crate) ff: Mlp,
    pub(crate) proj_out: AdaptedLinear,
}

impl SpatialTransformer {
    pub(crate) fn new(
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

    pub(crate) fn forward(
        &self,
        x: &Tensor,
        text: &Tensor,
        bias: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
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
pub(crate) struct Stage {
    pub(crate) res: ResBlock,
    pub(crate) attn: Option<SpatialTransformer>,
}

impl Stage {
    pub(crate) fn forward(
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
pub(crate) struct Level {
    pub(crate) stages: Vec<Stage>,
    /// Downsampler (stride-2 conv) on the way down, upsampler (nearest ×2 + conv) on the way up.
    pub(crate) resample: Option<Conv>,
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
pub(crate) fn upsample2(x: &Tensor) -> Result<Tensor> {
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
    pub(crate) conv_in: Conv,
    pub(crate) time_1: Dense,
    pub(crate) time_2: Dense,
    pub(crate) down: Vec<Level>,
    pub(crate) mid: Vec<Stage>,
    pub(crate) up: Vec<Level>,
    pub(crate) norm_out: GroupNorm,
    pub(crate) conv_out: Conv,
    pub(crate) base_channels: usize,
    pub(crate) channels: usize,
    pub(crate) text_dim: usize,
    pub(crate) levels: usize,
}

impl Unet {
    pub(crate) fn new(cfg: &UnetConfig, init: &mut Init) -> Result<Self> {
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

//! [`AdaptedLinear`]: one frozen linear layer plus an optional adapter, and the
//! [`LinearLayers`] trait through which adapters are attached to a model by module path.

use std::borrow::Cow;

use candle_core::{DType, Tensor, Var};

use super::config::{AdapterConfig, Method};
use super::decompose::{self, tensor_to_mat};
use super::diagonal::DiagonalAdapter;
use super::frozen::{FrozenGrad, frozen_linear, frozen_linear_bias};
use super::fused_lora::{FrozenWeight, lora_linear};
use super::lora::LoraAdapter;
use super::packed::{PackedWeight, packed_linear};
use super::{PeftError, Result};

/// A layer's frozen weight: a tensor, or the stored (quantized) form of one.
#[derive(Debug, Clone)]
enum Frozen {
    Dense(Tensor),
    Packed(PackedWeight),
}

/// The adapter a layer carries.
#[derive(Debug, Clone)]
pub enum Adapter {
    /// LoRA.
    Lora(LoraAdapter),
    /// SVFit or LoLDU.
    Diagonal(DiagonalAdapter),
}

impl Adapter {
    /// The method that built it.
    pub fn method(&self) -> Method {
        match self {
            Adapter::Lora(_) => Method::Lora,
            Adapter::Diagonal(d) => d.method,
        }
    }

    /// Rank r.
    pub fn rank(&self) -> usize {
        match self {
            Adapter::Lora(a) => a.rank(),
            Adapter::Diagonal(d) => d.rank(),
        }
    }

    fn branch(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Adapter::Lora(a) => a.branch(x),
            Adapter::Diagonal(d) => d.branch(x),
        }
    }

    fn initial_branch(&self, x: &Tensor) -> Result<Option<Tensor>> {
        match self {
            Adapter::Lora(a) => a.initial_branch(x),
            Adapter::Diagonal(d) => d.initial_branch(x).map(Some),
        }
    }

    fn merge_delta(&self) -> Result<Tensor> {
        match self {
            Adapter::Lora(a) => a.merge_delta(),
            Adapter::Diagonal(d) => d.merge_delta(),
        }
    }

    fn initial_delta(&self) -> Result<Option<Tensor>> {
        match self {
            Adapter::Lora(a) => a.initial_delta(),
            Adapter::Diagonal(d) => d.initial_delta().map(Some),
        }
    }

    /// The learned change as a plain LoRA pair `(B, A)` with scale 1.
    pub fn lora_form(&self) -> Result<(Tensor, Tensor)> {
        match self {
            Adapter::Lora(a) => a.lora_form(),
            Adapter::Diagonal(d) => d.lora_form(),
        }
    }

    /// Named trainable variables.
    pub fn vars(&self) -> Vec<(&'static str, Var)> {
        match self {
            Adapter::Lora(a) => a.vars(),
            Adapter::Diagonal(d) => d.vars(),
        }
    }
}

/// A linear layer `y = x·Wᵀ + b` whose weight is frozen, with an optional adapter.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use peft_studio::peft::{AdaptedLinear, AdapterConfig, Method};
/// let w = Tensor::randn(0f32, 1., (6, 4), &Device::Cpu)?;
/// let x = Tensor::randn(0f32, 1., (3, 4), &Device::Cpu)?;
/// let mut layer = AdaptedLinear::new("attn.query", w, None);
/// let before = layer.forward(&x)?;
/// layer.attach(&AdapterConfig::new(Method::Loldu, 4))?;
/// assert_eq!(layer.trainable_count(), 4);
/// let after = layer.forward(&x)?;
/// assert!((before - after)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-5);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct AdaptedLinear {
    path: String,
    /// The frozen weight of the unmerged forward (W, W − s·B₀·A₀, or W_res); W_eff when merged.
    base: Frozen,
    /// Set when the weight itself trains (full fine-tuning); `base` is then its tensor.
    trainable_weight: Option<Var>,
    /// Set when the bias trains too; `bias` is then its tensor.
    trainable_bias: Option<Var>,
    bias: Option<Tensor>,
    adapter: Option<Adapter>,
    merged: bool,
    disabled: bool,
    dropout: f64,
    frozen_grad: FrozenGrad,
}

impl AdaptedLinear {
    /// A plain frozen layer at `path` with weight (out×in) and optional bias (out).
    pub fn new(path: impl Into<String>, weight: Tensor, bias: Option<Tensor>) -> Self {
        Self::with_base(path.into(), Frozen::Dense(weight), bias)
    }

    /// A frozen layer whose weight stays packed as stored (e.g. Q4_1 from a GGUF file): the
    /// forward dequantizes it per product, so no f32 copy stays resident. LoRA (default init)
    /// keeps it packed; an adapter that changes the base (PiSSA, SVFit, LoLDU), merging or
    /// full fine-tuning turns it into an f32 weight.
    pub fn new_packed(path: impl Into<String>, weight: PackedWeight, bias: Option<Tensor>) -> Self {
        Self::with_base(path.into(), Frozen::Packed(weight), bias)
    }

    fn with_base(path: String, base: Frozen, bias: Option<Tensor>) -> Self {
        Self {
            path,
            base,
            trainable_weight: None,
            trainable_bias: None,
            bias,
            adapter: None,
            merged: false,
            disabled: false,
            dropout: 0.0,
            frozen_grad: FrozenGrad::Skip,
        }
    }

    /// The module path (e.g. `encoder.layer.0.attention.self.query`).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// (out, in) features.
    pub fn shape(&self) -> (usize, usize) {
        match &self.base {
            Frozen::Dense(t) => {
                let d = t.dims();
                (d[0], d[1])
            }
            Frozen::Packed(p) => p.dims(),
        }
    }

    /// The frozen weight the unmerged forward multiplies by: W for LoRA, `W − s·B₀·A₀` for
    /// PiSSA, `W_res` for SVFit and LoLDU; `W_eff` while merged. A packed weight is
    /// dequantized to f32 (a new tensor).
    pub fn base_weight(&self) -> Result<Cow<'_, Tensor>> {
        Ok(match &self.base {
            Frozen::Dense(t) => Cow::Borrowed(t),
            Frozen::Packed(p) => Cow::Owned(p.dequantize()?),
        })
    }

    /// Keeps the frozen dense weight in `dtype` (bf16 halves the base's memory; its products
    /// run as [`MatmulPrecision`](super::MatmulPrecision) says). A packed or trainable weight
    /// is left as it is. Returns the bytes saved.
    pub fn store_frozen_as(&mut self, dtype: DType) -> Result<usize> {
        match &self.base {
            Frozen::Dense(t) if self.trainable_weight.is_none() && t.dtype() != dtype => {
                let before = t.elem_count() * t.dtype().size_in_bytes();
                let stored = t.to_dtype(dtype)?.detach();
                let after = stored.elem_count() * dtype.size_in_bytes();
                self.base = Frozen::Dense(stored);
                Ok(before.saturating_sub(after))
            }
            _ => Ok(0),
        }
    }

    /// The device the frozen weight (and so the adapter) lives on.
    pub fn device(&self) -> candle_core::Device {
        match &self.base {
            Frozen::Dense(t) => t.device().clone(),
            Frozen::Packed(p) => p.shared().device(),
        }
    }

    /// The packed weight, when the frozen weight is kept as stored.
    pub fn packed_weight(&self) -> Option<&PackedWeight> {
        match &self.base {
            Frozen::Packed(p) => Some(p),
            Frozen::Dense(_) => None,
        }
    }

    /// The frozen weight for the fused CPU ops: f32 on the CPU, or packed.
    pub(crate) fn fused_weight(&self) -> Option<FrozenWeight> {
        match &self.base {
            Frozen::Dense(t) if t.dtype() == DType::F32 && t.device().is_cpu() => {
                Some(FrozenWeight::Dense(t.clone()))
            }
            Frozen::Dense(_) => None,
            Frozen::Packed(p) => Some(FrozenWeight::Packed(p.shared())),
        }
    }

    /// The frozen weight when the layer computes exactly `x·Wᵀ` and trains nothing of its own
    /// (no adapter in effect, no bias, nothing trainable): what a fused op that takes the
    /// layer's input apart may multiply by instead of calling [`forward_t`](Self::forward_t).
    pub(crate) fn frozen_only(&self) -> Option<FrozenWeight> {
        let adapter_in_effect = match &self.adapter {
            None => false,
            Some(_) if self.merged => false,
            Some(Adapter::Lora(l)) if self.disabled => l.initial.is_some(),
            Some(_) => true,
        };
        if adapter_in_effect
            || self.bias.is_some()
            || self.trainable_weight.is_some()
            || self.trainable_bias.is_some()
            || self.frozen_grad != FrozenGrad::Skip
        {
            return None;
        }
        self.fused_weight()
    }

    /// The dtype of the frozen weight's computations (f32 for a packed one).
    fn base_dtype(&self) -> DType {
        match &self.base {
            Frozen::Dense(t) => t.dtype(),
            Frozen::Packed(_) => DType::F32,
        }
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The adapter, if any.
    pub fn adapter(&self) -> Option<&Adapter> {
        self.adapter.as_ref()
    }

    /// Whether the adapter is merged into the weight.
    pub fn is_merged(&self) -> bool {
        self.merged
    }

    /// Whether the adapter is switched off (the forward is the pre-trained layer's).
    pub fn is_disabled(&self) -> bool {
        self.disabled
    }

    /// Chooses how the frozen weight's backward is computed (see [`FrozenGrad`]).
    pub fn set_frozen_grad(&mut self, mode: FrozenGrad) {
        self.frozen_grad = mode;
    }

    /// Attaches an adapter built from the current (pre-trained) weight. The rank is the
    /// config's, or for SVFit with an energy threshold the smallest that holds that energy.
    pub fn attach(&mut self, cfg: &AdapterConfig) -> Result<()> {
        self.attach_with(cfg, None, None)
    }

    /// [`attach`](Self::attach) with an explicit rank and, for LoLDU, a stored pivot order.
    pub fn attach_with(
        &mut self,
        cfg: &AdapterConfig,
        rank: Option<usize>,
        forced_perm: Option<&[usize]>,
    ) -> Result<()> {
        cfg.validate()?;
        let pretrained = self.pretrained_weight()?;
        let (m, n) = self.shape();
        let w64 = tensor_to_mat(&pretrained)?;
        let r = match (rank, cfg.energy_threshold) {
            (Some(r), _) => r,
            (None, Some(tau)) => {
                let sv =
                    decompose::singular_values(&w64).map_err(|e| PeftError::Decomposition {
                        layer: self.path.clone(),
                        reason: e.to_string(),
                    })?;
                decompose::rank_for_energy(&sv, tau)
            }
            (None, None) => cfg.rank,
        };
        if r == 0 || r > m.min(n) {
            return Err(PeftError::Rank {
                layer: self.path.clone(),
                rank: r,
                m,
                n,
            });
        }
        let seed = cfg.seed ^ path_hash(&self.path);
        let (adapter, base) = match cfg.method {
            Method::Lora => {
                let (a, base) = LoraAdapter::init(&self.path, &pretrained, &w64, r, cfg, seed)?;
                (Adapter::Lora(a), base)
            }
            Method::Svfit | Method::Loldu => {
                let (a, base) = DiagonalAdapter::init(
                    &self.path,
                    &pretrained,
                    &w64,
                    r,
                    cfg,
                    seed,
                    forced_perm,
                )?;
                (Adapter::Diagonal(a), base)
            }
        };
        // LoRA's default init leaves W as it is: a packed W stays packed.
        let unchanged = base.id() == pretrained.id() && matches!(self.base, Frozen::Packed(_));
        if !unchanged {
            self.base = Frozen::Dense(base);
        }
        self.adapter = Some(adapter);
        self.trainable_weight = None;
        self.trainable_bias = None;
        self.merged = false;
        self.disabled = false;
        self.dropout = cfg.dropout;
        Ok(())
    }

    /// Removes the adapter, restoring the pre-trained weight.
    pub fn detach(&mut self) -> Result<()> {
        if self.adapter.is_some() || self.trainable_weight.is_some() {
            self.base = Frozen::Dense(self.pretrained_weight()?);
        }
        self.trainable_weight = None;
        self.trainable_bias = None;
        self.adapter = None;
        self.merged = false;
        self.disabled = false;
        Ok(())
    }

    /// Makes the weight and bias themselves trainable (full fine-tuning, or a classification
    /// head). Removes any adapter. Returns the new variables, named like [`trainable_vars`].
    ///
    /// [`trainable_vars`]: Self::trainable_vars
    pub fn make_trainable(&mut self) -> Result<Vec<(String, Var)>> {
        self.detach()?;
        let var = Var::from_tensor(&self.base_weight()?.to_dtype(DType::F32)?)?;
        self.base = Frozen::Dense(var.as_tensor().clone());
        self.trainable_weight = Some(var);
        if let Some(b) = &self.bias {
            let bv = Var::from_tensor(&b.to_dtype(DType::F32)?)?;
            self.bias = Some(bv.as_tensor().clone());
            self.trainable_bias = Some(bv);
        }
        Ok(self.trainable_vars())
    }

    /// Makes the layer train the weight of an existing variable (a tied output projection
    /// training the token embedding's variable); its gradient reaches `var`.
    pub fn share_trainable(&mut self, var: &Var) -> Result<()> {
        self.detach()?;
        self.base = Frozen::Dense(var.as_tensor().clone());
        self.trainable_weight = Some(var.clone());
        Ok(())
    }

    /// Evaluation forward (no dropout).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_t(x, false)
    }

    /// Forward; `train` enables dropout on the adapter branch.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mode = if self.trainable_weight.is_some() {
            FrozenGrad::Plain
        } else {
            self.frozen_grad
        };
        // SVFit/LoLDU at high rank: one matmul with the weight formed from the diagonal.
        if let Some(Adapter::Diagonal(d)) = &self.adapter
            && !self.merged
            && !self.disabled
            && !(train && self.dropout > 0.0)
            && self.trainable_bias.is_none()
            && x.device().is_cpu()
            && x.dtype() == DType::F32
            && let Frozen::Dense(base) = &self.base
            && base.dtype() == DType::F32
            && d.merged_forward_pays(x.elem_count() / x.dims().last().copied().unwrap_or(1).max(1))
        {
            return d.merged_forward(x, base, self.bias.as_ref());
        }
        // LoRA (default init, no dropout in this pass): base product and branch in one op.
        if let Some(Adapter::Lora(lora)) = &self.adapter
            && !self.merged
            && !self.disabled
            && lora.initial.is_none()
            && !(train && self.dropout > 0.0)
            && self.trainable_bias.is_none()
            && mode == FrozenGrad::Skip
            && x.device().is_cpu()
            && x.dtype() == DType::F32
            && lora.a.dtype() == DType::F32
            && self.bias.as_ref().is_none_or(|b| b.dtype() == DType::F32)
            && let Some(w) = self.fused_weight()
        {
            let (a, b) = (lora.a.as_tensor(), lora.b.as_tensor());
            return Ok(lora_linear(x, &w, self.bias.as_ref(), a, b, lora.scale)?);
        }
        // A frozen bias is fused into the frozen matmul; a trainable one is added after.
        let fused_bias = self.trainable_bias.is_none() && self.bias.is_some();
        let mut y = match (&self.base, &self.bias, fused_bias) {
            (Frozen::Packed(p), Some(b), true) => packed_linear(x, p)?.broadcast_add(b)?,
            (Frozen::Packed(p), _, _) => packed_linear(x, p)?,
            (Frozen::Dense(w), Some(b), true) => frozen_linear_bias(x, w, b, mode)?,
            (Frozen::Dense(w), _, _) => frozen_linear(x, w, mode)?,
        };
        if let Some(adapter) = &self.adapter
            && !self.merged
        {
            let xf = x.to_dtype(DType::F32)?;
            let extra = if self.disabled {
                adapter.initial_branch(&xf)?
            } else {
                let xin = if train && self.dropout > 0.0 {
                    candle_nn::ops::dropout(&xf, self.dropout as f32)?
                } else {
                    xf
                };
                Some(adapter.branch(&xin)?)
            };
            if let Some(extra) = extra {
                let extra = extra.to_dtype(y.dtype())?;
                y = (y + extra)?;
            }
        }
        if let Some(b) = &self.bias
            && !fused_bias
        {
            y = y.broadcast_add(b)?;
        }
        Ok(y)
    }

    /// Folds the adapter into the weight: `W_eff = base + ΔW`, zero inference cost.
    pub fn merge(&mut self) -> Result<()> {
        if let Some(a) = &self.adapter
            && !self.merged
        {
            let delta = a.merge_delta()?.to_dtype(self.base_dtype())?;
            self.base = Frozen::Dense((self.base_weight()?.as_ref() + delta)?.detach());
            self.merged = true;
            self.disabled = false;
        }
        Ok(())
    }

    /// Undoes [`merge`](Self::merge) (exact up to float rounding).
    pub fn unmerge(&mut self) -> Result<()> {
        if let Some(a) = &self.adapter
            && self.merged
        {
            let delta = a.merge_delta()?.to_dtype(self.base_dtype())?;
            self.base = Frozen::Dense((self.base_weight()?.as_ref() - delta)?.detach());
            self.merged = false;
        }
        Ok(())
    }

    /// Switches the adapter off (the forward becomes the pre-trained layer's, `W`, not `W_res`)
    /// or back on. A merged adapter is unmerged first.
    pub fn set_disabled(&mut self, disabled: bool) -> Result<()> {
        if disabled {
            self.unmerge()?;
        }
        self.disabled = disabled && self.adapter.is_some();
        Ok(())
    }

    /// The pre-trained weight W (rebuilt from the residual and the starting factors).
    pub fn pretrained_weight(&self) -> Result<Tensor> {
        let mut w = self.unmerged_base()?;
        if let Some(a) = &self.adapter
            && let Some(init) = a.initial_delta()?
        {
            w = (w + init.to_dtype(self.base_dtype())?)?;
        }
        Ok(w.detach())
    }

    /// The weight of the unmerged forward (W, W − s·B₀·A₀ or W_res).
    fn unmerged_base(&self) -> Result<Tensor> {
        match &self.adapter {
            Some(a) if self.merged => {
                Ok((self.base_weight()?.as_ref()
                    - a.merge_delta()?.to_dtype(self.base_dtype())?)?)
            }
            _ => Ok(self.base_weight()?.into_owned()),
        }
    }

    /// The weight the layer computes with now (W_eff = base + ΔW).
    pub fn effective_weight(&self) -> Result<Tensor> {
        match &self.adapter {
            Some(a) if !self.merged && !self.disabled => Ok((self.base_weight()?.as_ref()
                + a.merge_delta()?.to_dtype(self.base_dtype())?)?
            .detach()),
            Some(_) if self.disabled => self.pretrained_weight(),
            _ => Ok(self.base_weight()?.detach()),
        }
    }

    /// The learned change relative to the pre-trained weight, `W_eff − W` (m×n, f32). Zero
    /// without an adapter.
    pub fn delta_weight(&self) -> Result<Tensor> {
        match &self.adapter {
            None => {
                let (m, n) = self.shape();
                Ok(Tensor::zeros((m, n), DType::F32, &self.device())?)
            }
            Some(a) => {
                let (b, a) = a.lora_form()?;
                Ok(b.matmul(&a)?.detach())
            }
        }
    }

    /// Trainable variables, named `<path>.<name>` (`lora_A`, `lora_B`, `z`, `scale`, `weight`).
    pub fn trainable_vars(&self) -> Vec<(String, Var)> {
        if let Some(w) = &self.trainable_weight {
            let mut v = vec![(format!("{}.weight", self.path), w.clone())];
            if let Some(b) = &self.trainable_bias {
                v.push((format!("{}.bias", self.path), b.clone()));
            }
            return v;
        }
        self.adapter
            .iter()
            .flat_map(|a| a.vars())
            .map(|(name, v)| (format!("{}.{name}", self.path), v))
            .collect()
    }

    /// Number of trainable values.
    pub fn trainable_count(&self) -> usize {
        self.trainable_vars()
            .iter()
            .map(|(_, v)| v.elem_count())
            .sum()
    }
}

/// FNV-1a of a module path: decorrelates the random initialisers of different layers.
fn path_hash(path: &str) -> u64 {
    path.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A model's linear layers, reachable by module path. Models implement it so adapters can be
/// attached, saved and loaded without knowing the model.
pub trait LinearLayers {
    /// Every linear layer, in a stable order.
    fn linears(&self) -> Vec<&AdaptedLinear>;
    /// Every linear layer, mutably, in the same order.
    fn linears_mut(&mut self) -> Vec<&mut AdaptedLinear>;
}

/// Stores every frozen dense weight but the output head (often tied to the embedding, which
/// would then be kept twice) in `dtype`: the GPU's mixed-precision recipe, bf16 base under f32
/// adapters. Returns the bytes saved.
pub fn store_frozen_weights(
    model: &mut (impl LinearLayers + ?Sized),
    dtype: DType,
) -> Result<usize> {
    let mut saved = 0;
    for l in model.linears_mut() {
        if l.path() != "lm_head" {
            saved += l.store_frozen_as(dtype)?;
        }
    }
    Ok(saved)
}

/// What attaching an adapter did.
#[derive(Debug, Clone, Default)]
pub struct AttachReport {
    /// (path, out, in, rank, trainable) of each adapted layer.
    pub layers: Vec<(String, usize, usize, usize, usize)>,
}

impl AttachReport {
    /// Total trainable adapter values.
    pub fn trainable(&self) -> usize {
        self.layers.iter().map(|l| l.4).sum()
    }
}

/// Attaches `cfg`'s adapter to every layer its targets match. Fails, leaving the model as it
/// was, when the targets match nothing or any layer cannot take the adapter.
pub fn attach_adapters(
    model: &mut (impl LinearLayers + ?Sized),
    cfg: &AdapterConfig,
) -> Result<AttachReport> {
    cfg.validate()?;
    let matcher = cfg.targets.matcher()?;
    let mut built = Vec::new();
    for layer in model.linears() {
        if matcher.matches(layer.path()) {
            let mut copy = layer.clone();
            copy.attach(cfg)?;
            built.push(copy);
        }
    }
    if built.is_empty() {
        let examples: Vec<String> = model
            .linears()
            .iter()
            .take(6)
            .map(|l| l.path().to_string())
            .collect();
        return Err(PeftError::NoTarget {
            targets: cfg.targets.describe(),
            examples: examples.join(", "),
        });
    }
    let mut report = AttachReport::default();
    let mut built: std::collections::HashMap<String, AdaptedLinear> = built
        .into_iter()
        .map(|l| (l.path().to_string(), l))
        .collect();
    for layer in model.linears_mut() {
        if let Some(b) = built.remove(layer.path()) {
            let (m, n) = b.shape();
            let rank = b.adapter().map_or(0, Adapter::rank);
            report
                .layers
                .push((b.path().to_string(), m, n, rank, b.trainable_count()));
            *layer = b;
        }
    }
    Ok(report)
}

/// All trainable variables of a model's linear layers, by name.
pub fn trainable_vars(model: &(impl LinearLayers + ?Sized)) -> Vec<(String, Var)> {
    model
        .linears()
        .iter()
        .flat_map(|l| l.trainable_vars())
        .collect()
}

/// A plain ordered set of linear layers: enough to hold adapters without a model (tests,
/// benchmarks, checkpoints).
#[derive(Debug, Clone, Default)]
pub struct LayerSet {
    /// The layers, in order.
    pub layers: Vec<AdaptedLinear>,
}

impl LinearLayers for LayerSet {
    fn linears(&self) -> Vec<&AdaptedLinear> {
        self.layers.iter().collect()
    }
    fn linears_mut(&mut self) -> Vec<&mut AdaptedLinear> {
        self.layers.iter_mut().collect()
    }
}

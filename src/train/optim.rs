//! AdamW with decoupled weight decay, whose state can be saved and restored (so long runs
//! checkpoint and resume exactly). The update is candle-nn's `AdamW`, term for term.

use std::collections::HashMap;

use candle_core::{Tensor, Var, backprop::GradStore};

/// AdamW's hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWParams {
    /// Learning rate.
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator guard.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for AdamWParams {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

struct Slot {
    var: Var,
    m: Var,
    v: Var,
}

/// AdamW over a group of variables.
pub struct AdamW {
    slots: Vec<Slot>,
    step: usize,
    /// Hyper-parameters (the learning rate changes every step with the schedule).
    pub params: AdamWParams,
}

impl AdamW {
    /// An optimiser for `vars`.
    pub fn new(vars: Vec<Var>, params: AdamWParams) -> candle_core::Result<Self> {
        let slots = vars
            .into_iter()
            .filter(|v| v.dtype().is_float())
            .map(|var| {
                let m = Var::zeros(var.shape(), var.dtype(), var.device())?;
                let v = Var::zeros(var.shape(), var.dtype(), var.device())?;
                Ok(Slot { var, m, v })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            slots,
            step: 0,
            params,
        })
    }

    /// Steps taken.
    pub fn steps(&self) -> usize {
        self.step
    }

    /// One update from `grads` (variables without a gradient are left alone).
    pub fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        self.step += 1;
        let p = self.params;
        let (b1, b2) = (p.beta1, p.beta2);
        let scale_m = 1.0 / (1.0 - b1.powi(self.step as i32));
        let scale_v = 1.0 / (1.0 - b2.powi(self.step as i32));
        for s in &self.slots {
            let theta = s.var.as_tensor();
            let Some(g) = grads.get(theta) else { continue };
            let m = ((s.m.as_tensor() * b1)? + (g * (1.0 - b1))?)?;
            let v = ((s.v.as_tensor() * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let m_hat = (&m * scale_m)?;
            let v_hat = (&v * scale_v)?;
            let next = (theta * (1.0 - p.lr * p.weight_decay))?;
            let adjusted = (m_hat / (v_hat.sqrt()? + p.eps)?)?;
            s.var.set(&(next - (adjusted * p.lr)?)?)?;
            s.m.set(&m)?;
            s.v.set(&v)?;
        }
        Ok(())
    }

    /// The state as named tensors (`<prefix>.<i>.m`, `.v`, `.var`) plus the step count.
    pub fn state(&self, prefix: &str) -> (HashMap<String, Tensor>, usize) {
        let mut t = HashMap::new();
        for (i, s) in self.slots.iter().enumerate() {
            t.insert(format!("{prefix}.{i}.var"), s.var.as_tensor().detach());
            t.insert(format!("{prefix}.{i}.m"), s.m.as_tensor().detach());
            t.insert(format!("{prefix}.{i}.v"), s.v.as_tensor().detach());
        }
        (t, self.step)
    }

    /// Restores [`state`](Self::state): variable values, moments and step count. Every shape
    /// must match.
    pub fn load_state(
        &mut self,
        prefix: &str,
        tensors: &HashMap<String, Tensor>,
        step: usize,
    ) -> anyhow::Result<()> {
        for (i, s) in self.slots.iter().enumerate() {
            for (name, target) in [("var", &s.var), ("m", &s.m), ("v", &s.v)] {
                let key = format!("{prefix}.{i}.{name}");
                let t = tensors
                    .get(&key)
                    .ok_or_else(|| anyhow::anyhow!("the checkpoint lacks `{key}`"))?;
                anyhow::ensure!(
                    t.dims() == target.dims(),
                    "`{key}` has shape {:?}, the run has {:?}",
                    t.dims(),
                    target.dims()
                );
                target.set(&t.to_dtype(target.dtype())?.to_device(target.device())?)?;
            }
        }
        self.step = step;
        Ok(())
    }
}

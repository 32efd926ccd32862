//! The training loop: AdamW with weight decay, warm-up then linear or cosine decay, gradient
//! clipping and accumulation, periodic evaluation, seeded; results in the run store.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device, Tensor, Var};

use super::batches::{EncodedSplit, Sampler};
use super::config::{TrainConfig, TrainMode};
use super::events::{Control, Controller, Event, Phase, RunFailure};
use super::limits;
use super::optim::{AdamW, AdamWParams};
use super::store::{EvalPoint, MetricLine, RunDir, RunStatus, RunStore, RunSummary};
use crate::data::{self, DataSource, Dataset};
use crate::memory;
use crate::models::{self, Classifier, InputKind, LoadedModel, load_model};
use crate::peft::linear::{attach_adapters, trainable_vars};
use crate::peft::{Method, load_adapter_with, save_adapter_with};

/// A short name of the data source.
pub fn dataset_name(source: &DataSource) -> String {
    match source {
        DataSource::Builtin { name } => name.clone(),
        DataSource::Idx { images, .. } => images.display().to_string(),
        DataSource::ImageFolder { path, .. } | DataSource::Text { path, .. } => {
            path.display().to_string()
        }
    }
}

/// Loads the data, resizing a folder of images to the model's input when no size is given.
fn load_data(cfg: &TrainConfig, input: Option<InputKind>) -> anyhow::Result<Dataset> {
    let mut dc = cfg.data.clone();
    if let (
        DataSource::ImageFolder {
            size, grayscale, ..
        },
        Some(InputKind::Image {
            channels,
            height,
            width,
        }),
    ) = (&mut dc.source, input)
        && size.is_none()
    {
        *size = Some([height as u32, width as u32]);
        *grayscale = channels == 1;
    }
    Ok(data::load(&dc)?)
}

/// The model, the data and what trains, ready for the loop.
pub struct Prepared {
    /// The model with its adapter / trainable parts.
    pub model: Box<dyn Classifier>,
    /// The data.
    pub data: Dataset,
    /// Training split, encoded.
    pub train: EncodedSplit,
    /// Eval split, encoded.
    pub eval: EncodedSplit,
    /// Optimiser groups: (vars, weight decay, learning-rate multiplier).
    pub groups: Vec<(Vec<Var>, f64, f64)>,
    /// Trainable values.
    pub trainable: usize,
    /// All values (model + adapter).
    pub total: usize,
    /// What was initialised rather than loaded.
    pub initialised: Vec<String>,
}

/// Loads data and model and makes the configured parts trainable.
pub fn prepare(cfg: &TrainConfig) -> anyhow::Result<Prepared> {
    cfg.validate().map_err(|e| anyhow::anyhow!(e))?;
    let mut data = load_data(cfg, None)?;
    let dataset = cfg.data.source.describe();
    if data.num_classes() < 2 {
        anyhow::bail!(
            "{dataset}: the dataset has {} class{} ({}); a classifier needs at least 2",
            data.num_classes(),
            if data.num_classes() == 1 { "" } else { "es" },
            data.classes.join(", ")
        );
    }
    limits::check_batch(cfg, data.train.len(), &dataset).map_err(anyhow::Error::msg)?;
    let LoadedModel {
        mut model,
        tokenizer,
        initialised,
    } = load_model(
        &cfg.model.source,
        data.num_classes(),
        cfg.model.new_head,
        cfg.optim.seed,
    )?;
    if matches!(cfg.data.source, DataSource::ImageFolder { size: None, .. }) {
        data = load_data(cfg, Some(model.input()))?;
    }
    let base_total = models::parameter_count(model.as_ref());
    let head_lr = cfg.optim.head_lr.unwrap_or(cfg.optim.lr) / cfg.optim.lr;
    let wd = cfg.optim.weight_decay;
    let mut groups = Vec::new();
    let mut adapter_trainable = 0;
    match cfg.mode {
        TrainMode::Adapter => {
            let report = attach_adapters(model.as_mut(), &cfg.adapter)?;
            adapter_trainable = report.trainable();
            let decay = match cfg.adapter.method {
                Method::Lora => wd,
                Method::Svfit | Method::Loldu => cfg.optim.diagonal_weight_decay,
            };
            let vars: Vec<Var> = trainable_vars(model.as_ref())
                .into_iter()
                .map(|(_, v)| v)
                .collect();
            groups.push((vars, decay, 1.0));
            let head = models::train_head(model.as_mut())?;
            groups.push((head.into_iter().map(|(_, v)| v).collect(), wd, head_lr));
        }
        TrainMode::Head => {
            let head = models::train_head(model.as_mut())?;
            groups.push((head.into_iter().map(|(_, v)| v).collect(), wd, head_lr));
        }
        TrainMode::Full => {
            let all = models::train_everything(model.as_mut())?;
            // As Hugging Face's Trainer: no decay on biases and layer norms.
            let (no_decay, decay): (Vec<_>, Vec<_>) = all.into_iter().partition(|(n, v)| {
                n.ends_with(".bias")
                    || n.contains("LayerNorm")
                    || n.contains("layernorm")
                    || v.rank() == 1
            });
            groups.push((decay.into_iter().map(|(_, v)| v).collect(), wd, 1.0));
            groups.push((no_decay.into_iter().map(|(_, v)| v).collect(), 0.0, 1.0));
        }
    }
    let trainable: usize = groups
        .iter()
        .flat_map(|g| g.0.iter())
        .map(|v| v.elem_count())
        .sum();
    if let Some(available) = memory::available_bytes() {
        limits::check_memory(
            cfg,
            &model.config_json(),
            model.input(),
            base_total + adapter_trainable,
            data.eval.len(),
            available,
        )
        .map_err(anyhow::Error::msg)?;
    }
    let input = model.input();
    let train = EncodedSplit::new(&data.train, input, tokenizer.as_ref(), cfg.model.max_length)?;
    let eval = EncodedSplit::new(&data.eval, input, tokenizer.as_ref(), cfg.model.max_length)?;
    Ok(Prepared {
        model,
        data,
        train,
        eval,
        groups,
        trainable,
        total: base_total + adapter_trainable,
        initialised,
    })
}

/// Mean loss and accuracy of `model` on `split`.
pub fn evaluate(
    model: &dyn Classifier,
    split: &EncodedSplit,
    batch_size: usize,
    step: usize,
) -> anyhow::Result<EvalPoint> {
    let dev = Device::Cpu;
    let (mut loss_sum, mut correct) = (0.0f64, 0usize);
    let idx: Vec<usize> = (0..split.len()).collect();
    for chunk in idx.chunks(batch_size.max(1)) {
        let (batch, labels) = split.batch(chunk, &dev)?;
        let logits = model.forward_t(&batch, false)?.detach();
        let loss = candle_nn::loss::cross_entropy(&logits, &labels)?.to_scalar::<f32>()? as f64;
        loss_sum += loss * chunk.len() as f64;
        let pred = logits.argmax(1)?.to_vec1::<u32>()?;
        let gold = labels.to_vec1::<u32>()?;
        correct += pred.iter().zip(&gold).filter(|(a, b)| a == b).count();
    }
    let n = split.len().max(1) as f64;
    Ok(EvalPoint {
        step,
        loss: loss_sum / n,
        accuracy: correct as f64 / n,
    })
}

/// Where a run starts: fresh, or from its checkpoint.
struct Start {
    /// Steps already done.
    step: usize,
    /// Training losses so far.
    losses: Vec<f64>,
    /// Evaluations so far.
    evals: Vec<EvalPoint>,
    /// Seconds spent in training steps so far.
    train_secs: f64,
}

struct Loop<'a, 'r, 'e> {
    cfg: &'a TrainConfig,
    p: &'a Prepared,
    run: &'r mut RunDir,
    emit: &'e mut dyn FnMut(Event),
    opts: Vec<(AdamW, f64)>,
    total_steps: usize,
    losses: Vec<f64>,
    evals: Vec<EvalPoint>,
    train_secs: f64,
    steps_done: usize,
}

/// The optimisers of a prepared run, one per parameter group.
fn optimisers(cfg: &TrainConfig, p: &Prepared) -> anyhow::Result<Vec<(AdamW, f64)>> {
    let mut opts = Vec::new();
    for (vars, wd, scale) in &p.groups {
        let params = AdamWParams {
            lr: cfg.optim.lr * scale,
            weight_decay: *wd,
            ..Default::default()
        };
        opts.push((AdamW::new(vars.clone(), params)?, *scale));
    }
    Ok(opts)
}

/// Name of the checkpoint folder inside a run.
pub const CHECKPOINT_DIR: &str = "checkpoint";

impl Loop<'_, '_, '_> {
    fn eval(&mut self, step: usize) -> anyhow::Result<()> {
        (self.emit)(Event::Phase(Phase::Evaluating));
        let e = evaluate(
            self.p.model.as_ref(),
            &self.p.eval,
            self.cfg.optim.eval_batch_size,
            step,
        )?;
        self.run.append(&MetricLine::Eval(e))?;
        self.evals.push(e);
        (self.emit)(Event::Eval(e));
        (self.emit)(Event::Phase(Phase::Training));
        Ok(())
    }

    /// Writes the trainable values, the optimiser state and the step, atomically (a new
    /// folder, then renames).
    fn checkpoint(&self, step: usize) -> anyhow::Result<()> {
        let dir = self.run.path.join(CHECKPOINT_DIR);
        let tmp = self.run.path.join(format!("{CHECKPOINT_DIR}.tmp"));
        let old = self.run.path.join(format!("{CHECKPOINT_DIR}.old"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut tensors = HashMap::new();
        let mut opt_steps = Vec::new();
        for (k, (opt, _)) in self.opts.iter().enumerate() {
            let (t, n) = opt.state(&format!("group{k}"));
            tensors.extend(t);
            opt_steps.push(n);
        }
        candle_core::safetensors::save(&tensors, tmp.join("state.safetensors"))?;
        let meta = serde_json::json!({
            "step": step,
            "optimizer_steps": opt_steps,
            "train_secs": self.train_secs,
        });
        std::fs::write(tmp.join("state.json"), serde_json::to_string_pretty(&meta)?)?;
        let _ = std::fs::remove_dir_all(&old);
        if dir.exists() {
            std::fs::rename(&dir, &old)?;
        }
        std::fs::rename(&tmp, &dir)?;
        let _ = std::fs::remove_dir_all(&old);
        Ok(())
    }

    fn run(&mut self, ctl: &mut dyn Controller, start: usize) -> anyhow::Result<RunStatus> {
        let o = &self.cfg.optim;
        let dev = Device::Cpu;
        let all_vars: Vec<Var> = self
            .p
            .groups
            .iter()
            .flat_map(|g| g.0.iter().cloned())
            .collect();
        let mut sampler = Sampler::new(self.p.train.len(), o.seed);
        // A resumed run replays the batch order up to where it stopped.
        for _ in 0..start * o.grad_accum {
            sampler.next_batch(o.batch_size);
        }
        (self.emit)(Event::Phase(Phase::Training));
        for step in start + 1..=self.total_steps {
            if ctl.check() == Control::Stop {
                return Ok(RunStatus::Stopped);
            }
            let t0 = Instant::now();
            let mut grads: Option<candle_core::backprop::GradStore> = None;
            let mut loss_sum = 0.0;
            for _ in 0..o.grad_accum {
                let idx = sampler.next_batch(o.batch_size);
                let (batch, labels) = self.p.train.batch(&idx, &dev)?;
                let logits = self.p.model.forward_t(&batch, true)?;
                let loss = candle_nn::loss::cross_entropy(&logits, &labels)?;
                let value = loss.to_scalar::<f32>()? as f64;
                if !value.is_finite() {
                    anyhow::bail!(
                        "the loss became {value} at step {step}: training diverged (lower optim.lr, or set optim.max_grad_norm)"
                    );
                }
                loss_sum += value;
                let loss = if o.grad_accum > 1 {
                    (loss / o.grad_accum as f64)?
                } else {
                    loss
                };
                let g = loss.backward()?;
                grads = Some(match grads {
                    None => g,
                    Some(mut acc) => {
                        for v in &all_vars {
                            if let Some(gv) = g.get(v) {
                                let sum = match acc.get(v) {
                                    Some(a) => (a + gv)?,
                                    None => gv.clone(),
                                };
                                acc.insert(v, sum);
                            }
                        }
                        acc
                    }
                });
            }
            let Some(mut grads) = grads else { continue };
            if let Some(max) = o.max_grad_norm {
                let mut sq = 0.0f64;
                for v in &all_vars {
                    if let Some(g) = grads.get(v) {
                        sq += g
                            .sqr()?
                            .sum_all()?
                            .to_dtype(DType::F64)?
                            .to_scalar::<f64>()?;
                    }
                }
                let norm = sq.sqrt();
                if !norm.is_finite() {
                    anyhow::bail!(
                        "the gradient became {norm} at step {step}: training diverged (lower optim.lr)"
                    );
                }
                if norm > max {
                    let scale = max / (norm + 1e-6);
                    for v in &all_vars {
                        if let Some(g) = grads.remove(v) {
                            grads.insert(v, (g * scale)?);
                        }
                    }
                }
            }
            let factor = o.schedule.factor(step, self.total_steps, o.warmup_steps);
            for (opt, scale) in &mut self.opts {
                opt.params.lr = o.lr * *scale * factor;
                opt.step(&grads)?;
            }
            drop(grads);
            let secs = t0.elapsed().as_secs_f64();
            self.train_secs += secs;
            self.steps_done = step;
            let loss = loss_sum / o.grad_accum as f64;
            self.losses.push(loss);
            let lr = o.lr * factor;
            self.run.append(&MetricLine::Step {
                step,
                loss,
                lr,
                secs,
            })?;
            (self.emit)(Event::Step {
                step,
                total_steps: self.total_steps,
                loss,
                lr,
                secs_per_step: self.train_secs / (step - start) as f64,
            });
            if step % o.eval_every == 0 || step == self.total_steps {
                self.eval(step)?;
            }
            if let Some(every) = o.checkpoint_every
                && step % every == 0
                && step < self.total_steps
            {
                self.checkpoint(step)?;
            }
        }
        Ok(RunStatus::Finished)
    }
}

/// The `modules_to_save` of a model: its head's parameters.
fn head_tensors(model: &dyn Classifier) -> Vec<(String, Vec<(String, Tensor)>)> {
    model
        .head()
        .into_iter()
        .map(|l| {
            let mut params = vec![("weight".to_string(), l.base_weight().detach())];
            if let Some(b) = l.bias() {
                params.push(("bias".to_string(), b.detach()));
            }
            (l.path().to_string(), params)
        })
        .collect()
}

/// Saves what a run trained: `adapter/` (adapter + head), `model/` (full fine-tuning, a
/// complete Hugging Face folder) or `head/` (head only).
pub fn save_trained(
    cfg: &TrainConfig,
    model: &dyn Classifier,
    run_path: &Path,
) -> anyhow::Result<()> {
    match cfg.mode {
        TrainMode::Adapter => {
            save_adapter_with(
                model,
                &cfg.adapter,
                &run_path.join("adapter"),
                &head_tensors(model),
            )?;
        }
        TrainMode::Full => save_model(model, &run_path.join("model"))?,
        TrainMode::Head => {
            let dir = run_path.join("head");
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let mut t = HashMap::new();
            for (module, params) in head_tensors(model) {
                for (n, v) in params {
                    t.insert(format!("{module}.{n}"), v);
                }
            }
            let tmp = dir.join("head.safetensors.tmp");
            candle_core::safetensors::save(&t, &tmp)?;
            std::fs::rename(&tmp, dir.join("head.safetensors"))?;
        }
    }
    Ok(())
}

/// Writes a whole model as a Hugging Face folder: `config.json` and `model.safetensors`.
pub fn save_model(model: &dyn Classifier, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tensors: HashMap<String, Tensor> = models::named_tensors(model)?.into_iter().collect();
    let tmp = dir.join("model.safetensors.tmp");
    candle_core::safetensors::save(&tensors, &tmp)?;
    std::fs::rename(&tmp, dir.join("model.safetensors"))?;
    crate::peft::checkpoint::write_atomic(
        &dir.join("config.json"),
        serde_json::to_string_pretty(&model.config_json())?.as_bytes(),
    )?;
    Ok(())
}

/// Rebuilds a finished run's model from its folder (config, base model, saved adapter or
/// weights) and evaluates it on its eval split.
pub fn reload_and_evaluate(run_path: &Path) -> anyhow::Result<EvalPoint> {
    let cfg = TrainConfig::from_preset(&run_path.join("config.toml"), &[])?;
    let mut p = prepare_frozen(&cfg, run_path)?;
    let e = evaluate(p.model.as_mut(), &p.eval, cfg.optim.eval_batch_size, 0)?;
    Ok(e)
}

/// The run's trained model (no trainable variables), with its data encoded.
fn prepare_frozen(cfg: &TrainConfig, run_path: &Path) -> anyhow::Result<Prepared> {
    let data = load_data(cfg, None)?;
    let (source, fresh) = match cfg.mode {
        TrainMode::Full => (
            models::ModelSource::Folder {
                path: run_path.join("model"),
            },
            false,
        ),
        _ => (cfg.model.source.clone(), true),
    };
    let LoadedModel {
        mut model,
        tokenizer,
        ..
    } = load_model(&source, data.num_classes(), fresh, cfg.optim.seed)?;
    let head_file = match cfg.mode {
        TrainMode::Adapter => {
            let (_, extra) = load_adapter_with(model.as_mut(), &run_path.join("adapter"))?;
            Some(extra)
        }
        TrainMode::Head => Some(candle_core::safetensors::load(
            run_path.join("head").join("head.safetensors"),
            &Device::Cpu,
        )?),
        TrainMode::Full => None,
    };
    if let Some(extra) = head_file {
        for l in model.head_mut() {
            let w = extra
                .get(&format!("{}.weight", l.path()))
                .ok_or_else(|| anyhow::anyhow!("the saved run lacks `{}.weight`", l.path()))?;
            let b = extra.get(&format!("{}.bias", l.path())).cloned();
            *l = crate::peft::AdaptedLinear::new(l.path().to_string(), w.clone(), b);
        }
    }
    let input = model.input();
    let train = EncodedSplit::new(&data.train, input, tokenizer.as_ref(), cfg.model.max_length)?;
    let eval = EncodedSplit::new(&data.eval, input, tokenizer.as_ref(), cfg.model.max_length)?;
    Ok(Prepared {
        total: models::parameter_count(model.as_ref()),
        model,
        data,
        train,
        eval,
        groups: Vec::new(),
        trainable: 0,
        initialised: Vec::new(),
    })
}

/// Runs one training run to the end (or until `ctl` says stop), reporting through `emit`
/// and recording it in `store`. A failure after the run folder exists is recorded there
/// (status failed, with the reason) and returned with that record.
pub fn train(
    cfg: &TrainConfig,
    store: &RunStore,
    ctl: &mut dyn Controller,
    emit: &mut dyn FnMut(Event),
) -> Result<RunSummary, RunFailure> {
    let started = Instant::now();
    let started_at = chrono::Local::now().to_rfc3339();
    memory::reset_peak_rss();
    emit(Event::Phase(Phase::Loading));
    let p = prepare(cfg)?;
    if !p.initialised.is_empty() {
        let head: Vec<&str> = p.initialised.iter().map(String::as_str).collect();
        emit(Event::Log(format!(
            "initialised (not in the checkpoint): {}",
            head.join(", ")
        )));
    }
    let total_steps = limits::total_steps(cfg, p.train.len()).map_err(anyhow::Error::msg)?;
    let run = store.create(cfg)?;
    let summary = RunSummary {
        id: run.id.clone(),
        name: cfg.label(),
        method: cfg.method_name(),
        rank: (cfg.mode == TrainMode::Adapter).then_some(cfg.adapter.rank),
        model: cfg.model.source.display_name(),
        dataset: dataset_name(&cfg.data.source),
        trainable: p.trainable,
        total: p.total,
        steps_done: 0,
        total_steps,
        final_train_loss: None,
        final_eval: None,
        best_eval: None,
        wall_secs: 0.0,
        secs_per_step: 0.0,
        peak_rss_mib: 0.0,
        status: RunStatus::Running,
        error: None,
        started_at,
    };
    let opts = optimisers(cfg, &p)?;
    let start = Start {
        step: 0,
        losses: Vec::new(),
        evals: Vec::new(),
        train_secs: 0.0,
    };
    drive(cfg, &p, run, summary, opts, start, started, ctl, emit)
}

/// Continues the run in `run_path` from its last checkpoint (`optim.checkpoint_every`): the
/// same config, the trainable values and optimiser state as saved, the batch order replayed,
/// metrics after the checkpoint discarded. The result equals an uninterrupted run.
pub fn resume(
    run_path: &Path,
    ctl: &mut dyn Controller,
    emit: &mut dyn FnMut(Event),
) -> Result<RunSummary, RunFailure> {
    let started = Instant::now();
    memory::reset_peak_rss();
    emit(Event::Phase(Phase::Loading));
    let cfg = TrainConfig::from_preset(&run_path.join("config.toml"), &[])
        .map_err(anyhow::Error::from)?;
    let ckpt = run_path.join(CHECKPOINT_DIR);
    let meta_path = ckpt.join("state.json");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&meta_path).with_context(|| {
            format!(
                "{}: this run has no checkpoint to resume from (set optim.checkpoint_every)",
                meta_path.display()
            )
        })?)
        .with_context(|| format!("{}: not valid JSON", meta_path.display()))?;
    let step = meta["step"]
        .as_u64()
        .context("state.json: `step` is missing")? as usize;
    let opt_steps: Vec<usize> = serde_json::from_value(meta["optimizer_steps"].clone())
        .context("state.json: `optimizer_steps` is missing")?;
    let summary_path = run_path.join("summary.json");
    let mut summary: RunSummary = serde_json::from_str(
        &std::fs::read_to_string(&summary_path)
            .with_context(|| format!("reading {}", summary_path.display()))?,
    )
    .with_context(|| format!("{}: not a run summary", summary_path.display()))?;
    let p = prepare(&cfg)?;
    let mut opts = optimisers(&cfg, &p)?;
    let tensors = candle_core::safetensors::load(ckpt.join("state.safetensors"), &Device::Cpu)
        .with_context(|| format!("reading {}", ckpt.join("state.safetensors").display()))?;
    if opt_steps.len() != opts.len() {
        return Err(anyhow::anyhow!(
            "the checkpoint has {} parameter groups, the run {}",
            opt_steps.len(),
            opts.len()
        )
        .into());
    }
    for (k, (opt, _)) in opts.iter_mut().enumerate() {
        opt.load_state(&format!("group{k}"), &tensors, opt_steps[k])?;
    }
    let (run, kept) = RunDir::reopen(run_path, step)?;
    let mut start = Start {
        step,
        losses: Vec::new(),
        evals: Vec::new(),
        train_secs: meta["train_secs"].as_f64().unwrap_or(0.0),
    };
    for m in kept {
        match m {
            MetricLine::Step { loss, .. } => start.losses.push(loss),
            MetricLine::Eval(e) => start.evals.push(e),
        }
    }
    summary.status = RunStatus::Running;
    summary.error = None;
    emit(Event::Log(format!(
        "resuming {} from step {step}",
        summary.id
    )));
    drive(&cfg, &p, run, summary, opts, start, started, ctl, emit)
}

/// The shared body of [`train`] and [`resume`]: announce, loop, save, record.
#[allow(clippy::too_many_arguments)]
fn drive(
    cfg: &TrainConfig,
    p: &Prepared,
    mut run: RunDir,
    mut summary: RunSummary,
    opts: Vec<(AdamW, f64)>,
    start: Start,
    started: Instant,
    ctl: &mut dyn Controller,
    emit: &mut dyn FnMut(Event),
) -> Result<RunSummary, RunFailure> {
    run.write_summary(&summary)?;
    emit(Event::RunStarted {
        run_id: run.id.clone(),
        name: summary.name.clone(),
        method: summary.method.clone(),
        trainable: p.trainable,
        total: p.total,
        total_steps: summary.total_steps,
        model: p.model.summary(),
    });
    let run_path = run.path.clone();
    let mut lp = Loop {
        cfg,
        p,
        run: &mut run,
        emit,
        opts,
        total_steps: summary.total_steps,
        losses: start.losses,
        evals: start.evals,
        train_secs: start.train_secs,
        steps_done: start.step,
    };
    let outcome = lp.run(ctl, start.step).and_then(|status| {
        if status == RunStatus::Stopped
            && lp.steps_done > 0
            && lp.evals.last().map(|e| e.step) != Some(lp.steps_done)
        {
            lp.eval(lp.steps_done)?;
        }
        (lp.emit)(Event::Phase(Phase::Saving));
        save_trained(cfg, p.model.as_ref(), &run_path)?;
        Ok(status)
    });
    let Loop {
        losses,
        evals,
        train_secs,
        steps_done,
        emit,
        ..
    } = lp;
    let tail = &losses[losses.len().saturating_sub(10)..];
    summary.final_train_loss =
        (!tail.is_empty()).then(|| tail.iter().sum::<f64>() / tail.len() as f64);
    summary.final_eval = evals.last().copied();
    summary.best_eval = evals
        .iter()
        .copied()
        .max_by(|a, b| a.accuracy.total_cmp(&b.accuracy).then(b.step.cmp(&a.step)));
    summary.steps_done = steps_done;
    summary.secs_per_step = if steps_done > 0 {
        train_secs / steps_done as f64
    } else {
        0.0
    };
    summary.wall_secs += started.elapsed().as_secs_f64();
    summary.peak_rss_mib = summary
        .peak_rss_mib
        .max(memory::peak_rss_bytes().map(memory::mib).unwrap_or(0.0));
    match outcome {
        Ok(status) => {
            summary.status = status;
            run.write_summary(&summary)?;
            Ok(summary)
        }
        Err(e) => {
            summary.status = RunStatus::Failed;
            summary.error = Some(format!("{e:#}"));
            // The failure is what the caller needs; a second error writing the summary is
            // reported beside it.
            if let Err(w) = run.write_summary(&summary) {
                emit(Event::Log(format!("could not record the failure: {w:#}")));
            }
            Err(RunFailure {
                error: e,
                summary: Some(Box::new(summary)),
            })
        }
    }
}

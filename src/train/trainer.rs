//! The training loop: AdamW with weight decay, warm-up then linear or cosine decay, gradient
//! clipping and accumulation, periodic evaluation, seeded; results in the run store, with a
//! [`checkpoint`] every `optim.checkpoint_every` steps and on a stop, from which
//! [`resume`](super::resume::resume) continues a stopped or killed run exactly.

use std::time::Instant;

use candle_core::{DType, Device, Var};

use super::batches::{EncodedSplit, Sampler};
use super::causal_lm;
use super::checkpoint::{self, CheckpointMeta};
use super::config::{TrainConfig, TrainMode};
use super::events::{Control, Controller, Event, Phase, RunFailure};
use super::limits;
use super::optim::{AdamW, AdamWParams, global_grad_norm};
use super::store::{EvalPoint, MetricLine, RunDir, RunStatus, RunStore, RunSummary};
use super::work::{Classification, Work};
use crate::data::{self, DataSource, Dataset};
use crate::fsio;
use crate::memory;
use crate::models::{self, Classifier, InputKind, LoadedModel, load_model};
use crate::peft::Method;
use crate::peft::linear::{attach_adapters, trainable_vars};

/// A short name of the data source.
pub fn dataset_name(source: &DataSource) -> String {
    match source {
        DataSource::Builtin { name } => name.clone(),
        DataSource::Idx { images, .. } => images.display().to_string(),
        DataSource::ImageFolder { path, .. }
        | DataSource::Text { path, .. }
        | DataSource::Instruct { path, .. } => path.display().to_string(),
    }
}

/// Loads the data, resizing a folder of images to the model's input when no size is given.
pub(super) fn load_data(cfg: &TrainConfig, input: Option<InputKind>) -> anyhow::Result<Dataset> {
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
    /// The model and its data.
    pub work: Work,
    /// Optimiser groups: (vars, weight decay, learning-rate multiplier).
    pub groups: Vec<(Vec<Var>, f64, f64)>,
    /// Trainable values.
    pub trainable: usize,
    /// All values (model + adapter).
    pub total: usize,
    /// What was initialised rather than loaded.
    pub initialised: Vec<String>,
    /// What the run's log should say about the data (truncation, dropped examples).
    pub notes: Vec<String>,
}

/// Loads data and model and makes the configured parts trainable.
pub fn prepare(cfg: &TrainConfig) -> anyhow::Result<Prepared> {
    cfg.validate().map_err(|e| anyhow::anyhow!(e))?;
    let device = cfg.device.resolve()?;
    if causal_lm::is_language_model(&cfg.model.source)? {
        return causal_lm::prepare(cfg, &device);
    }
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
        &device,
    )?;
    if matches!(cfg.data.source, DataSource::ImageFolder { size: None, .. }) {
        data = load_data(cfg, Some(model.input()))?;
    }
    let base_total = models::parameter_count(model.as_ref());
    let head_lr = cfg.optim.head_lr.unwrap_or(cfg.optim.lr) / cfg.optim.lr;
    let wd = cfg.optim.weight_decay;
    let mut groups = Vec::new();
    let mut adapter_trainable = 0;
    let mut notes = Vec::new();
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
            notes.extend(store_frozen_base(cfg, &device, model.as_mut())?);
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
        work: Work::Classify(Box::new(Classification {
            model,
            data,
            train,
            eval,
            device,
        })),
        groups,
        trainable,
        total: base_total + adapter_trainable,
        initialised,
        notes,
    })
}

/// On a GPU with `model.matmul_precision = "bf16"`, an adapter run keeps its frozen base in
/// bf16 as well (half its memory; adapters, gradients and AdamW stay f32); on the CPU the base
/// stays f32 (the bf16 kernels round per product). Returns the line for the run's log.
pub(super) fn store_frozen_base(
    cfg: &TrainConfig,
    device: &Device,
    model: &mut (impl crate::peft::linear::LinearLayers + ?Sized),
) -> anyhow::Result<Option<String>> {
    if device.is_cpu() || cfg.model.matmul_precision != crate::peft::MatmulPrecision::Bf16 {
        return Ok(None);
    }
    let saved = crate::peft::linear::store_frozen_weights(model, DType::BF16)?;
    Ok(Some(format!(
        "frozen base stored in bf16 on {}: {:.0} MiB less",
        crate::device::label(device),
        saved as f64 / (1u64 << 20) as f64
    )))
}

/// Mean loss and accuracy of `model` (on `dev`) on `split`.
pub fn evaluate(
    model: &dyn Classifier,
    split: &EncodedSplit,
    batch_size: usize,
    step: usize,
    dev: &Device,
) -> anyhow::Result<EvalPoint> {
    let (mut loss_sum, mut correct) = (0.0f64, 0usize);
    let idx: Vec<usize> = (0..split.len()).collect();
    for chunk in idx.chunks(batch_size.max(1)) {
        let (batch, labels) = split.batch(chunk, dev)?;
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
        perplexity: None,
    })
}

/// Where a run starts: fresh, or from its checkpoint.
pub(super) struct Start {
    /// Steps already done.
    pub(super) step: usize,
    /// Training losses so far.
    pub(super) losses: Vec<f64>,
    /// Evaluations so far.
    pub(super) evals: Vec<EvalPoint>,
    /// Seconds spent in training steps so far.
    pub(super) train_secs: f64,
}

struct Loop<'a, 'r, 'e> {
    cfg: &'a TrainConfig,
    p: &'a mut Prepared,
    run: &'r mut RunDir,
    emit: &'e mut dyn FnMut(Event),
    opts: Vec<(AdamW, f64)>,
    total_steps: usize,
    losses: Vec<f64>,
    evals: Vec<EvalPoint>,
    train_secs: f64,
    steps_done: usize,
    /// The step of the newest checkpoint on disk.
    checkpointed: usize,
    /// The run's record, rewritten (still `running`) at each checkpoint.
    summary: RunSummary,
}

/// The optimisers of a prepared run, one per parameter group.
pub(super) fn optimisers(cfg: &TrainConfig, p: &Prepared) -> anyhow::Result<Vec<(AdamW, f64)>> {
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

impl Loop<'_, '_, '_> {
    fn eval(&mut self, step: usize) -> anyhow::Result<()> {
        (self.emit)(Event::Phase(Phase::Evaluating));
        let e = self.p.work.evaluate(self.cfg.optim.eval_batch_size, step)?;
        self.run.append(&MetricLine::Eval(e))?;
        self.evals.push(e);
        (self.emit)(Event::Eval(e));
        (self.emit)(Event::Phase(Phase::Training));
        Ok(())
    }

    /// Writes the trainable values, the optimiser state and the step as the run's checkpoint
    /// (see [`checkpoint::save`]), and the summary's progress.
    fn checkpoint(&mut self, step: usize) -> anyhow::Result<()> {
        let mut tensors = Vec::new();
        let mut optimizer_steps = Vec::new();
        for (k, (opt, _)) in self.opts.iter().enumerate() {
            let (t, n) = opt.state(&format!("group{k}"));
            tensors.extend(t);
            optimizer_steps.push(n);
        }
        let meta = CheckpointMeta {
            step,
            total_steps: Some(self.total_steps),
            optimizer_steps,
            train_secs: self.train_secs,
            files: Default::default(),
        };
        checkpoint::save(&self.run.layout, meta, tensors)?;
        self.checkpointed = step;
        self.summary.steps_done = step;
        self.run.write_summary(&self.summary)
    }

    fn run(&mut self, ctl: &mut dyn Controller, start: usize) -> anyhow::Result<RunStatus> {
        let o = &self.cfg.optim;
        let all_vars: Vec<Var> = self
            .p
            .groups
            .iter()
            .flat_map(|g| g.0.iter().cloned())
            .collect();
        let mut sampler = Sampler::new(self.p.work.train_len(), o.seed);
        // A resumed run replays the batch order up to where it stopped.
        for _ in 0..start * o.grad_accum {
            sampler.next_batch(o.batch_size);
        }
        // A language model's curves start from the base model's answers.
        if start == 0 && matches!(self.p.work, Work::CausalLm(_)) && self.evals.is_empty() {
            self.eval(0)?;
        }
        (self.emit)(Event::Phase(Phase::Training));
        for step in start + 1..=self.total_steps {
            loop {
                let control = ctl.check();
                for req in ctl.take_try_it() {
                    let emit = &mut *self.emit;
                    self.p
                        .work
                        .try_it(&req, step - 1, self.total_steps, &mut |e| {
                            emit(Event::TryIt(e))
                        });
                }
                match control {
                    Control::Continue => break,
                    Control::Stop => return Ok(RunStatus::Stopped),
                    Control::Serve => {}
                }
            }
            let t0 = Instant::now();
            let mut grads: Option<candle_core::backprop::GradStore> = None;
            let mut loss_sum = 0.0;
            for _ in 0..o.grad_accum {
                let idx = sampler.next_batch(o.batch_size);
                let loss = self.p.work.loss(&idx)?;
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
            let Some(grads) = grads else { continue };
            // Clipping scales the gradients inside the optimiser's update (no scaled copy).
            let mut grad_scale = 1.0;
            if let Some(max) = o.max_grad_norm {
                let norm = global_grad_norm(&grads, &all_vars)?;
                if !norm.is_finite() {
                    anyhow::bail!(
                        "the gradient became {norm} at step {step}: training diverged (lower optim.lr)"
                    );
                }
                if norm > max {
                    grad_scale = max / (norm + 1e-6);
                }
            }
            let factor = o.schedule.factor(step, self.total_steps, o.warmup_steps);
            for (opt, scale) in &mut self.opts {
                opt.params.lr = o.lr * *scale * factor;
                opt.step_scaled(&grads, grad_scale)?;
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
            fsio::fault_point("step-done");
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
    let mut p = prepare(cfg)?;
    if !p.initialised.is_empty() {
        let head: Vec<&str> = p.initialised.iter().map(String::as_str).collect();
        emit(Event::Log(format!(
            "initialised (not in the checkpoint): {}",
            head.join(", ")
        )));
    }
    for note in &p.notes {
        emit(Event::Log(note.clone()));
    }
    let total_steps = limits::total_steps(cfg, p.work.train_len()).map_err(anyhow::Error::msg)?;
    let run = store.create(cfg)?;
    let summary = new_summary(
        cfg,
        (p.trainable, p.total),
        &run.id,
        total_steps,
        started_at,
    );
    let opts = optimisers(cfg, &p)?;
    let start = Start {
        step: 0,
        losses: Vec::new(),
        evals: Vec::new(),
        train_secs: 0.0,
    };
    drive(cfg, &mut p, run, summary, opts, start, started, ctl, emit)
}

/// The summary of a run of `cfg` starting now (`trainable` of `total` values).
pub fn new_summary(
    cfg: &TrainConfig,
    (trainable, total): (usize, usize),
    id: &str,
    total_steps: usize,
    started_at: String,
) -> RunSummary {
    RunSummary {
        id: id.to_string(),
        name: cfg.label(),
        method: cfg.method_name(),
        rank: (cfg.mode == TrainMode::Adapter).then_some(cfg.adapter.rank),
        model: cfg.model.source.display_name(),
        dataset: dataset_name(&cfg.data.source),
        trainable,
        total,
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
    }
}

/// Records a run's results in its summary: the final training loss (the mean of the last 10
/// steps), the last evaluation, and the best one after step 0 (the earliest of equals).
pub fn record_results(summary: &mut RunSummary, losses: &[f64], evals: &[EvalPoint]) {
    let tail = &losses[losses.len().saturating_sub(10)..];
    summary.final_train_loss =
        (!tail.is_empty()).then(|| tail.iter().sum::<f64>() / tail.len() as f64);
    summary.final_eval = evals.last().copied();
    summary.best_eval = evals
        .iter()
        .copied()
        .filter(|e| e.step > 0)
        .max_by(|a, b| a.accuracy.total_cmp(&b.accuracy).then(b.step.cmp(&a.step)));
}

/// The shared body of [`train`] and [`resume`](super::resume::resume): announce, loop, save, record.
#[allow(clippy::too_many_arguments)]
pub(super) fn drive(
    cfg: &TrainConfig,
    p: &mut Prepared,
    mut run: RunDir,
    summary: RunSummary,
    opts: Vec<(AdamW, f64)>,
    start: Start,
    started: Instant,
    ctl: &mut dyn Controller,
    emit: &mut dyn FnMut(Event),
) -> Result<RunSummary, RunFailure> {
    run.write_summary(&summary)?;
    let precision = cfg.model.matmul_precision;
    let _precision = crate::peft::MatmulPrecisionGuard::set(precision);
    emit(Event::Log(format!(
        "computing on {} (device = \"{}\")",
        crate::device::label(&p.work.device()),
        cfg.device
    )));
    if precision != crate::peft::MatmulPrecision::F32 {
        emit(Event::Log(format!(
            "frozen base products (model.matmul_precision): {}",
            precision.describe_on(&p.work.device())
        )));
    }
    emit(Event::RunStarted {
        run_id: run.id.clone(),
        name: summary.name.clone(),
        method: summary.method.clone(),
        trainable: p.trainable,
        total: p.total,
        total_steps: summary.total_steps,
        model: p.work.summary(),
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
        checkpointed: start.step,
        summary,
    };
    let outcome = lp.run(ctl, start.step).and_then(|status| {
        if status == RunStatus::Stopped {
            // A stopped run can always be resumed where it stopped.
            if lp.steps_done > lp.checkpointed {
                lp.checkpoint(lp.steps_done)?;
            }
            if lp.steps_done > 0 && lp.evals.last().map(|e| e.step) != Some(lp.steps_done) {
                lp.eval(lp.steps_done)?;
            }
        }
        (lp.emit)(Event::Phase(Phase::Saving));
        lp.p.work.save(cfg, &run_path)?;
        Ok(status)
    });
    let Loop {
        losses,
        evals,
        train_secs,
        steps_done,
        emit,
        mut summary,
        ..
    } = lp;
    record_results(&mut summary, &losses, &evals);
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

//! The Fine-tune tab: model, data, method and options in a side panel (resizable, and hidden
//! with one button on a small window); Train/Stop/Pause, the state line, progress and live
//! curves in the middle.

use egui::{RichText, Ui};

use super::StudioApp;
use super::dialogs::PickPurpose;
use super::form::{self, UiMethod};
use super::plots::{self, Curves};
use crate::data::{BUILTIN_DATASETS, DataSource};
use crate::inspect::thousands;
use crate::models::ModelSource;
use crate::models::hub::BUILTIN_MODELS;
use crate::models::llama::language_model::{SMOLLM2_NAME, smollm2_fetch_hint, smollm2_path};
use crate::peft::MatmulPrecision;
use crate::train::{Schedule, TrainMode};

/// Draws the tab.
pub fn show(app: &mut StudioApp, ui: &mut Ui) {
    if app.settings.form_open {
        // A third of a small window, 380 px of a large one; the user can drag it wider.
        let width = (ui.available_width() * 0.42).clamp(200.0, 380.0);
        egui::Panel::left("form")
            .resizable(true)
            .default_size(width)
            .min_size(180.0)
            .show(ui, |ui| {
                egui::ScrollArea::vertical().show(ui, |ui| form_ui(app, ui));
            });
    }
    if super::try_it_panel::wanted(app) {
        egui::Panel::bottom("try_it")
            .resizable(true)
            .default_size(220.0)
            .min_size(120.0)
            .show(ui, |ui| super::try_it_panel::show(app, ui));
    }
    egui::CentralPanel::default().show(ui, |ui| run_ui(app, ui));
}

fn section(ui: &mut Ui, title: &str) -> egui::Response {
    ui.add_space(6.0);
    ui.label(RichText::new(title).strong().size(15.0))
}

fn model_ui(app: &mut StudioApp, ui: &mut Ui) {
    let title = section(ui, "Base model");
    let current = app.settings.config.model.source.display_name();
    egui::ComboBox::from_id_salt("model")
        .selected_text(current)
        .width(ui.available_width().min(260.0))
        .show_ui(ui, |ui| {
            for (name, help) in BUILTIN_MODELS {
                let src = ModelSource::Builtin {
                    name: name.to_string(),
                };
                let selected = app.settings.config.model.source == src;
                if ui
                    .selectable_label(selected, *name)
                    .on_hover_text(*help)
                    .clicked()
                {
                    app.settings.config.model.source = src;
                }
            }
            let smol = ModelSource::Builtin {
                name: SMOLLM2_NAME.to_string(),
            };
            let selected = app.settings.config.model.source == smol;
            let help = match smollm2_path() {
                Some(_) => "SmolLM2-135M-Instruct (Apache-2.0), a chat model: instruction-tune it on chat data".to_string(),
                None => smollm2_fetch_hint(),
            };
            if ui
                .selectable_label(selected, SMOLLM2_NAME)
                .on_hover_text(help)
                .clicked()
                && !selected
            {
                app.settings.config.model.source = smol;
                form::use_language_model_defaults(&mut app.settings.config);
                app.form
                    .request_preview(&app.background, &app.settings.config);
            }
        })
        .response
        .labelled_by(title.id);
    ui.horizontal_wrapped(|ui| {
        if ui.button("Open model folder…").clicked() {
            app.pick(PickPurpose::ModelFolder);
        }
        if ui
            .button("Open GGUF file…")
            .on_hover_text(
                "a llama.cpp GGUF language model (llama or qwen2; F32/F16/Q8_0/Q4_0/Q4_1)",
            )
            .clicked()
        {
            app.pick(PickPurpose::ModelFile);
        }
    });
    let gguf = match &app.settings.config.model.source {
        ModelSource::Gguf { .. } => true,
        ModelSource::Builtin { name } => name == SMOLLM2_NAME,
        _ => false,
    };
    if gguf && app.settings.config.mode == TrainMode::Adapter {
        ui.checkbox(
            &mut app.settings.config.model.packed_base,
            "keep the quantized base packed (QLoRA)",
        )
        .on_hover_text(
            "the frozen GGUF weights stay 4-bit in memory and are unpacked per product: the same results, less memory, a few percent slower",
        );
    }
    let full = app.settings.config.mode == TrainMode::Full;
    precision_choice(ui, &mut app.settings.config.model.matmul_precision, full);
    let labels = app.form.num_classes();
    match app
        .form
        .arch(&app.settings.config.model.source.clone(), labels)
    {
        Ok(arch) => {
            ui.label(format!(
                "{} — {} parameters",
                arch.summary,
                thousands(arch.total_params())
            ));
            let groups = form::target_groups(&arch);
            ui.label(
                RichText::new(format!(
                    "adaptable modules: {}",
                    groups
                        .iter()
                        .map(|g| g.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
                .small(),
            );
        }
        Err(e) => {
            ui.colored_label(
                ui.visuals().error_fg_color,
                format!("cannot read the model: {e}"),
            );
        }
    }
}

fn data_ui(app: &mut StudioApp, ui: &mut Ui) {
    let title = section(ui, "Dataset");
    let cfg = &mut app.settings.config;
    let current = crate::train::trainer::dataset_name(&cfg.data.source);
    let mut changed = false;
    egui::ComboBox::from_id_salt("dataset")
        .selected_text(current)
        .width(ui.available_width().min(260.0))
        .show_ui(ui, |ui| {
            for name in BUILTIN_DATASETS {
                let src = DataSource::Builtin {
                    name: name.to_string(),
                };
                if ui.selectable_label(cfg.data.source == src, *name).clicked() {
                    cfg.data.source = src;
                    changed = true;
                }
            }
        })
        .response
        .labelled_by(title.id);
    ui.horizontal_wrapped(|ui| {
        if ui
            .button("Open dataset file…")
            .on_hover_text(
                "CSV or JSONL text, or IDX images; for a language model, instruction data (JSON or JSONL: messages, conversations, instruction/output or text)",
            )
            .clicked()
        {
            app.pick(PickPurpose::DatasetFile);
        }
        if ui
            .button("Open image folder…")
            .on_hover_text("one sub-folder of images per class")
            .clicked()
        {
            app.pick(PickPurpose::DatasetFolder);
        }
    });
    let cfg = &mut app.settings.config;
    ui.horizontal_wrapped(|ui| {
        changed |= ui
            .add(
                egui::Slider::new(&mut cfg.data.eval_fraction, 0.05..=0.5)
                    .fixed_decimals(2)
                    .text("eval split"),
            )
            .on_hover_text("share held out when the dataset has no held-out split of its own")
            .changed();
        let l = ui.label("split seed");
        changed |= ui
            .add(egui::DragValue::new(&mut cfg.data.split_seed))
            .labelled_by(l.id)
            .changed();
    });
    if changed {
        app.form
            .request_preview(&app.background, &app.settings.config);
    }
    match &app.form.preview {
        None => {
            ui.horizontal(|ui| {
                super::spinner::spinner(ui);
                ui.label("reading the dataset…");
            });
        }
        Some(Err(e)) => {
            ui.colored_label(
                ui.visuals().error_fg_color,
                format!("cannot read the dataset: {e}"),
            );
        }
        Some(Ok(p)) => {
            ui.label(&p.summary);
            if app.form.textures.is_empty() && !p.images.is_empty() {
                app.form.textures = p
                    .images
                    .iter()
                    .enumerate()
                    .map(|(i, (w, h, rgba))| {
                        let img = egui::ColorImage::from_rgba_unmultiplied([*w, *h], rgba);
                        ui.ctx().load_texture(
                            format!("preview-{i}"),
                            img,
                            egui::TextureOptions::NEAREST,
                        )
                    })
                    .collect();
            }
            ui.horizontal_wrapped(|ui| {
                for t in &app.form.textures {
                    ui.image((t.id(), egui::vec2(36.0, 36.0)));
                }
            });
            if !p.spans.is_empty() {
                spans_ui(ui, &p.spans);
            } else if let Some(note) = &p.spans_note {
                ui.label(
                    RichText::new(format!("(the rendered example needs the model: {note})"))
                        .small(),
                );
            }
            for (text, label) in &p.rows {
                ui.label(RichText::new(format!("[{label}] {text}")).small());
            }
            // Instruction data has no classes to count.
            if !p.classes.is_empty() {
                egui::CollapsingHeader::new("Class counts").show(ui, |ui| {
                    egui::Grid::new("counts").striped(true).show(ui, |ui| {
                        ui.label("class");
                        ui.label("train");
                        ui.label("eval");
                        ui.end_row();
                        for (i, c) in p.classes.iter().enumerate() {
                            ui.label(c);
                            ui.label(p.train_counts.get(i).copied().unwrap_or(0).to_string());
                            ui.label(p.eval_counts.get(i).copied().unwrap_or(0).to_string());
                            ui.end_row();
                        }
                    });
                });
            }
        }
    }
}

fn method_ui(app: &mut StudioApp, ui: &mut Ui) {
    section(ui, "Method");
    let labels = app.form.num_classes();
    let arch = app
        .form
        .arch(&app.settings.config.model.source.clone(), labels)
        .ok();
    let groups = arch.as_ref().map(form::target_groups).unwrap_or_default();
    let cfg = &mut app.settings.config;
    let current = UiMethod::of(cfg);
    ui.horizontal_wrapped(|ui| {
        for m in UiMethod::ALL {
            if ui
                .selectable_label(current == m, m.label())
                .on_hover_text(m.help())
                .clicked()
                && current != m
            {
                let max_rank = form::full_rank_of_targets(&cfg.adapter.targets, &groups);
                form::apply_method_defaults(cfg, m, max_rank.unwrap_or(64));
            }
        }
    });
    if cfg.mode != TrainMode::Adapter {
        return;
    }
    let ticked = form::selected_groups(&cfg.adapter.targets, &groups);
    let max_rank = form::full_rank_of_targets(&cfg.adapter.targets, &groups)
        .unwrap_or(1)
        .max(1);
    ui.label("targets");
    ui.horizontal_wrapped(|ui| {
        let mut new = ticked.clone();
        for (i, g) in groups.iter().enumerate() {
            ui.checkbox(&mut new[i], &g.name).on_hover_text(format!(
                "{} modules, up to rank {}",
                g.modules.len(),
                g.max_rank
            ));
        }
        if new != ticked && new.iter().any(|t| *t) {
            cfg.adapter.targets = form::targets_for(&groups, &new);
        }
    });
    egui::Grid::new("adapter").num_columns(2).show(ui, |ui| {
        let a = &mut cfg.adapter;
        let l = ui.label("rank");
        ui.add_enabled(
            a.energy_threshold.is_none(),
            egui::Slider::new(&mut a.rank, 1..=max_rank)
                .logarithmic(max_rank > 16)
                .clamping(egui::SliderClamping::Never),
        )
        .labelled_by(l.id)
        .on_hover_text(format!(
            "at most {max_rank}: the smallest min(out, in) of the targeted modules"
        ));
        ui.end_row();
        let l = ui.label("alpha");
        let mut alpha = a.alpha.unwrap_or(a.rank as f64);
        if ui
            .add(
                egui::DragValue::new(&mut alpha)
                    .range(0.01..=4096.0)
                    .speed(0.5),
            )
            .labelled_by(l.id)
            .on_hover_text("scale s = alpha / r")
            .changed()
        {
            a.alpha = Some(alpha);
        }
        ui.end_row();
        let m = UiMethod::of_adapter(a.method);
        let options = form::inits(m);
        let l = ui.label("init");
        let mut init = a.init.unwrap_or(a.method.default_init());
        egui::ComboBox::from_id_salt("init")
            .selected_text(init.name())
            .show_ui(ui, |ui| {
                for i in options {
                    ui.selectable_value(&mut init, *i, i.name());
                }
            })
            .response
            .labelled_by(l.id);
        a.init = (init != a.method.default_init()).then_some(init);
        ui.end_row();
        match a.method {
            crate::peft::Method::Lora => {
                let l = ui.label("dropout");
                ui.add(egui::Slider::new(&mut a.dropout, 0.0..=0.5))
                    .labelled_by(l.id);
                ui.end_row();
                ui.label("rsLoRA");
                ui.checkbox(&mut a.use_rslora, "scale alpha / √r");
                ui.end_row();
            }
            method => {
                ui.label("trainable scale");
                ui.checkbox(&mut a.trainable_scale, "s trains too (r + 1 values)");
                ui.end_row();
                ui.label("ReLU on z");
                ui.checkbox(&mut a.relu, "relu(z) in the forward");
                ui.end_row();
                if method == crate::peft::Method::Svfit {
                    ui.label("energy threshold");
                    let mut on = a.energy_threshold.is_some();
                    ui.horizontal(|ui| {
                        ui.checkbox(&mut on, "on")
                            .on_hover_text("choose each rank to hold this share of Σσ²");
                        let mut t = a.energy_threshold.unwrap_or(0.99);
                        ui.add_enabled(
                            on,
                            egui::Slider::new(&mut t, 0.5..=1.0)
                                .fixed_decimals(3)
                                .text("τ"),
                        );
                        a.energy_threshold = on.then_some(t);
                    });
                    ui.end_row();
                }
            }
        }
    });
}

fn optim_ui(app: &mut StudioApp, ui: &mut Ui) {
    section(ui, "Training");
    let o = &mut app.settings.config.optim;
    egui::Grid::new("optim").num_columns(2).show(ui, |ui| {
        let l = ui.label("learning rate");
        ui.add(
            egui::DragValue::new(&mut o.lr)
                .speed(1e-4)
                .range(1e-7..=1.0)
                .custom_formatter(|v, _| format!("{v:.1e}")),
        )
        .labelled_by(l.id);
        ui.end_row();
        let l = ui.label("steps");
        let mut steps = o.steps.unwrap_or(1000);
        if ui
            .add(egui::DragValue::new(&mut steps).range(1..=1_000_000))
            .labelled_by(l.id)
            .changed()
            || o.steps.is_none()
        {
            o.steps = Some(steps);
            o.epochs = None;
        }
        ui.end_row();
        let l = ui.label("batch size");
        ui.add(egui::DragValue::new(&mut o.batch_size).range(1..=4096))
            .labelled_by(l.id);
        ui.end_row();
        let l = ui.label("schedule");
        egui::ComboBox::from_id_salt("schedule")
            .selected_text(format!("{:?}", o.schedule).to_lowercase())
            .show_ui(ui, |ui| {
                for s in [Schedule::Linear, Schedule::Cosine, Schedule::Constant] {
                    ui.selectable_value(&mut o.schedule, s, format!("{s:?}").to_lowercase());
                }
            })
            .response
            .labelled_by(l.id);
        ui.end_row();
        let l = ui.label("warm-up steps");
        ui.add(egui::DragValue::new(&mut o.warmup_steps).range(0..=100_000))
            .labelled_by(l.id);
        ui.end_row();
        let l = ui.label("eval every");
        ui.add(egui::DragValue::new(&mut o.eval_every).range(1..=100_000))
            .labelled_by(l.id);
        ui.end_row();
        let l = ui.label("seed");
        ui.add(egui::DragValue::new(&mut o.seed)).labelled_by(l.id);
        ui.end_row();
    });
    egui::CollapsingHeader::new("More options").show(ui, |ui| {
        egui::Grid::new("optim2").num_columns(2).show(ui, |ui| {
            let l = ui.label("head learning rate");
            let mut h = o.head_lr.unwrap_or(o.lr);
            if ui
                .add(
                    egui::DragValue::new(&mut h)
                        .speed(1e-4)
                        .range(1e-7..=1.0)
                        .custom_formatter(|v, _| format!("{v:.1e}")),
                )
                .labelled_by(l.id)
                .changed()
            {
                o.head_lr = Some(h);
            }
            ui.end_row();
            let l = ui.label("weight decay");
            ui.add(
                egui::DragValue::new(&mut o.weight_decay)
                    .speed(1e-3)
                    .range(0.0..=1.0),
            )
            .labelled_by(l.id);
            ui.end_row();
            let l = ui.label("gradient clipping");
            let mut clip = o.max_grad_norm.unwrap_or(0.0);
            if ui
                .add(egui::DragValue::new(&mut clip).speed(0.1).range(0.0..=1e6))
                .labelled_by(l.id)
                .on_hover_text("0: off")
                .changed()
            {
                o.max_grad_norm = (clip > 0.0).then_some(clip);
            }
            ui.end_row();
            let l = ui.label("gradient accumulation");
            ui.add(egui::DragValue::new(&mut o.grad_accum).range(1..=1024))
                .labelled_by(l.id);
            ui.end_row();
        });
    });
}

fn presets_ui(app: &mut StudioApp, ui: &mut Ui) {
    section(ui, "Presets");
    ui.horizontal_wrapped(|ui| {
        if ui.button("Load preset…").clicked() {
            app.pick(PickPurpose::LoadPreset);
        }
        if ui.button("Save preset…").clicked() {
            app.pick(PickPurpose::SavePreset);
        }
        if ui.button("Copy CLI command").clicked() {
            ui.ctx().copy_text(form::cli_command(&app.settings.config));
        }
    });
    if let Some(p) = &app.settings.last_preset {
        ui.label(RichText::new(format!("last preset: {}", p.display())).small());
    }
    // One line whatever the path's length (the full path on hover).
    let path = app.runs_dir().display().to_string();
    ui.add(egui::Label::new(RichText::new(format!("runs are saved in {path}")).small()).truncate())
        .on_hover_text(format!("{path}\n(change it in Compare, Settings)"));
}

fn form_ui(app: &mut StudioApp, ui: &mut Ui) {
    let busy = app.run.state.is_busy();
    ui.add_enabled_ui(!busy, |ui| {
        presets_ui(app, ui);
        ui.separator();
        model_ui(app, ui);
        ui.separator();
        data_ui(app, ui);
        ui.separator();
        method_ui(app, ui);
        ui.separator();
        optim_ui(app, ui);
    });
}

/// "trainable X of Y (p%)" for the form's current settings, from the model's config.
pub fn trainable_estimate(app: &mut StudioApp) -> Result<(usize, usize), String> {
    let cfg = app.settings.config.clone();
    let arch = app.form.arch(&cfg.model.source, app.form.num_classes())?;
    let head: usize = arch
        .linears
        .iter()
        .filter(|l| l.head)
        .map(|l| l.params())
        .sum();
    Ok(match cfg.mode {
        TrainMode::Full => (arch.total_params(), arch.total_params()),
        TrainMode::Head => (head, arch.total_params()),
        TrainMode::Adapter => {
            let r = crate::inspect::inspect(&arch, &cfg.adapter).map_err(|e| e.to_string())?;
            (r.trainable, r.total)
        }
    })
}

fn run_ui(app: &mut StudioApp, ui: &mut Ui) {
    let busy = app.run.state.is_busy();
    ui.horizontal_wrapped(|ui| {
        let (arrow, tip) = if app.settings.form_open {
            (
                "Hide form",
                "hide the form panel (more room for the curves)",
            )
        } else {
            ("Show form", "show the form panel")
        };
        if ui.button(arrow).on_hover_text(tip).clicked() {
            app.settings.form_open = !app.settings.form_open;
        }
        let train = ui
            .add_enabled(
                !busy && !app.personalise.is_busy(),
                egui::Button::new(RichText::new("Start training").size(16.0)),
            )
            .on_disabled_hover_text("one job at a time: a run or a personalisation is in progress");
        if train.clicked() {
            app.start_training();
        }
        if ui.add_enabled(busy, egui::Button::new("Stop")).clicked() {
            app.send(crate::worker::Command::Stop);
        }
        let paused = app.run.state == super::UiState::Paused;
        let (label, cmd) = if paused {
            ("Resume", crate::worker::Command::Resume)
        } else {
            ("Pause", crate::worker::Command::Pause)
        };
        if ui.add_enabled(busy, egui::Button::new(label)).clicked() {
            app.send(cmd);
        }
        ui.separator();
        match trainable_estimate(app) {
            Ok((t, total)) => {
                ui.label(format!(
                    "trainable: {} of {} ({:.3}%)",
                    thousands(t),
                    thousands(total),
                    100.0 * t as f64 / total.max(1) as f64
                ));
            }
            Err(e) => {
                ui.colored_label(ui.visuals().error_fg_color, e);
            }
        }
    });
    let state = app.run.state.describe();
    let color = match app.run.state {
        super::UiState::Failed(_) => ui.visuals().error_fg_color,
        super::UiState::Finished => egui::Color32::from_rgb(80, 180, 90),
        _ => ui.visuals().text_color(),
    };
    ui.horizontal_wrapped(|ui| {
        ui.colored_label(color, RichText::new(format!("State: {state}")).strong());
        if !app.run.name.is_empty() {
            ui.label(format!("— {}", app.run.name));
        }
        if let Some(last) = app.run.eval_accuracy.last() {
            ui.label(format!(
                "eval accuracy {:.2}% at step {}",
                100.0 * last[1],
                last[0]
            ));
        }
    });
    if app.run.total_steps > 0 {
        let frac = app.run.step as f32 / app.run.total_steps as f32;
        let eta = app
            .run
            .eta_secs()
            .map(|s| format!(", ETA {}", fmt_secs(s)))
            .unwrap_or_default();
        ui.add(egui::ProgressBar::new(frac).text(format!(
            "{}/{} steps, {:.3} s/step{eta}",
            app.run.step, app.run.total_steps, app.run.secs_per_step
        )));
    } else if busy {
        ui.horizontal(|ui| {
            super::spinner::spinner(ui);
            ui.label(format!("loading… {:.0} s", app.run.elapsed_secs()));
        });
    }
    ui.horizontal_wrapped(|ui| {
        ui.add(egui::Slider::new(&mut app.settings.ema, 0.0..=0.99).text("smoothing"));
        ui.checkbox(&mut app.settings.log_scale, "log scale");
        ui.label(
            RichText::new(
                "click a legend entry to hide or show a curve; earlier runs: tick them in Compare",
            )
            .small(),
        );
    });
    let curves = curves(app);
    let steps = plots::step_range(&curves);
    let h = (ui.available_height() - 10.0).max(160.0);
    plots::loss_plot(
        ui,
        "train",
        &curves,
        steps,
        app.settings.ema,
        app.settings.log_scale,
        h * 0.57,
    );
    plots::accuracy_plot(ui, "train", &curves, steps, h * 0.4);
}

/// The live run's curves and those of the runs ticked in Compare, each labelled uniquely.
fn curves(app: &mut StudioApp) -> Vec<Curves> {
    let current_id = app.run.run_id.clone().unwrap_or_default();
    let mut curves = vec![Curves {
        id: current_id.clone(),
        name: if app.run.name.is_empty() {
            "current".into()
        } else {
            app.run.name.clone()
        },
        train_loss: app.run.train_loss.clone(),
        eval_loss: app.run.eval_loss.clone(),
        eval_accuracy: app.run.eval_accuracy.clone(),
    }];
    let overlay = app.compare_overlay(Some(&current_id));
    curves.extend(overlay);
    let started: Vec<String> = curves
        .iter()
        .map(|c| {
            app.runs
                .iter()
                .find(|r| r.id == c.id)
                .map_or(String::new(), |r| r.started_at.clone())
        })
        .collect();
    let keys: Vec<(&str, &str, &str)> = curves
        .iter()
        .zip(&started)
        .map(|(c, at)| (c.id.as_str(), c.name.as_str(), at.as_str()))
        .collect();
    let labels = plots::unique_labels(&keys);
    for (c, l) in curves.iter_mut().zip(labels) {
        c.name = l;
    }
    curves
}

/// `1 h 02 min`, `3 min 05 s`, `12 s`.
pub fn fmt_secs(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{} h {:02} min", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{} min {:02} s", s / 60, s % 60)
    } else {
        format!("{s} s")
    }
}

/// The first instruction record as the model reads it: prompt text grey (masked from the loss),
/// the trained answer green, text past the length limit red and struck through.
fn spans_ui(ui: &mut Ui, spans: &[(String, crate::data::SpanKind)]) {
    use crate::data::SpanKind;
    ui.label(
        RichText::new("one example as the model reads it: grey = prompt (no loss), green = trained, red = cut")
            .small(),
    );
    let mut job = egui::text::LayoutJob::default();
    let font = egui::FontId::monospace(10.0);
    // A long example shows its start and its end (where the answer is), the middle elided.
    let total: usize = spans.iter().map(|s| s.0.chars().count()).sum();
    let (head, tail) = (150usize, 450usize);
    let elide = total > head + tail;
    let mut at = 0usize;
    let mut elided = false;
    for (text, kind) in spans {
        let (color, strike) = match kind {
            SpanKind::Masked => (ui.visuals().weak_text_color(), false),
            SpanKind::Trained => (egui::Color32::from_rgb(80, 180, 90), false),
            SpanKind::Cut => (ui.visuals().error_fg_color, true),
        };
        let format = egui::TextFormat {
            font_id: font.clone(),
            color,
            strikethrough: if strike {
                egui::Stroke::new(1.0, color)
            } else {
                egui::Stroke::NONE
            },
            ..Default::default()
        };
        let kept: String = text
            .chars()
            .enumerate()
            .filter(|(i, _)| !elide || at + i < head || at + i >= total - tail)
            .map(|(_, c)| c)
            .collect();
        let n = text.chars().count();
        if elide && !elided && at + n > head {
            let (before, after) = kept.split_at(
                kept.char_indices()
                    .nth(head.saturating_sub(at).min(kept.chars().count()))
                    .map_or(kept.len(), |(i, _)| i),
            );
            job.append(before, 0.0, format.clone());
            job.append(
                " … ",
                0.0,
                egui::TextFormat {
                    font_id: font.clone(),
                    color: ui.visuals().weak_text_color(),
                    ..Default::default()
                },
            );
            job.append(after, 0.0, format);
            elided = true;
        } else {
            job.append(&kept, 0.0, format);
        }
        at += n;
    }
    job.wrap.max_width = ui.available_width();
    ui.label(job);
}

/// The matmul precision (of the frozen base, or with `full` of every trainable weight), saying
/// what this CPU will run.
fn precision_choice(ui: &mut Ui, precision: &mut MatmulPrecision, full: bool) {
    ui.horizontal(|ui| {
        ui.label(if full { "matmuls" } else { "frozen matmuls" });
        for (value, label) in [
            (MatmulPrecision::F32, "f32"),
            (MatmulPrecision::Bf16, "bf16"),
        ] {
            ui.radio_value(precision, value, label).on_hover_text(value.describe());
        }
        if *precision == MatmulPrecision::Bf16 {
            ui.weak(precision.describe());
        }
    })
    .response
    .on_hover_text(if full {
        "bf16: every product of the trained weights (forward, input and weight gradients) takes bf16 operands with f32 sums on Intel AMX (Xeon 4th generation and later) or AVX512-BF16 (AMD Zen 4 and later), as PyTorch's autocast does; weights, gradients and optimizer state stay f32. Results differ from f32 in the third significant digit."
    } else {
        "bf16: the frozen base's products take bf16 operands with f32 sums on Intel AMX (Xeon 4th generation and later) or AVX512-BF16 (AMD Zen 4 and later), as mixed-precision training does; adapters, gradients and optimizer state stay f32. Results differ from f32 in the third significant digit."
    });
}

//! Saving and loading adapters as PEFT-style folders (`adapter_config.json` +
//! `adapter_model.safetensors`), and exporting any adapter as a plain PEFT LoRA.
//!
//! Keys, all under `base_model.model.<module path>`:
//! - LoRA: `.lora_A.weight` (r×n), `.lora_B.weight` (m×r): exactly PEFT's.
//! - SVFit / LoLDU: `.<method>.z`, `.<method>.z0`, `.<method>.scale`, `.<method>.scale0`, and
//!   for LoLDU `.loldu.perm` (the row order as integers). The frozen factors are rebuilt from
//!   the base weights on load (the SVD's signs cancel in every product; LoLDU replays the stored
//!   pivot order), and the rebuilt z₀ is checked against the stored one.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Tensor};
use serde_json::{Value, json};

use super::config::{AdapterConfig, Init, Method, Targets};
use super::linear::{AdaptedLinear, Adapter, LinearLayers};
use super::{PeftError, Result};
use crate::device::HOST;
use crate::fsio::{self, FileDigest};

/// File name of the adapter's configuration.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// File name of the adapter's tensors.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// PEFT's key prefix.
pub const KEY_PREFIX: &str = "base_model.model.";

/// Key of `adapter_config.json` recording the size and SHA-256 of the weights file as written
/// (checked on load; folders written by PEFT, without it, load unchecked).
pub const DIGEST_KEY: &str = "peft_studio_files";

/// Writes the weights, then the config recording their digest: a folder cut short between the
/// two (a killed process) fails the check on load instead of loading mismatched halves.
fn write_folder(dir: &Path, tensors: HashMap<String, Tensor>, mut config: Value) -> Result<()> {
    let wpath = dir.join(WEIGHTS_FILE);
    let mut named: Vec<(String, Tensor)> = tensors.into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let digest = fsio::write_safetensors_digest(&wpath, &named, HashMap::new())?;
    fsio::fault_point("adapter-weights-written");
    config[DIGEST_KEY] = json!({ WEIGHTS_FILE: digest });
    let cpath = dir.join(CONFIG_FILE);
    let text = serde_json::to_string_pretty(&config).map_err(|e| PeftError::Format {
        path: cpath.display().to_string(),
        reason: e.to_string(),
    })?;
    Ok(fsio::write_atomic(&cpath, text.as_bytes())?)
}

/// Reads the weights file of the adapter folder `dir`, checked against the digest its config
/// records (if any).
fn read_weights(dir: &Path, config: &Value) -> Result<HashMap<String, Tensor>> {
    let wpath = dir.join(WEIGHTS_FILE);
    let bytes = fsio::read(&wpath)?;
    if let Some(d) = config.get(DIGEST_KEY).and_then(|f| f.get(WEIGHTS_FILE)) {
        let digest: FileDigest =
            serde_json::from_value(d.clone()).map_err(|e| PeftError::Format {
                path: dir.join(CONFIG_FILE).display().to_string(),
                reason: format!("{DIGEST_KEY}.{WEIGHTS_FILE}: {e}"),
            })?;
        digest.verify(&wpath, &bytes)?;
    }
    Ok(fsio::parse_safetensors(&wpath, &bytes, &HOST)?)
}

fn targets_json(t: &Targets) -> Value {
    match t {
        Targets::List(v) => json!(v),
        Targets::Pattern(p) => json!(p),
    }
}

fn peft_type(method: Method) -> &'static str {
    match method {
        Method::Lora => "LORA",
        Method::Svfit => "SVFIT",
        Method::Loldu => "LOLDU",
    }
}

/// PEFT's `init_lora_weights` value for an initialiser.
fn peft_init(init: Init) -> Value {
    match init {
        Init::Kaiming => json!(true),
        other => json!(other.name()),
    }
}

/// Saves the adapters of `model` (built with `cfg`) into folder `dir` (created if needed).
pub fn save_adapter(
    model: &(impl LinearLayers + ?Sized),
    cfg: &AdapterConfig,
    dir: &Path,
) -> Result<()> {
    save_adapter_with(model, cfg, dir, &[])
}

/// [`save_adapter`] plus fully trained modules (PEFT's `modules_to_save`, e.g. the
/// classification head), given as `(module path, [(param name, tensor)])`; they are stored
/// as `base_model.model.<module>.<param>`, the keys PEFT writes.
pub fn save_adapter_with(
    model: &(impl LinearLayers + ?Sized),
    cfg: &AdapterConfig,
    dir: &Path,
    modules_to_save: &[(String, Vec<(String, Tensor)>)],
) -> Result<()> {
    fsio::create_dir_all(dir)?;
    let mut tensors = HashMap::new();
    for (module, params) in modules_to_save {
        for (name, t) in params {
            tensors.insert(format!("{KEY_PREFIX}{module}.{name}"), t.detach());
        }
    }
    let mut ranks = BTreeMap::new();
    for layer in model.linears() {
        let Some(adapter) = layer.adapter() else {
            continue;
        };
        let key = format!("{KEY_PREFIX}{}", layer.path());
        ranks.insert(layer.path().to_string(), adapter.rank());
        match adapter {
            Adapter::Lora(a) => {
                tensors.insert(format!("{key}.lora_A.weight"), a.a.as_tensor().detach());
                tensors.insert(format!("{key}.lora_B.weight"), a.b.as_tensor().detach());
            }
            Adapter::Diagonal(d) => {
                let k = format!("{key}.{}", d.method.name());
                let dev = d.z0.device();
                tensors.insert(format!("{k}.z"), d.z.as_tensor().detach());
                tensors.insert(format!("{k}.z0"), d.z0.clone());
                let s = d.scale_value()?;
                tensors.insert(format!("{k}.scale"), Tensor::new(&[s as f32], dev)?);
                tensors.insert(format!("{k}.scale0"), Tensor::new(&[d.s0 as f32], dev)?);
                if let Some(perm) = &d.perm {
                    let p: Vec<i64> = perm.iter().map(|&i| i as i64).collect();
                    tensors.insert(format!("{k}.perm"), Tensor::new(p.as_slice(), dev)?);
                }
            }
        }
    }
    if tensors.is_empty() {
        return Err(PeftError::Config(
            "the model carries no adapter to save".into(),
        ));
    }
    let mut config = adapter_config_json(cfg, &ranks);
    if !modules_to_save.is_empty() {
        config["modules_to_save"] =
            json!(modules_to_save.iter().map(|(m, _)| m).collect::<Vec<_>>());
    }
    write_folder(dir, tensors, config)
}

fn adapter_config_json(cfg: &AdapterConfig, ranks: &BTreeMap<String, usize>) -> Value {
    let rank_pattern: serde_json::Map<String, Value> = ranks
        .iter()
        .filter(|(_, r)| **r != cfg.rank)
        .map(|(p, r)| (p.clone(), json!(r)))
        .collect();
    json!({
        "peft_type": peft_type(cfg.method),
        "r": cfg.rank,
        "lora_alpha": cfg.alpha(),
        "target_modules": targets_json(&cfg.targets),
        "lora_dropout": cfg.dropout,
        "bias": "none",
        "use_rslora": cfg.use_rslora,
        "init_lora_weights": peft_init(cfg.init()),
        "fan_in_fan_out": false,
        "inference_mode": true,
        "task_type": null,
        "base_model_name_or_path": null,
        "modules_to_save": null,
        "rank_pattern": rank_pattern,
        "alpha_pattern": {},
        "peft_studio": cfg,
    })
}

/// Writes the learned change of every adapted layer as a plain PEFT LoRA (scale 1:
/// `lora_alpha = r`) that any PEFT user can load onto the pre-trained model.
pub fn export_lora(model: &(impl LinearLayers + ?Sized), dir: &Path) -> Result<()> {
    fsio::create_dir_all(dir)?;
    let mut tensors = HashMap::new();
    let mut ranks = BTreeMap::new();
    for layer in model.linears() {
        let Some(adapter) = layer.adapter() else {
            continue;
        };
        let (b, a) = adapter.lora_form()?;
        let key = format!("{KEY_PREFIX}{}", layer.path());
        ranks.insert(layer.path().to_string(), a.dims()[0]);
        tensors.insert(
            format!("{key}.lora_A.weight"),
            a.to_dtype(DType::F32)?.detach(),
        );
        tensors.insert(
            format!("{key}.lora_B.weight"),
            b.to_dtype(DType::F32)?.detach(),
        );
    }
    let Some(&r) = ranks.values().max() else {
        return Err(PeftError::Config(
            "the model carries no adapter to export".into(),
        ));
    };
    let pattern = |f: &dyn Fn(usize) -> Value| -> serde_json::Map<String, Value> {
        ranks
            .iter()
            .filter(|(_, rr)| **rr != r)
            .map(|(p, rr)| (p.clone(), f(*rr)))
            .collect()
    };
    let config = json!({
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": r,
        "target_modules": ranks.keys().collect::<Vec<_>>(),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": false,
        "init_lora_weights": true,
        "fan_in_fan_out": false,
        "inference_mode": true,
        "task_type": null,
        "base_model_name_or_path": null,
        "modules_to_save": null,
        "rank_pattern": pattern(&|rr| json!(rr)),
        "alpha_pattern": pattern(&|rr| json!(rr)),
    });
    write_folder(dir, tensors, config)
}

/// Reads `adapter_config.json`: this project's full config when present, else PEFT's fields
/// (so adapters saved by PEFT load too).
pub fn read_adapter_config(dir: &Path) -> Result<AdapterConfig> {
    adapter_config_of(dir, &read_config_json(dir)?)
}

/// The JSON of the folder's `adapter_config.json`.
fn read_config_json(dir: &Path) -> Result<Value> {
    let path = dir.join(CONFIG_FILE);
    let text = fsio::read_to_string(&path)?;
    serde_json::from_str(&text).map_err(|e| PeftError::Format {
        path: path.display().to_string(),
        reason: format!("not valid JSON: {e}"),
    })
}

/// The adapter config held by `v`, the JSON of `dir`'s `adapter_config.json`.
fn adapter_config_of(dir: &Path, v: &Value) -> Result<AdapterConfig> {
    let path = dir.join(CONFIG_FILE);
    let bad = |reason: String| PeftError::Format {
        path: path.display().to_string(),
        reason,
    };
    if let Some(own) = v.get("peft_studio") {
        return serde_json::from_value(own.clone()).map_err(|e| bad(format!("peft_studio: {e}")));
    }
    let method = match v.get("peft_type") {
        Some(Value::String(t)) if t == "LORA" => Method::Lora,
        Some(Value::String(t)) if t == "SVFIT" => Method::Svfit,
        Some(Value::String(t)) if t == "LOLDU" => Method::Loldu,
        None => return Err(bad("peft_type: missing (LORA, SVFIT or LOLDU)".into())),
        Some(other) => {
            return Err(bad(format!(
                "peft_type: {other} is not LORA, SVFIT or LOLDU"
            )));
        }
    };
    let rank = match v.get("r") {
        None => return Err(bad("r: missing (the rank, an integer ≥ 1)".into())),
        Some(r) => r
            .as_u64()
            .filter(|&r| r >= 1)
            .ok_or_else(|| bad(format!("r: {r} is not a rank (an integer ≥ 1)")))?
            as usize,
    };
    let targets = match v.get("target_modules") {
        Some(Value::String(s)) => Targets::Pattern(s.clone()),
        Some(Value::Array(a)) => Targets::List(
            a.iter()
                .map(|x| x.as_str().map(String::from))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| bad("target_modules: not a list of names".into()))?,
        ),
        None => return Err(bad("target_modules: missing".into())),
        Some(other) => {
            return Err(bad(format!(
                "target_modules: {other} is neither a list of module names nor a pattern"
            )));
        }
    };
    let init = match v.get("init_lora_weights") {
        None | Some(Value::Bool(true)) => None,
        Some(Value::String(s)) if s == "gaussian" => Some(Init::Gaussian),
        Some(Value::String(s)) if s.starts_with("pissa") => Some(Init::Pissa),
        Some(other) => return Err(bad(format!("init_lora_weights: {other} is not supported"))),
    };
    Ok(AdapterConfig {
        method,
        rank,
        alpha: v.get("lora_alpha").and_then(Value::as_f64),
        targets,
        init,
        dropout: v.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0),
        use_rslora: v
            .get("use_rslora")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        ..AdapterConfig::default()
    })
}

/// The tensors stored for one module.
#[derive(Default)]
struct ModuleTensors(BTreeMap<String, Tensor>);

/// Loads the adapter folder `dir` into `model`: checks every module name and shape against the
/// model and reports all that do not fit in one error; on any error the model is unchanged.
/// Returns the adapter's config.
pub fn load_adapter(model: &mut (impl LinearLayers + ?Sized), dir: &Path) -> Result<AdapterConfig> {
    let (cfg, extra) = load_adapter_with(model, dir)?;
    if let Some(k) = extra.keys().next() {
        return Err(PeftError::Mismatch {
            path: dir.display().to_string(),
            problems: vec![format!(
                "module `{k}` (modules_to_save) is not part of this model"
            )],
        });
    }
    Ok(cfg)
}

/// [`load_adapter`], also returning the `modules_to_save` tensors by `<module>.<param>` for
/// the caller (who owns those modules) to check and load.
pub fn load_adapter_with(
    model: &mut (impl LinearLayers + ?Sized),
    dir: &Path,
) -> Result<(AdapterConfig, HashMap<String, Tensor>)> {
    let json = read_config_json(dir)?;
    let cfg = adapter_config_of(dir, &json)?;
    let saved_modules: Vec<String> = match json.get("modules_to_save") {
        None | Some(Value::Null) => Vec::new(),
        Some(v) => serde_json::from_value(v.clone()).map_err(|e| PeftError::Format {
            path: dir.join(CONFIG_FILE).display().to_string(),
            reason: format!("modules_to_save: not a list of module names ({e})"),
        })?,
    };
    let mut extra = HashMap::new();
    cfg.validate()?;
    let tensors = read_weights(dir, &json)?;
    let mismatch = |problems: Vec<String>| PeftError::Mismatch {
        path: dir.display().to_string(),
        problems,
    };
    let mut by_module: BTreeMap<String, ModuleTensors> = BTreeMap::new();
    let mut problems = Vec::new();
    let suffixes: Vec<(String, &str)> = match cfg.method {
        Method::Lora => vec![
            (".lora_A.weight".into(), "lora_A"),
            (".lora_B.weight".into(), "lora_B"),
        ],
        m => ["z", "z0", "scale", "scale0", "perm"]
            .iter()
            .map(|s| (format!(".{}.{s}", m.name()), *s))
            .collect(),
    };
    for (key, t) in tensors {
        let Some(rest) = key.strip_prefix(KEY_PREFIX) else {
            problems.push(format!("key `{key}` does not start with `{KEY_PREFIX}`"));
            continue;
        };
        if saved_modules.iter().any(|m| {
            rest.strip_prefix(m.as_str())
                .is_some_and(|r| r.starts_with('.'))
        }) {
            extra.insert(rest.to_string(), t);
            continue;
        }
        match suffixes.iter().find(|(s, _)| rest.ends_with(s.as_str())) {
            Some((s, name)) => {
                let module = rest[..rest.len() - s.len()].to_string();
                by_module
                    .entry(module)
                    .or_default()
                    .0
                    .insert(name.to_string(), t);
            }
            None => problems.push(format!("key `{key}` is not a {} key", cfg.method)),
        }
    }
    if by_module.is_empty() && problems.is_empty() {
        problems.push("the file holds no adapter weights".into());
    }
    let layer_shapes: HashMap<String, (usize, usize)> = model
        .linears()
        .iter()
        .map(|l| (l.path().to_string(), l.shape()))
        .collect();
    for module in by_module.keys() {
        if !layer_shapes.contains_key(module) {
            problems.push(format!("module `{module}` does not exist in the model"));
        }
    }
    let mut plans: HashMap<String, (usize, ModuleTensors)> = HashMap::new();
    for (module, t) in by_module {
        let Some(&(m, n)) = layer_shapes.get(&module) else {
            continue;
        };
        match check_module(&cfg, &module, m, n, &t) {
            Ok(r) => {
                plans.insert(module, (r, t));
            }
            Err(mut p) => problems.append(&mut p),
        }
    }
    if !problems.is_empty() {
        return Err(mismatch(problems));
    }
    // Build every adapted layer first; swap them in only when all succeeded.
    let mut built: HashMap<String, AdaptedLinear> = HashMap::new();
    for layer in model.linears() {
        let Some((r, t)) = plans.get(layer.path()) else {
            continue;
        };
        let mut copy = layer.clone();
        copy.detach()?;
        let perm = match t.0.get("perm") {
            Some(p) => Some(
                p.to_vec1::<i64>()?
                    .into_iter()
                    .map(|i| i as usize)
                    .collect::<Vec<_>>(),
            ),
            None => None,
        };
        copy.attach_with(&cfg, Some(*r), perm.as_deref().map(|p| &p[..*r]))?;
        restore_values(&mut copy, t).map_err(|p| mismatch(vec![p]))?;
        built.insert(layer.path().to_string(), copy);
    }
    for layer in model.linears_mut() {
        if let Some(b) = built.remove(layer.path()) {
            *layer = b;
        }
    }
    Ok((cfg, extra))
}

/// Checks one module's tensors against its m×n layer; returns the rank.
fn check_module(
    cfg: &AdapterConfig,
    module: &str,
    m: usize,
    n: usize,
    t: &ModuleTensors,
) -> std::result::Result<usize, Vec<String>> {
    let mut problems = Vec::new();
    let get = |name: &str, problems: &mut Vec<String>| -> Option<Vec<usize>> {
        match t.0.get(name) {
            Some(x) => Some(x.dims().to_vec()),
            None => {
                problems.push(format!("module `{module}`: `{name}` is missing"));
                None
            }
        }
    };
    let rank = match cfg.method {
        Method::Lora => {
            let a = get("lora_A", &mut problems);
            let b = get("lora_B", &mut problems);
            match (a.as_deref(), b.as_deref()) {
                (Some(&[ra, na]), Some(&[mb, rb])) => {
                    if na != n || mb != m || ra != rb {
                        problems.push(format!(
                            "module `{module}`: lora_A is {ra}×{na} and lora_B {mb}×{rb}, but the layer is {m}×{n} (lora_A must be r×{n}, lora_B {m}×r)"
                        ));
                    }
                    ra
                }
                (Some(_), Some(_)) => {
                    problems.push(format!(
                        "module `{module}`: lora_A and lora_B must be matrices"
                    ));
                    0
                }
                _ => 0,
            }
        }
        _ => {
            let z = get("z", &mut problems);
            let z0 = get("z0", &mut problems);
            let r = match (z.as_deref(), z0.as_deref()) {
                (Some(&[r]), Some(&[r0])) if r == r0 => r,
                (Some(z), Some(z0)) => {
                    problems.push(format!(
                        "module `{module}`: z is {z:?} and z0 {z0:?}; both must be vectors of the rank"
                    ));
                    0
                }
                _ => 0,
            };
            if cfg.method == Method::Loldu {
                match get("perm", &mut problems).as_deref() {
                    Some(&[len]) if len == m => {}
                    Some(d) => problems.push(format!(
                        "module `{module}`: perm has shape {d:?}, the layer has {m} rows"
                    )),
                    None => {}
                }
            }
            r
        }
    };
    if problems.is_empty() && (rank == 0 || rank > m.min(n)) {
        problems.push(format!(
            "module `{module}`: rank {rank} is impossible for the layer's {m}×{n} weight"
        ));
    }
    if problems.is_empty() {
        Ok(rank)
    } else {
        Err(problems)
    }
}

/// Copies the stored trainable values into a freshly attached layer, after checking that the
/// rebuilt starting point equals the stored one (same base weights).
fn restore_values(layer: &mut AdaptedLinear, t: &ModuleTensors) -> std::result::Result<(), String> {
    let path = layer.path().to_string();
    let err = |e: candle_core::Error| format!("module `{path}`: {e}");
    match layer.adapter() {
        Some(Adapter::Lora(a)) => {
            for (name, var) in [("lora_A", &a.a), ("lora_B", &a.b)] {
                let v =
                    t.0.get(name)
                        .ok_or_else(|| format!("module `{path}`: {name} missing"))?;
                var.set(
                    &v.to_dtype(DType::F32)
                        .map_err(err)?
                        .to_device(var.device())
                        .map_err(err)?,
                )
                .map_err(err)?;
            }
        }
        Some(Adapter::Diagonal(d)) => {
            let stored_z0 =
                t.0.get("z0")
                    .ok_or_else(|| format!("module `{path}`: z0 missing"))?;
            let rebuilt = d.z0.to_vec1::<f32>().map_err(err)?;
            let stored = stored_z0
                .to_dtype(DType::F32)
                .and_then(|x| x.to_vec1::<f32>())
                .map_err(err)?;
            let norm = rebuilt
                .iter()
                .map(|x| x.abs())
                .fold(0.0f32, f32::max)
                .max(1e-12);
            let worst = rebuilt
                .iter()
                .zip(&stored)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            if worst > 1e-3 * norm {
                return Err(format!(
                    "module `{path}`: the base weight differs from the one the adapter was trained on (z0 rebuilt from it differs by {worst:.3e})"
                ));
            }
            let z =
                t.0.get("z")
                    .ok_or_else(|| format!("module `{path}`: z missing"))?;
            d.z.set(
                &z.to_dtype(DType::F32)
                    .map_err(err)?
                    .to_device(d.z.device())
                    .map_err(err)?,
            )
            .map_err(err)?;
            if let (super::diagonal::Scale::Trainable(s), Some(v)) = (&d.scale, t.0.get("scale")) {
                s.set(
                    &v.to_dtype(DType::F32)
                        .map_err(err)?
                        .reshape(1)
                        .map_err(err)?
                        .to_device(s.device())
                        .map_err(err)?,
                )
                .map_err(err)?;
            }
        }
        None => return Err(format!("module `{path}`: no adapter was attached")),
    }
    Ok(())
}

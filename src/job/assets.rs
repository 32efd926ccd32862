//! The files of a job folder that do not depend on the run (the Python scripts, requirements)
//! and the templates of those that do (README, accelerate configs), compiled into the binary
//! from `assets/job/`.

/// `train.py`.
pub const TRAIN_PY: &str = include_str!("../../assets/job/train.py");
/// `peft_studio_adapters.py`: SVFit and LoLDU in PyTorch.
pub const ADAPTERS_PY: &str = include_str!("../../assets/job/peft_studio_adapters.py");
/// `requirements.txt`.
pub const REQUIREMENTS: &str = include_str!("../../assets/job/requirements.txt");
/// The README template.
pub const README: &str = include_str!("../../assets/job/README.md");

/// The accelerate configurations: (file name under `accelerate/`, template).
pub const ACCELERATE_CONFIGS: [(&str, &str); 6] = [
    (
        "single_gpu.yaml",
        include_str!("../../assets/job/accelerate/single_gpu.yaml"),
    ),
    (
        "multi_gpu.yaml",
        include_str!("../../assets/job/accelerate/multi_gpu.yaml"),
    ),
    (
        "multi_node.yaml",
        include_str!("../../assets/job/accelerate/multi_node.yaml"),
    ),
    (
        "deepspeed_zero2.yaml",
        include_str!("../../assets/job/accelerate/deepspeed_zero2.yaml"),
    ),
    (
        "deepspeed_zero3.yaml",
        include_str!("../../assets/job/accelerate/deepspeed_zero3.yaml"),
    ),
    (
        "cpu_2proc.yaml",
        include_str!("../../assets/job/accelerate/cpu_2proc.yaml"),
    ),
];

/// Replaces every `{{key}}` of `template` by its value; a placeholder left unfilled is an
/// error (a template and its caller out of step).
pub fn fill(template: &str, values: &[(&str, String)]) -> anyhow::Result<String> {
    let mut out = template.to_string();
    for (k, v) in values {
        out = out.replace(&format!("{{{{{k}}}}}"), v);
    }
    if let Some(start) = out.find("{{") {
        let rest = &out[start..];
        let end = rest.find("}}").map_or(rest.len(), |e| e + 2);
        anyhow::bail!("job template: `{}` has no value", &rest[..end]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_replaces_and_refuses_leftovers() {
        assert_eq!(fill("a {{x}} b", &[("x", "1".into())]).unwrap(), "a 1 b");
        let e = fill("a {{y}}", &[("x", "1".into())])
            .unwrap_err()
            .to_string();
        assert!(e.contains("{{y}}"), "{e}");
    }
}

//! The job's SVFit and LoLDU PyTorch modules (`assets/job/peft_studio_adapters.py`) against
//! peft-studio: the same base weights and adapter values give the same outputs.
//!
//! `scripts/job_modules_reference.py` wrote, per case, an adapter folder (by the PyTorch
//! module's `save`) and the layer's weights, an input and the PyTorch output
//! (`tests/reference/job_modules/<case>/`). peft-studio loads the adapter onto the same
//! weights (rebuilding its own factors, LoLDU replaying the stored pivots) and must reproduce
//! the output. A second test reruns the script where the PyTorch peer is installed, so the
//! template in `assets/job/` is what is checked, not only the committed numbers.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use peft_studio::peft::{AdaptedLinear, LayerSet, load_adapter};

const CASES: [&str; 4] = ["svfit", "svfit_relu", "loldu", "loldu_constant"];

/// Loads the case in `dir` into peft-studio; returns (max |y − y_torch|, max |y_torch|).
fn compare(dir: &Path) -> (f32, f32) {
    let io = candle_core::safetensors::load(dir.join("io.safetensors"), &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let get = |k: &str| io.get(k).unwrap_or_else(|| panic!("io lacks {k}")).clone();
    let mut set = LayerSet {
        layers: vec![AdaptedLinear::new("layer", get("w"), Some(get("b")))],
    };
    load_adapter(&mut set, dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let y = set.layers[0].forward(&get("x")).unwrap();
    let diff = (y - get("y")).unwrap().abs().unwrap().max_all().unwrap();
    let scale = get("y").abs().unwrap().max_all().unwrap();
    let f = |t: Tensor| t.to_scalar::<f32>().unwrap();
    (f(diff), f(scale))
}

fn check_all(root: &Path) {
    for case in CASES {
        let (diff, scale) = compare(&root.join(case));
        println!("{case}: max |y − y_pytorch| = {diff:.3e} (max |y| {scale:.3})");
        assert!(
            diff <= 2e-5 * scale.max(1.0),
            "{case}: peft-studio and the PyTorch module differ by {diff:e}"
        );
    }
}

#[test]
fn pytorch_modules_match_peft_studio_on_committed_reference() {
    check_all(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/job_modules"));
}

fn peer_python() -> Option<PathBuf> {
    let venv = std::env::var_os("PEER_VENV")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/peft-peer")))?;
    let py = venv.join("bin/python");
    py.is_file().then_some(py)
}

#[test]
fn pytorch_modules_match_peft_studio_freshly_computed() {
    let Some(py) = peer_python() else {
        eprintln!("skipped: no PyTorch peer venv (~/.cache/peft-peer or PEER_VENV)");
        return;
    };
    let out = std::env::temp_dir().join(format!("peft-studio-job-modules-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/job_modules_reference.py");
    let status = std::process::Command::new(py)
        .arg(script)
        .arg("--out")
        .arg(&out)
        .status()
        .expect("run the reference script");
    assert!(status.success(), "scripts/job_modules_reference.py failed");
    check_all(&out);
    let _ = std::fs::remove_dir_all(&out);
}

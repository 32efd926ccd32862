//! `check_logits.json`: a fixed input and the logits peft-studio computes for it with the
//! exported model, written next to an export so that another implementation (PEFT +
//! transformers, `scripts/peft_interop.py`) can load the export and compare.

use std::path::Path;

use candle_core::Tensor;

use crate::device::HOST;
use serde_json::json;

use crate::fsio;
use crate::models::{Batch, Classifier, InputKind};

/// The file name.
pub const FILE: &str = "check_logits.json";

/// Writes `check_logits.json` into `dir`: `kind` (`causal_lm`, `text` or `image`), the input
/// (`input_ids`, or `pixel_values` with its shape), and the logits as nested lists.
pub fn write(
    dir: &Path,
    kind: &str,
    input: serde_json::Value,
    logits: &Tensor,
) -> anyhow::Result<()> {
    let dims = logits.dims().to_vec();
    let flat = logits
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let v = json!({
        "kind": kind,
        "input": input,
        "logits_shape": dims,
        "logits": flat,
    });
    fsio::write_atomic(&dir.join(FILE), serde_json::to_string(&v)?.as_bytes())?;
    Ok(())
}

/// The fixed input for a classifier (two examples) and its logits.
pub fn write_classifier(dir: &Path, model: &dyn Classifier) -> anyhow::Result<()> {
    // Exports run in host memory (see export::run).
    let dev = HOST;
    match model.input() {
        InputKind::Image {
            channels,
            height,
            width,
        } => {
            let n = 2 * channels * height * width;
            let px: Vec<f32> = (0..n)
                .map(|i| ((i * 37 + 11) % 255) as f32 / 127.5 - 1.0)
                .collect();
            let t = Tensor::from_vec(px.clone(), (2, channels, height, width), &dev)?;
            let logits = model.forward_t(&Batch::Images(t), false)?;
            write(
                dir,
                "image",
                json!({"pixel_values": px, "shape": [2, channels, height, width]}),
                &logits,
            )
        }
        InputKind::Text { max_positions, .. } => {
            let t = 8.min(max_positions);
            let ids: Vec<u32> = (0..2 * t).map(|i| ((i * 7 + 3) % 40 + 1) as u32).collect();
            let idt = Tensor::from_vec(ids.clone(), (2, t), &dev)?;
            let mask = Tensor::ones((2, t), candle_core::DType::F32, &dev)?;
            let logits = model.forward_t(&Batch::Tokens { ids: idt, mask }, false)?;
            let rows: Vec<&[u32]> = ids.chunks(t).collect();
            write(dir, "text", json!({ "input_ids": rows }), &logits)
        }
    }
}

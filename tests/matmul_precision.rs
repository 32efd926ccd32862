//! `model.matmul_precision = "bf16"`: the frozen base's products in bf16 with f32 sums on Intel
//! AMX or AVX512-BF16. Where the CPU has either, a run's losses follow the f32 run's within mixed-precision
//! tolerance and differ from them (the bf16 path ran); elsewhere the setting falls back to f32
//! (identical losses) and the log says why.

mod common;

use common::chat::{chat_model, config, yes_data};

use peft_studio::bf16_gemm;
use peft_studio::peft::MatmulPrecision;
use peft_studio::train::{Event, NeverStop, RunStore, train};

#[test]
fn a_bf16_run_follows_the_f32_run_and_says_what_the_cpu_runs() {
    let dir = common::TempDir::new("bf16-run");
    let model = chat_model(&dir.path("model"));
    let data = yes_data(&dir.0);
    let f32_cfg = config(&model, &data, 6);
    let mut bf16_cfg = f32_cfg.clone();
    bf16_cfg.model.matmul_precision = MatmulPrecision::Bf16;

    let store = RunStore::new(dir.path("runs"));
    let plain = train(&f32_cfg, &store, &mut NeverStop, &mut |_| {}).unwrap();
    let mut logs = Vec::new();
    let bf16 = train(&bf16_cfg, &store, &mut NeverStop, &mut |e| {
        if let Event::Log(l) = e {
            logs.push(l)
        }
    })
    .unwrap();
    let (a, b) = (
        common::step_losses(&store, &plain.id),
        common::step_losses(&store, &bf16.id),
    );
    assert_eq!((a.len(), b.len()), (6, 6));
    let said = logs
        .iter()
        .find(|l| l.contains("model.matmul_precision"))
        .unwrap_or_else(|| panic!("no precision line in {logs:?}"));
    if let Some(kernel) = bf16_gemm::kernel() {
        assert!(
            said.contains(&format!("bf16 on {}", kernel.name())),
            "{said}"
        );
        assert!(
            a.iter().zip(&b).any(|(x, y)| x != y),
            "bf16 losses are the f32 ones: the bf16 path did not run"
        );
        // The first step starts from the same weights: only rounding separates the losses.
        // Later steps follow diverging (high learning-rate) trajectories, so looser, and the
        // bf16 run must learn as the f32 run does.
        assert!(
            (a[0] - b[0]).abs() <= 0.01 * a[0],
            "f32 {a:?} vs bf16 {b:?}"
        );
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 0.1 * x.abs(), "f32 {a:?} vs bf16 {b:?}");
        }
        assert!(b[5] < 0.5 * b[0], "the bf16 run did not learn: {b:?}");
    } else {
        assert!(said.contains("neither AMX nor AVX512-BF16"), "{said}");
        for (x, y) in a.iter().zip(&b) {
            assert!(
                (x - y).abs() < 1e-9,
                "without a bf16 kernel bf16 runs f32: {a:?} vs {b:?}"
            );
        }
    }
}

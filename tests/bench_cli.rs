//! The `bench` command's argument checks through the real binary: every bad argument is a clear
//! error (exit 1, no panic) before any work starts.

use std::process::Command;

fn bench(dir: &std::path::Path, args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_peft-studio"))
        .current_dir(dir)
        .arg("bench")
        .args(args)
        .env("PEER_VENV", dir.join("no-venv"))
        .output()
        .expect("running peft-studio");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_bench_arguments_are_clear_errors_not_panics() {
    let dir = std::env::temp_dir().join(format!("peft-bench-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases: [(&[&str], &str); 6] = [
        (
            &["frozen-backward", "--steps", "0"],
            "--steps must be 1 to 10000, got 0",
        ),
        (
            &["minilm", "--steps", "0"],
            "--steps must be 1 to 10000, got 0",
        ),
        (
            &["minilm", "--rounds", "0"],
            "--rounds must be 1 to 20, got 0",
        ),
        (
            &["frozen-backward", "--threads", "0"],
            "--threads must be 1 to 1024",
        ),
        (&["minilm", "--only", "qlora"], "unknown variant `qlora`"),
        // No downloads/ in this folder: named, before any work.
        (
            &["minilm", "--steps", "1"],
            "run scripts/fetch-models.sh first",
        ),
    ];
    for (args, want) in cases {
        let (code, err) = bench(&dir, args);
        assert_eq!(code, 1, "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

//! The compute threads. candle's matmuls (through gemm) and the fused kernels of
//! [`models::ops`](crate::models::ops) run on rayon's global pool; candle 0.11's element-wise
//! ops run on a second pool of its own (the "barrier pool", `CANDLE_NUM_THREADS − 1` threads
//! pinned to cores) whose caller and workers busy-wait for each other. Left alone, a 2-thread
//! run has four threads on two cores: the driver, a rayon worker, a barrier-pool worker, and
//! whichever of them spins at the moment; on a shared or busy machine the spinning thread takes
//! the core the working one needs (a perf profile of a MiniLM LoRA step on a loaded 2-core
//! machine: 19% of the samples in the barrier's spin loop).
//!
//! [`single_compute_pool`] empties the barrier pool (element-wise ops run on the calling
//! thread, memory-bound anyway) and [`join_compute_pool`] makes the calling thread one of
//! rayon's, so a run uses exactly the configured number of threads, all in one pool.

/// Keeps candle's element-wise ops on the calling thread (`CANDLE_NUM_THREADS=1`) unless the
/// user chose otherwise. Call it first thing in `main`, before any other thread exists.
pub fn single_compute_pool() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // SAFETY: called at the start of `main`, while the process has a single thread, so no
        // other thread can read or write the environment at the same time.
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
    }
}

/// Builds rayon's global pool with the calling thread as one of its `n` workers, where `n` is
/// the thread count candle's matmuls use (`RAYON_NUM_THREADS`, else the number of cores). Call
/// it once, early, from the thread that will run the computation (the command line's main
/// thread). Returns false (and changes nothing) when the global pool already exists.
pub fn join_compute_pool() -> bool {
    let n = candle_core::utils::get_num_threads().max(1);
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .use_current_thread()
        .thread_name(|i| format!("compute-{i}"))
        .build_global()
        .is_ok()
}

/// Runs `f` on the calling thread as one of a new compute pool's `n` threads (the count
/// [`join_compute_pool`] uses), so that a long-lived thread other than `main` (the window's
/// worker) computes with exactly the configured number of threads, as the command line does.
/// Without it the worker hands its matmuls to rayon's global pool of `n` threads and computes
/// the rest itself: `n + 1` busy threads on `n` cores (in the window, built-in LoRA preset, 2
/// cores: 0.65–0.74× the command line's steps per second). Falls back to running `f` as it is
/// when the pool cannot be built.
pub fn with_compute_pool<R: Send>(name: &str, f: impl FnOnce() -> R + Send) -> R {
    let n = candle_core::utils::get_num_threads().max(1);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .use_current_thread()
        .thread_name({
            let name = name.to_string();
            move |i| format!("{name}-compute-{i}")
        })
        .build();
    match pool {
        Ok(pool) => pool.install(f),
        Err(e) => {
            log::warn!(
                "{name}: no compute pool of its own ({e}); computing on rayon's global pool"
            );
            f()
        }
    }
}

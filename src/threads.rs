//! The compute threads. candle's matmuls (through gemm) and the fused kernels of
//! [`models::ops`](crate::models::ops) all run on rayon's global pool. Left alone, that pool
//! has one thread per core *besides* the thread that drives training, so on a 2-core machine
//! three threads compete for two cores: the driver's serial work between parallel ops runs
//! while the pool's threads spin waiting for the next job. [`join_compute_pool`] makes the
//! calling thread one of the pool's threads instead, so the pool and the driver together use
//! exactly the configured number of threads.

/// Builds rayon's global pool with the calling thread as one of its `n` workers, where `n` is
/// candle's thread count (`RAYON_NUM_THREADS`, else the number of cores). Call it once, early,
/// from the thread that will run the computation (the command line's main thread). Returns
/// false (and changes nothing) when the global pool already exists.
pub fn join_compute_pool() -> bool {
    let n = candle_core::utils::get_num_threads().max(1);
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .use_current_thread()
        .thread_name(|i| format!("compute-{i}"))
        .build_global()
        .is_ok()
}

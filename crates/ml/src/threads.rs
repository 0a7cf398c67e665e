//! One pool of worker threads for a process's tensor work on the CPU.
//!
//! tunenet splits its heavy CPU work across rayon's pool: the packed matrix products
//! (`pgemm`), inference's sequence groups, the fused training kernels. candle 0.11 runs
//! its own element-wise operations (additions, scalings, casts) on a second pool of its own,
//! `RAYON_NUM_THREADS - 1` workers that after every operation spin for up to 25 000
//! pauses before they sleep. With as many threads as cores, those spinning workers take
//! the cores rayon's threads are working on: profiled on SmolLM2 LoRA training at two
//! threads, candle's idle worker spinning was 17.7 % of the samples, and with grouped
//! inference two groups' operations queued behind each other on that pool's one lock.
//!
//! [`one_tensor_pool`] leaves candle's element-wise operations on the thread that calls
//! them (its pool with no workers of its own; candle's matrix products still use rayon's
//! pool). Measured on a 2-core EPYC at two threads, alternated (`docs/BENCHMARKS.md`):
//! SmolLM2 LoRA training +18 %, evaluation +24-32 %. At one thread nothing changes.

/// The environment variable candle reads, once, for the size of its element-wise pool.
pub const CANDLE_POOL_VAR: &str = "CANDLE_NUM_THREADS";

/// Keeps candle's element-wise operations on their calling threads (see the module's
/// note), unless `CANDLE_NUM_THREADS` is already set (an operator's choice stands).
/// Call first thing in `main`, before the process starts any other thread. Returns
/// whether it set the variable.
pub fn one_tensor_pool() -> bool {
    if std::env::var_os(CANDLE_POOL_VAR).is_some() {
        return false;
    }
    // SAFETY: called at the start of `main`, before any other thread exists that could
    // read or write the environment at the same time.
    unsafe { std::env::set_var(CANDLE_POOL_VAR, "1") };
    true
}

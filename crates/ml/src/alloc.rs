//! The C allocator's settings for a process that trains and scores models.
//!
//! A training step allocates and frees the same large tensors every time: activations,
//! their gradients, candle's zeroed gradient accumulators, each a few hundred KiB to tens
//! of MiB. glibc serves every block above its mmap threshold (128 KiB at first, raised
//! only as freed blocks teach it) with a fresh `mmap`, and returns the top of its heap to
//! the kernel once 128 KiB lie free there; so a step's temporaries are faulted in and
//! zeroed by the kernel again on every step. Profiled on SmolLM2 LoRA training (one
//! thread), the kernel's page clearing was a quarter of the time (`docs/BENCHMARKS.md`).
//!
//! [`keep_freed_memory`] raises the threshold to glibc's maximum and keeps freed memory in
//! the process, so a step reuses the previous step's pages. The peak is unchanged (the
//! same tensors live at once); what changes is that the process holds its peak between
//! steps instead of handing it back and faulting it in again.
//!
//! glibc's largest threshold is 32 MiB, and blocks above it still came from a fresh `mmap`
//! every time: SmolLM2's logits (50 MB for 4 x 64 tokens over a 49 152-token vocabulary),
//! the tied embedding's gradient (113 MB) and candle's accumulator for it. So mmap is
//! turned off altogether (`M_MMAP_MAX` 0): every block comes from a heap, and a freed large
//! block is reused by the next step. Measured on SmolLM2 (`docs/BENCHMARKS.md`): LoRA
//! training +19-23 %, full +15-21 %, evaluation +5-10 %, for 2-3 % more peak RSS (freed
//! blocks are kept where a fresh mapping would have been released).
//!
//! Nor does glibc trim the heap's top on its own: with a threshold (it was 1 GiB), a step
//! whose frees left more than that free at the top handed it back, and the next step
//! faulted it all in again; full fine-tuning of SmolLM2 hit it once its weight gradients
//! were allocated in a different order (the kernel's page clearing became 42 % of a
//! step). Instead a training run gives its free memory back when it ends
//! ([`GiveBackWhenDone`], glibc's `malloc_trim`), so a miner between jobs does not hold its
//! last job's peak. A validator, which evaluates all the time, keeps its evaluations'.

/// glibc's largest mmap threshold on 64-bit targets (`DEFAULT_MMAP_THRESHOLD_MAX`):
/// blocks up to 32 MiB come from the reused heap.
pub const MMAP_THRESHOLD: i32 = 32 << 20;

/// Blocks glibc may serve with their own `mmap`: none (see the module's note).
pub const MMAP_MAX: i32 = 0;

/// Free memory at the top of a heap that glibc keeps before returning it: -1, never on
/// its own (see the module's note; [`give_back_freed_memory`] does it when a job ends).
pub const TRIM_THRESHOLD: i32 = -1;

/// Extra bytes glibc asks the kernel for whenever a heap grows (64 MiB; address space
/// only until touched), so a growing heap does not grow one block at a time.
pub const TOP_PAD: i32 = 64 << 20;

/// Sets glibc's allocator to keep and reuse freed memory (see the module's note). Call
/// once, early in `main`; a no-op where the C library is not glibc. Returns whether
/// every setting took.
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes the allocator's parameters; glibc serialises it
        // with allocation, and every value is within the range its manual gives.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                && libc::mallopt(libc::M_MMAP_MAX, MMAP_MAX) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
                && libc::mallopt(libc::M_TOP_PAD, TOP_PAD) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Hands the heap's free memory back to the kernel (glibc's `malloc_trim`), which
/// [`keep_freed_memory`] stops glibc from doing on its own. Returns whether any was
/// released; a no-op where the C library is not glibc.
pub fn give_back_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim only returns free pages; glibc locks every arena it walks.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Calls [`give_back_freed_memory`] when dropped: made first in a training run, so that it
/// runs last, after the run's tensors are freed, however the run ends.
pub(crate) struct GiveBackWhenDone;

impl Drop for GiveBackWhenDone {
    fn drop(&mut self) {
        give_back_freed_memory();
    }
}

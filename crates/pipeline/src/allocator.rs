//! Process-wide allocator settings for training and extraction.
//!
//! # Why
//! candle allocates a fresh buffer for every tensor op. glibc's malloc serves blocks above
//! its mmap threshold (128 KiB at start, adapting up to 32 MiB) with `mmap`, and returns freed
//! memory at the top of a heap above its trim threshold to the OS; every training step then
//! gets its buffers back as new pages, each zero-filled by a page fault. Measured on the
//! 2-core machine (BENCHMARKS.md, issue 5): 295,000 page faults and 1.3 s of system time in
//! 30 epochs of the linear head (2.8 s in all), 1.9 million faults per CNN epoch. Raising
//! both thresholds keeps freed memory in the process for reuse: the head then trains in
//! 1.1-1.5 s and a CNN epoch drops from 8.9 s to 6.6 s. The cost: memory freed after a peak is
//! not handed back until the process exits, which for a run-to-completion tool is the peak
//! it had anyway.
//!
//! Only glibc (Linux, `target_env = "gnu"`) is tuned; elsewhere this does nothing.

use std::sync::OnceLock;

/// Blocks at least this large still come straight from `mmap` (a huge one-off buffer such as a
/// whole feature matrix should not pin heap memory).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: i32 = 256 << 20;
/// Free memory at the top of a heap is returned to the OS only beyond this.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: i32 = 1 << 30;

/// Applies the settings once per process (later calls do nothing). Returns whether glibc
/// accepted them (false off glibc).
pub fn keep_freed_memory() -> bool {
    static ACCEPTED: OnceLock<bool> = OnceLock::new();
    *ACCEPTED.get_or_init(tune)
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune() -> bool {
    // glibc's <malloc.h>.
    const M_TRIM_THRESHOLD: i32 = -1;
    const M_MMAP_THRESHOLD: i32 = -3;
    extern "C" {
        fn mallopt(param: i32, value: i32) -> i32;
    }
    // SAFETY: mallopt only changes malloc's parameters; it is thread-safe and returns 1 on
    // success, 0 when it rejects a value.
    unsafe {
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
            && mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune() -> bool {
    false
}

#[cfg(test)]
mod tests {
    #[test]
    fn glibc_accepts_the_settings() {
        let ok = super::keep_freed_memory();
        assert_eq!(ok, cfg!(all(target_os = "linux", target_env = "gnu")));
        // Idempotent.
        assert_eq!(super::keep_freed_memory(), ok);
    }
}

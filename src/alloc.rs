//! Memory allocator policy for the training and generation loops.
//!
//! Each step allocates and frees the same large tensors again (activations, gradients,
//! logits). glibc's malloc serves blocks above its mmap threshold (128 KiB to start) with a
//! fresh `mmap` and returns them to the kernel on free, and trims the heap top beyond 128 KiB:
//! every step then faults in and zeroes its memory again (on the demo SFT run 37 M minor page
//! faults and ~20% of the time in the kernel). [`reuse_freed_memory`] raises the mmap threshold
//! to its maximum (32 MiB on 64-bit) and keeps freed memory in the heap for the next step.
//! Peak resident memory is unchanged (the next step reuses what the previous freed); memory
//! freed at the peak is kept by the process until it exits. Measured in BENCHMARKS.md.

/// Apply the policy above (glibc on Linux; elsewhere a no-op). Call once at program start,
/// before other threads exist.
pub fn reuse_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes malloc's parameters; called before any other thread runs.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}

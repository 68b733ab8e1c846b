//! Stopping a run without losing it: SIGTERM (preemption, a job's time limit) or SIGINT (Ctrl-C)
//! makes a run finish its current optimizer step, write a checkpoint and exit with
//! [`Interrupted`] (exit status 128 + the signal, as a shell reports a process the signal
//! killed, so schedulers see an interrupted job); a second signal ends the process at once.
//! On many ranks and nodes the ranks agree after every step (one all-reduce of a flag), so all
//! stop at the same step.

use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, Ordering};

/// The first stop signal received (0: none).
static SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    if SIGNAL.swap(sig, Ordering::SeqCst) != 0 {
        // The second signal: stop now. (_exit is async-signal-safe.)
        // SAFETY: ends the process; nothing runs after it.
        unsafe { libc::_exit(128 + sig) };
    }
}

/// From now on SIGTERM and SIGINT ask the run to stop after its current step.
pub fn catch_stop_signals() {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: installs a handler that only touches an atomic and calls _exit.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(sig, &action, std::ptr::null_mut());
        }
    }
}

/// The stop signal received so far, if any.
pub fn stop_signal() -> Option<i32> {
    match SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// `SIGTERM`, `SIGINT` or the number.
pub fn signal_name(sig: i32) -> String {
    match sig {
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGINT => "SIGINT".into(),
        s => format!("signal {s}"),
    }
}

/// A run stopped by a signal, after its step `step`.
#[derive(Debug, thiserror::Error)]
#[error(
    "interrupted by {} after step {step}{}",
    signal_name(*.signal),
    match .checkpoint {
        Some(c) => format!(": checkpoint written to {}; --resume continues from it", c.display()),
        None => String::new(),
    }
)]
pub struct Interrupted {
    pub signal: i32,
    pub step: usize,
    /// The checkpoint written at the stop (rank 0 of node 0).
    pub checkpoint: Option<PathBuf>,
}

impl Interrupted {
    /// The process's exit status: 128 + the signal.
    pub fn exit_code(&self) -> i32 {
        128 + self.signal
    }
}

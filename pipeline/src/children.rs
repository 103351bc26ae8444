//! Child processes that must not outlive this one when it is stopped by a signal.
//!
//! The demo and the benchmark start servers (Tansu, `redis-server`) and measured processes
//! (`verdict run`, the Python baseline) as children, and kill them when the owning value is
//! dropped. A signal's default action ends the process without running any destructor, so
//! `kill <pid>` (or a CI job's timeout) left them running: a `verdict run` kept consuming,
//! and a server kept its port. [`kill_children_on_signal`] closes that gap: on SIGINT,
//! SIGTERM or SIGHUP every tracked child gets SIGKILL, then the signal's default action runs
//! (so the exit status still says which signal it was).
//!
//! The handler may only call async-signal-safe functions, so the registry is a fixed array of
//! atomics, not a locked `Vec`: registering and the handler never allocate or block.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Once;

/// More than any command starts at once (a scale-out bench: a few `verdict run`s and two
/// servers). A child that finds no free slot is still killed on drop, only not on a signal.
const SLOTS: usize = 64;

static CHILDREN: [AtomicI32; SLOTS] = [const { AtomicI32::new(0) }; SLOTS];

/// A child's entry in the registry; dropping it removes the entry. Keep it beside the
/// `Child` and drop it when the child has been killed or has exited.
#[derive(Debug)]
pub struct Tracked {
    slot: Option<usize>,
}

/// Records `pid` as a child to kill on a signal.
pub fn track(pid: u32) -> Tracked {
    let Ok(pid) = i32::try_from(pid) else {
        return Tracked { slot: None };
    };
    let slot = CHILDREN.iter().position(|entry| {
        entry
            .compare_exchange(0, pid, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    });
    Tracked { slot }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if let Some(slot) = self.slot {
            CHILDREN[slot].store(0, Ordering::Release);
        }
    }
}

/// Installs the handler for SIGINT, SIGTERM and SIGHUP (once). For commands that start
/// children; not for `verdict run`, which handles SIGTERM itself by draining.
pub fn kill_children_on_signal() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            // SAFETY: `on_signal` only calls async-signal-safe functions (kill, signal,
            // raise) and reads atomics; the sigaction struct is fully initialised.
            unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = on_signal as *const () as libc::sighandler_t;
                libc::sigemptyset(&mut action.sa_mask);
                libc::sigaction(signal, &action, std::ptr::null_mut());
            }
        }
    });
}

extern "C" fn on_signal(signal: libc::c_int) {
    for entry in &CHILDREN {
        let pid = entry.load(Ordering::Acquire);
        if pid > 0 {
            // SAFETY: kill(2) is async-signal-safe; the pid is a child not yet reaped.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
    // SAFETY: signal(2) and raise(3) are async-signal-safe. With the default action back in
    // place, raising the signal again ends the process as the signal would have.
    unsafe {
        libc::signal(signal, libc::SIG_DFL);
        libc::raise(signal);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_entry_frees_its_slot() {
        let pid = 4_000_000 + std::process::id() as i32 % 1000;
        let tracked = track(pid as u32);
        let slot = tracked.slot.expect("a free slot");
        assert_eq!(CHILDREN[slot].load(Ordering::Acquire), pid);
        drop(tracked);
        assert_eq!(CHILDREN[slot].load(Ordering::Acquire), 0);
    }
}

//! What nf-runtime and nf-vswitch share as processes: command-line arguments, logging, and
//! a graceful reaction to SIGTERM.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::endpoint::IdlePolicy;

static TERMINATE: AtomicBool = AtomicBool::new(false);

extern "C" fn on_terminate(_sig: libc::c_int) {
    TERMINATE.store(true, Ordering::Relaxed);
}

/// Makes SIGTERM and SIGINT set a flag instead of killing the process, so the worker loop
/// can hand back its cached buffers before exiting. (nfmgr also sets the slot's stop flag and
/// rings the doorbell; either way ends the loop.)
pub fn install_termination_flag() {
    // SAFETY: installs an async-signal-safe handler that only stores to an atomic.
    unsafe {
        libc::signal(
            libc::SIGTERM,
            on_terminate as *const () as libc::sighandler_t,
        );
        libc::signal(
            libc::SIGINT,
            on_terminate as *const () as libc::sighandler_t,
        );
    }
}

pub fn terminate_requested() -> bool {
    TERMINATE.load(Ordering::Relaxed)
}

/// Arguments every data-plane process takes from nfmgr.
#[derive(Clone, Debug, clap::Args)]
pub struct CommonArgs {
    /// The shared region nfmgr created.
    #[arg(long)]
    pub region: PathBuf,
    /// This process's slot in the region.
    #[arg(long)]
    pub slot: u16,
    /// Keep polling this long after the last work before sleeping.
    #[arg(long, default_value_t = 50)]
    pub idle_poll_us: u64,
}

impl CommonArgs {
    pub fn idle_policy(&self, busy_poll: bool) -> IdlePolicy {
        IdlePolicy {
            poll_for: Duration::from_micros(self.idle_poll_us),
            max_sleep: Duration::from_millis(100),
            busy_poll,
        }
    }
}

//! What nf-runtime and nf-vswitch share as processes: command-line arguments, logging, and
//! a graceful reaction to SIGTERM.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use std::time::Instant;

use crate::endpoint::{Endpoint, Idle, IdlePolicy};
use crate::slot::ProcessKind;
use crate::stats::ProcCounter;

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
    /// Switch to this unprivileged user and group (`UID:GID`) before the first packet.
    #[arg(long)]
    pub run_as: Option<crate::sandbox::RunAs>,
    /// The system-call filter entered before the first packet: enforce, log or off.
    #[arg(long, value_name = "MODE", default_value_t = crate::sandbox::SeccompMode::Off)]
    pub seccomp: crate::sandbox::SeccompMode,
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

/// Logs to stderr, filtered by `NF_LOG` (default `info`).
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("NF_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_target(false)
        .with_writer(std::io::stderr)
        .init();
}

/// Attaches a data-plane process to its slot, or explains why not. nfmgr reports the exit
/// status (2) and restarts the process as its policy says.
pub fn attach(
    args: &CommonArgs,
    kind: ProcessKind,
) -> Result<Endpoint, crate::endpoint::EndpointError> {
    let ep = Endpoint::attach(&args.region, args.slot, kind)?;
    install_termination_flag();
    Ok(ep)
}

/// Why a data-plane process could not set itself up from what nfmgr stored in its region.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("the stored configuration is not UTF-8")]
    NotUtf8,
    #[error("stored configuration: {0}")]
    Config(#[source] crate::config::ConfigError),
    #[error("no {kind} named `{name}` in the configuration")]
    Unknown { kind: &'static str, name: String },
    /// A function of the process's chain could not be built from its settings.
    #[error("{0}")]
    Chain(#[source] crate::config::ConfigError),
    #[error("runtime.{runtime}.events: cannot open {}: {source}", path.display())]
    EventLog {
        runtime: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The configuration nfmgr stored in the region `ep` is attached to.
pub fn stored_config(ep: &Endpoint) -> Result<crate::config::Config, StartError> {
    let text = std::str::from_utf8(ep.region().blob()).map_err(|_| StartError::NotUtf8)?;
    crate::config::Config::from_frozen(text).map_err(StartError::Config)
}

/// The name nfmgr gave the process in `ep`'s slot.
pub fn own_name(ep: &Endpoint) -> String {
    ep.region()
        .slot(ep.slot())
        .map(|s| s.name.get())
        .unwrap_or_default()
}

/// Enters the sandbox the command line asks for (`nflib::sandbox`): called once everything
/// the process needs is open, before its loop reads a packet.
pub fn enter_sandbox(args: &CommonArgs) -> Result<(), crate::sandbox::SandboxError> {
    crate::sandbox::enter(args.run_as, args.seccomp)
}

/// The run-to-completion loop every data-plane process shares: until nfmgr asks it to stop,
/// call `work` (which returns how many packets or messages it handled), account busy time,
/// publish counters every 100 ms, and poll or sleep when there was nothing to do. Then hand
/// back cached buffers and publish a last time.
/// A loop iteration longer than this is counted as slow (`loops_slow`).
const SLOW_LOOP_NS: u64 = 1_000_000;

pub fn run_loop(
    ep: &mut Endpoint,
    args: &CommonArgs,
    mut work: impl FnMut(&mut Endpoint, Instant) -> usize,
) {
    let mut idle = Idle::new(args.idle_policy(ep.busy_poll()));
    ep.announce_running();
    let mut last_publish = Instant::now();
    while !ep.stop_requested() && !terminate_requested() {
        let t0 = Instant::now();
        let n = work(ep, t0);
        ep.flush_wakes();
        if n > 0 {
            let busy = t0.elapsed().as_nanos() as u64;
            ep.counters().add(ProcCounter::BusyNs as usize, busy);
            // An iteration this long lets the input ring fill (4096 packets last 40 ms at
            // 100,000 a second): worth telling apart from a process that did not run.
            if busy > SLOW_LOOP_NS {
                ep.counters().add(ProcCounter::LoopsSlow as usize, 1);
            }
            let us = busy / 1000;
            if us > ep.counters().get(ProcCounter::LoopMaxUs as usize) {
                ep.counters().set(ProcCounter::LoopMaxUs as usize, us);
            }
        }
        ep.counters().add(ProcCounter::Loops as usize, 1);
        if t0.duration_since(last_publish) >= Duration::from_millis(100) {
            ep.publish();
            last_publish = t0;
        }
        idle.after(ep, n > 0);
    }
    ep.shutdown();
}

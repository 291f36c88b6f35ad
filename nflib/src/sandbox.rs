//! The data-path processes' sandbox: what a runtime or vswitch may still do once it has
//! attached to its region and built what it needs, before it reads its first packet.
//!
//! nf-runtime and nf-vswitch parse traffic that an attacker controls. Should one be taken
//! over, it must not become a way into the rest of the server or the cluster. So, in this
//! order (issue 22, finding 2; docs/SECURITY.md):
//!
//! 1. **An unprivileged user.** Started as root (nfmgr runs as root on a real server), the
//!    process switches to `supervisor.user` (`nobody` by default): supplementary groups
//!    cleared, real, effective and saved ids all changed, so that it holds no capability
//!    and can never take root back. It can no longer read the cluster key or any file only
//!    root may read, nor signal or trace nfmgr.
//! 2. **The parent-death signal again.** Changing credentials clears it, and a data-path
//!    process must not outlive the nfmgr that supervises it.
//! 3. **A system-call filter** (seccomp, `supervisor.seccomp`): only what the packet loop
//!    needs (memory, its doorbells, the clocks, sleeping, writing its log, ending). No file
//!    can be opened, no socket made, no process started, traced or signalled, no memory
//!    made executable. A call outside the list kills the process (`"enforce"`, nfmgr
//!    reports SIGSYS and restarts it), or is allowed and logged by the kernel (`"log"`, for
//!    finding what a custom network function needs).
//!
//! Everything that needs a file (the region, the doorbells, a function's rules, the event
//! log) is opened before, while the process still has nfmgr's credentials.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use nix::sys::signal::Signal;
use nix::unistd::{Gid, Uid};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};

/// What the filter does with a call outside the list (a configuration setting).
pub use nf_config::SeccompMode;

/// The user and group a data-path process switches to: `UID:GID` on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
}

/// A `UID:GID` that is not one, or names root; each carries the text at fault.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RunAsError {
    #[error("`{0}`: expected UID:GID")]
    NotUidGid(String),
    #[error("`{0}`: not a user id")]
    NotUid(String),
    #[error("`{0}`: not a group id")]
    NotGid(String),
    #[error("user id 0 is root, not an unprivileged user")]
    Root,
}

impl FromStr for RunAs {
    type Err = RunAsError;

    fn from_str(s: &str) -> Result<RunAs, RunAsError> {
        let (u, g) = s
            .split_once(':')
            .ok_or_else(|| RunAsError::NotUidGid(s.to_string()))?;
        let uid = u.parse().map_err(|_| RunAsError::NotUid(u.to_string()))?;
        let gid = g.parse().map_err(|_| RunAsError::NotGid(g.to_string()))?;
        if uid == 0 {
            return Err(RunAsError::Root);
        }
        Ok(RunAs { uid, gid })
    }
}

impl fmt::Display for RunAs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.uid, self.gid)
    }
}

/// Why the sandbox could not be entered (the process then refuses to run).
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// A call that changes credentials or process attributes failed.
    #[error("{call}: {source}")]
    Call {
        call: String,
        #[source]
        source: nix::Error,
    },
    /// After the change of user, root could still be regained: nothing was dropped.
    #[error("still able to become root after changing user")]
    RootRegainable,
    /// nfmgr exited before the parent-death signal was armed again.
    #[error("nfmgr exited while this process was starting")]
    ParentGone,
    /// The filter could not be built (or this architecture has none).
    #[error("system-call filter: {0}")]
    Filter(String),
    /// The kernel refused the filter.
    #[error("cannot install the system-call filter: {0}")]
    Install(#[source] seccompiler::Error),
}

impl From<seccompiler::BackendError> for SandboxError {
    fn from(e: seccompiler::BackendError) -> SandboxError {
        SandboxError::Filter(e.to_string())
    }
}

fn failed(call: impl Into<String>) -> impl FnOnce(nix::Error) -> SandboxError {
    let call = call.into();
    move |source| SandboxError::Call { call, source }
}

/// Enters the sandbox: `run_as` (if given) and the filter in `mode`. Called once, on the
/// main thread, after every file the process needs is open; threads started before are
/// filtered too.
pub fn enter(run_as: Option<RunAs>, mode: SeccompMode) -> Result<(), SandboxError> {
    if let Some(to) = run_as {
        drop_privileges(to)?;
    }
    if mode != SeccompMode::Off {
        let program = filter(mode)?;
        seccompiler::apply_filter_all_threads(&program).map_err(SandboxError::Install)?;
    }
    Ok(())
}

fn drop_privileges(to: RunAs) -> Result<(), SandboxError> {
    let parent = nix::unistd::getppid();
    let (uid, gid) = (Uid::from_raw(to.uid), Gid::from_raw(to.gid));
    if nix::unistd::getuid() == uid && nix::unistd::geteuid() == uid {
        return Ok(());
    }
    // Groups first: once the user id changes, the right to change them is gone.
    nix::unistd::setgroups(&[]).map_err(failed("setgroups"))?;
    nix::unistd::setresgid(gid, gid, gid).map_err(failed(format!("setresgid {gid}")))?;
    nix::unistd::setresuid(uid, uid, uid).map_err(failed(format!("setresuid {uid}")))?;
    // Paranoia: a process that could become root again has not dropped anything.
    if nix::unistd::setresuid(Uid::from_raw(0), Uid::from_raw(0), Uid::from_raw(0)).is_ok() {
        return Err(SandboxError::RootRegainable);
    }
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(failed("prctl(PR_SET_PDEATHSIG)"))?;
    // No program it could start (were the filter off) gains privileges: set-user-id bits
    // and file capabilities are ignored from here on.
    nix::sys::prctl::set_no_new_privs().map_err(failed("prctl(PR_SET_NO_NEW_PRIVS)"))?;
    // nfmgr may have died before the signal was armed again.
    if nix::unistd::getppid() != parent {
        return Err(SandboxError::ParentGone);
    }
    Ok(())
}

/// The system calls the packet loop makes once running, each with why.
fn allowed() -> Vec<(i64, &'static str)> {
    let mut calls = vec![
        // Doorbells (eventfd) and logging to the inherited stderr; the event log's writer.
        (libc::SYS_read, "doorbells"),
        (libc::SYS_write, "doorbells, log"),
        (libc::SYS_readv, "std's buffered reads"),
        (libc::SYS_writev, "std's buffered writes"),
        (libc::SYS_close, "dropping a descriptor (at exit)"),
        (libc::SYS_ppoll, "sleeping on the doorbell"),
        // Memory: allocation grows and shrinks the heap; tables are reallocated.
        (libc::SYS_brk, "heap"),
        (libc::SYS_munmap, "heap"),
        (libc::SYS_mremap, "heap"),
        (libc::SYS_madvise, "heap"),
        // Time and sleep (the clocks may leave the vDSO on some virtual machines).
        (libc::SYS_clock_gettime, "clocks"),
        (libc::SYS_clock_getres, "clocks"),
        (libc::SYS_gettimeofday, "clocks"),
        (libc::SYS_clock_nanosleep, "sleep"),
        (libc::SYS_nanosleep, "sleep"),
        (libc::SYS_restart_syscall, "a sleep interrupted by a signal"),
        (libc::SYS_sched_yield, "spinning politely"),
        (libc::SYS_futex, "locks and the event log's thread"),
        (libc::SYS_getrandom, "hash seeds"),
        // Signals: SIGTERM's handler returns; abort() blocks signals and raises SIGABRT.
        (libc::SYS_rt_sigreturn, "signal handlers"),
        (libc::SYS_rt_sigprocmask, "abort"),
        (libc::SYS_sigaltstack, "thread exit"),
        (libc::SYS_getpid, "abort"),
        (libc::SYS_gettid, "abort"),
        (libc::SYS_exit, "a thread's end"),
        (libc::SYS_exit_group, "the process's end"),
    ];
    #[cfg(target_arch = "x86_64")]
    calls.push((libc::SYS_poll, "sleeping (older libc)"));
    calls
}

/// Builds the filter for this architecture.
fn filter(mode: SeccompMode) -> Result<BpfProgram, SandboxError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        allowed().into_iter().map(|(n, _)| (n, vec![])).collect();
    // Memory may be mapped or re-protected, never executable (no code injected at run time).
    let not_exec = || -> Result<Vec<SeccompRule>, SandboxError> {
        let c = SeccompCondition::new(
            2,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64),
            0,
        )?;
        Ok(vec![SeccompRule::new(vec![c])?])
    };
    rules.insert(libc::SYS_mmap, not_exec()?);
    rules.insert(libc::SYS_mprotect, not_exec()?);
    // Asking whether a descriptor is open, and nothing else of fcntl: std's debug builds
    // check it before closing any descriptor (`OwnedFd`'s drop).
    let fcntl = |cmd: libc::c_int| -> Result<SeccompRule, SandboxError> {
        let c = SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, cmd as u64)?;
        Ok(SeccompRule::new(vec![c])?)
    };
    rules.insert(
        libc::SYS_fcntl,
        vec![fcntl(libc::F_GETFD)?, fcntl(libc::F_GETFL)?],
    );
    // Signals only to this process's own threads (abort raises SIGABRT with tgkill).
    let me = std::process::id() as u64;
    let own = SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, me)?;
    rules.insert(libc::SYS_tgkill, vec![SeccompRule::new(vec![own])?]);
    let mismatch = match mode {
        SeccompMode::Enforce => SeccompAction::KillProcess,
        SeccompMode::Log | SeccompMode::Off => SeccompAction::Log,
    };
    let arch = std::env::consts::ARCH
        .try_into()
        .map_err(|_| SandboxError::Filter(format!("none for {}", std::env::consts::ARCH)))?;
    let f = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, arch)?;
    Ok(f.try_into()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_as_parses_and_refuses_root() {
        assert_eq!(
            "65534:65534".parse::<RunAs>(),
            Ok(RunAs {
                uid: 65534,
                gid: 65534
            })
        );
        assert_eq!("0:0".parse::<RunAs>(), Err(RunAsError::Root));
        assert_eq!(
            "nobody".parse::<RunAs>(),
            Err(RunAsError::NotUidGid("nobody".into()))
        );
        assert_eq!("1:x".parse::<RunAs>(), Err(RunAsError::NotGid("x".into())));
    }

    #[test]
    fn the_filter_builds_for_this_machine() {
        for mode in [SeccompMode::Enforce, SeccompMode::Log] {
            let p = filter(mode).expect("filter");
            assert!(p.len() > allowed().len(), "{} instructions", p.len());
        }
    }
}

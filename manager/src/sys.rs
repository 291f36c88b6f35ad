//! The manager's raw system calls that nix does not wrap: pidfds and the child's set-up
//! between fork and exec. Everything else goes through nix; AF_PACKET rings live in
//! `ports::afpacket`. Each `unsafe` block here says why it holds.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

/// A descriptor that refers to process `pid` (pidfd_open(2)); stays valid after it exits.
pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: plain system call with integer arguments.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us; nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Sends `sig` to the process behind a pidfd (no pid-reuse race). A process that has
/// already exited yields ESRCH, which is ignored.
pub fn pidfd_signal(fd: &OwnedFd, sig: libc::c_int) {
    // SAFETY: plain system call on a descriptor we own; a null siginfo is allowed.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
}

/// Prepares `cmd` to become a data-plane process of this nfmgr: it dies with the thread that
/// forks it (SIGKILL), starts with no signals blocked (nfmgr blocks its termination signals,
/// and the mask is inherited across exec), keeps the doorbell eventfds open across exec, and
/// runs on `core` if given.
pub fn prepare_child(cmd: &mut Command, keep_fds: Vec<RawFd>, core: Option<usize>) {
    let parent = std::process::id() as libc::pid_t;
    // Built before the fork: the closure must not allocate.
    // SAFETY: a zeroed cpu_set_t is a valid empty set.
    let mut cpus: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    if let Some(c) = core.filter(|c| *c < libc::CPU_SETSIZE as usize) {
        // SAFETY: `c` is below CPU_SETSIZE, so the bit lies inside the set.
        unsafe { libc::CPU_SET(c, &mut cpus) };
    }
    // SAFETY: the closure runs in the child between fork and exec and only makes
    // async-signal-safe system calls on values prepared above.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // nfmgr may have died between fork and prctl.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            for fd in &keep_fds {
                libc::fcntl(*fd, libc::F_SETFD, 0);
            }
            if core.is_some() {
                libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &cpus);
            }
            Ok(())
        });
    }
}

/// Fills `buf` with random bytes from the kernel (getrandom(2)), for authentication nonces.
pub fn random_bytes(buf: &mut [u8]) -> io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `buf`, which we own
        // mutably for the duration of the call.
        let n = unsafe {
            libc::getrandom(
                buf[filled..].as_mut_ptr() as *mut libc::c_void,
                buf.len() - filled,
                0,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        filled += n as usize;
    }
    Ok(())
}

//! Sleeping when idle and waking on new work, without a dedicated wake-up thread.
//!
//! Each slot has an eventfd (its doorbell), created by nfmgr and inherited by every process it
//! spawns under the same descriptor number. A consumer that has polled its rings for a while
//! without finding work announces `sleeping = 1`, checks its rings one last time and then
//! sleeps in `poll(2)` on its doorbell. A producer, after publishing into a ring, checks the
//! consumer's flag and rings the doorbell only if it is set, so a busy pipeline makes no
//! system call at all.
//!
//! The flag and the ring indices form a Dekker pair: the consumer stores the flag and then
//! reads the rings, the producer stores the ring index and then reads the flag, each with a
//! sequentially consistent fence in between, so at least one of them sees the other's store:
//! no wake-up is lost.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{fence, Ordering};
use std::time::Duration;

use thiserror::Error;

use crate::region::Region;

#[derive(Debug, Error)]
pub enum DoorbellError {
    #[error("cannot create the doorbell of slot {slot}: {source}")]
    Create { slot: u16, source: io::Error },
    #[error(
        "slot {slot}'s doorbell (fd {fd}) was not inherited: processes must be started by nfmgr"
    )]
    NotInherited { slot: u16, fd: RawFd },
}

/// The doorbells of every slot, as seen from one process.
pub struct Doorbells {
    region: Region,
    fds: Vec<Option<OwnedFd>>,
}

fn new_eventfd() -> io::Result<OwnedFd> {
    // SAFETY: plain system call; a non-negative result is a new descriptor we own.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by eventfd and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn is_eventfd(fd: RawFd) -> bool {
    std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .map(|p| p.to_string_lossy() == "anon_inode:[eventfd]")
        .unwrap_or(false)
}

impl Doorbells {
    /// nfmgr: creates one eventfd per slot and records its number in the slot record.
    pub fn create(region: &Region) -> Result<Doorbells, DoorbellError> {
        let mut fds = Vec::new();
        for slot in 0..region.slot_count() {
            let fd = new_eventfd().map_err(|source| DoorbellError::Create { slot, source })?;
            if let Some(rec) = region.slot(slot) {
                rec.doorbell_fd.store(fd.as_raw_fd(), Ordering::Release);
            }
            fds.push(Some(fd));
        }
        Ok(Doorbells {
            region: region.clone(),
            fds,
        })
    }

    /// A process started by nfmgr: adopts the inherited doorbells, after checking that each
    /// recorded number really is an eventfd in this process (writing to an unrelated file
    /// because a number was stale would be far worse than failing to start). It keeps
    /// duplicates, so a process that also created the doorbells (tests, benchmarks) never
    /// has two owners of one descriptor.
    pub fn inherit(region: &Region) -> Result<Doorbells, DoorbellError> {
        let mut fds = Vec::new();
        for slot in 0..region.slot_count() {
            let raw = region
                .slot(slot)
                .map(|s| s.doorbell_fd.load(Ordering::Acquire))
                .unwrap_or(-1);
            if raw < 0 {
                fds.push(None);
                continue;
            }
            if !is_eventfd(raw) {
                return Err(DoorbellError::NotInherited { slot, fd: raw });
            }
            // SAFETY: duplicates a descriptor open in this process (checked above); the new
            // number is ours alone.
            let dup = unsafe { libc::fcntl(raw, libc::F_DUPFD_CLOEXEC, 0) };
            if dup < 0 {
                return Err(DoorbellError::Create {
                    slot,
                    source: io::Error::last_os_error(),
                });
            }
            // SAFETY: `dup` was just created and is owned by nobody else.
            fds.push(Some(unsafe { OwnedFd::from_raw_fd(dup) }));
        }
        Ok(Doorbells {
            region: region.clone(),
            fds,
        })
    }

    /// Descriptor numbers to keep open across `exec` in spawned processes.
    pub fn raw_fds(&self) -> Vec<RawFd> {
        self.fds.iter().flatten().map(|f| f.as_raw_fd()).collect()
    }

    pub fn fd(&self, slot: u16) -> Option<BorrowedFd<'_>> {
        self.fds.get(slot as usize)?.as_ref().map(|f| {
            use std::os::fd::AsFd;
            f.as_fd()
        })
    }

    /// Wakes `slot` if it announced that it sleeps. Call after publishing into its ring.
    #[inline]
    pub fn notify(&self, slot: u16) {
        fence(Ordering::SeqCst);
        let Some(rec) = self.region.slot(slot) else {
            return;
        };
        let flag = &rec.sleeping.0;
        if flag.load(Ordering::Relaxed) != 0 && flag.swap(0, Ordering::AcqRel) != 0 {
            self.ring(slot);
        }
    }

    /// Unconditionally signals `slot`'s doorbell.
    pub fn ring(&self, slot: u16) {
        if let Some(Some(fd)) = self.fds.get(slot as usize) {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a valid u64 to an eventfd we own. A full counter
            // (EAGAIN) means the doorbell is already rung.
            unsafe { libc::write(fd.as_raw_fd(), &one as *const u64 as *const _, 8) };
        }
    }

    /// Announces that `me` is about to sleep. The caller must check its rings once more
    /// afterwards and call `wait` only if they are empty, or `cancel_sleep` otherwise.
    pub fn prepare_sleep(&self, me: u16) {
        if let Some(rec) = self.region.slot(me) {
            rec.sleeping.0.store(1, Ordering::Relaxed);
        }
        fence(Ordering::SeqCst);
    }

    pub fn cancel_sleep(&self, me: u16) {
        if let Some(rec) = self.region.slot(me) {
            rec.sleeping.0.store(0, Ordering::Relaxed);
        }
    }

    /// Sleeps until the doorbell rings, one of `extra` is readable, or `timeout` passes.
    /// Returns the `poll` revents of each extra descriptor.
    pub fn wait(&self, me: u16, timeout: Duration, extra: &[RawFd]) -> io::Result<Vec<i16>> {
        let mut pfds = Vec::with_capacity(1 + extra.len());
        let bell = self.fd(me).map(|f| f.as_raw_fd()).unwrap_or(-1);
        pfds.push(libc::pollfd {
            fd: bell,
            events: libc::POLLIN,
            revents: 0,
        });
        for &fd in extra {
            pfds.push(libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            });
        }
        let ts = libc::timespec {
            tv_sec: timeout.as_secs().min(i32::MAX as u64) as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        // SAFETY: `pfds` is a valid array of pollfd and `ts` a valid timespec for the duration
        // of the call; a null signal mask leaves the mask unchanged. ppoll rather than poll for
        // sub-millisecond timeouts (generator pacing).
        let rc = unsafe {
            libc::ppoll(
                pfds.as_mut_ptr(),
                pfds.len() as libc::nfds_t,
                &ts,
                std::ptr::null(),
            )
        };
        let err = (rc < 0).then(io::Error::last_os_error);
        self.clear(me);
        self.cancel_sleep(me);
        match err {
            Some(e) if e.kind() != io::ErrorKind::Interrupted => Err(e),
            _ => Ok(pfds[1..].iter().map(|p| p.revents).collect()),
        }
    }

    /// Resets `me`'s doorbell counter.
    pub fn clear(&self, me: u16) {
        if let Some(fd) = self.fd(me) {
            let mut v: u64 = 0;
            // SAFETY: reads 8 bytes into a valid u64 from a non-blocking eventfd we own.
            unsafe { libc::read(fd.as_raw_fd(), &mut v as *mut u64 as *mut _, 8) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::RegionConfig;
    use crate::region::CreateOptions;
    use std::time::Instant;

    #[test]
    fn notify_wakes_only_a_sleeper() {
        let path = std::env::temp_dir().join(format!("nflib-bell-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let r = Region::create(&CreateOptions {
            path: path.clone(),
            config: RegionConfig {
                slots: 2,
                ports: 0,
                buffers: 16,
                ..RegionConfig::default()
            },
            instance: "bell".into(),
            page_size: 4096,
            hugetlbfs: false,
        })
        .unwrap();
        r.mark_ready();
        let bells = Doorbells::create(&r).unwrap();
        // Not sleeping: notify does not write, so a wait times out.
        bells.notify(1);
        bells.prepare_sleep(1);
        let t = Instant::now();
        bells.wait(1, Duration::from_millis(50), &[]).unwrap();
        assert!(t.elapsed() >= Duration::from_millis(40));
        // Sleeping: notify rings, and the wait returns at once.
        bells.prepare_sleep(1);
        bells.notify(1);
        let t = Instant::now();
        bells.wait(1, Duration::from_secs(5), &[]).unwrap();
        assert!(t.elapsed() < Duration::from_secs(1));
        assert_eq!(r.slot(1).unwrap().sleeping.0.load(Ordering::Relaxed), 0);
        std::fs::remove_file(path).unwrap();
    }
}

//! One nfmgr per instance name: the instance lock, where the region file is, and cleaning up
//! after an nfmgr that crashed.
//!
//! The lock is an open-file-description record lock (`F_OFD_SETLK`) on
//! `<dir>/nfactor-<instance>.lock`, held for nfmgr's lifetime. The kernel drops it when the
//! process dies however it dies, so "the lock is free" is a reliable test that a region left
//! behind is stale (no pid-file guesswork, no pid reuse problem). Unlike `flock`, such a lock
//! can be *tested* without being taken (`F_OFD_GETLK`), so readers such as `nfmgr stats` can
//! tell a live instance from a stale region without ever blocking a starting nfmgr. The lock
//! file also records where the region is.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use nix::fcntl::{fcntl, FcntlArg};

pub struct Instance {
    lock: File,
    lock_path: PathBuf,
    region_path: Option<PathBuf>,
}

pub fn lock_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("nfactor-{name}.lock"))
}

pub fn region_file_name(name: &str) -> String {
    format!("nfactor-{name}.region")
}

fn read_field(text: &str, key: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")).map(str::to_string))
}

impl Instance {
    /// Takes the instance lock. If another nfmgr holds it, fails naming its pid. Otherwise
    /// removes any region a crashed predecessor left behind.
    pub fn acquire(name: &str, lock_dir: &Path) -> Result<Instance> {
        std::fs::create_dir_all(lock_dir)
            .with_context(|| format!("cannot create {}", lock_dir.display()))?;
        let path = lock_path(lock_dir, name);
        let mut lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .with_context(|| format!("cannot open instance lock {}", path.display()))?;
        let taken = take_lock(&lock);
        let mut previous = String::new();
        let _ = lock.read_to_string(&mut previous);
        if !taken {
            let pid = read_field(&previous, "pid").unwrap_or_else(|| "?".into());
            bail!(
                "instance `{name}` is already running (nfmgr pid {pid}, lock {})",
                path.display()
            );
        }
        if let Some(old) = read_field(&previous, "region") {
            let old = PathBuf::from(old);
            if old.exists() {
                std::fs::remove_file(&old)
                    .with_context(|| format!("cannot remove stale region {}", old.display()))?;
                tracing::warn!(
                    region = %old.display(),
                    old_pid = read_field(&previous, "pid").unwrap_or_default(),
                    "removed the region of an nfmgr that did not shut down cleanly"
                );
            }
        }
        Ok(Instance {
            lock,
            lock_path: path,
            region_path: None,
        })
    }

    /// Records the region's path in the lock file (and remembers it for cleanup). A leftover
    /// file at that path can only be stale, since the lock is held: it is removed first.
    pub fn claim_region_path(&mut self, path: &Path) -> Result<()> {
        if path.exists() {
            std::fs::remove_file(path)
                .with_context(|| format!("cannot remove stale region {}", path.display()))?;
            tracing::warn!(region = %path.display(), "removed a stale region file");
        }
        let text = format!("pid={}\nregion={}\n", std::process::id(), path.display());
        self.lock.set_len(0)?;
        self.lock.rewind()?;
        self.lock.write_all(text.as_bytes())?;
        self.lock.flush()?;
        self.region_path = Some(path.to_path_buf());
        Ok(())
    }

    /// Removes the region and the lock file. Called at clean shutdown.
    pub fn release(self) {
        if let Some(r) = &self.region_path {
            if let Err(e) = std::fs::remove_file(r) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(region = %r.display(), error = %e, "cannot remove region");
                }
            }
        }
        let _ = std::fs::remove_file(&self.lock_path);
    }
}

fn whole_file_write_lock() -> libc::flock {
    libc::flock {
        l_type: libc::F_WRLCK as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    }
}

/// Takes the instance lock; false if another process holds it.
fn take_lock(file: &File) -> bool {
    fcntl(file, FcntlArg::F_OFD_SETLK(&whole_file_write_lock())).is_ok()
}

/// Whether nobody holds the instance lock (tested without taking it).
fn lock_is_free(file: &File) -> bool {
    let mut fl = whole_file_write_lock();
    fcntl(file, FcntlArg::F_OFD_GETLK(&mut fl)).is_ok()
        && fl.l_type == libc::F_UNLCK as libc::c_short
}

/// The region of a running instance, from its lock file. Fails if no nfmgr holds the lock.
pub fn find_region(name: &str, lock_dir: &Path) -> Result<PathBuf> {
    let path = lock_path(lock_dir, name);
    let missing = || {
        format!(
            "no nfmgr instance `{name}` in {}: is it running?",
            lock_dir.display()
        )
    };
    let file = File::open(&path).with_context(missing)?;
    let text = std::fs::read_to_string(&path).with_context(missing)?;
    if lock_is_free(&file) {
        bail!(
            "instance `{name}` is not running (nfmgr pid {} did not shut down cleanly; the next `nfmgr start` cleans up)",
            read_field(&text, "pid").unwrap_or_else(|| "?".into())
        );
    }
    read_field(&text, "region")
        .map(PathBuf::from)
        .with_context(|| format!("{} does not name a region yet", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_acquire_fails_and_stale_regions_are_removed() {
        let dir = std::env::temp_dir().join(format!("nfmgr-inst-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut a = Instance::acquire("t", &dir).unwrap();
        let region = dir.join("r");
        std::fs::write(&region, b"x").unwrap();
        a.claim_region_path(&region).unwrap();
        assert!(!region.exists(), "stale file at the region path is removed");
        std::fs::write(&region, b"region").unwrap();
        let e = Instance::acquire("t", &dir).err().unwrap().to_string();
        assert!(e.contains("already running"), "{e}");
        assert_eq!(find_region("t", &dir).unwrap(), region);
        // Simulate a crash: drop the lock without release; the region stays behind.
        drop(a);
        assert!(region.exists());
        let e = find_region("t", &dir).unwrap_err().to_string();
        assert!(e.contains("not running"), "{e}");
        let b = Instance::acquire("t", &dir).unwrap();
        assert!(!region.exists(), "the next nfmgr removed the stale region");
        b.release();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

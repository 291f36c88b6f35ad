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
//!
//! The lock lives in nfmgr's run directory (`manager.run_dir`, by default `/run/nfactor` for
//! root), never in a world-writable one: there a local user could create the lock file
//! first (and hold its lock, or steer root's cleanup onto another file through its
//! `region=` line) or put a link in its place (root would truncate the file it points to).
//! So the directory must be nfmgr's own and closed to others (created 0700), the lock is
//! opened without following links and must be a regular file of nfmgr's user, and the
//! only region file a stale lock can name for removal is the instance's own.

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

/// Makes sure `dir` is a directory that only this user may change: created (mode 0700) if
/// missing; refused if it is a link, not ours, or writable by others.
pub fn ensure_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    if let Some(parent) = dir.parent() {
        if !parent.exists() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("cannot create {}", dir.display())),
    }
    let md = std::fs::symlink_metadata(dir)
        .with_context(|| format!("cannot inspect {}", dir.display()))?;
    let me = nix::unistd::geteuid().as_raw();
    if !md.is_dir() {
        bail!(
            "{} (manager.run_dir) is not a directory (a link?): refusing to keep the lock there",
            dir.display()
        );
    }
    if md.uid() != me {
        bail!(
            "{} (manager.run_dir) belongs to uid {}, not to this user ({me}): someone else may have made it; remove it or choose another run_dir",
            dir.display(),
            md.uid()
        );
    }
    if md.mode() & 0o022 != 0 {
        bail!(
            "{} (manager.run_dir) is writable by others (mode {:o}): refusing to keep the lock there",
            dir.display(),
            md.mode() & 0o7777
        );
    }
    Ok(())
}

impl Instance {
    /// Takes the instance lock in `run_dir` (made private if missing). If another nfmgr
    /// holds it, fails naming its pid. Otherwise removes any region a crashed predecessor
    /// left behind.
    pub fn acquire(name: &str, run_dir: &Path) -> Result<Instance> {
        use std::os::unix::fs::MetadataExt;
        ensure_private_dir(run_dir)?;
        let path = lock_path(run_dir, name);
        let mut lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(&path)
            .with_context(|| format!("cannot open instance lock {}", path.display()))?;
        let md = lock.metadata()?;
        if !md.is_file() || md.uid() != nix::unistd::geteuid().as_raw() || md.nlink() != 1 {
            bail!(
                "instance lock {} is not a plain file of this user: refusing it",
                path.display()
            );
        }
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
        // Only the instance's own region file is ever removed, whatever the lock says.
        let own =
            |p: &Path| p.file_name().and_then(|n| n.to_str()) == Some(&region_file_name(name));
        if let Some(old) = read_field(&previous, "region")
            .map(PathBuf::from)
            .filter(|p| own(p))
        {
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

    use std::os::unix::fs::PermissionsExt;

    fn test_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("nfmgr-inst-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn second_acquire_fails_and_stale_regions_are_removed() {
        let dir = test_dir("stale");
        let mut a = Instance::acquire("t", &dir).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "the run directory is made private");
        let region = dir.join(region_file_name("t"));
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

    /// A local user who could write the run directory could plant the lock file, a link
    /// in its place, or a lock naming another file as the region to remove: refused.
    #[test]
    fn a_planted_lock_or_an_open_directory_is_refused() {
        // A directory others may write.
        let open = test_dir("open");
        std::fs::create_dir_all(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = Instance::acquire("t", &open).err().unwrap().to_string();
        assert!(e.contains("writable by others"), "{e}");
        // The run directory a link.
        let target = test_dir("target");
        std::fs::create_dir_all(&target).unwrap();
        let link = test_dir("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = Instance::acquire("t", &link).err().unwrap().to_string();
        assert!(e.contains("not a directory"), "{e}");
        // The lock a link to a file nfmgr must not touch.
        let dir = test_dir("planted");
        std::fs::create_dir_all(&dir).unwrap();
        let victim = target.join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        std::os::unix::fs::symlink(&victim, lock_path(&dir, "t")).unwrap();
        assert!(Instance::acquire("t", &dir).is_err());
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        // A stale lock naming another file as the region: that file stays.
        std::fs::remove_file(lock_path(&dir, "t")).unwrap();
        std::fs::write(
            lock_path(&dir, "t"),
            format!("pid=1\nregion={}\n", victim.display()),
        )
        .unwrap();
        let i = Instance::acquire("t", &dir).unwrap();
        assert!(
            victim.exists(),
            "only the instance's own region file is removed"
        );
        i.release();
        // A lock file of another user (root can make one to try).
        if nix::unistd::geteuid().is_root() {
            std::fs::write(lock_path(&dir, "t"), b"").unwrap();
            std::os::unix::fs::chown(lock_path(&dir, "t"), Some(65534), None).unwrap();
            let e = Instance::acquire("t", &dir).err().unwrap().to_string();
            assert!(e.contains("not a plain file of this user"), "{e}");
        }
        for d in [&open, &target, &dir] {
            let _ = std::fs::remove_dir_all(d);
        }
        let _ = std::fs::remove_file(&link);
    }
}

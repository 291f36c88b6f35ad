//! Where the region lives: on hugetlbfs as `hugepages.conf` says, or in `/dev/shm`.
//!
//! `hugepages.conf` is a shell-style `KEY=value` file shared with
//! `scripts/setup-hugepages.sh`, which reserves and mounts the pages (as root). nfmgr only
//! reads it and checks the mount: it is hugetlbfs and has enough free pages for the region.
//! Whatever it decides, it says which and why at start.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

use nflib::config::HugepageMode;

const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

/// What is wrong in `hugepages.conf`, by line or key.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HugepagesConfError {
    #[error("line {0}: expected KEY=value")]
    NotKeyValue(usize),
    #[error("line {line}: unknown key {key}")]
    UnknownKey { line: usize, key: String },
    #[error("HUGEPAGES_ENABLED: `{0}` is not yes or no")]
    NotYesNo(String),
    #[error("HUGEPAGE_SIZE_KB: `{0}` is not a number of KiB")]
    SizeNotNumber(String),
    #[error("HUGEPAGE_SIZE_KB: {0} is not 2048 (2 MiB) or 1048576 (1 GiB)")]
    SizeUnknown(u64),
    #[error("HUGEPAGE_COUNT: `{0}` is not a number")]
    CountNotNumber(String),
    #[error("HUGEPAGE_MOUNT is missing")]
    NoMount,
}

/// Why the region cannot go on huge pages (with `region.hugepages = "auto"`, why it goes
/// to /dev/shm instead).
#[derive(Debug, thiserror::Error)]
pub enum HugepagesError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Conf {
        path: PathBuf,
        #[source]
        source: HugepagesConfError,
    },
    #[error("disabled in {}", .0.display())]
    Disabled(PathBuf),
    #[error("{} is not mounted: {source}", mount.display())]
    NotMounted {
        mount: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("{} is not a hugetlbfs mount (run scripts/setup-hugepages.sh as root)", .0.display())]
    NotHugetlbfs(PathBuf),
    #[error(
        "{} has {free} free pages of {} KiB, the region needs {need}",
        mount.display(),
        page_size / 1024
    )]
    TooFewPages {
        mount: PathBuf,
        free: u64,
        page_size: usize,
        need: u64,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HugepagesConf {
    pub enabled: bool,
    pub page_size_kb: u64,
    pub count: u64,
    pub mount: PathBuf,
}

impl HugepagesConf {
    pub fn parse(text: &str) -> Result<HugepagesConf, HugepagesConfError> {
        let mut enabled = None;
        let mut size = None;
        let mut count = None;
        let mut mount = None;
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let (k, v) = line
                .split_once('=')
                .ok_or(HugepagesConfError::NotKeyValue(n + 1))?;
            let v = v.trim().trim_matches('"');
            match k.trim() {
                "HUGEPAGES_ENABLED" => {
                    enabled = Some(match v {
                        "yes" | "true" | "1" => true,
                        "no" | "false" | "0" => false,
                        _ => return Err(HugepagesConfError::NotYesNo(v.to_string())),
                    })
                }
                "HUGEPAGE_SIZE_KB" => {
                    size = Some(
                        v.parse::<u64>()
                            .map_err(|_| HugepagesConfError::SizeNotNumber(v.to_string()))?,
                    )
                }
                "HUGEPAGE_COUNT" => {
                    count = Some(
                        v.parse::<u64>()
                            .map_err(|_| HugepagesConfError::CountNotNumber(v.to_string()))?,
                    )
                }
                "HUGEPAGE_MOUNT" => mount = Some(PathBuf::from(v)),
                other => {
                    return Err(HugepagesConfError::UnknownKey {
                        line: n + 1,
                        key: other.to_string(),
                    })
                }
            }
        }
        let page_size_kb = size.unwrap_or(2048);
        if !matches!(page_size_kb, 2048 | 1048576) {
            return Err(HugepagesConfError::SizeUnknown(page_size_kb));
        }
        Ok(HugepagesConf {
            enabled: enabled.unwrap_or(false),
            page_size_kb,
            count: count.unwrap_or(0),
            mount: mount.ok_or(HugepagesConfError::NoMount)?,
        })
    }
}

/// Where nfmgr puts the region, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placement {
    Hugetlbfs {
        dir: PathBuf,
        page_size: usize,
    },
    /// `reason`: `region.hugepages = "off"`, or the text of the [`HugepagesError`] that
    /// ruled huge pages out (a placement is cloned and compared; an I/O error is neither).
    Shm {
        dir: PathBuf,
        reason: String,
    },
}

impl Placement {
    pub fn dir(&self) -> &Path {
        match self {
            Placement::Hugetlbfs { dir, .. } | Placement::Shm { dir, .. } => dir,
        }
    }

    pub fn page_size(&self) -> usize {
        match self {
            Placement::Hugetlbfs { page_size, .. } => *page_size,
            Placement::Shm { .. } => 4096,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Placement::Hugetlbfs { dir, page_size } => format!(
                "hugetlbfs at {} ({} KiB pages)",
                dir.display(),
                page_size / 1024
            ),
            Placement::Shm { dir, reason } => {
                format!("{} (not on huge pages: {reason})", dir.display())
            }
        }
    }
}

/// Free pages and page size of a hugetlbfs mount, or why it is not one.
///
/// A mount without a `size=` limit reports no blocks at all in statfs; its pages come from
/// the kernel's pool for its page size, whose free count (minus pages reserved by mappings
/// not yet touched) is in sysfs. With a limit, the smaller of the two applies.
fn hugetlbfs_free(mount: &Path) -> Result<(u64, usize), HugepagesError> {
    let st = nix::sys::statfs::statfs(mount).map_err(|source| HugepagesError::NotMounted {
        mount: mount.to_path_buf(),
        source,
    })?;
    if st.filesystem_type().0 as i64 != HUGETLBFS_MAGIC {
        return Err(HugepagesError::NotHugetlbfs(mount.to_path_buf()));
    }
    let page = st.block_size() as usize;
    let sys = format!("/sys/kernel/mm/hugepages/hugepages-{}kB", page / 1024);
    let read = |f: &str| -> u64 {
        std::fs::read_to_string(format!("{sys}/{f}"))
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    let pool_free = read("free_hugepages").saturating_sub(read("resv_hugepages"));
    let free = if st.blocks() == 0 {
        pool_free
    } else {
        pool_free.min(st.blocks_free())
    };
    Ok((free, page))
}

/// Whether `dir` is on a file system kept in memory (tmpfs, ramfs, hugetlbfs); `None` if
/// it cannot be told. A region on a disk file system still works, but the kernel writes its
/// dirty pages back to the disk (the packet buffers, over and over) and faults on the next
/// write to each page written back.
pub fn memory_backed(dir: &Path) -> Option<bool> {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    let st = nix::sys::statfs::statfs(dir).ok()?;
    let t = st.filesystem_type().0 as i64;
    Some(matches!(t, TMPFS_MAGIC | RAMFS_MAGIC | HUGETLBFS_MAGIC))
}

/// Decides where a region of `bytes` goes.
pub fn place(
    mode: HugepageMode,
    conf_path: &Path,
    shm_dir: &Path,
    bytes: usize,
) -> Result<Placement> {
    let shm = |reason: String| Placement::Shm {
        dir: shm_dir.to_path_buf(),
        reason,
    };
    if mode == HugepageMode::Off {
        return Ok(shm("region.hugepages = \"off\"".into()));
    }
    let attempt = || -> Result<Placement, HugepagesError> {
        let path = || conf_path.to_path_buf();
        let text = std::fs::read_to_string(conf_path).map_err(|source| HugepagesError::Read {
            path: path(),
            source,
        })?;
        let conf = HugepagesConf::parse(&text).map_err(|source| HugepagesError::Conf {
            path: path(),
            source,
        })?;
        if !conf.enabled {
            return Err(HugepagesError::Disabled(path()));
        }
        let (free, page) = hugetlbfs_free(&conf.mount)?;
        let need = bytes.div_ceil(page) as u64;
        if free < need {
            return Err(HugepagesError::TooFewPages {
                mount: conf.mount,
                free,
                page_size: page,
                need,
            });
        }
        Ok(Placement::Hugetlbfs {
            dir: conf.mount,
            page_size: page,
        })
    };
    match (attempt(), mode) {
        (Ok(p), _) => Ok(p),
        (Err(reason), HugepageMode::On) => {
            bail!("region.hugepages = \"on\" but huge pages are unusable: {reason}")
        }
        (Err(reason), _) => Ok(shm(reason.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_shm_is_memory_and_a_missing_dir_is_unknown() {
        assert_eq!(memory_backed(Path::new("/dev/shm")), Some(true));
        assert_eq!(memory_backed(Path::new("/nonexistent/dir")), None);
    }

    #[test]
    fn parses_the_shipped_file() {
        let text = include_str!("../../hugepages.conf");
        let c = HugepagesConf::parse(text).unwrap();
        assert_eq!(c.page_size_kb, 2048);
        assert!(c.count > 0);
    }

    #[test]
    fn rejects_bad_values_by_key() {
        let err = |text| HugepagesConf::parse(text).unwrap_err();
        let e = err("HUGEPAGE_MOUNT=/x\nHUGEPAGE_SIZE_KB=4");
        assert_eq!(e, HugepagesConfError::SizeUnknown(4));
        assert!(e.to_string().contains("HUGEPAGE_SIZE_KB"), "{e}");
        let e = err("HUGEPAGES_ENABLED=maybe\nHUGEPAGE_MOUNT=/x");
        assert_eq!(e, HugepagesConfError::NotYesNo("maybe".into()));
        assert!(e.to_string().contains("HUGEPAGES_ENABLED"), "{e}");
        let e = err("FOO=1");
        assert_eq!(e.to_string(), "line 1: unknown key FOO");
        assert_eq!(err("HUGEPAGES_ENABLED=yes"), HugepagesConfError::NoMount);
    }

    #[test]
    fn auto_falls_back_and_on_fails_with_the_reason() {
        let missing = Path::new("/nonexistent/hugepages.conf");
        let p = place(HugepageMode::Auto, missing, Path::new("/dev/shm"), 1 << 20).unwrap();
        assert!(matches!(p, Placement::Shm { .. }));
        assert!(p.describe().contains("cannot read"));
        let e = place(HugepageMode::On, missing, Path::new("/dev/shm"), 1 << 20).unwrap_err();
        assert!(e.to_string().contains("cannot read"));
    }
}

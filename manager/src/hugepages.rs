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

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HugepagesConf {
    pub enabled: bool,
    pub page_size_kb: u64,
    pub count: u64,
    pub mount: PathBuf,
}

impl HugepagesConf {
    pub fn parse(text: &str) -> Result<HugepagesConf, String> {
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
                .ok_or_else(|| format!("line {}: expected KEY=value", n + 1))?;
            let v = v.trim().trim_matches('"');
            match k.trim() {
                "HUGEPAGES_ENABLED" => {
                    enabled = Some(match v {
                        "yes" | "true" | "1" => true,
                        "no" | "false" | "0" => false,
                        _ => return Err(format!("HUGEPAGES_ENABLED: `{v}` is not yes or no")),
                    })
                }
                "HUGEPAGE_SIZE_KB" => {
                    size =
                        Some(v.parse::<u64>().map_err(|_| {
                            format!("HUGEPAGE_SIZE_KB: `{v}` is not a number of KiB")
                        })?)
                }
                "HUGEPAGE_COUNT" => {
                    count = Some(
                        v.parse::<u64>()
                            .map_err(|_| format!("HUGEPAGE_COUNT: `{v}` is not a number"))?,
                    )
                }
                "HUGEPAGE_MOUNT" => mount = Some(PathBuf::from(v)),
                other => return Err(format!("line {}: unknown key {other}", n + 1)),
            }
        }
        let page_size_kb = size.unwrap_or(2048);
        if !matches!(page_size_kb, 2048 | 1048576) {
            return Err(format!(
                "HUGEPAGE_SIZE_KB: {page_size_kb} is not 2048 (2 MiB) or 1048576 (1 GiB)"
            ));
        }
        Ok(HugepagesConf {
            enabled: enabled.unwrap_or(false),
            page_size_kb,
            count: count.unwrap_or(0),
            mount: mount.ok_or("HUGEPAGE_MOUNT is missing")?,
        })
    }
}

/// Where nfmgr puts the region, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placement {
    Hugetlbfs { dir: PathBuf, page_size: usize },
    Shm { dir: PathBuf, reason: String },
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
fn hugetlbfs_free(mount: &Path) -> Result<(u64, usize), String> {
    let st = nix::sys::statfs::statfs(mount)
        .map_err(|e| format!("{} is not mounted: {e}", mount.display()))?;
    if st.filesystem_type().0 as i64 != HUGETLBFS_MAGIC {
        return Err(format!(
            "{} is not a hugetlbfs mount (run scripts/setup-hugepages.sh as root)",
            mount.display()
        ));
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
    let attempt = || -> Result<Placement, String> {
        let text = std::fs::read_to_string(conf_path)
            .map_err(|e| format!("cannot read {}: {e}", conf_path.display()))?;
        let conf =
            HugepagesConf::parse(&text).map_err(|e| format!("{}: {e}", conf_path.display()))?;
        if !conf.enabled {
            return Err(format!("disabled in {}", conf_path.display()));
        }
        let (free, page) = hugetlbfs_free(&conf.mount)?;
        let need = bytes.div_ceil(page) as u64;
        if free < need {
            return Err(format!(
                "{} has {free} free pages of {} KiB, the region needs {need}",
                conf.mount.display(),
                page / 1024
            ));
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
        (Err(reason), _) => Ok(shm(reason)),
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
        assert!(
            HugepagesConf::parse("HUGEPAGE_MOUNT=/x\nHUGEPAGE_SIZE_KB=4")
                .unwrap_err()
                .contains("HUGEPAGE_SIZE_KB")
        );
        assert!(
            HugepagesConf::parse("HUGEPAGES_ENABLED=maybe\nHUGEPAGE_MOUNT=/x")
                .unwrap_err()
                .contains("HUGEPAGES_ENABLED")
        );
        assert!(HugepagesConf::parse("FOO=1").unwrap_err().contains("FOO"));
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

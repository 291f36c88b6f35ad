//! The coordinator's journal: the cluster view (members, their lives and endpoints, its
//! version) and the members' addresses, written at every change of the view and read when
//! the coordinator starts again, so that its new life carries on from the old one's view
//! ([`Membership::restore`]) instead of learning the cluster from scratch.
//!
//! One JSON file, replaced whole at every write (a temporary file, synced, renamed over
//! it, the directory synced): a crash leaves the old journal or the new one, never a mix.
//! It names the cluster by a keyed hash of the cluster key, so that the journal of another
//! cluster (an old test bed, another key) is not replayed into this one.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::membership::Journal;
use serde::{Deserialize, Serialize};

/// The journal format this nfmgr writes and reads.
const FORMAT: u32 = 1;

/// A journal larger than this is not read (a view of 100 servers and 10,000 runtimes is
/// about 0.9 MB).
const MAX_BYTES: u64 = 256 << 20;

/// The file: the journal (`J`: owned when read, borrowed when written) and what names it.
#[derive(Serialize, Deserialize)]
struct File<J> {
    format: u32,
    /// Which cluster wrote it: a keyed hash of the key it signed with.
    cluster: String,
    /// When it was written (wall clock, ns), for people reading it.
    written_ns: u64,
    journal: J,
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds more than a journal can ({len} bytes read, at most {MAX_BYTES})")]
    TooLarge { path: PathBuf, len: u64 },
    #[error("{path} is not a journal this nfmgr reads: {why}")]
    Malformed { path: PathBuf, why: String },
    #[error("{path} is another cluster's journal (written under another key)")]
    OtherCluster { path: PathBuf },
}

/// Where the journal is and which clusters' journals are this one's.
pub struct JournalFile {
    path: PathBuf,
    /// The cluster's names under each key it accepts (the first is the signing key's):
    /// a journal written before a key rotation is still this cluster's.
    ids: Vec<String>,
}

/// The name of the cluster that holds `key`, for its journal: a keyed hash that reveals
/// nothing of the key.
pub fn cluster_id(key: &[u8]) -> String {
    let h = blake3::derive_key("nfactor 2026-12 coordinator journal cluster", key);
    h[..16].iter().map(|b| format!("{b:02x}")).collect()
}

impl JournalFile {
    /// The journal at `path` of the cluster whose keys are `keys` (signing key first; none
    /// for a cluster without a key).
    pub fn new(path: PathBuf, keys: &[&[u8]]) -> JournalFile {
        let ids = if keys.is_empty() {
            vec![String::new()]
        } else {
            keys.iter().map(|k| cluster_id(k)).collect()
        };
        JournalFile { path, ids }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The journal, if there is one. Only a regular file is read (not through a link,
    /// never blocking on a FIFO), and no more of it than a journal can be.
    pub fn load(&self) -> Result<Option<Journal>, JournalError> {
        let path = self.path.clone();
        let read = |source| JournalError::Read {
            path: path.clone(),
            source,
        };
        let f = match fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(read(e)),
        };
        let meta = f.metadata().map_err(read)?;
        if !meta.is_file() {
            return Err(JournalError::Malformed {
                path,
                why: "not a regular file".into(),
            });
        }
        let mut bytes = Vec::new();
        f.take(MAX_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(read)?;
        if bytes.len() as u64 > MAX_BYTES {
            return Err(JournalError::TooLarge {
                path,
                len: bytes.len() as u64,
            });
        }
        self.decode(&bytes).map(Some)
    }

    /// The journal in `bytes` (as `encode` made it), if it is this cluster's. Errors name
    /// `path` (for a journal kept elsewhere, such as etcd, its key there).
    pub fn decode(&self, bytes: &[u8]) -> Result<Journal, JournalError> {
        let path = self.path.clone();
        let file: File<Journal> =
            serde_json::from_slice(bytes).map_err(|e| JournalError::Malformed {
                path: path.clone(),
                why: e.to_string(),
            })?;
        if file.format != FORMAT {
            return Err(JournalError::Malformed {
                path,
                why: format!("format {}, this nfmgr reads {FORMAT}", file.format),
            });
        }
        if !self.ids.contains(&file.cluster) {
            return Err(JournalError::OtherCluster { path });
        }
        Ok(file.journal)
    }

    /// `journal` as written: JSON, naming this cluster (by its signing key).
    pub fn encode(&self, journal: &Journal) -> Vec<u8> {
        let file = File {
            format: FORMAT,
            cluster: self.ids[0].clone(),
            written_ns: crate::time::wall_ns(),
            journal,
        };
        // (Plain data: serialising it to JSON cannot fail.)
        serde_json::to_vec(&file).unwrap_or_default()
    }

    /// Replaces the journal with `journal`, atomically and durably.
    pub fn write(&self, journal: &Journal) -> std::io::Result<()> {
        let bytes = self.encode(journal);
        let dir = self
            .path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let tmp = self.path.with_extension("journal.tmp");
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_data()?;
        drop(f);
        fs::rename(&tmp, &self.path)?;
        fs::File::open(dir)?.sync_all()
    }

    /// Removes the journal (the coordinator left the cluster on purpose), durably: a
    /// power cut must not bring back a cluster that was ended.
    pub fn remove(&self) {
        if fs::remove_file(&self.path).is_ok() {
            if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
                let _ = fs::File::open(dir).and_then(|d| d.sync_all());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{ClusterView, ServerInfo};

    fn journal() -> Journal {
        Journal {
            view: ClusterView {
                epoch: 5,
                version: 9,
                coordinator: 1,
                servers: vec![ServerInfo {
                    server: 1,
                    name: "a".into(),
                    incarnation: 5,
                    alive: true,
                    endpoints: vec![],
                }],
            },
            addrs: vec![(2, "10.0.0.2:7000".parse().unwrap())],
        }
    }

    /// A directory of its own under the system's temporary one, removed at the end.
    struct TempDir(PathBuf);
    impl TempDir {
        fn new(name: &str) -> TempDir {
            let d = std::env::temp_dir().join(format!("nf-journal-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&d);
            fs::create_dir_all(&d).unwrap();
            TempDir(d)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn a_written_journal_reads_back_under_any_of_the_clusters_keys() {
        let dir = TempDir::new("keys");
        let path = dir.0.join("c.journal");
        let before = JournalFile::new(path.clone(), &[b"old key 0123456789"]);
        assert!(before.load().unwrap().is_none(), "none yet");
        before.write(&journal()).unwrap();
        assert_eq!(before.load().unwrap(), Some(journal()));
        // During a key rotation (the new key signs, the old one is still accepted) the
        // journal written under the old key is this cluster's; under neither, it is not.
        let rotating = JournalFile::new(
            path.clone(),
            &[b"new key 0123456789", b"old key 0123456789"],
        );
        assert_eq!(rotating.load().unwrap(), Some(journal()));
        let after = JournalFile::new(path.clone(), &[b"new key 0123456789"]);
        let e = after.load();
        assert!(matches!(e, Err(JournalError::OtherCluster { .. })), "{e:?}");
        before.remove();
        assert!(before.load().unwrap().is_none());
    }

    #[test]
    fn a_damaged_or_foreign_journal_is_an_error_that_names_the_file() {
        let dir = TempDir::new("damaged");
        let path = dir.0.join("c.journal");
        let f = JournalFile::new(path.clone(), &[b"key 0123456789abcdef"]);
        fs::write(&path, b"{\"format\":1,\"cluster\":").unwrap();
        let e = f.load().unwrap_err().to_string();
        assert!(
            e.contains("c.journal") && e.contains("not a journal"),
            "{e}"
        );
        let other = JournalFile::new(path.clone(), &[b"another key 01234567"]);
        other.write(&journal()).unwrap();
        let e = f.load().unwrap_err().to_string();
        assert!(e.contains("another cluster"), "{e}");
    }
}

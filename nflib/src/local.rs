//! A region inside one process, for tests and benchmarks that drive vswitch or runtime code
//! directly: created in `/dev/shm` from a configuration, with doorbells, the configuration
//! stored, and named slots prepared for `Endpoint::attach`. The file is removed on drop.

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use crate::config::{Config, ConfigError};
use crate::doorbell::{DoorbellError, Doorbells};
use crate::layout::RegionConfig;
use crate::region::{CreateOptions, Region, RegionError};
use crate::slot::{ProcessKind, SlotState};

/// Why a local region was not made.
#[derive(Debug, thiserror::Error)]
pub enum LocalRegionError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Region(#[from] RegionError),
    /// The configuration's text is larger than the region keeps.
    #[error("configuration does not fit")]
    ConfigTooLarge,
    #[error(transparent)]
    Doorbells(#[from] DoorbellError),
    /// A slot to prepare that the region does not have.
    #[error("no such slot")]
    NoSlot(u16),
}

pub struct LocalRegion {
    pub region: Region,
    pub config: Config,
    _bells: Doorbells,
    path: PathBuf,
}

impl LocalRegion {
    /// A region for `config_text`, with `slots` (slot, kind, name) prepared to attach; `tune`
    /// may change the region's sizes.
    pub fn new(
        tag: &str,
        config_text: &str,
        slots: &[(u16, ProcessKind, &str)],
        tune: impl FnOnce(&mut RegionConfig),
    ) -> Result<LocalRegion, LocalRegionError> {
        let config = Config::parse(config_text, std::path::Path::new("."))?;
        let mut rc = config.region_config();
        tune(&mut rc);
        let path = PathBuf::from(format!("/dev/shm/nflib-local-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let region = Region::create(&CreateOptions {
            path: path.clone(),
            config: rc,
            instance: tag.into(),
            page_size: 4096,
            hugetlbfs: false,
        })?;
        if !region.write_blob(config.frozen().as_bytes()) {
            return Err(LocalRegionError::ConfigTooLarge);
        }
        let bells = Doorbells::create(&region)?;
        for &(slot, kind, name) in slots {
            let rec = region.slot(slot).ok_or(LocalRegionError::NoSlot(slot))?;
            rec.kind.store(kind.raw(), Ordering::Relaxed);
            rec.name.set(name);
            rec.set_state(SlotState::Starting);
        }
        region.mark_ready();
        Ok(LocalRegion {
            region,
            config,
            _bells: bells,
            path,
        })
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }
}

impl Drop for LocalRegion {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Plays nfmgr's part (slot 0) for such tests: owns the pool and talks to the processes
/// through a mailbox over the message rings, the way nfmgr's data plane does.
pub struct LocalManager {
    pub pool: crate::pool::ManagerPool,
    pub mailbox: crate::mailbox::Mailbox,
    region: Region,
}

impl LocalManager {
    pub fn new(local: &LocalRegion) -> LocalManager {
        let region = local.region.clone();
        let me = crate::frame::EndpointAddr::new(local.config.cluster.server_id, 0);
        LocalManager {
            pool: crate::pool::ManagerPool::new(&region, 256),
            mailbox: crate::mailbox::Mailbox::new(
                me,
                crate::time::wall_ns(),
                local.config.cluster.transport(),
            ),
            region,
        }
    }

    /// Refills the pool caches of every slot (processes allocate from them).
    pub fn service(&mut self) {
        for s in 1..self.region.slot_count() {
            self.pool.service(s, true);
        }
    }

    /// Sends `msg` to the liaison of the process in `slot` and pushes the frames.
    pub fn send(&mut self, slot: u16, msg: &crate::msg::Message) {
        let to = crate::frame::EndpointAddr::new(self.mailbox.me().server, slot);
        self.mailbox
            .send(to, crate::frame::LIAISON, crate::frame::LIAISON, msg)
            .expect("queue has room");
        self.flush();
    }

    /// Pushes whatever the mailbox has due (acks included) onto the message rings.
    pub fn flush(&mut self) {
        let now = crate::time::mono_ns();
        let pool = &mut self.pool;
        let mut spare = Vec::new();
        self.mailbox
            .build_frames(now, &self.region, &mut || pool.alloc(), &mut |p| {
                spare.push(p)
            });
        for p in spare {
            self.pool.free(p);
        }
        let out: Vec<_> = self.mailbox.take_out().collect();
        for (to, p) in out {
            let ring = self.region.ring::<crate::Desc>(crate::RingId::Message {
                from: 0,
                to: to.slot,
            });
            match ring {
                Some(r) => {
                    let mut prod = crate::ring::Producer::new(r);
                    if prod.free_space() == 0 {
                        // Ring full: the transport sends the frame again later.
                        self.pool.free(p);
                    } else {
                        // Room was checked, and only this producer fills the ring.
                        let pushed = prod.push(p.into_desc());
                        debug_assert!(pushed);
                    }
                }
                None => self.pool.free(p),
            }
        }
    }

    /// Reads the frames processes sent to slot 0, answers with acks, and returns the
    /// messages that arrived.
    pub fn receive(&mut self) -> Vec<crate::mailbox::Envelope> {
        let now = crate::time::mono_ns();
        for s in 1..self.region.slot_count() {
            let Some(r) = self
                .region
                .ring::<crate::Desc>(crate::RingId::Message { from: s, to: 0 })
            else {
                continue;
            };
            let mut cons = crate::ring::Consumer::new(r);
            let mut descs = [crate::Desc::default(); 32];
            loop {
                let n = cons.peek_burst(&mut descs);
                if n == 0 {
                    break;
                }
                for d in &descs[..n] {
                    if let Some(p) = self.region.claim(*d, s as u32, 0) {
                        self.mailbox.handle_frame(self.region.data(&p), now);
                        self.pool.free(p);
                    }
                }
                cons.release(n);
            }
        }
        self.flush();
        self.mailbox.take_inbox()
    }
}

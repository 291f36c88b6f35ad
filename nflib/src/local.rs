//! A region inside one process, for tests and benchmarks that drive vswitch or runtime code
//! directly: created in `/dev/shm` from a configuration, with doorbells, the configuration
//! stored, and named slots prepared for `Endpoint::attach`. The file is removed on drop.

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use crate::config::Config;
use crate::doorbell::Doorbells;
use crate::layout::RegionConfig;
use crate::region::{CreateOptions, Region};
use crate::slot::{ProcessKind, SlotState};

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
    ) -> Result<LocalRegion, String> {
        let config =
            Config::parse(config_text, std::path::Path::new(".")).map_err(|e| e.to_string())?;
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
        })
        .map_err(|e| e.to_string())?;
        if !region.write_blob(config.frozen().as_bytes()) {
            return Err("configuration does not fit".into());
        }
        let bells = Doorbells::create(&region).map_err(|e| e.to_string())?;
        for &(slot, kind, name) in slots {
            let rec = region.slot(slot).ok_or("no such slot")?;
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

//! Geometry of the shared region: where every part lives, computed from the configured sizes.
//!
//! The layout is a pure function of [`RegionConfig`]. The creator stores the config in the
//! header; every process that attaches recomputes the layout from it and checks that the
//! stored offsets agree, so a region written by another build can never be misread.
//!
//! ```text
//! [header 4 KiB][slot records][port records][rings ...][buffers ...]
//! rings: data[from][to], message[from][to], refill[to], recycle[from]
//! ```

use thiserror::Error;

/// Identifies the file format. Bumped whenever any shared structure changes shape.
pub const MAGIC: [u8; 8] = *b"NFACTOR\x01";
pub const LAYOUT_VERSION: u32 = 7;

/// Slot 0 is always nfmgr itself (ports, pool owner, supervisor).
pub const MANAGER_SLOT: u16 = 0;
pub const MAX_SLOTS: u32 = 64;
pub const MAX_PORTS: u32 = 64;
/// Buffer indices must fit below the "free" owner marker and be cheap to validate.
pub const MAX_BUFFERS: u32 = 1 << 24;
/// Per-buffer metadata (owner) occupies the first cache line of every buffer.
pub const BUF_META_SIZE: u32 = 64;
pub const HEADER_SIZE: usize = 4096;
const PAGE: usize = 4096;
const LINE: usize = 64;

/// Sizes of everything in the region. All come from configuration.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RegionConfig {
    /// Process slots including slot 0 (nfmgr).
    pub slots: u32,
    /// Port records (statistics of nfmgr's ports).
    pub ports: u32,
    /// Packet buffers in the pool.
    pub buffers: u32,
    /// Bytes per buffer, including the metadata line and the headroom.
    pub buffer_size: u32,
    /// Bytes kept free in front of the packet for prepending headers.
    pub headroom: u32,
    /// Descriptors per data ring (power of two).
    pub data_ring_size: u32,
    /// Descriptors per message ring (power of two).
    pub msg_ring_size: u32,
    /// Buffer indices per pool refill / recycle ring (power of two).
    pub pool_ring_size: u32,
    /// Bytes reserved for the frozen configuration text processes read at start.
    pub blob_size: u32,
}

impl Default for RegionConfig {
    fn default() -> Self {
        RegionConfig {
            slots: 8,
            ports: 8,
            buffers: 16384,
            buffer_size: 2048,
            headroom: 128,
            // Deep enough to ride out a consumer that loses its core for tens of
            // milliseconds at 100,000 packets a second (a busy shared core; measured in
            // docs/PERFORMANCE.md, migration), as OpenNetVM's deep NF rings do.
            data_ring_size: 4096,
            msg_ring_size: 256,
            pool_ring_size: 512,
            blob_size: 0,
        }
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum LayoutError {
    #[error("region.{key}: {reason} (got {value})")]
    Invalid {
        key: &'static str,
        reason: &'static str,
        value: u64,
    },
}

fn invalid(key: &'static str, reason: &'static str, value: u32) -> LayoutError {
    LayoutError::Invalid {
        key,
        reason,
        value: value as u64,
    }
}

impl RegionConfig {
    /// Checks every size; the error names the configuration key at fault.
    pub fn validate(&self) -> Result<(), LayoutError> {
        if !(2..=MAX_SLOTS).contains(&self.slots) {
            return Err(invalid("slots", "must be between 2 and 64", self.slots));
        }
        if self.ports > MAX_PORTS {
            return Err(invalid("ports", "must be at most 64", self.ports));
        }
        if !(1..=MAX_BUFFERS).contains(&self.buffers) {
            return Err(invalid(
                "buffers",
                "must be between 1 and 16777216",
                self.buffers,
            ));
        }
        if self.buffer_size % 64 != 0 || !(512..=65536).contains(&self.buffer_size) {
            return Err(invalid(
                "buffer_size",
                "must be a multiple of 64 between 512 and 65536",
                self.buffer_size,
            ));
        }
        if self.headroom > self.buffer_size - BUF_META_SIZE - 256 {
            return Err(invalid(
                "headroom",
                "must leave at least 256 data bytes in a buffer",
                self.headroom,
            ));
        }
        if self.blob_size > 1 << 20 {
            return Err(invalid(
                "blob_size",
                "the configuration text must stay below 1 MiB",
                self.blob_size,
            ));
        }
        for (key, v) in [
            ("data_ring_size", self.data_ring_size),
            ("msg_ring_size", self.msg_ring_size),
            ("pool_ring_size", self.pool_ring_size),
        ] {
            if !v.is_power_of_two() || !(2..=1 << 20).contains(&v) {
                return Err(invalid(
                    key,
                    "must be a power of two between 2 and 1048576",
                    v,
                ));
            }
        }
        Ok(())
    }

    /// Offset of packet data inside a freshly allocated buffer.
    pub fn data_offset(&self) -> u32 {
        BUF_META_SIZE + self.headroom
    }

    /// Largest frame a buffer holds without headroom adjustments.
    pub fn data_room(&self) -> u32 {
        self.buffer_size - self.data_offset()
    }
}

/// Which kind of ring, and between whom.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RingId {
    /// Packet descriptors from one slot to another.
    Data { from: u16, to: u16 },
    /// Actor/control message descriptors from one slot to another.
    Message { from: u16, to: u16 },
    /// Free buffer indices from nfmgr to a process's pool cache.
    Refill { to: u16 },
    /// Freed buffer indices from a process's pool cache back to nfmgr.
    Recycle { from: u16 },
}

impl RingId {
    pub fn producer(&self) -> u16 {
        match *self {
            RingId::Data { from, .. } | RingId::Message { from, .. } | RingId::Recycle { from } => {
                from
            }
            RingId::Refill { .. } => MANAGER_SLOT,
        }
    }

    pub fn consumer(&self) -> u16 {
        match *self {
            RingId::Data { to, .. } | RingId::Message { to, .. } | RingId::Refill { to } => to,
            RingId::Recycle { .. } => MANAGER_SLOT,
        }
    }
}

/// Computed offsets of every part of the region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub config: RegionConfig,
    pub slots_off: usize,
    pub slot_size: usize,
    pub ports_off: usize,
    pub port_size: usize,
    /// Per-slot statistics of network functions: `slots * MAX_NFS` records.
    pub nf_stats_off: usize,
    pub nf_stats_size: usize,
    pub blob_off: usize,
    pub data_rings_off: usize,
    pub data_ring_bytes: usize,
    pub msg_rings_off: usize,
    pub msg_ring_bytes: usize,
    pub refill_rings_off: usize,
    pub recycle_rings_off: usize,
    pub pool_ring_bytes: usize,
    pub buffers_off: usize,
    pub total_size: usize,
}

fn align_up(v: usize, a: usize) -> usize {
    v.div_ceil(a) * a
}

fn ring_bytes(capacity: u32, elem: usize) -> usize {
    align_up(
        crate::ring::RingHeader::SIZE + capacity as usize * elem,
        LINE,
    )
}

impl Layout {
    /// Lays out a region for `config` (validated first).
    pub fn new(config: RegionConfig) -> Result<Layout, LayoutError> {
        config.validate()?;
        let slots = config.slots as usize;
        let slot_size = std::mem::size_of::<crate::slot::SlotRecord>();
        let port_size = std::mem::size_of::<crate::stats::PortRecord>();
        let desc = std::mem::size_of::<crate::buffer::Desc>();

        let nf_stats_size = std::mem::size_of::<crate::stats::NfStatsRecord>();
        let slots_off = HEADER_SIZE;
        let ports_off = align_up(slots_off + slots * slot_size, LINE);
        let nf_stats_off = align_up(ports_off + config.ports as usize * port_size, LINE);
        let blob_off = align_up(
            nf_stats_off + slots * crate::limits::MAX_NFS * nf_stats_size,
            LINE,
        );
        let data_rings_off = align_up(blob_off + config.blob_size as usize, PAGE);
        let data_ring_bytes = ring_bytes(config.data_ring_size, desc);
        let msg_rings_off = data_rings_off + slots * slots * data_ring_bytes;
        let msg_ring_bytes = ring_bytes(config.msg_ring_size, desc);
        let refill_rings_off = msg_rings_off + slots * slots * msg_ring_bytes;
        let pool_ring_bytes = ring_bytes(config.pool_ring_size, 4);
        let recycle_rings_off = refill_rings_off + slots * pool_ring_bytes;
        let buffers_off = align_up(recycle_rings_off + slots * pool_ring_bytes, PAGE);
        let total_size = align_up(
            buffers_off + config.buffers as usize * config.buffer_size as usize,
            PAGE,
        );
        Ok(Layout {
            config,
            slots_off,
            slot_size,
            ports_off,
            port_size,
            nf_stats_off,
            nf_stats_size,
            blob_off,
            data_rings_off,
            data_ring_bytes,
            msg_rings_off,
            msg_ring_bytes,
            refill_rings_off,
            recycle_rings_off,
            pool_ring_bytes,
            buffers_off,
            total_size,
        })
    }

    /// Offset, capacity and element size of a ring; `None` if the slots named are out of range
    /// or the ring would connect a slot to itself.
    pub fn ring(&self, id: RingId) -> Option<(usize, u32)> {
        let s = self.config.slots as usize;
        let ok = |v: u16| (v as usize) < s;
        match id {
            RingId::Data { from, to } if ok(from) && ok(to) && from != to => Some((
                self.data_rings_off + (from as usize * s + to as usize) * self.data_ring_bytes,
                self.config.data_ring_size,
            )),
            RingId::Message { from, to } if ok(from) && ok(to) && from != to => Some((
                self.msg_rings_off + (from as usize * s + to as usize) * self.msg_ring_bytes,
                self.config.msg_ring_size,
            )),
            RingId::Refill { to } if ok(to) && to != MANAGER_SLOT => Some((
                self.refill_rings_off + to as usize * self.pool_ring_bytes,
                self.config.pool_ring_size,
            )),
            RingId::Recycle { from } if ok(from) && from != MANAGER_SLOT => Some((
                self.recycle_rings_off + from as usize * self.pool_ring_bytes,
                self.config.pool_ring_size,
            )),
            _ => None,
        }
    }

    /// Every ring of the region, for initialisation.
    pub fn all_rings(&self) -> impl Iterator<Item = RingId> + '_ {
        let s = self.config.slots as u16;
        let pairs = (0..s).flat_map(move |from| (0..s).map(move |to| (from, to)));
        pairs
            .filter(|(f, t)| f != t)
            .flat_map(|(from, to)| [RingId::Data { from, to }, RingId::Message { from, to }])
            .chain((1..s).flat_map(|x| [RingId::Refill { to: x }, RingId::Recycle { from: x }]))
    }

    pub fn buffer_off(&self, index: u32) -> usize {
        self.buffers_off + index as usize * self.config.buffer_size as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_layout_is_ordered_and_aligned() {
        let l = Layout::new(RegionConfig::default()).unwrap();
        assert!(l.slots_off >= HEADER_SIZE);
        assert!(l.ports_off >= l.slots_off + 8 * l.slot_size);
        assert_eq!(l.data_rings_off % PAGE, 0);
        assert_eq!(l.buffers_off % PAGE, 0);
        assert!(l.total_size >= l.buffers_off + 16384 * 2048);
        let (last, _) = l.ring(RingId::Recycle { from: 7 }).unwrap();
        assert!(last + l.pool_ring_bytes <= l.buffers_off);
        assert_eq!(l.all_rings().count(), 8 * 7 * 2 + 7 * 2);
    }

    #[test]
    fn rings_never_overlap() {
        let l = Layout::new(RegionConfig {
            slots: 5,
            ..RegionConfig::default()
        })
        .unwrap();
        let mut spans: Vec<(usize, usize)> = l
            .all_rings()
            .map(|id| {
                let (off, cap) = l.ring(id).unwrap();
                let elem = match id {
                    RingId::Refill { .. } | RingId::Recycle { .. } => 4,
                    _ => 16,
                };
                (
                    off,
                    off + crate::ring::RingHeader::SIZE + cap as usize * elem,
                )
            })
            .collect();
        spans.sort();
        for w in spans.windows(2) {
            assert!(w[0].1 <= w[1].0, "{:?} overlaps {:?}", w[0], w[1]);
        }
    }

    #[test]
    fn invalid_sizes_name_their_key() {
        let bad = RegionConfig {
            data_ring_size: 1000,
            ..RegionConfig::default()
        };
        let err = Layout::new(bad).unwrap_err().to_string();
        assert!(err.contains("region.data_ring_size"), "{err}");
        let bad = RegionConfig {
            buffer_size: 100,
            ..RegionConfig::default()
        };
        assert!(Layout::new(bad)
            .unwrap_err()
            .to_string()
            .contains("buffer_size"));
        let bad = RegionConfig {
            slots: 65,
            ..RegionConfig::default()
        };
        assert!(Layout::new(bad).unwrap_err().to_string().contains("slots"));
    }

    #[test]
    fn self_rings_and_out_of_range_slots_do_not_exist() {
        let l = Layout::new(RegionConfig::default()).unwrap();
        assert!(l.ring(RingId::Data { from: 1, to: 1 }).is_none());
        assert!(l.ring(RingId::Data { from: 1, to: 8 }).is_none());
        assert!(l.ring(RingId::Refill { to: 0 }).is_none());
    }
}

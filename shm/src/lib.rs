//! nf-shm: the shared-memory core of the data plane, and all of its `unsafe`.
//!
//! - [`layout`], [`region`]: the shared region nfmgr creates and every process maps: a
//!   header, the process directory ([`slot`]), counters ([`stats`]), the rings and the
//!   packet buffers, all addressed by offset or index;
//! - [`ring`]: single-producer single-consumer rings, one per (producer, consumer, class),
//!   over [`sync`]'s atomics (loom-switchable: `--cfg loom` model-checks them);
//! - [`buffer`], [`pool`]: packet buffers, their ownership, allocation and recovery;
//! - [`doorbell`]: sleeping when idle and waking on work;
//! - [`endpoint`]: a process's attachment to the data plane (its rings, pool cache,
//!   doorbell and counters);
//! - [`snapshot`]: a consistent-enough reading of the region for monitoring;
//! - [`records`], [`index`], [`hint`]: a runtime's per-flow records, its flow index and
//!   prefetching (private memory, laid out for the packet path);
//! - [`time`], [`limits`]: the clock and the limits several layers agree on.
//!
//! `unsafe` is confined to `region` (mapping and typed access), `ring` (slot access),
//! `records` (typed per-flow records), `doorbell` (eventfd system calls), `hint`
//! (prefetch, huge-page advice) and `sync`; every block says why it is sound. nflib
//! re-exports each module under its old path (`nflib::region`, `nflib::ring`, ...).

pub mod buffer;
pub mod doorbell;
pub mod endpoint;
pub mod hint;
pub mod index;
pub mod layout;
pub mod limits;
pub mod pool;
pub mod records;
pub mod region;
pub mod ring;
pub mod slot;
pub mod snapshot;
pub mod stats;
mod sync;
pub mod time;

pub use buffer::{Desc, Packet};
pub use layout::{RegionConfig, RingId, MANAGER_SLOT};
pub use region::Region;

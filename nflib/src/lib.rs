//! nflib: what every process of the platform links.
//!
//! The layers, bottom up:
//! - [`layout`], [`region`]: the shared region nfmgr creates and every process maps: a header,
//!   the process directory ([`slot`]), port statistics ([`stats`]), the rings and the packet
//!   buffers, all addressed by offset or index.
//! - [`ring`]: single-producer single-consumer rings, one per (producer, consumer, class).
//! - [`buffer`], [`pool`]: packet buffers, their ownership, allocation and recovery.
//! - [`doorbell`]: sleeping when idle and waking on work.
//! - [`endpoint`]: a process's attachment to the data plane (its rings, pool cache, doorbell
//!   and counters), used by nf-vswitch and nf-runtime.
//! - [`packet`], [`flow`], [`pcap`], [`stream`]: the `nf-packet` crate below this one
//!   (typed views over packet bytes, the flow key, capture files, TCP reassembly),
//!   re-exported under their old paths.
//! - [`wire`], [`reliable`], [`msg`], [`cluster`], [`peer_wire`]: the `nf-proto` crate
//!   below this one (actor frames, their reliable delivery, the messages, the cluster view,
//!   the managers' session frames: I/O-free), re-exported under their old paths.
//!
//! `unsafe` code is confined to `region` (mapping and typed access), `ring` (slot access),
//! `records` (typed per-flow records), `doorbell` (eventfd system calls), `hint` (prefetch)
//! and `sync`.

pub mod buffer;
pub mod config;
pub mod control_client;
pub mod doorbell;
pub mod endpoint;
pub mod hint;
pub mod index;
pub mod layout;
pub mod limits;
pub mod local;
pub mod mailbox;
pub mod net;
pub mod nf;
pub mod pool;
pub mod process;
pub mod records;
pub mod region;
pub mod ring;
pub mod sandbox;
pub mod slot;
pub mod snapshot;
pub mod stats;
mod sync;
pub mod time;
pub mod top;

// The packet views are their own crate (the layer below this one); their paths here stay.
pub use nf_packet as packet;
pub use nf_packet::{flow, pcap, stream};
// So are the protocols (frames, the reliable transport, messages, the cluster view).
pub use nf_proto::{cluster, msg, peer_wire, reliable, wire};

pub use buffer::{Desc, Packet};
pub use layout::{RegionConfig, RingId, MANAGER_SLOT};
pub use region::Region;

//! nflib: what every process of the platform links.
//!
//! It stands on five crates, each re-exported here under its old paths so callers name
//! one library:
//! - `nf-packet` (`packet/`): typed views over packet bytes, the flow key, capture files,
//!   TCP reassembly ([`packet`], [`flow`], [`pcap`], [`stream`]);
//! - `nf-proto` (`proto/`): actor frames, their reliable delivery, the messages, the
//!   cluster view, the managers' session frames, all I/O-free ([`wire`], [`reliable`],
//!   [`msg`], [`cluster`], [`peer_frame`]);
//! - `nf-shm` (`shm/`): the shared region, rings, buffers and pool, doorbells, the
//!   endpoint, per-flow records and all the data plane's `unsafe` ([`region`], [`ring`],
//!   [`buffer`], [`pool`], [`endpoint`], ...);
//! - `nf-config` (`config/`): the configuration file ([`config`], [`net`]);
//! - `nf-api` (`api/`): the network-function API ([`nf`]).
//!
//! Its own modules: the mailbox (the reliable transport joined to an endpoint's rings),
//! the process scaffolding (attach, sandbox, loop), the in-process local harness, the
//! control socket's client, the coordinator's journal file and the dashboard's report.

pub mod control_client;
pub mod journal;
pub mod local;
pub mod mailbox;
pub mod process;
pub mod sandbox;
pub mod top;

// The packet views are their own crate (the layer below this one); their paths here stay.
pub use nf_packet as packet;
pub use nf_packet::{flow, pcap, stream};
// So are the protocols (frames, the reliable transport, messages, the cluster view).
pub use nf_proto::{cluster, frame, membership, msg, peer_frame, reliable};

// And the shared-memory core.
pub use nf_shm::{
    buffer, doorbell, endpoint, hint, index, layout, limits, pool, records, region, ring, slot,
    snapshot, stats, time,
};
pub use nf_shm::{Desc, Packet, Region, RegionConfig, RingId, MANAGER_SLOT};
// And the configuration.
pub use nf_config as config;
pub use nf_config::net;
// And the network-function API.
pub use nf_api as nf;

//! nf-proto: the platform's protocols without their I/O. What endpoints say to each other
//! and how it reaches them, as types and state machines that take bytes and the time and
//! return bytes, so that each is tested with simulated time, loss and restarts, and fuzzed,
//! alone. No shared memory, no sockets, no unsafe; the processes (through nflib's mailbox
//! and nfmgr's relay and peer sessions) do the I/O.
//!
//! - [`frame`]: actor frames, on the message rings of one host and as raw Ethernet frames
//!   between servers, with their authentication tags;
//! - [`reliable`]: exactly-once, in-order delivery of actor messages over those frames;
//! - [`msg`]: the actor messages themselves (migration, replication, recovery, control);
//! - [`cluster`]: the cluster view, workloads and reports the messages carry;
//! - [`peer_frame`]: the frames nfmgrs exchange over their TCP sessions;
//! - [`membership`]: who is in the cluster and alive, and the view, as a state machine.
//!
//! nflib re-exports each under its old path (`nflib::frame`, `nflib::reliable`, ...).

#![forbid(unsafe_code)]

pub mod cluster;
pub mod frame;
pub mod membership;
pub mod msg;
pub mod peer_frame;
pub mod reliable;

//! What the coordinator tells every endpoint about the cluster, and what endpoints report
//! back: the cluster view (paper 3.5, `NotifyClusterCfg`), workloads (`PollWorkload`), flow
//! listings and message-probe reports.
//!
//! These types travel inside actor messages (postcard) and, between managers, inside their
//! TCP frames; the CLI prints them as JSON.

use serde::{Deserialize, Serialize};

use crate::frame::EndpointAddr;

/// The composition of the cluster at one version.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterView {
    /// The coordinator's epoch: its incarnation (or one past its journal's, if that is
    /// higher), which a restart makes higher. Views are ordered by (epoch, version)
    /// ([`ClusterView::stamp`]): a member follows a restarted coordinator (whose versions
    /// start again from 1 without a journal), and never goes back to an older coordinator
    /// life's view.
    pub epoch: u64,
    /// Grows with every change the coordinator makes (within its epoch).
    pub version: u64,
    /// Server number of the coordinator.
    pub coordinator: u16,
    pub servers: Vec<ServerInfo>,
}

/// One server (one nfmgr) of the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerInfo {
    pub server: u16,
    pub name: String,
    /// The nfmgr's incarnation (its start time); a new one means every process on the
    /// server is new too.
    pub incarnation: u64,
    pub alive: bool,
    pub endpoints: Vec<EndpointInfo>,
}

/// A vswitch or runtime somewhere in the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointInfo {
    pub addr: EndpointAddr,
    pub kind: ProcessKind,
    pub name: String,
    /// The service chain a runtime runs.
    pub chain: Option<String>,
    /// Running now (a restarting process is not).
    pub alive: bool,
    /// Which life of the process: its slot's generation on its server, new at every
    /// start (with the server's incarnation, one life in the cluster). A vswitch of
    /// another server tells a runtime that restarted between two views from one that
    /// lived on by it. (Absent from a journal written before it: 0.)
    #[serde(default)]
    pub generation: u32,
}

impl EndpointInfo {
    /// The MAC a vswitch addresses this runtime's data frames to.
    pub fn input_mac(&self) -> [u8; 6] {
        self.addr.input_mac()
    }

    /// The MAC actor messages to it are addressed to.
    pub fn control_mac(&self) -> [u8; 6] {
        self.addr.control_mac()
    }
}

impl ClusterView {
    pub fn server(&self, id: u16) -> Option<&ServerInfo> {
        self.servers.iter().find(|s| s.server == id)
    }

    /// The view's place in the order of views: (epoch, version).
    pub fn stamp(&self) -> (u64, u64) {
        (self.epoch, self.version)
    }

    /// Every endpoint of every live server.
    pub fn endpoints(&self) -> impl Iterator<Item = &EndpointInfo> {
        self.servers
            .iter()
            .filter(|s| s.alive)
            .flat_map(|s| s.endpoints.iter())
    }

    /// Live runtimes running `chain`, in a stable order.
    pub fn runtimes_of(&self, chain: Option<&str>) -> Vec<EndpointAddr> {
        let mut v: Vec<EndpointAddr> = self
            .endpoints()
            .filter(|e| e.kind == ProcessKind::Runtime && e.alive && e.chain.as_deref() == chain)
            .map(|e| e.addr)
            .collect();
        v.sort();
        v
    }

    /// Whether `server` is a live member.
    pub fn is_member(&self, server: u16) -> bool {
        self.server(server).is_some_and(|s| s.alive)
    }
}

/// A runtime's load, as `PollWorkload` returns it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workload {
    pub flows_active: u64,
    pub flows_created: u64,
    pub rx_pkts: u64,
    pub tx_pkts: u64,
    /// Packets producers could not queue to it (the paper's overload signal).
    pub input_drops: u64,
    /// Nanoseconds its loop spent working.
    pub busy_ns: u64,
    pub uptime_ms: u64,
    pub transport: TransportCounters,
    /// Settings the coordinator gave it.
    pub migration_target: Option<EndpointAddr>,
    pub replicas: Vec<EndpointAddr>,
    pub cluster_version: u64,
    /// Replication: copies of other runtimes' flows held here; this runtime's output held
    /// for acknowledgements now, let go unprotected so far, and the last acknowledgement's
    /// delay.
    pub replica_flows: u64,
    pub repl_holding: u64,
    pub repl_unprotected: u64,
    pub repl_lag_us: u64,
}

/// The reliable transport's counters of one endpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportCounters {
    pub msgs_sent: u64,
    pub msgs_delivered: u64,
    pub msgs_lost: u64,
    pub frames_sent: u64,
    pub frames_received: u64,
    pub retransmits: u64,
    pub timeouts: u64,
    pub duplicates: u64,
}

impl From<&crate::reliable::TransportStats> for TransportCounters {
    fn from(s: &crate::reliable::TransportStats) -> Self {
        TransportCounters {
            msgs_sent: s.msgs_sent,
            msgs_delivered: s.msgs_delivered,
            msgs_lost: s.msgs_lost,
            frames_sent: s.frames_sent,
            frames_received: s.frames_received,
            retransmits: s.retransmits,
            timeouts: s.timeouts,
            duplicates: s.duplicates,
        }
    }
}

/// One flow of a runtime, for `nfmgr flows`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowInfo {
    pub key: String,
    pub actor: u64,
    pub age_ms: u64,
    pub idle_ms: u64,
    /// `new` (no reply yet), `open`, `closing` (FIN seen) or `closed`.
    pub state: String,
    pub aliases: u32,
    /// The vswitch that feeds it.
    pub vswitch: EndpointAddr,
}

/// A run of probe messages between two liaisons (`nfmgr msgtest`), seen from one side.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeReport {
    pub run: u64,
    pub peer: EndpointAddr,
    /// Sender side: messages handed to the transport; receiver side: 0.
    pub sent: u64,
    /// Receiver side: messages that arrived.
    pub received: u64,
    /// Receiver side: messages seen twice, and messages whose number was not the next one.
    pub duplicates: u64,
    pub out_of_order: u64,
    pub payload_bytes: u64,
    /// Monotonic nanoseconds of the first and last message (sent or received).
    pub first_ns: u64,
    pub last_ns: u64,
    /// One-way latency from the sender's stamp (same clock on one host and in network
    /// namespaces of one machine).
    pub latency_min_ns: u64,
    pub latency_avg_ns: u64,
    pub latency_max_ns: u64,
    /// Sender side: every message acknowledged.
    pub done: bool,
    /// Sender side: the transport's retransmissions to the peer during the run.
    pub retransmits: u64,
    /// Sender side: messages the transport gave up on during the run because the peer
    /// stopped answering for `peer_dead_after_ms` (they count as lost).
    #[serde(default)]
    pub given_up: u64,
}

/// Which kind of process an endpoint is (nflib's process directory records it per slot).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProcessKind {
    None,
    Manager,
    Vswitch,
    Runtime,
}

impl ProcessKind {
    pub fn from_raw(v: u32) -> ProcessKind {
        match v {
            1 => ProcessKind::Manager,
            2 => ProcessKind::Vswitch,
            3 => ProcessKind::Runtime,
            _ => ProcessKind::None,
        }
    }

    pub fn raw(self) -> u32 {
        match self {
            ProcessKind::None => 0,
            ProcessKind::Manager => 1,
            ProcessKind::Vswitch => 2,
            ProcessKind::Runtime => 3,
        }
    }
}

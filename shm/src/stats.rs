//! Counters shared through the region: per-process and per-port.
//!
//! Each block of counters has exactly one writer (the process or nfmgr's port loop). Writers
//! count into a plain local array and publish it with relaxed stores once per loop
//! iteration, so the packet path performs no atomic read-modify-write. Readers (nfmgr's
//! supervisor, `nfmgr stats`, the dashboard) load them with relaxed ordering; a snapshot may
//! mix two iterations, which is fine for monitoring.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

macro_rules! counter_set {
    ($(#[$doc:meta])* $name:ident, $len:ident = $n:expr, [$($variant:ident => $label:literal),* $(,)?]) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr(usize)]
        pub enum $name { $($variant),* }

        pub const $len: usize = $n;

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),*];
            /// Stable name used in JSON and Prometheus output.
            pub fn label(self) -> &'static str {
                match self { $($name::$variant => $label),* }
            }
        }

        const _: () = assert!($name::ALL.len() <= $len);
    };
}

counter_set!(
    /// Counters of a process slot (nfmgr, a vswitch or a runtime).
    ProcCounter, PROC_COUNTERS = 72, [
    RxPkts => "rx_pkts",
    RxBytes => "rx_bytes",
    TxPkts => "tx_pkts",
    TxBytes => "tx_bytes",
    DropRingFull => "drop_ring_full",
    DropInvalidDesc => "drop_invalid_desc",
    DropRunt => "drop_runt",
    DropMalformed => "drop_malformed",
    DropTruncated => "drop_truncated",
    DropNonIp => "drop_non_ip",
    DropNoRuntime => "drop_no_runtime",
    DropNoBuffer => "drop_no_buffer",
    MsgRx => "msg_rx",
    MsgTx => "msg_tx",
    Wakeups => "wakeups",
    BusyNs => "busy_ns",
    Loops => "loops",
    CachedBufs => "cached_bufs",
    FlowsActive => "flows_active",
    FlowsCreated => "flows_created",
    FlowsExpired => "flows_expired",
    HeartbeatMs => "heartbeat_ms",
    DropFlowTableFull => "drop_flow_table_full",
    DropNoChain => "drop_no_chain",
    DropMisaddressed => "drop_misaddressed",
    EventsDropped => "events_dropped",
    ActorMsgsSent => "actor_msgs_sent",
    ActorMsgsDelivered => "actor_msgs_delivered",
    ActorMsgsLost => "actor_msgs_lost",
    ActorRetransmits => "actor_retransmits",
    ActorTimeouts => "actor_timeouts",
    ActorBadFrames => "actor_bad_frames",
    ActorSendRefused => "actor_send_refused",
    MigratedOut => "migrated_out",
    MigratedIn => "migrated_in",
    MigrationRolledBack => "migration_rolled_back",
    MigrationHeld => "migration_held",
    DropMigrationBuffer => "drop_migration_buffer",
    MigrationLateStragglers => "migration_late_stragglers",
    MigrationStraysEnded => "migration_strays_ended",
    LoopsSlow => "loops_slow",
    LoopMaxUs => "loop_max_us",
    MigrationGroupsMismatched => "migration_groups_mismatched",
    AliasesRefused => "aliases_refused",
    AliasesHeld => "aliases_held",
    AliasCommitTimeouts => "alias_commit_timeouts",
    FlowsReopened => "flows_reopened",
    StraysTakenOver => "strays_taken_over",
    ReplMessages => "repl_messages",
    ReplStateBytes => "repl_state_bytes",
    ReplHeld => "repl_held",
    ReplUnprotected => "repl_unprotected",
    ReplRefused => "repl_refused",
    ReplFlowsMoved => "repl_flows_moved",
    ReplLagUs => "repl_lag_us",
    ReplicaFlows => "replica_flows",
    ReplicaRefused => "replica_refused",
    ReplicaMalformed => "replica_malformed",
    FlowsRecovered => "flows_recovered",
    DropAwaitingRecovery => "drop_awaiting_recovery",
    ReplUnprotectedUs => "repl_unprotected_us",
    HoldsMalformed => "holds_malformed",
    MsgForged => "msg_forged",
    RecoveredNotOurs => "recovered_not_ours",
    CallsRefused => "calls_refused",
    ReplCongested => "repl_congested",
    VswitchRebuilds => "vswitch_rebuilds",
    VswitchRebuildUs => "vswitch_rebuild_us",
    VswitchRebuildFlows => "vswitch_rebuild_flows",
    MigrationHandedBack => "migration_handed_back",
]);

impl ProcCounter {
    /// The drop counter of a frame that did not parse.
    pub fn of_parse_error(e: &nf_packet::ParseError) -> ProcCounter {
        match e {
            nf_packet::ParseError::Runt => ProcCounter::DropRunt,
            nf_packet::ParseError::Truncated(_) => ProcCounter::DropTruncated,
            nf_packet::ParseError::Malformed(..) => ProcCounter::DropMalformed,
        }
    }
}

/// Counters a network function exports: index 0 is the platform's count of packets the
/// function dropped; the function names the others.
pub const NF_COUNTERS: usize = 16;

/// Statistics of one network function in one runtime, written by that runtime.
#[repr(C, align(64))]
pub struct NfStatsRecord {
    pub kind: ShmName,
    /// Names of counters 1.., separated by NUL, as the function declared them.
    pub labels: [AtomicU64; 32],
    pub counters: Padded<[AtomicU64; NF_COUNTERS]>,
}

impl NfStatsRecord {
    pub fn set_labels(&self, labels: &[&str]) {
        let mut bytes = [0u8; 256];
        let mut at = 0;
        for l in labels.iter().take(NF_COUNTERS - 1) {
            let l = l.as_bytes();
            if at + l.len() + 1 > bytes.len() {
                break;
            }
            bytes[at..at + l.len()].copy_from_slice(l);
            at += l.len() + 1;
        }
        for (i, w) in self.labels.iter().enumerate() {
            let mut v = [0u8; 8];
            v.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
            w.store(u64::from_le_bytes(v), Ordering::Relaxed);
        }
    }

    pub fn labels(&self) -> Vec<String> {
        let mut bytes = Vec::with_capacity(256);
        for w in &self.labels {
            bytes.extend_from_slice(&w.load(Ordering::Relaxed).to_le_bytes());
        }
        let end = bytes
            .iter()
            .rposition(|b| *b != 0)
            .map(|p| p + 1)
            .unwrap_or(0);
        if end == 0 {
            return Vec::new();
        }
        bytes[..end]
            .split(|b| *b == 0)
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect()
    }
}

counter_set!(
    /// Counters of one of nfmgr's ports.
    PortCounter, PORT_COUNTERS = 48, [
    RxPkts => "rx_pkts",
    RxBytes => "rx_bytes",
    TxPkts => "tx_pkts",
    TxBytes => "tx_bytes",
    RxDropRingFull => "rx_drop_ring_full",
    RxDropNoBuffer => "rx_drop_no_buffer",
    RxOversize => "rx_oversize",
    RxUnsupported => "rx_unsupported",
    RxKernelDrops => "rx_kernel_drops",
    RxCsumCompleted => "rx_csum_completed",
    TxErrors => "tx_errors",
    TxDropFull => "tx_drop_full",
    GenFlows => "gen_flows",
    GenSent => "gen_sent",
    GenDone => "gen_done",
    SinkRx => "sink_rx",
    SinkFlows => "sink_flows",
    SinkLost => "sink_lost",
    SinkDuplicates => "sink_duplicates",
    SinkReordered => "sink_reordered",
    SinkForeign => "sink_foreign",
    SinkLatencyNsSum => "sink_latency_ns_sum",
    SinkLatencyNsMax => "sink_latency_ns_max",
    ReplayDone => "replay_done",
    Recorded => "recorded",
    CtlRx => "ctl_rx",
    CtlTx => "ctl_tx",
    CtlAuthFailed => "ctl_auth_failed",
    CtlNotMember => "ctl_not_member",
    CtlBad => "ctl_bad",
    DataTx => "data_tx",
    DataRx => "data_rx",
    DataBad => "data_bad",
    DataReplayed => "data_replayed",
    RxIgnored => "rx_ignored",
    DevIpackets => "dev_ipackets",
    DevImissed => "dev_imissed",
    DevIerrors => "dev_ierrors",
    DevOerrors => "dev_oerrors",
    DevRxNombuf => "dev_rx_nombuf",
    DpdkRxInRegion => "dpdk_rx_in_region",
    DpdkRxForeign => "dpdk_rx_foreign",
]);

/// A writer's private copy of a counter block.
#[derive(Clone, Debug)]
pub struct LocalCounters<const N: usize> {
    values: [u64; N],
}

impl<const N: usize> Default for LocalCounters<N> {
    fn default() -> Self {
        LocalCounters { values: [0; N] }
    }
}

impl<const N: usize> LocalCounters<N> {
    /// Starts from what is already published (a restarted process keeps its history).
    pub fn resume(shared: &[AtomicU64; N]) -> Self {
        let mut values = [0; N];
        for (v, s) in values.iter_mut().zip(shared) {
            *v = s.load(Ordering::Relaxed);
        }
        LocalCounters { values }
    }

    #[inline(always)]
    pub fn add(&mut self, index: usize, n: u64) {
        self.values[index] = self.values[index].wrapping_add(n);
    }

    #[inline(always)]
    pub fn set(&mut self, index: usize, v: u64) {
        self.values[index] = v;
    }

    #[inline(always)]
    pub fn get(&self, index: usize) -> u64 {
        self.values[index]
    }

    pub fn publish(&self, shared: &[AtomicU64; N]) {
        for (v, s) in self.values.iter().zip(shared) {
            s.store(*v, Ordering::Relaxed);
        }
    }
}

/// Reads a counter block.
pub fn snapshot<const N: usize>(shared: &[AtomicU64; N]) -> [u64; N] {
    let mut out = [0; N];
    for (o, s) in out.iter_mut().zip(shared) {
        *o = s.load(Ordering::Relaxed);
    }
    out
}

/// A short name stored in the region (32 bytes, NUL padded), readable while others write it.
#[repr(C)]
pub struct ShmName([AtomicU64; 4]);

impl ShmName {
    pub fn set(&self, name: &str) {
        let mut bytes = [0u8; 32];
        let n = name.len().min(31);
        bytes[..n].copy_from_slice(&name.as_bytes()[..n]);
        for (i, word) in self.0.iter().enumerate() {
            let mut w = [0u8; 8];
            w.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
            word.store(u64::from_le_bytes(w), Ordering::Relaxed);
        }
    }

    pub fn get(&self) -> String {
        let mut bytes = Vec::with_capacity(32);
        for word in &self.0 {
            bytes.extend_from_slice(&word.load(Ordering::Relaxed).to_le_bytes());
        }
        let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
        String::from_utf8_lossy(&bytes[..end]).into_owned()
    }
}

#[repr(C, align(64))]
pub struct Padded<T>(pub T);

/// Kinds of port, as recorded for readers of the region.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PortKind {
    Unused,
    AfPacket,
    Generator,
    Sink,
    Pcap,
    Null,
    Dpdk,
}

impl PortKind {
    pub fn from_raw(v: u32) -> PortKind {
        match v {
            1 => PortKind::AfPacket,
            2 => PortKind::Generator,
            3 => PortKind::Sink,
            4 => PortKind::Pcap,
            5 => PortKind::Null,
            6 => PortKind::Dpdk,
            _ => PortKind::Unused,
        }
    }

    pub fn raw(self) -> u32 {
        match self {
            PortKind::Unused => 0,
            PortKind::AfPacket => 1,
            PortKind::Generator => 2,
            PortKind::Sink => 3,
            PortKind::Pcap => 4,
            PortKind::Null => 5,
            PortKind::Dpdk => 6,
        }
    }
}

/// Statistics of one of nfmgr's ports, written by nfmgr's data-plane thread.
#[repr(C, align(64))]
pub struct PortRecord {
    pub kind: AtomicU32,
    pub name: ShmName,
    pub counters: Padded<[AtomicU64; PORT_COUNTERS]>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for c in ProcCounter::ALL {
            assert!(seen.insert(c.label()));
        }
        let mut seen = std::collections::HashSet::new();
        for c in PortCounter::ALL {
            assert!(seen.insert(c.label()));
        }
    }

    #[test]
    fn names_roundtrip_and_truncate() {
        let n = ShmName([
            AtomicU64::new(0),
            AtomicU64::new(0),
            AtomicU64::new(0),
            AtomicU64::new(0),
        ]);
        n.set("runtime-0");
        assert_eq!(n.get(), "runtime-0");
        n.set(&"x".repeat(40));
        assert_eq!(n.get().len(), 31);
    }
}

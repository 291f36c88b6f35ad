//! The platform's configuration file (TOML): ports, processes, service chains and the rules
//! that steer traffic to them.
//!
//! nfmgr reads and validates it, then stores the text in the shared region; nf-vswitch and
//! nf-runtime parse that frozen copy, so a file edited while the platform runs can never make
//! a restarted process disagree with nfmgr.
//!
//! Every table rejects unknown keys, and every semantic check reports the key at fault
//! (`port.gen0.rate_pps`, `vswitch.vs0.runtimes`), so a typo is an error at start, not a
//! silently ignored setting. The settings of each network function are kept as a TOML table
//! here and checked by that function's own parser (see `nf::NfRegistry`).

//!
//! Crate nf-config (`config/`), below the NF API and above the shared-memory core (a
//! region's size comes from here); nflib re-exports it as `nflib::config`, and [`net`]
//! (prefixes and port ranges) as `nflib::net`.

#![forbid(unsafe_code)]

pub mod net;

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

use crate::net::{PortRange, Prefix};
use nf_shm::layout::RegionConfig;

/// A configuration error. Each names what is at fault: the file, or the key
/// (`port.gen0.rate_pps`) and what is wrong with its value.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Not TOML, or not the configuration's shape (an unknown key, a wrong type); toml's
    /// message gives the line and the key.
    #[error("{0}")]
    Syntax(#[from] toml::de::Error),
    /// A key whose value is wrong, and why.
    #[error("{key}: {reason}")]
    Invalid { key: String, reason: String },
    /// The region these settings ask for cannot be laid out.
    #[error(transparent)]
    Region(#[from] nf_shm::layout::LayoutError),
    /// A chain that is not in the file.
    #[error("no chain named `{0}`")]
    NoChain(String),
    /// A network function's settings, as its own parser judged them (its message names
    /// the key): the registry's `BuildError` (a crate above this one). Shown, not given as
    /// the source: nfmgr prints error chains, which would say it twice.
    #[error("{0}")]
    Function(Box<dyn std::error::Error + Send + Sync>),
    /// The copy in the region is not one nfmgr wrote.
    #[error("frozen configuration {0}")]
    Frozen(&'static str),
    /// An error in the file at `path`.
    #[error("in config {}: {source}", path.display())]
    In {
        path: PathBuf,
        #[source]
        source: Box<ConfigError>,
    },
}

impl ConfigError {
    /// `key`'s value is wrong because of `reason` (a text, or a typed error of its own).
    pub fn invalid(key: impl Into<String>, reason: impl std::fmt::Display) -> ConfigError {
        ConfigError::Invalid {
            key: key.into(),
            reason: reason.to_string(),
        }
    }
}

type Result<T> = std::result::Result<T, ConfigError>;

/// Returns `ConfigError::Invalid` for a key: `bail!("manager.cores" => "CPU {c} ...")`.
macro_rules! bail {
    ($key:expr => $($t:tt)*) => { return Err(ConfigError::invalid($key, format!($($t)*))) };
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Names the region, the lock and (later) the control socket; one nfmgr per instance.
    #[serde(default = "default_instance")]
    pub instance: String,
    #[serde(default)]
    pub region: RegionSection,
    #[serde(default)]
    pub manager: ManagerSection,
    #[serde(default)]
    pub supervisor: SupervisorSection,
    /// This server's place in a cluster; a stand-alone nfmgr is a cluster of one.
    #[serde(default)]
    pub cluster: ClusterSection,
    /// How runtimes move flows between them (issue 5, docs/MIGRATION.md).
    #[serde(default)]
    pub migration: MigrationSection,
    /// DPDK's environment, for `dpdk:` ports (nfmgr built with the `dpdk` feature).
    #[serde(default)]
    pub dpdk: DpdkSection,
    #[serde(default, rename = "vswitch")]
    pub vswitches: Vec<VswitchConfig>,
    #[serde(default, rename = "runtime")]
    pub runtimes: Vec<RuntimeConfig>,
    #[serde(default, rename = "port")]
    pub ports: Vec<PortConfig>,
    /// Service chains: named lists of network functions.
    #[serde(default, rename = "chain")]
    pub chains: Vec<ChainConfig>,
    /// Rules that steer new flows to chains, first match wins (match -> tag -> chain).
    #[serde(default, rename = "steer")]
    pub steering: Vec<SteerRule>,
    /// Directory the config was read from; relative paths in it are resolved against it.
    #[serde(skip)]
    pub base_dir: PathBuf,
    /// The text it was parsed from.
    #[serde(skip)]
    pub text: String,
    /// The file it was loaded from (`Config::load`), to read again (`nfmgr rekey`).
    #[serde(skip)]
    pub path: Option<PathBuf>,
}

/// A service chain: the network functions a flow goes through, in order.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChainConfig {
    pub name: String,
    /// Each function's settings; `kind` names the function, the rest is its own.
    #[serde(default, rename = "nf")]
    pub nfs: Vec<toml::Table>,
    /// How the chain's flows survive their runtime's death (docs/REPLICATION.md).
    #[serde(default)]
    pub replication: ReplicationMode,
    /// `"periodic"`: a flow is copied after this many packets...
    #[serde(default = "d_replication_packets")]
    pub replication_packets: u32,
    /// ... or this long after its last copy, whichever comes first.
    #[serde(default = "d_replication_interval_ms")]
    pub replication_interval_ms: u32,
    /// `"output-commit"`: the longest a packet waits for its replica's acknowledgement
    /// before it leaves unprotected (counted).
    #[serde(default = "d_commit_wait_ms")]
    pub commit_wait_ms: u32,
    /// `"output-commit"`: what output does while its flow has no live replica.
    #[serde(default)]
    pub without_replica: WithoutReplicaPolicy,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ReplicationMode {
    #[default]
    Off,
    Periodic,
    OutputCommit,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum WithoutReplicaPolicy {
    /// Held up to `commit_wait_ms` for a replica to appear (a TCP flow then crawls while
    /// no replica lives: every packet waits that long).
    Wait,
    /// Leaves at once, counted (`repl_unprotected`).
    #[default]
    Unprotected,
}

fn d_replication_packets() -> u32 {
    32
}

fn d_replication_interval_ms() -> u32 {
    100
}

fn d_commit_wait_ms() -> u32 {
    50
}

impl ChainConfig {
    /// The `kind` of each function, in order.
    pub fn kinds(&self) -> Vec<String> {
        self.nfs
            .iter()
            .map(|t| {
                t.get("kind")
                    .and_then(|k| k.as_str())
                    .unwrap_or("")
                    .to_string()
            })
            .collect()
    }
}

/// `[[steer]]`: traffic matching `match` goes to `chain`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SteerRule {
    pub chain: String,
    #[serde(default, rename = "match")]
    pub matches: Match,
}

/// What a steering rule (or a firewall rule) matches on the first packet of a flow. Unset
/// fields match anything.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Match {
    pub src: Option<Prefix>,
    pub dst: Option<Prefix>,
    /// `tcp`, `udp`, `icmp`, `icmpv6`, `sctp` or a protocol number.
    pub proto: Option<Proto>,
    pub src_port: Option<PortRange>,
    pub dst_port: Option<PortRange>,
}

/// An IP protocol by name or number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "ProtoText")]
pub struct Proto(pub u8);

#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum ProtoText {
    Number(u8),
    Name(String),
}

/// A protocol name that is none of those known (as written, lower-cased).
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[error("`{0}` is not tcp, udp, icmp, icmpv6, sctp or a number")]
pub struct UnknownProto(pub String);

impl TryFrom<ProtoText> for Proto {
    type Error = UnknownProto;
    fn try_from(t: ProtoText) -> std::result::Result<Proto, UnknownProto> {
        match t {
            ProtoText::Number(n) => Ok(Proto(n)),
            ProtoText::Name(n) => match n.to_ascii_lowercase().as_str() {
                "tcp" => Ok(Proto(6)),
                "udp" => Ok(Proto(17)),
                "icmp" => Ok(Proto(1)),
                "icmpv6" => Ok(Proto(58)),
                "sctp" => Ok(Proto(132)),
                other => Err(UnknownProto(other.to_string())),
            },
        }
    }
}

/// Fields of a [`Match`] that do not make sense together.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum MatchError {
    /// A port range without a protocol that has ports.
    #[error("ports need proto = \"tcp\", \"udp\" or \"sctp\"")]
    PortsWithoutProto,
    /// An IPv4 prefix on one side, an IPv6 one on the other.
    #[error("src and dst are of different IP versions: nothing can match")]
    MixedIpVersions,
}

impl Match {
    /// Whether these fields make sense together: ports need a protocol with ports, and source
    /// and destination prefixes must be of one IP version.
    pub fn check(&self) -> std::result::Result<(), MatchError> {
        if self.src_port.is_some() || self.dst_port.is_some() {
            match self.proto {
                Some(Proto(6 | 17 | 132 | 136)) => {}
                _ => return Err(MatchError::PortsWithoutProto),
            }
        }
        if let (Some(s), Some(d)) = (&self.src, &self.dst) {
            if s.is_v6() != d.is_v6() {
                return Err(MatchError::MixedIpVersions);
            }
        }
        Ok(())
    }

    /// Whether the first packet of a flow (`src` to `dst`) matches. Frames that are not IP
    /// (`ip` is None) match only a rule without fields, except ARP, which is matched on its
    /// sender and target addresses so that it follows the IP traffic it resolves.
    pub fn matches(&self, pkt: &MatchInput) -> bool {
        let addr_ok = |p: &Option<Prefix>, a: &[u8; 16]| {
            p.as_ref().map(|p| p.contains(a, pkt.v6)).unwrap_or(true)
        };
        if !pkt.ip {
            let l3_fields =
                self.proto.is_some() || self.src_port.is_some() || self.dst_port.is_some();
            return !l3_fields
                && (pkt.arp || (self.src.is_none() && self.dst.is_none()))
                && addr_ok(&self.src, &pkt.src)
                && addr_ok(&self.dst, &pkt.dst);
        }
        addr_ok(&self.src, &pkt.src)
            && addr_ok(&self.dst, &pkt.dst)
            && self.proto.map(|p| p.0 == pkt.proto).unwrap_or(true)
            && self
                .src_port
                .as_ref()
                .map(|r| r.contains(pkt.src_port))
                .unwrap_or(true)
            && self
                .dst_port
                .as_ref()
                .map(|r| r.contains(pkt.dst_port))
                .unwrap_or(true)
    }
}

/// The fields of a flow's first packet that rules look at.
#[derive(Clone, Copy, Debug, Default)]
pub struct MatchInput {
    pub ip: bool,
    /// An ARP frame: `src`/`dst` are its sender and target protocol addresses.
    pub arp: bool,
    pub v6: bool,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub proto: u8,
    pub src_port: u16,
    pub dst_port: u16,
}

fn default_instance() -> String {
    "default".into()
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum HugepageMode {
    /// Use hugetlbfs when hugepages.conf enables it and the mount has enough free pages.
    #[default]
    Auto,
    /// Require hugetlbfs; fail to start otherwise.
    On,
    /// Always use /dev/shm.
    Off,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionSection {
    #[serde(default = "d_buffers")]
    pub buffers: u32,
    #[serde(default = "d_buffer_size")]
    pub buffer_size: u32,
    #[serde(default = "d_headroom")]
    pub headroom: u32,
    #[serde(default = "d_data_ring")]
    pub data_ring_size: u32,
    #[serde(default = "d_msg_ring")]
    pub msg_ring_size: u32,
    #[serde(default = "d_pool_ring")]
    pub pool_ring_size: u32,
    /// Process slots; by default the configured processes plus nfmgr plus two spares.
    pub slots: Option<u32>,
    #[serde(default)]
    pub hugepages: HugepageMode,
    /// Path of hugepages.conf, relative to this file.
    #[serde(default = "d_hugepages_conf")]
    pub hugepages_conf: PathBuf,
    /// Directory for the region when it is not on hugetlbfs, and for the instance lock.
    #[serde(default = "d_shm_dir")]
    pub dir: PathBuf,
}

fn d_buffers() -> u32 {
    RegionConfig::default().buffers
}
fn d_buffer_size() -> u32 {
    RegionConfig::default().buffer_size
}
fn d_headroom() -> u32 {
    RegionConfig::default().headroom
}
fn d_data_ring() -> u32 {
    RegionConfig::default().data_ring_size
}
fn d_msg_ring() -> u32 {
    RegionConfig::default().msg_ring_size
}
fn d_pool_ring() -> u32 {
    RegionConfig::default().pool_ring_size
}
fn d_hugepages_conf() -> PathBuf {
    "hugepages.conf".into()
}
fn d_shm_dir() -> PathBuf {
    "/dev/shm".into()
}

impl Default for RegionSection {
    fn default() -> Self {
        toml::from_str("").expect("defaults parse")
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManagerSection {
    /// Pin nfmgr's data-plane thread to this CPU.
    pub core: Option<usize>,
    /// Busy-poll in nfmgr's data-plane thread instead of sleeping when idle.
    #[serde(default)]
    pub busy_poll: bool,
    /// CPUs handed out to processes that name none ("0-3,6"); unset means no pinning.
    pub cores: Option<String>,
    /// Where nf-runtime and nf-vswitch are; by default next to nfmgr, then $PATH.
    pub bin_dir: Option<PathBuf>,
    /// How often statistics are published and, with `log_rates`, printed.
    #[serde(default = "d_stats_interval")]
    pub stats_interval_ms: u64,
    /// Print a line of rates every interval.
    #[serde(default)]
    pub log_rates: bool,
    /// Shut down once every generator and replay port has finished and traffic drained.
    #[serde(default)]
    pub exit_when_done: bool,
    /// Write a final JSON report here at exit.
    pub report: Option<PathBuf>,
    /// Microseconds a process keeps polling after its last work before it sleeps.
    #[serde(default = "d_idle_poll")]
    pub idle_poll_us: u64,
    /// The control socket the CLI talks to (default: `nfmgr-INSTANCE.sock` in `run_dir`).
    /// Mode 0600: whoever may use it administers the instance.
    pub control_socket: Option<PathBuf>,
    /// The group whose members may use the read-only monitoring socket (status, runtimes,
    /// flows, the dashboard), served beside the control socket as `....monitor.sock` with
    /// mode 0660. Unset: nfmgr's own group. With a group, `run_dir` becomes searchable
    /// (0711) so that its members can reach the socket; nothing else in it opens to them.
    pub monitor_group: Option<String>,
    /// Where the instance lock and the control socket are (default: [`default_run_dir`]).
    /// A directory only nfmgr's user may write: it is created mode 0700 if missing, and
    /// nfmgr refuses one that others may write or that is not its own.
    pub run_dir: Option<PathBuf>,
    /// Serve metrics in Prometheus text format on this TCP address (`127.0.0.1:9470`).
    pub metrics_listen: Option<String>,
}

fn d_stats_interval() -> u64 {
    1000
}
fn d_idle_poll() -> u64 {
    50
}

impl Default for ManagerSection {
    fn default() -> Self {
        toml::from_str("").expect("defaults parse")
    }
}

/// `[cluster]`: one nfmgr is the coordinator (`listen`), the others join it
/// (`coordinator`). Actor frames between servers leave and arrive on `port`, signed with the
/// key in `key_file`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// This server's number, unique in the cluster (1-65535); it is part of every MAC of its
    /// processes.
    #[serde(default = "d_server_id")]
    pub server_id: u16,
    /// A name for status output (default: the host name).
    pub name: Option<String>,
    /// Be the coordinator: accept members on this TCP address (`ADDR:PORT`).
    pub listen: Option<String>,
    /// Join the coordinator at this TCP address.
    pub coordinator: Option<String>,
    /// The cluster key: a file of at least 16 bytes (64 hex digits are read as 32 bytes).
    /// Frames and joins are signed with it.
    pub key_file: Option<PathBuf>,
    /// More keys accepted (not signed with) while the cluster moves to a new key, at most
    /// three; `nfmgr rekey` re-reads both settings (docs/SECURITY.md).
    #[serde(default)]
    pub accept_key_files: Vec<PathBuf>,
    /// The port actor frames and data to and from other servers use.
    pub port: Option<String>,
    /// Managers send each other a heartbeat this often.
    #[serde(default = "d_heartbeat")]
    pub heartbeat_ms: u64,
    /// A member (or the coordinator) silent for this long is dead.
    #[serde(default = "d_member_timeout")]
    pub member_timeout_ms: u64,
    /// Liveness on the cluster link itself: each nfmgr sends every other server a beat
    /// this often out of the cluster port (any frame from a server counts as hearing it).
    /// 0 turns the link watch off (then only `member_timeout_ms` detects a cut link).
    #[serde(default = "d_link_beat")]
    pub link_beat_ms: u64,
    /// A member server not heard on the cluster link for this many beats is dead (the
    /// coordinator recovers its flows). Not judged while this nfmgr itself did not get
    /// to run for half that time (a starved machine is not a cut link).
    #[serde(default = "d_link_misses")]
    pub link_misses: u32,
    /// Largest frame payload on the cluster port (the link's MTU).
    #[serde(default = "d_mtu")]
    pub mtu: u32,
    /// Retransmission timeout of actor messages as a multiple of the measured RTT.
    #[serde(default = "d_rto_factor")]
    pub rto_factor: u32,
    #[serde(default = "d_min_rto")]
    pub min_rto_us: u64,
    /// A peer silent this long, through at least eight retransmission timeouts in a row, is
    /// given up (its unacknowledged messages are reported lost).
    #[serde(default = "d_peer_dead")]
    pub peer_dead_after_ms: u64,
    /// Actor frames in flight per pair of endpoints (1-64).
    #[serde(default = "d_window")]
    pub window: u32,
    /// The most servers the cluster will hold. Resources that must be unique across the
    /// cluster are split this many ways by server id: each server's NATs hand out ports
    /// from share `server_id` of their range, so no two runtimes anywhere give two flows
    /// the same translation. `server_id` must not exceed it.
    #[serde(default = "d_max_servers")]
    pub max_servers: u16,
    /// The coordinator's journal: the cluster view it writes at every change and carries
    /// on from when it starts again (default: `coordinator-INSTANCE.journal` in
    /// `manager.run_dir`, which outlives nfmgr but not a reboot; docs/MESSAGING.md).
    pub journal: Option<PathBuf>,
    /// A coordinator started again from its journal gives each member alive in it this
    /// long to join again before it is declared dead and its flows recovered.
    #[serde(default = "d_restore_grace")]
    pub restore_grace_ms: u64,
    /// Where the cluster's state lives: `"journal"`, the coordinator's own file (one
    /// coordinator, `cluster.listen`; members name it in `cluster.coordinator`), or
    /// `"etcd"`: the state in etcd (`cluster.etcd`), and every nfmgr a candidate
    /// coordinator, elected with an etcd lease (docs/MESSAGING.md, "Coordinators on etcd").
    #[serde(default)]
    pub store: ClusterStore,
    /// `store = "etcd"`: the etcd members' client URLs (`http://ADDR:PORT`).
    #[serde(default)]
    pub etcd: Vec<String>,
    /// `store = "etcd"`: the key prefix of this cluster's election and journal in etcd
    /// (one prefix per cluster sharing an etcd).
    #[serde(default = "d_etcd_prefix")]
    pub etcd_prefix: String,
    /// `store = "etcd"`: the lease a coordinator holds, in seconds: a coordinator whose
    /// nfmgr died is replaced this long after its last renewal (2-60).
    #[serde(default = "d_etcd_lease")]
    pub etcd_lease_s: u32,
    /// `store = "etcd"`: the address other servers reach `cluster.listen` at, when that is
    /// a wildcard (`0.0.0.0:PORT`). Default: `cluster.listen`.
    pub advertise: Option<String>,
}

/// Where the cluster's state lives (`cluster.store`).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ClusterStore {
    #[default]
    Journal,
    Etcd,
}

fn d_server_id() -> u16 {
    1
}
fn d_max_servers() -> u16 {
    8
}
fn d_heartbeat() -> u64 {
    100
}
fn d_member_timeout() -> u64 {
    500
}
fn d_restore_grace() -> u64 {
    3000
}
fn d_etcd_lease() -> u32 {
    2
}
fn d_etcd_prefix() -> String {
    "/nfactor".into()
}
fn d_link_beat() -> u64 {
    10
}
fn d_link_misses() -> u32 {
    4
}
fn d_mtu() -> u32 {
    1500
}
fn d_rto_factor() -> u32 {
    10
}
fn d_min_rto() -> u64 {
    2000
}
fn d_peer_dead() -> u64 {
    3000
}
fn d_window() -> u32 {
    64
}

impl Default for ClusterSection {
    fn default() -> Self {
        toml::from_str("").expect("defaults parse")
    }
}

impl ClusterSection {
    /// Whether this nfmgr is part of a cluster of more than itself.
    pub fn enabled(&self) -> bool {
        self.listen.is_some() || self.coordinator.is_some()
    }

    pub fn is_coordinator(&self) -> bool {
        self.coordinator.is_none()
    }

    /// `store = "etcd"`: the address other servers join this nfmgr at when it is elected.
    pub fn advertised(&self) -> Option<std::net::SocketAddr> {
        self.advertise
            .as_ref()
            .or(self.listen.as_ref())?
            .parse()
            .ok()
    }

    /// Settings of the reliable transport of actor messages.
    pub fn transport(&self) -> nf_proto::reliable::TransportConfig {
        nf_proto::reliable::TransportConfig {
            window: self.window as u64,
            rto_factor: self.rto_factor as u64,
            min_rto_ns: self.min_rto_us * 1000,
            dead_after_ns: self.peer_dead_after_ms * 1_000_000,
            max_payload: self.mtu as usize - nf_proto::frame::HEADER_LEN - nf_proto::frame::TAG_LEN,
            ..nf_proto::reliable::TransportConfig::default()
        }
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RestartPolicy {
    /// Replace a process that dies.
    #[default]
    Always,
    /// Report it and leave its slot dead.
    Never,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationSection {
    /// Flows that move together, sharing each step's message.
    #[serde(default = "d_mig_group")]
    pub group_size: u32,
    /// Groups a runtime has in flight at once: bounds the work migration takes from the
    /// packet path.
    #[serde(default = "d_mig_groups")]
    pub max_groups: u32,
    /// Steps 1 and 2 unanswered for this long: the source rolls back and keeps its flows.
    #[serde(default = "d_mig_step")]
    pub step_timeout_ms: u64,
    /// How long the source waits for packets sent to it before the switch.
    #[serde(default = "d_mig_straggler")]
    pub straggler_timeout_ms: u64,
    /// How long the source forwards late stragglers after the handover.
    #[serde(default = "d_mig_tombstone")]
    pub tombstone_ms: u64,
    /// A target actor whose state never arrives expires after this long.
    #[serde(default = "d_mig_pending")]
    pub pending_timeout_ms: u64,
    /// Packets a target holds for arriving flows, all together (pool buffers; default a
    /// quarter of `region.buffers`).
    pub buffer_packets: Option<u32>,
    /// Above this share of `buffer_packets` held, a target refuses new groups for a while.
    #[serde(default = "d_mig_high")]
    pub buffer_high_water_pct: u8,
    /// At most this many flows a second start moving per source runtime (0: no limit).
    #[serde(default)]
    pub max_flows_per_s: u64,
    /// Each migration message asks its receiver (and its sender) to poll rather than sleep
    /// for this long, since the answer follows within a millisecond: waking a sleeping
    /// process costs more than a step. 0: never (cores shared with busier work).
    #[serde(default = "d_mig_keep_awake")]
    pub keep_awake_us: u64,
}

fn d_mig_group() -> u32 {
    256
}
fn d_mig_groups() -> u32 {
    8
}
fn d_mig_step() -> u64 {
    1000
}
fn d_mig_straggler() -> u64 {
    20
}
fn d_mig_tombstone() -> u64 {
    2000
}
fn d_mig_pending() -> u64 {
    10_000
}
fn d_mig_high() -> u8 {
    75
}
fn d_mig_keep_awake() -> u64 {
    5000
}

impl MigrationSection {
    /// Packets a target may hold.
    pub fn buffer_packets(&self, region_buffers: u32) -> u32 {
        self.buffer_packets.unwrap_or(region_buffers / 4).max(1)
    }
}

impl Default for MigrationSection {
    fn default() -> Self {
        toml::from_str("").expect("defaults parse")
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SupervisorSection {
    #[serde(default)]
    pub restart: RestartPolicy,
    /// First delay before restarting a process that failed to start; doubles each time.
    #[serde(default = "d_backoff")]
    pub restart_backoff_ms: u64,
    #[serde(default = "d_max_backoff")]
    pub max_backoff_ms: u64,
    /// A process that dies sooner than this after its start is in a crash loop: it is
    /// restarted after `restart_backoff_ms`, doubling with each such death up to
    /// `max_backoff_ms`, until one of its lives lasts this long.
    #[serde(default = "d_stable_after")]
    pub stable_after_ms: u64,
    /// A process that has not reported running after this long is killed.
    #[serde(default = "d_start_timeout")]
    pub start_timeout_ms: u64,
    /// Grace period for processes to exit at shutdown before SIGKILL.
    #[serde(default = "d_stop_timeout")]
    pub stop_timeout_ms: u64,
    /// A runtime whose input waits this long without it taking a packet is frozen
    /// (stopped, or stuck in a loop) and is killed, so that its flows are recovered and it
    /// is restarted as after a crash. 0 turns the watch off.
    #[serde(default = "d_frozen_after")]
    pub frozen_after_ms: u64,
    /// A dead runtime of a replicated chain is started again this long after its death
    /// (not at once): its replicas' takeover of its flows has the CPU first, and the new
    /// life's start (allocating its tables) does not slow it. Other runtimes take the
    /// chain's new flows meanwhile.
    #[serde(default = "d_takeover_before_restart")]
    pub takeover_before_restart_ms: u64,
    /// The user runtimes and vswitches switch to once attached, before their first packet,
    /// when nfmgr runs as root: a name or `UID[:GID]`. `"root"` keeps them privileged (not
    /// recommended: they parse traffic an attacker controls). Ignored, and the processes run
    /// as nfmgr's own user, when nfmgr is not root.
    /// Unset: `nobody`.
    pub user: Option<String>,
    /// The system-call filter runtimes and vswitches enter before their first packet:
    /// `"enforce"` (a call outside the data path's list kills the process), `"log"` (the
    /// kernel logs it), `"off"`.
    #[serde(default)]
    pub seccomp: SeccompMode,
}

fn d_frozen_after() -> u64 {
    250
}

fn d_takeover_before_restart() -> u64 {
    50
}

fn d_backoff() -> u64 {
    100
}
fn d_max_backoff() -> u64 {
    5000
}
fn d_stable_after() -> u64 {
    10_000
}
fn d_start_timeout() -> u64 {
    5000
}
fn d_stop_timeout() -> u64 {
    2000
}

impl Default for SupervisorSection {
    fn default() -> Self {
        toml::from_str("").expect("defaults parse")
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum NonIpPolicy {
    #[default]
    Pass,
    Drop,
}

impl NonIpPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            NonIpPolicy::Pass => "pass",
            NonIpPolicy::Drop => "drop",
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VswitchConfig {
    pub name: String,
    pub core: Option<usize>,
    #[serde(default)]
    pub busy_poll: bool,
    /// Runtimes this vswitch dispatches to; all runtimes when unset.
    pub runtimes: Option<Vec<String>>,
    #[serde(default)]
    pub non_ip: NonIpPolicy,
    /// Idle time after which a flow's dispatch entry is forgotten.
    #[serde(default = "d_flow_timeout")]
    pub flow_timeout_ms: u64,
    /// Most flows (keys and aliases) the vswitch tracks. Past it, packets of new flows are
    /// dropped (`drop_flow_table_full`) and new aliases refused, and established flows keep
    /// theirs: random 5-tuples cannot grow the vswitch until the OOM killer picks a victim.
    #[serde(default = "d_vswitch_max_flows")]
    pub max_flows: u32,
    /// Chain for flows no steering rule matches; with a single chain it is that one.
    pub default_chain: Option<String>,
    /// `cluster`: dispatch to the runtimes of a chain on every server of the cluster;
    /// `local`: only to those of this server.
    #[serde(default)]
    pub scope: DispatchScope,
    /// How long packets of a dead runtime's flows are dropped rather than dispatched
    /// anew, when their chain is replicated: the time recovery has to re-point them at
    /// their replicas. Flows not re-pointed by then start afresh.
    #[serde(default = "d_recovery_wait")]
    pub recovery_wait_ms: u32,
    /// A vswitch restarted after a death asks the runtimes it feeds for their flows, and
    /// holds the packets of keys it does not know until they answered, for at most this
    /// long (then dispatches them: an unknown key is a new flow). 0: no rebuild.
    #[serde(default = "d_rebuild_wait")]
    pub rebuild_wait_ms: u32,
}

fn d_rebuild_wait() -> u32 {
    300
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DispatchScope {
    #[default]
    Cluster,
    Local,
}

fn d_recovery_wait() -> u32 {
    1_000
}

fn d_flow_timeout() -> u64 {
    300_000
}

fn d_vswitch_max_flows() -> u32 {
    1 << 22
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    pub name: String,
    pub core: Option<usize>,
    #[serde(default)]
    pub busy_poll: bool,
    /// The service chain this runtime runs; with a single chain it is that one, with none
    /// the runtime forwards packets untouched.
    pub chain: Option<String>,
    /// Most flows it holds at once; new flows beyond are dropped (`drop_flow_table_full`).
    #[serde(default = "d_max_flows")]
    pub max_flows: u32,
    /// A flow without packets for this long ends.
    #[serde(default = "d_idle_timeout")]
    pub idle_timeout_s: u32,
    /// A flow that never saw a packet in the reply direction ends after this long.
    #[serde(default = "d_unreplied_timeout")]
    pub unreplied_timeout_s: u32,
    /// A TCP flow ends this long after it closed (FIN both ways, or RST).
    #[serde(default = "d_closed_linger")]
    pub closed_linger_ms: u32,
    /// Longest a packet whose flow registered aliases (a NAT's or load balancer's reply
    /// key) waits for the vswitch to confirm them before it leaves anyway.
    #[serde(default = "d_alias_wait")]
    pub alias_wait_ms: u32,
    /// Where network functions' events (alerts, flow records) go, one JSON object per line;
    /// `{runtime}` is replaced by the runtime's name. Unset: no event log.
    pub events: Option<PathBuf>,
    /// Most flows of other runtimes it holds replicas of (default: `max_flows`); more are
    /// refused (`repl_refused`) and their primaries carry them unprotected.
    pub max_replica_flows: Option<u32>,
}

fn d_max_flows() -> u32 {
    1 << 20
}
fn d_idle_timeout() -> u32 {
    120
}
fn d_unreplied_timeout() -> u32 {
    30
}
fn d_closed_linger() -> u32 {
    2000
}
fn d_alias_wait() -> u32 {
    50
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ReplaySpeed {
    /// As fast as the vswitch accepts frames.
    #[default]
    Max,
    /// Keeping the capture's timing.
    Realtime,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortConfig {
    pub name: String,
    /// `afpacket:IFACE`, `gen:`, `sink:`, `pcap:FILE` or `null:`.
    pub spec: String,
    /// Port that frames received here leave from.
    pub to: Option<String>,
    /// vswitch that frames received here go to (default: the first).
    pub vswitch: Option<String>,
    /// Also write every frame sent out of this port to this capture file.
    pub record: Option<PathBuf>,
    // gen:
    pub flows: Option<u32>,
    /// Packets per second per flow (gen:) or in total (pcap:); 0 = as fast as possible.
    pub rate_pps: Option<f64>,
    pub packet_size: Option<u32>,
    /// How long a generator runs; 0 or unset = until stopped.
    pub duration_ms: Option<u64>,
    /// How long after nfmgr starts a generator begins (for example once a cluster has
    /// formed, so that its flows spread over every server); 0 or unset = at once.
    pub start_after_ms: Option<u64>,
    /// A generator of nothing but new flows: every packet a flow never seen before
    /// (`"udp"`), or every flow a whole TCP connection, both ways (`"tcp"`: SYN, SYN-ACK,
    /// ACK, data, FIN, FIN, ACK). `rate_pps` is then the total rate, not per flow.
    pub new_flows: Option<NewFlows>,
    // pcap:
    pub speed: Option<ReplaySpeed>,
    pub loops: Option<u32>,
    // afpacket:
    /// Frames per memory-mapped ring (RX and TX each).
    pub ring_frames: Option<u32>,
}

/// A generator's new-flow mode (`port.new_flows`).
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum NewFlows {
    Udp,
    Tcp,
}

/// What a port spec names.
/// `[dpdk]`: how nfmgr initialises DPDK's environment (EAL) when a port is `dpdk:`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpdkSection {
    /// EAL cores (`-l`); DPDK's calls are made from nfmgr's data-plane thread.
    #[serde(default = "d_dpdk_lcores")]
    pub lcores: String,
    /// Where DPDK's own memory (mbuf headers, queues) lives: `hugepages` or `no-huge`.
    /// Packet data is always in the platform's region.
    #[serde(default)]
    pub memory: DpdkMemory,
    /// DPDK's memory in MiB.
    #[serde(default = "d_dpdk_memory_mb")]
    pub memory_mb: u32,
    /// Virtual devices (`--vdev`), e.g. `net_af_packet0,iface=veth0`, `net_null0`.
    #[serde(default)]
    pub vdevs: Vec<String>,
    /// PCI devices to use (`-a`); none: DPDK probes what is bound to it.
    #[serde(default)]
    pub pci: Vec<String>,
    /// EAL's runtime files' prefix; default `nfactor-INSTANCE`, so instances never clash.
    pub file_prefix: Option<String>,
    /// Descriptors per receive and transmit queue.
    #[serde(default = "d_dpdk_descriptors")]
    pub rx_descriptors: u16,
    #[serde(default = "d_dpdk_descriptors")]
    pub tx_descriptors: u16,
    /// More EAL arguments, passed as they are.
    #[serde(default)]
    pub eal_args: Vec<String>,
    /// DPDK devices give the data-plane thread no descriptor to sleep on: when idle (and not
    /// busy polling) it looks at them this often.
    #[serde(default = "d_dpdk_idle_poll_us")]
    pub idle_poll_us: u64,
}

impl Default for DpdkSection {
    fn default() -> Self {
        DpdkSection {
            lcores: d_dpdk_lcores(),
            memory: DpdkMemory::default(),
            memory_mb: d_dpdk_memory_mb(),
            vdevs: Vec::new(),
            pci: Vec::new(),
            file_prefix: None,
            rx_descriptors: d_dpdk_descriptors(),
            tx_descriptors: d_dpdk_descriptors(),
            eal_args: Vec::new(),
            idle_poll_us: d_dpdk_idle_poll_us(),
        }
    }
}

fn d_dpdk_idle_poll_us() -> u64 {
    200
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum DpdkMemory {
    /// Huge pages (they must be reserved: scripts/setup-hugepages.sh).
    Hugepages,
    /// Ordinary memory (`--no-huge`): enough for virtual devices and tests.
    #[default]
    NoHuge,
}

fn d_dpdk_lcores() -> String {
    "0".into()
}
fn d_dpdk_memory_mb() -> u32 {
    256
}
fn d_dpdk_descriptors() -> u16 {
    1024
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortSpec {
    AfPacket(String),
    /// A DPDK port by its device name (`net_null0`, `0000:01:00.0`).
    Dpdk(String),
    Generator,
    Sink,
    Pcap(PathBuf),
    Null,
}

/// A port's `spec` that is not one nfmgr can open; each names the spec as written.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum PortSpecError {
    #[error("`{0}` is not KIND:ARG (afpacket:IFACE, gen:, sink:, pcap:FILE, null:)")]
    NotKindArg(String),
    #[error("`{0}`: afpacket needs an interface name (at most 15 characters)")]
    NoInterface(String),
    /// `gen:`, `sink:` or `null:` with an argument.
    #[error("`{spec}`: {kind}: takes no argument; set its options as keys of the port")]
    TakesNoArgument { spec: String, kind: String },
    #[error("`{0}`: pcap needs a file to replay")]
    NoPcapFile(String),
    #[error("`{0}`: dpdk needs a device name (a vdev like net_null0, or a PCI address)")]
    NoDevice(String),
    #[error("`{spec}`: unknown port kind `{kind}`")]
    UnknownKind { spec: String, kind: String },
}

impl PortSpec {
    pub fn parse(s: &str, base: &Path) -> std::result::Result<PortSpec, PortSpecError> {
        let (kind, arg) = s
            .split_once(':')
            .ok_or_else(|| PortSpecError::NotKindArg(s.to_string()))?;
        let spec = || s.to_string();
        match kind {
            "afpacket" if !arg.is_empty() && arg.len() < 16 => Ok(PortSpec::AfPacket(arg.into())),
            "afpacket" => Err(PortSpecError::NoInterface(spec())),
            "gen" if arg.is_empty() => Ok(PortSpec::Generator),
            "sink" if arg.is_empty() => Ok(PortSpec::Sink),
            "null" if arg.is_empty() => Ok(PortSpec::Null),
            "gen" | "sink" | "null" => Err(PortSpecError::TakesNoArgument {
                spec: spec(),
                kind: kind.to_string(),
            }),
            "pcap" if !arg.is_empty() => Ok(PortSpec::Pcap(base.join(arg))),
            "pcap" => Err(PortSpecError::NoPcapFile(spec())),
            "dpdk" if !arg.is_empty() => Ok(PortSpec::Dpdk(arg.into())),
            "dpdk" => Err(PortSpecError::NoDevice(spec())),
            _ => Err(PortSpecError::UnknownKind {
                spec: spec(),
                kind: kind.to_string(),
            }),
        }
    }

    /// Whether frames arrive on this port (so it needs a `to`).
    pub fn receives(&self) -> bool {
        matches!(
            self,
            PortSpec::AfPacket(_) | PortSpec::Dpdk(_) | PortSpec::Generator | PortSpec::Pcap(_)
        )
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let mut cfg = Config::parse(&text, &base).map_err(|e| ConfigError::In {
            path: path.to_path_buf(),
            source: Box::new(e),
        })?;
        cfg.path = Some(path.canonicalize().unwrap_or_else(|_| path.to_path_buf()));
        Ok(cfg)
    }

    /// Parses and validates a configuration; relative paths resolve against `base_dir`.
    pub fn parse(text: &str, base_dir: &Path) -> Result<Config> {
        let mut cfg: Config = toml::from_str(text)?;
        cfg.base_dir = base_dir.to_path_buf();
        cfg.text = text.to_string();
        cfg.validate()?;
        Ok(cfg)
    }

    /// The configuration a process reads from its region (the text nfmgr validated; paths
    /// inside were already absolute or relative to `base_dir`, which is stored with it).
    pub fn from_frozen(frozen: &str) -> Result<Config> {
        let (base, text) = frozen
            .split_once('\n')
            .ok_or(ConfigError::Frozen("is empty"))?;
        let base = base
            .strip_prefix("# base_dir = ")
            .ok_or(ConfigError::Frozen("lacks its base directory"))?;
        Config::parse(text, Path::new(base))
    }

    /// The text to store in the region (see `from_frozen`).
    pub fn frozen(&self) -> String {
        format!("# base_dir = {}\n{}", self.base_dir.display(), self.text)
    }

    /// Checks what the types alone cannot: names, references between sections, values.
    pub fn validate(&self) -> Result<()> {
        if self.instance.is_empty()
            || self.instance.len() > 31
            || !self
                .instance
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            bail!("instance" => "`{}` must be 1-31 characters of letters, digits, '-' and '_'", self.instance);
        }
        if let Some(u) = &self.supervisor.user {
            if u.is_empty() || u.len() > 64 || u.chars().any(|c| c.is_whitespace() || c == '/') {
                bail!("supervisor.user" => "`{u}` is not a user name or UID[:GID]");
            }
        }
        let m = &self.migration;
        if m.group_size == 0 || m.group_size > 4096 {
            bail!("migration.group_size" => "{} must be 1-4096", m.group_size);
        }
        if m.max_groups == 0 {
            bail!("migration.max_groups" => "must be at least 1");
        }
        if let Some(b) = m.buffer_packets {
            if b == 0 || b >= self.region.buffers {
                bail!("migration.buffer_packets" => "{b} must be 1 to less than region.buffers ({})", self.region.buffers);
            }
        }
        if m.buffer_high_water_pct == 0 || m.buffer_high_water_pct > 100 {
            bail!("migration.buffer_high_water_pct" => "{} must be 1-100", m.buffer_high_water_pct);
        }
        if m.straggler_timeout_ms >= m.tombstone_ms || m.step_timeout_ms >= m.pending_timeout_ms {
            bail!("migration" => "straggler_timeout_ms must be below tombstone_ms, and step_timeout_ms below pending_timeout_ms (a target must outwait its source)");
        }
        let mut names = HashSet::new();
        for (section, name) in self
            .vswitches
            .iter()
            .map(|v| ("vswitch", &v.name))
            .chain(self.runtimes.iter().map(|r| ("runtime", &r.name)))
        {
            if name.is_empty() || name.len() > 31 {
                bail!(format!("{section}.name") => "`{name}` must be 1-31 characters");
            }
            if !names.insert(name.clone()) {
                bail!(format!("{section}.{name}") => "name used twice (vswitch and runtime names share one namespace)");
            }
        }
        if self.vswitches.is_empty() {
            bail!("vswitch" => "at least one [[vswitch]] is required");
        }
        if self.runtimes.is_empty() {
            bail!("runtime" => "at least one [[runtime]] is required");
        }
        let processes = self.vswitches.len() + self.runtimes.len();
        let max = nf_shm::layout::MAX_SLOTS as usize - 1;
        if processes > max {
            bail!("runtime" => "at most {max} vswitches and runtimes together (got {processes})");
        }
        if let Some(slots) = self.region.slots {
            if (slots as usize) < processes + 1 {
                bail!("region.slots" => "{slots} slots cannot hold nfmgr and {processes} processes");
            }
        }
        let runtime_names: HashSet<&str> = self.runtimes.iter().map(|r| r.name.as_str()).collect();
        for v in &self.vswitches {
            if let Some(list) = &v.runtimes {
                if list.is_empty() {
                    bail!(format!("vswitch.{}.runtimes", v.name) => "the list is empty");
                }
                for r in list {
                    if !runtime_names.contains(r.as_str()) {
                        bail!(format!("vswitch.{}.runtimes", v.name) => "no runtime named `{r}`");
                    }
                }
            }
            if v.max_flows == 0 || v.max_flows > 1 << 26 {
                bail!(format!("vswitch.{}.max_flows", v.name) => "must be between 1 and 67108864");
            }
            if v.flow_timeout_ms == 0 {
                bail!(format!("vswitch.{}.flow_timeout_ms", v.name) => "must be above 0");
            }
        }
        // CPUs of the machine, not those this process may run on: a process pinned to one
        // CPU re-reads this configuration and must accept the cores it names.
        let ncpu = online_cpus();
        let check_core = |key: String, core: Option<usize>| -> Result<()> {
            if let Some(c) = core {
                if c >= ncpu {
                    bail!(format!("{key}") => "CPU {c} does not exist (this machine has {ncpu})");
                }
            }
            Ok(())
        };
        check_core("manager.core".into(), self.manager.core)?;
        for v in &self.vswitches {
            check_core(format!("vswitch.{}.core", v.name), v.core)?;
        }
        for r in &self.runtimes {
            check_core(format!("runtime.{}.core", r.name), r.core)?;
        }
        if let Some(list) = &self.manager.cores {
            let cores =
                parse_cpu_list(list).map_err(|e| ConfigError::invalid("manager.cores", e))?;
            if let Some(c) = cores.iter().find(|c| **c >= ncpu) {
                bail!("manager.cores" => "CPU {c} does not exist (this machine has {ncpu})");
            }
        }
        if self.manager.stats_interval_ms == 0 {
            bail!("manager.stats_interval_ms" => "must be above 0");
        }
        self.region_config().validate()?;

        let mut port_names = HashSet::new();
        let vswitch_names: HashSet<&str> = self.vswitches.iter().map(|v| v.name.as_str()).collect();
        for p in &self.ports {
            let key = format!("port.{}", p.name);
            if p.name.is_empty() || p.name.len() > 31 {
                bail!("port.name" => "`{}` must be 1-31 characters", p.name);
            }
            if !port_names.insert(p.name.as_str()) {
                bail!(format!("{key}") => "port name used twice");
            }
            let spec = PortSpec::parse(&p.spec, &self.base_dir)
                .map_err(|e| ConfigError::invalid(format!("{key}.spec"), e))?;
            let only = |what: &str, set: bool, kinds: &str| -> Result<()> {
                if set {
                    bail!(format!("{key}.{what}") => "only for {kinds} ports");
                }
                Ok(())
            };
            let is_gen = spec == PortSpec::Generator;
            let is_pcap = matches!(spec, PortSpec::Pcap(_));
            let is_af = matches!(spec, PortSpec::AfPacket(_));
            only("flows", p.flows.is_some() && !is_gen, "gen:")?;
            only("packet_size", p.packet_size.is_some() && !is_gen, "gen:")?;
            only("duration_ms", p.duration_ms.is_some() && !is_gen, "gen:")?;
            only(
                "start_after_ms",
                p.start_after_ms.is_some() && !is_gen,
                "gen:",
            )?;
            only("new_flows", p.new_flows.is_some() && !is_gen, "gen:")?;
            if p.new_flows.is_some() && p.flows.is_some() {
                bail!(format!("{key}.flows") => "a new_flows generator makes a new flow every time");
            }
            only(
                "rate_pps",
                p.rate_pps.is_some() && !is_gen && !is_pcap,
                "gen: and pcap:",
            )?;
            only("speed", p.speed.is_some() && !is_pcap, "pcap:")?;
            only("loops", p.loops.is_some() && !is_pcap, "pcap:")?;
            only(
                "ring_frames",
                p.ring_frames.is_some() && !is_af,
                "afpacket:",
            )?;
            let cluster_port = self.cluster.port.as_deref() == Some(p.name.as_str());
            if cluster_port && !matches!(spec, PortSpec::AfPacket(_)) {
                bail!("cluster.port" => "port `{}` must be an afpacket: port", p.name);
            }
            if cluster_port {
                only("to", p.to.is_some(), "traffic (not the cluster port)")?;
            } else if spec.receives() {
                if p.to.is_none() {
                    bail!(format!("{key}.to") => "frames arrive on this port, so it needs a `to` port");
                }
            } else {
                only("to", p.to.is_some(), "receiving (afpacket:, gen:, pcap:)")?;
                only(
                    "vswitch",
                    p.vswitch.is_some(),
                    "receiving (afpacket:, gen:, pcap:)",
                )?;
            }
            if let Some(v) = &p.vswitch {
                if !vswitch_names.contains(v.as_str()) {
                    bail!(format!("{key}.vswitch") => "no vswitch named `{v}`");
                }
            }
            if let Some(f) = p.flows {
                if f == 0 || f > 1 << 24 {
                    bail!(format!("{key}.flows") => "must be between 1 and 16777216 (got {f})");
                }
            }
            if let Some(r) = p.rate_pps {
                if !r.is_finite() || r < 0.0 {
                    bail!(format!("{key}.rate_pps") => "must be 0 (as fast as possible) or positive (got {r})");
                }
            }
            if let Some(s) = p.packet_size {
                let room = self.region_config().data_room();
                if s < 64 || s > room {
                    bail!(format!("{key}.packet_size") => "must be between 64 and {room} (the buffer's data room), got {s}");
                }
            }
            if let Some(n) = p.ring_frames {
                if !(8..=1 << 20).contains(&n) || !n.is_power_of_two() {
                    bail!(format!("{key}.ring_frames") => "must be a power of two between 8 and 1048576 (got {n})");
                }
            }
            if let PortSpec::Pcap(path) = &spec {
                if !path.is_file() {
                    bail!(format!("{key}.spec") => "capture file {} does not exist", path.display());
                }
            }
        }
        for p in &self.ports {
            if let Some(to) = &p.to {
                if !port_names.contains(to.as_str()) {
                    bail!(format!("port.{}.to", p.name) => "no port named `{to}`");
                }
            }
        }
        if self.ports.len() > nf_shm::layout::MAX_PORTS as usize {
            bail!("port" => "at most {} ports", nf_shm::layout::MAX_PORTS);
        }
        self.validate_cluster()?;
        self.validate_chains()
    }

    /// Into how many shares cluster-wide resources are split, and which is this server's
    /// (0-based): one share and the first outside a cluster.
    pub fn server_share(&self) -> (u32, u32) {
        let c = &self.cluster;
        if c.enabled() {
            (
                u32::from(c.max_servers.max(1)),
                u32::from(c.server_id.saturating_sub(1)),
            )
        } else {
            (1, 0)
        }
    }

    fn validate_cluster(&self) -> Result<()> {
        let c = &self.cluster;
        if c.server_id == 0 {
            bail!("cluster.server_id" => "must be between 1 and 65535");
        }
        if c.enabled() {
            if c.max_servers == 0 {
                bail!("cluster.max_servers" => "must be at least 1");
            }
            if c.server_id > c.max_servers {
                bail!("cluster.server_id" => "{} is above cluster.max_servers ({}): resources shared by the cluster (NAT ports) are split by server id, one share for each id up to max_servers", c.server_id, c.max_servers);
            }
        }
        if c.listen.is_some() && c.coordinator.is_some() {
            bail!("cluster.listen, cluster.coordinator" => "set one (the coordinator listens, members join it)");
        }
        for (key, addr) in [("listen", &c.listen), ("coordinator", &c.coordinator)] {
            if let Some(a) = addr {
                if a.parse::<std::net::SocketAddr>().is_err() {
                    bail!(format!("cluster.{key}") => "`{a}` is not ADDR:PORT");
                }
            }
        }
        if let Some(a) = &self.manager.metrics_listen {
            if a.parse::<std::net::SocketAddr>().is_err() {
                bail!("manager.metrics_listen" => "`{a}` is not ADDR:PORT");
            }
        }
        if c.enabled() {
            if c.accept_key_files.len() > 3 {
                bail!("cluster.accept_key_files" => "at most 3 (the signing key and three more are accepted)");
            }
            if c.key_file.is_none() {
                bail!("cluster.key_file" => "required in a cluster (frames between servers are signed with it)");
            }
            if c.port.is_none() {
                bail!("cluster.port" => "required in a cluster (the port frames to other servers use)");
            }
        } else if c.port.is_some() {
            bail!("cluster.port" => "only in a cluster (set cluster.listen or cluster.coordinator)");
        }
        if let Some(p) = &c.port {
            if !self.ports.iter().any(|q| &q.name == p) {
                bail!("cluster.port" => "no port named `{p}`");
            }
        }
        if c.heartbeat_ms == 0 || c.member_timeout_ms <= c.heartbeat_ms {
            bail!("cluster.member_timeout_ms" => "must exceed cluster.heartbeat_ms (above 0)");
        }
        if c.store == ClusterStore::Etcd {
            if c.listen.is_none() {
                bail!("cluster.listen" => "required with store = \"etcd\" (every nfmgr may be elected coordinator, and members join it there)");
            }
            if c.coordinator.is_some() {
                bail!("cluster.coordinator" => "not with store = \"etcd\": the coordinator is the one etcd elects");
            }
            if c.etcd.is_empty() {
                bail!("cluster.etcd" => "required with store = \"etcd\": the etcd members' client URLs");
            }
            if let Some(u) = c
                .etcd
                .iter()
                .find(|u| !(u.starts_with("http://") || u.starts_with("https://")))
            {
                bail!("cluster.etcd" => "`{u}` is not a URL (http://ADDR:PORT)");
            }
            if !c.etcd_prefix.starts_with('/') || c.etcd_prefix.ends_with('/') {
                bail!("cluster.etcd_prefix" => "must start with `/` and not end with one (got `{}`)", c.etcd_prefix);
            }
            if !(2..=60).contains(&c.etcd_lease_s) {
                bail!("cluster.etcd_lease_s" => "must be between 2 and 60");
            }
            if let Some(a) = &c.advertise {
                if a.parse::<std::net::SocketAddr>().is_err() {
                    bail!("cluster.advertise" => "`{a}` is not ADDR:PORT");
                }
            }
            match c.advertised() {
                Some(a) if a.ip().is_unspecified() => {
                    bail!("cluster.advertise" => "required when cluster.listen is a wildcard address ({a}): other servers must be told where to join")
                }
                _ => {}
            }
        } else if !c.etcd.is_empty() || c.advertise.is_some() {
            bail!("cluster.etcd" => "only with store = \"etcd\"");
        }
        if c.restore_grace_ms < c.member_timeout_ms {
            bail!("cluster.restore_grace_ms" => "must be at least cluster.member_timeout_ms (members need that long to see the coordinator gone)");
        }
        if c.link_beat_ms > 0 && !(2..=1000).contains(&c.link_misses) {
            bail!("cluster.link_misses" => "must be between 2 and 1000");
        }
        if c.link_beat_ms > 60_000 {
            bail!("cluster.link_beat_ms" => "at most 60000 (0 turns the link watch off)");
        }
        if !(576..=9000).contains(&c.mtu) {
            bail!("cluster.mtu" => "must be between 576 and 9000 (got {})", c.mtu);
        }
        let room = self.region_config().data_room();
        let frame = c.mtu + nf_proto::frame::ENCAP_LEN as u32;
        if frame > room {
            bail!("cluster.mtu" => "frames of {frame} bytes (MTU plus encapsulation) do not fit the {room}-byte data room of a buffer; raise region.buffer_size");
        }
        if !(1..=64).contains(&c.window) {
            bail!("cluster.window" => "must be between 1 and 64");
        }
        if c.rto_factor == 0 || c.min_rto_us == 0 || c.peer_dead_after_ms == 0 {
            bail!("cluster" => "rto_factor, min_rto_us and peer_dead_after_ms must be above 0");
        }
        if let Some(n) = &c.name {
            if n.is_empty() || n.len() > 63 {
                bail!("cluster.name" => "must be 1-63 characters");
            }
        }
        Ok(())
    }

    /// Where the control socket is.
    pub fn control_socket_path(&self) -> PathBuf {
        match &self.manager.control_socket {
            Some(p) => self.base_dir.join(p),
            None => self.run_dir().join(format!("nfmgr-{}.sock", self.instance)),
        }
    }

    /// The read-only monitoring socket, beside the control socket.
    pub fn monitor_socket_path(&self) -> PathBuf {
        monitor_socket_of(&self.control_socket_path())
    }

    /// Where the coordinator keeps its journal.
    pub fn journal_path(&self) -> PathBuf {
        match &self.cluster.journal {
            Some(p) => self.base_dir.join(p),
            None => self
                .run_dir()
                .join(format!("coordinator-{}.journal", self.instance)),
        }
    }

    /// Where the instance lock and (by default) the control socket are.
    pub fn run_dir(&self) -> PathBuf {
        match &self.manager.run_dir {
            Some(d) => self.base_dir.join(d),
            None => default_run_dir(),
        }
    }

    /// This server's name in the cluster.
    pub fn server_name(&self) -> String {
        self.cluster.name.clone().unwrap_or_else(|| {
            nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| format!("server{}", self.cluster.server_id))
        })
    }

    fn validate_chains(&self) -> Result<()> {
        let mut names = HashSet::new();
        for c in &self.chains {
            if c.name.is_empty() || c.name.len() > 31 {
                bail!("chain.name" => "`{}` must be 1-31 characters", c.name);
            }
            if !names.insert(c.name.as_str()) {
                bail!(format!("chain.{}", c.name) => "chain name used twice");
            }
            if c.nfs.len() > nf_shm::limits::MAX_NFS {
                bail!(format!("chain.{}.nf", c.name) => "at most {} functions per chain", nf_shm::limits::MAX_NFS);
            }
            if c.replication_packets == 0 || c.replication_interval_ms == 0 {
                bail!(format!("chain.{}.replication_packets, replication_interval_ms", c.name) => "must be above 0");
            }
            if c.commit_wait_ms == 0 || c.commit_wait_ms > 10_000 {
                bail!(format!("chain.{}.commit_wait_ms", c.name) => "must be between 1 and 10000");
            }
            for (i, nf) in c.nfs.iter().enumerate() {
                match nf.get("kind") {
                    Some(toml::Value::String(_)) => {}
                    _ => {
                        bail!(format!("chain.{}.nf[{i}].kind", c.name) => "missing (the function's name, e.g. \"firewall\")")
                    }
                }
            }
        }
        let known = |n: &str| names.contains(n);
        for r in &self.runtimes {
            match &r.chain {
                Some(c) if !known(c) => {
                    bail!(format!("runtime.{}.chain", r.name) => "no chain named `{c}`")
                }
                None if self.chains.len() > 1 => {
                    bail!(format!("runtime.{}.chain", r.name) => "required when more than one chain is defined")
                }
                _ => {}
            }
            if r.max_flows == 0 || r.max_flows > 1 << 26 {
                bail!(format!("runtime.{}.max_flows", r.name) => "must be between 1 and 67108864");
            }
            if r.idle_timeout_s == 0 || r.unreplied_timeout_s == 0 {
                bail!(format!("runtime.{}", r.name) => "timeouts must be above 0");
            }
        }
        for v in &self.vswitches {
            if let Some(c) = &v.default_chain {
                if !known(c) {
                    bail!(format!("vswitch.{}.default_chain", v.name) => "no chain named `{c}`");
                }
            }
        }
        for (i, rule) in self.steering.iter().enumerate() {
            if !known(&rule.chain) {
                bail!(format!("steer[{i}].chain") => "no chain named `{}`", rule.chain);
            }
            rule.matches
                .check()
                .map_err(|e| ConfigError::invalid(format!("steer[{i}].match"), e))?;
            if !self
                .runtimes
                .iter()
                .any(|r| self.chain_of(r) == Some(rule.chain.as_str()))
            {
                bail!(format!("steer[{i}].chain") => "no runtime runs chain `{}`", rule.chain);
            }
        }
        for c in &self.chains {
            let runtimes = self
                .runtimes
                .iter()
                .filter(|r| self.chain_of(r) == Some(c.name.as_str()))
                .count();
            // Outside a cluster the replicas can only be this server's other runtimes of
            // the chain: with one, output commit could never protect a packet.
            if c.replication == ReplicationMode::OutputCommit
                && runtimes < 2
                && !self.cluster.enabled()
            {
                bail!(format!("chain.{}.replication", c.name) => "\"output-commit\" needs a second runtime of the chain to hold replicas, and this server runs {runtimes} with no cluster (add a [[runtime]] with chain = \"{}\", join a cluster, or choose \"periodic\" or \"off\")", c.name);
            }
        }
        Ok(())
    }

    /// The chain a runtime runs (`None`: no chain, it forwards untouched).
    pub fn chain_of<'a>(&'a self, r: &'a RuntimeConfig) -> Option<&'a str> {
        r.chain
            .as_deref()
            .or_else(|| (self.chains.len() == 1).then(|| self.chains[0].name.as_str()))
    }

    pub fn chain(&self, name: &str) -> Option<&ChainConfig> {
        self.chains.iter().find(|c| c.name == name)
    }

    pub fn runtime(&self, name: &str) -> Option<&RuntimeConfig> {
        self.runtimes.iter().find(|r| r.name == name)
    }

    /// Whether the runtime named `name` runs a chain whose flows are replicated.
    pub fn runtime_replicates(&self, name: &str) -> bool {
        self.runtime(name)
            .and_then(|r| self.chain_of(r))
            .and_then(|c| self.chain(c))
            .is_some_and(|c| c.replication != ReplicationMode::Off)
    }

    pub fn vswitch(&self, name: &str) -> Option<&VswitchConfig> {
        self.vswitches.iter().find(|v| v.name == name)
    }

    /// Number of process slots needed by default: nfmgr, the processes, two spares.
    fn default_slots(&self) -> u32 {
        (1 + self.vswitches.len() + self.runtimes.len() + 2).min(64) as u32
    }

    pub fn region_config(&self) -> RegionConfig {
        let r = &self.region;
        RegionConfig {
            slots: r.slots.unwrap_or_else(|| self.default_slots()),
            ports: self.ports.len() as u32,
            buffers: r.buffers,
            buffer_size: r.buffer_size,
            headroom: r.headroom,
            data_ring_size: r.data_ring_size,
            msg_ring_size: r.msg_ring_size,
            pool_ring_size: r.pool_ring_size,
            blob_size: (self.frozen().len() as u32).div_ceil(4096) * 4096,
        }
    }

    pub fn hugepages_conf_path(&self) -> PathBuf {
        self.base_dir.join(&self.region.hugepages_conf)
    }
}

/// The monitoring socket that goes with the control socket at `control`:
/// `nfmgr-edge.sock` -> `nfmgr-edge.monitor.sock`.
pub fn monitor_socket_of(control: &Path) -> PathBuf {
    let stem = control
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "nfmgr".into());
    control.with_file_name(format!("{stem}.monitor.sock"))
}

/// CPUs online on the machine (whatever this process's affinity): the kernel's list of
/// online CPUs, or what the process may use if that cannot be read.
pub fn online_cpus() -> usize {
    std::fs::read_to_string("/sys/devices/system/cpu/online")
        .ok()
        .and_then(|s| parse_cpu_list(s.trim()).ok())
        .map(|l| l.len())
        .filter(|&n| n > 0)
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
        .unwrap_or(1)
}

/// A CPU list that does not parse; each names the part at fault.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum CpuListError {
    #[error("`{0}` is not a CPU or range")]
    NotCpu(String),
    #[error("`{0}`: range is reversed")]
    Reversed(String),
    #[error("empty CPU list")]
    Empty,
}

/// Parses a CPU list such as `0-3,6`.
pub fn parse_cpu_list(s: &str) -> std::result::Result<Vec<usize>, CpuListError> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (part, part),
        };
        let not_cpu = |_| CpuListError::NotCpu(part.to_string());
        let a: usize = a.parse().map_err(not_cpu)?;
        let b: usize = b.parse().map_err(not_cpu)?;
        if a > b {
            return Err(CpuListError::Reversed(part.to_string()));
        }
        out.extend(a..=b);
    }
    if out.is_empty() {
        return Err(CpuListError::Empty);
    }
    Ok(out)
}

/// Where nfmgr keeps its instance lock and control socket unless `manager.run_dir` says:
/// a directory only its user may write, never a world-writable one such as /dev/shm (where
/// a local user could plant the lock file, or a link in its place, before nfmgr starts).
/// Root: `/run/nfactor`; others: `$XDG_RUNTIME_DIR/nfactor`, else `/tmp/nfactor-UID`.
pub fn default_run_dir() -> PathBuf {
    let uid = nix::unistd::geteuid().as_raw();
    if uid == 0 {
        return PathBuf::from("/run/nfactor");
    }
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(d) => PathBuf::from(d).join("nfactor"),
        None => PathBuf::from(format!("/tmp/nfactor-{uid}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [[vswitch]]
        name = "vs0"
        [[runtime]]
        name = "rt0"
        [[port]]
        name = "g"
        spec = "gen:"
        to = "s"
        flows = 10
        [[port]]
        name = "s"
        spec = "sink:"
    "#;

    fn err(text: &str) -> String {
        format!("{:#}", Config::parse(text, Path::new(".")).unwrap_err())
    }

    #[test]
    fn minimal_config_parses_with_defaults() {
        let c = Config::parse(MINIMAL, Path::new(".")).unwrap();
        assert_eq!(c.instance, "default");
        assert_eq!(c.region_config().slots, 5);
        assert_eq!(c.region_config().ports, 2);
        assert_eq!(c.supervisor.restart, RestartPolicy::Always);
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let e = err(&format!("{MINIMAL}\n[region]\nbufers = 4\n"));
        assert!(e.contains("bufers"), "{e}");
        let e = err(&MINIMAL.replace("flows = 10", "flows = 10\nflws = 3"));
        assert!(e.contains("flws"), "{e}");
    }

    /// What is wrong is a value a program can read, not only a message: the key at fault
    /// apart from the reason, the file apart from its error.
    #[test]
    fn errors_are_typed_with_the_key_apart() {
        let e = Config::parse(
            &MINIMAL.replace("flows = 10", "flows = 10\npacket_size = 20"),
            Path::new("."),
        )
        .unwrap_err();
        let ConfigError::Invalid { key, reason } = &e else {
            panic!("not Invalid: {e:?}");
        };
        assert_eq!(key, "port.g.packet_size");
        assert!(reason.contains("got 20"), "{reason}");
        assert_eq!(e.to_string(), format!("{key}: {reason}"));
        let e = Config::parse("[[vswitch]\n", Path::new(".")).unwrap_err();
        assert!(matches!(e, ConfigError::Syntax(_)), "{e:?}");
        let e = Config::load(Path::new("/nonexistent/nf.toml")).unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }), "{e:?}");
        assert!(e
            .to_string()
            .starts_with("cannot read config /nonexistent/nf.toml"));
        let e = Config::from_frozen("").unwrap_err();
        assert_eq!(e.to_string(), "frozen configuration is empty");
    }

    #[test]
    fn semantic_errors_name_the_key() {
        assert!(err(&MINIMAL.replace("to = \"s\"", "to = \"nope\"")).contains("port.g.to"));
        assert!(
            err(&MINIMAL.replace("spec = \"gen:\"", "spec = \"tap:x\"")).contains("port.g.spec")
        );
        assert!(
            err(&format!("{MINIMAL}\n[region]\ndata_ring_size = 1000\n"))
                .contains("region.data_ring_size")
        );
        assert!(
            err(&MINIMAL.replace("flows = 10", "flows = 10\nspeed = \"max\""))
                .contains("port.g.speed")
        );
        assert!(
            err(&MINIMAL.replace("name = \"rt0\"", "name = \"vs0\"")).contains("name used twice")
        );
        assert!(
            err(&MINIMAL.replace("name = \"vs0\"", "name = \"vs0\"\nruntimes = [\"rt9\"]"))
                .contains("vswitch.vs0.runtimes")
        );
        assert!(
            err(&MINIMAL.replace("flows = 10", "flows = 10\npacket_size = 20"))
                .contains("port.g.packet_size")
        );
        assert!(
            err(&MINIMAL.replace("name = \"rt0\"", "name = \"rt0\"\ncore = 4096"))
                .contains("runtime.rt0.core")
        );
    }

    #[test]
    fn output_commit_without_a_possible_replica_names_the_key() {
        let chain = |mode: &str| {
            format!("{MINIMAL}\n[[chain]]\nname = \"web\"\nreplication = \"{mode}\"\n")
        };
        let e = err(&chain("output-commit"));
        assert!(e.contains("chain.web.replication"), "{e}");
        // A second runtime of the chain can hold the replicas.
        let two = chain("output-commit").replace(
            "[[port]]\n        name = \"g\"",
            "[[runtime]]\nname = \"rt1\"\n[[port]]\n        name = \"g\"",
        );
        let c = Config::parse(&two, Path::new(".")).unwrap();
        assert_eq!(c.chains[0].replication, ReplicationMode::OutputCommit);
        assert_eq!(
            c.chains[0].without_replica,
            WithoutReplicaPolicy::Unprotected
        );
        // Periodic and off need no replica to be valid.
        assert!(Config::parse(&chain("periodic"), Path::new(".")).is_ok());
        assert!(err(&chain("sometimes")).contains("replication"));
        let e =
            err(&chain("periodic").replace("replication = ", "commit_wait_ms = 0\nreplication = "));
        assert!(e.contains("chain.web.commit_wait_ms"), "{e}");
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0-2,5").unwrap(), vec![0, 1, 2, 5]);
        assert_eq!(
            parse_cpu_list("3-1"),
            Err(CpuListError::Reversed("3-1".into()))
        );
        assert_eq!(parse_cpu_list("x"), Err(CpuListError::NotCpu("x".into())));
        assert_eq!(parse_cpu_list(" , "), Err(CpuListError::Empty));
    }
}

/// What the data path's system-call filter does with a call outside its list
/// (`[supervisor] seccomp`, and the processes' `--seccomp`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SeccompMode {
    /// The process is killed (SIGSYS).
    #[default]
    Enforce,
    /// The call goes ahead and the kernel logs it (audit log or `dmesg`).
    Log,
    /// No filter.
    Off,
}

impl std::fmt::Display for SeccompMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SeccompMode::Enforce => "enforce",
            SeccompMode::Log => "log",
            SeccompMode::Off => "off",
        })
    }
}

/// A seccomp mode that is not `enforce`, `log` or `off` (as written).
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[error("`{0}`: expected enforce, log or off")]
pub struct UnknownSeccompMode(pub String);

impl std::str::FromStr for SeccompMode {
    type Err = UnknownSeccompMode;

    fn from_str(s: &str) -> std::result::Result<SeccompMode, UnknownSeccompMode> {
        match s {
            "enforce" => Ok(SeccompMode::Enforce),
            "log" => Ok(SeccompMode::Log),
            "off" => Ok(SeccompMode::Off),
            _ => Err(UnknownSeccompMode(s.to_string())),
        }
    }
}

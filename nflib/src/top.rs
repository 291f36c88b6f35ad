//! What `nfmgr top` shows, as nfmgr's control socket answers `{"cmd":"top"}`.
//!
//! nfmgr produces it and the dashboard consumes it through these same types, so the two
//! cannot drift apart. It carries raw counters, not rates: the dashboard computes rates from
//! two consecutive answers, using each server's own clock (`ServerStats::taken_ms`), so a
//! server whose statistics arrive late is never averaged over the wrong interval.
//!
//! Times are wall-clock milliseconds since the Unix epoch, so events from several servers
//! sort together.

use serde::{Deserialize, Serialize};

use crate::cluster::EndpointInfo;
use crate::snapshot::RegionSnapshot;

/// Everything one `top` request answers.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TopReport {
    pub instance: String,
    /// The server that answered.
    pub server: u16,
    pub name: String,
    /// `coordinator`, `member` or `standalone`.
    pub role: String,
    pub uptime_s: f64,
    pub view_version: u64,
    pub taken_ms: u64,
    /// Every server this nfmgr knows (the coordinator knows the whole cluster; a member or a
    /// standalone nfmgr only itself).
    pub servers: Vec<ServerReport>,
    /// Every vswitch and runtime of the cluster, with the chain each runtime serves.
    pub endpoints: Vec<EndpointInfo>,
    /// The service chains this server defines, with their functions in order.
    pub chains: Vec<ChainInfo>,
    /// Newest last.
    pub events: Vec<TopEvent>,
    /// Migrations started through a control socket, newest last.
    pub migrations: Vec<MigrationRecord>,
    /// Process deaths and the supervisor's restarts, newest last.
    pub recoveries: Vec<RecoveryRecord>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ServerReport {
    pub server: u16,
    pub name: String,
    pub alive: bool,
    /// The server that answered.
    pub this: bool,
    pub coordinator: bool,
    /// How old the statistics are (a member sends them once a second).
    pub stats_age_ms: Option<u64>,
    pub stats: Option<ServerStats>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServerStats {
    /// When the snapshot was read, by that server's clock.
    pub taken_ms: u64,
    pub snapshot: RegionSnapshot,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainInfo {
    pub name: String,
    pub nfs: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopEvent {
    pub at_ms: u64,
    pub server: u16,
    /// The process it is about, or `cluster`, `nfmgr`, `operator`.
    pub source: String,
    pub what: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MigrationRecord {
    pub id: u64,
    /// The server whose control socket started it.
    pub server: u16,
    pub from: String,
    pub to: String,
    /// Flows asked for; `None`: all.
    pub requested: Option<u32>,
    pub started_ms: u64,
    pub done: bool,
    /// How long the source took (from its report), once done.
    pub ms: Option<f64>,
    pub moved: u64,
    pub rolled_back: u64,
    pub lost: u64,
    pub error: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryRecord {
    pub server: u16,
    pub process: String,
    /// How it died (`killed by SIGKILL (9)`, `exited with status 1`).
    pub cause: String,
    pub died_ms: u64,
    /// When its replacement was running; `None` while it is being restarted (or when it
    /// will not be).
    pub recovered_ms: Option<u64>,
}

/// What a member sends its coordinator once a second (inside the authenticated session).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MemberStats {
    pub stats: ServerStats,
    pub events: Vec<TopEvent>,
    pub migrations: Vec<MigrationRecord>,
    pub recoveries: Vec<RecoveryRecord>,
}

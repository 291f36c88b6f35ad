//! nfmgr's control thread: the cluster (coordinator or member), control calls to liaisons,
//! the control socket and the metrics endpoint.
//!
//! One thread owns all control state and reacts to [`Event`]s, so nothing here needs a lock:
//! - the relay (data-plane thread) hands over messages for nfmgr's control endpoint;
//! - reader threads hand over frames from other managers (one per TCP session);
//! - socket and metrics handler threads ask questions ([`Handle::ask`]) and wait for
//!   answers, including control calls that take a round trip ([`Handle::rpc`]).
//!
//! Who is in the cluster, who is alive and the view are the membership's
//! ([`nflib::membership`], a state machine without I/O); this thread carries out what it
//! asks (frames on the sessions, the view to the relay and the local processes, recovery
//! of a dead server's flows, joins, fences) and routes control calls.

pub mod metrics;
pub mod peer;
pub mod socket;
pub mod store;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{SocketAddr, TcpListener};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use nflib::cluster::{ClusterView, EndpointInfo};
use nflib::config::Config;
use nflib::doorbell::Doorbells;
use nflib::frame::{EndpointAddr, LIAISON};
use nflib::membership::{
    Action, Membership, RecoverOn, Role, Settings as MembershipSettings, Start,
};
use nflib::msg::{Call, Message, Reply};
use nflib::reliable::PeerEvent;
use nflib::slot::{ProcessKind, SlotState};
use nflib::snapshot::RegionSnapshot;
use nflib::top::{
    ChainInfo, MemberStats, MigrationRecord, RecoveryRecord, ServerReport, ServerStats, TopEvent,
    TopReport,
};
use nflib::{Region, MANAGER_SLOT};

use crate::listen::{AcceptBackoff, Limit};

use crate::linkwatch::LinkChange;
use crate::relay::{RelayCommand, RelayEvent};
use crate::supervisor::{ProcEvent, ProcEventKind};
use peer::{AuthKey, ConnId, JoinInfo, PeerMsg, PeerWriter, RpcError};
use store::{Store, StoreEvent, StoreSettings};

use crate::ClusterKeys;

/// The managers' authentication keys, shared by the control thread and the accept loop.
type SharedAuth = Arc<RwLock<Vec<AuthKey>>>;

/// How long a fenced member waits for its killed processes to die before joining anyway.
const FENCE_WAIT: Duration = Duration::from_secs(5);

/// How long a control call may take before its caller gets a timeout.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(3);

/// How often a member sends its statistics to the coordinator (for `nfmgr top`).
const STATS_EVERY: Duration = Duration::from_secs(1);

/// How many events, migrations and recoveries are kept for `nfmgr top`.
const KEEP_EVENTS: usize = 200;
const KEEP_RECORDS: usize = 50;

/// How often a member retries joining.
const REJOIN_EVERY: Duration = Duration::from_millis(500);

pub enum Event {
    Relay(RelayEvent),
    /// Run this with the control state (from a handler thread).
    Ask(Box<dyn FnOnce(&mut Control) + Send>),
    /// Coordinator: a member authenticated.
    PeerJoin {
        conn: ConnId,
        info: JoinInfo,
        writer: PeerWriter,
    },
    /// Member: the coordinator welcomed us.
    Joined {
        conn: ConnId,
        view: ClusterView,
        /// The restarted coordinator's previous life's runtimes, for this server's runtimes
        /// to take over.
        recover: Vec<EndpointInfo>,
        writer: PeerWriter,
    },
    /// Member: the join on `conn` (to the coordinator at `addr`) failed; `nobody_listening`:
    /// its host refused the connection.
    JoinFailed {
        conn: ConnId,
        addr: SocketAddr,
        why: String,
        nobody_listening: bool,
    },
    /// etcd elected a coordinator, or this one's lease lapsed (`store = "etcd"`).
    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    Store(StoreEvent),
    /// Member: the coordinator had declared this server dead (answering the join on
    /// `conn`); fence, then join again.
    Fenced {
        conn: ConnId,
        why: String,
    },
    PeerMsg {
        conn: ConnId,
        msg: PeerMsg,
    },
    PeerDown {
        conn: ConnId,
        why: String,
    },
    /// The supervisor recorded something about a process.
    Process(ProcEvent),
    Shutdown,
}

/// Why the control thread could not be asked ([`Handle::ask`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    #[error("nfmgr is shutting down")]
    ShuttingDown,
    /// No answer within the time a question may take.
    #[error("nfmgr's control thread did not answer")]
    Silent,
}

/// Why a control call made through the control thread ([`Handle::rpc`]) has no answer.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error(transparent)]
    Control(#[from] ControlError),
    /// It failed on its way, here or in another nfmgr.
    #[error(transparent)]
    Failed(#[from] RpcError),
    /// Not even the call's own timeout came back.
    #[error("{0}: no answer")]
    NoAnswer(EndpointAddr),
}

/// Why [`Control::kill_local`] killed nothing.
#[derive(Debug, thiserror::Error)]
pub enum KillError {
    #[error("server {server} has no process in slot {slot}")]
    NoProcess { server: u16, slot: u16 },
    #[error("slot {0} holds no vswitch or runtime")]
    NotDataPath(u16),
    #[error("{name} is not running (it is {state:?})")]
    NotRunning { name: String, state: SlotState },
    /// The supervisor holds no pidfd for it.
    #[error("{0} is not a running process of this nfmgr")]
    NotOurs(String),
}

/// `nfmgr rekey` on an nfmgr started without cluster keys.
#[derive(Debug, thiserror::Error)]
#[error("this nfmgr runs without a cluster key (no cluster.key_file): nothing to rotate")]
pub struct NoClusterKey;

/// What other threads use to reach the control thread.
#[derive(Clone)]
pub struct Handle {
    tx: Sender<Event>,
}

impl Handle {
    /// Runs `f` on the control thread and returns its result.
    pub fn ask<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Control) -> T + Send + 'static,
    ) -> Result<T, ControlError> {
        let (tx, rx) = mpsc::channel();
        self.tx
            .send(Event::Ask(Box::new(move |c| {
                let _ = tx.send(f(c));
            })))
            .map_err(|_| ControlError::ShuttingDown)?;
        rx.recv_timeout(Duration::from_secs(5))
            .map_err(|_| ControlError::Silent)
    }

    /// Makes a control call to the liaison of `to` and waits for the answer.
    pub fn rpc(&self, to: EndpointAddr, call: Call) -> Result<Reply, CallError> {
        Ok(self
            .rpc_start(to, call)?
            .recv_timeout(RPC_TIMEOUT + Duration::from_millis(500))
            .map_err(|_| CallError::NoAnswer(to))??)
    }

    /// Starts a control call; the answer arrives on the returned channel.
    pub fn rpc_start(
        &self,
        to: EndpointAddr,
        call: Call,
    ) -> Result<Receiver<Result<Reply, RpcError>>, ControlError> {
        self.ask(move |c| c.start_rpc(to, call))
    }
}

/// A recovery order waiting for its runtime's server to join (`Control::waiting_recoveries`).
struct WaitingRecovery {
    to: EndpointAddr,
    failed: EndpointAddr,
    incarnation: u64,
    reply_to: ReplyTo,
    until: Instant,
}

enum ReplyTo {
    /// A handler thread of this nfmgr waits.
    Local(Sender<Result<Reply, RpcError>>),
    /// Another manager asked (the id is theirs).
    Peer { conn: ConnId, id: u64 },
    /// Nobody waits (view notifications).
    Nobody,
    /// A runtime's answer to `Recover`: recorded as the takeover's event.
    Recovery {
        failed: EndpointAddr,
        by: EndpointAddr,
        asked: Instant,
    },
}

struct Pending {
    reply_to: ReplyTo,
    deadline: Instant,
}

pub struct Control {
    cfg: Config,
    region: Region,
    bells: Arc<Doorbells>,
    relay: Sender<RelayCommand>,
    events: Sender<Event>,
    started: Instant,
    me: u16,
    name: String,
    /// The keys managers authenticate each other with: the first signs a join, any
    /// verifies one (during a key rotation). Shared with the accept loop.
    auth: Option<SharedAuth>,
    membership: Membership,
    /// The coordinator's journal (a coordinator only; on etcd, how it is written and read
    /// there), and whether its last write failed.
    journal: Option<nflib::journal::JournalFile>,
    journal_failed: bool,
    /// `store = "etcd"`: the election and the journal in etcd.
    store: Option<Store>,
    /// Recovery orders for runtimes of a member that has not joined this coordinator yet
    /// (it carried on from a journal, and the member is on its way back): sent as it
    /// joins, under the epoch of then; dropped if it has not by the deadline, or when
    /// this nfmgr is no longer the coordinator.
    waiting_recoveries: Vec<WaitingRecovery>,
    /// The supervisor's pidfds of the running processes: what `kill_local` signals.
    pidfds: crate::supervisor::Pidfds,
    /// The authenticated sessions' writers (joined members, the coordinator, joins being
    /// answered).
    conns: HashMap<ConnId, PeerWriter>,
    pending: HashMap<u64, Pending>,
    next_rpc: u64,
    /// Per local slot: the process generation and view (epoch, version) last sent to it.
    notified: HashMap<u16, (u32, (u64, u64))>,
    /// Per local runtime slot: the generation and replica list last sent (`SetReplica`).
    replicas_sent: HashMap<u16, (u32, Vec<EndpointAddr>)>,
    /// Membership changes, for `nfmgr status`.
    log: Vec<String>,
    /// For `nfmgr top`: this server's events, migrations and recoveries, and (on the
    /// coordinator) what each member last sent.
    top_events: VecDeque<TopEvent>,
    migrations: VecDeque<MigrationRecord>,
    next_migration: u64,
    recoveries: VecDeque<RecoveryRecord>,
    member_stats: BTreeMap<u16, (Instant, MemberStats)>,
    last_stats_push: Instant,
    pub stop_requested: bool,
}

fn push_capped<T>(q: &mut VecDeque<T>, item: T, cap: usize) {
    if q.len() >= cap {
        q.pop_front();
    }
    q.push_back(item);
}

fn wall_ms() -> u64 {
    nflib::time::wall_ns() / 1_000_000
}

/// Digest of each chain's definition (servers must agree on the chains they share).
fn chain_digests(cfg: &Config) -> Vec<(String, [u8; 32])> {
    cfg.chains
        .iter()
        .map(|c| {
            let text = format!("{:?}", c.nfs);
            (c.name.clone(), *blake3::hash(text.as_bytes()).as_bytes())
        })
        .collect()
}

/// The vswitches and runtimes of server `me`, from its region.
fn local_endpoints(cfg: &Config, region: &Region, me: u16) -> Vec<EndpointInfo> {
    let mut v = Vec::new();
    for s in 1..region.slot_count() {
        let Some(rec) = region.slot(s) else {
            continue;
        };
        let kind = rec.kind();
        if !matches!(kind, ProcessKind::Vswitch | ProcessKind::Runtime) {
            continue;
        }
        let name = rec.name.get();
        let chain = cfg
            .runtime(&name)
            .and_then(|r| cfg.chain_of(r))
            .map(str::to_string);
        v.push(EndpointInfo {
            addr: EndpointAddr::new(me, s),
            kind,
            name,
            chain,
            alive: rec.state() == SlotState::Running,
            generation: rec.generation.load(std::sync::atomic::Ordering::Relaxed),
        });
    }
    v
}

impl Control {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: Config,
        region: Region,
        bells: Arc<Doorbells>,
        relay: Sender<RelayCommand>,
        events: Sender<Event>,
        incarnation: u64,
        keys: Option<&ClusterKeys>,
    ) -> std::io::Result<Control> {
        let me = cfg.cluster.server_id;
        let now = Instant::now();
        let settings = MembershipSettings {
            heartbeat: Duration::from_millis(cfg.cluster.heartbeat_ms),
            member_timeout: Duration::from_millis(cfg.cluster.member_timeout_ms),
            rejoin_every: REJOIN_EVERY,
            fence_wait: FENCE_WAIT,
            restore_grace: Duration::from_millis(cfg.cluster.restore_grace_ms),
            replicated: cfg
                .chains
                .iter()
                .filter(|c| c.replication != nflib::config::ReplicationMode::Off)
                .map(|c| c.name.clone())
                .collect(),
            chains: chain_digests(&cfg),
            can_join: keys.is_some(),
            rejoin_at_once: cfg.cluster.store == nflib::config::ClusterStore::Etcd,
        };
        let coordinator = cfg
            .cluster
            .coordinator
            .as_ref()
            .map(|a| a.parse().expect("validated address"));
        let on_etcd = cfg.cluster.store == nflib::config::ClusterStore::Etcd;
        let start = match coordinator {
            // Every nfmgr listens; the one etcd elects coordinates.
            _ if on_etcd => Start::Member(None),
            Some(a) => Start::Member(Some(a)),
            None if cfg.cluster.listen.is_some() => Start::Coordinator,
            None => Start::Alone,
        };
        let endpoints = local_endpoints(&cfg, &region, me);
        let mut membership = Membership::new(
            me,
            cfg.server_name(),
            incarnation,
            start,
            settings,
            endpoints,
            now,
        );
        let journal_keys: Vec<&[u8]> = keys.map(|k| k.all().collect()).unwrap_or_default();
        let store = match on_etcd {
            true => {
                let settings = StoreSettings {
                    endpoints: cfg.cluster.etcd.clone(),
                    prefix: cfg.cluster.etcd_prefix.clone(),
                    me,
                    advertise: cfg.cluster.advertised().expect("validated address"),
                    lease_s: cfg.cluster.etcd_lease_s,
                };
                Some(Store::spawn(settings, events.clone())?)
            }
            false => None,
        };
        // On etcd, the journal lives there (this names it in errors); else in a file.
        let journal = if on_etcd {
            let key = format!("etcd {}/journal", cfg.cluster.etcd_prefix);
            Some(nflib::journal::JournalFile::new(key.into(), &journal_keys))
        } else {
            cfg.cluster
                .listen
                .is_some()
                .then(|| nflib::journal::JournalFile::new(cfg.journal_path(), &journal_keys))
        };
        if let Some(j) = journal.as_ref().filter(|_| !on_etcd) {
            match j.load() {
                Ok(Some(last)) => match membership.restore(last, now) {
                    Ok(()) => tracing::info!(
                        journal = %j.path().display(),
                        "carrying on from the coordinator's journal"
                    ),
                    Err(e) => tracing::warn!(
                        journal = %j.path().display(),
                        "the coordinator's journal is not replayed: {e}"
                    ),
                },
                Ok(None) => {}
                Err(e) => tracing::warn!("the coordinator's journal is not replayed: {e}"),
            }
        }
        let mut c = Control {
            name: cfg.server_name(),
            cfg,
            region,
            bells,
            relay,
            events,
            started: now,
            me,
            auth: keys.map(|k| Arc::new(RwLock::new(k.auth_keys()))),
            membership,
            journal,
            journal_failed: false,
            store,
            waiting_recoveries: Vec::new(),
            conns: HashMap::new(),
            pending: HashMap::new(),
            next_rpc: 1,
            notified: HashMap::new(),
            replicas_sent: HashMap::new(),
            log: Vec::new(),
            top_events: VecDeque::new(),
            migrations: VecDeque::new(),
            next_migration: 1,
            recoveries: VecDeque::new(),
            member_stats: BTreeMap::new(),
            last_stats_push: now,
            stop_requested: false,
            pidfds: Default::default(),
        };
        c.run_actions();
        Ok(c)
    }

    pub fn handle(&self) -> Handle {
        Handle {
            tx: self.events.clone(),
        }
    }

    fn secs(&self, t: Instant) -> f64 {
        t.saturating_duration_since(self.started).as_secs_f64()
    }

    fn note(&mut self, what: String) {
        tracing::info!("{what}");
        let at = self.started.elapsed().as_secs_f64();
        self.log.push(format!("+{at:.3}s {what}"));
        if self.log.len() > 100 {
            self.log.remove(0);
        }
        self.top_event("cluster", what);
    }

    /// Records an event for `nfmgr top`.
    pub fn top_event(&mut self, source: &str, what: String) {
        let e = TopEvent {
            at_ms: wall_ms(),
            server: self.me,
            source: source.to_string(),
            what,
        };
        push_capped(&mut self.top_events, e, KEEP_EVENTS);
    }

    /// A supervisor event: into the log, and deaths and restarts into the recoveries.
    fn process_event(&mut self, e: ProcEvent) {
        let now = wall_ms();
        // The cluster's view has a replicated runtime's death at once, before its recovery
        // is asked: the other servers' vswitches take a takeover of a runtime only once
        // they know it died. (Other changes wait for the next heartbeat, which merges
        // them: a start of many processes makes one view, not one each.)
        let replicated_runtime = self
            .cfg
            .runtime(&e.process)
            .is_some_and(|rc| self.replicated(self.cfg.chain_of(rc)));
        if e.kind == ProcEventKind::Died && replicated_runtime {
            let mine = self.local_endpoints();
            self.membership.endpoints_changed(mine);
            self.run_actions();
        }
        match e.kind {
            ProcEventKind::Died => {
                // A local runtime's death is recovered from here at once, with no round
                // trip to a remote coordinator.
                // A fenced process's flows were taken over while this server was cut off:
                // there is nothing to recover.
                let fenced = self.membership.process_died(e.slot);
                if let Some(rc) = self.cfg.runtime(&e.process).filter(|_| !fenced) {
                    let chain = self.cfg.chain_of(rc).map(str::to_string);
                    let failed = EndpointAddr::new(self.me, e.slot);
                    self.start_recovery(failed, chain.as_deref(), u64::from(e.generation), None);
                }
                let cause = e
                    .what
                    .split_once(' ')
                    .and_then(|(_, rest)| rest.split_once(' '))
                    .map(|(_, c)| c.to_string())
                    .unwrap_or_else(|| e.what.clone());
                let r = RecoveryRecord {
                    server: self.me,
                    process: e.process.clone(),
                    cause,
                    died_ms: now,
                    recovered_ms: None,
                };
                push_capped(&mut self.recoveries, r, KEEP_RECORDS);
            }
            ProcEventKind::Running => {
                let pending = self
                    .recoveries
                    .iter_mut()
                    .rev()
                    .find(|r| r.process == e.process && r.recovered_ms.is_none());
                if let Some(r) = pending {
                    r.recovered_ms = Some(now);
                    let ms = now.saturating_sub(r.died_ms);
                    self.top_event(&e.process, format!("{} (recovered in {ms} ms)", e.what));
                    return;
                }
            }
            ProcEventKind::StartFailed
            | ProcEventKind::Reclaimed
            | ProcEventKind::Frozen
            | ProcEventKind::CrashLoop
            | ProcEventKind::Rebuilt => {}
        }
        self.top_event(&e.process, e.what);
    }

    /// A migration started through the control socket; returns its id for
    /// [`Control::migration_finished`].
    pub fn migration_started(&mut self, from: String, to: String, requested: Option<u32>) -> u64 {
        let id = self.next_migration;
        self.next_migration += 1;
        let what = format!(
            "migration {id} started: {} flows from {from} to {to}",
            requested.map_or("all".to_string(), |n| n.to_string())
        );
        let r = MigrationRecord {
            id,
            server: self.me,
            from,
            to,
            requested,
            started_ms: wall_ms(),
            done: false,
            ms: None,
            moved: 0,
            rolled_back: 0,
            lost: 0,
            error: None,
        };
        push_capped(&mut self.migrations, r, KEEP_RECORDS);
        self.top_event("operator", what);
        id
    }

    /// The migration `id` ended; `outcome` fills in its results.
    pub fn migration_finished(&mut self, id: u64, outcome: impl FnOnce(&mut MigrationRecord)) {
        let Some(r) = self.migrations.iter_mut().find(|r| r.id == id) else {
            return;
        };
        outcome(r);
        r.done = true;
        let what = match (&r.error, r.ms) {
            (Some(e), _) => format!("migration {id} failed: {e}"),
            (None, ms) => format!(
                "migration {id} done: {} flows moved in {:.1} ms, {} groups rolled back",
                r.moved,
                ms.unwrap_or(0.0),
                r.rolled_back
            ),
        };
        self.top_event("operator", what);
    }

    fn local_stats(&self) -> ServerStats {
        ServerStats {
            taken_ms: wall_ms(),
            snapshot: RegionSnapshot::read(&self.region),
        }
    }

    /// What `nfmgr top` shows: this server, and on the coordinator every member's last
    /// statistics.
    pub fn top(&self) -> TopReport {
        let now = Instant::now();
        let role = match self.membership.role() {
            Role::Coordinator => "coordinator",
            Role::Member { .. } => "member",
            Role::Alone => "standalone",
        };
        let view = self.membership.view();
        let mut events: Vec<TopEvent> = self.top_events.iter().cloned().collect();
        let mut migrations: Vec<MigrationRecord> = self.migrations.iter().cloned().collect();
        let mut recoveries: Vec<RecoveryRecord> = self.recoveries.iter().cloned().collect();
        let mut servers = Vec::new();
        for s in &view.servers {
            let this = s.server == self.me;
            let (age, stats) = if this {
                (Some(0), Some(self.local_stats()))
            } else {
                match self.member_stats.get(&s.server) {
                    Some((at, m)) => (
                        Some(now.duration_since(*at).as_millis() as u64),
                        Some(m.stats.clone()),
                    ),
                    None => (None, None),
                }
            };
            servers.push(ServerReport {
                server: s.server,
                name: s.name.clone(),
                alive: s.alive,
                this,
                coordinator: s.server == view.coordinator,
                stats_age_ms: age,
                stats,
            });
        }
        if !servers.iter().any(|s| s.this) {
            servers.insert(
                0,
                ServerReport {
                    server: self.me,
                    name: self.name.clone(),
                    alive: true,
                    this: true,
                    coordinator: matches!(self.membership.role(), Role::Coordinator | Role::Alone),
                    stats_age_ms: Some(0),
                    stats: Some(self.local_stats()),
                },
            );
        }
        for (_, m) in self.member_stats.values() {
            events.extend(m.events.iter().cloned());
            migrations.extend(m.migrations.iter().cloned());
            recoveries.extend(m.recoveries.iter().cloned());
        }
        events.sort_by_key(|e| e.at_ms);
        migrations.sort_by_key(|m| m.started_ms);
        recoveries.sort_by_key(|r| r.died_ms);
        let tail = |n: usize, len: usize| len.saturating_sub(n);
        events.drain(..tail(KEEP_EVENTS, events.len()));
        migrations.drain(..tail(KEEP_RECORDS, migrations.len()));
        recoveries.drain(..tail(KEEP_RECORDS, recoveries.len()));
        TopReport {
            instance: self.cfg.instance.clone(),
            server: self.me,
            name: self.name.clone(),
            role: role.to_string(),
            uptime_s: self.started.elapsed().as_secs_f64(),
            view_version: view.version,
            taken_ms: wall_ms(),
            servers,
            endpoints: self.endpoints(),
            chains: self
                .cfg
                .chains
                .iter()
                .map(|c| ChainInfo {
                    name: c.name.clone(),
                    nfs: c.kinds(),
                })
                .collect(),
            events,
            migrations,
            recoveries,
        }
    }

    /// Member: sends the coordinator this server's part of `nfmgr top`.
    fn push_stats(&mut self, conn: ConnId) {
        let m = MemberStats {
            stats: self.local_stats(),
            events: self.top_events.iter().cloned().collect(),
            migrations: self.migrations.iter().cloned().collect(),
            recoveries: self.recoveries.iter().cloned().collect(),
        };
        match serde_json::to_vec(&m) {
            Ok(json) => self.send_peer(conn, &PeerMsg::Stats { json }),
            Err(e) => tracing::warn!("cannot encode statistics for the coordinator: {e}"),
        }
    }

    /// Shares the supervisor's pidfds of the running processes (`kill_local` signals
    /// through them).
    pub fn with_pidfds(mut self, pidfds: crate::supervisor::Pidfds) -> Control {
        self.pidfds = pidfds;
        self
    }

    /// Kills one of this server's vswitches or runtimes with SIGKILL (a failover drill);
    /// the supervisor sees it die and restarts it as it would after a crash.
    pub fn kill_local(&mut self, slot: u16, by: &str) -> Result<String, KillError> {
        let rec = self
            .region
            .slot(slot)
            .filter(|_| slot != MANAGER_SLOT)
            .ok_or(KillError::NoProcess {
                server: self.me,
                slot,
            })?;
        if !matches!(rec.kind(), ProcessKind::Vswitch | ProcessKind::Runtime) {
            return Err(KillError::NotDataPath(slot));
        }
        let name = rec.name.get();
        let pid = rec.pid.load(std::sync::atomic::Ordering::Relaxed);
        if rec.state() != SlotState::Running || pid == 0 {
            let state = rec.state();
            return Err(KillError::NotRunning { name, state });
        }
        // Signalled through the supervisor's pidfd for the slot, never by the pid word in
        // shared memory, which every attached process can write (as `kill(2)`'s argument,
        // 0 or a value past i32::MAX would signal a process group or every process).
        let fd = self
            .pidfds
            .lock()
            .ok()
            .and_then(|m| m.get(&slot).cloned())
            .ok_or_else(|| KillError::NotOurs(name.clone()))?;
        crate::sys::pidfd_signal(&fd, libc::SIGKILL);
        self.top_event(&name, format!("killed with SIGKILL by {by} (pid {pid})"));
        Ok(format!("{name} (pid {pid}) killed"))
    }

    /// The vswitches and runtimes of this server, from the region.
    fn local_endpoints(&self) -> Vec<EndpointInfo> {
        local_endpoints(&self.cfg, &self.region, self.me)
    }

    fn send_relay(&self, cmd: RelayCommand) {
        let _ = self.relay.send(cmd);
        self.bells.ring(MANAGER_SLOT);
    }

    /// Carries out what the membership asks, until it asks nothing more (a failed write
    /// is a session down, which may ask more).
    fn run_actions(&mut self) {
        let mut view_changed = false;
        while let Some(a) = self.membership.poll() {
            match a {
                Action::Send { session, msg } => self.send_peer(session, &msg),
                Action::Close { session } => {
                    if let Some(w) = self.conns.remove(&session) {
                        w.close();
                    }
                }
                Action::ViewChanged { alive, renotify } => {
                    view_changed = true;
                    self.send_relay(RelayCommand::Members(alive));
                    if renotify {
                        self.notified.clear();
                    }
                }
                Action::Recover {
                    failed,
                    chain,
                    incarnation,
                    on,
                } => self.start_recovery(failed, chain.as_deref(), incarnation, Some(on)),
                Action::Join {
                    session,
                    coordinator,
                    request,
                } => self.start_join(session, coordinator, request),
                Action::Fence => self.fence(),
                Action::Note(what) => self.note(what),
            }
        }
        // Once for every view change this batch made (a grace ending with many members
        // gone makes one per member); this server's processes get the view now, not at
        // the next tick.
        if view_changed {
            self.write_journal();
            self.notify_local();
        }
        self.send_waiting_recoveries();
    }

    /// Sends on a session; a failed write ends it (and what the membership makes of that
    /// runs at once).
    fn send_peer(&mut self, conn: ConnId, msg: &PeerMsg) {
        let failed = match self.conns.get_mut(&conn) {
            Some(w) => w.send(msg).err(),
            None => return,
        };
        if let Some(e) = failed {
            self.peer_down(conn, format!("write failed: {e}"));
        }
    }

    /// The configuration file this nfmgr was started from.
    pub fn config_path(&self) -> Option<std::path::PathBuf> {
        self.cfg.path.clone()
    }

    /// Takes new cluster keys (`nfmgr rekey`): joins are made with the first and accepted
    /// under any; the data-plane thread signs frames with the first and accepts any.
    /// Sessions already up keep the keys they were made with.
    pub fn set_keys(&mut self, keys: &ClusterKeys) -> Result<(), NoClusterKey> {
        let Some(auth) = &self.auth else {
            return Err(NoClusterKey);
        };
        if let Ok(mut a) = auth.write() {
            *a = keys.auth_keys();
        }
        self.send_relay(RelayCommand::Keys(keys.frame_keys()));
        let what = format!(
            "cluster keys replaced: signing with {}, accepting {} more",
            keys.sign_id(),
            keys.accept.len()
        );
        tracing::info!("{what}");
        self.top_event("cluster", what);
        Ok(())
    }

    /// Starts a control call to `to`; the answer comes on the returned channel.
    pub fn start_rpc(&mut self, to: EndpointAddr, call: Call) -> Receiver<Result<Reply, RpcError>> {
        let (tx, rx) = mpsc::channel();
        self.route_rpc(to, call, ReplyTo::Local(tx));
        rx
    }

    fn route_rpc(&mut self, to: EndpointAddr, call: Call, reply_to: ReplyTo) {
        let id = self.next_rpc;
        self.next_rpc += 1;
        if to.server == self.me {
            if to.slot == MANAGER_SLOT {
                return self.answer(reply_to, Err(RpcError::ToManager));
            }
            if let Call::Kill { by } = &call {
                // A drill: this nfmgr kills the process; the call never reaches it.
                let result = self
                    .kill_local(to.slot, by)
                    .map(|_| Reply::Accepted)
                    .or_else(|e| {
                        let reason = e.to_string();
                        Ok(Reply::Refused { reason })
                    });
                return self.answer(reply_to, result);
            }
            self.pending.insert(
                id,
                Pending {
                    reply_to,
                    deadline: Instant::now() + RPC_TIMEOUT,
                },
            );
            self.send_relay(RelayCommand::Send {
                to,
                src_actor: LIAISON,
                dst_actor: LIAISON,
                msg: Message::Rpc { id, call },
            });
            return;
        }
        let Some(conn) = self.membership.session_to(to.server) else {
            return self.answer(reply_to, Err(RpcError::Unreachable(to.server)));
        };
        self.pending.insert(
            id,
            Pending {
                reply_to,
                deadline: Instant::now() + RPC_TIMEOUT,
            },
        );
        self.send_peer(
            conn,
            &PeerMsg::Rpc {
                id,
                target: to,
                call,
            },
        );
    }

    fn answer(&mut self, reply_to: ReplyTo, result: Result<Reply, RpcError>) {
        match reply_to {
            ReplyTo::Local(tx) => {
                let _ = tx.send(result);
            }
            ReplyTo::Peer { conn, id } => self.send_peer(conn, &PeerMsg::RpcReply { id, result }),
            ReplyTo::Nobody => {}
            ReplyTo::Recovery { failed, by, asked } => {
                let ms = asked.elapsed().as_secs_f64() * 1000.0;
                let what = match result {
                    Ok(Reply::Recovered { flows, lost }) if flows + lost > 0 => format!(
                        "took over {flows} flows of {failed} ({lost} could not be installed) \
                         {ms:.1} ms after asked"
                    ),
                    Ok(Reply::Recovered { .. }) => return,
                    Ok(other) => format!("recovery of {failed}: unexpected answer {other:?}"),
                    Err(e) => format!("recovery of {failed}: {e}"),
                };
                self.top_event(&by.to_string(), what);
            }
        }
    }

    fn on_event(&mut self, e: Event) {
        match e {
            Event::Relay(RelayEvent::Delivered(env)) => match env.msg {
                Message::RpcReply { id, reply } => {
                    if let Some(p) = self.pending.remove(&id) {
                        self.answer(p.reply_to, Ok(reply));
                    }
                }
                other => tracing::debug!(from = %env.from, "unexpected message {other:?}"),
            },
            Event::Relay(RelayEvent::Peer(PeerEvent::Dead { peer, lost })) => {
                tracing::warn!(%peer, lost, "actor messages to a peer that stopped answering were dropped");
            }
            Event::Relay(RelayEvent::Peer(PeerEvent::Restarted { peer, lost })) => {
                // A local process restarted before this nfmgr learnt of its new life: what
                // was sent to it since (its first view, its replicas) went to the old life
                // and is lost. Send it again.
                if peer.server == self.me && lost > 0 {
                    tracing::debug!(%peer, lost, "messages to a restarted process are sent again");
                    self.notified.remove(&peer.slot);
                    self.replicas_sent.remove(&peer.slot);
                    self.notify_local();
                }
            }
            Event::Relay(RelayEvent::Link(change)) => self.link_changed(change),
            Event::Ask(f) => f(self),
            Event::Process(e) => self.process_event(e),
            Event::PeerJoin { conn, info, writer } => {
                self.conns.insert(conn, writer);
                self.membership.join_request(conn, info, Instant::now());
            }
            Event::Joined {
                conn,
                view,
                recover,
                writer,
            } => {
                self.conns.insert(conn, writer);
                if !self.membership.joined(conn, view, recover, Instant::now()) {
                    self.membership
                        .session_down(conn, "not a member".into(), Instant::now());
                }
            }
            Event::Fenced { conn, why } => {
                self.membership
                    .fenced(conn, why, nflib::time::wall_ns(), Instant::now())
            }
            Event::JoinFailed {
                conn,
                addr,
                why,
                nobody_listening,
            } => {
                // On etcd: the coordinator this member was joined to is gone (its session
                // ended, and now its host refuses the connection: its nfmgr is not
                // running), so its lease is revoked rather than left to run out, and the
                // next coordinator is elected now, not a lease later. (A member that never
                // had a session deposes no one: a refusal may be its own network's.)
                if nobody_listening && self.membership.lost_its_coordinator() {
                    if let Some(store) = &self.store {
                        store.depose(addr);
                    }
                }
                if let Some(why) = self.membership.join_failed(conn, why, Instant::now()) {
                    tracing::warn!("cannot join the cluster: {why}");
                }
            }
            Event::Store(e) => self.store_event(e),
            Event::PeerMsg { conn, msg } => self.peer_msg(conn, msg),
            Event::PeerDown { conn, why } => self.peer_down(conn, why),
            Event::Shutdown => {}
        }
        self.run_actions();
    }

    fn peer_msg(&mut self, conn: ConnId, msg: PeerMsg) {
        let now = Instant::now();
        // Whoever is on this connection is alive.
        self.membership.heard(conn, now);
        match msg {
            PeerMsg::Heartbeat { endpoints } => self.membership.heartbeat(conn, endpoints),
            PeerMsg::View(view) => self.membership.view_from_coordinator(view),
            PeerMsg::Rpc { id, target, call } => {
                let reply_to = ReplyTo::Peer { conn, id };
                if target.server == self.me || self.membership.is_coordinator() {
                    self.route_rpc(target, call, reply_to);
                } else {
                    self.answer(reply_to, Err(RpcError::NotHere(target)));
                }
            }
            PeerMsg::RpcReply { id, result } => {
                if let Some(p) = self.pending.remove(&id) {
                    self.answer(p.reply_to, result);
                }
            }
            PeerMsg::Leave => self.peer_down(conn, "left the cluster".into()),
            PeerMsg::Stats { json } => {
                let from = self.membership.server_of(conn);
                match (from, serde_json::from_slice::<MemberStats>(&json)) {
                    (Some(server), Ok(m)) if self.membership.is_coordinator() => {
                        self.member_stats.insert(server, (now, m));
                    }
                    (_, Err(e)) => tracing::warn!("a member sent statistics I cannot read: {e}"),
                    _ => {}
                }
            }
            PeerMsg::Hello { .. }
            | PeerMsg::Join { .. }
            | PeerMsg::Welcome { .. }
            | PeerMsg::Fence { .. }
            | PeerMsg::Reject { .. } => {
                tracing::warn!("unexpected handshake frame in a session");
            }
        }
    }

    /// A session ended (its reader saw it close, or a write failed): unknown or already
    /// closed sessions change nothing.
    fn peer_down(&mut self, conn: ConnId, why: String) {
        let Some(w) = self.conns.remove(&conn) else {
            return;
        };
        w.close();
        self.membership.session_down(conn, why, Instant::now());
        self.run_actions();
    }

    /// Fenced (the membership says why): every vswitch and runtime here is killed, and
    /// the membership waits for them to die before joining again.
    fn fence(&mut self) {
        let mut killed = Vec::new();
        for s in 1..self.region.slot_count() {
            let running = self.region.slot(s).is_some_and(|r| {
                matches!(r.kind(), ProcessKind::Vswitch | ProcessKind::Runtime)
                    && r.state() == SlotState::Running
            });
            if running && self.kill_local(s, "the fence").is_ok() {
                killed.push(s);
            }
        }
        self.membership.fence_waiting(killed);
    }

    /// The cluster link stopped (or started again) carrying a server's frames.
    fn link_changed(&mut self, change: LinkChange) {
        match change {
            LinkChange::Down { server, silent_ns } => {
                self.membership
                    .link_down(server, Duration::from_nanos(silent_ns), Instant::now())
            }
            LinkChange::Up { server } => self.membership.link_up(server),
        }
        self.run_actions();
    }

    /// Whether flows of `chain` are replicated (and so recoverable).
    fn replicated(&self, chain: Option<&str>) -> bool {
        chain
            .and_then(|c| self.cfg.chain(c))
            .is_some_and(|c| c.replication != nflib::config::ReplicationMode::Off)
    }

    /// Asks every live runtime of `chain` to take over what it holds of `failed`'s lives up
    /// to `incarnation`. Runtimes hold copies only of the flows whose replica they are, so
    /// each takes its share; the data plane never waits for this thread beyond the call.
    fn start_recovery(
        &mut self,
        failed: EndpointAddr,
        chain: Option<&str>,
        incarnation: u64,
        on: Option<RecoverOn>,
    ) {
        if !self.replicated(chain) {
            return;
        }
        let targets: Vec<EndpointAddr> = self
            .membership
            .view()
            .runtimes_of(chain)
            .into_iter()
            .filter(|r| *r != failed && on.is_none_or(|o| o.includes(r.server)))
            .collect();
        self.top_event(
            "recovery",
            format!(
                "{failed} died: {} runtime(s) of chain {} asked to take over its flows",
                targets.len(),
                chain.unwrap_or("-")
            ),
        );
        let asked = Instant::now();
        let epoch = self.membership.view().epoch;
        let until = asked + Duration::from_millis(self.cfg.cluster.restore_grace_ms);
        for t in targets {
            let reply_to = ReplyTo::Recovery {
                failed,
                by: t,
                asked,
            };
            if t.server != self.me && self.membership.session_to(t.server).is_none() {
                self.waiting_recoveries.push(WaitingRecovery {
                    to: t,
                    failed,
                    incarnation,
                    reply_to,
                    until,
                });
            } else {
                let call = Call::Recover {
                    failed,
                    incarnation,
                    epoch,
                };
                self.route_rpc(t, call, reply_to);
            }
        }
    }

    /// Sends the recovery orders waiting for members that have joined now; answers those
    /// whose member did not in time (or is dead) with the reason.
    fn send_waiting_recoveries(&mut self) {
        if self.waiting_recoveries.is_empty() {
            return;
        }
        let now = Instant::now();
        let epoch = self.membership.view().epoch;
        let coordinating = self.membership.is_coordinator() && !self.membership.paused();
        for w in std::mem::take(&mut self.waiting_recoveries) {
            let alive = self
                .membership
                .view()
                .server(w.to.server)
                .is_some_and(|s| s.alive);
            if !coordinating {
                self.answer(w.reply_to, Err(RpcError::NotCoordinating));
            } else if self.membership.session_to(w.to.server).is_some() {
                let call = Call::Recover {
                    failed: w.failed,
                    incarnation: w.incarnation,
                    epoch,
                };
                self.route_rpc(w.to, call, w.reply_to);
            } else if !alive || now >= w.until {
                self.answer(w.reply_to, Err(RpcError::NotJoined(w.to.server)));
            } else {
                self.waiting_recoveries.push(w);
            }
        }
    }

    /// The replicas a runtime of `chain` replicates to: the chain's other live runtimes,
    /// other servers' first, each list rotated by the runtime's slot so that the runtimes
    /// of one server do not all start with the same replica.
    fn replica_candidates(&self, rt: EndpointAddr, chain: &str) -> Vec<EndpointAddr> {
        let all = self.membership.view().runtimes_of(Some(chain));
        let (mut other, mut here): (Vec<EndpointAddr>, Vec<EndpointAddr>) = all
            .into_iter()
            .filter(|r| *r != rt)
            .partition(|r| r.server != rt.server);
        if !other.is_empty() {
            let k = rt.slot as usize % other.len();
            other.rotate_left(k);
        }
        if !here.is_empty() {
            let k = rt.slot as usize % here.len();
            here.rotate_left(k);
        }
        other.extend(here);
        other
    }

    /// Time-driven work; returns how long until it is next due.
    fn tick(&mut self) -> Duration {
        let now = Instant::now();
        let mine = self.local_endpoints();
        self.membership.tick(now, mine);
        self.run_actions();
        if now.duration_since(self.last_stats_push) >= STATS_EVERY {
            self.last_stats_push = now;
            if let Some(c) = self.membership.coordinator_session() {
                self.push_stats(c);
            }
        }
        self.notify_local();
        // Calls nobody answered.
        let expired: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            if let Some(p) = self.pending.remove(&id) {
                self.answer(p.reply_to, Err(RpcError::TimedOut));
            }
        }
        Duration::from_millis(20).min(Duration::from_millis(self.cfg.cluster.heartbeat_ms))
    }

    /// Joins the coordinator at `addr` on a thread of its own (the handshake blocks); the
    /// outcome comes back as an event.
    fn start_join(&mut self, conn: ConnId, addr: SocketAddr, req: peer::JoinRequest) {
        let Some(auth) = self
            .auth
            .as_ref()
            .and_then(|a| a.read().ok().and_then(|k| k.first().cloned()))
        else {
            self.membership
                .join_failed(conn, "no cluster key".into(), Instant::now());
            return;
        };
        let events = self.events.clone();
        let spawned = std::thread::Builder::new()
            .name("cluster-join".into())
            .spawn(move || {
                let join_failed = |why, nobody_listening| {
                    let failed = Event::JoinFailed {
                        conn,
                        addr,
                        why,
                        nobody_listening,
                    };
                    let _ = events.send(failed);
                };
                match peer::join(addr, &auth, req) {
                    Ok((view, recover, writer, reader)) => {
                        let joined = Event::Joined {
                            conn,
                            view,
                            recover,
                            writer,
                        };
                        if events.send(joined).is_ok() {
                            peer::read_loop(conn, reader, events);
                        }
                    }
                    Err(peer::JoinError::Fenced(why)) => {
                        let _ = events.send(Event::Fenced { conn, why });
                    }
                    Err(e) => join_failed(e.to_string(), e.nobody_listening()),
                }
            });
        if let Err(e) = spawned {
            self.membership.join_failed(
                conn,
                format!("cannot start a thread: {e}"),
                Instant::now(),
            );
        }
    }

    /// Sends the current view to local processes that have not seen it (new ones, restarted
    /// ones, or after a change).
    fn notify_local(&mut self) {
        let version = self.membership.view().stamp();
        for s in 1..self.region.slot_count() {
            let Some(rec) = self.region.slot(s) else {
                continue;
            };
            if !matches!(rec.kind(), ProcessKind::Vswitch | ProcessKind::Runtime)
                || rec.state() != SlotState::Running
            {
                continue;
            }
            let gen = rec.generation.load(std::sync::atomic::Ordering::Relaxed);
            if self.notified.get(&s) == Some(&(gen, version)) {
                continue;
            }
            self.notified.insert(s, (gen, version));
            let call = Call::NotifyClusterCfg(self.membership.view().clone());
            self.route_rpc(EndpointAddr::new(self.me, s), call, ReplyTo::Nobody);
        }
        self.place_replicas();
    }

    /// Gives each local runtime of a replicated chain its replicas (`SetReplica`) when they
    /// change: a runtime of the chain came or went here or elsewhere, or it restarted.
    fn place_replicas(&mut self) {
        for s in 1..self.region.slot_count() {
            let Some(rec) = self.region.slot(s) else {
                continue;
            };
            if rec.kind() != ProcessKind::Runtime || rec.state() != SlotState::Running {
                continue;
            }
            let name = rec.name.get();
            let Some(chain) = self
                .cfg
                .runtime(&name)
                .and_then(|r| self.cfg.chain_of(r))
                .map(str::to_string)
            else {
                continue;
            };
            if !self.replicated(Some(&chain)) {
                continue;
            }
            let gen = rec.generation.load(std::sync::atomic::Ordering::Relaxed);
            let me = EndpointAddr::new(self.me, s);
            let list = self.replica_candidates(me, &chain);
            if self.replicas_sent.get(&s) == Some(&(gen, list.clone())) {
                continue;
            }
            self.replicas_sent.insert(s, (gen, list.clone()));
            let epoch = self.membership.view().epoch;
            self.route_rpc(
                me,
                Call::SetReplica {
                    replicas: list,
                    epoch,
                },
                ReplyTo::Nobody,
            );
        }
    }

    /// The coordinator writes its view down at every change, for its next life.
    fn write_journal(&mut self) {
        let (Some(file), Some(j)) = (&self.journal, self.membership.journal()) else {
            return;
        };
        if let Some(store) = &self.store {
            store.write(file.encode(&j));
            return;
        }
        match file.write(&j) {
            Ok(()) if self.journal_failed => {
                self.journal_failed = false;
                tracing::info!(journal = %file.path().display(), "the journal is written again");
            }
            Ok(()) => {}
            Err(e) if !self.journal_failed => {
                self.journal_failed = true;
                tracing::warn!(
                    journal = %file.path().display(),
                    "cannot write the coordinator's journal (a restart will learn the \
                     cluster again from its members): {e}"
                );
            }
            Err(_) => {}
        }
    }

    /// What etcd decided: this nfmgr elected (it carries on from the journal there),
    /// another elected (it follows), or this one's lease lapsed (it pauses).
    fn store_event(&mut self, e: StoreEvent) {
        let now = Instant::now();
        match e {
            StoreEvent::Elected { journal } => {
                let journal = journal.and_then(|bytes| {
                    let codec = self.journal.as_ref()?;
                    codec
                        .decode(&bytes)
                        .map_err(|e| {
                            tracing::warn!("elected coordinator without the last journal: {e}")
                        })
                        .ok()
                });
                let mine = self.local_endpoints();
                self.membership.elected(journal, mine, now);
            }
            StoreEvent::Coordinator { server, addr } if server != self.me => {
                self.membership.follow(addr, now);
            }
            StoreEvent::Coordinator { .. } => {}
            StoreEvent::Lapsed { why } => self.membership.pause(why),
        }
    }

    /// Says goodbye to the cluster. A coordinator that leaves on purpose ends its cluster
    /// (its journal goes: the next start is a new cluster), unless the cluster is on etcd:
    /// then it resigns, and etcd elects another at once.
    fn leave(&mut self) {
        if let Some(store) = &self.store {
            store.resign();
        }
        let journal = self.journal.take().filter(|_| self.store.is_none());
        self.membership.leave();
        self.run_actions();
        // Sessions the membership does not own yet (a join being answered).
        for (_, mut w) in self.conns.drain() {
            let _ = w.send(&PeerMsg::Leave);
            w.close();
        }
        if let Some(j) = journal {
            j.remove();
        }
    }

    /// Everything `nfmgr status` shows.
    pub fn status(&self) -> serde_json::Value {
        let now = Instant::now();
        let snap = nflib::snapshot::RegionSnapshot::read(&self.region);
        let role = match self.membership.role() {
            Role::Coordinator => serde_json::json!({ "role": "coordinator",
                "listen": self.cfg.cluster.listen,
                "paused": self.membership.paused(),
                "journal": self.journal.as_ref().map(|j| j.path().display().to_string()) }),
            Role::Member {
                coordinator,
                session,
                last_heard,
                last_error,
                ..
            } => serde_json::json!({
                "role": "member",
                "coordinator": coordinator.map(|a| a.to_string()),
                "connected": session.is_some(),
                "last_heard_ms": session.map(|_| now.duration_since(*last_heard).as_secs_f64() * 1000.0),
                "last_error": last_error,
            }),
            Role::Alone => serde_json::json!({ "role": "standalone" }),
        };
        let view = self.membership.view();
        let servers: Vec<serde_json::Value> = view
            .servers
            .iter()
            .map(|s| {
                let m = self.membership.members().get(&s.server);
                serde_json::json!({
                    "server": s.server,
                    "name": s.name,
                    "alive": s.alive,
                    "this": s.server == self.me,
                    "coordinator": s.server == view.coordinator,
                    "endpoints": s.endpoints.len(),
                    "addr": m.and_then(|m| m.addr).map(|a| a.to_string()),
                    "last_heard_ms": m.filter(|m| m.alive && s.server != self.me)
                        .map(|m| now.duration_since(m.last_heard).as_secs_f64() * 1000.0),
                    "joined_s": m.map(|m| self.secs(m.joined_at)),
                    "down": m.and_then(|m| m.down.clone()),
                })
            })
            .collect();
        serde_json::json!({
            "instance": self.cfg.instance,
            "server": self.me,
            "name": self.name,
            "uptime_s": self.started.elapsed().as_secs_f64(),
            "cluster": role,
            "view_version": view.version,
            "view_epoch": view.epoch,
            "coordinator": view.coordinator,
            "store": self.store.as_ref().map(|s| s.status()),
            "servers": servers,
            "events": self.log,
            "processes": snap.processes.iter().map(|p| serde_json::json!({
                "slot": p.slot, "name": p.name, "kind": p.kind, "state": p.state,
                "pid": p.pid, "restarts": p.restarts, "quick_deaths": p.quick_deaths,
                // The replicas its flows are copied to (`SetReplica`), for runtimes of a
                // replicated chain.
                "replicas": self.replicas_sent.get(&p.slot)
                    .map(|(_, list)| list.iter().map(|a| a.to_string()).collect::<Vec<_>>()),
            })).collect::<Vec<_>>(),
            "pool": snap.pool,
        })
    }

    /// Every vswitch and runtime of the cluster as this server knows it.
    pub fn endpoints(&self) -> Vec<EndpointInfo> {
        let view = self.membership.view();
        let mut v: Vec<EndpointInfo> = view
            .servers
            .iter()
            .flat_map(|s| {
                s.endpoints.iter().cloned().map(move |mut e| {
                    e.alive &= s.alive;
                    e
                })
            })
            .collect();
        if !view.servers.iter().any(|s| s.server == self.me) {
            v.extend(self.local_endpoints());
        }
        v.sort_by_key(|e| e.addr);
        v
    }

    pub fn view(&self) -> &ClusterView {
        self.membership.view()
    }

    pub fn server_id(&self) -> u16 {
        self.me
    }

    pub fn region(&self) -> &Region {
        &self.region
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Runs the control thread until `Shutdown`.
    pub fn run(mut self, rx: Receiver<Event>, listener: Option<TcpListener>) {
        if let (Some(l), Some(auth)) = (listener, self.auth.clone()) {
            let events = self.events.clone();
            let me = self.me;
            let first_conn = 1u64 << 32;
            // Members' sessions, and a few more for rejoins that overlap their old session.
            let sessions = usize::from(self.cfg.cluster.max_servers) + 4;
            let _ = std::thread::Builder::new()
                .name("cluster-accept".into())
                .spawn(move || accept_loop(l, auth, me, events, first_conn, sessions));
        }
        let mut next_tick = Instant::now();
        loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            match rx.recv_timeout(wait) {
                Ok(Event::Shutdown) => break,
                Ok(e) => self.on_event(e),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            if Instant::now() >= next_tick {
                next_tick = Instant::now() + self.tick();
            }
        }
        self.leave();
    }
}

/// Connections in their handshake at once: all that someone without the key gets of
/// this nfmgr (each handshake ends within `peer::HANDSHAKE_TIMEOUT`).
const MAX_HANDSHAKES: usize = 16;

/// Accepts cluster connections: at most `MAX_HANDSHAKES` unauthenticated ones and
/// `max_sessions` authenticated ones at a time (the others are closed at once), backing
/// off when accepting fails.
fn accept_loop(
    l: TcpListener,
    auth: SharedAuth,
    me: u16,
    events: Sender<Event>,
    first: ConnId,
    max_sessions: usize,
) {
    let handshakes = Limit::new(MAX_HANDSHAKES);
    let sessions = Limit::new(max_sessions);
    let mut backoff = AcceptBackoff::default();
    let mut refused = 0u64;
    let mut next = first;
    loop {
        let stream = match l.accept() {
            Ok((s, _)) => {
                backoff.ok();
                s
            }
            Err(e) => {
                backoff.failed("cluster port", &e);
                continue;
            }
        };
        let Some(place) = handshakes.try_take() else {
            refused += 1;
            if refused.is_power_of_two() {
                tracing::warn!(
                    refused,
                    "cluster port: {MAX_HANDSHAKES} handshakes under way; closing new connections"
                );
            }
            continue;
        };
        let conn = next;
        next += 1;
        let (auth, tx, sessions) = (auth.clone(), events.clone(), sessions.clone());
        let _ = std::thread::Builder::new()
            .name("cluster-peer".into())
            .spawn(move || {
                let keys = auth.read().map(|k| k.clone()).unwrap_or_default();
                let joined = peer::accept(stream, &keys, me);
                drop(place);
                match joined {
                    Ok((info, writer, reader)) => {
                        let Some(_session) = sessions.try_take() else {
                            tracing::warn!(
                                server = info.server,
                                "cluster port: too many sessions; closing this one"
                            );
                            return;
                        };
                        if tx.send(Event::PeerJoin { conn, info, writer }).is_ok() {
                            peer::read_loop(conn, reader, tx);
                        }
                    }
                    Err(why) => tracing::warn!("refused a connection: {why}"),
                }
            });
        if events.send(Event::Ask(Box::new(|_| {}))).is_err() {
            return;
        }
    }
}

//! nfmgr's control thread: the cluster (coordinator or member), control calls to liaisons,
//! the control socket and the metrics endpoint.
//!
//! One thread owns all control state and reacts to [`Event`]s, so nothing here needs a lock:
//! - the relay (data-plane thread) hands over messages for nfmgr's control endpoint;
//! - reader threads hand over frames from other managers (one per TCP session);
//! - socket and metrics handler threads ask questions ([`Handle::ask`]) and wait for
//!   answers, including control calls that take a round trip ([`Handle::rpc`]).
//!
//! The coordinator keeps the member table and the cluster view; every change bumps the
//! view's version and is pushed to the members, which pass it to their vswitches and
//! runtimes (`NotifyClusterCfg`). Members and coordinator exchange heartbeats; a member
//! whose connection closes (its nfmgr died) is dead at once, one that falls silent after
//! `member_timeout_ms`.

pub mod metrics;
pub mod peer;
pub mod socket;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::{SocketAddr, TcpListener};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use nflib::cluster::{ClusterView, EndpointInfo, ServerInfo};
use nflib::config::Config;
use nflib::doorbell::Doorbells;
use nflib::frame::{EndpointAddr, LIAISON};
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
use serde::Serialize;

use crate::linkwatch::LinkChange;
use crate::relay::{RelayCommand, RelayEvent};
use crate::supervisor::{ProcEvent, ProcEventKind};
use peer::{AuthKey, ConnId, JoinInfo, PeerMsg, PeerWriter};

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
        writer: PeerWriter,
    },
    /// Member: joining failed.
    JoinFailed {
        why: String,
    },
    /// Member: the coordinator had declared this server dead; fence, then join again.
    Fenced {
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
    ) -> Result<T, String> {
        let (tx, rx) = mpsc::channel();
        self.tx
            .send(Event::Ask(Box::new(move |c| {
                let _ = tx.send(f(c));
            })))
            .map_err(|_| "nfmgr is shutting down".to_string())?;
        rx.recv_timeout(Duration::from_secs(5))
            .map_err(|_| "nfmgr's control thread did not answer".to_string())
    }

    /// Makes a control call to the liaison of `to` and waits for the answer.
    pub fn rpc(&self, to: EndpointAddr, call: Call) -> Result<Reply, String> {
        self.rpc_start(to, call)?
            .recv_timeout(RPC_TIMEOUT + Duration::from_millis(500))
            .map_err(|_| format!("{to}: no answer"))?
    }

    /// Starts a control call; the answer arrives on the returned channel.
    pub fn rpc_start(
        &self,
        to: EndpointAddr,
        call: Call,
    ) -> Result<Receiver<Result<Reply, String>>, String> {
        self.ask(move |c| c.start_rpc(to, call))
    }
}

enum ReplyTo {
    /// A handler thread of this nfmgr waits.
    Local(Sender<Result<Reply, String>>),
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

/// Why and when a member was declared dead.
#[derive(Clone, Debug, Serialize)]
pub struct Down {
    /// Seconds since this nfmgr started.
    pub at_s: f64,
    pub why: String,
    /// Time since the member was last heard from, at the moment it was declared dead.
    pub silent_ms: f64,
}

struct Member {
    name: String,
    incarnation: u64,
    addr: Option<SocketAddr>,
    endpoints: Vec<EndpointInfo>,
    alive: bool,
    conn: Option<ConnId>,
    last_heard: Instant,
    joined_at: Instant,
    down: Option<Down>,
}

enum Role {
    Coordinator,
    Member {
        addr: SocketAddr,
        conn: Option<ConnId>,
        last_heard: Instant,
        joining: bool,
        next_try: Instant,
        last_error: Option<String>,
        sent_endpoints: Vec<EndpointInfo>,
    },
    Alone,
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
    incarnation: u64,
    /// The keys managers authenticate each other with: the first signs a join, any
    /// verifies one (during a key rotation). Shared with the accept loop.
    auth: Option<SharedAuth>,
    role: Role,
    /// Fencing (a member the coordinator had declared dead): local slots killed and not
    /// dead yet, and how long joining waits for them at most.
    fence_pending: BTreeSet<u16>,
    fence_until: Option<Instant>,
    /// The supervisor's pidfds of the running processes: what `kill_local` signals.
    pidfds: crate::supervisor::Pidfds,
    members: BTreeMap<u16, Member>,
    view: ClusterView,
    conns: HashMap<ConnId, PeerWriter>,
    next_conn: ConnId,
    pending: HashMap<u64, Pending>,
    next_rpc: u64,
    /// Per local slot: (process generation, view version) last sent to it.
    notified: HashMap<u16, (u32, u64)>,
    /// Per local runtime slot: the generation and replica list last sent (`SetReplica`).
    replicas_sent: HashMap<u16, (u32, Vec<EndpointAddr>)>,
    last_heartbeat: Instant,
    chains: Vec<(String, [u8; 32])>,
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
    ) -> Control {
        let me = cfg.cluster.server_id;
        let role = match &cfg.cluster.coordinator {
            Some(a) => Role::Member {
                addr: a.parse().expect("validated address"),
                conn: None,
                last_heard: Instant::now(),
                joining: false,
                next_try: Instant::now(),
                last_error: None,
                sent_endpoints: Vec::new(),
            },
            None if cfg.cluster.listen.is_some() => Role::Coordinator,
            None => Role::Alone,
        };
        let now = Instant::now();
        let mut c = Control {
            name: cfg.server_name(),
            chains: chain_digests(&cfg),
            cfg,
            region,
            bells,
            relay,
            events,
            started: now,
            me,
            incarnation,
            auth: keys.map(|k| Arc::new(RwLock::new(k.auth_keys()))),
            role,
            members: BTreeMap::new(),
            view: ClusterView::default(),
            conns: HashMap::new(),
            next_conn: 1,
            pending: HashMap::new(),
            next_rpc: 1,
            notified: HashMap::new(),
            replicas_sent: HashMap::new(),
            last_heartbeat: now,
            log: Vec::new(),
            top_events: VecDeque::new(),
            migrations: VecDeque::new(),
            next_migration: 1,
            recoveries: VecDeque::new(),
            member_stats: BTreeMap::new(),
            last_stats_push: now,
            stop_requested: false,
            fence_pending: BTreeSet::new(),
            fence_until: None,
            pidfds: Default::default(),
        };
        // This server is a member of its own cluster (of one, when alone).
        let endpoints = c.local_endpoints();
        c.members.insert(
            me,
            Member {
                name: c.name.clone(),
                incarnation,
                addr: None,
                endpoints,
                alive: true,
                conn: None,
                last_heard: now,
                joined_at: now,
                down: None,
            },
        );
        c.rebuild_view();
        c
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
        match e.kind {
            ProcEventKind::Died => {
                // A local runtime's death is recovered from here at once, with no round
                // trip to a remote coordinator.
                // A fenced process's flows were taken over while this server was cut off:
                // there is nothing to recover.
                let fenced = self.fence_pending.remove(&e.slot);
                if let Some(rc) = self.cfg.runtime(&e.process).filter(|_| !fenced) {
                    let chain = self.cfg.chain_of(rc).map(str::to_string);
                    let failed = EndpointAddr::new(self.me, e.slot);
                    self.start_recovery(failed, chain.as_deref(), u64::from(e.generation));
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
        let role = match &self.role {
            Role::Coordinator => "coordinator",
            Role::Member { .. } => "member",
            Role::Alone => "standalone",
        };
        let mut events: Vec<TopEvent> = self.top_events.iter().cloned().collect();
        let mut migrations: Vec<MigrationRecord> = self.migrations.iter().cloned().collect();
        let mut recoveries: Vec<RecoveryRecord> = self.recoveries.iter().cloned().collect();
        let mut servers = Vec::new();
        for s in &self.view.servers {
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
                coordinator: s.server == self.view.coordinator,
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
                    coordinator: matches!(self.role, Role::Coordinator | Role::Alone),
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
            view_version: self.view.version,
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
    pub fn kill_local(&mut self, slot: u16, by: &str) -> Result<String, String> {
        let rec = self
            .region
            .slot(slot)
            .filter(|_| slot != MANAGER_SLOT)
            .ok_or_else(|| format!("server {} has no process in slot {slot}", self.me))?;
        if !matches!(rec.kind(), ProcessKind::Vswitch | ProcessKind::Runtime) {
            return Err(format!("slot {slot} holds no vswitch or runtime"));
        }
        let name = rec.name.get();
        let pid = rec.pid.load(std::sync::atomic::Ordering::Relaxed);
        if rec.state() != SlotState::Running || pid == 0 {
            return Err(format!("{name} is not running (it is {:?})", rec.state()));
        }
        // Signalled through the supervisor's pidfd for the slot, never by the pid word in
        // shared memory, which every attached process can write (as `kill(2)`'s argument,
        // 0 or a value past i32::MAX would signal a process group or every process).
        let fd = self
            .pidfds
            .lock()
            .ok()
            .and_then(|m| m.get(&slot).cloned())
            .ok_or_else(|| format!("{name} is not a running process of this nfmgr"))?;
        crate::sys::pidfd_signal(&fd, libc::SIGKILL);
        self.top_event(&name, format!("killed with SIGKILL by {by} (pid {pid})"));
        Ok(format!("{name} (pid {pid}) killed"))
    }

    /// The vswitches and runtimes of this server, from the region.
    fn local_endpoints(&self) -> Vec<EndpointInfo> {
        let mut v = Vec::new();
        for s in 1..self.region.slot_count() {
            let Some(rec) = self.region.slot(s) else {
                continue;
            };
            let kind = rec.kind();
            if !matches!(kind, ProcessKind::Vswitch | ProcessKind::Runtime) {
                continue;
            }
            let name = rec.name.get();
            let chain = self
                .cfg
                .runtime(&name)
                .and_then(|r| self.cfg.chain_of(r))
                .map(str::to_string);
            v.push(EndpointInfo {
                addr: EndpointAddr::new(self.me, s),
                kind,
                name,
                chain,
                alive: rec.state() == SlotState::Running,
            });
        }
        v
    }

    fn send_relay(&self, cmd: RelayCommand) {
        let _ = self.relay.send(cmd);
        self.bells.ring(MANAGER_SLOT);
    }

    /// Coordinator (or alone): the view from the member table, with a new version.
    fn rebuild_view(&mut self) {
        self.view = ClusterView {
            version: self.view.version + 1,
            coordinator: self.me,
            servers: self
                .members
                .iter()
                .map(|(id, m)| ServerInfo {
                    server: *id,
                    name: m.name.clone(),
                    incarnation: m.incarnation,
                    alive: m.alive,
                    endpoints: m.endpoints.clone(),
                })
                .collect(),
        };
        self.view_changed();
    }

    /// A new view: tell the relay who the members are, the members (coordinator), and the
    /// local processes (next tick).
    fn view_changed(&mut self) {
        let alive: Vec<u16> = self
            .view
            .servers
            .iter()
            .filter(|s| s.alive)
            .map(|s| s.server)
            .collect();
        self.send_relay(RelayCommand::Members(alive));
        if matches!(self.role, Role::Coordinator) {
            let msg = PeerMsg::View(self.view.clone());
            let conns: Vec<ConnId> = self.members.values().filter_map(|m| m.conn).collect();
            for c in conns {
                self.send_peer(c, &msg);
            }
        }
    }

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
    pub fn set_keys(&mut self, keys: &ClusterKeys) -> Result<(), String> {
        let Some(auth) = &self.auth else {
            return Err(
                "this nfmgr runs without a cluster key (no cluster.key_file): nothing to rotate"
                    .into(),
            );
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
    pub fn start_rpc(&mut self, to: EndpointAddr, call: Call) -> Receiver<Result<Reply, String>> {
        let (tx, rx) = mpsc::channel();
        self.route_rpc(to, call, ReplyTo::Local(tx));
        rx
    }

    fn route_rpc(&mut self, to: EndpointAddr, call: Call, reply_to: ReplyTo) {
        let id = self.next_rpc;
        self.next_rpc += 1;
        let fail = |reply_to: ReplyTo, this: &mut Control, why: String| {
            this.answer(reply_to, Err(why));
        };
        if to.server == self.me {
            if to.slot == MANAGER_SLOT {
                return fail(reply_to, self, "nfmgr itself takes no control calls".into());
            }
            if let Call::Kill { by } = &call {
                // A drill: this nfmgr kills the process; the call never reaches it.
                let result = self
                    .kill_local(to.slot, by)
                    .map(|_| Reply::Accepted)
                    .or_else(|reason| Ok(Reply::Refused { reason }));
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
        let conn = match &self.role {
            Role::Coordinator => self.members.get(&to.server).and_then(|m| m.conn),
            Role::Member { conn, .. } => *conn,
            Role::Alone => None,
        };
        let Some(conn) = conn else {
            return fail(
                reply_to,
                self,
                format!("server {} is not reachable from here", to.server),
            );
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

    fn answer(&mut self, reply_to: ReplyTo, result: Result<Reply, String>) {
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
            Event::PeerJoin { conn, info, writer } => self.member_joins(conn, info, writer),
            Event::Joined { conn, view, writer } => {
                self.conns.insert(conn, writer);
                let addr = match &mut self.role {
                    Role::Member {
                        conn: c,
                        last_heard,
                        joining,
                        last_error,
                        sent_endpoints,
                        addr,
                        ..
                    } => {
                        *c = Some(conn);
                        *last_heard = Instant::now();
                        *joining = false;
                        *last_error = None;
                        sent_endpoints.clear();
                        *addr
                    }
                    _ => return,
                };
                self.note(format!("joined the cluster of coordinator {addr}"));
                self.take_view(view);
            }
            Event::Fenced { why } => self.fence(why),
            Event::JoinFailed { why } => {
                if let Role::Member {
                    joining,
                    next_try,
                    last_error,
                    ..
                } = &mut self.role
                {
                    *joining = false;
                    *next_try = Instant::now() + REJOIN_EVERY;
                    if last_error.as_deref() != Some(why.as_str()) {
                        tracing::warn!("cannot join the cluster: {why}");
                        *last_error = Some(why);
                    }
                }
            }
            Event::PeerMsg { conn, msg } => self.peer_msg(conn, msg),
            Event::PeerDown { conn, why } => self.peer_down(conn, why),
            Event::Shutdown => {}
        }
    }

    /// Member: a view from the coordinator.
    fn take_view(&mut self, view: ClusterView) {
        if view.version < self.view.version && view.coordinator == self.view.coordinator {
            return;
        }
        self.view = view;
        self.view_changed();
    }

    fn member_joins(&mut self, conn: ConnId, info: JoinInfo, mut writer: PeerWriter) {
        let reject = |w: &mut PeerWriter, reason: String| {
            tracing::warn!("refused a member: {reason}");
            let _ = w.send(&PeerMsg::Reject { reason });
            w.close();
        };
        if info.server == self.me {
            return reject(
                &mut writer,
                format!("server id {} is the coordinator's", info.server),
            );
        }
        if let Some(m) = self.members.get(&info.server) {
            let same_host = m.addr.map(|a| a.ip()) == Some(info.addr.ip());
            if m.alive && m.incarnation != info.incarnation && !same_host {
                return reject(
                    &mut writer,
                    format!(
                        "server id {} is already a member ({})",
                        info.server,
                        m.addr.map(|a| a.to_string()).unwrap_or_default()
                    ),
                );
            }
        }
        for (name, digest) in &info.chains {
            if let Some((_, mine)) = self.chains.iter().find(|(n, _)| n == name) {
                if mine != digest {
                    return reject(
                        &mut writer,
                        format!("chain `{name}` is defined differently on the coordinator"),
                    );
                }
            }
        }
        // The same life of a server this coordinator declared dead (cut off, not
        // stopped): its runtimes' flows were recovered elsewhere, and its old primaries
        // must not come back as second owners. It restarts its processes empty and joins
        // again as a new incarnation.
        if let Some(m) = self.members.get(&info.server) {
            let replicated = m
                .endpoints
                .iter()
                .any(|e| e.kind == ProcessKind::Runtime && self.replicated(e.chain.as_deref()));
            if !m.alive && m.incarnation == info.incarnation && replicated {
                let why = m.down.as_ref().map_or("", |d| d.why.as_str());
                let reason = format!(
                    "server {} was declared dead ({why}) and its flows were taken over \
                     elsewhere",
                    info.server
                );
                self.note(format!(
                    "fenced server {} on its return: {reason}",
                    info.server
                ));
                let _ = writer.send(&PeerMsg::Fence { reason });
                writer.close();
                return;
            }
        }
        // A restarted member replaces its previous incarnation.
        if let Some(old) = self.members.get(&info.server).and_then(|m| m.conn) {
            if let Some(w) = self.conns.remove(&old) {
                w.close();
            }
        }
        let now = Instant::now();
        self.members.insert(
            info.server,
            Member {
                name: info.name.clone(),
                incarnation: info.incarnation,
                addr: Some(info.addr),
                endpoints: info.endpoints,
                alive: true,
                // Set once it is welcomed: the new view goes to the others first.
                conn: None,
                last_heard: now,
                joined_at: now,
                down: None,
            },
        );
        self.conns.insert(conn, writer);
        self.note(format!(
            "server {} ({}) joined from {}",
            info.server, info.name, info.addr
        ));
        self.rebuild_view();
        let welcome = PeerMsg::Welcome {
            view: self.view.clone(),
        };
        if let Some(m) = self.members.get_mut(&info.server) {
            m.conn = Some(conn);
        }
        self.send_peer(conn, &welcome);
    }

    fn peer_msg(&mut self, conn: ConnId, msg: PeerMsg) {
        let now = Instant::now();
        // Whoever is on this connection is alive.
        match &mut self.role {
            Role::Member {
                conn: Some(c),
                last_heard,
                ..
            } if *c == conn => *last_heard = now,
            _ => {
                if let Some(m) = self.members.values_mut().find(|m| m.conn == Some(conn)) {
                    m.last_heard = now;
                }
            }
        }
        match msg {
            PeerMsg::Heartbeat { endpoints } => {
                if let Some(eps) = endpoints {
                    let changed = match self.members.values_mut().find(|m| m.conn == Some(conn)) {
                        Some(m) if m.endpoints != eps => {
                            m.endpoints = eps;
                            true
                        }
                        _ => false,
                    };
                    if changed && matches!(self.role, Role::Coordinator) {
                        self.rebuild_view();
                    }
                }
            }
            PeerMsg::View(view) => {
                if matches!(self.role, Role::Member { .. }) {
                    self.take_view(view);
                }
            }
            PeerMsg::Rpc { id, target, call } => {
                let reply_to = ReplyTo::Peer { conn, id };
                if target.server == self.me || matches!(self.role, Role::Coordinator) {
                    self.route_rpc(target, call, reply_to);
                } else {
                    self.answer(reply_to, Err(format!("{target} is not on this server")));
                }
            }
            PeerMsg::RpcReply { id, result } => {
                if let Some(p) = self.pending.remove(&id) {
                    self.answer(p.reply_to, result);
                }
            }
            PeerMsg::Leave => self.peer_down(conn, "left the cluster".into()),
            PeerMsg::Stats { json } => {
                let from = self
                    .members
                    .iter()
                    .find(|(_, m)| m.conn == Some(conn))
                    .map(|(s, _)| *s);
                match (from, serde_json::from_slice::<MemberStats>(&json)) {
                    (Some(server), Ok(m)) if matches!(self.role, Role::Coordinator) => {
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

    fn peer_down(&mut self, conn: ConnId, why: String) {
        let Some(w) = self.conns.remove(&conn) else {
            return;
        };
        w.close();
        let now = Instant::now();
        let coordinator_lost = match &mut self.role {
            Role::Member {
                conn: c @ Some(_),
                next_try,
                ..
            } if *c == Some(conn) => {
                *c = None;
                *next_try = now + REJOIN_EVERY;
                true
            }
            _ => false,
        };
        if coordinator_lost {
            let coord = self.view.coordinator;
            self.note(format!("lost the coordinator ({why}); rejoining"));
            // Its runtimes are gone with it: stop dispatching to them.
            for s in &mut self.view.servers {
                if s.server == coord {
                    s.alive = false;
                }
            }
            self.view_changed();
            self.notified.clear();
            return;
        }
        let at_s = self.secs(now);
        let started = self.started;
        let Some((id, m)) = self.members.iter_mut().find(|(_, m)| m.conn == Some(conn)) else {
            return;
        };
        let id = *id;
        let silent_ms = now.duration_since(m.last_heard).as_secs_f64() * 1000.0;
        m.conn = None;
        m.alive = false;
        m.down = Some(Down {
            at_s,
            why: why.clone(),
            silent_ms,
        });
        let _ = started;
        let name = m.name.clone();
        let lost: Vec<EndpointInfo> = m
            .endpoints
            .iter()
            .filter(|e| e.kind == ProcessKind::Runtime)
            .cloned()
            .collect();
        self.note(format!("server {id} ({name}) is down: {why}"));
        self.rebuild_view();
        // Its runtimes' flows live on where they were replicated: every life of them.
        for e in lost {
            self.start_recovery(e.addr, e.chain.as_deref(), u64::MAX);
        }
    }

    /// Member: the coordinator declared this server dead while it lived on (a partition)
    /// and took its runtimes' flows over. Every vswitch and runtime here is killed and
    /// restarted empty (their flows are not recovered: they live elsewhere now), and this
    /// nfmgr joins again as a new incarnation once they are dead.
    fn fence(&mut self, why: String) {
        let now = Instant::now();
        self.note(format!(
            "fenced by the coordinator ({why}): restarting this server's vswitches and \
             runtimes empty, then joining again"
        ));
        for s in 1..self.region.slot_count() {
            let running = self.region.slot(s).is_some_and(|r| {
                matches!(r.kind(), ProcessKind::Vswitch | ProcessKind::Runtime)
                    && r.state() == SlotState::Running
            });
            if running && self.kill_local(s, "the fence").is_ok() {
                self.fence_pending.insert(s);
            }
        }
        self.fence_until = Some(now + FENCE_WAIT);
        self.incarnation = nflib::time::wall_ns().max(self.incarnation.saturating_add(1));
        if let Role::Member {
            joining, next_try, ..
        } = &mut self.role
        {
            *joining = false;
            *next_try = now;
        }
    }

    /// The cluster link stopped (or started again) carrying a server's frames. The
    /// coordinator treats a member not heard for the watch's window as dead, as it would a
    /// closed connection or a silent heartbeat: it leaves the view and its flows are
    /// recovered where they were replicated. Members only note it: deciding is the
    /// coordinator's.
    fn link_changed(&mut self, change: LinkChange) {
        match change {
            LinkChange::Down { server, silent_ns } => {
                let ms = silent_ns as f64 / 1e6;
                let conn = self
                    .members
                    .get(&server)
                    .filter(|m| m.alive)
                    .and_then(|m| m.conn);
                match (&self.role, conn) {
                    (Role::Coordinator, Some(conn)) => self.peer_down(
                        conn,
                        format!("not heard on the cluster link for {ms:.0} ms"),
                    ),
                    _ => self.note(format!(
                        "server {server} not heard on the cluster link for {ms:.0} ms"
                    )),
                }
            }
            LinkChange::Up { server } => {
                self.note(format!("server {server} heard on the cluster link again"));
            }
        }
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
    fn start_recovery(&mut self, failed: EndpointAddr, chain: Option<&str>, incarnation: u64) {
        if !self.replicated(chain) {
            return;
        }
        let targets: Vec<EndpointAddr> = self
            .view
            .runtimes_of(chain)
            .into_iter()
            .filter(|r| *r != failed)
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
        for t in targets {
            self.route_rpc(
                t,
                Call::Recover {
                    failed,
                    incarnation,
                },
                ReplyTo::Recovery {
                    failed,
                    by: t,
                    asked,
                },
            );
        }
    }

    /// The replicas a runtime of `chain` replicates to: the chain's other live runtimes,
    /// other servers' first, each list rotated by the runtime's slot so that the runtimes
    /// of one server do not all start with the same replica.
    fn replica_candidates(&self, rt: EndpointAddr, chain: &str) -> Vec<EndpointAddr> {
        let all = self.view.runtimes_of(Some(chain));
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
        let hb = Duration::from_millis(self.cfg.cluster.heartbeat_ms);
        let timeout = Duration::from_millis(self.cfg.cluster.member_timeout_ms);
        // This server's own processes.
        let mine = self.local_endpoints();
        match &self.role {
            Role::Coordinator | Role::Alone => {
                let changed = self
                    .members
                    .get(&self.me)
                    .is_some_and(|m| m.endpoints != mine);
                if changed {
                    if let Some(m) = self.members.get_mut(&self.me) {
                        m.endpoints = mine.clone();
                    }
                    self.rebuild_view();
                }
            }
            Role::Member { .. } => {}
        }
        // Heartbeats and silence.
        if now.duration_since(self.last_heartbeat) >= hb {
            self.last_heartbeat = now;
            match &mut self.role {
                Role::Coordinator => {
                    let conns: Vec<ConnId> = self.members.values().filter_map(|m| m.conn).collect();
                    for c in conns {
                        self.send_peer(c, &PeerMsg::Heartbeat { endpoints: None });
                    }
                }
                Role::Member {
                    conn: Some(c),
                    sent_endpoints,
                    ..
                } => {
                    let c = *c;
                    let endpoints = (*sent_endpoints != mine).then(|| {
                        *sent_endpoints = mine.clone();
                        mine.clone()
                    });
                    self.send_peer(c, &PeerMsg::Heartbeat { endpoints });
                }
                _ => {}
            }
        }
        if now.duration_since(self.last_stats_push) >= STATS_EVERY {
            self.last_stats_push = now;
            if let Role::Member { conn: Some(c), .. } = &self.role {
                let c = *c;
                self.push_stats(c);
            }
        }
        match &self.role {
            Role::Coordinator => {
                let silent: Vec<ConnId> = self
                    .members
                    .values()
                    .filter(|m| m.alive && m.conn.is_some())
                    .filter(|m| now.duration_since(m.last_heard) > timeout)
                    .filter_map(|m| m.conn)
                    .collect();
                for c in silent {
                    self.peer_down(
                        c,
                        format!("no heartbeat for {} ms", self.cfg.cluster.member_timeout_ms),
                    );
                }
            }
            Role::Member {
                conn: Some(c),
                last_heard,
                ..
            } if now.duration_since(*last_heard) > timeout => {
                let c = *c;
                self.peer_down(
                    c,
                    format!("no heartbeat for {} ms", self.cfg.cluster.member_timeout_ms),
                );
            }
            _ => {}
        }
        self.maybe_join(now, mine);
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
                self.answer(p.reply_to, Err("timed out".into()));
            }
        }
        Duration::from_millis(20).min(hb)
    }

    fn maybe_join(&mut self, now: Instant, endpoints: Vec<EndpointInfo>) {
        let Role::Member {
            addr,
            conn: None,
            joining,
            next_try,
            ..
        } = &mut self.role
        else {
            return;
        };
        if *joining || now < *next_try {
            return;
        }
        // Fencing: join again only once the old lives are dead.
        if !self.fence_pending.is_empty() && self.fence_until.is_some_and(|t| now < t) {
            return;
        }
        let Some(auth) = self
            .auth
            .as_ref()
            .and_then(|a| a.read().ok().and_then(|k| k.first().cloned()))
        else {
            return;
        };
        *joining = true;
        let addr = *addr;
        let conn = self.next_conn;
        self.next_conn += 1;
        let events = self.events.clone();
        let req = peer::JoinRequest {
            server: self.me,
            name: self.name.clone(),
            incarnation: self.incarnation,
            endpoints,
            chains: self.chains.clone(),
        };
        let spawned = std::thread::Builder::new()
            .name("cluster-join".into())
            .spawn(move || match peer::join(addr, &auth, req) {
                Ok((view, writer, reader)) => {
                    if events.send(Event::Joined { conn, view, writer }).is_ok() {
                        peer::read_loop(conn, reader, events);
                    }
                }
                Err(peer::JoinError::Fenced(why)) => {
                    let _ = events.send(Event::Fenced { why });
                }
                Err(peer::JoinError::Failed(why)) => {
                    let _ = events.send(Event::JoinFailed { why });
                }
            });
        if spawned.is_err() {
            if let Role::Member { joining, .. } = &mut self.role {
                *joining = false;
            }
        }
    }

    /// Sends the current view to local processes that have not seen it (new ones, restarted
    /// ones, or after a change).
    fn notify_local(&mut self) {
        let version = self.view.version;
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
            let call = Call::NotifyClusterCfg(self.view.clone());
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
            self.route_rpc(me, Call::SetReplica { replicas: list }, ReplyTo::Nobody);
        }
    }

    /// Says goodbye to the cluster.
    fn leave(&mut self) {
        let conns: Vec<ConnId> = self.conns.keys().copied().collect();
        for c in conns {
            if let Some(w) = self.conns.get_mut(&c) {
                let _ = w.send(&PeerMsg::Leave);
                w.close();
            }
        }
    }

    /// Everything `nfmgr status` shows.
    pub fn status(&self) -> serde_json::Value {
        let now = Instant::now();
        let snap = nflib::snapshot::RegionSnapshot::read(&self.region);
        let role = match &self.role {
            Role::Coordinator => serde_json::json!({ "role": "coordinator",
                "listen": self.cfg.cluster.listen }),
            Role::Member {
                addr,
                conn,
                last_heard,
                last_error,
                ..
            } => serde_json::json!({
                "role": "member",
                "coordinator": addr.to_string(),
                "connected": conn.is_some(),
                "last_heard_ms": conn.map(|_| now.duration_since(*last_heard).as_secs_f64() * 1000.0),
                "last_error": last_error,
            }),
            Role::Alone => serde_json::json!({ "role": "standalone" }),
        };
        let servers: Vec<serde_json::Value> = self
            .view
            .servers
            .iter()
            .map(|s| {
                let m = self.members.get(&s.server);
                serde_json::json!({
                    "server": s.server,
                    "name": s.name,
                    "alive": s.alive,
                    "this": s.server == self.me,
                    "coordinator": s.server == self.view.coordinator,
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
            "view_version": self.view.version,
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
        let mut v: Vec<EndpointInfo> = self
            .view
            .servers
            .iter()
            .flat_map(|s| {
                s.endpoints.iter().cloned().map(move |mut e| {
                    e.alive &= s.alive;
                    e
                })
            })
            .collect();
        if !self.view.servers.iter().any(|s| s.server == self.me) {
            v.extend(self.local_endpoints());
        }
        v.sort_by_key(|e| e.addr);
        v
    }

    pub fn view(&self) -> &ClusterView {
        &self.view
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

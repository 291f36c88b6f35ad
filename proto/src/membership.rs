//! Cluster membership as a state machine: who is in the cluster, who is alive, the view
//! every server dispatches by, and when a server is declared dead.
//!
//! One [`Membership`] per nfmgr, in one of three roles: the *coordinator* keeps the member
//! table, admits joins, watches heartbeats and publishes the view (every change bumps its
//! version); a *member* joins the coordinator, heartbeats it and takes its views; a server
//! *alone* is a cluster of one. It reads no clock and owns no socket: every call takes the
//! time, sessions are numbers, and what must happen (frames to send, sessions to close, a
//! view to hand to the data plane, flows to recover, a join to start, a fence) comes out as
//! [`Action`]s that nfmgr's control thread carries out, so that the tests below step whole
//! clusters in memory.
//!
//! A member is dead when its session closes (its nfmgr died or left), when it falls silent
//! for `member_timeout`, or when the data plane's link watch stops hearing it: the view
//! marks it so and its runtimes' flows are recovered where they were replicated. A member
//! the coordinator declared dead that comes back in the same life (cut off, not stopped) is
//! fenced: its flows live elsewhere now, so it restarts its processes empty and joins
//! again as a new incarnation.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::cluster::{ClusterView, EndpointInfo, ProcessKind, ServerInfo};
use crate::frame::EndpointAddr;
use crate::peer_frame::{JoinRequest, PeerMsg};

/// An authenticated session with another nfmgr, as the control thread numbers them.
pub type SessionId = u64;

/// What a member said about itself when it joined (its join, verified).
#[derive(Clone, Debug)]
pub struct JoinInfo {
    pub server: u16,
    pub name: String,
    pub incarnation: u64,
    pub endpoints: Vec<EndpointInfo>,
    pub chains: Vec<(String, [u8; 32])>,
    pub addr: SocketAddr,
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

/// What a coordinator writes down at every change of its view, so that its next life
/// carries on from it ([`Membership::restore`]): the view (members, their lives, endpoints
/// and version) and where each member joined from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Journal {
    pub view: ClusterView,
    pub addrs: Vec<(u16, SocketAddr)>,
}

/// Why a journal is not carried on from ([`Membership::restore`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RestoreError {
    #[error("only a coordinator keeps a journal")]
    NotCoordinator,
    /// The journal is of another server's coordinator.
    #[error("it is the journal of server {journal}'s coordinator, this is server {me}")]
    OtherServer { journal: u16, me: u16 },
    #[error("the membership has started already")]
    Started,
}

/// A server as the coordinator knows it (and this server itself, in every role).
#[derive(Clone, Debug)]
pub struct Member {
    pub name: String,
    pub incarnation: u64,
    pub addr: Option<SocketAddr>,
    pub endpoints: Vec<EndpointInfo>,
    pub alive: bool,
    pub session: Option<SessionId>,
    pub last_heard: Instant,
    pub joined_at: Instant,
    pub down: Option<Down>,
}

#[derive(Clone, Debug)]
pub enum Role {
    Coordinator,
    Member {
        /// None: not known yet (etcd has elected no coordinator this member knows of).
        coordinator: Option<SocketAddr>,
        session: Option<SessionId>,
        last_heard: Instant,
        /// The session of the join under way: its outcome counts only while this is it (a
        /// join to a coordinator since replaced ends without effect).
        joining: Option<SessionId>,
        next_try: Instant,
        last_error: Option<String>,
        /// The endpoints the coordinator was last told of.
        sent_endpoints: Vec<EndpointInfo>,
    },
    Alone,
}

#[derive(Clone, Debug)]
pub struct Settings {
    pub heartbeat: Duration,
    /// Silence after which a server is dead.
    pub member_timeout: Duration,
    /// How often a member tries to join again.
    pub rejoin_every: Duration,
    /// How long a fenced member waits for its killed processes to die before joining anyway.
    pub fence_wait: Duration,
    /// A coordinator restarted from its journal: how long a member that was alive has to
    /// join again before it is declared dead (its flows recovered).
    pub restore_grace: Duration,
    /// Chains whose flows are replicated (a dead server's are recovered, and it is fenced
    /// if it comes back in the same life).
    pub replicated: BTreeSet<String>,
    /// Digest of each chain's definition: servers must agree on the chains they share.
    pub chains: Vec<(String, [u8; 32])>,
    /// Whether this server may join a coordinator (it holds the cluster key).
    pub can_join: bool,
    /// A member that loses its coordinator tries to join again at once, not after
    /// `rejoin_every` (on etcd: a coordinator found gone is replaced at once).
    pub rejoin_at_once: bool,
}

/// After etcd names a coordinator, how soon a refused join is tried again, and for how
/// long after the news.
const QUICK_REJOIN: Duration = Duration::from_millis(20);
const QUICK_REJOIN_FOR: Duration = Duration::from_secs(1);

/// How a membership begins.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// The coordinator: members join it.
    Coordinator,
    /// A member of the coordinator at this address; of the one etcd elects when `None`
    /// (it learns which from [`Membership::follow`] or [`Membership::elected`]).
    Member(Option<SocketAddr>),
    /// A cluster of one.
    Alone,
}

/// Which servers' runtimes a recovery asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecoverOn {
    /// Every server's but this one's: the dead server's, whose runtimes hold nothing of
    /// their old life (and, if it is back as a new life, must not take over its flows).
    AllBut(u16),
    /// This server's only.
    Only(u16),
}

impl RecoverOn {
    /// Whether the runtimes of `server` are asked.
    pub fn includes(self, server: u16) -> bool {
        match self {
            RecoverOn::AllBut(s) => server != s,
            RecoverOn::Only(s) => server == s,
        }
    }
}

/// What the control thread must do.
#[derive(Clone, Debug)]
pub enum Action {
    /// Send `msg` on `session` (a failed write comes back as [`Membership::session_down`]).
    Send { session: SessionId, msg: PeerMsg },
    /// Close `session` (after what was sent on it before).
    Close { session: SessionId },
    /// The view changed: `alive` are the servers the data plane may exchange frames with;
    /// `renotify`: every local process must be given the view again.
    ViewChanged { alive: Vec<u16>, renotify: bool },
    /// Runtime `failed` is gone with its server: its flows (every life up to `incarnation`)
    /// are to be recovered where they are replicated, by the chain's runtimes `on` the
    /// servers named.
    Recover {
        failed: EndpointAddr,
        chain: Option<String>,
        incarnation: u64,
        on: RecoverOn,
    },
    /// Start joining `coordinator`; the outcome comes back as [`Membership::joined`],
    /// [`Membership::join_failed`] or [`Membership::fenced`].
    Join {
        session: SessionId,
        coordinator: SocketAddr,
        request: JoinRequest,
    },
    /// Fenced: kill this server's vswitches and runtimes (they restart empty), then report
    /// them with [`Membership::fence_waiting`].
    Fence,
    /// Something for the operator's log.
    Note(String),
}

pub struct Membership {
    me: u16,
    name: String,
    incarnation: u64,
    started: Instant,
    settings: Settings,
    role: Role,
    members: BTreeMap<u16, Member>,
    view: ClusterView,
    last_heartbeat: Instant,
    /// Fencing: local slots killed and not dead yet, and how long joining waits for them.
    fence_pending: BTreeSet<u16>,
    fence_until: Option<Instant>,
    /// The epoch of this coordinator's views: its incarnation, or one past its journal's
    /// when that is higher (a clock set back across a restart).
    epoch: u64,
    /// Restored from a journal: members alive in it that have not joined this life yet,
    /// and until when they may.
    restored: BTreeSet<u16>,
    restore_until: Option<Instant>,
    /// Restored: this server's runtimes of its previous life (gone with it), whose flows
    /// each returning member's runtimes are asked to recover.
    old_life: Vec<EndpointInfo>,
    /// A coordinator whose etcd lease lapsed: it keeps its sessions and heartbeats (the
    /// data plane carries on) but changes nothing (no view, no death declared, no join)
    /// until etcd elects a coordinator, itself or another.
    paused: bool,
    /// Servers the cluster link does not carry frames of now (the data plane's link
    /// watch), as any role hears it: a member elected coordinator declares those of them
    /// it carries on with dead at once.
    link_silent: BTreeSet<u16>,
    /// Member: the coordinator whose session ended (its server is out of this member's
    /// dispatch), until it joins one again. Elected after it, this member declares that
    /// server dead at once: a coordinator that only lost etcd keeps its sessions.
    lost_coordinator: Option<u16>,
    /// Member on etcd: a coordinator etcd just named may not know it yet (its own news of
    /// the election can come after this member's), and a coordinator just lost may still
    /// reset connections before its host refuses them: until then a failed join is tried
    /// again soon, not after `rejoin_every`.
    quick_rejoin_until: Option<Instant>,
    next_session: SessionId,
    /// Shutting down (`leave`): a session that fails now changes nothing.
    leaving: bool,
    actions: VecDeque<Action>,
}

impl Membership {
    /// Server `me` (`name`, life `incarnation`) with `endpoints` at `now`, in the role
    /// `start` gives it.
    pub fn new(
        me: u16,
        name: String,
        incarnation: u64,
        start: Start,
        settings: Settings,
        endpoints: Vec<EndpointInfo>,
        now: Instant,
    ) -> Membership {
        let role = match start {
            Start::Member(coordinator) => Self::member_of(coordinator, now),
            Start::Coordinator => Role::Coordinator,
            Start::Alone => Role::Alone,
        };
        let mut m = Membership {
            me,
            name: name.clone(),
            incarnation,
            started: now,
            settings,
            role,
            members: BTreeMap::new(),
            view: ClusterView::default(),
            last_heartbeat: now,
            fence_pending: BTreeSet::new(),
            fence_until: None,
            epoch: incarnation,
            restored: BTreeSet::new(),
            restore_until: None,
            old_life: Vec::new(),
            paused: false,
            link_silent: BTreeSet::new(),
            lost_coordinator: None,
            quick_rejoin_until: None,
            next_session: 1,
            leaving: false,
            actions: VecDeque::new(),
        };
        // This server is a member of its own cluster (of one, when alone).
        m.members.insert(
            me,
            Member {
                name,
                incarnation,
                addr: None,
                endpoints,
                alive: true,
                session: None,
                last_heard: now,
                joined_at: now,
                down: None,
            },
        );
        m.rebuild_view();
        m
    }

    /// The next thing to do, if any.
    pub fn poll(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    pub fn view(&self) -> &ClusterView {
        &self.view
    }

    pub fn role(&self) -> &Role {
        &self.role
    }

    pub fn members(&self) -> &BTreeMap<u16, Member> {
        &self.members
    }

    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    pub fn is_coordinator(&self) -> bool {
        matches!(self.role, Role::Coordinator)
    }

    /// The role of a member of `coordinator` (`None`: not known yet), not joined.
    fn member_of(coordinator: Option<SocketAddr>, now: Instant) -> Role {
        Role::Member {
            coordinator,
            session: None,
            last_heard: now,
            joining: None,
            next_try: now,
            last_error: None,
            sent_endpoints: Vec::new(),
        }
    }

    /// Coordinator: what to write down now (after every view change), for a later life
    /// (none while paused: it has no say).
    pub fn journal(&self) -> Option<Journal> {
        (self.is_coordinator() && !self.paused).then(|| Journal {
            view: self.view.clone(),
            addrs: self
                .members
                .iter()
                .filter_map(|(id, m)| Some((*id, m.addr?)))
                .collect(),
        })
    }

    /// Coordinator, before any session: carries on from the journal of this server's
    /// previous coordinator life. The view keeps its members, their lives and endpoints,
    /// and its versions go on from the journal's (under a higher epoch), so members that
    /// join again with the lives they had change nothing: no flow is dispatched or
    /// replicated anew. Members alive in the journal count as alive for `restore_grace`;
    /// one that has not joined by then is declared dead and its flows recovered. The
    /// flows of this server's previous life are recovered by each member's runtimes as
    /// the member joins again.
    pub fn restore(&mut self, journal: Journal, now: Instant) -> Result<(), RestoreError> {
        if !self.is_coordinator() {
            return Err(RestoreError::NotCoordinator);
        }
        if journal.view.coordinator != self.me {
            return Err(RestoreError::OtherServer {
                journal: journal.view.coordinator,
                me: self.me,
            });
        }
        if self.members.len() > 1 || self.view.version > 1 {
            return Err(RestoreError::Started);
        }
        self.carry_on(journal, now);
        Ok(())
    }

    /// Coordinator: takes the cluster on from `journal` (what the last coordinator, this
    /// server's previous life or another server, wrote down). See `restore`.
    fn carry_on(&mut self, journal: Journal, now: Instant) {
        self.epoch = self.incarnation.max(journal.view.epoch.saturating_add(1));
        let addrs: BTreeMap<u16, SocketAddr> = journal.addrs.into_iter().collect();
        for s in journal.view.servers {
            if s.server == self.me {
                if s.incarnation != self.incarnation {
                    self.old_life = s
                        .endpoints
                        .into_iter()
                        .filter(|e| e.kind == ProcessKind::Runtime)
                        .collect();
                }
                continue;
            }
            if s.alive {
                self.restored.insert(s.server);
            }
            self.members.insert(
                s.server,
                Member {
                    name: s.name,
                    incarnation: s.incarnation,
                    addr: addrs.get(&s.server).copied(),
                    endpoints: s.endpoints,
                    alive: s.alive,
                    session: None,
                    last_heard: now,
                    joined_at: now,
                    down: (!s.alive).then(|| Down {
                        at_s: 0.0,
                        why: "dead before the coordinator restarted".into(),
                        silent_ms: 0.0,
                    }),
                },
            );
        }
        self.restore_until = Some(now + self.settings.restore_grace);
        // (One below the largest: the next view must be newer still.)
        self.view.version = journal.view.version.min(u64::MAX - 1);
        self.note(format!(
            "carried on from the journal of view {}: {} member(s) to join again",
            journal.view.version,
            self.restored.len()
        ));
        self.rebuild_view();
    }

    /// etcd: this nfmgr was elected coordinator; `journal` is what the last coordinator
    /// wrote there (none: a new cluster). A member carries on from it, or from the view
    /// it holds when that is newer (the last coordinator may have sent a view it could not
    /// write down before it died). Every server alive in it has `restore_grace` to join
    /// again, the last coordinator's server too (if it is alive, it was only cut off from
    /// etcd and follows this one); those the cluster link does not carry now are declared
    /// dead at once and their flows recovered. A paused coordinator elected again resumes,
    /// with a new epoch, unless another coordinated meanwhile (the journal is newer).
    /// `mine`: this server's endpoints as they are (a member's own entry is not kept up
    /// to date: the coordinator's was).
    pub fn elected(&mut self, journal: Option<Journal>, mine: Vec<EndpointInfo>, now: Instant) {
        if matches!(self.role, Role::Coordinator) {
            let another = journal.as_ref().is_some_and(|j| j.view.epoch > self.epoch);
            if !another {
                self.resume(now);
                return;
            }
            self.role = Self::member_of(None, now);
            self.members.retain(|id, _| *id == self.me);
            self.restored.clear();
            self.restore_until = None;
            self.old_life.clear();
        }
        let Role::Member { session, .. } = &mut self.role else {
            return;
        };
        // The last coordinator, if it lives, joins this one as the others do.
        if let Some(s) = session.take() {
            self.close(s);
        }
        self.role = Role::Coordinator;
        self.paused = false;
        if let Some(m) = self.members.get_mut(&self.me) {
            m.endpoints = mine;
        }
        let mut base = match journal {
            Some(j) if j.view.stamp() >= self.view.stamp() => j,
            _ => Journal {
                view: self.view.clone(),
                addrs: Vec::new(),
            },
        };
        // A member marks its coordinator's server dead when its session ends, only in its
        // own view; no coordinator declared it dead, nor recovered its flows.
        let last = base.view.coordinator;
        for srv in &mut base.view.servers {
            if srv.server == last {
                srv.alive = true;
            }
        }
        // Declared dead in this life while cut off (its flows were taken over elsewhere):
        // it must not coordinate as the owner of flows that live elsewhere. It restarts
        // its processes empty under a new life first, as a fenced member does.
        let declared_dead = base
            .view
            .server(self.me)
            .is_some_and(|srv| !srv.alive && srv.incarnation == self.incarnation);
        if declared_dead {
            self.note("elected, but the cluster had declared this server dead: restarting its processes empty first".into());
            self.actions.push_back(Action::Fence);
            self.incarnation = self.incarnation.saturating_add(1);
            if let Some(m) = self.members.get_mut(&self.me) {
                m.incarnation = self.incarnation;
            }
        }
        self.note(format!(
            "elected coordinator: carrying on from server {last}'s view {}",
            base.view.version
        ));
        self.carry_on(base, now);
        if let Some(id) = self.lost_coordinator.take().filter(|id| *id == last) {
            self.declare_dead(
                id,
                "its session ended, and etcd elected another coordinator".into(),
                now,
            );
        }
        let silent: Vec<u16> = self
            .restored
            .intersection(&self.link_silent)
            .copied()
            .collect();
        for id in silent {
            self.declare_dead(id, "not heard on the cluster link".into(), now);
        }
    }

    /// A paused coordinator elected again: it has its say back, under a new epoch. Members
    /// whose sessions ended meanwhile have `restore_grace` to join again.
    fn resume(&mut self, now: Instant) {
        if !self.paused {
            return;
        }
        self.paused = false;
        self.epoch = self.epoch.saturating_add(1);
        for (id, m) in &self.members {
            if *id != self.me && m.alive && m.session.is_none() {
                self.restored.insert(*id);
            }
        }
        if !self.restored.is_empty() {
            self.restore_until = Some(now + self.settings.restore_grace);
        }
        self.note("elected coordinator again: resuming".into());
        self.rebuild_view();
    }

    /// etcd: the coordinator is the nfmgr at `addr` now. A member joins it (leaving the
    /// session to the last one: that server may live on, so its runtimes stay in the
    /// view); a coordinator, whose lease lapsed or who let go, becomes a member of it.
    pub fn follow(&mut self, addr: SocketAddr, now: Instant) {
        if matches!(self.role, Role::Coordinator) {
            // The members follow the new coordinator too and end their sessions here;
            // this server no longer tracks them.
            self.note(format!("coordinator {addr} elected: following it"));
            self.members.retain(|id, _| *id == self.me);
            self.restored.clear();
            self.restore_until = None;
            self.old_life.clear();
            self.paused = false;
            self.role = Self::member_of(Some(addr), now);
            self.quick_rejoin_until = Some(now + QUICK_REJOIN_FOR);
            return;
        }
        let Role::Member {
            coordinator,
            session,
            joining,
            next_try,
            ..
        } = &mut self.role
        else {
            return;
        };
        if *coordinator == Some(addr) {
            return;
        }
        *coordinator = Some(addr);
        *joining = None;
        *next_try = now;
        self.quick_rejoin_until = Some(now + QUICK_REJOIN_FOR);
        let old = session.take();
        if let Some(s) = old {
            self.close(s);
        }
        self.note(format!("following coordinator {addr}"));
    }

    /// etcd: this coordinator's lease lapsed (etcd is out of reach, or it let go). It
    /// changes nothing until etcd elects a coordinator, and keeps its sessions and
    /// heartbeats, so that every server keeps the view it has and the data plane carries
    /// on (losing etcd stops coordination, never traffic).
    pub fn pause(&mut self, why: String) {
        if matches!(self.role, Role::Coordinator) && !self.paused {
            self.paused = true;
            self.note(format!(
                "coordination paused ({why}): no view changes until etcd elects a \
                 coordinator"
            ));
        }
    }

    /// Member: its session to the coordinator ended and it has not joined one since (a
    /// coordinator it then finds nothing listening for is gone).
    pub fn lost_its_coordinator(&self) -> bool {
        self.lost_coordinator.is_some()
    }

    /// Whether this coordinator's lease lapsed (it changes nothing).
    pub fn paused(&self) -> bool {
        self.paused
    }

    /// The session that reaches `server`: the coordinator's own to each member; a
    /// member's one session, to the coordinator, which relays.
    pub fn session_to(&self, server: u16) -> Option<SessionId> {
        match &self.role {
            Role::Coordinator => self.members.get(&server).and_then(|m| m.session),
            Role::Member { session, .. } => *session,
            Role::Alone => None,
        }
    }

    /// Member: the session to the coordinator, once joined.
    pub fn coordinator_session(&self) -> Option<SessionId> {
        match &self.role {
            Role::Member { session, .. } => *session,
            _ => None,
        }
    }

    /// Coordinator: the member on `session`.
    pub fn server_of(&self, session: SessionId) -> Option<u16> {
        self.members
            .iter()
            .find(|(_, m)| m.session == Some(session))
            .map(|(s, _)| *s)
    }

    fn note(&mut self, what: String) {
        self.actions.push_back(Action::Note(what));
    }

    fn send(&mut self, session: SessionId, msg: PeerMsg) {
        self.actions.push_back(Action::Send { session, msg });
    }

    fn close(&mut self, session: SessionId) {
        self.actions.push_back(Action::Close { session });
    }

    /// Coordinator (or alone): the view from the member table, with a new version (none
    /// while paused: the table's changes wait for the next coordinator).
    fn rebuild_view(&mut self) {
        if self.paused {
            return;
        }
        self.view = ClusterView {
            // A member's own view, before it joins, comes before any coordinator's: its
            // processes are given it, and must take the coordinator's after it (they order
            // views by stamp alone).
            epoch: match self.role {
                Role::Member { .. } => 0,
                _ => self.epoch,
            },
            version: self.view.version.saturating_add(1),
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
        self.view_changed(false);
    }

    /// A new view: to the data plane, and from the coordinator to every member.
    fn view_changed(&mut self, renotify: bool) {
        // The link watch reports only servers alive in the view, and a server that leaves
        // it and comes back is not reported up: what it said of one no longer alive is
        // stale.
        let view = &self.view;
        self.link_silent
            .retain(|s| view.server(*s).is_some_and(|srv| srv.alive));
        let alive = self
            .view
            .servers
            .iter()
            .filter(|s| s.alive)
            .map(|s| s.server)
            .collect();
        self.actions
            .push_back(Action::ViewChanged { alive, renotify });
        if self.is_coordinator() {
            let sessions: Vec<SessionId> =
                self.members.values().filter_map(|m| m.session).collect();
            for s in sessions {
                self.send(s, PeerMsg::View(self.view.clone()));
            }
        }
    }

    /// Member: a view from the coordinator. An older one of the same coordinator is stale
    /// (older by epoch, then version: a restarted coordinator's epoch is higher, and
    /// without a journal its versions start again); another coordinator's is taken as it
    /// is.
    /// `renotify`: every local process is given it, even one that had its stamp.
    fn take_view(&mut self, view: ClusterView, renotify: bool) {
        if view.stamp() < self.view.stamp() && view.coordinator == self.view.coordinator {
            return;
        }
        self.view = view;
        self.view_changed(renotify);
    }

    fn replicated(&self, chain: Option<&str>) -> bool {
        chain.is_some_and(|c| self.settings.replicated.contains(c))
    }

    /// Coordinator: a server proved it holds the key and asks to join on `session`.
    pub fn join_request(&mut self, session: SessionId, info: JoinInfo, now: Instant) {
        if let Some(reason) = self.refusal(&info) {
            self.actions
                .push_back(Action::Note(format!("refused a member: {reason}")));
            self.send(session, PeerMsg::Reject { reason });
            self.close(session);
            return;
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
                self.send(session, PeerMsg::Fence { reason });
                self.close(session);
                return;
            }
        }
        // A restarted member replaces its previous life, whose flows are recovered first
        // (a restart faster than its session's end, or while a restored coordinator
        // waited for it).
        let restored = self.restored.remove(&info.server);
        if let Some(old) = self.members.get(&info.server).and_then(|m| m.session) {
            self.close(old);
        }
        let same_life = match self.members.get(&info.server) {
            Some(m) if m.alive && m.incarnation != info.incarnation => {
                self.declare_dead(info.server, "it started again".into(), now);
                false
            }
            Some(m) => m.alive && m.incarnation == info.incarnation,
            None => false,
        };
        // The same life with the same endpoints (back after its coordinator restarted, or
        // over a new session): the view does not change.
        // (A new host address goes through a new view, so that the journal has it; the
        // port is the join's own, new every time.)
        let unchanged = same_life
            && self.members.get(&info.server).is_some_and(|m| {
                m.name == info.name
                    && m.endpoints == info.endpoints
                    && m.addr.map(|a| a.ip()) == Some(info.addr.ip())
            });
        // The runtimes of this server's previous life whose flows the member's runtimes
        // may hold copies of (it is back in the life it had then).
        let recover = if restored && same_life {
            self.old_life.clone()
        } else {
            Vec::new()
        };
        if unchanged {
            if let Some(m) = self.members.get_mut(&info.server) {
                m.addr = Some(info.addr);
                m.session = Some(session);
                m.last_heard = now;
            }
            self.note(format!(
                "server {} ({}) joined again from {}",
                info.server, info.name, info.addr
            ));
            self.send(
                session,
                PeerMsg::Welcome {
                    view: self.view.clone(),
                    recover,
                },
            );
            return;
        }
        self.members.insert(
            info.server,
            Member {
                name: info.name.clone(),
                incarnation: info.incarnation,
                addr: Some(info.addr),
                endpoints: info.endpoints,
                alive: true,
                // Set once it is welcomed: the new view goes to the others first.
                session: None,
                last_heard: now,
                joined_at: now,
                down: None,
            },
        );
        self.note(format!(
            "server {} ({}) joined from {}",
            info.server, info.name, info.addr
        ));
        self.rebuild_view();
        if let Some(m) = self.members.get_mut(&info.server) {
            m.session = Some(session);
        }
        self.send(
            session,
            PeerMsg::Welcome {
                view: self.view.clone(),
                recover,
            },
        );
    }

    /// Why a join is refused, if it is.
    fn refusal(&self, info: &JoinInfo) -> Option<String> {
        if !self.is_coordinator() {
            return Some("this nfmgr is not a coordinator".into());
        }
        if self.paused {
            return Some(
                "this nfmgr's coordinator lease lapsed: it admits no one until etcd elects a \
                 coordinator"
                    .into(),
            );
        }
        if info.server == self.me {
            return Some(format!("server id {} is the coordinator's", info.server));
        }
        if let Some(m) = self.members.get(&info.server) {
            let same_host = m.addr.map(|a| a.ip()) == Some(info.addr.ip());
            if m.alive && m.incarnation != info.incarnation && !same_host {
                return Some(format!(
                    "server id {} is already a member ({})",
                    info.server,
                    m.addr.map(|a| a.to_string()).unwrap_or_default()
                ));
            }
        }
        for (name, digest) in &info.chains {
            if let Some((_, mine)) = self.settings.chains.iter().find(|(n, _)| n == name) {
                if mine != digest {
                    return Some(format!(
                        "chain `{name}` is defined differently on the coordinator"
                    ));
                }
            }
        }
        None
    }

    /// Member: the coordinator welcomed this server on `session` with `view`, and with the
    /// runtimes of its own previous life whose flows this server's runtimes are to take
    /// over (`recover`: a coordinator restarted from its journal). Returns false if this
    /// server is no member (the session is of no use).
    pub fn joined(
        &mut self,
        session: SessionId,
        view: ClusterView,
        recover: Vec<EndpointInfo>,
        now: Instant,
    ) -> bool {
        let Role::Member {
            coordinator: Some(addr),
            session: s,
            last_heard,
            joining,
            last_error,
            sent_endpoints,
            ..
        } = &mut self.role
        else {
            return false;
        };
        // A join to a coordinator since replaced (etcd elected another meanwhile).
        if *joining != Some(session) {
            return false;
        }
        *s = Some(session);
        *last_heard = now;
        *joining = None;
        self.lost_coordinator = None;
        *last_error = None;
        sent_endpoints.clear();
        let addr = *addr;
        self.note(format!("joined the cluster of coordinator {addr}"));
        // Before the view: carried out in this order, the recovery reaches this server's
        // runtimes before the view lets anything of the coordinator's new life through
        // (docs/MESSAGING.md, "The coordinator's journal").
        let me = self.me;
        self.recover(&recover, RecoverOn::Only(me));
        // A welcome may carry the stamp of the view this server holds (the coordinator
        // came back without a change), which this server's processes were given with the
        // coordinator marked dead: they are given it again.
        self.take_view(view, true);
        true
    }

    /// Member: the join on `session` failed; it is tried again after `rejoin_every`.
    /// Returns the reason when it differs from the last one (worth a warning).
    pub fn join_failed(&mut self, session: SessionId, why: String, now: Instant) -> Option<String> {
        let Role::Member {
            joining,
            next_try,
            last_error,
            ..
        } = &mut self.role
        else {
            return None;
        };
        if *joining != Some(session) {
            return None;
        }
        *joining = None;
        let quick = self.quick_rejoin_until.is_some_and(|t| now < t);
        *next_try = now
            + if quick {
                QUICK_REJOIN.min(self.settings.rejoin_every)
            } else {
                self.settings.rejoin_every
            };
        if last_error.as_deref() == Some(why.as_str()) {
            return None;
        }
        *last_error = Some(why.clone());
        Some(why)
    }

    /// Member: the coordinator had declared this server dead while it lived on (a
    /// partition) and took its runtimes' flows over. Every vswitch and runtime here is
    /// killed and restarted empty (their flows are not recovered: they live elsewhere
    /// now), and this server joins again as a new incarnation (at least `floor`, the wall
    /// clock in ns, so that it is new across restarts of nfmgr too) once they are dead.
    /// `session` is the join the fence answered: one of a join since replaced, or that
    /// reaches a server no longer a member, changes nothing.
    pub fn fenced(&mut self, session: SessionId, why: String, floor: u64, now: Instant) {
        if !matches!(self.role, Role::Member { joining: Some(s), .. } if s == session) {
            return;
        }
        self.note(format!(
            "fenced by the coordinator ({why}): restarting this server's vswitches and \
             runtimes empty, then joining again"
        ));
        self.actions.push_back(Action::Fence);
        self.incarnation = floor.max(self.incarnation.saturating_add(1));
        if let Some(me) = self.members.get_mut(&self.me) {
            me.incarnation = self.incarnation;
        }
        self.fence_until = Some(now + self.settings.fence_wait);
        if let Role::Member {
            joining, next_try, ..
        } = &mut self.role
        {
            *joining = None;
            *next_try = now;
        }
    }

    /// The local slots the fence killed: joining waits until they are dead (or
    /// `fence_wait` passed).
    pub fn fence_waiting(&mut self, slots: impl IntoIterator<Item = u16>) {
        self.fence_pending.extend(slots);
    }

    /// A local process died; returns whether the fence killed it (its flows live
    /// elsewhere: nothing to recover).
    pub fn process_died(&mut self, slot: u16) -> bool {
        self.fence_pending.remove(&slot)
    }

    /// A frame came on `session`: whoever is on it is alive.
    pub fn heard(&mut self, session: SessionId, now: Instant) {
        match &mut self.role {
            Role::Member {
                session: Some(s),
                last_heard,
                ..
            } if *s == session => *last_heard = now,
            _ => {
                if let Some(m) = self
                    .members
                    .values_mut()
                    .find(|m| m.session == Some(session))
                {
                    m.last_heard = now;
                }
            }
        }
    }

    /// A heartbeat on `session`, with the sender's endpoints if they changed.
    pub fn heartbeat(&mut self, session: SessionId, endpoints: Option<Vec<EndpointInfo>>) {
        let Some(eps) = endpoints else {
            return;
        };
        let changed = match self
            .members
            .values_mut()
            .find(|m| m.session == Some(session))
        {
            Some(m) if m.endpoints != eps => {
                m.endpoints = eps;
                true
            }
            _ => false,
        };
        if changed && self.is_coordinator() {
            self.rebuild_view();
        }
    }

    /// A view on a session: taken by a member, ignored by anyone else.
    pub fn view_from_coordinator(&mut self, view: ClusterView) {
        if matches!(self.role, Role::Member { .. }) {
            self.take_view(view, false);
        }
    }

    /// `session` ended (closed, failed, left, or silent). The coordinator marks its member
    /// dead and has its runtimes' flows recovered; a member that lost its coordinator
    /// stops dispatching to the coordinator's runtimes and joins again.
    pub fn session_down(&mut self, session: SessionId, why: String, now: Instant) {
        self.close(session);
        if self.leaving {
            return;
        }
        let coordinator_lost = match &mut self.role {
            Role::Member {
                session: s @ Some(_),
                next_try,
                ..
            } if *s == Some(session) => {
                *s = None;
                // On etcd at once: a refused connection has the coordinator's lease
                // revoked, and the next one elected.
                *next_try = if self.settings.rejoin_at_once {
                    now
                } else {
                    now + self.settings.rejoin_every
                };
                // (A dying nfmgr may still reset a connection before its host refuses
                // them: try again soon, for the refusal.)
                if self.settings.rejoin_at_once {
                    self.quick_rejoin_until = Some(now + QUICK_REJOIN_FOR);
                }
                true
            }
            _ => false,
        };
        if coordinator_lost {
            let coord = self.view.coordinator;
            self.lost_coordinator = Some(coord);
            self.note(format!("lost the coordinator ({why}); rejoining"));
            // Its runtimes are gone with it: stop dispatching to them.
            for s in &mut self.view.servers {
                if s.server == coord {
                    s.alive = false;
                }
            }
            self.view_changed(true);
            return;
        }
        let Some(id) = self.server_of(session) else {
            return;
        };
        self.declare_dead(id, why, now);
    }

    /// Coordinator: member `id` is dead (`why`): out of the view, and its runtimes' flows
    /// recovered where they were replicated, every life of them.
    fn declare_dead(&mut self, id: u16, why: String, now: Instant) {
        let at_s = now.saturating_duration_since(self.started).as_secs_f64();
        let paused = self.paused;
        let Some(m) = self.members.get_mut(&id) else {
            return;
        };
        if paused {
            // No say: the member stays in the view (its session is gone); the coordinator
            // etcd elects next decides.
            m.session = None;
            self.note(format!("server {id} lost ({why}); coordination is paused"));
            return;
        }
        let silent_ms = now.saturating_duration_since(m.last_heard).as_secs_f64() * 1000.0;
        m.session = None;
        m.alive = false;
        m.down = Some(Down {
            at_s,
            why: why.clone(),
            silent_ms,
        });
        let name = m.name.clone();
        let lost: Vec<EndpointInfo> = m
            .endpoints
            .iter()
            .filter(|e| e.kind == ProcessKind::Runtime)
            .cloned()
            .collect();
        self.restored.remove(&id);
        self.note(format!("server {id} ({name}) is down: {why}"));
        self.rebuild_view();
        self.recover(&lost, RecoverOn::AllBut(id));
    }

    /// Has the flows of `runtimes` (the replicated ones, every life) recovered by the
    /// runtimes `on` the servers named.
    fn recover(&mut self, runtimes: &[EndpointInfo], on: RecoverOn) {
        for e in runtimes {
            if self.replicated(e.chain.as_deref()) {
                self.actions.push_back(Action::Recover {
                    failed: e.addr,
                    chain: e.chain.clone(),
                    incarnation: u64::MAX,
                    on,
                });
            }
        }
    }

    /// The cluster link stopped carrying `server`'s frames for `silent`. The coordinator
    /// treats a member not heard for the watch's window as dead, as it would a closed
    /// session or a silent heartbeat; members only note it (deciding is the
    /// coordinator's).
    pub fn link_down(&mut self, server: u16, silent: Duration, now: Instant) {
        self.link_silent.insert(server);
        let ms = silent.as_secs_f64() * 1000.0;
        let session = self
            .members
            .get(&server)
            .filter(|m| m.alive)
            .and_then(|m| m.session);
        match (self.is_coordinator(), session) {
            (true, Some(s)) => self.session_down(
                s,
                format!("not heard on the cluster link for {ms:.0} ms"),
                now,
            ),
            _ => self.note(format!(
                "server {server} not heard on the cluster link for {ms:.0} ms"
            )),
        }
    }

    pub fn link_up(&mut self, server: u16) {
        self.link_silent.remove(&server);
        self.note(format!("server {server} heard on the cluster link again"));
    }

    /// This server's endpoints changed (a process died, restarted or started): the view
    /// has them at once, not at the next heartbeat. Other servers' vswitches learn a dead
    /// runtime from the view before they let its replicas take its flows over.
    pub fn endpoints_changed(&mut self, mine: Vec<EndpointInfo>) {
        match &mut self.role {
            Role::Coordinator | Role::Alone => {
                let changed = self
                    .members
                    .get(&self.me)
                    .is_some_and(|m| m.endpoints != mine);
                if changed {
                    if let Some(m) = self.members.get_mut(&self.me) {
                        m.endpoints = mine;
                    }
                    self.rebuild_view();
                }
            }
            Role::Member {
                session: Some(s),
                sent_endpoints,
                ..
            } if *sent_endpoints != mine => {
                let s = *s;
                *sent_endpoints = mine.clone();
                self.send(
                    s,
                    PeerMsg::Heartbeat {
                        endpoints: Some(mine),
                    },
                );
            }
            _ => {}
        }
    }

    /// Time-driven work at `now`, with this server's endpoints as they are: heartbeats,
    /// silent sessions, joining. Due again within `heartbeat`.
    pub fn tick(&mut self, now: Instant, mine: Vec<EndpointInfo>) {
        if matches!(self.role, Role::Coordinator | Role::Alone) {
            self.endpoints_changed(mine.clone());
        }
        if now.saturating_duration_since(self.last_heartbeat) >= self.settings.heartbeat {
            self.last_heartbeat = now;
            match &mut self.role {
                Role::Coordinator => {
                    let sessions: Vec<SessionId> =
                        self.members.values().filter_map(|m| m.session).collect();
                    for s in sessions {
                        self.send(s, PeerMsg::Heartbeat { endpoints: None });
                    }
                }
                Role::Member {
                    session: Some(s),
                    sent_endpoints,
                    ..
                } => {
                    let s = *s;
                    let endpoints = (*sent_endpoints != mine).then(|| {
                        *sent_endpoints = mine.clone();
                        mine.clone()
                    });
                    self.send(s, PeerMsg::Heartbeat { endpoints });
                }
                _ => {}
            }
        }
        if self.restore_until.is_some_and(|t| now >= t) {
            self.restore_until = None;
            self.old_life.clear();
            let why = format!(
                "not back within {} ms of the coordinator's restart",
                self.settings.restore_grace.as_millis()
            );
            for id in std::mem::take(&mut self.restored) {
                self.declare_dead(id, why.clone(), now);
            }
        }
        let timeout = self.settings.member_timeout;
        let why = format!("no heartbeat for {} ms", timeout.as_millis());
        match &self.role {
            Role::Coordinator => {
                let silent: Vec<SessionId> = self
                    .members
                    .values()
                    .filter(|m| m.alive && m.session.is_some())
                    .filter(|m| now.saturating_duration_since(m.last_heard) > timeout)
                    .filter_map(|m| m.session)
                    .collect();
                for s in silent {
                    self.session_down(s, why.clone(), now);
                }
            }
            Role::Member {
                session: Some(s),
                last_heard,
                ..
            } if now.saturating_duration_since(*last_heard) > timeout => {
                let s = *s;
                self.session_down(s, why, now);
            }
            _ => {}
        }
        self.maybe_join(now, mine);
    }

    fn maybe_join(&mut self, now: Instant, endpoints: Vec<EndpointInfo>) {
        let Role::Member {
            coordinator: Some(coordinator),
            session: None,
            joining,
            next_try,
            ..
        } = &mut self.role
        else {
            return;
        };
        if joining.is_some() || now < *next_try || !self.settings.can_join {
            return;
        }
        // Fencing: join again only once the old lives are dead.
        if !self.fence_pending.is_empty() && self.fence_until.is_some_and(|t| now < t) {
            return;
        }
        let coordinator = *coordinator;
        let session = self.next_session;
        self.next_session += 1;
        *joining = Some(session);
        self.actions.push_back(Action::Join {
            session,
            coordinator,
            request: JoinRequest {
                server: self.me,
                name: self.name.clone(),
                incarnation: self.incarnation,
                endpoints,
                chains: self.settings.chains.clone(),
            },
        });
    }

    /// Says goodbye: `Leave` on every session this membership knows, and closes them.
    pub fn leave(&mut self) {
        self.leaving = true;
        let mut sessions: Vec<SessionId> =
            self.members.values().filter_map(|m| m.session).collect();
        if let Some(s) = self.coordinator_session() {
            sessions.push(s);
        }
        for s in sessions {
            self.send(s, PeerMsg::Leave);
            self.close(s);
        }
    }
}

#[cfg(test)]
mod tests {
    //! Whole clusters stepped in memory: a coordinator and members, sessions as numbers,
    //! frames carried (or lost) by the test, time moved by hand.

    use super::*;

    const HB: Duration = Duration::from_millis(100);
    const TIMEOUT: Duration = Duration::from_millis(500);
    const COORD: u16 = 1;
    const GRACE: Duration = Duration::from_secs(2);

    fn settings(can_join: bool) -> Settings {
        Settings {
            heartbeat: HB,
            member_timeout: TIMEOUT,
            rejoin_every: Duration::from_millis(500),
            fence_wait: Duration::from_secs(5),
            restore_grace: GRACE,
            replicated: ["web".to_string()].into(),
            chains: vec![("web".into(), [7; 32])],
            can_join,
            rejoin_at_once: false,
        }
    }

    fn runtimes(server: u16) -> Vec<EndpointInfo> {
        (2..4)
            .map(|slot| EndpointInfo {
                addr: EndpointAddr::new(server, slot),
                kind: ProcessKind::Runtime,
                name: format!("rt{slot}"),
                chain: Some("web".into()),
                alive: true,
                generation: 1,
            })
            .collect()
    }

    fn addr(server: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, server as u8], 7000))
    }

    /// One server: its membership, whether it runs (a dead one neither ticks nor answers),
    /// and what it was asked to do that the test looks at.
    struct Server {
        m: Membership,
        up: bool,
        /// Its session to the coordinator (member), the coordinator's to it, and which
        /// server that coordinator is.
        session: Option<(SessionId, SessionId, u16)>,
        recovered: Vec<EndpointAddr>,
        /// Recoveries asked of one server's runtimes only: (runtime, server).
        recovered_by: Vec<(EndpointAddr, u16)>,
        /// Where every recovery asked was to be carried out.
        recover_on: Vec<RecoverOn>,
        /// Views handed on with every local process to be given them again.
        renotified: usize,
        fences: usize,
        views: usize,
        notes: Vec<String>,
    }

    struct Cluster {
        now: Instant,
        servers: BTreeMap<u16, Server>,
        /// Frames between a member and the coordinator are lost while cut.
        cut: BTreeSet<u16>,
        next_accept: SessionId,
    }

    impl Cluster {
        fn new(members: &[u16]) -> Cluster {
            let now = Instant::now();
            let mut servers = BTreeMap::new();
            let mk = |id: u16, start: Start| Server {
                m: Membership::new(
                    id,
                    format!("s{id}"),
                    1,
                    start,
                    settings(true),
                    runtimes(id),
                    now,
                ),
                up: true,
                session: None,
                recovered: Vec::new(),
                recovered_by: Vec::new(),
                recover_on: Vec::new(),
                renotified: 0,
                fences: 0,
                views: 0,
                notes: Vec::new(),
            };
            servers.insert(COORD, mk(COORD, Start::Coordinator));
            for &id in members {
                servers.insert(id, mk(id, Start::Member(Some(addr(COORD)))));
            }
            Cluster {
                now,
                servers,
                cut: BTreeSet::new(),
                next_accept: 1 << 32,
            }
        }

        /// The member at the other end of coordinator `coord`'s session `s`.
        fn member_of_coord_session(&self, coord: u16, s: SessionId) -> Option<u16> {
            self.servers
                .iter()
                .find(|(_, v)| v.session.is_some_and(|(_, c, at)| c == s && at == coord))
                .map(|(id, _)| *id)
        }

        /// The server listening at `a`.
        fn at(&self, a: SocketAddr) -> Option<u16> {
            self.servers.keys().copied().find(|id| addr(*id) == a)
        }

        /// Carries out every server's actions until none is left.
        fn settle(&mut self) {
            for _ in 0..100 {
                let mut any = false;
                let ids: Vec<u16> = self.servers.keys().copied().collect();
                for id in ids {
                    while let Some(a) = self.servers.get_mut(&id).unwrap().m.poll() {
                        any = true;
                        self.carry(id, a);
                    }
                }
                if !any {
                    return;
                }
            }
            panic!("the cluster never settles");
        }

        fn carry(&mut self, from: u16, a: Action) {
            let now = self.now;
            match a {
                Action::Note(n) => self.servers.get_mut(&from).unwrap().notes.push(n),
                Action::ViewChanged { renotify, .. } => {
                    let s = self.servers.get_mut(&from).unwrap();
                    s.views += 1;
                    s.renotified += usize::from(renotify);
                }
                Action::Recover { failed, on, .. } => {
                    let s = self.servers.get_mut(&from).unwrap();
                    s.recover_on.push(on);
                    match on {
                        RecoverOn::AllBut(_) => s.recovered.push(failed),
                        RecoverOn::Only(by) => s.recovered_by.push((failed, by)),
                    }
                }
                Action::Fence => {
                    // As nfmgr does: kill the runtimes, and say so.
                    let s = self.servers.get_mut(&from).unwrap();
                    s.fences += 1;
                    s.m.fence_waiting([2, 3]);
                }
                Action::Join {
                    session,
                    request,
                    coordinator,
                } => {
                    let to = self.at(coordinator).filter(|to| self.servers[to].up);
                    let Some(to) = to.filter(|_| !self.cut.contains(&from)) else {
                        let s = self.servers.get_mut(&from).unwrap();
                        s.m.join_failed(session, "unreachable".into(), now);
                        return;
                    };
                    let c = self.next_accept;
                    self.next_accept += 1;
                    self.servers.get_mut(&from).unwrap().session = Some((session, c, to));
                    let info = JoinInfo {
                        server: request.server,
                        name: request.name,
                        incarnation: request.incarnation,
                        endpoints: request.endpoints,
                        chains: request.chains,
                        // A join's connection comes from a new port every time.
                        addr: SocketAddr::new(addr(from).ip(), 40_000 + (c % 20_000) as u16),
                    };
                    self.servers
                        .get_mut(&to)
                        .unwrap()
                        .m
                        .join_request(c, info, now);
                }
                Action::Send { session, msg }
                    if self.member_of_coord_session(from, session).is_some() =>
                {
                    let Some(to) = self.member_of_coord_session(from, session) else {
                        return;
                    };
                    let (mine, _, _) = self.servers[&to].session.unwrap();
                    if self.cut.contains(&to) || !self.servers[&to].up {
                        return;
                    }
                    let m = &mut self.servers.get_mut(&to).unwrap().m;
                    match msg {
                        PeerMsg::Welcome { view, recover } => {
                            m.joined(mine, view, recover, now);
                        }
                        PeerMsg::Reject { reason } => {
                            m.join_failed(mine, reason, now);
                        }
                        PeerMsg::Fence { reason } => m.fenced(mine, reason, 0, now),
                        PeerMsg::View(v) => {
                            m.heard(mine, now);
                            m.view_from_coordinator(v);
                        }
                        PeerMsg::Heartbeat { endpoints } => {
                            m.heard(mine, now);
                            m.heartbeat(mine, endpoints);
                        }
                        PeerMsg::Leave => m.session_down(mine, "left".into(), now),
                        other => panic!("unexpected {other:?}"),
                    }
                }
                Action::Send { session, msg } => {
                    let (_, theirs, coord) = match self.servers[&from].session {
                        Some(s) if s.0 == session => s,
                        _ => return,
                    };
                    if self.cut.contains(&from) || !self.servers[&from].up {
                        return;
                    }
                    if !self.servers[&coord].up {
                        return;
                    }
                    let c = &mut self.servers.get_mut(&coord).unwrap().m;
                    c.heard(theirs, now);
                    match msg {
                        PeerMsg::Heartbeat { endpoints } => c.heartbeat(theirs, endpoints),
                        PeerMsg::Leave => c.session_down(theirs, "left".into(), now),
                        other => panic!("unexpected {other:?}"),
                    }
                }
                Action::Close { session } => {
                    // The other side sees its session close (if it is up to see it).
                    if let Some(to) = self.member_of_coord_session(from, session) {
                        {
                            let (mine, _, _) = self.servers[&to].session.unwrap();
                            self.servers.get_mut(&to).unwrap().session = None;
                            if self.servers[&to].up && !self.cut.contains(&to) {
                                self.servers.get_mut(&to).unwrap().m.session_down(
                                    mine,
                                    "closed".into(),
                                    now,
                                );
                            }
                        }
                    } else if let Some((mine, theirs, coord)) = self.servers[&from].session {
                        if mine == session {
                            self.servers.get_mut(&from).unwrap().session = None;
                            if self.servers[&coord].up {
                                self.servers.get_mut(&coord).unwrap().m.session_down(
                                    theirs,
                                    "closed".into(),
                                    now,
                                );
                            }
                        }
                    }
                }
            }
        }

        /// Moves time on by `d` in heartbeat-sized steps, ticking every running server.
        fn run(&mut self, d: Duration) {
            let end = self.now + d;
            while self.now < end {
                self.now += Duration::from_millis(20);
                let now = self.now;
                for (id, s) in self.servers.iter_mut() {
                    if s.up {
                        s.m.tick(now, runtimes(*id));
                    }
                }
                self.settle();
            }
        }

        /// The coordinator's nfmgr dies (every member sees its session end) and starts again
        /// as life `incarnation`, from `journal` if given.
        fn restart_coordinator(&mut self, incarnation: u64, journal: Option<Journal>) {
            for id in self.servers.keys().copied().collect::<Vec<_>>() {
                let Some((mine, _, _)) = self.servers.get_mut(&id).unwrap().session.take() else {
                    continue;
                };
                let now = self.now;
                let s = self.servers.get_mut(&id).unwrap();
                if s.up {
                    s.m.session_down(mine, "connection reset".into(), now);
                }
            }
            let now = self.now;
            let mut m = Membership::new(
                COORD,
                "s1".into(),
                incarnation,
                Start::Coordinator,
                settings(true),
                runtimes(COORD),
                now,
            );
            if let Some(j) = journal {
                m.restore(j, now).unwrap();
            }
            self.servers.get_mut(&COORD).unwrap().m = m;
            self.settle();
        }

        /// Server `id`'s nfmgr and processes die: the sessions to it end, and (`link`) the
        /// others' link watch reports it silent (it does not once a view has dropped it).
        fn kill(&mut self, id: u16, link: bool) {
            self.servers.get_mut(&id).unwrap().up = false;
            let now = self.now;
            for other in self.servers.keys().copied().collect::<Vec<_>>() {
                let s = self.servers.get_mut(&other).unwrap();
                if other == id || !s.up {
                    continue;
                }
                if s.session.is_some_and(|(_, _, c)| c == id) {
                    let (mine, _, _) = s.session.take().unwrap();
                    s.m.session_down(mine, "connection reset".into(), now);
                }
                if link {
                    s.m.link_down(id, Duration::from_millis(40), now);
                }
            }
            self.settle();
        }

        /// etcd elects `leader`, which reads `journal`; every other live server learns it.
        fn elect(&mut self, leader: u16, journal: Option<Journal>) {
            let now = self.now;
            self.servers
                .get_mut(&leader)
                .unwrap()
                .m
                .elected(journal, runtimes(leader), now);
            self.settle();
            for id in self.servers.keys().copied().collect::<Vec<_>>() {
                let s = self.servers.get_mut(&id).unwrap();
                if id != leader && s.up {
                    s.m.follow(addr(leader), now);
                }
            }
            self.settle();
        }

        /// The runtimes whose flows server `at` had recovered (by every other server's
        /// runtimes), in address order.
        fn recovered_at(&self, at: u16) -> Vec<EndpointAddr> {
            let mut r = self.servers[&at].recovered.clone();
            r.sort();
            r
        }

        fn alive_in(&self, at: u16) -> Vec<u16> {
            self.servers[&at]
                .m
                .view()
                .servers
                .iter()
                .filter(|s| s.alive)
                .map(|s| s.server)
                .collect()
        }
    }

    #[test]
    fn members_join_and_every_view_reaches_every_server() {
        let mut c = Cluster::new(&[2, 3]);
        // A member's own view before it joins is older than any coordinator's (its
        // processes, given it first, must take the coordinator's).
        assert!(c.servers[&2].m.view().stamp() < c.servers[&1].m.view().stamp());
        assert_eq!(c.servers[&2].m.view().epoch, 0);
        c.run(Duration::from_millis(100));
        for id in [1, 2, 3] {
            assert_eq!(c.alive_in(id), vec![1, 2, 3], "server {id}'s view");
            assert_eq!(
                c.servers[&id].m.view().version,
                c.servers[&1].m.view().version
            );
        }
        assert!(c.servers[&1].m.is_coordinator());
        assert_eq!(
            c.servers[&1].m.view().runtimes_of(Some("web")).len(),
            6,
            "every server's runtimes"
        );
        // Heartbeats keep everyone alive: no false detection over a long run.
        c.run(Duration::from_secs(10));
        assert_eq!(c.alive_in(1), vec![1, 2, 3]);
        assert!(c.servers[&1].recovered.is_empty());
    }

    /// A member that falls silent (its nfmgr frozen, or every frame lost) is dead after
    /// `member_timeout`, not before; its runtimes' flows are recovered and the other members
    /// learn it from the next view.
    #[test]
    fn a_silent_member_is_declared_dead_and_its_flows_recovered() {
        let mut c = Cluster::new(&[2, 3]);
        c.run(Duration::from_millis(100));
        c.servers.get_mut(&2).unwrap().up = false;
        c.run(TIMEOUT - Duration::from_millis(60));
        assert_eq!(c.alive_in(1), vec![1, 2, 3], "not before the timeout");
        c.run(Duration::from_millis(200));
        assert_eq!(c.alive_in(1), vec![1, 3]);
        assert_eq!(c.alive_in(3), vec![1, 3], "the view reached the others");
        let recovered = c.recovered_at(1);
        assert_eq!(
            recovered,
            vec![EndpointAddr::new(2, 2), EndpointAddr::new(2, 3)]
        );
        let down = c.servers[&1].m.members()[&2].down.clone().unwrap();
        assert!(down.why.contains("no heartbeat"), "{}", down.why);
        assert!(down.silent_ms >= TIMEOUT.as_millis() as f64);
    }

    /// Cut off (the link watch says so) while its nfmgr lives on: the member is dead, its
    /// flows recovered elsewhere; when it comes back in the same life it is fenced,
    /// restarts its processes empty, and joins again as a new incarnation once they died.
    #[test]
    fn a_member_back_from_a_partition_is_fenced_then_joins_as_a_new_life() {
        let mut c = Cluster::new(&[2]);
        c.run(Duration::from_millis(100));
        c.cut.insert(2);
        let now = c.now;
        c.servers
            .get_mut(&1)
            .unwrap()
            .m
            .link_down(2, Duration::from_millis(30), now);
        c.settle();
        assert_eq!(c.alive_in(1), vec![1]);
        assert_eq!(c.servers[&1].recovered.len(), 2);
        // The member loses its coordinator too (silence), and tries to join again.
        c.run(Duration::from_secs(1));
        assert!(c.servers[&2].m.coordinator_session().is_none());
        c.cut.clear();
        c.run(Duration::from_millis(600));
        assert_eq!(c.servers[&2].fences, 1, "fenced on its return");
        assert!(c.servers[&1].notes.iter().any(|n| n.contains("fenced")));
        let old = 1;
        assert!(c.servers[&2].m.incarnation() > old);
        // It waits for its killed processes before joining again.
        c.run(Duration::from_secs(1));
        assert_eq!(c.alive_in(1), vec![1], "not while its old lives run");
        assert!(c.servers.get_mut(&2).unwrap().m.process_died(2));
        assert!(c.servers.get_mut(&2).unwrap().m.process_died(3));
        assert!(!c.servers.get_mut(&2).unwrap().m.process_died(3));
        c.run(Duration::from_secs(1));
        assert_eq!(c.alive_in(1), vec![1, 2], "joined again");
        let inc = c.servers[&1].m.view().servers[1].incarnation;
        assert_eq!(inc, c.servers[&2].m.incarnation(), "as its new life");
        assert_eq!(c.servers[&2].fences, 1);
    }

    /// A member whose session with the coordinator breaks stops dispatching to the
    /// coordinator's runtimes, has its local processes told again, and rejoins; the
    /// coordinator has taken its flows over meanwhile, so it rejoins fenced, as a new life.
    #[test]
    fn a_member_that_loses_its_coordinator_rejoins() {
        let mut c = Cluster::new(&[2]);
        c.run(Duration::from_millis(100));
        let (mine, _, _) = c.servers[&2].session.unwrap();
        let now = c.now;
        let m = &mut c.servers.get_mut(&2).unwrap().m;
        m.session_down(mine, "connection reset".into(), now);
        let mut renotified = false;
        let mut closed = false;
        while let Some(a) = m.poll() {
            match a {
                Action::ViewChanged { alive, renotify } => {
                    assert_eq!(
                        alive,
                        vec![2],
                        "the coordinator's server is not dispatched to"
                    );
                    renotified |= renotify;
                }
                Action::Close { session } => closed |= session == mine,
                _ => {}
            }
        }
        assert!(renotified && closed);
        // The coordinator sees the session close too; after `rejoin_every` it joins again.
        let (_, theirs, _) = c.servers.get_mut(&2).unwrap().session.take().unwrap();
        c.servers
            .get_mut(&1)
            .unwrap()
            .m
            .session_down(theirs, "closed".into(), now);
        c.settle();
        assert_eq!(
            c.servers[&1].recovered.len(),
            2,
            "its flows recovered elsewhere"
        );
        // So it comes back fenced (its old flows have owners elsewhere), and joins as a
        // new life once its runtimes died.
        c.run(Duration::from_millis(700));
        assert_eq!(c.servers[&2].fences, 1);
        assert_eq!(c.alive_in(1), vec![1]);
        for slot in [2, 3] {
            c.servers.get_mut(&2).unwrap().m.process_died(slot);
        }
        c.run(Duration::from_millis(100));
        assert_eq!(c.alive_in(2), vec![1, 2]);
        assert_eq!(c.alive_in(1), vec![1, 2]);
    }

    /// Joins the coordinator must refuse: its own server id, a chain defined differently,
    /// a server id another live host holds.
    #[test]
    fn conflicting_joins_are_refused() {
        let now = Instant::now();
        let mut coord = Membership::new(
            COORD,
            "s1".into(),
            1,
            Start::Coordinator,
            settings(true),
            runtimes(COORD),
            now,
        );
        while coord.poll().is_some() {}
        let join = |server: u16, incarnation: u64, digest: u8, host: u16| JoinInfo {
            server,
            name: format!("s{server}"),
            incarnation,
            endpoints: runtimes(server),
            chains: vec![("web".into(), [digest; 32])],
            addr: addr(host),
        };
        let refused = |m: &mut Membership| {
            let mut reason = None;
            let mut closed = false;
            while let Some(a) = m.poll() {
                match a {
                    Action::Send {
                        msg: PeerMsg::Reject { reason: r },
                        ..
                    } => reason = Some(r),
                    Action::Close { .. } => closed = true,
                    Action::Send {
                        msg: PeerMsg::Welcome { .. },
                        ..
                    } => return None,
                    _ => {}
                }
            }
            assert!(closed || reason.is_none());
            reason
        };
        coord.join_request(10, join(COORD, 1, 7, 9), now);
        assert!(refused(&mut coord).unwrap().contains("coordinator's"));
        coord.join_request(11, join(2, 1, 8, 2), now);
        assert!(refused(&mut coord).unwrap().contains("defined differently"));
        coord.join_request(12, join(2, 1, 7, 2), now);
        assert_eq!(refused(&mut coord), None, "welcomed");
        // Another host claiming server 2 while it is alive, in another life.
        coord.join_request(13, join(2, 5, 7, 3), now);
        assert!(refused(&mut coord).unwrap().contains("already a member"));
        // Server 2 itself restarted (same host, new life): it replaces the old session.
        coord.join_request(14, join(2, 6, 7, 2), now);
        let mut closed_old = false;
        let mut welcomed = false;
        while let Some(a) = coord.poll() {
            match a {
                Action::Close { session: 12 } => closed_old = true,
                Action::Send {
                    session: 14,
                    msg: PeerMsg::Welcome { view, .. },
                } => {
                    welcomed = view
                        .servers
                        .iter()
                        .any(|s| s.server == 2 && s.incarnation == 6)
                }
                _ => {}
            }
        }
        assert!(closed_old && welcomed);
        assert_eq!(coord.session_to(2), Some(14));
        assert_eq!(coord.server_of(14), Some(2));
    }

    /// The coordinator's nfmgr is killed and started again (a new incarnation, its view
    /// versions from 1 again): the members lose it, rejoin, and follow its views, though
    /// their numbers are lower than the ones they held (issue 25's finding: members kept
    /// the old life's view with the coordinator's server dead).
    #[test]
    fn members_follow_a_restarted_coordinator() {
        let mut c = Cluster::new(&[2, 3]);
        c.run(Duration::from_millis(100));
        // Views go up to some version under the first life: a runtime of server 2 stops
        // and starts again, three times.
        for _ in 0..3 {
            for alive in [false, true] {
                let now = c.now + Duration::from_millis(200);
                c.now = now;
                let mut eps = runtimes(2);
                eps[0].alive = alive;
                c.servers.get_mut(&2).unwrap().m.tick(now, eps);
                c.settle();
                c.run(Duration::from_millis(100));
            }
        }
        let old = c.servers[&2].m.view().stamp();
        assert!(old.1 > 3, "{old:?}");
        // The coordinator restarts: a fresh membership, a later incarnation.
        c.restart_coordinator(2, None);
        assert_eq!(
            c.alive_in(2),
            vec![2, 3],
            "the lost coordinator is not dispatched to"
        );
        c.run(Duration::from_millis(700));
        for id in [2, 3] {
            let v = c.servers[&id].m.view();
            assert_eq!(c.alive_in(id), vec![1, 2, 3], "server {id}");
            assert_eq!(v.epoch, 2);
            assert!(v.version < old.1, "its versions started again");
        }
    }

    /// A member's endpoints that change reach the coordinator with the next heartbeat, and
    /// every member with the next view.
    #[test]
    fn changed_endpoints_reach_every_view() {
        let mut c = Cluster::new(&[2, 3]);
        c.run(Duration::from_millis(100));
        let before = c.servers[&3].m.view().version;
        // Server 2's rt3 stops.
        let now = c.now + Duration::from_millis(200);
        c.now = now;
        let mut eps = runtimes(2);
        eps[1].alive = false;
        c.servers.get_mut(&2).unwrap().m.tick(now, eps.clone());
        c.settle();
        let v = c.servers[&3].m.view();
        assert!(v.version > before);
        assert_eq!(v.runtimes_of(Some("web")).len(), 5);
    }

    /// The servers of a view other than `but`, as they are (lives, endpoints, liveness).
    fn servers_but(v: &ClusterView, but: u16) -> Vec<ServerInfo> {
        v.servers
            .iter()
            .filter(|s| s.server != but)
            .cloned()
            .collect()
    }

    /// A coordinator killed and started again from its journal is followed by every
    /// member with the same view (the members as they were), the same placement and
    /// versions that go on; nothing of the members' is recovered, and only the flows of the
    /// coordinator's own previous life are, by each member as it comes back. Without the
    /// journal the versions start again and the members are new to the coordinator.
    #[test]
    fn a_coordinator_restarted_from_its_journal_carries_on_where_it_stopped() {
        let mut c = Cluster::new(&[2, 3]);
        c.run(Duration::from_millis(300));
        let before = c.servers[&2].m.view().clone();
        let placement = before.runtimes_of(Some("web"));
        let journal = c.servers[&1].m.journal().unwrap();
        assert_eq!(journal.view, *c.servers[&1].m.view());
        c.restart_coordinator(2, Some(journal));
        // Until they are back, the members count as alive: the coordinator's own
        // processes keep dispatching to them.
        assert_eq!(c.alive_in(1), vec![1, 2, 3]);
        c.run(Duration::from_millis(700));
        for id in [1, 2, 3] {
            let v = c.servers[&id].m.view();
            assert_eq!(c.alive_in(id), vec![1, 2, 3], "server {id}");
            assert_eq!(v.epoch, 2, "server {id}");
            // One new version (the restored view); the members coming back changed
            // nothing.
            assert_eq!(v.version, before.version + 1, "server {id}: versions go on");
            assert_eq!(servers_but(v, 1), servers_but(&before, 1), "server {id}");
            assert_eq!(v.runtimes_of(Some("web")), placement, "server {id}");
            assert_eq!(
                v.server(1).unwrap().incarnation,
                2,
                "the coordinator's new life"
            );
        }
        let coord = &c.servers[&1];
        assert!(coord.recovered.is_empty(), "{:?}", coord.recovered);
        assert!(coord.recovered_by.is_empty(), "{:?}", coord.recovered_by);
        // Each member has its own runtimes take over the old life's flows, before it
        // takes the view (which lets the new life's frames through), and gives its
        // processes the view again.
        let old = [EndpointAddr::new(1, 2), EndpointAddr::new(1, 3)];
        for s in [2, 3] {
            let mut by = c.servers[&s].recovered_by.clone();
            by.sort();
            assert_eq!(
                by,
                old.iter().map(|r| (*r, s)).collect::<Vec<_>>(),
                "server {s}"
            );
            assert!(c.servers[&s].renotified > 0, "server {s}");
        }
        assert_eq!(c.servers[&2].fences + c.servers[&3].fences, 0);
        // Members that came back do not count against the grace.
        c.run(GRACE);
        assert_eq!(c.alive_in(1), vec![1, 2, 3]);
        assert!(c.servers[&1].recovered.is_empty());
    }

    /// A member that does not come back to a coordinator restarted from its journal is
    /// dead once the grace has passed, not before, and its flows are recovered.
    #[test]
    fn a_member_that_does_not_come_back_after_the_restart_is_dead_after_the_grace() {
        let mut c = Cluster::new(&[2, 3]);
        c.run(Duration::from_millis(300));
        let journal = c.servers[&1].m.journal().unwrap();
        c.servers.get_mut(&3).unwrap().up = false;
        c.restart_coordinator(2, Some(journal));
        c.run(GRACE - Duration::from_millis(100));
        assert_eq!(c.alive_in(1), vec![1, 2, 3], "not before the grace");
        c.run(Duration::from_millis(200));
        assert_eq!(c.alive_in(1), vec![1, 2]);
        assert_eq!(c.alive_in(2), vec![1, 2]);
        let recovered = c.recovered_at(1);
        assert_eq!(
            recovered,
            vec![EndpointAddr::new(3, 2), EndpointAddr::new(3, 3)]
        );
        let down = c.servers[&1].m.members()[&3].down.clone().unwrap();
        assert!(down.why.contains("restart"), "{}", down.why);
    }

    /// A member whose nfmgr restarted while the coordinator was away comes back as a new
    /// life: its previous life's flows are recovered, and the view has the new one.
    #[test]
    fn a_member_restarted_while_the_coordinator_was_away_has_its_old_life_recovered() {
        let mut c = Cluster::new(&[2, 3]);
        c.run(Duration::from_millis(300));
        let journal = c.servers[&1].m.journal().unwrap();
        let now = c.now;
        c.restart_coordinator(2, Some(journal));
        c.servers.get_mut(&2).unwrap().m = Membership::new(
            2,
            "s2".into(),
            7,
            Start::Member(Some(addr(COORD))),
            settings(true),
            runtimes(2),
            now,
        );
        c.run(Duration::from_millis(700));
        assert_eq!(c.alive_in(3), vec![1, 2, 3]);
        assert_eq!(c.servers[&3].m.view().server(2).unwrap().incarnation, 7);
        let recovered = c.recovered_at(1);
        assert_eq!(
            recovered,
            vec![EndpointAddr::new(2, 2), EndpointAddr::new(2, 3)]
        );
        assert!(
            c.servers[&2].recovered_by.is_empty(),
            "a new life holds no copies of the coordinator's old one"
        );
        // Its old life's flows are taken over by the others' runtimes, never by its new
        // life's (which hold copies of their own live flows).
        assert!(
            c.servers[&1]
                .recover_on
                .iter()
                .all(|on| *on == RecoverOn::AllBut(2)),
            "{:?}",
            c.servers[&1].recover_on
        );
    }

    /// The journal's epoch orders the restarted coordinator's views even when its clock
    /// went back (its incarnation is lower than the last life's); a journal of another
    /// server, or given to a member, is refused.
    #[test]
    fn the_journal_keeps_epochs_growing_and_is_refused_where_it_does_not_belong() {
        let mut c = Cluster::new(&[2]);
        c.run(Duration::from_millis(300));
        let mut journal = c.servers[&1].m.journal().unwrap();
        journal.view.epoch = 50;
        c.restart_coordinator(3, Some(journal.clone()));
        c.run(Duration::from_millis(700));
        assert_eq!(c.servers[&2].m.view().epoch, 51);
        assert_eq!(c.alive_in(2), vec![1, 2]);

        let now = c.now;
        let mut other = Membership::new(
            9,
            "s9".into(),
            1,
            Start::Coordinator,
            settings(true),
            vec![],
            now,
        );
        let e = other.restore(journal.clone(), now).unwrap_err();
        assert_eq!(e, RestoreError::OtherServer { journal: 1, me: 9 });
        assert!(e.to_string().contains("server 1"), "{e}");
        assert!(c
            .servers
            .get_mut(&2)
            .unwrap()
            .m
            .restore(journal, now)
            .is_err());
        assert!(c.servers[&2].m.journal().is_none(), "members keep none");
    }

    /// A member's process dies: the coordinator's view, and every member's, has it at
    /// once (before any recovery is asked), not at the next heartbeat.
    #[test]
    fn a_members_changed_endpoints_reach_every_view_at_once() {
        let mut c = Cluster::new(&[2, 3]);
        c.run(Duration::from_millis(300));
        let before = c.servers[&3].m.view().version;
        let mut eps = runtimes(2);
        eps[0].alive = false;
        c.servers
            .get_mut(&2)
            .unwrap()
            .m
            .endpoints_changed(eps.clone());
        c.settle();
        for id in [1, 3] {
            let v = c.servers[&id].m.view();
            assert_eq!(v.version, before + 1, "server {id}");
            let e = v.server(2).unwrap().endpoints[0].clone();
            assert_eq!(
                (e.addr, e.alive),
                (EndpointAddr::new(2, 2), false),
                "server {id}"
            );
        }
        // Told again, nothing changes.
        c.servers.get_mut(&2).unwrap().m.endpoints_changed(eps);
        c.settle();
        assert_eq!(c.servers[&3].m.view().version, before + 1);
    }

    /// etcd: the coordinator's server dies; etcd elects a member, which carries on from
    /// the journal, has the dead server's flows recovered at once (the cluster link no
    /// longer carries it), and is joined by the other member with nothing else changing.
    #[test]
    fn an_elected_member_carries_on_and_recovers_the_dead_coordinators_flows() {
        let mut c = Cluster::new(&[2, 3]);
        c.run(Duration::from_millis(300));
        let journal = c.servers[&1].m.journal().unwrap();
        let old = c.servers[&3].m.view().stamp();
        c.kill(1, false);
        // Until etcd elects another, the members hold their views (the data plane goes
        // on); the coordinator's server is out of their dispatch.
        assert_eq!(c.alive_in(3), vec![2, 3]);
        c.run(Duration::from_millis(500));
        assert!(
            c.servers[&2].recovered.is_empty(),
            "no coordinator, no recovery"
        );
        c.elect(2, Some(journal));
        c.run(Duration::from_millis(300));
        assert!(c.servers[&2].m.is_coordinator());
        assert!(!c.servers[&3].m.is_coordinator());
        let recovered = c.recovered_at(2);
        assert_eq!(
            recovered,
            vec![EndpointAddr::new(1, 2), EndpointAddr::new(1, 3)]
        );
        assert!(c.servers[&2]
            .recover_on
            .iter()
            .all(|on| *on == RecoverOn::AllBut(1)));
        for id in [2, 3] {
            let v = c.servers[&id].m.view();
            assert_eq!(c.alive_in(id), vec![2, 3], "server {id}");
            assert_eq!(v.coordinator, 2, "server {id}");
            assert!(
                v.stamp() > old,
                "server {id}: a newer epoch than the dead one's"
            );
            assert_eq!(
                v.server(3).unwrap().incarnation,
                1,
                "server 3 kept its life"
            );
        }
        assert!(c.servers[&3].session.is_some_and(|(_, _, at)| at == 2));
        assert_eq!(c.servers[&3].fences, 0);
        assert!(c.servers[&3].recovered_by.is_empty());
    }

    /// etcd: a coordinator cut off from etcd pauses: it keeps its sessions and
    /// heartbeats, so no server loses its view or stops dispatching, and declares no
    /// death; once etcd elects another it follows it and joins in the life it had (not
    /// fenced, nothing recovered).
    #[test]
    fn a_paused_coordinator_changes_nothing_then_follows_the_new_one() {
        let mut c = Cluster::new(&[2, 3]);
        c.run(Duration::from_millis(300));
        let journal = c.servers[&1].m.journal().unwrap();
        let before = c.servers[&3].m.view().stamp();
        c.servers
            .get_mut(&1)
            .unwrap()
            .m
            .pause("lease lapsed".into());
        c.settle();
        assert!(
            c.servers[&1].m.journal().is_none(),
            "a paused coordinator writes none"
        );
        c.run(Duration::from_secs(2));
        for id in [2, 3] {
            assert_eq!(c.servers[&id].m.view().stamp(), before, "server {id}");
            assert_eq!(c.alive_in(id), vec![1, 2, 3], "server {id}");
        }
        // A member lost meanwhile is not declared dead by the paused coordinator.
        c.kill(3, true);
        c.run(Duration::from_secs(1));
        assert!(c.servers[&1].recovered.is_empty());
        assert_eq!(c.alive_in(1), vec![1, 2, 3]);
        // etcd elects server 2: it carries on; server 1 follows and joins again.
        c.elect(2, Some(journal));
        c.run(Duration::from_millis(500));
        assert!(!c.servers[&1].m.is_coordinator());
        assert!(c.servers[&1].session.is_some_and(|(_, _, at)| at == 2));
        assert_eq!(c.servers[&1].fences, 0);
        let v = c.servers[&1].m.view();
        assert_eq!(v.coordinator, 2);
        assert!(v.stamp() > before);
        assert_eq!(v.server(1).unwrap().incarnation, 1);
        // Server 3, dead and silent on the link, is recovered by the new coordinator.
        assert_eq!(c.alive_in(2), vec![1, 2]);
        let recovered = c.recovered_at(2);
        assert_eq!(
            recovered,
            vec![EndpointAddr::new(3, 2), EndpointAddr::new(3, 3)]
        );
        assert!(c.servers[&1].recovered.is_empty());
    }

    /// etcd: a paused coordinator elected again resumes under a newer epoch; a member
    /// whose session ended while it was paused has the restore grace to come back, then
    /// is declared dead.
    #[test]
    fn a_paused_coordinator_elected_again_resumes() {
        let mut c = Cluster::new(&[2, 3]);
        c.run(Duration::from_millis(300));
        let before = c.servers[&2].m.view().stamp();
        c.servers
            .get_mut(&1)
            .unwrap()
            .m
            .pause("etcd unreachable".into());
        c.settle();
        // Server 3 dies with the link watch off: only its session ends.
        c.servers.get_mut(&3).unwrap().up = false;
        let (_, theirs, _) = c.servers.get_mut(&3).unwrap().session.take().unwrap();
        let now = c.now;
        c.servers
            .get_mut(&1)
            .unwrap()
            .m
            .session_down(theirs, "connection reset".into(), now);
        c.settle();
        assert!(c.servers[&1].recovered.is_empty());
        let journal = Journal {
            view: c.servers[&1].m.view().clone(),
            addrs: Vec::new(),
        };
        c.elect(1, Some(journal));
        assert!(c.servers[&1].m.is_coordinator() && !c.servers[&1].m.paused());
        assert!(
            c.servers[&2].m.view().stamp() > before,
            "a view of the new epoch"
        );
        assert_eq!(c.alive_in(2), vec![1, 2, 3], "3 has the grace to come back");
        c.run(Duration::from_millis(3_100));
        assert_eq!(c.alive_in(2), vec![1, 2]);
        let recovered = c.recovered_at(1);
        assert_eq!(
            recovered,
            vec![EndpointAddr::new(3, 2), EndpointAddr::new(3, 3)]
        );
    }

    /// What a member heard of the cluster link about a server goes stale once the view
    /// drops that server: cut off, declared dead and back in a new life, it is not
    /// declared dead again by the next coordinator etcd elects.
    #[test]
    fn a_server_back_after_a_cut_is_not_declared_dead_by_the_next_coordinator() {
        let mut c = Cluster::new(&[2, 3]);
        c.run(Duration::from_millis(300));
        let now = c.now;
        c.servers
            .get_mut(&2)
            .unwrap()
            .m
            .link_down(3, Duration::from_millis(40), now);
        c.cut.insert(3);
        c.run(Duration::from_secs(1));
        assert_eq!(c.alive_in(2), vec![1, 2], "3 declared dead while cut");
        c.cut.clear();
        c.run(Duration::from_secs(7));
        assert_eq!(c.alive_in(2), vec![1, 2, 3], "3 back in a new life");
        let journal = c.servers[&1].m.journal().unwrap();
        let before = c.servers[&2].recovered.len();
        c.kill(1, false);
        c.elect(2, Some(journal));
        c.run(Duration::from_millis(300));
        let recovered = &c.servers[&2].recovered[before..];
        assert!(
            recovered.iter().all(|r| r.server == 1),
            "only the dead coordinator's flows: {recovered:?}"
        );
        assert_eq!(c.alive_in(2), vec![2, 3]);
    }

    /// A member cut off and declared dead, then elected by etcd while still in that
    /// life, restarts its processes empty under a new life before it coordinates: its
    /// flows were taken over elsewhere.
    #[test]
    fn an_elected_member_the_cluster_declared_dead_restarts_empty_first() {
        let mut c = Cluster::new(&[2, 3]);
        c.run(Duration::from_millis(300));
        c.cut.insert(2);
        c.run(Duration::from_secs(1));
        assert_eq!(c.alive_in(1), vec![1, 3]);
        let journal = c.servers[&1].m.journal().unwrap();
        c.kill(1, true);
        c.cut.clear();
        let life = c.servers[&2].m.incarnation();
        c.elect(2, Some(journal));
        c.run(Duration::from_millis(500));
        assert_eq!(c.servers[&2].fences, 1);
        assert!(c.servers[&2].m.incarnation() > life);
        let me = c.servers[&2].m.view().server(2).unwrap().clone();
        assert!(me.alive && me.incarnation > life, "{me:?}");
        assert_eq!(c.alive_in(3), vec![2, 3]);
    }
}

//! Per-flow dispatch: which runtime each flow goes to (the paper's vswitch actors).
//!
//! A new flow is steered to a service chain by the first `[[steer]]` rule its first packet
//! matches (NFLambda's match -> tag -> chain), else the vswitch's default chain, and given to
//! the next live runtime of that chain, round-robin. Every later packet of the flow, either
//! direction, and packets under aliases the runtime registered, go to the same runtime. The
//! frame's destination MAC becomes the runtime's input MAC on the way (the original is kept
//! in the buffer's metadata and restored by the runtime).

use std::time::{Duration, Instant};

use nflib::buffer::DESC_REMOTE;
use nflib::cluster::{ClusterView, TransportCounters, Workload};
use nflib::config::{Config, DispatchScope, Match, MatchInput};
use nflib::endpoint::Endpoint;
use nflib::flow::FlowKey;
use nflib::frame::{EndpointAddr, LIAISON};
use nflib::mailbox::{Envelope, Mailbox};
use nflib::msg::{Call, Message, Reply};
use nflib::packet::{self, arp, Headers, ParseError, L3};
use nflib::slot::SlotState;
use nflib::stats::ProcCounter;
use nflib::{Packet, Region, MANAGER_SLOT};

use crate::flowmap::{FlowMap, SWEEP_SLICES};

/// Each flow is looked at for expiry about once per this period, one slice of the table at a
/// time.
const SWEEP_PERIOD: Duration = Duration::from_secs(1);
/// Slices one loop may sweep when it is behind (a vswitch that slept): catching up on the
/// whole table at once would be the stall the slices avoid.
const MAX_SWEEPS_PER_LOOP: usize = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NonIp {
    Pass,
    Drop,
}

struct Entry {
    runtime: EndpointAddr,
    /// When the flow last had a packet: milliseconds since the dispatcher started,
    /// wrapping (see `age_ms`).
    last_ms: u32,
    /// Packets given to `runtime` under this key since it was set (wrapping): a migrating
    /// source learns from it how many packets to wait for (`RuntimeSet::sent`).
    sent: u32,
    /// A runtime registered the key (`AddAliases`): a translation it made. Otherwise the
    /// vswitch chose the runtime for a packet of an unknown key.
    alias: bool,
}

/// Whether `until` is still ahead of `now_ms` on the dispatcher's wrapping clock.
fn is_ahead(now_ms: u32, until: u32) -> bool {
    let d = until.wrapping_sub(now_ms);
    d != 0 && d < 1 << 31
}

/// Milliseconds from `last_ms` to `now_ms` on the dispatcher's wrapping clock. A time
/// "after" now (stamped by a message handled after the packet loop read the clock) is an
/// age of 0, not of 49 days: idle entries are swept long before ages come near 2^31.
fn age_ms(now_ms: u32, last_ms: u32) -> u32 {
    let age = now_ms.wrapping_sub(last_ms);
    if age > 1 << 31 {
        0
    } else {
        age
    }
}

pub struct Dispatch {
    me: EndpointAddr,
    /// Keyed with per-process random seeds: flow keys come from the wire, and a fixed hash
    /// would let a sender collide them on purpose.
    table: FlowMap<Entry>,
    /// When the next slice of `table` is due for its expiry sweep.
    next_sweep: Instant,
    steering: Vec<(Match, usize)>,
    default_chain: Option<usize>,
    /// Chain names by index (the last, `None`, groups runtimes without a chain).
    chains: Vec<Option<String>>,
    /// Runtime slots of this server among this vswitch's targets, per chain.
    local: Vec<Vec<u16>>,
    /// Runtimes of other servers, per chain, from the cluster view.
    remote: Vec<Vec<EndpointAddr>>,
    scope: DispatchScope,
    /// Targets alive now, per chain.
    live: Vec<Vec<EndpointAddr>>,
    next: Vec<usize>,
    non_ip: NonIp,
    timeout: Duration,
    /// Most entries `table` holds (`max_flows`).
    max_flows: usize,
    /// Packets per local slot; slot 0 (nfmgr) carries those for other servers.
    stage: Vec<Vec<Packet>>,
    /// A burst's parsed headers, keys and key hashes (kept for its room).
    parsed: Vec<Result<(Headers, FlowKey, u64), ParseError>>,
    epoch: Instant,
    view_version: u64,
    /// Messages it did not understand.
    pub unknown: u64,
    /// Per chain: its flows are replicated, so a dead runtime's flows are recovered
    /// elsewhere and must not be dispatched anew meanwhile.
    replicated: Vec<bool>,
    /// Local target slots as last seen: (slot, generation, up).
    seen: Vec<(u16, u32, bool)>,
    /// Runtimes that died recently, with when their flows' wait ends (ms).
    recovering: Vec<(EndpointAddr, u32)>,
    recovery_wait_ms: u32,
    /// This life's table being rebuilt from the runtimes (an earlier life died with it).
    rebuild: Option<Rebuild>,
    /// Whether this vswitch is in a cluster (its remote runtimes come with the first view).
    clustered: bool,
}

/// A restarted vswitch asks the runtimes it feeds for their flows (`FeedQuery`) and, until
/// all have answered or `rebuild_wait_ms` passed, holds the packets of keys it does not know
/// rather than dispatch them afresh: a live flow sent to another runtime would start again
/// there, its state left behind.
struct Rebuild {
    request: u64,
    /// Runtimes asked that have not answered in full.
    waiting: Vec<EndpointAddr>,
    /// Runtimes asked (those of the cluster view are asked when it comes).
    asked: Vec<EndpointAddr>,
    /// Whether the cluster view came (or there is no cluster).
    view: bool,
    until_ms: u32,
    held: Vec<(FlowKey, Packet)>,
    /// Keys with packets in `held`: their later packets are held too, even once the key is
    /// learnt, until those go (a flow's packets leave in the order they came).
    held_keys: std::collections::HashSet<FlowKey>,
    /// Keys were learnt since held packets were last looked at.
    fresh: bool,
    /// Flows and aliases learnt.
    learnt: u64,
    started: Instant,
}

/// Most packets a rebuilding vswitch holds; more are dispatched as they come.
const REBUILD_MAX_HELD: usize = 8192;

/// Where a known flow's packet goes.
enum Known {
    To(EndpointAddr),
    /// Its runtime died and the flow is being recovered: drop it (the sender retransmits).
    Hold,
    /// Unknown, or its runtime is gone for good: dispatch it as new.
    New,
}

/// Whether `rt` is among the live local or the remote targets.
fn targets_live(
    live: &[Vec<EndpointAddr>],
    remote: &[Vec<EndpointAddr>],
    rt: EndpointAddr,
) -> bool {
    live.iter().any(|l| l.contains(&rt)) || remote.iter().any(|r| r.contains(&rt))
}

/// What steering looks at in a flow's first packet.
fn match_input(h: &Headers, frame: &[u8]) -> MatchInput {
    if let Some(a) = arp::parse(h, frame) {
        return MatchInput {
            arp: true,
            src: FlowKey::v4(a.spa),
            dst: FlowKey::v4(a.tpa),
            ..MatchInput::default()
        };
    }
    MatchInput {
        ip: h.is_ip(),
        arp: false,
        v6: h.l3 == L3::Ipv6,
        src: h.src_ip,
        dst: h.dst_ip,
        proto: h.proto,
        src_port: h.src_port,
        dst_port: h.dst_port,
    }
}

impl Dispatch {
    /// Builds the dispatcher of the vswitch in slot `me` from the configuration.
    pub fn new(region: &Region, me: u16, cfg: &Config) -> Result<Dispatch, String> {
        let name = region.slot(me).map(|s| s.name.get()).unwrap_or_default();
        let vc = cfg
            .vswitch(&name)
            .ok_or_else(|| format!("no vswitch named `{name}` in the configuration"))?;
        // Chains by index; runtimes without a chain form one more, unnamed group.
        let mut chains: Vec<Option<String>> =
            cfg.chains.iter().map(|c| Some(c.name.clone())).collect();
        chains.push(None);
        let mut local = vec![Vec::new(); chains.len()];
        let targets = region.slot(me).map(|s| s.targets()).unwrap_or(0);
        for s in 0..region.slot_count().min(64) {
            if targets & (1u64 << s) == 0 {
                continue;
            }
            let rname = region.slot(s).map(|r| r.name.get()).unwrap_or_default();
            let Some(rc) = cfg.runtime(&rname) else {
                continue;
            };
            let chain = cfg.chain_of(rc).map(str::to_string);
            if let Some(i) = chains.iter().position(|c| *c == chain) {
                local[i].push(s);
            }
        }
        let index = |n: &str| chains.iter().position(|c| c.as_deref() == Some(n));
        let steering = cfg
            .steering
            .iter()
            .filter_map(|r| index(&r.chain).map(|i| (r.matches.clone(), i)))
            .collect();
        let served: Vec<usize> = (0..chains.len())
            .filter(|i| !local[*i].is_empty())
            .collect();
        let default_chain = match &vc.default_chain {
            Some(c) => index(c),
            None if served.len() == 1 => Some(served[0]),
            None => None,
        };
        let n = chains.len();
        let mut d = Dispatch {
            me: EndpointAddr::new(cfg.cluster.server_id, me),
            table: FlowMap::default(),
            next_sweep: Instant::now() + SWEEP_PERIOD,
            steering,
            default_chain,
            chains,
            local,
            remote: vec![Vec::new(); n],
            scope: vc.scope,
            live: vec![Vec::new(); n],
            next: vec![0; n],
            non_ip: match vc.non_ip {
                nflib::config::NonIpPolicy::Pass => NonIp::Pass,
                nflib::config::NonIpPolicy::Drop => NonIp::Drop,
            },
            timeout: Duration::from_millis(vc.flow_timeout_ms),
            max_flows: vc.max_flows as usize,
            stage: (0..region.slot_count()).map(|_| Vec::new()).collect(),
            parsed: Vec::new(),
            epoch: Instant::now(),
            view_version: 0,
            unknown: 0,
            replicated: Vec::new(),
            seen: Vec::new(),
            recovering: Vec::new(),
            recovery_wait_ms: vc.recovery_wait_ms,
            rebuild: None,
            clustered: cfg.cluster.coordinator.is_some() || cfg.cluster.listen.is_some(),
        };
        d.replicated = d
            .chains
            .iter()
            .map(|c| {
                c.as_deref()
                    .and_then(|c| cfg.chain(c))
                    .is_some_and(|c| c.replication != nflib::config::ReplicationMode::Off)
            })
            .collect();
        d.refresh_targets(region);
        Ok(d)
    }

    /// A vswitch started in a slot an earlier life held (it died: its table with it) asks
    /// every live runtime it feeds for the flows they hold of its (`FeedQuery`) and holds
    /// unknown keys' packets until they answered, for at most `wait_ms`. A first life has
    /// nothing to rebuild.
    pub fn start_rebuild(&mut self, ep: &mut Endpoint, mb: &mut Mailbox, wait_ms: u32) {
        let generation = ep
            .region()
            .slot(self.me.slot)
            .map(|s| s.generation.load(std::sync::atomic::Ordering::Relaxed))
            .unwrap_or(0);
        if generation <= 1 || wait_ms == 0 {
            return;
        }
        let now_ms = self.now_ms(Instant::now());
        let request = u64::from(generation);
        let mut r = Rebuild {
            request,
            waiting: Vec::new(),
            asked: Vec::new(),
            view: !self.clustered,
            until_ms: now_ms.wrapping_add(wait_ms),
            held: Vec::new(),
            held_keys: Default::default(),
            fresh: false,
            learnt: 0,
            started: Instant::now(),
        };
        let targets: Vec<EndpointAddr> = self.live.iter().flatten().copied().collect();
        for rt in targets {
            Self::ask(&mut r, ep, mb, rt);
        }
        tracing::info!(
            runtimes = r.asked.len(),
            "restarted: asking the runtimes for the flows this vswitch fed"
        );
        self.rebuild = Some(r);
    }

    fn ask(r: &mut Rebuild, ep: &mut Endpoint, mb: &mut Mailbox, rt: EndpointAddr) {
        if r.asked.contains(&rt) {
            return;
        }
        r.asked.push(rt);
        let m = Message::FeedQuery { request: r.request };
        if mb.send(rt, LIAISON, LIAISON, &m).is_ok() {
            r.waiting.push(rt);
        } else {
            ep.counters().add(ProcCounter::ActorSendRefused as usize, 1);
        }
    }

    /// A runtime's answer to `FeedQuery`: its flows (and their aliases) go back to it.
    fn on_feeds(
        &mut self,
        from: EndpointAddr,
        request: u64,
        keys: Vec<FlowKey>,
        aliases: Vec<FlowKey>,
        done: bool,
        now_ms: u32,
    ) {
        let Some(r) = self.rebuild.as_mut() else {
            return;
        };
        if request != r.request || !r.asked.contains(&from) {
            return;
        }
        for (list, alias) in [(keys, false), (aliases, true)] {
            for key in list {
                // A key learnt from another runtime first, or dispatched meanwhile, stays.
                if self.table.get(&key).is_none() && self.table.len() < self.max_flows {
                    self.table.insert(
                        key,
                        Entry {
                            runtime: from,
                            last_ms: now_ms,
                            sent: 0,
                            alias,
                        },
                    );
                    r.learnt += 1;
                    r.fresh = true;
                }
            }
        }
        if done {
            r.waiting.retain(|a| *a != from);
        }
    }

    /// Sends on the held packets whose flows' runtimes have answered, in the order they
    /// came; ends a rebuild that is complete (every runtime asked answered, the view came)
    /// or out of time, sending on all it held (unknown keys as new flows). Called before a
    /// loop takes new packets. Returns the packets sent on, or 1 while a rebuild holds some
    /// (so that the loop keeps looking).
    pub fn finish_rebuild(&mut self, ep: &mut Endpoint, mb: &mut Mailbox, now: Instant) -> usize {
        let now_ms = self.now_ms(now);
        let Some(r) = self.rebuild.as_mut() else {
            return 0;
        };
        let complete = r.view && r.waiting.is_empty();
        if !complete && is_ahead(now_ms, r.until_ms) {
            if !r.fresh || r.held.is_empty() {
                return usize::from(!r.held.is_empty());
            }
            // Some flows are known now: theirs go, the others wait.
            r.fresh = false;
            let table = &self.table;
            let (go, stay): (Vec<_>, Vec<_>) = std::mem::take(&mut r.held)
                .into_iter()
                .partition(|(k, _)| table.get(k).is_some());
            r.held = stay;
            for (k, _) in &go {
                r.held_keys.remove(k);
            }
            let n = go.len();
            self.send_on(ep, mb, go, now);
            return n.max(1);
        }
        let Some(r) = self.rebuild.take() else {
            return 0;
        };
        let took = now.saturating_duration_since(r.started);
        tracing::info!(
            flows = r.learnt,
            unanswered = r.waiting.len(),
            held = r.held.len(),
            "table rebuilt from the runtimes in {:.1} ms",
            took.as_secs_f64() * 1000.0
        );
        // For nfmgr's event log (and the drills' reports): how long dispatch of unknown
        // keys paused, and what was learnt. The count last: nfmgr reports on its change.
        let c = ep.counters();
        c.set(
            ProcCounter::VswitchRebuildUs as usize,
            took.as_micros() as u64,
        );
        c.set(ProcCounter::VswitchRebuildFlows as usize, r.learnt);
        c.add(ProcCounter::VswitchRebuilds as usize, 1);
        let n = r.held.len();
        self.send_on(ep, mb, r.held, now);
        n
    }

    /// Dispatches held packets, in order, a burst at a time.
    fn send_on(
        &mut self,
        ep: &mut Endpoint,
        mb: &mut Mailbox,
        held: Vec<(FlowKey, Packet)>,
        now: Instant,
    ) {
        let mut it = held.into_iter().map(|(_, p)| (0u16, p)).peekable();
        while it.peek().is_some() {
            let mut batch: Vec<(u16, Packet)> = it.by_ref().take(nflib::endpoint::BATCH).collect();
            self.dispatch(ep, mb, &mut batch, now);
        }
    }

    /// Re-reads which runtimes are alive, and notes those of replicated chains that died
    /// or restarted since the last look (their flows are being recovered).
    pub fn refresh_targets(&mut self, region: &Region) {
        let now_ms = self.now_ms(Instant::now());
        self.recovering
            .retain(|(_, until)| is_ahead(now_ms, *until));
        for c in 0..self.chains.len() {
            if !self.replicated.get(c).copied().unwrap_or(false) {
                continue;
            }
            for &s in &self.local[c] {
                let Some(r) = region.slot(s) else {
                    continue;
                };
                let up = matches!(r.state(), SlotState::Running | SlotState::Starting);
                let gen = r.generation.load(std::sync::atomic::Ordering::Relaxed);
                match self.seen.iter_mut().find(|(slot, _, _)| *slot == s) {
                    Some(e) => {
                        let died = e.2 && (!up || e.1 != gen);
                        let restarted = !e.2 && up && e.1 != gen;
                        if died || restarted {
                            let addr = EndpointAddr::new(self.me.server, s);
                            // A restart seen without the death: the old life's flows
                            // still wait for recovery.
                            if died || !self.recovering.iter().any(|(a, _)| *a == addr) {
                                self.recovering.retain(|(a, _)| *a != addr);
                                self.recovering
                                    .push((addr, now_ms.wrapping_add(self.recovery_wait_ms)));
                            }
                        }
                        *e = (s, gen, up);
                    }
                    None => self.seen.push((s, gen, up)),
                }
            }
        }
        for c in 0..self.chains.len() {
            let live = &mut self.live[c];
            live.clear();
            for &s in &self.local[c] {
                let up = region
                    .slot(s)
                    .map(|r| matches!(r.state(), SlotState::Running | SlotState::Starting))
                    .unwrap_or(false);
                if up {
                    live.push(EndpointAddr::new(self.me.server, s));
                }
            }
            // `scope = "local"` keeps new flows on this server; flows can still be moved to
            // another server's runtimes (migration, recovery).
            if self.scope == DispatchScope::Cluster {
                live.extend_from_slice(&self.remote[c]);
            }
        }
    }

    /// Takes the runtimes of other servers from a cluster view (the coordinator's
    /// `NotifyClusterCfg`). Flows already dispatched keep their runtime while it lives.
    pub fn apply_view(&mut self, view: &ClusterView) {
        if view.version < self.view_version {
            return;
        }
        self.view_version = view.version;
        let now_ms = self.now_ms(Instant::now());
        for (c, chain) in self.chains.iter().enumerate() {
            let now: Vec<EndpointAddr> = view
                .runtimes_of(chain.as_deref())
                .into_iter()
                .filter(|r| r.server != self.me.server)
                .collect();
            if self.replicated.get(c).copied().unwrap_or(false) {
                for gone in self.remote[c].iter().filter(|r| !now.contains(r)) {
                    self.recovering.retain(|(a, _)| a != gone);
                    self.recovering
                        .push((*gone, now_ms.wrapping_add(self.recovery_wait_ms)));
                }
            }
            self.remote[c] = now;
        }
        if let Some(r) = self.rebuild.as_mut() {
            r.view = true;
        }
        if self.default_chain.is_none() {
            let cluster = self.scope == DispatchScope::Cluster;
            let served: Vec<usize> = (0..self.chains.len())
                .filter(|i| !self.local[*i].is_empty() || (cluster && !self.remote[*i].is_empty()))
                .collect();
            if served.len() == 1 {
                self.default_chain = Some(served[0]);
            }
        }
    }

    /// Reads messages (aliases to learn, flows to forget, control calls) and answers them.
    pub fn handle_messages(&mut self, ep: &mut Endpoint, mb: &mut Mailbox) -> usize {
        let now_ns = nflib::time::mono_ns();
        let n = mb.receive(ep, now_ns);
        for env in mb.take_inbox() {
            self.handle(ep, mb, env);
        }
        if n > 0 {
            self.refresh_targets(ep.region());
        }
        n
    }

    fn handle(&mut self, ep: &mut Endpoint, mb: &mut Mailbox, env: Envelope) {
        let now_ms = self.now_ms(Instant::now());
        let reply = match env.msg {
            Message::AddAliases { aliases, request } => {
                let mut refused = Vec::new();
                for (key, flow) in aliases {
                    if !self.add_alias(key, env.from, now_ms) {
                        refused.push((key, flow));
                    }
                }
                ep.counters()
                    .add(ProcCounter::AliasesRefused as usize, refused.len() as u64);
                (request != 0 || !refused.is_empty())
                    .then_some(Message::AliasesAdded { request, refused })
            }
            Message::FlowEnded {
                keys,
                aliases,
                idle_ms,
            } => {
                for k in &aliases {
                    self.forget(k, env.from, None);
                }
                // A key given a packet since the flow went idle is a new flow's: keep it.
                let recent = idle_ms / 2;
                for k in &keys {
                    self.forget(k, env.from, Some((now_ms, recent)));
                }
                None
            }
            Message::SetRuntime {
                keys,
                from,
                runtime,
                request,
            } if env.from != from
                && env.from != runtime
                && env.from != EndpointAddr::new(mb.me().server, nflib::MANAGER_SLOT) =>
            {
                // Flows move at the request of the runtime that gives them away (a
                // migration) or of the one that takes them (a takeover, a migration undone),
                // or of nfmgr, never of a third: a runtime cannot point two others' flows
                // around.
                ep.counters().add(ProcCounter::CallsRefused as usize, 1);
                Some(Message::RuntimeSet {
                    request,
                    moved: 0,
                    sent: vec![0; keys.len()],
                    unmoved: keys,
                })
            }
            Message::SetRuntime {
                keys,
                from,
                runtime,
                request,
            } => {
                let mut sent = Vec::with_capacity(keys.len());
                let mut unmoved = Vec::new();
                let moved = self.set_runtime(&keys, from, runtime, &mut sent, &mut unmoved);
                // A takeover's runtime has no use for the per-key counts (a migration's
                // target does): tens of thousands of them would only slow the answer. It
                // needs the keys that did not move instead: their flows are not its.
                if request & nflib::msg::RECOVERY_REQUEST != 0 {
                    sent = Vec::new();
                } else {
                    unmoved = Vec::new();
                }
                Some(Message::RuntimeSet {
                    request,
                    moved,
                    sent,
                    unmoved,
                })
            }
            Message::Feeds {
                request,
                keys,
                aliases,
                done,
            } => {
                self.on_feeds(env.from, request, keys, aliases, done, now_ms);
                None
            }
            Message::Ping { seq } => Some(Message::Pong {
                seq,
                flows: self.table.len() as u64,
            }),
            Message::Rpc { id, .. }
                if env.from != EndpointAddr::new(mb.me().server, nflib::MANAGER_SLOT) =>
            {
                // Control calls come from this server's nfmgr only (see the runtime's
                // liaison): a runtime must not rewrite the vswitch's view of the cluster.
                ep.counters().add(ProcCounter::CallsRefused as usize, 1);
                Some(Message::RpcReply {
                    id,
                    reply: Reply::Refused {
                        reason: "control calls are taken from this server's nfmgr only".into(),
                    },
                })
            }
            Message::Rpc { id, call } => {
                let reply = match call {
                    Call::NotifyClusterCfg(view) => {
                        self.apply_view(&view);
                        self.refresh_targets(ep.region());
                        // A rebuild asks the other servers' runtimes too, now it knows them.
                        if let Some(mut r) = self.rebuild.take() {
                            let remote: Vec<EndpointAddr> =
                                self.remote.iter().flatten().copied().collect();
                            for rt in remote {
                                Self::ask(&mut r, ep, mb, rt);
                            }
                            self.rebuild = Some(r);
                        }
                        Reply::ClusterCfgApplied {
                            version: view.version,
                        }
                    }
                    Call::PollWorkload => Reply::Workload(self.workload(ep, mb)),
                    _ => Reply::Refused {
                        reason: "a vswitch only dispatches: this call is for runtimes".into(),
                    },
                };
                Some(Message::RpcReply { id, reply })
            }
            _ => {
                self.unknown += 1;
                None
            }
        };
        if let Some(m) = reply {
            if mb.send(env.from, LIAISON, env.src_actor, &m).is_err() {
                ep.counters().add(ProcCounter::ActorSendRefused as usize, 1);
            }
        }
    }

    /// Milliseconds since the dispatcher started, wrapping.
    fn now_ms(&self, now: Instant) -> u32 {
        now.saturating_duration_since(self.epoch).as_millis() as u32
    }

    /// Makes `key` lead to `runtime`, unless it is another live runtime's alias: two
    /// translations under one key would get each other's replies, so the newcomer is
    /// refused (and told), never silently given the key. A key of a runtime no longer live,
    /// already the caller's, or only dispatched to another runtime (a packet that came
    /// before the translation that makes it a reply: a stray there, whose flow ends idle)
    /// is taken.
    fn add_alias(&mut self, key: FlowKey, runtime: EndpointAddr, now_ms: u32) -> bool {
        let (live, remote) = (&self.live, &self.remote);
        match self.table.get(&key) {
            Some(e) if e.alias && e.runtime != runtime && targets_live(live, remote, e.runtime) => {
                return false
            }
            Some(_) => {}
            // A new key in a full table is refused like a taken one (the flow ends).
            None if self.table.len() >= self.max_flows => return false,
            None => {}
        }
        self.table.insert(
            key,
            Entry {
                runtime,
                last_ms: now_ms,
                sent: 0,
                alias: true,
            },
        );
        true
    }

    /// Forgets `key` if `runtime` holds it, unless (with `keep_recent` = (now, window)) it
    /// was given a packet in the last `window` ms.
    fn forget(&mut self, key: &FlowKey, runtime: EndpointAddr, keep_recent: Option<(u32, u32)>) {
        let Some(e) = self.table.get(key) else {
            return;
        };
        if e.runtime != runtime {
            return;
        }
        if let Some((now_ms, window)) = keep_recent {
            if age_ms(now_ms, e.last_ms) < window {
                return;
            }
        }
        self.table.remove(key);
    }

    fn workload(&self, ep: &mut Endpoint, mb: &Mailbox) -> Workload {
        let c = ep.counters();
        Workload {
            flows_active: self.table.len() as u64,
            flows_created: c.get(ProcCounter::FlowsCreated as usize),
            rx_pkts: c.get(ProcCounter::RxPkts as usize),
            tx_pkts: c.get(ProcCounter::TxPkts as usize),
            busy_ns: c.get(ProcCounter::BusyNs as usize),
            uptime_ms: self.epoch.elapsed().as_millis() as u64,
            transport: TransportCounters::from(mb.transport().stats()),
            cluster_version: self.view_version,
            ..Workload::default()
        }
    }

    /// Points known flows sent to `from` at another runtime (one this vswitch dispatches
    /// to). Returns how many of the keys moved, and pushes to `sent`, per key, the packets
    /// given to the previous runtime since it was set (0 for a key that did not move;
    /// counting restarts for the new runtime). A key sent to a third runtime stays there:
    /// the requester's copy of it is stale (an alias the vswitch refused it).
    pub fn set_runtime(
        &mut self,
        keys: &[FlowKey],
        from: EndpointAddr,
        runtime: EndpointAddr,
        sent: &mut Vec<u32>,
        unmoved: &mut Vec<FlowKey>,
    ) -> u32 {
        let local = runtime.server == self.me.server
            && self.local.iter().any(|c| c.contains(&runtime.slot));
        if !local && !self.remote.iter().any(|c| c.contains(&runtime)) {
            sent.extend(keys.iter().map(|_| 0));
            unmoved.extend_from_slice(keys);
            return 0;
        }
        // Up to tens of thousands of keys, each two likely cache misses: the index line is
        // asked for `AHEAD` keys before it is needed and the entry half as far ahead, a
        // window that fits in the cache (prefetching every key first would evict the
        // first before they are used).
        const AHEAD: usize = 16;
        let hashes: Vec<u64> = keys.iter().map(|k| self.table.hash(k)).collect();
        for &h in hashes.iter().take(AHEAD) {
            self.table.prefetch_bucket(h);
        }
        let mut moved = 0;
        for (i, (k, &h)) in keys.iter().zip(&hashes).enumerate() {
            if let Some(&next) = hashes.get(i + AHEAD) {
                self.table.prefetch_bucket(next);
            }
            if let Some(&soon) = hashes.get(i + AHEAD / 2) {
                self.table.prefetch_entry(soon);
            }
            match self.table.get_mut_hashed(k, h) {
                Some(e) if e.runtime == from || e.runtime == runtime => {
                    sent.push(e.sent);
                    // Asking again for the runtime a key already has changes nothing (a
                    // repeated request must not restart the count).
                    if e.runtime != runtime {
                        e.runtime = runtime;
                        e.sent = 0;
                    }
                    moved += 1;
                }
                _ => {
                    sent.push(0);
                    unmoved.push(*k);
                }
            }
        }
        moved
    }

    fn chain_for(&self, h: &Headers, frame: &[u8]) -> Option<usize> {
        if self.steering.is_empty() {
            return self.default_chain;
        }
        let input = match_input(h, frame);
        self.steering
            .iter()
            .find(|(m, _)| m.matches(&input))
            .map(|(_, c)| *c)
            .or(self.default_chain)
    }

    fn pick(&mut self, chain: usize) -> Option<EndpointAddr> {
        let live = &self.live[chain];
        if live.is_empty() {
            return None;
        }
        if self.recovering.is_empty() {
            let rt = live[self.next[chain] % live.len()];
            self.next[chain] = self.next[chain].wrapping_add(1);
            return Some(rt);
        }
        // A runtime whose old flows wait for recovery takes no new ones meanwhile: their
        // packets would be held with the old ones'.
        let now_ms = self.now_ms(Instant::now());
        for _ in 0..live.len() {
            let rt = live[self.next[chain] % live.len()];
            self.next[chain] = self.next[chain].wrapping_add(1);
            if !self
                .recovering
                .iter()
                .any(|(a, until)| *a == rt && is_ahead(now_ms, *until))
            {
                return Some(rt);
            }
        }
        None
    }

    pub fn dispatch(
        &mut self,
        ep: &mut Endpoint,
        mb: &mut Mailbox,
        batch: &mut Vec<(u16, Packet)>,
        now: Instant,
    ) {
        let now_ms = self.now_ms(now);
        let region = ep.region().clone();
        // Each lookup is an index line and an entry, both likely cache misses at a million
        // flows: parse the burst and start loading every packet's index line, then every
        // entry, before the first lookup (the runtimes do the same with their flows).
        self.table.step();
        let mut parsed = std::mem::take(&mut self.parsed);
        parsed.clear();
        for (_, p) in batch.iter() {
            let r = packet::parse(region.data(p)).map(|h| {
                let (key, _) = FlowKey::of(&h);
                let hash = self.table.hash(&key);
                self.table.prefetch_bucket(hash);
                (h, key, hash)
            });
            parsed.push(r);
        }
        for (_, _, hash) in parsed.iter().flatten() {
            self.table.prefetch_entry(*hash);
        }
        for ((_, mut p), r) in batch.drain(..).zip(parsed.drain(..)) {
            let (h, key, hash) = match r {
                Ok(r) => r,
                Err(e) => {
                    let c = match e {
                        ParseError::Runt => ProcCounter::DropRunt,
                        ParseError::Truncated(_) => ProcCounter::DropTruncated,
                        ParseError::Malformed(..) => ProcCounter::DropMalformed,
                    };
                    ep.counters().add(c as usize, 1);
                    ep.free(p);
                    continue;
                }
            };
            if !h.is_ip() && self.non_ip == NonIp::Drop {
                ep.counters().add(ProcCounter::DropNonIp as usize, 1);
                ep.free(p);
                continue;
            }
            // A rebuilding vswitch holds a flow's packets while older ones of it wait.
            if let Some(r) = self.rebuild.as_mut() {
                if r.held_keys.contains(&key) && r.held.len() < REBUILD_MAX_HELD {
                    r.held.push((key, p));
                    continue;
                }
            }
            let mut known = self.known(&key, hash, now_ms);
            if matches!(known, Known::New) {
                // A runtime may have registered this key (an alias) just before the packet
                // that made it necessary left: read messages once more before deciding.
                self.handle_messages(ep, mb);
                known = self.known(&key, hash, now_ms);
            }
            let runtime = match known {
                Known::To(rt) => rt,
                Known::Hold => {
                    ep.counters()
                        .add(ProcCounter::DropAwaitingRecovery as usize, 1);
                    ep.free(p);
                    continue;
                }
                Known::New
                    if self
                        .rebuild
                        .as_ref()
                        .is_some_and(|r| r.held.len() < REBUILD_MAX_HELD) =>
                {
                    // A live flow's packet, perhaps, whose runtime has not said so yet.
                    if let Some(r) = self.rebuild.as_mut() {
                        r.held_keys.insert(key);
                        r.held.push((key, p));
                    }
                    continue;
                }
                Known::New => {
                    // Full: the new flow waits (its sender tries again) rather than an
                    // established one losing its entry.
                    if self.table.len() >= self.max_flows {
                        ep.counters()
                            .add(ProcCounter::DropFlowTableFull as usize, 1);
                        ep.free(p);
                        continue;
                    }
                    let Some(chain) = self.chain_for(&h, region.data(&p)) else {
                        ep.counters().add(ProcCounter::DropNoChain as usize, 1);
                        ep.free(p);
                        continue;
                    };
                    let Some(rt) = self.pick(chain) else {
                        ep.counters().add(ProcCounter::DropNoRuntime as usize, 1);
                        ep.free(p);
                        continue;
                    };
                    let entry = Entry {
                        runtime: rt,
                        last_ms: now_ms,
                        sent: 1,
                        alias: false,
                    };
                    if self.table.insert(key, entry).is_none() {
                        ep.counters().add(ProcCounter::FlowsCreated as usize, 1);
                    }
                    rt
                }
            };
            // Address the frame to the runtime, keeping its own destination for later.
            let data = region.data_mut(&mut p);
            let mut dst = [0u8; 6];
            dst.copy_from_slice(&data[..6]);
            region.meta_of(&p).save_dst_mac(dst);
            region.data_mut(&mut p)[..6].copy_from_slice(&runtime.input_mac());
            let via = if runtime.server == self.me.server {
                runtime.slot
            } else {
                // nfmgr carries it to the runtime's server.
                p.set_flags(p.flags() | DESC_REMOTE);
                MANAGER_SLOT
            };
            match self.stage.get_mut(via as usize) {
                Some(q) => q.push(p),
                None => ep.free(p),
            }
        }
        self.parsed = parsed;
        for rt in 0..self.stage.len() {
            if !self.stage[rt].is_empty() {
                let mut out = std::mem::take(&mut self.stage[rt]);
                ep.send_burst(rt as u16, &mut out);
                self.stage[rt] = out;
            }
        }
        ep.counters()
            .set(ProcCounter::FlowsActive as usize, self.table.len() as u64);
    }

    /// The runtime of a known flow, if it is alive (refreshing the flow's last packet time
    /// and counting the packet as given to it).
    fn known(&mut self, key: &FlowKey, hash: u64, now_ms: u32) -> Known {
        // One lookup: the entry stays borrowed while the (disjoint) target lists are checked.
        let Some(e) = self.table.get_mut_hashed(key, hash) else {
            return Known::New;
        };
        let rt = e.runtime;
        // The flow of a runtime that died (or restarted, having lost it) waits for its
        // replica to claim it, until the wait is over.
        if !self.recovering.is_empty()
            && self
                .recovering
                .iter()
                .any(|(a, until)| *a == rt && is_ahead(now_ms, *until))
        {
            return Known::Hold;
        }
        if !targets_live(&self.live, &self.remote, rt) {
            return Known::New;
        }
        e.last_ms = now_ms;
        e.sent = e.sent.wrapping_add(1);
        Known::To(rt)
    }

    /// Forgets flows idle for longer than the timeout: called every loop, it sweeps the
    /// slices that are due, one every `SWEEP_PERIOD / SWEEP_SLICES`.
    pub fn expire(&mut self, ep: &mut Endpoint, now: Instant) {
        if now < self.next_sweep {
            return;
        }
        let now_ms = self.now_ms(now);
        // Each flow swept once a period: a flow lives between `timeout` and `timeout` + 1 s
        // after its last packet.
        let timeout_ms = self.timeout.as_millis().clamp(1, 1 << 30) as u32;
        let step = SWEEP_PERIOD / SWEEP_SLICES as u32;
        let mut expired = 0;
        let mut swept = 0;
        while now >= self.next_sweep && swept < MAX_SWEEPS_PER_LOOP {
            expired += self
                .table
                .sweep_next(|e| age_ms(now_ms, e.last_ms) < timeout_ms);
            self.next_sweep += step;
            swept += 1;
        }
        if now >= self.next_sweep + SWEEP_PERIOD {
            // Far behind (the vswitch slept): go on from here rather than catch up.
            self.next_sweep = now + step;
        }
        ep.counters()
            .add(ProcCounter::FlowsExpired as usize, expired as u64);
        ep.counters()
            .set(ProcCounter::FlowsActive as usize, self.table.len() as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nflib::buffer::Desc;
    use nflib::cluster::{EndpointInfo, ServerInfo};
    use nflib::layout::RingId;
    use nflib::local::{LocalManager, LocalRegion};
    use nflib::packet::build::UdpV4;
    use nflib::ring::Producer;
    use nflib::slot::ProcessKind;
    use std::sync::atomic::Ordering;

    const CONFIG: &str =
        "[[vswitch]]\nname = \"vs\"\n[[runtime]]\nname = \"rt0\"\n[[runtime]]\nname = \"rt1\"\n";

    fn frame(port: u16) -> Vec<u8> {
        let mut b = vec![0u8; 64];
        UdpV4 {
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: [2, 0, 0, 0, 0, 2],
            src_ip: [10, 0, 0, 1],
            dst_ip: [10, 0, 0, 2],
            src_port: port,
            dst_port: 53,
            payload_len: 22,
        }
        .write(&mut b)
        .unwrap();
        b
    }

    struct Bed {
        local: LocalRegion,
        mgr: LocalManager,
        ep: Endpoint,
        mb: Mailbox,
        d: Dispatch,
    }

    fn bed(tag: &str) -> Bed {
        let local = LocalRegion::new(
            tag,
            CONFIG,
            &[
                (1, ProcessKind::Vswitch, "vs"),
                (2, ProcessKind::Runtime, "rt0"),
                (3, ProcessKind::Runtime, "rt1"),
            ],
            |_| {},
        )
        .unwrap();
        let r = &local.region;
        r.slot(1).unwrap().targets.store(0b1100, Ordering::Relaxed);
        let mut mgr = LocalManager::new(&local);
        mgr.service();
        let ep = Endpoint::attach(local.path(), 1, ProcessKind::Vswitch).unwrap();
        let mb = Mailbox::for_endpoint(&ep, 1, local.config.cluster.transport());
        let d = Dispatch::new(r, 1, &local.config).unwrap();
        Bed {
            local,
            mgr,
            ep,
            mb,
            d,
        }
    }

    impl Bed {
        /// nfmgr hands the vswitch one frame of flow `port`, and the vswitch dispatches it.
        fn packet(&mut self, port: u16) {
            let r = &self.local.region;
            let mut p = self.mgr.pool.alloc().unwrap();
            r.fill(&mut p, &frame(port));
            let mut to_vs = Producer::new(r.ring::<Desc>(RingId::Data { from: 0, to: 1 }).unwrap());
            assert!(to_vs.push(p.into_desc()));
            let mut batch = Vec::new();
            self.ep.recv_burst(&mut batch, 8);
            self.d
                .dispatch(&mut self.ep, &mut self.mb, &mut batch, Instant::now());
        }

        fn occupancy(&self, to: u16) -> u32 {
            self.local
                .region
                .ring::<Desc>(RingId::Data { from: 1, to })
                .unwrap()
                .occupancy()
        }

        /// Lets the vswitch read its messages and answer, until nfmgr has `want` replies.
        fn replies(&mut self, want: usize) -> Vec<Message> {
            let mut got = Vec::new();
            for _ in 0..200 {
                self.d.handle_messages(&mut self.ep, &mut self.mb);
                self.mb.flush(&mut self.ep, nflib::time::mono_ns());
                got.extend(self.mgr.receive().into_iter().map(|e| e.msg));
                if got.len() >= want {
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            got
        }
    }

    /// Random 5-tuples cannot grow the table past `max_flows`: new flows are dropped and
    /// counted, new aliases refused, and the flows already there keep going.
    #[test]
    fn a_full_table_refuses_new_flows_and_keeps_the_established() {
        let mut b = bed("vsfull");
        b.d.max_flows = 3;
        for port in 1000..1003 {
            b.packet(port);
        }
        let delivered = |b: &Bed| b.occupancy(2) + b.occupancy(3);
        assert_eq!(delivered(&b), 3);
        for port in 2000..2100 {
            b.packet(port);
        }
        assert_eq!(b.d.table.len(), 3, "the table stays at its bound");
        assert_eq!(delivered(&b), 3, "new flows' packets are dropped");
        b.ep.publish();
        let full = b.local.region.slot(1).unwrap().counters.0
            [ProcCounter::DropFlowTableFull as usize]
            .load(Ordering::Relaxed);
        assert_eq!(full, 100);
        b.packet(1001);
        assert_eq!(delivered(&b), 4, "an established flow goes on");
        let key = FlowKey::of(&packet::parse(&frame(3000)).unwrap()).0;
        assert!(
            !b.d.add_alias(key, EndpointAddr::new(1, 2), 0),
            "no room for an alias"
        );
    }

    #[test]
    fn a_flow_moves_to_another_runtime_on_request() {
        let mut b = bed("vsmove");
        b.packet(1000);
        let first = if b.occupancy(2) == 1 { 2 } else { 3 };
        let other = 5 - first;
        assert_eq!(b.occupancy(first), 1);

        // nfmgr (slot 0) asks for the flow to move.
        let h = packet::parse(&frame(1000)).unwrap();
        let (key, _) = FlowKey::of(&h);
        b.mgr.send(
            1,
            &Message::SetRuntime {
                keys: vec![key],
                from: EndpointAddr::new(1, first),
                runtime: EndpointAddr::new(1, other),
                request: 42,
            },
        );
        assert_eq!(
            b.replies(1),
            vec![Message::RuntimeSet {
                request: 42,
                moved: 1,
                sent: vec![1],
                unmoved: Vec::new(),
            }]
        );
        // A recovery (its request says so) that names the key's former runtime: the key
        // is a third runtime's now, and the answer says which keys did not move (and no
        // per-key counts).
        let stranger = FlowKey::of(&packet::parse(&frame(1001)).unwrap()).0;
        let request = 7 | nflib::msg::RECOVERY_REQUEST;
        b.mgr.send(
            1,
            &Message::SetRuntime {
                keys: vec![key, stranger],
                from: EndpointAddr::new(1, first),
                runtime: EndpointAddr::new(1, first),
                request,
            },
        );
        assert_eq!(
            b.replies(1),
            vec![Message::RuntimeSet {
                request,
                moved: 0,
                sent: Vec::new(),
                unmoved: vec![key, stranger],
            }]
        );

        // The flow's next packet goes to the other runtime.
        b.packet(1000);
        assert_eq!(b.occupancy(other), 1);
        assert_eq!(b.occupancy(first), 1, "nothing more to the old runtime");
        // A runtime that is not a target is refused.
        let mut sent = Vec::new();
        let (from, to) = (EndpointAddr::new(1, first), EndpointAddr::new(1, other));
        assert_eq!(
            b.d.set_runtime(
                &[key],
                to,
                EndpointAddr::new(1, 9),
                &mut sent,
                &mut Vec::new()
            ),
            0
        );
        assert_eq!(
            b.d.set_runtime(
                &[key],
                to,
                EndpointAddr::new(7, 2),
                &mut sent,
                &mut Vec::new()
            ),
            0
        );
        // Nor is a request that thinks the key is elsewhere: it is not its to move.
        assert_eq!(
            b.d.set_runtime(&[key], from, from, &mut sent, &mut Vec::new()),
            0
        );
        assert_eq!(sent, vec![0, 0, 0]);
        // Counting restarted for the new runtime: one packet so far; asking again for the
        // same runtime does not restart it.
        b.packet(1000);
        let mut sent = Vec::new();
        assert_eq!(
            b.d.set_runtime(&[key], from, to, &mut sent, &mut Vec::new()),
            1
        );
        assert_eq!(
            b.d.set_runtime(&[key], from, to, &mut sent, &mut Vec::new()),
            1
        );
        assert_eq!(sent, vec![2, 2]);
    }

    #[test]
    fn an_alias_is_refused_only_over_another_live_runtimes_alias() {
        let mut b = bed("vsalias");
        // A packet of an unknown key: dispatched to some runtime.
        b.packet(1000);
        let first = if b.occupancy(2) == 1 { 2 } else { 3 };
        let other = 5 - first;
        let (rt1, rt2) = (EndpointAddr::new(1, first), EndpointAddr::new(1, other));
        let key = FlowKey::of(&packet::parse(&frame(1000)).unwrap()).0;
        // The other runtime's translation makes the key a reply of its flow: the stray
        // packet's entry gives way.
        assert!(b.d.add_alias(key, rt2, 0));
        // The first runtime's translation to the same key is refused; the owner's own
        // request again is fine.
        assert!(!b.d.add_alias(key, rt1, 0));
        assert!(b.d.add_alias(key, rt2, 0));
        b.packet(1000);
        assert_eq!(b.occupancy(other), 1, "the key's packets reach the alias");
        // Migration of the first runtime's flows cannot take the key from the second.
        let mut sent = Vec::new();
        assert_eq!(
            b.d.set_runtime(&[key], rt1, rt1, &mut sent, &mut Vec::new()),
            0
        );
        // Once the owner is gone, the key is anyone's.
        b.d.live.iter_mut().for_each(|l| l.retain(|r| *r != rt2));
        assert!(b.d.add_alias(key, rt1, 0));
    }

    #[test]
    fn a_time_stamped_after_the_clock_was_read_has_no_age() {
        assert_eq!(age_ms(100, 40), 60);
        assert_eq!(age_ms(5, u32::MAX - 4), 10, "across the wrap");
        assert_eq!(age_ms(100, 103), 0, "stamped after now");
    }

    #[test]
    fn the_cluster_view_adds_runtimes_of_other_servers() {
        let mut b = bed("vsremote");
        let remote = EndpointAddr::new(2, 4);
        let view = ClusterView {
            version: 3,
            coordinator: 1,
            servers: vec![ServerInfo {
                server: 2,
                name: "s2".into(),
                incarnation: 1,
                alive: true,
                endpoints: vec![EndpointInfo {
                    addr: remote,
                    kind: ProcessKind::Runtime,
                    name: "rt0".into(),
                    chain: None,
                    alive: true,
                }],
            }],
        };
        b.mgr.send(
            1,
            &Message::Rpc {
                id: 5,
                call: Call::NotifyClusterCfg(view),
            },
        );
        assert_eq!(
            b.replies(1),
            vec![Message::RpcReply {
                id: 5,
                reply: Reply::ClusterCfgApplied { version: 3 }
            }]
        );
        // Three flows, three runtimes, round-robin: one goes to nfmgr for server 2.
        for port in [1, 2, 3] {
            b.packet(port);
        }
        assert_eq!(b.occupancy(2), 1);
        assert_eq!(b.occupancy(3), 1);
        assert_eq!(b.occupancy(0), 1);
        let r = &b.local.region;
        let mut c =
            nflib::ring::Consumer::new(r.ring::<Desc>(RingId::Data { from: 1, to: 0 }).unwrap());
        let mut d = [Desc::default(); 1];
        assert_eq!(c.peek_burst(&mut d), 1);
        assert_eq!(d[0].flags & DESC_REMOTE, DESC_REMOTE);
        let p = r.claim(d[0], 1, 0).unwrap();
        c.release(1);
        assert_eq!(&r.data(&p)[..6], &remote.input_mac());
        b.mgr.pool.free(p);
    }
}

//! Per-flow dispatch: which runtime each flow goes to (the paper's vswitch actors).
//!
//! A new flow is steered to a service chain by the first `[[steer]]` rule its first packet
//! matches (NFLambda's match -> tag -> chain), else the vswitch's default chain, and given to
//! the next live runtime of that chain, round-robin. Every later packet of the flow, either
//! direction, and packets under aliases the runtime registered, go to the same runtime. The
//! frame's destination MAC becomes the runtime's input MAC on the way (the original is kept
//! in the buffer's metadata and restored by the runtime).
//!
//! The dispatcher is a state machine: it reads no clock (every call takes the monotonic
//! time in nanoseconds) and does its I/O through [`Io`], so that its tests step it in
//! memory, with no region and no process.

use std::collections::HashMap;

use nflib::cluster::{ClusterView, Workload};
use nflib::config::{Config, DispatchScope, Match, MatchInput};
use nflib::flow::FlowKey;
use nflib::frame::{EndpointAddr, LIAISON};
use nflib::mailbox::Envelope;
use nflib::msg::{Call, Message, Reply};
use nflib::packet::{self, arp, Headers, ParseError, L3};
use nflib::stats::ProcCounter;
use nflib::MANAGER_SLOT;

use crate::flowmap::{FlowMap, SWEEP_SLICES};
use crate::io::Io;

const MS: u64 = 1_000_000;
/// Each flow is looked at for expiry about once per this period, one slice of the table at a
/// time.
const SWEEP_PERIOD_NS: u64 = 1_000 * MS;
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
    /// The runtime the key was moved from (its runtime, if it never moved): only it may
    /// pull the key back (a migration undone).
    prev: EndpointAddr,
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
/// Notes in `list` (runtimes with a deadline) that `addr`'s deadline is now `until`.
fn set_until(list: &mut Vec<(EndpointAddr, u32)>, addr: EndpointAddr, until: u32) {
    list.retain(|(a, _)| *a != addr);
    list.push((addr, until));
}

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

/// What the dispatcher is given at start besides the configuration: its own slot and name,
/// and the local runtimes it feeds (nfmgr's `targets` for its slot), by slot and name.
#[derive(Clone, Debug, Default)]
pub struct Setup {
    pub slot: u16,
    pub name: String,
    pub targets: Vec<(u16, String)>,
    /// Slots of the region: rings lead to each.
    pub slots: u16,
    /// The slot's generation: above 1, an earlier life died with its table.
    pub generation: u32,
}

pub struct Dispatch<P> {
    me: EndpointAddr,
    /// Keyed with per-process random seeds: flow keys come from the wire, and a fixed hash
    /// would let a sender collide them on purpose.
    table: FlowMap<Entry>,
    /// When the next slice of `table` is due for its expiry sweep (ns).
    next_sweep_ns: u64,
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
    timeout_ms: u64,
    /// Most entries `table` holds (`max_flows`).
    max_flows: usize,
    /// Packets per local slot; slot 0 (nfmgr) carries those for other servers.
    stage: Vec<Vec<P>>,
    /// A burst's parsed headers, keys and key hashes (kept for its room).
    parsed: Vec<Result<(Headers, FlowKey, u64), ParseError>>,
    /// The clock's reading at start (ns): the table's times count from it.
    epoch_ns: u64,
    generation: u32,
    /// The (epoch, version) of the last cluster view taken.
    view_stamp: (u64, u64),
    /// Messages it did not understand.
    pub unknown: u64,
    /// Per chain: its flows are replicated, so a dead runtime's flows are recovered
    /// elsewhere and must not be dispatched anew meanwhile.
    replicated: Vec<bool>,
    /// Local target slots as last seen: (slot, generation, up).
    seen: Vec<(u16, u32, bool)>,
    /// Runtimes that died recently, with when their flows' wait ends (ms).
    recovering: Vec<(EndpointAddr, u32)>,
    /// Runtimes that died or restarted recently (this server's, seen in their slots;
    /// another server's, seen in the cluster view), with when a takeover of them stops
    /// being accepted (ms).
    lives_changed: Vec<(EndpointAddr, u32)>,
    /// Other servers' runtimes of replicated chains as the views had them, by address:
    /// their last life (their server's incarnation, their generation) and whether the last
    /// view had them alive. One that left the view is kept, so that when it comes back in
    /// a new life it is seen restarted, however long it was gone.
    remote_lives: Vec<(EndpointAddr, (u64, u32), bool)>,
    /// Whether a cluster view came yet.
    had_view: bool,
    /// Whether the last view's coordinator was alive in it (false before any view; a
    /// member that lost its coordinator hears of no death on another server until it is
    /// back).
    coordinator_alive: bool,
    recovery_wait_ms: u32,
    /// This life's table being rebuilt from the runtimes (an earlier life died with it).
    rebuild: Option<Rebuild<P>>,
    /// Takeovers asked of a runtime this vswitch does not know to be dead (yet).
    deferred: Vec<Takeover>,
    /// Keys a takeover asked for and could not have: a migration had switched them from
    /// the dead runtime to a live one, which may not have its state yet. If that runtime
    /// gives the keys back (`hand_back`), they go to the replica that asked.
    unclaimed: HashMap<FlowKey, Claim>,
    /// Whether this vswitch is in a cluster (its remote runtimes come with the first view).
    clustered: bool,
}

/// A restarted vswitch asks the runtimes it feeds for their flows (`FeedQuery`) and, until
/// all have answered or `rebuild_wait_ms` passed, holds the packets of keys it does not know
/// rather than dispatch them afresh: a live flow sent to another runtime would start again
/// there, its state left behind.
struct Rebuild<P> {
    request: u64,
    /// Runtimes asked that have not answered in full.
    waiting: Vec<EndpointAddr>,
    /// Runtimes asked (those of the cluster view are asked when it comes).
    asked: Vec<EndpointAddr>,
    /// Whether the cluster view came (or there is no cluster).
    view: bool,
    until_ms: u32,
    held: Vec<(FlowKey, P)>,
    /// Keys with packets in `held`: their later packets are held too, even once the key is
    /// learnt, until those go (a flow's packets leave in the order they came).
    held_keys: std::collections::HashSet<FlowKey>,
    /// Keys were learnt since held packets were last looked at.
    fresh: bool,
    /// Flows and aliases learnt.
    learnt: u64,
    started_ns: u64,
}

/// A takeover (`SetRuntime` with `RECOVERY_REQUEST`) of the flows of a runtime this
/// vswitch still believes alive. The news of a death (the slot's state, or the cluster
/// view) and the replica's request race each other, so the request waits for it, up to
/// `TAKEOVER_WAIT_MS`; a runtime that is alive keeps its flows (a replica, or a runtime
/// that claims to be one, cannot take them from it).
struct Takeover {
    by: EndpointAddr,
    actor: u64,
    keys: Vec<FlowKey>,
    failed: EndpointAddr,
    request: u64,
    until_ms: u32,
}

/// A takeover's claim on a key it found at another runtime (`unclaimed`).
#[derive(Clone, Copy, Debug)]
struct Claim {
    /// The dead runtime the takeover was of.
    failed: EndpointAddr,
    /// The runtime the key was at (a migration's target).
    holder: EndpointAddr,
    /// The replica that asked.
    by: EndpointAddr,
    /// When the claim lapses (ms).
    until: u32,
}

/// How long a takeover waits for the vswitch to learn that the runtime it names died.
/// Shorter than a recovering runtime waits for the vswitches' answers (1 s), so that a
/// refusal reaches it while it still drops the copies the refusal names.
const TAKEOVER_WAIT_MS: u32 = 500;
/// How long after a local runtime's restart (or death) a takeover of it is accepted,
/// whatever `recovery_wait_ms` says (it may be 0): the replicas' requests follow the
/// death by milliseconds, a large table's last chunks by a few hundred.
const TAKEOVER_GRACE_MS: u32 = 2_000;
/// Most takeovers waiting at once; more of a live runtime are refused at once.
const MAX_DEFERRED_TAKEOVERS: usize = 64;
/// Most keys claimed by takeovers at once (`unclaimed`): a few migration groups' worth
/// is what a source dying mid-migration leaves; a claim beyond it is not kept.
const MAX_UNCLAIMED: usize = 1 << 16;

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

impl<P> Dispatch<P> {
    /// Builds the dispatcher of the vswitch `setup` describes from the configuration, at
    /// `now_ns`; the local runtimes' states come from `io`.
    pub fn new(
        setup: &Setup,
        cfg: &Config,
        io: &mut impl Io<Pkt = P>,
        now_ns: u64,
    ) -> Result<Dispatch<P>, nflib::process::StartError> {
        let name = &setup.name;
        let vc = cfg
            .vswitch(name)
            .ok_or_else(|| nflib::process::StartError::Unknown {
                kind: "vswitch",
                name: name.clone(),
            })?;
        // Chains by index; runtimes without a chain form one more, unnamed group.
        let mut chains: Vec<Option<String>> =
            cfg.chains.iter().map(|c| Some(c.name.clone())).collect();
        chains.push(None);
        let mut local = vec![Vec::new(); chains.len()];
        for (s, rname) in &setup.targets {
            let Some(rc) = cfg.runtime(rname) else {
                continue;
            };
            let chain = cfg.chain_of(rc).map(str::to_string);
            if let Some(i) = chains.iter().position(|c| *c == chain) {
                local[i].push(*s);
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
            me: EndpointAddr::new(cfg.cluster.server_id, setup.slot),
            table: FlowMap::default(),
            next_sweep_ns: now_ns + SWEEP_PERIOD_NS,
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
            timeout_ms: vc.flow_timeout_ms,
            max_flows: vc.max_flows as usize,
            stage: (0..setup.slots).map(|_| Vec::new()).collect(),
            parsed: Vec::new(),
            epoch_ns: now_ns,
            generation: setup.generation,
            view_stamp: (0, 0),
            unknown: 0,
            replicated: Vec::new(),
            seen: Vec::new(),
            recovering: Vec::new(),
            lives_changed: Vec::new(),
            remote_lives: Vec::new(),
            had_view: false,
            coordinator_alive: false,
            recovery_wait_ms: vc.recovery_wait_ms,
            rebuild: None,
            deferred: Vec::new(),
            unclaimed: HashMap::new(),
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
        d.refresh_targets(io, now_ns);
        Ok(d)
    }

    /// A vswitch started in a slot an earlier life held (it died: its table with it) asks
    /// every live runtime it feeds for the flows they hold of its (`FeedQuery`) and holds
    /// unknown keys' packets until they answered, for at most `wait_ms`. A first life has
    /// nothing to rebuild.
    pub fn start_rebuild(&mut self, io: &mut impl Io<Pkt = P>, wait_ms: u32, now_ns: u64) {
        let generation = self.generation;
        if generation <= 1 || wait_ms == 0 {
            return;
        }
        let now_ms = self.now_ms(now_ns);
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
            started_ns: now_ns,
        };
        let targets: Vec<EndpointAddr> = self.live.iter().flatten().copied().collect();
        for rt in targets {
            Self::ask(&mut r, io, rt);
        }
        tracing::info!(
            runtimes = r.asked.len(),
            "restarted: asking the runtimes for the flows this vswitch fed"
        );
        self.rebuild = Some(r);
    }

    fn ask(r: &mut Rebuild<P>, io: &mut impl Io<Pkt = P>, rt: EndpointAddr) {
        if r.asked.contains(&rt) {
            return;
        }
        r.asked.push(rt);
        let m = Message::FeedQuery { request: r.request };
        if io.send(rt, LIAISON, &m) {
            r.waiting.push(rt);
        } else {
            io.count(ProcCounter::ActorSendRefused, 1);
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
                            prev: from,
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
    pub fn finish_rebuild(&mut self, io: &mut impl Io<Pkt = P>, now_ns: u64) -> usize {
        let now_ms = self.now_ms(now_ns);
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
            self.send_on(io, go, now_ns);
            return n.max(1);
        }
        let Some(r) = self.rebuild.take() else {
            return 0;
        };
        let took_ns = now_ns.saturating_sub(r.started_ns);
        tracing::info!(
            flows = r.learnt,
            unanswered = r.waiting.len(),
            held = r.held.len(),
            "table rebuilt from the runtimes in {:.1} ms",
            took_ns as f64 / 1e6
        );
        // For nfmgr's event log (and the drills' reports): how long dispatch of unknown
        // keys paused, and what was learnt. The count last: nfmgr reports on its change.
        io.set_count(ProcCounter::VswitchRebuildUs, took_ns / 1000);
        io.set_count(ProcCounter::VswitchRebuildFlows, r.learnt);
        io.count(ProcCounter::VswitchRebuilds, 1);
        let n = r.held.len();
        self.send_on(io, r.held, now_ns);
        n
    }

    /// Dispatches held packets, in order, a burst at a time.
    fn send_on(&mut self, io: &mut impl Io<Pkt = P>, held: Vec<(FlowKey, P)>, now_ns: u64) {
        let mut it = held.into_iter().map(|(_, p)| p).peekable();
        while it.peek().is_some() {
            let mut batch: Vec<P> = it.by_ref().take(nflib::endpoint::BATCH).collect();
            self.dispatch(io, &mut batch, now_ns);
        }
    }

    /// Re-reads which runtimes are alive, and notes those of replicated chains that died
    /// or restarted since the last look (their flows are being recovered).
    pub fn refresh_targets(&mut self, io: &impl Io<Pkt = P>, now_ns: u64) {
        let now_ms = self.now_ms(now_ns);
        self.recovering
            .retain(|(_, until)| is_ahead(now_ms, *until));
        self.lives_changed
            .retain(|(_, until)| is_ahead(now_ms, *until));
        if !self.unclaimed.is_empty() {
            self.unclaimed.retain(|_, c| is_ahead(now_ms, c.until));
        }
        for c in 0..self.chains.len() {
            if !self.replicated.get(c).copied().unwrap_or(false) {
                continue;
            }
            for &s in &self.local[c] {
                let Some(r) = io.slot(s) else {
                    continue;
                };
                let (up, gen) = (r.up, r.generation);
                match self.seen.iter_mut().find(|(slot, _, _)| *slot == s) {
                    Some(e) => {
                        let died = e.2 && (!up || e.1 != gen);
                        let restarted = !e.2 && up && e.1 != gen;
                        if died || restarted {
                            let addr = EndpointAddr::new(self.me.server, s);
                            let grace = now_ms.wrapping_add(TAKEOVER_GRACE_MS);
                            set_until(&mut self.lives_changed, addr, grace);
                            // A restart seen without the death: the old life's flows
                            // still wait for recovery.
                            if died || !self.recovering.iter().any(|(a, _)| *a == addr) {
                                let wait = now_ms.wrapping_add(self.recovery_wait_ms);
                                set_until(&mut self.recovering, addr, wait);
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
                let up = io.slot(s).is_some_and(|r| r.up);
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
    pub fn apply_view(&mut self, view: &ClusterView, now_ns: u64) {
        if view.stamp() < self.view_stamp {
            return;
        }
        self.view_stamp = view.stamp();
        let now_ms = self.now_ms(now_ns);
        self.note_remote_lives(view, now_ms);
        for (c, chain) in self.chains.iter().enumerate() {
            let now: Vec<EndpointAddr> = view
                .runtimes_of(chain.as_deref())
                .into_iter()
                .filter(|r| r.server != self.me.server)
                .collect();
            if self.replicated.get(c).copied().unwrap_or(false) {
                let mut sorted = now.clone();
                sorted.sort_unstable();
                for gone in self.remote[c]
                    .iter()
                    .filter(|r| sorted.binary_search(r).is_err())
                {
                    let wait = now_ms.wrapping_add(self.recovery_wait_ms);
                    set_until(&mut self.recovering, *gone, wait);
                    set_until(
                        &mut self.lives_changed,
                        *gone,
                        now_ms.wrapping_add(TAKEOVER_GRACE_MS),
                    );
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
    pub fn handle_messages(&mut self, io: &mut impl Io<Pkt = P>, now_ns: u64) -> usize {
        let inbox = io.receive(now_ns);
        let n = inbox.len();
        // A replica's takeover may come right after the death it names: the runtimes'
        // states as they are now decide it.
        if n > 0 {
            self.refresh_targets(io, now_ns);
        }
        for env in inbox {
            self.handle(io, env, now_ns);
        }
        // A waiting takeover needs the runtimes' states as they are now (nfmgr marks a
        // dead runtime's slot without a message), and the loop awake until it is settled;
        // the messages may have changed the view.
        if n > 0 || !self.deferred.is_empty() {
            self.refresh_targets(io, now_ns);
        }
        self.retry_takeovers(io, self.now_ms(now_ns));
        n + usize::from(!self.deferred.is_empty())
    }

    /// Handles one message (and answers it).
    pub fn handle(&mut self, io: &mut impl Io<Pkt = P>, env: Envelope, now_ns: u64) {
        let now_ms = self.now_ms(now_ns);
        let nfmgr = EndpointAddr::new(self.me.server, MANAGER_SLOT);
        let reply = match env.msg {
            Message::AddAliases { aliases, request } => {
                let mut refused = Vec::new();
                for (key, flow) in aliases {
                    if !self.add_alias(key, env.from, now_ms) {
                        refused.push((key, flow));
                    }
                }
                io.count(ProcCounter::AliasesRefused, refused.len() as u64);
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
            } if env.from != from && env.from != runtime && env.from != nfmgr => {
                // Flows move at the request of the runtime that gives them away (a
                // migration) or of the one that takes them (a takeover, a migration undone),
                // or of nfmgr, never of a third: a runtime cannot point two others' flows
                // around.
                io.count(ProcCounter::CallsRefused, 1);
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
            } if env.from == runtime
                && env.from != from
                && request & nflib::msg::RECOVERY_REQUEST != 0
                && !self.known_dead(from, now_ms) =>
            {
                // A takeover of a runtime not known dead: it waits for the news (this
                // server's slots show every death and restart at once; the cluster view
                // shows another server's, deaths and new lives alike).
                if self.deferred.len() >= MAX_DEFERRED_TAKEOVERS {
                    io.count(ProcCounter::CallsRefused, 1);
                    Some(Self::refused_takeover(request, keys))
                } else {
                    self.deferred.push(Takeover {
                        by: env.from,
                        actor: env.src_actor,
                        keys,
                        failed: from,
                        request,
                        until_ms: now_ms.wrapping_add(TAKEOVER_WAIT_MS),
                    });
                    None
                }
            }
            Message::SetRuntime {
                keys,
                from,
                runtime,
                request,
            } if env.from == from && request & nflib::msg::HAND_BACK_REQUEST != 0 => {
                // A migration's target giving flows back to their source, which died before
                // sending their state, so that the source's replicas take them over.
                let (answer, given) = self.hand_back(&keys, from, runtime, request, now_ms);
                for (by, keys) in given {
                    if !io.send(by, LIAISON, &Message::KeysGiven { keys }) {
                        io.count(ProcCounter::ActorSendRefused, 1);
                    }
                }
                Some(answer)
            }
            Message::SetRuntime {
                keys,
                from,
                request,
                ..
            } if env.from == from
                && request & nflib::msg::RECOVERY_REQUEST == 0
                && !self.alive_now(io, from) =>
            {
                // A migration's step 2 from a runtime that died since it sent it: whatever
                // it would move is its replicas' now (moved, the flows would reach the
                // target with no state, and after its hand-back, if it made one).
                io.count(ProcCounter::CallsRefused, 1);
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
                // A runtime pulling keys to itself outside a takeover undoes a migration:
                // only keys it gave away move back.
                let pull_back = (env.from == runtime
                    && env.from != from
                    && request & nflib::msg::RECOVERY_REQUEST == 0)
                    .then_some(runtime);
                Some(self.move_keys(&keys, from, runtime, request, pull_back, now_ms))
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
            Message::Rpc { id, .. } if env.from != nfmgr => {
                // Control calls come from this server's nfmgr only (see the runtime's
                // liaison): a runtime must not rewrite the vswitch's view of the cluster.
                io.count(ProcCounter::CallsRefused, 1);
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
                        self.apply_view(&view, now_ns);
                        self.refresh_targets(io, now_ns);
                        // A rebuild asks the other servers' runtimes too, now it knows them.
                        if let Some(mut r) = self.rebuild.take() {
                            let remote: Vec<EndpointAddr> =
                                self.remote.iter().flatten().copied().collect();
                            for rt in remote {
                                Self::ask(&mut r, io, rt);
                            }
                            self.rebuild = Some(r);
                        }
                        Reply::ClusterCfgApplied {
                            version: view.version,
                        }
                    }
                    Call::PollWorkload => Reply::Workload(self.workload(io, now_ns)),
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
            if !io.send(env.from, env.src_actor, &m) {
                io.count(ProcCounter::ActorSendRefused, 1);
            }
        }
    }

    /// Moves `keys` from `from` to `runtime` (only those `pull_back` gave away, if set) and
    /// makes the answer.
    fn move_keys(
        &mut self,
        keys: &[FlowKey],
        from: EndpointAddr,
        runtime: EndpointAddr,
        request: u64,
        pull_back: Option<EndpointAddr>,
        now_ms: u32,
    ) -> Message {
        let mut sent = Vec::with_capacity(keys.len());
        let mut unmoved = Vec::new();
        let moved = self.set_runtime(keys, from, runtime, pull_back, &mut sent, &mut unmoved);
        // A takeover's runtime has no use for the per-key counts (a migration's target
        // does): tens of thousands of them would only slow the answer. It needs the keys
        // that did not move instead: their flows are not its.
        if request & nflib::msg::RECOVERY_REQUEST != 0 {
            sent = Vec::new();
            self.claim_unmoved(&unmoved, from, runtime, now_ms);
        } else {
            unmoved = Vec::new();
        }
        Message::RuntimeSet {
            request,
            moved,
            sent,
            unmoved,
        }
    }

    /// A takeover of `failed` by `by` found these keys at other runtimes. Those a migration
    /// switched from `failed` (their entry's previous runtime) may have arrived without
    /// their state, if `failed` died between the switch and the state: their target then
    /// gives them back (`hand_back`), and they go to `by`, whose copies wait for them.
    fn claim_unmoved(
        &mut self,
        unmoved: &[FlowKey],
        failed: EndpointAddr,
        by: EndpointAddr,
        now_ms: u32,
    ) {
        if unmoved.is_empty() || !self.is_target(by) {
            return;
        }
        let until = now_ms.wrapping_add(TAKEOVER_GRACE_MS);
        for k in unmoved {
            if self.unclaimed.len() >= MAX_UNCLAIMED {
                break;
            }
            match self.table.get(k) {
                Some(e) if e.prev == failed && e.runtime != failed => {
                    let claim = Claim {
                        failed,
                        holder: e.runtime,
                        by,
                        until,
                    };
                    self.unclaimed.insert(*k, claim);
                }
                _ => {}
            }
        }
    }

    /// Whether `rt` is a runtime this vswitch dispatches to (alive or not).
    fn is_target(&self, rt: EndpointAddr) -> bool {
        let local = rt.server == self.me.server && self.local.iter().any(|c| c.contains(&rt.slot));
        local || self.remote.iter().any(|c| c.contains(&rt))
    }

    /// Whether `rt` lives now: this server's by its slot as it is now (not as the last
    /// refresh saw it), another server's by the last cluster view.
    fn alive_now(&self, io: &impl Io<Pkt = P>, rt: EndpointAddr) -> bool {
        if rt.server == self.me.server {
            io.slot(rt.slot).is_some_and(|r| r.up)
        } else {
            targets_live(&self.live, &self.remote, rt)
        }
    }

    /// `from` gives its flows under `keys` back to `dead` (see the caller): each goes to
    /// the replica whose takeover of `dead` claimed it already, or else to `dead`, where
    /// the takeover still to come finds it (nothing moves if `dead` is no runtime this
    /// vswitch knows). Returns the answer, as `set_runtime`'s moves are answered, and the
    /// keys each claiming replica got (to tell it: its copies of them wait for that).
    fn hand_back(
        &mut self,
        keys: &[FlowKey],
        from: EndpointAddr,
        dead: EndpointAddr,
        request: u64,
        now_ms: u32,
    ) -> (Message, Vec<(EndpointAddr, Vec<FlowKey>)>) {
        let mut sent = Vec::with_capacity(keys.len());
        let mut given: Vec<(EndpointAddr, Vec<FlowKey>)> = Vec::new();
        let mut moved = 0;
        let known = self.is_target(dead) || self.known_dead(dead, now_ms);
        for k in keys {
            let hash = self.table.hash(k);
            let Some(e) = self
                .table
                .get_mut_hashed(k, hash)
                .filter(|e| known && e.runtime == from)
            else {
                sent.push(0);
                continue;
            };
            // A claim counts only from the takeover of this very runtime, on a key held by
            // the one giving it back; any other leaves it in place.
            let claimed = self
                .unclaimed
                .get(k)
                .is_some_and(|c| c.failed == dead && c.holder == from && is_ahead(now_ms, c.until));
            let to = match claimed.then(|| self.unclaimed.remove(k)).flatten() {
                Some(c) => c.by,
                None => dead,
            };
            sent.push(e.sent);
            e.prev = e.runtime;
            e.runtime = to;
            e.sent = 0;
            moved += 1;
            if to != dead {
                match given.iter_mut().find(|(by, _)| *by == to) {
                    Some((_, keys)) => keys.push(*k),
                    None => given.push((to, vec![*k])),
                }
            }
        }
        let answer = Message::RuntimeSet {
            request,
            moved,
            sent,
            unmoved: Vec::new(),
        };
        (answer, given)
    }

    fn refused_takeover(request: u64, keys: Vec<FlowKey>) -> Message {
        Message::RuntimeSet {
            request,
            moved: 0,
            sent: Vec::new(),
            unmoved: keys,
        }
    }

    /// Notes the other servers' runtimes of replicated chains that `view` shows in
    /// another life than the last view did (restarted between two views: never seen
    /// dead): their old life's flows wait for recovery, and a takeover of them is
    /// accepted for `TAKEOVER_GRACE_MS`, as for this server's.
    fn note_remote_lives(&mut self, view: &ClusterView, now_ms: u32) {
        let me = self.me.server;
        let replicated = |chain: &Option<String>| {
            self.chains
                .iter()
                .position(|c| c == chain)
                .is_some_and(|i| self.replicated.get(i).copied().unwrap_or(false))
        };
        let mut lives: Vec<(EndpointAddr, (u64, u32), bool)> = Vec::new();
        for s in view.servers.iter().filter(|s| s.server != me) {
            for e in &s.endpoints {
                if e.kind == nflib::slot::ProcessKind::Runtime && replicated(&e.chain) {
                    lives.push((e.addr, (s.incarnation, e.generation), s.alive && e.alive));
                }
            }
        }
        // (Sorted by address, to find each one's last life without a scan per runtime.)
        lives.sort_unstable_by_key(|(a, _, _)| *a);
        lives.dedup_by_key(|(a, _, _)| *a);
        let first = !self.had_view;
        self.had_view = true;
        let mut changed = Vec::new();
        for (addr, life, alive) in &lives {
            let last = self
                .remote_lives
                .binary_search_by_key(addr, |(a, _, _)| *a)
                .ok()
                .map(|i| self.remote_lives[i]);
            let restarted = match last {
                Some((_, old, _)) => old != *life,
                // A vswitch's first view: any runtime in it may have died or restarted
                // while this vswitch was not there to see it.
                None => first,
            };
            if *alive && restarted {
                changed.push(*addr);
            }
        }
        for addr in changed {
            set_until(
                &mut self.lives_changed,
                addr,
                now_ms.wrapping_add(TAKEOVER_GRACE_MS),
            );
            if !first {
                let wait = now_ms.wrapping_add(self.recovery_wait_ms);
                set_until(&mut self.recovering, addr, wait);
            }
        }
        // Those the view no longer names keep their last life, not alive.
        for (addr, life, _) in &self.remote_lives {
            if lives.binary_search_by_key(addr, |(a, _, _)| *a).is_err() {
                lives.push((*addr, *life, false));
            }
        }
        lives.sort_unstable_by_key(|(a, _, _)| *a);
        self.remote_lives = lives;
        self.coordinator_alive = view.server(view.coordinator).is_some_and(|s| s.alive);
    }

    /// Whether `rt`'s flows are up for a takeover: it is not a live target, or its old
    /// life's flows wait for recovery.
    fn known_dead(&self, rt: EndpointAddr, now_ms: u32) -> bool {
        // Another server's runtime, while this server has no coordinator to tell it of a
        // death there (no view yet, or the coordinator lost): the replica's word is all
        // there is.
        let unwatched = rt.server != self.me.server && !self.coordinator_alive;
        unwatched || !targets_live(&self.live, &self.remote, rt) || self.died_lately(rt, now_ms)
    }

    /// Whether `rt`, a runtime of a replicated chain, died or restarted lately (its flows
    /// are up for a takeover).
    fn died_lately(&self, rt: EndpointAddr, now_ms: u32) -> bool {
        let recent = |list: &[(EndpointAddr, u32)]| {
            list.iter()
                .any(|(a, until)| *a == rt && is_ahead(now_ms, *until))
        };
        recent(&self.recovering) || recent(&self.lives_changed)
    }

    /// Applies the waiting takeovers whose runtime is now known dead, and refuses those
    /// that waited long enough (their runtime lives: its flows stay).
    fn retry_takeovers(&mut self, io: &mut impl Io<Pkt = P>, now_ms: u32) {
        if self.deferred.is_empty() {
            return;
        }
        let waiting = std::mem::take(&mut self.deferred);
        for t in waiting {
            let answer = if self.known_dead(t.failed, now_ms) {
                self.move_keys(&t.keys, t.failed, t.by, t.request, None, now_ms)
            } else if is_ahead(now_ms, t.until_ms) {
                self.deferred.push(t);
                continue;
            } else {
                io.count(ProcCounter::CallsRefused, 1);
                tracing::warn!(
                    by = %t.by,
                    failed = %t.failed,
                    keys = t.keys.len(),
                    "refused a takeover of a runtime that is alive"
                );
                Self::refused_takeover(t.request, t.keys)
            };
            if !io.send(t.by, t.actor, &answer) {
                io.count(ProcCounter::ActorSendRefused, 1);
            }
        }
    }

    /// Milliseconds since the dispatcher started, wrapping.
    fn now_ms(&self, now_ns: u64) -> u32 {
        (now_ns.saturating_sub(self.epoch_ns) / MS) as u32
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
                prev: runtime,
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

    fn workload(&self, io: &mut impl Io<Pkt = P>, now_ns: u64) -> Workload {
        Workload {
            flows_active: self.table.len() as u64,
            flows_created: io.counter(ProcCounter::FlowsCreated),
            rx_pkts: io.counter(ProcCounter::RxPkts),
            tx_pkts: io.counter(ProcCounter::TxPkts),
            busy_ns: io.counter(ProcCounter::BusyNs),
            uptime_ms: now_ns.saturating_sub(self.epoch_ns) / MS,
            transport: io.transport(),
            cluster_version: self.view_stamp.1,
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
        pull_back: Option<EndpointAddr>,
        sent: &mut Vec<u32>,
        unmoved: &mut Vec<FlowKey>,
    ) -> u32 {
        if !self.is_target(runtime) {
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
                Some(e)
                    if (e.runtime == from || e.runtime == runtime)
                        && pull_back.is_none_or(|by| e.prev == by || e.runtime == by) =>
                {
                    sent.push(e.sent);
                    // Asking again for the runtime a key already has changes nothing (a
                    // repeated request must not restart the count).
                    if e.runtime != runtime {
                        e.prev = e.runtime;
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

    fn pick(&mut self, chain: usize, now_ms: u32) -> Option<EndpointAddr> {
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

    /// Dispatches a burst of packets received at `now_ns`: each goes to its flow's runtime,
    /// or is held (a rebuild), or dropped and counted.
    pub fn dispatch(&mut self, io: &mut impl Io<Pkt = P>, batch: &mut Vec<P>, now_ns: u64) {
        let now_ms = self.now_ms(now_ns);
        // Each lookup is an index line and an entry, both likely cache misses at a million
        // flows: parse the burst and start loading every packet's index line, then every
        // entry, before the first lookup (the runtimes do the same with their flows).
        self.table.step();
        let mut parsed = std::mem::take(&mut self.parsed);
        parsed.clear();
        for p in batch.iter() {
            let r = packet::parse(io.data(p)).map(|h| {
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
        for (mut p, r) in batch.drain(..).zip(parsed.drain(..)) {
            let (h, key, hash) = match r {
                Ok(r) => r,
                Err(e) => {
                    io.count(ProcCounter::of_parse_error(&e), 1);
                    io.free(p);
                    continue;
                }
            };
            if !h.is_ip() && self.non_ip == NonIp::Drop {
                io.count(ProcCounter::DropNonIp, 1);
                io.free(p);
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
                self.handle_messages(io, now_ns);
                known = self.known(&key, hash, now_ms);
            }
            let runtime = match known {
                Known::To(rt) => rt,
                Known::Hold => {
                    io.count(ProcCounter::DropAwaitingRecovery, 1);
                    io.free(p);
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
                        io.count(ProcCounter::DropFlowTableFull, 1);
                        io.free(p);
                        continue;
                    }
                    let Some(chain) = self.chain_for(&h, io.data(&p)) else {
                        io.count(ProcCounter::DropNoChain, 1);
                        io.free(p);
                        continue;
                    };
                    let Some(rt) = self.pick(chain, now_ms) else {
                        io.count(ProcCounter::DropNoRuntime, 1);
                        io.free(p);
                        continue;
                    };
                    let entry = Entry {
                        runtime: rt,
                        prev: rt,
                        last_ms: now_ms,
                        sent: 1,
                        alias: false,
                    };
                    if self.table.insert(key, entry).is_none() {
                        io.count(ProcCounter::FlowsCreated, 1);
                    }
                    rt
                }
            };
            // Address the frame to the runtime, keeping its own destination for later;
            // nfmgr carries a frame for another server's runtime there.
            let local = runtime.server == self.me.server;
            io.address(&mut p, runtime.input_mac(), !local);
            let via = if local { runtime.slot } else { MANAGER_SLOT };
            match self.stage.get_mut(via as usize) {
                Some(q) => q.push(p),
                None => io.free(p),
            }
        }
        self.parsed = parsed;
        for rt in 0..self.stage.len() {
            if !self.stage[rt].is_empty() {
                let mut out = std::mem::take(&mut self.stage[rt]);
                io.send_burst(rt as u16, &mut out);
                self.stage[rt] = out;
            }
        }
        io.set_count(ProcCounter::FlowsActive, self.table.len() as u64);
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
    pub fn expire(&mut self, io: &mut impl Io<Pkt = P>, now_ns: u64) {
        if now_ns < self.next_sweep_ns {
            return;
        }
        let now_ms = self.now_ms(now_ns);
        // Each flow swept once a period: a flow lives between `timeout` and `timeout` + 1 s
        // after its last packet.
        let timeout_ms = self.timeout_ms.clamp(1, 1 << 30) as u32;
        let step = SWEEP_PERIOD_NS / SWEEP_SLICES as u64;
        let mut expired = 0;
        let mut swept = 0;
        while now_ns >= self.next_sweep_ns && swept < MAX_SWEEPS_PER_LOOP {
            expired += self
                .table
                .sweep_next(|e| age_ms(now_ms, e.last_ms) < timeout_ms);
            self.next_sweep_ns += step;
            swept += 1;
        }
        if now_ns >= self.next_sweep_ns + SWEEP_PERIOD_NS {
            // Far behind (the vswitch slept): go on from here rather than catch up.
            self.next_sweep_ns = now_ns + step;
        }
        io.count(ProcCounter::FlowsExpired, expired as u64);
        io.set_count(ProcCounter::FlowsActive, self.table.len() as u64);
    }
}

#[cfg(test)]
mod tests {
    //! The dispatcher stepped in memory: packets are byte vectors, rings are vectors per
    //! slot, the clock is a number the test moves.

    use super::*;
    use crate::io::SlotView;
    use nflib::cluster::{EndpointInfo, ServerInfo, TransportCounters};
    use nflib::packet::build::UdpV4;
    use nflib::slot::ProcessKind;
    use nflib::stats::PROC_COUNTERS;
    use std::collections::BTreeMap;
    use std::path::Path;

    const CONFIG: &str =
        "[[vswitch]]\nname = \"vs\"\n[[runtime]]\nname = \"rt0\"\n[[runtime]]\nname = \"rt1\"\n";

    /// Two runtimes of a replicated chain (their flows wait for recovery when one dies).
    const REPLICATED: &str = "[[vswitch]]\nname = \"vs\"\nrecovery_wait_ms = 100\n\
        flow_timeout_ms = 2000\n\
        [[runtime]]\nname = \"rt0\"\nchain = \"c\"\n[[runtime]]\nname = \"rt1\"\nchain = \"c\"\n\
        [[chain]]\nname = \"c\"\nreplication = \"output-commit\"\n[[chain.nf]]\n\
        kind = \"flow_monitor\"\n";

    const ME: u16 = 1;
    const NFMGR: EndpointAddr = EndpointAddr::new(1, MANAGER_SLOT);
    const RT0: EndpointAddr = EndpointAddr::new(1, 2);
    const RT1: EndpointAddr = EndpointAddr::new(1, 3);
    const MS_NS: u64 = 1_000_000;

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

    fn key(port: u16) -> FlowKey {
        FlowKey::of(&packet::parse(&frame(port)).unwrap()).0
    }

    /// A packet in memory, with what the region's metadata would carry.
    #[derive(Clone, Debug)]
    struct Frame {
        bytes: Vec<u8>,
        saved_dst: Option<[u8; 6]>,
        remote: bool,
    }

    #[derive(Default)]
    struct MemIo {
        /// Bursts put on the ring to each slot.
        rings: BTreeMap<u16, Vec<Frame>>,
        freed: usize,
        counters: Vec<u64>,
        inbox: Vec<Envelope>,
        outbox: Vec<(EndpointAddr, Message)>,
        slots: BTreeMap<u16, SlotView>,
    }

    impl Io for MemIo {
        type Pkt = Frame;

        fn data<'a>(&'a self, p: &'a Frame) -> &'a [u8] {
            &p.bytes
        }

        fn address(&mut self, p: &mut Frame, mac: [u8; 6], remote: bool) {
            let mut dst = [0u8; 6];
            dst.copy_from_slice(&p.bytes[..6]);
            p.saved_dst = Some(dst);
            p.bytes[..6].copy_from_slice(&mac);
            p.remote = remote;
        }

        fn free(&mut self, _: Frame) {
            self.freed += 1;
        }

        fn send_burst(&mut self, via: u16, pkts: &mut Vec<Frame>) {
            self.rings.entry(via).or_default().append(pkts);
        }

        fn count(&mut self, c: ProcCounter, n: u64) {
            self.counters[c as usize] += n;
        }

        fn set_count(&mut self, c: ProcCounter, v: u64) {
            self.counters[c as usize] = v;
        }

        fn counter(&mut self, c: ProcCounter) -> u64 {
            self.counters[c as usize]
        }

        fn send(&mut self, to: EndpointAddr, _to_actor: u64, m: &Message) -> bool {
            self.outbox.push((to, m.clone()));
            true
        }

        fn receive(&mut self, _now_ns: u64) -> Vec<Envelope> {
            std::mem::take(&mut self.inbox)
        }

        fn transport(&self) -> TransportCounters {
            TransportCounters::default()
        }

        fn slot(&self, slot: u16) -> Option<SlotView> {
            self.slots.get(&slot).copied()
        }
    }

    struct Bed {
        io: MemIo,
        d: Dispatch<Frame>,
        now_ns: u64,
    }

    fn bed_with(config: &str, generation: u32) -> Bed {
        bed_for(config, &[(2, "rt0"), (3, "rt1")], generation)
    }

    /// A vswitch of `config` whose targets are `targets` (slot, name), all up.
    fn bed_for(config: &str, targets: &[(u16, &str)], generation: u32) -> Bed {
        let cfg = Config::parse(config, Path::new(".")).unwrap();
        let mut io = MemIo {
            counters: vec![0; PROC_COUNTERS],
            ..MemIo::default()
        };
        for &(s, _) in targets {
            io.slots.insert(
                s,
                SlotView {
                    generation: 1,
                    up: true,
                },
            );
        }
        let setup = Setup {
            slot: ME,
            name: "vs".into(),
            targets: targets.iter().map(|&(s, n)| (s, n.into())).collect(),
            slots: targets.iter().map(|&(s, _)| s + 1).max().unwrap_or(2),
            generation,
        };
        let now_ns = 5_000 * MS_NS;
        let d = Dispatch::new(&setup, &cfg, &mut io, now_ns).unwrap();
        Bed { io, d, now_ns }
    }

    fn bed() -> Bed {
        bed_with(CONFIG, 1)
    }

    impl Bed {
        /// nfmgr hands the vswitch one frame of flow `port`, and the vswitch dispatches it.
        fn packet(&mut self, port: u16) {
            let mut batch = vec![Frame {
                bytes: frame(port),
                saved_dst: None,
                remote: false,
            }];
            self.d.dispatch(&mut self.io, &mut batch, self.now_ns);
        }

        fn delivered(&self, to: u16) -> usize {
            self.io.rings.get(&to).map_or(0, Vec::len)
        }

        /// Ports of the flows whose packets went to `to`, in order.
        fn ports_to(&self, to: u16) -> Vec<u16> {
            self.io.rings.get(&to).map_or(Vec::new(), |r| {
                r.iter()
                    .map(|f| packet::parse(&f.bytes).unwrap().src_port)
                    .collect()
            })
        }

        /// `from` sends `msg`; returns the vswitch's answers.
        fn call(&mut self, from: EndpointAddr, msg: Message) -> Vec<Message> {
            let env = Envelope {
                from,
                src_actor: LIAISON,
                dst_actor: LIAISON,
                msg,
            };
            self.d.handle(&mut self.io, env, self.now_ns);
            self.io.outbox.drain(..).map(|(_, m)| m).collect()
        }

        fn count(&self, c: ProcCounter) -> u64 {
            self.io.counters[c as usize]
        }

        fn advance_ms(&mut self, ms: u64) {
            self.now_ns += ms * MS_NS;
        }

        /// The runtime in `slot` died (nfmgr marks the slot) or came back in a new life.
        fn set_slot(&mut self, slot: u16, generation: u32, up: bool) {
            self.io.slots.insert(slot, SlotView { generation, up });
            self.d.refresh_targets(&self.io, self.now_ns);
        }
    }

    /// Random 5-tuples cannot grow the table past `max_flows`: new flows are dropped and
    /// counted, new aliases refused, and the flows already there keep going.
    #[test]
    fn a_full_table_refuses_new_flows_and_keeps_the_established() {
        let mut b = bed();
        b.d.max_flows = 3;
        for port in 1000..1003 {
            b.packet(port);
        }
        let delivered = |b: &Bed| b.delivered(2) + b.delivered(3);
        assert_eq!(delivered(&b), 3);
        for port in 2000..2100 {
            b.packet(port);
        }
        assert_eq!(b.d.table.len(), 3, "the table stays at its bound");
        assert_eq!(delivered(&b), 3, "new flows' packets are dropped");
        assert_eq!(b.count(ProcCounter::DropFlowTableFull), 100);
        assert_eq!(b.io.freed, 100, "and their buffers freed");
        b.packet(1001);
        assert_eq!(delivered(&b), 4, "an established flow goes on");
        assert!(!b.d.add_alias(key(3000), RT0, 0), "no room for an alias");
    }

    #[test]
    fn a_flow_moves_to_another_runtime_on_request() {
        let mut b = bed();
        b.packet(1000);
        let first = if b.delivered(2) == 1 { 2 } else { 3 };
        let other = 5 - first;
        assert_eq!(b.delivered(first), 1);
        let k = key(1000);
        let (from, to) = (EndpointAddr::new(1, first), EndpointAddr::new(1, other));

        // nfmgr asks for the flow to move.
        let answer = b.call(
            NFMGR,
            Message::SetRuntime {
                keys: vec![k],
                from,
                runtime: to,
                request: 42,
            },
        );
        assert_eq!(
            answer,
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
        let stranger = key(1001);
        let request = 7 | nflib::msg::RECOVERY_REQUEST;
        let answer = b.call(
            NFMGR,
            Message::SetRuntime {
                keys: vec![k, stranger],
                from,
                runtime: from,
                request,
            },
        );
        assert_eq!(
            answer,
            vec![Message::RuntimeSet {
                request,
                moved: 0,
                sent: Vec::new(),
                unmoved: vec![k, stranger],
            }]
        );

        // The flow's next packet goes to the other runtime.
        b.packet(1000);
        assert_eq!(b.delivered(other), 1);
        assert_eq!(b.delivered(first), 1, "nothing more to the old runtime");
        // A runtime that is not a target is refused, of this server or another.
        let mut sent = Vec::new();
        for nowhere in [EndpointAddr::new(1, 9), EndpointAddr::new(7, 2)] {
            assert_eq!(
                b.d.set_runtime(&[k], to, nowhere, None, &mut sent, &mut Vec::new()),
                0
            );
        }
        // Nor is a request that thinks the key is elsewhere: it is not its to move.
        assert_eq!(
            b.d.set_runtime(&[k], from, from, None, &mut sent, &mut Vec::new()),
            0
        );
        assert_eq!(sent, vec![0, 0, 0]);
        // Counting restarted for the new runtime: one packet so far; asking again for the
        // same runtime does not restart it.
        b.packet(1000);
        let mut sent = Vec::new();
        assert_eq!(
            b.d.set_runtime(&[k], from, to, None, &mut sent, &mut Vec::new()),
            1
        );
        assert_eq!(
            b.d.set_runtime(&[k], from, to, None, &mut sent, &mut Vec::new()),
            1
        );
        assert_eq!(sent, vec![2, 2]);
    }

    /// Flows move at the request of the runtime giving them away, the one taking them, or
    /// nfmgr; control calls come from nfmgr only. Anyone else is refused and counted.
    #[test]
    fn a_third_runtime_cannot_move_flows_or_make_control_calls() {
        let mut b = bed();
        b.packet(1000);
        let first = if b.delivered(2) == 1 { RT0 } else { RT1 };
        let other = if first == RT0 { RT1 } else { RT0 };
        let stranger = EndpointAddr::new(1, 5);
        let answer = b.call(
            stranger,
            Message::SetRuntime {
                keys: vec![key(1000)],
                from: first,
                runtime: other,
                request: 3,
            },
        );
        assert_eq!(
            answer,
            vec![Message::RuntimeSet {
                request: 3,
                moved: 0,
                sent: vec![0],
                unmoved: vec![key(1000)],
            }]
        );
        let answer = b.call(
            other,
            Message::Rpc {
                id: 9,
                call: Call::PollWorkload,
            },
        );
        assert!(matches!(
            answer.as_slice(),
            [Message::RpcReply {
                id: 9,
                reply: Reply::Refused { .. }
            }]
        ));
        assert_eq!(b.count(ProcCounter::CallsRefused), 2);
        b.packet(1000);
        assert_eq!(
            b.delivered(first.slot),
            2,
            "the flow stayed with its runtime"
        );
        // nfmgr's own poll is answered.
        let answer = b.call(
            NFMGR,
            Message::Rpc {
                id: 10,
                call: Call::PollWorkload,
            },
        );
        assert!(matches!(
            answer.as_slice(),
            [Message::RpcReply {
                id: 10,
                reply: Reply::Workload(w)
            }] if w.flows_active == 1
        ));
    }

    #[test]
    fn an_alias_is_refused_only_over_another_live_runtimes_alias() {
        let mut b = bed();
        // A packet of an unknown key: dispatched to some runtime.
        b.packet(1000);
        let first = if b.delivered(2) == 1 { 2 } else { 3 };
        let other = 5 - first;
        let (rt1, rt2) = (EndpointAddr::new(1, first), EndpointAddr::new(1, other));
        let k = key(1000);
        // The other runtime's translation makes the key a reply of its flow: the stray
        // packet's entry gives way.
        assert!(b.d.add_alias(k, rt2, 0));
        // The first runtime's translation to the same key is refused; the owner's own
        // request again is fine.
        assert!(!b.d.add_alias(k, rt1, 0));
        assert!(b.d.add_alias(k, rt2, 0));
        b.packet(1000);
        assert_eq!(b.delivered(other), 1, "the key's packets reach the alias");
        // Migration of the first runtime's flows cannot take the key from the second.
        let mut sent = Vec::new();
        assert_eq!(
            b.d.set_runtime(&[k], rt1, rt1, None, &mut sent, &mut Vec::new()),
            0
        );
        // Once the owner is gone, the key is anyone's.
        b.set_slot(other, 1, false);
        assert!(b.d.add_alias(k, rt1, 0));
    }

    #[test]
    fn a_time_stamped_after_the_clock_was_read_has_no_age() {
        assert_eq!(age_ms(100, 40), 60);
        assert_eq!(age_ms(5, u32::MAX - 4), 10, "across the wrap");
        assert_eq!(age_ms(100, 103), 0, "stamped after now");
    }

    #[test]
    fn the_cluster_view_adds_runtimes_of_other_servers() {
        let mut b = bed();
        let remote = EndpointAddr::new(2, 4);
        let view = ClusterView {
            epoch: 1,
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
                    generation: 1,
                }],
            }],
        };
        let answer = b.call(
            NFMGR,
            Message::Rpc {
                id: 5,
                call: Call::NotifyClusterCfg(view),
            },
        );
        assert_eq!(
            answer,
            vec![Message::RpcReply {
                id: 5,
                reply: Reply::ClusterCfgApplied { version: 3 }
            }]
        );
        // Three flows, three runtimes, round-robin: one goes to nfmgr for server 2,
        // addressed to the remote runtime and marked for another server.
        for port in [1, 2, 3] {
            b.packet(port);
        }
        assert_eq!((b.delivered(2), b.delivered(3), b.delivered(0)), (1, 1, 1));
        let f = &b.io.rings[&0][0];
        assert!(f.remote);
        assert_eq!(&f.bytes[..6], &remote.input_mac());
        assert_eq!(
            f.saved_dst,
            Some([2, 0, 0, 0, 0, 2]),
            "the frame's own kept"
        );
        assert!(!b.io.rings[&2][0].remote);
    }

    /// Views are taken in (epoch, version) order: a restarted coordinator's first view
    /// (a higher epoch, its versions started again) replaces the last one of its earlier
    /// life, and a late view of that earlier life changes nothing after it.
    #[test]
    fn a_restarted_coordinators_view_replaces_its_earlier_lifes() {
        let mut b = bed();
        let remote = EndpointAddr::new(2, 4);
        let view = |epoch: u64, version: u64, alive: bool| ClusterView {
            epoch,
            version,
            coordinator: 1,
            servers: vec![ServerInfo {
                server: 2,
                name: "s2".into(),
                incarnation: 1,
                alive,
                endpoints: vec![EndpointInfo {
                    addr: remote,
                    kind: ProcessKind::Runtime,
                    name: "rt0".into(),
                    chain: None,
                    alive: true,
                    generation: 1,
                }],
            }],
        };
        let now = b.now_ns;
        b.d.apply_view(&view(5, 9, false), now);
        assert!(
            b.d.remote.iter().all(|r| r.is_empty()),
            "server 2 dead at 5/9"
        );
        b.d.apply_view(&view(7, 2, true), now);
        assert!(
            b.d.remote.iter().any(|r| r.contains(&remote)),
            "the restarted coordinator's view is taken"
        );
        b.d.apply_view(&view(5, 10, false), now);
        assert!(
            b.d.remote.iter().any(|r| r.contains(&remote)),
            "a late view of the old life is not"
        );
    }

    /// A replicated chain's runtime dies: its flows' packets are dropped (not given to
    /// another runtime as new flows, which would start them without their state) until
    /// the replica's takeover re-points them, and new flows avoid the dead runtime. Flows
    /// nobody claims within `recovery_wait_ms` start afresh.
    #[test]
    fn a_dead_runtimes_flows_wait_for_their_takeover() {
        let mut b = bed_with(REPLICATED, 1);
        for port in 1..=4 {
            b.packet(port);
        }
        let on_rt0 = b.ports_to(2);
        assert_eq!(on_rt0.len(), 2);
        b.set_slot(2, 1, false);
        for &port in &on_rt0 {
            b.packet(port);
        }
        assert_eq!(b.count(ProcCounter::DropAwaitingRecovery), 2);
        assert_eq!(b.delivered(3), 2, "not dispatched anew");
        // New flows all go to the live runtime meanwhile.
        b.packet(100);
        assert_eq!(b.ports_to(3).last(), Some(&100));
        // rt1, rt0's replica, takes over the first flow.
        let answer = b.call(
            RT1,
            Message::SetRuntime {
                keys: vec![key(on_rt0[0])],
                from: RT0,
                runtime: RT1,
                request: 1 | nflib::msg::RECOVERY_REQUEST,
            },
        );
        assert!(matches!(
            answer.as_slice(),
            [Message::RuntimeSet { moved: 1, .. }]
        ));
        b.packet(on_rt0[0]);
        assert_eq!(b.ports_to(3).last(), Some(&on_rt0[0]));
        // The other flow is still held, until the wait is over: then it starts afresh.
        b.packet(on_rt0[1]);
        assert_eq!(b.count(ProcCounter::DropAwaitingRecovery), 3);
        b.advance_ms(101);
        b.d.refresh_targets(&b.io, b.now_ns);
        b.packet(on_rt0[1]);
        assert_eq!(b.ports_to(3).last(), Some(&on_rt0[1]));
        assert_eq!(b.count(ProcCounter::DropAwaitingRecovery), 3);
    }

    /// A migration's source (rt0) dies after the switch and before the state: its target
    /// (rt1) gives the flows back, and they reach the replica (rt2) that takes over rt0's
    /// flows, whichever of the hand-back and the takeover comes first. A flow whose state
    /// did arrive stays with the target; a runtime hands back only its own flows.
    #[test]
    fn flows_a_dead_source_switched_without_their_state_reach_its_replica() {
        const THREE: &str = "[[vswitch]]\nname = \"vs\"\nrecovery_wait_ms = 1000\n\
            [[runtime]]\nname = \"rt0\"\nchain = \"c\"\n\
            [[runtime]]\nname = \"rt1\"\nchain = \"c\"\n\
            [[runtime]]\nname = \"rt2\"\nchain = \"c\"\n\
            [[chain]]\nname = \"c\"\nreplication = \"output-commit\"\n[[chain.nf]]\n\
            kind = \"flow_monitor\"\n";
        const RT2: EndpointAddr = EndpointAddr::new(1, 4);
        let mut b = bed_for(THREE, &[(2, "rt0"), (3, "rt1"), (4, "rt2")], 1);
        for port in 1..=12 {
            b.packet(port);
        }
        let on_rt0 = b.ports_to(2);
        let on_rt2 = b.ports_to(4);
        assert_eq!(on_rt0.len(), 4);
        // rt0 migrates three flows to rt1 (step 2); the state of the third arrives.
        let (first, second, installed, last) = (on_rt0[0], on_rt0[1], on_rt0[2], on_rt0[3]);
        let answer = b.call(
            RT0,
            Message::SetRuntime {
                keys: vec![key(first), key(second), key(installed)],
                from: RT0,
                runtime: RT1,
                request: 5,
            },
        );
        assert!(matches!(
            answer.as_slice(),
            [Message::RuntimeSet { moved: 3, .. }]
        ));
        b.set_slot(2, 1, false);
        // A step 2 rt0 sent before it died, read after: refused (its flows are its
        // replicas' now).
        let answer = b.call(
            RT0,
            Message::SetRuntime {
                keys: vec![key(last)],
                from: RT0,
                runtime: RT1,
                request: 6,
            },
        );
        assert!(matches!(
            answer.as_slice(),
            [Message::RuntimeSet { moved: 0, .. }]
        ));
        let takeover = |keys: Vec<FlowKey>| Message::SetRuntime {
            keys,
            from: RT0,
            runtime: RT2,
            request: 1 | nflib::msg::RECOVERY_REQUEST,
        };
        let hand_back = |keys: Vec<FlowKey>| Message::SetRuntime {
            keys,
            from: RT1,
            runtime: RT0,
            request: nflib::msg::HAND_BACK_REQUEST,
        };
        // The first flow: the target gives it back before the replica asks for it.
        let answer = b.call(RT1, hand_back(vec![key(first)]));
        assert!(matches!(
            answer.as_slice(),
            [Message::RuntimeSet { moved: 1, .. }]
        ));
        b.packet(first);
        assert_eq!(
            b.count(ProcCounter::DropAwaitingRecovery),
            1,
            "held for the replica"
        );
        let answer = b.call(RT2, takeover(vec![key(first)]));
        assert!(
            matches!(answer.as_slice(), [Message::RuntimeSet { moved: 1, unmoved, .. }] if unmoved.is_empty())
        );
        b.packet(first);
        assert_eq!(b.ports_to(4).last(), Some(&first));
        // The second and the installed one: the replica asks first; neither is rt0's now.
        let answer = b.call(RT2, takeover(vec![key(second), key(installed)]));
        assert!(matches!(
            answer.as_slice(),
            [Message::RuntimeSet { moved: 0, unmoved, .. }] if unmoved.len() == 2
        ));
        // rt2 cannot give back (so neither spend the claim on) a key it does not hold.
        let answer = b.call(
            RT2,
            Message::SetRuntime {
                keys: vec![key(second)],
                from: RT2,
                runtime: RT0,
                request: nflib::msg::HAND_BACK_REQUEST,
            },
        );
        assert!(matches!(
            answer.as_slice(),
            [Message::RuntimeSet { moved: 0, .. }]
        ));
        // rt1 gives back the one whose state never came (and cannot give away rt2's); rt2
        // is told that its copy's key is its own now.
        let answer = b.call(RT1, hand_back(vec![key(second), key(on_rt2[0])]));
        assert!(
            matches!(answer.as_slice(), [Message::KeysGiven { keys }, Message::RuntimeSet { moved: 1, .. }]
                if keys == &vec![key(second)]),
            "{answer:?}"
        );
        b.packet(second);
        assert_eq!(
            b.ports_to(4).last(),
            Some(&second),
            "to the replica that asked"
        );
        b.packet(installed);
        assert_eq!(
            b.ports_to(3).last(),
            Some(&installed),
            "the target keeps its own"
        );
        b.packet(on_rt2[0]);
        assert_eq!(b.ports_to(4).last(), Some(&on_rt2[0]));
    }

    /// A restarted vswitch (its slot's second life) asks the runtimes for the flows they
    /// hold of it, holds packets of keys it does not know meanwhile, and sends them, in
    /// order, to the runtime that says it holds their flow.
    #[test]
    fn a_restarted_vswitch_rebuilds_its_table_from_the_runtimes() {
        let mut b = bed_with(CONFIG, 2);
        b.d.start_rebuild(&mut b.io, 300, b.now_ns);
        let mut asked: Vec<EndpointAddr> =
            b.io.outbox
                .drain(..)
                .map(|(to, m)| {
                    assert_eq!(m, Message::FeedQuery { request: 2 });
                    to
                })
                .collect();
        asked.sort();
        assert_eq!(asked, vec![RT0, RT1]);
        // Packets of a flow rt1 carries arrive before its answer: held.
        b.packet(7);
        b.packet(7);
        assert_eq!(b.delivered(2) + b.delivered(3), 0);
        assert_eq!(b.d.finish_rebuild(&mut b.io, b.now_ns), 1, "holding");
        let none = b.call(
            RT1,
            Message::Feeds {
                request: 2,
                keys: vec![key(7)],
                aliases: Vec::new(),
                done: true,
            },
        );
        assert!(none.is_empty());
        // Its packets go to rt1 now; rt0 has not answered, so the rebuild goes on.
        assert_eq!(b.d.finish_rebuild(&mut b.io, b.now_ns), 2);
        assert_eq!(b.ports_to(3), vec![7, 7]);
        // A packet of a key nobody claimed waits for rt0's answer or the deadline, then
        // is a new flow.
        b.packet(8);
        b.advance_ms(301);
        assert_eq!(b.d.finish_rebuild(&mut b.io, b.now_ns), 1);
        assert_eq!(b.delivered(2) + b.delivered(3), 3);
        assert_eq!(b.count(ProcCounter::VswitchRebuilds), 1);
        assert_eq!(b.count(ProcCounter::VswitchRebuildFlows), 1);
        assert_eq!(b.count(ProcCounter::VswitchRebuildUs), 301_000);
        // An answer from a runtime that was not asked, or to another request, teaches
        // nothing.
        b.d.start_rebuild(&mut b.io, 300, b.now_ns);
        b.call(
            EndpointAddr::new(1, 6),
            Message::Feeds {
                request: 2,
                keys: vec![key(9)],
                aliases: Vec::new(),
                done: true,
            },
        );
        b.call(
            RT0,
            Message::Feeds {
                request: 1,
                keys: vec![key(9)],
                aliases: Vec::new(),
                done: true,
            },
        );
        assert_eq!(b.d.table.len(), 2);
    }

    /// Idle flows are forgotten after the timeout, a slice of the table at a time; a
    /// runtime's `FlowEnded` forgets a key unless it had a packet since the flow went idle.
    #[test]
    fn idle_flows_expire_and_ended_flows_are_forgotten() {
        let mut b = bed_with(REPLICATED, 1);
        b.packet(1);
        b.packet(2);
        let rt = if b.ports_to(2).contains(&2) { RT0 } else { RT1 };
        // Flow 2 ends at its runtime after 1 s idle, but a packet came 100 ms ago.
        b.advance_ms(900);
        b.packet(2);
        b.advance_ms(100);
        b.call(
            rt,
            Message::FlowEnded {
                keys: vec![key(2)],
                aliases: Vec::new(),
                idle_ms: 1000,
            },
        );
        assert_eq!(
            b.d.table.len(),
            2,
            "a key given a packet since is a new flow's"
        );
        b.call(
            rt,
            Message::FlowEnded {
                keys: vec![key(2)],
                aliases: Vec::new(),
                idle_ms: 100,
            },
        );
        assert_eq!(b.d.table.len(), 1);
        // Flow 1, idle past the 2 s timeout: swept within a period.
        for _ in 0..40 {
            b.advance_ms(100);
            b.d.expire(&mut b.io, b.now_ns);
        }
        assert_eq!(b.d.table.len(), 0);
        assert_eq!(b.count(ProcCounter::FlowsExpired), 1);
        assert_eq!(b.count(ProcCounter::FlowsActive), 0);
    }

    /// Malformed frames are dropped and counted by kind, never dispatched.
    #[test]
    fn malformed_frames_are_counted_not_dispatched() {
        let mut b = bed();
        let mut truncated = frame(1);
        truncated.truncate(30);
        let mut batch: Vec<Frame> = [vec![0u8; 10], truncated]
            .into_iter()
            .map(|bytes| Frame {
                bytes,
                saved_dst: None,
                remote: false,
            })
            .collect();
        b.d.dispatch(&mut b.io, &mut batch, b.now_ns);
        assert_eq!(b.delivered(2) + b.delivered(3), 0);
        assert_eq!(b.io.freed, 2);
        assert_eq!(b.count(ProcCounter::DropRunt), 1);
        assert_eq!(b.count(ProcCounter::DropTruncated), 1);
    }

    /// A replica's takeover names the runtime whose flows it takes: while this vswitch
    /// believes that runtime alive, the request waits for the news of its death and is
    /// applied then; a runtime that stays alive keeps its flows, and the request is refused.
    #[test]
    fn a_takeover_waits_for_the_death_it_names_and_a_live_runtime_keeps_its_flows() {
        let mut b = bed_with(REPLICATED, 1);
        for port in 1..=4 {
            b.packet(port);
        }
        let on_rt0 = b.ports_to(2);
        let takeover = |port: u16, request: u64| Message::SetRuntime {
            keys: vec![key(port)],
            from: RT0,
            runtime: RT1,
            request: request | nflib::msg::RECOVERY_REQUEST,
        };
        // rt0 lives: rt1's claim waits, then is refused; rt0's flows stay with it.
        assert!(b.call(RT1, takeover(on_rt0[0], 1)).is_empty(), "waits");
        b.packet(on_rt0[0]);
        assert_eq!(b.ports_to(2).last(), Some(&on_rt0[0]));
        b.advance_ms(u64::from(TAKEOVER_WAIT_MS) + 1);
        b.d.handle_messages(&mut b.io, b.now_ns);
        let answers: Vec<Message> = b.io.outbox.drain(..).map(|(_, m)| m).collect();
        assert!(
            matches!(answers.as_slice(), [Message::RuntimeSet { moved: 0, unmoved, .. }] if unmoved == &vec![key(on_rt0[0])]),
            "{answers:?}"
        );
        assert_eq!(b.count(ProcCounter::CallsRefused), 1);
        b.packet(on_rt0[0]);
        assert_eq!(b.ports_to(2).last(), Some(&on_rt0[0]), "still rt0's");
        // A real takeover whose request beats the news: applied when the news comes.
        assert!(b.call(RT1, takeover(on_rt0[1], 2)).is_empty());
        b.advance_ms(5);
        b.set_slot(2, 1, false);
        b.d.handle_messages(&mut b.io, b.now_ns);
        let answers: Vec<Message> = b.io.outbox.drain(..).map(|(_, m)| m).collect();
        assert!(
            matches!(answers.as_slice(), [Message::RuntimeSet { moved: 1, .. }]),
            "{answers:?}"
        );
        b.packet(on_rt0[1]);
        assert_eq!(b.ports_to(3).last(), Some(&on_rt0[1]));
    }

    /// A replica's takeover of a runtime that died and came back before the vswitch looked
    /// (a fast restart), under `recovery_wait_ms = 0`: still applied, within
    /// `TAKEOVER_GRACE_MS` of the restart, not refused as a claim on a live runtime.
    #[test]
    fn a_takeover_of_a_quickly_restarted_runtime_is_applied() {
        let mut b = bed_with(
            &REPLICATED.replace("recovery_wait_ms = 100", "recovery_wait_ms = 0"),
            1,
        );
        for port in 1..=4 {
            b.packet(port);
        }
        let on_rt0 = b.ports_to(2);
        b.set_slot(2, 2, true);
        b.advance_ms(300);
        let answer = b.call(
            RT1,
            Message::SetRuntime {
                keys: vec![key(on_rt0[0])],
                from: RT0,
                runtime: RT1,
                request: 4 | nflib::msg::RECOVERY_REQUEST,
            },
        );
        assert!(
            matches!(answer.as_slice(), [Message::RuntimeSet { moved: 1, .. }]),
            "{answer:?}"
        );
        // Long after the restart, the new life's flows are its own.
        b.advance_ms(u64::from(TAKEOVER_GRACE_MS));
        b.d.refresh_targets(&b.io, b.now_ns);
        assert!(b
            .call(
                RT1,
                Message::SetRuntime {
                    keys: vec![key(on_rt0[1])],
                    from: RT0,
                    runtime: RT1,
                    request: 5 | nflib::msg::RECOVERY_REQUEST,
                },
            )
            .is_empty());
    }

    /// Server 2's runtime 2/4 of the replicated chain, in a view of coordinator 1.
    const REMOTE: EndpointAddr = EndpointAddr::new(2, 4);

    /// A view of servers 1 (the coordinator, alive if `s1_alive`) and 2 (life
    /// `incarnation`, alive if `s2_alive`), whose runtime `REMOTE` is in life `generation`.
    fn two_servers(
        version: u64,
        incarnation: u64,
        generation: u32,
        s1_alive: bool,
        s2_alive: bool,
    ) -> ClusterView {
        ClusterView {
            epoch: 1,
            version,
            coordinator: 1,
            servers: vec![
                ServerInfo {
                    server: 1,
                    name: "s1".into(),
                    incarnation: 1,
                    alive: s1_alive,
                    endpoints: vec![],
                },
                ServerInfo {
                    server: 2,
                    name: "s2".into(),
                    incarnation,
                    alive: s2_alive,
                    endpoints: vec![EndpointInfo {
                        addr: REMOTE,
                        kind: ProcessKind::Runtime,
                        name: "rt0".into(),
                        chain: Some("c".into()),
                        alive: true,
                        generation,
                    }],
                },
            ],
        }
    }

    /// rt1's takeover of `REMOTE`'s flow `port`.
    fn remote_takeover(port: u16, request: u64) -> Message {
        Message::SetRuntime {
            keys: vec![key(port)],
            from: REMOTE,
            runtime: RT1,
            request: request | nflib::msg::RECOVERY_REQUEST,
        }
    }

    impl Bed {
        /// nfmgr hands the vswitch `view`.
        fn notify(&mut self, view: ClusterView) {
            let answer = self.call(
                NFMGR,
                Message::Rpc {
                    id: view.version,
                    call: Call::NotifyClusterCfg(view),
                },
            );
            assert!(
                matches!(answer.as_slice(), [Message::RpcReply { .. }]),
                "{answer:?}"
            );
        }

        /// The answers to deferred requests, after time moved on.
        fn deferred_answers(&mut self) -> Vec<Message> {
            self.d.handle_messages(&mut self.io, self.now_ns);
            self.io.outbox.drain(..).map(|(_, m)| m).collect()
        }

        /// Nine flows over rt0, rt1 and `REMOTE`: the ports of `REMOTE`'s three.
        fn flows_with_remote(&mut self) -> Vec<u16> {
            for port in 1..=9 {
                self.packet(port);
            }
            let on_remote = self.ports_to(0);
            assert_eq!(on_remote.len(), 3, "round-robin over three runtimes");
            on_remote
        }
    }

    /// Another server's runtime (issue 22): a takeover of it waits for the cluster view to
    /// show it dead or in a new life, and is refused while the view shows it alive in the
    /// life it had; once the view shows it restarted between two views (a new generation,
    /// never seen dead) or its server dead, the takeover is applied.
    #[test]
    fn a_takeover_of_another_servers_runtime_waits_for_the_view_to_show_it_dead() {
        let mut b = bed_with(REPLICATED, 1);
        b.notify(two_servers(3, 1, 1, true, true));
        let on_remote = b.flows_with_remote();
        // (A vswitch's first view: for a while any of its runtimes may have died unseen.)
        b.advance_ms(u64::from(TAKEOVER_GRACE_MS) + 1);
        // Alive in the view, in the life it had: the claim waits, then is refused.
        assert!(
            b.call(RT1, remote_takeover(on_remote[0], 1)).is_empty(),
            "waits"
        );
        b.advance_ms(u64::from(TAKEOVER_WAIT_MS) + 1);
        let answers = b.deferred_answers();
        assert!(
            matches!(answers.as_slice(), [Message::RuntimeSet { moved: 0, .. }]),
            "{answers:?}"
        );
        assert_eq!(b.count(ProcCounter::CallsRefused), 1);
        b.packet(on_remote[0]);
        assert_eq!(b.io.rings[&0].len(), 4, "still the remote runtime's");
        // Restarted between two views: the takeover that beat the view is applied when
        // the view comes.
        assert!(b.call(RT1, remote_takeover(on_remote[1], 2)).is_empty());
        b.advance_ms(20);
        b.notify(two_servers(4, 1, 2, true, true));
        let answers = b.deferred_answers();
        assert!(
            matches!(answers.as_slice(), [Message::RuntimeSet { moved: 1, .. }]),
            "{answers:?}"
        );
        b.packet(on_remote[1]);
        assert_eq!(b.ports_to(3).last(), Some(&on_remote[1]));
        // Its server dead in the view: applied at once.
        b.notify(two_servers(5, 1, 2, true, false));
        let answer = b.call(RT1, remote_takeover(on_remote[2], 3));
        assert!(
            matches!(answer.as_slice(), [Message::RuntimeSet { moved: 1, .. }]),
            "{answer:?}"
        );
    }

    /// Another server's runtime that left the view (its server lost) and comes back in a
    /// new life long after is seen restarted, so its replicas' takeover is applied (a
    /// coordinator restarted from its journal has the members recover its old life
    /// seconds after it died). And while this server has lost its coordinator, it hears of
    /// no death elsewhere: a takeover of another server's runtime is taken as it comes.
    #[test]
    fn a_runtime_back_in_a_new_life_long_after_it_left_the_view_is_seen_restarted() {
        let mut b = bed_with(REPLICATED, 1);
        b.notify(two_servers(3, 1, 1, true, true));
        let on_remote = b.flows_with_remote();
        b.advance_ms(u64::from(TAKEOVER_GRACE_MS) + 1);
        // Gone from the view altogether.
        let mut gone = two_servers(4, 1, 1, true, false);
        gone.servers.retain(|s| s.server != 2);
        b.notify(gone);
        b.advance_ms(5_000);
        // Back as a new life of its server, five seconds later.
        b.notify(two_servers(5, 2, 1, true, true));
        let answer = b.call(RT1, remote_takeover(on_remote[0], 1));
        assert!(
            matches!(answer.as_slice(), [Message::RuntimeSet { moved: 1, .. }]),
            "{answer:?}"
        );
        // Long after, in that life: a claim on it waits.
        b.advance_ms(u64::from(TAKEOVER_GRACE_MS) + 1);
        assert!(
            b.call(RT1, remote_takeover(on_remote[1], 2)).is_empty(),
            "waits"
        );
        b.advance_ms(u64::from(TAKEOVER_WAIT_MS) + 1);
        b.deferred_answers();
        // This server lost its coordinator: the replica's word is taken.
        b.notify(two_servers(6, 2, 1, false, true));
        let answer = b.call(RT1, remote_takeover(on_remote[1], 3));
        assert!(
            matches!(answer.as_slice(), [Message::RuntimeSet { moved: 1, .. }]),
            "{answer:?}"
        );
    }

    /// A runtime pulls keys back to itself only if it gave them away (a migration undone),
    /// never another runtime's own flows.
    #[test]
    fn only_the_runtime_a_flow_was_moved_from_can_pull_it_back() {
        let mut b = bed();
        b.packet(1);
        b.packet(2);
        let (mine, theirs) = if b.ports_to(2) == vec![1] {
            (1, 2)
        } else {
            (2, 1)
        };
        let pull = |port: u16| Message::SetRuntime {
            keys: vec![key(port)],
            from: RT1,
            runtime: RT0,
            request: 9,
        };
        // rt0 claims rt1's flow as if undoing a migration: nothing moves.
        let answer = b.call(RT0, pull(theirs));
        assert!(
            matches!(answer.as_slice(), [Message::RuntimeSet { moved: 0, .. }]),
            "{answer:?}"
        );
        b.packet(theirs);
        assert_eq!(b.ports_to(3).last(), Some(&theirs), "still rt1's");
        // rt0 migrates its own flow to rt1, then undoes it: that one comes back.
        let answer = b.call(
            RT0,
            Message::SetRuntime {
                keys: vec![key(mine)],
                from: RT0,
                runtime: RT1,
                request: 10,
            },
        );
        assert!(matches!(
            answer.as_slice(),
            [Message::RuntimeSet { moved: 1, .. }]
        ));
        let answer = b.call(RT0, pull(mine));
        assert!(
            matches!(answer.as_slice(), [Message::RuntimeSet { moved: 1, .. }]),
            "{answer:?}"
        );
        b.packet(mine);
        assert_eq!(b.ports_to(2).last(), Some(&mine));
    }
}

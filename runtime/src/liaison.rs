//! The liaison actor (paper 3.2, 3.5): the runtime's own address for messages that concern
//! the runtime rather than one flow. The coordinator's control calls land here (Table 2:
//! `PollWorkload`, `NotifyClusterCfg`, `SetMigrationTarget`, `SetReplica`, `Recover`), as do
//! `Ping` and the probe traffic of `nfmgr msgtest`.
//!
//! `SetMigrationTarget` starts a migration job (`migration`), whose progress
//! `MigrationStatus` reports. `SetReplica` gives the replicator its candidate replicas;
//! `Replicate` and `Replicated` are the replication protocol's two messages
//! (`replication`); `Recover` takes over a dead runtime's flows copied here. `Holds` and
//! `HoldsQuery` keep the resources of flows living away from their home reserved there
//! (`holds`); the liaison asks once per runtime of its chain, as the cluster view names them.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::Ordering;

use crate::io::ShmIo;
use nflib::cluster::{ClusterView, FlowInfo, ProbeReport, TransportCounters, Workload};
use nflib::endpoint::Endpoint;
use nflib::frame::{EndpointAddr, LIAISON};
use nflib::mailbox::{Envelope, Mailbox};
use nflib::msg::{Call, Message, Reply};
use nflib::slot::ProcessKind;
use nflib::stats::ProcCounter;

use crate::engine::Runtime;
use crate::flows::{flag, ms_since};

/// The longest a `PrepareMigration` keeps a runtime polling for a migration to begin.
const MAX_PREPARE_AWAKE_MS: u32 = 1_000;

/// Probe runs a receiver remembers.
const PROBE_RUNS_KEPT: usize = 16;

/// Probe messages sent per loop iteration at most, so a run cannot starve packets.
const PROBES_PER_TICK: usize = 256;

struct Prober {
    report: ProbeReport,
    count: u64,
    /// Messages unacknowledged at most (0: the window).
    depth: u32,
    pad: Vec<u8>,
    retransmits_at_start: u64,
    lost_at_start: u64,
}

#[derive(Default)]
pub struct Liaison {
    /// Messages it did not understand.
    pub unknown: u64,
    view: ClusterView,
    migration_target: Option<EndpointAddr>,
    replicas: Vec<EndpointAddr>,
    prober: Option<Prober>,
    /// Receiving side of probe runs: (sender, run) and what arrived.
    probes_in: VecDeque<(EndpointAddr, ProbeReport, u64)>,
    /// Recoveries asked of this runtime so far (each numbers its re-pointing requests).
    recoveries: u64,
    /// Recoveries not answered yet: their re-pointing is under way.
    recovering: Vec<PendingRecovery>,
    /// Runtimes asked for the flows this address's earlier lives started (`HoldsQuery`).
    holds_asked: HashSet<EndpointAddr>,
}

/// Answers control call `id` of actor `actor` at `to`.
fn send_reply(
    ep: &mut Endpoint,
    mb: &mut Mailbox,
    to: EndpointAddr,
    actor: u64,
    id: u64,
    reply: Reply,
) {
    if mb
        .send(to, LIAISON, actor, &Message::RpcReply { id, reply })
        .is_err()
    {
        ep.counters().add(ProcCounter::ActorSendRefused as usize, 1);
    }
}

/// Whether `from` is the nfmgr of the server `me` is on.
pub fn from_own_manager(from: EndpointAddr, me: EndpointAddr) -> bool {
    from == EndpointAddr::new(me.server, nflib::MANAGER_SLOT)
}

/// A `Recover` call waiting for the vswitches' answers to its re-pointing.
struct PendingRecovery {
    rpc: u64,
    to: EndpointAddr,
    actor: u64,
    request: u64,
    awaiting: usize,
    flows: u64,
    moved: u64,
    deadline_ns: u64,
}

/// How long a `Recover` waits for the vswitches' answers before answering with what it has.
const RECOVERY_ANSWER_WAIT_NS: u64 = 1_000_000_000;

impl Liaison {
    /// The cluster view the coordinator last sent.
    pub fn view(&self) -> &ClusterView {
        &self.view
    }

    /// The refusal of an order (placement, recovery) made under the view of an earlier
    /// coordinator life than the one this runtime follows, if it is one: a coordinator
    /// that restarted or was replaced may have changed what that order was made from.
    fn stale(&self, epoch: u64) -> Option<Reply> {
        (epoch < self.view.epoch).then(|| Reply::Refused {
            reason: format!(
                "the order is of coordinator epoch {epoch}, this runtime follows epoch {}",
                self.view.epoch
            ),
        })
    }

    /// The replicas the coordinator last gave (`SetReplica`).
    pub fn replicas(&self) -> &[EndpointAddr] {
        &self.replicas
    }

    /// Handles one message addressed to the liaison.
    pub fn handle(
        &mut self,
        rt: &mut Runtime,
        ep: &mut Endpoint,
        mb: &mut Mailbox,
        env: Envelope,
        now_ns: u64,
    ) {
        match env.msg {
            // Control calls (recover, migrate, replicas, probes, kill) come from this
            // server's nfmgr, which routes every legitimate one; another runtime, here or
            // on another server, has no business making them (a taken-over one would steal
            // flows or start probe runs of any size).
            Message::Rpc { id, .. } if !from_own_manager(env.from, mb.me()) => {
                ep.counters().add(ProcCounter::CallsRefused as usize, 1);
                let reply = Reply::Refused {
                    reason: format!(
                        "{}: control calls are taken from this server's nfmgr only",
                        env.from
                    ),
                };
                send_reply(ep, mb, env.from, env.src_actor, id, reply);
            }
            Message::Ping { seq } => {
                let flows = rt.flows().len() as u64;
                let _ = mb.send(
                    env.from,
                    LIAISON,
                    env.src_actor,
                    &Message::Pong { seq, flows },
                );
            }
            Message::Rpc {
                id,
                call:
                    Call::Recover {
                        failed,
                        incarnation,
                        epoch,
                    },
            } => {
                if let Some(reply) = self.stale(epoch) {
                    send_reply(ep, mb, env.from, env.src_actor, id, reply);
                } else {
                    self.recover(rt, ep, mb, &env, id, failed, incarnation, now_ns);
                }
            }
            Message::Rpc { id, call } => {
                let reply = self.call(rt, ep, mb, env.from, call, now_ns);
                send_reply(ep, mb, env.from, env.src_actor, id, reply);
            }
            Message::Probe {
                run,
                seq,
                sent_ns,
                pad,
            } => {
                // The loop's time was read before the rings: read the clock again, or a
                // message sent since would seem to arrive before it left.
                let now = nflib::time::mono_ns().max(now_ns);
                self.probe_arrived(env.from, run, seq, sent_ns, pad.len(), now)
            }
            // The answer to `PrepareMigration`'s ping: the exchange itself was the point.
            Message::Pong { .. } => {}
            Message::AliasesAdded { request, refused } => {
                let now_ms = rt.now_ms();
                rt.on_aliases_added(&mut ShmIo { ep, mb }, env.from, request, &refused, now_ms);
            }
            Message::Replicate {
                incarnation,
                version,
                flows,
                states,
                ended,
            } => rt.on_replicate(
                &mut ShmIo { ep, mb },
                env.from,
                incarnation,
                version,
                &flows,
                &states,
                &ended,
            ),
            Message::Replicated {
                incarnation,
                version,
                refused,
                missing,
            } => rt
                .repl
                .on_replicated(env.from, incarnation, version, &refused, &missing, now_ns),
            Message::Holds { flows, states } => rt.on_holds(&mut ShmIo { ep, mb }, &flows, &states),
            Message::HoldsQuery => rt.on_holds_query(env.from),
            Message::FeedQuery { request } => {
                rt.on_feed_query(&mut ShmIo { ep, mb }, env.from, request)
            }
            _ => self.unknown += 1,
        }
    }

    /// Asks every runtime of this one's chain not asked yet for the flows that earlier lives
    /// at this address started and that live on there (`runtime::holds`): their resources
    /// must not be handed to new flows here.
    fn query_holds(&mut self, ep: &mut Endpoint, mb: &mut Mailbox) {
        let me = mb.me();
        let runtimes = || self.view.servers.iter().flat_map(|s| &s.endpoints);
        let Some(chain) = runtimes().find(|e| e.addr == me).map(|e| e.chain.clone()) else {
            return;
        };
        let peers: Vec<EndpointAddr> = runtimes()
            .filter(|e| e.addr != me && e.alive && e.kind == ProcessKind::Runtime)
            .filter(|e| e.chain == chain && !self.holds_asked.contains(&e.addr))
            .map(|e| e.addr)
            .collect();
        for peer in peers {
            if mb
                .send(peer, LIAISON, LIAISON, &Message::HoldsQuery)
                .is_err()
            {
                ep.counters().add(ProcCounter::ActorSendRefused as usize, 1);
            } else {
                self.holds_asked.insert(peer);
            }
        }
    }

    fn call(
        &mut self,
        rt: &mut Runtime,
        ep: &mut Endpoint,
        mb: &mut Mailbox,
        from: EndpointAddr,
        call: Call,
        now_ns: u64,
    ) -> Reply {
        match call {
            Call::PollWorkload => Reply::Workload(self.workload(rt, ep, mb)),
            Call::NotifyClusterCfg(view) => {
                let version = view.version;
                // Newer by (epoch, version): a restarted coordinator's views start again.
                if view.stamp() >= self.view.stamp() {
                    self.view = view;
                    self.query_holds(ep, mb);
                }
                Reply::ClusterCfgApplied { version }
            }
            Call::SetMigrationTarget { target, count } => {
                if target.slot == nflib::MANAGER_SLOT {
                    return Reply::Refused {
                        reason: format!("{target} is not a runtime"),
                    };
                }
                let clock = rt.clock_ms();
                match rt.migrator.start_job(target, count, clock) {
                    Ok(_) => {
                        rt.restart_scan();
                        self.migration_target = Some(target);
                        Reply::Accepted
                    }
                    Err(why) => Reply::Refused {
                        reason: why.to_string(),
                    },
                }
            }
            Call::PrepareMigration {
                source,
                awake_ms,
                flows,
            } => {
                if source == mb.me() {
                    return Reply::Refused {
                        reason: "a runtime cannot migrate flows to itself".into(),
                    };
                }
                // Bounded: the coordinator asks for milliseconds; more would only burn a
                // core if the migration never comes.
                let awake_ns = u64::from(awake_ms.min(MAX_PREPARE_AWAKE_MS)) * 1_000_000;
                let until = nflib::time::mono_ns().saturating_add(awake_ns);
                let me = mb.me();
                ep.keep_awake(me.slot, until);
                if source.server != me.server {
                    ep.keep_awake(nflib::MANAGER_SLOT, until);
                }
                rt.prepare_for(flows);
                // First contact between two endpoints costs the transport a round trip with
                // one frame in flight (it must learn the peer's session). This ping pays it
                // now, before the source's first step is timed, rather than in front of a
                // step-1 message of a dozen frames.
                if mb
                    .send(source, LIAISON, LIAISON, &Message::Ping { seq: 0 })
                    .is_err()
                {
                    ep.counters().add(ProcCounter::ActorSendRefused as usize, 1);
                }
                Reply::Accepted
            }
            Call::MigrationStatus => match rt.migrator.report(rt.clock_ms()) {
                Some(r) => Reply::Migration(r),
                None => Reply::Refused {
                    reason: "no migration has run on this runtime".into(),
                },
            },
            Call::SetReplica { replicas, epoch } => {
                if let Some(refused) = self.stale(epoch) {
                    return refused;
                }
                if replicas.contains(&rt.me()) {
                    return Reply::Refused {
                        reason: "a runtime cannot replicate to itself".into(),
                    };
                }
                rt.repl.set_replicas(&replicas, now_ns);
                self.replicas = replicas;
                Reply::Accepted
            }
            Call::Kill { .. } => Reply::Refused {
                reason: "kill is carried out by the runtime's nfmgr".into(),
            },
            // Answered when its re-pointing is (`recover`).
            Call::Recover { .. } => Reply::Refused {
                reason: "recovery is answered apart".into(),
            },
            Call::ListFlows { limit } => list_flows(rt, limit),
            Call::StartProbe {
                to,
                run,
                count,
                size,
                depth,
            } => {
                if to == mb.me() {
                    return Reply::Refused {
                        reason: "a probe run needs another endpoint".into(),
                    };
                }
                if self.prober.as_ref().is_some_and(|p| !p.report.done) {
                    return Reply::Refused {
                        reason: "a probe run is already going".into(),
                    };
                }
                // Room for the message's other fields; a larger pad could never be sent.
                let max = nflib::frame::MAX_MESSAGE - 64;
                if size as usize > max {
                    return Reply::Refused {
                        reason: format!("probe messages are at most {max} bytes"),
                    };
                }
                let _ = from;
                self.prober = Some(Prober {
                    report: ProbeReport {
                        run,
                        peer: to,
                        first_ns: now_ns,
                        ..ProbeReport::default()
                    },
                    count,
                    depth,
                    pad: vec![0x5a; size as usize],
                    retransmits_at_start: mb.transport().stats().retransmits,
                    lost_at_start: mb.transport().stats().msgs_lost,
                });
                Reply::Accepted
            }
            Call::ProbeStatus { run } => {
                if let Some(p) = self.prober.as_ref().filter(|p| p.report.run == run) {
                    return Reply::Probe(p.report.clone());
                }
                match self.probes_in.iter().find(|(_, r, _)| r.run == run) {
                    Some((_, r, lat_sum)) => {
                        let mut r = r.clone();
                        r.latency_avg_ns = lat_sum.checked_div(r.received).unwrap_or(0);
                        Reply::Probe(r)
                    }
                    None => Reply::Refused {
                        reason: format!("no probe run {run} here"),
                    },
                }
            }
        }
    }

    /// `Recover`: takes over `failed`'s flows copied here and answers once every vswitch
    /// asked has re-pointed them (the takeover's end), or after `RECOVERY_ANSWER_WAIT_NS`
    /// with what is known then.
    #[allow(clippy::too_many_arguments)]
    fn recover(
        &mut self,
        rt: &mut Runtime,
        ep: &mut Endpoint,
        mb: &mut Mailbox,
        env: &Envelope,
        rpc: u64,
        failed: EndpointAddr,
        incarnation: u64,
        now_ns: u64,
    ) {
        if failed == rt.me() && incarnation >= rt.repl.incarnation() {
            let reply = Reply::Refused {
                reason: "a runtime cannot take over its own live flows".into(),
            };
            return send_reply(ep, mb, env.from, env.src_actor, rpc, reply);
        }
        self.recoveries += 1;
        let request = nflib::msg::RECOVERY_REQUEST | (self.recoveries & 0xffff_ffff);
        let (flows, messages) = rt.recover(&mut ShmIo { ep, mb }, failed, incarnation, request);
        self.recovering.push(PendingRecovery {
            rpc,
            to: env.from,
            actor: env.src_actor,
            request,
            awaiting: messages,
            flows: flows as u64,
            moved: 0,
            deadline_ns: now_ns.saturating_add(RECOVERY_ANSWER_WAIT_NS),
        });
        self.answer_recoveries(rt, ep, mb, now_ns);
    }

    /// A vswitch answered a recovery's re-pointing: `moved` keys now come here.
    pub fn recovery_switched(
        &mut self,
        rt: &mut Runtime,
        ep: &mut Endpoint,
        mb: &mut Mailbox,
        request: u64,
        moved: u32,
        now_ns: u64,
    ) {
        if let Some(p) = self.recovering.iter_mut().find(|p| p.request == request) {
            p.awaiting = p.awaiting.saturating_sub(1);
            p.moved += u64::from(moved);
        }
        self.answer_recoveries(rt, ep, mb, now_ns);
    }

    /// Answers the recoveries whose re-pointing is done or overdue.
    fn answer_recoveries(
        &mut self,
        rt: &mut Runtime,
        ep: &mut Endpoint,
        mb: &mut Mailbox,
        now_ns: u64,
    ) {
        let mut i = 0;
        while i < self.recovering.len() {
            let p = &self.recovering[i];
            if p.awaiting > 0 && now_ns < p.deadline_ns {
                i += 1;
                continue;
            }
            let p = self.recovering.swap_remove(i);
            if p.awaiting > 0 {
                eprintln!(
                    "nf-runtime: {} re-pointing message(s) of a recovery unanswered after \
                     {} ms ({} keys moved so far)",
                    p.awaiting,
                    RECOVERY_ANSWER_WAIT_NS / 1_000_000,
                    p.moved
                );
            }
            let reply = Reply::Recovered {
                flows: p.flows,
                lost: 0,
            };
            send_reply(ep, mb, p.to, p.actor, p.rpc, reply);
        }
        rt.repointing = !self.recovering.is_empty();
    }

    fn workload(&self, rt: &Runtime, ep: &mut Endpoint, mb: &Mailbox) -> Workload {
        let input_drops = ep
            .region()
            .slot(ep.slot())
            .map(|r| r.input_drops.0.load(Ordering::Relaxed))
            .unwrap_or(0);
        let c = ep.counters();
        Workload {
            flows_active: rt.flows().len() as u64,
            flows_created: c.get(ProcCounter::FlowsCreated as usize),
            rx_pkts: c.get(ProcCounter::RxPkts as usize),
            tx_pkts: c.get(ProcCounter::TxPkts as usize),
            input_drops,
            busy_ns: c.get(ProcCounter::BusyNs as usize),
            uptime_ms: rt.now_ms(),
            transport: TransportCounters::from(mb.transport().stats()),
            migration_target: self.migration_target,
            replicas: self.replicas.clone(),
            cluster_version: self.view.version,
            replica_flows: rt.replica.len() as u64,
            repl_holding: rt.repl.held().count() as u64,
            repl_unprotected: rt.repl.counters.unprotected,
            repl_lag_us: rt.repl.counters.last_lag_ns / 1000,
        }
    }

    fn probe_arrived(
        &mut self,
        from: EndpointAddr,
        run: u64,
        seq: u64,
        sent_ns: u64,
        len: usize,
        now_ns: u64,
    ) {
        let i = match self
            .probes_in
            .iter()
            .position(|(f, r, _)| *f == from && r.run == run)
        {
            Some(i) => i,
            None => {
                if self.probes_in.len() >= PROBE_RUNS_KEPT {
                    self.probes_in.pop_front();
                }
                self.probes_in.push_back((
                    from,
                    ProbeReport {
                        run,
                        peer: from,
                        first_ns: now_ns,
                        latency_min_ns: u64::MAX,
                        ..ProbeReport::default()
                    },
                    0,
                ));
                self.probes_in.len() - 1
            }
        };
        let (_, r, lat_sum) = &mut self.probes_in[i];
        // `sent` doubles as the next sequence number expected on the receiving side.
        if seq < r.sent {
            r.duplicates += 1;
        } else if seq > r.sent {
            r.out_of_order += 1;
        }
        r.sent = r.sent.max(seq + 1);
        r.received += 1;
        r.payload_bytes += len as u64;
        r.last_ns = now_ns;
        let lat = now_ns.saturating_sub(sent_ns);
        *lat_sum += lat;
        r.latency_min_ns = r.latency_min_ns.min(lat);
        r.latency_max_ns = r.latency_max_ns.max(lat);
    }

    /// Answers the recoveries whose vswitches did not answer in time, and sends the next
    /// probe messages of a run, as far as the transport's queue allows. Returns how many
    /// probe messages.
    pub fn tick(
        &mut self,
        rt: &mut Runtime,
        ep: &mut Endpoint,
        mb: &mut Mailbox,
        now_ns: u64,
    ) -> usize {
        if !self.recovering.is_empty() {
            self.answer_recoveries(rt, ep, mb, now_ns);
        }
        let Some(p) = self.prober.as_mut() else {
            return 0;
        };
        if p.report.done {
            return 0;
        }
        let to = p.report.peer;
        let mut sent = 0;
        let frames_each = mb.transport().frames_for(p.pad.len() + 32);
        // Keep no more queued than the window can carry: a message's latency is then the
        // network's and the peer's, not time spent waiting in this queue.
        let window = mb.transport().config().window as usize;
        let backlog = mb
            .transport()
            .peer(to)
            .map(|i| (i.in_flight + i.queued) as usize)
            .unwrap_or(0);
        let limit = match p.depth {
            0 => window + frames_each,
            d => d as usize * frames_each,
        };
        let mut budget = limit.saturating_sub(backlog);
        while p.report.sent < p.count
            && sent < PROBES_PER_TICK
            && budget >= frames_each
            && mb.room(to) >= frames_each
        {
            budget -= frames_each;
            let m = Message::Probe {
                run: p.report.run,
                seq: p.report.sent,
                sent_ns: nflib::time::mono_ns(),
                pad: std::mem::take(&mut p.pad),
            };
            let ok = mb.send(to, LIAISON, LIAISON, &m).is_ok();
            if let Message::Probe { pad, .. } = m {
                p.pad = pad;
            }
            if !ok {
                break;
            }
            p.report.sent += 1;
            p.report.payload_bytes += p.pad.len() as u64;
            sent += 1;
        }
        p.report.retransmits = mb.transport().stats().retransmits - p.retransmits_at_start;
        p.report.given_up = mb.transport().stats().msgs_lost - p.lost_at_start;
        if p.report.sent == p.count {
            let idle = mb
                .transport()
                .peer(to)
                .is_none_or(|i| i.in_flight + i.queued == 0);
            if idle {
                p.report.done = true;
                p.report.last_ns = now_ns;
            }
        }
        sent
    }
}

fn list_flows(rt: &Runtime, limit: u32) -> Reply {
    let now = rt.now_ms();
    let flows = rt.flows();
    let list = flows
        .live_rows()
        .take(limit as usize)
        .filter_map(|s| {
            let a = flows.get(s)?;
            let state = if a.closed() {
                "closed"
            } else if a.has(flag::FIN_ORIG) || a.has(flag::FIN_REPLY) {
                "closing"
            } else if a.has(flag::REPLIED) {
                "open"
            } else {
                "new"
            };
            Some(FlowInfo {
                key: a.key.to_string(),
                actor: a.id,
                age_ms: u64::from(ms_since(now, a.created_ms)),
                idle_ms: u64::from(ms_since(now, a.last_ms)),
                state: state.into(),
                aliases: flows.alias_count(s),
                vswitch: a.vswitch,
            })
        })
        .collect();
    Reply::Flows {
        total: flows.len() as u64,
        flows: list,
    }
}

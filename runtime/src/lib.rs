//! nf-runtime's engine, as a library so benchmarks and tests drive the same code the process
//! runs: the flow table, timers, the event log and the chain executor.

#![forbid(unsafe_code)]

pub mod aliases;
pub mod engine;
pub mod events;
pub mod failpoint;
pub mod flows;
pub mod holds;
pub mod io;
pub mod liaison;
pub mod migration;
#[cfg(test)]
mod migration_sim;
pub mod replication;
#[cfg(test)]
mod replication_sim;
#[cfg(test)]
mod sim_rng;
pub mod timers;

use io::ShmIo;
use nflib::config::Config;
use nflib::endpoint::Endpoint;
use nflib::frame::EndpointAddr;
use nflib::mailbox::Mailbox;
use nflib::msg::Message;

pub use engine::{FlowSettings, Runtime};
pub use migration::MigrationSettings;

/// Flows' worth of migration work (pending actors created, states installed, packets
/// carried) a runtime takes from its messages per loop iteration: about a quarter of a
/// millisecond, after which it goes back to its data rings. A large migration thus never
/// keeps the data path waiting long enough to fill a ring.
pub const MIGRATION_FLOWS_PER_LOOP: usize = 512;

/// Messages received and not yet handled (over the per-loop migration budget).
#[derive(Default)]
pub struct Backlog(std::collections::VecDeque<nflib::mailbox::Envelope>);

impl Backlog {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Reads the runtime's message rings and hands each message to its actor (the liaison, or
/// the migrator), in order, within the per-loop migration budget. Returns frames read
/// plus messages handled, and at least 1 while a backlog remains (the loop must not sleep).
pub fn serve_messages(
    ep: &mut Endpoint,
    rt: &mut Runtime,
    liaison: &mut liaison::Liaison,
    mb: &mut Mailbox,
    backlog: &mut Backlog,
    now_ns: u64,
) -> usize {
    let n = mb.receive(ep, now_ns);
    backlog.0.extend(mb.take_inbox());
    let mut budget = MIGRATION_FLOWS_PER_LOOP;
    let mut handled = 0;
    while let Some(env) = backlog.0.front() {
        let weight = migration_weight(&env.msg);
        if weight > budget && budget < MIGRATION_FLOWS_PER_LOOP {
            break;
        }
        budget = budget.saturating_sub(weight);
        let Some(env) = backlog.0.pop_front() else {
            break;
        };
        handled += 1;
        // A takeover of a runtime whose messages still wait here: those it sent before it
        // died (a migration's state, say) are its last word, and go first.
        if let Message::Rpc {
            call: nflib::msg::Call::Recover { failed, .. },
            ..
        } = &env.msg
        {
            handled += serve_from(ep, rt, liaison, mb, backlog, &[*failed], now_ns);
        }
        serve_one(ep, rt, liaison, mb, env, now_ns);
    }
    n + handled + usize::from(!backlog.is_empty())
}

/// Handles, in order and whatever the budget, the messages waiting in `backlog` from
/// `peers` (runtimes found dead: what they sent before dying is handled before their
/// death is). Returns how many.
pub fn serve_from(
    ep: &mut Endpoint,
    rt: &mut Runtime,
    liaison: &mut liaison::Liaison,
    mb: &mut Mailbox,
    backlog: &mut Backlog,
    peers: &[EndpointAddr],
    now_ns: u64,
) -> usize {
    if peers.is_empty() || !backlog.0.iter().any(|e| peers.contains(&e.from)) {
        return 0;
    }
    let (theirs, rest): (Vec<_>, Vec<_>) =
        backlog.0.drain(..).partition(|e| peers.contains(&e.from));
    backlog.0.extend(rest);
    let n = theirs.len();
    for env in theirs {
        serve_one(ep, rt, liaison, mb, env, now_ns);
    }
    n
}

/// Hands one message to its actor.
fn serve_one(
    ep: &mut Endpoint,
    rt: &mut Runtime,
    liaison: &mut liaison::Liaison,
    mb: &mut Mailbox,
    env: nflib::mailbox::Envelope,
    now_ns: u64,
) {
    let now_ms = rt.now_ms();
    if env.dst_actor != nflib::frame::LIAISON {
        liaison.unknown += 1;
        return;
    }
    if let Message::RuntimeSet {
        request,
        moved,
        unmoved,
        ..
    } = &env.msg
    {
        if request & nflib::msg::RECOVERY_REQUEST != 0 {
            rt.drop_unmoved(&mut ShmIo { ep, mb }, unmoved);
            liaison.recovery_switched(rt, ep, mb, *request, *moved, now_ns);
            return;
        }
    }
    if let Message::KeysGiven { keys } = &env.msg {
        rt.unpark(&mut ShmIo { ep, mb }, env.from, keys);
        return;
    }
    if env.msg.is_migration() {
        if matches!(env.msg, Message::MigrateState { .. }) {
            failpoint::migrate_state_received();
        }
        if failpoint::armed() {
            failpoint::migrate_switched(&env.msg);
        }
        rt.on_migration_message(&mut ShmIo { ep, mb }, env.from, env.msg, now_ms);
    } else {
        liaison.handle(rt, ep, mb, env, now_ns);
    }
}

/// How many flows' worth of work a message is (0 for everything but migration's bulk).
fn migration_weight(m: &Message) -> usize {
    match m {
        Message::MigrateInit { flows, .. } | Message::MigrateForget { flows, .. } => flows.len(),
        Message::MigrateState { flows, .. } => flows.len(),
        Message::MigratePackets { packets, .. } => packets.len(),
        _ => 0,
    }
}

/// Which peers of a migration have died or restarted since they were first seen: the
/// transport's verdicts, this server's process slots (a killed runtime's slot leaves the
/// running state, a restarted one has a new generation) and the cluster view for other
/// servers.
#[derive(Default)]
pub struct PeerWatch {
    seen: std::collections::HashMap<EndpointAddr, u64>,
}

impl PeerWatch {
    /// `events` are the transport's verdicts since the last call (`Mailbox::take_events`).
    pub fn check(
        &mut self,
        ep: &Endpoint,
        me: EndpointAddr,
        view: &nflib::cluster::ClusterView,
        peers: &[EndpointAddr],
        events: &[nflib::reliable::PeerEvent],
        dead: &mut Vec<EndpointAddr>,
    ) {
        use nflib::reliable::PeerEvent;
        for e in events {
            match e {
                PeerEvent::Dead { peer, .. } | PeerEvent::Restarted { peer, .. } => {
                    if peers.contains(peer) {
                        dead.push(*peer)
                    }
                }
            }
        }
        self.seen.retain(|p, _| peers.contains(p));
        for p in peers {
            let token = life_of(ep, me, view, *p);
            // A remote peer the view does not know yet (no view at all) is not judged.
            if token.is_none() && p.server != me.server && view.servers.is_empty() {
                continue;
            }
            match (self.seen.get(p), token) {
                (_, None) => dead.push(*p),
                (Some(t), Some(now)) if *t != now => dead.push(*p),
                (None, Some(now)) => {
                    self.seen.insert(*p, now);
                }
                _ => {}
            }
        }
        dead.sort();
        dead.dedup();
        for d in dead.iter() {
            self.seen.remove(d);
        }
    }
}

pub use nflib::process::{stored_config, StartError};

/// The mailbox of the process attached as `ep`.
pub fn mailbox(ep: &Endpoint, cfg: &Config) -> Mailbox {
    Mailbox::for_endpoint(ep, cfg.cluster.server_id, cfg.cluster.transport())
}

/// Builds the runtime for the process in `ep`'s slot from the configuration nfmgr stored in
/// the region: its chain (functions built from their settings), flow settings and event log.
pub fn from_region(ep: &Endpoint, cfg: &Config) -> Result<Runtime, StartError> {
    let name = nflib::process::own_name(ep);
    let rc = cfg.runtime(&name).ok_or_else(|| StartError::Unknown {
        kind: "runtime",
        name: name.clone(),
    })?;
    let stages = match cfg.chain_of(rc) {
        Some(chain) => {
            // This runtime's place among those running the chain (functions partition
            // resources such as NAT ports by it).
            let peers: Vec<&str> = cfg
                .runtimes
                .iter()
                .filter(|r| cfg.chain_of(r) == Some(chain))
                .map(|r| r.name.as_str())
                .collect();
            let index = peers.iter().position(|n| *n == name).unwrap_or(0) as u32;
            nfs::registry()
                .build_chain(cfg, chain, &name, index, peers.len() as u32)
                .map_err(StartError::Chain)?
        }
        None => Vec::new(),
    };
    let events = match &rc.events {
        Some(p) => {
            let path = cfg
                .base_dir
                .join(p.to_string_lossy().replace("{runtime}", &name));
            events::EventLog::open(&path, &name).map_err(|source| StartError::EventLog {
                runtime: name.clone(),
                path: path.clone(),
                source,
            })?
        }
        None => events::EventLog::disabled(),
    };
    let settings = FlowSettings {
        max_flows: rc.max_flows as usize,
        idle_ms: rc.idle_timeout_s.saturating_mul(1000),
        unreplied_ms: rc.unreplied_timeout_s.saturating_mul(1000),
        closed_linger_ms: rc.closed_linger_ms,
        alias_wait_ms: rc.alias_wait_ms,
    };
    let mut rt = Runtime::new(
        stages,
        settings,
        events,
        EndpointAddr::new(cfg.cluster.server_id, ep.slot()),
    );
    let m = &cfg.migration;
    let buffer = m.buffer_packets(cfg.region.buffers) as usize;
    rt.set_migration(
        cfg.chain_of(rc).map(str::to_string),
        MigrationSettings {
            group_size: m.group_size as usize,
            max_groups: m.max_groups as usize,
            step_timeout_ms: m.step_timeout_ms,
            straggler_timeout_ms: m.straggler_timeout_ms,
            tombstone_ms: m.tombstone_ms,
            pending_timeout_ms: m.pending_timeout_ms,
            buffer_packets: buffer,
            buffer_high_water: buffer * m.buffer_high_water_pct as usize / 100,
            max_flows_per_s: m.max_flows_per_s,
            keep_awake_us: m.keep_awake_us,
            hand_back: cfg
                .chain_of(rc)
                .and_then(|c| cfg.chain(c))
                .is_some_and(|c| c.replication != nflib::config::ReplicationMode::Off),
        },
    );
    if let Some(chain) = cfg.chain_of(rc).and_then(|c| cfg.chain(c)) {
        use nflib::config::{ReplicationMode, WithoutReplicaPolicy};
        let mode = match chain.replication {
            ReplicationMode::Off => replication::Mode::Off,
            ReplicationMode::Periodic => replication::Mode::Periodic {
                packets: chain.replication_packets,
                interval_ms: chain.replication_interval_ms,
            },
            ReplicationMode::OutputCommit => replication::Mode::OutputCommit,
        };
        rt.set_replication(
            replication::Settings {
                mode,
                without_replica: match chain.without_replica {
                    WithoutReplicaPolicy::Wait => replication::WithoutReplica::Wait,
                    WithoutReplicaPolicy::Unprotected => replication::WithoutReplica::Unprotected,
                },
                commit_wait_ms: chain.commit_wait_ms,
                max_replica_flows: rc.max_replica_flows.unwrap_or(rc.max_flows) as usize,
            },
            u64::from(ep.generation()),
        );
    }
    Ok(rt)
}

/// Which life of endpoint `p` lives now, if it does: its slot's generation on this
/// server, its server's incarnation in the cluster view for another's.
fn life_of(
    ep: &Endpoint,
    me: EndpointAddr,
    view: &nflib::cluster::ClusterView,
    p: EndpointAddr,
) -> Option<u64> {
    if p.server == me.server {
        ep.region().slot(p.slot).and_then(|s| {
            s.state()
                .is_alive()
                .then(|| s.generation.load(std::sync::atomic::Ordering::Relaxed) as u64)
        })
    } else {
        view.server(p.server).filter(|s| s.alive).and_then(|s| {
            s.endpoints
                .iter()
                .any(|e| e.addr == p && e.alive)
                .then_some(s.incarnation)
        })
    }
}

/// Whether endpoint `p` lives now: its process slot on this server, the cluster view for
/// another server's.
pub fn peer_alive(
    ep: &Endpoint,
    me: EndpointAddr,
    view: &nflib::cluster::ClusterView,
    p: EndpointAddr,
) -> bool {
    life_of(ep, me, view, p).is_some()
}

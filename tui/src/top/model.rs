//! What the dashboard shows, computed from consecutive `top` answers: rates, busy shares,
//! per-chain sums and throughput histories. Pure: it is fed reports and a clock, so tests
//! build it from fixed data.

use std::collections::{BTreeMap, HashMap, VecDeque};

use nflib::slot::{ProcessKind, SlotState};
use nflib::snapshot::{ProcessSnapshot, RegionSnapshot};
use nflib::stats::PortKind;
use nflib::top::{MigrationRecord, RecoveryRecord, ServerStats, TopEvent, TopReport};

/// Samples kept per throughput history (one a second).
pub const HISTORY: usize = 300;

#[derive(Clone, Debug, PartialEq)]
pub struct ProcRow {
    pub server: u16,
    pub slot: u16,
    pub name: String,
    pub kind: ProcessKind,
    pub core: Option<u32>,
    pub pid: u32,
    pub state: SlotState,
    pub chain: Option<String>,
    pub rx_pps: f64,
    pub tx_pps: f64,
    pub rx_bps: f64,
    /// Packets it dropped itself (all `drop_*` counters), per second.
    pub drops_ps: f64,
    pub drops: u64,
    /// Packets producers could not queue to it (its input ring was full).
    pub input_drops: u64,
    pub input_drops_ps: f64,
    pub flows: u64,
    pub migrated_in: u64,
    pub migrated_out: u64,
    /// Flows moved in or out in the last interval.
    pub migrating_in: u64,
    pub migrating_out: u64,
    /// Flows of other runtimes replicated here.
    pub replicas: u64,
    /// Share of the interval its loop spent working.
    pub busy_pct: f64,
    /// Working time per packet received.
    pub ns_per_pkt: Option<f64>,
    pub restarts: u32,
    pub last_exit: Option<i32>,
    /// Deaths in a row soon after start (a crash loop).
    pub quick_deaths: u32,
}

impl ProcRow {
    /// `name@server` as the control socket accepts it.
    pub fn spec(&self) -> String {
        format!("{}@{}", self.name, self.server)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct PortRow {
    pub server: u16,
    pub name: String,
    pub kind: PortKind,
    pub rx_pps: f64,
    pub tx_pps: f64,
    pub rx_bps: f64,
    pub tx_bps: f64,
    pub drops: u64,
    pub drops_ps: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct NfRow {
    pub kind: String,
    pub drops: u64,
    pub drops_ps: f64,
    /// IDS alerts, for functions that count them.
    pub alerts: Option<u64>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ChainRow {
    pub name: String,
    pub nfs: Vec<NfRow>,
    /// `name@server` of each runtime serving it, and whether it runs.
    pub runtimes: Vec<(String, bool)>,
    pub flows: u64,
    pub rx_pps: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ServerRow {
    pub server: u16,
    pub name: String,
    pub alive: bool,
    pub this: bool,
    pub coordinator: bool,
    pub stats_age_ms: Option<u64>,
    pub processes: usize,
    pub pool_in_use: u64,
    pub pool_total: u64,
    pub hugepages: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Link {
    /// No answer yet.
    Connecting,
    Up,
    /// The last `failures` requests failed; the last error is kept.
    Lost {
        error: String,
        failures: u32,
    },
}

#[derive(Clone, Debug)]
pub struct Model {
    pub link: Link,
    pub instance: String,
    pub server: u16,
    pub server_name: String,
    pub role: String,
    pub uptime_s: f64,
    pub view_version: u64,
    /// Wall clock of the last answer.
    pub taken_ms: u64,
    pub servers: Vec<ServerRow>,
    pub procs: Vec<ProcRow>,
    pub ports: Vec<PortRow>,
    pub chains: Vec<ChainRow>,
    pub events: Vec<TopEvent>,
    pub migrations: Vec<MigrationRecord>,
    pub recoveries: Vec<RecoveryRecord>,
    /// Packets per second into all runtimes, and out of all ports, one sample an answer.
    pub runtime_history: VecDeque<u64>,
    pub port_rx_history: VecDeque<u64>,
    pub port_tx_history: VecDeque<u64>,
    /// Per process (`name@server`): received packets per second.
    pub proc_history: HashMap<String, VecDeque<u64>>,
    /// The last statistics of each server, for the next rates.
    prev: BTreeMap<u16, ServerStats>,
}

impl Default for Model {
    fn default() -> Self {
        Model {
            link: Link::Connecting,
            instance: String::new(),
            server: 0,
            server_name: String::new(),
            role: String::new(),
            uptime_s: 0.0,
            view_version: 0,
            taken_ms: 0,
            servers: Vec::new(),
            procs: Vec::new(),
            ports: Vec::new(),
            chains: Vec::new(),
            events: Vec::new(),
            migrations: Vec::new(),
            recoveries: Vec::new(),
            runtime_history: VecDeque::new(),
            port_rx_history: VecDeque::new(),
            port_tx_history: VecDeque::new(),
            proc_history: HashMap::new(),
            prev: BTreeMap::new(),
        }
    }
}

fn per_sec(now: u64, before: u64, secs: f64) -> f64 {
    if secs <= 0.0 {
        0.0
    } else {
        now.saturating_sub(before) as f64 / secs
    }
}

fn counter(c: &BTreeMap<String, u64>, name: &str) -> u64 {
    c.get(name).copied().unwrap_or(0)
}

fn drops(c: &BTreeMap<String, u64>) -> u64 {
    c.iter()
        .filter(|(k, _)| k.starts_with("drop_"))
        .map(|(_, v)| *v)
        .sum()
}

fn port_drops(c: &BTreeMap<String, u64>) -> u64 {
    [
        "rx_drop_ring_full",
        "rx_drop_no_buffer",
        "rx_kernel_drops",
        "tx_drop_full",
        "tx_errors",
        "dev_imissed",
        "dev_ierrors",
        "dev_oerrors",
        "dev_rx_nombuf",
    ]
    .iter()
    .map(|k| counter(c, k))
    .sum()
}

fn push(h: &mut VecDeque<u64>, v: f64) {
    if h.len() >= HISTORY {
        h.pop_front();
    }
    h.push_back(v.round() as u64);
}

/// The previous snapshot of the same process, unless it was replaced since (its counters
/// restarted from zero).
fn same_process<'a>(
    prev: Option<&'a RegionSnapshot>,
    p: &ProcessSnapshot,
) -> Option<&'a ProcessSnapshot> {
    prev?
        .processes
        .iter()
        .find(|q| q.slot == p.slot && q.generation == p.generation)
}

impl Model {
    /// A request failed: the data stays on screen, marked stale.
    pub fn lost(&mut self, error: String) {
        let failures = match &self.link {
            Link::Lost { failures, .. } => failures + 1,
            _ => 1,
        };
        self.link = Link::Lost { error, failures };
    }

    /// Takes a new answer: rates are computed against the previous one of each server.
    pub fn update(&mut self, r: TopReport) {
        self.link = Link::Up;
        self.instance = r.instance;
        self.server = r.server;
        self.server_name = r.name;
        self.role = r.role;
        self.uptime_s = r.uptime_s;
        self.view_version = r.view_version;
        self.taken_ms = r.taken_ms;
        let chain_of: HashMap<(u16, u16), (Option<String>, bool)> = r
            .endpoints
            .iter()
            .map(|e| ((e.addr.server, e.addr.slot), (e.chain.clone(), e.alive)))
            .collect();
        let mut procs = Vec::new();
        let mut ports = Vec::new();
        let mut servers = Vec::new();
        // Per chain: functions' counters summed over the runtimes serving it.
        let mut nf_sums: BTreeMap<String, Vec<NfRow>> = BTreeMap::new();
        for s in &r.servers {
            let mut row = ServerRow {
                server: s.server,
                name: s.name.clone(),
                alive: s.alive,
                this: s.this,
                coordinator: s.coordinator,
                stats_age_ms: s.stats_age_ms,
                processes: 0,
                pool_in_use: 0,
                pool_total: 0,
                hugepages: false,
            };
            let Some(stats) = &s.stats else {
                servers.push(row);
                continue;
            };
            let snap = &stats.snapshot;
            row.processes = snap.processes.len();
            row.pool_in_use = snap.pool.in_use;
            row.pool_total = snap.pool.total;
            row.hugepages = snap.hugetlbfs;
            servers.push(row);
            let prev = self.prev.get(&s.server);
            // A member's statistics that did not change keep their last rates.
            let secs = prev
                .map(|p| stats.taken_ms.saturating_sub(p.taken_ms) as f64 / 1000.0)
                .unwrap_or(0.0);
            let stale = prev.is_some_and(|p| p.taken_ms == stats.taken_ms);
            let prev_snap = prev.map(|p| &p.snapshot);
            for p in &snap.processes {
                let q = same_process(prev_snap, p);
                let c = &p.counters;
                let rate = |name: &str| match q {
                    Some(q) => per_sec(counter(c, name), counter(&q.counters, name), secs),
                    None => 0.0,
                };
                let rx = rate("rx_pkts");
                let busy_ns = rate("busy_ns");
                let (chain, _) = chain_of
                    .get(&(s.server, p.slot))
                    .cloned()
                    .unwrap_or((None, false));
                let old = self
                    .procs
                    .iter()
                    .find(|o| o.server == s.server && o.slot == p.slot);
                let mut row = ProcRow {
                    server: s.server,
                    slot: p.slot,
                    name: p.name.clone(),
                    kind: p.kind,
                    core: p.core,
                    pid: p.pid,
                    state: p.state,
                    chain: chain.clone(),
                    rx_pps: rx,
                    tx_pps: rate("tx_pkts"),
                    rx_bps: rate("rx_bytes") * 8.0,
                    drops_ps: match q {
                        Some(q) => per_sec(drops(c), drops(&q.counters), secs),
                        None => 0.0,
                    },
                    drops: drops(c),
                    input_drops: p.input_drops,
                    input_drops_ps: match q {
                        Some(q) => per_sec(p.input_drops, q.input_drops, secs),
                        None => 0.0,
                    },
                    flows: counter(c, "flows_active"),
                    migrated_in: counter(c, "migrated_in"),
                    migrated_out: counter(c, "migrated_out"),
                    migrating_in: q.map_or(0, |q| {
                        counter(c, "migrated_in")
                            .saturating_sub(counter(&q.counters, "migrated_in"))
                    }),
                    migrating_out: q.map_or(0, |q| {
                        counter(c, "migrated_out")
                            .saturating_sub(counter(&q.counters, "migrated_out"))
                    }),
                    replicas: counter(c, "replica_flows"),
                    busy_pct: (busy_ns / 1e9 * 100.0).min(100.0),
                    ns_per_pkt: (rx > 0.0).then(|| busy_ns / rx),
                    restarts: p.restarts,
                    last_exit: p.last_exit,
                    quick_deaths: p.quick_deaths,
                };
                if stale {
                    if let Some(o) = old {
                        row = ProcRow {
                            state: p.state,
                            pid: p.pid,
                            ..o.clone()
                        };
                    }
                }
                if p.kind == ProcessKind::Runtime && p.state == SlotState::Running {
                    if let Some(chain) = &chain {
                        let sums = nf_sums.entry(chain.clone()).or_default();
                        for (i, nf) in p.nfs.iter().enumerate() {
                            let d = counter(&nf.counters, "drops");
                            let d_prev = q
                                .and_then(|q| q.nfs.get(i))
                                .map(|n| counter(&n.counters, "drops"));
                            let dps = d_prev.map_or(0.0, |dp| per_sec(d, dp, secs));
                            let alerts = nf.counters.get("alerts").copied();
                            if sums.len() <= i {
                                sums.push(NfRow {
                                    kind: nf.kind.clone(),
                                    drops: 0,
                                    drops_ps: 0.0,
                                    alerts: None,
                                });
                            }
                            let e = &mut sums[i];
                            e.drops += d;
                            e.drops_ps += dps;
                            if let Some(a) = alerts {
                                e.alerts = Some(e.alerts.unwrap_or(0) + a);
                            }
                        }
                    }
                }
                procs.push(row);
            }
            for p in &snap.ports {
                if p.kind == PortKind::Unused {
                    continue;
                }
                let q = prev_snap.and_then(|ps| ps.ports.iter().find(|q| q.index == p.index));
                let c = &p.counters;
                let rate = |name: &str| match q {
                    Some(q) => per_sec(counter(c, name), counter(&q.counters, name), secs),
                    None => 0.0,
                };
                let mut row = PortRow {
                    server: s.server,
                    name: p.name.clone(),
                    kind: p.kind,
                    rx_pps: rate("rx_pkts"),
                    tx_pps: rate("tx_pkts"),
                    rx_bps: rate("rx_bytes") * 8.0,
                    tx_bps: rate("tx_bytes") * 8.0,
                    drops: port_drops(c),
                    drops_ps: match q {
                        Some(q) => per_sec(port_drops(c), port_drops(&q.counters), secs),
                        None => 0.0,
                    },
                };
                if stale {
                    if let Some(o) = self
                        .ports
                        .iter()
                        .find(|o| o.server == s.server && o.name == p.name)
                    {
                        row = o.clone();
                    }
                }
                ports.push(row);
            }
            if !stale {
                self.prev.insert(s.server, stats.clone());
            }
        }
        let mut chains = Vec::new();
        for c in &r.chains {
            let runtimes: Vec<(String, bool)> = r
                .endpoints
                .iter()
                .filter(|e| e.chain.as_deref() == Some(c.name.as_str()))
                .map(|e| (format!("{}@{}", e.name, e.addr.server), e.alive))
                .collect();
            let serving = |p: &&ProcRow| p.chain.as_deref() == Some(c.name.as_str());
            let sums = nf_sums.remove(&c.name).unwrap_or_default();
            let nfs = c
                .nfs
                .iter()
                .enumerate()
                .map(|(i, kind)| {
                    let s = sums.get(i);
                    NfRow {
                        kind: kind.clone(),
                        drops: s.map_or(0, |s| s.drops),
                        drops_ps: s.map_or(0.0, |s| s.drops_ps),
                        alerts: s.and_then(|s| s.alerts),
                    }
                })
                .collect();
            chains.push(ChainRow {
                name: c.name.clone(),
                nfs,
                runtimes,
                flows: procs.iter().filter(serving).map(|p| p.flows).sum(),
                rx_pps: procs.iter().filter(serving).map(|p| p.rx_pps).sum(),
            });
        }
        push(
            &mut self.runtime_history,
            procs
                .iter()
                .filter(|p| p.kind == ProcessKind::Runtime)
                .map(|p| p.rx_pps)
                .sum(),
        );
        push(
            &mut self.port_rx_history,
            ports.iter().map(|p| p.rx_pps).sum(),
        );
        push(
            &mut self.port_tx_history,
            ports.iter().map(|p| p.tx_pps).sum(),
        );
        for p in &procs {
            let h = self.proc_history.entry(p.spec()).or_default();
            push(h, p.rx_pps);
        }
        self.servers = servers;
        self.procs = procs;
        self.ports = ports;
        self.chains = chains;
        self.events = r.events;
        self.migrations = r.migrations;
        self.recoveries = r.recoveries;
    }

    /// Migrations not finished yet.
    pub fn migrations_in_progress(&self) -> impl Iterator<Item = &MigrationRecord> {
        self.migrations.iter().filter(|m| !m.done)
    }

    /// Processes that died and are not running again yet.
    pub fn recoveries_in_progress(&self) -> impl Iterator<Item = &RecoveryRecord> {
        self.recoveries.iter().filter(|r| r.recovered_ms.is_none())
    }
}

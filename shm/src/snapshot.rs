//! A serialisable picture of a running instance, read from its region: processes, ports and
//! the pool. `nfmgr stats`, the final report, the live rate display and the dashboard all
//! read this one structure, so they cannot disagree.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};

use crate::region::{Region, RegionState};
use crate::slot::{ProcessKind, SlotState};
use crate::stats::{snapshot, PortCounter, PortKind, ProcCounter};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProcessSnapshot {
    pub slot: u16,
    pub name: String,
    pub kind: ProcessKind,
    pub state: SlotState,
    pub pid: u32,
    pub core: Option<u32>,
    pub generation: u32,
    pub restarts: u32,
    /// Exit code (>= 0) or minus the signal number of the last process in this slot.
    pub last_exit: Option<i32>,
    /// Deaths in a row soon after start (a crash loop); 0 once a life has lasted.
    #[serde(default)]
    pub quick_deaths: u32,
    /// Packets producers could not queue to it (its input ring was full).
    pub input_drops: u64,
    pub counters: BTreeMap<String, u64>,
    /// The network functions of a runtime's chain, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nfs: Vec<NfSnapshot>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NfSnapshot {
    pub kind: String,
    /// `drops` plus the function's own counters.
    pub counters: BTreeMap<String, u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PortSnapshot {
    pub index: u16,
    pub name: String,
    pub kind: PortKind,
    pub counters: BTreeMap<String, u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PoolSnapshot {
    pub total: u64,
    /// In nfmgr's free stack.
    pub free: u64,
    /// Free but parked in processes (refill rings and caches).
    pub cached: u64,
    /// Holding packets (or leaked): total - free - cached.
    pub in_use: u64,
    pub reclaimed: u64,
    pub double_frees: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RegionSnapshot {
    pub instance: String,
    pub state: RegionState,
    pub region: String,
    pub hugetlbfs: bool,
    pub manager_pid: u32,
    pub pool: PoolSnapshot,
    pub processes: Vec<ProcessSnapshot>,
    pub ports: Vec<PortSnapshot>,
}

fn nf_snapshots(region: &Region, slot: u16) -> Vec<NfSnapshot> {
    let mut out = Vec::new();
    for i in 0..crate::limits::MAX_NFS {
        let Some(rec) = region.nf_stats(slot, i) else {
            break;
        };
        let kind = rec.kind.get();
        if kind.is_empty() {
            break;
        }
        let values = snapshot(&rec.counters.0);
        let mut counters = BTreeMap::new();
        counters.insert("drops".to_string(), values[0]);
        for (j, label) in rec.labels().into_iter().enumerate() {
            if let Some(v) = values.get(j + 1) {
                counters.insert(label, *v);
            }
        }
        out.push(NfSnapshot { kind, counters });
    }
    out
}

impl RegionSnapshot {
    pub fn read(region: &Region) -> RegionSnapshot {
        let h = region.header();
        let total = region.buffer_count() as u64;
        let free = h.pool_free.load(Ordering::Relaxed);
        let cached = h.pool_cached.load(Ordering::Relaxed);
        let mut processes = Vec::new();
        for i in 0..region.slot_count() {
            let Some(s) = region.slot(i) else { continue };
            let kind = s.kind();
            if kind == ProcessKind::None {
                continue;
            }
            let values = snapshot(&s.counters.0);
            let counters = ProcCounter::ALL
                .iter()
                .map(|c| (c.label().to_string(), values[*c as usize]))
                .collect();
            let core = s.core.load(Ordering::Relaxed);
            let exit = s.last_exit.load(Ordering::Relaxed);
            let restarts = s.restarts.load(Ordering::Relaxed);
            processes.push(ProcessSnapshot {
                slot: i,
                name: s.name.get(),
                kind,
                state: s.state(),
                pid: s.pid.load(Ordering::Relaxed),
                core: (core >= 0).then_some(core as u32),
                generation: s.generation.load(Ordering::Relaxed),
                restarts,
                quick_deaths: s.quick_deaths.load(Ordering::Relaxed),
                input_drops: s.input_drops.0.load(Ordering::Relaxed),
                nfs: nf_snapshots(region, i),
                last_exit: (restarts > 0
                    || matches!(s.state(), SlotState::Dead | SlotState::Failed))
                .then_some(exit),
                counters,
            });
        }
        let mut ports = Vec::new();
        for i in 0..region.config().ports as u16 {
            let Some(p) = region.port(i) else { continue };
            let values = snapshot(&p.counters.0);
            ports.push(PortSnapshot {
                index: i,
                name: p.name.get(),
                kind: PortKind::from_raw(p.kind.load(Ordering::Relaxed)),
                counters: PortCounter::ALL
                    .iter()
                    .map(|c| (c.label().to_string(), values[*c as usize]))
                    .collect(),
            });
        }
        RegionSnapshot {
            instance: h.instance.get(),
            state: h.state(),
            region: region.path().display().to_string(),
            hugetlbfs: h.hugetlbfs.load(Ordering::Relaxed) != 0,
            manager_pid: h.manager_pid.load(Ordering::Relaxed),
            pool: PoolSnapshot {
                total,
                free,
                cached,
                in_use: total.saturating_sub(free + cached),
                reclaimed: h.pool_reclaimed.load(Ordering::Relaxed),
                double_frees: h.pool_double_frees.load(Ordering::Relaxed),
            },
            processes,
            ports,
        }
    }

    pub fn process(&self, name: &str) -> Option<&ProcessSnapshot> {
        self.processes.iter().find(|p| p.name == name)
    }

    pub fn port(&self, name: &str) -> Option<&PortSnapshot> {
        self.ports.iter().find(|p| p.name == name)
    }

    /// Counter `counter` of process `name`; 0 when either is unknown (a counter never
    /// touched is not written).
    pub fn process_counter(&self, name: &str, counter: &str) -> u64 {
        self.process(name)
            .and_then(|p| p.counters.get(counter).copied())
            .unwrap_or(0)
    }

    /// Counter `counter` of port `name`; 0 when either is unknown.
    pub fn port_counter(&self, name: &str, counter: &str) -> u64 {
        self.port(name)
            .and_then(|p| p.counters.get(counter).copied())
            .unwrap_or(0)
    }
}

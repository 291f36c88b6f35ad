//! Live rates printed by `nfmgr start` (with `manager.log_rates`) and `nfmgr demo`, and the
//! summary printed at exit. Rates are differences between two region snapshots.

use std::fmt::Write as _;
use std::time::Instant;

use nflib::slot::ProcessKind;
use nflib::snapshot::RegionSnapshot;
use nflib::stats::PortKind;
use nflib::Region;

pub struct LiveRates {
    start: Instant,
    prev: Option<(Instant, RegionSnapshot)>,
}

fn rate(now: u64, before: u64, secs: f64) -> f64 {
    if secs <= 0.0 {
        0.0
    } else {
        now.saturating_sub(before) as f64 / secs
    }
}

/// 1234567.0 -> "1.23M".
pub fn si(v: f64) -> String {
    if v >= 1e9 {
        format!("{:.2}G", v / 1e9)
    } else if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

fn drops_of(c: &std::collections::BTreeMap<String, u64>) -> u64 {
    c.iter()
        .filter(|(k, _)| k.starts_with("drop_"))
        .map(|(_, v)| *v)
        .sum()
}

impl Default for LiveRates {
    fn default() -> Self {
        Self::new()
    }
}

impl LiveRates {
    pub fn new() -> LiveRates {
        LiveRates {
            start: Instant::now(),
            prev: None,
        }
    }

    /// Returns the text to print for this interval (empty on the first call).
    pub fn tick(&mut self, region: &Region) -> String {
        let now = Instant::now();
        let snap = RegionSnapshot::read(region);
        let mut out = String::new();
        if let Some((t0, prev)) = &self.prev {
            let secs = now.duration_since(*t0).as_secs_f64();
            let _ = write!(out, "[{:>6.1}s] ", self.start.elapsed().as_secs_f64());
            for p in &snap.processes {
                if p.kind == ProcessKind::Manager {
                    continue;
                }
                let Some(q) = prev.process(&p.name) else {
                    continue;
                };
                let rx = rate(p.counters["rx_pkts"], q.counters["rx_pkts"], secs);
                let d = drops_of(&p.counters).saturating_sub(drops_of(&q.counters));
                let _ = write!(
                    out,
                    "{} {}pps{}{}  ",
                    p.name,
                    si(rx),
                    if d > 0 {
                        format!(" drop {d}")
                    } else {
                        String::new()
                    },
                    match p.state {
                        nflib::slot::SlotState::Running => String::new(),
                        s => format!(" [{s:?}]").to_lowercase(),
                    }
                );
            }
            out.push_str("| ");
            for p in &snap.ports {
                let Some(q) = prev.port(&p.name) else {
                    continue;
                };
                match p.kind {
                    PortKind::Sink => {
                        let rx = rate(p.counters["sink_rx"], q.counters["sink_rx"], secs);
                        let _ = write!(
                            out,
                            "{} {}pps lost {} dup {} reord {}  ",
                            p.name,
                            si(rx),
                            p.counters["sink_lost"],
                            p.counters["sink_duplicates"],
                            p.counters["sink_reordered"]
                        );
                    }
                    _ => {
                        let rx = rate(p.counters["rx_pkts"], q.counters["rx_pkts"], secs);
                        let tx = rate(p.counters["tx_pkts"], q.counters["tx_pkts"], secs);
                        let _ = write!(out, "{} in {}pps out {}pps  ", p.name, si(rx), si(tx));
                    }
                }
            }
            let _ = write!(
                out,
                "| pool {}/{} in use",
                snap.pool.in_use, snap.pool.total
            );
        }
        self.prev = Some((now, snap));
        out
    }
}

/// Human summary of a final snapshot and the ports' reports.
pub fn summary(snap: &RegionSnapshot, ports: &[(String, Option<serde_json::Value>)]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "processes:");
    for p in &snap.processes {
        let _ = writeln!(
            out,
            "  {:<8} {:<8} rx {:>12} tx {:>12} drops {:>8} restarts {}",
            p.name,
            format!("{:?}", p.kind).to_lowercase(),
            p.counters["rx_pkts"],
            p.counters["tx_pkts"],
            drops_of(&p.counters),
            p.restarts
        );
        for nf in &p.nfs {
            let counters: Vec<String> = nf
                .counters
                .iter()
                .filter(|(_, v)| **v > 0)
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            let _ = writeln!(out, "    {:<14} {}", nf.kind, counters.join(", "));
        }
    }
    let _ = writeln!(out, "ports:");
    for (p, (_, report)) in snap.ports.iter().zip(ports) {
        let mut line = format!(
            "  {:<8} {:<9} in {:>12} out {:>12}",
            p.name,
            format!("{:?}", p.kind).to_lowercase(),
            p.counters["rx_pkts"],
            p.counters["tx_pkts"]
        );
        if p.kind == PortKind::Sink {
            let lat = report
                .as_ref()
                .and_then(|r| r["latency_avg_ns"].as_u64())
                .unwrap_or(0);
            let _ = write!(
                line,
                "  received {} lost {} duplicates {} reordered {} latency avg {:.1} us",
                p.counters["sink_rx"],
                p.counters["sink_lost"],
                p.counters["sink_duplicates"],
                p.counters["sink_reordered"],
                lat as f64 / 1000.0
            );
        }
        if p.kind == PortKind::Generator {
            let _ = write!(line, "  generated {}", p.counters["gen_sent"]);
        }
        // Every packet a port lost names its reason, so a sink's loss can be traced to the
        // place it happened (a generator skips a due packet when the vswitch ring is full).
        let lost_here: Vec<String> = PORT_DROP_COUNTERS
            .iter()
            .filter_map(|&(key, what)| {
                let n = p.counters.get(key).copied().unwrap_or(0);
                (n > 0).then(|| format!("{what} {n}"))
            })
            .collect();
        if !lost_here.is_empty() {
            let _ = write!(line, "  dropped: {}", lost_here.join(", "));
        }
        let _ = writeln!(out, "{line}");
    }
    let _ = writeln!(
        out,
        "pool: {} buffers, {} free, {} cached, {} in use, {} reclaimed from dead processes",
        snap.pool.total, snap.pool.free, snap.pool.cached, snap.pool.in_use, snap.pool.reclaimed
    );
    out
}

/// A port's drop counters and how the summary names them.
const PORT_DROP_COUNTERS: [(&str, &str); 7] = [
    ("rx_drop_ring_full", "vswitch ring full"),
    ("rx_drop_no_buffer", "no buffer"),
    ("rx_oversize", "oversize"),
    ("rx_unsupported", "unsupported"),
    ("rx_kernel_drops", "kernel"),
    ("tx_drop_full", "tx queue full"),
    ("tx_errors", "tx errors"),
];

#[cfg(test)]
mod tests {
    use super::*;
    use nflib::region::RegionState;
    use nflib::slot::SlotState;
    use nflib::snapshot::{PoolSnapshot, PortSnapshot, ProcessSnapshot};
    use std::collections::BTreeMap;

    fn counters(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    fn fixed() -> RegionSnapshot {
        RegionSnapshot {
            instance: "t".into(),
            state: RegionState::Ready,
            region: "/dev/shm/x".into(),
            hugetlbfs: false,
            manager_pid: 1,
            pool: PoolSnapshot {
                total: 1024,
                free: 1000,
                cached: 20,
                in_use: 4,
                reclaimed: 7,
                double_frees: 0,
            },
            processes: vec![ProcessSnapshot {
                slot: 1,
                name: "rt0".into(),
                kind: ProcessKind::Runtime,
                state: SlotState::Running,
                pid: 42,
                core: Some(1),
                generation: 3,
                restarts: 2,
                last_exit: Some(-9),
                quick_deaths: 0,
                input_drops: 0,
                nfs: Vec::new(),
                counters: counters(&[("rx_pkts", 1000), ("tx_pkts", 990), ("drop_ring_full", 10)]),
            }],
            ports: vec![
                PortSnapshot {
                    index: 0,
                    name: "sink0".into(),
                    kind: PortKind::Sink,
                    counters: counters(&[
                        ("rx_pkts", 0),
                        ("tx_pkts", 990),
                        ("sink_rx", 990),
                        ("sink_lost", 10),
                        ("sink_duplicates", 0),
                        ("sink_reordered", 1),
                    ]),
                },
                PortSnapshot {
                    index: 1,
                    name: "gen0".into(),
                    kind: PortKind::Generator,
                    counters: counters(&[
                        ("rx_pkts", 1000),
                        ("tx_pkts", 0),
                        ("gen_sent", 1000),
                        ("rx_drop_ring_full", 3),
                        ("tx_errors", 0),
                    ]),
                },
            ],
        }
    }

    #[test]
    fn summary_renders_fixed_stats() {
        let text = summary(
            &fixed(),
            &[
                (
                    "sink0".into(),
                    Some(serde_json::json!({"latency_avg_ns": 12_500})),
                ),
                ("gen0".into(), None),
            ],
        );
        let expected = "\
processes:
  rt0      runtime  rx         1000 tx          990 drops       10 restarts 2
ports:
  sink0    sink      in            0 out          990  received 990 lost 10 duplicates 0 reordered 1 latency avg 12.5 us
  gen0     generator in         1000 out            0  generated 1000  dropped: vswitch ring full 3
pool: 1024 buffers, 1000 free, 20 cached, 4 in use, 7 reclaimed from dead processes
";
        assert_eq!(text, expected);
    }

    #[test]
    fn si_prefixes() {
        assert_eq!(si(999.0), "999");
        assert_eq!(si(1_500.0), "1.5k");
        assert_eq!(si(14_330_000.0), "14.33M");
    }
}

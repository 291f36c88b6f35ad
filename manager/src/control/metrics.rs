//! Metrics in the Prometheus text format (version 0.0.4), served over HTTP on
//! `manager.metrics_listen`: per port, per process, per service chain, per network function,
//! the pool and the cluster.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};

use crate::listen::{AcceptBackoff, DeadlineReader, Limit};
use std::time::Duration;

use nflib::config::Config;
use nflib::slot::{ProcessKind, SlotState};
use nflib::snapshot::RegionSnapshot;

use super::Handle;

/// Counters that are levels, not running totals.
const GAUGES: &[&str] = &[
    "flows_active",
    "cached_bufs",
    "heartbeat_ms",
    "gen_flows",
    "gen_done",
    "sink_flows",
    "sink_latency_ns_max",
    "replay_done",
];

/// What the cluster looks like, for the metrics.
#[derive(Clone, Debug, Default)]
pub struct ClusterSummary {
    pub server: u16,
    pub view_version: u64,
    pub alive: usize,
    pub dead: usize,
}

fn metric_name(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect()
}

fn label_value(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

struct Family {
    help: String,
    gauge: bool,
    samples: Vec<(String, u64)>,
}

#[derive(Default)]
struct Out {
    families: BTreeMap<String, Family>,
}

impl Out {
    fn add(&mut self, name: &str, help: &str, gauge: bool, labels: &[(&str, &str)], v: u64) {
        let name = if gauge {
            metric_name(name)
        } else {
            format!("{}_total", metric_name(name))
        };
        let f = self.families.entry(name).or_insert_with(|| Family {
            help: help.to_string(),
            gauge,
            samples: Vec::new(),
        });
        let labels = labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", label_value(v)))
            .collect::<Vec<_>>()
            .join(",");
        f.samples.push((labels, v));
    }

    fn render(self) -> String {
        let mut s = String::new();
        for (name, f) in self.families {
            let _ = writeln!(s, "# HELP {name} {}", f.help);
            let _ = writeln!(
                s,
                "# TYPE {name} {}",
                if f.gauge { "gauge" } else { "counter" }
            );
            for (labels, v) in f.samples {
                let _ = writeln!(s, "{name}{{{labels}}} {v}");
            }
        }
        s
    }
}

/// Renders the metrics of a snapshot.
pub fn render(snap: &RegionSnapshot, cfg: &Config, cluster: &ClusterSummary) -> String {
    let mut out = Out::default();
    let server = cluster.server.to_string();
    for p in &snap.ports {
        let kind = format!("{:?}", p.kind).to_lowercase();
        for (c, v) in &p.counters {
            let gauge = GAUGES.contains(&c.as_str());
            out.add(
                &format!("nfactor_port_{c}"),
                "Port counter (see docs/CONFIG.md for each).",
                gauge,
                &[("server", &server), ("port", &p.name), ("kind", &kind)],
                *v,
            );
        }
    }
    let mut chains: BTreeMap<String, [u64; 4]> = BTreeMap::new();
    for p in &snap.processes {
        let kind = match p.kind {
            ProcessKind::Manager => "manager",
            ProcessKind::Vswitch => "vswitch",
            ProcessKind::Runtime => "runtime",
            ProcessKind::None => continue,
        };
        let labels = [
            ("server", server.as_str()),
            ("process", &p.name),
            ("kind", kind),
        ];
        out.add(
            "nfactor_process_up",
            "1 when the process is running.",
            true,
            &labels,
            (p.state == SlotState::Running) as u64,
        );
        out.add(
            "nfactor_process_restarts",
            "Times nfmgr restarted the process.",
            false,
            &labels,
            p.restarts as u64,
        );
        out.add(
            "nfactor_process_input_drops",
            "Packets producers could not queue to the process (overload).",
            false,
            &labels,
            p.input_drops,
        );
        for (c, v) in &p.counters {
            out.add(
                &format!("nfactor_process_{c}"),
                "Process counter.",
                GAUGES.contains(&c.as_str()),
                &labels,
                *v,
            );
        }
        let chain = cfg
            .runtime(&p.name)
            .and_then(|r| cfg.chain_of(r))
            .map(str::to_string);
        if let Some(chain) = &chain {
            let e = chains.entry(chain.clone()).or_default();
            let get = |k: &str| p.counters.get(k).copied().unwrap_or(0);
            e[0] += get("rx_pkts");
            e[1] += get("tx_pkts");
            e[2] += p
                .nfs
                .iter()
                .map(|n| n.counters.get("drops").copied().unwrap_or(0))
                .sum::<u64>();
            e[3] += get("flows_active");
        }
        for (i, nf) in p.nfs.iter().enumerate() {
            let pos = i.to_string();
            let chain = chain.clone().unwrap_or_default();
            let labels = [
                ("server", server.as_str()),
                ("process", p.name.as_str()),
                ("chain", chain.as_str()),
                ("nf", nf.kind.as_str()),
                ("position", pos.as_str()),
            ];
            for (c, v) in &nf.counters {
                out.add(
                    &format!("nfactor_nf_{c}"),
                    "Network function counter.",
                    false,
                    &labels,
                    *v,
                );
            }
        }
    }
    for (chain, [rx, tx, drops, flows]) in &chains {
        let labels = [("server", server.as_str()), ("chain", chain.as_str())];
        out.add(
            "nfactor_chain_rx_pkts",
            "Packets into the chain's runtimes.",
            false,
            &labels,
            *rx,
        );
        out.add(
            "nfactor_chain_tx_pkts",
            "Packets out of the chain's runtimes.",
            false,
            &labels,
            *tx,
        );
        out.add(
            "nfactor_chain_nf_drops",
            "Packets the chain's functions dropped.",
            false,
            &labels,
            *drops,
        );
        out.add(
            "nfactor_chain_flows_active",
            "Flows held by the chain's runtimes.",
            true,
            &labels,
            *flows,
        );
    }
    let s = [("server", server.as_str())];
    for (state, v) in [
        ("free", snap.pool.free),
        ("cached", snap.pool.cached),
        ("in_use", snap.pool.in_use),
    ] {
        out.add(
            "nfactor_pool_buffers",
            "Packet buffers by state.",
            true,
            &[("server", &server), ("state", state)],
            v,
        );
    }
    out.add(
        "nfactor_pool_reclaimed",
        "Buffers recovered from dead processes.",
        false,
        &s,
        snap.pool.reclaimed,
    );
    out.add(
        "nfactor_cluster_view_version",
        "Version of the cluster view this server holds.",
        true,
        &s,
        cluster.view_version,
    );
    for (state, v) in [("alive", cluster.alive), ("dead", cluster.dead)] {
        out.add(
            "nfactor_cluster_servers",
            "Servers of the cluster by state.",
            true,
            &[("server", &server), ("state", state)],
            v as u64,
        );
    }
    out.render()
}

/// Scrapers served at once (more are closed at once): one slow client cannot hold the
/// others up, nor many of them the process.
const MAX_CLIENTS: usize = 4;

/// How long a client has to send its request, and to take the answer.
const DEADLINE: Duration = Duration::from_secs(5);

/// Serves `/metrics` on `listener` (one request per connection).
pub fn serve(listener: TcpListener, handle: Handle) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            let clients = Limit::new(MAX_CLIENTS);
            let mut backoff = AcceptBackoff::default();
            loop {
                let stream = match listener.accept() {
                    Ok((s, _)) => {
                        backoff.ok();
                        s
                    }
                    Err(e) => {
                        backoff.failed("metrics port", &e);
                        continue;
                    }
                };
                let Some(place) = clients.try_take() else {
                    continue;
                };
                let h = handle.clone();
                let _ = std::thread::Builder::new()
                    .name("metrics-client".into())
                    .spawn(move || {
                        let _ = answer(stream, &h);
                        drop(place);
                    });
            }
        })?;
    Ok(())
}

fn answer(mut stream: TcpStream, handle: &Handle) -> std::io::Result<()> {
    stream.set_write_timeout(Some(DEADLINE))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    let mut request = DeadlineReader::new(&stream, DEADLINE);
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
        let n = request.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let first = String::from_utf8_lossy(&head);
    let path = first.split_whitespace().nth(1).unwrap_or("");
    let (status, body) = if first.starts_with("GET ") && (path == "/metrics" || path == "/") {
        match handle.ask(|c| {
            let v = c.view();
            let summary = ClusterSummary {
                server: c.server_id(),
                view_version: v.version,
                alive: v.servers.iter().filter(|s| s.alive).count(),
                dead: v.servers.iter().filter(|s| !s.alive).count(),
            };
            render(&RegionSnapshot::read(c.region()), c.config(), &summary)
        }) {
            Ok(text) => ("200 OK", text),
            Err(e) => ("503 Service Unavailable", format!("{e}\n")),
        }
    } else {
        ("404 Not Found", "try /metrics\n".to_string())
    };
    write!(
        stream,
        "HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

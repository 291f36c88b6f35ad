//! The CLI subcommands that talk to a running nfmgr through its control socket: `status`,
//! `runtimes`, `flows`, `stop`, `msgtest`. Each prints a table for people, or the JSON
//! answer with `--json` for scripts. A stopped or missing nfmgr is a one-line error and a
//! non-zero exit (from `main`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Result};
use nflib::config::Config;
use serde_json::{json, Value};

use crate::control::socket;

/// How to find the nfmgr instance to talk to.
#[derive(Clone, Debug, clap::Args)]
pub struct Target {
    /// The instance's configuration file (its control socket is found from it).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// The instance name, when no config is given.
    #[arg(long, default_value = "default")]
    pub instance: String,
    /// The instance's manager.run_dir, when no config is given (default: /run/nfactor for
    /// root, $XDG_RUNTIME_DIR/nfactor or /tmp/nfactor-UID for others).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// The control socket itself.
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Print the JSON answer instead of a table.
    #[arg(long)]
    pub json: bool,
}

impl Target {
    pub fn socket_path(&self) -> Result<PathBuf> {
        if let Some(s) = &self.socket {
            return Ok(s.clone());
        }
        if let Some(c) = &self.config {
            return Ok(Config::load(c)?.control_socket_path());
        }
        let dir = self
            .dir
            .clone()
            .unwrap_or_else(nflib::config::default_run_dir);
        let named = dir.join(format!("nfmgr-{}.sock", self.instance));
        if self.instance == "default" && !named.exists() {
            // Nothing named: the one instance running here, if there is exactly one.
            let found: Vec<PathBuf> = std::fs::read_dir(&dir)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                        n.starts_with("nfmgr-")
                            && n.ends_with(".sock")
                            && !n.ends_with(".monitor.sock")
                    })
                })
                .collect();
            if let [one] = found.as_slice() {
                return Ok(one.clone());
            }
        }
        Ok(named)
    }

    fn call(&self, request: Value, timeout: Duration) -> Result<Value> {
        let mut path = self.socket_path()?;
        // A user who may not use the control socket (it is nfmgr's user's) but may use the
        // monitoring socket beside it (`manager.monitor_group`) reads through that one;
        // what needs the control socket is refused there, with the reason.
        let monitor = nflib::config::monitor_socket_of(&path);
        let denied = |p: &Path| {
            nix::unistd::access(p, nix::unistd::AccessFlags::W_OK) == Err(nix::errno::Errno::EACCES)
        };
        if self.socket.is_none() && denied(&path) && monitor.exists() && !denied(&monitor) {
            path = monitor;
        }
        socket::call(&path, &request, timeout).map_err(anyhow::Error::msg)
    }

    fn print(&self, v: &Value, human: impl FnOnce(&Value) -> String) {
        use std::io::Write;
        let text = if self.json {
            serde_json::to_string_pretty(v).unwrap_or_default() + "\n"
        } else {
            human(v)
        };
        // A reader that went away (`| head`) is not an error worth a panic.
        let _ = std::io::stdout().lock().write_all(text.as_bytes());
    }
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<String>| -> String {
        let mut l = String::from("  ");
        for (i, c) in cells.iter().enumerate() {
            let w = widths.get(i).copied().unwrap_or(0);
            l.push_str(&format!("{c:<w$}  "));
        }
        l.trim_end().to_string() + "\n"
    };
    out.push_str(&line(header.iter().map(|h| h.to_string()).collect()));
    for r in rows {
        out.push_str(&line(r.clone()));
    }
    out
}

fn ms(v: &Value) -> String {
    v.as_f64()
        .map(|m| {
            if m >= 1000.0 {
                format!("{:.1} s", m / 1000.0)
            } else {
                format!("{m:.1} ms")
            }
        })
        .unwrap_or_else(|| "-".into())
}

pub fn status(t: &Target) -> Result<()> {
    let v = t.call(json!({ "cmd": "status" }), Duration::from_secs(10))?;
    t.print(&v, |v| {
        let role = &v["cluster"];
        let mut out = format!(
            "instance {}  server {} ({})  {}  up {:.1} s  view v{} epoch {}\n",
            s(&v["instance"]),
            v["server"],
            s(&v["name"]),
            s(&role["role"]),
            v["uptime_s"].as_f64().unwrap_or(0.0),
            v["view_version"],
            v["view_epoch"],
        );
        if let Some(j) = role["journal"].as_str() {
            out += &format!("journal {j}\n");
        }
        if role["paused"] == true {
            out += "coordination PAUSED: the etcd lease lapsed; no view changes until etcd elects a coordinator\n";
        }
        let store = &v["store"];
        if store.is_object() {
            let leader = store["leader"]
                .as_array()
                .map(|l| format!("server {} at {}", l[0], s(&l[1])))
                .unwrap_or_else(|| "none known".into());
            out += &format!(
                "store etcd {} ({})  coordinator elected: {leader}{}{}\n",
                s(&store["prefix"]),
                store["endpoints"]
                    .as_array()
                    .map(|e| e.iter().map(s).collect::<Vec<_>>().join(", "))
                    .unwrap_or_default(),
                if store["connected"] == true {
                    ""
                } else {
                    "  NOT CONNECTED"
                },
                store["last_error"]
                    .as_str()
                    .map(|e| format!(" (last error: {e})"))
                    .unwrap_or_default()
            );
        }
        if role["role"] == "member" {
            out += &format!(
                "coordinator {}  {}{}\n",
                s(&role["coordinator"]),
                if role["connected"] == true {
                    format!("connected, heard {} ago", ms(&role["last_heard_ms"]))
                } else {
                    "not connected".into()
                },
                role["last_error"]
                    .as_str()
                    .map(|e| format!(" (last error: {e})"))
                    .unwrap_or_default()
            );
        }
        out += "servers:\n";
        let rows: Vec<Vec<String>> = v["servers"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|sv| {
                let note = if sv["this"] == true {
                    "this server".to_string()
                } else if let Some(d) = sv["down"].as_object() {
                    format!(
                        "down at +{:.3} s: {} (silent {} before)",
                        d["at_s"].as_f64().unwrap_or(0.0),
                        s(&d["why"]),
                        ms(&d["silent_ms"])
                    )
                } else {
                    format!("heard {} ago", ms(&sv["last_heard_ms"]))
                };
                vec![
                    s(&sv["server"]),
                    s(&sv["name"]),
                    if sv["alive"] == true { "alive" } else { "DEAD" }.into(),
                    if sv["coordinator"] == true {
                        "coordinator"
                    } else {
                        "member"
                    }
                    .into(),
                    s(&sv["endpoints"]),
                    s(&sv["addr"]),
                    note,
                ]
            })
            .collect();
        out += &table(
            &[
                "SERVER",
                "NAME",
                "STATE",
                "ROLE",
                "ENDPOINTS",
                "ADDRESS",
                "NOTE",
            ],
            &rows,
        );
        out += "processes:\n";
        let rows: Vec<Vec<String>> = v["processes"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                let replicas = p["replicas"]
                    .as_array()
                    .map(|l| {
                        l.iter()
                            .filter_map(|a| a.as_str())
                            .collect::<Vec<_>>()
                            .join(",")
                    })
                    .filter(|l| !l.is_empty())
                    .unwrap_or_else(|| "-".into());
                // A crash loop says so where the operator looks first.
                let state = match p["quick_deaths"].as_u64() {
                    Some(n) if n > 0 => format!("{} (crash loop: {n})", s(&p["state"])),
                    _ => s(&p["state"]),
                };
                vec![
                    s(&p["slot"]),
                    s(&p["name"]),
                    s(&p["kind"]),
                    state,
                    s(&p["pid"]),
                    s(&p["restarts"]),
                    replicas,
                ]
            })
            .collect();
        out += &table(
            &[
                "SLOT", "NAME", "KIND", "STATE", "PID", "RESTARTS", "REPLICAS",
            ],
            &rows,
        );
        let pool = &v["pool"];
        out += &format!(
            "pool: {} buffers, {} free, {} cached, {} in use\n",
            pool["total"], pool["free"], pool["cached"], pool["in_use"]
        );
        out
    });
    Ok(())
}

pub fn runtimes(t: &Target) -> Result<()> {
    let v = t.call(json!({ "cmd": "runtimes" }), Duration::from_secs(15))?;
    t.print(&v, |v| {
        let rows: Vec<Vec<String>> = v
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| {
                let w = &e["workload"];
                let state = if e["alive"] != true {
                    "down".to_string()
                } else if let Some(err) = e["error"].as_str() {
                    format!("error: {err}")
                } else {
                    "running".into()
                };
                vec![
                    s(&e["addr"]),
                    s(&e["name"]),
                    s(&e["kind"]),
                    s(&e["chain"]),
                    state,
                    s(&w["flows_active"]),
                    s(&w["rx_pkts"]),
                    s(&w["tx_pkts"]),
                    s(&w["input_drops"]),
                    s(&w["transport"]["retransmits"]),
                    replicas(&w["replicas"]),
                    s(&w["replica_flows"]),
                    lag(&w["repl_lag_us"]),
                ]
            })
            .collect();
        table(
            &[
                "ADDR", "NAME", "KIND", "CHAIN", "STATE", "FLOWS", "RX", "TX", "IN-DROPS", "RETX",
                "REPLICAS", "REPL", "LAG",
            ],
            &rows,
        )
    });
    Ok(())
}

/// A runtime's replicas (`SetReplica`), as `S/SLOT` addresses.
fn replicas(v: &Value) -> String {
    let list: Vec<String> = v
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| format!("{}/{}", a["server"], a["slot"]))
        .collect();
    if list.is_empty() {
        "-".into()
    } else {
        list.join(",")
    }
}

/// The last replication acknowledgement's delay.
fn lag(v: &Value) -> String {
    match v.as_u64() {
        Some(0) | None => "-".into(),
        Some(us) => format!("{us} us"),
    }
}

pub fn flows(t: &Target, runtime: Option<String>, limit: u32) -> Result<()> {
    let v = t.call(
        json!({ "cmd": "flows", "runtime": runtime, "limit": limit }),
        Duration::from_secs(15),
    )?;
    t.print(&v, |v| {
        let mut out = String::new();
        for r in v.as_array().into_iter().flatten() {
            out += &format!(
                "{} {} ({} flows){}\n",
                s(&r["name"]),
                s(&r["addr"]),
                s(&r["total"]),
                r["error"]
                    .as_str()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            );
            let rows: Vec<Vec<String>> = r["flows"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|f| {
                    vec![
                        s(&f["actor"]),
                        s(&f["key"]),
                        s(&f["state"]),
                        ms(&f["age_ms"]),
                        ms(&f["idle_ms"]),
                        s(&f["aliases"]),
                        format!("{}/{}", f["vswitch"]["server"], f["vswitch"]["slot"]),
                    ]
                })
                .collect();
            if !rows.is_empty() {
                out += &table(
                    &[
                        "ACTOR", "FLOW", "STATE", "AGE", "IDLE", "ALIASES", "VSWITCH",
                    ],
                    &rows,
                );
            }
        }
        out
    });
    Ok(())
}

pub fn stop(t: &Target) -> Result<()> {
    t.call(json!({ "cmd": "stop" }), Duration::from_secs(5))?;
    if !t.json {
        println!("nfmgr is stopping");
    }
    Ok(())
}

pub fn top(t: &Target, interval_s: f64) -> Result<()> {
    if !(0.1..=60.0).contains(&interval_s) {
        bail!("--interval-s must be between 0.1 and 60");
    }
    if t.json {
        // One answer, for scripts: what the dashboard would show, as raw counters.
        let v = t.call(json!({ "cmd": "top" }), Duration::from_secs(10))?;
        t.print(&v, |_| String::new());
        return Ok(());
    }
    nf_tui::top::run(nf_tui::top::Options {
        socket: t.socket_path()?,
        interval: Duration::from_secs_f64(interval_s),
    })
    .map_err(anyhow::Error::msg)
}

pub fn kill(t: &Target, process: &str) -> Result<()> {
    let v = t.call(
        json!({ "cmd": "kill", "process": process }),
        Duration::from_secs(10),
    )?;
    t.print(&v, |v| format!("{} killed with SIGKILL\n", s(&v["killed"])));
    Ok(())
}

pub fn rekey(t: &Target) -> Result<()> {
    let v = t.call(json!({ "cmd": "rekey" }), Duration::from_secs(10))?;
    t.print(&v, |v| {
        format!(
            "cluster keys read again: signing with key {}, accepting {} more\n",
            s(&v["signing"]),
            v["accepting_more"]
        )
    });
    Ok(())
}

pub fn msgtest(
    t: &Target,
    from: &str,
    to: &str,
    count: u64,
    size: u32,
    depth: u32,
    timeout_s: f64,
) -> Result<()> {
    let v = t.call(
        json!({ "cmd": "msgtest", "from": from, "to": to, "count": count, "size": size,
                "depth": depth, "timeout_s": timeout_s }),
        Duration::from_secs_f64(timeout_s + 15.0),
    )?;
    t.print(&v, |v| {
        format!(
            "{} -> {}: {} of {} messages of {} bytes arrived ({} duplicates, {} out of order{}), {} retransmissions\n\
             {:.3} s, {:.0} messages/s, {:.3} Gbit/s, one-way latency min {:.1} / avg {:.1} / max {:.1} us\n",
            s(&v["from"]),
            s(&v["to"]),
            v["received"],
            v["count"],
            v["size"],
            v["duplicates"],
            v["out_of_order"],
            if v["exactly_once_in_order"] == true { ": exactly once, in order" } else { ": NOT exact" },
            v["retransmits"],
            v["seconds"].as_f64().unwrap_or(0.0),
            v["msgs_per_s"].as_f64().unwrap_or(0.0),
            v["gbit_per_s"].as_f64().unwrap_or(0.0),
            v["latency_min_us"].as_f64().unwrap_or(0.0),
            v["latency_avg_us"].as_f64().unwrap_or(0.0),
            v["latency_max_us"].as_f64().unwrap_or(0.0),
        )
    });
    if v["exactly_once_in_order"] != true {
        let given_up = v["given_up"].as_u64().unwrap_or(0);
        if given_up > 0 {
            bail!(
                "messages were lost: the sender's transport gave up on {given_up} after the \
                 receiver did not answer for cluster.peer_dead_after_ms"
            );
        }
        bail!("messages were lost, repeated or reordered");
    }
    Ok(())
}

pub fn migrate(t: &Target, from: &str, to: &str, flows: Option<u32>, timeout_s: f64) -> Result<()> {
    let mut req = json!({ "cmd": "migrate", "from": from, "to": to, "timeout_s": timeout_s });
    if let Some(n) = flows {
        req["flows"] = json!(n);
    }
    let v = t.call(req, Duration::from_secs_f64(timeout_s + 15.0))?;
    t.print(&v, |v| {
        let mut out = format!(
            "{} -> {}: {} flows moved in {:.3} ms ({} failed, {} groups, {} rolled back)\n\
             packets buffered at the target {}, lost {}, reordered {}\n\
             target prepared in {:.3} ms before the source started\n",
            s(&v["from"]),
            s(&v["to"]),
            v["moved"],
            v["ms"].as_f64().unwrap_or(0.0),
            v["failed"],
            v["groups"],
            v["groups_rolled_back"],
            v["buffered"],
            v["lost"],
            v["reordered"],
            v["prepare_ms"].as_f64().unwrap_or(0.0),
        );
        if let Some(e) = v["error"].as_str() {
            out += &format!("error: {e}\n");
        }
        out
    });
    if let Some(e) = v["error"].as_str() {
        bail!("{e}");
    }
    Ok(())
}

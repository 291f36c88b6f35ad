//! The control socket: a Unix socket (mode 0600) per nfmgr instance, one JSON request per
//! line and one JSON answer per line; and beside it the monitoring socket (mode 0660, group
//! `manager.monitor_group`), which answers only the requests that read (`Access`). The CLI subcommands (`nfmgr status`, `runtimes`,
//! `flows`, `stop`, `msgtest`) are its clients; scripts may talk to it directly.
//!
//! ```text
//! {"cmd":"status"}
//! {"cmd":"runtimes"}
//! {"cmd":"flows","runtime":"rt0@2","limit":100}
//! {"cmd":"stop"}
//! {"cmd":"msgtest","from":"rt0@1","to":"rt0@2","count":100000,"size":64}
//! {"cmd":"migrate","from":"rt0@1","to":"rt0@2","flows":1000}
//! {"cmd":"top"}                                 (what `nfmgr top` shows: nflib::top)
//! {"cmd":"kill","process":"rt1@2"}              (failover drill: SIGKILL, then restart)
//! -> {"ok":true,"data":...} or {"ok":false,"error":"..."}
//! ```
//!
//! Each connection is served by its own thread, which asks the control thread for state and
//! makes control calls through it; a slow call never holds up the cluster's heartbeats.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};

use crate::listen::{AcceptBackoff, DeadlineReader, Limit};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nflib::cluster::{EndpointInfo, ProbeReport};
use nflib::frame::EndpointAddr;
use nflib::msg::{Call, Reply};
use nflib::slot::ProcessKind;
use serde_json::{json, Value};

use nflib::control_client::Request;

use super::{CallError, ControlError, Handle, NoClusterKey};

/// Why a request failed: the `error` of its answer.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error(transparent)]
    Call(#[from] CallError),
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    /// `rekey`: nothing to read the keys from.
    #[error("this nfmgr was not started from a configuration file")]
    NoConfigFile,
    /// `rekey`: the configuration file, read again.
    #[error(transparent)]
    Config(#[from] nflib::config::ConfigError),
    /// `rekey`: the key files (nfmgr's own error chain, as one text).
    #[error("{0:#}")]
    Keys(anyhow::Error),
    #[error("the configuration has no cluster.key_file")]
    NoKeyFile,
    #[error(transparent)]
    NoClusterKey(#[from] NoClusterKey),
    /// `top`: the report does not encode.
    #[error(transparent)]
    Encode(#[from] serde_json::Error),
    /// A process refused a call.
    #[error("{at}: {reason}")]
    Refused { at: EndpointAddr, reason: String },
    /// A process answered a call with something else than the call's answer.
    #[error("{at}: unexpected answer {answer:?}")]
    Unexpected {
        at: EndpointAddr,
        answer: Box<Reply>,
    },
    /// `kill`: the process's nfmgr refused (its reason names the process).
    #[error("{0}")]
    KillRefused(String),
    #[error("--flows must be above 0")]
    NoFlows,
    #[error("count must be above 0")]
    NoMessages,
    #[error("`{spec}` ({addr}) is not running")]
    NotRunning { spec: String, addr: EndpointAddr },
    #[error("`{spec}` ({addr}) is not a runtime")]
    NotRuntime { spec: String, addr: EndpointAddr },
    #[error("--from and --to name the same runtime")]
    SameRuntime,
    #[error(
        "`{from}` runs chain {from_chain:?} and `{to}` runs {to_chain:?}: flows can only move \
         between runtimes of the same chain"
    )]
    OtherChains {
        from: String,
        from_chain: Option<String>,
        to: String,
        to_chain: Option<String>,
    },
    #[error("the source did not answer: {0}")]
    SourceSilent(#[source] CallError),
    #[error("the target did not answer: {0}")]
    TargetSilent(#[source] CallError),
    /// A migration's source restarted during it (its new process knows no job).
    #[error(
        "the source {at} died during the migration (its new process answers: {reason}); flows \
         it had handed over stay with the target, the others with their replicas when the \
         chain is replicated"
    )]
    SourceDied { at: EndpointAddr, reason: String },
    /// A migration not done by the request's timeout; `last` is the last failed status call.
    #[error(
        "the migration did not finish within {:.1} s{}",
        .timeout.as_secs_f64(),
        last_status_error(.last)
    )]
    MigrationTimeout {
        timeout: Duration,
        last: Option<CallError>,
    },
    /// `msgtest`: the probe not done by the request's timeout.
    #[error(
        "timed out after {:.1} s with {sent} of {count} messages sent and not all \
         acknowledged{}",
        .timeout.as_secs_f64(),
        last_status_error(.last)
    )]
    ProbeTimeout {
        timeout: Duration,
        sent: u64,
        count: u64,
        last: Option<Box<RequestError>>,
    },
}

/// ` (last status error: ...)`, or nothing.
fn last_status_error(last: &Option<impl std::fmt::Display>) -> String {
    match last {
        Some(e) => format!(" (last status error: {e})"),
        None => String::new(),
    }
}

/// An endpoint spec (`SERVER/SLOT`, `NAME@SERVER`, `NAME`) that names no endpoint, or
/// several.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    #[error("`{0}` is not SERVER/SLOT")]
    NotServerSlot(String),
    #[error("`{spec}`: `{server}` is not a server number")]
    NotServer { spec: String, server: String },
    #[error("no vswitch or runtime `{0}` in the cluster")]
    Unknown(String),
    /// The endpoints of that name, by server.
    #[error(
        "`{spec}` names several endpoints; say which server: {}",
        .matches
            .iter()
            .map(|(name, server)| format!("{name}@{server}"))
            .collect::<Vec<_>>()
            .join(", ")
    )]
    Ambiguous {
        spec: String,
        matches: Vec<(String, u16)>,
    },
}

/// What a socket's clients may ask.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Everything: the control socket (mode 0600, nfmgr's user).
    Admin,
    /// What reads state and changes nothing: status, runtimes, flows, top. The monitoring
    /// socket (mode 0660, `manager.monitor_group`).
    Monitor,
}

/// Creates the socket (replacing a stale one: the instance lock says no other nfmgr of this
/// instance runs) with its mode (0600 for `Admin`, 0660 and `group` for `Monitor`) before
/// anyone can connect, and serves it on a thread.
pub fn serve(
    path: &Path,
    handle: Handle,
    access: Access,
    group: Option<nix::unistd::Gid>,
) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("sock.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp)?;
    // The bound socket is made private first, then opened to the group it is meant for.
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    if access == Access::Monitor {
        if let Some(g) = group {
            nix::unistd::chown(&tmp, None, Some(g)).map_err(std::io::Error::from)?;
        }
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o660))?;
    }
    std::fs::rename(&tmp, path)?;
    let path = path.to_path_buf();
    std::thread::Builder::new()
        .name(match access {
            Access::Admin => "control-socket".into(),
            Access::Monitor => "monitor-socket".into(),
        })
        .spawn(move || accept_loop(listener, handle, path, access))?;
    Ok(())
}

/// Clients served at once (the dashboard, scripts, drills): more are closed at once.
const MAX_CLIENTS: usize = 32;

/// How long a client has to send each request, all of it.
const REQUEST_DEADLINE: Duration = Duration::from_secs(10);

fn accept_loop(listener: UnixListener, handle: Handle, path: PathBuf, access: Access) {
    let clients = Limit::new(MAX_CLIENTS);
    let mut backoff = AcceptBackoff::default();
    let mut refused = 0u64;
    loop {
        let stream = match listener.accept() {
            Ok((s, _)) => {
                backoff.ok();
                s
            }
            Err(e) => {
                backoff.failed(
                    match access {
                        Access::Admin => "control socket",
                        Access::Monitor => "monitoring socket",
                    },
                    &e,
                );
                continue;
            }
        };
        let Some(place) = clients.try_take() else {
            refused += 1;
            if refused.is_power_of_two() {
                tracing::warn!(
                    refused,
                    "{}: {MAX_CLIENTS} clients connected; closing new connections",
                    path.display()
                );
            }
            continue;
        };
        let h = handle.clone();
        let path = path.clone();
        let _ = std::thread::Builder::new()
            .name("control-client".into())
            .spawn(move || {
                serve_client(stream, h, access, &path);
                drop(place);
            });
    }
}

fn serve_client(stream: UnixStream, handle: Handle, access: Access, path: &Path) {
    let _ = stream.set_write_timeout(Some(REQUEST_DEADLINE));
    let mut reader = BufReader::new(match stream.try_clone() {
        Ok(s) => DeadlineReader::new(s, REQUEST_DEADLINE),
        Err(_) => return,
    });
    let mut line = String::new();
    let mut out = stream;
    loop {
        line.clear();
        reader.get_mut().renew(REQUEST_DEADLINE);
        match (&mut reader).take(1 << 16).read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let answer = match serde_json::from_str::<Request>(line.trim()) {
            Ok(req) if access == Access::Monitor && !req.read_only() => json!({
                "ok": false,
                "error": format!(
                    "`{}` changes the instance: {} is the read-only monitoring socket; use the control socket (as nfmgr's user)",
                    req.name(),
                    path.display()
                ),
            }),
            Ok(req) => match handle_request(&handle, req) {
                Ok(data) => json!({ "ok": true, "data": data }),
                Err(e) => json!({ "ok": false, "error": e.to_string() }),
            },
            Err(e) => json!({ "ok": false, "error": format!("bad request: {e}") }),
        };
        let mut text = answer.to_string();
        text.push('\n');
        if out.write_all(text.as_bytes()).is_err() {
            return;
        }
    }
}

use std::io::Read;

/// Reads the keys from the configuration file this nfmgr was started with and hands them
/// to the control and data-plane threads.
fn rekey(handle: &Handle) -> Result<Value, RequestError> {
    let path = handle
        .ask(|c| c.config_path())?
        .ok_or(RequestError::NoConfigFile)?;
    let cfg = nflib::config::Config::load(&path)?;
    let keys = crate::load_cluster_keys(&cfg)
        .map_err(RequestError::Keys)?
        .ok_or(RequestError::NoKeyFile)?;
    let (id, accepted) = (keys.sign_id(), keys.accept.len());
    handle.ask(move |c| c.set_keys(&keys))??;
    Ok(json!({ "signing": id, "accepting_more": accepted }))
}

pub fn handle_request(handle: &Handle, req: Request) -> Result<Value, RequestError> {
    match req {
        Request::Status => Ok(handle.ask(|c| c.status())?),
        Request::Runtimes => runtimes(handle),
        Request::Flows { runtime, limit } => flows(handle, runtime, limit.unwrap_or(100)),
        Request::Stop => {
            handle.ask(|c| c.stop_requested = true)?;
            // The supervisor shuts everything down on SIGTERM, as for an operator's kill.
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::Signal::SIGTERM);
            Ok(json!("stopping"))
        }
        Request::Msgtest {
            from,
            to,
            count,
            size,
            depth,
            timeout_s,
        } => msgtest(
            handle,
            &from,
            &to,
            count,
            size,
            depth.unwrap_or(0),
            Duration::from_secs_f64(timeout_s.unwrap_or(300.0).clamp(0.1, 3600.0)),
        ),
        Request::Top => Ok(serde_json::to_value(handle.ask(|c| c.top())?)?),
        Request::Kill { process } => kill(handle, &process),
        Request::Rekey => rekey(handle),
        Request::Migrate {
            from,
            to,
            flows,
            timeout_s,
        } => migrate(
            handle,
            &from,
            &to,
            flows.unwrap_or(u32::MAX),
            Duration::from_secs_f64(timeout_s.unwrap_or(120.0).clamp(0.1, 3600.0)),
        ),
    }
}

/// How long a migration's target polls, once prepared, for the source's first step: the
/// source is told to start right after, so a few milliseconds are plenty; the migration's
/// own messages keep it awake from then on.
const PREPARE_AWAKE_MS: u32 = 50;

/// Prepares runtime `to` (`PrepareMigration`), then asks runtime `from` to move `flows` of
/// its flows to it (`SetMigrationTarget`) and follows the job until it is done.
fn migrate(
    handle: &Handle,
    from: &str,
    to: &str,
    flows: u32,
    timeout: Duration,
) -> Result<Value, RequestError> {
    if flows == 0 {
        return Err(RequestError::NoFlows);
    }
    let (eps, me) = handle.ask(|c| (c.endpoints(), c.server_id()))?;
    let a = resolve(from, &eps, me)?;
    let b = resolve(to, &eps, me)?;
    let mut chains = Vec::new();
    for (spec, addr) in [(from, a), (to, b)] {
        match eps.iter().find(|e| e.addr == addr) {
            Some(e) if e.kind == ProcessKind::Runtime && e.alive => chains.push(e.chain.clone()),
            Some(e) if e.kind == ProcessKind::Runtime => {
                let spec = spec.to_string();
                return Err(RequestError::NotRunning { spec, addr });
            }
            _ => {
                let spec = spec.to_string();
                return Err(RequestError::NotRuntime { spec, addr });
            }
        }
    }
    if a == b {
        return Err(RequestError::SameRuntime);
    }
    if chains[0] != chains[1] {
        return Err(RequestError::OtherChains {
            from: from.to_string(),
            from_chain: chains[0].clone(),
            to: to.to_string(),
            to_chain: chains[1].clone(),
        });
    }
    // The target first: it must answer before the source moves anything (a dead or
    // unreachable target would otherwise cost a job of step-1 timeouts), it polls rather
    // than sleeps until the first step arrives, and it makes room for the flows. How many
    // `--all` is comes from the source.
    let preparing = Instant::now();
    let expected = if flows == u32::MAX {
        match handle.rpc(a, Call::PollWorkload) {
            Ok(Reply::Workload(w)) => u32::try_from(w.flows_active).unwrap_or(u32::MAX),
            Ok(other) => return Err(unexpected(a, other)),
            Err(e) => return Err(RequestError::SourceSilent(e)),
        }
    } else {
        flows
    };
    match handle.rpc(
        b,
        Call::PrepareMigration {
            source: a,
            awake_ms: PREPARE_AWAKE_MS,
            flows: expected,
        },
    ) {
        Ok(Reply::Accepted) => {}
        Ok(Reply::Refused { reason }) => return Err(RequestError::Refused { at: b, reason }),
        Ok(other) => return Err(unexpected(b, other)),
        Err(e) => return Err(RequestError::TargetSilent(e)),
    }
    let prepare_ms = preparing.elapsed().as_secs_f64() * 1000.0;
    match handle.rpc(
        a,
        Call::SetMigrationTarget {
            target: b,
            count: flows,
        },
    )? {
        Reply::Accepted => {}
        Reply::Refused { reason } => return Err(RequestError::Refused { at: a, reason }),
        other => return Err(unexpected(a, other)),
    }
    let label = |addr: EndpointAddr| match eps.iter().find(|e| e.addr == addr) {
        Some(e) => format!("{}@{}", e.name, addr.server),
        None => addr.to_string(),
    };
    let (la, lb) = (label(a), label(b));
    let requested = (flows != u32::MAX).then_some(flows);
    let id = handle.ask(move |c| c.migration_started(la, lb, requested))?;
    let started = Instant::now();
    let mut last = None;
    let report = loop {
        match handle.rpc(a, Call::MigrationStatus) {
            Ok(Reply::Migration(r)) if r.done => break r,
            // Only a process that never ran a job says so: the source died and restarted.
            Ok(Reply::Refused { reason }) => {
                let why = RequestError::SourceDied { at: a, reason };
                let e = why.to_string();
                let _ = handle.ask(move |c| c.migration_finished(id, |r| r.error = Some(e)));
                return Err(why);
            }
            Err(e) => last = Some(e),
            Ok(_) => {}
        }
        if started.elapsed() > timeout {
            let why = RequestError::MigrationTimeout { timeout, last };
            let e = why.to_string();
            let _ = handle.ask(move |c| c.migration_finished(id, |r| r.error = Some(e)));
            return Err(why);
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let r2 = report.clone();
    let _ = handle.ask(move |c| {
        c.migration_finished(id, |r| {
            r.moved = r2.moved;
            r.rolled_back = r2.groups_rolled_back;
            r.lost = r2.buffer_drops;
            r.ms = Some(r2.elapsed_us as f64 / 1000.0);
            r.error = r2.error;
        })
    });
    Ok(json!({
        "from": a.to_string(),
        "to": b.to_string(),
        "requested": if flows == u32::MAX { json!("all") } else { json!(flows) },
        "moved": report.moved,
        "failed": report.failed,
        "groups": report.groups,
        "groups_rolled_back": report.groups_rolled_back,
        "ms": report.elapsed_us as f64 / 1000.0,
        "prepare_ms": (prepare_ms * 1000.0).round() / 1000.0,
        "buffered": report.buffered,
        "lost": report.buffer_drops,
        "reordered": report.late_stragglers,
        "stragglers_waited": report.stragglers_waited,
        "error": report.error,
    }))
}

/// Kills a vswitch or runtime anywhere in the cluster for a failover drill (its nfmgr sends
/// SIGKILL and restarts it as after any crash).
fn kill(handle: &Handle, spec: &str) -> Result<Value, RequestError> {
    let (eps, me) = handle.ask(|c| (c.endpoints(), c.server_id()))?;
    let addr = resolve(spec, &eps, me)?;
    let by = format!("operator on server {me}");
    match handle.rpc(addr, Call::Kill { by })? {
        Reply::Accepted => Ok(json!({ "killed": addr.to_string() })),
        Reply::Refused { reason } => Err(RequestError::KillRefused(reason)),
        other => Err(unexpected(addr, other)),
    }
}

fn unexpected(at: EndpointAddr, answer: Reply) -> RequestError {
    let answer = Box::new(answer);
    RequestError::Unexpected { at, answer }
}

/// Finds an endpoint: `SERVER/SLOT`, `NAME@SERVER`, or `NAME` (this server first, else the
/// one endpoint of that name in the cluster).
pub fn resolve(spec: &str, eps: &[EndpointInfo], me: u16) -> Result<EndpointAddr, ResolveError> {
    if let Some((s, n)) = spec.split_once('/') {
        let (Ok(server), Ok(slot)) = (s.parse::<u16>(), n.parse::<u16>()) else {
            return Err(ResolveError::NotServerSlot(spec.to_string()));
        };
        return Ok(EndpointAddr::new(server, slot));
    }
    let (name, server) = match spec.split_once('@') {
        Some((n, s)) => (
            n,
            Some(s.parse::<u16>().map_err(|_| ResolveError::NotServer {
                spec: spec.to_string(),
                server: s.to_string(),
            })?),
        ),
        None => (spec, None),
    };
    let matching: Vec<&EndpointInfo> = eps
        .iter()
        .filter(|e| e.name == name && server.is_none_or(|s| e.addr.server == s))
        .collect();
    if let Some(e) = matching.iter().find(|e| e.addr.server == me) {
        return Ok(e.addr);
    }
    match matching.as_slice() {
        [one] => Ok(one.addr),
        [] => Err(ResolveError::Unknown(spec.to_string())),
        _ => Err(ResolveError::Ambiguous {
            spec: spec.to_string(),
            matches: matching
                .iter()
                .map(|e| (e.name.clone(), e.addr.server))
                .collect(),
        }),
    }
}

fn endpoint_json(e: &EndpointInfo) -> Value {
    json!({
        "addr": e.addr.to_string(),
        "server": e.addr.server,
        "slot": e.addr.slot,
        "name": e.name,
        "kind": e.kind,
        "chain": e.chain,
        "alive": e.alive,
    })
}

fn runtimes(handle: &Handle) -> Result<Value, RequestError> {
    let eps = handle.ask(|c| c.endpoints())?;
    // Ask every live endpoint at once, then collect.
    let mut waiting = Vec::new();
    for e in &eps {
        let rx = e
            .alive
            .then(|| handle.rpc_start(e.addr, Call::PollWorkload).ok())
            .flatten();
        waiting.push(rx);
    }
    let deadline = Instant::now() + super::RPC_TIMEOUT + Duration::from_millis(500);
    let mut out = Vec::new();
    for (e, rx) in eps.iter().zip(waiting) {
        let mut v = endpoint_json(e);
        let result =
            rx.map(|rx| rx.recv_timeout(deadline.saturating_duration_since(Instant::now())));
        match result {
            Some(Ok(Ok(Reply::Workload(w)))) => v["workload"] = json!(w),
            Some(Ok(Ok(other))) => v["error"] = json!(format!("unexpected answer {other:?}")),
            Some(Ok(Err(err))) => v["error"] = json!(err.to_string()),
            Some(Err(_)) => v["error"] = json!("no answer"),
            None => v["error"] = json!("not running"),
        }
        out.push(v);
    }
    Ok(Value::Array(out))
}

fn flows(handle: &Handle, runtime: Option<String>, limit: u32) -> Result<Value, RequestError> {
    let (eps, me) = handle.ask(|c| (c.endpoints(), c.server_id()))?;
    let targets: Vec<EndpointInfo> = match &runtime {
        Some(spec) => {
            let a = resolve(spec, &eps, me)?;
            eps.into_iter().filter(|e| e.addr == a).collect()
        }
        None => eps
            .into_iter()
            .filter(|e| e.kind == ProcessKind::Runtime && e.alive)
            .collect(),
    };
    let mut out = Vec::new();
    for e in &targets {
        let mut v = endpoint_json(e);
        match handle.rpc(e.addr, Call::ListFlows { limit }) {
            Ok(Reply::Flows { total, flows }) => {
                v["total"] = json!(total);
                v["flows"] = json!(flows);
            }
            Ok(Reply::Refused { reason }) => v["error"] = json!(reason),
            Ok(other) => v["error"] = json!(format!("unexpected answer {other:?}")),
            Err(err) => v["error"] = json!(err.to_string()),
        }
        out.push(v);
    }
    Ok(Value::Array(out))
}

fn probe_status(handle: &Handle, at: EndpointAddr, run: u64) -> Result<ProbeReport, RequestError> {
    match handle.rpc(at, Call::ProbeStatus { run })? {
        Reply::Probe(r) => Ok(r),
        Reply::Refused { reason } => Err(RequestError::Refused { at, reason }),
        other => Err(unexpected(at, other)),
    }
}

/// Sends `count` probe messages from the liaison of `from` to that of `to` and reports what
/// arrived, how fast, with what latency, and the retransmissions it took.
fn msgtest(
    handle: &Handle,
    from: &str,
    to: &str,
    count: u64,
    size: u32,
    depth: u32,
    timeout: Duration,
) -> Result<Value, RequestError> {
    if count == 0 {
        return Err(RequestError::NoMessages);
    }
    let (eps, me) = handle.ask(|c| (c.endpoints(), c.server_id()))?;
    let a = resolve(from, &eps, me)?;
    let b = resolve(to, &eps, me)?;
    for (spec, addr) in [(from, a), (to, b)] {
        let e = eps.iter().find(|e| e.addr == addr);
        if !e.is_some_and(|e| e.kind == ProcessKind::Runtime) {
            let spec = spec.to_string();
            return Err(RequestError::NotRuntime { spec, addr });
        }
    }
    let run = nflib::time::wall_ns();
    match handle.rpc(
        a,
        Call::StartProbe {
            to: b,
            run,
            count,
            size,
            depth,
        },
    )? {
        Reply::Accepted => {}
        Reply::Refused { reason } => return Err(RequestError::Refused { at: a, reason }),
        other => return Err(unexpected(a, other)),
    }
    let started = Instant::now();
    // A status question can go unanswered on a starved or lossy path while the probe itself
    // is fine; only the overall timeout ends the test.
    let mut sent = 0;
    let mut last = None;
    let sender = loop {
        match probe_status(handle, a, run) {
            Ok(r) if r.done => break r,
            Ok(r) => sent = r.sent,
            Err(e) => last = Some(Box::new(e)),
        }
        if started.elapsed() > timeout {
            return Err(RequestError::ProbeTimeout {
                timeout,
                sent,
                count,
                last,
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let receiver = loop {
        match probe_status(handle, b, run) {
            Ok(r) => break r,
            Err(e) if started.elapsed() > timeout => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    let secs = sender.last_ns.saturating_sub(sender.first_ns) as f64 / 1e9;
    let exact =
        receiver.received == count && receiver.duplicates == 0 && receiver.out_of_order == 0;
    Ok(json!({
        "from": a.to_string(),
        "to": b.to_string(),
        "count": count,
        "size": size,
        "depth": depth,
        "sent": sender.sent,
        "received": receiver.received,
        "duplicates": receiver.duplicates,
        "out_of_order": receiver.out_of_order,
        "exactly_once_in_order": exact,
        "retransmits": sender.retransmits,
        "given_up": sender.given_up,
        "seconds": secs,
        "msgs_per_s": if secs > 0.0 { count as f64 / secs } else { 0.0 },
        "gbit_per_s": if secs > 0.0 { receiver.payload_bytes as f64 * 8.0 / secs / 1e9 } else { 0.0 },
        "latency_min_us": receiver.latency_min_ns as f64 / 1000.0,
        "latency_avg_us": receiver.latency_avg_ns as f64 / 1000.0,
        "latency_max_us": receiver.latency_max_ns as f64 / 1000.0,
    }))
}

/// Client side: one request, one answer (the CLI's and the dashboard's shared client).
pub use nflib::control_client::call;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::peer::RpcError;

    fn runtime(name: &str, server: u16, slot: u16) -> EndpointInfo {
        EndpointInfo {
            addr: EndpointAddr::new(server, slot),
            kind: ProcessKind::Runtime,
            name: name.into(),
            chain: Some("web".into()),
            alive: true,
            generation: 1,
        }
    }

    #[test]
    fn specs_resolve_or_say_why_not() {
        let eps = [
            runtime("rt0", 1, 2),
            runtime("rt0", 2, 2),
            runtime("rt1", 2, 3),
        ];
        assert_eq!(resolve("2/3", &eps, 1), Ok(EndpointAddr::new(2, 3)));
        assert_eq!(resolve("rt0", &eps, 2), Ok(EndpointAddr::new(2, 2)));
        assert_eq!(resolve("rt1", &eps, 1), Ok(EndpointAddr::new(2, 3)));
        let texts = [
            ("2/x", 1, "`2/x` is not SERVER/SLOT"),
            ("rt0@x", 1, "`rt0@x`: `x` is not a server number"),
            ("rt9", 1, "no vswitch or runtime `rt9` in the cluster"),
            (
                "rt0",
                3,
                "`rt0` names several endpoints; say which server: rt0@1, rt0@2",
            ),
        ];
        for (spec, me, text) in texts {
            assert_eq!(resolve(spec, &eps, me).unwrap_err().to_string(), text);
        }
    }

    #[test]
    fn request_errors_read_as_before() {
        let (a, b) = (EndpointAddr::new(1, 2), EndpointAddr::new(2, 2));
        let chains = RequestError::OtherChains {
            from: "rt0@1".into(),
            from_chain: Some("web".into()),
            to: "rt0@2".into(),
            to_chain: None,
        };
        assert_eq!(
            chains.to_string(),
            "`rt0@1` runs chain Some(\"web\") and `rt0@2` runs None: flows can only move \
             between runtimes of the same chain"
        );
        let timeout = Duration::from_secs(2);
        let late = RequestError::MigrationTimeout {
            timeout,
            last: Some(CallError::Failed(RpcError::TimedOut)),
        };
        assert_eq!(
            late.to_string(),
            "the migration did not finish within 2.0 s (last status error: timed out)"
        );
        let refused = RequestError::Refused {
            at: b,
            reason: "busy".into(),
        };
        let probe = RequestError::ProbeTimeout {
            timeout,
            sent: 3,
            count: 5,
            last: Some(Box::new(refused)),
        };
        assert_eq!(
            probe.to_string(),
            format!(
                "timed out after 2.0 s with 3 of 5 messages sent and not all acknowledged \
                 (last status error: {b}: busy)"
            )
        );
        let silent = RequestError::TargetSilent(CallError::NoAnswer(b));
        assert_eq!(
            silent.to_string(),
            format!("the target did not answer: {b}: no answer")
        );
        let died = RequestError::SourceDied {
            at: a,
            reason: "no job".into(),
        };
        assert!(died.to_string().starts_with(&format!(
            "the source {a} died during the migration (its new process answers: no job); flows it had"
        )));
    }
}

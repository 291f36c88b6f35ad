//! nf-runtime's engine, as a library so benchmarks and tests drive the same code the process
//! runs: the flow table, timers, the event log and the chain executor.

pub mod engine;
pub mod events;
pub mod flows;
pub mod index;
pub mod liaison;
pub mod timers;

use nflib::config::Config;
use nflib::endpoint::Endpoint;
use nflib::mailbox::Mailbox;
use nflib::wire::EndpointAddr;

pub use engine::{FlowSettings, Runtime};

/// Reads the runtime's message rings and hands each message to its actor (the liaison;
/// flow actors receive messages once migration exists). Returns frames read.
pub fn serve_messages(
    ep: &mut Endpoint,
    rt: &mut Runtime,
    liaison: &mut liaison::Liaison,
    mb: &mut Mailbox,
    now_ns: u64,
) -> usize {
    let n = mb.receive(ep, now_ns);
    for env in mb.take_inbox() {
        if env.dst_actor == nflib::wire::LIAISON {
            liaison.handle(rt, ep, mb, env, now_ns);
        } else {
            liaison.unknown += 1;
        }
    }
    n
}

/// The configuration nfmgr stored in the region.
pub fn stored_config(ep: &Endpoint) -> Result<Config, String> {
    let text = std::str::from_utf8(ep.region().blob())
        .map_err(|_| "the stored configuration is not UTF-8".to_string())?;
    Config::from_frozen(text).map_err(|e| format!("stored configuration: {e}"))
}

/// The mailbox of the process attached as `ep`.
pub fn mailbox(ep: &Endpoint, cfg: &Config) -> Mailbox {
    Mailbox::for_endpoint(ep, cfg.cluster.server_id, cfg.cluster.transport())
}

/// Builds the runtime for the process in `ep`'s slot from the configuration nfmgr stored in
/// the region: its chain (functions built from their settings), flow settings and event log.
pub fn from_region(ep: &Endpoint, cfg: &Config) -> Result<Runtime, String> {
    let name = ep
        .region()
        .slot(ep.slot())
        .map(|s| s.name.get())
        .unwrap_or_default();
    let rc = cfg
        .runtime(&name)
        .ok_or_else(|| format!("no runtime named `{name}` in the configuration"))?;
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
                .map_err(|e| e.to_string())?
        }
        None => Vec::new(),
    };
    let events = match &rc.events {
        Some(p) => {
            let path = cfg
                .base_dir
                .join(p.to_string_lossy().replace("{runtime}", &name));
            events::EventLog::open(&path, &name).map_err(|e| {
                format!("runtime.{name}.events: cannot open {}: {e}", path.display())
            })?
        }
        None => events::EventLog::disabled(),
    };
    let settings = FlowSettings {
        max_flows: rc.max_flows as usize,
        idle_ms: rc.idle_timeout_s.saturating_mul(1000),
        unreplied_ms: rc.unreplied_timeout_s.saturating_mul(1000),
        closed_linger_ms: rc.closed_linger_ms,
    };
    Ok(Runtime::new(
        stages,
        settings,
        events,
        EndpointAddr::new(cfg.cluster.server_id, ep.slot()),
    ))
}

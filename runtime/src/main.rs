//! nf-runtime: hosts the flow actors of one service chain (see `nf_runtime::engine`).
//!
//! Its loop: messages first, then a batch of packets, each run to completion through the
//! chain; flows whose time is up end; aliases and flow ends go to the vswitch before the
//! packets go to nfmgr; sleep when idle.

#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use nf_runtime::io::ShmIo;
use nf_runtime::liaison::Liaison;
use nflib::endpoint::BATCH;
use nflib::process::{attach, enter_sandbox, init_logging, run_loop, CommonArgs};
use nflib::slot::ProcessKind;

#[derive(Parser)]
#[command(name = "nf-runtime", about = "NFActor runtime (started by nfmgr)")]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
}

fn main() -> ExitCode {
    init_logging();
    let args = Args::parse();
    let mut ep = match attach(&args.common, ProcessKind::Runtime) {
        Ok(ep) => ep,
        Err(e) => {
            eprintln!("nf-runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let built = nf_runtime::stored_config(&ep)
        .and_then(|cfg| nf_runtime::from_region(&ep, &cfg).map(|rt| (cfg, rt)));
    let (cfg, mut rt) = match built {
        Ok(x) => x,
        Err(e) => {
            eprintln!("nf-runtime: {e}");
            return ExitCode::from(2);
        }
    };
    rt.label_stats(&ep);
    nf_runtime::failpoint::prepare(ep.slot());
    if let Err(e) = enter_sandbox(&args.common) {
        eprintln!("nf-runtime: sandbox: {e}");
        return ExitCode::from(2);
    }
    let mut mb = nf_runtime::mailbox(&ep, &cfg);
    let mut liaison = Liaison::default();
    let mut backlog = nf_runtime::Backlog::default();
    let mut watch = nf_runtime::PeerWatch::default();
    let mut replica_watch = nf_runtime::PeerWatch::default();
    let mut dead = Vec::new();
    let mut events = Vec::new();
    let mut batch = Vec::with_capacity(BATCH);
    let mut last_publish = Instant::now();
    run_loop(&mut ep, &args.common, |ep, now| {
        let now_ns = nflib::time::mono_ns();
        // Messages first: the liaison answers what concerns the runtime.
        let m =
            nf_runtime::serve_messages(ep, &mut rt, &mut liaison, &mut mb, &mut backlog, now_ns);
        let probes = liaison.tick(&mut rt, ep, &mut mb, now_ns);
        let n = ep.recv_burst(&mut batch, BATCH);
        let now_ms = rt.now_ms();
        if nf_runtime::failpoint::armed() {
            nf_runtime::failpoint::crash_after_start(now_ms);
            nf_runtime::failpoint::forge_source(ep, rt.me(), now_ms);
            nf_runtime::failpoint::sandbox_probe(now_ms);
            nf_runtime::failpoint::rogue_call(&mut mb, now_ms);
        }
        rt.process_batch(&mut ShmIo { ep, mb: &mut mb }, &mut batch, now_ms);
        rt.expire(&mut ShmIo { ep, mb: &mut mb }, now_ms);
        events.clear();
        events.extend(mb.take_events());
        let me = mb.me();
        let migrating = rt.migrator.busy();
        if migrating {
            dead.clear();
            let peers = rt.migrator.peers();
            watch.check(ep, me, liaison.view(), &peers, &events, &mut dead);
            nf_runtime::serve_from(
                ep,
                &mut rt,
                &mut liaison,
                &mut mb,
                &mut backlog,
                &dead,
                now_ns,
            );
            rt.migration_tick(&mut ShmIo { ep, mb: &mut mb }, &dead, now_ms);
        }
        if rt.repl.enabled() {
            // A replica that died (or restarted empty) is replaced at once: output waiting
            // for it would otherwise wait out its deadline.
            dead.clear();
            let replicas = liaison.replicas();
            replica_watch.check(ep, me, liaison.view(), replicas, &events, &mut dead);
            for d in &dead {
                let alive = nf_runtime::peer_alive(ep, me, liaison.view(), *d);
                rt.repl.replica_lost(*d, alive, now_ns);
            }
            // One that came back (restarted) is used again, starting empty.
            for r in replicas {
                if !rt.repl.is_live(*r) && nf_runtime::peer_alive(ep, me, liaison.view(), *r) {
                    rt.repl.replica_lost(*r, true, now_ns);
                }
            }
        }
        rt.flush(&mut ShmIo { ep, mb: &mut mb }, now_ns);
        // The transport's timers (the mailbox's flush asked for them), and packets held for
        // an alias confirmation, which leave by a deadline even if it never comes.
        let mut wake = mb.next_timeout();
        if let Some(t) = rt.next_wake_ns(now_ns) {
            wake = Some(wake.map_or(t, |w| w.min(t)));
        }
        if migrating {
            // Migration timers (straggler waits, step timeouts) need the loop within 1 ms.
            let soon = now_ns + 1_000_000;
            wake = Some(wake.map_or(soon, |w| w.min(soon)));
        }
        ep.wake_by(wake);
        if now.duration_since(last_publish) >= Duration::from_millis(100) {
            rt.publish(&mut ShmIo { ep, mb: &mut mb });
            last_publish = now;
        }
        m + n + probes
    });
    rt.end_all(&mut ShmIo {
        ep: &mut ep,
        mb: &mut mb,
    });
    rt.publish(&mut ShmIo {
        ep: &mut ep,
        mb: &mut mb,
    });
    rt.events.close();
    ExitCode::SUCCESS
}

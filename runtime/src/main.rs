//! nf-runtime: hosts flow actors and runs the service chain on them.
//!
//! At this stage of the platform the runtime forwards every packet it receives to nfmgr
//! unchanged (descriptors only); flow actors and network functions come next. Its loop is the
//! one every runtime keeps: messages first, then a burst of data, run to completion, and
//! sleep when idle.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use nflib::endpoint::{Endpoint, Idle, BATCH, BURST};
use nflib::process::{install_termination_flag, terminate_requested, CommonArgs};
use nflib::slot::ProcessKind;
use nflib::stats::ProcCounter;
use nflib::MANAGER_SLOT;

#[derive(Parser)]
#[command(name = "nf-runtime", about = "NFActor runtime (started by nfmgr)")]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("NF_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_target(false)
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let mut ep = match Endpoint::attach(&args.common.region, args.common.slot, ProcessKind::Runtime)
    {
        Ok(ep) => ep,
        Err(e) => {
            eprintln!("nf-runtime: {e}");
            return ExitCode::from(2);
        }
    };
    install_termination_flag();
    let mut idle = Idle::new(args.common.idle_policy(ep.busy_poll()));
    ep.announce_running();

    let mut msgs = Vec::with_capacity(BURST);
    let mut batch = Vec::with_capacity(BATCH);
    let mut out = Vec::with_capacity(BATCH);
    let mut last_publish = Instant::now();
    while !ep.stop_requested() && !terminate_requested() {
        let t0 = Instant::now();
        // Control before data.
        ep.recv_messages(&mut msgs, BURST);
        for (_, m) in msgs.drain(..) {
            ep.free(m);
        }
        let n = ep.recv_burst(&mut batch, BATCH);
        for (_, p) in batch.drain(..) {
            out.push(p);
        }
        if !out.is_empty() {
            ep.send_burst(MANAGER_SLOT, &mut out);
        }
        ep.flush_wakes();
        if n > 0 {
            let busy = t0.elapsed().as_nanos() as u64;
            ep.counters().add(ProcCounter::BusyNs as usize, busy);
        }
        ep.counters().add(ProcCounter::Loops as usize, 1);
        if t0.duration_since(last_publish) >= Duration::from_millis(100) {
            ep.publish();
            last_publish = t0;
        }
        idle.after(&mut ep, n > 0);
    }
    ep.shutdown();
    ExitCode::SUCCESS
}

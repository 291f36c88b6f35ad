//! nf-vswitch: dispatches flows to runtimes.
//!
//! One dispatch entry per flow (the vswitch actor of the paper): the first packet of a flow
//! picks the next live runtime round-robin, and every later packet of the flow, in either
//! direction, goes to the same runtime. Frames that cannot be parsed are dropped and counted
//! by reason; frames that are not IP are passed (as an L2 flow per pair of stations) or
//! dropped, by policy.

mod dispatch;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use nflib::endpoint::{Endpoint, Idle, BATCH, BURST};
use nflib::process::{install_termination_flag, terminate_requested, CommonArgs};
use nflib::slot::ProcessKind;
use nflib::stats::ProcCounter;

use dispatch::{Dispatch, NonIp};

#[derive(Parser)]
#[command(
    name = "nf-vswitch",
    about = "NFActor virtual switch (started by nfmgr)"
)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// What to do with frames that are not IP.
    #[arg(long, value_enum, default_value_t = NonIp::Pass)]
    non_ip: NonIp,
    /// Forget a flow's runtime after this long without packets.
    #[arg(long, default_value_t = 30_000)]
    flow_timeout_ms: u64,
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
    let mut ep = match Endpoint::attach(&args.common.region, args.common.slot, ProcessKind::Vswitch)
    {
        Ok(ep) => ep,
        Err(e) => {
            eprintln!("nf-vswitch: {e}");
            return ExitCode::from(2);
        }
    };
    install_termination_flag();
    let mut idle = Idle::new(args.common.idle_policy(ep.busy_poll()));
    let mut dispatch = Dispatch::new(
        ep.region(),
        ep.slot(),
        args.non_ip,
        Duration::from_millis(args.flow_timeout_ms),
    );
    ep.announce_running();

    let mut msgs = Vec::with_capacity(BURST);
    let mut batch = Vec::with_capacity(BATCH);
    let mut last_publish = Instant::now();
    let mut last_sweep = Instant::now();
    while !ep.stop_requested() && !terminate_requested() {
        let t0 = Instant::now();
        ep.recv_messages(&mut msgs, BURST);
        for (_, m) in msgs.drain(..) {
            ep.free(m);
        }
        let n = ep.recv_burst(&mut batch, BATCH);
        if n > 0 {
            dispatch.refresh_targets(ep.region());
            dispatch.dispatch(&mut ep, &mut batch, t0);
            let busy = t0.elapsed().as_nanos() as u64;
            ep.counters().add(ProcCounter::BusyNs as usize, busy);
        }
        ep.flush_wakes();
        ep.counters().add(ProcCounter::Loops as usize, 1);
        if t0.duration_since(last_sweep) >= Duration::from_secs(1) {
            dispatch.expire(&mut ep, t0);
            last_sweep = t0;
        }
        if t0.duration_since(last_publish) >= Duration::from_millis(100) {
            ep.publish();
            last_publish = t0;
        }
        idle.after(&mut ep, n > 0);
    }
    ep.shutdown();
    ExitCode::SUCCESS
}

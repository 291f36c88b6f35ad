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
use nflib::endpoint::{BATCH, BURST};
use nflib::process::{attach, init_logging, run_loop, CommonArgs};
use nflib::slot::ProcessKind;

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
    init_logging();
    let args = Args::parse();
    let mut ep = match attach(&args.common, ProcessKind::Vswitch) {
        Ok(ep) => ep,
        Err(e) => {
            eprintln!("nf-vswitch: {e}");
            return ExitCode::from(2);
        }
    };
    let mut dispatch = Dispatch::new(
        ep.region(),
        ep.slot(),
        args.non_ip,
        Duration::from_millis(args.flow_timeout_ms),
    );
    let mut msgs = Vec::with_capacity(BURST);
    let mut batch = Vec::with_capacity(BATCH);
    let mut last_sweep = Instant::now();
    run_loop(&mut ep, &args.common, |ep, now| {
        let m = ep.recv_messages(&mut msgs, BURST);
        for (_, msg) in msgs.drain(..) {
            ep.free(msg);
        }
        let n = ep.recv_burst(&mut batch, BATCH);
        if n > 0 {
            dispatch.refresh_targets(ep.region());
            dispatch.dispatch(ep, &mut batch, now);
        }
        if now.duration_since(last_sweep) >= Duration::from_secs(1) {
            dispatch.expire(ep, now);
            last_sweep = now;
        }
        m + n
    });
    ExitCode::SUCCESS
}

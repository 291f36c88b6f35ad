//! nf-runtime: hosts flow actors and runs the service chain on them.
//!
//! At this stage of the platform the runtime forwards every packet it receives to nfmgr
//! unchanged (descriptors only); flow actors and network functions come next. Its loop is the
//! one every runtime keeps (`nflib::process::run_loop`): messages first, then a batch of
//! data, run to completion, and sleep when idle.

use std::process::ExitCode;

use clap::Parser;
use nflib::endpoint::{BATCH, BURST};
use nflib::process::{attach, init_logging, run_loop, CommonArgs};
use nflib::slot::ProcessKind;
use nflib::MANAGER_SLOT;

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
    let mut msgs = Vec::with_capacity(BURST);
    let mut batch = Vec::with_capacity(BATCH);
    let mut out = Vec::with_capacity(BATCH);
    run_loop(&mut ep, &args.common, |ep, _now| {
        // Control before data. No messages are defined for runtimes yet.
        let m = ep.recv_messages(&mut msgs, BURST);
        for (_, msg) in msgs.drain(..) {
            ep.free(msg);
        }
        let n = ep.recv_burst(&mut batch, BATCH);
        out.extend(batch.drain(..).map(|(_, p)| p));
        if !out.is_empty() {
            ep.send_burst(MANAGER_SLOT, &mut out);
        }
        m + n
    });
    ExitCode::SUCCESS
}

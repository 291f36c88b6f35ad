//! nf-vswitch: dispatches flows to runtimes (see `dispatch`).

#![forbid(unsafe_code)]

mod dispatch;
mod flowmap;

use std::process::ExitCode;

use clap::Parser;
use nflib::config::Config;
use nflib::endpoint::BATCH;
use nflib::mailbox::Mailbox;
use nflib::process::{attach, enter_sandbox, init_logging, run_loop, CommonArgs};
use nflib::slot::ProcessKind;

use dispatch::Dispatch;

#[derive(Parser)]
#[command(
    name = "nf-vswitch",
    about = "NFActor virtual switch (started by nfmgr)"
)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
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
    let cfg = std::str::from_utf8(ep.region().blob())
        .map_err(|_| "the stored configuration is not UTF-8".to_string())
        .and_then(|t| Config::from_frozen(t).map_err(|e| format!("stored configuration: {e}")));
    let built = cfg.and_then(|c| Dispatch::new(ep.region(), ep.slot(), &c).map(|d| (c, d)));
    let (cfg, mut dispatch) = match built {
        Ok(x) => x,
        Err(e) => {
            eprintln!("nf-vswitch: {e}");
            return ExitCode::from(2);
        }
    };
    let mut mb = Mailbox::for_endpoint(&ep, cfg.cluster.server_id, cfg.cluster.transport());
    if let Err(e) = enter_sandbox(&args.common) {
        eprintln!("nf-vswitch: sandbox: {e}");
        return ExitCode::from(2);
    }
    let mut batch = Vec::with_capacity(BATCH);
    // A restarted vswitch: its table died with the last life; the runtimes know it.
    let rebuild_wait = cfg
        .vswitch(
            &ep.region()
                .slot(ep.slot())
                .map(|s| s.name.get())
                .unwrap_or_default(),
        )
        .map_or(0, |v| v.rebuild_wait_ms);
    dispatch.start_rebuild(&mut ep, &mut mb, rebuild_wait);
    run_loop(&mut ep, &args.common, |ep, now| {
        let m = dispatch.handle_messages(ep, &mut mb);
        // Held packets go before new ones: each flow's stay in order.
        let r = dispatch.finish_rebuild(ep, &mut mb, now);
        let n = ep.recv_burst(&mut batch, BATCH);
        if n > 0 {
            dispatch.refresh_targets(ep.region());
            dispatch.dispatch(ep, &mut mb, &mut batch, now);
        }
        dispatch.expire(ep, now);
        mb.flush(ep, nflib::time::mono_ns());
        m + n + r
    });
    ExitCode::SUCCESS
}

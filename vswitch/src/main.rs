//! nf-vswitch: dispatches flows to runtimes (see `dispatch`).

#![forbid(unsafe_code)]

mod dispatch;
mod flowmap;
mod io;

use std::process::ExitCode;

use clap::Parser;
use nflib::endpoint::{Endpoint, BATCH};
use nflib::mailbox::Mailbox;
use nflib::process::{attach, enter_sandbox, init_logging, run_loop, CommonArgs};
use nflib::slot::ProcessKind;

use nflib::time::mono_ns;

use dispatch::{Dispatch, Setup};
use io::ShmIo;

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
    let cfg = match nflib::process::stored_config(&ep) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("nf-vswitch: {e}");
            return ExitCode::from(2);
        }
    };
    let mut mb = Mailbox::for_endpoint(&ep, cfg.cluster.server_id, cfg.cluster.transport());
    let setup = setup_of(&ep);
    let built = Dispatch::new(
        &setup,
        &cfg,
        &mut ShmIo {
            ep: &mut ep,
            mb: &mut mb,
        },
        mono_ns(),
    );
    let mut dispatch = match built {
        Ok(d) => d,
        Err(e) => {
            eprintln!("nf-vswitch: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = enter_sandbox(&args.common) {
        eprintln!("nf-vswitch: sandbox: {e}");
        return ExitCode::from(2);
    }
    // Received with the slot each came from (always nfmgr's for a vswitch), then
    // dispatched without it.
    let mut received = Vec::with_capacity(BATCH);
    let mut batch = Vec::with_capacity(BATCH);
    // A restarted vswitch: its table died with the last life; the runtimes know it.
    let rebuild_wait = cfg.vswitch(&setup.name).map_or(0, |v| v.rebuild_wait_ms);
    dispatch.start_rebuild(
        &mut ShmIo {
            ep: &mut ep,
            mb: &mut mb,
        },
        rebuild_wait,
        mono_ns(),
    );
    run_loop(&mut ep, &args.common, |ep, _| {
        let now_ns = mono_ns();
        let n = {
            let mut io = ShmIo { ep, mb: &mut mb };
            let m = dispatch.handle_messages(&mut io, now_ns);
            // Held packets go before new ones: each flow's stay in order.
            let r = dispatch.finish_rebuild(&mut io, now_ns);
            let n = io.ep.recv_burst(&mut received, BATCH);
            if n > 0 {
                batch.extend(received.drain(..).map(|(_, p)| p));
                dispatch.refresh_targets(&io, now_ns);
                dispatch.dispatch(&mut io, &mut batch, now_ns);
            }
            dispatch.expire(&mut io, now_ns);
            m + n + r
        };
        mb.flush(ep, mono_ns());
        n
    });
    ExitCode::SUCCESS
}

/// The vswitch's slot, name and targets as nfmgr wrote them in the region.
fn setup_of(ep: &Endpoint) -> Setup {
    let region = ep.region();
    let me = ep.slot();
    let name = |s: u16| region.slot(s).map(|r| r.name.get()).unwrap_or_default();
    let targets = region.slot(me).map(|s| s.targets()).unwrap_or(0);
    Setup {
        slot: me,
        name: nflib::process::own_name(ep),
        targets: (0..region.slot_count().min(64))
            .filter(|s| targets & (1u64 << s) != 0)
            .map(|s| (s, name(s)))
            .collect(),
        slots: region.slot_count(),
        generation: ep.generation(),
    }
}

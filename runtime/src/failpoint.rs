//! Fault injection for tests of real processes, read once from `NF_FAILPOINTS` (a comma
//! separated list) and inert when it is unset. A test sets it on the test bed to stop a
//! runtime at a moment no signal can be timed to, then kills it there.
//!
//! - `migrate-state-stall`: a runtime that receives step 3's state as a migration target
//!   stops answering anything (it sleeps until killed), as a hung or dying target would.
//! - `replicate-crash`: the runtime in slot `NF_FAILPOINT_SLOT`, once it has run
//!   `NF_FAILPOINT_AFTER_MS` (3000), aborts at a flush that holds output under output
//!   commit, after processing packets and before replicating what they changed. First it
//!   writes the frames it holds, one hex line each, to `NF_FAILPOINT_OUT`; the file also
//!   marks the failpoint spent, so the restarted runtime runs on.
//! - `crash-after-start`: every runtime aborts 200 ms into its life, once running: a crash
//!   loop.
//! - `forge-source`: a runtime puts, once, a frame on its message ring to nfmgr that names
//!   another endpoint as its source (a compromised process would).
//! - `migrate-state-sent-crash`: a migration's source aborts right after it sent its first
//!   step-3 state, before its replicas hear that those flows left (at its next flush).
//! - `migrate-switched-crash`: a migration's source aborts when the vswitch answers its
//!   first step 2 (the flows' packets go to the target now), before it sends their state.
//! - `rogue-call`: a runtime, once, makes control calls only nfmgr may make (a takeover of
//!   its own flows by the next slot's runtime, a workload poll of the vswitch), and asks
//!   the vswitch to move the next runtime's flows to a third.
//! - `misroute`: a runtime sends all its output to port `NF_FAILPOINT_EGRESS` (an index),
//!   whatever port it should leave by, and names `NF_FAILPOINT_INGRESS` (when set) as the
//!   port it arrived on.
//! - `sandbox-probe`: a runtime, once, tries to signal and trace nfmgr and read the cluster
//!   key, as a
//!   taken-over runtime would (the sandbox must refuse both).

use std::sync::OnceLock;

fn enabled(name: &str) -> bool {
    static LIST: OnceLock<Vec<String>> = OnceLock::new();
    LIST.get_or_init(|| {
        std::env::var("NF_FAILPOINTS")
            .map(|v| v.split(',').map(|s| s.trim().to_owned()).collect())
            .unwrap_or_default()
    })
    .iter()
    .any(|f| f == name)
}

/// Called with step 3's state in hand: never returns when `migrate-state-stall` is set.
pub fn migrate_state_received() {
    if enabled("migrate-state-stall") {
        say("migrate-state-stall: stopping here until killed");
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}

/// Called by a migration's source right after it sent step 3's state (`msg`).
pub fn migrate_state_sent(msg: &nflib::msg::Message) {
    if matches!(msg, nflib::msg::Message::MigrateState { .. })
        && enabled("migrate-state-sent-crash")
    {
        say("migrate-state-sent-crash: aborting");
        std::process::abort();
    }
}

/// Called by a runtime with a vswitch's answer to a migration's step 2 (`RuntimeSet` for
/// a request of its own that is neither a takeover's nor a rollback's).
pub fn migrate_switched(msg: &nflib::msg::Message) {
    if let nflib::msg::Message::RuntimeSet { request, moved, .. } = msg {
        let own = *request != 0
            && request & nflib::msg::RECOVERY_REQUEST == 0
            && request & nflib::msg::HAND_BACK_REQUEST == 0
            && request & crate::migration::ROLLBACK == 0;
        if own && *moved > 0 && enabled("migrate-switched-crash") {
            say("migrate-switched-crash: aborting");
            std::process::abort();
        }
    }
}

/// `crash-after-start`: aborts once the runtime has run `uptime_ms` >= 200.
pub fn crash_after_start(uptime_ms: u64) {
    if uptime_ms >= 200 && enabled("crash-after-start") {
        say("crash-after-start: aborting");
        std::process::abort();
    }
}

/// `forge-source`: once, 300 ms into the runtime's life, a `Ping` to nfmgr with the source
/// of the endpoint in the next slot.
pub fn forge_source(
    ep: &mut nflib::endpoint::Endpoint,
    me: nflib::frame::EndpointAddr,
    uptime_ms: u64,
) {
    use std::sync::atomic::{AtomicBool, Ordering};
    static DONE: AtomicBool = AtomicBool::new(false);
    if uptime_ms < 300 || !enabled("forge-source") || DONE.swap(true, Ordering::Relaxed) {
        return;
    }
    let mut payload = Vec::new();
    if (nflib::msg::Message::Ping { seq: 1 })
        .encode(&mut payload)
        .is_err()
    {
        return;
    }
    let forged = nflib::frame::EndpointAddr::new(me.server, me.slot.wrapping_add(1));
    let mut h = nflib::frame::FrameHeader::ack(
        forged,
        nflib::frame::EndpointAddr::new(me.server, nflib::MANAGER_SLOT),
    );
    h.kind = nflib::frame::FrameKind::Data;
    h.seq = 1;
    h.src_session = 1;
    h.frag_count = 1;
    let Some(mut p) = ep.alloc() else { return };
    let region = ep.region().clone();
    match nflib::frame::write_frame(region.room_mut(&mut p), &h, &payload) {
        Ok(n) if region.set_len(&mut p, n) => {
            let mut q = vec![p];
            ep.send_messages(nflib::MANAGER_SLOT, &mut q);
            say(&format!("forge-source: sent a frame as {forged}"));
        }
        _ => ep.free(p),
    }
}

/// One line to stderr in one write: runtimes share nfmgr's log, and `eprintln!` may write
/// a line in pieces that another process's line then splits.
fn say(what: &str) {
    use std::io::Write;
    let line = format!("nf-runtime: failpoint {what}\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
}

/// Whether any failpoint is set (cheap enough for every loop iteration).
pub fn armed() -> bool {
    static ARMED: OnceLock<bool> = OnceLock::new();
    *ARMED.get_or_init(|| std::env::var_os("NF_FAILPOINTS").is_some())
}

/// Opens what the failpoints will write, before the runtime enters its sandbox (where no
/// file can be opened). `slot` is the runtime's.
pub fn prepare(slot: u16) {
    if !armed() {
        return;
    }
    if enabled("replicate-crash") {
        let var = |k: &str| std::env::var(k).ok();
        if var("NF_FAILPOINT_SLOT").and_then(|s| s.parse::<u16>().ok()) != Some(slot) {
            return;
        }
        // The file, once there, marks the failpoint spent: a restarted runtime runs on.
        let Some(out) = var("NF_FAILPOINT_OUT") else {
            return;
        };
        if let Ok(f) = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&out)
        {
            let _ = REPLICATE_CRASH_OUT.set(std::sync::Mutex::new(f));
        }
    }
}

static REPLICATE_CRASH_OUT: OnceLock<std::sync::Mutex<std::fs::File>> = OnceLock::new();

/// `replicate-crash`: aborts the runtime in `slot` (uptime `uptime_ms`) with `held` output
/// frames, processed and not yet replicated, after writing them out. Returns otherwise.
pub fn replicate_crash<'a>(slot: u16, uptime_ms: u64, held: impl Iterator<Item = &'a [u8]>) {
    if !enabled("replicate-crash") {
        return;
    }
    let var = |k: &str| std::env::var(k).ok();
    if var("NF_FAILPOINT_SLOT").and_then(|s| s.parse::<u16>().ok()) != Some(slot) {
        return;
    }
    let after = var("NF_FAILPOINT_AFTER_MS")
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(3000);
    let Some(out) = REPLICATE_CRASH_OUT.get() else {
        return;
    };
    if uptime_ms < after {
        return;
    }
    let mut text = String::new();
    for frame in held {
        for b in frame {
            text.push_str(&format!("{b:02x}"));
        }
        text.push('\n');
    }
    if text.is_empty() {
        return;
    }
    if let Ok(mut f) = out.lock() {
        use std::io::Write;
        let _ = f.write_all(text.as_bytes());
    }
    say("replicate-crash: aborting before replicating");
    std::process::abort();
}

/// `sandbox-probe`: once, 300 ms into the runtime's life, does what a taken-over runtime
/// would try: signal and trace its parent, nfmgr, and read the file `NF_FAILPOINT_PROBE`
/// names (the cluster key, only root may read it). Each attempt's outcome goes to stderr; under an enforcing
/// system-call filter the read ends the process (SIGSYS) instead.
pub fn sandbox_probe(uptime_ms: u64) {
    use std::sync::atomic::{AtomicBool, Ordering};
    static DONE: AtomicBool = AtomicBool::new(false);
    if uptime_ms < 300 || !enabled("sandbox-probe") || DONE.swap(true, Ordering::Relaxed) {
        return;
    }
    let parent = nix::unistd::getppid();
    let signal = match nix::sys::signal::kill(parent, None) {
        Ok(()) => "allowed".to_string(),
        Err(e) => format!("refused ({e})"),
    };
    say(&format!("sandbox-probe: signal nfmgr: {signal}"));
    // PTRACE_SEIZE, unlike ATTACH, would not stop nfmgr should it succeed.
    let trace = match nix::sys::ptrace::seize(parent, nix::sys::ptrace::Options::empty()) {
        Ok(()) => {
            let _ = nix::sys::ptrace::detach(parent, None);
            "allowed".to_string()
        }
        Err(e) => format!("refused ({e})"),
    };
    say(&format!("sandbox-probe: trace nfmgr: {trace}"));
    if let Some(path) = std::env::var_os("NF_FAILPOINT_PROBE") {
        let read = match std::fs::read(&path) {
            Ok(b) => format!("read {} bytes", b.len()),
            Err(e) => format!("refused ({e})"),
        };
        say(&format!("sandbox-probe: read the secret: {read}"));
    }
}

/// `rogue-call`: once, 300 ms into its life, the runtime makes the control calls only
/// nfmgr may make, as a taken-over runtime would: it asks the runtime in the next slot to
/// take over its own (living) flows, and the vswitch in slot 1 for its workload.
pub fn rogue_call(mb: &mut nflib::mailbox::Mailbox, uptime_ms: u64) {
    use nflib::frame::EndpointAddr;
    use nflib::msg::{Call, Message};
    use std::sync::atomic::{AtomicBool, Ordering};
    static DONE: AtomicBool = AtomicBool::new(false);
    if uptime_ms < 300 || !enabled("rogue-call") || DONE.swap(true, Ordering::Relaxed) {
        return;
    }
    let me = mb.me();
    let next = EndpointAddr::new(me.server, me.slot.wrapping_add(1));
    let liaison = nflib::frame::LIAISON;
    let recover = Message::Rpc {
        id: 1,
        call: Call::Recover {
            failed: me,
            incarnation: 0,
            // The newest coordinator life: only the sender's role may refuse it.
            epoch: u64::MAX,
        },
    };
    let poll = Message::Rpc {
        id: 2,
        call: Call::PollWorkload,
    };
    let vswitch = EndpointAddr::new(me.server, 1);
    // And the vswitch to move flows between two other runtimes.
    let repoint = Message::SetRuntime {
        keys: Vec::new(),
        from: next,
        runtime: EndpointAddr::new(me.server, me.slot.wrapping_add(2)),
        request: 3,
    };
    let sent = mb.send(next, liaison, liaison, &recover).is_ok()
        && mb.send(vswitch, liaison, liaison, &poll).is_ok()
        && mb.send(vswitch, liaison, liaison, &repoint).is_ok();
    say(&format!(
        "rogue-call: asked {next} to take over my flows, {vswitch} for its workload and to move {next}'s flows (sent: {sent})"
    ));
}

/// `misroute`: the port every output packet is to name as its egress
/// (`NF_FAILPOINT_EGRESS`), and as its port of arrival (`NF_FAILPOINT_INGRESS`), if armed.
pub fn misroute() -> Option<(u8, Option<u8>)> {
    static PORTS: OnceLock<Option<(u8, Option<u8>)>> = OnceLock::new();
    *PORTS.get_or_init(|| {
        if !enabled("misroute") {
            return None;
        }
        let port = |var: &str| std::env::var(var).ok()?.parse().ok();
        Some((port("NF_FAILPOINT_EGRESS")?, port("NF_FAILPOINT_INGRESS")))
    })
}

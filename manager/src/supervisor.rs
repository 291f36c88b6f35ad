//! Process supervision: spawning nf-vswitch and nf-runtime processes, watching them with
//! pidfds, recovering after a death, restarting, and shutting everything down cleanly.
//!
//! Runs on nfmgr's main thread, which must stay the thread that forks children: the
//! parent-death signal children set (`PR_SET_PDEATHSIG`) fires when the *thread* that forked
//! them exits.
//!
//! A death is handled in a fixed order, each step waiting for the previous one:
//! 1. the pidfd becomes readable: reap the process, mark its slot `Dead`;
//! 2. ask the data plane to reclaim the slot (drain its input rings, free what it held) and
//!    wait for the report;
//! 3. if the policy restarts it: ask the data plane to stop draining the slot (`Revive`),
//!    wait for the acknowledgement, and only then spawn the replacement, so two consumers never
//!    read one ring.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Command as ProcCommand, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nflib::doorbell::Doorbells;
use nflib::region::RegionState;
use nflib::slot::{ProcessKind, SlotState};
use nflib::stats::ProcCounter;
use nflib::Region;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::EventFd;
use nix::sys::signal::Signal;
use nix::sys::signalfd::SignalFd;
use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
use ringbuf::traits::{Consumer as _, Producer as _};
use ringbuf::{HeapCons, HeapProd};
use serde::Serialize;

use crate::dataplane::{Command, PlaneEvent};
use crate::sys::{pidfd_open, pidfd_signal, prepare_child};
use nflib::buffer::Desc;
use nflib::config::{Config, RestartPolicy};
use nflib::layout::RingId;

/// One supervised process.
pub struct ProcSpec {
    pub slot: u16,
    pub name: String,
    pub kind: ProcessKind,
    pub binary: PathBuf,
    pub args: Vec<String>,
    pub core: Option<usize>,
    pub busy_poll: bool,
    pub targets: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Spawned, not yet reported running.
    Starting,
    Running,
    /// Reaped; waiting for the data plane's reclaim report.
    Reclaiming,
    /// Waiting for the data plane to hand the slot back before spawning.
    Reviving,
    /// Waiting out a restart delay.
    Backoff,
    /// Not restarted (policy, or shutdown).
    Down,
}

struct Proc {
    spec: ProcSpec,
    phase: Phase,
    pidfd: Option<Arc<OwnedFd>>,
    pid: u32,
    spawned_at: Instant,
    /// Deaths in a row before reaching `Running` or soon after (`stable_after_ms`): a crash
    /// loop, which backs off.
    start_failures: u32,
    restart_at: Option<Instant>,
    reached_running: bool,
    /// Frozen-runtime watch: packets its input rings had given it (summed consumer
    /// counts) at the last look, and since when that has not moved while packets waited.
    consumed: u32,
    stuck_since: Option<Instant>,
    /// Its CPU time (clock ticks) when it was first seen stuck.
    cpu_at_stuck: u64,
    /// When its last life ended.
    died_at: Instant,
    /// A vswitch's table rebuilds reported so far (its `vswitch_rebuilds` counter).
    rebuilds_seen: u64,
}

impl Proc {
    /// Dying again and again soon after starting: two early deaths in a row, or one
    /// before it ever ran.
    fn crash_looping(&self) -> bool {
        self.start_failures >= 2 || (self.start_failures == 1 && !self.reached_running)
    }
}

/// A process's scheduler state and CPU time (user + system, in clock ticks), from
/// `/proc/PID/stat`; `None` if it cannot be read (gone).
fn proc_stat(pid: u32) -> Option<(char, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: fields start after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state (3rd field of the line), ..., utime (14th), stime (15th).
    let state = f.first()?.chars().next()?;
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((state, utime + stime))
}

/// Something that happened to a process, for the log and the final report.
#[derive(Clone, Debug, Serialize)]
pub struct ProcEvent {
    pub at_ms: u64,
    pub process: String,
    pub kind: ProcEventKind,
    pub what: String,
    /// The process's slot and that slot's generation when this happened (a death names
    /// the life that ended: recovery takes over that incarnation's flows).
    #[serde(skip)]
    pub slot: u16,
    #[serde(skip)]
    pub generation: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProcEventKind {
    /// It reached `Running`.
    Running,
    /// It exited or was killed.
    Died,
    /// It stopped taking packets (and was killed; its death follows).
    Frozen,
    /// It could not be started, or did not start in time.
    StartFailed,
    /// Its buffers were taken back.
    Reclaimed,
    /// It keeps dying soon after starting: its next start waits.
    CrashLoop,
    /// A restarted vswitch rebuilt its dispatch table from the runtimes.
    Rebuilt,
}

/// Told of every process event (see [`Supervisor::observe`]).
type Observer = Box<dyn FnMut(&ProcEvent)>;

pub struct Supervisor {
    cfg: Config,
    region: Region,
    bells: Arc<Doorbells>,
    procs: Vec<Proc>,
    commands: HeapProd<Command>,
    events: HeapCons<PlaneEvent>,
    event_bell: Arc<EventFd>,
    signals: SignalFd,
    started: Instant,
    pub log: Vec<ProcEvent>,
    /// Told of every event as it is recorded (the control thread's log and `nfmgr top`).
    observer: Option<Observer>,
    pub deaths: u64,
    pub restarts: u64,
    stopping: bool,
    /// The running processes' pidfds by slot, shared with the control thread: `nfmgr kill`
    /// and the fence signal a process through these, never through the pid word in shared
    /// memory (which any attached process can write).
    pidfds: Pidfds,
}

/// Pidfds of the running processes, by slot.
pub type Pidfds = Arc<Mutex<HashMap<u16, Arc<OwnedFd>>>>;

/// Reaps the process behind a pidfd if it has exited: Some(exit code, or minus the signal).
fn reap(fd: &OwnedFd) -> Option<i32> {
    match waitid(
        Id::PIDFd(fd.as_fd()),
        WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG,
    ) {
        Ok(WaitStatus::Exited(_, code)) => Some(code),
        Ok(WaitStatus::Signaled(_, sig, _)) => Some(-(sig as i32)),
        _ => None,
    }
}

fn describe_exit(code: i32) -> String {
    if code >= 0 {
        format!("exited with status {code}")
    } else {
        let sig = -code;
        let name = match sig {
            libc::SIGKILL => "SIGKILL",
            libc::SIGTERM => "SIGTERM",
            libc::SIGSEGV => "SIGSEGV",
            libc::SIGABRT => "SIGABRT",
            libc::SIGBUS => "SIGBUS",
            libc::SIGINT => "SIGINT",
            libc::SIGSYS => {
                return format!(
                    "killed by SIGSYS ({sig}): a system call outside the sandbox's list (supervisor.seccomp = \"log\" lets it through and logs it)"
                )
            }
            _ => "signal",
        };
        format!("killed by {name} ({sig})")
    }
}

impl Supervisor {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: Config,
        region: Region,
        bells: Arc<Doorbells>,
        specs: Vec<ProcSpec>,
        commands: HeapProd<Command>,
        events: HeapCons<PlaneEvent>,
        event_bell: Arc<EventFd>,
        signals: SignalFd,
    ) -> Supervisor {
        let now = Instant::now();
        Supervisor {
            cfg,
            region,
            bells,
            procs: specs
                .into_iter()
                .map(|spec| Proc {
                    spec,
                    phase: Phase::Down,
                    pidfd: None,
                    pid: 0,
                    spawned_at: now,
                    start_failures: 0,
                    restart_at: None,
                    reached_running: false,
                    consumed: 0,
                    stuck_since: None,
                    cpu_at_stuck: 0,
                    died_at: now,
                    rebuilds_seen: 0,
                })
                .collect(),
            commands,
            events,
            event_bell,
            signals,
            started: now,
            log: Vec::new(),
            observer: None,
            deaths: 0,
            restarts: 0,
            stopping: false,
            pidfds: Pidfds::default(),
        }
    }

    /// Keeps the running processes' pidfds in `pidfds`, which the control thread shares.
    pub fn with_pidfds(mut self, pidfds: Pidfds) -> Supervisor {
        self.pidfds = pidfds;
        self
    }

    /// Calls `f` with every event from now on.
    pub fn observe(&mut self, f: impl FnMut(&ProcEvent) + 'static) {
        self.observer = Some(Box::new(f));
    }

    fn record(&mut self, process: &str, kind: ProcEventKind, what: String) {
        tracing::info!(process, "{what}");
        let slot = self
            .procs
            .iter()
            .find(|p| p.spec.name == process)
            .map_or(0, |p| p.spec.slot);
        let generation = self
            .region
            .slot(slot)
            .map_or(0, |r| r.generation.load(Ordering::Relaxed));
        let e = ProcEvent {
            at_ms: self.started.elapsed().as_millis() as u64,
            process: process.to_string(),
            kind,
            what,
            slot,
            generation,
        };
        if let Some(f) = &mut self.observer {
            f(&e);
        }
        self.log.push(e);
    }

    fn send(&mut self, cmd: Command) {
        if self.commands.try_push(cmd).is_err() {
            tracing::error!("data-plane command queue full");
        }
        self.bells.ring(nflib::MANAGER_SLOT);
    }

    /// Writes a slot's identity before a process starts in it.
    fn prepare_slot(&self, i: usize) {
        let spec = &self.procs[i].spec;
        let Some(rec) = self.region.slot(spec.slot) else {
            return;
        };
        rec.kind.store(spec.kind.raw(), Ordering::Relaxed);
        rec.name.set(&spec.name);
        rec.core
            .store(spec.core.map(|c| c as i32).unwrap_or(-1), Ordering::Relaxed);
        rec.busy_poll
            .store(spec.busy_poll as u32, Ordering::Relaxed);
        rec.targets.store(spec.targets, Ordering::Relaxed);
        rec.stop.store(0, Ordering::Relaxed);
        rec.sleeping.0.store(0, Ordering::Relaxed);
        rec.generation.fetch_add(1, Ordering::Relaxed);
        rec.set_state(SlotState::Starting);
    }

    fn spawn(&mut self, i: usize) -> Result<()> {
        let spec = &self.procs[i].spec;
        let mut cmd = ProcCommand::new(&spec.binary);
        cmd.args(&spec.args).stdin(Stdio::null());
        prepare_child(&mut cmd, self.bells.raw_fds(), spec.core);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", spec.binary.display()))?;
        let pid = child.id();
        // The pidfd, not `Child`, is how the process is watched and reaped.
        drop(child);
        let pidfd = Arc::new(pidfd_open(pid).context("pidfd_open")?);
        if let Some(rec) = self.region.slot(spec.slot) {
            rec.pid.store(pid, Ordering::Relaxed);
        }
        let slot = spec.slot;
        if let Ok(mut m) = self.pidfds.lock() {
            m.insert(slot, pidfd.clone());
        }
        let p = &mut self.procs[i];
        p.pid = pid;
        p.pidfd = Some(pidfd);
        p.phase = Phase::Starting;
        p.spawned_at = Instant::now();
        p.reached_running = false;
        Ok(())
    }

    fn try_spawn(&mut self, i: usize) {
        if let Err(e) = self.spawn(i) {
            let name = self.procs[i].spec.name.clone();
            self.record(
                &name,
                ProcEventKind::StartFailed,
                format!("failed to start: {e:#}"),
            );
            if let Some(rec) = self.region.slot(self.procs[i].spec.slot) {
                rec.set_state(SlotState::Dead);
            }
            self.procs[i].start_failures += 1;
            self.schedule_restart(i);
        }
    }

    /// Starts every configured process. All slots are marked starting first, so a vswitch
    /// that comes up before its runtimes already sees them as targets.
    pub fn start_all(&mut self) {
        for i in 0..self.procs.len() {
            self.prepare_slot(i);
        }
        for i in 0..self.procs.len() {
            self.try_spawn(i);
        }
    }

    fn schedule_restart(&mut self, i: usize) {
        let p = &mut self.procs[i];
        if self.stopping || self.cfg.supervisor.restart == RestartPolicy::Never {
            p.phase = Phase::Down;
            if let Some(rec) = self.region.slot(p.spec.slot) {
                rec.set_state(SlotState::Failed);
            }
            return;
        }
        // A process that was running is replaced at once; one that keeps failing to start,
        // or keeps dying soon after it did, backs off exponentially. One early death of a
        // process that ran (an operator's kill of a runtime just started) is not a loop.
        let delay = if !p.crash_looping() {
            // Its replicas are taking its flows over: they get the CPU first.
            if p.spec.kind == ProcessKind::Runtime && self.cfg.runtime_replicates(&p.spec.name) {
                Duration::from_millis(self.cfg.supervisor.takeover_before_restart_ms)
                    .saturating_sub(p.died_at.elapsed())
            } else {
                Duration::ZERO
            }
        } else {
            let base = self.cfg.supervisor.restart_backoff_ms;
            let exp = base.saturating_mul(1u64 << (p.start_failures - 1).min(16));
            Duration::from_millis(exp.min(self.cfg.supervisor.max_backoff_ms))
        };
        p.phase = Phase::Backoff;
        p.restart_at = Some(Instant::now() + delay);
        let failures = p.start_failures;
        if p.crash_looping() {
            let name = p.spec.name.clone();
            self.record(
                &name,
                ProcEventKind::CrashLoop,
                format!(
                    "crash loop: {failures} death(s) in a row within {} ms of start; next \
                     start in {} ms",
                    self.cfg.supervisor.stable_after_ms,
                    delay.as_millis()
                ),
            );
        }
    }

    fn on_exit(&mut self, i: usize, code: i32) {
        self.deaths += 1;
        let p = &mut self.procs[i];
        p.pidfd = None;
        p.died_at = Instant::now();
        if let Ok(mut m) = self.pidfds.lock() {
            m.remove(&p.spec.slot);
        }
        let was_running = p.reached_running;
        let stable = Duration::from_millis(self.cfg.supervisor.stable_after_ms);
        if !was_running || p.spawned_at.elapsed() < stable {
            p.start_failures = p.start_failures.saturating_add(1);
        }
        // A new life is judged afresh by the frozen watch.
        p.stuck_since = None;
        p.consumed = 0;
        let slot = p.spec.slot;
        if let Some(rec) = self.region.slot(slot) {
            rec.last_exit.store(code, Ordering::Relaxed);
            let looping = if p.crash_looping() {
                p.start_failures
            } else {
                0
            };
            rec.quick_deaths.store(looping, Ordering::Relaxed);
            rec.set_state(SlotState::Dead);
        }
        p.phase = Phase::Reclaiming;
        let name = p.spec.name.clone();
        let pid = p.pid;
        let when = if was_running {
            ""
        } else {
            " before it was running"
        };
        self.record(
            &name,
            ProcEventKind::Died,
            format!("pid {pid} {}{when}", describe_exit(code)),
        );
        self.send(Command::Reclaim(slot));
    }

    fn handle_event(&mut self, e: PlaneEvent) -> bool {
        match e {
            PlaneEvent::Reclaimed { slot, report } => {
                let Some(i) = self.procs.iter().position(|p| p.spec.slot == slot) else {
                    return true;
                };
                let name = self.procs[i].spec.name.clone();
                self.record(
                    &name,
                    ProcEventKind::Reclaimed,
                    format!(
                        "reclaimed {} buffers ({} queued to it, {} refill, {} held); {} still in flight to others",
                        report.freed(),
                        report.drained_inputs,
                        report.drained_refill,
                        report.owned,
                        report.in_flight
                    ),
                );
                self.schedule_restart(i);
            }
            PlaneEvent::Revived(slot) => {
                if let Some(i) = self.procs.iter().position(|p| p.spec.slot == slot) {
                    if self.procs[i].phase == Phase::Reviving && !self.stopping {
                        self.restarts += 1;
                        if let Some(rec) = self.region.slot(slot) {
                            rec.restarts.fetch_add(1, Ordering::Relaxed);
                        }
                        self.prepare_slot(i);
                        self.try_spawn(i);
                    }
                }
            }
            PlaneEvent::SourcesDone => {
                if self.cfg.manager.exit_when_done {
                    tracing::info!("all sources finished and traffic drained; shutting down");
                    return false;
                }
            }
        }
        true
    }

    /// Time-driven work: running detection, start timeouts, due restarts.
    fn tick(&mut self) {
        let now = Instant::now();
        let start_timeout = Duration::from_millis(self.cfg.supervisor.start_timeout_ms);
        for i in 0..self.procs.len() {
            let slot = self.procs[i].spec.slot;
            match self.procs[i].phase {
                Phase::Starting => {
                    let running = self
                        .region
                        .slot(slot)
                        .map(|r| r.state() == SlotState::Running)
                        .unwrap_or(false);
                    if running {
                        let p = &mut self.procs[i];
                        p.phase = Phase::Running;
                        p.reached_running = true;
                        let (name, pid) = (p.spec.name.clone(), p.pid);
                        self.record(
                            &name,
                            ProcEventKind::Running,
                            format!("running (pid {pid})"),
                        );
                    } else if now.duration_since(self.procs[i].spawned_at) > start_timeout {
                        let name = self.procs[i].spec.name.clone();
                        self.record(
                            &name,
                            ProcEventKind::StartFailed,
                            "did not start in time; killing it".into(),
                        );
                        if let Some(fd) = &self.procs[i].pidfd {
                            pidfd_signal(fd, libc::SIGKILL);
                        }
                        // Its exit is handled like any other death.
                        self.procs[i].spawned_at = now + Duration::from_secs(3600);
                    }
                }
                Phase::Backoff if self.procs[i].restart_at.is_some_and(|t| t <= now) => {
                    self.procs[i].restart_at = None;
                    self.procs[i].phase = Phase::Reviving;
                    self.send(Command::Revive(slot));
                }
                Phase::Running => {
                    let stable = Duration::from_millis(self.cfg.supervisor.stable_after_ms);
                    let p = &mut self.procs[i];
                    if p.start_failures > 0 && now.duration_since(p.spawned_at) >= stable {
                        p.start_failures = 0;
                        if let Some(rec) = self.region.slot(slot) {
                            rec.quick_deaths.store(0, Ordering::Relaxed);
                        }
                    }
                    if p.spec.kind == ProcessKind::Runtime {
                        self.watch_frozen(i, now);
                    } else if p.spec.kind == ProcessKind::Vswitch {
                        self.report_rebuild(i);
                    }
                }
                _ => {}
            }
        }
    }

    /// Reports a vswitch's table rebuild once it is done (its counters say so): how long
    /// dispatch of unknown keys paused and how many flows it learnt.
    fn report_rebuild(&mut self, i: usize) {
        let slot = self.procs[i].spec.slot;
        let Some(rec) = self.region.slot(slot) else {
            return;
        };
        let get = |c: ProcCounter| rec.counters.0[c as usize].load(Ordering::Relaxed);
        let rebuilds = get(ProcCounter::VswitchRebuilds);
        if rebuilds == self.procs[i].rebuilds_seen {
            return;
        }
        self.procs[i].rebuilds_seen = rebuilds;
        let (us, flows) = (
            get(ProcCounter::VswitchRebuildUs),
            get(ProcCounter::VswitchRebuildFlows),
        );
        let name = self.procs[i].spec.name.clone();
        self.record(
            &name,
            ProcEventKind::Rebuilt,
            format!(
                "rebuilt its table from the runtimes: {flows} flows in {:.1} ms (packets of \
                 unknown keys held meanwhile)",
                us as f64 / 1000.0
            ),
        );
    }

    /// Kills a runtime that has packets waiting on its input rings and has taken none for
    /// `frozen_after_ms`: stopped (SIGSTOP) or stuck in a loop, it would hold its flows
    /// hostage; dead, its flows are recovered and it is restarted. An idle runtime (nothing
    /// waiting) is never judged, however long it sleeps.
    fn watch_frozen(&mut self, i: usize, now: Instant) {
        let limit = self.cfg.supervisor.frozen_after_ms;
        if limit == 0 {
            return;
        }
        let slot = self.procs[i].spec.slot;
        let (mut consumed, mut waiting) = (0u32, 0u32);
        for from in 0..self.region.slot_count() {
            if let Some(r) = self.region.ring::<Desc>(RingId::Data { from, to: slot }) {
                consumed = consumed.wrapping_add(r.consumed());
                waiting += r.occupancy();
            }
        }
        let p = &mut self.procs[i];
        if waiting == 0 || consumed != p.consumed {
            p.consumed = consumed;
            p.stuck_since = None;
            return;
        }
        let pid = p.pid;
        if p.stuck_since.is_none() {
            p.stuck_since = Some(now);
            p.cpu_at_stuck = proc_stat(pid).map_or(0, |(_, cpu)| cpu);
            return;
        }
        let since = p.stuck_since.unwrap_or(now);
        let stuck = now.duration_since(since);
        if stuck < Duration::from_millis(limit) {
            return;
        }
        // Frozen means stopped (SIGSTOP: state T) or spinning without progress (it had the
        // CPU for at least half the time and took no packet). A runtime that merely did not
        // get the CPU (a starved machine) is not frozen: it is watched afresh.
        let ticks_per_s = {
            // SAFETY: sysconf has no preconditions.
            let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
            if t > 0 {
                t as u64
            } else {
                100
            }
        };
        let frozen = match proc_stat(pid) {
            Some(('T' | 't', _)) => true,
            Some((_, cpu)) => {
                let used_ms = cpu.saturating_sub(p.cpu_at_stuck) * 1000 / ticks_per_s;
                used_ms * 2 >= stuck.as_millis() as u64
            }
            None => false,
        };
        p.stuck_since = None;
        if !frozen {
            return;
        }
        let name = p.spec.name.clone();
        if let Some(fd) = &p.pidfd {
            pidfd_signal(fd, libc::SIGKILL);
        }
        self.record(
            &name,
            ProcEventKind::Frozen,
            format!(
                "frozen: {waiting} packets waited {} ms without it taking one; killed (pid {pid})",
                stuck.as_millis()
            ),
        );
    }

    fn next_deadline(&self) -> Duration {
        let now = Instant::now();
        let mut d = Duration::from_millis(200);
        // The frozen-runtime watch looks a few times per limit.
        let frozen = self.cfg.supervisor.frozen_after_ms;
        if frozen > 0 {
            d = d.min(Duration::from_millis((frozen / 5).max(10)));
        }
        for p in &self.procs {
            if p.phase == Phase::Starting {
                d = d.min(Duration::from_millis(5));
            }
            if let Some(t) = p.restart_at {
                d = d.min(t.saturating_duration_since(now));
            }
        }
        d
    }

    /// Runs until a termination signal, or until sources finish with `exit_when_done`.
    /// `on_tick` is called about once per stats interval (live rates).
    pub fn run(&mut self, mut on_tick: impl FnMut(&Region)) {
        let interval = Duration::from_millis(self.cfg.manager.stats_interval_ms);
        let mut last_tick = Instant::now();
        loop {
            let watched: Vec<usize> = (0..self.procs.len())
                .filter(|i| self.procs[*i].pidfd.is_some())
                .collect();
            let timeout = self
                .next_deadline()
                .min(interval.saturating_sub(last_tick.elapsed()));
            let (signalled, bell, exited) = {
                let mut fds = vec![
                    PollFd::new(self.signals.as_fd(), PollFlags::POLLIN),
                    PollFd::new(self.event_bell.as_fd(), PollFlags::POLLIN),
                ];
                for &i in &watched {
                    if let Some(fd) = &self.procs[i].pidfd {
                        fds.push(PollFd::new(fd.as_fd(), PollFlags::POLLIN));
                    }
                }
                let ms = PollTimeout::from(timeout.as_millis().min(60_000) as u16);
                let _ = poll(&mut fds, ms);
                let ready = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
                let exited: Vec<usize> = watched
                    .iter()
                    .zip(&fds[2..])
                    .filter(|(_, f)| ready(f))
                    .map(|(i, _)| *i)
                    .collect();
                (ready(&fds[0]), ready(&fds[1]), exited)
            };
            if signalled && self.take_signal() {
                tracing::info!("termination signal received; shutting down");
                return;
            }
            for i in exited {
                let code = self.procs[i].pidfd.as_deref().and_then(reap);
                if let Some(code) = code {
                    self.on_exit(i, code);
                }
            }
            if bell {
                let _ = self.event_bell.read();
            }
            while let Some(e) = self.events.try_pop() {
                if !self.handle_event(e) {
                    return;
                }
            }
            self.tick();
            if last_tick.elapsed() >= interval {
                last_tick = Instant::now();
                on_tick(&self.region);
            }
        }
    }

    /// Reads one pending signal; true if it asks nfmgr to stop.
    fn take_signal(&mut self) -> bool {
        match self.signals.read_signal() {
            Ok(Some(info)) => matches!(
                Signal::try_from(info.ssi_signo as i32),
                Ok(Signal::SIGINT | Signal::SIGTERM)
            ),
            _ => false,
        }
    }

    /// Stops every process: asks nicely (stop flag, doorbell, SIGTERM), waits, then SIGKILLs.
    /// Returns once all are reaped and their slots reclaimed by the data plane.
    pub fn stop_all(&mut self) {
        self.stopping = true;
        self.region.header().set_state(RegionState::ShuttingDown);
        for p in &self.procs {
            if let Some(rec) = self.region.slot(p.spec.slot) {
                rec.stop.store(1, Ordering::Release);
                if rec.state().is_alive() {
                    rec.set_state(SlotState::Stopping);
                }
            }
            self.bells.ring(p.spec.slot);
            if let Some(fd) = &p.pidfd {
                pidfd_signal(fd, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + Duration::from_millis(self.cfg.supervisor.stop_timeout_ms);
        let mut killed = false;
        loop {
            for i in 0..self.procs.len() {
                let code = self.procs[i].pidfd.as_deref().and_then(reap);
                if let Some(code) = code {
                    self.procs[i].pidfd = None;
                    if let Ok(mut m) = self.pidfds.lock() {
                        m.remove(&self.procs[i].spec.slot);
                    }
                    self.procs[i].phase = Phase::Down;
                    if let Some(rec) = self.region.slot(self.procs[i].spec.slot) {
                        rec.last_exit.store(code, Ordering::Relaxed);
                        rec.set_state(SlotState::Dead);
                    }
                }
            }
            if self.procs.iter().all(|p| p.pidfd.is_none()) {
                break;
            }
            if !killed && Instant::now() >= deadline {
                for p in &self.procs {
                    if let Some(fd) = &p.pidfd {
                        tracing::warn!(process = %p.spec.name, "did not stop in time; SIGKILL");
                        pidfd_signal(fd, libc::SIGKILL);
                    }
                }
                killed = true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        for i in 0..self.procs.len() {
            let slot = self.procs[i].spec.slot;
            self.send(Command::Reclaim(slot));
        }
    }

    /// Stops the data plane (after `stop_all`: every slot is reclaimed first).
    pub fn shutdown_dataplane(&mut self) {
        self.send(Command::Shutdown);
    }
}

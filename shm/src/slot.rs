//! The process directory: one record per slot, describing the process that runs in it.
//!
//! Slot 0 is nfmgr. nfmgr writes a slot's identity (kind, name, core, doorbell, targets) while
//! the slot is not running, then the state machine below moves it along. The process in the
//! slot writes only its own counters, its `sleeping` flag and the `Running` state.
//!
//! ```text
//! Free -> Starting (nfmgr, before spawn) -> Running (the process, once attached)
//!      -> Dead (nfmgr, after reaping it) -> Starting (restart) | Failed (given up)
//! Running -> Stopping (nfmgr asks it to exit) -> Dead
//! ```

use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering};

/// Which kind of process a slot holds (a protocol type: the cluster view names it too).
pub use nf_proto::cluster::ProcessKind;

use crate::stats::{Padded, ShmName, PROC_COUNTERS};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SlotState {
    Free,
    Starting,
    Running,
    Stopping,
    Dead,
    Failed,
}

impl SlotState {
    pub fn from_raw(v: u32) -> SlotState {
        match v {
            1 => SlotState::Starting,
            2 => SlotState::Running,
            3 => SlotState::Stopping,
            4 => SlotState::Dead,
            5 => SlotState::Failed,
            _ => SlotState::Free,
        }
    }

    pub fn raw(self) -> u32 {
        match self {
            SlotState::Free => 0,
            SlotState::Starting => 1,
            SlotState::Running => 2,
            SlotState::Stopping => 3,
            SlotState::Dead => 4,
            SlotState::Failed => 5,
        }
    }

    /// Whether a process may be consuming this slot's input rings.
    pub fn is_alive(self) -> bool {
        matches!(
            self,
            SlotState::Starting | SlotState::Running | SlotState::Stopping
        )
    }
}

/// One entry of the process directory.
#[repr(C, align(64))]
pub struct SlotRecord {
    pub state: AtomicU32,
    pub kind: AtomicU32,
    /// Incremented by nfmgr each time a process is started in the slot.
    pub generation: AtomicU32,
    pub pid: AtomicU32,
    /// CPU the process is pinned to, or -1.
    pub core: AtomicI32,
    /// The slot's eventfd, as numbered in nfmgr and every process it spawned.
    pub doorbell_fd: AtomicI32,
    /// Set by nfmgr to ask the process to exit cleanly.
    pub stop: AtomicU32,
    /// 1 when the process busy-polls instead of sleeping.
    pub busy_poll: AtomicU32,
    /// Bit mask of the slots this process sends data to (a vswitch's runtimes).
    pub targets: AtomicU64,
    /// How many times nfmgr restarted the process in this slot.
    pub restarts: AtomicU32,
    /// Last exit: exit code when >= 0, minus the signal number when < 0.
    pub last_exit: AtomicI32,
    /// Deaths in a row, each soon after its start (`supervisor.stable_after_ms`): a crash
    /// loop, restarted with growing delays. 0 once a life has lasted.
    pub quick_deaths: AtomicU32,
    /// The last transport session a process in this slot used; each new one starts above it
    /// (see `Endpoint::new_session`), so peers can tell a restarted process from a late
    /// frame even if the wall clock stepped back.
    pub session: AtomicU64,
    pub name: ShmName,
    /// Set by the process before it sleeps on its doorbell; producers check it after
    /// publishing (see `doorbell`).
    pub sleeping: Padded<AtomicU32>,
    /// Until this monotonic time (ns) the process keeps polling instead of sleeping: set by
    /// a peer that is about to exchange a burst of messages with it (a migration's steps),
    /// so each step does not pay for waking a sleeping process (hundreds of microseconds on
    /// a virtual machine whose idle vCPU halts).
    pub awake_until_ns: Padded<AtomicU64>,
    /// Packets producers could not queue to this process because its ring was full. Written
    /// by the producers (the one counter here with several writers), read as the overload
    /// signal.
    pub input_drops: Padded<AtomicU64>,
    pub counters: Padded<[AtomicU64; PROC_COUNTERS]>,
}

impl SlotRecord {
    pub fn state(&self) -> SlotState {
        SlotState::from_raw(self.state.load(Ordering::Acquire))
    }

    /// Whether a peer asked this slot's process to keep polling (`Endpoint::keep_awake`)
    /// until a time not yet passed.
    pub fn kept_awake(&self) -> bool {
        let until = self.awake_until_ns.0.load(Ordering::Acquire);
        until != 0 && crate::time::mono_ns() < until
    }

    pub fn set_state(&self, s: SlotState) {
        self.state.store(s.raw(), Ordering::Release);
    }

    pub fn kind(&self) -> ProcessKind {
        ProcessKind::from_raw(self.kind.load(Ordering::Acquire))
    }

    pub fn targets(&self) -> u64 {
        self.targets.load(Ordering::Acquire)
    }
}

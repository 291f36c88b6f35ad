//! The actor messages of the platform. Each travels as the postcard payload of actor frames
//! (`wire`), delivered by the reliable transport (`reliable`) to an actor of an endpoint:
//! the liaison (actor 0) of a runtime, the dispatcher of a vswitch, nfmgr's control endpoint,
//! or a flow actor.

use serde::{Deserialize, Serialize};

use crate::cluster::{ClusterView, FlowInfo, ProbeReport, Workload};
use crate::frame::EndpointAddr;
use nf_packet::flow::FlowKey;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// runtime -> vswitch: packets with these keys belong to flows the sender holds (a
    /// function rewrote their addresses); dispatch them to it. Each key comes with the id of
    /// the flow that registered it, echoed if the key is refused. A key that is another
    /// live runtime's alias is refused, not taken over (a key the vswitch merely dispatched
    /// there, a stray packet's, is taken over). The vswitch answers `AliasesAdded` when
    /// `request` is not 0 (the runtime holds the packets that made the aliases until then,
    /// so that a translated flow's first reply always finds its way back), and whenever it
    /// refuses a key.
    AddAliases {
        aliases: Vec<(FlowKey, u64)>,
        request: u64,
    },
    /// vswitch -> runtime: the aliases of `request` are in place, but for `refused` (keys
    /// that are another runtime's aliases, with the ids of the flows that asked for them).
    AliasesAdded {
        request: u64,
        refused: Vec<(FlowKey, u64)>,
    },
    /// runtime -> vswitch: flows ended; forget their `keys` and `aliases`. A key the vswitch
    /// gave the runtime a packet under in the last `idle_ms / 2` is kept: the flows ended
    /// after at least `idle_ms` without a packet, so that packet is a new flow's (a port
    /// reused) that the runtime already holds.
    FlowEnded {
        keys: Vec<FlowKey>,
        aliases: Vec<FlowKey>,
        idle_ms: u32,
    },
    /// -> vswitch: send the flows with these keys, now sent to `from`, to `runtime` from now
    /// on (migration, recovery). A key sent to neither is left alone: it is a third
    /// runtime's. Answered with `RuntimeSet`.
    SetRuntime {
        keys: Vec<FlowKey>,
        from: EndpointAddr,
        runtime: EndpointAddr,
        /// Echoed in the answer.
        request: u64,
    },
    /// vswitch -> requester: done for `moved` of the keys (the others were unknown, sent to
    /// a third runtime, or the runtime is not one the vswitch dispatches to). `sent[i]` is how many packets under
    /// `keys[i]` the vswitch gave the key's previous runtime since that runtime was set
    /// (wrapping; 0 for an unknown key): migration counts them to know when every packet
    /// sent before the switch has been processed.
    RuntimeSet {
        request: u64,
        moved: u32,
        sent: Vec<u32>,
        /// For a recovery's request (`RECOVERY_REQUEST`), the keys that did not move: the
        /// vswitch knows none such, or gives it to a third runtime (a migration moved the
        /// flow away before its source died). Those copies are not the requester's to make
        /// live.
        unmoved: Vec<FlowKey>,
    },
    /// Migration step 1, source runtime -> target's liaison: get ready to take these flows
    /// (create migration target actors that buffer their packets). Answered `MigrateReady`.
    MigrateInit {
        group: u64,
        /// The chain the flows run; the target must run the same one.
        chain: Option<String>,
        /// The vswitch that feeds the flows.
        vswitch: EndpointAddr,
        flows: Vec<MigrateFlow>,
    },
    /// target -> source: which flows of the group it took (`accepted[i]` for `flows[i]`), or
    /// why it took none (`busy`: its migration buffer is filling; try again later).
    MigrateReady {
        group: u64,
        accepted: Vec<bool>,
        refused: Option<String>,
        busy: bool,
    },
    /// Migration step 3, source -> target: the flows' states; the target installs them,
    /// processes what it buffered and answers `MigrateDone`.
    MigrateState {
        group: u64,
        /// [`keys_digest`] of the flows the target accepted, in order: what
        /// `FlowState::idx` counts. A target whose group has other flows installs none.
        accepted_digest: u64,
        flows: Vec<FlowState>,
        /// The flows' functions' states, back to back in the order of `flows`, each flow's
        /// `FlowState::states_len` bytes in the layout of [`states`]. One buffer for the
        /// group, so neither side allocates per flow.
        #[serde(with = "byte_string")]
        states: Vec<u8>,
    },
    /// target -> source: `installed[i]` for `MigrateState::flows[i]`; `buffered` packets
    /// were held and processed, `dropped` could not be held (buffer full).
    MigrateDone {
        group: u64,
        installed: Vec<bool>,
        buffered: u32,
        dropped: u32,
    },
    /// source -> target: the migration of the group is off; return what you buffered
    /// (as `MigratePackets`) and forget the flows that have no state yet.
    MigrateAbort {
        group: u64,
    },
    /// target -> source, after the returned packets: `owned` flows had their state
    /// installed already and stay with the target.
    MigrateAborted {
        group: u64,
        returned: u32,
        owned: Vec<FlowKey>,
    },
    /// Packets of a migrating flow carried between runtimes: stragglers the source received
    /// after handing the state over (`late`), or packets a target returns on abort.
    MigratePackets {
        group: u64,
        late: bool,
        packets: Vec<MovedPacket>,
    },
    /// -> a liaison: are you there? Answered with `Pong` and the live flow count.
    Ping {
        seq: u64,
    },
    Pong {
        seq: u64,
        flows: u64,
    },
    /// A control call (paper Table 2) to a liaison, answered with `RpcReply` of the same id.
    Rpc {
        id: u64,
        call: Call,
    },
    RpcReply {
        id: u64,
        reply: Reply,
    },
    /// Test traffic between liaisons (`nfmgr msgtest`): numbered, stamped, padded.
    Probe {
        run: u64,
        seq: u64,
        sent_ns: u64,
        #[serde(with = "byte_string")]
        pad: Vec<u8>,
    },
    /// source -> the address of a target that died in step 2 or 3, once the vswitch points
    /// back at the source: a later incarnation there may have created actors for these
    /// flows from packets the vswitch sent before pointing back. They are strays: remove
    /// them, and send what still arrives for the flows back to the source for a while.
    MigrateForget {
        group: u64,
        vswitch: EndpointAddr,
        flows: Vec<MigrateFlow>,
    },
    /// primary -> replica: what changed in the primary's flows since its last `Replicate`
    /// to this replica (one message per flush and replica; docs/REPLICATION.md).
    /// `incarnation` names the primary's process life (its slot generation): flows of an
    /// earlier life are the ones `Recover` promotes. `version` counts this primary's
    /// messages to this replica from 1 within an incarnation.
    Replicate {
        incarnation: u64,
        version: u64,
        flows: Vec<ReplicaFlow>,
        /// The changed functions' states of every flow, back to back, in the layout of
        /// `states` (a flow's part is `ReplicaFlow::states_len` bytes).
        #[serde(with = "byte_string")]
        states: Vec<u8>,
        /// Flows (by id) that ended at the primary.
        ended: Vec<u64>,
    },
    /// runtime -> runtime: flows that started at the receiver (their *home*: what they hold
    /// of the functions' resources, a NAT port, is from its share) and live on at the
    /// sender. Per flow, in order: keep its resources reserved (`true`: the sender took it
    /// over, or the receiver asked with `HoldsQuery`), or free them (`false`: it ended at
    /// the sender). Each flow's part of `states` is its length's bytes, laid out as in
    /// `states`.
    Holds {
        flows: Vec<(bool, u32)>,
        #[serde(with = "byte_string")]
        states: Vec<u8>,
    },
    /// runtime -> runtime: a runtime that has just started asks for the `Holds` of flows an
    /// earlier life at its address started that live on at the receiver.
    HoldsQuery,
    /// replica -> primary: every `Replicate` up to `version` is applied, but for the flows
    /// in `refused` (the replica's table was full) and in `missing` (changes to a flow it
    /// does not hold, or whose copy was malformed: the primary sends them whole again).
    Replicated {
        incarnation: u64,
        version: u64,
        refused: Vec<u64>,
        missing: Vec<u64>,
    },
    /// vswitch -> runtime: a vswitch that has just started (after a crash: its table was in
    /// the dead process) asks for the flows the receiver holds that the sender feeds, to
    /// dispatch their packets where they were, not afresh. Answered with `Feeds`.
    FeedQuery {
        request: u64,
    },
    /// runtime -> vswitch: flows of the receiver's that the sender holds: their keys and
    /// their aliases, in as many messages as they need; the last one says `done`.
    Feeds {
        request: u64,
        keys: Vec<FlowKey>,
        aliases: Vec<FlowKey>,
        done: bool,
    },
    /// vswitch -> runtime: keys its takeover asked for and could not have then (another
    /// runtime held them: a migration's target) are its now, given back by that runtime
    /// (its migration's source died before sending the state). The receiver makes their
    /// copies live.
    KeysGiven {
        keys: Vec<FlowKey>,
    },
}

/// One flow's change in a `Replicate`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaFlow {
    /// The flow's id at the primary.
    pub id: u64,
    /// Present when the replica is to (re)create the flow: everything it needs besides the
    /// states. Every function's state then follows (`changed` has every bit).
    pub new: Option<ReplicaNew>,
    /// The flow's aliases, when they changed (all of them).
    pub aliases: Option<Vec<FlowKey>>,
    /// Platform flags (direction, TCP close state).
    pub flags: u8,
    /// Packets the primary ran through the chain for this flow (wrapping).
    pub packets: u32,
    /// Bit `i`: function `i`'s state follows in this flow's part (tagged as in `states`);
    /// the others are unchanged.
    pub changed: u8,
    pub states_len: u32,
}

/// What a replica needs to create a flow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaNew {
    pub key: FlowKey,
    /// The vswitch that feeds the flow (recovery asks it to re-point the flow).
    pub vswitch: EndpointAddr,
    pub age_ms: u32,
    /// The runtime that started the flow (its resources are from that runtime's share).
    pub home: EndpointAddr,
}

/// Control calls a liaison answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Call {
    /// The runtime's load (for scaling decisions).
    PollWorkload,
    /// The current cluster view.
    NotifyClusterCfg(ClusterView),
    /// Migrate `count` flows to `target`.
    SetMigrationTarget { target: EndpointAddr, count: u32 },
    /// To a migration's target, before its source is told to start: are you there? Poll
    /// rather than sleep for `awake_ms` (and have this server's nfmgr do so too when
    /// `source` is on another server), so that the first step of the migration does not
    /// start with two wake-ups in a row; meet `source` (a ping); make room for about
    /// `flows` flows. Refused only when `source` is the target itself: whether the target
    /// takes each flow is step 1's answer, and nfmgr checks the chains beforehand.
    PrepareMigration {
        source: EndpointAddr,
        awake_ms: u32,
        flows: u32,
    },
    /// Replicate flows to these runtimes. `epoch`: the epoch of the view the placement
    /// was computed from; a runtime that follows a later coordinator life refuses it.
    SetReplica {
        replicas: Vec<EndpointAddr>,
        epoch: u64,
    },
    /// Take over the flows replicated here from `failed`'s lives up to `incarnation` (its
    /// slot generation when it died; `u64::MAX` for every life, when its server died).
    /// Answered `Recovered` once the flows are live here and the vswitches are asked to
    /// re-point them. `epoch`: the epoch of the view of the nfmgr that orders it; an order
    /// of an earlier coordinator life than the one the runtime follows is refused.
    Recover {
        failed: EndpointAddr,
        incarnation: u64,
        epoch: u64,
    },
    /// Up to `limit` of the runtime's flows.
    ListFlows { limit: u32 },
    /// Send `count` probe messages of `size` payload bytes to the liaison of `to`, with at
    /// most `depth` unacknowledged at a time (0: as many as the send window holds). Depth 1
    /// measures latency without queueing; the window measures throughput.
    StartProbe {
        to: EndpointAddr,
        run: u64,
        count: u64,
        size: u32,
        depth: u32,
    },
    /// This liaison's side of a probe run.
    ProbeStatus { run: u64 },
    /// The last migration job this runtime ran as a source (started by
    /// `SetMigrationTarget`).
    MigrationStatus,
    /// Failover drill: the target's nfmgr kills it with SIGKILL (`by` names who asked, for
    /// the event log). Handled by nfmgr; it never reaches the process.
    Kill { by: String },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    Workload(Workload),
    ClusterCfgApplied {
        version: u64,
    },
    /// The call was taken (its effect follows).
    Accepted,
    Refused {
        reason: String,
    },
    Flows {
        total: u64,
        flows: Vec<FlowInfo>,
    },
    Probe(ProbeReport),
    Migration(MigrationReport),
    /// `Recover`: flows taken over, and copies that could not be installed.
    Recovered {
        flows: u64,
        lost: u64,
    },
}

/// The bit a `SetRuntime` request carries when recovery, not migration, sent it: the
/// answer then goes to the liaison.
pub const RECOVERY_REQUEST: u64 = 1 << 63;

/// The bit a `SetRuntime` request carries when a migration's target gives flows back to
/// their source, which died before sending their state: the vswitch sends each to the
/// replica whose takeover of that source claimed it, if one did, else to the source.
pub const HAND_BACK_REQUEST: u64 = 1 << 61;

/// A flow named in migration step 1.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrateFlow {
    pub key: FlowKey,
    pub aliases: Vec<FlowKey>,
}

/// A digest of flow keys in order, the same in every process: source and target check
/// with it that they count a group's flows alike before states are matched by position.
pub fn keys_digest<'a>(keys: impl IntoIterator<Item = &'a FlowKey>) -> u64 {
    use std::hash::BuildHasher;
    let hasher = foldhash::fast::FixedState::with_seed(0x6d69_6772_6174_6531);
    keys.into_iter().fold(0x9e37_79b9_7f4a_7c15, |d, k| {
        (d ^ hasher.hash_one(k)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Everything a runtime keeps about a flow, moved in migration step 3 (its functions'
/// states travel beside it, in `MigrateState::states`).
///
/// The flow is named by its place among the flows the target accepted in step 1 (the
/// `true`s of `MigrateReady::accepted`, in order), not by its key: the target already
/// holds the key there, and a key is a quarter of what step 3 would otherwise carry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowState {
    /// Index into the flows the target accepted for this group.
    pub idx: u32,
    /// Platform flags (direction, TCP close state).
    pub flags: u8,
    pub age_ms: u64,
    pub idle_ms: u64,
    /// Packets of the flow the vswitch sent before the switch that the source had not
    /// received when it sent this (they follow as late stragglers, or were lost on the way).
    pub missing: u32,
    /// The length of this flow's part of `MigrateState::states`.
    pub states_len: u32,
    /// The runtime that started the flow (its resources are from that runtime's share).
    pub home: EndpointAddr,
}

/// The layout of a flow's functions' states in `MigrateState::states`: for each function
/// of the chain, in chain order, a tag, then the tag's bytes of serialised state. The tag
/// is an unsigned LEB128 varint: 0 when the function holds no state for the flow, else the
/// state's length plus one. States are small (a firewall's verdict, a monitor's counters),
/// so a tag is almost always one byte. Written straight into the message's buffer and
/// read in place.
pub mod states {
    /// Longest tag: 5 bytes of 7 bits hold any `u32`.
    const MAX_TAG: usize = 5;

    /// Appends one function's state, which `write` appends to the buffer it is given and
    /// returns true for, or returns false (with the buffer as it found it) for no state.
    pub fn push(out: &mut Vec<u8>, write: impl FnOnce(&mut Vec<u8>) -> bool) {
        // One byte for the tag, which fits every state under 127 bytes; a longer one moves
        // its bytes up to make room.
        let at = out.len();
        out.push(0);
        let start = out.len();
        if !write(out) {
            out.truncate(start);
            out[at] = 0;
            return;
        }
        // A state of 4 GiB cannot be a message; such a one reads back as malformed.
        let tag = u32::try_from(out.len() - start)
            .ok()
            .and_then(|n| n.checked_add(1))
            .unwrap_or(u32::MAX);
        let mut buf = [0u8; MAX_TAG];
        let n = encode_tag(tag, &mut buf);
        if n > 1 {
            let len = out.len();
            out.resize(len + n - 1, 0);
            out.copy_within(start..len, start + n - 1);
        }
        out[at..at + n].copy_from_slice(&buf[..n]);
    }

    fn encode_tag(mut v: u32, buf: &mut [u8; MAX_TAG]) -> usize {
        let mut n = 0;
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                buf[n] = b;
                return n + 1;
            }
            buf[n] = b | 0x80;
            n += 1;
        }
    }

    /// The states of one flow's part, function by function.
    pub struct Reader<'a> {
        rest: &'a [u8],
    }

    /// A flow's part of the states ends in the middle of a state or of a tag, or has a tag
    /// no `u32` holds.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Malformed;

    impl<'a> Reader<'a> {
        pub fn new(part: &'a [u8]) -> Reader<'a> {
            Reader { rest: part }
        }

        fn tag(&mut self) -> Result<u32, Malformed> {
            let mut v = 0u64;
            for (i, b) in self.rest.iter().take(MAX_TAG).enumerate() {
                v |= u64::from(b & 0x7f) << (7 * i);
                if b & 0x80 == 0 {
                    self.rest = &self.rest[i + 1..];
                    return u32::try_from(v).map_err(|_| Malformed);
                }
            }
            Err(Malformed)
        }

        /// The next function's state (`None`: it has none for the flow).
        pub fn next_state(&mut self) -> Result<Option<&'a [u8]>, Malformed> {
            let len = match self.tag()? {
                0 => return Ok(None),
                t => (t - 1) as usize,
            };
            if self.rest.len() < len {
                return Err(Malformed);
            }
            let (state, rest) = self.rest.split_at(len);
            self.rest = rest;
            Ok(Some(state))
        }

        /// Every state has been read.
        pub fn is_done(&self) -> bool {
            self.rest.is_empty()
        }
    }
}

/// A byte vector as one byte string (a length and the bytes), not as a sequence of numbers
/// element by element as serde's default for `Vec<u8>` would: encoding and decoding it is
/// then a copy instead of a call per byte.
mod byte_string {
    use serde::de::{Deserializer, SeqAccess, Visitor};
    use serde::Serializer;

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
            // Self-describing formats (JSON in diagnostics) write bytes as a sequence.
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Vec<u8>, A::Error> {
                let mut v = Vec::with_capacity(a.size_hint().unwrap_or(0).min(4096));
                while let Some(b) = a.next_element()? {
                    v.push(b);
                }
                Ok(v)
            }
        }
        d.deserialize_bytes(V)
    }
}

/// A data packet carried inside a message (`MigratePackets`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MovedPacket {
    pub ingress: u8,
    pub egress: u8,
    /// The server and vswitch slot it entered the cluster at.
    pub origin_server: u16,
    pub origin_vswitch: u8,
    #[serde(with = "byte_string")]
    pub frame: Vec<u8>,
}

/// A migration job as the source reports it (`nfmgr migrate`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationReport {
    pub job: u64,
    pub target: Option<EndpointAddr>,
    /// Flows asked for (`u32::MAX`: all).
    pub requested: u32,
    pub moved: u64,
    /// Flows the target refused or that rolled back.
    pub failed: u64,
    pub groups: u64,
    pub groups_rolled_back: u64,
    /// Microseconds from the call to the last flow handed over (so far, while running).
    pub elapsed_us: u64,
    pub done: bool,
    /// Packets the targets held while flows moved, and could not hold (lost).
    pub buffered: u64,
    pub buffer_drops: u64,
    /// Packets that reached the source after their flow's state left (processed by the
    /// target after its buffer: out of order).
    pub late_stragglers: u64,
    /// Packets processed by the source while it waited for stragglers.
    pub stragglers_waited: u64,
    pub error: Option<String>,
}

impl Message {
    /// The number frames carry in their header for this message (counters, captures).
    pub fn type_id(&self) -> u16 {
        match self {
            Message::AddAliases { .. } => 1,
            Message::FlowEnded { .. } => 2,
            Message::SetRuntime { .. } => 3,
            Message::RuntimeSet { .. } => 4,
            Message::Ping { .. } => 5,
            Message::Pong { .. } => 6,
            Message::Rpc { .. } => 7,
            Message::RpcReply { .. } => 8,
            Message::Probe { .. } => 9,
            Message::MigrateInit { .. } => 10,
            Message::MigrateReady { .. } => 11,
            Message::MigrateState { .. } => 12,
            Message::MigrateDone { .. } => 13,
            Message::MigrateAbort { .. } => 14,
            Message::MigrateAborted { .. } => 15,
            Message::MigratePackets { .. } => 16,
            Message::MigrateForget { .. } => 17,
            Message::AliasesAdded { .. } => 18,
            Message::Replicate { .. } => 19,
            Message::Replicated { .. } => 20,
            Message::Holds { .. } => 21,
            Message::HoldsQuery => 22,
            Message::FeedQuery { .. } => 23,
            Message::Feeds { .. } => 24,
            Message::KeysGiven { .. } => 25,
        }
    }

    /// A message of the migration protocol (handled by a runtime's migrator, not its
    /// liaison).
    pub fn is_migration(&self) -> bool {
        matches!(
            self,
            Message::MigrateInit { .. }
                | Message::MigrateReady { .. }
                | Message::RuntimeSet { .. }
                | Message::MigrateState { .. }
                | Message::MigrateDone { .. }
                | Message::MigrateAbort { .. }
                | Message::MigrateAborted { .. }
                | Message::MigratePackets { .. }
                | Message::MigrateForget { .. }
        )
    }

    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), postcard::Error> {
        out.clear();
        let bytes = postcard::to_extend(self, std::mem::take(out))?;
        *out = bytes;
        Ok(())
    }

    pub fn decode(bytes: &[u8]) -> Result<Message, postcard::Error> {
        postcard::from_bytes(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_garbage_is_an_error() {
        let m = Message::Rpc {
            id: 7,
            call: Call::SetMigrationTarget {
                target: EndpointAddr::new(2, 4),
                count: 100,
            },
        };
        let mut buf = Vec::new();
        m.encode(&mut buf).unwrap();
        assert_eq!(Message::decode(&buf).unwrap(), m);
        assert!(Message::decode(&[0xff, 0xff, 0xff]).is_err());
        assert!(Message::decode(&[]).is_err());
    }

    #[test]
    fn states_read_back_as_written_and_a_short_part_is_an_error() {
        let mut blob = Vec::new();
        states::push(&mut blob, |out| {
            out.extend_from_slice(b"fw");
            true
        });
        states::push(&mut blob, |out| {
            out.push(9); // written, then given up: must leave nothing behind
            out.pop();
            false
        });
        states::push(&mut blob, |_| true); // an empty state is not "no state"
        let mut r = states::Reader::new(&blob);
        assert_eq!(r.next_state(), Ok(Some(&b"fw"[..])));
        assert_eq!(r.next_state(), Ok(None));
        assert_eq!(r.next_state(), Ok(Some(&b""[..])));
        assert!(r.is_done());
        assert_eq!(r.next_state(), Err(states::Malformed));
        // One byte of tag each: 2 + "fw", 0, 1.
        assert_eq!(blob.len(), 5);
        for cut in [1, 2] {
            let mut r = states::Reader::new(&blob[..cut]);
            assert_eq!(r.next_state(), Err(states::Malformed), "cut at {cut}");
        }
    }

    #[test]
    fn long_states_take_longer_tags_and_bad_tags_are_malformed() {
        for len in [126usize, 127, 128, 300, 20_000] {
            let state: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut blob = vec![0xaa]; // what the buffer held before stays
            states::push(&mut blob, |out| {
                out.extend_from_slice(&state);
                true
            });
            states::push(&mut blob, |out| {
                out.push(5);
                true
            });
            let tag_len = if len + 1 < 128 {
                1
            } else if len + 1 < 1 << 14 {
                2
            } else {
                3
            };
            assert_eq!(blob.len(), 1 + tag_len + len + 2, "len {len}");
            let mut r = states::Reader::new(&blob[1..]);
            assert_eq!(r.next_state(), Ok(Some(&state[..])), "len {len}");
            assert_eq!(r.next_state(), Ok(Some(&[5u8][..])));
            assert!(r.is_done());
        }
        // Six continuation bytes, and a tag beyond u32: both refused, never a panic.
        let mut r = states::Reader::new(&[0x80, 0x80, 0x80, 0x80, 0x80, 0x01]);
        assert_eq!(r.next_state(), Err(states::Malformed));
        let mut r = states::Reader::new(&[0xff, 0xff, 0xff, 0xff, 0x7f]);
        assert_eq!(r.next_state(), Err(states::Malformed));
    }

    #[test]
    fn bulk_bytes_travel_as_byte_strings() {
        let m = Message::MigrateState {
            group: 3,
            accepted_digest: 9,
            flows: vec![FlowState {
                idx: 0,
                flags: 1,
                age_ms: 5,
                idle_ms: 6,
                missing: 0,
                states_len: 300,
                home: EndpointAddr::new(1, 2),
            }],
            states: vec![7; 300],
        };
        let mut buf = Vec::new();
        m.encode(&mut buf).unwrap();
        assert_eq!(Message::decode(&buf).unwrap(), m);
        // A length and the bytes: not one varint per byte (which would be the same here,
        // but 2 bytes each for values above 127).
        let p = Message::MigratePackets {
            group: 1,
            late: false,
            packets: vec![MovedPacket {
                ingress: 0,
                egress: 1,
                origin_server: 1,
                origin_vswitch: 1,
                frame: vec![0xff; 1000],
            }],
        };
        p.encode(&mut buf).unwrap();
        assert!(buf.len() < 1100, "{} bytes", buf.len());
        assert_eq!(Message::decode(&buf).unwrap(), p);
    }
}

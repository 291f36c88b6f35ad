//! The actor messages of the platform. Each travels as the postcard payload of actor frames
//! (`wire`), delivered by the reliable transport (`reliable`) to an actor of an endpoint:
//! the liaison (actor 0) of a runtime, the dispatcher of a vswitch, nfmgr's control endpoint,
//! or a flow actor.

use serde::{Deserialize, Serialize};

use crate::cluster::{ClusterView, FlowInfo, ProbeReport, Workload};
use crate::flow::FlowKey;
use crate::wire::EndpointAddr;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// runtime -> vswitch: packets with these keys belong to flows the sender holds (a
    /// function rewrote their addresses); dispatch them to it.
    AddAliases {
        keys: Vec<FlowKey>,
    },
    /// runtime -> vswitch: the flow with these keys ended; forget them.
    FlowEnded {
        keys: Vec<FlowKey>,
    },
    /// -> vswitch: send the flows with these keys to `runtime` from now on (migration,
    /// recovery). Answered with `RuntimeSet`.
    SetRuntime {
        keys: Vec<FlowKey>,
        runtime: EndpointAddr,
        /// Echoed in the answer.
        request: u64,
    },
    /// vswitch -> requester: done for `moved` of the keys (the others were unknown, or the
    /// runtime is not one the vswitch dispatches to).
    RuntimeSet {
        request: u64,
        moved: u32,
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
        pad: Vec<u8>,
    },
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
    /// Replicate flows to these runtimes.
    SetReplica { replicas: Vec<EndpointAddr> },
    /// Take over the flows replicated here from `failed`.
    Recover { failed: EndpointAddr },
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
        }
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
}

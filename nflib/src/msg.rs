//! Messages between the processes of one host, carried in pool buffers over the message
//! rings (which every process reads before its data rings). The payload is postcard; the
//! descriptor's `meta` holds a magic and version so a stray buffer is never misread.
//!
//! These are the local control messages of flow processing. Actor messages between servers,
//! with reliable delivery, build on the same rings.

use serde::{Deserialize, Serialize};

use crate::flow::FlowKey;
use crate::region::Region;
use crate::Packet;

/// `meta` of a message descriptor: "NFM" and the format version.
pub const MSG_META: u32 = 0x4e46_4d01;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// runtime -> vswitch: packets with this key belong to a flow the runtime holds (a
    /// function rewrote its addresses); dispatch them to the sender.
    AddAlias {
        key: FlowKey,
    },
    /// runtime -> vswitch: the flow with these keys ended; forget them.
    FlowEnded {
        keys: Vec<FlowKey>,
    },
    /// -> vswitch: send the flow with these keys to the runtime in slot `runtime` from now
    /// on (migration, recovery). Answered with `RuntimeSet`.
    SetRuntime {
        keys: Vec<FlowKey>,
        runtime: u16,
        /// Echoed in the answer.
        request: u64,
    },
    /// vswitch -> requester: the request was carried out for `moved` of its keys (the others
    /// were unknown).
    RuntimeSet {
        request: u64,
        moved: u32,
    },
    /// -> a runtime's liaison: are you there? Answered with `Pong`, carrying the runtime's
    /// live flow count.
    Ping {
        seq: u64,
    },
    Pong {
        seq: u64,
        flows: u64,
    },
}

/// Writes `msg` into a buffer; false if it does not fit.
pub fn encode(region: &Region, pkt: &mut Packet, msg: &Message) -> bool {
    let room = region.room_mut(pkt);
    match postcard::to_slice(msg, room) {
        Ok(used) => {
            let n = used.len();
            pkt.set_meta(MSG_META);
            region.set_len(pkt, n)
        }
        Err(_) => false,
    }
}

/// Reads the message in a buffer received on a message ring.
pub fn decode(region: &Region, pkt: &Packet) -> Option<Message> {
    if pkt.meta() != MSG_META {
        return None;
    }
    postcard::from_bytes(region.data(pkt)).ok()
}

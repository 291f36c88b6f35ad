//! The liaison actor (paper 3.2): the runtime's own address for messages that concern the
//! runtime rather than one flow. The coordinator's requests (poll workload, cluster view,
//! migration and replica targets, recovery) land here; today it answers `Ping`.

use nflib::msg::Message;

use crate::engine::Runtime;

#[derive(Default)]
pub struct Liaison {
    /// Messages it did not understand.
    pub unknown: u64,
}

impl Liaison {
    /// Handles one message from slot `from`; a reply is queued on the runtime.
    pub fn handle(&mut self, rt: &mut Runtime, from: u16, m: Message) {
        match m {
            Message::Ping { seq } => {
                let flows = rt.flows().len() as u64;
                rt.queue_message(from, Message::Pong { seq, flows });
            }
            _ => self.unknown += 1,
        }
    }
}

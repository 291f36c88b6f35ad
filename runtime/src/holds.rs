//! Resources a flow holds from another runtime's share, kept reserved there while it lives.
//!
//! A function that hands out resources (the NAT's ports) splits them between the runtimes
//! of its chain, and each runtime hands out only its share. A flow keeps what it got when
//! it moves (migration) or is taken over (recovery), so the runtime that started it, its
//! *home*, must keep those resources reserved while the flow lives elsewhere and free them
//! when it ends there. A home that dies and restarts is a new life whose functions start
//! empty: it must learn which of its earlier life's flows live on before it hands their
//! resources to new flows (the issue's "the restarted runtime must not hand out NAT ports
//! that recovered flows still hold"). So:
//!
//! - every flow knows its home (one byte in its actor, an index into [`Homes`]); migration
//!   (step 3) and replication carry it as an address;
//! - a runtime installing a flow (migrated or taken over) lets its own functions reserve
//!   what the flow holds of this runtime's share (the flow may be one of its own, back);
//! - a runtime taking over flows tells each one's home (`Holds`, reserve): the home may be
//!   the dead runtime's new life, already started;
//! - a runtime that has just started asks every runtime of its chain for the flows its
//!   earlier lives started (`HoldsQuery`), which answer with `Holds`;
//! - a flow that ends away from home tells its home (`Holds`, free): that also returns the
//!   ports of migrated flows, which their source used to keep for good.
//!
//! Functions ignore a state whose resources are not from their share, so a message to the
//! wrong runtime, or twice, changes nothing. What is left: a new life's functions may hand
//! out a held resource between its start and the answers to its query (milliseconds; the
//! supervisor restarts a replicated runtime only after the takeover had its head start).
//! The vswitch then refuses the new flow's alias, as another flow holds the key, and the
//! new flow ends (its client tries again): never two flows on one key.
//!
//! No I/O: the engine serialises states, calls the functions and sends the messages.

use nflib::frame::EndpointAddr;
use nflib::msg::Message;

/// The home index of flows this runtime started.
pub const HERE: u8 = 0;

/// Homes of the flows a runtime holds, by index (at most 256, this runtime first). An index
/// never changes meaning.
#[derive(Debug)]
pub struct Homes {
    addrs: Vec<EndpointAddr>,
    /// Homes that found no index (the table was full): their flows count as this runtime's,
    /// so their own homes are not told of them (their resources stay reserved there until
    /// that home restarts).
    pub overflow: u64,
}

impl Homes {
    pub fn new(me: EndpointAddr) -> Homes {
        Homes {
            addrs: vec![me],
            overflow: 0,
        }
    }

    /// The index of `addr`, made if it has none.
    pub fn index(&mut self, addr: EndpointAddr) -> u8 {
        if let Some(i) = self.find(addr) {
            return i;
        }
        match u8::try_from(self.addrs.len()) {
            Ok(i) => {
                self.addrs.push(addr);
                i
            }
            Err(_) => {
                self.overflow += 1;
                HERE
            }
        }
    }

    /// The index of `addr`, if it has one.
    pub fn find(&self, addr: EndpointAddr) -> Option<u8> {
        self.addrs
            .iter()
            .position(|a| *a == addr)
            .and_then(|i| u8::try_from(i).ok())
    }

    /// The address of index `i` (this runtime's for an index it never gave).
    pub fn addr(&self, i: u8) -> EndpointAddr {
        self.addrs
            .get(usize::from(i))
            .copied()
            .unwrap_or(self.addrs[0])
    }
}

/// Bounds of one `Holds` (a message is at most 4 MiB).
const MAX_BATCH_BYTES: usize = 1 << 20;
const MAX_BATCH_FLOWS: usize = 8192;

/// `Holds` to send, per home, in the order they were written: a flow reserved and then
/// freed is freed last.
#[derive(Debug, Default)]
pub struct Outbox {
    batches: Vec<Batch>,
}

/// One `Holds` to be: its home, its flows (reserve or free, and the length of the flow's
/// states) and the states.
type Batch = (EndpointAddr, Vec<(bool, u32)>, Vec<u8>);

impl Outbox {
    pub fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }

    /// Adds a flow for `home` to reserve (`reserve`) or free, its states written by `write`
    /// (in the layout of `nflib::msg::states`).
    pub fn push(&mut self, home: EndpointAddr, reserve: bool, write: impl FnOnce(&mut Vec<u8>)) {
        let open = self.batches.iter().rposition(|(h, _, _)| *h == home);
        let i = match open {
            Some(i)
                if self.batches[i].1.len() < MAX_BATCH_FLOWS
                    && self.batches[i].2.len() < MAX_BATCH_BYTES =>
            {
                i
            }
            _ => {
                self.batches.push((home, Vec::new(), Vec::new()));
                self.batches.len() - 1
            }
        };
        let (_, flows, states) = &mut self.batches[i];
        let start = states.len();
        write(states);
        // A flow's states are some bytes to some hundreds; one of 4 GiB cannot be sent and
        // reads back as malformed.
        let len = u32::try_from(states.len() - start).unwrap_or(u32::MAX);
        flows.push((reserve, len));
    }

    /// The messages to send, in order.
    pub fn drain(&mut self) -> impl Iterator<Item = (EndpointAddr, Message)> + '_ {
        self.batches
            .drain(..)
            .map(|(home, flows, states)| (home, Message::Holds { flows, states }))
    }
}

/// The flows of a `Holds`, each with its part of `states`; `Err` at the first flow whose
/// length runs past the states (what came before stands).
pub fn parts<'a>(
    flows: &'a [(bool, u32)],
    states: &'a [u8],
) -> impl Iterator<Item = Result<(bool, &'a [u8]), ()>> + 'a {
    let mut rest = states;
    let mut failed = false;
    flows.iter().map_while(move |&(reserve, len)| {
        if failed {
            return None;
        }
        let len = len as usize;
        if rest.len() < len {
            failed = true;
            return Some(Err(()));
        }
        let (part, tail) = rest.split_at(len);
        rest = tail;
        Some(Ok((reserve, part)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn homes_index_addresses_and_overflow_to_here() {
        let me = EndpointAddr::new(1, 3);
        let mut h = Homes::new(me);
        assert_eq!(h.index(me), HERE);
        let a = EndpointAddr::new(2, 3);
        assert_eq!(h.index(a), 1);
        assert_eq!(h.index(a), 1);
        assert_eq!(h.addr(1), a);
        assert_eq!(h.addr(200), me);
        for i in 0..300u16 {
            h.index(EndpointAddr::new(3, i));
        }
        assert_eq!(h.find(EndpointAddr::new(3, 253)), Some(255));
        assert_eq!(h.index(EndpointAddr::new(3, 299)), HERE);
        // 254..300 found none, and 299 again.
        assert_eq!(h.overflow, (300 - 254) + 1);
    }

    #[test]
    fn a_home_gets_its_flows_in_order_in_bounded_messages() {
        let (a, b) = (EndpointAddr::new(1, 1), EndpointAddr::new(1, 2));
        let mut o = Outbox::default();
        o.push(a, true, |v| v.extend_from_slice(b"xx"));
        o.push(b, true, |v| v.extend_from_slice(b"y"));
        o.push(a, false, |v| v.extend_from_slice(b"xx"));
        for _ in 0..MAX_BATCH_FLOWS {
            o.push(b, false, |_| {});
        }
        let sent: Vec<_> = o.drain().collect();
        assert!(o.is_empty());
        assert_eq!(sent.len(), 3);
        let Message::Holds { flows, states } = &sent[0].1 else {
            panic!()
        };
        assert_eq!(sent[0].0, a);
        assert_eq!(flows, &[(true, 2), (false, 2)]);
        let got: Vec<_> = parts(flows, states).collect();
        assert_eq!(got, vec![Ok((true, &b"xx"[..])), Ok((false, &b"xx"[..]))]);
        assert!(matches!(&sent[2].1, Message::Holds { flows, .. } if flows.len() == 1));
    }

    #[test]
    fn a_length_past_the_states_stops_the_reading() {
        let flows = [(true, 1), (true, 5), (false, 1)];
        let got: Vec<_> = parts(&flows, b"abc").collect();
        assert_eq!(got, vec![Ok((true, &b"a"[..])), Err(())]);
    }
}

//! In-order delivery of one direction of a TCP stream, for functions that read payloads
//! across segments (HTTP parser, IDS).
//!
//! Segments are placed by sequence number (wrapping arithmetic). Bytes already delivered are
//! trimmed (retransmissions, overlaps keep the first copy), segments ahead of the next
//! expected byte wait in a bounded buffer. When the buffer is full, or a hole is never filled,
//! delivery skips the hole and counts a gap, so a lost segment cannot stall inspection forever
//! nor grow memory without bound. The state serialises with the flow.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Bytes of out-of-order data kept per direction by default.
pub const DEFAULT_WINDOW: usize = 64 * 1024;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Reassembler {
    /// Next sequence number to deliver; unknown until the SYN or the first data segment.
    next: Option<u32>,
    /// Waiting segments by their offset from `next`'s origin (sequence numbers, wrapping).
    pending: BTreeMap<u32, Vec<u8>>,
    pending_bytes: usize,
    /// Bytes delivered so far.
    pub delivered: u64,
    /// Holes skipped.
    pub gaps: u64,
}

fn seq_lt(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

impl Reassembler {
    /// The SYN of this direction: data starts at `seq + 1`.
    pub fn syn(&mut self, seq: u32) {
        if self.next.is_none() {
            self.next = Some(seq.wrapping_add(1));
        }
    }

    /// Feeds a segment; in-order bytes go to `out` (possibly in several pieces), in order.
    pub fn segment(&mut self, seq: u32, data: &[u8], window: usize, mut out: impl FnMut(&[u8])) {
        if data.is_empty() {
            return;
        }
        let next = *self.next.get_or_insert(seq);
        let end = seq.wrapping_add(data.len() as u32);
        if !seq_lt(next, end) {
            return; // entirely old: a retransmission
        }
        let (seq, data) = if seq_lt(seq, next) {
            let skip = next.wrapping_sub(seq) as usize;
            (next, &data[skip..])
        } else {
            (seq, data)
        };
        if seq == next {
            self.deliver(data, &mut out);
            self.drain(&mut out);
            return;
        }
        // Ahead of the next byte: keep it (first copy wins) if it fits.
        if self.pending_bytes + data.len() > window {
            // No room: give up on the hole, deliver what waits, then this segment if it fits.
            self.skip_hole(&mut out);
            if self.next.is_some_and(|n| n == seq) {
                self.deliver(data, &mut out);
                self.drain(&mut out);
                return;
            }
            if self.pending_bytes + data.len() > window {
                return;
            }
        }
        if let std::collections::btree_map::Entry::Vacant(e) = self.pending.entry(seq) {
            self.pending_bytes += data.len();
            e.insert(data.to_vec());
        }
    }

    fn deliver(&mut self, data: &[u8], out: &mut impl FnMut(&[u8])) {
        out(data);
        self.delivered += data.len() as u64;
        if let Some(n) = self.next.as_mut() {
            *n = n.wrapping_add(data.len() as u32);
        }
    }

    /// Delivers waiting segments that are now in order.
    fn drain(&mut self, out: &mut impl FnMut(&[u8])) {
        loop {
            let Some(next) = self.next else { return };
            let Some(seq) = self
                .pending
                .keys()
                .copied()
                .min_by_key(|s| s.wrapping_sub(next) as i32)
            else {
                return;
            };
            if (seq.wrapping_sub(next) as i32) > 0 {
                return; // the earliest waiting segment is still ahead: a hole remains
            }
            let data = self.pending.remove(&seq).unwrap_or_default();
            self.pending_bytes -= data.len();
            let end = seq.wrapping_add(data.len() as u32);
            if seq_lt(next, end) {
                let skip = next.wrapping_sub(seq) as usize;
                self.deliver(&data[skip..], out);
            }
        }
    }

    /// Jumps over the hole before the earliest waiting segment.
    fn skip_hole(&mut self, out: &mut impl FnMut(&[u8])) {
        let Some(next) = self.next else { return };
        let earliest = self
            .pending
            .keys()
            .copied()
            .min_by_key(|s| s.wrapping_sub(next) as i32);
        if let Some(s) = earliest {
            self.gaps += 1;
            self.next = Some(s);
            self.drain(out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(r: &mut Reassembler, segs: &[(u32, &[u8])]) -> Vec<u8> {
        let mut got = Vec::new();
        for (seq, d) in segs {
            r.segment(*seq, d, 16, |b| got.extend_from_slice(b));
        }
        got
    }

    #[test]
    fn in_order_out_of_order_and_retransmitted() {
        let mut r = Reassembler::default();
        r.syn(99);
        let got = feed(
            &mut r,
            &[
                (100, b"GET "),
                (108, b"HTTP"),
                (104, b"/ab "),
                (100, b"GET "),
                (106, b"b HTTP/"),
            ],
        );
        assert_eq!(got, b"GET /ab HTTP/");
        assert_eq!(r.gaps, 0);
    }

    #[test]
    fn wraps_around_the_sequence_space() {
        let mut r = Reassembler::default();
        let start = u32::MAX - 2;
        let got = feed(
            &mut r,
            &[
                (start, b"abc"),
                (start.wrapping_add(5), b"fg"),
                (start.wrapping_add(3), b"de"),
            ],
        );
        assert_eq!(got, b"abcdefg");
    }

    #[test]
    fn a_hole_that_never_fills_is_skipped_when_the_window_is_full() {
        let mut r = Reassembler::default();
        r.syn(0);
        let got = feed(
            &mut r,
            &[(1, b"ab"), (10, b"0123456789"), (20, b"abcdefghij")],
        );
        assert_eq!(&got[..2], b"ab");
        assert!(got.ends_with(b"abcdefghij"));
        assert_eq!(r.gaps, 1);
        assert!(r.pending.is_empty());
    }

    proptest::proptest! {
        #[test]
        fn any_order_of_segments_reassembles(perm in proptest::collection::vec(0usize..8, 8)) {
            let text: Vec<u8> = (0..64u8).collect();
            let segs: Vec<(u32, &[u8])> = (0..8).map(|i| (1000 + i as u32 * 8, &text[i * 8..i * 8 + 8])).collect();
            let mut r = Reassembler::default();
            r.syn(999);
            let mut got = Vec::new();
            for &i in &perm {
                r.segment(segs[i].0, segs[i].1, 1 << 20, |b| got.extend_from_slice(b));
            }
            for s in &segs {
                r.segment(s.0, s.1, 1 << 20, |b| got.extend_from_slice(b));
            }
            proptest::prop_assert_eq!(got, text);
        }
    }
}

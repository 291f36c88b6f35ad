//! Actor message frames: the one format actor messages have, on the message rings of one host
//! and as raw Ethernet frames between servers.
//!
//! ```text
//! Ethernet: dst = control MAC of the receiving endpoint, src = control MAC of the sender,
//!           EtherType 0x88B5 (IEEE 802 local experimental 1)
//! off size  header (big endian), HEADER_LEN = 76 bytes
//!  0   1    version (1)
//!  1   1    kind: 1 data (one fragment of a message, with the ack fields), 2 ack only
//!  2   2    flags: bit 0 = a 16-byte authentication tag follows the payload
//!  4   4    source endpoint: server, slot
//!  8   4    destination endpoint: server, slot
//! 12   8    source actor
//! 20   8    destination actor
//! 28   2    message type (the payload's variant, for counters and captures)
//! 30   2    fragment index
//! 32   2    fragment count
//! 34   2    payload length
//! 36   8    source session (the sender's incarnation for this peer)
//! 44   8    destination session as the sender knows it (0: not yet known)
//! 52   8    sequence number of this frame (data frames)
//! 60   8    cumulative ack: the next sequence number expected from the peer
//! 68   8    selective ack: bit i set = frame ack + 1 + i arrived
//! 76        payload (postcard), then the tag when flag bit 0 is set
//! ```
//!
//! Endpoints are named twice, in the MACs and in the header; a frame whose two disagree is
//! malformed. The MAC form lets an L2 switch learn where each endpoint lives; the header form
//! is what the code reads.
//!
//! Parsing validates every length once ([`Frame::parse`]); a malformed frame is an error,
//! never a panic. Data between servers (packets a vswitch sends to a runtime on another
//! server, and the runtime's output coming back) travels in frames of EtherType 0x88B6, see
//! [`DataEncap`].

use std::fmt;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// EtherType of actor message frames.
pub const ETHERTYPE_CONTROL: u16 = 0x88b5;
/// EtherType of encapsulated data frames between servers.
pub const ETHERTYPE_DATA: u16 = 0x88b6;
pub const VERSION: u8 = 1;
pub const ETH_LEN: usize = 14;
pub const HEADER_LEN: usize = 76;
/// Length of the authentication tag between servers.
pub const TAG_LEN: usize = 16;
/// Bytes of a frame that are not payload, tag included.
pub const OVERHEAD: usize = ETH_LEN + HEADER_LEN + TAG_LEN;
/// Largest message the transport carries (fragmented into frames).
pub const MAX_MESSAGE: usize = 4 << 20;

pub const FLAG_AUTH: u16 = 1;

/// Actor id of the endpoint's own liaison actor (a runtime's liaison, a vswitch's
/// dispatcher, nfmgr's control endpoint).
pub const LIAISON: u64 = 0;

/// A process anywhere in the cluster: its server and its slot on that server. Slot 0 is the
/// server's nfmgr.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub struct EndpointAddr {
    pub server: u16,
    pub slot: u16,
}

impl EndpointAddr {
    pub const fn new(server: u16, slot: u16) -> EndpointAddr {
        EndpointAddr { server, slot }
    }

    /// The MAC actor messages to this endpoint are addressed to: 02:4e:43 ("NC"), then the
    /// server and the slot. Locally administered and unicast.
    pub fn control_mac(self) -> [u8; 6] {
        let s = self.server.to_be_bytes();
        [0x02, 0x4e, 0x43, s[0], s[1], self.slot as u8]
    }

    /// The MAC a vswitch gives data frames it sends to this endpoint: 02:4e:46 ("NF"), then
    /// the server and the slot.
    pub fn input_mac(self) -> [u8; 6] {
        let s = self.server.to_be_bytes();
        [0x02, 0x4e, 0x46, s[0], s[1], self.slot as u8]
    }

    /// The endpoint a control MAC names, if it is one.
    pub fn from_control_mac(mac: &[u8]) -> Option<EndpointAddr> {
        Self::from_mac(mac, 0x43)
    }

    /// The endpoint an input MAC names, if it is one.
    pub fn from_input_mac(mac: &[u8]) -> Option<EndpointAddr> {
        Self::from_mac(mac, 0x46)
    }

    fn from_mac(mac: &[u8], tag: u8) -> Option<EndpointAddr> {
        match mac {
            [0x02, 0x4e, t, s0, s1, slot, ..] if *t == tag => Some(EndpointAddr {
                server: u16::from_be_bytes([*s0, *s1]),
                slot: *slot as u16,
            }),
            _ => None,
        }
    }
}

impl fmt::Display for EndpointAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.server, self.slot)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameKind {
    /// One fragment of a message; carries the ack fields too.
    Data,
    /// Acknowledgement only, no payload.
    Ack,
}

impl FrameKind {
    fn raw(self) -> u8 {
        match self {
            FrameKind::Data => 1,
            FrameKind::Ack => 2,
        }
    }
}

/// The header of an actor frame, parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: FrameKind,
    pub flags: u16,
    pub src: EndpointAddr,
    pub dst: EndpointAddr,
    pub src_actor: u64,
    pub dst_actor: u64,
    pub msg_type: u16,
    pub frag_index: u16,
    pub frag_count: u16,
    pub src_session: u64,
    pub dst_session: u64,
    pub seq: u64,
    pub ack: u64,
    pub sack: u64,
}

impl FrameHeader {
    /// An ack-only header from `src` to `dst`.
    pub fn ack(src: EndpointAddr, dst: EndpointAddr) -> FrameHeader {
        FrameHeader {
            kind: FrameKind::Ack,
            flags: 0,
            src,
            dst,
            src_actor: LIAISON,
            dst_actor: LIAISON,
            msg_type: 0,
            frag_index: 0,
            frag_count: 0,
            src_session: 0,
            dst_session: 0,
            seq: 0,
            ack: 0,
            sack: 0,
        }
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum WireError {
    #[error("frame of {0} bytes is shorter than an actor frame header")]
    Short(usize),
    #[error("EtherType {0:#06x} is not an actor frame")]
    NotActorFrame(u16),
    #[error("actor frame version {0} is not supported (this build speaks {VERSION})")]
    Version(u8),
    #[error("unknown frame kind {0}")]
    Kind(u8),
    #[error("payload length {len} exceeds the {avail} bytes in the frame")]
    PayloadLength { len: usize, avail: usize },
    #[error("the frame's MAC addresses and header name different endpoints")]
    AddressMismatch,
    #[error("fragment {index} of {count} is impossible")]
    Fragment { index: u16, count: u16 },
    #[error("an ack frame carries a payload")]
    AckWithPayload,
    #[error("slot {0} does not fit a MAC address")]
    Slot(u16),
    #[error("the buffer of {have} bytes cannot hold a frame of {need}")]
    NoRoom { need: usize, have: usize },
}

/// A parsed actor frame borrowing its bytes.
#[derive(Debug)]
pub struct Frame<'a> {
    pub header: FrameHeader,
    pub payload: &'a [u8],
    /// The tag, when the frame carries one.
    pub tag: Option<&'a [u8; TAG_LEN]>,
    /// The bytes the tag covers (Ethernet header to end of payload).
    pub signed: &'a [u8],
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

/// The EtherType of an Ethernet frame (untagged), if it has one.
pub fn ethertype(frame: &[u8]) -> Option<u16> {
    (frame.len() >= ETH_LEN).then(|| be16(frame, 12))
}

impl<'a> Frame<'a> {
    /// Parses and validates an actor frame (Ethernet header included).
    pub fn parse(bytes: &'a [u8]) -> Result<Frame<'a>, WireError> {
        if bytes.len() < ETH_LEN + HEADER_LEN {
            return Err(WireError::Short(bytes.len()));
        }
        let et = be16(bytes, 12);
        if et != ETHERTYPE_CONTROL {
            return Err(WireError::NotActorFrame(et));
        }
        let h = &bytes[ETH_LEN..];
        if h[0] != VERSION {
            return Err(WireError::Version(h[0]));
        }
        let kind = match h[1] {
            1 => FrameKind::Data,
            2 => FrameKind::Ack,
            k => return Err(WireError::Kind(k)),
        };
        let flags = be16(h, 2);
        let src = EndpointAddr::new(be16(h, 4), be16(h, 6));
        let dst = EndpointAddr::new(be16(h, 8), be16(h, 10));
        if src.slot > 255 || dst.slot > 255 {
            return Err(WireError::Slot(src.slot.max(dst.slot)));
        }
        if bytes[0..6] != dst.control_mac() || bytes[6..12] != src.control_mac() {
            return Err(WireError::AddressMismatch);
        }
        let frag_index = be16(h, 30);
        let frag_count = be16(h, 32);
        let len = be16(h, 34) as usize;
        let tag_len = if flags & FLAG_AUTH != 0 { TAG_LEN } else { 0 };
        let avail = bytes.len() - ETH_LEN - HEADER_LEN;
        if len + tag_len > avail {
            return Err(WireError::PayloadLength {
                len: len + tag_len,
                avail,
            });
        }
        match kind {
            FrameKind::Data if frag_count == 0 || frag_index >= frag_count => {
                return Err(WireError::Fragment {
                    index: frag_index,
                    count: frag_count,
                })
            }
            FrameKind::Ack if len != 0 => return Err(WireError::AckWithPayload),
            _ => {}
        }
        let header = FrameHeader {
            kind,
            flags,
            src,
            dst,
            src_actor: be64(h, 12),
            dst_actor: be64(h, 20),
            msg_type: be16(h, 28),
            frag_index,
            frag_count,
            src_session: be64(h, 36),
            dst_session: be64(h, 44),
            seq: be64(h, 52),
            ack: be64(h, 60),
            sack: be64(h, 68),
        };
        let end = ETH_LEN + HEADER_LEN + len;
        let tag = if tag_len > 0 {
            bytes[end..end + TAG_LEN].try_into().ok()
        } else {
            None
        };
        Ok(Frame {
            header,
            payload: &bytes[ETH_LEN + HEADER_LEN..end],
            tag,
            signed: &bytes[..end],
        })
    }
}

/// Writes a frame (Ethernet header, actor header, payload) into `buf`; returns its length.
/// No tag is written: nfmgr adds one when the frame leaves the server (see [`auth`]).
pub fn write_frame(
    buf: &mut [u8],
    header: &FrameHeader,
    payload: &[u8],
) -> Result<usize, WireError> {
    let need = ETH_LEN + HEADER_LEN + payload.len();
    if buf.len() < need {
        return Err(WireError::NoRoom {
            need,
            have: buf.len(),
        });
    }
    if header.src.slot > 255 || header.dst.slot > 255 {
        return Err(WireError::Slot(header.src.slot.max(header.dst.slot)));
    }
    if payload.len() > u16::MAX as usize {
        return Err(WireError::PayloadLength {
            len: payload.len(),
            avail: u16::MAX as usize,
        });
    }
    buf[0..6].copy_from_slice(&header.dst.control_mac());
    buf[6..12].copy_from_slice(&header.src.control_mac());
    buf[12..14].copy_from_slice(&ETHERTYPE_CONTROL.to_be_bytes());
    let h = &mut buf[ETH_LEN..ETH_LEN + HEADER_LEN];
    h[0] = VERSION;
    h[1] = header.kind.raw();
    h[2..4].copy_from_slice(&(header.flags & !FLAG_AUTH).to_be_bytes());
    h[4..6].copy_from_slice(&header.src.server.to_be_bytes());
    h[6..8].copy_from_slice(&header.src.slot.to_be_bytes());
    h[8..10].copy_from_slice(&header.dst.server.to_be_bytes());
    h[10..12].copy_from_slice(&header.dst.slot.to_be_bytes());
    h[12..20].copy_from_slice(&header.src_actor.to_be_bytes());
    h[20..28].copy_from_slice(&header.dst_actor.to_be_bytes());
    h[28..30].copy_from_slice(&header.msg_type.to_be_bytes());
    h[30..32].copy_from_slice(&header.frag_index.to_be_bytes());
    h[32..34].copy_from_slice(&header.frag_count.to_be_bytes());
    h[34..36].copy_from_slice(&(payload.len() as u16).to_be_bytes());
    h[36..44].copy_from_slice(&header.src_session.to_be_bytes());
    h[44..52].copy_from_slice(&header.dst_session.to_be_bytes());
    h[52..60].copy_from_slice(&header.seq.to_be_bytes());
    h[60..68].copy_from_slice(&header.ack.to_be_bytes());
    h[68..76].copy_from_slice(&header.sack.to_be_bytes());
    buf[ETH_LEN + HEADER_LEN..need].copy_from_slice(payload);
    Ok(need)
}

/// Keyed authentication of frames between servers.
///
/// The tag is the first 16 bytes of BLAKE3 in keyed mode over the frame from its first byte
/// to the end of its payload, the AUTH flag set. The key is derived from the cluster key with
/// a context string, so the same cluster key used elsewhere (the managers' TCP sessions)
/// never yields the same MAC key.
pub mod auth {
    use super::*;

    /// The key frames are signed with.
    #[derive(Clone)]
    pub struct FrameKey([u8; 32]);

    impl fmt::Debug for FrameKey {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("FrameKey(..)")
        }
    }

    impl FrameKey {
        pub fn derive(cluster_key: &[u8]) -> FrameKey {
            FrameKey(blake3::derive_key(
                "nfactor 2026-11 actor frame authentication",
                cluster_key,
            ))
        }
    }

    fn tag_of(key: &FrameKey, signed: &[u8]) -> [u8; TAG_LEN] {
        let h = blake3::keyed_hash(&key.0, signed);
        let mut t = [0u8; TAG_LEN];
        t.copy_from_slice(&h.as_bytes()[..TAG_LEN]);
        t
    }

    /// Signs the frame of `len` bytes at the start of `buf` in place: sets the AUTH flag and
    /// appends the tag. Returns the new length.
    pub fn sign(key: &FrameKey, buf: &mut [u8], len: usize) -> Result<usize, WireError> {
        let need = len + TAG_LEN;
        if buf.len() < need || len < ETH_LEN + HEADER_LEN {
            return Err(WireError::NoRoom {
                need,
                have: buf.len(),
            });
        }
        let flags = be16(buf, ETH_LEN + 2) | FLAG_AUTH;
        buf[ETH_LEN + 2..ETH_LEN + 4].copy_from_slice(&flags.to_be_bytes());
        let t = tag_of(key, &buf[..len]);
        buf[len..need].copy_from_slice(&t);
        Ok(need)
    }

    /// Whether a parsed frame carries a valid tag under `key`. Compared in constant time.
    pub fn verify(key: &FrameKey, frame: &Frame<'_>) -> bool {
        let Some(tag) = frame.tag else {
            return false;
        };
        let want = tag_of(key, frame.signed);
        want.iter()
            .zip(tag.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }

    /// Appends a tag over the first `len` bytes of `buf` (data frames between servers, whose
    /// header has no flag for it: between servers they are always signed). Returns the new
    /// length.
    pub fn append_tag(key: &FrameKey, buf: &mut [u8], len: usize) -> Result<usize, WireError> {
        let need = len + TAG_LEN;
        if buf.len() < need {
            return Err(WireError::NoRoom {
                need,
                have: buf.len(),
            });
        }
        let t = tag_of(key, &buf[..len]);
        buf[len..need].copy_from_slice(&t);
        Ok(need)
    }

    /// Checks the tag at the end of `bytes`; returns the length without it when valid.
    pub fn check_tag(key: &FrameKey, bytes: &[u8]) -> Option<usize> {
        let len = bytes.len().checked_sub(TAG_LEN)?;
        let want = tag_of(key, &bytes[..len]);
        let ok = want
            .iter()
            .zip(&bytes[len..])
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
        ok.then_some(len)
    }

    /// The keys of a cluster during and outside a key rotation: frames are signed with the
    /// first and accepted under any (at most [`MAX_KEYS`]), so that servers can move to a
    /// new key one at a time without dropping a frame (docs/SECURITY.md, "Rotating the
    /// cluster key").
    #[derive(Clone, Debug)]
    pub struct FrameKeys {
        keys: Vec<FrameKey>,
    }

    /// The signing key and up to three more accepted ones.
    pub const MAX_KEYS: usize = 4;

    impl FrameKeys {
        /// `sign` signs; `sign` and `accept` verify. Extra keys past [`MAX_KEYS`] are
        /// ignored (the configuration refuses them).
        pub fn new(sign: FrameKey, accept: Vec<FrameKey>) -> FrameKeys {
            let mut keys = vec![sign];
            keys.extend(accept.into_iter().take(MAX_KEYS - 1));
            FrameKeys { keys }
        }

        pub fn signing(&self) -> &FrameKey {
            &self.keys[0]
        }

        /// Whether the frame's tag is valid under any of the keys (the signing key first:
        /// outside a rotation, one MAC).
        pub fn verify(&self, frame: &Frame<'_>) -> bool {
            self.keys.iter().any(|k| verify(k, frame))
        }

        /// [`check_tag`] under any of the keys.
        pub fn check_tag(&self, bytes: &[u8]) -> Option<usize> {
            self.keys.iter().find_map(|k| check_tag(k, bytes))
        }
    }

    /// Removes the tag of a verified frame (the frame continues on this server's message
    /// rings, which carry frames without tags). Returns the new length.
    pub fn strip(buf: &mut [u8], len: usize) -> usize {
        if len < ETH_LEN + HEADER_LEN + TAG_LEN {
            return len;
        }
        let flags = be16(buf, ETH_LEN + 2) & !FLAG_AUTH;
        buf[ETH_LEN + 2..ETH_LEN + 4].copy_from_slice(&flags.to_be_bytes());
        len - TAG_LEN
    }
}

/// The header of a data frame between servers (EtherType 0x88B6): the packet a vswitch sent
/// to a runtime on another server, or a runtime's output going back to the server it came
/// from. The encapsulated frame follows.
///
/// ```text
/// Ethernet: dst = input MAC of the receiving endpoint, src = input MAC of the sender's nfmgr
/// off size
///  0   1   version (1)
///  1   1   direction: 1 to a runtime, 2 output back to the origin server
///  2   6   the packet's original destination MAC (before the vswitch readdressed it)
///  8   2   origin server (where the vswitch and the ports are)
/// 10   1   origin vswitch slot
/// 11   1   egress port on the origin server
/// 12   1   ingress port on the origin server
/// 13   3   reserved (0)
/// 16       the packet
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataEncap {
    pub to_runtime: bool,
    pub orig_dst: [u8; 6],
    pub origin_server: u16,
    pub origin_vswitch: u8,
    pub egress: u8,
    pub ingress: u8,
    /// The sending nfmgr's frame counter: every data frame it sends has a greater one (it
    /// starts each life at its clock in nanoseconds), so a receiver keeps a
    /// [`ReplayWindow`] per sender and drops a frame it has seen, as an on-link attacker
    /// replaying a captured frame would have it forwarded again.
    pub seq: u64,
}

pub const ENCAP_LEN: usize = ETH_LEN + 24;

/// The sequence numbers of one sender's frames seen lately: the highest, and which of the
/// 63 below it (the anti-replay window of IPsec, RFC 4303 section 3.4.3). A frame is fresh
/// if its number is above the highest, or within the window and not seen. Checked before
/// the frame's tag (cheap), marked only after the tag verified (a forged number must not
/// move the window).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplayWindow {
    top: u64,
    /// Bit `i`: `top - i` was seen.
    seen: u64,
}

impl ReplayWindow {
    pub fn fresh(&self, seq: u64) -> bool {
        // 0 is never sent (a frame with no number, or of an older build).
        if seq == 0 {
            return false;
        }
        if seq > self.top {
            return true;
        }
        let back = self.top - seq;
        back < 64 && self.seen >> back & 1 == 0
    }

    pub fn mark(&mut self, seq: u64) {
        if seq > self.top {
            let shift = seq - self.top;
            self.seen = if shift >= 64 { 0 } else { self.seen << shift };
            self.seen |= 1;
            self.top = seq;
        } else if self.top - seq < 64 {
            self.seen |= 1 << (self.top - seq);
        }
    }
}

impl DataEncap {
    /// Writes the outer Ethernet header and this header into `buf[..ENCAP_LEN]`.
    pub fn write(&self, buf: &mut [u8], dst: [u8; 6], src: [u8; 6]) -> Result<(), WireError> {
        if buf.len() < ENCAP_LEN {
            return Err(WireError::NoRoom {
                need: ENCAP_LEN,
                have: buf.len(),
            });
        }
        buf[0..6].copy_from_slice(&dst);
        buf[6..12].copy_from_slice(&src);
        buf[12..14].copy_from_slice(&ETHERTYPE_DATA.to_be_bytes());
        let h = &mut buf[ETH_LEN..ENCAP_LEN];
        h[0] = VERSION;
        h[1] = if self.to_runtime { 1 } else { 2 };
        h[2..8].copy_from_slice(&self.orig_dst);
        h[8..10].copy_from_slice(&self.origin_server.to_be_bytes());
        h[10] = self.origin_vswitch;
        h[11] = self.egress;
        h[12] = self.ingress;
        h[13..16].fill(0);
        h[16..24].copy_from_slice(&self.seq.to_be_bytes());
        Ok(())
    }

    /// Parses the encapsulation of a data frame; the packet starts at `ENCAP_LEN`.
    pub fn parse(bytes: &[u8]) -> Result<DataEncap, WireError> {
        if bytes.len() < ENCAP_LEN + ETH_LEN {
            return Err(WireError::Short(bytes.len()));
        }
        let et = be16(bytes, 12);
        if et != ETHERTYPE_DATA {
            return Err(WireError::NotActorFrame(et));
        }
        let h = &bytes[ETH_LEN..ENCAP_LEN];
        if h[0] != VERSION {
            return Err(WireError::Version(h[0]));
        }
        let to_runtime = match h[1] {
            1 => true,
            2 => false,
            k => return Err(WireError::Kind(k)),
        };
        let mut orig_dst = [0u8; 6];
        orig_dst.copy_from_slice(&h[2..8]);
        Ok(DataEncap {
            to_runtime,
            orig_dst,
            origin_server: be16(h, 8),
            origin_vswitch: h[10],
            egress: h[11],
            ingress: h[12],
            seq: u64::from_be_bytes(h[16..24].try_into().unwrap_or([0; 8])),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header() -> FrameHeader {
        FrameHeader {
            kind: FrameKind::Data,
            flags: 0,
            src: EndpointAddr::new(1, 3),
            dst: EndpointAddr::new(2, 4),
            src_actor: 77,
            dst_actor: LIAISON,
            msg_type: 9,
            frag_index: 1,
            frag_count: 3,
            src_session: 1000,
            dst_session: 2000,
            seq: 42,
            ack: 17,
            sack: 0b101,
        }
    }

    #[test]
    fn round_trip() {
        let mut buf = [0u8; 256];
        let n = write_frame(&mut buf, &header(), b"hello").unwrap();
        assert_eq!(n, ETH_LEN + HEADER_LEN + 5);
        let f = Frame::parse(&buf[..n]).unwrap();
        assert_eq!(f.header, header());
        assert_eq!(f.payload, b"hello");
        assert!(f.tag.is_none());
        assert_eq!(
            EndpointAddr::from_control_mac(&buf[0..6]),
            Some(EndpointAddr::new(2, 4))
        );
    }

    #[test]
    fn signed_frames_verify_and_forgeries_do_not() {
        let key = auth::FrameKey::derive(b"cluster secret");
        let other = auth::FrameKey::derive(b"another secret");
        let mut buf = [0u8; 256];
        let n = write_frame(&mut buf, &header(), b"payload").unwrap();
        let n = auth::sign(&key, &mut buf, n).unwrap();
        let f = Frame::parse(&buf[..n]).unwrap();
        assert_eq!(f.header.flags & FLAG_AUTH, FLAG_AUTH);
        assert!(auth::verify(&key, &f));
        assert!(!auth::verify(&other, &f));
        // Any changed bit breaks the tag.
        let mut bad = buf;
        bad[ETH_LEN + 60] ^= 1;
        assert!(!auth::verify(&key, &Frame::parse(&bad[..n]).unwrap()));
        // Unsigned frames never verify.
        let m = write_frame(&mut buf, &header(), b"payload").unwrap();
        assert!(!auth::verify(&key, &Frame::parse(&buf[..m]).unwrap()));
        // Stripping gives back the unsigned frame.
        let n = auth::sign(&key, &mut buf, m).unwrap();
        let s = auth::strip(&mut buf, n);
        assert_eq!(s, m);
        assert_eq!(Frame::parse(&buf[..s]).unwrap().header.flags, 0);
    }

    #[test]
    fn malformed_frames_are_errors() {
        let mut buf = [0u8; 256];
        let n = write_frame(&mut buf, &header(), b"abc").unwrap();
        assert!(matches!(
            Frame::parse(&buf[..20]),
            Err(WireError::Short(20))
        ));
        let mut b = buf;
        b[ETH_LEN] = 9;
        assert_eq!(Frame::parse(&b[..n]).unwrap_err(), WireError::Version(9));
        let mut b = buf;
        b[5] ^= 1;
        assert_eq!(
            Frame::parse(&b[..n]).unwrap_err(),
            WireError::AddressMismatch
        );
        assert!(matches!(
            Frame::parse(&buf[..n - 1]),
            Err(WireError::PayloadLength { .. })
        ));
        let mut h = header();
        h.frag_index = 3;
        let m = write_frame(&mut buf, &h, b"x").unwrap();
        assert!(matches!(
            Frame::parse(&buf[..m]),
            Err(WireError::Fragment { .. })
        ));
    }

    #[test]
    fn data_encapsulation_round_trip() {
        let e = DataEncap {
            to_runtime: true,
            orig_dst: [1, 2, 3, 4, 5, 6],
            origin_server: 7,
            origin_vswitch: 1,
            egress: 2,
            ingress: 0,
            seq: 0x0102_0304_0506_0708,
        };
        let mut buf = [0u8; 64];
        e.write(
            &mut buf,
            EndpointAddr::new(2, 5).input_mac(),
            EndpointAddr::new(7, 0).input_mac(),
        )
        .unwrap();
        assert_eq!(DataEncap::parse(&buf).unwrap(), e);
        assert_eq!(
            EndpointAddr::from_input_mac(&buf[..6]),
            Some(EndpointAddr::new(2, 5))
        );
    }

    #[test]
    fn the_replay_window_takes_each_number_once() {
        let mut w = ReplayWindow::default();
        assert!(!w.fresh(0), "0 is never sent");
        for s in [100, 98, 101, 99] {
            assert!(w.fresh(s), "{s}");
            w.mark(s);
            assert!(!w.fresh(s), "{s} again");
        }
        assert!(w.fresh(97), "within the window, unseen");
        assert!(!w.fresh(101 - 64), "below the window");
        // A jump clears what the window remembered of older numbers.
        w.mark(1_000);
        assert!(!w.fresh(100) && !w.fresh(999 - 63) && w.fresh(999) && w.fresh(1_001));
        w.mark(1_063);
        assert!(w.fresh(1_000 + 1) && !w.fresh(1_000) && !w.fresh(1_063));
    }

    proptest! {
        #[test]
        fn parsing_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Frame::parse(&bytes);
            let _ = DataEncap::parse(&bytes);
        }

        #[test]
        fn any_header_round_trips(
            seq in any::<u64>(), ack in any::<u64>(), sack in any::<u64>(),
            actors in any::<(u64, u64)>(), sessions in any::<(u64, u64)>(),
            servers in any::<(u16, u16)>(), slots in (0u16..256, 0u16..256),
            payload in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            let h = FrameHeader {
                kind: FrameKind::Data, flags: 0,
                src: EndpointAddr::new(servers.0, slots.0),
                dst: EndpointAddr::new(servers.1, slots.1),
                src_actor: actors.0, dst_actor: actors.1, msg_type: 3,
                frag_index: 0, frag_count: 1,
                src_session: sessions.0, dst_session: sessions.1, seq, ack, sack,
            };
            let mut buf = vec![0u8; 400];
            let n = write_frame(&mut buf, &h, &payload).unwrap();
            let f = Frame::parse(&buf[..n]).unwrap();
            prop_assert_eq!(f.header, h);
            prop_assert_eq!(f.payload, &payload[..]);
        }
    }
}

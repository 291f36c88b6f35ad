//! The frames nfmgrs exchange over their TCP sessions (the coordinator and each member),
//! without the sockets (nfmgr's `control::peer`), so that they are tested and fuzzed alone.
//!
//! Frames are `u32` length (big endian), a postcard [`PeerMsg`], and, once the handshake is
//! done, a 16-byte tag. The handshake authenticates both sides with the cluster key without
//! sending it:
//!
//! ```text
//! coordinator -> member   Hello { nonce_c }                         (plain)
//! member -> coordinator   Join { .., nonce_j, proof }               (plain)
//!     proof = BLAKE3-keyed(auth, "join" | nonce_c | nonce_j | all the join says)
//! coordinator -> member   Welcome { view, recover } or Reject      (tagged)
//! ```
//!
//! Both then derive one key per direction from the two nonces, and every later frame's tag
//! covers a per-direction frame counter and the payload, so a frame cannot be forged,
//! altered, replayed or reordered within the session. The member knows the coordinator
//! holds the key when the first tagged frame verifies. `auth` is derived from the cluster
//! key with its own context, distinct from the key that signs actor frames.

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

use crate::cluster::{ClusterView, EndpointInfo};
use crate::frame::EndpointAddr;
use crate::msg::{Call, Reply};

/// What servers of one cluster must agree on: this handshake, and the encoding of actor
/// messages between them (`nflib::msg`). A server speaking another version is refused at
/// join, rather than joining and failing every migration and replication message.
/// 2: compact keys, step 3 by position with one-byte state tags.
/// 3: `Call::PrepareMigration` (which renumbers the `Call`s after it), and `FlowKey`'s
///    hash, which step 3's digest of a group's keys is made of.
/// 4: alias requests and their answers (`AddAliases { request }`, `AliasesAdded`),
///    `FlowEnded { aliases, idle_ms }`, and the firewall's conntrack-like TCP state (which
///    migration carries); NAT ports split by server id.
/// 5: alias requests name the flow of each key (refusals echo it), and `SetRuntime` names
///    the runtime the keys are to move from.
/// 6: replication (`Replicate`, `Replicated`), `Recover { incarnation }` and its answer.
/// 7: `Fence`.
/// 8: a flow's home in migration and replication; `Holds`, `HoldsQuery`.
/// 9: `FeedQuery`, `Feeds` (a restarted vswitch rebuilds its table from the runtimes).
/// 10: the cluster view's epoch (`ClusterView::epoch`).
/// 13: `RpcReply`'s failure is an [`RpcError`] (it was a text).
pub const PROTOCOL_VERSION: u32 = 13;
pub const MAX_FRAME: usize = 16 << 20;
/// The largest frame before the peer has proven it holds the key (a join names a server's
/// endpoints and chains: some kilobytes). Nothing larger is allocated for a stranger.
pub const MAX_HANDSHAKE_FRAME: usize = 256 << 10;
pub const TAG: usize = 16;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum PeerMsg {
    Hello {
        version: u32,
        server: u16,
        nonce: [u8; 16],
    },
    Join {
        version: u32,
        server: u16,
        name: String,
        incarnation: u64,
        nonce: [u8; 16],
        proof: [u8; 32],
        endpoints: Vec<EndpointInfo>,
        /// Digest of each service chain's definition: servers must agree on chains they
        /// share.
        chains: Vec<(String, [u8; 32])>,
    },
    Welcome {
        view: ClusterView,
        /// A coordinator restarted from its journal, to a member back in the life that
        /// held replicas of the coordinator's previous life: that life's runtimes, whose
        /// flows the member's runtimes are to take over before anything of the new life
        /// reaches them.
        recover: Vec<EndpointInfo>,
    },
    Reject {
        reason: String,
    },
    /// Sent every `heartbeat_ms` both ways; carries the sender's endpoints when they changed.
    Heartbeat {
        endpoints: Option<Vec<EndpointInfo>>,
    },
    View(ClusterView),
    /// A control call for `target`, run by its manager (the coordinator relays calls between
    /// members).
    Rpc {
        id: u64,
        target: EndpointAddr,
        call: Call,
    },
    RpcReply {
        id: u64,
        result: Result<Reply, RpcError>,
    },
    /// The sender is shutting down cleanly.
    Leave,
    /// Coordinator -> a joining member it had declared dead while that nfmgr lived on (a
    /// partition): its runtimes' flows were taken over elsewhere, so it must restart every
    /// vswitch and runtime empty, then join again as a new incarnation (a fence: no flow
    /// ends up with two owners).
    Fence {
        reason: String,
    },
    /// Member to coordinator, once a second: its statistics, events, migrations and
    /// recoveries for `nfmgr top`, as the JSON of [`nflib::top::MemberStats`] (its snapshot
    /// has optional fields, which postcard cannot carry).
    Stats {
        json: Vec<u8>,
    },
}

/// Why a control call was not answered by its target: what went wrong on its way, in the
/// nfmgr of the caller or in one it went through (a target's own refusal is
/// `Reply::Refused`). It crosses the wire in [`PeerMsg::RpcReply`]: a new variant is a new
/// [`PROTOCOL_VERSION`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum RpcError {
    /// The call was addressed to an nfmgr (slot 0), not to a process.
    #[error("nfmgr itself takes no control calls")]
    ToManager,
    /// No session to that server from the nfmgr that had the call.
    #[error("server {0} is not reachable from here")]
    Unreachable(u16),
    /// A member got a call for another server (only the coordinator relays).
    #[error("{0} is not on this server")]
    NotHere(EndpointAddr),
    /// No answer within the call's deadline.
    #[error("timed out")]
    TimedOut,
    /// A recovery order waited for a member, and this nfmgr stopped coordinating.
    #[error("this nfmgr no longer coordinates")]
    NotCoordinating,
    /// A recovery order waited for a member that did not join in time (or died).
    #[error("server {0} did not join this coordinator")]
    NotJoined(u16),
}

/// What a member tells the coordinator when it joins.
#[derive(Clone, Debug)]
pub struct JoinRequest {
    pub server: u16,
    pub name: String,
    pub incarnation: u64,
    pub endpoints: Vec<EndpointInfo>,
    pub chains: Vec<(String, [u8; 32])>,
}

/// The key managers authenticate each other with.
#[derive(Clone)]
pub struct AuthKey([u8; 32]);

impl AuthKey {
    pub fn derive(cluster_key: &[u8]) -> AuthKey {
        AuthKey(blake3::derive_key(
            "nfactor 2026-11 manager session authentication",
            cluster_key,
        ))
    }

    fn mac(&self, parts: &[&[u8]]) -> [u8; 32] {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        for p in parts {
            h.update(p);
        }
        *h.finalize().as_bytes()
    }

    /// The join's proof: both nonces and everything the join says (so that nobody on the
    /// path can change its name, incarnation, endpoints or chains).
    pub fn proof(&self, nonce_c: &[u8; 16], nonce_j: &[u8; 16], join: &JoinRequest) -> [u8; 32] {
        let said = postcard::to_stdvec(&(
            join.server,
            &join.name,
            join.incarnation,
            &join.endpoints,
            &join.chains,
        ))
        .unwrap_or_default();
        self.mac(&[b"join", nonce_c, nonce_j, &said])
    }

    /// (coordinator -> member, member -> coordinator) keys of a session.
    pub fn session(&self, nonce_c: &[u8; 16], nonce_j: &[u8; 16]) -> ([u8; 32], [u8; 32]) {
        (
            self.mac(&[b"c2j", nonce_c, nonce_j]),
            self.mac(&[b"j2c", nonce_c, nonce_j]),
        )
    }
}

fn tag(key: &[u8; 32], counter: u64, payload: &[u8]) -> [u8; TAG] {
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(&counter.to_be_bytes());
    h.update(payload);
    let mut t = [0u8; TAG];
    t.copy_from_slice(&h.finalize().as_bytes()[..TAG]);
    t
}

pub fn write_frame(
    w: &mut impl Write,
    msg: &PeerMsg,
    key: Option<(&[u8; 32], u64)>,
) -> io::Result<()> {
    let payload = postcard::to_stdvec(msg).map_err(|e| io::Error::other(e.to_string()))?;
    let mut frame = Vec::with_capacity(4 + payload.len() + TAG);
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(&payload);
    if let Some((k, counter)) = key {
        frame.extend_from_slice(&tag(k, counter, &payload));
    }
    w.write_all(&frame)
}

/// Why no message was read from a session or a handshake.
#[derive(Debug, thiserror::Error)]
pub enum PeerFrameError {
    /// The connection ended before a frame began.
    #[error("connection closed")]
    Closed,
    /// Reading failed (within a frame, or a timeout).
    #[error(transparent)]
    Io(io::Error),
    /// The length says more than `max`: refused before anything that size is allocated.
    #[error("frame of {0} bytes is too large")]
    TooLarge(usize),
    /// The tag does not verify: altered, forged, replayed, out of order, or another key.
    #[error("a frame failed authentication")]
    Unauthenticated,
    /// The payload is not a [`PeerMsg`].
    #[error("undecodable frame: {0}")]
    Undecodable(#[source] postcard::Error),
}

pub fn read_frame(
    r: &mut impl Read,
    key: Option<(&[u8; 32], u64)>,
    max: usize,
) -> Result<PeerMsg, PeerFrameError> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => PeerFrameError::Closed,
        _ => PeerFrameError::Io(e),
    })?;
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(PeerFrameError::TooLarge(len));
    }
    let extra = if key.is_some() { TAG } else { 0 };
    let mut buf = vec![0u8; len + extra];
    r.read_exact(&mut buf).map_err(PeerFrameError::Io)?;
    if let Some((k, counter)) = key {
        let want = tag(k, counter, &buf[..len]);
        let ok = want
            .iter()
            .zip(&buf[len..])
            .fold(0u8, |a, (x, y)| a | (x ^ y))
            == 0;
        if !ok {
            return Err(PeerFrameError::Unauthenticated);
        }
    }
    postcard::from_bytes(&buf[..len]).map_err(PeerFrameError::Undecodable)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_a_changed_or_replayed_one_is_refused() {
        let auth = AuthKey::derive(b"a cluster key of enough bytes");
        let (key, _) = auth.session(&[1; 16], &[2; 16]);
        let mut buf = Vec::new();
        write_frame(&mut buf, &PeerMsg::Leave, Some((&key, 7))).unwrap();
        assert!(matches!(
            read_frame(&mut &buf[..], Some((&key, 7)), MAX_FRAME),
            Ok(PeerMsg::Leave)
        ));
        // Another counter (a replay, or a frame out of order) or a flipped bit: refused.
        assert!(matches!(
            read_frame(&mut &buf[..], Some((&key, 8)), MAX_FRAME),
            Err(PeerFrameError::Unauthenticated)
        ));
        let mut bad = buf.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(matches!(
            read_frame(&mut &bad[..], Some((&key, 7)), MAX_FRAME),
            Err(PeerFrameError::Unauthenticated)
        ));
        // Nothing at all: the connection closed.
        assert!(matches!(
            read_frame(&mut &[][..], Some((&key, 7)), MAX_FRAME),
            Err(PeerFrameError::Closed)
        ));
    }

    #[test]
    fn a_failed_call_crosses_with_its_reason() {
        let mut buf = Vec::new();
        let failed = Err(RpcError::NotHere(EndpointAddr::new(3, 4)));
        let msg = PeerMsg::RpcReply {
            id: 9,
            result: failed.clone(),
        };
        write_frame(&mut buf, &msg, None).unwrap();
        match read_frame(&mut &buf[..], None, MAX_FRAME) {
            Ok(PeerMsg::RpcReply { id: 9, result }) => assert_eq!(result, failed),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_stranger_cannot_make_the_reader_allocate_beyond_the_bound() {
        // A length of 4 GiB - 1 with nothing behind it: refused on the length alone.
        let frame = [0xff, 0xff, 0xff, 0xff, 0];
        let e = read_frame(&mut &frame[..], None, MAX_HANDSHAKE_FRAME).unwrap_err();
        assert!(matches!(e, PeerFrameError::TooLarge(0xffff_ffff)), "{e}");
        assert!(e.to_string().contains("too large"), "{e}");
    }

    #[test]
    fn the_join_proof_covers_what_the_join_says() {
        let auth = AuthKey::derive(b"a cluster key of enough bytes");
        let join = |name: &str| JoinRequest {
            server: 2,
            name: name.into(),
            incarnation: 1,
            endpoints: vec![],
            chains: vec![],
        };
        let (c, j) = ([3; 16], [4; 16]);
        assert_eq!(
            auth.proof(&c, &j, &join("s2")),
            auth.proof(&c, &j, &join("s2"))
        );
        assert_ne!(
            auth.proof(&c, &j, &join("s2")),
            auth.proof(&c, &j, &join("s3"))
        );
        let other = AuthKey::derive(b"another cluster key, same length");
        assert_ne!(
            auth.proof(&c, &j, &join("s2")),
            other.proof(&c, &j, &join("s2"))
        );
    }
}

//! The managers' own protocol: TCP between each member nfmgr and the coordinator.
//!
//! Frames are `u32` length (big endian), a postcard [`PeerMsg`], and, once the handshake is
//! done, a 16-byte tag. The handshake authenticates both sides with the cluster key without
//! sending it:
//!
//! ```text
//! coordinator -> member   Hello { nonce_c }                         (plain)
//! member -> coordinator   Join { .., nonce_j, proof }               (plain)
//!     proof = BLAKE3-keyed(auth, "join" | nonce_c | nonce_j | server)
//! coordinator -> member   Welcome { view } or Reject { reason }     (tagged)
//! ```
//!
//! Both then derive one key per direction from the two nonces, and every later frame's tag
//! covers a per-direction frame counter and the payload, so a frame cannot be forged,
//! altered, replayed or reordered within the session. The member knows the coordinator
//! holds the key when the first tagged frame verifies. `auth` is derived from the cluster
//! key with its own context, distinct from the key that signs actor frames.

use std::io::{self, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc::Sender;
use std::time::Duration;

use nflib::cluster::{ClusterView, EndpointInfo};
use nflib::msg::{Call, Reply};
use nflib::wire::EndpointAddr;
use serde::{Deserialize, Serialize};

use super::Event;
use crate::listen::DeadlineReader;

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
pub const PROTOCOL_VERSION: u32 = 8;
const MAX_FRAME: usize = 16 << 20;
/// The largest frame before the peer has proven it holds the key (a join names a server's
/// endpoints and chains: some kilobytes). Nothing larger is allocated for a stranger.
const MAX_HANDSHAKE_FRAME: usize = 256 << 10;
const TAG: usize = 16;
/// The whole handshake, every read of it together, not each read.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

pub type ConnId = u64;

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
        result: Result<Reply, String>,
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

/// What a member said about itself when it joined.
#[derive(Clone, Debug)]
pub struct JoinInfo {
    pub server: u16,
    pub name: String,
    pub incarnation: u64,
    pub endpoints: Vec<EndpointInfo>,
    pub chains: Vec<(String, [u8; 32])>,
    pub addr: SocketAddr,
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
    fn proof(&self, nonce_c: &[u8; 16], nonce_j: &[u8; 16], join: &JoinRequest) -> [u8; 32] {
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
    fn session(&self, nonce_c: &[u8; 16], nonce_j: &[u8; 16]) -> ([u8; 32], [u8; 32]) {
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

fn write_frame(w: &mut impl Write, msg: &PeerMsg, key: Option<(&[u8; 32], u64)>) -> io::Result<()> {
    let payload = postcard::to_stdvec(msg).map_err(|e| io::Error::other(e.to_string()))?;
    let mut frame = Vec::with_capacity(4 + payload.len() + TAG);
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(&payload);
    if let Some((k, counter)) = key {
        frame.extend_from_slice(&tag(k, counter, &payload));
    }
    w.write_all(&frame)
}

fn read_frame(
    r: &mut impl Read,
    key: Option<(&[u8; 32], u64)>,
    max: usize,
) -> Result<PeerMsg, String> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => "connection closed".to_string(),
        _ => e.to_string(),
    })?;
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(format!("frame of {len} bytes is too large"));
    }
    let extra = if key.is_some() { TAG } else { 0 };
    let mut buf = vec![0u8; len + extra];
    r.read_exact(&mut buf).map_err(|e| e.to_string())?;
    if let Some((k, counter)) = key {
        let want = tag(k, counter, &buf[..len]);
        let ok = want
            .iter()
            .zip(&buf[len..])
            .fold(0u8, |a, (x, y)| a | (x ^ y))
            == 0;
        if !ok {
            return Err("a frame failed authentication".into());
        }
    }
    postcard::from_bytes(&buf[..len]).map_err(|e| format!("undecodable frame: {e}"))
}

/// The sending half of an authenticated session (owned by the control thread).
pub struct PeerWriter {
    stream: TcpStream,
    key: [u8; 32],
    counter: u64,
}

impl PeerWriter {
    pub fn send(&mut self, msg: &PeerMsg) -> io::Result<()> {
        let r = write_frame(&mut self.stream, msg, Some((&self.key, self.counter)));
        self.counter += 1;
        r
    }

    /// Ends the session; the reader thread sees the connection close.
    pub fn close(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

/// The receiving half (owned by a reader thread).
pub struct PeerReader {
    stream: BufReader<TcpStream>,
    key: [u8; 32],
    counter: u64,
}

impl PeerReader {
    pub fn recv(&mut self) -> Result<PeerMsg, String> {
        let m = read_frame(&mut self.stream, Some((&self.key, self.counter)), MAX_FRAME);
        self.counter += 1;
        m
    }
}

fn nonce() -> io::Result<[u8; 16]> {
    let mut n = [0u8; 16];
    crate::sys::random_bytes(&mut n)?;
    Ok(n)
}

fn prepare(stream: &TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    // A peer whose socket buffer stays full this long is as good as dead.
    stream.set_write_timeout(Some(Duration::from_secs(2)))
}

/// Coordinator side of the handshake on an accepted connection.
pub fn accept(
    stream: TcpStream,
    auth: &AuthKey,
    me: u16,
) -> Result<(JoinInfo, PeerWriter, PeerReader), String> {
    let addr = stream.peer_addr().map_err(|e| e.to_string())?;
    prepare(&stream).map_err(|e| e.to_string())?;
    let nonce_c = nonce().map_err(|e| e.to_string())?;
    let mut s = &stream;
    write_frame(
        &mut s,
        &PeerMsg::Hello {
            version: PROTOCOL_VERSION,
            server: me,
            nonce: nonce_c,
        },
        None,
    )
    .map_err(|e| e.to_string())?;
    // Unbuffered until the session starts: nothing read ahead is left behind.
    let mut handshake = DeadlineReader::new(&stream, HANDSHAKE_TIMEOUT);
    let PeerMsg::Join {
        version,
        server,
        name,
        incarnation,
        nonce: nonce_j,
        proof,
        endpoints,
        chains,
    } = read_frame(&mut handshake, None, MAX_HANDSHAKE_FRAME)?
    else {
        return Err("the first frame was not a join".into());
    };
    if version != PROTOCOL_VERSION {
        return Err(format!(
            "protocol version {version} (this nfmgr speaks {PROTOCOL_VERSION})"
        ));
    }
    let said = JoinRequest {
        server,
        name,
        incarnation,
        endpoints,
        chains,
    };
    let want = auth.proof(&nonce_c, &nonce_j, &said);
    if want.iter().zip(&proof).fold(0u8, |a, (x, y)| a | (x ^ y)) != 0 {
        return Err(
            "wrong cluster key, or a join changed on its way (the join proof does not verify)"
                .into(),
        );
    }
    let (c2j, j2c) = auth.session(&nonce_c, &nonce_j);
    stream.set_read_timeout(None).map_err(|e| e.to_string())?;
    let reader = BufReader::new(stream.try_clone().map_err(|e| e.to_string())?);
    Ok((
        JoinInfo {
            server: said.server,
            name: said.name,
            incarnation: said.incarnation,
            endpoints: said.endpoints,
            chains: said.chains,
            addr,
        },
        PeerWriter {
            stream,
            key: c2j,
            counter: 0,
        },
        PeerReader {
            stream: reader,
            key: j2c,
            counter: 0,
        },
    ))
}

/// What a member tells the coordinator when it joins.
pub struct JoinRequest {
    pub server: u16,
    pub name: String,
    pub incarnation: u64,
    pub endpoints: Vec<EndpointInfo>,
    pub chains: Vec<(String, [u8; 32])>,
}

/// Why a join did not happen.
#[derive(Debug)]
pub enum JoinError {
    /// The coordinator declared this server dead while it lived on: fence, then join again.
    Fenced(String),
    Failed(String),
}

impl From<String> for JoinError {
    fn from(s: String) -> JoinError {
        JoinError::Failed(s)
    }
}

impl From<&str> for JoinError {
    fn from(s: &str) -> JoinError {
        JoinError::Failed(s.to_string())
    }
}

/// Member side: connects to the coordinator and joins. Returns the view it was welcomed
/// with and the two halves of the session.
pub fn join(
    addr: SocketAddr,
    auth: &AuthKey,
    req: JoinRequest,
) -> Result<(ClusterView, PeerWriter, PeerReader), JoinError> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| format!("cannot reach the coordinator at {addr}: {e}"))?;
    prepare(&stream).map_err(|e| e.to_string())?;
    let mut handshake = DeadlineReader::new(&stream, HANDSHAKE_TIMEOUT);
    let PeerMsg::Hello {
        version,
        server: coordinator,
        nonce: nonce_c,
    } = read_frame(&mut handshake, None, MAX_HANDSHAKE_FRAME)?
    else {
        return Err("the coordinator did not say hello".into());
    };
    if version != PROTOCOL_VERSION {
        return Err(format!(
            "the coordinator speaks protocol {version}, this nfmgr {PROTOCOL_VERSION}"
        )
        .into());
    }
    if coordinator == req.server {
        return Err(format!(
            "the coordinator has this server's id ({coordinator}); cluster.server_id must be unique"
        )
        .into());
    }
    let nonce_j = nonce().map_err(|e| e.to_string())?;
    let proof = auth.proof(&nonce_c, &nonce_j, &req);
    let mut s = &stream;
    write_frame(
        &mut s,
        &PeerMsg::Join {
            version: PROTOCOL_VERSION,
            server: req.server,
            name: req.name,
            incarnation: req.incarnation,
            nonce: nonce_j,
            proof,
            endpoints: req.endpoints,
            chains: req.chains,
        },
        None,
    )
    .map_err(|e| e.to_string())?;
    let (c2j, j2c) = auth.session(&nonce_c, &nonce_j);
    // The welcome (a view: up to MAX_FRAME) is authenticated, and read within the
    // handshake's deadline.
    let view = read_frame(&mut handshake, Some((&c2j, 0)), MAX_FRAME);
    let rd = PeerReader {
        stream: BufReader::new(stream.try_clone().map_err(|e| e.to_string())?),
        key: c2j,
        counter: 1,
    };
    let view = match view {
        Ok(PeerMsg::Welcome { view }) => view,
        Ok(PeerMsg::Reject { reason }) => {
            return Err(JoinError::Failed(format!(
                "the coordinator refused: {reason}"
            )))
        }
        Ok(PeerMsg::Fence { reason }) => return Err(JoinError::Fenced(reason)),
        Ok(_) => return Err(JoinError::Failed("unexpected answer to join".into())),
        Err(e) if e.contains("authentication") => {
            return Err(JoinError::Failed(
                "the coordinator does not hold this cluster key".into(),
            ))
        }
        Err(e) => return Err(JoinError::Failed(format!("join: {e}"))),
    };
    stream.set_read_timeout(None).map_err(|e| e.to_string())?;
    Ok((
        view,
        PeerWriter {
            stream,
            key: j2c,
            counter: 0,
        },
        rd,
    ))
}

/// Reads a session's frames until it ends, handing them to the control thread.
pub fn read_loop(conn: ConnId, mut reader: PeerReader, events: Sender<Event>) {
    loop {
        match reader.recv() {
            Ok(msg) => {
                if events.send(Event::PeerMsg { conn, msg }).is_err() {
                    return;
                }
            }
            Err(why) => {
                let _ = events.send(Event::PeerDown { conn, why });
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn request(name: &str) -> JoinRequest {
        JoinRequest {
            server: 2,
            name: name.into(),
            incarnation: 7,
            endpoints: Vec::new(),
            chains: vec![("main".into(), [1; 32])],
        }
    }

    /// Plays a member that proves `proved` but says `said`; returns the coordinator's
    /// verdict.
    fn join_as(proved: JoinRequest, said: JoinRequest) -> Result<JoinInfo, String> {
        let auth = AuthKey::derive(b"a cluster key for the test, long enough");
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let coord_auth = auth.clone();
        let coordinator = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            accept(s, &coord_auth, 1).map(|(info, _, _)| info)
        });
        let stream = TcpStream::connect(addr).unwrap();
        let mut r = DeadlineReader::new(&stream, HANDSHAKE_TIMEOUT);
        let Ok(PeerMsg::Hello { nonce: nonce_c, .. }) =
            read_frame(&mut r, None, MAX_HANDSHAKE_FRAME)
        else {
            panic!("no hello");
        };
        let nonce_j = [9u8; 16];
        let proof = auth.proof(&nonce_c, &nonce_j, &proved);
        let msg = PeerMsg::Join {
            version: PROTOCOL_VERSION,
            server: said.server,
            name: said.name,
            incarnation: said.incarnation,
            nonce: nonce_j,
            proof,
            endpoints: said.endpoints,
            chains: said.chains,
        };
        write_frame(&mut &stream, &msg, None).unwrap();
        coordinator.join().unwrap()
    }

    #[test]
    fn a_join_changed_on_its_way_does_not_verify() {
        let info = join_as(request("s2"), request("s2")).expect("an honest join");
        assert_eq!((info.server, info.name.as_str()), (2, "s2"));
        let e = join_as(request("s2"), request("evil")).unwrap_err();
        assert!(e.contains("does not verify"), "{e}");
        let mut more = request("s2");
        more.incarnation = 8;
        assert!(join_as(request("s2"), more).is_err());
    }

    /// A stranger's frame is refused by its length, before anything that size is
    /// allocated.
    #[test]
    fn a_stranger_cannot_make_the_coordinator_allocate_a_large_frame() {
        let mut bytes = ((MAX_HANDSHAKE_FRAME + 1) as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(&[0; 16]);
        let e = read_frame(&mut &bytes[..], None, MAX_HANDSHAKE_FRAME).unwrap_err();
        assert!(e.contains("too large"), "{e}");
    }
}

//! The managers' own protocol: TCP between each member nfmgr and the coordinator. The frames
//! and the handshake's keys are `nflib::peer_frame`; this is the sockets: each side's
//! handshake, a session's writer and reader, and the reader thread.

use std::io::{self, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc::Sender;
use std::time::Duration;

use nflib::cluster::{ClusterView, EndpointInfo};
use nflib::peer_frame::{read_frame, write_frame, MAX_FRAME, MAX_HANDSHAKE_FRAME};
pub use nflib::peer_frame::{
    AuthKey, JoinRequest, PeerFrameError, PeerMsg, RpcError, PROTOCOL_VERSION,
};

use super::Event;
use crate::listen::DeadlineReader;

/// The whole handshake, every read of it together, not each read.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// A session, as the control thread and the membership number them.
pub type ConnId = nflib::membership::SessionId;
pub use nflib::membership::JoinInfo;

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
    pub fn recv(&mut self) -> Result<PeerMsg, PeerFrameError> {
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

/// Why a handshake did not make a session: the coordinator's side (a join refused) and the
/// member's (a join that did not happen).
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// The socket (its options, a write, a clone) or the random source failed.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// A handshake frame could not be read.
    #[error(transparent)]
    Frame(#[from] PeerFrameError),
    /// Coordinator: the joiner's first frame was something else.
    #[error("the first frame was not a join")]
    NotAJoin,
    /// Coordinator: the joiner speaks another protocol.
    #[error("protocol version {0} (this nfmgr speaks {PROTOCOL_VERSION})")]
    JoinerVersion(u32),
    /// Coordinator: no accepted key verifies the join's proof.
    #[error("wrong cluster key, or a join changed on its way (the join proof does not verify)")]
    ProofFails,
    /// Member: no connection to the coordinator (see [`JoinError::nobody_listening`]).
    #[error("cannot reach the coordinator at {addr}: {source}")]
    Unreachable {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("the coordinator did not say hello")]
    NoHello,
    /// Member: the coordinator speaks another protocol.
    #[error("the coordinator speaks protocol {0}, this nfmgr {PROTOCOL_VERSION}")]
    CoordinatorVersion(u32),
    /// Member: the coordinator has this server's id.
    #[error("the coordinator has this server's id ({0}); cluster.server_id must be unique")]
    SameServerId(u16),
    #[error("the coordinator refused: {0}")]
    Refused(String),
    /// The coordinator declared this server dead while it lived on: fence, then join again.
    #[error("the coordinator fenced this server: {0}")]
    Fenced(String),
    #[error("unexpected answer to join")]
    UnexpectedAnswer,
    /// Member: the welcome's tag does not verify under this server's key.
    #[error("the coordinator does not hold this cluster key")]
    WrongKey,
    /// Member: the answer to the join could not be read.
    #[error("join: {0}")]
    NoWelcome(#[source] PeerFrameError),
}

impl JoinError {
    /// Nothing listens at the coordinator's address (its host refused the connection): its
    /// nfmgr is not running.
    pub fn nobody_listening(&self) -> bool {
        matches!(self, JoinError::Unreachable { source, .. }
            if source.kind() == io::ErrorKind::ConnectionRefused)
    }
}

/// Coordinator side of the handshake on an accepted connection.
pub fn accept(
    stream: TcpStream,
    keys: &[AuthKey],
    me: u16,
) -> Result<(JoinInfo, PeerWriter, PeerReader), JoinError> {
    let addr = stream.peer_addr()?;
    prepare(&stream)?;
    let nonce_c = nonce()?;
    let mut s = &stream;
    write_frame(
        &mut s,
        &PeerMsg::Hello {
            version: PROTOCOL_VERSION,
            server: me,
            nonce: nonce_c,
        },
        None,
    )?;
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
        return Err(JoinError::NotAJoin);
    };
    if version != PROTOCOL_VERSION {
        return Err(JoinError::JoinerVersion(version));
    }
    let said = JoinRequest {
        server,
        name,
        incarnation,
        endpoints,
        chains,
    };
    // Any accepted key (during a rotation, the member may still join with the old one);
    // the session's keys come from the one that verified.
    let Some(auth) = keys.iter().find(|k| {
        let want = k.proof(&nonce_c, &nonce_j, &said);
        want.iter().zip(&proof).fold(0u8, |a, (x, y)| a | (x ^ y)) == 0
    }) else {
        return Err(JoinError::ProofFails);
    };
    let (c2j, j2c) = auth.session(&nonce_c, &nonce_j);
    stream.set_read_timeout(None)?;
    let reader = BufReader::new(stream.try_clone()?);
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

/// Member side: connects to the coordinator and joins. Returns the view it was welcomed
/// with and the two halves of the session.
pub fn join(
    addr: SocketAddr,
    auth: &AuthKey,
    req: JoinRequest,
) -> Result<(ClusterView, Vec<EndpointInfo>, PeerWriter, PeerReader), JoinError> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|source| JoinError::Unreachable { addr, source })?;
    prepare(&stream)?;
    let mut handshake = DeadlineReader::new(&stream, HANDSHAKE_TIMEOUT);
    let PeerMsg::Hello {
        version,
        server: coordinator,
        nonce: nonce_c,
    } = read_frame(&mut handshake, None, MAX_HANDSHAKE_FRAME)?
    else {
        return Err(JoinError::NoHello);
    };
    if version != PROTOCOL_VERSION {
        return Err(JoinError::CoordinatorVersion(version));
    }
    if coordinator == req.server {
        return Err(JoinError::SameServerId(coordinator));
    }
    let nonce_j = nonce()?;
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
    )?;
    let (c2j, j2c) = auth.session(&nonce_c, &nonce_j);
    // The welcome (a view: up to MAX_FRAME) is authenticated, and read within the
    // handshake's deadline.
    let view = read_frame(&mut handshake, Some((&c2j, 0)), MAX_FRAME);
    let rd = PeerReader {
        stream: BufReader::new(stream.try_clone()?),
        key: c2j,
        counter: 1,
    };
    let (view, recover) = match view {
        Ok(PeerMsg::Welcome { view, recover }) => (view, recover),
        Ok(PeerMsg::Reject { reason }) => return Err(JoinError::Refused(reason)),
        Ok(PeerMsg::Fence { reason }) => return Err(JoinError::Fenced(reason)),
        Ok(_) => return Err(JoinError::UnexpectedAnswer),
        Err(PeerFrameError::Unauthenticated) => return Err(JoinError::WrongKey),
        Err(e) => return Err(JoinError::NoWelcome(e)),
    };
    stream.set_read_timeout(None)?;
    Ok((
        view,
        recover,
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
            Err(e) => {
                let why = e.to_string();
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
    fn join_as(proved: JoinRequest, said: JoinRequest) -> Result<JoinInfo, JoinError> {
        let auth = AuthKey::derive(b"a cluster key for the test, long enough");
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let coord_auth = auth.clone();
        let coordinator = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            accept(s, std::slice::from_ref(&coord_auth), 1).map(|(info, _, _)| info)
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
        assert!(matches!(e, JoinError::ProofFails), "{e}");
        assert!(e.to_string().contains("does not verify"), "{e}");
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
        assert!(matches!(e, PeerFrameError::TooLarge(_)), "{e}");
    }
}

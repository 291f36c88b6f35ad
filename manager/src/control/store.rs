//! The cluster's state in etcd (`[cluster] store = "etcd"`): the coordinator election and
//! the coordinator's journal, kept where they outlive any one server.
//!
//! Every nfmgr campaigns in one etcd election (`PREFIX/coordinator`) with a lease it
//! renews; the one elected is the coordinator, and its campaign value (`SERVER ADDR`) tells
//! the others where to join it. The coordinator writes its journal to `PREFIX/journal`
//! only while it holds the leadership (a transaction that compares the election key's
//! revision), and the next one elected carries on from it
//! ([`Membership::elected`](nflib::membership::Membership::elected)). When the lease
//! cannot be renewed (etcd out of reach, or the nfmgr starved past its lease) the
//! coordinator pauses: it changes nothing until etcd elects a coordinator, and the data
//! plane never waits on any of this. docs/MESSAGING.md, "Coordinators on etcd".
//!
//! The etcd client is asynchronous: it runs on a thread of its own with a single-threaded
//! runtime, and talks to the control thread through its event channel (what etcd decided)
//! and a command channel (journals to write, a resignation).

use std::net::SocketAddr;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

use super::Event;

/// What etcd decided, for the control thread.
#[derive(Debug)]
#[cfg_attr(not(feature = "etcd"), allow(dead_code))]
pub enum StoreEvent {
    /// This nfmgr is the coordinator now; `journal` is what the last one wrote (the bytes
    /// of `PREFIX/journal`, none in a new cluster).
    Elected { journal: Option<Vec<u8>> },
    /// Server `server`, at `addr`, is the coordinator now.
    Coordinator { server: u16, addr: SocketAddr },
    /// This coordinator's lease lapsed or etcd is out of reach: it has no say until etcd
    /// elects a coordinator (maybe itself again).
    Lapsed { why: String },
}

/// What the status shows of the store.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct StoreStatus {
    pub endpoints: Vec<String>,
    pub prefix: String,
    /// A session with etcd (a lease) is up.
    pub connected: bool,
    /// This nfmgr holds the leadership.
    pub elected: bool,
    /// The coordinator etcd names (server, address).
    pub leader: Option<(u16, String)>,
    pub last_error: Option<String>,
}

/// The control thread's side of the store thread.
pub struct Store {
    #[cfg(feature = "etcd")]
    cmds: tokio::sync::mpsc::UnboundedSender<etcd::Cmd>,
    status: Arc<Mutex<StoreStatus>>,
}

/// What the store needs to know of this nfmgr.
#[cfg_attr(not(feature = "etcd"), allow(dead_code))]
pub struct StoreSettings {
    pub endpoints: Vec<String>,
    pub prefix: String,
    pub me: u16,
    /// Where the others join this nfmgr if it is elected.
    pub advertise: SocketAddr,
    pub lease_s: u32,
}

impl Store {
    /// Whether this nfmgr was built with the etcd client.
    pub const BUILT: bool = cfg!(feature = "etcd");

    /// Starts the store thread: it connects (and reconnects) to etcd and campaigns.
    #[cfg(feature = "etcd")]
    pub fn spawn(settings: StoreSettings, events: Sender<Event>) -> std::io::Result<Store> {
        let status = Arc::new(Mutex::new(StoreStatus {
            endpoints: settings.endpoints.clone(),
            prefix: settings.prefix.clone(),
            ..StoreStatus::default()
        }));
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let shared = status.clone();
        std::thread::Builder::new()
            .name("etcd".into())
            .spawn(move || {
                // A coordinator whose etcd client is gone has no lease to count on.
                let tell = events.clone();
                let run = std::panic::AssertUnwindSafe(|| etcd::run(settings, events, rx, shared));
                if std::panic::catch_unwind(run).is_err() {
                    let why = "the etcd client failed".to_string();
                    let _ = tell.send(Event::Store(StoreEvent::Lapsed { why }));
                }
            })?;
        Ok(Store { cmds: tx, status })
    }

    /// Without the etcd client: configuration refused at start (see `main`).
    #[cfg(not(feature = "etcd"))]
    pub fn spawn(_: StoreSettings, _: Sender<Event>) -> std::io::Result<Store> {
        Err(std::io::Error::other(
            "this nfmgr was built without etcd (cargo build --features nf-manager/etcd)",
        ))
    }

    /// Writes the coordinator's journal (if this nfmgr still leads).
    pub fn write(&self, _journal: Vec<u8>) {
        #[cfg(feature = "etcd")]
        let _ = self.cmds.send(etcd::Cmd::Write(_journal));
    }

    /// The coordinator at `addr` is gone (nothing listens there): revokes its lease if
    /// etcd still names it, so that the next is elected at once.
    pub fn depose(&self, _addr: SocketAddr) {
        #[cfg(feature = "etcd")]
        let _ = self.cmds.send(etcd::Cmd::Depose(_addr));
    }

    /// Gives up the leadership and the lease (this nfmgr stops): another is elected at
    /// once, without waiting for the lease to run out. Waits for etcd's answer, a second
    /// at most.
    pub fn resign(&self) {
        #[cfg(feature = "etcd")]
        {
            let (done, resigned) = std::sync::mpsc::channel();
            if self.cmds.send(etcd::Cmd::Resign(done)).is_ok() {
                let _ = resigned.recv_timeout(std::time::Duration::from_secs(1));
            }
        }
    }

    pub fn status(&self) -> StoreStatus {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

/// A campaign value: `SERVER ADDR`.
#[cfg_attr(not(feature = "etcd"), allow(dead_code))]
fn campaign_value(server: u16, addr: SocketAddr) -> String {
    format!("{server} {addr}")
}

#[cfg_attr(not(feature = "etcd"), allow(dead_code))]
fn parse_campaign_value(v: &[u8]) -> Option<(u16, SocketAddr)> {
    let s = std::str::from_utf8(v).ok()?;
    let (server, addr) = s.trim().split_once(' ')?;
    Some((server.parse().ok()?, addr.parse().ok()?))
}

#[cfg(feature = "etcd")]
mod etcd {
    use std::sync::mpsc::Sender;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use etcd_client::{
        Client, Compare, CompareOp, ConnectOptions, LeaderKey, ResignOptions, Txn, TxnOp,
    };
    use tokio::sync::mpsc::UnboundedReceiver;

    use super::{campaign_value, parse_campaign_value, StoreEvent, StoreSettings, StoreStatus};
    use crate::control::Event;

    pub enum Cmd {
        Write(Vec<u8>),
        Depose(std::net::SocketAddr),
        /// Resign and stop, then say so on the channel.
        Resign(std::sync::mpsc::Sender<()>),
    }

    /// How long one request to etcd (not a campaign) may take.
    const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
    /// Between two attempts to reach etcd.
    const RETRY: Duration = Duration::from_millis(500);
    /// How long a session given up tries to revoke its lease.
    const REVOKE_TIMEOUT: Duration = Duration::from_millis(500);

    enum Exit {
        /// Resigned, or the control thread is gone.
        Stop,
    }

    type Shared = Arc<Mutex<StoreStatus>>;

    /// Why a session with etcd ended (it is then tried again; a coordinator's lease is gone).
    #[derive(Debug, thiserror::Error)]
    enum SessionError {
        /// A request (`what`) had no answer within REQUEST_TIMEOUT.
        #[error("{what}: no answer within {REQUEST_TIMEOUT:?}")]
        NoAnswer { what: &'static str },
        /// etcd answered a request (`what`) with an error.
        #[error("{what}: {source}")]
        Etcd {
            what: &'static str,
            #[source]
            source: etcd_client::Error,
        },
        /// Two thirds of the lease went by without a renewal.
        #[error("the lease was not renewed in time")]
        NotRenewed,
        #[error("the lease expired")]
        Expired,
        #[error("campaign: no leader key")]
        NoLeaderKey,
        /// The journal's write found another coordinator elected.
        #[error("no longer the elected coordinator")]
        NotLeader,
        /// The observer task ended without saying why.
        #[error("the observation of the election ended")]
        ObserverGone,
        /// etcd ended the observation.
        #[error("etcd ended the observation of the election")]
        ObservationEnded,
    }

    /// An etcd error as the reason a session ends: what it was doing, then the error.
    fn failed(what: &'static str) -> impl Fn(etcd_client::Error) -> SessionError {
        move |source| SessionError::Etcd { what, source }
    }

    fn set(status: &Shared, f: impl FnOnce(&mut StoreStatus)) {
        if let Ok(mut s) = status.lock() {
            f(&mut s);
        }
    }

    pub fn run(
        settings: StoreSettings,
        events: Sender<Event>,
        mut cmds: UnboundedReceiver<Cmd>,
        status: Shared,
    ) {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                let why = format!("cannot start the etcd client's runtime: {e}");
                tracing::error!("{why}");
                let _ = events.send(Event::Store(StoreEvent::Lapsed { why }));
                return;
            }
        };
        rt.block_on(async {
            let mut last_error = String::new();
            loop {
                let mut elected = false;
                let r = session(&settings, &events, &mut cmds, &status, &mut elected).await;
                set(&status, |s| {
                    s.connected = false;
                    s.elected = false;
                });
                let why = match r {
                    Ok(Exit::Stop) => return,
                    Err(e) => e.to_string(),
                };
                if elected {
                    let lapsed = StoreEvent::Lapsed { why: why.clone() };
                    if events.send(Event::Store(lapsed)).is_err() {
                        return;
                    }
                }
                if why != last_error {
                    tracing::warn!("etcd: {why}; trying again");
                    last_error = why.clone();
                }
                set(&status, |s| s.last_error = Some(why));
                tokio::time::sleep(RETRY).await;
            }
        });
    }

    /// One session with etcd: a lease, a campaign, the leader observed. Ends with an error
    /// when etcd is lost or the lease lapses (`elected` tells whether this nfmgr had been
    /// elected in it); its lease is then revoked if etcd can still be told, so that no
    /// campaign of a session given up can win.
    async fn session(
        s: &StoreSettings,
        events: &Sender<Event>,
        cmds: &mut UnboundedReceiver<Cmd>,
        status: &Shared,
        elected: &mut bool,
    ) -> Result<Exit, SessionError> {
        let timed = |what: &'static str| move |_| SessionError::NoAnswer { what };
        // (No HTTP/2 keep-alive pings: etcd closes connections that ping more often than
        // every 5 s, and a lost etcd shows in the lease's renewals anyway.)
        let opts = ConnectOptions::new().with_connect_timeout(REQUEST_TIMEOUT);
        let client =
            tokio::time::timeout(REQUEST_TIMEOUT, Client::connect(&s.endpoints, Some(opts)))
                .await
                .map_err(timed("cannot connect"))?
                .map_err(failed("cannot connect"))?;
        // Orders of an earlier session are stale: a journal it did not get to write may be
        // older than what another coordinator wrote since, a deposition is about a
        // coordinator of then.
        while let Ok(cmd) = cmds.try_recv() {
            if let Cmd::Resign(done) = cmd {
                let _ = done.send(());
                return Ok(Exit::Stop);
            }
        }
        let ttl = i64::from(s.lease_s);
        let mut leases = client.lease_client();
        let id = tokio::time::timeout(REQUEST_TIMEOUT, leases.grant(ttl, None))
            .await
            .map_err(timed("lease"))?
            .map_err(failed("lease"))?
            .id();
        let r = with_lease(s, events, cmds, status, elected, &client, id).await;
        if r.is_err() {
            let _ = tokio::time::timeout(REVOKE_TIMEOUT, leases.revoke(id)).await;
        }
        r
    }

    /// The session's work under lease `id`.
    async fn with_lease(
        s: &StoreSettings,
        events: &Sender<Event>,
        cmds: &mut UnboundedReceiver<Cmd>,
        status: &Shared,
        elected: &mut bool,
        client: &Client,
        id: i64,
    ) -> Result<Exit, SessionError> {
        let lapsed = || SessionError::NotRenewed;
        let mut leases = client.lease_client();
        let (mut keeper, mut acks) = tokio::time::timeout(REQUEST_TIMEOUT, leases.keep_alive(id))
            .await
            .map_err(|_| lapsed())?
            .map_err(failed("lease"))?;
        let name = format!("{}/coordinator", s.prefix);
        let journal_key = format!("{}/journal", s.prefix);
        // The leader, as etcd names it, on a task of its own: etcd answers an observation
        // only once there is a leader to tell of, and this nfmgr's campaign may be what
        // makes one.
        let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
        let observer = tokio::spawn(observe(client.election_client(), name.clone(), seen_tx));
        let _stop_observing = AbortOnDrop(observer);
        let campaign = {
            let mut election = client.election_client();
            let (name, value) = (name.clone(), campaign_value(s.me, s.advertise));
            async move { election.campaign(name, value, id).await }
        };
        tokio::pin!(campaign);
        set(status, |st| {
            st.connected = true;
            st.last_error = None;
        });
        let mut kv = client.kv_client();
        let mut leader: Option<LeaderKey> = None;
        // The coordinator etcd names, and the lease it holds.
        let mut named: Option<(u16, std::net::SocketAddr, i64)> = None;
        // The lease is renewed three times a lease. Without an answer for two thirds of it,
        // this nfmgr stops counting on it, before etcd lets it run out and elects another:
        // a deadline no request of this loop may outlast.
        let lease = Duration::from_secs(u64::from(s.lease_s));
        let mut renew = tokio::time::interval(lease / 3);
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut good_until = tokio::time::Instant::now() + lease * 2 / 3;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(good_until) => return Err(lapsed()),
                won = &mut campaign, if leader.is_none() => {
                    let won = won.map_err(failed("campaign"))?;
                    let key = won.leader().cloned().ok_or(SessionError::NoLeaderKey)?;
                    let got = tokio::time::timeout_at(good_until, kv.get(journal_key.clone(), None))
                        .await
                        .map_err(|_| lapsed())?
                        .map_err(failed("read the journal"))?;
                    let journal = got.kvs().first().map(|kv| kv.value().to_vec());
                    leader = Some(key);
                    *elected = true;
                    set(status, |st| st.elected = true);
                    if events.send(Event::Store(StoreEvent::Elected { journal })).is_err() {
                        return Ok(Exit::Stop);
                    }
                }
                leader_is = seen.recv() => {
                    let (server, addr, lease) = leader_is.ok_or(SessionError::ObserverGone)??;
                    named = Some((server, addr, lease));
                    set(status, |st| st.leader = Some((server, addr.to_string())));
                    if server != s.me
                        && events.send(Event::Store(StoreEvent::Coordinator { server, addr })).is_err()
                    {
                        return Ok(Exit::Stop);
                    }
                }
                _ = renew.tick() => {
                    tokio::time::timeout_at(good_until, keeper.keep_alive())
                        .await
                        .map_err(|_| lapsed())?
                        .map_err(failed("renew the lease"))?;
                }
                ack = acks.message() => {
                    match ack.map_err(failed("renew the lease"))? {
                        Some(a) if a.ttl() > 0 => {
                            good_until = tokio::time::Instant::now() + lease * 2 / 3;
                        }
                        _ => return Err(SessionError::Expired),
                    }
                }
                cmd = cmds.recv() => match cmd {
                    Some(Cmd::Write(bytes)) => {
                        let Some(key) = &leader else { continue };
                        // Written only while this nfmgr leads: a coordinator that lost the
                        // election without knowing it yet cannot overwrite its successor's.
                        let txn = Txn::new()
                            .when([Compare::create_revision(key.key(), CompareOp::Equal, key.rev())])
                            .and_then([TxnOp::put(journal_key.clone(), bytes, None)]);
                        let done = tokio::time::timeout_at(good_until, kv.txn(txn))
                            .await
                            .map_err(|_| lapsed())?
                            .map_err(failed("write the journal"))?;
                        if !done.succeeded() {
                            return Err(SessionError::NotLeader);
                        }
                    }
                    Some(Cmd::Depose(addr)) => {
                        // Only the lease of the coordinator at `addr` that etcd names now,
                        // and never this nfmgr's own.
                        if let Some((server, at, lease)) = named {
                            if at == addr && server != s.me && leader.is_none() {
                                let revoke = leases.revoke(lease);
                                let deadline = good_until.min(tokio::time::Instant::now() + REQUEST_TIMEOUT);
                                if tokio::time::timeout_at(deadline, revoke).await.is_ok_and(|r| r.is_ok()) {
                                    tracing::info!(
                                        "etcd: revoked the lease of coordinator {server} ({addr}): nothing listens there"
                                    );
                                }
                                named = None;
                            }
                        }
                    }
                    cmd @ (Some(Cmd::Resign(_)) | None) => {
                        if let Some(key) = leader.take() {
                            let mut election = client.election_client();
                            let resign = election.resign(Some(ResignOptions::new().with_leader(key)));
                            let _ = tokio::time::timeout(REQUEST_TIMEOUT, resign).await;
                        }
                        let _ = tokio::time::timeout(REQUEST_TIMEOUT, leases.revoke(id)).await;
                        if let Some(Cmd::Resign(done)) = cmd {
                            let _ = done.send(());
                        }
                        return Ok(Exit::Stop);
                    }
                },
            }
        }
    }

    /// Aborts a task when dropped (a session's observer ends with the session).
    struct AbortOnDrop(tokio::task::JoinHandle<()>);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }

    /// Tells `out` of every leader etcd elects under `name` (server, address and lease),
    /// and of the error that ends the observation.
    async fn observe(
        mut election: etcd_client::ElectionClient,
        name: String,
        out: tokio::sync::mpsc::UnboundedSender<
            Result<(u16, std::net::SocketAddr, i64), SessionError>,
        >,
    ) {
        let observing = failed("observe the election");
        let mut stream = match election.observe(name).await {
            Ok(s) => s,
            Err(e) => {
                let _ = out.send(Err(observing(e)));
                return;
            }
        };
        loop {
            let next = match stream.message().await {
                Ok(Some(r)) => match r
                    .kv()
                    .and_then(|kv| Some((parse_campaign_value(kv.value())?, kv.lease())))
                {
                    Some(((server, addr), lease)) => Ok((server, addr, lease)),
                    None => continue,
                },
                Ok(None) => Err(SessionError::ObservationEnded),
                Err(e) => Err(observing(e)),
            };
            let last = next.is_err();
            if out.send(next).is_err() || last {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn campaign_values_read_back_and_garbage_is_none() {
        let a: SocketAddr = "10.0.0.2:7000".parse().unwrap();
        let v = campaign_value(7, a);
        assert_eq!(parse_campaign_value(v.as_bytes()), Some((7, a)));
        for bad in [
            &b""[..],
            b"7",
            b"x 10.0.0.2:7000",
            b"7 nowhere",
            b"\xff\xfe",
        ] {
            assert_eq!(parse_campaign_value(bad), None);
        }
    }
}

//! What every listener of nfmgr (the cluster port, the control socket, the metrics port)
//! needs against clients that connect and then do nothing useful: a bound on connections
//! served at once, a deadline for a whole request or handshake (not per read: a client
//! that trickles a byte every few seconds never trips a per-read timeout), and an accept
//! loop that backs off when accepting fails (out of descriptors, say) instead of spinning.

use std::io::{self, Read};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// At most `max` connections served at once.
#[derive(Clone)]
pub struct Limit {
    live: Arc<AtomicUsize>,
    max: usize,
}

/// One connection's place under a [`Limit`], given back when dropped.
pub struct Place(Arc<AtomicUsize>);

impl Drop for Place {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Limit {
    pub fn new(max: usize) -> Limit {
        Limit {
            live: Arc::new(AtomicUsize::new(0)),
            max,
        }
    }

    /// A place, or `None` when `max` connections are being served.
    pub fn try_take(&self) -> Option<Place> {
        self.live
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()
            .map(|_| Place(self.live.clone()))
    }
}

/// Sleeps after failed accepts: 10 ms doubling to 1 s, back to nothing after a success.
/// Failing to accept is nearly always a shortage (descriptors, memory) that retrying at
/// once cannot cure and that a spinning loop would only make worse for the rest of
/// the process.
#[derive(Default)]
pub struct AcceptBackoff {
    failures: u32,
}

impl AcceptBackoff {
    pub fn ok(&mut self) {
        self.failures = 0;
    }

    /// Call after a failed accept: logs the first of a streak, then waits.
    pub fn failed(&mut self, what: &str, e: &io::Error) {
        if self.failures == 0 {
            tracing::warn!("{what}: accepting a connection failed ({e}); backing off");
        }
        self.failures = self.failures.saturating_add(1);
        std::thread::sleep(self.delay());
    }

    fn delay(&self) -> Duration {
        let exp = self.failures.saturating_sub(1).min(7);
        Duration::from_millis(10 << exp).min(Duration::from_secs(1))
    }
}

/// A socket whose read timeout can be set (TCP and Unix stream sockets).
pub trait TimedSocket {
    fn set_timeout(&self, d: Option<Duration>) -> io::Result<()>;
    fn read_some(&self, buf: &mut [u8]) -> io::Result<usize>;
}

impl TimedSocket for TcpStream {
    fn set_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(d)
    }
    fn read_some(&self, buf: &mut [u8]) -> io::Result<usize> {
        let mut s = self;
        s.read(buf)
    }
}

impl TimedSocket for UnixStream {
    fn set_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(d)
    }
    fn read_some(&self, buf: &mut [u8]) -> io::Result<usize> {
        let mut s = self;
        s.read(buf)
    }
}

impl<T: TimedSocket> TimedSocket for &T {
    fn set_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        (**self).set_timeout(d)
    }
    fn read_some(&self, buf: &mut [u8]) -> io::Result<usize> {
        (**self).read_some(buf)
    }
}

/// Reads from a socket until a deadline for everything read through it: each read waits
/// at most what is left, and once the deadline passed every read fails (`TimedOut`).
pub struct DeadlineReader<S> {
    socket: S,
    until: Instant,
}

impl<S: TimedSocket> DeadlineReader<S> {
    pub fn new(socket: S, within: Duration) -> DeadlineReader<S> {
        DeadlineReader {
            socket,
            until: Instant::now() + within,
        }
    }

    /// A new deadline, `within` from now (the next request of a connection).
    pub fn renew(&mut self, within: Duration) {
        self.until = Instant::now() + within;
    }
}

impl<S: TimedSocket> Read for DeadlineReader<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the peer took too long",
            ));
        }
        self.socket.set_timeout(Some(left))?;
        match self.socket.read_some(buf) {
            // The socket's own timeout (what was left of the deadline) ran out.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the peer took too long",
            )),
            r => r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::TcpListener;

    #[test]
    fn a_limit_gives_max_places_and_takes_them_back() {
        let l = Limit::new(2);
        let a = l.try_take().unwrap();
        let _b = l.try_take().unwrap();
        assert!(l.try_take().is_none());
        drop(a);
        assert_eq!(l.live.load(Ordering::Acquire), 1);
        assert!(l.try_take().is_some());
    }

    #[test]
    fn backoff_doubles_to_a_second() {
        let mut b = AcceptBackoff::default();
        let delays: Vec<u64> = (1..=9)
            .map(|n| {
                b.failures = n;
                b.delay().as_millis() as u64
            })
            .collect();
        assert_eq!(delays, [10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        b.ok();
        assert_eq!(b.failures, 0);
    }

    /// A client that sends a byte every 100 ms never trips a 300 ms per-read timeout, but
    /// a deadline of 300 ms for the whole read cuts it off.
    #[test]
    fn a_trickling_client_meets_the_deadline() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let client = std::thread::spawn(move || {
            let mut c = TcpStream::connect(addr).unwrap();
            for _ in 0..20 {
                if c.write_all(b"x").is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let (s, _) = listener.accept().unwrap();
        let mut r = DeadlineReader::new(s, Duration::from_millis(300));
        let mut buf = [0u8; 64];
        let err = r.read_exact(&mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        drop(r);
        client.join().unwrap();
    }
}

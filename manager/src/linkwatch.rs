//! Liveness on the cluster link itself, as an I/O-free state machine run by the relay.
//!
//! The control connection's heartbeat (`heartbeat_ms`, `member_timeout_ms`) is TCP between
//! control threads: it notices a dead nfmgr at once (the connection closes) but a cut link
//! only after half a second of silence. The link watch notices a cut link in tens of
//! milliseconds: every nfmgr's data-plane thread sends every member server a beat each
//! `link_beat_ms` out of the cluster port, counts any authenticated frame from a server
//! (beat, actor frame, data, acknowledgement) as hearing it, and reports a server not heard
//! for `link_misses` beats. The coordinator then treats that server as dead and recovers
//! its flows (docs/REPLICATION.md, "Failure detection").
//!
//! No false alarm from a starved machine: a silence is judged only while this thread
//! itself ran; after a gap of half the window in its own turns (the process was
//! descheduled, the machine overloaded), every peer counts as just heard.

use std::collections::BTreeMap;

/// A change in what the link says about a server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkChange {
    /// Not heard for `silent_ns`.
    Down { server: u16, silent_ns: u64 },
    /// Heard again after being reported down.
    Up { server: u16 },
}

#[derive(Clone, Copy, Debug)]
struct Peer {
    last_heard_ns: u64,
    down: bool,
    /// Judged only once heard: a server that just joined starts beating when its own
    /// view arrives, which may take longer than the window (its control connection's
    /// heartbeat covers it until then).
    heard: bool,
}

#[derive(Debug)]
pub struct LinkWatch {
    beat_ns: u64,
    window_ns: u64,
    next_beat_ns: u64,
    last_run_ns: u64,
    peers: BTreeMap<u16, Peer>,
}

impl LinkWatch {
    /// `None` when the watch is off (`link_beat_ms = 0`).
    pub fn new(beat_ms: u64, misses: u32, now_ns: u64) -> Option<LinkWatch> {
        if beat_ms == 0 {
            return None;
        }
        let beat_ns = beat_ms.saturating_mul(1_000_000);
        Some(LinkWatch {
            beat_ns,
            window_ns: beat_ns.saturating_mul(u64::from(misses.max(2))),
            next_beat_ns: now_ns,
            last_run_ns: now_ns,
            peers: BTreeMap::new(),
        })
    }

    /// The servers to watch (the live members but this one): a new one is judged from
    /// its first frame on; one no longer listed is forgotten.
    pub fn set_members(&mut self, servers: &[u16], now_ns: u64) {
        self.peers.retain(|s, _| servers.contains(s));
        for &s in servers {
            self.peers.entry(s).or_insert(Peer {
                last_heard_ns: now_ns,
                down: false,
                heard: false,
            });
        }
    }

    /// The servers beats go to.
    pub fn peers(&self) -> impl Iterator<Item = u16> + '_ {
        self.peers.keys().copied()
    }

    /// An authenticated frame came from `server`.
    pub fn heard(&mut self, server: u16, now_ns: u64) -> Option<LinkChange> {
        let p = self.peers.get_mut(&server)?;
        p.last_heard_ns = p.last_heard_ns.max(now_ns);
        p.heard = true;
        if p.down {
            p.down = false;
            return Some(LinkChange::Up { server });
        }
        None
    }

    /// Whether beats are due now (then the next ones are due a beat later).
    pub fn beat_due(&mut self, now_ns: u64) -> bool {
        if now_ns < self.next_beat_ns {
            return false;
        }
        // Skipped beats are not made up: one now, the next a beat from now.
        self.next_beat_ns = now_ns.saturating_add(self.beat_ns);
        true
    }

    /// Judges every peer's silence; appends each newly silent one to `out`.
    pub fn check(&mut self, now_ns: u64, out: &mut Vec<LinkChange>) {
        let gap = now_ns.saturating_sub(self.last_run_ns);
        self.last_run_ns = self.last_run_ns.max(now_ns);
        if gap > self.window_ns / 2 {
            // This thread did not run for a while: what arrived meanwhile is still
            // waiting to be read, so nobody's silence can be judged yet.
            for p in self.peers.values_mut() {
                p.last_heard_ns = p.last_heard_ns.max(now_ns);
            }
            return;
        }
        for (&server, p) in &mut self.peers {
            let silent_ns = now_ns.saturating_sub(p.last_heard_ns);
            if p.heard && !p.down && silent_ns > self.window_ns {
                p.down = true;
                out.push(LinkChange::Down { server, silent_ns });
            }
        }
    }

    /// When the watch must run next (the next beat), in `mono_ns` time.
    pub fn next_deadline_ns(&self) -> u64 {
        self.next_beat_ns
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    /// Runs the watch every `step` ms from `from` to `to`, with `hear(t)` saying whether
    /// server 2 was heard at t; returns the changes and when they came.
    fn run(
        w: &mut LinkWatch,
        from: u64,
        to: u64,
        step: u64,
        hear: impl Fn(u64) -> bool,
    ) -> Vec<(u64, LinkChange)> {
        let mut got = Vec::new();
        let mut t = from;
        while t <= to {
            if hear(t) {
                if let Some(c) = w.heard(2, t * MS) {
                    got.push((t, c));
                }
            }
            let mut out = Vec::new();
            w.check(t * MS, &mut out);
            got.extend(out.into_iter().map(|c| (t, c)));
            t += step;
        }
        got
    }

    #[test]
    fn a_cut_link_is_reported_after_the_window_and_its_return_once() {
        let mut w = LinkWatch::new(10, 4, 0).unwrap();
        w.set_members(&[2], 0);
        // Heard every 10 ms until 100, then nothing until 300, then again.
        let got = run(&mut w, 0, 400, 1, |t| {
            t % 10 == 0 && !(101..300).contains(&t)
        });
        assert_eq!(got.len(), 2, "{got:?}");
        let (t, c) = got[0];
        assert!(matches!(c, LinkChange::Down { server: 2, .. }));
        assert!((140..=142).contains(&t), "reported at {t} ms");
        assert_eq!(got[1], (300, LinkChange::Up { server: 2 }));
    }

    #[test]
    fn a_starved_watcher_does_not_report_a_silence_it_did_not_see() {
        let mut w = LinkWatch::new(10, 4, 0).unwrap();
        w.set_members(&[2], 0);
        let mut out = Vec::new();
        w.heard(2, 5 * MS);
        w.check(5 * MS, &mut out);
        // This thread does not run for 100 ms; the peer's beats wait in the socket.
        w.check(105 * MS, &mut out);
        assert!(out.is_empty(), "{out:?}");
        w.heard(2, 106 * MS);
        w.check(110 * MS, &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn beats_are_due_each_interval_and_members_come_and_go() {
        let mut w = LinkWatch::new(10, 4, 0).unwrap();
        assert!(w.beat_due(0));
        assert!(!w.beat_due(9 * MS));
        assert!(w.beat_due(10 * MS));
        // Late: one beat, not the missed ones.
        assert!(w.beat_due(55 * MS));
        assert!(!w.beat_due(60 * MS));
        assert_eq!(w.next_deadline_ns(), 65 * MS);
        w.set_members(&[2, 3], 0);
        assert_eq!(w.peers().collect::<Vec<_>>(), vec![2, 3]);
        w.set_members(&[3], 0);
        assert_eq!(w.peers().collect::<Vec<_>>(), vec![3]);
        assert_eq!(w.heard(2, MS), None, "a server not watched is ignored");
        assert!(LinkWatch::new(0, 4, 0).is_none());
    }

    #[test]
    fn a_new_member_is_judged_only_once_heard() {
        let mut w = LinkWatch::new(10, 4, 0).unwrap();
        w.set_members(&[2], 0);
        let got = run(&mut w, 0, 200, 1, |t| t >= 150);
        assert!(got.is_empty(), "{got:?}");
        let got = run(&mut w, 201, 300, 1, |_| false);
        assert!(
            matches!(
                got.as_slice(),
                [(191.., LinkChange::Down { server: 2, .. })]
            ),
            "{got:?}"
        );
    }
}

//! A hashed timer wheel for flow expiry.
//!
//! Each flow has at most one live entry, tagged with the flow's timer generation; entries
//! whose generation no longer matches are stale and skipped. Deadlines are re-checked when an
//! entry fires (a flow that saw packets since is re-armed), so packets never touch the wheel.
//! Deadlines beyond the wheel's horizon park in the last bucket and are re-armed on firing.

/// One timer entry: a flow row and the generation it was armed with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub row: u32,
    pub gen: u32,
}

pub struct TimerWheel {
    buckets: Vec<Vec<Entry>>,
    tick_ms: u64,
    /// Time (ms) of the bucket at `cursor`.
    now_ms: u64,
    cursor: usize,
}

impl TimerWheel {
    /// `buckets` of `tick_ms` each: the horizon is their product.
    pub fn new(buckets: usize, tick_ms: u64, start_ms: u64) -> TimerWheel {
        TimerWheel {
            buckets: (0..buckets.max(2)).map(|_| Vec::new()).collect(),
            tick_ms: tick_ms.max(1),
            now_ms: start_ms,
            cursor: 0,
        }
    }

    /// Arms `entry` to fire at `deadline_ms` (at the latest one tick after it).
    pub fn arm(&mut self, entry: Entry, deadline_ms: u64) {
        let n = self.buckets.len() as u64;
        let ticks = deadline_ms
            .saturating_sub(self.now_ms)
            .div_ceil(self.tick_ms);
        let ticks = ticks.clamp(1, n - 1);
        let b = (self.cursor as u64 + ticks) % n;
        self.buckets[b as usize].push(entry);
    }

    /// Moves time to `now_ms`, appending every entry whose bucket passed to `fired`. Stops
    /// early once `fired` holds `limit` entries (the rest fire on the next call).
    pub fn advance(&mut self, now_ms: u64, fired: &mut Vec<Entry>, limit: usize) {
        while self.now_ms + self.tick_ms <= now_ms {
            let next = (self.cursor + 1) % self.buckets.len();
            let bucket = &mut self.buckets[next];
            let room = limit.saturating_sub(fired.len());
            if bucket.len() > room {
                let keep = bucket.len() - room;
                fired.extend(bucket.drain(keep..));
                return;
            }
            fired.append(bucket);
            self.cursor = next;
            self.now_ms += self.tick_ms;
        }
    }

    pub fn len(&self) -> usize {
        self.buckets.iter().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_at_the_deadline_not_before() {
        let mut w = TimerWheel::new(16, 10, 0);
        w.arm(Entry { row: 1, gen: 0 }, 35);
        w.arm(Entry { row: 2, gen: 0 }, 5);
        let mut fired = Vec::new();
        w.advance(9, &mut fired, 100);
        assert!(fired.is_empty());
        w.advance(10, &mut fired, 100);
        assert_eq!(fired, vec![Entry { row: 2, gen: 0 }]);
        fired.clear();
        w.advance(39, &mut fired, 100);
        assert!(fired.is_empty());
        w.advance(40, &mut fired, 100);
        assert_eq!(fired, vec![Entry { row: 1, gen: 0 }]);
    }

    #[test]
    fn far_deadlines_park_at_the_horizon_and_limits_hold() {
        let mut w = TimerWheel::new(4, 10, 0);
        w.arm(Entry { row: 1, gen: 0 }, 1_000);
        let mut fired = Vec::new();
        w.advance(30, &mut fired, 100);
        assert_eq!(
            fired.len(),
            1,
            "parked at the horizon (30 ms), for the caller to re-arm"
        );
        for i in 0..10 {
            w.arm(Entry { row: i, gen: 0 }, 45);
        }
        fired.clear();
        w.advance(100, &mut fired, 4);
        assert_eq!(fired.len(), 4);
        w.advance(100, &mut fired, 100);
        assert_eq!(fired.len(), 10);
        assert!(w.is_empty());
    }
}

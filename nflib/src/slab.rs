//! Per-flow values indexed by flow slot, grown a chunk at a time.
//!
//! A vector that doubles would, past a million flows, initialise (and fault in) tens of
//! megabytes in one call: one packet's processing took 11-15 ms that way, measured while a
//! runtime took in 600,000 migrating flows, long enough for its input ring to overflow.
//! Here growth allocates the chunks of `CHUNK` values up to the slot asked for; flow slots
//! are handed out densely, so that is one chunk at most per call. A lookup costs one more
//! load, from a table of chunk pointers small enough to stay in cache.

/// Values per chunk (a power of two).
const CHUNK_BITS: u32 = 12;
const CHUNK: usize = 1 << CHUNK_BITS;

pub struct ChunkedSlab<T> {
    chunks: Vec<Box<[Option<T>]>>,
}

impl<T> Default for ChunkedSlab<T> {
    fn default() -> Self {
        ChunkedSlab { chunks: Vec::new() }
    }
}

#[inline(always)]
fn split(slot: u32) -> (usize, usize) {
    ((slot >> CHUNK_BITS) as usize, slot as usize & (CHUNK - 1))
}

impl<T> ChunkedSlab<T> {
    /// The cell of `slot`, if its chunk exists.
    #[inline(always)]
    pub fn cell(&self, slot: u32) -> Option<&Option<T>> {
        let (c, i) = split(slot);
        self.chunks.get(c).map(|c| &c[i])
    }

    #[inline(always)]
    pub fn get(&self, slot: u32) -> Option<&T> {
        self.cell(slot).and_then(Option::as_ref)
    }

    #[inline(always)]
    pub fn get_mut(&mut self, slot: u32) -> Option<&mut T> {
        let (c, i) = split(slot);
        self.chunks.get_mut(c).and_then(|c| c[i].as_mut())
    }

    /// Takes the value out of `slot`, leaving it empty.
    pub fn take(&mut self, slot: u32) -> Option<T> {
        let (c, i) = split(slot);
        self.chunks.get_mut(c).and_then(|c| c[i].take())
    }

    /// The cell of `slot`, creating the chunks up to it.
    pub fn cell_mut(&mut self, slot: u32) -> &mut Option<T> {
        let (c, i) = split(slot);
        while self.chunks.len() <= c {
            self.chunks.push((0..CHUNK).map(|_| None).collect());
        }
        &mut self.chunks[c][i]
    }

    /// Creates the chunks that hold every slot below `slots` now, rather than on the first
    /// store into each (`cell_mut`): a runtime told to expect flows takes the allocation, and
    /// the page faults of first writing it, before they arrive.
    pub fn reserve(&mut self, slots: u32) {
        if slots > 0 {
            let _ = self.cell_mut(slots - 1);
        }
    }

    /// Bytes the cells occupy.
    pub fn memory(&self) -> usize {
        self.chunks.len() * CHUNK * std::mem::size_of::<Option<T>>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_by_chunks_and_keeps_values_apart() {
        let mut s: ChunkedSlab<u64> = ChunkedSlab::default();
        assert_eq!(s.get(0), None);
        assert!(s.cell(5).is_none());
        *s.cell_mut(3) = Some(30);
        assert_eq!(s.memory(), CHUNK * std::mem::size_of::<Option<u64>>());
        let far = (CHUNK * 3 + 7) as u32;
        *s.cell_mut(far) = Some(70);
        assert_eq!(s.chunks.len(), 4);
        assert_eq!(s.get(3), Some(&30));
        assert_eq!(s.get(far), Some(&70));
        assert_eq!(s.get(far - 1), None);
        s.reserve(CHUNK as u32 * 6);
        assert_eq!(s.chunks.len(), 6);
        s.reserve(0);
        assert_eq!(s.chunks.len(), 6);
        assert_eq!(s.get(far), Some(&70));
        *s.get_mut(3).unwrap() += 1;
        assert_eq!(s.take(3), Some(31));
        assert_eq!(s.take(3), None);
        assert_eq!(s.get_mut(u32::MAX), None);
        assert_eq!(s.take(u32::MAX), None);
    }
}

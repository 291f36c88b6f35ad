//! Per-flow values indexed by flow slot, in one flat array whose room for the runtime's whole
//! flow capacity is reserved when the runtime starts.
//!
//! Reserving is not allocating: the kernel backs a large allocation with pages only as they
//! are first written, so a runtime that may hold a million flows but holds a thousand pays for
//! a thousand. What the reservation buys is that the array never moves: a vector that doubles
//! would, past a million flows, copy and fault in tens of megabytes in one call (one packet's
//! processing took 11-15 ms that way while a runtime took in 600,000 migrating flows, long
//! enough for its input ring to overflow). And a flat array costs a packet one bounds check
//! to find its state, where the array of chunks this replaced cost a load from a table of
//! chunk pointers and a check more, in every function of the chain (docs/PERFORMANCE.md,
//! 2026-12-06).
//!
//! When the reservation cannot be had (a strict overcommit policy and a huge `max_flows`),
//! the array grows as a vector does, and says so ([`FlowSlab::reserve_for`] returns false).

pub struct FlowSlab<T> {
    cells: Vec<Option<T>>,
}

impl<T> Default for FlowSlab<T> {
    fn default() -> Self {
        FlowSlab { cells: Vec::new() }
    }
}

impl<T> FlowSlab<T> {
    /// Reserves room for `slots` values (the runtime's flow capacity) without touching it.
    /// False if the address space could not be reserved; the slab then grows on demand.
    pub fn reserve_for(&mut self, slots: usize) -> bool {
        let more = slots.saturating_sub(self.cells.len());
        self.cells.try_reserve_exact(more).is_ok()
    }

    /// The cell of `slot`, if the slab reaches it.
    #[inline(always)]
    pub fn cell(&self, slot: u32) -> Option<&Option<T>> {
        self.cells.get(slot as usize)
    }

    #[inline(always)]
    pub fn get(&self, slot: u32) -> Option<&T> {
        self.cells.get(slot as usize).and_then(Option::as_ref)
    }

    #[inline(always)]
    pub fn get_mut(&mut self, slot: u32) -> Option<&mut T> {
        self.cells.get_mut(slot as usize).and_then(Option::as_mut)
    }

    /// Takes the value out of `slot`, leaving it empty.
    pub fn take(&mut self, slot: u32) -> Option<T> {
        self.cells.get_mut(slot as usize).and_then(Option::take)
    }

    /// The cell of `slot`, extending the slab to it (flow slots are handed out densely, so
    /// that is one new cell, within the reserved room).
    #[inline]
    pub fn cell_mut(&mut self, slot: u32) -> &mut Option<T> {
        let i = slot as usize;
        if i >= self.cells.len() {
            self.cells.resize_with(i + 1, || None);
        }
        &mut self.cells[i]
    }

    /// Writes the cells of every slot below `slots` now, rather than on the first store
    /// into each: a runtime told to expect flows takes the page faults before they arrive.
    pub fn reserve(&mut self, slots: u32) {
        if slots as usize > self.cells.len() {
            self.cells.resize_with(slots as usize, || None);
        }
    }

    /// Bytes of the cells written so far (the pages that hold memory).
    pub fn memory(&self) -> usize {
        self.cells.len() * std::mem::size_of::<Option<T>>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_slot_asked_for_and_keeps_values_apart() {
        let mut s: FlowSlab<u64> = FlowSlab::default();
        assert!(s.reserve_for(1 << 16));
        let room = s.cells.capacity();
        assert_eq!(s.get(0), None);
        assert!(s.cell(5).is_none());
        *s.cell_mut(3) = Some(30);
        assert_eq!(s.memory(), 4 * std::mem::size_of::<Option<u64>>());
        *s.cell_mut(1000) = Some(70);
        assert_eq!(s.get(3), Some(&30));
        assert_eq!(s.get(1000), Some(&70));
        assert_eq!(s.get(999), None);
        s.reserve(5000);
        assert_eq!(s.memory(), 5000 * std::mem::size_of::<Option<u64>>());
        s.reserve(0);
        assert_eq!(s.get(1000), Some(&70));
        *s.get_mut(3).unwrap() += 1;
        assert_eq!(s.take(3), Some(31));
        assert_eq!(s.take(3), None);
        assert_eq!(s.get_mut(u32::MAX), None);
        assert_eq!(s.take(u32::MAX), None);
        assert_eq!(
            s.cells.capacity(),
            room,
            "never moved within the reservation"
        );
    }

    #[test]
    fn an_impossible_reservation_is_refused_and_the_slab_still_grows() {
        let mut s: FlowSlab<[u64; 8]> = FlowSlab::default();
        assert!(!s.reserve_for(usize::MAX / 8));
        *s.cell_mut(10) = Some([1; 8]);
        assert_eq!(s.get(10), Some(&[1; 8]));
    }
}

//! Per-flow records: the states every function of a chain keeps for one flow, side by side
//! in one block of memory per flow row.
//!
//! Why one block: a packet's chain reads and writes every function's state of its flow. Kept
//! in an array per function, that is a cache line (and, past the TLB's reach, a page walk)
//! per function per packet, each a miss once a runtime holds more flows than its caches.
//! Side by side, the states of a firewall, a flow monitor and a load balancer take two
//! lines of one page, asked for with one prefetch (docs/PERFORMANCE.md, 2026-12-06).
//!
//! A chain is configuration, so the state types are known only when the chain is built: a
//! record is raw bytes laid out then. Each function registers its state type with [`add`]
//! and gets a [`Field`], the offset of an `Option<State>` in every record. This module is the
//! only place where those bytes are typed again, and it keeps these invariants:
//!
//! 1. `ptr` is dangling while `cap == 0`, otherwise it is an allocation of `cap * stride`
//!    bytes aligned to `align`.
//! 2. Records `0..len` are initialised: every field of each holds a valid `Option<T>` of its
//!    own `T` (records are created with every field `None`). Bytes outside fields, and
//!    records `len..cap`, are never read.
//! 3. A `Field<T>` is only made by `add::<T>` of one table, whose id it carries; its offset
//!    is aligned for `Option<T>`, its bytes lie within the stride, and fields never overlap.
//!    Every access checks the id, so a field can never read another table's bytes as `T`.
//! 4. Fields are added only while no record exists (the layout never changes under a value).
//! 5. Access goes through `&self` for shared and `&mut self` for exclusive references, so the
//!    borrow checker's rules over the table are the rules over every value in it.
//!
//! [`add`]: FlowRecords::add

use std::alloc::{self, Layout};
use std::marker::PhantomData;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

/// Where one function's state lives in every record.
pub struct Field<T> {
    offset: usize,
    table: u64,
    _type: PhantomData<fn() -> T>,
}

impl<T> Clone for Field<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for Field<T> {}

impl<T> std::fmt::Debug for Field<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Field(table {}, offset {})", self.table, self.offset)
    }
}

/// What the table needs to know of a field to create and destroy its values.
struct FieldInfo {
    offset: usize,
    /// Writes `None::<T>` at the pointer.
    init: unsafe fn(*mut u8),
    /// Drops the `Option<T>` at the pointer in place (`None` for types with nothing to
    /// drop).
    drop: Option<unsafe fn(*mut u8)>,
}

/// # Safety
/// `p` is valid for writes of `Option<T>` and aligned for it.
unsafe fn init_none<T>(p: *mut u8) {
    // SAFETY: the caller's contract.
    unsafe { p.cast::<Option<T>>().write(None) }
}

/// # Safety
/// `p` points to an initialised `Option<T>` that nothing will use again.
unsafe fn drop_value<T>(p: *mut u8) {
    // SAFETY: the caller's contract.
    unsafe { std::ptr::drop_in_place(p.cast::<Option<T>>()) }
}

static NEXT_TABLE: AtomicU64 = AtomicU64::new(1);

/// Line size records are laid out for.
const LINE: usize = 64;

pub struct FlowRecords {
    ptr: NonNull<u8>,
    /// Records allocated.
    cap: usize,
    /// Records initialised.
    len: usize,
    /// Bytes per record: the fields' end rounded to a power of two up to a line, to half
    /// lines beyond, so that a record of a line or less never straddles two.
    stride: usize,
    /// The largest alignment of a field (the allocation is aligned to it, and to a line).
    align: usize,
    /// Where the next field may start.
    end: usize,
    fields: Vec<FieldInfo>,
    id: u64,
}

// SAFETY: the table owns its values, and `add` accepts only `Send` types; moving the table to
// another thread moves them all.
unsafe impl Send for FlowRecords {}

impl Default for FlowRecords {
    fn default() -> Self {
        FlowRecords::new()
    }
}

impl FlowRecords {
    pub fn new() -> FlowRecords {
        FlowRecords {
            ptr: NonNull::dangling(),
            cap: 0,
            len: 0,
            stride: 0,
            align: 1,
            end: 0,
            fields: Vec::new(),
            id: NEXT_TABLE.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// Adds a field holding an `Option<T>` to every record. `None` once records exist (the
    /// layout is fixed by then).
    pub fn add<T: Send + 'static>(&mut self) -> Option<Field<T>> {
        if self.cap != 0 || self.len != 0 {
            return None;
        }
        let layout = Layout::new::<Option<T>>();
        // Checked all the way: a wrapped offset or stride would put fields outside their
        // record (invariant 3). A record must also fit in isize, as any allocation.
        let offset = self.end.checked_next_multiple_of(layout.align())?;
        let end = offset.checked_add(layout.size())?;
        let align = self.align.max(layout.align());
        // A power of two up to a line (the allocation is line-aligned, so such a record
        // never straddles two lines); beyond, half lines, so a record of up to two lines
        // spans two lines wherever it starts, without the memory (and cache) whole lines
        // would waste. Either way a multiple of every field's alignment: a field of
        // alignment A takes at least A bytes.
        let stride = if end <= LINE {
            end.next_power_of_two()
        } else {
            end.checked_next_multiple_of((LINE / 2).max(align))?
        };
        if stride > isize::MAX as usize {
            return None;
        }
        (self.end, self.align, self.stride) = (end, align, stride);
        self.fields.push(FieldInfo {
            offset,
            init: init_none::<T>,
            // Plain data needs no call per record when the table goes.
            drop: std::mem::needs_drop::<Option<T>>().then_some(drop_value::<T>),
        });
        Some(Field {
            offset,
            table: self.id,
            _type: PhantomData,
        })
    }

    /// Bytes per record.
    pub fn stride(&self) -> usize {
        self.stride
    }

    /// Records that exist (the highest row written, plus one).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes of the records written so far.
    pub fn memory(&self) -> usize {
        self.len * self.stride
    }

    fn layout(&self, cap: usize) -> Option<Layout> {
        Layout::from_size_align(cap.checked_mul(self.stride)?, self.align.max(LINE)).ok()
    }

    /// Makes the allocation hold `cap` records, moving the existing ones (a plain copy of
    /// their bytes, which moves Rust values). False if the memory could not be had.
    fn set_capacity(&mut self, cap: usize) -> bool {
        if cap <= self.cap || self.stride == 0 {
            return true;
        }
        let Some(new) = self.layout(cap) else {
            return false;
        };
        let p = if self.cap == 0 {
            // SAFETY: `new` has a non-zero size (cap > 0, stride > 0).
            unsafe { alloc::alloc(new) }
        } else {
            let old = self.layout(self.cap).expect("the current layout was valid");
            // SAFETY: `ptr` was allocated with `old` (invariant 1); the new size is non-zero
            // and, being a valid layout's size, does not overflow isize.
            unsafe { alloc::realloc(self.ptr.as_ptr(), old, new.size()) }
        };
        match NonNull::new(p) {
            Some(p) => {
                crate::hint::prefer_huge_pages(p.as_ptr(), new.size());
                self.ptr = p;
                self.cap = cap;
                true
            }
            None => false,
        }
    }

    /// Reserves (without touching: the kernel backs the pages as records are first written)
    /// room for `rows` records, so the records never move. False if it could not be had;
    /// the table then grows, moving its records, as a vector does.
    pub fn reserve_for(&mut self, rows: usize) -> bool {
        // Without fields there is nothing to reserve, and a field added later would make
        // the table grow after all: say so.
        !self.fields.is_empty() && self.set_capacity(rows)
    }

    /// Creates the records of every row below `rows` now (every field `None`), so a
    /// runtime told to expect flows takes the page faults before they arrive.
    pub fn reserve(&mut self, rows: u32) {
        let _ = self.extend_to(rows as usize);
    }

    /// Creates records up to `len` (exclusive). False if memory ran out.
    fn extend_to(&mut self, len: usize) -> bool {
        if len <= self.len {
            return true;
        }
        if len > self.cap
            && !self.set_capacity(len.max(self.cap.saturating_mul(2)).max(64))
            && !self.set_capacity(len)
        {
            return false;
        }
        if self.stride != 0 {
            for r in self.len..len {
                for f in &self.fields {
                    // SAFETY: record `r` is within the allocation (len <= cap, invariant
                    // 1) and the field's offset is aligned and in the stride (invariant 3).
                    unsafe { (f.init)(self.ptr.as_ptr().add(r * self.stride + f.offset)) }
                }
            }
        }
        self.len = len;
        true
    }

    /// The address of `field` in record `row`, if both are this table's and the record
    /// exists.
    #[inline(always)]
    fn at<T>(&self, field: &Field<T>, row: u32) -> Option<*mut Option<T>> {
        let row = row as usize;
        if field.table != self.id || row >= self.len {
            return None;
        }
        // SAFETY: the record exists within the allocation and the field lies in it.
        Some(unsafe {
            self.ptr
                .as_ptr()
                .add(row * self.stride + field.offset)
                .cast::<Option<T>>()
        })
    }

    /// The value of `field` in record `row`; `None` if the record does not exist.
    #[inline(always)]
    pub fn cell<T>(&self, field: &Field<T>, row: u32) -> Option<&Option<T>> {
        // SAFETY: an existing record's field holds an initialised Option<T> (invariants 2
        // and 3), and `&self` keeps it from changing while borrowed.
        self.at(field, row).map(|p| unsafe { &*p })
    }

    /// The value of `field` in record `row`, for writing; `None` if the record does not
    /// exist.
    #[inline(always)]
    pub fn cell_mut<T>(&mut self, field: &Field<T>, row: u32) -> Option<&mut Option<T>> {
        // SAFETY: as `cell`, and `&mut self` makes the reference the only one.
        self.at(field, row).map(|p| unsafe { &mut *p })
    }

    /// As `cell_mut`, creating the records up to `row` first (flow rows are handed out
    /// densely, so that is usually one). `None` only if memory ran out or the field is
    /// another table's.
    #[inline]
    pub fn entry<T>(&mut self, field: &Field<T>, row: u32) -> Option<&mut Option<T>> {
        if row as usize >= self.len && !self.extend_to(row as usize + 1) {
            return None;
        }
        self.cell_mut(field, row)
    }

    /// Starts loading every line of record `row`.
    #[inline(always)]
    pub fn prefetch(&self, row: u32) {
        let row = row as usize;
        if row >= self.len {
            return;
        }
        // SAFETY: only addresses inside record `row`, which exists, are formed.
        let first = unsafe { self.ptr.as_ptr().add(row * self.stride) };
        let mut at = 0;
        while at < self.stride {
            // SAFETY: `at < stride`: still inside the record.
            crate::hint::prefetch_line(unsafe { first.add(at) });
            at += LINE;
        }
    }
}

impl Drop for FlowRecords {
    fn drop(&mut self) {
        /// Drops the values from `next` on and frees the allocation, also when a value's
        /// destructor panics (the guard's own drop then carries on with the rest).
        struct Rest<'a> {
            table: &'a mut FlowRecords,
            next: usize,
        }
        impl Drop for Rest<'_> {
            fn drop(&mut self) {
                let t = &mut *self.table;
                while self.next < t.len * t.fields.len() {
                    let (r, f) = (self.next / t.fields.len(), self.next % t.fields.len());
                    self.next += 1;
                    if let Some(drop) = t.fields[f].drop {
                        // SAFETY: every field of an existing record holds a value
                        // (invariant 2), dropped once: `next` moved past it first.
                        unsafe { drop(t.ptr.as_ptr().add(r * t.stride + t.fields[f].offset)) }
                    }
                }
                if t.cap != 0 {
                    let layout = t.layout(t.cap).expect("the current layout was valid");
                    // SAFETY: allocated with this layout (invariant 1).
                    unsafe { alloc::dealloc(t.ptr.as_ptr(), layout) }
                    t.cap = 0;
                }
            }
        }
        if self.fields.iter().all(|f| f.drop.is_none()) {
            self.len = 0;
        }
        drop(Rest {
            table: self,
            next: 0,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc as Rc;

    #[test]
    fn fields_of_several_types_live_side_by_side() {
        let mut t = FlowRecords::new();
        let a = t.add::<u8>().unwrap();
        let b = t.add::<[u64; 8]>().unwrap();
        let c = t.add::<String>().unwrap();
        assert_eq!(t.stride() % 32, 0, "{}", t.stride());
        assert!(t.stride() >= 72 + 24);
        assert!(t.reserve_for(1000));
        *t.entry(&a, 3).unwrap() = Some(7);
        *t.entry(&b, 3).unwrap() = Some([9; 8]);
        *t.entry(&c, 5).unwrap() = Some("five".into());
        assert_eq!(t.len(), 6);
        assert_eq!(t.cell(&a, 3), Some(&Some(7)));
        assert_eq!(t.cell(&b, 3), Some(&Some([9; 8])));
        assert_eq!(t.cell(&c, 3), Some(&None));
        assert_eq!(t.cell(&c, 5).unwrap().as_deref(), Some("five"));
        assert_eq!(t.cell(&a, 6), None, "no record 6 yet");
        assert_eq!(t.cell(&a, u32::MAX), None);
        assert!(
            t.add::<u32>().is_none(),
            "the layout is fixed once records exist"
        );
        t.prefetch(5);
        t.prefetch(u32::MAX);
    }

    #[test]
    fn a_field_of_another_table_reads_nothing() {
        let mut t1 = FlowRecords::new();
        let mut t2 = FlowRecords::new();
        let f1 = t1.add::<u64>().unwrap();
        let _f2 = t2.add::<u64>().unwrap();
        *t2.entry(&_f2, 0).unwrap() = Some(1);
        assert!(t2.cell(&f1, 0).is_none());
        assert!(t2.entry(&f1, 0).is_none());
    }

    #[test]
    fn small_records_never_straddle_a_line() {
        let mut t = FlowRecords::new();
        t.add::<u8>().unwrap();
        t.add::<u16>().unwrap();
        assert!(
            t.stride().is_power_of_two() && t.stride() <= 64,
            "{}",
            t.stride()
        );
        let mut t = FlowRecords::new();
        t.add::<[u8; 40]>().unwrap();
        assert_eq!(t.stride(), 64);
    }

    #[test]
    fn over_aligned_types_stay_aligned() {
        #[repr(align(128))]
        struct Big(#[allow(dead_code)] u8);
        let mut t = FlowRecords::new();
        let s = t.add::<u8>().unwrap();
        let b = t.add::<Big>().unwrap();
        for row in 0..10 {
            *t.entry(&b, row).unwrap() = Some(Big(1));
            let p = t.cell(&b, row).unwrap() as *const Option<Big>;
            assert_eq!(p as usize % 128, 0);
            *t.entry(&s, row).unwrap() = Some(row as u8);
        }
        assert_eq!(t.cell(&s, 9), Some(&Some(9)));
    }

    /// Every value is dropped exactly once: when replaced, taken, or with the table, also
    /// across moves when the table grows without a reservation.
    #[test]
    fn values_drop_once_through_growth() {
        let token = Rc::new(());
        {
            let mut t = FlowRecords::new();
            let f = t.add::<Rc<()>>().unwrap();
            let g = t.add::<Vec<u32>>().unwrap();
            for row in 0..5000u32 {
                *t.entry(&f, row).unwrap() = Some(token.clone());
                *t.entry(&g, row).unwrap() = Some(vec![row; 3]);
            }
            assert_eq!(Rc::strong_count(&token), 5001);
            *t.entry(&f, 10).unwrap() = None;
            let taken = t.cell_mut(&f, 11).unwrap().take();
            assert_eq!(Rc::strong_count(&token), 5000);
            drop(taken);
            assert_eq!(Rc::strong_count(&token), 4999);
            assert_eq!(t.cell(&g, 4999).unwrap().as_deref(), Some(&[4999; 3][..]));
            t.reserve(6000);
            assert_eq!(t.len(), 6000);
        }
        assert_eq!(Rc::strong_count(&token), 1);
    }

    #[test]
    fn a_chain_without_state_costs_nothing() {
        let mut t = FlowRecords::new();
        assert_eq!(t.stride(), 0);
        t.reserve(100);
        assert_eq!((t.len(), t.memory()), (100, 0));
        t.prefetch(50);
        // A state of no size still takes Option's tag.
        let mut t = FlowRecords::new();
        let f = t.add::<()>().unwrap();
        assert_eq!(t.stride(), 1);
        *t.entry(&f, 100).unwrap() = Some(());
        assert_eq!(t.cell(&f, 100), Some(&Some(())));
        assert_eq!(t.cell(&f, 99), Some(&None));
    }

    #[test]
    fn fields_too_large_to_lay_out_are_refused() {
        let mut t = FlowRecords::new();
        let added = (0..16)
            .take_while(|_| t.add::<[u8; 1 << 60]>().is_some())
            .count();
        assert!(added < 16, "a record past isize::MAX was laid out");
        assert!(t.stride() <= isize::MAX as usize);
        let mut t = FlowRecords::new();
        assert!(!t.reserve_for(10), "no fields, nothing reserved");
    }

    #[test]
    fn an_impossible_reservation_is_refused_and_the_table_still_grows() {
        let mut t = FlowRecords::new();
        let f = t.add::<[u64; 8]>().unwrap();
        assert!(!t.reserve_for(usize::MAX / 64));
        *t.entry(&f, 10).unwrap() = Some([1; 8]);
        assert_eq!(t.cell(&f, 10), Some(&Some([1; 8])));
    }
}

//! The shared region: creation by nfmgr, attachment by everyone else, and typed access to its
//! parts. This module and `ring` are where the platform's `unsafe` lives.
//!
//! The region is a file (on hugetlbfs or in `/dev/shm`) mapped `MAP_SHARED` by every process
//! of one nfmgr instance. Nothing inside holds a pointer: parts are found from offsets in the
//! header, buffers by index, so each process may map the file at any address.
//!
//! Attaching validates before trusting: the file must be large enough for a header, carry the
//! magic and this build's layout version, agree with the layout recomputed from its stored
//! configuration, be as large as that layout, and be marked ready by its creator.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use memmap2::{MmapOptions, MmapRaw};
use thiserror::Error;

use crate::buffer::{BufMeta, Desc, Packet, OWNER_FREE};
use crate::layout::{
    Layout, LayoutError, RegionConfig, RingId, BUF_META_SIZE, HEADER_SIZE, LAYOUT_VERSION, MAGIC,
    MANAGER_SLOT,
};
use crate::ring::{RingHeader, RingView};
use crate::slot::{ProcessKind, SlotRecord, SlotState};
use crate::stats::{PortRecord, ShmName};
use crate::sync::Cell;

/// Lifecycle of the region as a whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RegionState {
    Initializing,
    Ready,
    ShuttingDown,
}

impl RegionState {
    fn from_raw(v: u32) -> RegionState {
        match v {
            1 => RegionState::Ready,
            2 => RegionState::ShuttingDown,
            _ => RegionState::Initializing,
        }
    }

    fn raw(self) -> u32 {
        match self {
            RegionState::Initializing => 0,
            RegionState::Ready => 1,
            RegionState::ShuttingDown => 2,
        }
    }
}

/// The first page of the region.
#[repr(C)]
pub struct RegionHeader {
    magic: [u8; 8],
    version: u32,
    header_size: u32,
    total_size: u64,
    config: RegionConfig,
    offsets: [u64; 10],
    state: AtomicU32,
    /// 1 when the file lives on hugetlbfs.
    pub hugetlbfs: AtomicU32,
    pub manager_pid: AtomicU32,
    pub created_unix_ms: AtomicU64,
    pub instance: ShmName,
    /// Buffers in nfmgr's free stack (published by its data-plane thread).
    pub pool_free: AtomicU64,
    /// Free buffers parked in processes' refill rings and caches.
    pub pool_cached: AtomicU64,
    /// Buffers returned to the free stack by recovery after a process died.
    pub pool_reclaimed: AtomicU64,
    /// Frees of buffers that were already free (a bug somewhere; the free is ignored).
    pub pool_double_frees: AtomicU64,
    /// Monotonic milliseconds of nfmgr's data-plane loop, to tell a live manager.
    pub manager_heartbeat_ms: AtomicU64,
    /// Bytes of frozen configuration text in the blob.
    blob_len: AtomicU32,
}

const _: () = assert!(std::mem::size_of::<RegionHeader>() <= HEADER_SIZE);

impl RegionHeader {
    pub fn state(&self) -> RegionState {
        RegionState::from_raw(self.state.load(Ordering::Acquire))
    }

    pub fn set_state(&self, s: RegionState) {
        self.state.store(s.raw(), Ordering::Release);
    }

    pub fn config(&self) -> &RegionConfig {
        &self.config
    }
}

#[derive(Debug, Error)]
pub enum RegionError {
    #[error("no region at {path}: is nfmgr running? ({source})")]
    Missing { path: PathBuf, source: io::Error },
    #[error("region {path} already exists")]
    Exists { path: PathBuf },
    #[error("cannot open region {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "no room for region {path} ({size} bytes) on its file system ({error}): free memory \
         in that tmpfs or hugetlbfs, or use fewer or smaller buffers"
    )]
    NoRoom {
        path: PathBuf,
        size: usize,
        /// Not a `source`: the message already says it, once.
        error: io::Error,
    },
    #[error("cannot map region {path} ({size} bytes): {source}")]
    Map {
        path: PathBuf,
        size: usize,
        source: io::Error,
    },
    #[error("{path} is too small to be a region: {size} bytes, at least {needed} needed")]
    TooSmall {
        path: PathBuf,
        size: u64,
        needed: u64,
    },
    #[error("{path} is not an NFActor region (bad magic)")]
    BadMagic { path: PathBuf },
    #[error(
        "region {path} has layout version {found} but this build reads version {expected}; \
         run processes from the same build as nfmgr"
    )]
    Version {
        path: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error("region {path} is inconsistent: {what}")]
    Corrupt { path: PathBuf, what: String },
    #[error("region {path} is not ready (nfmgr is starting or shutting down)")]
    NotReady { path: PathBuf },
    #[error(transparent)]
    Layout(#[from] LayoutError),
}

/// How to create a region.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    pub path: PathBuf,
    pub config: RegionConfig,
    pub instance: String,
    /// File size is rounded up to this (the huge page size on hugetlbfs).
    pub page_size: usize,
    pub hugetlbfs: bool,
}

struct Mapping {
    map: MmapRaw,
    layout: Layout,
    path: PathBuf,
}

/// A mapped region. Cheap to clone; the mapping lives until the last clone and the last ring
/// view built from it are dropped.
#[derive(Clone)]
pub struct Region {
    inner: Arc<Mapping>,
}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region")
            .field("path", &self.inner.path)
            .field("size", &self.inner.layout.total_size)
            .finish()
    }
}

/// Types that ring slots may hold: plain data valid for every bit pattern, because another
/// process writes them.
///
/// # Safety
/// Implementors must be `#[repr(C)]` or primitive, contain no pointers or references, and be
/// valid for any bit pattern.
pub unsafe trait RingElem: Copy + Default + Send + 'static {}
// SAFETY: integers are valid for every bit pattern.
unsafe impl RingElem for u32 {}
// SAFETY: `Desc` is `repr(C)` and made of integers only.
unsafe impl RingElem for Desc {}

impl Region {
    /// Creates and initialises a new region file. Fails if the file exists: stale regions are
    /// removed by the caller, which knows whether their creator is still alive.
    pub fn create(opts: &CreateOptions) -> Result<Region, RegionError> {
        let layout = Layout::new(opts.config)?;
        let page = opts.page_size.max(4096);
        let size = layout.total_size.div_ceil(page) * page;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(&opts.path)
            .map_err(|source| match source.kind() {
                io::ErrorKind::AlreadyExists => RegionError::Exists {
                    path: opts.path.clone(),
                },
                _ => RegionError::Io {
                    path: opts.path.clone(),
                    source,
                },
            })?;
        let result = Self::init_file(&file, size, layout, opts);
        if result.is_err() {
            let _ = std::fs::remove_file(&opts.path);
        }
        result
    }

    fn init_file(
        file: &File,
        size: usize,
        layout: Layout,
        opts: &CreateOptions,
    ) -> Result<Region, RegionError> {
        file.set_len(size as u64)
            .map_err(|source| RegionError::Io {
                path: opts.path.clone(),
                source,
            })?;
        // Every page allocated now: on a full tmpfs or hugetlbfs, populating the mapping
        // fails silently and the first touch of a missing page later is a SIGBUS in
        // whichever process makes it. A file system without fallocate is left as it was.
        // SAFETY: a plain system call on a file descriptor this function holds open.
        let err = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, size as libc::off_t) };
        if err != 0 && err != libc::EOPNOTSUPP && err != libc::EINVAL {
            return Err(RegionError::NoRoom {
                path: opts.path.clone(),
                size,
                error: io::Error::from_raw_os_error(err),
            });
        }
        let map = MmapOptions::new()
            .len(size)
            .populate()
            .map_raw(file)
            .map_err(|source| RegionError::Map {
                path: opts.path.clone(),
                size,
                source,
            })?;
        let region = Region {
            inner: Arc::new(Mapping {
                map,
                layout,
                path: opts.path.clone(),
            }),
        };
        region.initialise(opts, size);
        Ok(region)
    }

    /// Writes the header and every shared structure's initial value. The file was just
    /// created, so no other process maps it yet.
    fn initialise(&self, opts: &CreateOptions, size: usize) {
        let layout = &self.inner.layout;
        let base = self.inner.map.as_mut_ptr();
        // SAFETY: the mapping is at least HEADER_SIZE bytes and page aligned; no other process
        // has the file mapped yet, so plain writes do not race.
        unsafe {
            let hdr = base as *mut RegionHeader;
            (*hdr).magic = MAGIC;
            (*hdr).version = LAYOUT_VERSION;
            (*hdr).header_size = HEADER_SIZE as u32;
            (*hdr).total_size = size as u64;
            (*hdr).config = layout.config;
            (*hdr).offsets = layout_offsets(layout);
        }
        let hdr = self.header();
        hdr.hugetlbfs
            .store(opts.hugetlbfs as u32, Ordering::Relaxed);
        hdr.manager_pid.store(std::process::id(), Ordering::Relaxed);
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        hdr.created_unix_ms.store(now_ms, Ordering::Relaxed);
        hdr.instance.set(&opts.instance);
        hdr.pool_free
            .store(layout.config.buffers as u64, Ordering::Relaxed);

        for id in layout.all_rings() {
            let (off, cap) = layout.ring(id).expect("all_rings yields valid ids");
            let elem = match id {
                RingId::Refill { .. } | RingId::Recycle { .. } => 4,
                _ => std::mem::size_of::<Desc>() as u32,
            };
            // SAFETY: `off` is inside the mapping (layout) and 64-byte aligned; not yet shared.
            unsafe { (*(base.add(off) as *mut RingHeader)).init(cap, elem) };
        }
        for i in 0..layout.config.slots as u16 {
            let s = self.slot(i).expect("slot in range");
            s.doorbell_fd.store(-1, Ordering::Relaxed);
            s.core.store(-1, Ordering::Relaxed);
            s.set_state(SlotState::Free);
        }
        let mgr = self.slot(MANAGER_SLOT).expect("slot 0 exists");
        mgr.kind
            .store(ProcessKind::Manager.raw(), Ordering::Relaxed);
        mgr.pid.store(std::process::id(), Ordering::Relaxed);
        mgr.name.set("nfmgr");
        mgr.set_state(SlotState::Running);
        for b in 0..layout.config.buffers {
            self.buf_meta_unchecked(b)
                .owner
                .store(OWNER_FREE, Ordering::Relaxed);
        }
    }

    /// Maps an existing region for a data-path process, checks that this build can read it,
    /// then maps every page of it in at once, so that the data path never faults on a page
    /// it meets for the first time (a runtime taking over migrated flows met about 130 such
    /// faults in its first millisecond, 1-2 us each on a VM). The pages exist already
    /// (`create` populated them).
    pub fn attach(path: &Path) -> Result<Region, RegionError> {
        let region = Self::attach_lazily(path)?;
        let map = &region.inner.map;
        // SAFETY: the range is exactly this mapping. MADV_POPULATE_WRITE only faults its
        // pages in (writable, as they are mapped) and changes no byte; on a kernel without
        // it (before 5.14) it fails with EINVAL and pages are faulted in on first use.
        unsafe {
            libc::madvise(
                map.as_mut_ptr() as *mut libc::c_void,
                map.len(),
                libc::MADV_POPULATE_WRITE,
            );
        }
        Ok(region)
    }

    /// Maps an existing region and checks that this build can read it; pages are mapped in
    /// as they are touched. For tools that read a little of it (`nfmgr stats`).
    pub fn attach_lazily(path: &Path) -> Result<Region, RegionError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|source| match source.kind() {
                io::ErrorKind::NotFound => RegionError::Missing {
                    path: path.to_path_buf(),
                    source,
                },
                _ => RegionError::Io {
                    path: path.to_path_buf(),
                    source,
                },
            })?;
        let file_size = file
            .metadata()
            .map_err(|source| RegionError::Io {
                path: path.to_path_buf(),
                source,
            })?
            .len();
        if file_size < HEADER_SIZE as u64 {
            return Err(RegionError::TooSmall {
                path: path.to_path_buf(),
                size: file_size,
                needed: HEADER_SIZE as u64,
            });
        }
        let map = MmapOptions::new()
            .len(file_size as usize)
            .map_raw(&file)
            .map_err(|source| RegionError::Map {
                path: path.to_path_buf(),
                size: file_size as usize,
                source,
            })?;
        // SAFETY: the mapping holds at least HEADER_SIZE bytes (checked above) and is page
        // aligned; RegionHeader is plain data and atomics, valid for any bit pattern.
        let hdr = unsafe { &*(map.as_ptr() as *const RegionHeader) };
        let corrupt = |what: String| RegionError::Corrupt {
            path: path.to_path_buf(),
            what,
        };
        if hdr.magic != MAGIC {
            return Err(RegionError::BadMagic {
                path: path.to_path_buf(),
            });
        }
        if hdr.version != LAYOUT_VERSION {
            return Err(RegionError::Version {
                path: path.to_path_buf(),
                found: hdr.version,
                expected: LAYOUT_VERSION,
            });
        }
        if hdr.header_size as usize != HEADER_SIZE {
            return Err(corrupt(format!("header size {}", hdr.header_size)));
        }
        let layout = Layout::new(hdr.config)
            .map_err(|e| corrupt(format!("stored configuration is invalid: {e}")))?;
        if hdr.offsets != layout_offsets(&layout) {
            return Err(corrupt(
                "stored offsets disagree with its configuration".into(),
            ));
        }
        if (layout.total_size as u64) > file_size || hdr.total_size > file_size {
            return Err(RegionError::TooSmall {
                path: path.to_path_buf(),
                size: file_size,
                needed: hdr.total_size.max(layout.total_size as u64),
            });
        }
        if hdr.state() != RegionState::Ready {
            return Err(RegionError::NotReady {
                path: path.to_path_buf(),
            });
        }
        let region = Region {
            inner: Arc::new(Mapping {
                map,
                layout,
                path: path.to_path_buf(),
            }),
        };
        // Ring geometry is immutable after creation; check it once here so a ring view can
        // never be built over a mismatched header.
        for id in region.inner.layout.all_rings() {
            let (off, cap) = region.inner.layout.ring(id).expect("valid id");
            // SAFETY: `off` lies inside the mapping per the validated layout.
            let rh = unsafe { &*(region.inner.map.as_ptr().add(off) as *const RingHeader) };
            if rh.capacity() != cap {
                return Err(corrupt(format!(
                    "ring {id:?} has capacity {}",
                    rh.capacity()
                )));
            }
        }
        Ok(region)
    }

    /// Marks the region usable by other processes (after nfmgr has filled slots and ports).
    pub fn mark_ready(&self) {
        self.header().set_state(RegionState::Ready);
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    pub fn layout(&self) -> &Layout {
        &self.inner.layout
    }

    pub fn config(&self) -> &RegionConfig {
        &self.inner.layout.config
    }

    pub fn header(&self) -> &RegionHeader {
        // SAFETY: validated (attach) or written (create) at offset 0; lives with the mapping.
        unsafe { &*(self.inner.map.as_ptr() as *const RegionHeader) }
    }

    /// # Safety
    /// `off + size_of::<T>()` must lie inside the mapping, `off` must be aligned for `T`, and
    /// `T` must be plain data and atomics (valid for every bit pattern).
    unsafe fn at<T>(&self, off: usize) -> &T {
        debug_assert!(off + std::mem::size_of::<T>() <= self.inner.map.len());
        debug_assert_eq!(off % std::mem::align_of::<T>(), 0);
        // SAFETY: guaranteed by the caller.
        unsafe { &*(self.inner.map.as_ptr().add(off) as *const T) }
    }

    pub fn slot(&self, index: u16) -> Option<&SlotRecord> {
        let l = &self.inner.layout;
        if (index as u32) < l.config.slots {
            // SAFETY: the slot array lies inside the layout, records are 64-byte aligned and
            // made of atomics only.
            Some(unsafe { self.at(l.slots_off + index as usize * l.slot_size) })
        } else {
            None
        }
    }

    pub fn slot_count(&self) -> u16 {
        self.inner.layout.config.slots as u16
    }

    /// Statistics of the `nf`-th function of the chain run by `slot`.
    pub fn nf_stats(&self, slot: u16, nf: usize) -> Option<&crate::stats::NfStatsRecord> {
        let l = &self.inner.layout;
        if (slot as u32) < l.config.slots && nf < crate::limits::MAX_NFS {
            let i = slot as usize * crate::limits::MAX_NFS + nf;
            // SAFETY: the records lie inside the layout, 64-byte aligned, atomics only.
            Some(unsafe { self.at(l.nf_stats_off + i * l.nf_stats_size) })
        } else {
            None
        }
    }

    /// Stores the configuration text processes read at start. Called by the creator before
    /// the region is marked ready; fails if the text does not fit the reserved space.
    pub fn write_blob(&self, text: &[u8]) -> bool {
        let l = &self.inner.layout;
        if text.len() > l.config.blob_size as usize
            || self.header().state() != RegionState::Initializing
        {
            return false;
        }
        // SAFETY: the blob area is inside the mapping (layout) and nobody reads it before the
        // region is marked ready, after this write.
        unsafe {
            std::ptr::copy_nonoverlapping(
                text.as_ptr(),
                self.inner.map.as_mut_ptr().add(l.blob_off),
                text.len(),
            );
        }
        self.header()
            .blob_len
            .store(text.len() as u32, Ordering::Release);
        true
    }

    /// The configuration text nfmgr stored.
    pub fn blob(&self) -> &[u8] {
        let l = &self.inner.layout;
        let len = (self.header().blob_len.load(Ordering::Acquire) as usize)
            .min(l.config.blob_size as usize);
        // SAFETY: written once before the region became ready, never modified after; inside
        // the mapping by the layout.
        unsafe { std::slice::from_raw_parts(self.inner.map.as_ptr().add(l.blob_off), len) }
    }

    pub fn port(&self, index: u16) -> Option<&PortRecord> {
        let l = &self.inner.layout;
        if (index as u32) < l.config.ports {
            // SAFETY: as for slots.
            Some(unsafe { self.at(l.ports_off + index as usize * l.port_size) })
        } else {
            None
        }
    }

    /// A view of one ring, or `None` if the id names no ring of this region.
    pub fn ring<T: RingElem>(&self, id: RingId) -> Option<RingView<T>> {
        let (off, cap) = self.inner.layout.ring(id)?;
        // SAFETY: ring headers lie inside the layout and are 64-byte aligned.
        let hdr: &RingHeader = unsafe { self.at(off) };
        if hdr.capacity() != cap || hdr.elem_size() as usize != std::mem::size_of::<T>() {
            return None;
        }
        let base = self.inner.map.as_mut_ptr();
        // SAFETY: in bounds per the layout; the pointers are non-null.
        let (hdr_ptr, entries_ptr) = unsafe {
            (
                NonNull::new_unchecked(base.add(off) as *mut RingHeader),
                NonNull::new_unchecked(base.add(off + RingHeader::SIZE) as *mut Cell<T>),
            )
        };
        let backing: crate::ring::Backing = self.inner.clone();
        // SAFETY: header initialised at creation with this capacity and element size (checked
        // above), `cap` entries of `T` follow it inside the mapping, and `T: RingElem` is valid
        // for any bit pattern. The backing keeps the mapping alive.
        Some(unsafe { RingView::from_raw(hdr_ptr, entries_ptr, cap, backing) })
    }

    fn buf_meta_unchecked(&self, index: u32) -> &BufMeta {
        // SAFETY: callers pass index < buffers; each buffer starts 64-byte aligned with its
        // metadata line.
        unsafe { self.at(self.inner.layout.buffer_off(index)) }
    }

    /// Metadata of the buffer a packet occupies.
    pub fn meta_of(&self, p: &Packet) -> &BufMeta {
        self.buf_meta_unchecked(p.buf_index())
    }

    /// Metadata of buffer `index`, if it exists.
    pub fn buf_meta(&self, index: u32) -> Option<&BufMeta> {
        (index < self.inner.layout.config.buffers).then(|| self.buf_meta_unchecked(index))
    }

    pub fn buffer_count(&self) -> u32 {
        self.inner.layout.config.buffers
    }

    /// Where the packet buffers lie in this process's mapping: the address of buffer 0 and
    /// the length of the whole area (`buffer_count` buffers of `buffer_size` bytes). For
    /// handing the area to a device driver (nfmgr's DPDK ports); reading or writing through
    /// it is the caller's `unsafe`.
    pub fn buffer_area(&self) -> (*mut u8, usize) {
        let l = &self.inner.layout;
        let len = l.config.buffers as usize * l.config.buffer_size as usize;
        // The offset lies inside the mapping (the layout placed the buffers there).
        (
            self.inner.map.as_ptr().wrapping_add(l.buffers_off) as *mut u8,
            len,
        )
    }

    /// Checks that a descriptor read from a ring names a real buffer and a packet inside it.
    pub fn check_desc(&self, d: &Desc) -> bool {
        let c = &self.inner.layout.config;
        d.buf < c.buffers
            && (d.off as u32) >= BUF_META_SIZE
            && d.off as u32 + d.len as u32 <= c.buffer_size
    }

    /// Takes ownership of the buffer a descriptor names, on behalf of slot `me`, if the
    /// descriptor is valid and the buffer is owned by `expected_owner` (the producer of the
    /// ring it came from). Anything else (a bad index, a buffer sent twice) is refused, so a
    /// faulty peer cannot make this process hold two handles to one buffer. One atomic
    /// step: a producer that put one buffer on two rings at once gets exactly one of its
    /// consumers to own it (a load then a store let both).
    pub fn claim(&self, d: Desc, expected_owner: u32, me: u32) -> Option<Packet> {
        if !self.check_desc(&d) {
            return None;
        }
        let meta = self.buf_meta_unchecked(d.buf);
        meta.owner
            .compare_exchange(expected_owner, me, Ordering::AcqRel, Ordering::Acquire)
            .ok()?;
        Some(Packet::from_valid_desc(d))
    }

    /// Starts loading a descriptor's metadata line and first packet line into the cache.
    /// Called for a whole burst before touching any of it, so the cross-core transfers of
    /// the lines overlap instead of stalling one after the other. Harmless for a bad
    /// descriptor (nothing is prefetched outside the region).
    #[inline(always)]
    pub fn prefetch(&self, d: &Desc) {
        let c = &self.inner.layout.config;
        if d.buf >= c.buffers {
            return;
        }
        let base = self.inner.layout.buffer_off(d.buf);
        let data = base + (d.off as usize).min(c.buffer_size as usize - 1);
        let ptr = self.inner.map.as_ptr();
        // SAFETY: both offsets lie inside the mapping (index and offset bounded above); a
        // prefetch never faults and has no visible effect beyond the cache.
        unsafe {
            prefetch_line(ptr.add(base));
            prefetch_line(ptr.add(data));
        }
    }

    /// A fresh packet handle over buffer `index`, already owned by the caller, with the
    /// default headroom and length 0.
    pub(crate) fn fresh_packet(&self, index: u32) -> Packet {
        Packet::from_valid_desc(Desc {
            buf: index,
            off: self.inner.layout.config.data_offset() as u16,
            len: 0,
            ..Desc::default()
        })
    }

    fn buffer_ptr(&self, p: &Packet) -> *mut u8 {
        let d = p.desc();
        debug_assert!(self.check_desc(d));
        // SAFETY: packets are only created from checked descriptors, so the offset lies inside
        // the buffer, which lies inside the mapping.
        unsafe {
            self.inner
                .map
                .as_mut_ptr()
                .add(self.inner.layout.buffer_off(d.buf))
        }
    }

    /// The packet's bytes.
    pub fn data<'a>(&'a self, p: &'a Packet) -> &'a [u8] {
        let d = p.desc();
        // SAFETY: `p` owns the buffer (ownership protocol: one holder per buffer across all
        // processes, enforced in-process by `Packet` being unique and across processes by
        // `claim`), so nobody writes these bytes while the borrow of `p` lasts. Bounds were
        // checked when the packet was created.
        unsafe {
            std::slice::from_raw_parts(self.buffer_ptr(p).add(d.off as usize), d.len as usize)
        }
    }

    /// The packet's bytes, writable.
    pub fn data_mut<'a>(&'a self, p: &'a mut Packet) -> &'a mut [u8] {
        let d = *p.desc();
        // SAFETY: as for `data`, and the exclusive borrow of `p` makes this the only view.
        unsafe {
            std::slice::from_raw_parts_mut(self.buffer_ptr(p).add(d.off as usize), d.len as usize)
        }
    }

    /// Everything from the packet's start to the end of its buffer, for writing a new packet
    /// (then `set_len`).
    pub fn room_mut<'a>(&'a self, p: &'a mut Packet) -> &'a mut [u8] {
        let d = *p.desc();
        let room = self.inner.layout.config.buffer_size as usize - d.off as usize;
        // SAFETY: as for `data_mut`; `off <= buffer_size` holds for checked descriptors.
        unsafe { std::slice::from_raw_parts_mut(self.buffer_ptr(p).add(d.off as usize), room) }
    }

    /// Sets the packet length; false if it would not fit in the buffer.
    pub fn set_len(&self, p: &mut Packet, len: usize) -> bool {
        let room = self.inner.layout.config.buffer_size as usize - p.desc().off as usize;
        if len > room {
            return false;
        }
        p.desc_mut().len = len as u16;
        true
    }

    /// Grows the packet by `n` bytes at its front, into the headroom (for a header to
    /// prepend); false if the headroom is too small.
    pub fn prepend(&self, p: &mut Packet, n: usize) -> bool {
        let d = p.desc_mut();
        let min = crate::layout::BUF_META_SIZE as usize;
        if (d.off as usize) < min + n || d.len as usize + n > u16::MAX as usize {
            return false;
        }
        d.off -= n as u16;
        d.len += n as u16;
        true
    }

    /// Removes `n` bytes from the packet's front (a header that was read); false if the
    /// packet is shorter.
    pub fn strip_front(&self, p: &mut Packet, n: usize) -> bool {
        let d = p.desc_mut();
        // With 65,536-byte buffers a packet can end at byte 65,536: stripping all of it
        // would put the offset one past what a u16 holds (it wrapped to 0, the metadata).
        let off = usize::from(d.off) + n;
        if n > usize::from(d.len) || off > usize::from(u16::MAX) {
            return false;
        }
        d.off = off as u16;
        d.len -= n as u16;
        true
    }

    /// Writes `frame` into the packet's buffer and sets its length; false if it does not fit.
    pub fn fill(&self, p: &mut Packet, frame: &[u8]) -> bool {
        let room = self.room_mut(p);
        if frame.len() > room.len() {
            return false;
        }
        room[..frame.len()].copy_from_slice(frame);
        self.set_len(p, frame.len())
    }
}

#[inline(always)]
unsafe fn prefetch_line(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetch is a hint; the caller passes an address inside the mapping.
    unsafe {
        std::arch::x86_64::_mm_prefetch(p as *const i8, std::arch::x86_64::_MM_HINT_T0);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

fn layout_offsets(l: &Layout) -> [u64; 10] {
    [
        l.slots_off as u64,
        l.ports_off as u64,
        l.nf_stats_off as u64,
        l.blob_off as u64,
        l.data_rings_off as u64,
        l.msg_rings_off as u64,
        l.refill_rings_off as u64,
        l.recycle_rings_off as u64,
        l.buffers_off as u64,
        l.total_size as u64,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn temp_region(config: RegionConfig) -> (Region, PathBuf) {
        let path = std::env::temp_dir().join(format!(
            "nflib-test-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_file(&path);
        let r = Region::create(&CreateOptions {
            path: path.clone(),
            config,
            instance: "test".into(),
            page_size: 4096,
            hugetlbfs: false,
        })
        .unwrap();
        r.mark_ready();
        (r, path)
    }
    static COUNTER: AtomicU32 = AtomicU32::new(0);

    fn small() -> RegionConfig {
        RegionConfig {
            slots: 4,
            ports: 2,
            buffers: 64,
            ..RegionConfig::default()
        }
    }

    #[test]
    fn create_then_attach_sees_the_same_region() {
        let (r, path) = temp_region(small());
        let meta = std::fs::metadata(&path).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let a = Region::attach(&path).unwrap();
        assert_eq!(a.layout(), r.layout());
        assert_eq!(a.header().instance.get(), "test");
        assert_eq!(a.slot(0).unwrap().kind(), ProcessKind::Manager);
        // A ring written through one mapping is read through the other.
        let mut p =
            crate::ring::Producer::new(r.ring::<Desc>(RingId::Data { from: 0, to: 1 }).unwrap());
        let mut c =
            crate::ring::Consumer::new(a.ring::<Desc>(RingId::Data { from: 0, to: 1 }).unwrap());
        let d = Desc {
            buf: 3,
            off: 192,
            len: 60,
            ..Desc::default()
        };
        assert!(p.push(d));
        let mut out = [Desc::default(); 4];
        assert_eq!(c.pop_burst(&mut out), 1);
        assert_eq!(out[0], d);
        std::fs::remove_file(&path).unwrap();
    }

    /// A region larger than its file system's free room fails at creation, with an error
    /// that says so, rather than as a SIGBUS in some process later. Needs root (a small
    /// tmpfs is mounted for it).
    #[test]
    fn a_region_that_does_not_fit_fails_at_creation() {
        let dir = std::env::temp_dir().join(format!("nflib-tiny-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
            .arg(&dir)
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            let _ = std::fs::remove_dir(&dir);
            let why = "SKIP: cannot mount a tmpfs (needs root)";
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "{why}, and CI=true"
            );
            eprintln!("{why}");
            return;
        }
        let path = dir.join("big.region");
        let r = Region::create(&CreateOptions {
            path: path.clone(),
            config: RegionConfig {
                buffers: 4096,
                ..small()
            },
            instance: "test".into(),
            page_size: 4096,
            hugetlbfs: false,
        });
        let exists = path.exists();
        let _ = std::process::Command::new("umount").arg(&dir).status();
        let _ = std::fs::remove_dir(&dir);
        assert!(
            matches!(r, Err(RegionError::NoRoom { .. })),
            "{:?}",
            r.err().map(|e| e.to_string())
        );
        assert!(!exists, "the half-made region is removed");
    }

    #[test]
    fn attach_errors_are_specific() {
        let missing = std::env::temp_dir().join("nflib-test-does-not-exist");
        assert!(matches!(
            Region::attach(&missing),
            Err(RegionError::Missing { .. })
        ));

        let (_r, path) = temp_region(small());
        // Another layout version.
        let bytes = std::fs::read(&path).unwrap();
        let mut other = bytes.clone();
        other[8..12].copy_from_slice(&99u32.to_le_bytes());
        let p2 = path.with_extension("v99");
        std::fs::write(&p2, &other).unwrap();
        let e = Region::attach(&p2).unwrap_err();
        assert!(matches!(e, RegionError::Version { found: 99, .. }), "{e}");
        // Too small.
        std::fs::write(&p2, &bytes[..HEADER_SIZE + 100]).unwrap();
        assert!(matches!(
            Region::attach(&p2),
            Err(RegionError::TooSmall { .. })
        ));
        std::fs::write(&p2, &bytes[..100]).unwrap();
        assert!(matches!(
            Region::attach(&p2),
            Err(RegionError::TooSmall { .. })
        ));
        // Not a region.
        std::fs::write(&p2, vec![0x55u8; bytes.len()]).unwrap();
        assert!(matches!(
            Region::attach(&p2),
            Err(RegionError::BadMagic { .. })
        ));
        std::fs::remove_file(&p2).unwrap();
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn creating_over_an_existing_file_fails() {
        let (_r, path) = temp_region(small());
        let e = Region::create(&CreateOptions {
            path: path.clone(),
            config: small(),
            instance: "x".into(),
            page_size: 4096,
            hugetlbfs: false,
        })
        .unwrap_err();
        assert!(matches!(e, RegionError::Exists { .. }));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn claim_refuses_bad_and_duplicate_descriptors() {
        let (r, path) = temp_region(small());
        let good = Desc {
            buf: 5,
            off: 192,
            len: 64,
            ..Desc::default()
        };
        r.buf_meta(5).unwrap().owner.store(0, Ordering::Relaxed);
        assert!(
            r.claim(Desc { buf: 64, ..good }, 0, 1).is_none(),
            "index out of range"
        );
        assert!(
            r.claim(Desc { off: 10, ..good }, 0, 1).is_none(),
            "offset inside metadata"
        );
        assert!(
            r.claim(Desc { len: 2000, ..good }, 0, 1).is_none(),
            "past the buffer end"
        );
        let p = r.claim(good, 0, 1).expect("valid");
        assert!(
            r.claim(good, 0, 1).is_none(),
            "second claim of the same buffer"
        );
        assert_eq!(r.data(&p).len(), 64);
        std::fs::remove_file(&path).unwrap();
    }

    /// Two processes handed one buffer at once (a faulty or hostile producer put it on two
    /// rings): exactly one of them owns it, every time.
    #[test]
    fn two_claims_of_one_buffer_at_once_make_one_owner() {
        use std::sync::atomic::AtomicU32;
        use std::sync::{Arc, Barrier};
        let (r, path) = temp_region(small());
        let d = Desc {
            buf: 5,
            off: 192,
            len: 64,
            ..Desc::default()
        };
        const ROUNDS: u32 = 20_000;
        let start = Arc::new(Barrier::new(3));
        let done = Arc::new(Barrier::new(3));
        let wins = Arc::new(AtomicU32::new(0));
        let claimers: Vec<_> = (1..=2u32)
            .map(|me| {
                let (r, start, done, wins) = (r.clone(), start.clone(), done.clone(), wins.clone());
                std::thread::spawn(move || {
                    for _ in 0..ROUNDS {
                        start.wait();
                        if let Some(p) = r.claim(d, 0, me) {
                            wins.fetch_add(1, Ordering::Relaxed);
                            let _ = p;
                        }
                        done.wait();
                    }
                })
            })
            .collect();
        let mut doubled = 0;
        for _ in 0..ROUNDS {
            r.buf_meta(5).unwrap().owner.store(0, Ordering::Release);
            wins.store(0, Ordering::Relaxed);
            start.wait();
            done.wait();
            let w = wins.load(Ordering::Relaxed);
            assert!(w >= 1, "nobody got the buffer");
            doubled += u32::from(w > 1);
        }
        for c in claimers {
            c.join().unwrap();
        }
        assert_eq!(
            doubled, 0,
            "{doubled} of {ROUNDS} rounds gave the buffer to both"
        );
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn stripping_a_packet_that_ends_at_a_65536_byte_buffers_end_never_wraps() {
        let (r, path) = temp_region(RegionConfig {
            buffer_size: 65536,
            buffers: 64,
            ..small()
        });
        // From byte 192 to the buffer's end, byte 65,536.
        const LEN: u16 = 65_344;
        let d = Desc {
            buf: 5,
            off: 192,
            len: LEN,
            ..Desc::default()
        };
        r.buf_meta(5).unwrap().owner.store(0, Ordering::Relaxed);
        let mut p = r.claim(d, 0, 1).expect("valid");
        assert!(
            !r.strip_front(&mut p, usize::from(LEN)),
            "the offset would not fit"
        );
        assert_eq!((p.desc().off, p.desc().len), (192, LEN), "unchanged");
        assert!(r.strip_front(&mut p, 100));
        assert_eq!((p.desc().off, p.desc().len), (292, LEN - 100));
        std::fs::remove_file(&path).unwrap();
    }
}

//! `dpdk:DEVICE` ports (cargo feature `dpdk`): the safe layer over `dpdk-sys`, and the only
//! place nfmgr calls DPDK. Runtimes and vswitches never link it.
//!
//! Zero copy, one allocator: DPDK's packet buffers *are* the region's buffers. At start the
//! region's buffer area becomes the external memory of a pktmbuf pool whose mbuf `i` is
//! pinned to region buffer `i`, and the pool's mempool driver (`nf_region`, in the C shim)
//! takes and returns buffer indices from nfmgr's own pool through [`hook_alloc`] and
//! [`hook_free`]. So a device writes a received frame straight into a region buffer, the
//! descriptor handed to the vswitch names that buffer, and a runtime reads the bytes where
//! the device wrote them; to transmit, the mbuf pinned to the packet's buffer is pointed at
//! its bytes and given to the device, which frees it back into the platform's pool. Nothing
//! is copied, and a runtime frees a buffer as it always does, without asking nfmgr.
//!
//! `unsafe` here: FFI calls, and the hooks DPDK calls back with the pool of the burst in
//! progress (set around every DPDK call that may allocate or free, on the data-plane
//! thread, so the pool is never reached from two threads).

use std::ffi::{c_char, c_void, CStr, CString};
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};
use dpdk_sys as sys;
use nflib::buffer::Desc;
use nflib::config::{Config, DpdkMemory};
use nflib::layout::BUF_META_SIZE;
use nflib::pool::ManagerPool;
use nflib::stats::{LocalCounters, PortCounter, PortKind, PORT_COUNTERS};
use nflib::{Packet, Region, MANAGER_SLOT};

use super::{Port, PortCtx};

const BURST: usize = 32;
// The shim's bursts hold at most 64 mbufs.
const _: () = assert!(BURST <= 64);
const OWNER: u32 = MANAGER_SLOT as u32;

/// The environment abstraction layer, initialised once per process.
struct Eal {
    pool: *mut sys::rte_mempool,
}

// SAFETY: the mempool pointer is only used through DPDK calls made by the thread that runs
// the ports (the data-plane thread) after start-up; DPDK's mempool itself is thread-safe.
unsafe impl Send for Eal {}
// SAFETY: as for Send: shared references only hand the pointer to DPDK's thread-safe calls.
unsafe impl Sync for Eal {}

/// EAL's first outcome: DPDK initialises EAL once per process, so a later port gets the
/// same failure (the error itself is kept, and each caller gets its text).
static EAL: OnceLock<Result<Eal>> = OnceLock::new();

/// The pool and region a burst may allocate from and free to.
struct HookCtx {
    pool: *mut ManagerPool,
    region: *const Region,
}

extern "C" fn hook_alloc(ctx: *mut c_void, idx: *mut u32, n: u32) -> u32 {
    // SAFETY: `ctx` is the `HookCtx` set by `with_pool` for the duration of the call that
    // led here, on this thread; `idx` has room for `n` entries (the shim's scratch array).
    let (ctx, out) = unsafe {
        (
            &mut *(ctx as *mut HookCtx),
            std::slice::from_raw_parts_mut(idx, n as usize),
        )
    };
    // SAFETY: as above; the pool outlives the call.
    let pool = unsafe { &mut *ctx.pool };
    for (k, slot) in out.iter_mut().enumerate() {
        match pool.alloc() {
            // The buffer stays owned by nfmgr while DPDK holds it.
            Some(p) => *slot = p.into_desc().buf,
            None => return k as u32,
        }
    }
    n
}

extern "C" fn hook_free(ctx: *mut c_void, idx: *const u32, n: u32) {
    // SAFETY: as in `hook_alloc`.
    let (ctx, bufs) = unsafe {
        (
            &mut *(ctx as *mut HookCtx),
            std::slice::from_raw_parts(idx, n as usize),
        )
    };
    // SAFETY: as in `hook_alloc`.
    let (pool, region) = unsafe { (&mut *ctx.pool, &*ctx.region) };
    for &buf in bufs {
        let d = Desc {
            buf,
            off: BUF_META_SIZE as u16,
            ..Desc::default()
        };
        if let Some(p) = region.claim(d, OWNER, OWNER) {
            pool.free(p);
        }
    }
}

extern "C" fn hook_count(ctx: *mut c_void) -> u32 {
    // SAFETY: as in `hook_alloc`.
    let ctx = unsafe { &*(ctx as *const HookCtx) };
    // SAFETY: as in `hook_alloc`.
    unsafe { (*ctx.pool).free_count() as u32 }
}

/// Runs `f` with the region pool's hooks pointed at `pool`: every DPDK call that can take or
/// return buffers goes through here. The context is the calling thread's only, and is unset
/// even if `f` panics (a guard), so it never outlives the frame that holds it.
fn with_pool<T>(
    mp: *mut sys::rte_mempool,
    pool: &mut ManagerPool,
    region: &Region,
    f: impl FnOnce() -> T,
) -> T {
    struct Unset(*mut sys::rte_mempool);
    impl Drop for Unset {
        fn drop(&mut self) {
            // SAFETY: `self.0` is the region pool; unsetting has no other precondition.
            unsafe { sys::nf_region_pool_set_ctx(self.0, std::ptr::null_mut()) };
        }
    }
    let mut ctx = HookCtx {
        pool: pool as *mut ManagerPool,
        region: region as *const Region,
    };
    // SAFETY: `mp` is the region pool; the context lives until the guard unsets it.
    unsafe { sys::nf_region_pool_set_ctx(mp, &mut ctx as *mut HookCtx as *mut c_void) };
    let _unset = Unset(mp);
    f()
}

fn errno_text() -> String {
    // SAFETY: reads DPDK's per-thread error number and its static description.
    unsafe {
        let e = sys::nf_rte_errno();
        let s = sys::rte_strerror(e);
        if s.is_null() {
            format!("error {e}")
        } else {
            CStr::from_ptr(s).to_string_lossy().into_owned()
        }
    }
}

/// The end of what EAL logged since capture started (why it failed).
fn eal_log_tail() -> String {
    let mut buf = vec![0u8; 2048];
    // SAFETY: the buffer has `len` bytes; the shim NUL-terminates within them.
    let n = unsafe { sys::nf_log_capture_take(buf.as_mut_ptr() as *mut c_char, buf.len()) };
    buf.truncate(n);
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(4)..].join(" | ")
}

/// The driver name of a vdev argument: `net_af_packet0,iface=x` -> `net_af_packet`.
fn vdev_driver(vdev: &str) -> &str {
    let name = vdev.split(',').next().unwrap_or("");
    name.trim_end_matches(|c: char| c.is_ascii_digit())
}

/// Where the distribution keeps DPDK's drivers (loaded by EAL as plugins).
const PMD_DIRS: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu/dpdk/pmds-23.0",
    "/usr/lib/aarch64-linux-gnu/dpdk/pmds-23.0",
    "/usr/local/lib/x86_64-linux-gnu/dpdk/pmds-23.0",
];

fn hugepages_free() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("HugePages_Free:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Checks what EAL would otherwise fail on with a cryptic code (or abort on).
fn preflight(cfg: &Config) -> Result<()> {
    let d = &cfg.dpdk;
    if d.memory == DpdkMemory::Hugepages && hugepages_free() == 0 {
        bail!(
            "dpdk.memory = \"hugepages\" but no huge pages are free (HugePages_Free is 0 in \
             /proc/meminfo): reserve some with scripts/setup-hugepages.sh, or set \
             dpdk.memory = \"no-huge\""
        );
    }
    if let Some(dir) = PMD_DIRS.iter().find(|d| std::path::Path::new(d).is_dir()) {
        for v in &d.vdevs {
            let drv = vdev_driver(v);
            let lib = format!("librte_{drv}.so");
            let found = std::fs::read_dir(dir)
                .into_iter()
                .flatten()
                .flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with(&lib));
            if drv.is_empty() || !found {
                bail!(
                    "dpdk.vdevs: `{v}`: DPDK has no driver `{drv}` (none in {dir}; virtual \
                     devices are named like net_null0, net_ring0, net_af_packet0,iface=IFACE)"
                );
            }
        }
    }
    if d.memory_mb < 16 {
        bail!(
            "dpdk.memory_mb = {}: DPDK needs at least 16 MiB",
            d.memory_mb
        );
    }
    Ok(())
}

fn eal_args(cfg: &Config) -> Vec<String> {
    let d = &cfg.dpdk;
    let mut a = vec![
        "nfmgr".to_string(),
        "-l".into(),
        d.lcores.clone(),
        "--file-prefix".into(),
        d.file_prefix
            .clone()
            .unwrap_or_else(|| format!("nfactor-{}", cfg.instance)),
        "-m".into(),
        d.memory_mb.to_string(),
        "--no-telemetry".into(),
    ];
    match d.memory {
        DpdkMemory::NoHuge => a.push("--no-huge".into()),
        // Pages go back to the system when nfmgr exits, however it exits.
        DpdkMemory::Hugepages => a.push("--huge-unlink".into()),
    }
    if d.pci.is_empty() {
        a.push("--no-pci".into());
    }
    for p in &d.pci {
        a.push("-a".into());
        a.push(p.clone());
    }
    for v in &d.vdevs {
        a.push("--vdev".into());
        a.push(with_frame_size(v, cfg.region.buffer_size));
    }
    a.extend(d.eal_args.iter().cloned());
    a
}

/// DPDK puts a frame at RTE_PKTMBUF_HEADROOM (128 bytes) into a buffer, and the AF_PACKET
/// driver refuses buffers smaller than its frame slot minus its 32-byte header, which is
/// 2048 by default: for region buffers of 2048 bytes its slot must be smaller. Unless the
/// operator chose one, `framesz` is set to the largest that fits (1952 for 2048-byte
/// buffers: frames up to 1920 bytes, MTU 1500 and more). The driver also assumes its slots
/// are contiguous, so its block size is made a whole number of both slots and pages.
fn with_frame_size(vdev: &str, buffer_size: u32) -> String {
    if vdev_driver(vdev) != "net_af_packet" || vdev.contains("framesz=") {
        return vdev.to_string();
    }
    let framesz = ((buffer_size.saturating_sub(128) + 32) / 16 * 16) as u64;
    let gcd = |mut a: u64, mut b: u64| {
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a
    };
    let blocksz = framesz / gcd(framesz, 4096) * 4096;
    let per_block = blocksz / framesz;
    let framecnt = 512u64.div_ceil(per_block) * per_block;
    format!("{vdev},framesz={framesz},blocksz={blocksz},framecnt={framecnt}")
}

/// Initialises EAL (once) and the region pool; later calls return the first outcome.
fn eal(cfg: &Config, region: &Region) -> Result<&'static Eal> {
    let r = EAL.get_or_init(|| init_eal(cfg, region));
    r.as_ref().map_err(|e| anyhow::anyhow!("{e:#}"))
}

fn init_eal(cfg: &Config, region: &Region) -> Result<Eal> {
    preflight(cfg)?;
    let args = eal_args(cfg);
    tracing::info!("DPDK EAL: {}", args[1..].join(" "));
    let cargs: Vec<CString> = args
        .iter()
        .map(|a| CString::new(a.as_str()).context("an EAL argument holds a NUL byte"))
        .collect::<Result<_>>()?;
    let mut argv: Vec<*mut c_char> = cargs.iter().map(|a| a.as_ptr() as *mut c_char).collect();
    // EAL pins the calling thread to its main lcore; nfmgr's processes must not inherit
    // that, so the mask is put back afterwards.
    let affinity = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).ok();
    // SAFETY: plain FFI; argv lives until the call returns (EAL keeps copies).
    let rc = unsafe {
        sys::nf_log_capture_start();
        sys::rte_eal_init(argv.len() as i32, argv.as_mut_ptr())
    };
    // (Also puts EAL's log back on stderr.)
    let log = eal_log_tail();
    if let Some(mask) = affinity {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &mask);
    }
    if rc < 0 {
        bail!(
            "DPDK's environment did not start ({}): {}",
            errno_text(),
            if log.is_empty() {
                "EAL said nothing".to_string()
            } else {
                log
            }
        );
    }
    let pool = region_pool(region)?;
    Ok(Eal { pool })
}

/// The pktmbuf pool whose mbufs are pinned to the region's buffers.
fn region_pool(region: &Region) -> Result<*mut sys::rte_mempool> {
    let (base, len) = region.buffer_area();
    let count = region.buffer_count();
    let buf_size = u16::try_from(len / count as usize)
        .context("region.buffer_size must be below 65536 bytes for DPDK ports")?;
    // SAFETY: FFI; the area is mapped for the process's lifetime and page aligned.
    let iova = unsafe {
        if sys::rte_eal_iova_mode() == sys::rte_iova_mode_RTE_IOVA_VA {
            base as u64
        } else {
            u64::MAX // RTE_BAD_IOVA: fine for virtual devices; real NICs need IOVA as VA
        }
    };
    // Register the area for devices that DMA (VFIO maps it); virtual devices do not care.
    // SAFETY: FFI on the mapped area.
    let rc = unsafe {
        sys::rte_extmem_register(
            base as *mut c_void,
            len.div_ceil(4096) * 4096,
            std::ptr::null_mut(),
            0,
            4096,
        )
    };
    if rc < 0 {
        tracing::warn!(
            "rte_extmem_register: {} (fine for virtual devices)",
            errno_text()
        );
    }
    let hooks = sys::nf_pool_hooks {
        alloc: Some(hook_alloc),
        free: Some(hook_free),
        count: Some(hook_count),
    };
    let name = CString::new("nfactor_region").context("pool name")?;
    // SAFETY: FFI; the shim copies the hooks.
    let mp = unsafe {
        sys::nf_region_pool_create(
            name.as_ptr(),
            base as *mut c_void,
            iova,
            count,
            buf_size,
            &hooks,
        )
    };
    if mp.is_null() {
        bail!(
            "cannot build DPDK's packet pool over the region's {count} buffers: {}",
            errno_text()
        );
    }
    Ok(mp)
}

pub struct DpdkPort {
    id: u16,
    name: String,
    mp: *mut sys::rte_mempool,
    /// Device statistics last read (differences go into the port's counters).
    last: sys::rte_eth_stats,
    idle_poll: std::time::Duration,
}

// SAFETY: the mbuf pointers are only used on the thread that owns the port (the data-plane
// thread); DPDK allows a queue to be used from any one thread at a time.
unsafe impl Send for DpdkPort {}

impl DpdkPort {
    /// Opens `dpdk:DEVICE`: EAL on first use, then the device with one RX and one TX queue,
    /// started. Every configuration error is a message naming what to fix.
    pub fn open(
        cfg: &Config,
        region: &Region,
        pool: &mut ManagerPool,
        device: &str,
    ) -> Result<DpdkPort> {
        let eal = eal(cfg, region)?;
        let cname = CString::new(device).context("device name")?;
        let mut id = 0u16;
        // SAFETY: FFI with a valid C string and out-pointer.
        if unsafe { sys::rte_eth_dev_get_port_by_name(cname.as_ptr(), &mut id) } != 0 {
            bail!(
                "DPDK has no port `{device}` (its ports: {}); add it to dpdk.vdevs or dpdk.pci",
                port_names().join(", ")
            );
        }
        let conf = sys::rte_eth_conf::default();
        let d = &cfg.dpdk;
        let r = with_pool(eal.pool, pool, region, || {
            // SAFETY: FFI on a valid port id; the pool is the region pool.
            unsafe {
                let rc = sys::rte_eth_dev_configure(id, 1, 1, &conf);
                if rc < 0 {
                    return Err(format!("configure: {}", errno_from(rc)));
                }
                let (mut nrx, mut ntx) = (d.rx_descriptors, d.tx_descriptors);
                let rc = sys::rte_eth_dev_adjust_nb_rx_tx_desc(id, &mut nrx, &mut ntx);
                if rc < 0 {
                    return Err(format!("descriptors: {}", errno_from(rc)));
                }
                let socket = sys::rte_eth_dev_socket_id(id);
                let socket = if socket < 0 { 0 } else { socket as u32 };
                let rc =
                    sys::rte_eth_rx_queue_setup(id, 0, nrx, socket, std::ptr::null(), eal.pool);
                if rc < 0 {
                    return Err(format!("receive queue: {}", errno_from(rc)));
                }
                let rc = sys::rte_eth_tx_queue_setup(id, 0, ntx, socket, std::ptr::null());
                if rc < 0 {
                    return Err(format!("transmit queue: {}", errno_from(rc)));
                }
                let rc = sys::rte_eth_dev_start(id);
                if rc < 0 {
                    return Err(format!("start: {}", errno_from(rc)));
                }
                // Promiscuous: the port is a bump in the wire (not all devices support it).
                let _ = sys::rte_eth_promiscuous_enable(id);
                Ok(())
            }
        });
        if let Err(e) = r {
            // Give back whatever a half-started device took.
            // SAFETY: FFI on a valid port id.
            with_pool(eal.pool, pool, region, || unsafe {
                sys::rte_eth_dev_stop(id);
            });
            bail!("DPDK port `{device}`: {e}");
        }
        if cfg.dpdk.pci.iter().any(|p| p == device) {
            map_for_dma(id, device, region)?;
        }
        let mut link = sys::rte_eth_link::default();
        // SAFETY: FFI with an out-pointer.
        unsafe { sys::rte_eth_link_get_nowait(id, &mut link) };
        tracing::info!(
            port = device,
            id,
            "DPDK port started (link {}, {} Mbit/s); packet data in the region, no copy",
            if link.link_status() != 0 {
                "up"
            } else {
                "down"
            },
            link.link_speed
        );
        Ok(DpdkPort {
            id,
            name: device.to_string(),
            mp: eal.pool,
            last: sys::rte_eth_stats::default(),
            idle_poll: std::time::Duration::from_micros(d.idle_poll_us.max(10)),
        })
    }
}

/// A physical device must reach the region's buffers by DMA: only with IOVA as VA (vfio with
/// an IOMMU), mapped for the device. Anything else would have it write to wrong addresses,
/// so it is an error, not a warning.
fn map_for_dma(id: u16, device: &str, region: &Region) -> Result<()> {
    // SAFETY: FFI without preconditions.
    if unsafe { sys::rte_eal_iova_mode() } != sys::rte_iova_mode_RTE_IOVA_VA {
        bail!(
            "DPDK port `{device}`: physical devices need IOVA as VA (bind the NIC to vfio-pci \
             with an IOMMU, or add --iova-mode=va to dpdk.eal_args)"
        );
    }
    let (base, len) = region.buffer_area();
    let len = len.div_ceil(4096) * 4096;
    let mut info = sys::rte_eth_dev_info::default();
    // SAFETY: FFI with an out-pointer; `info.device` stays valid while the port exists.
    let rc = unsafe {
        if sys::rte_eth_dev_info_get(id, &mut info) != 0 {
            -1
        } else {
            sys::rte_dev_dma_map(info.device, base as *mut c_void, base as u64, len)
        }
    };
    if rc != 0 {
        bail!(
            "DPDK port `{device}`: cannot map the region's buffers for DMA: {}",
            errno_text()
        );
    }
    Ok(())
}

fn errno_from(rc: i32) -> String {
    // SAFETY: rte_strerror returns a static string for any number.
    unsafe {
        let s = sys::rte_strerror(-rc);
        if s.is_null() {
            format!("error {rc}")
        } else {
            CStr::from_ptr(s).to_string_lossy().into_owned()
        }
    }
}

fn port_names() -> Vec<String> {
    let mut names = Vec::new();
    for id in 0..sys::RTE_MAX_ETHPORTS as u16 {
        let mut buf = [0 as c_char; 64];
        // SAFETY: FFI with a 64-byte buffer (RTE_ETH_NAME_MAX_LEN).
        if unsafe { sys::rte_eth_dev_get_name_by_port(id, buf.as_mut_ptr()) } == 0 {
            // SAFETY: NUL-terminated by DPDK.
            names.push(
                unsafe { CStr::from_ptr(buf.as_ptr()) }
                    .to_string_lossy()
                    .into_owned(),
            );
        }
    }
    if names.is_empty() {
        names.push("none".into());
    }
    names
}

impl Port for DpdkPort {
    fn kind(&self) -> PortKind {
        PortKind::Dpdk
    }

    fn rx(&mut self, ctx: &mut PortCtx<'_>, out: &mut Vec<Packet>, max: usize) {
        let want = max.min(BURST) as u16;
        if want == 0 {
            return;
        }
        let (id, mp) = (self.id, self.mp);
        let (mut buf, mut off, mut len) = ([0u32; BURST], [0u16; BURST], [0u16; BURST]);
        let mut refused = 0u32;
        // SAFETY: FFI into the port's one RX queue from its owning thread; the arrays have
        // BURST entries and `want` is at most BURST.
        let n = with_pool(mp, ctx.pool, ctx.region, || unsafe {
            sys::nf_rx_region(
                id,
                0,
                mp,
                buf.as_mut_ptr(),
                off.as_mut_ptr(),
                len.as_mut_ptr(),
                want,
                &mut refused,
            )
        }) as usize;
        // Frames not in a region buffer (impossible with the region pool) or chained.
        ctx.count(PortCounter::DpdkRxForeign, refused as u64);
        let before = out.len();
        for i in 0..n {
            let d = Desc {
                buf: buf[i],
                off: off[i],
                len: len[i],
                ..Desc::default()
            };
            // The frame stays where the device wrote it: in region buffer `buf[i]`.
            match ctx.region.claim(d, OWNER, OWNER) {
                Some(p) => out.push(p),
                // Owned by someone else: never the case for a buffer the device just
                // filled; left alone rather than freed twice.
                None => ctx.count(PortCounter::RxOversize, 1),
            }
        }
        ctx.count(PortCounter::DpdkRxInRegion, (out.len() - before) as u64);
    }

    fn tx(&mut self, ctx: &mut PortCtx<'_>, pkts: &mut Vec<Packet>) {
        let (id, mp) = (self.id, self.mp);
        let (mut buf, mut off, mut len) = ([0u32; BURST], [0u16; BURST], [0u16; BURST]);
        let (mut sent_total, mut bytes, mut dropped) = (0u64, 0u64, 0u64);
        while !pkts.is_empty() {
            let take = pkts.len().min(BURST);
            for (i, p) in pkts.drain(..take).enumerate() {
                // The buffer goes to the device (through its pinned mbuf); it comes back to
                // the pool when the device frees the mbuf.
                let d = p.into_desc();
                (buf[i], off[i], len[i]) = (d.buf, d.off, d.len);
            }
            // SAFETY: FFI on the port's one TX queue; the indices come from checked
            // descriptors, the arrays hold `take` entries.
            let sent = with_pool(mp, ctx.pool, ctx.region, || unsafe {
                sys::nf_tx_region(
                    id,
                    0,
                    mp,
                    buf.as_ptr(),
                    off.as_ptr(),
                    len.as_ptr(),
                    take as u16,
                )
            }) as usize;
            sent_total += sent as u64;
            bytes += len[..sent].iter().map(|l| *l as u64).sum::<u64>();
            dropped += (take - sent) as u64;
        }
        ctx.count(PortCounter::TxPkts, sent_total);
        ctx.count(PortCounter::TxBytes, bytes);
        ctx.count(PortCounter::TxDropFull, dropped);
    }

    fn next_wake(&self, now: std::time::Instant) -> Option<std::time::Instant> {
        Some(now + self.idle_poll)
    }

    fn housekeeping(&mut self, counters: &mut LocalCounters<PORT_COUNTERS>) {
        let mut s = sys::rte_eth_stats::default();
        // SAFETY: FFI with an out-pointer.
        if unsafe { sys::rte_eth_stats_get(self.id, &mut s) } != 0 {
            return;
        }
        let l = &self.last;
        for (c, now, before) in [
            (PortCounter::DevIpackets, s.ipackets, l.ipackets),
            (PortCounter::DevImissed, s.imissed, l.imissed),
            (PortCounter::DevIerrors, s.ierrors, l.ierrors),
            (PortCounter::DevOerrors, s.oerrors, l.oerrors),
            (PortCounter::DevRxNombuf, s.rx_nombuf, l.rx_nombuf),
        ] {
            counters.add(c as usize, now.saturating_sub(before));
        }
        self.last = s;
    }

    fn report(&self) -> Option<serde_json::Value> {
        Some(serde_json::json!({
            "device": self.name,
            "port_id": self.id,
            "ipackets": self.last.ipackets,
            "imissed": self.last.imissed,
            "ierrors": self.last.ierrors,
            "oerrors": self.last.oerrors,
            "rx_nombuf": self.last.rx_nombuf,
        }))
    }

    fn close(&mut self, ctx: &mut PortCtx<'_>) {
        let id = self.id;
        // A device returns the mbufs it holds when stopped: into the pool, through the hooks.
        // SAFETY: FFI on a started port, from its owning thread.
        with_pool(self.mp, ctx.pool, ctx.region, || unsafe {
            sys::rte_eth_dev_stop(id);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nflib::region::CreateOptions;
    use nflib::RegionConfig;

    #[test]
    fn af_packet_frame_slots_fit_the_buffers_and_tile_their_blocks() {
        let v = with_frame_size("net_af_packet0,iface=c1", 2048);
        assert_eq!(
            v,
            "net_af_packet0,iface=c1,framesz=1952,blocksz=249856,framecnt=512"
        );
        // 1952 * 128 = 249856 = 61 pages: whole slots and whole pages.
        assert_eq!(249856 % 1952, 0);
        assert_eq!(249856 % 4096, 0);
        let v = with_frame_size("net_af_packet1,iface=x", 4096);
        assert!(
            v.ends_with("framesz=4000,blocksz=512000,framecnt=512"),
            "{v}"
        );
        assert_eq!(
            with_frame_size("net_af_packet0,iface=x,framesz=1024", 2048),
            "net_af_packet0,iface=x,framesz=1024"
        );
        assert_eq!(with_frame_size("net_null0", 2048), "net_null0");
        assert_eq!(vdev_driver("net_af_packet12,iface=a"), "net_af_packet");
    }

    /// Zero copy, checked at the address: a frame transmitted through a `net_ring` device
    /// (whose transmit ring is its receive ring) comes back as the same region buffer, at the
    /// same offset, with the same bytes, and every buffer is back in the pool afterwards.
    #[test]
    fn a_buffer_index_round_trips_through_a_device() {
        if !nix::unistd::geteuid().is_root() {
            assert_ne!(
                std::env::var("CI").as_deref(),
                Ok("true"),
                "CI must run this as root"
            );
            eprintln!("SKIP: DPDK's environment needs root here");
            return;
        }
        let path =
            std::path::PathBuf::from(format!("/dev/shm/nf-dpdk-rtrip-{}", std::process::id()));
        let region = Region::create(&CreateOptions {
            path: path.clone(),
            config: RegionConfig {
                buffers: 1024,
                ..RegionConfig::default()
            },
            instance: format!("rtrip{}", std::process::id()),
            page_size: 4096,
            hugetlbfs: false,
        })
        .expect("region");
        let _ = std::fs::remove_file(&path);
        let cfg = Config::parse(
            &format!(
                "instance = \"rtrip{}\"\n[dpdk]\nvdevs = [\"net_ring0\"]\n\
                 [[vswitch]]\nname = \"vs0\"\n[[runtime]]\nname = \"rt0\"\n",
                std::process::id()
            ),
            std::path::Path::new("/tmp"),
        )
        .expect("config");
        let mut pool = ManagerPool::new(&region, 64);
        let free_before = pool.free_count();
        let mut port = DpdkPort::open(&cfg, &region, &mut pool, "net_ring0").expect("net_ring0");
        let mut counters =
            LocalCounters::<PORT_COUNTERS>::resume(&std::array::from_fn(|_| Default::default()));
        let frame: Vec<u8> = (0..200u32).map(|i| (i * 7 + 3) as u8).collect();
        let mut sent_bufs = Vec::new();
        let mut pkts = Vec::new();
        for _ in 0..8 {
            let mut p = pool.alloc().expect("a buffer");
            assert!(region.fill(&mut p, &frame));
            sent_bufs.push((
                p.buf_index(),
                p.desc().off,
                region.data(&p).as_ptr() as usize,
            ));
            pkts.push(p);
        }
        let mut ctx = PortCtx {
            region: &region,
            pool: &mut pool,
            counters: &mut counters,
            now: std::time::Instant::now(),
        };
        port.tx(&mut ctx, &mut pkts);
        let mut got = Vec::new();
        port.rx(&mut ctx, &mut got, 32);
        assert_eq!(got.len(), 8, "all frames back through the ring");
        for (p, (buf, off, addr)) in got.iter().zip(&sent_bufs) {
            assert_eq!(
                (p.buf_index(), p.desc().off),
                (*buf, *off),
                "same buffer, same offset"
            );
            assert_eq!(region.data(p).as_ptr() as usize, *addr, "same address");
            assert_eq!(region.data(p), &frame[..], "same bytes");
        }
        for p in got {
            ctx.pool.free(p);
        }
        assert_eq!(counters.get(PortCounter::DpdkRxInRegion as usize), 8);
        assert_eq!(counters.get(PortCounter::TxPkts as usize), 8);
        assert_eq!(
            pool.free_count(),
            free_before,
            "every buffer back in the one pool"
        );
    }
}

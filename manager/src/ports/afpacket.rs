//! `afpacket:IFACE`: a Linux interface through AF_PACKET with memory-mapped rings.
//!
//! Two sockets per port: one with a TPACKET_V2 receive ring (promiscuous, ignoring frames the
//! host itself sends so a port never hears its own transmissions), one with a TPACKET_V2
//! transmit ring (bypassing the qdisc layer) that receives nothing. V2 rather than V3 on
//! receive because V3 hands frames over a block at a time, adding up to the block timeout of
//! latency at low rates; a bump in the wire needs each frame at once.
//!
//! The kernel owns the ring memory, so each frame is copied once into a pool buffer on receive
//! and once out of one on transmit; everything between the two ports moves descriptors only.
//!
//! Frames the kernel hands over with the VLAN tag stripped (`TP_STATUS_VLAN_VALID`) get the
//! tag put back, and frames with a checksum left for offload (`TP_STATUS_CSUMNOTREADY`, e.g.
//! from a veth whose peer offloads checksums) get it computed, so what leaves the other port
//! is what arrived. Segmentation offloads (GSO/GRO) must be off on the interfaces: a 64 KiB
//! super-frame does not fit a buffer and is dropped as oversize.
//!
//! This module holds the `unsafe` of talking to the kernel's rings.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{bail, Context, Result};
use nflib::packet;
use nflib::stats::{LocalCounters, PortCounter, PortKind, PORT_COUNTERS};
use nflib::Packet;

use super::{Port, PortCtx};

const TPACKET_V2: libc::c_int = 1;
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;
/// The smallest frame slot in both rings: room for a 1500-byte MTU frame with VLAN tags and
/// the ring's own header. Larger buffers (jumbo frames) get larger slots (`slot_size`).
const MIN_FRAME_SIZE: u32 = 2048;
const FRAMES_PER_BLOCK: u32 = 32;
/// Room in a slot before the frame: the ring's header, the `sockaddr_ll`, alignment.
const SLOT_OVERHEAD: u32 = 128;

/// The slot for frames of up to `max_frame` bytes: a multiple of 128 so a block of
/// `FRAMES_PER_BLOCK` slots is whole pages, as the kernel requires.
fn slot_size(max_frame: usize) -> u32 {
    let need = (max_frame as u32).saturating_add(SLOT_OVERHEAD);
    need.div_ceil(128).saturating_mul(128).max(MIN_FRAME_SIZE)
}
/// TPACKET_ALIGN(sizeof(struct tpacket2_hdr)): where frame data starts in a TX slot, and
/// where the `sockaddr_ll` sits in an RX slot.
const TPACKET2_HDR_ALIGNED: usize = 32;

/// A TPACKET_V2 ring mapped into our address space.
struct MappedRing {
    base: *mut u8,
    len: usize,
    frames: u32,
    frame_size: u32,
}

// SAFETY: the mapping is owned by this struct and only touched through &mut self methods of
// the port, which lives on one thread at a time.
unsafe impl Send for MappedRing {}

impl MappedRing {
    fn frame(&self, i: u32) -> *mut u8 {
        debug_assert!(i < self.frames);
        // SAFETY: i < frames and frames * frame_size == len (set up in `setup_ring`).
        unsafe { self.base.add(i as usize * self.frame_size as usize) }
    }

    fn status(&self, i: u32) -> &AtomicU32 {
        // SAFETY: each frame starts with a 4-byte aligned `tp_status` word that the kernel and
        // we hand back and forth; treating it as an atomic gives the needed ordering.
        unsafe { &*(self.frame(i) as *const AtomicU32) }
    }

    fn hdr(&self, i: u32) -> libc::tpacket2_hdr {
        // SAFETY: the frame begins with a tpacket2_hdr; read it by value after the status
        // word said the frame is ours.
        unsafe { std::ptr::read_volatile(self.frame(i) as *const libc::tpacket2_hdr) }
    }
}

impl Drop for MappedRing {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `setup_ring` mapped.
        unsafe { libc::munmap(self.base as *mut _, self.len) };
    }
}

fn last_err(what: &str) -> anyhow::Error {
    anyhow::Error::new(io::Error::last_os_error()).context(what.to_string())
}

fn setsockopt<T>(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    val: &T,
    what: &str,
) -> Result<()> {
    // SAFETY: passes a pointer to a live value and its exact size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            val as *const T as *const libc::c_void,
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(last_err(what));
    }
    Ok(())
}

fn packet_socket(protocol: u16) -> Result<OwnedFd> {
    // SAFETY: plain socket(2) call.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            protocol.to_be() as libc::c_int,
        )
    };
    if fd < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EPERM) {
            bail!("AF_PACKET sockets need root or CAP_NET_RAW");
        }
        return Err(anyhow::Error::new(e).context("cannot open an AF_PACKET socket"));
    }
    // SAFETY: fd is a new descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn setup_ring(fd: RawFd, which: libc::c_int, frames: u32, frame_size: u32) -> Result<MappedRing> {
    setsockopt(
        fd,
        libc::SOL_PACKET,
        libc::PACKET_VERSION,
        &TPACKET_V2,
        "PACKET_VERSION",
    )?;
    let req = libc::tpacket_req {
        tp_block_size: frame_size * FRAMES_PER_BLOCK,
        tp_block_nr: frames / FRAMES_PER_BLOCK,
        tp_frame_size: frame_size,
        tp_frame_nr: frames,
    };
    setsockopt(fd, libc::SOL_PACKET, which, &req, "PACKET_RX/TX_RING")?;
    let len = frame_size as usize * frames as usize;
    // SAFETY: maps the ring the kernel just allocated for this socket.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(last_err("cannot map the packet ring"));
    }
    Ok(MappedRing {
        base: base as *mut u8,
        len,
        frames,
        frame_size,
    })
}

fn bind(fd: RawFd, ifindex: i32, protocol: u16) -> Result<()> {
    // SAFETY: a zeroed sockaddr_ll is valid; we fill the fields bind needs.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = protocol.to_be();
    sll.sll_ifindex = ifindex;
    // SAFETY: pointer and size describe `sll`.
    let rc = unsafe {
        libc::bind(
            fd,
            &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(last_err("cannot bind the AF_PACKET socket"));
    }
    Ok(())
}

pub struct AfPacket {
    iface: String,
    rx_fd: OwnedFd,
    rx: MappedRing,
    rx_next: u32,
    tx_fd: OwnedFd,
    tx: MappedRing,
    tx_next: u32,
}

impl AfPacket {
    /// Opens the port with rings of `ring_frames` slots, each holding a frame of up to
    /// `max_frame` bytes (the region's buffers' data room).
    pub fn open(iface: &str, ring_frames: u32, max_frame: usize) -> Result<AfPacket> {
        let name = CString::new(iface).context("interface name contains NUL")?;
        // SAFETY: name is a valid C string.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) } as i32;
        if ifindex == 0 {
            bail!("no network interface named `{iface}` (in this network namespace)");
        }
        let frames = ring_frames.max(FRAMES_PER_BLOCK);
        let slot = slot_size(max_frame);
        let eth_p_all = libc::ETH_P_ALL as u16;

        let rx_fd = packet_socket(eth_p_all)?;
        let fd = rx_fd.as_raw_fd();
        setsockopt(
            fd,
            libc::SOL_PACKET,
            PACKET_IGNORE_OUTGOING,
            &1i32,
            "PACKET_IGNORE_OUTGOING",
        )?;
        let rx = setup_ring(fd, libc::PACKET_RX_RING, frames, slot)?;
        bind(fd, ifindex, eth_p_all)?;
        let mreq = libc::packet_mreq {
            mr_ifindex: ifindex,
            mr_type: libc::PACKET_MR_PROMISC as u16,
            mr_alen: 0,
            mr_address: [0; 8],
        };
        setsockopt(
            fd,
            libc::SOL_PACKET,
            libc::PACKET_ADD_MEMBERSHIP,
            &mreq,
            "promiscuous mode",
        )?;

        let tx_fd = packet_socket(0)?;
        let tfd = tx_fd.as_raw_fd();
        setsockopt(
            tfd,
            libc::SOL_PACKET,
            libc::PACKET_QDISC_BYPASS,
            &1i32,
            "PACKET_QDISC_BYPASS",
        )?;
        let tx = setup_ring(tfd, libc::PACKET_TX_RING, frames, slot)?;
        bind(tfd, ifindex, 0)?;

        Ok(AfPacket {
            iface: iface.to_string(),
            rx_fd,
            rx,
            rx_next: 0,
            tx_fd,
            tx,
            tx_next: 0,
        })
    }

    /// Reads and resets the kernel's drop counter for the receive socket.
    fn kernel_drops(&self) -> u64 {
        let mut st = libc::tpacket_stats {
            tp_packets: 0,
            tp_drops: 0,
        };
        let mut len = std::mem::size_of::<libc::tpacket_stats>() as libc::socklen_t;
        // SAFETY: st and len are valid for getsockopt to fill.
        let rc = unsafe {
            libc::getsockopt(
                self.rx_fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_STATISTICS,
                &mut st as *mut libc::tpacket_stats as *mut libc::c_void,
                &mut len,
            )
        };
        if rc == 0 {
            st.tp_drops as u64
        } else {
            0
        }
    }

    fn kick_tx(&self) {
        // SAFETY: a zero-length send on a TX_RING socket flushes the frames marked for sending.
        unsafe {
            libc::sendto(
                self.tx_fd.as_raw_fd(),
                std::ptr::null(),
                0,
                libc::MSG_DONTWAIT,
                std::ptr::null(),
                0,
            )
        };
    }
}

impl Port for AfPacket {
    fn kind(&self) -> PortKind {
        PortKind::AfPacket
    }

    fn rx(&mut self, ctx: &mut PortCtx<'_>, out: &mut Vec<Packet>, max: usize) {
        let room = ctx.region.config().data_room() as usize;
        let mut n = 0;
        while n < max {
            let i = self.rx_next;
            let status = self.rx.status(i).load(Ordering::Acquire);
            if status & libc::TP_STATUS_USER == 0 {
                break;
            }
            let h = self.rx.hdr(i);
            let frame_base = self.rx.frame(i);
            // The kernel's own bounds: data lies inside the frame slot.
            let mac = h.tp_mac as usize;
            let snap = h.tp_snaplen as usize;
            let sane = mac + snap <= self.rx.frame_size as usize;
            // SAFETY: the sockaddr_ll follows the aligned header inside the slot.
            let pkttype = unsafe {
                (*(frame_base.add(TPACKET2_HDR_ALIGNED) as *const libc::sockaddr_ll)).sll_pkttype
            };
            let vlan = status & libc::TP_STATUS_VLAN_VALID != 0;
            let total = snap + if vlan { 4 } else { 0 };
            let mut keep_for_later = false;
            if !sane || pkttype == libc::PACKET_OUTGOING {
                // Not ours to forward (our own transmission, or a corrupt slot).
            } else if (h.tp_len as usize) > snap || total > room || snap < 14 {
                ctx.count(PortCounter::RxOversize, 1);
            } else if let Some(mut p) = ctx.pool.alloc() {
                // SAFETY: [mac, mac+snap) lies inside the slot (checked above) and the slot is
                // ours until we hand it back below.
                let data = unsafe { std::slice::from_raw_parts(frame_base.add(mac), snap) };
                let buf = ctx.region.room_mut(&mut p);
                if vlan {
                    let tpid = if status & libc::TP_STATUS_VLAN_TPID_VALID != 0 {
                        h.tp_vlan_tpid
                    } else {
                        0x8100
                    };
                    buf[..12].copy_from_slice(&data[..12]);
                    buf[12..14].copy_from_slice(&tpid.to_be_bytes());
                    buf[14..16].copy_from_slice(&h.tp_vlan_tci.to_be_bytes());
                    buf[16..total].copy_from_slice(&data[12..]);
                } else {
                    buf[..snap].copy_from_slice(data);
                }
                ctx.region.set_len(&mut p, total);
                if status & libc::TP_STATUS_CSUMNOTREADY != 0
                    && packet::complete_l4_checksum(ctx.region.data_mut(&mut p))
                {
                    ctx.count(PortCounter::RxCsumCompleted, 1);
                }
                out.push(p);
                n += 1;
            } else {
                // Pool empty: leave the frame in the ring and try again later.
                ctx.count(PortCounter::RxDropNoBuffer, 1);
                keep_for_later = true;
            }
            if keep_for_later {
                break;
            }
            self.rx
                .status(i)
                .store(libc::TP_STATUS_KERNEL, Ordering::Release);
            self.rx_next = (i + 1) % self.rx.frames;
        }
    }

    fn tx(&mut self, ctx: &mut PortCtx<'_>, pkts: &mut Vec<Packet>) {
        let max_len = self.tx.frame_size as usize - TPACKET2_HDR_ALIGNED;
        let mut queued = 0;
        for p in pkts.drain(..) {
            let data = ctx.region.data(&p);
            let i = self.tx_next;
            let st = self.tx.status(i);
            let mut status = st.load(Ordering::Acquire);
            if status & libc::TP_STATUS_WRONG_FORMAT != 0 {
                ctx.count(PortCounter::TxErrors, 1);
                st.store(libc::TP_STATUS_AVAILABLE, Ordering::Release);
                status = libc::TP_STATUS_AVAILABLE;
            }
            if status != libc::TP_STATUS_AVAILABLE {
                if queued > 0 {
                    self.kick_tx();
                    queued = 0;
                }
                ctx.count(PortCounter::TxDropFull, 1);
                ctx.pool.free(p);
                continue;
            }
            if data.len() > max_len || data.is_empty() {
                ctx.count(PortCounter::TxErrors, 1);
                ctx.pool.free(p);
                continue;
            }
            let frame = self.tx.frame(i);
            // SAFETY: the slot is AVAILABLE, so the kernel does not read it until we set
            // SEND_REQUEST; the data fits (checked above).
            unsafe {
                std::ptr::copy_nonoverlapping(
                    data.as_ptr(),
                    frame.add(TPACKET2_HDR_ALIGNED),
                    data.len(),
                );
                let hdr = frame as *mut libc::tpacket2_hdr;
                (*hdr).tp_len = data.len() as u32;
                (*hdr).tp_snaplen = data.len() as u32;
            }
            ctx.count(PortCounter::TxPkts, 1);
            ctx.count(PortCounter::TxBytes, data.len() as u64);
            st.store(libc::TP_STATUS_SEND_REQUEST, Ordering::Release);
            self.tx_next = (i + 1) % self.tx.frames;
            queued += 1;
            ctx.pool.free(p);
        }
        if queued > 0 {
            self.kick_tx();
        }
    }

    fn rx_fd(&self) -> Option<RawFd> {
        Some(self.rx_fd.as_raw_fd())
    }

    fn housekeeping(&mut self, counters: &mut LocalCounters<PORT_COUNTERS>) {
        let drops = self.kernel_drops();
        counters.add(PortCounter::RxKernelDrops as usize, drops);
    }

    fn report(&self) -> Option<serde_json::Value> {
        Some(serde_json::json!({ "interface": self.iface }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_hold_the_largest_frame_and_make_whole_pages() {
        // Default buffers (1856 bytes of data room): the 2048-byte slots as before.
        assert_eq!(slot_size(1856), 2048);
        assert_eq!(slot_size(0), 2048);
        // Jumbo frames (8448-byte buffers) get a slot that holds them.
        let s = slot_size(8256);
        assert!(s >= 8256 + SLOT_OVERHEAD, "{s}");
        for room in [1856, 4000, 8256, 9100, 65_000] {
            let s = slot_size(room);
            assert!(s as usize >= room + SLOT_OVERHEAD as usize);
            assert_eq!(s % 16, 0, "TPACKET_ALIGNMENT");
            assert_eq!((s * FRAMES_PER_BLOCK) % 4096, 0, "blocks of whole pages");
        }
    }
}

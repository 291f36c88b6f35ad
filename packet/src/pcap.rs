//! Reading and writing capture files: classic pcap (microsecond and nanosecond, either byte
//! order) and pcapng (sections of either byte order, several interfaces, enhanced, simple and
//! obsolete packet blocks, per-interface timestamp resolution).
//!
//! Capture files come from anywhere, so the reader trusts no length: a record or block that
//! claims more than [`MAX_RECORD`] bytes, or runs past the end of the file, is an error that
//! says where, and everything before it has been delivered.

use std::io::{self, Read, Write};

use thiserror::Error;

/// Largest packet record accepted (well above any real snap length).
pub const MAX_RECORD: u32 = 256 * 1024;
/// Largest pcapng block accepted.
const MAX_BLOCK: u32 = 16 * 1024 * 1024;

pub mod linktype {
    pub const NULL: u32 = 0;
    pub const ETHERNET: u32 = 1;
    pub const RAW: u32 = 101;
    pub const LINUX_SLL: u32 = 113;
    pub const IPV4: u32 = 228;
    pub const IPV6: u32 = 229;
    pub const LINUX_SLL2: u32 = 276;
}

#[derive(Debug, Error)]
pub enum PcapError {
    #[error("read error: {0}")]
    Io(#[from] io::Error),
    #[error("not a pcap or pcapng file (magic {0:#010x})")]
    NotACapture(u32),
    #[error("record {index} is truncated (file ends inside it)")]
    Truncated { index: u64 },
    #[error("record {index} is malformed: {what}")]
    Malformed { index: u64, what: &'static str },
}

/// One packet read from a capture.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordInfo {
    /// Nanoseconds since the Unix epoch.
    pub ts_ns: u64,
    /// Link type of the interface it was captured on.
    pub linktype: u32,
    /// Length on the wire (may exceed the captured bytes).
    pub orig_len: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CaptureFormat {
    Pcap,
    PcapNg,
}

impl CaptureFormat {
    /// pcapng for `*.pcapng`, classic pcap otherwise.
    pub fn for_path(path: &std::path::Path) -> CaptureFormat {
        match path.extension().and_then(|e| e.to_str()) {
            Some(e) if e.eq_ignore_ascii_case("pcapng") => CaptureFormat::PcapNg,
            _ => CaptureFormat::Pcap,
        }
    }
}

#[derive(Clone, Copy)]
struct Endian(bool /* big */);

impl Endian {
    fn u16(self, b: &[u8]) -> u16 {
        let a = [b[0], b[1]];
        if self.0 {
            u16::from_be_bytes(a)
        } else {
            u16::from_le_bytes(a)
        }
    }
    fn u32(self, b: &[u8]) -> u32 {
        let a = [b[0], b[1], b[2], b[3]];
        if self.0 {
            u32::from_be_bytes(a)
        } else {
            u32::from_le_bytes(a)
        }
    }
}

struct NgInterface {
    linktype: u32,
    snaplen: u32,
    /// Timestamp units per second.
    units_per_sec: u64,
}

enum State {
    Pcap {
        endian: Endian,
        nanos: bool,
        linktype: u32,
    },
    Ng {
        endian: Endian,
        interfaces: Vec<NgInterface>,
    },
}

/// Reads packets from a pcap or pcapng stream.
pub struct CaptureReader<R: Read> {
    inner: R,
    state: State,
    index: u64,
    block: Vec<u8>,
}

/// Reads exactly `buf.len()` bytes; `Ok(false)` on a clean end of file before the first byte.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => {
                return if got == 0 {
                    Ok(false)
                } else {
                    Err(io::ErrorKind::UnexpectedEof.into())
                }
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

impl<R: Read> CaptureReader<R> {
    pub fn new(mut inner: R) -> Result<Self, PcapError> {
        let mut magic = [0u8; 4];
        if !read_full(&mut inner, &mut magic)? {
            return Err(PcapError::NotACapture(0));
        }
        let le = u32::from_le_bytes(magic);
        let state = match le {
            0xa1b2c3d4 | 0xd4c3b2a1 | 0xa1b23c4d | 0x4d3cb2a1 => {
                let endian = Endian(matches!(le, 0xd4c3b2a1 | 0x4d3cb2a1));
                let nanos = matches!(le, 0xa1b23c4d | 0x4d3cb2a1);
                let mut rest = [0u8; 20];
                if !read_full(&mut inner, &mut rest)
                    .map_err(|_| PcapError::Truncated { index: 0 })?
                {
                    return Err(PcapError::Truncated { index: 0 });
                }
                // The upper bits of the link-type field carry FCS information.
                let linktype = endian.u32(&rest[16..20]) & 0xffff;
                State::Pcap {
                    endian,
                    nanos,
                    linktype,
                }
            }
            0x0a0d0d0a => State::Ng {
                endian: Endian(false),
                interfaces: Vec::new(),
            },
            other => return Err(PcapError::NotACapture(other)),
        };
        let mut reader = CaptureReader {
            inner,
            state,
            index: 0,
            block: Vec::new(),
        };
        if matches!(reader.state, State::Ng { .. }) {
            reader.read_shb_after_type()?;
        }
        Ok(reader)
    }

    /// Reads the next packet into `data` (replacing its contents).
    pub fn next_record(&mut self, data: &mut Vec<u8>) -> Result<Option<RecordInfo>, PcapError> {
        match self.state {
            State::Pcap { .. } => self.next_pcap(data),
            State::Ng { .. } => self.next_ng(data),
        }
    }

    fn truncated(&self) -> PcapError {
        PcapError::Truncated { index: self.index }
    }

    fn malformed(&self, what: &'static str) -> PcapError {
        PcapError::Malformed {
            index: self.index,
            what,
        }
    }

    fn next_pcap(&mut self, data: &mut Vec<u8>) -> Result<Option<RecordInfo>, PcapError> {
        let State::Pcap {
            endian,
            nanos,
            linktype,
        } = self.state
        else {
            unreachable!("called for pcap state only")
        };
        let mut hdr = [0u8; 16];
        match read_full(&mut self.inner, &mut hdr) {
            Ok(false) => return Ok(None),
            Ok(true) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(self.truncated()),
            Err(e) => return Err(e.into()),
        }
        let sec = endian.u32(&hdr[0..4]) as u64;
        let frac = endian.u32(&hdr[4..8]) as u64;
        let incl = endian.u32(&hdr[8..12]);
        let orig = endian.u32(&hdr[12..16]);
        if incl > MAX_RECORD {
            return Err(self.malformed("captured length too large"));
        }
        data.resize(incl as usize, 0);
        match read_full(&mut self.inner, data) {
            Ok(true) => {}
            Ok(false) if incl == 0 => {}
            Ok(false) => return Err(self.truncated()),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(self.truncated()),
            Err(e) => return Err(e.into()),
        }
        self.index += 1;
        let ts_ns = sec * 1_000_000_000 + if nanos { frac } else { frac * 1000 };
        Ok(Some(RecordInfo {
            ts_ns,
            linktype,
            orig_len: orig,
        }))
    }

    /// Reads one pcapng block after its 4-byte type: returns (type, body).
    fn read_block_body(&mut self, ty: u32) -> Result<(), PcapError> {
        let State::Ng { endian, .. } = self.state else {
            unreachable!("pcapng only")
        };
        let mut len = [0u8; 4];
        match read_full(&mut self.inner, &mut len) {
            Ok(true) => {}
            _ => return Err(self.truncated()),
        }
        let total = endian.u32(&len);
        let _ = ty;
        if !(12..=MAX_BLOCK).contains(&total) || total % 4 != 0 {
            return Err(self.malformed("block length"));
        }
        self.block.resize(total as usize - 8, 0);
        let mut block = std::mem::take(&mut self.block);
        let r = read_full(&mut self.inner, &mut block);
        self.block = block;
        match r {
            Ok(true) => {}
            _ => return Err(self.truncated()),
        }
        let trailer = endian.u32(&self.block[self.block.len() - 4..]);
        if trailer != total {
            return Err(self.malformed("block trailer length differs"));
        }
        let body_len = self.block.len() - 4;
        self.block.truncate(body_len);
        Ok(())
    }

    fn read_shb_after_type(&mut self) -> Result<(), PcapError> {
        // The byte-order magic follows the length, so peek the length bytes raw first.
        let mut len_bytes = [0u8; 4];
        let mut bom = [0u8; 4];
        if !read_full(&mut self.inner, &mut len_bytes).map_err(|_| self.truncated())?
            || !read_full(&mut self.inner, &mut bom).map_err(|_| self.truncated())?
        {
            return Err(self.truncated());
        }
        let big = match u32::from_le_bytes(bom) {
            0x1a2b3c4d => false,
            0x4d3c2b1a => true,
            _ => return Err(self.malformed("section byte-order magic")),
        };
        let endian = Endian(big);
        let total = endian.u32(&len_bytes);
        if !(28..=MAX_BLOCK).contains(&total) || total % 4 != 0 {
            return Err(self.malformed("section header length"));
        }
        let mut rest = vec![0u8; total as usize - 12];
        if !read_full(&mut self.inner, &mut rest).map_err(|_| self.truncated())? {
            return Err(self.truncated());
        }
        self.state = State::Ng {
            endian,
            interfaces: Vec::new(),
        };
        Ok(())
    }

    fn next_ng(&mut self, data: &mut Vec<u8>) -> Result<Option<RecordInfo>, PcapError> {
        loop {
            let mut ty = [0u8; 4];
            match read_full(&mut self.inner, &mut ty) {
                Ok(false) => return Ok(None),
                Ok(true) => {}
                Err(_) => return Err(self.truncated()),
            }
            let State::Ng { endian, .. } = self.state else {
                unreachable!("pcapng only")
            };
            // A section header may start a new section with another byte order.
            if u32::from_le_bytes(ty) == 0x0a0d0d0a {
                self.read_shb_after_type()?;
                continue;
            }
            let ty = endian.u32(&ty);
            self.read_block_body(ty)?;
            match ty {
                1 => self.add_interface(endian)?,
                6 | 2 | 3 => {
                    if let Some(info) = self.packet_block(ty, endian, data)? {
                        self.index += 1;
                        return Ok(Some(info));
                    }
                }
                _ => {} // statistics, name resolution, custom: not needed for replay
            }
        }
    }

    fn add_interface(&mut self, endian: Endian) -> Result<(), PcapError> {
        let b = &self.block;
        if b.len() < 8 {
            return Err(self.malformed("interface description too short"));
        }
        let linktype = endian.u16(&b[0..2]) as u32;
        let snaplen = endian.u32(&b[4..8]);
        let mut units_per_sec = 1_000_000u64;
        let mut opt = 8;
        while opt + 4 <= b.len() {
            let code = endian.u16(&b[opt..opt + 2]);
            let len = endian.u16(&b[opt + 2..opt + 4]) as usize;
            let val = opt + 4;
            if code == 0 || val + len > b.len() {
                break;
            }
            if code == 9 && len >= 1 {
                let r = b[val];
                let exp = (r & 0x7f) as u32;
                units_per_sec = if r & 0x80 == 0 {
                    10u64.checked_pow(exp).unwrap_or(0)
                } else {
                    1u64.checked_shl(exp).unwrap_or(0)
                };
                if units_per_sec == 0 {
                    return Err(self.malformed("timestamp resolution out of range"));
                }
            }
            opt = val + len.div_ceil(4) * 4;
        }
        if let State::Ng { interfaces, .. } = &mut self.state {
            interfaces.push(NgInterface {
                linktype,
                snaplen,
                units_per_sec,
            });
        }
        Ok(())
    }

    fn packet_block(
        &mut self,
        ty: u32,
        endian: Endian,
        data: &mut Vec<u8>,
    ) -> Result<Option<RecordInfo>, PcapError> {
        let b = &self.block;
        let State::Ng { interfaces, .. } = &self.state else {
            unreachable!("pcapng only")
        };
        let (iface, ts_units, caplen, orig, off) = match ty {
            6 => {
                if b.len() < 20 {
                    return Err(self.malformed("enhanced packet block too short"));
                }
                let ts = ((endian.u32(&b[4..8]) as u64) << 32) | endian.u32(&b[8..12]) as u64;
                (
                    endian.u32(&b[0..4]) as usize,
                    ts,
                    endian.u32(&b[12..16]),
                    endian.u32(&b[16..20]),
                    20,
                )
            }
            2 => {
                if b.len() < 20 {
                    return Err(self.malformed("packet block too short"));
                }
                let ts = ((endian.u32(&b[4..8]) as u64) << 32) | endian.u32(&b[8..12]) as u64;
                (
                    endian.u16(&b[0..2]) as usize,
                    ts,
                    endian.u32(&b[12..16]),
                    endian.u32(&b[16..20]),
                    20,
                )
            }
            _ => {
                if b.len() < 4 {
                    return Err(self.malformed("simple packet block too short"));
                }
                let orig = endian.u32(&b[0..4]);
                let snap = interfaces.first().map(|i| i.snaplen).unwrap_or(0);
                let cap = if snap == 0 { orig } else { orig.min(snap) };
                (0, 0, cap.min((b.len() - 4) as u32), orig, 4)
            }
        };
        let Some(ifc) = interfaces.get(iface) else {
            return Err(self.malformed("packet names an undeclared interface"));
        };
        if caplen > MAX_RECORD || off + caplen as usize > b.len() {
            return Err(self.malformed("captured length exceeds the block"));
        }
        data.clear();
        data.extend_from_slice(&b[off..off + caplen as usize]);
        let ts_ns = if ifc.units_per_sec >= 1_000_000_000 {
            ts_units / (ifc.units_per_sec / 1_000_000_000)
        } else {
            ts_units.saturating_mul(1_000_000_000 / ifc.units_per_sec)
        };
        Ok(Some(RecordInfo {
            ts_ns,
            linktype: ifc.linktype,
            orig_len: orig,
        }))
    }
}

/// Writes packets as pcap (nanosecond timestamps) or pcapng (one interface, ns resolution).
pub struct CaptureWriter<W: Write> {
    inner: W,
    format: CaptureFormat,
}

impl<W: Write> CaptureWriter<W> {
    pub fn new(
        mut inner: W,
        format: CaptureFormat,
        linktype: u32,
        snaplen: u32,
    ) -> io::Result<Self> {
        match format {
            CaptureFormat::Pcap => {
                let mut h = Vec::with_capacity(24);
                h.extend_from_slice(&0xa1b23c4du32.to_le_bytes());
                h.extend_from_slice(&2u16.to_le_bytes());
                h.extend_from_slice(&4u16.to_le_bytes());
                h.extend_from_slice(&0i32.to_le_bytes());
                h.extend_from_slice(&0u32.to_le_bytes());
                h.extend_from_slice(&snaplen.to_le_bytes());
                h.extend_from_slice(&linktype.to_le_bytes());
                inner.write_all(&h)?;
            }
            CaptureFormat::PcapNg => {
                let mut shb = Vec::with_capacity(28);
                shb.extend_from_slice(&0x0a0d0d0au32.to_le_bytes());
                shb.extend_from_slice(&28u32.to_le_bytes());
                shb.extend_from_slice(&0x1a2b3c4du32.to_le_bytes());
                shb.extend_from_slice(&1u16.to_le_bytes());
                shb.extend_from_slice(&0u16.to_le_bytes());
                shb.extend_from_slice(&(-1i64).to_le_bytes());
                shb.extend_from_slice(&28u32.to_le_bytes());
                inner.write_all(&shb)?;
                // IDB with if_tsresol = 9 (nanoseconds).
                let mut idb = Vec::with_capacity(32);
                idb.extend_from_slice(&1u32.to_le_bytes());
                idb.extend_from_slice(&32u32.to_le_bytes());
                idb.extend_from_slice(&(linktype as u16).to_le_bytes());
                idb.extend_from_slice(&0u16.to_le_bytes());
                idb.extend_from_slice(&snaplen.to_le_bytes());
                idb.extend_from_slice(&9u16.to_le_bytes());
                idb.extend_from_slice(&1u16.to_le_bytes());
                idb.extend_from_slice(&[9, 0, 0, 0]);
                idb.extend_from_slice(&0u32.to_le_bytes()); // opt_endofopt
                idb.extend_from_slice(&32u32.to_le_bytes());
                inner.write_all(&idb)?;
            }
        }
        Ok(CaptureWriter { inner, format })
    }

    pub fn write_packet(&mut self, ts_ns: u64, data: &[u8], orig_len: u32) -> io::Result<()> {
        match self.format {
            CaptureFormat::Pcap => {
                let mut h = [0u8; 16];
                h[0..4].copy_from_slice(&((ts_ns / 1_000_000_000) as u32).to_le_bytes());
                h[4..8].copy_from_slice(&((ts_ns % 1_000_000_000) as u32).to_le_bytes());
                h[8..12].copy_from_slice(&(data.len() as u32).to_le_bytes());
                h[12..16].copy_from_slice(&orig_len.to_le_bytes());
                self.inner.write_all(&h)?;
                self.inner.write_all(data)
            }
            CaptureFormat::PcapNg => {
                let padded = data.len().div_ceil(4) * 4;
                let total = (32 + padded) as u32;
                let mut h = [0u8; 28];
                h[0..4].copy_from_slice(&6u32.to_le_bytes());
                h[4..8].copy_from_slice(&total.to_le_bytes());
                h[8..12].copy_from_slice(&0u32.to_le_bytes());
                h[12..16].copy_from_slice(&((ts_ns >> 32) as u32).to_le_bytes());
                h[16..20].copy_from_slice(&(ts_ns as u32).to_le_bytes());
                h[20..24].copy_from_slice(&(data.len() as u32).to_le_bytes());
                h[24..28].copy_from_slice(&orig_len.to_le_bytes());
                self.inner.write_all(&h)?;
                self.inner.write_all(data)?;
                self.inner.write_all(&[0u8; 3][..padded - data.len()])?;
                self.inner.write_all(&total.to_le_bytes())
            }
        }
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }

    pub fn into_inner(self) -> W {
        self.inner
    }
}

/// Reads every packet of a capture into memory (for tests and small files).
pub fn read_all<R: Read>(r: R) -> Result<Vec<(RecordInfo, Vec<u8>)>, PcapError> {
    let mut reader = CaptureReader::new(r)?;
    let mut out = Vec::new();
    let mut data = Vec::new();
    while let Some(info) = reader.next_record(&mut data)? {
        out.push((info, data.clone()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(format: CaptureFormat) {
        let mut w = CaptureWriter::new(Vec::new(), format, linktype::ETHERNET, 65535).unwrap();
        let pkts: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 60 + i as usize]).collect();
        for (i, p) in pkts.iter().enumerate() {
            w.write_packet(1_700_000_000_123_456_789 + i as u64, p, p.len() as u32 + 4)
                .unwrap();
        }
        let bytes = w.into_inner();
        let got = read_all(&bytes[..]).unwrap();
        assert_eq!(got.len(), 5);
        for (i, (info, data)) in got.iter().enumerate() {
            assert_eq!(data, &pkts[i]);
            assert_eq!(info.ts_ns, 1_700_000_000_123_456_789 + i as u64);
            assert_eq!(info.linktype, linktype::ETHERNET);
            assert_eq!(info.orig_len, pkts[i].len() as u32 + 4);
        }
    }

    #[test]
    fn pcap_roundtrip() {
        roundtrip(CaptureFormat::Pcap);
    }

    #[test]
    fn pcapng_roundtrip() {
        roundtrip(CaptureFormat::PcapNg);
    }

    #[test]
    fn reads_every_shared_capture() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/testdata/pcap");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return; // the shared test data is beside the project, not inside it
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().and_then(|x| x.to_str()) != Some("pcap") {
                continue;
            }
            let bytes = std::fs::read(&p).unwrap();
            let mut r = CaptureReader::new(&bytes[..]).unwrap();
            let mut data = Vec::new();
            let mut n = 0;
            loop {
                match r.next_record(&mut data) {
                    Ok(Some(_)) => n += 1,
                    Ok(None) => break,
                    Err(e) => {
                        // Only the deliberately broken captures may fail, and cleanly.
                        let name = p.file_name().unwrap().to_string_lossy().to_string();
                        assert!(
                            name.contains("asan")
                                || name.contains("overflow")
                                || name.contains("truncated"),
                            "{name}: {e}"
                        );
                        break;
                    }
                }
            }
            let _ = n;
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(matches!(
            CaptureReader::new(&b"hello world, no capture"[..]),
            Err(PcapError::NotACapture(_))
        ));
        // A pcap header promising a 1 GiB record.
        let mut f = Vec::new();
        f.extend_from_slice(&0xa1b2c3d4u32.to_le_bytes());
        f.extend_from_slice(&[
            2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 255, 255, 0, 0, 1, 0, 0, 0,
        ]);
        f.extend_from_slice(&[0; 8]);
        f.extend_from_slice(&(1u32 << 30).to_le_bytes());
        f.extend_from_slice(&[0; 4]);
        let mut r = CaptureReader::new(&f[..]).unwrap();
        let mut d = Vec::new();
        assert!(matches!(
            r.next_record(&mut d),
            Err(PcapError::Malformed { .. })
        ));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(tail in proptest::collection::vec(proptest::num::u8::ANY, 0..300), ng in proptest::bool::ANY) {
            let mut f = Vec::new();
            if ng {
                f.extend_from_slice(&0x0a0d0d0au32.to_le_bytes());
            } else {
                f.extend_from_slice(&0xa1b2c3d4u32.to_le_bytes());
            }
            f.extend_from_slice(&tail);
            if let Ok(mut r) = CaptureReader::new(&f[..]) {
                let mut d = Vec::new();
                for _ in 0..100 {
                    match r.next_record(&mut d) {
                        Ok(Some(_)) => {}
                        _ => break,
                    }
                }
            }
        }
    }
}

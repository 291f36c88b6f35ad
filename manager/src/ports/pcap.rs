//! `pcap:FILE` replays a capture (pcap or pcapng) into the platform, and [`Recorder`] writes
//! what a port transmits to a capture file (the `record` option of any port).
//!
//! The platform carries Ethernet frames. Captures of other link types are converted on
//! replay: raw IPv4/IPv6 and BSD loopback get an Ethernet header with locally administered
//! addresses, Linux cooked captures (SLL, SLL2) get one built from their protocol and source
//! address. Any other link type, and frames larger than a buffer, are dropped and counted.

use std::borrow::Cow;
use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nflib::pcap::{linktype, CaptureFormat, CaptureReader, CaptureWriter, RecordInfo};
use nflib::stats::{PortCounter, PortKind};
use nflib::Packet;

use super::{discard, Port, PortCtx};
use nflib::config::ReplaySpeed;

const SYNTH_DST: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const SYNTH_SRC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

fn with_ethernet(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn ip_ethertype(payload: &[u8]) -> Option<u16> {
    match payload.first()? >> 4 {
        4 => Some(0x0800),
        6 => Some(0x86dd),
        _ => None,
    }
}

/// The Ethernet frame for a captured packet, or `None` for link types that cannot become one.
pub fn to_ethernet(lt: u32, data: &[u8]) -> Option<Cow<'_, [u8]>> {
    match lt {
        linktype::ETHERNET => Some(Cow::Borrowed(data)),
        linktype::RAW | linktype::IPV4 | linktype::IPV6 => Some(Cow::Owned(with_ethernet(
            SYNTH_DST,
            SYNTH_SRC,
            ip_ethertype(data)?,
            data,
        ))),
        linktype::NULL => {
            let fam = u32::from_ne_bytes(data.get(..4)?.try_into().ok()?);
            let et = match fam {
                2 => 0x0800,
                24 | 28 | 30 => 0x86dd,
                _ => return None,
            };
            Some(Cow::Owned(with_ethernet(
                SYNTH_DST,
                SYNTH_SRC,
                et,
                &data[4..],
            )))
        }
        linktype::LINUX_SLL => {
            let h = data.get(..16)?;
            let et = u16::from_be_bytes([h[14], h[15]]);
            let halen = u16::from_be_bytes([h[4], h[5]]) as usize;
            let mut src = SYNTH_SRC;
            if halen == 6 {
                src.copy_from_slice(&h[6..12]);
            }
            (et >= 0x0600).then(|| Cow::Owned(with_ethernet(SYNTH_DST, src, et, &data[16..])))
        }
        linktype::LINUX_SLL2 => {
            let h = data.get(..20)?;
            let et = u16::from_be_bytes([h[0], h[1]]);
            let mut src = SYNTH_SRC;
            if h[11] == 6 {
                src.copy_from_slice(&h[12..18]);
            }
            (et >= 0x0600).then(|| Cow::Owned(with_ethernet(SYNTH_DST, src, et, &data[20..])))
        }
        _ => None,
    }
}

pub struct Replay {
    path: PathBuf,
    reader: Option<CaptureReader<BufReader<File>>>,
    speed: ReplaySpeed,
    /// Frames per second in total; `None` = unpaced (or capture timing with `realtime`).
    rate: Option<f64>,
    loops_left: u32,
    pending: Option<(RecordInfo, Vec<u8>)>,
    first_ts: Option<u64>,
    start: Option<Instant>,
    read: u64,
    sent: u64,
    error: Option<String>,
    done: bool,
    scratch: Vec<u8>,
}

impl Replay {
    pub fn open(path: &Path, speed: ReplaySpeed, rate: Option<f64>, loops: u32) -> Result<Replay> {
        let mut r = Replay {
            path: path.to_path_buf(),
            reader: None,
            speed,
            rate: rate.filter(|r| *r > 0.0),
            loops_left: loops.max(1),
            pending: None,
            first_ts: None,
            start: None,
            read: 0,
            sent: 0,
            error: None,
            done: false,
            scratch: Vec::new(),
        };
        r.reopen()?;
        Ok(r)
    }

    fn reopen(&mut self) -> Result<()> {
        let f = File::open(&self.path)
            .with_context(|| format!("cannot open capture {}", self.path.display()))?;
        self.reader = Some(
            CaptureReader::new(BufReader::with_capacity(1 << 16, f))
                .with_context(|| format!("cannot read capture {}", self.path.display()))?,
        );
        Ok(())
    }

    /// The next record, from the pending slot or the file (looping as configured).
    fn next_record(&mut self) -> Option<(RecordInfo, Vec<u8>)> {
        if let Some(p) = self.pending.take() {
            return Some(p);
        }
        loop {
            let reader = self.reader.as_mut()?;
            match reader.next_record(&mut self.scratch) {
                Ok(Some(info)) => {
                    self.read += 1;
                    return Some((info, std::mem::take(&mut self.scratch)));
                }
                Ok(None) => {
                    self.loops_left -= 1;
                    if self.loops_left == 0 {
                        self.reader = None;
                        return None;
                    }
                    self.first_ts = None;
                    self.start = None;
                    if let Err(e) = self.reopen() {
                        self.error = Some(format!("{e:#}"));
                        self.reader = None;
                        return None;
                    }
                }
                Err(e) => {
                    tracing::warn!(capture = %self.path.display(), error = %e, "stopping replay");
                    self.error = Some(e.to_string());
                    self.reader = None;
                    return None;
                }
            }
        }
    }

    fn paced_out(&self, info: &RecordInfo, now: Instant) -> bool {
        let Some(start) = self.start else {
            return false;
        };
        let elapsed = now.saturating_duration_since(start);
        if let Some(rate) = self.rate {
            return (self.sent as f64) >= elapsed.as_secs_f64() * rate;
        }
        if self.speed == ReplaySpeed::Realtime {
            let offset = info
                .ts_ns
                .saturating_sub(self.first_ts.unwrap_or(info.ts_ns));
            return Duration::from_nanos(offset) > elapsed;
        }
        false
    }
}

impl Port for Replay {
    fn kind(&self) -> PortKind {
        PortKind::Pcap
    }

    fn rx(&mut self, ctx: &mut PortCtx<'_>, out: &mut Vec<Packet>, max: usize) {
        let mut produced = 0;
        while produced < max && !self.done {
            let Some((info, data)) = self.next_record() else {
                self.done = true;
                ctx.counters.set(PortCounter::ReplayDone as usize, 1);
                break;
            };
            if self.first_ts.is_none() {
                self.first_ts = Some(info.ts_ns);
                self.start = Some(ctx.now);
            }
            if self.paced_out(&info, ctx.now) {
                self.pending = Some((info, data));
                break;
            }
            let Some(frame) = to_ethernet(info.linktype, &data) else {
                ctx.count(PortCounter::RxUnsupported, 1);
                self.scratch = data;
                continue;
            };
            if frame.len() > ctx.region.config().data_room() as usize {
                ctx.count(PortCounter::RxOversize, 1);
                continue;
            }
            let Some(mut p) = ctx.pool.alloc() else {
                ctx.count(PortCounter::RxDropNoBuffer, 1);
                drop(frame);
                self.pending = Some((info, data));
                break;
            };
            ctx.region.fill(&mut p, &frame);
            drop(frame);
            self.scratch = data;
            out.push(p);
            self.sent += 1;
            produced += 1;
        }
    }

    fn tx(&mut self, ctx: &mut PortCtx<'_>, pkts: &mut Vec<Packet>) {
        // Frames sent to a replay port go nowhere (record them with `record` if wanted).
        discard(ctx, pkts, PortCounter::TxPkts);
    }

    fn next_wake(&self, now: Instant) -> Option<Instant> {
        if self.done {
            return None;
        }
        let Some((info, _)) = &self.pending else {
            return Some(now);
        };
        let start = self.start?;
        if let Some(rate) = self.rate {
            return Some(start + Duration::from_secs_f64(self.sent as f64 / rate));
        }
        let offset = info
            .ts_ns
            .saturating_sub(self.first_ts.unwrap_or(info.ts_ns));
        Some(start + Duration::from_nanos(offset))
    }

    fn finished(&self) -> bool {
        self.done
    }

    fn is_source(&self) -> bool {
        true
    }

    fn report(&self) -> Option<serde_json::Value> {
        Some(serde_json::json!({
            "capture": self.path.display().to_string(),
            "frames_read": self.read,
            "frames_sent": self.sent,
            "error": self.error,
        }))
    }
}

/// Writes frames to a capture file (pcap or pcapng by extension).
pub struct Recorder {
    path: PathBuf,
    writer: Option<CaptureWriter<BufWriter<File>>>,
    written: u64,
}

impl Recorder {
    pub fn create(path: &Path) -> Result<Recorder> {
        let f = File::create(path)
            .with_context(|| format!("cannot create capture {}", path.display()))?;
        let writer = CaptureWriter::new(
            BufWriter::with_capacity(1 << 20, f),
            CaptureFormat::for_path(path),
            linktype::ETHERNET,
            65535,
        )
        .with_context(|| format!("cannot write capture {}", path.display()))?;
        Ok(Recorder {
            path: path.to_path_buf(),
            writer: Some(writer),
            written: 0,
        })
    }

    pub fn write(&mut self, ts_ns: u64, frame: &[u8]) {
        let Some(w) = self.writer.as_mut() else {
            return;
        };
        if let Err(e) = w.write_packet(ts_ns, frame, frame.len() as u32) {
            tracing::error!(capture = %self.path.display(), error = %e, "recording stopped");
            self.writer = None;
            return;
        }
        self.written += 1;
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    pub fn close(&mut self) {
        if let Some(mut w) = self.writer.take() {
            if let Err(e) = w.flush() {
                tracing::error!(capture = %self.path.display(), error = %e, "cannot flush capture");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_ip_gets_an_ethernet_header() {
        let ip = [0x45u8, 0, 0, 20];
        let f = to_ethernet(linktype::IPV4, &ip).unwrap();
        assert_eq!(&f[12..14], &[0x08, 0x00]);
        assert_eq!(&f[14..], &ip);
        assert!(to_ethernet(linktype::RAW, &[0x15, 0]).is_none());
        assert!(to_ethernet(147, &ip).is_none());
    }

    #[test]
    fn linux_cooked_keeps_protocol_and_source() {
        let mut sll = vec![0u8, 0, 0, 1, 0, 6, 1, 2, 3, 4, 5, 6, 0, 0, 0x86, 0xdd];
        sll.extend_from_slice(&[0x60, 0, 0, 0]);
        let f = to_ethernet(linktype::LINUX_SLL, &sll).unwrap();
        assert_eq!(&f[6..12], &[1, 2, 3, 4, 5, 6]);
        assert_eq!(&f[12..14], &[0x86, 0xdd]);
        assert_eq!(&f[14..], &[0x60, 0, 0, 0]);
        assert!(to_ethernet(linktype::LINUX_SLL, &sll[..10]).is_none());
    }
}

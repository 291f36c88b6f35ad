//! Writing packets from scratch (the generator and tests).

use super::checksum;

/// An Ethernet + IPv4 + UDP packet with `payload_len` bytes of payload left for the caller.
#[derive(Clone, Copy, Debug)]
pub struct UdpV4 {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src_ip: [u8; 4],
    pub dst_ip: [u8; 4],
    pub src_port: u16,
    pub dst_port: u16,
    pub payload_len: usize,
}

impl UdpV4 {
    /// Bytes of headers before the payload.
    pub const HEADER_LEN: usize = 14 + 20 + 8;

    /// Writes the headers (IPv4 checksum filled, UDP checksum 0 = none) and zeroes the payload.
    /// Returns the frame length, or `None` if `buf` is too small or the datagram too long.
    pub fn write(&self, buf: &mut [u8]) -> Option<usize> {
        let total = Self::HEADER_LEN + self.payload_len;
        let ip_len = u16::try_from(20 + 8 + self.payload_len).ok()?;
        if buf.len() < total {
            return None;
        }
        let b = &mut buf[..total];
        b[0..6].copy_from_slice(&self.dst_mac);
        b[6..12].copy_from_slice(&self.src_mac);
        b[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        let ip = &mut b[14..34];
        ip.copy_from_slice(&[
            0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ]);
        ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
        ip[12..16].copy_from_slice(&self.src_ip);
        ip[16..20].copy_from_slice(&self.dst_ip);
        let c = checksum::checksum(ip);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        let udp = &mut b[34..42];
        udp[0..2].copy_from_slice(&self.src_port.to_be_bytes());
        udp[2..4].copy_from_slice(&self.dst_port.to_be_bytes());
        udp[4..6].copy_from_slice(&(ip_len - 20).to_be_bytes());
        udp[6..8].copy_from_slice(&[0, 0]);
        b[42..].fill(0);
        Some(total)
    }
}

/// An Ethernet + IPv4 + TCP packet (20-byte header, no options) with `payload_len` zeroed
/// bytes of payload, both checksums filled.
#[derive(Clone, Copy, Debug)]
pub struct TcpV4 {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src_ip: [u8; 4],
    pub dst_ip: [u8; 4],
    pub src_port: u16,
    pub dst_port: u16,
    pub seq: u32,
    pub ack: u32,
    /// TCP flags (`nf::tcp_flags`).
    pub flags: u8,
    pub payload_len: usize,
}

impl TcpV4 {
    /// Bytes of headers before the payload.
    pub const HEADER_LEN: usize = 14 + 20 + 20;

    /// Writes the frame; its length, or `None` if `buf` is too small or the segment too long.
    pub fn write(&self, buf: &mut [u8]) -> Option<usize> {
        let total = Self::HEADER_LEN + self.payload_len;
        let ip_len = u16::try_from(40 + self.payload_len).ok()?;
        if buf.len() < total {
            return None;
        }
        let b = &mut buf[..total];
        b[0..6].copy_from_slice(&self.dst_mac);
        b[6..12].copy_from_slice(&self.src_mac);
        b[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        b[54..].fill(0);
        let ip = &mut b[14..34];
        ip.copy_from_slice(&[
            0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ]);
        ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
        ip[12..16].copy_from_slice(&self.src_ip);
        ip[16..20].copy_from_slice(&self.dst_ip);
        let c = checksum::checksum(ip);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        let tcp = &mut b[34..54];
        tcp.fill(0);
        tcp[0..2].copy_from_slice(&self.src_port.to_be_bytes());
        tcp[2..4].copy_from_slice(&self.dst_port.to_be_bytes());
        tcp[4..8].copy_from_slice(&self.seq.to_be_bytes());
        tcp[8..12].copy_from_slice(&self.ack.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = self.flags;
        tcp[14..16].copy_from_slice(&65535u16.to_be_bytes());
        let pseudo = checksum::pseudo_v4(self.src_ip, self.dst_ip, 6, ip_len - 20);
        let c = checksum::finish(checksum::sum(pseudo, &b[34..]));
        b[50..52].copy_from_slice(&c.to_be_bytes());
        Some(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tcp_segment_parses_with_valid_checksums() {
        let mut buf = [0u8; 80];
        let n = TcpV4 {
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: [2, 0, 0, 0, 0, 2],
            src_ip: [10, 0, 0, 1],
            dst_ip: [10, 0, 0, 2],
            src_port: 40000,
            dst_port: 80,
            seq: 7,
            ack: 9,
            flags: 0x12,
            payload_len: 10,
        }
        .write(&mut buf)
        .unwrap();
        let h = crate::parse(&buf[..n]).unwrap();
        assert_eq!((h.src_port, h.dst_port, h.l4_off), (40000, 80, 34));
        assert_eq!(checksum::checksum(&buf[14..34]), 0);
        let pseudo = checksum::pseudo_v4([10, 0, 0, 1], [10, 0, 0, 2], 6, 30);
        assert_eq!(checksum::finish(checksum::sum(pseudo, &buf[34..n])), 0);
    }
}

//! ARP over Ethernet for IPv4 (RFC 826): enough to answer requests and to steer by address.

use super::{ethertype, Headers, L3};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arp {
    /// 1 request, 2 reply.
    pub op: u16,
    pub sha: [u8; 6],
    pub spa: [u8; 4],
    pub tha: [u8; 6],
    pub tpa: [u8; 4],
    /// Offset of the ARP header in the frame.
    pub offset: usize,
}

/// The ARP message of a parsed frame, if it is an Ethernet/IPv4 ARP.
pub fn parse(h: &Headers, frame: &[u8]) -> Option<Arp> {
    if h.l3 != L3::None || h.ethertype != ethertype::ARP {
        return None;
    }
    let a = h.l3_off as usize;
    let b = frame.get(a..a + 28)?;
    // Hardware Ethernet (1), protocol IPv4, address lengths 6 and 4.
    if b[0..2] != [0, 1] || b[2..4] != [8, 0] || b[4] != 6 || b[5] != 4 {
        return None;
    }
    let mut arp = Arp {
        op: u16::from_be_bytes([b[6], b[7]]),
        sha: [0; 6],
        spa: [0; 4],
        tha: [0; 6],
        tpa: [0; 4],
        offset: a,
    };
    arp.sha.copy_from_slice(&b[8..14]);
    arp.spa.copy_from_slice(&b[14..18]);
    arp.tha.copy_from_slice(&b[18..24]);
    arp.tpa.copy_from_slice(&b[24..28]);
    Some(arp)
}

/// Writes an ARP request "who has `tpa`, tell `spa`" (tests and tools).
pub fn request(buf: &mut [u8], sha: [u8; 6], spa: [u8; 4], tpa: [u8; 4]) -> Option<usize> {
    let f = buf.get_mut(..42)?;
    f[0..6].fill(0xff);
    f[6..12].copy_from_slice(&sha);
    f[12..14].copy_from_slice(&ethertype::ARP.to_be_bytes());
    f[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f[22..28].copy_from_slice(&sha);
    f[28..32].copy_from_slice(&spa);
    f[32..38].fill(0);
    f[38..42].copy_from_slice(&tpa);
    Some(42)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_request() {
        let mut b = [0u8; 60];
        let n = request(&mut b, [2, 0, 0, 0, 0, 1], [10, 0, 0, 1], [10, 0, 0, 9]).unwrap();
        let h = crate::parse(&b[..n]).unwrap();
        let a = parse(&h, &b[..n]).unwrap();
        assert_eq!((a.op, a.spa, a.tpa), (1, [10, 0, 0, 1], [10, 0, 0, 9]));
        assert_eq!(a.offset, 14);
    }
}

//! Internet checksums (RFC 1071) and their incremental update (RFC 1624).

/// One's-complement sum of `data` added to `acc`, not yet folded.
#[inline]
pub fn sum(mut acc: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc = acc.wrapping_add(u16::from_be_bytes([c[0], c[1]]) as u32);
        // Fold early so the accumulator never overflows on large inputs.
        if acc > 0xffff_0000 {
            acc = (acc & 0xffff) + (acc >> 16);
        }
    }
    if let [last] = chunks.remainder() {
        acc = acc.wrapping_add((*last as u32) << 8);
    }
    acc
}

/// Folds a sum to 16 bits and complements it: the value to store in a checksum field.
#[inline]
pub fn finish(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// Checksum of `data` alone (e.g. an IPv4 header with its checksum field zeroed).
pub fn checksum(data: &[u8]) -> u16 {
    finish(sum(0, data))
}

/// Sum of the IPv4 pseudo-header for a transport checksum.
pub fn pseudo_v4(src: [u8; 4], dst: [u8; 4], proto: u8, len: u16) -> u32 {
    let acc = sum(0, &src);
    let acc = sum(acc, &dst);
    acc + proto as u32 + len as u32
}

/// Sum of the IPv6 pseudo-header for a transport checksum.
pub fn pseudo_v6(src: [u8; 16], dst: [u8; 16], proto: u8, len: u32) -> u32 {
    let acc = sum(0, &src);
    let acc = sum(acc, &dst);
    acc + (len >> 16) + (len & 0xffff) + proto as u32
}

/// Updates a checksum field for a 16-bit word changing from `old` to `new` (RFC 1624 eq. 3).
pub fn update16(check: u16, old: u16, new: u16) -> u16 {
    let acc = (!check as u32) + (!old as u32 & 0xffff) + new as u32;
    finish(acc)
}

/// Updates a checksum field for a 32-bit value (an IPv4 address) changing.
pub fn update32(check: u16, old: [u8; 4], new: [u8; 4]) -> u16 {
    let c = update16(
        check,
        u16::from_be_bytes([old[0], old[1]]),
        u16::from_be_bytes([new[0], new[1]]),
    );
    update16(
        c,
        u16::from_be_bytes([old[2], old[3]]),
        u16::from_be_bytes([new[2], new[3]]),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc1071_example() {
        // The example from RFC 1071 section 3.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(finish(sum(0, &data)), !0xddf2);
    }

    #[test]
    fn incremental_update_matches_recompute() {
        let mut hdr = [
            0x45u8, 0, 0, 60, 0x1c, 0x46, 0x40, 0, 0x40, 6, 0, 0, 172, 16, 10, 99, 172, 16, 10, 12,
        ];
        let c = checksum(&hdr);
        hdr[10..12].copy_from_slice(&c.to_be_bytes());
        assert_eq!(checksum(&hdr), 0);
        let old = [hdr[12], hdr[13], hdr[14], hdr[15]];
        let new = [10, 0, 0, 1];
        hdr[12..16].copy_from_slice(&new);
        let updated = update32(c, old, new);
        hdr[10..12].copy_from_slice(&[0, 0]);
        assert_eq!(updated, checksum(&hdr));
    }
}

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

/// What a checksum takes in when a 16-bit word of its data changes from `old` to `new`:
/// `~old + new` (RFC 1624 eq. 3), not yet folded. Differences add up, and one difference
/// serves every checksum the word is part of (an IPv4 address is in the IP header's and,
/// through the pseudo-header, the transport's).
#[inline(always)]
pub fn diff16(old: u16, new: u16) -> u32 {
    (!old) as u32 + new as u32
}

/// `diff16` for a 32-bit field (an IPv4 address): both of its words.
#[inline(always)]
pub fn diff32(old: [u8; 4], new: [u8; 4]) -> u32 {
    let (o, n) = (!u32::from_be_bytes(old), u32::from_be_bytes(new));
    (o >> 16) + (o & 0xffff) + (n >> 16) + (n & 0xffff)
}

/// A checksum field after its data changed by `diff` (a sum of `diff16` and `diff32`
/// values, at most 0x7fff_0000: two folds then always bring it to 16 bits).
#[inline(always)]
pub fn apply(check: u16, diff: u32) -> u16 {
    debug_assert!(diff <= 0x7fff_0000);
    let acc = (!check) as u32 + diff;
    let acc = (acc & 0xffff) + (acc >> 16);
    let acc = (acc & 0xffff) + (acc >> 16);
    !(acc as u16)
}

/// Updates a checksum field for a 16-bit word changing from `old` to `new` (RFC 1624 eq. 3).
#[inline]
pub fn update16(check: u16, old: u16, new: u16) -> u16 {
    apply(check, diff16(old, new))
}

/// Updates a checksum field for a 32-bit value (an IPv4 address) changing.
#[inline]
pub fn update32(check: u16, old: [u8; 4], new: [u8; 4]) -> u16 {
    apply(check, diff32(old, new))
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

    /// Incremental updates of an address and a port, in one difference or word by word,
    /// give the checksum a full recomputation gives, over many pseudo-random headers.
    #[test]
    fn differences_match_recompute() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..20_000 {
            let mut data = [0u8; 24];
            for b in data.iter_mut() {
                *b = next() as u8;
            }
            let c = checksum(&data);
            let old_addr = [data[4], data[5], data[6], data[7]];
            let old_port = u16::from_be_bytes([data[10], data[11]]);
            let r = next();
            let new_addr = (r as u32).to_be_bytes();
            let new_port = (r >> 32) as u16;
            data[4..8].copy_from_slice(&new_addr);
            data[10..12].copy_from_slice(&new_port.to_be_bytes());
            let full = checksum(&data);
            let once = apply(c, diff32(old_addr, new_addr) + diff16(old_port, new_port));
            let stepwise = update16(update32(c, old_addr, new_addr), old_port, new_port);
            // One's complement has two zeros; a checksum field may hold either.
            let same = |a: u16, b: u16| a == b || (a | b == 0xffff && a & b == 0);
            assert!(same(once, full), "{once:#x} {full:#x}");
            assert!(same(stepwise, full), "{stepwise:#x} {full:#x}");
        }
    }
}

//! Addresses as operators write them in configuration: IP prefixes, port ranges, MAC
//! addresses. Parsing errors say what was expected.

use std::fmt;
use std::net::IpAddr;
use std::ops::RangeInclusive;

use serde::{Deserialize, Serialize};

/// What is wrong with an address, prefix, port range or MAC address as written (the text is
/// quoted back).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("`{0}` is not an IP address or prefix")]
    NotIp(String),
    #[error("`{text}`: prefix length must be 0-{max}")]
    PrefixLength { text: String, max: u8 },
    #[error("`{0}` is not a port or a range like 1024-65535")]
    NotPorts(String),
    #[error("`{0}`: the range is reversed")]
    ReversedRange(String),
    #[error("`{0}` is not a MAC address like 02:00:00:00:00:01")]
    NotMac(String),
    #[error("`{0}` is not an IPv4 address")]
    NotIpv4(String),
}

/// An IPv4 or IPv6 prefix (`10.0.0.0/8`, `2001:db8::/32`, or a single address).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Prefix {
    /// IPv4 addresses in the first 4 bytes, as in `Headers`.
    addr: [u8; 16],
    len: u8,
    v6: bool,
}

impl Prefix {
    pub fn parse(s: &str) -> Result<Prefix, AddressError> {
        let (ip, len) = match s.split_once('/') {
            Some((ip, l)) => (ip, Some(l)),
            None => (s, None),
        };
        let ip: IpAddr = ip
            .trim()
            .parse()
            .map_err(|_| AddressError::NotIp(s.to_string()))?;
        let (mut addr, max, v6) = match ip {
            IpAddr::V4(a) => {
                let mut b = [0u8; 16];
                b[..4].copy_from_slice(&a.octets());
                (b, 32u8, false)
            }
            IpAddr::V6(a) => (a.octets(), 128u8, true),
        };
        let len = match len {
            Some(l) => l
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(|| AddressError::PrefixLength {
                    text: s.to_string(),
                    max,
                })?,
            None => max,
        };
        mask(&mut addr, len);
        Ok(Prefix { addr, len, v6 })
    }

    /// Whether `ip` (IPv4 in the first 4 bytes when `v6` is false) lies in the prefix.
    pub fn contains(&self, ip: &[u8; 16], v6: bool) -> bool {
        if v6 != self.v6 {
            return false;
        }
        let mut masked = *ip;
        if !v6 {
            masked[4..].fill(0);
        }
        mask(&mut masked, self.len);
        masked == self.addr
    }

    pub fn is_v6(&self) -> bool {
        self.v6
    }

    pub fn len(&self) -> u8 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

fn mask(a: &mut [u8; 16], len: u8) {
    for (i, b) in a.iter_mut().enumerate() {
        let bits = (len as i32 - i as i32 * 8).clamp(0, 8);
        *b &= if bits == 0 { 0 } else { 0xffu8 << (8 - bits) };
    }
}

impl TryFrom<String> for Prefix {
    type Error = AddressError;
    fn try_from(s: String) -> Result<Self, AddressError> {
        Prefix::parse(&s)
    }
}

impl From<Prefix> for String {
    fn from(p: Prefix) -> String {
        p.to_string()
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.v6 {
            write!(f, "{}/{}", std::net::Ipv6Addr::from(self.addr), self.len)
        } else {
            let a = &self.addr;
            write!(f, "{}.{}.{}.{}/{}", a[0], a[1], a[2], a[3], self.len)
        }
    }
}

/// A port or an inclusive range (`80`, `"1024-65535"`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "PortText", into = "PortText")]
pub struct PortRange(pub RangeInclusive<u16>);

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PortText {
    One(u16),
    Text(String),
}

impl PortRange {
    pub fn parse(s: &str) -> Result<PortRange, AddressError> {
        let bad = || AddressError::NotPorts(s.to_string());
        let (a, b) = match s.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (s.trim(), s.trim()),
        };
        let a: u16 = a.parse().map_err(|_| bad())?;
        let b: u16 = b.parse().map_err(|_| bad())?;
        if a > b {
            return Err(AddressError::ReversedRange(s.to_string()));
        }
        Ok(PortRange(a..=b))
    }

    pub fn contains(&self, p: u16) -> bool {
        self.0.contains(&p)
    }
}

impl TryFrom<PortText> for PortRange {
    type Error = AddressError;
    fn try_from(t: PortText) -> Result<Self, AddressError> {
        match t {
            PortText::One(p) => Ok(PortRange(p..=p)),
            PortText::Text(s) => PortRange::parse(&s),
        }
    }
}

impl From<PortRange> for PortText {
    fn from(r: PortRange) -> PortText {
        if r.0.start() == r.0.end() {
            PortText::One(*r.0.start())
        } else {
            PortText::Text(format!("{}-{}", r.0.start(), r.0.end()))
        }
    }
}

/// A MAC address `02:00:00:00:00:01`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Mac(pub [u8; 6]);

impl Mac {
    pub fn parse(s: &str) -> Result<Mac, AddressError> {
        let parts: Vec<&str> = s.split(':').collect();
        let bad = || AddressError::NotMac(s.to_string());
        if parts.len() != 6 {
            return Err(bad());
        }
        let mut m = [0u8; 6];
        for (b, p) in m.iter_mut().zip(parts) {
            *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        Ok(Mac(m))
    }
}

impl TryFrom<String> for Mac {
    type Error = AddressError;
    fn try_from(s: String) -> Result<Self, AddressError> {
        Mac::parse(&s)
    }
}

impl From<Mac> for String {
    fn from(m: Mac) -> String {
        m.to_string()
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// An IPv4 address in configuration.
pub fn parse_ipv4(s: &str) -> Result<[u8; 4], AddressError> {
    s.trim()
        .parse::<std::net::Ipv4Addr>()
        .map(|a| a.octets())
        .map_err(|_| AddressError::NotIpv4(s.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(a: [u8; 4]) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..4].copy_from_slice(&a);
        b
    }

    #[test]
    fn prefixes() {
        let p = Prefix::parse("10.1.0.0/16").unwrap();
        assert!(p.contains(&v4([10, 1, 200, 3]), false));
        assert!(!p.contains(&v4([10, 2, 0, 1]), false));
        assert!(!p.contains(&v4([10, 1, 0, 1]), true));
        assert_eq!(
            Prefix::parse("10.1.2.3/8").unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert!(Prefix::parse("0.0.0.0/0")
            .unwrap()
            .contains(&v4([1, 2, 3, 4]), false));
        let p6 = Prefix::parse("2001:db8::/32").unwrap();
        let ip: std::net::Ipv6Addr = "2001:db8::1".parse().unwrap();
        assert!(p6.contains(&ip.octets(), true));
        assert_eq!(
            Prefix::parse("10.0.0.0/33"),
            Err(AddressError::PrefixLength {
                text: "10.0.0.0/33".into(),
                max: 32
            })
        );
        assert_eq!(
            Prefix::parse("nope").unwrap_err().to_string(),
            "`nope` is not an IP address or prefix"
        );
    }

    #[test]
    fn ports_and_macs() {
        assert!(PortRange::parse("1000-2000").unwrap().contains(1500));
        assert_eq!(
            PortRange::parse("2000-1000"),
            Err(AddressError::ReversedRange("2000-1000".into()))
        );
        assert_eq!(
            Mac::parse("02:00:0a:ff:00:01").unwrap().0,
            [2, 0, 10, 255, 0, 1]
        );
        assert_eq!(
            Mac::parse("02:00"),
            Err(AddressError::NotMac("02:00".into()))
        );
    }
}

//! Who deposits mail: the depositing connection's authenticated peer id
//! and the address it came from. Per-depositor quotas are counted under
//! both, since a fresh peer id costs nothing and an address costs
//! something.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};

/// The address part of a depositor, as quotas key it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    V4([u8; 4]),
    /// An IPv6 /64: one subscriber's usual allocation, so a host cannot
    /// step through its 2^64 addresses to escape its quota.
    V6([u8; 8]),
    /// No IP address (the memory transport): all such connections share
    /// one key, so they are limited together rather than not at all.
    Unknown,
}

impl Source {
    pub fn of_ip(ip: IpAddr) -> Source {
        match ip {
            IpAddr::V4(v4) => Source::V4(v4.octets()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source::V4(v4.octets()),
                None => {
                    let mut prefix = [0u8; 8];
                    prefix.copy_from_slice(&v6.octets()[..8]);
                    Source::V6(prefix)
                }
            },
        }
    }

    /// The source of a connection whose remote address is `addr`: its
    /// first IP address (for a circuit through another relay, that
    /// relay's).
    pub fn of_addr(addr: &Multiaddr) -> Source {
        addr.iter()
            .find_map(|p| match p {
                Protocol::Ip4(ip) => Some(Source::of_ip(IpAddr::V4(ip))),
                Protocol::Ip6(ip) => Some(Source::of_ip(IpAddr::V6(ip))),
                _ => None,
            })
            .unwrap_or(Source::Unknown)
    }

    /// The stored key: 4, 8 or 0 bytes.
    pub fn key(&self) -> &[u8] {
        match self {
            Source::V4(b) => b,
            Source::V6(b) => b,
            Source::Unknown => &[],
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::V4(b) => write!(f, "{}", Ipv4Addr::from(*b)),
            Source::V6(b) => {
                let mut full = [0u8; 16];
                full[..8].copy_from_slice(b);
                write!(f, "{}/64", Ipv6Addr::from(full))
            }
            Source::Unknown => f.write_str("connections without an IP address"),
        }
    }
}

/// The one who deposits: its peer id and where it connected from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Depositor {
    pub peer: PeerId,
    pub source: Source,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_key_ipv4_whole_ipv6_by_64_and_unmap_mapped_addresses() {
        let a: Multiaddr = "/ip4/192.0.2.7/tcp/4040".parse().unwrap();
        assert_eq!(Source::of_addr(&a), Source::V4([192, 0, 2, 7]));
        let b: Multiaddr = "/ip6/2001:db8:1:2:aaaa::1/udp/1/quic-v1".parse().unwrap();
        let c: Multiaddr = "/ip6/2001:db8:1:2:bbbb::9/tcp/1".parse().unwrap();
        assert_eq!(Source::of_addr(&b), Source::of_addr(&c));
        assert_eq!(Source::of_addr(&b).to_string(), "2001:db8:1:2::/64");
        let d: Multiaddr = "/ip6/2001:db8:1:3::1/tcp/1".parse().unwrap();
        assert_ne!(Source::of_addr(&b), Source::of_addr(&d));
        let mapped: Multiaddr = "/ip6/::ffff:192.0.2.7/tcp/1".parse().unwrap();
        assert_eq!(Source::of_addr(&mapped), Source::V4([192, 0, 2, 7]));
        let memory: Multiaddr = "/memory/1234".parse().unwrap();
        assert_eq!(Source::of_addr(&memory), Source::Unknown);
        assert!(Source::Unknown.key().is_empty());
    }
}

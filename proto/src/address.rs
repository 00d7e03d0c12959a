//! What an IP address counts as when limits and bans are kept by address:
//! [`AddressKey`], shared by the node (its address bans and per-address
//! connection cap) and the relay (its per-depositor quotas, whose stored
//! key is [`AddressKey::key`], and its per-address connection cap).
//!
//! A peer id costs nothing to make; an address costs something. But an
//! IPv6 subscriber usually holds a whole /64, and can step through its
//! 2^64 addresses, so IPv6 counts by its /64. IPv4 counts whole, and an
//! IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, what a dual-stack socket
//! reports for an IPv4 peer) as the IPv4 address it maps.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use libp2p::Multiaddr;
use libp2p::multiaddr::Protocol;

/// An address as limits and bans count it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AddressKey {
    V4([u8; 4]),
    /// An IPv6 /64: one subscriber's usual allocation, so a host cannot
    /// step through its 2^64 addresses to escape a limit or a ban.
    V6([u8; 8]),
    /// No IP address (the memory transport): all such connections share
    /// one key, so they are limited together rather than not at all.
    Unknown,
}

impl AddressKey {
    pub fn of_ip(ip: IpAddr) -> AddressKey {
        match ip {
            IpAddr::V4(v4) => AddressKey::V4(v4.octets()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => AddressKey::V4(v4.octets()),
                None => {
                    let mut prefix = [0u8; 8];
                    prefix.copy_from_slice(&v6.octets()[..8]);
                    AddressKey::V6(prefix)
                }
            },
        }
    }

    /// The key of a connection whose remote address is `addr`: its
    /// first IP address (for a circuit through another relay, that
    /// relay's).
    pub fn of_addr(addr: &Multiaddr) -> AddressKey {
        addr.iter()
            .find_map(|p| match p {
                Protocol::Ip4(ip) => Some(AddressKey::of_ip(IpAddr::V4(ip))),
                Protocol::Ip6(ip) => Some(AddressKey::of_ip(IpAddr::V6(ip))),
                _ => None,
            })
            .unwrap_or(AddressKey::Unknown)
    }

    /// The stored key: 4, 8 or 0 bytes (the relay's database keeps
    /// per-address quotas under it: do not change it).
    pub fn key(&self) -> &[u8] {
        match self {
            AddressKey::V4(b) => b,
            AddressKey::V6(b) => b,
            AddressKey::Unknown => &[],
        }
    }
}

/// Whether `ip` is a loopback address, IPv4-mapped ones (`::ffff:127.0.0.1`)
/// included. Limits and bans exempt loopback by default: local processes
/// (a reverse proxy, tools, tests) share it, and someone on the host has
/// easier ways to hurt a node or relay. Checked on the address itself, not
/// on its [`AddressKey`]: the /64 of `::1` holds other addresses too.
pub fn is_loopback(ip: IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

/// The IP address a connection's remote address starts with, if any (none
/// for the memory transport, nor for the `/p2p/<peer>` address of an
/// incoming relayed connection).
pub fn leading_ip(addr: &Multiaddr) -> Option<IpAddr> {
    match addr.iter().next()? {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    }
}

impl fmt::Display for AddressKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AddressKey::V4(b) => write!(f, "{}", Ipv4Addr::from(*b)),
            AddressKey::V6(b) => {
                let mut full = [0u8; 16];
                full[..8].copy_from_slice(b);
                write!(f, "{}/64", Ipv6Addr::from(full))
            }
            AddressKey::Unknown => f.write_str("connections without an IP address"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> Multiaddr {
        s.parse().expect("a test address")
    }

    #[test]
    fn keys_take_ipv4_whole_ipv6_by_64_and_unmap_mapped_addresses() {
        let a = addr("/ip4/192.0.2.7/tcp/4040");
        assert_eq!(AddressKey::of_addr(&a), AddressKey::V4([192, 0, 2, 7]));
        let b = addr("/ip6/2001:db8:1:2:aaaa::1/udp/1/quic-v1");
        let c = addr("/ip6/2001:db8:1:2:bbbb::9/tcp/1");
        assert_eq!(AddressKey::of_addr(&b), AddressKey::of_addr(&c));
        assert_eq!(AddressKey::of_addr(&b).to_string(), "2001:db8:1:2::/64");
        let d = addr("/ip6/2001:db8:1:3::1/tcp/1");
        assert_ne!(AddressKey::of_addr(&b), AddressKey::of_addr(&d));
        let mapped = addr("/ip6/::ffff:192.0.2.7/tcp/1");
        assert_eq!(AddressKey::of_addr(&mapped), AddressKey::V4([192, 0, 2, 7]));
        let memory = addr("/memory/1234");
        assert_eq!(AddressKey::of_addr(&memory), AddressKey::Unknown);
        assert!(AddressKey::Unknown.key().is_empty());
    }

    #[test]
    fn the_stored_key_is_the_address_bytes() {
        // The relay's database holds these: they must not change.
        assert_eq!(AddressKey::V4([192, 0, 2, 7]).key(), &[192, 0, 2, 7]);
        let v6 = AddressKey::of_ip("2001:db8:1:2::5".parse().expect("an address"));
        assert_eq!(v6.key(), &[0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 2]);
    }

    #[test]
    fn loopback_and_leading_ips() {
        for ip in ["127.0.0.1", "127.3.2.1", "::1", "::ffff:127.0.0.1"] {
            assert!(is_loopback(ip.parse().expect("an address")), "{ip}");
        }
        for ip in ["10.0.0.1", "::2", "2001:db8::1", "::ffff:10.0.0.1"] {
            assert!(!is_loopback(ip.parse().expect("an address")), "{ip}");
        }
        assert_eq!(
            leading_ip(&addr("/ip4/203.0.113.7/tcp/1")),
            Some("203.0.113.7".parse().expect("an address"))
        );
        assert_eq!(leading_ip(&addr("/memory/1")), None);
        assert_eq!(leading_ip(&addr("/dns4/example.invalid/tcp/1")), None);
    }
}

//! Strikes and bans of misbehaving peers, by peer id and by IP address.
//!
//! A peer id is free to make, so bans by peer id alone are escaped by
//! coming back under a fresh one. Each ban therefore also counts against
//! the address the peer came from: [`IP_BANS`] peer ids banned from one
//! address within [`BAN_DURATION`] ban the address, and a connection from
//! a banned address is refused whatever its peer id. An address counts
//! as its [`AddressKey`]: IPv4 whole, IPv6 by its /64 (a subscriber's
//! usual allocation: stepping through it escapes nothing), IPv4-mapped
//! IPv6 as the IPv4 address. Loopback is never banned (local processes
//! share it, and a local attacker has easier ways in).
//!
//! The banned addresses are a [`BannedAddresses`] the swarm's
//! `address_gate` shares, so that a connection from one is refused as it
//! arrives, before its handshake.
//!
//! Every table is an LRU of at most [`MAX_TRACKED`] entries: a new
//! offender always finds room (the one heard from longest ago goes), so
//! a flood of offenders cannot make the node stop tracking new ones.
//! Pure: time is passed in.

use std::net::IpAddr;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use libp2p::PeerId;
use libp2p::multiaddr::{Multiaddr, Protocol};
use lru::LruCache;
use tokio::time::Instant;
use weft_proto::address::{AddressKey, is_loopback};

/// Strikes within [`STRIKE_WINDOW`] that get a peer banned.
pub const MAX_STRIKES: u32 = 16;
pub(super) const STRIKE_WINDOW: Duration = Duration::from_secs(600);
/// How long a ban lasts, of a peer or of an address.
pub const BAN_DURATION: Duration = Duration::from_secs(3600);
/// Peer ids banned from one address (within [`BAN_DURATION`]) that ban
/// the address.
pub const IP_BANS: u32 = 3;
/// Most entries in each table.
const MAX_TRACKED: NonZeroUsize = NonZeroUsize::new(4096).unwrap();

/// The IP address a connection's remote address starts with, if any:
/// none for the memory transport, nor for a connection through a circuit
/// relay (inbound its address is `/p2p/<peer>`; dialed it starts with the
/// relay's address, and the peer's offences must not count against the
/// relay's address: three would ban the relay and every peer behind it).
pub(super) fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    if addr.iter().any(|p| p == Protocol::P2pCircuit) {
        return None;
    }
    match addr.iter().next()? {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    }
}

/// What a strike came to.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Struck {
    /// Counted; not banned (yet).
    Counted,
    /// The peer is banned now (and, if `address`, its address too).
    Banned { address: bool },
}

/// The key an address is banned under; `None` for loopback, never banned.
fn ban_key(ip: IpAddr) -> Option<AddressKey> {
    (!is_loopback(ip)).then(|| AddressKey::of_ip(ip))
}

/// The banned addresses and until when: written by [`Offenders`] (in the
/// network task), read by the swarm's `address_gate` as connections
/// arrive. Cloning shares the table.
#[derive(Clone, Debug)]
pub(super) struct BannedAddresses(Arc<Mutex<LruCache<AddressKey, Instant>>>);

impl Default for BannedAddresses {
    fn default() -> Self {
        Self(Arc::new(Mutex::new(LruCache::new(MAX_TRACKED))))
    }
}

impl BannedAddresses {
    fn lock(&self) -> MutexGuard<'_, LruCache<AddressKey, Instant>> {
        // A panic while holding it leaves the table usable.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The key `ip` is banned under at `now`, if it is.
    pub(super) fn banned(&self, ip: IpAddr, now: Instant) -> Option<AddressKey> {
        let key = ban_key(ip)?;
        self.lock()
            .peek(&key)
            .is_some_and(|u| *u > now)
            .then_some(key)
    }

    fn put(&self, key: AddressKey, until: Instant) {
        self.lock().put(key, until);
    }

    fn expire(&self, now: Instant) {
        let mut table = self.lock();
        let ended: Vec<AddressKey> = table
            .iter()
            .filter(|(_, until)| **until <= now)
            .map(|(key, _)| *key)
            .collect();
        for key in ended {
            table.pop(&key);
        }
    }
}

pub(super) struct Offenders {
    strikes: LruCache<PeerId, (u32, Instant)>,
    banned: LruCache<PeerId, Instant>,
    /// Peer ids banned from an address, and since when.
    address_bans: LruCache<AddressKey, (u32, Instant)>,
    banned_addresses: BannedAddresses,
}

impl Default for Offenders {
    fn default() -> Self {
        Self {
            strikes: LruCache::new(MAX_TRACKED),
            banned: LruCache::new(MAX_TRACKED),
            address_bans: LruCache::new(MAX_TRACKED),
            banned_addresses: BannedAddresses::default(),
        }
    }
}

impl Offenders {
    /// The banned addresses, shared (for the swarm's `address_gate`).
    pub(super) fn banned_addresses(&self) -> BannedAddresses {
        self.banned_addresses.clone()
    }

    /// A strike against `peer`, connected from `ip` (if known).
    pub(super) fn strike(&mut self, peer: PeerId, ip: Option<IpAddr>, now: Instant) -> Struck {
        let entry = self.strikes.get_or_insert_mut(peer, || (0, now));
        if now.duration_since(entry.1) >= STRIKE_WINDOW {
            *entry = (0, now);
        }
        entry.0 += 1;
        if entry.0 < MAX_STRIKES {
            return Struck::Counted;
        }
        self.strikes.pop(&peer);
        let address = self.ban(peer, ip, now);
        Struck::Banned { address }
    }

    /// Bans `peer` now, counting it against `ip`; whether the address is
    /// banned now too.
    pub(super) fn ban(&mut self, peer: PeerId, ip: Option<IpAddr>, now: Instant) -> bool {
        self.banned.put(peer, now + BAN_DURATION);
        let Some(key) = ip.and_then(ban_key) else {
            return false;
        };
        let count = self.address_bans.get_or_insert_mut(key, || (0, now));
        if now.duration_since(count.1) >= BAN_DURATION {
            *count = (0, now);
        }
        count.0 += 1;
        if count.0 < IP_BANS {
            return false;
        }
        self.address_bans.pop(&key);
        self.banned_addresses.put(key, now + BAN_DURATION);
        true
    }

    /// Whether a connection of `peer` from `ip` is to be refused.
    pub(super) fn is_banned(&self, peer: &PeerId, ip: Option<IpAddr>, now: Instant) -> bool {
        let live = |until: Option<&Instant>| until.is_some_and(|u| *u > now);
        live(self.banned.peek(peer))
            || ip.is_some_and(|ip| self.banned_addresses.banned(ip, now).is_some())
    }

    /// Ends the bans that ran out; the peers whose ban ended.
    pub(super) fn expire(&mut self, now: Instant) -> Vec<PeerId> {
        let ended: Vec<PeerId> = self
            .banned
            .iter()
            .filter(|(_, until)| **until <= now)
            .map(|(p, _)| *p)
            .collect();
        for peer in &ended {
            self.banned.pop(peer);
        }
        self.banned_addresses.expire(now);
        ended
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    const FAR: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7));

    fn strike_out(o: &mut Offenders, peer: PeerId, ip: Option<IpAddr>, now: Instant) -> Struck {
        for _ in 1..MAX_STRIKES {
            assert_eq!(o.strike(peer, ip, now), Struck::Counted);
        }
        o.strike(peer, ip, now)
    }

    #[test]
    fn strikes_ban_a_peer_for_a_while_and_old_strikes_lapse() {
        let mut o = Offenders::default();
        let now = Instant::now();
        let mallory = PeerId::random();
        for _ in 1..MAX_STRIKES {
            o.strike(mallory, None, now);
        }
        // The window passed: counting starts again (15 more are not enough).
        let later = now + STRIKE_WINDOW;
        assert!(!o.is_banned(&mallory, None, later));
        assert_eq!(
            strike_out(&mut o, mallory, None, later),
            Struck::Banned { address: false }
        );
        assert!(o.is_banned(&mallory, None, later));
        assert_eq!(o.expire(later + BAN_DURATION), vec![mallory]);
        assert!(!o.is_banned(&mallory, None, later + BAN_DURATION));
    }

    #[test]
    fn fresh_peer_ids_from_a_banned_address_are_refused() {
        let mut o = Offenders::default();
        let now = Instant::now();
        for n in 1..=IP_BANS {
            let struck = strike_out(&mut o, PeerId::random(), Some(FAR), now);
            assert_eq!(
                struck,
                Struck::Banned {
                    address: n == IP_BANS
                }
            );
        }
        let fresh = PeerId::random();
        assert!(o.is_banned(&fresh, Some(FAR), now), "a fresh id from there");
        assert!(
            !o.is_banned(&fresh, None, now),
            "the id itself is not banned"
        );
        assert!(!o.is_banned(&fresh, Some(FAR), now + BAN_DURATION));
    }

    #[test]
    fn fresh_addresses_within_one_ipv6_64_do_not_escape_its_ban() {
        let mut o = Offenders::default();
        let now = Instant::now();
        // Each offender from another address of the attacker's /64.
        let in_64 = |n: u16| Some(IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 7, 7, n, 0, 0, n)));
        for n in 1..=IP_BANS {
            let struck = strike_out(&mut o, PeerId::random(), in_64(n as u16), now);
            assert_eq!(
                struck,
                Struck::Banned {
                    address: n == IP_BANS
                },
                "offender {n}"
            );
        }
        let fresh = PeerId::random();
        assert!(
            o.is_banned(&fresh, in_64(0xbeef), now),
            "a fresh id from a fresh address of the banned /64"
        );
        let shared = o.banned_addresses();
        assert!(shared.banned(in_64(0xf00d).unwrap(), now).is_some());
        let next_64 = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 7, 8, 0, 0, 0, 1));
        assert!(!o.is_banned(&fresh, Some(next_64), now), "another /64");
        // IPv4 stays whole: a neighbour's address is not banned.
        for _ in 0..IP_BANS {
            strike_out(&mut o, PeerId::random(), Some(FAR), now);
        }
        let mapped = IpAddr::V6(Ipv4Addr::new(203, 0, 113, 7).to_ipv6_mapped());
        assert!(o.is_banned(&fresh, Some(mapped), now), "IPv4-mapped");
        let neighbour = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 8));
        assert!(!o.is_banned(&fresh, Some(neighbour), now));
        // Bans end for the shared table too.
        o.expire(now + BAN_DURATION);
        assert!(
            shared
                .banned(in_64(1).unwrap(), now + BAN_DURATION)
                .is_none()
        );
        assert_eq!(shared.lock().len(), 0);
    }

    #[test]
    fn loopback_is_never_banned() {
        let mut o = Offenders::default();
        let now = Instant::now();
        for local in [
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
            IpAddr::V6(Ipv4Addr::LOCALHOST.to_ipv6_mapped()),
        ] {
            for _ in 0..IP_BANS {
                strike_out(&mut o, PeerId::random(), Some(local), now);
            }
            assert!(!o.is_banned(&PeerId::random(), Some(local), now));
        }
        assert_eq!(o.banned_addresses().lock().len(), 0);
    }

    #[test]
    fn a_new_offender_always_finds_room() {
        let mut o = Offenders::default();
        let now = Instant::now();
        for _ in 0..MAX_TRACKED.get() + 10 {
            o.strike(PeerId::random(), None, now);
        }
        assert_eq!(o.strikes.len(), MAX_TRACKED.get());
        let newcomer = PeerId::random();
        assert_eq!(
            strike_out(&mut o, newcomer, None, now),
            Struck::Banned { address: false },
            "tracked though the table was full"
        );
    }

    #[test]
    fn the_address_of_a_connection() {
        let tcp: Multiaddr = "/ip4/203.0.113.7/tcp/4001".parse().unwrap();
        assert_eq!(ip_of(&tcp), Some(FAR));
        let memory: Multiaddr = "/memory/7".parse().unwrap();
        assert_eq!(ip_of(&memory), None);
        let relay = PeerId::random();
        let through_a_relay: Multiaddr = format!(
            "/ip4/203.0.113.7/tcp/4040/p2p/{relay}/p2p-circuit/p2p/{}",
            PeerId::random()
        )
        .parse()
        .unwrap();
        assert_eq!(ip_of(&through_a_relay), None, "not the relay's address");
    }
}

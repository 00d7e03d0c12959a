//! Network settings: [`NetConfig`], and the [`TransportKind`] the swarm
//! runs over (defined with the swarm builder in `weft_proto::transport`).

use std::time::Duration;

use libp2p::Multiaddr;
use libp2p::multiaddr::Protocol;
pub use weft_proto::transport::TransportKind;

use crate::backoff::Backoff;

/// Network settings of a node.
#[derive(Clone, Debug)]
pub struct NetConfig {
    pub listen: Vec<Multiaddr>,
    /// Peers to dial at start and keep dialing (multiaddrs with /p2p/).
    pub bootstrap: Vec<Multiaddr>,
    /// Relays (multiaddrs with /p2p/): kept connected like bootstrap peers;
    /// the node keeps a mailbox at each and, once connected, listens
    /// through each (circuit relay v2), so that it is reachable at
    /// `<relay addr>/p2p-circuit/p2p/<node>`.
    pub relays: Vec<Multiaddr>,
    /// Relays to use in all: while fewer are in use (configured ones
    /// count), the node looks for more in the DHT, where relays announce
    /// themselves. 0: none are looked for.
    pub relay_target: usize,
    /// Advertise and browse `_weft._udp.local.` with mdns-sd.
    pub mdns: bool,
    pub transport: TransportKind,
    /// Kademlia in server mode (answers queries): for reachable nodes.
    pub dht_server: bool,
    pub idle_timeout: Duration,
    /// First wait before redialing a known peer after a failed dial or a
    /// lost connection; it doubles with each failure.
    pub redial_base: Duration,
    /// Longest wait between redials of a known peer (before jitter).
    pub redial_max: Duration,
    /// How many connections the node keeps, and how much memory they may
    /// hold.
    pub limits: ConnectionLimits,
}

/// Connection limits (`libp2p::connection_limits` and
/// `memory_connection_limits`): a connection past one is refused before
/// any protocol runs on it, so a flood of dials (fresh peer ids are free)
/// costs the node a refused handshake each, not a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Connections being set up, each way.
    pub max_pending_incoming: u32,
    pub max_pending_outgoing: u32,
    /// Established connections, each way.
    pub max_established_incoming: u32,
    pub max_established_outgoing: u32,
    /// Established connections to one peer: a direct and a relayed one,
    /// and the crossing dials of two peers that dial each other at once.
    pub max_established_per_peer: u32,
    /// Established incoming connections from one address (IPv4 whole,
    /// IPv6 by its /64; `weft_proto::ip_limits`); more are refused before
    /// their handshake. 0: no cap. Fresh peer ids are free, so without it
    /// one machine takes every incoming slot and honest contacts dialing
    /// in are refused.
    pub max_established_per_ip: u32,
    /// Apply `max_established_per_ip` to loopback too (off: local tools,
    /// tests and a proxy on this host all come from 127.0.0.1).
    pub limit_loopback_per_ip: bool,
    /// No new connection while the process holds more than this many
    /// bytes; 0: no limit.
    pub max_memory_bytes: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_pending_incoming: 32,
            max_pending_outgoing: 128,
            // A person's contacts' devices and a few relays, with room:
            // more is a crowd, or someone dialing in with fresh ids.
            max_established_incoming: 256,
            max_established_outgoing: 256,
            max_established_per_peer: 4,
            // A household or office behind one NAT has fewer devices than
            // this, and 256 / 32 = 8: no fewer than 8 addresses (IPv6: 8
            // /64s) can fill `max_established_incoming`. (For IPv4,
            // gossipsub's IP colocation penalty in `scoring` bans more
            // than 14 ids from one exact address first; it counts exact
            // addresses, so for an IPv6 /64 the cap is what holds.)
            max_established_per_ip: 32,
            limit_loopback_per_ip: false,
            max_memory_bytes: 1024 * 1024 * 1024,
        }
    }
}

impl NetConfig {
    pub fn new(listen: Vec<Multiaddr>) -> Self {
        Self {
            listen,
            bootstrap: Vec::new(),
            relays: Vec::new(),
            relay_target: 2,
            mdns: false,
            transport: TransportKind::Network,
            dht_server: true,
            idle_timeout: Duration::from_secs(3600),
            redial_base: Duration::from_secs(1),
            redial_max: Duration::from_secs(30),
            limits: ConnectionLimits::default(),
        }
    }

    /// One TCP listener on 127.0.0.1 with an OS-chosen port.
    pub fn loopback() -> Self {
        let addr: Multiaddr = "/ip4/127.0.0.1/tcp/0"
            .parse()
            .unwrap_or_else(|_| Multiaddr::empty());
        Self::new(vec![addr])
    }

    /// How long to wait before redialing a peer or listening through a
    /// relay again.
    pub(crate) fn redial_backoff(&self) -> Backoff {
        Backoff::new(self.redial_base, self.redial_max)
    }

    /// The in-memory transport on `/memory/{port}`.
    pub fn memory(port: u64) -> Self {
        let mut c = Self::new(vec![Multiaddr::empty().with(Protocol::Memory(port))]);
        c.transport = TransportKind::Memory;
        c
    }
}

//! A cap on the established incoming connections one IP address may hold,
//! as a `NetworkBehaviour` both the relay (`limits.max_connections_per_ip`)
//! and the node (`ConnectionLimits::max_established_per_ip`) compose into
//! their swarms. A peer id costs nothing, so a per-peer limit alone lets
//! one machine take every connection slot with fresh ids; an address
//! costs something. Addresses are keyed by [`AddressKey`]: IPv4 whole,
//! IPv6 by its /64, IPv4-mapped IPv6 as the IPv4 address.
//!
//! A connection from an address at the cap is refused as it arrives,
//! before its handshake (`handle_pending_inbound_connection`), and again
//! once secured if others from there got in meanwhile
//! (`handle_established_inbound_connection`): the refusal costs an
//! accepted socket, not a noise handshake and a connection.
//!
//! Not limited: connections without an IP address (the memory transport
//! of tests, incoming relayed connections), outgoing ones (what we dial
//! we chose), and, unless asked (`limit_loopback`), loopback: a reverse
//! proxy or tunnel on the same host, and local tools and tests, all come
//! from 127.0.0.1, and someone on the host has easier ways to do harm.
//!
//! The first refusal after an address reaches the cap is logged as a
//! warning naming the setting (once until it drops below the cap again);
//! the swarm's owner sees each refusal as a [`TooManyFromIp`] cause of a
//! denied incoming connection (the relay counts them in
//! `weft_relay_connections_refused_per_ip_total`).

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::task::{Context, Poll};

use libp2p::core::transport::PortUse;
use libp2p::core::{ConnectedPoint, Endpoint};
use libp2p::swarm::behaviour::{ConnectionClosed, ConnectionEstablished};
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm, dummy,
};
use libp2p::{Multiaddr, PeerId};

use crate::address::{AddressKey, is_loopback, leading_ip};

/// Why a connection was refused.
#[derive(Debug, thiserror::Error)]
#[error("{address} already holds {held} connections, the most one address may hold")]
pub struct TooManyFromIp {
    pub address: AddressKey,
    pub held: u32,
}

/// The per-IP cap, as a `NetworkBehaviour` (no protocol of its own).
#[derive(Debug)]
pub struct IpConnectionLimits {
    /// Most established incoming connections per address; 0: no cap.
    max: u32,
    limit_loopback: bool,
    /// The setting that sets `max`, named in the warning.
    setting: &'static str,
    /// Established incoming connections by address (only addresses that
    /// hold some).
    held: HashMap<AddressKey, u32>,
    /// The address of each counted connection.
    connections: HashMap<ConnectionId, AddressKey>,
    /// Addresses at the cap already warned about (bounded: each holds
    /// `max` connections).
    warned: HashSet<AddressKey>,
}

impl IpConnectionLimits {
    /// At most `max` established incoming connections per address (0: no
    /// cap); loopback too if `limit_loopback`.
    pub fn new(max: u32, limit_loopback: bool) -> Self {
        Self {
            max,
            limit_loopback,
            setting: "the per-address connection cap",
            held: HashMap::new(),
            connections: HashMap::new(),
            warned: HashSet::new(),
        }
    }

    /// Names the setting that sets the cap (`limits.max_connections_per_ip`,
    /// say) in the warning logged when an address reaches it.
    pub fn with_setting(mut self, setting: &'static str) -> Self {
        self.setting = setting;
        self
    }

    /// The most established incoming connections one address may hold
    /// (0: no cap).
    pub fn max(&self) -> u32 {
        self.max
    }

    /// The address a connection from `remote` counts under, if it is
    /// limited at all.
    fn key(&self, remote: &Multiaddr) -> Option<AddressKey> {
        if self.max == 0 {
            return None;
        }
        let ip = leading_ip(remote)?;
        if is_loopback(ip) && !self.limit_loopback {
            return None;
        }
        Some(AddressKey::of_ip(ip))
    }

    /// Established incoming connections counted for the address of
    /// `remote`.
    pub fn held(&self, remote: &Multiaddr) -> u32 {
        self.key(remote)
            .and_then(|key| self.held.get(&key).copied())
            .unwrap_or(0)
    }

    /// Whether one more connection from `remote` may come in.
    pub fn check(&mut self, remote: &Multiaddr) -> Result<(), TooManyFromIp> {
        let Some(address) = self.key(remote) else {
            return Ok(());
        };
        let held = self.held.get(&address).copied().unwrap_or(0);
        if held < self.max {
            return Ok(());
        }
        if self.warned.insert(address) {
            tracing::warn!(
                %address,
                held,
                "refusing new connections from an address that holds the most allowed ({}); \
                 further refusals are logged at debug level",
                self.setting
            );
        } else {
            tracing::debug!(%address, held, "connection refused: too many from its address");
        }
        Err(TooManyFromIp { address, held })
    }

    /// An incoming connection from `remote` was established.
    pub fn opened(&mut self, connection: ConnectionId, remote: &Multiaddr) {
        if let Some(address) = self.key(remote) {
            *self.held.entry(address).or_insert(0) += 1;
            self.connections.insert(connection, address);
        }
    }

    /// A connection closed (counted or not).
    pub fn closed(&mut self, connection: ConnectionId) {
        let Some(address) = self.connections.remove(&connection) else {
            return;
        };
        let held = match self.held.get_mut(&address) {
            Some(held) => {
                *held = held.saturating_sub(1);
                *held
            }
            None => 0,
        };
        if held == 0 {
            self.held.remove(&address);
        }
        if held < self.max {
            self.warned.remove(&address);
        }
    }
}

impl NetworkBehaviour for IpConnectionLimits {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_pending_inbound_connection(
        &mut self,
        _: ConnectionId,
        _: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        self.check(remote).map_err(ConnectionDenied::new)
    }

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.check(remote).map_err(ConnectionDenied::new)?;
        Ok(dummy::ConnectionHandler)
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, event: FromSwarm<'_>) {
        match event {
            // Counted once every behaviour accepted it.
            FromSwarm::ConnectionEstablished(ConnectionEstablished {
                connection_id,
                endpoint: ConnectedPoint::Listener { send_back_addr, .. },
                ..
            }) => self.opened(connection_id, send_back_addr),
            FromSwarm::ConnectionClosed(ConnectionClosed { connection_id, .. }) => {
                self.closed(connection_id);
            }
            _ => {}
        }
    }

    fn on_connection_handler_event(
        &mut self,
        _: PeerId,
        _: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {}
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> Multiaddr {
        s.parse().expect("a test address")
    }

    #[test]
    fn an_address_at_the_cap_is_refused_until_one_of_its_connections_closes() {
        let mut limits = IpConnectionLimits::new(2, false);
        let far = addr("/ip4/203.0.113.7/tcp/5001");
        let far_again = addr("/ip4/203.0.113.7/udp/5002/quic-v1");
        let other = addr("/ip4/203.0.113.8/tcp/5001");
        limits.check(&far).expect("first");
        limits.opened(ConnectionId::new_unchecked(1), &far);
        limits
            .check(&far_again)
            .expect("second, another port and transport");
        limits.opened(ConnectionId::new_unchecked(2), &far_again);
        let refused = limits.check(&far).expect_err("third");
        assert_eq!(refused.address, AddressKey::V4([203, 0, 113, 7]));
        assert_eq!(refused.held, 2);
        assert!(limits.check(&far_again).is_err(), "refused again");
        limits.check(&other).expect("another address");
        limits.closed(ConnectionId::new_unchecked(1));
        limits.check(&far).expect("room again");
        limits.closed(ConnectionId::new_unchecked(2));
        assert_eq!(limits.held(&far), 0);
        assert!(limits.held.is_empty() && limits.connections.is_empty());
        assert!(limits.warned.is_empty());
    }

    #[test]
    fn ipv6_counts_by_64_and_mapped_ipv4_as_ipv4() {
        let mut limits = IpConnectionLimits::new(1, false);
        limits.opened(
            ConnectionId::new_unchecked(1),
            &addr("/ip6/2001:db8:1:2::1/tcp/1"),
        );
        assert!(
            limits
                .check(&addr("/ip6/2001:db8:1:2:ffff::9/tcp/1"))
                .is_err()
        );
        limits
            .check(&addr("/ip6/2001:db8:1:3::1/tcp/1"))
            .expect("another /64");
        limits.opened(
            ConnectionId::new_unchecked(2),
            &addr("/ip4/192.0.2.1/tcp/1"),
        );
        assert!(limits.check(&addr("/ip6/::ffff:192.0.2.1/tcp/1")).is_err());
    }

    #[test]
    fn loopback_memory_and_no_cap_are_not_limited_unless_asked() {
        let loopbacks = [
            addr("/ip4/127.0.0.1/tcp/1"),
            addr("/ip4/127.0.0.2/tcp/1"),
            addr("/ip6/::1/tcp/1"),
            addr("/ip6/::ffff:127.0.0.1/tcp/1"),
        ];
        let memory = addr("/memory/7");
        let mut limits = IpConnectionLimits::new(1, false);
        for (n, a) in loopbacks.iter().chain([&memory]).enumerate() {
            for m in 0..3 {
                limits.check(a).expect("not limited");
                limits.opened(ConnectionId::new_unchecked(n * 10 + m), a);
            }
        }
        assert!(limits.connections.is_empty());
        let mut strict = IpConnectionLimits::new(1, true);
        strict.opened(ConnectionId::new_unchecked(1), &loopbacks[0]);
        assert!(strict.check(&loopbacks[0]).is_err(), "limited when asked");
        strict.check(&memory).expect("memory never");
        let mut none = IpConnectionLimits::new(0, true);
        let far = addr("/ip4/203.0.113.7/tcp/1");
        for n in 0..100 {
            none.check(&far).expect("no cap");
            none.opened(ConnectionId::new_unchecked(n), &far);
        }
    }

    #[test]
    fn a_closed_connection_never_counted_changes_nothing() {
        let mut limits = IpConnectionLimits::new(1, false);
        let far = addr("/ip4/203.0.113.7/tcp/1");
        limits.opened(ConnectionId::new_unchecked(1), &far);
        limits.closed(ConnectionId::new_unchecked(99));
        limits.closed(ConnectionId::new_unchecked(1));
        limits.closed(ConnectionId::new_unchecked(1));
        assert_eq!(limits.held(&far), 0);
        limits.check(&far).expect("room");
    }
}

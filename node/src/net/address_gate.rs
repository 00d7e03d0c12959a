//! The node's limits by remote address, as one `NetworkBehaviour` of the
//! swarm: incoming connections from a banned address (the shared
//! [`BannedAddresses`] of `offenders`) and past the per-address cap
//! (`ConnectionLimits::max_established_per_ip`, counted by
//! `weft_proto::ip_limits`) are refused as they arrive, before their
//! handshake, and checked again once secured (a ban or other connections
//! may have come meanwhile).
//!
//! Outgoing connections are not refused here: what the node dials it
//! chose, and a dialed peer that turns out to be banned is disconnected
//! by the network task as the connection is established. Loopback is
//! never banned, and exempt from the cap unless
//! `ConnectionLimits::limit_loopback_per_ip`.

use std::convert::Infallible;
use std::task::{Context, Poll};

use libp2p::core::Endpoint;
use libp2p::core::transport::PortUse;
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm, dummy,
};
use libp2p::{Multiaddr, PeerId};
use weft_proto::address::AddressKey;
use weft_proto::ip_limits::IpConnectionLimits;

use super::config::ConnectionLimits;
use super::offenders::{BannedAddresses, ip_of};

/// Why an incoming connection from a banned address was refused.
#[derive(Debug, thiserror::Error)]
#[error("{address} is banned")]
pub struct BannedAddress {
    pub address: AddressKey,
}

/// Refuses incoming connections from banned addresses and past the
/// per-address cap.
#[derive(Debug)]
pub(super) struct AddressGate {
    banned: BannedAddresses,
    per_ip: IpConnectionLimits,
}

impl AddressGate {
    pub(super) fn new(limits: &ConnectionLimits, banned: BannedAddresses) -> Self {
        Self {
            banned,
            per_ip: IpConnectionLimits::new(
                limits.max_established_per_ip,
                limits.limit_loopback_per_ip,
            )
            .with_setting("ConnectionLimits::max_established_per_ip"),
        }
    }

    /// Refuses a connection from `remote` if its address is banned.
    fn check_ban(&self, remote: &Multiaddr) -> Result<(), ConnectionDenied> {
        let Some(ip) = ip_of(remote) else {
            return Ok(());
        };
        match self.banned.banned(ip, tokio::time::Instant::now()) {
            Some(address) => {
                tracing::debug!(%address, "connection refused: its address is banned");
                Err(ConnectionDenied::new(BannedAddress { address }))
            }
            None => Ok(()),
        }
    }
}

impl NetworkBehaviour for AddressGate {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_pending_inbound_connection(
        &mut self,
        connection: ConnectionId,
        local: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        self.check_ban(remote)?;
        self.per_ip
            .handle_pending_inbound_connection(connection, local, remote)
    }

    fn handle_established_inbound_connection(
        &mut self,
        connection: ConnectionId,
        peer: PeerId,
        local: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.check_ban(remote)?;
        self.per_ip
            .handle_established_inbound_connection(connection, peer, local, remote)?;
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
        self.per_ip.on_swarm_event(event);
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
    use libp2p::core::ConnectedPoint;
    use libp2p::swarm::behaviour::ConnectionEstablished;
    use weft_proto::ip_limits::TooManyFromIp;

    use super::super::offenders::{IP_BANS, MAX_STRIKES, Offenders};
    use super::*;

    fn addr(s: &str) -> Multiaddr {
        s.parse().unwrap()
    }

    fn gate(max: u32, offenders: &Offenders) -> AddressGate {
        let limits = ConnectionLimits {
            max_established_per_ip: max,
            ..ConnectionLimits::default()
        };
        AddressGate::new(&limits, offenders.banned_addresses())
    }

    fn arrives(
        gate: &mut AddressGate,
        n: usize,
        remote: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        let local = addr("/ip4/10.0.0.1/tcp/4001");
        gate.handle_pending_inbound_connection(ConnectionId::new_unchecked(n), &local, remote)
    }

    /// A connection from `remote` arrives, is secured and established.
    fn connects(
        gate: &mut AddressGate,
        n: usize,
        remote: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        let local = addr("/ip4/10.0.0.1/tcp/4001");
        let id = ConnectionId::new_unchecked(n);
        let peer = PeerId::random();
        arrives(gate, n, remote)?;
        gate.handle_established_inbound_connection(id, peer, &local, remote)?;
        let endpoint = ConnectedPoint::Listener {
            local_addr: local,
            send_back_addr: remote.clone(),
        };
        gate.on_swarm_event(FromSwarm::ConnectionEstablished(ConnectionEstablished {
            peer_id: peer,
            connection_id: id,
            endpoint: &endpoint,
            failed_addresses: &[],
            other_established: 0,
        }));
        Ok(())
    }

    fn ban_address(offenders: &mut Offenders, ip: &str, now: tokio::time::Instant) {
        for _ in 0..IP_BANS {
            let peer = PeerId::random();
            for _ in 0..MAX_STRIKES {
                offenders.strike(peer, Some(ip.parse().unwrap()), now);
            }
        }
    }

    #[test]
    fn a_banned_address_is_refused_as_it_arrives() {
        let mut offenders = Offenders::default();
        let mut gate = gate(32, &offenders);
        let far = addr("/ip6/2001:db8:5:5::1/tcp/7");
        connects(&mut gate, 1, &far).expect("not banned yet");
        ban_address(
            &mut offenders,
            "2001:db8:5:5::1",
            tokio::time::Instant::now(),
        );
        for (n, from) in [far.clone(), addr("/ip6/2001:db8:5:5:9::9/udp/7/quic-v1")]
            .iter()
            .enumerate()
        {
            let refused = arrives(&mut gate, 10 + n, from).expect_err("banned");
            let cause = refused.downcast::<BannedAddress>().expect("for the ban");
            assert_eq!(
                cause.address,
                AddressKey::of_ip("2001:db8:5:5::".parse().unwrap())
            );
        }
        connects(&mut gate, 20, &addr("/ip6/2001:db8:5:6::1/tcp/7")).expect("another /64");
        connects(&mut gate, 21, &addr("/memory/9")).expect("no address");
        // Loopback is never banned (strikes from there ban ids only).
        ban_address(&mut offenders, "127.0.0.1", tokio::time::Instant::now());
        connects(&mut gate, 22, &addr("/ip4/127.0.0.1/tcp/7")).expect("loopback");
    }

    #[test]
    fn one_address_holds_at_most_the_cap_and_others_still_connect() {
        let offenders = Offenders::default();
        let mut gate = gate(3, &offenders);
        let far = addr("/ip4/203.0.113.7/tcp/7");
        for n in 0..3 {
            connects(&mut gate, n, &far).expect("within the cap");
        }
        let refused = arrives(&mut gate, 3, &far).expect_err("past the cap");
        let cause = refused.downcast::<TooManyFromIp>().expect("for the cap");
        assert_eq!(
            (cause.address, cause.held),
            (AddressKey::V4([203, 0, 113, 7]), 3)
        );
        connects(&mut gate, 4, &addr("/ip4/203.0.113.8/tcp/7")).expect("another address");
        // Loopback is exempt by default.
        for n in 10..20 {
            connects(&mut gate, n, &addr("/ip4/127.0.0.1/tcp/7")).expect("loopback");
        }
        let mut strict = AddressGate::new(
            &ConnectionLimits {
                max_established_per_ip: 1,
                limit_loopback_per_ip: true,
                ..ConnectionLimits::default()
            },
            offenders.banned_addresses(),
        );
        connects(&mut strict, 1, &addr("/ip4/127.0.0.1/tcp/7")).expect("first");
        assert!(arrives(&mut strict, 2, &addr("/ip4/127.0.0.1/tcp/8")).is_err());
    }

    #[test]
    fn the_default_cap_lets_no_fewer_than_eight_addresses_fill_the_node() {
        let limits = ConnectionLimits::default();
        assert_eq!(limits.max_established_per_ip, 32);
        assert!(!limits.limit_loopback_per_ip);
        assert!(limits.max_established_incoming / limits.max_established_per_ip >= 8);
    }
}

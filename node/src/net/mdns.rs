//! LAN discovery with mdns-sd: advertise this node as a DNS-SD service
//! (`_weft._udp.local.`, instance = peer id, TXT `p2p=<peer id>`) and
//! browse for others, handing each one found to the network task to dial.
//!
//! mdns-sd rather than libp2p's own mDNS: it speaks standard DNS-SD, so
//! `avahi-browse` or `dns-sd` show Weft nodes, and its daemon runs on its
//! own thread with no tie to the swarm.

use std::net::IpAddr;

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use mdns_sd::{ServiceDaemon, ServiceEvent, ServiceInfo};
use tokio::sync::mpsc;

use super::{MDNS_SERVICE, NetCommand, NetError, PeerSource};

pub(super) struct Mdns {
    daemon: ServiceDaemon,
    bridge: tokio::task::JoinHandle<()>,
}

impl Mdns {
    pub(super) fn start(
        peer_id: PeerId,
        tcp_port: u16,
        commands: mpsc::Sender<NetCommand>,
    ) -> Result<Self, NetError> {
        let err = NetError::Mdns;
        let daemon = ServiceDaemon::new().map_err(err)?;
        let me = peer_id.to_string();
        // DNS labels are at most 63 bytes; a peer id is 52 characters.
        let host = format!("weft-{}.local.", &me[me.len().saturating_sub(12)..]);
        let info = ServiceInfo::new(
            MDNS_SERVICE,
            &me,
            &host,
            "",
            tcp_port,
            &[("p2p", me.as_str())][..],
        )
        .map_err(err)?
        .enable_addr_auto();
        daemon.register(info).map_err(err)?;
        let events = daemon.browse(MDNS_SERVICE).map_err(err)?;
        let bridge = tokio::spawn(async move {
            while let Ok(event) = events.recv_async().await {
                let ServiceEvent::ServiceResolved(service) = event else {
                    continue;
                };
                let Some(peer) = service
                    .get_property_val_str("p2p")
                    .and_then(|p| p.parse::<PeerId>().ok())
                else {
                    continue;
                };
                if peer == peer_id {
                    continue;
                }
                let port = service.get_port();
                let addrs: Vec<Multiaddr> = service
                    .get_addresses()
                    .iter()
                    .map(|ip| {
                        let ip = match ip.to_ip_addr() {
                            IpAddr::V4(v4) => Protocol::Ip4(v4),
                            IpAddr::V6(v6) => Protocol::Ip6(v6),
                        };
                        Multiaddr::empty().with(ip).with(Protocol::Tcp(port))
                    })
                    .take(8)
                    .collect();
                tracing::info!(%peer, ?addrs, "found on the LAN by mDNS");
                let cmd = NetCommand::Dial {
                    peer,
                    addrs,
                    source: PeerSource::Mdns,
                };
                if commands.send(cmd).await.is_err() {
                    break;
                }
            }
        });
        Ok(Self { daemon, bridge })
    }

    pub(super) fn stop(self) {
        self.bridge.abort();
        let _ = self.daemon.shutdown();
    }
}

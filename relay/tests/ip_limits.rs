//! The per-IP connection cap (`limits.max_connections_per_ip`) against a
//! relay running in-process over loopback TCP: a stranger dialing with
//! fresh peer ids from one address (127.0.0.2) gets no more than the cap
//! of connections, and a neighbour on another address (127.0.0.3) still
//! gets in; when one of the stranger's connections closes, there is room
//! for one more. Loopback is exempt by default (a reverse proxy on the
//! relay's host makes every device come from 127.0.0.1), so the limited
//! test turns `limit_loopback_per_ip` on; another test shows the
//! exemption. Deadlines, not sleeps.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/client.rs"]
mod client;
#[path = "support/envelopes.rs"]
mod envelopes;

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use client::MailboxClient;
use libp2p::Multiaddr;
use libp2p::multiaddr::Protocol;
use weft_node::mailbox::MailboxRequest;
use weft_relay::{Config, Relay};

const STRANGER_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
const NEIGHBOUR_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));
const DEADLINE: Duration = Duration::from_secs(30);

/// A relay on 127.0.0.1 allowing `max` connections per address, loopback
/// included if `limit_loopback`; and its TCP address with `/p2p/`.
async fn relay(max: u32, limit_loopback: bool) -> (Relay, tempfile::TempDir, Multiaddr) {
    let mut config = Config {
        listen: vec!["/ip4/127.0.0.1/tcp/0".into()],
        metrics: "off".into(),
        ..Config::default()
    };
    config.limits.max_connections_per_ip = max;
    config.limits.limit_loopback_per_ip = limit_loopback;
    config.dht.advertise = false;
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&config, dir.path()).await.unwrap();
    let addr = relay
        .listen()
        .iter()
        .find(|a| a.iter().any(|p| matches!(p, Protocol::Tcp(_))))
        .expect("a TCP listen address")
        .clone()
        .with(Protocol::P2p(relay.peer_id()));
    (relay, dir, addr)
}

fn fresh() -> libp2p::identity::Keypair {
    libp2p::identity::Keypair::generate_ed25519()
}

/// A connection of a fresh peer id from `source` that the relay took in:
/// connected, and a request answered over it (by then the relay counts
/// it, and has not refused it once secured).
async fn accepted(addr: &Multiaddr, source: IpAddr) -> anyhow::Result<MailboxClient> {
    let mut client = MailboxClient::connect(fresh(), addr, Some(source)).await?;
    client
        .call(&MailboxRequest::Fetch { after: 0, limit: 1 })
        .await?;
    Ok(client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_peer_ids_from_one_address_get_no_more_than_the_cap() {
    const CAP: u32 = 3;
    let (relay, _dir, addr) = relay(CAP, true).await;
    let mut held = Vec::new();
    for n in 1..=CAP {
        let client = accepted(&addr, STRANGER_IP)
            .await
            .unwrap_or_else(|e| panic!("connection {n} of {CAP} from one address: {e:#}"));
        held.push(client);
    }
    assert_eq!(relay.metrics().connections_refused_per_ip(), 0);
    // One more from there, under yet another fresh peer id: refused as it
    // arrives (the relay counted the others before answering them).
    let over = MailboxClient::connect(fresh(), &addr, Some(STRANGER_IP)).await;
    assert!(
        over.is_err(),
        "a connection past the cap of {CAP} from one address was accepted"
    );
    // Counted as the swarm task takes the refusal in, maybe just after
    // the client saw it.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while relay.metrics().connections_refused_per_ip() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the refusal was never counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Another address is not affected, and the mailbox service answers it.
    let neighbour = envelopes::device("neighbour");
    let mut client = MailboxClient::connect(
        neighbour.libp2p_keypair().unwrap(),
        &addr,
        Some(NEIGHBOUR_IP),
    )
    .await
    .expect("a neighbour on another address connects");
    client
        .register(&neighbour)
        .await
        .expect("the neighbour registers");
    // One of the stranger's connections closes: room for one more (once
    // the relay has seen it close).
    drop(held.pop());
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        match accepted(&addr, STRANGER_IP).await {
            Ok(client) => {
                held.push(client);
                break;
            }
            // Polled: the relay learns of the close asynchronously.
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("no room again after a connection closed: {e:#}"),
        }
    }
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_is_exempt_unless_asked() {
    let (relay, _dir, addr) = relay(2, false).await;
    let mut held = Vec::new();
    for n in 1..=5 {
        let client = accepted(&addr, STRANGER_IP)
            .await
            .unwrap_or_else(|e| panic!("loopback connection {n}: {e:#}"));
        held.push(client);
    }
    assert_eq!(relay.metrics().connections_refused_per_ip(), 0);
    relay.shutdown().await;
}

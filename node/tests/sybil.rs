//! Sybils: many fresh peer ids dial one node at once. The connection
//! limits hold (no more inbound connections than allowed), the node keeps
//! answering, and it still reaches an honest contact and delivers to it.
//!
//! A CI-sized copy (300 sybils, past the 256 inbound connections allowed)
//! on the memory transport; `SYBILS` sets the count (docs/performance.md
//! reports 500).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{TestNode, befriend};
use futures::StreamExt;
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, ping};
use tokio::sync::mpsc;
use weft_node::ConnectionLimits;
use weft_node::api::Request;
use weft_proto::transport::{SwarmConfig, TransportKind, build_swarm};

/// What became of one sybil's dial.
#[derive(Debug)]
enum Outcome {
    Held,
    Refused,
}

/// A bare libp2p peer with a fresh id that dials `addr` and holds the
/// connection open (it answers pings, nothing else), reporting whether the
/// connection stood.
fn sybil(addr: Multiaddr, report: mpsc::Sender<Outcome>) {
    let key = libp2p::identity::Keypair::generate_ed25519();
    let config = SwarmConfig {
        transport: TransportKind::Memory,
        idle_connection_timeout: Duration::from_secs(3600),
        bandwidth_metrics: None,
    };
    let mut swarm = build_swarm(key, config, |_| ping::Behaviour::default()).unwrap();
    tokio::spawn(async move {
        if swarm.dial(addr).is_err() {
            let _ = report.send(Outcome::Refused).await;
            return;
        }
        let mut reported = false;
        while let Some(event) = swarm.next().await {
            let outcome = match event {
                // Held once a ping went through: the node kept it.
                SwarmEvent::Behaviour(ping::Event { result: Ok(_), .. }) => Outcome::Held,
                SwarmEvent::ConnectionClosed { .. }
                | SwarmEvent::OutgoingConnectionError { .. } => Outcome::Refused,
                _ => continue,
            };
            if !reported {
                reported = true;
                let _ = report.send(outcome).await;
            }
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sybils_past_the_connection_limits_are_refused_and_contacts_still_served() {
    let sybils: usize = std::env::var("SYBILS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let limit = ConnectionLimits::default().max_established_incoming as usize;
    assert!(sybils > limit, "the test needs more sybils than the limit");
    let alice = TestNode::start("alice", 41, &[]).await;

    // In waves below the pending-connection limit, so that the limit on
    // established connections is the one tested.
    let (report, mut outcomes) = mpsc::channel(sybils);
    let (mut held, mut refused) = (0, 0);
    for wave in (0..sybils).collect::<Vec<_>>().chunks(16) {
        for _ in wave {
            sybil(alice.addr.clone(), report.clone());
        }
        for _ in wave {
            let outcome = tokio::time::timeout(common::DEADLINE, outcomes.recv())
                .await
                .expect("every sybil learns whether its connection stood")
                .unwrap();
            match outcome {
                Outcome::Held => held += 1,
                Outcome::Refused => refused += 1,
            }
        }
    }
    let started = Instant::now();
    let status = alice.call(Request::Status).await;
    let status_ms = started.elapsed().as_secs_f64() * 1e3;
    let inbound = status["peers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["source"] == "inbound")
        .count();
    eprintln!(
        "{sybils} sybils: {held} held, {refused} refused; \
         alice holds {inbound} inbound; status answered in {status_ms:.1} ms"
    );
    assert!(
        inbound <= limit,
        "alice holds {inbound} inbound connections, past the limit of {limit}"
    );
    assert_eq!(held, limit, "sybils are held up to the limit, and no more");

    // An honest contact: alice dials bob (outbound connections have their
    // own limit) and delivers. Bob's invite names his address once he
    // listens.
    let bob = TestNode::start("bob", 41, &[]).await;
    common::poll_until("bob to listen", || async {
        (!bob.handle.listen_addrs().await.is_empty()).then_some(())
    })
    .await;
    befriend(&alice, &bob).await;
    alice.send("bob", "still here").await;
    bob.expect_text("alice", "still here").await;
}

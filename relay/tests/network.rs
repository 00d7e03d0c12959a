//! The relay over libp2p, in-process on the memory transport: devices
//! register, others deposit, a connected device is woken over its
//! connection, an away one by a UnifiedPush POST, mail survives a
//! restart, and a backlog is fetched in pages. Deadlines, not sleeps.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/envelopes.rs"]
mod envelopes;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use envelopes::{device, sealed};
use futures::StreamExt;
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, StreamProtocol, Swarm, identify};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use weft_node::identity::Identity;
use weft_node::mailbox::{
    MAILBOX_PROTOCOL, MailboxId, MailboxRequest, MailboxResponse, Registration,
};
use weft_node::net::{DirectCodec, IDENTIFY_PROTOCOL};
use weft_proto::transport::{SwarmConfig, TransportKind, build_swarm};
use weft_relay::{Config, Relay};

const DEADLINE: Duration = Duration::from_secs(20);

fn memory_port() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    3_000_000 + u64::from(std::process::id() % 10_000) * 100 + NEXT.fetch_add(1, Ordering::Relaxed)
}

fn relay_config(port: u64) -> Config {
    let mut config = Config {
        listen: vec![format!("/memory/{port}")],
        metrics: "off".into(),
        ..Config::default()
    };
    config.wakeup.allow_private_hosts = true;
    config.wakeup.min_interval_secs = 1;
    config.limits.request_burst = 10_000;
    config.limits.requests_per_sec = 10_000.0;
    config
}

#[derive(NetworkBehaviour)]
struct ClientBehaviour {
    identify: identify::Behaviour,
    mailbox: request_response::Behaviour<DirectCodec>,
}

/// A device (or depositor) speaking the mailbox protocol to one relay.
struct Client {
    swarm: Swarm<ClientBehaviour>,
    relay: PeerId,
    wakeups: u32,
    relay_info: Option<identify::Info>,
}

impl Client {
    async fn connect(identity: &Identity, relay: PeerId, addr: &Multiaddr) -> Client {
        let key = identity.libp2p_keypair().unwrap();
        let config = SwarmConfig {
            transport: TransportKind::Memory,
            idle_connection_timeout: Duration::from_secs(60),
            bandwidth_metrics: None,
        };
        let swarm = build_swarm(key, config, |key| ClientBehaviour {
            identify: identify::Behaviour::new(identify::Config::new(
                IDENTIFY_PROTOCOL.into(),
                key.public(),
            )),
            mailbox: request_response::Behaviour::with_codec(
                DirectCodec,
                [(StreamProtocol::new(MAILBOX_PROTOCOL), ProtocolSupport::Full)],
                request_response::Config::default(),
            ),
        })
        .unwrap();
        let mut client = Client {
            swarm,
            relay,
            wakeups: 0,
            relay_info: None,
        };
        client
            .swarm
            .dial(addr.clone().with(libp2p::multiaddr::Protocol::P2p(relay)))
            .unwrap();
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            if let SwarmEvent::ConnectionEstablished { peer_id, .. } = client.next(deadline).await
                && peer_id == relay
            {
                return client;
            }
        }
    }

    async fn next(&mut self, deadline: tokio::time::Instant) -> SwarmEvent<ClientBehaviourEvent> {
        let event = tokio::time::timeout_at(deadline, self.swarm.select_next_some())
            .await
            .expect("deadline passed");
        match event {
            SwarmEvent::Behaviour(ClientBehaviourEvent::Mailbox(
                request_response::Event::Message {
                    message:
                        request_response::Message::Request {
                            request, channel, ..
                        },
                    ..
                },
            )) => {
                assert_eq!(
                    MailboxRequest::decode(&request),
                    Some(MailboxRequest::Wakeup)
                );
                self.wakeups += 1;
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .mailbox
                    .send_response(channel, MailboxResponse::Ok.encode());
                SwarmEvent::Dialing {
                    peer_id: None,
                    connection_id: libp2p::swarm::ConnectionId::new_unchecked(0),
                }
            }
            SwarmEvent::Behaviour(ClientBehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) if peer_id == self.relay => {
                self.relay_info = Some(info);
                SwarmEvent::Dialing {
                    peer_id: None,
                    connection_id: libp2p::swarm::ConnectionId::new_unchecked(0),
                }
            }
            other => other,
        }
    }

    fn send(&mut self, request: &MailboxRequest) -> OutboundRequestId {
        let relay = self.relay;
        self.swarm
            .behaviour_mut()
            .mailbox
            .send_request(&relay, request.encode())
    }

    async fn call(&mut self, request: &MailboxRequest) -> MailboxResponse {
        let id = self.send(request);
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            match self.next(deadline).await {
                SwarmEvent::Behaviour(ClientBehaviourEvent::Mailbox(
                    request_response::Event::Message {
                        message:
                            request_response::Message::Response {
                                request_id,
                                response,
                            },
                        ..
                    },
                )) if request_id == id => {
                    return MailboxResponse::decode(&response).expect("malformed response");
                }
                SwarmEvent::Behaviour(ClientBehaviourEvent::Mailbox(
                    request_response::Event::OutboundFailure {
                        request_id, error, ..
                    },
                )) if request_id == id => panic!("request failed: {error}"),
                _ => {}
            }
        }
    }

    async fn wait_for_wakeup(&mut self) {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while self.wakeups == 0 {
            self.next(deadline).await;
        }
    }

    async fn wait_for_identify(&mut self) -> identify::Info {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while self.relay_info.is_none() {
            self.next(deadline).await;
        }
        self.relay_info.clone().unwrap()
    }

    async fn register(&mut self, identity: &Identity, wakeup: Option<String>) -> MailboxId {
        let registration =
            Registration::new(identity, &self.relay, weft_node::now_ms(), wakeup, None);
        match self
            .call(&MailboxRequest::Register(Box::new(registration)))
            .await
        {
            MailboxResponse::Registered { mailbox, .. } => mailbox,
            other => panic!("registration refused: {other:?}"),
        }
    }

    async fn fetch_all(&mut self) -> Vec<(u64, Vec<u8>)> {
        let mut all = Vec::new();
        let mut after = 0;
        loop {
            match self
                .call(&MailboxRequest::Fetch {
                    after,
                    limit: weft_node::mailbox::MAX_FETCH,
                })
                .await
            {
                MailboxResponse::Mail { items, more } => {
                    if let Some((last, _)) = items.last() {
                        after = *last;
                    }
                    all.extend(items);
                    if !more {
                        return all;
                    }
                }
                other => panic!("fetch refused: {other:?}"),
            }
        }
    }
}

fn identity(name: &str) -> Identity {
    Identity::from_seed(name.as_bytes(), weft_node::now_ms()).unwrap()
}

#[tokio::test]
async fn mail_is_deposited_woken_fetched_and_acknowledged_over_libp2p() {
    let dir = tempfile::tempdir().unwrap();
    let port = memory_port();
    let relay = Relay::start(&relay_config(port), dir.path()).await.unwrap();
    let addr = relay.listen()[0].clone();
    let (alice, bob) = (identity("alice"), identity("bob"));
    let mut a = Client::connect(&alice, relay.peer_id(), &addr).await;
    let mut b = Client::connect(&bob, relay.peer_id(), &addr).await;

    // What the relay says it is and serves.
    let info = a.wait_for_identify().await;
    assert!(
        info.agent_version.starts_with("weft-relay/"),
        "{}",
        info.agent_version
    );
    let protocols: Vec<String> = info.protocols.iter().map(ToString::to_string).collect();
    for p in [
        "/weft/mailbox/1",
        "/weft/kad/1.0.0",
        "/libp2p/circuit/relay/0.2.0/hop",
        "/libp2p/autonat/1.0.0",
        "/libp2p/autonat/2/dial-request",
        "/ipfs/ping/1.0.0",
    ] {
        assert!(
            protocols.iter().any(|q| q == p),
            "{p} missing from {protocols:?}"
        );
    }

    let mailbox = a.register(&alice, None).await;
    assert_eq!(mailbox, MailboxId::of(&alice.device_id(), &relay.peer_id()));
    let sender = device("sender");
    let envelopes: Vec<Vec<u8>> = (1..=3).map(|n| sealed(&sender, n, 100)).collect();
    let r = b
        .call(&MailboxRequest::Deposit {
            mailbox,
            envelopes: envelopes.clone(),
        })
        .await;
    assert_eq!(r, MailboxResponse::Deposited { accepted: 3 });
    // Alice is connected: she is told over her connection.
    a.wait_for_wakeup().await;
    assert!(relay.metrics().wakeups_sent("live") >= 1);
    let mail = a.fetch_all().await;
    assert_eq!(
        mail.iter().map(|(_, e)| e.clone()).collect::<Vec<_>>(),
        envelopes
    );
    let last = mail.last().unwrap().0;
    let r = a.call(&MailboxRequest::Ack { up_to: last }).await;
    assert_eq!(r, MailboxResponse::Acked { deleted: 3 });
    assert!(a.fetch_all().await.is_empty());
    // Bob has no mailbox: he cannot read Alice's.
    let r = b
        .call(&MailboxRequest::Fetch {
            after: 0,
            limit: 10,
        })
        .await;
    assert!(matches!(r, MailboxResponse::Refused { .. }), "{r:?}");
    relay.shutdown().await;
}

/// A one-request-at-a-time HTTP server recording each request as
/// (method, path, body length).
async fn push_server() -> (String, mpsc::Receiver<(String, String, usize)>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/up/carol", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 1024];
            let head_end = loop {
                let Ok(n) = conn.read(&mut chunk).await else {
                    break None;
                };
                if n == 0 {
                    break None;
                }
                buf.extend_from_slice(&chunk[..n]);
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break Some(i + 4);
                }
            };
            let Some(head_end) = head_end else { continue };
            let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
            let mut first = head.lines().next().unwrap_or("").split(' ');
            let method = first.next().unwrap_or("").to_string();
            let path = first.next().unwrap_or("").to_string();
            let length = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            let _ = conn
                .write_all(
                    b"HTTP/1.1 201 Created\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                )
                .await;
            let _ = tx.send((method, path, length)).await;
        }
    });
    (url, rx)
}

#[tokio::test]
async fn an_away_device_is_woken_by_a_content_free_unifiedpush_post() {
    let dir = tempfile::tempdir().unwrap();
    let port = memory_port();
    let relay = Relay::start(&relay_config(port), dir.path()).await.unwrap();
    let addr = relay.listen()[0].clone();
    let (url, mut posts) = push_server().await;
    let (carol, bob) = (identity("carol"), identity("bob"));
    let mailbox = {
        let mut c = Client::connect(&carol, relay.peer_id(), &addr).await;
        c.register(&carol, Some(url)).await
        // Carol goes away.
    };
    let mut b = Client::connect(&bob, relay.peer_id(), &addr).await;
    // Until the relay has seen Carol's connection close, it wakes her
    // over it; keep depositing until the POST comes.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let sender = device("sender");
    let mut n = 0;
    let post = loop {
        n += 1;
        let r = b
            .call(&MailboxRequest::Deposit {
                mailbox,
                envelopes: vec![sealed(&sender, n, 100)],
            })
            .await;
        assert_eq!(r, MailboxResponse::Deposited { accepted: 1 });
        let wait = tokio::time::Instant::now() + Duration::from_millis(300);
        match tokio::time::timeout_at(wait.min(deadline), posts.recv()).await {
            Ok(Some(post)) => break post,
            _ if tokio::time::Instant::now() >= deadline => panic!("no wakeup POST"),
            _ => {}
        }
    };
    assert_eq!(post, ("POST".to_string(), "/up/carol".to_string(), 0));
    let sent_by = tokio::time::Instant::now() + DEADLINE;
    while relay.metrics().wakeups_sent("http") == 0 {
        assert!(
            tokio::time::Instant::now() < sent_by,
            "the POST was not counted"
        );
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    relay.shutdown().await;
}

#[tokio::test]
async fn mail_and_identity_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let port = memory_port();
    let (alice, bob) = (identity("alice"), identity("bob"));
    let relay = Relay::start(&relay_config(port), dir.path()).await.unwrap();
    let peer_id = relay.peer_id();
    let addr = relay.listen()[0].clone();
    let mailbox = {
        let mut a = Client::connect(&alice, peer_id, &addr).await;
        a.register(&alice, None).await
    };
    let kept = sealed(&device("sender"), 1, 100);
    {
        let mut b = Client::connect(&bob, peer_id, &addr).await;
        let r = b
            .call(&MailboxRequest::Deposit {
                mailbox,
                envelopes: vec![kept.clone()],
            })
            .await;
        assert_eq!(r, MailboxResponse::Deposited { accepted: 1 });
    }
    relay.shutdown().await;

    let port = memory_port();
    let relay = Relay::start(&relay_config(port), dir.path()).await.unwrap();
    assert_eq!(relay.peer_id(), peer_id);
    let addr = relay.listen()[0].clone();
    let mut a = Client::connect(&alice, peer_id, &addr).await;
    let mail = a.fetch_all().await;
    assert_eq!(mail.len(), 1);
    assert_eq!(mail[0].1, kept);
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_of_10000_envelopes_is_fetched_in_pages() {
    let dir = tempfile::tempdir().unwrap();
    let port = memory_port();
    // One depositor fills the mailbox: no depositor quotas here.
    let mut config = relay_config(port);
    let s = &mut config.storage;
    for quota in [
        &mut s.max_envelopes_per_peer_per_mailbox,
        &mut s.max_bytes_per_peer_per_mailbox,
        &mut s.max_envelopes_per_ip_per_mailbox,
        &mut s.max_bytes_per_ip_per_mailbox,
    ] {
        *quota = 0;
    }
    let relay = Relay::start(&config, dir.path()).await.unwrap();
    let addr = relay.listen()[0].clone();
    let (alice, bob) = (identity("alice"), identity("bob"));
    let mailbox = {
        let mut a = Client::connect(&alice, relay.peer_id(), &addr).await;
        a.register(&alice, None).await
    };
    let mut b = Client::connect(&bob, relay.peer_id(), &addr).await;
    let sender = device("sender");
    let mut pending = Vec::new();
    for chunk in 0..40u64 {
        let envelopes = (0..250u64)
            .map(|i| sealed(&sender, chunk * 250 + i, 400))
            .collect();
        pending.push(b.send(&MailboxRequest::Deposit { mailbox, envelopes }));
    }
    let deadline = tokio::time::Instant::now() + DEADLINE * 3;
    let mut acked = 0;
    while acked < pending.len() {
        match b.next(deadline).await {
            SwarmEvent::Behaviour(ClientBehaviourEvent::Mailbox(
                request_response::Event::Message {
                    message: request_response::Message::Response { response, .. },
                    ..
                },
            )) => {
                assert_eq!(
                    MailboxResponse::decode(&response),
                    Some(MailboxResponse::Deposited { accepted: 250 })
                );
                acked += 1;
            }
            SwarmEvent::Behaviour(ClientBehaviourEvent::Mailbox(
                request_response::Event::OutboundFailure { error, .. },
            )) => panic!("deposit failed: {error}"),
            _ => {}
        }
    }
    let mut a = Client::connect(&alice, relay.peer_id(), &addr).await;
    let started = Instant::now();
    let mail = a.fetch_all().await;
    let took = started.elapsed();
    assert_eq!(mail.len(), 10_000);
    assert!(mail.windows(2).all(|w| w[0].0 < w[1].0));
    println!("fetched a backlog of 10,000 envelopes over libp2p in {took:?}");
    relay.shutdown().await;
}

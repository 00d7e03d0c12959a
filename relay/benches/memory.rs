//! Resident memory of the `weft-relay` binary: idle, then with 10,000
//! registered mailboxes each holding an envelope (registered over TCP by
//! 10,000 device identities, deposited by one depositor).
//!
//! `cargo bench -p weft-relay --bench memory` (prints its numbers).
//! `MEMORY_BENCH_MAILBOXES` changes the count.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, StreamProtocol, Swarm, noise, tcp, yamux};
use weft_node::identity::Identity;
use weft_node::mailbox::{
    MAILBOX_PROTOCOL, MailboxId, MailboxRequest, MailboxResponse, Registration,
};
use weft_node::net::DirectCodec;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Kills the relay if the bench fails before it has exited.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

type Client = Swarm<request_response::Behaviour<DirectCodec>>;

fn client(key: libp2p::identity::Keypair) -> Client {
    libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .unwrap()
        .with_behaviour(|_| {
            request_response::Behaviour::with_codec(
                DirectCodec,
                [(StreamProtocol::new(MAILBOX_PROTOCOL), ProtocolSupport::Full)],
                request_response::Config::default(),
            )
        })
        .unwrap()
        .build()
}

/// Sends `requests` to the relay over one connection, pipelined; returns
/// the responses in any order.
async fn exchange(
    swarm: &mut Client,
    relay: PeerId,
    addr: &Multiaddr,
    requests: Vec<MailboxRequest>,
) -> Vec<MailboxResponse> {
    let mut out = Vec::new();
    let n = requests.len();
    let mut requests = Some(requests);
    let mut sent = false;
    if swarm.is_connected(&relay) {
        for r in requests.take().unwrap_or_default() {
            swarm.behaviour_mut().send_request(&relay, r.encode());
        }
        sent = true;
    } else {
        swarm.dial(addr.clone()).unwrap();
    }
    while out.len() < n {
        match tokio::time::timeout(Duration::from_secs(60), swarm.select_next_some())
            .await
            .expect("timed out")
        {
            SwarmEvent::ConnectionEstablished { peer_id, .. } if peer_id == relay && !sent => {
                for r in requests.take().unwrap_or_default() {
                    swarm.behaviour_mut().send_request(&relay, r.encode());
                }
                sent = true;
            }
            SwarmEvent::Behaviour(request_response::Event::Message {
                message: request_response::Message::Response { response, .. },
                ..
            }) => out.push(MailboxResponse::decode(&response).unwrap()),
            SwarmEvent::Behaviour(request_response::Event::OutboundFailure { error, .. }) => {
                panic!("request failed: {error}")
            }
            SwarmEvent::OutgoingConnectionError { error, .. } => panic!("dial failed: {error}"),
            _ => {}
        }
    }
    out
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run());
}

async fn run() {
    let count: usize = std::env::var("MEMORY_BENCH_MAILBOXES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let config = dir.path().join("relay.toml");
    std::fs::write(
        &config,
        "[limits]\nrequests_per_sec = 100000.0\nrequest_burst = 100000\n",
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_weft-relay"))
        .args([
            "--json",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--metrics",
            "off",
        ])
        .arg("--config")
        .arg(&config)
        .arg("--data")
        .arg(dir.path().join("data"))
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = Running(child);
    let mut stdout = BufReader::new(child.0.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let ready: serde_json::Value = serde_json::from_str(&line).unwrap();
    let relay: PeerId = ready["peer_id"].as_str().unwrap().parse().unwrap();
    let addr: Multiaddr = ready["listen"][0].as_str().unwrap().parse().unwrap();
    let addr = addr.with(libp2p::multiaddr::Protocol::P2p(relay));
    tokio::time::sleep(Duration::from_secs(2)).await;
    println!("idle relay: {} KiB resident", rss_kib(child.0.id()));

    let started = std::time::Instant::now();
    let mut mailboxes = Vec::with_capacity(count);
    let mut tasks = FuturesUnordered::new();
    for n in 0..count {
        let addr = addr.clone();
        tasks.push(tokio::spawn(async move {
            let device =
                Identity::from_seed(format!("memory bench {n}").as_bytes(), weft_node::now_ms())
                    .unwrap();
            let mut swarm = client(device.libp2p_keypair().unwrap());
            let registration = Registration::new(&device, &relay, weft_node::now_ms(), None, None);
            let out = exchange(
                &mut swarm,
                relay,
                &addr,
                vec![MailboxRequest::Register(Box::new(registration))],
            )
            .await;
            match &out[..] {
                [MailboxResponse::Registered { mailbox, .. }] => *mailbox,
                other => panic!("registration failed: {other:?}"),
            }
        }));
        if tasks.len() >= 32 {
            mailboxes.push(tasks.next().await.unwrap().unwrap());
        }
    }
    while let Some(m) = tasks.next().await {
        mailboxes.push(m.unwrap());
    }
    println!(
        "registered {count} mailboxes over TCP in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let deposits: Vec<MailboxRequest> = mailboxes
        .iter()
        .map(|m: &MailboxId| MailboxRequest::Deposit {
            mailbox: *m,
            envelopes: vec![vec![0x42; 1024]],
        })
        .collect();
    let mut depositor = client(libp2p::identity::Keypair::generate_ed25519());
    for chunk in deposits.chunks(64) {
        let out = exchange(&mut depositor, relay, &addr, chunk.to_vec()).await;
        assert!(
            out.iter()
                .all(|r| matches!(r, MailboxResponse::Deposited { .. }))
        );
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    println!(
        "relay with {count} registered mailboxes (one 1 KiB envelope each): {} KiB resident",
        rss_kib(child.0.id())
    );
    Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(child.0.wait().unwrap().success());
}

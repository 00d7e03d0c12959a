//! Resident memory of the `weft-relay` binary: idle, then with 10,000
//! registered mailboxes each holding an envelope (registered over TCP by
//! 10,000 device identities, deposited by one depositor).
//!
//! `cargo bench -p weft-relay --bench memory` (prints its numbers and
//! PASS/FAIL against the targets: idle under 30 MB resident, 10,000
//! registered mailboxes under 100 MB; MB = 10^6 bytes of `VmRSS`).
//! `MEMORY_BENCH_MAILBOXES` changes the count. Every wait has a deadline
//! (60 s; 10 minutes for all the registrations); past it the bench panics
//! and the relay is killed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "../tests/support/envelopes.rs"]
mod envelopes;
use common::{loadavg, utc_now};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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

/// The longest a single wait may take.
const DEADLINE: Duration = Duration::from_secs(60);
/// The longest all the registrations together may take.
const REGISTER_DEADLINE: Duration = Duration::from_secs(600);
const IDLE_TARGET_MB: f64 = 30.0;
const MAILBOXES_TARGET_MB: f64 = 100.0;

/// A `/proc/PID/status` field in KiB (`VmRSS`, `VmHWM`).
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn mb(kib: u64) -> f64 {
    kib as f64 * 1024.0 / 1e6
}

fn verdict(ok: bool) -> &'static str {
    if ok { "PASS" } else { "FAIL" }
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
    let deadline = tokio::time::Instant::now() + DEADLINE;
    if swarm.is_connected(&relay) {
        for r in requests.take().unwrap_or_default() {
            swarm.behaviour_mut().send_request(&relay, r.encode());
        }
        sent = true;
    } else {
        swarm.dial(addr.clone()).unwrap();
    }
    while out.len() < n {
        match tokio::time::timeout_at(deadline, swarm.select_next_some())
            .await
            .expect("no answer from the relay within the deadline")
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
    println!("memory bench: {} UTC, load {}", utc_now(), loadavg());
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
    // The ready line, read on a thread of its own so that the wait for it
    // has a deadline.
    let mut stdout = BufReader::new(child.0.stdout.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = stdout.read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx
        .recv_timeout(DEADLINE)
        .expect("the relay did not print its ready line in time");
    let ready: serde_json::Value = serde_json::from_str(&line).unwrap();
    let relay: PeerId = ready["peer_id"].as_str().unwrap().parse().unwrap();
    let addr: Multiaddr = ready["listen"][0].as_str().unwrap().parse().unwrap();
    let addr = addr.with(libp2p::multiaddr::Protocol::P2p(relay));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pid = child.0.id();
    let idle = status_kib(pid, "VmRSS");
    println!(
        "idle relay: {idle} KiB resident = {:.1} MB (VmHWM {} KiB)",
        mb(idle),
        status_kib(pid, "VmHWM")
    );
    println!(
        "  target: idle < {IDLE_TARGET_MB:.0} MB resident: {:.1} MB {}",
        mb(idle),
        verdict(mb(idle) < IDLE_TARGET_MB)
    );

    let started = Instant::now();
    let register_deadline = tokio::time::Instant::now() + REGISTER_DEADLINE;
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
            let done = tokio::time::timeout_at(register_deadline, tasks.next())
                .await
                .expect("the registrations took too long");
            mailboxes.push(done.unwrap().unwrap());
        }
    }
    while let Some(m) = tokio::time::timeout_at(register_deadline, tasks.next())
        .await
        .expect("the registrations took too long")
    {
        mailboxes.push(m.unwrap());
    }
    println!(
        "registered {count} mailboxes over TCP in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    // A real signed envelope of about 1 KiB (the relay verifies it).
    let envelope = envelopes::sealed(&envelopes::device("memory bench sender"), 1, 1024);
    let deposits: Vec<MailboxRequest> = mailboxes
        .iter()
        .map(|m: &MailboxId| MailboxRequest::Deposit {
            mailbox: *m,
            envelopes: vec![envelope.clone()],
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
    let full = status_kib(pid, "VmRSS");
    println!(
        "relay with {count} registered mailboxes (one 1 KiB envelope each): {full} KiB \
         resident = {:.1} MB (VmHWM {} KiB)",
        mb(full),
        status_kib(pid, "VmHWM")
    );
    println!(
        "  target: {count} registered mailboxes < {MAILBOXES_TARGET_MB:.0} MB resident: \
         {:.1} MB {} (load {})",
        mb(full),
        verdict(mb(full) < MAILBOXES_TARGET_MB),
        loadavg()
    );
    Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    // It drains and exits; the wait for that has a deadline too.
    let stop_by = Instant::now() + DEADLINE;
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < stop_by,
            "the relay did not exit within {} s of SIGTERM",
            DEADLINE.as_secs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "the relay exited with {status}");
}

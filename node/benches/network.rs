//! Two nodes on loopback TCP, against bare libp2p gossipsub on the same
//! transport, in the same process and run.
//!
//! 1. Latency, Weft: alice and bob are real `Node`s (seeded identities,
//!    temporary homes, `NetConfig::loopback()`, SQLite with
//!    `synchronous=FULL` on the machine's disk). 1,000 messages of 200
//!    bytes, one at a time: the clock starts when `handle.call(Request::Send
//!    ..)` is called on alice and stops when bob's `handle.events()`
//!    broadcasts the `Event::Message`. So it holds the hop into alice's
//!    node thread, seal and sign, gossipsub publish, TCP/noise/yamux, bob's
//!    validation (signature, membership, replay), opening and the hop out
//!    of bob's node thread. Alice's commit (fsync) follows the publish and
//!    bob's writes follow the event; they are on the path of the next
//!    message only if still running when it comes.
//! 2. Latency, bare gossipsub, in two variants, same transport (TCP with
//!    nodelay + noise + yamux), same 200-byte payloads, each swarm driven
//!    by its own thread as each Weft node is:
//!    - *signed* (the target's baseline): libp2p gossipsub as it ships,
//!      every message signed with the publisher's ed25519 key and verified
//!      by the receiver (`MessageAuthenticity::Signed`,
//!      `ValidationMode::Strict`). Weft turns gossipsub's signature off
//!      because its envelope carries the device's own; the work moves, it
//!      is not removed.
//!    - *anonymous* (a stricter reference): Weft's gossipsub settings, no
//!      signature at all, so the ratio to it charges Weft for the
//!      signature and verification too.
//!
//!    Both are timed at the application boundary, where Weft's event is:
//!    publishes handed to alice's swarm thread over a channel, bob's
//!    messages handed back and timed in the caller, in 10 blocks of 100
//!    interleaved with Weft's. For reference, the anonymous variant is
//!    also timed inside the swarm tasks (no task boundary at either end).
//! 3. Throughput, Weft: 2,000 messages/s from alice for a few seconds, each
//!    send its own concurrent `call`; every arrival is counted exactly once
//!    (none lost, none duplicated), from bob's events and from his store.
//!
//! Prints `ratio weft p50 / bare signed p50 = x` (the target: <= 3) and the
//! same against the anonymous variant, with PASS/FAIL lines for both, for
//! p50 < 3 ms, p99 < 15 ms and the throughput run.
//!
//! `cargo bench -p weft-node --bench network`
//!
//! Under `cargo test --benches` (no `--bench` argument) it runs a few
//! messages only, as a smoke test.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::gossipsub::{self, IdentTopic, MessageAuthenticity};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, Swarm, noise, tcp, yamux};
use tokio::sync::{broadcast, mpsc};
use weft_node::api::{Event, IdView, MessageView, Request, SendView};
use weft_node::home::Home;
use weft_node::identity::Identity;
use weft_node::{NetConfig, Node, NodeConfig, NodeHandle};

const MESSAGE_BYTES: usize = 200;
const DEADLINE: Duration = Duration::from_secs(30);

struct Plan {
    latency_messages: usize,
    rate: usize,
    seconds: f64,
}

/// `seq N` padded to exactly 200 bytes.
fn text(kind: &str, seq: usize) -> String {
    let mut s = format!("{kind} {seq:08} ");
    while s.len() < MESSAGE_BYTES {
        s.push('x');
    }
    s
}

fn seq_of(text: &str, kind: &str) -> Option<usize> {
    let rest = text.strip_prefix(kind)?.strip_prefix(' ')?;
    rest.get(..8)?.parse().ok()
}

/// Nearest-rank percentile of sorted values.
fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

struct Stats {
    p50: Duration,
    p99: Duration,
    max: Duration,
    mean: Duration,
}

fn stats(mut v: Vec<Duration>) -> Stats {
    v.sort();
    let mean = if v.is_empty() {
        Duration::ZERO
    } else {
        v.iter().sum::<Duration>() / v.len() as u32
    };
    Stats {
        p50: pct(&v, 50.0),
        p99: pct(&v, 99.0),
        max: v.last().copied().unwrap_or_default(),
        mean,
    }
}

fn print_stats(name: &str, n: usize, s: &Stats) {
    println!(
        "{name}: n={n} p50 {:.3} ms, p99 {:.3} ms, mean {:.3} ms, max {:.3} ms",
        ms(s.p50),
        ms(s.p99),
        ms(s.mean),
        ms(s.max)
    );
}

fn verdict(ok: bool) -> &'static str {
    if ok { "PASS" } else { "FAIL" }
}

// ---------------------------------------------------------------- Weft --

struct BenchNode {
    node: Node,
    handle: NodeHandle,
    _dir: tempfile::TempDir,
}

async fn start_node(name: &str, bootstrap: Option<Multiaddr>) -> BenchNode {
    let dir = tempfile::Builder::new()
        .prefix(&format!("weft-bench-{name}-"))
        .tempdir()
        .unwrap();
    let home = Home::new(dir.path().join("home"));
    let identity = Identity::from_seed(format!("{name}/bench").as_bytes(), 0).unwrap();
    home.init_with(&identity, name).unwrap();
    let mut net = NetConfig::loopback();
    net.bootstrap = bootstrap.into_iter().collect();
    let node = Node::start(NodeConfig::new(dir.path().join("home"), Some(net)))
        .await
        .unwrap();
    let handle = node.handle();
    BenchNode {
        node,
        handle,
        _dir: dir,
    }
}

async fn listen_addr(handle: &NodeHandle) -> Multiaddr {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(a) = handle.listen_addrs().await.into_iter().next() {
            return a;
        }
        assert!(Instant::now() < deadline, "node never listened");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn add_contact(me: &NodeHandle, other: &NodeHandle, name: &str) {
    let id: IdView = other.request(Request::Id).await.unwrap();
    let invite = id.invite;
    me.call(Request::ContactAdd {
        invite,
        name: Some(name.into()),
    })
    .await
    .unwrap();
}

fn send_request(text: String) -> Request {
    Request::Send {
        target: "bob".into(),
        text,
        reply_to: None,
    }
}

/// What bob's event listener saw, per message kind.
#[derive(Default)]
struct Arrivals {
    at: HashMap<(String, usize), Vec<Instant>>,
    lagged: u64,
}

/// Listens to bob's events; forwards (kind, seq, time) of every incoming
/// message.
fn listen(
    mut events: broadcast::Receiver<Event>,
) -> mpsc::UnboundedReceiver<(String, usize, Instant)> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match events.recv().await {
                Ok(Event::Message(m)) if !m.outgoing => {
                    let now = Instant::now();
                    for kind in ["warm", "lat", "tput"] {
                        if let Some(seq) = seq_of(&m.text, kind) {
                            let _ = tx.send((kind.to_string(), seq, now));
                        }
                    }
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    let _ = tx.send(("lagged".into(), n as usize, Instant::now()));
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    rx
}

async fn next_arrival(
    rx: &mut mpsc::UnboundedReceiver<(String, usize, Instant)>,
    arrivals: &mut Arrivals,
    kind: &str,
    seq: usize,
    until: Instant,
) -> Option<Instant> {
    loop {
        if let Some(t) = arrivals
            .at
            .get(&(kind.to_string(), seq))
            .and_then(|v| v.first())
        {
            return Some(*t);
        }
        let left = until.checked_duration_since(Instant::now())?;
        let (k, s, t) = tokio::time::timeout(left, rx.recv()).await.ok()??;
        if k == "lagged" {
            arrivals.lagged += s as u64;
        } else {
            arrivals.at.entry((k, s)).or_default().push(t);
        }
    }
}

struct WeftRun {
    latency: Vec<Duration>,
    /// The bare-gossipsub baselines (anonymous, signed), measured in
    /// blocks interleaved with Weft's.
    bare: [Vec<Duration>; 2],
    /// Per block, for each baseline: Weft p50 / bare p50.
    block_ratios: [Vec<f64>; 2],
    call_time: Vec<Duration>,
    tput: Option<Throughput>,
}

struct Throughput {
    sent: usize,
    send_errors: usize,
    send_seconds: f64,
    received_once: usize,
    duplicates: usize,
    missing: usize,
    lagged: u64,
    drain_seconds: f64,
    latency: Vec<Duration>,
    stored: usize,
    stored_duplicates: usize,
}

/// Blocks of messages alternating Weft and the bare baseline, so drift and
/// other load on the machine hit both alike.
const BLOCKS: usize = 10;

async fn weft_run(plan: &Plan, baselines: &mut [BareApp; 2]) -> WeftRun {
    let alice = start_node("alice", None).await;
    let alice_addr = listen_addr(&alice.handle).await;
    let boot: Multiaddr = format!("{alice_addr}/p2p/{}", alice.handle.peer_id())
        .parse()
        .unwrap();
    let bob = start_node("bob", Some(boot)).await;
    add_contact(&alice.handle, &bob.handle, "bob").await;
    add_contact(&bob.handle, &alice.handle, "alice").await;
    let mut rx = listen(bob.handle.events());
    let mut arrivals = Arrivals::default();

    // Warm up until a message goes out on gossip to a subscribed bob
    // ("sent", not "queued") and arrives; then a few more.
    let deadline = Instant::now() + DEADLINE;
    let mut warm = 0;
    let mut steady = 0;
    while steady < 20 {
        let reply: SendView = alice
            .handle
            .request(send_request(text("warm", warm)))
            .await
            .unwrap();
        let got = next_arrival(
            &mut rx,
            &mut arrivals,
            "warm",
            warm,
            Instant::now() + Duration::from_secs(2),
        )
        .await;
        if got.is_some() && reply.status == "sent" {
            steady += 1;
        }
        warm += 1;
        assert!(
            Instant::now() < deadline,
            "alice and bob never reached a steady state"
        );
    }

    let mut latency = Vec::with_capacity(plan.latency_messages);
    let mut call_time = Vec::with_capacity(plan.latency_messages);
    let mut bare: [Vec<Duration>; 2] = Default::default();
    let mut block_ratios: [Vec<f64>; 2] = Default::default();
    let per_block = plan.latency_messages.div_ceil(BLOCKS);
    for block in 0..BLOCKS {
        let seqs = block * per_block..((block + 1) * per_block).min(plan.latency_messages);
        let mut weft_block = Vec::with_capacity(seqs.len());
        let mut bare_blocks: [Vec<Duration>; 2] = Default::default();
        if block % 2 == 1 {
            for (app, out) in baselines.iter_mut().zip(bare_blocks.iter_mut()) {
                *out = app.measure(seqs.clone()).await;
            }
        }
        for i in seqs.clone() {
            let t0 = Instant::now();
            alice
                .handle
                .call(send_request(text("lat", i)))
                .await
                .unwrap();
            call_time.push(t0.elapsed());
            let t = next_arrival(&mut rx, &mut arrivals, "lat", i, Instant::now() + DEADLINE)
                .await
                .unwrap_or_else(|| panic!("message {i} never arrived"));
            weft_block.push(t - t0);
        }
        if block % 2 == 0 {
            for (app, out) in baselines.iter_mut().zip(bare_blocks.iter_mut()).rev() {
                *out = app.measure(seqs.clone()).await;
            }
        }
        if !weft_block.is_empty() {
            let w = stats(weft_block.clone()).p50.as_secs_f64();
            for (k, bare_block) in bare_blocks.iter().enumerate() {
                let b = stats(bare_block.clone()).p50.as_secs_f64().max(1e-9);
                block_ratios[k].push(w / b);
            }
        }
        latency.extend(weft_block);
        for (all, block) in bare.iter_mut().zip(bare_blocks) {
            all.extend(block);
        }
    }

    let tput = if plan.rate > 0 {
        Some(throughput(plan, &alice.handle, &bob.handle, &mut rx, &mut arrivals).await)
    } else {
        None
    };

    alice.node.shutdown().await.unwrap();
    bob.node.shutdown().await.unwrap();
    WeftRun {
        latency,
        bare,
        block_ratios,
        call_time,
        tput,
    }
}

async fn throughput(
    plan: &Plan,
    alice: &NodeHandle,
    bob: &NodeHandle,
    rx: &mut mpsc::UnboundedReceiver<(String, usize, Instant)>,
    arrivals: &mut Arrivals,
) -> Throughput {
    let total = (plan.rate as f64 * plan.seconds).round() as usize;
    let lagged_before = arrivals.lagged;
    let mut sends = tokio::task::JoinSet::new();
    let mut started = vec![Instant::now(); total];
    let start = Instant::now();
    let mut sent = 0;
    while sent < total {
        let due = ((start.elapsed().as_secs_f64() * plan.rate as f64) as usize + 1).min(total);
        while sent < due {
            let h = alice.clone();
            let req = send_request(text("tput", sent));
            started[sent] = Instant::now();
            sends.spawn(async move { h.call(req).await.is_ok() });
            sent += 1;
        }
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
    let send_seconds = start.elapsed().as_secs_f64();
    let mut send_errors = 0;
    while let Some(ok) = sends.join_next().await {
        if !ok.unwrap_or(false) {
            send_errors += 1;
        }
    }
    // Collect arrivals until all are in, or nothing new for 10 s.
    let mut have = (0..total)
        .filter(|i| arrivals.at.contains_key(&("tput".into(), *i)))
        .count();
    while have < total {
        match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
            Ok(Some((k, s, t))) => {
                if k == "lagged" {
                    arrivals.lagged += s as u64;
                } else {
                    let first = !arrivals.at.contains_key(&(k.clone(), s));
                    arrivals.at.entry((k.clone(), s)).or_default().push(t);
                    if first && k == "tput" {
                        have += 1;
                    }
                }
            }
            _ => break,
        }
    }
    let drain_seconds = start.elapsed().as_secs_f64();
    // Late duplicates: give them a moment to show up.
    tokio::time::sleep(Duration::from_millis(500)).await;
    while let Ok((k, s, t)) = rx.try_recv() {
        if k == "lagged" {
            arrivals.lagged += s as u64;
        } else {
            arrivals.at.entry((k, s)).or_default().push(t);
        }
    }
    let mut received_once = 0;
    let mut duplicates = 0;
    let mut missing = 0;
    let mut latency = Vec::with_capacity(total);
    for (i, t0) in started.iter().enumerate() {
        match arrivals.at.get(&("tput".into(), i)) {
            Some(v) => {
                received_once += 1;
                duplicates += v.len() - 1;
                latency.push(v[0] - *t0);
            }
            None => missing += 1,
        }
    }
    // Cross-check with what bob stored.
    let stored_msgs: Vec<MessageView> = bob
        .request(Request::Messages {
            target: "alice".into(),
            limit: Some(10_000),
            before: None,
        })
        .await
        .unwrap();
    let mut seen = HashMap::new();
    for m in &stored_msgs {
        if let Some(seq) = seq_of(&m.text, "tput") {
            *seen.entry(seq).or_insert(0usize) += 1;
        }
    }
    Throughput {
        sent: total,
        send_errors,
        send_seconds,
        received_once,
        duplicates,
        missing,
        lagged: arrivals.lagged - lagged_before,
        drain_seconds,
        latency,
        stored: seen.len(),
        stored_duplicates: seen.values().map(|n| n - 1).sum(),
    }
}

// ---------------------------------------------------- bare gossipsub --

/// How the bare baseline authenticates messages.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Authenticity {
    /// Weft's own gossipsub settings: no gossipsub signature (Weft's
    /// envelope carries the device's signature instead).
    Anonymous,
    /// libp2p gossipsub as it ships: every message signed with the
    /// publisher's ed25519 peer key and verified by the receiver
    /// (`MessageAuthenticity::Signed`, `ValidationMode::Strict`).
    Signed,
}

fn bare_swarm(auth: Authenticity) -> Swarm<gossipsub::Behaviour> {
    // Weft's gossipsub settings (net/behaviour.rs) but for authenticity, and
    // without application validation.
    let mode = match auth {
        Authenticity::Anonymous => gossipsub::ValidationMode::Anonymous,
        Authenticity::Signed => gossipsub::ValidationMode::Strict,
    };
    let config = gossipsub::ConfigBuilder::default()
        .validation_mode(mode)
        .message_id_fn(|m: &gossipsub::Message| {
            gossipsub::MessageId::from(&blake3::hash(&m.data).as_bytes()[..20])
        })
        .heartbeat_interval(Duration::from_millis(700))
        .build()
        .unwrap();
    libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .unwrap()
        .with_behaviour(|key| {
            let authenticity = match auth {
                Authenticity::Anonymous => MessageAuthenticity::Anonymous,
                Authenticity::Signed => MessageAuthenticity::Signed(key.clone()),
            };
            gossipsub::Behaviour::new(authenticity, config).unwrap()
        })
        .unwrap()
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(3600)))
        .build()
}

async fn wait_for(rx: &mut mpsc::UnboundedReceiver<(usize, Instant)>, seq: usize) -> Instant {
    loop {
        let (s, t) = tokio::time::timeout(DEADLINE, rx.recv())
            .await
            .unwrap()
            .unwrap();
        if s == seq {
            return t;
        }
    }
}

/// Alice's side of a bare run: publishes what she is handed; says when bob
/// is subscribed.
async fn publisher(
    mut alice: Swarm<gossipsub::Behaviour>,
    topic: IdentTopic,
    mut publish_rx: mpsc::UnboundedReceiver<Vec<u8>>,
    ready_tx: tokio::sync::oneshot::Sender<()>,
) {
    let mut ready = Some(ready_tx);
    loop {
        tokio::select! {
            data = publish_rx.recv() => match data {
                Some(data) => {
                    if let Err(e) = alice.behaviour_mut().publish(topic.clone(), data) {
                        eprintln!("bare publish failed: {e}");
                    }
                }
                None => return,
            },
            ev = alice.select_next_some() => {
                if let SwarmEvent::Behaviour(gossipsub::Event::Subscribed { .. }) = ev
                    && let Some(r) = ready.take()
                {
                    let _ = r.send(());
                }
            }
        }
    }
}

async fn bare_run(n: usize) -> Vec<Duration> {
    let topic = IdentTopic::new("weft-bench");
    let mut bob = bare_swarm(Authenticity::Anonymous);
    let mut alice = bare_swarm(Authenticity::Anonymous);
    bob.behaviour_mut().subscribe(&topic).unwrap();
    alice.behaviour_mut().subscribe(&topic).unwrap();
    bob.listen_on("/ip4/127.0.0.1/tcp/0".parse().unwrap())
        .unwrap();
    let bob_addr = loop {
        if let SwarmEvent::NewListenAddr { address, .. } = bob.select_next_some().await {
            break address;
        }
    };
    alice.dial(bob_addr).unwrap();

    // bob: report every message's seq and arrival time.
    let (arrive_tx, mut arrive_rx) = mpsc::unbounded_channel();
    let bob_task = tokio::spawn(async move {
        loop {
            if let SwarmEvent::Behaviour(gossipsub::Event::Message { message, .. }) =
                bob.select_next_some().await
                && let Some(seq) = std::str::from_utf8(&message.data)
                    .ok()
                    .and_then(|t| seq_of(t, "lat"))
            {
                let _ = arrive_tx.send((seq, Instant::now()));
            }
        }
    });
    // alice: publish what she is handed; say when bob is subscribed.
    let (publish_tx, publish_rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let alice_task = tokio::spawn(publisher(alice, topic, publish_rx, ready_tx));
    tokio::time::timeout(DEADLINE, ready_rx)
        .await
        .unwrap()
        .unwrap();

    // Warm-up with distinct payloads (ids are content hashes).
    for i in 0..20 {
        publish_tx
            .send(text("lat", 1_000_000 + i).into_bytes())
            .unwrap();
        wait_for(&mut arrive_rx, 1_000_000 + i).await;
    }
    let mut latency = Vec::with_capacity(n);
    for i in 0..n {
        let t0 = Instant::now();
        publish_tx.send(text("lat", i).into_bytes()).unwrap();
        let t = wait_for(&mut arrive_rx, i).await;
        latency.push(t - t0);
    }
    drop(publish_tx);
    let _ = alice_task.await;
    bob_task.abort();
    latency
}

/// Waits for `seq` on a channel of sequence numbers; the arrival time is
/// taken here, in the caller's task.
async fn wait_seq(rx: &mut mpsc::UnboundedReceiver<usize>, seq: usize) -> Instant {
    loop {
        let got = tokio::time::timeout(DEADLINE, rx.recv())
            .await
            .unwrap()
            .unwrap();
        if got == seq {
            return Instant::now();
        }
    }
}

/// Bare gossipsub used the way a node uses it: each swarm driven by its own
/// thread (as each Weft node has one), alice's publishes handed over a
/// channel from the bench task, bob's messages handed back over a channel
/// and timed in the bench task, exactly where Weft's `Event::Message` is
/// timed. Same transport, same payloads, no storage, no crypto of its own.
struct BareApp {
    publish_tx: mpsc::UnboundedSender<Vec<u8>>,
    arrive_rx: mpsc::UnboundedReceiver<usize>,
    stop_tx: Option<tokio::sync::oneshot::Sender<()>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl BareApp {
    /// Latency of messages `seqs`, one at a time.
    async fn measure(&mut self, seqs: std::ops::Range<usize>) -> Vec<Duration> {
        let mut latency = Vec::with_capacity(seqs.len());
        for i in seqs {
            let t0 = Instant::now();
            self.publish_tx.send(text("lat", i).into_bytes()).unwrap();
            let t = wait_seq(&mut self.arrive_rx, i).await;
            latency.push(t - t0);
        }
        latency
    }

    fn stop(mut self) {
        drop(self.publish_tx);
        if let Some(stop) = self.stop_tx.take() {
            let _ = stop.send(());
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

async fn bare_app_start(auth: Authenticity) -> BareApp {
    let topic = IdentTopic::new("weft-bench-app");
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (arrive_tx, arrive_rx) = mpsc::unbounded_channel::<usize>();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let bob_topic = topic.clone();
    let bob_thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut bob = bare_swarm(auth);
            bob.behaviour_mut().subscribe(&bob_topic).unwrap();
            bob.listen_on("/ip4/127.0.0.1/tcp/0".parse().unwrap()).unwrap();
            let mut stop = stop_rx;
            loop {
                tokio::select! {
                    _ = &mut stop => return,
                    ev = bob.select_next_some() => match ev {
                        SwarmEvent::NewListenAddr { address, .. } => {
                            let _ = addr_tx.send(address);
                        }
                        SwarmEvent::Behaviour(gossipsub::Event::Message { message, .. }) => {
                            if let Some(seq) = std::str::from_utf8(&message.data).ok().and_then(|t| seq_of(t, "lat")) {
                                let _ = arrive_tx.send(seq);
                            }
                        }
                        _ => {}
                    },
                }
            }
        });
    });
    let bob_addr: Multiaddr = addr_rx.recv_timeout(DEADLINE).unwrap();
    let (publish_tx, publish_rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let alice_thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut alice = bare_swarm(auth);
            alice.behaviour_mut().subscribe(&topic).unwrap();
            alice.dial(bob_addr).unwrap();
            publisher(alice, topic, publish_rx, ready_tx).await;
        });
    });
    tokio::time::timeout(DEADLINE, ready_rx)
        .await
        .unwrap()
        .unwrap();
    let mut app = BareApp {
        publish_tx,
        arrive_rx,
        stop_tx: Some(stop_tx),
        threads: vec![alice_thread, bob_thread],
    };
    // Warm-up with distinct payloads (ids are content hashes).
    app.measure(1_000_000..1_000_020).await;
    app
}

// ------------------------------------------------- durability floor --

/// One SQLite commit as the store makes them (WAL, `synchronous=FULL`, on
/// the same disk as the node homes): one ~400-byte row per transaction.
/// Not a target; it shows what two durable commits per message cost here.
fn sqlite_commit_floor(n: usize) -> Vec<Duration> {
    let dir = tempfile::Builder::new()
        .prefix("weft-bench-sqlite-")
        .tempdir()
        .unwrap();
    let conn = rusqlite::Connection::open(dir.path().join("floor.db")).unwrap();
    let mode: String = conn
        .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    conn.execute_batch(
        "PRAGMA synchronous=FULL; CREATE TABLE t (id INTEGER PRIMARY KEY, body BLOB NOT NULL);",
    )
    .unwrap();
    let body = vec![7u8; 400];
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        conn.execute_batch("BEGIN").unwrap();
        conn.execute("INSERT INTO t (body) VALUES (?1)", [&body])
            .unwrap();
        conn.execute_batch("COMMIT").unwrap();
        out.push(t0.elapsed());
    }
    out
}

// ------------------------------------------------------------ main --

fn main() {
    let benchmarking = std::env::args().any(|a| a == "--bench");
    let plan = if benchmarking {
        Plan {
            latency_messages: 1_000,
            rate: 2_000,
            seconds: 3.0,
        }
    } else {
        Plan {
            latency_messages: 10,
            rate: 200,
            seconds: 0.25,
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let floor = stats(sqlite_commit_floor(plan.latency_messages));
    if !benchmarking {
        println!("smoke test (no --bench): a few messages, not a measurement; use cargo bench");
    }
    rt.block_on(async {
        let bare = bare_run(plan.latency_messages).await;
        let mut baselines = [
            bare_app_start(Authenticity::Anonymous).await,
            bare_app_start(Authenticity::Signed).await,
        ];
        let weft = weft_run(&plan, &mut baselines).await;
        for app in baselines {
            app.stop();
        }

        println!(
            "network bench: 200-byte messages, alice -> bob over loopback TCP + noise + yamux"
        );
        let b_swarm = stats(bare);
        let [anonymous, signed] = weft.bare.clone().map(stats);
        let w = stats(weft.latency.clone());
        let c = stats(weft.call_time.clone());
        print_stats("bare gossipsub, anonymous, timed inside the swarm tasks", plan.latency_messages, &b_swarm);
        print_stats("bare gossipsub, anonymous (Weft's settings), node threads", plan.latency_messages, &anonymous);
        print_stats("bare gossipsub, signed (libp2p's default), node threads", plan.latency_messages, &signed);
        print_stats("weft send->bob Event::Message ", plan.latency_messages, &w);
        print_stats(
            "  of which alice's call (seal+commit) ",
            plan.latency_messages,
            &c,
        );
        let names = [
            "anonymous (stricter reference)",
            "signed (the target's baseline)",
        ];
        for (name, ratios) in names.iter().zip(&weft.block_ratios).rev() {
            let mut ratios = ratios.clone();
            ratios.sort_by(f64::total_cmp);
            let ratio = ratios.get(ratios.len() / 2).copied().unwrap_or(f64::NAN);
            println!(
                "ratio weft p50 / bare {name} p50 = {ratio:.2}, median of {} interleaved blocks (range {:.2}..{:.2}; target <= 3.00: {})",
                ratios.len(),
                ratios.first().copied().unwrap_or(f64::NAN),
                ratios.last().copied().unwrap_or(f64::NAN),
                verdict(ratio <= 3.0)
            );
        }
        println!(
            "ratio weft p50 / bare-inside-swarm p50 = {:.2} (no task boundary at either end)",
            w.p50.as_secs_f64() / b_swarm.p50.as_secs_f64().max(1e-9)
        );
        print_stats("floor: one SQLite WAL commit, synchronous=FULL", plan.latency_messages, &floor);
        let durable = anonymous.p50 + floor.p50 * 2;
        println!(
            "ratio weft p50 / (bare p50 + 2 x commit p50) = {:.2} (not a target: the overhead beyond two durable commits)",
            w.p50.as_secs_f64() / durable.as_secs_f64().max(1e-9)
        );
        for (name, b) in [("anonymous", &anonymous), ("signed", &signed)] {
            let ratio99 = w.p99.as_secs_f64() / b.p99.as_secs_f64().max(1e-9);
            println!("ratio weft p99 / bare {name} p99 = {ratio99:.2}");
        }
        println!(
            "weft p50 {:.3} ms (target < 3 ms: {})",
            ms(w.p50),
            verdict(w.p50 < Duration::from_millis(3))
        );
        println!(
            "weft p99 {:.3} ms (target < 15 ms: {})",
            ms(w.p99),
            verdict(w.p99 < Duration::from_millis(15))
        );
        if let Some(t) = weft.tput {
            let ok = t.missing == 0
                && t.duplicates == 0
                && t.send_errors == 0
                && t.stored == t.sent
                && t.stored_duplicates == 0;
            println!(
                "throughput: {} messages offered at {} msg/s over {:.2} s (achieved {:.0} msg/s); \
                 all arrived by {:.2} s",
                t.sent,
                plan.rate,
                t.send_seconds,
                t.sent as f64 / t.send_seconds,
                t.drain_seconds
            );
            println!(
                "throughput: received once {}, duplicates {}, missing {}, send errors {}, \
                 event lag {}, bob's store {} distinct ({} duplicate)",
                t.received_once,
                t.duplicates,
                t.missing,
                t.send_errors,
                t.lagged,
                t.stored,
                t.stored_duplicates
            );
            print_stats(
                "throughput latency under load",
                t.latency.len(),
                &stats(t.latency),
            );
            println!(
                "throughput exactly-once at {} msg/s: {}",
                plan.rate,
                verdict(ok)
            );
        }
    });
}

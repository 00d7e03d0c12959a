//! Reliable delivery between real nodes on loopback TCP: catch-up, the
//! delivered-receipt round trip and the outbox flush.
//!
//! Every node is a real `Node` (seeded identity, temporary home on the
//! machine's disk, `NetConfig::loopback()`, default `Settings`); contacts
//! are made with `Request::Id` invites and `Request::ContactAdd`. Times are
//! taken in this process: from a `handle.call(..)` or `Node::start` to an
//! event from `handle.events()`, stamped by a task that does nothing but
//! listen.
//!
//! 1. **Catch-up** (target: 10,000 missed messages in < 2 s). alice, bob
//!    and carol; alice makes the group "trio" with both; one warm message
//!    reaches everyone. bob stops; alice sends 10,000 group messages (256
//!    `call`s in flight); carol has them all; alice stops. bob starts again
//!    on his old home with only carol's address. Timed from bob's
//!    `Event::Peer` (carol connected) until bob has shown all 10,000 as
//!    `Event::Message`, and until a request sent after that is answered
//!    (the engine answers after its batch's commit, so by then they are in
//!    bob's store). Checked at the end with `Messages`: exactly 10,000
//!    distinct ids, the ones alice sent.
//! 2. **Delivered receipt round trip** (target: p50 < 10 ms). alice and bob
//!    connected contacts; 50 warm-up messages; then 500 sent one at a time,
//!    each timed from `call(Send)` on alice to alice's `Event::Status` with
//!    status `delivered` for its id.
//! 3. **Outbox flush** (target: 10,000 queued messages flushed to a peer
//!    that comes online in < 3 s). bob stops; alice sends him 10,000
//!    (queued; 256 in flight); bob starts again on his old home with
//!    alice's address. Timed from the `Node::start` call until alice's
//!    `Status.outbox` (polled every 10 ms) is 0 and bob has shown all
//!    10,000 as `Event::Message`.
//!
//! Each prints the machine load (`/proc/loadavg`) at the start and a
//! PASS/FAIL line against its target. A wait that exceeds its deadline
//! (120 s) ends the measurement with an error, reported as such; the
//! process then exits non-zero.
//!
//! `cargo bench -p weft-node --bench delivery` (add `-- outbox`, `-- receipt`
//! or `-- catch-up` for one measurement; `WEFT_DELIVERY_N=2000` to change the
//! catch-up and outbox counts)
//!
//! Under `cargo test --benches` (no `--bench` argument) it runs with 200
//! messages (50 for the round trip), as a smoke test.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use futures::StreamExt;
use serde_json::Value;
use tokio::sync::{broadcast, mpsc};
use weft_node::api::{Event, Request};
use weft_node::home::Home;
use weft_node::identity::Identity;
use weft_node::{Multiaddr, NetConfig, Node, NodeConfig, NodeHandle};

/// The longest any single wait may take.
const DEADLINE: Duration = Duration::from_secs(120);
/// Concurrent `call(Send)`s when setting up a backlog.
const IN_FLIGHT: usize = 256;
const MESSAGE_BYTES: usize = 200;

struct Plan {
    catch_up: usize,
    receipt_warm: usize,
    receipt_sends: usize,
    outbox: usize,
}

/// `kind N` padded to 200 bytes.
fn text(kind: &str, seq: usize) -> String {
    let mut s = format!("{kind} {seq:08} ");
    while s.len() < MESSAGE_BYTES {
        s.push('x');
    }
    s
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn verdict(ok: bool) -> &'static str {
    if ok { "PASS" } else { "FAIL" }
}

/// Nearest-rank percentile of sorted values.
fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

async fn deadline<T>(what: &str, f: impl Future<Output = T>) -> Result<T> {
    tokio::time::timeout(DEADLINE, f)
        .await
        .map_err(|_| anyhow!("timed out after {} s: {what}", DEADLINE.as_secs()))
}

// ------------------------------------------------------------ nodes --

struct BenchNode {
    name: &'static str,
    node: Option<Node>,
    handle: NodeHandle,
    dir: tempfile::TempDir,
}

impl BenchNode {
    /// A new node with a seeded identity in a fresh temporary home.
    async fn create(name: &'static str, bootstrap: &[Multiaddr]) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("weft-bench-delivery-{name}-"))
            .tempdir()?;
        let home = Home::new(dir.path().join("home"));
        let identity = Identity::from_seed(format!("{name}/delivery-bench").as_bytes(), 0)?;
        home.init_with(&identity, name)?;
        Self::start(name, dir, bootstrap).await
    }

    /// Starts a node on an existing home.
    async fn start(
        name: &'static str,
        dir: tempfile::TempDir,
        bootstrap: &[Multiaddr],
    ) -> Result<Self> {
        let mut net = NetConfig::loopback();
        net.bootstrap = bootstrap.to_vec();
        let config = NodeConfig::new(dir.path().join("home"), Some(net));
        let node = deadline(&format!("{name}: Node::start"), Node::start(config))
            .await?
            .with_context(|| format!("{name}: Node::start"))?;
        let handle = node.handle();
        Ok(Self {
            name,
            node: Some(node),
            handle,
            dir,
        })
    }

    /// Stops the node; keeps its home for a restart.
    async fn stop(mut self) -> Result<tempfile::TempDir> {
        if let Some(node) = self.node.take() {
            deadline(&format!("{}: shutdown", self.name), node.shutdown())
                .await?
                .with_context(|| format!("{}: shutdown", self.name))?;
        }
        Ok(self.dir)
    }

    async fn call(&self, request: Request) -> Result<Value> {
        let what = format!("{}: {request:?}", self.name);
        deadline(&what, self.handle.call(request))
            .await?
            .map(|response| response.to_json())
            .map_err(|e| anyhow!("{what}: {e}"))
    }

    /// Where to dial this node: its listen address with /p2p/.
    async fn dial_addr(&self) -> Result<Multiaddr> {
        let until = Instant::now() + DEADLINE;
        loop {
            if let Some(a) = self.handle.listen_addrs().await.into_iter().next() {
                return Ok(format!("{a}/p2p/{}", self.handle.peer_id()).parse()?);
            }
            ensure!(Instant::now() < until, "{} never listened", self.name);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn add_contact(&self, other: &BenchNode) -> Result<()> {
        let id = other.call(Request::Id).await?;
        let invite = id["invite"]
            .as_str()
            .ok_or_else(|| anyhow!("no invite in {id}"))?
            .to_string();
        self.call(Request::ContactAdd {
            invite,
            name: Some(other.name.into()),
        })
        .await?;
        Ok(())
    }

    async fn outbox(&self) -> Result<u64> {
        let s = self.call(Request::Status).await?;
        s["outbox"]
            .as_u64()
            .ok_or_else(|| anyhow!("no outbox in {s}"))
    }

    /// Every message of `target`, oldest first, paged with `before`.
    async fn all_messages(&self, target: &str) -> Result<Vec<Value>> {
        let mut all: Vec<Value> = Vec::new();
        let mut before: Option<String> = None;
        loop {
            let page = self
                .call(Request::Messages {
                    target: target.into(),
                    limit: Some(10_000),
                    before: before.clone(),
                })
                .await?;
            let page = page.as_array().cloned().unwrap_or_default();
            if page.is_empty() {
                break;
            }
            before = page[0]["id"].as_str().map(str::to_string);
            let full = page.len() == 10_000;
            let mut page = page;
            page.append(&mut all);
            all = page;
            if !full || before.is_none() {
                break;
            }
        }
        Ok(all)
    }

    async fn wait_group(&self, group: &str) -> Result<()> {
        let until = Instant::now() + DEADLINE;
        loop {
            let groups = self.call(Request::GroupList).await?;
            if groups
                .as_array()
                .is_some_and(|gs| gs.iter().any(|g| g["name"] == group))
            {
                return Ok(());
            }
            ensure!(
                Instant::now() < until,
                "{} never joined {group} within {} s",
                self.name,
                DEADLINE.as_secs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn befriend(a: &BenchNode, b: &BenchNode) -> Result<()> {
    a.add_contact(b).await?;
    b.add_contact(a).await
}

fn send_request(target: &str, text: String) -> Request {
    Request::Send {
        target: target.into(),
        text,
        reply_to: None,
    }
}

fn id_of(reply: &Value) -> Result<String> {
    reply["id"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow!("no id in {reply}"))
}

/// Sends `n` messages `kind 0..n` to `target`, `IN_FLIGHT` calls at a
/// time. Returns their ids and how many replies said `queued`.
async fn send_many(
    node: &BenchNode,
    target: &str,
    kind: &str,
    n: usize,
) -> Result<(HashSet<String>, usize)> {
    let replies: Vec<Result<Value>> = futures::stream::iter(0..n)
        .map(|i| node.call(send_request(target, text(kind, i))))
        .buffer_unordered(IN_FLIGHT)
        .collect()
        .await;
    let mut ids = HashSet::with_capacity(n);
    let mut queued = 0;
    for r in replies {
        let r = r?;
        if r["status"] == "queued" {
            queued += 1;
        }
        ids.insert(id_of(&r)?);
    }
    ensure!(ids.len() == n, "{n} sends gave {} distinct ids", ids.len());
    Ok((ids, queued))
}

// ----------------------------------------------------------- events --

enum Seen {
    Event(Instant, Box<Event>),
    Lagged(u64),
}

/// Forwards a node's events, each stamped when it was received.
struct Listener {
    rx: mpsc::UnboundedReceiver<Seen>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn listen(mut events: broadcast::Receiver<Event>) -> Listener {
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        loop {
            let seen = match events.recv().await {
                Ok(ev) => Seen::Event(Instant::now(), Box::new(ev)),
                Err(broadcast::error::RecvError::Lagged(n)) => Seen::Lagged(n),
                Err(broadcast::error::RecvError::Closed) => return,
            };
            if tx.send(seen).is_err() {
                return;
            }
        }
    });
    Listener { rx, task }
}

impl Listener {
    /// The next event, or an error at `until`.
    async fn next(&mut self, until: Instant, what: &str) -> Result<Seen> {
        let left = until.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, self.rx.recv()).await {
            Ok(Some(seen)) => Ok(seen),
            Ok(None) => bail!("event stream ended waiting for {what}"),
            Err(_) => bail!("timed out waiting for {what}"),
        }
    }

    async fn wait_peer(&mut self, peer: &str, connected: bool, what: &str) -> Result<Instant> {
        let until = Instant::now() + DEADLINE;
        loop {
            if let Seen::Event(t, ev) = self.next(until, what).await?
                && let Event::Peer {
                    peer_id,
                    connected: c,
                } = *ev
                && peer_id == peer
                && c == connected
            {
                return Ok(t);
            }
        }
    }
}

/// What a receiver's event stream showed of a set of expected messages.
struct Arrivals {
    /// When the last of them was first shown.
    all_at: Instant,
    /// When the given peer's `Event::Peer { connected: true }` came.
    connected_at: Option<Instant>,
    /// Shown more than once (by id).
    duplicates: usize,
    lagged: u64,
    /// Events were skipped (lag): the time is from polling the store.
    from_store: bool,
}

/// How many of `ids` the node's store holds for `target`.
async fn stored_of(node: &BenchNode, target: &str, ids: &HashSet<String>) -> Result<usize> {
    let all = node.all_messages(target).await?;
    Ok(all
        .iter()
        .filter_map(|m| m["id"].as_str())
        .filter(|id| ids.contains(*id))
        .collect::<HashSet<_>>()
        .len())
}

/// Waits until every id of `ids` was shown as an `Event::Message` on
/// `node`; notes when `peer` connected. If the event stream lags, falls
/// back to polling the store every 50 ms.
async fn wait_arrivals(
    listener: &mut Listener,
    node: &BenchNode,
    target: &str,
    ids: &HashSet<String>,
    peer: Option<&str>,
) -> Result<Arrivals> {
    let until = Instant::now() + DEADLINE;
    let mut got: HashSet<String> = HashSet::with_capacity(ids.len());
    let mut out = Arrivals {
        all_at: Instant::now(),
        connected_at: None,
        duplicates: 0,
        lagged: 0,
        from_store: false,
    };
    while got.len() < ids.len() {
        let what = format!(
            "{}: all {} messages (have {})",
            node.name,
            ids.len(),
            got.len()
        );
        match listener.next(until, &what).await? {
            Seen::Lagged(n) => {
                out.lagged += n;
                out.from_store = true;
                break;
            }
            Seen::Event(t, ev) => match *ev {
                Event::Peer {
                    peer_id,
                    connected: true,
                } if Some(peer_id.as_str()) == peer => {
                    out.connected_at.get_or_insert(t);
                }
                Event::Message(m) if ids.contains(&m.id) => {
                    if got.insert(m.id) {
                        out.all_at = t;
                    } else {
                        out.duplicates += 1;
                    }
                }
                _ => {}
            },
        }
    }
    if out.from_store {
        loop {
            let have = stored_of(node, target, ids).await?;
            if have == ids.len() {
                out.all_at = Instant::now();
                break;
            }
            ensure!(
                Instant::now() < until,
                "{}: store has {have} of {} after {} s",
                node.name,
                ids.len(),
                DEADLINE.as_secs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(out)
}

/// Checks the node's store for `target`: every id of `ids` exactly once.
/// Returns (messages of the set, all messages in the conversation).
async fn check_store(
    node: &BenchNode,
    target: &str,
    ids: &HashSet<String>,
) -> Result<(usize, usize)> {
    let all = node.all_messages(target).await?;
    let mine: Vec<&str> = all
        .iter()
        .filter_map(|m| m["id"].as_str())
        .filter(|id| ids.contains(*id))
        .collect();
    let distinct: HashSet<&str> = mine.iter().copied().collect();
    ensure!(
        distinct.len() == ids.len() && mine.len() == ids.len(),
        "{}: store holds {} of the {} messages ({} rows)",
        node.name,
        distinct.len(),
        ids.len(),
        mine.len()
    );
    Ok((distinct.len(), all.len()))
}

/// After a failed wait: what the sender and receiver hold and see.
async fn diagnose(from: &BenchNode, to: &BenchNode, target: &str, ids: &HashSet<String>) -> String {
    let peers = |s: &Value| -> Vec<String> {
        s["peers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["peer_id"].as_str())
            .map(|p| p.chars().rev().take(6).collect::<String>())
            .collect()
    };
    let mut out = Vec::new();
    for node in [from, to] {
        match node.call(Request::Status).await {
            Ok(s) => out.push(format!(
                "{} (..{}) outbox {}, connected to {:?}",
                node.name,
                node.handle
                    .peer_id()
                    .to_string()
                    .chars()
                    .rev()
                    .take(6)
                    .collect::<String>(),
                s["outbox"],
                peers(&s)
            )),
            Err(e) => out.push(format!("{}: status failed: {e:#}", node.name)),
        }
    }
    match stored_of(to, target, ids).await {
        Ok(n) => out.push(format!("{}'s store holds {n} of {}", to.name, ids.len())),
        Err(e) => out.push(format!("{}: messages failed: {e:#}", to.name)),
    }
    out.join("; ")
}

// -------------------------------------------------------- 1. catch-up --

struct CatchUp {
    n: usize,
    load: String,
    setup: Duration,
    start_call: Duration,
    start_to_connect: Option<Duration>,
    connect_to_shown: Option<Duration>,
    connect_to_stored: Option<Duration>,
    start_to_stored: Duration,
    arrivals: Arrivals,
    late_duplicates: usize,
    stored: usize,
    conversation_total: usize,
}

async fn catch_up(n: usize) -> Result<CatchUp> {
    println!("[1] catch-up: setting up (load {})", loadavg());
    let setup_start = Instant::now();
    let alice = BenchNode::create("alice", &[]).await?;
    let alice_addr = alice.dial_addr().await?;
    let bob = BenchNode::create("bob", std::slice::from_ref(&alice_addr)).await?;
    let bob_addr = bob.dial_addr().await?;
    let carol = BenchNode::create("carol", &[alice_addr, bob_addr]).await?;
    let carol_addr = carol.dial_addr().await?;
    befriend(&alice, &bob).await?;
    befriend(&alice, &carol).await?;
    let mut bob_ev = listen(bob.handle.events());
    let mut carol_ev = listen(carol.handle.events());
    alice
        .call(Request::GroupCreate {
            name: "trio".into(),
            members: vec!["bob".into(), "carol".into()],
        })
        .await?;
    bob.wait_group("trio").await?;
    carol.wait_group("trio").await?;
    // One warm message that everyone has (alice's key goes out with it).
    let hello = id_of(&alice.call(send_request("trio", text("hello", 0))).await?)?;
    let hello: HashSet<String> = [hello].into();
    wait_arrivals(&mut bob_ev, &bob, "trio", &hello, None).await?;
    wait_arrivals(&mut carol_ev, &carol, "trio", &hello, None).await?;
    drop(bob_ev);

    // bob goes away; once alice has noticed, she writes to the group.
    let mut alice_ev = listen(alice.handle.events());
    let bob_peer = bob.handle.peer_id().to_string();
    let carol_peer = carol.handle.peer_id().to_string();
    let bob_dir = bob.stop().await?;
    alice_ev
        .wait_peer(&bob_peer, false, "alice to see bob disconnect")
        .await?;
    drop(alice_ev);
    let (ids, _) = send_many(&alice, "trio", "missed", n).await?;
    let carol_got = wait_arrivals(&mut carol_ev, &carol, "trio", &ids, None).await?;
    check_store(&carol, "trio", &ids).await?;
    drop(carol_ev);
    alice.stop().await?;
    let setup = setup_start.elapsed();
    println!(
        "[1] setup done in {:.1} s (carol had all {n}; her event lag {})",
        setup.as_secs_f64(),
        carol_got.lagged
    );

    // bob returns, knowing only carol's address.
    let load = loadavg();
    println!("[1] catch-up: measuring (load {load})");
    let t_call = Instant::now();
    let bob = BenchNode::start("bob", bob_dir, std::slice::from_ref(&carol_addr)).await?;
    let t_started = Instant::now();
    let mut bob_ev = listen(bob.handle.events());
    let arrivals = match wait_arrivals(&mut bob_ev, &bob, "trio", &ids, Some(&carol_peer)).await {
        Ok(a) => a,
        Err(e) => bail!(
            "{e:#}; then: {}",
            diagnose(&carol, &bob, "trio", &ids).await
        ),
    };
    // Answered after the commit of the batch that stored the last one.
    bob.call(Request::Messages {
        target: "trio".into(),
        limit: Some(1),
        before: None,
    })
    .await?;
    let t_stored = Instant::now();
    // Late duplicates, if any.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut late_duplicates = 0;
    while let Ok(seen) = bob_ev.rx.try_recv() {
        if let Seen::Event(_, ev) = seen
            && let Event::Message(m) = *ev
            && ids.contains(&m.id)
        {
            late_duplicates += 1;
        }
    }
    let (stored, conversation_total) = check_store(&bob, "trio", &ids).await?;
    drop(bob_ev);
    bob.stop().await?;
    carol.stop().await?;
    let connected = arrivals.connected_at;
    Ok(CatchUp {
        n,
        load,
        setup,
        start_call: t_started - t_call,
        start_to_connect: connected.map(|c| c - t_started),
        connect_to_shown: connected.map(|c| arrivals.all_at - c),
        connect_to_stored: connected.map(|c| t_stored - c),
        start_to_stored: t_stored - t_started,
        arrivals,
        late_duplicates,
        stored,
        conversation_total,
    })
}

fn report_catch_up(r: &CatchUp) {
    let opt = |d: Option<Duration>| d.map_or("n/a".to_string(), |d| format!("{:.1} ms", ms(d)));
    println!(
        "[1] catch-up of {} missed group messages, bob <- carol (alice offline), load at start {}",
        r.n, r.load
    );
    println!(
        "[1]   Node::start took {:.1} ms; start returned -> carol connected {}",
        ms(r.start_call),
        opt(r.start_to_connect)
    );
    println!(
        "[1]   connected -> all {} shown (Event::Message) {}; -> all in bob's store {}; \
         start returned -> in store {:.1} ms",
        r.n,
        opt(r.connect_to_shown),
        opt(r.connect_to_stored),
        ms(r.start_to_stored)
    );
    println!(
        "[1]   duplicates shown {} (+{} late), event lag {}{}; bob's store: {} distinct of the {} \
         ({} messages in the group incl. the warm-up)",
        r.arrivals.duplicates,
        r.late_duplicates,
        r.arrivals.lagged,
        if r.arrivals.from_store {
            " (timed by polling the store)"
        } else {
            ""
        },
        r.stored,
        r.n,
        r.conversation_total
    );
    println!("[1]   (setup: {:.1} s, not timed)", r.setup.as_secs_f64());
    let (from, measured) = match r.connect_to_stored {
        Some(d) => ("connected", d),
        None => ("start returned (no connect event seen)", r.start_to_stored),
    };
    let ok = measured < Duration::from_secs(2) && r.stored == r.n;
    println!(
        "[1] catch-up {} messages: {from} -> all stored {:.3} s (target < 2 s{}): {}",
        r.n,
        measured.as_secs_f64(),
        if r.n == 10_000 {
            ""
        } else {
            ", set for 10,000"
        },
        verdict(ok)
    );
}

// ------------------------------------------- 2. delivered round trip --

struct RoundTrip {
    load: String,
    rtt: Vec<Duration>,
    call: Vec<Duration>,
}

/// Waits for alice's `delivered` status for `id`; other ids' times are
/// kept in `seen`.
async fn wait_delivered(
    listener: &mut Listener,
    seen: &mut HashMap<String, Instant>,
    id: &str,
) -> Result<Instant> {
    let until = Instant::now() + DEADLINE;
    loop {
        if let Some(t) = seen.get(id) {
            return Ok(*t);
        }
        match listener
            .next(until, &format!("alice: delivered for {id}"))
            .await?
        {
            Seen::Lagged(n) => bail!("alice's event stream lagged by {n}"),
            Seen::Event(t, ev) => {
                if let Event::Status {
                    id: got, status, ..
                } = *ev
                    && status == "delivered"
                {
                    seen.entry(got).or_insert(t);
                }
            }
        }
    }
}

async fn round_trip(warm: usize, n: usize) -> Result<RoundTrip> {
    println!("[2] receipt round trip: setting up (load {})", loadavg());
    let alice = BenchNode::create("alice", &[]).await?;
    let alice_addr = alice.dial_addr().await?;
    let bob = BenchNode::create("bob", &[alice_addr]).await?;
    befriend(&alice, &bob).await?;
    let mut alice_ev = listen(alice.handle.events());
    let mut seen = HashMap::new();
    for i in 0..warm {
        let id = id_of(&alice.call(send_request("bob", text("warm", i))).await?)?;
        wait_delivered(&mut alice_ev, &mut seen, &id).await?;
    }
    let load = loadavg();
    println!("[2] receipt round trip: measuring (load {load})");
    let mut rtt = Vec::with_capacity(n);
    let mut call = Vec::with_capacity(n);
    for i in 0..n {
        let t0 = Instant::now();
        let reply = alice.call(send_request("bob", text("rtt", i))).await?;
        call.push(t0.elapsed());
        let id = id_of(&reply)?;
        let t = wait_delivered(&mut alice_ev, &mut seen, &id).await?;
        rtt.push(t.saturating_duration_since(t0));
    }
    drop(alice_ev);
    bob.stop().await?;
    alice.stop().await?;
    Ok(RoundTrip { load, rtt, call })
}

fn report_round_trip(r: &RoundTrip) {
    let mut rtt = r.rtt.clone();
    rtt.sort();
    let mut call = r.call.clone();
    call.sort();
    let mean = rtt.iter().sum::<Duration>() / rtt.len().max(1) as u32;
    println!(
        "[2] delivered receipt round trip, alice -> bob -> alice, {} sequential sends, load at start {}",
        rtt.len(),
        r.load
    );
    println!(
        "[2]   send -> Status delivered: p50 {:.3} ms, p90 {:.3} ms, p99 {:.3} ms, mean {:.3} ms, max {:.3} ms",
        ms(pct(&rtt, 50.0)),
        ms(pct(&rtt, 90.0)),
        ms(pct(&rtt, 99.0)),
        ms(mean),
        ms(rtt.last().copied().unwrap_or_default())
    );
    println!(
        "[2]   of which alice's call (seal + commit): p50 {:.3} ms, p99 {:.3} ms",
        ms(pct(&call, 50.0)),
        ms(pct(&call, 99.0))
    );
    let p50 = pct(&rtt, 50.0);
    println!(
        "[2] receipt round trip p50 {:.3} ms (target < 10 ms): {}",
        ms(p50),
        verdict(p50 < Duration::from_millis(10))
    );
}

// ---------------------------------------------------- 3. outbox flush --

struct Flush {
    n: usize,
    load: String,
    queued_replies: usize,
    outbox_before: u64,
    start_call: Duration,
    /// From the `Node::start` call.
    alice_saw_connect: Option<Duration>,
    outbox_empty: Duration,
    bob_all: Duration,
    bob_stored: Duration,
    all_delivered: Option<Duration>,
    /// Distinct `delivered` status events alice showed, and her event lag.
    delivered_seen: usize,
    alice_lagged: u64,
    arrivals: Arrivals,
    stored: usize,
    polls: usize,
    /// alice's copies by status at the end.
    statuses: Vec<(String, usize)>,
}

/// What alice's events showed during the flush.
struct AliceSide {
    connected: Option<Instant>,
    delivered: HashSet<String>,
    all_delivered: Option<Instant>,
    lagged: u64,
}

impl AliceSide {
    fn drain(&mut self, alice_ev: &mut Listener, bob_peer: &str, ids: &HashSet<String>) {
        while let Ok(seen) = alice_ev.rx.try_recv() {
            match seen {
                Seen::Lagged(n) => self.lagged += n,
                Seen::Event(t, ev) => match *ev {
                    Event::Peer {
                        peer_id,
                        connected: true,
                    } if peer_id == bob_peer => {
                        self.connected.get_or_insert(t);
                    }
                    Event::Status { id, status, .. }
                        if status == "delivered" && ids.contains(&id) =>
                    {
                        self.delivered.insert(id);
                        if self.delivered.len() == ids.len() {
                            self.all_delivered.get_or_insert(t);
                        }
                    }
                    _ => {}
                },
            }
        }
    }
}

async fn outbox_flush(n: usize) -> Result<Flush> {
    println!("[3] outbox flush: setting up (load {})", loadavg());
    let alice = BenchNode::create("alice", &[]).await?;
    let alice_addr = alice.dial_addr().await?;
    let bob = BenchNode::create("bob", std::slice::from_ref(&alice_addr)).await?;
    befriend(&alice, &bob).await?;
    let mut alice_ev = listen(alice.handle.events());
    let mut seen = HashMap::new();
    // A warm message, delivered, so the conversation and alice's key exist.
    let id = id_of(&alice.call(send_request("bob", text("warm", 0))).await?)?;
    wait_delivered(&mut alice_ev, &mut seen, &id).await?;
    let until = Instant::now() + DEADLINE;
    while alice.outbox().await? != 0 {
        ensure!(
            Instant::now() < until,
            "alice's outbox never emptied after the warm-up"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let bob_peer = bob.handle.peer_id().to_string();
    let bob_dir = bob.stop().await?;
    alice_ev
        .wait_peer(&bob_peer, false, "alice to see bob disconnect")
        .await?;
    let (ids, queued_replies) = send_many(&alice, "bob", "queued", n).await?;
    let outbox_before = alice.outbox().await?;
    // Forget the status events of the sends (all `queued`).
    while alice_ev.rx.try_recv().is_ok() {}

    let load = loadavg();
    println!(
        "[3] outbox flush: measuring (load {load}); alice's outbox holds {outbox_before}, \
         {queued_replies} of {n} sends replied queued"
    );
    let t_call = Instant::now();
    let bob = BenchNode::start("bob", bob_dir, std::slice::from_ref(&alice_addr)).await?;
    let t_started = Instant::now();
    let mut bob_ev = listen(bob.handle.events());

    // alice: poll the outbox every 10 ms until it is empty; meanwhile note
    // from her events when bob connected and when all were delivered.
    let poll_alice = async {
        let until = Instant::now() + DEADLINE;
        let mut polls = 0;
        let mut side = AliceSide {
            connected: None,
            delivered: HashSet::with_capacity(n),
            all_delivered: None,
            lagged: 0,
        };
        let empty_at = loop {
            let left = alice.outbox().await?;
            polls += 1;
            let t = Instant::now();
            side.drain(&mut alice_ev, &bob_peer, &ids);
            if left == 0 {
                break t;
            }
            ensure!(
                Instant::now() < until,
                "alice's outbox still holds {left} after {} s",
                DEADLINE.as_secs()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        // Delivered receipts may still be on their way: up to 30 s more.
        let more = Instant::now() + Duration::from_secs(30);
        while side.all_delivered.is_none() && Instant::now() < more {
            tokio::time::sleep(Duration::from_millis(10)).await;
            side.drain(&mut alice_ev, &bob_peer, &ids);
        }
        anyhow::Ok((empty_at, side, polls))
    };
    let wait_bob = async {
        let arrivals = wait_arrivals(&mut bob_ev, &bob, "alice", &ids, None).await?;
        bob.call(Request::Messages {
            target: "alice".into(),
            limit: Some(1),
            before: None,
        })
        .await?;
        anyhow::Ok((arrivals, Instant::now()))
    };
    let (a, b) = tokio::join!(poll_alice, wait_bob);
    let (a, b) = match (a, b) {
        (Ok(a), Ok(b)) => (a, b),
        (a, b) => {
            let why: Vec<String> = [a.err(), b.err()]
                .into_iter()
                .flatten()
                .map(|e| format!("{e:#}"))
                .collect();
            bail!(
                "{}; then: {}",
                why.join("; "),
                diagnose(&alice, &bob, "alice", &ids).await
            );
        }
    };
    let (empty_at, side, polls) = a;
    let (arrivals, stored_at) = b;
    let (stored, _) = check_store(&bob, "alice", &ids).await?;
    // How alice's copies ended up (delivered receipts may lag the outbox).
    let mut statuses: HashMap<String, usize> = HashMap::new();
    for m in alice.all_messages("bob").await? {
        if m["id"].as_str().is_some_and(|id| ids.contains(id)) {
            *statuses
                .entry(m["status"].as_str().unwrap_or("?").to_string())
                .or_default() += 1;
        }
    }
    let mut statuses: Vec<(String, usize)> = statuses.into_iter().collect();
    statuses.sort();
    drop(bob_ev);
    bob.stop().await?;
    alice.stop().await?;
    Ok(Flush {
        n,
        load,
        queued_replies,
        outbox_before,
        start_call: t_started - t_call,
        alice_saw_connect: side.connected.map(|c| c - t_call),
        outbox_empty: empty_at - t_call,
        bob_all: arrivals.all_at - t_call,
        bob_stored: stored_at - t_call,
        all_delivered: side.all_delivered.map(|d| d - t_call),
        delivered_seen: side.delivered.len(),
        alice_lagged: side.lagged,
        arrivals,
        stored,
        polls,
        statuses,
    })
}

fn report_flush(r: &Flush) {
    let opt = |d: Option<Duration>| d.map_or("n/a".to_string(), |d| format!("{:.1} ms", ms(d)));
    println!(
        "[3] outbox flush of {} queued direct messages to bob coming online, load at start {}",
        r.n, r.load
    );
    println!(
        "[3]   before: alice's outbox {}, {} of {} sends replied queued",
        r.outbox_before, r.queued_replies, r.n
    );
    println!(
        "[3]   from the Node::start call: start returned {:.1} ms; alice saw bob connect {}; \
         bob showed all {:.1} ms; in bob's store {:.1} ms; alice's outbox 0 at {:.1} ms \
         ({} polls); all delivered on alice {}",
        ms(r.start_call),
        opt(r.alice_saw_connect),
        ms(r.bob_all),
        ms(r.bob_stored),
        ms(r.outbox_empty),
        r.polls,
        opt(r.all_delivered)
    );
    println!(
        "[3]   duplicates shown {}, event lag {}{}; bob's store: {} distinct of the {}",
        r.arrivals.duplicates,
        r.arrivals.lagged,
        if r.arrivals.from_store {
            " (timed by polling the store)"
        } else {
            ""
        },
        r.stored,
        r.n
    );
    println!(
        "[3]   alice's events: {} distinct `delivered` statuses (event lag {}); \
         her copies at the end, by status: {:?}",
        r.delivered_seen, r.alice_lagged, r.statuses
    );
    let done = r.outbox_empty.max(r.bob_stored);
    let ok = done < Duration::from_secs(3) && r.stored == r.n;
    println!(
        "[3] outbox flush {} messages: start -> outbox 0 and all stored {:.3} s (target < 3 s{}): {}",
        r.n,
        done.as_secs_f64(),
        if r.n == 10_000 {
            ""
        } else {
            ", set for 10,000"
        },
        verdict(ok)
    );
}

// ------------------------------------------------------------- main --

fn main() {
    let benchmarking = std::env::args().any(|a| a == "--bench");
    let plan = if benchmarking {
        Plan {
            catch_up: 10_000,
            receipt_warm: 50,
            receipt_sends: 500,
            outbox: 10_000,
        }
    } else {
        Plan {
            catch_up: 200,
            receipt_warm: 10,
            receipt_sends: 50,
            outbox: 200,
        }
    };
    // WEFT_DELIVERY_N overrides the catch-up and outbox counts.
    let mut plan = plan;
    if let Some(n) = std::env::var("WEFT_DELIVERY_N")
        .ok()
        .and_then(|n| n.parse().ok())
    {
        plan.catch_up = n;
        plan.outbox = n;
        println!("WEFT_DELIVERY_N={n}: catch-up and outbox with {n} messages");
    }
    if !benchmarking {
        println!("smoke test (no --bench): small counts, not a measurement; use cargo bench");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // `cargo bench --bench delivery -- outbox` runs only the measurements
    // whose names contain one of the words given.
    let only: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let run = |name: &str| only.is_empty() || only.iter().any(|o| name.contains(o.as_str()));
    let mut errors = Vec::new();
    rt.block_on(async {
        if run("catch-up") {
            match catch_up(plan.catch_up).await {
                Ok(r) => report_catch_up(&r),
                Err(e) => {
                    println!("[1] catch-up: FAIL, did not complete: {e:#}");
                    errors.push(format!("catch-up: {e:#}"));
                }
            }
        }
        if run("receipt") {
            match round_trip(plan.receipt_warm, plan.receipt_sends).await {
                Ok(r) => report_round_trip(&r),
                Err(e) => {
                    println!("[2] receipt round trip: FAIL, did not complete: {e:#}");
                    errors.push(format!("receipt round trip: {e:#}"));
                }
            }
        }
        if run("outbox") {
            match outbox_flush(plan.outbox).await {
                Ok(r) => report_flush(&r),
                Err(e) => {
                    println!("[3] outbox flush: FAIL, did not complete: {e:#}");
                    errors.push(format!("outbox flush: {e:#}"));
                }
            }
        }
    });
    if !errors.is_empty() {
        eprintln!(
            "delivery bench: {} measurement(s) did not complete:",
            errors.len()
        );
        for e in &errors {
            eprintln!("  {e}");
        }
        std::process::exit(1);
    }
}

//! One run: starts the scenario's nodes (the real `weft_node::Node`, each
//! on its own engine thread) in this process, connects them, makes the
//! contacts and conversations, runs the seeded workload, records every
//! arrival and how late the runtime's timers fire, stops the nodes and
//! writes the report.
//!
//! The network each node runs on is made in one place, [`net_config`]:
//! today libp2p's in-process memory transport (no link model); the
//! simulated transport with link delays plugs in there.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};
use tokio::time::Instant;
use weft_node::api::{Event, GroupView, IdView, Request, SendView};
use weft_node::home::Home;
use weft_node::identity::Identity;
use weft_node::{Multiaddr, NetConfig, Node, NodeConfig, NodeHandle};

use crate::SimError;
use crate::report::{self, Arrivals, RunFacts, SentMessage, Summary};
use crate::scenario::{ConversationKind, Scenario};

/// How long setup steps (a group reaching its members) may take.
const SETUP_DEADLINE: Duration = Duration::from_secs(60);
/// Peers each node is given to bootstrap from (earlier nodes, at random).
const BOOTSTRAP_PEERS: usize = 3;

/// What the command line adds to a scenario.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub out: PathBuf,
    /// Overrides the scenario's seed.
    pub seed: Option<u64>,
    /// A progress line on stderr every second.
    pub progress: bool,
}

/// The seam where a node's network is made: its transport, listen address
/// and bootstrap peers. `index` is the node's place in the run.
pub fn net_config(index: usize, port: u64, bootstrap: Vec<Multiaddr>) -> NetConfig {
    let _ = index;
    let mut net = NetConfig::memory(port);
    net.bootstrap = bootstrap;
    net.mdns = false;
    net
}

/// The name of the transport [`net_config`] uses, for the summary.
const TRANSPORT: &str = "memory";

/// A memory-transport port base no other process of this machine is
/// likely to use (memory ports are per process, but tests may run several
/// runs in one process).
static NEXT_PORT: AtomicU64 = AtomicU64::new(1);

fn next_port() -> u64 {
    NEXT_PORT.fetch_add(1, Ordering::Relaxed) + 100_000 * u64::from(std::process::id() % 10_000)
}

struct SimNode {
    name: String,
    node: Node,
    handle: NodeHandle,
    addr: Multiaddr,
}

/// A conversation of the plan: who is in it, and the name each member
/// sends to (the other's alias for a direct one, the group's name).
#[derive(Clone, Debug)]
struct PlannedConversation {
    kind: ConversationKind,
    /// The creator first for a group.
    members: Vec<usize>,
    group_name: Option<String>,
}

impl PlannedConversation {
    fn target_for(&self, sender: usize, names: &[String]) -> String {
        match &self.group_name {
            Some(g) => g.clone(),
            None => {
                let other = self.members.iter().find(|m| **m != sender).copied();
                names[other.unwrap_or(sender)].clone()
            }
        }
    }
}

fn plan_conversations(scenario: &Scenario, rng: &mut StdRng) -> Vec<PlannedConversation> {
    let n = scenario.nodes.accounts;
    let mut pairs: Vec<(usize, usize)> = (0..n)
        .flat_map(|a| ((a + 1)..n).map(move |b| (a, b)))
        .collect();
    pairs.shuffle(rng);
    let mut pairs = pairs.into_iter();
    let mut out = Vec::new();
    let mut groups = 0;
    for c in &scenario.conversations {
        for _ in 0..c.count {
            match (c.kind, c.size) {
                (ConversationKind::Group, Some(size)) => {
                    let mut all: Vec<usize> = (0..n).collect();
                    all.shuffle(rng);
                    all.truncate(size);
                    out.push(PlannedConversation {
                        kind: c.kind,
                        members: all,
                        group_name: Some(format!("g{groups}")),
                    });
                    groups += 1;
                }
                _ => {
                    if let Some((a, b)) = pairs.next() {
                        out.push(PlannedConversation {
                            kind: ConversationKind::Direct,
                            members: vec![a, b],
                            group_name: None,
                        });
                    }
                }
            }
        }
    }
    out
}

/// One planned send: when (ms after the workload began), who, where.
#[derive(Clone, Debug)]
struct PlannedSend {
    at_ms: f64,
    sender: usize,
    conversation: usize,
}

fn plan_workload(
    scenario: &Scenario,
    convs: &[PlannedConversation],
    rng: &mut StdRng,
) -> Vec<PlannedSend> {
    let mut of_sender: HashMap<usize, Vec<usize>> = HashMap::new();
    for (i, c) in convs.iter().enumerate() {
        for m in &c.members {
            of_sender.entry(*m).or_default().push(i);
        }
    }
    let period_ms = 1000.0 / scenario.workload.messages_per_sec;
    let end_ms = scenario.duration_secs as f64 * 1000.0;
    let mut senders: Vec<usize> = of_sender.keys().copied().collect();
    senders.sort_unstable();
    let mut out = Vec::new();
    for s in senders {
        let mine = &of_sender[&s];
        let mut at = rng.random_range(0.0..period_ms);
        while at < end_ms {
            let conversation = mine[rng.random_range(0..mine.len())];
            out.push(PlannedSend {
                at_ms: at,
                sender: s,
                conversation,
            });
            at += period_ms;
        }
    }
    out.sort_by(|a, b| a.at_ms.total_cmp(&b.at_ms));
    out
}

fn node_err(node: &str, e: impl std::fmt::Display) -> SimError {
    SimError::Node {
        node: node.to_string(),
        message: e.to_string(),
    }
}

async fn start_node(
    index: usize,
    name: &str,
    seed: u64,
    root: &std::path::Path,
    bootstrap: Vec<Multiaddr>,
) -> Result<SimNode, SimError> {
    let home = Home::new(root.join(name));
    let identity = Identity::from_seed(format!("{name}/{seed}").as_bytes(), 0)
        .map_err(|e| node_err(name, e))?;
    home.init_with(&identity, name)
        .map_err(|e| node_err(name, e))?;
    let port = next_port();
    let net = net_config(index, port, bootstrap);
    let config = NodeConfig::new(root.join(name), Some(net));
    let node = Node::start(config).await.map_err(|e| node_err(name, e))?;
    let handle = node.handle();
    let addr: Multiaddr = format!("/memory/{port}/p2p/{}", handle.peer_id())
        .parse()
        .map_err(|e| node_err(name, e))?;
    Ok(SimNode {
        name: name.to_string(),
        node,
        handle,
        addr,
    })
}

async fn call(node: &SimNode, request: Request) -> Result<weft_node::api::Response, SimError> {
    let what = format!("{request:?}");
    node.handle
        .call(request)
        .await
        .map_err(|e| node_err(&node.name, format!("{what}: {e}")))
}

/// What the event recorders share.
#[derive(Default)]
struct Recorder {
    arrivals: Arrivals,
    lagged: u64,
}

/// Runs `scenario` and writes its report to `options.out`.
pub async fn run(
    label: &str,
    scenario: &Scenario,
    options: &RunOptions,
) -> Result<Summary, SimError> {
    let wall = Instant::now();
    let seed = options.seed.unwrap_or(scenario.seed);
    let mut rng = StdRng::seed_from_u64(seed);
    let n = scenario.nodes.accounts;
    let names: Vec<String> = (0..n).map(|i| format!("n{i}")).collect();
    let convs = plan_conversations(scenario, &mut rng);
    let plan = plan_workload(scenario, &convs, &mut rng);

    let root = tempfile::Builder::new()
        .prefix("weft-sim-")
        .tempdir()
        .map_err(|e| SimError::io("a temporary directory for the nodes' homes", e))?;
    progress(options, format!("starting {n} nodes"));
    let mut nodes: Vec<SimNode> = Vec::with_capacity(n);
    for (i, name) in names.iter().enumerate() {
        let mut earlier: Vec<Multiaddr> = nodes.iter().map(|s| s.addr.clone()).collect();
        earlier.shuffle(&mut rng);
        earlier.truncate(BOOTSTRAP_PEERS);
        nodes.push(start_node(i, name, seed, root.path(), earlier).await?);
    }

    // Events are recorded from the start; only the workload's ids count.
    let recorder = Arc::new(Mutex::new(Recorder::default()));
    let t0 = Arc::new(Mutex::new(None::<Instant>));
    let mut recorders = Vec::new();
    for (i, s) in nodes.iter().enumerate() {
        let mut events = s.handle.events();
        let handle = s.handle.clone();
        let recorder = recorder.clone();
        let t0 = t0.clone();
        let read_receipts = scenario.workload.read_receipts;
        recorders.push(tokio::spawn(async move {
            use tokio::sync::broadcast::error::RecvError;
            loop {
                match events.recv().await {
                    Ok(Event::Message(m)) if !m.outgoing => {
                        let now = Instant::now();
                        let start = *lock(&t0);
                        if let Some(start) = start {
                            let ms = now.duration_since(start).as_secs_f64() * 1000.0;
                            lock(&recorder)
                                .arrivals
                                .entry(m.id.clone())
                                .or_default()
                                .entry(i)
                                .or_default()
                                .push(ms);
                            if read_receipts {
                                let handle = handle.clone();
                                tokio::spawn(async move {
                                    let _ = handle
                                        .call(Request::Read {
                                            target: m.conversation,
                                        })
                                        .await;
                                });
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(RecvError::Lagged(k)) => lock(&recorder).lagged += k,
                    Err(RecvError::Closed) => break,
                }
            }
        }));
    }

    progress(options, "contacts and conversations".to_string());
    setup_conversations(&nodes, &names, &convs).await?;
    let setup_secs = wall.elapsed().as_secs_f64();

    // The scheduling-lag probe: a 10 ms timer, and how late it fires.
    let stop = Arc::new(tokio::sync::Notify::new());
    let probe = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut lags = Vec::new();
            let period = Duration::from_millis(10);
            let mut next = Instant::now() + period;
            loop {
                tokio::select! {
                    () = stop.notified() => break,
                    () = tokio::time::sleep_until(next) => {
                        let now = Instant::now();
                        lags.push(now.duration_since(next).as_secs_f64() * 1000.0);
                        next = now.max(next) + period;
                    }
                }
            }
            lags
        })
    };

    // The workload.
    let start = Instant::now();
    *lock(&t0) = Some(start);
    let sent: Arc<Mutex<Vec<SentMessage>>> = Arc::default();
    let send_errors = Arc::new(AtomicU64::new(0));
    let mut sends = tokio::task::JoinSet::new();
    let expected_total: usize = plan
        .iter()
        .map(|p| convs[p.conversation].members.len() - 1)
        .sum();
    let mut ticker = Progress {
        options,
        start,
        duration_ms: scenario.duration_secs as f64 * 1000.0,
        expected_total,
        last: start,
    };
    let text_len = scenario.workload.message_bytes;
    for (k, p) in plan.iter().enumerate() {
        let due = start + Duration::from_secs_f64(p.at_ms / 1000.0);
        loop {
            tokio::time::sleep_until(due.min(ticker.next())).await;
            ticker.report_if_due(&sent, &recorder);
            if Instant::now() >= due {
                break;
            }
        }
        let conv = &convs[p.conversation];
        let handle = nodes[p.sender].handle.clone();
        let target = conv.target_for(p.sender, &names);
        let recipients: Vec<usize> = conv
            .members
            .iter()
            .copied()
            .filter(|m| *m != p.sender)
            .collect();
        let mut text = format!("m{k} ");
        while text.len() < text_len {
            text.push('x');
        }
        text.truncate(text_len);
        let sender = p.sender;
        let sent = sent.clone();
        let send_errors = send_errors.clone();
        sends.spawn(async move {
            let sent_ms = start.elapsed().as_secs_f64() * 1000.0;
            let answer = handle
                .request::<SendView>(Request::Send {
                    target,
                    text,
                    reply_to: None,
                })
                .await;
            match answer {
                Ok(view) => lock(&sent).push(SentMessage {
                    id: view.id,
                    conversation: view.conversation,
                    sender,
                    sent_ms,
                    recipients,
                }),
                Err(e) => {
                    tracing::warn!("send from n{sender} failed: {e}");
                    send_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    while sends.join_next().await.is_some() {}
    let workload_end = start + Duration::from_secs(scenario.duration_secs);
    tokio::time::sleep_until(workload_end).await;

    // Drain: until every recipient has every message, or the deadline.
    let drain_deadline = Instant::now() + Duration::from_secs(scenario.drain_secs);
    loop {
        let (delivered, expected) = counts(&sent, &recorder);
        if delivered >= expected || Instant::now() >= drain_deadline {
            break;
        }
        ticker.report_if_due(&sent, &recorder);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ticker.report(&sent, &recorder);
    stop.notify_one();
    let lag_ms = probe.await.unwrap_or_default();

    progress(options, "stopping the nodes".to_string());
    for s in nodes {
        let name = s.name.clone();
        if let Err(e) = s.node.shutdown().await {
            tracing::warn!("{name}: shutdown: {e}");
        }
    }
    for r in recorders {
        r.abort();
    }
    let mut sent = std::mem::take(&mut *lock(&sent));
    // In the order the sends were issued (they answer in any order).
    sent.sort_by(|a, b| a.sent_ms.total_cmp(&b.sent_ms));
    let recorder = std::mem::take(&mut *lock(&recorder));
    let facts = RunFacts {
        scenario: label.to_string(),
        seed,
        nodes: n,
        transport: TRANSPORT.to_string(),
        send_errors: usize::try_from(send_errors.load(Ordering::Relaxed)).unwrap_or(usize::MAX),
        lag_ms,
        events_lagged: recorder.lagged,
        duration_secs: scenario.duration_secs,
        wall_secs: wall.elapsed().as_secs_f64(),
        setup_secs,
    };
    let summary = report::summarize(facts, &sent, &recorder.arrivals);
    report::write(&options.out, &summary, &names, &sent, &recorder.arrivals)?;
    drop(root);
    Ok(summary)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn counts(sent: &Mutex<Vec<SentMessage>>, recorder: &Mutex<Recorder>) -> (usize, usize) {
    let sent = lock(sent);
    let rec = lock(recorder);
    let d = report::delivery(&sent, &rec.arrivals);
    (d.delivered, d.expected)
}

fn progress(options: &RunOptions, line: String) {
    if options.progress {
        eprintln!("weft-sim: {line}");
    }
}

/// The progress line on stderr, once a second.
struct Progress<'a> {
    options: &'a RunOptions,
    start: Instant,
    duration_ms: f64,
    expected_total: usize,
    last: Instant,
}

impl Progress<'_> {
    /// When the next line is due.
    fn next(&self) -> Instant {
        self.last + Duration::from_secs(1)
    }

    fn report_if_due(&mut self, sent: &Mutex<Vec<SentMessage>>, recorder: &Mutex<Recorder>) {
        if Instant::now() < self.next() {
            return;
        }
        self.last = Instant::now();
        self.report(sent, recorder);
    }

    fn report(&self, sent: &Mutex<Vec<SentMessage>>, recorder: &Mutex<Recorder>) {
        if !self.options.progress {
            return;
        }
        let (delivered, expected) = counts(sent, recorder);
        let messages = lock(sent).len();
        eprintln!(
            "weft-sim: t={:.1}s/{:.0}s sent {messages} delivered {delivered}/{expected} (planned {})",
            self.start.elapsed().as_secs_f64(),
            self.duration_ms / 1000.0,
            self.expected_total,
        );
    }
}

/// Contacts (both ways) for every direct pair and every group creator
/// with its members, then the groups, waiting until each member holds
/// its group.
async fn setup_conversations(
    nodes: &[SimNode],
    names: &[String],
    convs: &[PlannedConversation],
) -> Result<(), SimError> {
    let mut invites = Vec::with_capacity(nodes.len());
    for s in nodes {
        let id: IdView = s
            .handle
            .request(Request::Id)
            .await
            .map_err(|e| node_err(&s.name, e))?;
        invites.push(id.invite);
    }
    let mut pairs = BTreeSet::new();
    for c in convs {
        match c.kind {
            ConversationKind::Direct => {
                pairs.insert((
                    c.members[0].min(c.members[1]),
                    c.members[0].max(c.members[1]),
                ));
            }
            ConversationKind::Group => {
                let creator = c.members[0];
                for m in &c.members[1..] {
                    pairs.insert((creator.min(*m), creator.max(*m)));
                }
            }
        }
    }
    for (a, b) in pairs {
        for (x, y) in [(a, b), (b, a)] {
            call(
                &nodes[x],
                Request::ContactAdd {
                    invite: invites[y].clone(),
                    name: Some(names[y].clone()),
                },
            )
            .await?;
        }
    }
    for c in convs {
        if let Some(group) = &c.group_name {
            let creator = c.members[0];
            call(
                &nodes[creator],
                Request::GroupCreate {
                    name: group.clone(),
                    members: c.members[1..].iter().map(|m| names[*m].clone()).collect(),
                },
            )
            .await?;
        }
    }
    // Every member holds its groups before the workload begins.
    let deadline = Instant::now() + SETUP_DEADLINE;
    for c in convs {
        let Some(group) = &c.group_name else { continue };
        for m in &c.members {
            loop {
                let groups: Vec<GroupView> = nodes[*m]
                    .handle
                    .request(Request::GroupList)
                    .await
                    .map_err(|e| node_err(&names[*m], e))?;
                if groups
                    .iter()
                    .any(|g| &g.name == group && g.members == c.members.len())
                {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(SimError::Timeout(format!(
                        "group {group} did not reach {} within {SETUP_DEADLINE:?}",
                        names[*m]
                    )));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_plan_is_seeded() {
        let (_, s) = crate::load_scenario("lan-10").unwrap();
        let plan = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            let convs = plan_conversations(&s, &mut rng);
            let work = plan_workload(&s, &convs, &mut rng);
            (
                convs.iter().map(|c| c.members.clone()).collect::<Vec<_>>(),
                work.iter()
                    .map(|p| (p.sender, p.conversation, p.at_ms.to_bits()))
                    .collect::<Vec<_>>(),
            )
        };
        assert_eq!(plan(1), plan(1));
        assert_ne!(plan(1), plan(2));
        let (convs, work) = plan(1);
        assert_eq!(convs.len(), 5);
        assert_eq!(convs[4].len(), 5);
        assert!(!work.is_empty());
    }
}

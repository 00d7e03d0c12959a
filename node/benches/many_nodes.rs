//! Many real nodes in one process on the memory transport: what idling
//! and a light workload cost, to size a simulation (issue 16's time
//! decision: can 2 cores keep 1,000 nodes on real time?).
//!
//! For each N (default 50, 100, 200, 400; `WEFT_MANY_NODES=50,1000` to
//! choose) a child process starts N nodes, each bootstrapping to up to 3
//! earlier ones and a contact of the next one, lets them settle 3 s, then
//! measures a window of `WEFT_MANY_SECS` (default 20) s idle and one with
//! each node sending one message to its contact every 10 s: process RSS,
//! CPU % of one core (from /proc/self/stat), threads, and how late a
//! probe timer ticking every 10 ms on its own thread ran (p50/p99/max):
//! the scheduling lag a simulation on this machine would suffer.
//!
//! Measured 2026-12-08 on 2 cores, 20 s windows (idle / one message per
//! node per 10 s): N=50 413 MB, 35/38 % CPU; N=100 1.07 GB, 62/60 %;
//! N=200 1.40 GB, 64/64 %; N=400 2.06 GB, 75/84 %; N=1000 4.0 GB,
//! 105/106 % (of one core), 2 threads per node, probe lag p50 1.1 ms,
//! p99 2.2-3.2 ms, max 4-12 ms throughout. N=1000 on the simulated
//! transport: 4.0 GB, 120/128 %, lag p99 2.6/3.1 ms, max 12/15 ms.
//!
//! `cargo bench -p weft-node --bench many_nodes` (`WEFT_MANY_SIM=1`: on
//! the simulated transport instead, 20 ms latency and 5 ms jitter)

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use weft_node::api::Request;
use weft_node::home::Home;
use weft_node::identity::Identity;
use weft_node::{NetConfig, Node, NodeConfig, NodeHandle};
use weft_proto::sim_transport::{LinkParams, LinkTable, SimNetwork};
use weft_proto::transport::TransportKind;

/// A field of /proc/self/status, as a number (kB for sizes).
fn status(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// User + system CPU time of this process, in seconds (100 ticks/s).
fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0
}

/// Lateness of a 10 ms ticker on its own thread, in microseconds.
#[derive(Clone, Default)]
struct Probe(Arc<Mutex<Vec<u64>>>);

impl Probe {
    fn start() -> Self {
        let probe = Self::default();
        let samples = probe.0.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .unwrap();
            rt.block_on(async move {
                let mut next = tokio::time::Instant::now();
                loop {
                    next += Duration::from_millis(10);
                    tokio::time::sleep_until(next).await;
                    let late = tokio::time::Instant::now().saturating_duration_since(next);
                    samples.lock().unwrap().push(late.as_micros() as u64);
                    // Late ticks are not made up for.
                    next = next.max(tokio::time::Instant::now() - Duration::from_millis(1));
                }
            });
        });
        probe
    }

    fn take(&self) -> Vec<u64> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

/// One window's figures, as a table row.
async fn window(n: usize, what: &str, secs: u64, probe: &Probe, sent: &Arc<Mutex<u64>>) -> String {
    let _ = probe.take();
    let sent_before = *sent.lock().unwrap();
    let (t0, c0) = (Instant::now(), cpu_secs());
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let (wall, cpu) = (t0.elapsed().as_secs_f64(), cpu_secs() - c0);
    let mut lat = probe.take();
    lat.sort_unstable();
    let rss = status("VmRSS") as f64 / 1024.0;
    format!(
        "| {n:>5} | {what:<8} | {rss:>8.0} | {:>6.1} | {:>6.0} | {:>7} | {:>6.2} | {:>6.2} | {:>7.1} | {:>5} |",
        rss / n as f64,
        100.0 * cpu / wall,
        status("Threads"),
        pct(&lat, 0.5),
        pct(&lat, 0.99),
        pct(&lat, 1.0),
        *sent.lock().unwrap() - sent_before,
    )
}

const HEADER: &str =
    "|     N | phase    | RSS (MB) | MB/node | CPU %  | threads | lag p50 ms | p99 | max | sends |";

/// The child: N nodes, two windows, rows on stdout.
fn one(n: usize, secs: u64) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let probe = Probe::start();
        let dir = tempfile::Builder::new()
            .prefix("weft-bench-many-")
            .tempdir()
            .unwrap();
        let started = Instant::now();
        let mut nodes: Vec<Node> = Vec::new();
        let mut handles: Vec<NodeHandle> = Vec::new();
        let mut addrs: Vec<weft_node::Multiaddr> = Vec::new();
        // `WEFT_MANY_SIM=1`: the simulated transport, 20 ms + up to 5 ms.
        let sim = std::env::var("WEFT_MANY_SIM").is_ok().then(|| {
            let link = LinkParams {
                jitter: Duration::from_millis(5),
                ..LinkParams::latency(Duration::from_millis(20))
            };
            SimNetwork::new(1, Arc::new(LinkTable::new(link)))
        });
        for i in 0..n {
            let home_dir = dir.path().join(format!("n{i}"));
            let home = Home::new(home_dir.clone());
            let identity = Identity::from_seed(format!("many/{i}").as_bytes(), 0).unwrap();
            home.init_with(&identity, &format!("n{i}")).unwrap();
            let port = 20_000 + i as u64;
            let mut net = NetConfig::memory(port);
            if let Some(sim) = &sim {
                net.transport = TransportKind::Simulated(sim.clone());
            }
            let mut boot = vec![i.wrapping_sub(1), i / 2, (i * 7919) % n.max(1)];
            boot.sort_unstable();
            boot.dedup();
            net.bootstrap = boot
                .into_iter()
                .filter(|&j| j < i)
                .map(|j: usize| addrs[j].clone())
                .collect();
            let node = Node::start(NodeConfig::new(home_dir, Some(net)))
                .await
                .unwrap();
            let handle = node.handle();
            addrs.push(
                format!("/memory/{port}/p2p/{}", handle.peer_id())
                    .parse::<weft_node::Multiaddr>()
                    .unwrap(),
            );
            handles.push(handle);
            nodes.push(node);
        }
        eprintln!("N={n}: started in {:.1} s", started.elapsed().as_secs_f64());
        // Node i's contact is node i+1 (and so i-1 too).
        for i in 0..n {
            let j = (i + 1) % n;
            if i < j || n > 2 {
                common::befriend(&handles[i], &format!("n{i}"), &handles[j], &format!("n{j}"))
                    .await
                    .unwrap();
            }
        }
        eprintln!(
            "N={n}: contacts in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        tokio::time::sleep(Duration::from_secs(3)).await;
        let sent = Arc::new(Mutex::new(0u64));
        println!("{}", window(n, "idle", secs, &probe, &sent).await);
        for (i, h) in handles.iter().enumerate() {
            let h = h.clone();
            let sent = sent.clone();
            let target = format!("n{}", (i + 1) % n);
            let offset = Duration::from_millis((10_000 * i / n) as u64);
            tokio::spawn(async move {
                tokio::time::sleep(offset).await;
                let mut every = tokio::time::interval(Duration::from_secs(10));
                loop {
                    every.tick().await;
                    let request = Request::Send {
                        target: target.clone(),
                        text: "hello".into(),
                        reply_to: None,
                    };
                    if h.call(request).await.is_ok() {
                        *sent.lock().unwrap() += 1;
                    }
                }
            });
        }
        println!("{}", window(n, "1 msg/10s", secs, &probe, &sent).await);
        // Exit without shutting N nodes down one by one.
        std::process::exit(0);
    });
}

fn main() {
    let benchmarking = std::env::args().any(|a| a == "--bench");
    if let Ok(n) = std::env::var("WEFT_MANY_ONE") {
        let secs = std::env::var("WEFT_MANY_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(20);
        one(n.parse().unwrap(), secs);
        return;
    }
    let (ns, secs) = if benchmarking {
        let ns = std::env::var("WEFT_MANY_NODES").unwrap_or_else(|_| "50,100,200,400".into());
        let secs = std::env::var("WEFT_MANY_SECS").unwrap_or_else(|_| "20".into());
        (ns, secs)
    } else {
        println!("smoke test (no --bench): 4 nodes, 1 s windows; use cargo bench");
        ("4".into(), "1".into())
    };
    println!(
        "many nodes in one process, memory transport, {} cores; CPU % of one core",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("{HEADER}");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for n in ns.split(',') {
        let out = Command::new(std::env::current_exe().unwrap())
            .env("WEFT_MANY_ONE", n.trim())
            .env("WEFT_MANY_SECS", &secs)
            .output()
            .unwrap();
        print!("{}", String::from_utf8_lossy(&out.stdout));
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let tail: Vec<&str> = err.lines().rev().take(5).collect();
            println!("| {n} | failed: {} |", tail.join(" / "));
        }
    }
}

//! Long conversations in a real node (issue 4 targets).
//!
//! 1. **Open and page** (target: < 50 ms): alice's direct conversation
//!    with bob holds 100,000 messages (written into her store while her
//!    node is stopped, as a long history would be); her node starts, and
//!    `Messages { limit: 50 }` (the latest page, with reactions) is timed,
//!    the first call and then 20 more.
//! 2. **Apply 10,000 remote changes** (target: < 1 s): alice sends bob
//!    100 messages; alice stops; bob makes 10,000 reactions (100 per
//!    message, each its own `Annotate` envelope). bob's envelopes are taken
//!    from his store and handed to a fresh, offline copy of alice (same
//!    keys, history restored from her store) with `NodeHandle::deliver`
//!    in batches of 512: verify, open, check, apply, materialise, commit.
//!    Timed over the deliveries; checked: alice shows all 10,000.
//!
//! `cargo bench -p weft-node --bench history`; under `cargo test
//! --benches` it runs small (10,000 messages, 1,000 changes).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use common::{DEADLINE, befriend, call, dial_addr, stored_message};
use weft_node::api::Request;
use weft_node::home::Home;
use weft_node::identity::Identity;
use weft_node::ids::{ConversationId, UserId};
use weft_node::store::Store;
use weft_node::{Multiaddr, NetConfig, Node, NodeConfig};

fn identity(name: &str) -> Identity {
    Identity::from_seed(format!("{name}/history-bench").as_bytes(), 0).unwrap()
}

fn home_dir(name: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix(&format!("weft-bench-history-{name}-"))
        .tempdir()
        .unwrap();
    Home::new(dir.path().join("home"))
        .init_with(&identity(name), name)
        .unwrap();
    dir
}

async fn start(dir: &tempfile::TempDir, net: bool, bootstrap: &[Multiaddr]) -> Result<Node> {
    let net = net.then(|| {
        let mut n = NetConfig::loopback();
        n.bootstrap = bootstrap.to_vec();
        n
    });
    Ok(Node::start(NodeConfig::new(dir.path().join("home"), net)).await?)
}

fn page(target: &str, limit: usize) -> Request {
    Request::Messages {
        target: target.into(),
        limit: Some(limit),
        before: None,
    }
}

async fn open_and_page(n: usize) -> Result<(Duration, Duration)> {
    let alice_dir = home_dir("alice");
    let bob_dir = home_dir("bob");
    let alice = start(&alice_dir, true, &[]).await?;
    let bob = start(&bob_dir, true, &[]).await?;
    befriend(&alice.handle(), "alice", &bob.handle(), "bob").await?;
    alice.shutdown().await?;
    bob.shutdown().await?;
    // A long history, written straight into alice's store.
    let (me, other) = (identity("alice"), identity("bob"));
    let conv = ConversationId::direct(&me.user_id(), &other.user_id());
    let mut store = Store::open(&alice_dir.path().join("home").join("weft.db"))?;
    let txn = store.transaction()?;
    let start_ms = 1_700_000_000_000i64;
    for i in 0..n as u64 {
        let mine = i % 2 == 0;
        let (user, device): (UserId, _) = if mine {
            (me.user_id(), me.device_id())
        } else {
            (other.user_id(), other.device_id())
        };
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&i.to_be_bytes());
        let at = start_ms + i as i64 * 60_000;
        txn.db().insert_message(&stored_message(
            id,
            conv,
            (user, device),
            at,
            format!("message number {i} of a long conversation"),
        ))?;
    }
    txn.commit()?;
    drop(store);
    let alice = start(&alice_dir, true, &[]).await?;
    let h = alice.handle();
    let t = Instant::now();
    let first = call(&h, page("bob", 50)).await?;
    let open = t.elapsed();
    ensure!(first.as_array().map(Vec::len) == Some(50), "a page of 50");
    let mut times = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        call(&h, page("bob", 50)).await?;
        times.push(t.elapsed());
    }
    times.sort();
    alice.shutdown().await?;
    Ok((open, times[times.len() / 2]))
}

async fn apply_changes(changes: usize) -> Result<Duration> {
    let alice_dir = home_dir("alice");
    let bob_dir = home_dir("bob");
    let alice = start(&alice_dir, true, &[]).await?;
    let a = alice.handle();
    let bob = start(&bob_dir, true, &[dial_addr(&a).await?]).await?;
    let b = bob.handle();
    befriend(&a, "alice", &b, "bob").await?;
    let mut ids = Vec::new();
    for i in 0..100 {
        let sent = call(
            &a,
            Request::Send {
                target: "bob".into(),
                text: format!("react to me {i}"),
                reply_to: None,
            },
        )
        .await?;
        ids.push(sent["id"].as_str().unwrap().to_string());
    }
    let until = Instant::now() + DEADLINE;
    while call(&b, page("alice", 200)).await?.as_array().map(Vec::len) != Some(100) {
        ensure!(Instant::now() < until, "bob never got the 100");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    alice.shutdown().await?;
    for i in 0..changes {
        call(
            &b,
            Request::React {
                id: ids[i % 100].clone(),
                emoji: format!("r{}", i / 100),
                remove: false,
            },
        )
        .await?;
    }
    bob.shutdown().await?;
    // Bob's envelopes of the conversation, in his chain's order.
    let conv = ConversationId::direct(&identity("alice").user_id(), &identity("bob").user_id());
    let envelopes = {
        let store = Store::open(&bob_dir.path().join("home").join("weft.db"))?;
        let db = store.db();
        let mut rowids: Vec<i64> = db
            .sealed_envelope_ids(&conv)?
            .into_iter()
            .map(|(_, r)| r)
            .collect();
        rowids.extend(db.chain_positions(&conv)?.into_iter().map(|p| p.3));
        db.envelope_bytes_by_rowid(&rowids)?
    };
    // Alice, offline, takes them.
    let alice = start(&alice_dir, false, &[]).await?;
    let a = alice.handle();
    if std::env::var_os("WEFT_BENCH_PAUSE").is_some() {
        // A moment to attach a profiler to just the timed part.
        eprintln!(
            "applying {changes} changes in 2 s (pid {})",
            std::process::id()
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let t = Instant::now();
    for chunk in envelopes.chunks(512) {
        a.deliver(chunk.to_vec()).await?;
    }
    let took = t.elapsed();
    let shown = call(&a, page("bob", 200)).await?;
    let total: usize = shown
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            m["reactions"].as_object().map_or(0, |r| {
                r.values().map(|u| u.as_array().map_or(0, Vec::len)).sum()
            })
        })
        .sum();
    ensure!(
        total == changes,
        "alice shows {total} reactions of {changes}"
    );
    alice.shutdown().await?;
    Ok(took)
}

fn main() -> Result<()> {
    let bench = std::env::args().any(|a| a == "--bench");
    let (n, changes) = if bench {
        (100_000, 10_000)
    } else {
        (10_000, 1_000)
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let verdict = |ok: bool| {
        if !bench {
            "smoke run"
        } else if ok {
            "PASS"
        } else {
            "FAIL"
        }
    };
    println!(
        "load: {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    // `WEFT_BENCH_ONLY=changes` skips the first part (for profiling).
    if std::env::var("WEFT_BENCH_ONLY").as_deref() != Ok("changes") {
        let (open, p50) = rt.block_on(open_and_page(n))?;
        println!(
            "a conversation of {n}: first page of 50 after start {:.1} ms, then p50 {:.2} ms (target < 50 ms): {}",
            open.as_secs_f64() * 1e3,
            p50.as_secs_f64() * 1e3,
            verdict(open < Duration::from_millis(50))
        );
    }
    let took = rt.block_on(apply_changes(changes))?;
    println!(
        "{changes} remote changes (reactions) verified, applied and stored: {:.2} s (target < 1 s): {}",
        took.as_secs_f64(),
        verdict(took < Duration::from_secs(1))
    );
    Ok(())
}

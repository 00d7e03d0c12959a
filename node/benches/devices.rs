//! History sync to a newly linked device, over loopback TCP (issue 4
//! target: 10,000 messages in under 5 s).
//!
//! alice and bob are real `Node`s (seeded identities, temporary homes on
//! the machine's disk, `NetConfig::loopback()`); alice sends bob 10,000
//! messages of ~40 bytes (256 `call`s in flight) and waits until her
//! outbox is empty (all delivered). She then issues a link code, and a new
//! device joins with `link_device` over loopback. Timed from the new
//! device's `Node::start` (bootstrapping from alice) until its newest
//! message is alice's last one (history pages come oldest first, so that
//! is the end of the transfer); then checked: exactly the 10,000, in
//! alice's order, with their statuses.
//!
//! `cargo bench -p weft-node --bench devices`; under `cargo test --benches`
//! it runs with 500 messages as a smoke test.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, ensure};
use common::{DEADLINE, befriend, call, dial_addr};
use serde_json::Value;
use tokio::task::JoinSet;
use weft_node::api::{MessageView, Request};
use weft_node::home::Home;
use weft_node::identity::Identity;
use weft_node::{Multiaddr, NetConfig, Node, NodeConfig, link_device};

const TARGET: Duration = Duration::from_secs(5);

async fn start(dir: &tempfile::TempDir, bootstrap: &[Multiaddr]) -> Result<Node> {
    let mut net = NetConfig::loopback();
    net.bootstrap = bootstrap.to_vec();
    Ok(Node::start(NodeConfig::new(dir.path().join("home"), Some(net))).await?)
}

async fn seeded(name: &str) -> Result<(tempfile::TempDir, Node)> {
    let dir = tempfile::Builder::new()
        .prefix(&format!("weft-bench-devices-{name}-"))
        .tempdir()?;
    let identity = Identity::from_seed(format!("{name}/devices-bench").as_bytes(), 0)?;
    Home::new(dir.path().join("home")).init_with(&identity, name)?;
    let node = start(&dir, &[]).await?;
    Ok((dir, node))
}

/// Up to `limit` of the latest messages with bob, oldest first.
async fn messages_with_bob(h: &weft_node::NodeHandle, limit: usize) -> Result<Vec<Value>> {
    let page = call(
        h,
        Request::Messages {
            target: "bob".into(),
            limit: Some(limit),
            before: None,
        },
    )
    .await?;
    Ok(page.as_array().cloned().unwrap_or_default())
}

fn view(ms: &[Value]) -> Vec<(Value, Value, Value)> {
    ms.iter()
        .map(|m| (m["id"].clone(), m["text"].clone(), m["status"].clone()))
        .collect()
}

async fn run(n: usize) -> Result<Duration> {
    let (alice_dir, alice) = seeded("alice").await?;
    let a = alice.handle();
    let alice_addr = dial_addr(&a).await?;
    let (_bob_dir, bob) = seeded("bob").await?;
    let b = bob.handle();
    befriend(&a, "alice", &b, "bob").await?;
    let mut sends = JoinSet::new();
    let mut last = String::new();
    for i in 0..n {
        while sends.len() >= 256 {
            sends.join_next().await.transpose()?;
        }
        let h = a.clone();
        sends.spawn(async move {
            h.call(Request::Send {
                target: "bob".into(),
                text: format!("history message {i:05}"),
                reply_to: None,
            })
            .await
        });
    }
    while let Some(r) = sends.join_next().await {
        r?.map_err(|e| anyhow!("send: {e}"))?;
    }
    let until = Instant::now() + DEADLINE;
    loop {
        let status = call(&a, Request::Status).await?;
        if status["outbox"].as_u64() == Some(0) {
            break;
        }
        if std::env::var("WEFT_BENCH_DEBUG").is_ok() {
            eprintln!("outbox {} peers {}", status["outbox"], status["peers"]);
        }
        ensure!(Instant::now() < until, "alice's outbox never emptied");
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
    let expected = messages_with_bob(&a, n + 10).await?;
    ensure!(
        expected.len() == n,
        "alice holds {} messages",
        expected.len()
    );
    if let Some(m) = expected.last() {
        last = m["id"].as_str().unwrap_or_default().to_string();
    }

    let code = call(&a, Request::DevicesLink).await?["code"]
        .as_str()
        .ok_or_else(|| anyhow!("no code"))?
        .to_string();
    let phone_dir = tempfile::Builder::new()
        .prefix("weft-bench-devices-phone-")
        .tempdir()?;
    link_device(
        &Home::new(phone_dir.path().join("home")),
        &code,
        None,
        0,
        NetConfig::new(Vec::new()),
    )
    .await
    .context("linking")?;

    let t0 = Instant::now();
    let phone = start(&phone_dir, &[alice_addr]).await?;
    let p = phone.handle();
    let until = Instant::now() + DEADLINE;
    loop {
        let newest = p
            .request::<Vec<MessageView>>(Request::Messages {
                target: "bob".into(),
                limit: Some(1),
                before: None,
            })
            .await
            .ok()
            .and_then(|list| list.into_iter().next());
        if newest.is_some_and(|m| m.id == last) {
            break;
        }
        ensure!(Instant::now() < until, "the history never arrived");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let took = t0.elapsed();
    let got = messages_with_bob(&p, n + 10).await?;
    ensure!(
        view(&got) == view(&expected),
        "the new device's history differs ({} of {n})",
        got.len()
    );
    phone.shutdown().await?;
    bob.shutdown().await?;
    alice.shutdown().await?;
    drop(alice_dir);
    Ok(took)
}

fn main() -> Result<()> {
    if std::env::var("WEFT_BENCH_DEBUG").is_ok() {
        tracing_subscriber::fmt()
            .with_env_filter("weft_node=debug")
            .with_writer(std::io::stderr)
            .init();
    }
    let bench = std::env::args().any(|a| a == "--bench");
    let n = if bench { 10_000 } else { 500 };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("load: {}", load.trim());
    let took = rt.block_on(run(n))?;
    println!(
        "history sync of {n} messages to a new device over loopback: {:.2} s (target < {} s for 10,000): {}",
        took.as_secs_f64(),
        TARGET.as_secs(),
        if !bench {
            "smoke run"
        } else if took < TARGET {
            "PASS"
        } else {
            "FAIL"
        }
    );
    Ok(())
}

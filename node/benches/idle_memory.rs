//! Resident memory of one idle node with its network on loopback.
//!
//! Measured in-process, from /proc/self/status, so the number includes
//! the bench binary itself (code, tokio runtime with 2 workers, allocator).
//! The baseline is the same process just before the node starts (runtime
//! up, nothing else); the node's own share is the difference. Reports
//! VmRSS after ~3 s idle (target < 40 MB) and the ratio to the baseline.
//!
//! `cargo bench -p weft-node --bench idle_memory`

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use weft_node::home::Home;
use weft_node::identity::Identity;
use weft_node::{NetConfig, Node, NodeConfig};

const TARGET_KB: u64 = 40 * 1024;

/// A `kB` field of /proc/self/status.
fn status_kb(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"))
}

fn mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

fn main() {
    let benchmarking = std::env::args().any(|a| a == "--bench");
    let idle = if benchmarking {
        Duration::from_secs(3)
    } else {
        Duration::from_millis(300)
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    if !benchmarking {
        println!("smoke test (no --bench): short idle, not a measurement; use cargo bench");
    }
    rt.block_on(async {
        let dir = tempfile::Builder::new().prefix("weft-bench-idle-").tempdir().unwrap();
        let home = Home::new(dir.path().join("home"));
        let identity = Identity::from_seed(b"idle/bench", 0).unwrap();
        home.init_with(&identity, "idle").unwrap();
        // Let the runtime settle, then take the baseline.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let base = status_kb("VmRSS");

        let node = Node::start(NodeConfig::new(dir.path().join("home"), Some(NetConfig::loopback())))
        .await
        .unwrap();
        let handle = node.handle();
        let listen = handle.listen_addrs().await;
        let _ = handle.call(weft_node::api::Request::Status).await.unwrap();
        tokio::time::sleep(idle).await;
        let rss = status_kb("VmRSS");
        let hwm = status_kb("VmHWM");
        let anon = status_kb("RssAnon");
        let file = status_kb("RssFile");
        println!(
            "idle node (network on loopback {listen:?}), after {:.1} s idle, in-process (includes the bench binary):",
            idle.as_secs_f64()
        );
        println!("baseline before node start: VmRSS {:.1} MB", mb(base));
        println!(
            "with idle node: VmRSS {:.1} MB (RssAnon {:.1} MB, RssFile {:.1} MB), VmHWM {:.1} MB",
            mb(rss),
            mb(anon),
            mb(file),
            mb(hwm)
        );
        println!("node's share: {:.1} MB", mb(rss.saturating_sub(base)));
        println!("ratio idle node / bare process = {:.2}", rss as f64 / base.max(1) as f64);
        println!(
            "VmRSS {:.1} MB (target < {:.0} MB: {})",
            mb(rss),
            mb(TARGET_KB),
            if rss < TARGET_KB { "PASS" } else { "FAIL" }
        );
        node.shutdown().await.unwrap();
    });
}

//! Resident memory of a node holding 100 conversations of 1,000 messages
//! each (issue 4 target: under 150 MB).
//!
//! The history is written into the node's store before it starts (100
//! direct conversations with 100 users, 1,000 messages of ~60 bytes each,
//! half of them this user's); then the node starts with its network on
//! loopback, every conversation's latest page of 50 is read (as a client
//! opening each would), and after ~3 s idle VmRSS is read from
//! /proc/self/status. In-process, so the number includes the bench binary
//! and its tokio runtime, like `idle_memory`.
//!
//! `cargo bench -p weft-node --bench loaded_memory`; under `cargo test
//! --benches` it runs with 10 conversations.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::stored_message;
use weft_node::api::{ConversationView, MessageView, Request};
use weft_node::home::Home;
use weft_node::identity::Identity;
use weft_node::ids::{ConversationId, DeviceId, UserId};
use weft_node::store::{ConversationKind, ConversationRecord, Role, Store};
use weft_node::{NetConfig, Node, NodeConfig};

const TARGET_MB: f64 = 150.0;

fn vm_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb / 1024.0
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let (convs, per_conv) = if bench { (100u64, 1000u64) } else { (10, 100) };
    let dir = tempfile::Builder::new()
        .prefix("weft-bench-loaded-")
        .tempdir()
        .unwrap();
    let home = Home::new(dir.path().join("home"));
    let me = Identity::from_seed(b"alice/loaded-bench", 0).unwrap();
    home.init_with(&me, "alice").unwrap();
    {
        let mut store = Store::open(&home.db_path()).unwrap();
        let txn = store.transaction().unwrap();
        let db = txn.db();
        for c in 0..convs {
            let mut u = [0u8; 32];
            u[..8].copy_from_slice(&(c + 1).to_be_bytes());
            let other = UserId(u);
            let id = ConversationId::direct(&me.user_id(), &other);
            db.upsert_user(&other, &format!("friend {c}"), 0).unwrap();
            db.insert_conversation(&ConversationRecord {
                id,
                kind: ConversationKind::Direct,
                name: format!("friend {c}"),
                topic: weft_node::routing::Routing::from_bytes(id.0).topic(),
                tag: Some(weft_node::routing::Routing::from_bytes(id.0).tag()),
                epoch: 1,
                state: None,
                created_at_ms: 0,
                last_message_at_ms: None,
                unread: 0,
                key_epoch: 1,
            })
            .unwrap();
            db.set_members(&id, &[(me.user_id(), Role::Member), (other, Role::Member)])
                .unwrap();
            for i in 0..per_conv {
                let mine = i % 2 == 0;
                let mut mid = [0u8; 16];
                mid[..8].copy_from_slice(&c.to_be_bytes());
                mid[8..].copy_from_slice(&i.to_be_bytes());
                let at = 1_700_000_000_000 + (c * per_conv + i) as i64 * 1000;
                let sender = if mine {
                    (me.user_id(), me.device_id())
                } else {
                    (other, DeviceId(u))
                };
                db.insert_message(&stored_message(
                    mid,
                    id,
                    sender,
                    at,
                    format!("message {i} in conversation {c}, about this long"),
                ))
                .unwrap();
            }
        }
        txn.commit().unwrap();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let node = Node::start(NodeConfig::new(
            dir.path().join("home"),
            Some(NetConfig::loopback()),
        ))
        .await
        .unwrap();
        let h = node.handle();
        let list: Vec<ConversationView> = h.request(Request::Conversations).await.unwrap();
        let ids: Vec<String> = list.into_iter().map(|c| c.id).collect();
        assert_eq!(ids.len() as u64, convs);
        for id in &ids {
            let page: Vec<MessageView> = h
                .request(Request::Messages {
                    target: id.clone(),
                    limit: Some(50),
                    before: None,
                })
                .await
                .unwrap();
            assert_eq!(page.len(), 50.min(per_conv as usize));
        }
        tokio::time::sleep(if bench {
            Duration::from_secs(3)
        } else {
            Duration::from_millis(300)
        })
        .await;
        let rss = vm_rss_mb();
        println!(
            "{convs} conversations of {per_conv} messages: VmRSS {rss:.1} MB (target < {TARGET_MB:.0} MB: {})",
            if !bench {
                "smoke run"
            } else if rss < TARGET_MB {
                "PASS"
            } else {
                "FAIL"
            }
        );
        node.shutdown().await.unwrap();
    });
}

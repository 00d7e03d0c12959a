//! Several devices per account, in process: alice links a second device
//! with a one-time code; it gets her history; messages to alice reach both
//! devices; what the second device sends reaches bob and shows on the
//! first as alice's own.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{TestNode, befriend, group_create};
use weft_node::api::Request;
use weft_node::home::Home;
use weft_node::{NetConfig, link_device};

fn count(ms: &[serde_json::Value], prefix: &str) -> usize {
    ms.iter()
        .filter(|m| m["text"].as_str().is_some_and(|t| t.starts_with(prefix)))
        .count()
}

/// Links a new device to `account` (which must run) in a fresh home.
async fn link(account: &TestNode, name: &str, bootstrap: &[&TestNode]) -> TestNode {
    let code = account.call(Request::DevicesLink).await["code"]
        .as_str()
        .unwrap()
        .to_string();
    let dir = tempfile::Builder::new()
        .prefix(&format!("weft-{name}-"))
        .tempdir()
        .unwrap();
    let home = Home::new(dir.path().join("home"));
    let port = 50_000 + u64::from(std::process::id() % 1000) * 10;
    let view = link_device(&home, &code, None, NetConfig::memory(port))
        .await
        .unwrap();
    assert_eq!(
        view.user_id,
        account.call(Request::Id).await["user_id"].as_str().unwrap()
    );
    // The code works once.
    let again = Home::new(dir.path().join("again"));
    assert!(
        link_device(&again, &code, None, NetConfig::memory(port + 1))
            .await
            .is_err(),
        "a code is good for one device"
    );
    TestNode::start_existing(name, dir, bootstrap).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_linked_device_gets_history_and_new_messages_and_speaks_for_the_account() {
    let alice = TestNode::start("alice", 51, &[]).await;
    let bob = TestNode::start("bob", 51, &[&alice]).await;
    let carol = TestNode::start("carol", 51, &[&alice, &bob]).await;
    befriend(&alice, &bob).await;
    befriend(&alice, &carol).await;
    alice.call(group_create("trio", &["bob", "carol"])).await;
    for i in 0..5 {
        alice.send("bob", &format!("before-{i}")).await;
        alice.send("trio", &format!("group-before-{i}")).await;
    }
    bob.send("alice", "before-from-bob").await;
    bob.wait_messages("alice", "alice's five", |ms| count(ms, "before-") == 6)
        .await;

    let phone = link(&alice, "alice-phone", &[&alice, &bob, &carol]).await;
    // History: every conversation, with statuses.
    let history = phone
        .wait_messages("bob", "the history with bob", |ms| {
            count(ms, "before-") == 6
        })
        .await;
    assert!(
        history
            .iter()
            .filter(|m| m["text"].as_str().unwrap().starts_with("before-")
                && m["text"] != "before-from-bob")
            .all(|m| m["outgoing"] == true && m["status"] != "queued"),
        "alice's messages show as hers, with their status: {history:?}"
    );
    phone
        .wait_messages("trio", "the group history", |ms| {
            count(ms, "group-before-") == 5
        })
        .await;
    let devices = alice.call(Request::DevicesList).await;
    assert_eq!(devices.as_array().unwrap().len(), 2, "{devices}");

    // New messages to alice reach both devices.
    bob.send("alice", "to both").await;
    alice.expect_text("bob", "to both").await;
    phone.expect_text("bob", "to both").await;
    carol.send("trio", "group to both").await;
    alice.expect_text("trio", "group to both").await;
    phone.expect_text("trio", "group to both").await;

    // The phone speaks for alice; the first device shows it as hers.
    phone.send("bob", "from the phone").await;
    bob.expect_text("alice", "from the phone").await;
    let mine = alice
        .wait_messages("bob", "the phone's message", |ms| {
            ms.iter().any(|m| m["text"] == "from the phone")
        })
        .await;
    let m = mine.iter().find(|m| m["text"] == "from the phone").unwrap();
    assert_eq!(m["outgoing"], true);
    phone.send("trio", "group from the phone").await;
    carol.expect_text("trio", "group from the phone").await;
    alice.expect_text("trio", "group from the phone").await;
}

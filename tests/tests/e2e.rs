//! End-to-end tests of the `weft` binary: identities, bad input, direct
//! messages between two daemons, a group of three, and a message queued
//! while no daemon runs. Build the binaries first (`cargo build
//! --workspace`); the harness finds them next to this test executable.

use serde_json::Value;
use weft_e2e::{DEADLINE, Weft, wait_until};

/// The fields `messages --json` gives every message (the contract).
const MESSAGE_FIELDS: [&str; 11] = [
    "id",
    "conversation",
    "sender",
    "sender_name",
    "text",
    "sent_at",
    "status",
    "reply_to",
    "edited",
    "deleted",
    "reactions",
];
const STATUSES: [&str; 5] = ["queued", "sent", "relayed", "delivered", "read"];

fn check_message_fields(message: &Value) -> anyhow::Result<()> {
    for field in MESSAGE_FIELDS {
        anyhow::ensure!(
            message.get(field).is_some(),
            "message lacks `{field}`: {message}"
        );
    }
    let status = message["status"].as_str().unwrap_or_default();
    anyhow::ensure!(STATUSES.contains(&status), "bad status in {message}");
    anyhow::ensure!(message["sent_at"].is_i64(), "sent_at is not an integer");
    Ok(())
}

/// Exchanges invites both ways (each adds the other under its name).
fn befriend(a: &Weft, b: &Weft) -> anyhow::Result<()> {
    a.add_contact(b)?;
    b.add_contact(a)?;
    Ok(())
}

/// alice and bob, contacts of each other, their daemons running (bob's
/// bootstrapped from alice's).
fn alice_and_bob() -> anyhow::Result<(Weft, Weft)> {
    let mut alice = Weft::new("alice")?;
    let mut bob = Weft::new("bob")?;
    alice.init()?;
    bob.init()?;
    alice.start_daemon(&[])?;
    let alice_addr = alice.daemon()?.dial_addr()?;
    bob.start_daemon(&["--bootstrap", &alice_addr])?;
    befriend(&alice, &bob)?;
    Ok((alice, bob))
}

#[test]
fn init_id_and_refusing_to_init_twice() -> anyhow::Result<()> {
    let alice = Weft::new("alice")?;
    let created = alice.init()?;
    for field in ["user_id", "device_id", "peer_id", "name", "invite"] {
        assert!(created[field].is_string(), "init lacks {field}: {created}");
    }
    assert_eq!(created["name"], "alice");

    let id = alice.json(&["id"])?;
    assert_eq!(id["user_id"], created["user_id"]);
    assert_eq!(id["device_id"], created["device_id"]);
    assert_eq!(id["peer_id"], created["peer_id"]);
    assert!(id["invite"].as_str().is_some_and(|i| !i.is_empty()));

    // Human output names every field.
    let human = alice.ok(&["id"])?;
    for key in ["user id", "device id", "peer id", "invite"] {
        assert!(human.contains(key), "human id lacks {key}: {human}");
    }

    let again = alice
        .run(&["init", "--name", "mallory"])?
        .expect_code(1, "init twice")?;
    assert!(again.stdout.is_empty(), "stdout: {}", again.stdout);
    assert!(again.stderr.contains("error"), "stderr: {}", again.stderr);
    // The keys were not touched.
    assert_eq!(alice.json(&["id"])?["user_id"], created["user_id"]);
    assert_eq!(alice.json(&["id"])?["name"], "alice");
    Ok(())
}

#[test]
fn commands_without_identity_hint_at_init() -> anyhow::Result<()> {
    let nobody = Weft::new("nobody")?;
    let out = nobody.run(&["id"])?.expect_code(1, "id without init")?;
    assert!(out.stderr.contains("weft init"), "stderr: {}", out.stderr);
    Ok(())
}

#[test]
fn malformed_invite_is_bad_input() -> anyhow::Result<()> {
    let alice = Weft::new("alice")?;
    alice.init()?;
    let out = alice
        .run(&[
            "contact",
            "add",
            "weft1-this-is-not-an-invite",
            "--name",
            "bob",
        ])?
        .expect_code(2, "contact add with a malformed invite")?;
    assert!(out.stdout.is_empty(), "stdout: {}", out.stdout);
    assert!(
        out.stderr.starts_with("error: ") && out.stderr.to_lowercase().contains("invite"),
        "stderr: {}",
        out.stderr
    );
    let garbage = alice
        .run(&["contact", "add", "garbage", "--name", "bob"])?
        .expect_code(2, "contact add with garbage")?;
    assert!(garbage.stderr.to_lowercase().contains("invite"));
    // Nothing was added.
    assert_eq!(alice.json(&["contact", "list"])?, Value::Array(Vec::new()));
    Ok(())
}

#[test]
fn bad_usage_exits_2() -> anyhow::Result<()> {
    let alice = Weft::new("alice")?;
    alice
        .run(&["no-such-command"])?
        .expect_code(2, "unknown command")?;
    alice
        .run(&["send", "bob"])?
        .expect_code(2, "send without text")?;
    alice.init()?;
    alice
        .run(&["daemon", "--listen", "not-a-multiaddr"])?
        .expect_code(2, "daemon with a bad --listen")?;
    Ok(())
}

#[test]
fn two_daemons_exchange_messages() -> anyhow::Result<()> {
    let (mut alice, mut bob) = alice_and_bob()?;

    let contacts = alice.json(&["contact", "list"])?;
    assert!(
        contacts
            .as_array()
            .is_some_and(|l| l.iter().any(|c| c["alias"] == "bob")),
        "{contacts}"
    );

    let sent = alice.json(&["send", "bob", "hello bob"])?;
    for field in ["id", "conversation", "status"] {
        assert!(sent[field].is_string(), "send lacks {field}: {sent}");
    }
    let got = bob.wait_for_message("alice", "hello bob")?;
    check_message_fields(&got)?;
    assert_eq!(got["sender"].as_str(), Some(alice.user_id()?.as_str()));
    assert_eq!(got["sender_name"], "alice");
    assert_eq!(got["id"], sent["id"]);

    // Reply, through stdin and with --reply-to.
    let reply = bob.run_with_stdin(
        &[
            "--json",
            "send",
            "alice",
            "-",
            "--reply-to",
            sent["id"].as_str().unwrap_or_default(),
        ],
        Some("hello alice\n"),
    )?;
    reply.expect_code(0, "bob replies from stdin")?;
    let got = alice.wait_for_message("bob", "hello alice")?;
    check_message_fields(&got)?;
    assert_eq!(got["sender"].as_str(), Some(bob.user_id()?.as_str()));
    assert_eq!(got["reply_to"], sent["id"]);

    // Both see both messages, in the same order.
    let order = |w: &Weft| -> anyhow::Result<Vec<Value>> {
        Ok(w.messages("bob")?
            .into_iter()
            .map(|m| m["id"].clone())
            .collect())
    };
    let alice_order = order(&alice)?;
    assert_eq!(alice_order.len(), 2);
    let bob_order: Vec<Value> = bob
        .messages("alice")?
        .into_iter()
        .map(|m| m["id"].clone())
        .collect();
    assert_eq!(alice_order, bob_order);

    // Alice's copy of her message has left the queue.
    wait_until("alice's message to leave the queue", DEADLINE, || {
        let list = alice.messages("bob")?;
        Ok(list
            .iter()
            .find(|m| m["id"] == sent["id"])
            .filter(|m| m["status"] != "queued")
            .cloned())
    })?;

    let conversations = bob.json(&["conversations"])?;
    let first = &conversations[0];
    for field in ["id", "kind", "name", "unread", "last_message_at"] {
        assert!(first.get(field).is_some(), "conversation lacks {field}");
    }
    assert_eq!(first["kind"], "direct");

    // Human output of messages is chat-like.
    let human = alice.ok(&["messages", "bob"])?;
    assert!(human.contains("alice: hello bob"), "{human}");
    assert!(
        human
            .lines()
            .any(|l| l.contains("bob: ") && l.ends_with("hello alice")),
        "{human}"
    );

    bob.stop_daemon()?;
    alice.stop_daemon()?;
    Ok(())
}

#[test]
fn group_of_three() -> anyhow::Result<()> {
    let mut alice = Weft::new("alice")?;
    let mut bob = Weft::new("bob")?;
    let mut carol = Weft::new("carol")?;
    for w in [&alice, &bob, &carol] {
        w.init()?;
    }
    alice.start_daemon(&[])?;
    let alice_addr = alice.daemon()?.dial_addr()?;
    bob.start_daemon(&["--bootstrap", &alice_addr])?;
    carol.start_daemon(&["--bootstrap", &alice_addr])?;
    // Alice knows both; bob and carol know only alice.
    befriend(&alice, &bob)?;
    befriend(&alice, &carol)?;

    let group = alice.json(&[
        "group", "create", "friends", "--member", "bob", "--member", "carol",
    ])?;
    let group_id = group["id"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("no group id in {group}"))?
        .to_string();

    for w in [&bob, &carol] {
        wait_until(&format!("{} to join the group", w.name), DEADLINE, || {
            let groups = w.json(&["group", "list"])?;
            Ok(groups
                .as_array()
                .and_then(|l| l.iter().find(|g| g["name"] == "friends").cloned()))
        })?;
    }
    let members = alice.json(&["group", "members", "friends"])?;
    assert_eq!(members.as_array().map(Vec::len), Some(3), "{members}");

    let people = [&alice, &bob, &carol];
    for from in people {
        let text = format!("hi all, {} here", from.name);
        from.json(&["send", "friends", &text])?;
    }
    for to in people {
        for from in people {
            let text = format!("hi all, {} here", from.name);
            let got = to.wait_for_message(&group_id, &text)?;
            check_message_fields(&got)?;
            assert_eq!(got["conversation"], Value::String(group_id.clone()));
            assert_eq!(got["sender_name"], from.name.as_str());
        }
    }
    // The same order on every device.
    let ids = |w: &Weft| -> anyhow::Result<Vec<Value>> {
        Ok(w.messages("friends")?
            .into_iter()
            .map(|m| m["id"].clone())
            .collect())
    };
    let order = ids(&alice)?;
    assert_eq!(order.len(), 3);
    assert_eq!(ids(&bob)?, order);
    assert_eq!(ids(&carol)?, order);
    // Group messages carry per-member receipts.
    let mine = alice.messages("friends")?;
    assert!(mine.iter().any(|m| m["receipts"].is_array()), "{mine:?}");

    let conversations = carol.json(&["conversations"])?;
    assert!(
        conversations.as_array().is_some_and(|l| l
            .iter()
            .any(|c| c["kind"] == "group" && c["id"] == group_id.as_str())),
        "{conversations}"
    );
    Ok(())
}

#[test]
fn send_queues_without_daemon_and_delivers_later() -> anyhow::Result<()> {
    let mut alice = Weft::new("alice")?;
    let mut bob = Weft::new("bob")?;
    alice.init()?;
    bob.init()?;
    alice.start_daemon(&[])?;
    bob.start_daemon(&[])?;
    befriend(&alice, &bob)?;
    alice.stop_daemon()?;

    // No daemon for alice: the message is queued durably.
    let sent = alice.json(&["send", "bob", "sent while offline"])?;
    assert_eq!(sent["status"], "queued", "{sent}");
    let status = alice.json(&["status"])?;
    assert_eq!(status["online"], false, "{status}");
    let stored = alice.messages("bob")?;
    assert!(
        stored
            .iter()
            .any(|m| m["id"] == sent["id"] && m["status"] == "queued"),
        "{stored:?}"
    );

    // Alice's daemon comes up; bob (still running) gets the message.
    let bob_addr = bob.daemon()?.dial_addr()?;
    alice.start_daemon(&["--bootstrap", &bob_addr])?;
    let got = bob.wait_for_message("alice", "sent while offline")?;
    assert_eq!(got["id"], sent["id"]);
    let status = alice.json(&["status"])?;
    assert_eq!(status["online"], true, "{status}");
    Ok(())
}

#[test]
fn completions_and_help() -> anyhow::Result<()> {
    let w = Weft::new("nobody")?;
    let script = w.ok(&["completions", "bash"])?;
    assert!(script.contains("weft"));
    let help = w.ok(&["--help"])?;
    assert!(help.contains("daemon"));
    Ok(())
}

#[test]
fn watch_streams_events() -> anyhow::Result<()> {
    let mut alice = Weft::new("alice")?;
    let mut bob = Weft::new("bob")?;
    alice.init()?;
    bob.init()?;

    // Without a daemon there is nothing to watch.
    let out = bob
        .run(&["watch"])?
        .expect_code(1, "watch without daemon")?;
    assert!(out.stderr.contains("daemon"), "stderr: {}", out.stderr);

    alice.start_daemon(&[])?;
    let alice_addr = alice.daemon()?.dial_addr()?;
    bob.start_daemon(&["--bootstrap", &alice_addr])?;
    befriend(&alice, &bob)?;

    let watch = bob.spawn(&["--json", "watch"])?;
    watch.wait_for_stderr("watch to subscribe", |l| l.contains("watching"))?;
    alice.json(&["send", "bob", "watch this"])?;
    let line = watch.wait_for_line("the message event", |l| l.contains("watch this"))?;
    let event: Value = serde_json::from_str(&line)?;
    assert_eq!(event["type"], "message", "{event}");
    assert_eq!(event["text"], "watch this");
    assert_eq!(event["sender_name"], "alice");

    // Human mode: one readable line per event.
    let human = bob.spawn(&["watch"])?;
    human.wait_for_stderr("watch to subscribe", |l| l.contains("watching"))?;
    alice.json(&["send", "bob", "and this"])?;
    let line = human.wait_for_line("the message line", |l| l.contains("and this"))?;
    assert!(line.contains("alice: and this"), "{line}");
    Ok(())
}

#[test]
fn demo_runs_to_the_end() -> anyhow::Result<()> {
    let w = Weft::new("demo")?;
    let stdout = w.ok(&["--json", "demo"])?;
    let steps: Vec<Value> = stdout
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let names: Vec<&str> = steps.iter().filter_map(|s| s["step"].as_str()).collect();
    for step in [
        "init",
        "node",
        "contacts",
        "direct",
        "group",
        "group_message",
        "done",
    ] {
        assert!(names.contains(&step), "no {step} step in {names:?}");
    }
    assert_eq!(names.last(), Some(&"done"));
    let transcript = steps
        .iter()
        .find(|s| s["step"] == "transcript")
        .ok_or_else(|| anyhow::anyhow!("no transcript"))?;
    assert_eq!(transcript["same_order"], true);
    assert_eq!(transcript["messages"].as_array().map(Vec::len), Some(3));
    Ok(())
}

#[test]
fn two_daemons_over_quic() -> anyhow::Result<()> {
    let mut alice = Weft::new("alice")?;
    let mut bob = Weft::new("bob")?;
    alice.init()?;
    bob.init()?;
    alice.start_daemon(&["--listen", "/ip4/127.0.0.1/udp/0/quic-v1"])?;
    let quic = alice
        .daemon()?
        .listen
        .iter()
        .find(|a| a.contains("/quic-v1"))
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("alice does not listen on QUIC"))?;
    let boot = format!("{quic}/p2p/{}", alice.daemon()?.peer_id);
    bob.start_daemon(&[
        "--listen",
        "/ip4/127.0.0.1/udp/0/quic-v1",
        "--bootstrap",
        &boot,
    ])?;
    befriend(&alice, &bob)?;
    alice.ok(&["send", "bob", "over quic"])?;
    bob.wait_for_message("alice", "over quic")?;
    // bob reached alice through her QUIC address.
    let status = bob.json(&["status"])?;
    let via_quic = status["peers"].as_array().is_some_and(|peers| {
        peers.iter().any(|p| {
            p["addrs"].as_array().is_some_and(|a| {
                a.iter()
                    .any(|x| x.as_str().is_some_and(|s| s.contains("quic-v1")))
            })
        })
    });
    anyhow::ensure!(via_quic, "bob is not connected over QUIC: {status}");
    Ok(())
}

#[test]
fn edit_react_and_delete_through_the_cli() -> anyhow::Result<()> {
    let (alice, bob) = alice_and_bob()?;
    let sent = alice.json(&["send", "bob", "lunch at 12?"])?;
    let id = sent["id"].as_str().unwrap_or_default().to_string();
    bob.wait_for_message("alice", "lunch at 12?")?;

    let edited = alice.json(&["edit", &id, "lunch at 1?"])?;
    assert_eq!(edited["text"], "lunch at 1?");
    assert_eq!(edited["edited"], true);
    bob.ok(&["react", &id, "👍"])?;
    let find = |node: &Weft, target: &str| -> anyhow::Result<Option<Value>> {
        Ok(node
            .messages(target)?
            .into_iter()
            .find(|m| m["id"] == id.as_str()))
    };
    for (node, target) in [(&alice, "bob"), (&bob, "alice")] {
        wait_until("the edit and the reaction", DEADLINE, || {
            Ok(find(node, target)?.filter(|m| {
                m["text"] == "lunch at 1?"
                    && m["reactions"]["👍"]
                        .as_array()
                        .is_some_and(|u| u.len() == 1)
            }))
        })?;
    }
    // Only the sender edits: bad usage, exit 2.
    bob.run(&["edit", &id, "no"])?
        .expect_code(2, "bob edits alice's message")?;
    alice
        .run(&["react", &id, ""])?
        .expect_code(2, "an empty reaction")?;

    alice.ok(&["delete", &id])?;
    for (node, target) in [(&alice, "bob"), (&bob, "alice")] {
        let m = wait_until("the deletion", DEADLINE, || {
            Ok(find(node, target)?.filter(|m| m["deleted"] == true))
        })?;
        assert_eq!(m["text"], "");
        assert_eq!(m["reactions"], serde_json::json!({}));
    }
    let human = bob.ok(&["messages", "alice"])?;
    assert!(human.contains("(message deleted)"), "{human}");
    Ok(())
}

//! Offline delivery through a relay, with real processes: alice and bob
//! are never online at the same time after the start, and everything still
//! arrives exactly once, in order, and comes back `delivered`.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::Value;
use weft_e2e::invite::{contains, invite_bytes};
use weft_e2e::relay::Relay;
use weft_e2e::{DEADLINE, Weft, wait_until};

fn texts_with(ms: &[Value], prefix: &str) -> Vec<String> {
    ms.iter()
        .filter_map(|m| m["text"].as_str())
        .filter(|t| t.starts_with(prefix))
        .map(str::to_string)
        .collect()
}

fn statuses(node: &Weft, target: &str, prefix: &str) -> anyhow::Result<Vec<String>> {
    Ok(node
        .messages(target)?
        .iter()
        .filter(|m| m["text"].as_str().is_some_and(|t| t.starts_with(prefix)))
        .map(|m| m["status"].as_str().unwrap_or_default().to_string())
        .collect())
}

#[test]
fn offline_delivery_through_a_relay() -> anyhow::Result<()> {
    let relay = Relay::start()?;
    let mut alice = Weft::new("alice")?;
    let mut bob = Weft::new("bob")?;
    alice.init()?;
    bob.init()?;
    let with_relay = ["--relay", relay.addr.as_str()];
    alice.start_daemon(&with_relay)?;
    bob.start_daemon(&with_relay)?;
    // Invites made while the daemons run carry the relay circuit address.
    alice.add_contact(&bob)?;
    bob.add_contact(&alice)?;
    alice.ok(&["group", "create", "pair", "--member", "bob"])?;
    alice.ok(&["send", "bob", "hello"])?;
    bob.wait_for_message("alice", "hello")?;
    wait_until("bob to join the group", DEADLINE, || {
        let groups = bob.json(&["group", "list"])?;
        Ok(groups
            .as_array()
            .is_some_and(|g| g.iter().any(|g| g["name"] == "pair"))
            .then_some(()))
    })?;

    // Bob goes away; alice writes and then goes away too.
    alice.see_stop(&mut bob)?;
    for i in 0..5 {
        alice.ok(&["send", "bob", &format!("direct-{i}")])?;
        alice.ok(&["send", "pair", &format!("group-{i}")])?;
    }
    // Held by the relay for bob: `relayed`.
    for (target, prefix) in [("bob", "direct-"), ("pair", "group-")] {
        wait_until(&format!("{prefix}* relayed"), DEADLINE, || {
            let s = statuses(&alice, target, prefix)?;
            Ok((s.len() == 5 && s.iter().all(|s| s == "relayed")).then_some(()))
        })?;
    }
    alice.stop_daemon()?;

    // Bob comes back knowing only the relay: everything is there.
    bob.start_daemon(&with_relay)?;
    let mut got = Vec::new();
    for (target, prefix) in [("alice", "direct-"), ("pair", "group-")] {
        let ms = wait_until(
            &format!("bob to get {prefix}*"),
            Duration::from_secs(60),
            || {
                let ms = bob.messages(target)?;
                Ok((texts_with(&ms, prefix).len() >= 5).then_some(ms))
            },
        )?;
        let texts = texts_with(&ms, prefix);
        let expected: Vec<String> = (0..5).map(|i| format!("{prefix}{i}")).collect();
        assert_eq!(texts, expected, "exactly once, in order");
        got.extend(ms);
    }
    let ids: HashSet<&str> = got.iter().filter_map(|m| m["id"].as_str()).collect();
    assert_eq!(ids.len(), got.len(), "no message twice");

    // Alice, back later, finds bob's receipts in her own mailbox.
    alice.start_daemon(&with_relay)?;
    for (target, prefix) in [("bob", "direct-"), ("pair", "group-")] {
        wait_until(
            &format!("{prefix}* delivered"),
            Duration::from_secs(60),
            || {
                let s = statuses(&alice, target, prefix)?;
                Ok((s.len() == 5 && s.iter().all(|s| s == "delivered")).then_some(()))
            },
        )?;
    }
    Ok(())
}

/// The relays `node` uses, once there are `n` with a mailbox registered.
fn registered_relays(node: &Weft, n: usize) -> anyhow::Result<Vec<Value>> {
    wait_until(&format!("{n} relays with a mailbox"), DEADLINE, || {
        let list = node.json(&["relay", "list"])?;
        let list = list.as_array().cloned().unwrap_or_default();
        let registered = list.iter().filter(|r| r["mailbox"].is_string()).count();
        Ok((list.len() == n && registered == n).then_some(list))
    })
}

#[test]
fn a_relay_found_in_the_dht_and_a_configured_one_both_hold_mail_nothing_doubles()
-> anyhow::Result<()> {
    // `found` is only a bootstrap peer here: the nodes learn that it is a
    // relay from the DHT, where it announces itself.
    let found = Relay::start()?;
    let configured = Relay::start()?;
    let mut alice = Weft::new("alice")?;
    let mut bob = Weft::new("bob")?;
    alice.init()?;
    bob.init()?;
    let args = [
        "--relay",
        configured.addr.as_str(),
        "--bootstrap",
        found.addr.as_str(),
    ];
    alice.start_daemon(&args)?;
    bob.start_daemon(&args)?;
    for node in [&alice, &bob] {
        let relays = registered_relays(node, 2)?;
        let from = |peer: &str| {
            relays
                .iter()
                .find(|r| r["peer_id"] == peer)
                .map(|r| r["found"].clone())
        };
        assert_eq!(from(&found.peer_id), Some(Value::from("dht")), "{relays:?}");
        assert_eq!(from(&configured.peer_id), Some(Value::from("config")));
    }
    alice.add_contact(&bob)?;
    bob.add_contact(&alice)?;
    alice.ok(&["send", "bob", "hello"])?;
    bob.wait_for_message("alice", "hello")?;

    alice.see_stop(&mut bob)?;
    for i in 0..5 {
        alice.ok(&["send", "bob", &format!("twice-held-{i}")])?;
    }
    wait_until("twice-held-* relayed", DEADLINE, || {
        let s = statuses(&alice, "bob", "twice-held-")?;
        Ok((s.len() == 5 && s.iter().all(|s| s == "relayed")).then_some(()))
    })?;
    // Both relays hold all five for bob.
    for relay in [&found, &configured] {
        wait_until("the deposits at both relays", DEADLINE, || {
            let n = relay.metric("weft_relay_stored_envelopes")?.unwrap_or(0.0);
            Ok((n >= 5.0).then_some(()))
        })?;
    }
    alice.stop_daemon()?;
    // An invite made now, with no daemon, still names both relays.
    let invite = invite_bytes(&alice.invite()?)?;
    for relay in [&found, &configured] {
        let circuit = format!("/p2p/{}/p2p-circuit/p2p/", relay.peer_id);
        assert!(
            contains(&invite, circuit.as_bytes()),
            "the offline invite lacks {circuit}"
        );
    }

    // Bob, back, fetches from both (the found relay is remembered); each
    // message is stored once.
    bob.start_daemon(&args)?;
    let ms = wait_until("bob to get twice-held-*", Duration::from_secs(60), || {
        let ms = bob.messages("alice")?;
        Ok((texts_with(&ms, "twice-held-").len() >= 5).then_some(ms))
    })?;
    let expected: Vec<String> = (0..5).map(|i| format!("twice-held-{i}")).collect();
    assert_eq!(
        texts_with(&ms, "twice-held-"),
        expected,
        "once each, in order"
    );
    // Bob got the five from each relay (and acknowledged them there).
    wait_until("bob to fetch from both relays", DEADLINE, || {
        let list = bob.json(&["relay", "list"])?;
        let fetched: Vec<u64> = list
            .as_array()
            .map(|l| l.iter().filter_map(|r| r["fetched"].as_u64()).collect())
            .unwrap_or_default();
        Ok((fetched.len() == 2 && fetched.iter().all(|f| *f >= 5)).then_some(()))
    })?;
    for relay in [&found, &configured] {
        wait_until("the relay to hand out the five", DEADLINE, || {
            let n = relay
                .metric("weft_relay_fetched_envelopes_total")?
                .unwrap_or(0.0);
            Ok((n >= 5.0).then_some(()))
        })?;
    }
    let again = bob.messages("alice")?;
    assert_eq!(
        texts_with(&again, "twice-held-"),
        expected,
        "still once each"
    );
    Ok(())
}

//! Offline delivery through a relay, with real processes: alice and bob
//! are never online at the same time after the start, and everything still
//! arrives exactly once, in order, and comes back `delivered`.

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use serde_json::Value;
use weft_e2e::{DEADLINE, Weft, wait_until};

/// The `weft-relay` binary next to the test executable.
fn relay_bin() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| anyhow!("unexpected test executable path"))?;
    let bin = dir.join("weft-relay");
    if !bin.is_file() {
        bail!(
            "{} is missing: build the binaries first: cargo build --workspace",
            bin.display()
        );
    }
    Ok(bin)
}

/// A running relay, killed on drop.
struct Relay {
    child: Child,
    addr: String,
    _data: tempfile::TempDir,
}

impl Relay {
    fn start() -> anyhow::Result<Self> {
        let data = tempfile::Builder::new().prefix("weft-relay-").tempdir()?;
        let mut child = Command::new(relay_bin()?)
            .args([
                "--json",
                "--listen",
                "/ip4/127.0.0.1/tcp/0",
                "--metrics",
                "127.0.0.1:0",
                "--data",
            ])
            .arg(data.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting weft-relay")?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let ready = loop {
            let line = rx
                .recv_timeout(DEADLINE)
                .context("weft-relay printed no ready line")?;
            if let Ok(v) = serde_json::from_str::<Value>(&line)
                && v["event"] == "ready"
            {
                break v;
            }
        };
        let peer = ready["peer_id"]
            .as_str()
            .ok_or_else(|| anyhow!("no peer_id in {ready}"))?;
        let listen = ready["listen"]
            .as_array()
            .and_then(|l| {
                l.iter()
                    .filter_map(Value::as_str)
                    .find(|a| a.contains("/tcp/"))
            })
            .ok_or_else(|| anyhow!("no tcp listen address in {ready}"))?;
        let addr = if listen.contains("/p2p/") {
            listen.to_string()
        } else {
            format!("{listen}/p2p/{peer}")
        };
        Ok(Self {
            child,
            addr,
            _data: data,
        })
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

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
    bob.stop_daemon()?;
    let bob_peer = bob.json(&["id"])?["peer_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    wait_until("alice to see bob go", DEADLINE, || {
        let status = alice.json(&["status"])?;
        let still = status["peers"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p["peer_id"] == bob_peer.as_str()));
        Ok((!still).then_some(()))
    })?;
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

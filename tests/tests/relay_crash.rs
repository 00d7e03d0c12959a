//! Crash safety of the relay, with real processes: the relay is killed
//! with SIGKILL right after it acknowledged deposits (no drain, no clean
//! shutdown); restarted on the same port and data directory, it is the same
//! relay, and every envelope it acknowledged is still delivered, exactly
//! once, in order.

use std::collections::HashSet;
use std::os::unix::process::ExitStatusExt;
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail, ensure};
use serde_json::Value;
use weft_e2e::relay::Relay;
use weft_e2e::{DEADLINE, Weft, wait_until};

/// Messages alice leaves for bob.
const N: usize = 20;
/// The prefix of their texts.
const PREFIX: &str = "crash-";
/// SIGKILL's number (on every Unix this runs on).
const SIGKILL: i32 = 9;
/// How long bob may take to get them all from the restarted relay.
const DELIVERY: Duration = Duration::from_secs(60);

fn texts_with(ms: &[Value], prefix: &str) -> Vec<String> {
    ms.iter()
        .filter_map(|m| m["text"].as_str())
        .filter(|t| t.starts_with(prefix))
        .map(str::to_string)
        .collect()
}

/// Everything the test runs; its logs go into the report when it fails.
struct Crash {
    data: tempfile::TempDir,
    port: u16,
    first: Relay,
    second: Option<Relay>,
    alice: Weft,
    bob: Weft,
}

impl Crash {
    fn new() -> anyhow::Result<Self> {
        let data = tempfile::Builder::new()
            .prefix("weft-relay-crash-")
            .tempdir()
            .context("creating the relay's data directory")?;
        // Port 0: the relay binds a free port itself, which the restart
        // then takes again.
        let first = Relay::start_in(data.path())?;
        let port = first.tcp_port()?;
        Ok(Self {
            data,
            port,
            first,
            second: None,
            alice: Weft::new("alice")?,
            bob: Weft::new("bob")?,
        })
    }

    fn logs(&self) -> String {
        let mut text = format!(
            "--- relay before the crash ---\n{}\n",
            self.first.log().trim_end()
        );
        if let Some(second) = &self.second {
            text.push_str(&format!(
                "--- relay after the restart ---\n{}\n",
                second.log().trim_end()
            ));
        }
        text.push_str(&self.alice.daemon_logs());
        text.push_str(&self.bob.daemon_logs());
        text
    }

    fn run(&mut self) -> anyhow::Result<()> {
        let first_addr = self.first.addr.clone();
        let first_peer = self.first.peer_id.clone();
        let alice = &mut self.alice;
        let bob = &mut self.bob;
        alice.init()?;
        bob.init()?;
        let with_relay = ["--relay", first_addr.as_str()];
        alice.start_daemon(&with_relay)?;
        bob.start_daemon(&with_relay)?;
        // Invites made while the daemons run carry the relay circuit address.
        alice.add_contact(bob)?;
        bob.add_contact(alice)?;
        alice.ok(&["send", "bob", "hello"])?;
        bob.wait_for_message("alice", "hello")?;
        // Both devices hold a mailbox at the relay: bob's is where alice's
        // deposits go while he is away.
        let relay = &self.first;
        wait_until("both mailboxes to be registered", DEADLINE, || {
            let mailboxes = relay.metric("weft_relay_mailboxes")?.unwrap_or(0.0);
            Ok((mailboxes >= 2.0).then_some(()))
        })?;

        // Bob goes away.
        alice.see_stop(bob)?;

        // Alice writes; each message turns `relayed` when the relay has
        // answered `Deposited`, which it does only after its commit.
        let watch = alice.spawn(&["--json", "watch"])?;
        watch.wait_for_stderr("watch to subscribe", |l| l.contains("watching"))?;
        let mut ids = Vec::with_capacity(N);
        for i in 0..N {
            let sent = alice.json(&["send", "bob", &format!("{PREFIX}{i:02}")])?;
            let id = sent["id"]
                .as_str()
                .ok_or_else(|| anyhow!("no id in {sent}"))?;
            ids.push(id.to_string());
        }
        let mut waiting: HashSet<&str> = ids.iter().map(String::as_str).collect();
        let mut relayed: HashSet<String> = HashSet::new();
        let deadline = Instant::now() + DEADLINE;
        while waiting.iter().any(|id| !relayed.contains(*id)) {
            let left = deadline.saturating_duration_since(Instant::now());
            match watch.stdout.recv_timeout(left) {
                Ok(line) => {
                    let Ok(event) = serde_json::from_str::<Value>(&line) else {
                        continue;
                    };
                    if event["type"] == "status"
                        && event["status"] == "relayed"
                        && let Some(id) = event["id"].as_str()
                    {
                        relayed.insert(id.to_string());
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    waiting.retain(|id| !relayed.contains(*id));
                    bail!(
                        "timed out after {DEADLINE:?}: {} of {N} messages not relayed",
                        waiting.len()
                    );
                }
                Err(RecvTimeoutError::Disconnected) => bail!("alice's watch ended"),
            }
        }

        // Every deposit acknowledged: the relay crashes at once.
        let killed = self.first.kill_hard()?;
        ensure!(
            killed.signal() == Some(SIGKILL),
            "the relay was not killed by SIGKILL: {killed}"
        );
        drop(watch);
        let statuses: Vec<String> = alice
            .messages("bob")?
            .iter()
            .filter(|m| m["text"].as_str().is_some_and(|t| t.starts_with(PREFIX)))
            .map(|m| m["status"].as_str().unwrap_or_default().to_string())
            .collect();
        ensure!(
            statuses.len() == N && statuses.iter().all(|s| s == "relayed"),
            "alice's messages are not all relayed: {statuses:?}"
        );
        // Alice goes away too: nothing can reach bob but what the relay
        // kept.
        alice.stop_daemon()?;

        // The relay comes back: same port, same data, same identity.
        // The port has been free since the crash; were another process to
        // take it in between, the restart fails here, saying so.
        let port = self.port;
        let restarted = Relay::start_at(port, self.data.path()).with_context(|| {
            format!("restarting the relay on port {port}, free since the crash")
        })?;
        let second = self.second.insert(restarted);
        ensure!(
            second.peer_id == first_peer,
            "the restarted relay has another peer id: {} (was {first_peer})",
            second.peer_id
        );
        ensure!(
            second.addr == first_addr,
            "the restarted relay is elsewhere: {} (was {first_addr})",
            second.addr
        );
        let stored = second
            .metric("weft_relay_stored_envelopes")?
            .ok_or_else(|| anyhow!("no weft_relay_stored_envelopes metric"))?;
        ensure!(
            stored >= N as f64,
            "the restarted relay holds {stored} envelopes, fewer than the {N} it acknowledged"
        );

        // Bob comes back knowing only the relay: everything is there.
        let second_addr = second.addr.clone();
        bob.start_daemon(&["--relay", second_addr.as_str()])?;
        let ms = wait_until(&format!("bob to get {PREFIX}*"), DELIVERY, || {
            let ms = bob.messages("alice")?;
            Ok((texts_with(&ms, PREFIX).len() >= N).then_some(ms))
        })?;
        let expected: Vec<String> = (0..N).map(|i| format!("{PREFIX}{i:02}")).collect();
        assert_eq!(texts_with(&ms, PREFIX), expected, "exactly once, in order");
        let got: Vec<&str> = ms
            .iter()
            .filter(|m| m["text"].as_str().is_some_and(|t| t.starts_with(PREFIX)))
            .filter_map(|m| m["id"].as_str())
            .collect();
        let unique: HashSet<&str> = got.iter().copied().collect();
        assert_eq!(unique.len(), N, "no message twice: {got:?}");
        let sent: HashSet<&str> = ids.iter().map(String::as_str).collect();
        assert_eq!(unique, sent, "bob got the very messages alice sent");
        Ok(())
    }
}

#[test]
fn acknowledged_deposits_survive_a_relay_crash() -> anyhow::Result<()> {
    let mut crash = Crash::new()?;
    let result = crash.run();
    result.map_err(|err| err.context(format!("logs:\n{}", crash.logs())))
}

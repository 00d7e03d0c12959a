//! Circuit relay v2 end to end: alice and bob sit in two network
//! namespaces that can each reach a relay's namespace but not each other
//! (the relay's namespace forwards nothing, as if both were behind NATs
//! that only let them out to the relay). Each daemon is given the relay
//! (`--relay`), reserves a slot there and listens on a relayed address;
//! their invites carry circuit addresses through the relay; they connect
//! through it and exchange messages both ways. The relay's circuits are
//! cut short (32 KiB, where the default is 128 KiB or 2 minutes): a burst
//! larger than that ends the circuit, and the nodes carry on through a
//! new one, losing nothing.
//!
//! Needs root, `ip` (iproute2), bash and timeout. Where namespaces cannot
//! be created the test says so and skips, except under CI (`CI` set),
//! where it fails. `RUST_LOG=weft_node=debug` reaches the daemons (their
//! logs are printed on failure).

use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use serde_json::Value;
use weft_e2e::invite::{contains, invite_bytes};
use weft_e2e::netns_hub::{A, B, HUB, Hub};
use weft_e2e::relay::relay_bin;
use weft_e2e::{DEADLINE, Weft, wait_until};

/// How long each step may take.
const STEP: Duration = Duration::from_secs(60);
/// Bytes a circuit through the relay may carry before the relay ends it.
const CIRCUIT_BYTES: usize = 32 * 1024;

/// `weft-relay` running in the hub namespace, killed on drop.
struct NsRelay {
    child: Child,
    peer_id: String,
    /// Its TCP address with `/p2p/<peer id>`.
    addr: String,
    port: u16,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl NsRelay {
    fn start(netns: &str, listen: &str) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("weft-nat-relay-")
            .tempdir()?;
        let data = dir.path().join("data");
        let config = dir.path().join("relay.toml");
        std::fs::write(
            &config,
            format!("[circuit_relay]\nmax_circuit_bytes = {CIRCUIT_BYTES}\n"),
        )?;
        let log = dir.path().join("relay.log");
        let mut child = Command::new("ip")
            .args(["netns", "exec", netns])
            .arg(relay_bin()?)
            .args(["--json", "--listen", listen, "--metrics", "127.0.0.1:0"])
            .arg("--data")
            .arg(&data)
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(std::fs::File::create(&log)?))
            .spawn()
            .context("starting weft-relay in the hub namespace")?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut relay = Self {
            child,
            peer_id: String::new(),
            addr: String::new(),
            port: 0,
            log,
            _dir: dir,
        };
        let ready = loop {
            let line = rx.recv_timeout(DEADLINE).map_err(|e| {
                anyhow!(
                    "weft-relay printed no ready line ({e}); its log:\n{}",
                    relay.log()
                )
            })?;
            if let Ok(v) = serde_json::from_str::<Value>(&line)
                && v["event"] == "ready"
            {
                break v;
            }
        };
        relay.peer_id = ready["peer_id"]
            .as_str()
            .ok_or_else(|| anyhow!("no peer_id in {ready}"))?
            .to_string();
        let tcp = ready["listen"]
            .as_array()
            .and_then(|l| {
                l.iter()
                    .filter_map(Value::as_str)
                    .find(|a| a.contains("/tcp/"))
            })
            .ok_or_else(|| anyhow!("no tcp listen address in {ready}"))?
            .to_string();
        relay.port = port_of(&tcp)?;
        relay.addr = if tcp.contains("/p2p/") {
            tcp
        } else {
            format!("{tcp}/p2p/{}", relay.peer_id)
        };
        Ok(relay)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for NsRelay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The TCP port of a multiaddr `/ip4/…/tcp/PORT…`.
fn port_of(addr: &str) -> anyhow::Result<u16> {
    let mut parts = addr.split('/');
    parts
        .by_ref()
        .find(|p| *p == "tcp")
        .ok_or_else(|| anyhow!("no tcp in {addr}"))?;
    parts
        .next()
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| anyhow!("no tcp port in {addr}"))
}

/// The addresses `node`'s status lists for its connection to `peer_id`,
/// if connected.
fn connection_addrs(node: &Weft, peer_id: &str) -> anyhow::Result<Option<Vec<String>>> {
    let status = node.json(&["status"])?;
    Ok(status["peers"].as_array().and_then(|peers| {
        peers.iter().find(|p| p["peer_id"] == peer_id).map(|p| {
            p["addrs"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default()
        })
    }))
}

/// Waits until `node` listens on a circuit address through the relay.
fn wait_relayed_listen(node: &Weft, relay_peer: &str) -> anyhow::Result<String> {
    let needle = format!("/p2p/{relay_peer}/p2p-circuit");
    wait_until(
        &format!("{} to listen through the relay", node.name),
        STEP,
        || {
            let status = node.json(&["status"])?;
            Ok(status["listen"].as_array().and_then(|l| {
                l.iter()
                    .filter_map(Value::as_str)
                    .find(|a| a.contains(&needle))
                    .map(str::to_string)
            }))
        },
    )
}

fn wait_for_text(node: &Weft, target: &str, text: &str) -> anyhow::Result<Value> {
    wait_until(
        &format!("{} to see \"{text}\" in {target}", node.name),
        STEP,
        || {
            Ok(node
                .messages(target)?
                .into_iter()
                .find(|m| m["text"] == text))
        },
    )
}

#[test]
fn nodes_behind_nat_talk_through_a_circuit_relay() -> anyhow::Result<()> {
    let Some(hub) = Hub::create_or_skip(
        "nodes_behind_nat_talk_through_a_circuit_relay",
        "the NAT / circuit relay test",
    )?
    else {
        return Ok(());
    };
    let relay = NsRelay::start(&hub.names[HUB], &format!("/ip4/{}/tcp/0", hub.service))?;
    let mut alice = Weft::new("alice")?;
    let mut bob = Weft::new("bob")?;
    let started = Instant::now();
    let outcome = run(&hub, &relay, &mut alice, &mut bob);
    match &outcome {
        Ok(()) => eprintln!(
            "circuit relay test passed in {:.1} s",
            started.elapsed().as_secs_f64()
        ),
        Err(_) => eprintln!(
            "{}{}--- relay ---\n{}",
            alice.daemon_logs(),
            bob.daemon_logs(),
            relay.log()
        ),
    }
    outcome
}

fn run(hub: &Hub, relay: &NsRelay, alice: &mut Weft, bob: &mut Weft) -> anyhow::Result<()> {
    // The topology: each side reaches the relay, not the other side.
    for side in [A, B] {
        if !hub.tcp_reachable(side, &hub.service, relay.port)? {
            bail!("{} cannot reach the relay", hub.names[side]);
        }
    }
    alice.init()?;
    bob.init()?;
    let listen = |side: usize| format!("/ip4/{}/tcp/0", hub.addrs[side]);
    let alice_peer = alice
        .start_daemon_in(
            &hub.names[A],
            &["--no-mdns", "--listen", &listen(A), "--relay", &relay.addr],
        )?
        .peer_id
        .clone();
    let bob_peer = bob
        .start_daemon_in(
            &hub.names[B],
            &["--no-mdns", "--listen", &listen(B), "--relay", &relay.addr],
        )?
        .peer_id
        .clone();
    let t0 = Instant::now();
    // Neither reaches the other's own listener (which is up: the daemons
    // printed their ready lines).
    let bob_port = port_of(&bob.daemon()?.dial_addr()?)?;
    let alice_port = port_of(&alice.daemon()?.dial_addr()?)?;
    // Both probes at once: each waits out its 3 s timeout.
    let (a_to_b, b_to_a) = std::thread::scope(|s| {
        let a_to_b = s.spawn(|| hub.tcp_reachable(A, &hub.addrs[B], bob_port));
        let b_to_a = hub.tcp_reachable(B, &hub.addrs[A], alice_port);
        (a_to_b.join(), b_to_a)
    });
    if a_to_b.map_err(|_| anyhow!("the probe thread panicked"))?? {
        bail!("alice's namespace reaches bob's listener directly");
    }
    if b_to_a? {
        bail!("bob's namespace reaches alice's listener directly");
    }

    // Both reserve a slot at the relay and listen on a relayed address.
    let alice_circuit = wait_relayed_listen(alice, &relay.peer_id)?;
    let bob_circuit = wait_relayed_listen(bob, &relay.peer_id)?;
    eprintln!(
        "listening through the relay after {:.1} s: {alice_circuit}, {bob_circuit}",
        t0.elapsed().as_secs_f64()
    );

    // The invites carry circuit addresses through the relay.
    for (node, peer) in [(&*alice, &alice_peer), (&*bob, &bob_peer)] {
        let bytes = invite_bytes(&node.invite()?)?;
        let circuit = format!(
            "/ip4/{}/tcp/{}/p2p/{}/p2p-circuit/p2p/{peer}",
            hub.service, relay.port, relay.peer_id
        );
        if !contains(&bytes, circuit.as_bytes()) {
            bail!("{}'s invite lacks the circuit address {circuit}", node.name);
        }
    }
    alice.add_contact(bob)?;
    bob.add_contact(alice)?;

    // They connect, through the relay: nothing else joins them.
    let (alice_sees, bob_sees) = wait_until("alice and bob to connect", STEP, || {
        match (
            connection_addrs(alice, &bob_peer)?,
            connection_addrs(bob, &alice_peer)?,
        ) {
            (Some(a), Some(b)) => Ok(Some((a, b))),
            _ => Ok(None),
        }
    })?;
    eprintln!(
        "connected after {:.1} s: alice sees bob at {alice_sees:?}, bob sees alice at {bob_sees:?}",
        t0.elapsed().as_secs_f64()
    );
    let relayed = alice_sees
        .iter()
        .chain(&bob_sees)
        .any(|a| a.contains("/p2p-circuit/"));
    if !relayed {
        bail!("no circuit address among the connection's: {alice_sees:?} {bob_sees:?}");
    }
    for (addrs, other) in [(&alice_sees, &hub.addrs[B]), (&bob_sees, &hub.addrs[A])] {
        if let Some(direct) = addrs
            .iter()
            .find(|a| a.starts_with(&format!("/ip4/{other}/")))
        {
            bail!("a direct connection to {direct}, which must be unreachable");
        }
    }

    let sent_at = Instant::now();
    alice.ok(&["send", "bob", "hello through the relay"])?;
    wait_for_text(bob, "alice", "hello through the relay")?;
    bob.ok(&["send", "alice", "and back through it"])?;
    wait_for_text(alice, "bob", "and back through it")?;
    eprintln!(
        "both messages arrived {:.1} s after the first was sent ({:.1} s after start)",
        sent_at.elapsed().as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );

    // A burst well over the circuit's byte limit: the relay ends the
    // circuit midway; the nodes connect again through a new one (or the
    // relay's mailbox holds what was in flight), and all of it arrives.
    let watch = bob.spawn(&["watch", "--json"])?;
    let filler = "x".repeat(1000);
    let burst = 48;
    for i in 0..burst {
        alice.ok(&["send", "bob", &format!("burst-{i} {filler}")])?;
    }
    let gone = format!("\"peer_id\":\"{alice_peer}\"");
    watch.wait_for_line("the circuit to end", |l| {
        l.contains(&gone) && l.contains("\"connected\":false")
    })?;
    let texts = wait_until("bob to get the whole burst", STEP, || {
        let texts: Vec<String> = bob
            .messages("alice")?
            .iter()
            .filter_map(|m| m["text"].as_str())
            .filter(|t| t.starts_with("burst-"))
            .map(|t| t.split(' ').next().unwrap_or_default().to_string())
            .collect();
        Ok((texts.len() >= burst).then_some(texts))
    })?;
    let expected: Vec<String> = (0..burst).map(|i| format!("burst-{i}")).collect();
    assert_eq!(texts, expected, "the burst, once each, in order");
    bob.ok(&["send", "alice", "after the circuit ended"])?;
    wait_for_text(alice, "bob", "after the circuit ended")?;
    eprintln!(
        "the burst crossed an ended circuit; all done {:.1} s after start",
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

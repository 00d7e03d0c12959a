//! Reconnection end to end: two `weft daemon`s in two network namespaces
//! joined by a veth pair. Alice's interface goes away (link down, address
//! flushed) long enough for both nodes to drop the connection, and comes
//! back; without a restart, the nodes redial each other (bob's redials
//! are seen failing while the link is down; backoff: base 1 s, max 30 s,
//! jitter), what alice sent while cut off arrives, and the reply goes back.
//!
//! Needs root and `ip` (iproute2). Where namespaces cannot be created the
//! test says so and skips, except under CI (`CI` set), where it fails.
//! `RUST_LOG=weft_node=debug` reaches the daemons (their logs are printed
//! on failure).

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;
use weft_e2e::netns::Netns;
use weft_e2e::{Weft, wait_until};

/// How long the outage may take to be noticed: failed pings (every 5 s,
/// 10 s timeout) close the connection, and the namespaces' TCP gives up on
/// unanswered data after ~3 s.
const NOTICE: Duration = Duration::from_secs(60);
/// How long delivery may take once the link is back: the redial backoff is
/// at most 30 s (45 s with jitter), plus the dial itself.
const RESUME: Duration = Duration::from_secs(60);

/// Failed redials of alice that bob must make before the link comes back.
const FAILED_REDIALS: usize = 2;

/// Waits until bob's namespace (side 1) has tried and failed to reach
/// alice's address `count` times, judging by its neighbour entry for it.
/// Call it after the old connection is gone: anything that tries to reach
/// alice then is a new dial.
fn bob_failed_redials(ns: &Netns, count: usize) -> anyhow::Result<()> {
    // Earlier entries come from the old connection's retransmissions.
    ns.flush_neighbour(1)?;
    let mut failed = 0;
    let mut probing = false;
    let what = format!("bob to fail {count} redials of alice");
    let reached = wait_until(&what, NOTICE + RESUME, || {
        match ns.neighbour_state(1)?.as_deref() {
            Some("INCOMPLETE") => probing = true,
            Some("FAILED") => {
                failed += 1;
                probing = false;
                ns.flush_neighbour(1)?;
            }
            // Gone after probing: a FAILED entry collected in between.
            None if probing => {
                failed += 1;
                probing = false;
            }
            None => {}
            Some(state) => return Ok(Some(Some(state.to_string()))),
        }
        Ok((failed >= count).then_some(None))
    })?;
    match reached {
        Some(state) => bail!("bob's entry for alice's address is {state} while her link is down"),
        None => Ok(()),
    }
}

/// Whether `node`'s daemon is connected to the peer `peer_id`.
fn connected(node: &Weft, peer_id: &str) -> anyhow::Result<bool> {
    let status = node.json(&["status"])?;
    Ok(status["peers"]
        .as_array()
        .is_some_and(|peers| peers.iter().any(|p| p["peer_id"] == peer_id)))
}

/// Waits up to `timeout` for a message with `text` in `node`'s
/// conversation `target`.
fn wait_for_text(
    node: &Weft,
    target: &str,
    text: &str,
    timeout: Duration,
) -> anyhow::Result<Value> {
    let what = format!("{} to see \"{text}\" in {target}", node.name);
    wait_until(&what, timeout, || {
        Ok(node
            .messages(target)?
            .into_iter()
            .find(|m| m["text"] == text))
    })
}

#[test]
fn reconnects_after_the_network_comes_back() -> anyhow::Result<()> {
    let Some(ns) = Netns::create_or_skip(
        "reconnects_after_the_network_comes_back",
        "the reconnection test",
        false,
    )?
    else {
        return Ok(());
    };
    // The node closes a connection whose pings fail (~30 s here); the
    // kernel would otherwise keep retransmitting on the dead socket for
    // ~15 minutes, and those retransmissions would muddle the neighbour
    // table this test reads redials from. 3 retries (~3 s) keeps the test
    // short. Per namespace, so the host is untouched.
    for side in 0..2 {
        ns.sysctl(side, "net.ipv4.tcp_retries2", "3")?;
    }
    let mut alice = Weft::new("alice")?;
    let mut bob = Weft::new("bob")?;
    let outcome = run(&ns, &mut alice, &mut bob);
    if outcome.is_err() {
        eprintln!("{}{}", alice.daemon_logs(), bob.daemon_logs());
    }
    outcome
}

fn run(ns: &Netns, alice: &mut Weft, bob: &mut Weft) -> anyhow::Result<()> {
    alice.init()?;
    bob.init()?;
    alice.add_contact(bob)?;
    bob.add_contact(alice)?;
    let listen = |side: usize| format!("/ip4/{}/tcp/0", ns.addrs[side]);
    let alice_peer = alice
        .start_daemon_in(&ns.names[0], &["--no-mdns", "--listen", &listen(0)])?
        .peer_id
        .clone();
    let alice_addr = alice.daemon()?.dial_addr()?;
    let bob_peer = bob
        .start_daemon_in(
            &ns.names[1],
            &[
                "--no-mdns",
                "--listen",
                &listen(1),
                "--bootstrap",
                &alice_addr,
            ],
        )?
        .peer_id
        .clone();

    alice.ok(&["send", "bob", "before"])?;
    wait_for_text(bob, "alice", "before", RESUME)?;

    // The network goes away.
    ns.link_down(0)?;
    let down_at = Instant::now();
    let sent = alice.json(&["send", "bob", "while-down"])?;
    let status = sent["status"].as_str().unwrap_or_default();
    if status != "queued" && status != "sent" {
        bail!("sending while down: unexpected status in {sent}");
    }
    // Both ends must see the connection die, so that only a redial can
    // bring them together again.
    wait_until("bob to notice alice is gone", NOTICE, || {
        Ok((!connected(bob, &alice_peer)?).then_some(()))
    })?;
    wait_until("alice to notice bob is gone", NOTICE, || {
        Ok((!connected(alice, &bob_peer)?).then_some(()))
    })?;
    eprintln!(
        "both nodes saw the connection drop {:.1} s after link down",
        down_at.elapsed().as_secs_f64()
    );
    // Bob keeps redialing while alice is gone. Each attempt shows in bob's
    // neighbour (ARP) table: the entry for alice's address goes
    // INCOMPLETE while the dial waits for an answer, then FAILED (or is
    // collected) when it gives up. Two failed attempts, and the link stays
    // down between them: the redials back off and fail repeatedly.
    bob_failed_redials(ns, FAILED_REDIALS)?;
    eprintln!(
        "bob failed to redial alice {FAILED_REDIALS} times; link down for {:.1} s",
        down_at.elapsed().as_secs_f64()
    );
    let early = bob
        .messages("alice")?
        .into_iter()
        .any(|m| m["text"] == "while-down");
    if early {
        bail!("bob has \"while-down\" although alice's link was down");
    }

    // And comes back; neither daemon restarts.
    ns.link_up(0)?;
    let up_at = Instant::now();
    wait_for_text(bob, "alice", "while-down", RESUME).context("after the link came back")?;
    let delivered = up_at.elapsed();
    eprintln!(
        "bob got \"while-down\" {:.1} s after link up (down for {:.1} s)",
        delivered.as_secs_f64(),
        (up_at - down_at).as_secs_f64()
    );
    wait_until("bob to be connected to alice again", RESUME, || {
        Ok(connected(bob, &alice_peer)?.then_some(()))
    })?;

    bob.ok(&["send", "alice", "welcome back"])?;
    wait_for_text(alice, "bob", "welcome back", RESUME)?;
    eprintln!(
        "alice got the reply {:.1} s after link up",
        up_at.elapsed().as_secs_f64()
    );
    Ok(())
}

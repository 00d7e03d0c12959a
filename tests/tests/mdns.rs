//! mDNS discovery end to end: two `weft daemon`s in two network
//! namespaces joined by a veth pair find each other with no address given
//! (mdns-sd, `_weft._udp.local.`) and exchange a message.
//!
//! Needs root and `ip` (iproute2). Where namespaces cannot be created the
//! test says so and skips, except under CI (`CI` set), where it fails:
//! CI runs it for real. mDNS never touches the machine's real interfaces.

use weft_e2e::netns::Netns;
use weft_e2e::{DEADLINE, Weft, wait_until};

#[test]
fn mdns_discovery_across_namespaces() -> anyhow::Result<()> {
    let Some(ns) =
        Netns::create_or_skip("mdns_discovery_across_namespaces", "the mDNS test", true)?
    else {
        return Ok(());
    };
    let mut alice = Weft::new("alice")?;
    let mut bob = Weft::new("bob")?;
    alice.init()?;
    bob.init()?;
    // Invites made with no daemon running carry no address: discovery
    // must come from mDNS alone.
    alice.add_contact(&bob)?;
    bob.add_contact(&alice)?;
    alice.start_daemon_in(&ns.names[0], &["--listen", "/ip4/0.0.0.0/tcp/0"])?;
    bob.start_daemon_in(&ns.names[1], &["--listen", "/ip4/0.0.0.0/tcp/0"])?;
    // Either side may dial first; the other then sees an inbound peer.
    let via_mdns = |node: &Weft| -> anyhow::Result<bool> {
        let status = node.json(&["status"])?;
        Ok(status["peers"]
            .as_array()
            .is_some_and(|peers| peers.iter().any(|p| p["source"] == "mdns")))
    };
    wait_until("a peer found through mDNS", DEADLINE, || {
        Ok((via_mdns(&alice)? || via_mdns(&bob)?).then_some(()))
    })?;
    alice.ok(&["send", "bob", "hello over mdns"])?;
    bob.wait_for_message("alice", "hello over mdns")?;
    bob.ok(&["send", "alice", "and back"])?;
    alice.wait_for_message("bob", "and back")?;
    Ok(())
}

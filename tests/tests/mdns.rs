//! mDNS discovery end to end: two `weft daemon`s in two network
//! namespaces joined by a veth pair find each other with no address given
//! (mdns-sd, `_weft._udp.local.`) and exchange a message.
//!
//! Needs root and `ip` (iproute2). Where namespaces cannot be created the
//! test says so and skips, except under CI (`CI` set), where it fails:
//! CI runs it for real. mDNS never touches the machine's real interfaces.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use anyhow::{Context, bail};
use weft_e2e::{DEADLINE, Weft, wait_until, weft_bin};

/// Two namespaces and a veth pair, removed on drop.
struct Netns {
    names: [String; 2],
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Netns {
    fn create() -> anyhow::Result<Self> {
        // Unique per run: interface names are at most 15 bytes.
        let tag = format!(
            "{:x}",
            (std::process::id() as u64) << 8 | u64::from(rand_byte())
        );
        let names = [format!("weft-a-{tag}"), format!("weft-b-{tag}")];
        let ns = Netns {
            names: names.clone(),
        };
        let (va, vb) = (format!("wa{tag}"), format!("wb{tag}"));
        ip(&["netns", "add", &names[0]])?;
        ip(&["netns", "add", &names[1]])?;
        ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb])?;
        ip(&["link", "set", &va, "netns", &names[0]])?;
        ip(&["link", "set", &vb, "netns", &names[1]])?;
        let subnet = 1 + (std::process::id() % 250);
        for (n, dev, host) in [(&names[0], &va, 1), (&names[1], &vb, 2)] {
            ip(&[
                "-n",
                n,
                "addr",
                "add",
                &format!("10.213.{subnet}.{host}/24"),
                "dev",
                dev,
            ])?;
            ip(&["-n", n, "link", "set", dev, "up", "multicast", "on"])?;
            ip(&["-n", n, "link", "set", "lo", "up"])?;
            ip(&["-n", n, "route", "add", "224.0.0.0/4", "dev", dev])?;
        }
        Ok(ns)
    }
}

fn rand_byte() -> u8 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    (t % 251) as u8
}

impl Drop for Netns {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = ip(&["netns", "del", n]);
        }
    }
}

/// A daemon running inside a namespace; killed on drop.
struct NsDaemon {
    child: Child,
}

impl NsDaemon {
    fn start(ns: &str, node: &Weft) -> anyhow::Result<Self> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(weft_bin()?)
            .arg("--home")
            .arg(node.home())
            .args(["--json", "daemon", "--listen", "/ip4/0.0.0.0/tcp/0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting weft daemon in a namespace")?;
        let stdout = child.stdout.take().context("daemon stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            // Keep draining so the daemon never blocks on a full pipe.
            for _ in lines {}
        });
        let daemon = NsDaemon { child };
        let line = rx
            .recv_timeout(DEADLINE)
            .context("daemon never printed its ready line")?;
        let ready: serde_json::Value = serde_json::from_str(&line)?;
        if ready["event"] != "ready" {
            bail!("unexpected first line {line}");
        }
        Ok(daemon)
    }
}

impl Drop for NsDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn mdns_discovery_across_namespaces() -> anyhow::Result<()> {
    let ns = match Netns::create() {
        Ok(ns) => ns,
        Err(e) if std::env::var_os("CI").is_none() => {
            eprintln!(
                "skipping mdns_discovery_across_namespaces: cannot create network namespaces ({e:#}); it needs root and iproute2"
            );
            return Ok(());
        }
        Err(e) => {
            return Err(e.context("CI must run the mDNS test: cannot create network namespaces"));
        }
    };
    let alice = Weft::new("alice")?;
    let bob = Weft::new("bob")?;
    alice.init()?;
    bob.init()?;
    // Invites made with no daemon running carry no address: discovery
    // must come from mDNS alone.
    alice.add_contact(&bob)?;
    bob.add_contact(&alice)?;
    let _a = NsDaemon::start(&ns.names[0], &alice)?;
    let _b = NsDaemon::start(&ns.names[1], &bob)?;
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

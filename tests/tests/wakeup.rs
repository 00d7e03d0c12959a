//! Push wakeups, with real processes: a device that registered a
//! UnifiedPush endpoint and went away gets a content-free POST there when
//! mail arrives for it at its relay.

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, anyhow};
use serde_json::Value;
use weft_e2e::relay::relay_bin;
use weft_e2e::{DEADLINE, Weft, wait_until};

/// A relay that may POST to loopback (its operator allows private hosts),
/// killed on drop.
struct Relay {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Relay {
    fn start() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("weft-wakeup-").tempdir()?;
        let config = dir.path().join("relay.toml");
        std::fs::write(
            &config,
            "[wakeup]\nallow_private_hosts = true\nmin_interval_secs = 1\n",
        )?;
        let mut child = Command::new(relay_bin()?)
            .arg("--config")
            .arg(&config)
            .args([
                "--json",
                "--listen",
                "/ip4/127.0.0.1/tcp/0",
                "--metrics",
                "127.0.0.1:0",
                "--data",
            ])
            .arg(dir.path().join("data"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting weft-relay")?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let ready: Value = loop {
            let line = rx.recv_timeout(DEADLINE).context("no ready line")?;
            if let Ok(v) = serde_json::from_str::<Value>(&line)
                && v["event"] == "ready"
            {
                break v;
            }
        };
        let peer = ready["peer_id"]
            .as_str()
            .ok_or_else(|| anyhow!("no peer id"))?;
        let tcp = ready["listen"]
            .as_array()
            .and_then(|l| {
                l.iter()
                    .filter_map(Value::as_str)
                    .find(|a| a.contains("/tcp/"))
            })
            .ok_or_else(|| anyhow!("no tcp address in {ready}"))?;
        Ok(Self {
            addr: format!("{tcp}/p2p/{peer}"),
            child,
            _dir: dir,
        })
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP request as received: the request line and the body.
fn accept_one(listener: &TcpListener) -> anyhow::Result<(String, Vec<u8>)> {
    let (mut stream, _) = listener.accept()?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut length = 0usize;
    loop {
        let mut header = String::new();
        reader.read_line(&mut header)?;
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0u8; length.min(1 << 20)];
    reader.read_exact(&mut body)?;
    use std::io::Write;
    stream.write_all(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
    Ok((request_line.trim_end().to_string(), body))
}

#[test]
fn an_away_device_is_woken_without_content() -> anyhow::Result<()> {
    let relay = Relay::start()?;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let endpoint = format!("http://{}/wake/bob", listener.local_addr()?);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        while let Ok(request) = accept_one(&listener) {
            if tx.send(request).is_err() {
                break;
            }
        }
    });

    let mut alice = Weft::new("alice")?;
    let mut bob = Weft::new("bob")?;
    alice.init()?;
    bob.init()?;
    let with_relay = ["--relay", relay.addr.as_str()];
    alice.start_daemon(&with_relay)?;
    bob.start_daemon(&with_relay)?;
    alice.add_contact(&bob)?;
    bob.add_contact(&alice)?;
    bob.ok(&["push", "register", &endpoint])?;
    // Registered at the relay with the endpoint.
    wait_until("bob's mailbox at the relay", DEADLINE, || {
        let relays = bob.json(&["relay", "list"])?;
        Ok(relays
            .as_array()
            .is_some_and(|r| r.iter().any(|r| r["mailbox"].is_string()))
            .then_some(()))
    })?;
    alice.ok(&["send", "bob", "hello"])?;
    bob.wait_for_message("alice", "hello")?;

    alice.see_stop(&mut bob)?;
    // Nothing was posted while bob was here (he was told over his
    // connection instead); drain anything that came before.
    while rx.try_recv().is_ok() {}
    alice.ok(&["send", "bob", "wake up, the secret is 42"])?;
    let (line, body) = rx
        .recv_timeout(Duration::from_secs(30))
        .context("no wakeup POST reached the endpoint")?;
    assert!(line.starts_with("POST /wake/bob "), "{line}");
    let body = String::from_utf8_lossy(&body);
    assert!(
        !body.contains("secret") && !body.contains("42") && body.len() < 64,
        "a wakeup carries no content: {body:?}"
    );
    Ok(())
}

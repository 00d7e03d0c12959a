//! The `weft-relay` binary: the ready line, /healthz and /metrics,
//! `init-config`, configuration errors, and a graceful exit on SIGTERM.
//! Loopback only, ports chosen by the OS.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(30);

fn relay_command() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_weft-relay"));
    for (key, _) in std::env::vars() {
        if key.starts_with("WEFT_RELAY_") || key == "STATE_DIRECTORY" {
            cmd.env_remove(key);
        }
    }
    cmd.env("RUST_LOG", "warn");
    cmd
}

/// Kills the relay if the test fails before it has exited.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Lines of the child's stdout, read on a thread.
fn stdout_lines(child: &mut Child) -> mpsc::Receiver<String> {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// The child's exit status, within [`DEADLINE`].
fn wait(child: &mut Child) -> std::process::ExitStatus {
    let until = std::time::Instant::now() + DEADLINE;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(std::time::Instant::now() < until, "the relay did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn get(url: &str) -> (u16, String) {
    let agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .http_status_as_error(false)
        .build()
        .new_agent();
    let mut response = agent.get(url).call().unwrap();
    let status = response.status().as_u16();
    (status, response.body_mut().read_to_string().unwrap())
}

#[test]
fn it_announces_readiness_serves_health_and_metrics_and_drains_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let child = relay_command()
        .args([
            "--json",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--listen",
            "/ip4/127.0.0.1/udp/0/quic-v1",
            "--metrics",
            "127.0.0.1:0",
            "--data",
        ])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut child = Running(child);
    let lines = stdout_lines(&mut child.0);
    let ready = lines.recv_timeout(DEADLINE).expect("no ready line");
    let ready: serde_json::Value = serde_json::from_str(&ready).unwrap();
    assert_eq!(ready["event"], "ready");
    let peer_id = ready["peer_id"].as_str().unwrap();
    assert!(peer_id.parse::<libp2p::PeerId>().is_ok());
    let listen: Vec<&str> = ready["listen"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(
        listen
            .iter()
            .any(|a| a.starts_with("/ip4/127.0.0.1/tcp/") && !a.ends_with("/tcp/0")),
        "{listen:?}"
    );
    assert!(listen.iter().any(|a| a.contains("/quic-v1")), "{listen:?}");
    let metrics = ready["metrics"].as_str().unwrap();

    let (status, body) = get(&format!("http://{metrics}/healthz"));
    assert_eq!((status, body.trim()), (200, "ok"));
    let (status, body) = get(&format!("http://{metrics}/metrics"));
    assert_eq!(status, 200);
    for name in [
        "weft_relay_mailboxes",
        "weft_relay_stored_envelopes",
        "weft_relay_deposits_total",
        "libp2p_swarm_",
    ] {
        assert!(body.contains(name), "{name} missing from /metrics:\n{body}");
    }
    // The key is kept, private.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("relay.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let status = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let stopped = lines.recv_timeout(DEADLINE).expect("no stopped line");
    assert!(stopped.contains("\"stopped\""), "{stopped}");
    let exit = wait(&mut child.0);
    assert!(exit.success(), "{exit:?}");

    // Same data directory, same identity.
    let again = relay_command()
        .args([
            "--json",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--metrics",
            "off",
            "--data",
        ])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut again = Running(again);
    let lines = stdout_lines(&mut again.0);
    let ready: serde_json::Value =
        serde_json::from_str(&lines.recv_timeout(DEADLINE).unwrap()).unwrap();
    assert_eq!(ready["peer_id"].as_str().unwrap(), peer_id);
    assert!(ready["metrics"].is_null());
    Command::new("kill")
        .args(["-INT", &again.0.id().to_string()])
        .status()
        .unwrap();
    assert!(wait(&mut again.0).success());
}

#[test]
fn init_config_prints_a_config_that_loads_and_unknown_keys_are_refused() {
    let out = relay_command().arg("init-config").output().unwrap();
    assert!(out.status.success());
    let example = String::from_utf8(out.stdout).unwrap();
    assert!(example.contains("[storage]"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.toml");
    std::fs::write(&path, format!("{example}\n[extra]\nkey = 1\n")).unwrap();
    let out = relay_command().arg("--config").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("extra"), "{stderr}");
    // A bad value from the environment is refused too.
    let out = relay_command()
        .env("WEFT_RELAY_METRICS", "nowhere")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("metrics"));
}

/// A listen address already taken: the relay exits with the OS's reason,
/// said once.
#[test]
fn a_port_in_use_is_refused_with_the_reason() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let mut child = relay_command()
        .arg("--listen")
        .arg(format!("/ip4/127.0.0.1/tcp/{port}"))
        .arg("--data")
        .arg(dir.path())
        .arg("--metrics")
        .arg("off")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait(&mut child);
    assert!(!status.success());
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    let error = stderr
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no error line in {stderr}"));
    assert!(error.contains("Address already in use"), "{error}");
    assert_eq!(error.matches("cannot listen").count(), 1, "{error}");
}

//! The real `weft-relay` binary as a child process, for tests and
//! benches: started with a TOML configuration on loopback (ports chosen
//! by the OS), its ready line read with a deadline, killed on drop; and
//! what can be read of it from outside: resident memory, CPU time, the
//! size of its data directory, its /metrics.

// Shared by several test and bench targets, each using part of it.
#![allow(dead_code, clippy::expect_used, clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use libp2p::{Multiaddr, PeerId};

/// How long the relay may take to start.
const START_DEADLINE: Duration = Duration::from_secs(60);

/// A running `weft-relay`; killed (SIGKILL) and reaped on drop.
#[derive(Debug)]
pub struct RelayProcess {
    child: Child,
    pub peer_id: PeerId,
    /// Its TCP address, with `/p2p/<peer id>`.
    pub addr: Multiaddr,
    /// Where /metrics is served.
    pub metrics: String,
    pub data: PathBuf,
}

impl RelayProcess {
    /// Starts the relay with `config` (TOML; listen, metrics and data are
    /// set by flags) keeping its data in `data`.
    pub fn start(config: &str, data: &Path) -> RelayProcess {
        std::fs::create_dir_all(data).unwrap();
        let config_path = data.join("relay.toml");
        std::fs::write(&config_path, config).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_weft-relay"));
        for (key, _) in std::env::vars() {
            if key.starts_with("WEFT_RELAY_") || key == "STATE_DIRECTORY" {
                cmd.env_remove(key);
            }
        }
        let mut child = cmd
            .env("RUST_LOG", "warn")
            .args(["--json", "--listen", "/ip4/127.0.0.1/tcp/0"])
            .args(["--metrics", "127.0.0.1:0", "--config"])
            .arg(&config_path)
            .arg("--data")
            .arg(data)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawning weft-relay");
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
        let ready = match rx.recv_timeout(START_DEADLINE) {
            Ok(line) => line,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("no ready line from weft-relay: {e}");
            }
        };
        let ready: serde_json::Value = serde_json::from_str(&ready).unwrap();
        assert_eq!(ready["event"], "ready", "{ready}");
        let peer_id: PeerId = ready["peer_id"].as_str().unwrap().parse().unwrap();
        let listen = ready["listen"].as_array().unwrap();
        let addr: Multiaddr = listen
            .iter()
            .filter_map(|a| a.as_str())
            .find(|a| a.contains("/tcp/"))
            .unwrap()
            .parse()
            .unwrap();
        let addr = addr.with(libp2p::multiaddr::Protocol::P2p(peer_id));
        let metrics = ready["metrics"].as_str().unwrap().to_string();
        RelayProcess {
            child,
            peer_id,
            addr,
            metrics,
            data: data.to_path_buf(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its resident memory now and at its peak, in KiB (`VmRSS`, `VmHWM`).
    pub fn rss_kib(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap()
        };
        (field("VmRSS"), field("VmHWM"))
    }

    /// CPU time it has used (user + system).
    pub fn cpu(&self) -> Duration {
        cpu_of(self.pid())
    }

    /// Bytes of its database files (`relay.db` and its WAL and shared
    /// memory), as allocated on disk.
    pub fn disk_bytes(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        ["relay.db", "relay.db-wal", "relay.db-shm"]
            .iter()
            .filter_map(|f| std::fs::metadata(self.data.join(f)).ok())
            .map(|m| m.blocks() * 512)
            .sum()
    }

    /// The value of a metric (its first sample whose line starts with
    /// `name`), or 0 if it has none yet.
    pub fn metric(&self, name: &str) -> f64 {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .new_agent();
        let body = agent
            .get(format!("http://{}/metrics", self.metrics))
            .call()
            .unwrap()
            .body_mut()
            .read_to_string()
            .unwrap();
        body.lines()
            .filter(|l| !l.starts_with('#'))
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0.0)
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// Not every test that includes this file uses both.
#[allow(unused_imports)]
pub use weft_e2e::procfs::{cpu_of, threads_cpu};

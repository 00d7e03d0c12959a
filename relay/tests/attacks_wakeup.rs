//! Attacks on UnifiedPush wakeups (SSRF): a proxy named in the relay's
//! environment (`ALL_PROXY`, `HTTPS_PROXY`, `HTTP_PROXY`) must not carry
//! wakeup POSTs, since the relay's address filter checks the address it
//! connects to, and through a proxy that is the proxy's, not the target's.
//!
//! The environment is per process, so each wakeup runs in a child process
//! of this test binary (the ignored test [`wakeup_child`]) with one proxy
//! variable set. Loopback only, ports chosen by the OS; deadlines, not
//! sleeps.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use weft_relay::metrics::RelayMetrics;
use weft_relay::wakeup::{HttpWaker, HttpWakerConfig};

const DEADLINE: Duration = Duration::from_secs(30);

/// Tells [`wakeup_child`] the URL to wake; unset, it does nothing.
const CHILD_URL: &str = "WEFT_TEST_WAKEUP_URL";
/// What [`wakeup_child`] prints once its wakeup has been sent or failed.
const CHILD_DONE: &str = "wakeup attempt finished";

const PROXY_VARS: [&str; 6] = [
    "ALL_PROXY",
    "all_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
];

/// A push server on loopback answering each request with 201 and
/// reporting its request line.
fn push_server() -> (String, mpsc::Receiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            // The rest of the head; the body is empty.
            loop {
                let mut line = String::new();
                match reader.read_line(&mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) if line == "\r\n" => break,
                    Ok(_) => {}
                }
            }
            let _ = conn.write_all(
                b"HTTP/1.1 201 Created\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            );
            if tx.send(request_line.trim_end().to_string()).is_err() {
                break;
            }
        }
    });
    (base, rx)
}

/// The attack: the relay's environment names a proxy (here a listener of
/// this test on loopback, standing for any proxy that can reach what the
/// relay must not). Wakeups must go straight to the device's endpoint,
/// never through it.
///
/// The endpoint is on loopback and `allow_private` is on, because a test
/// may only talk to 127.0.0.1: once the proxy is ignored, the relay
/// connects to the endpoint itself. (With the filter on, a loopback proxy
/// is refused by the filter anyway; a real proxy is not on loopback.)
#[test]
fn wakeups_ignore_a_proxy_named_in_the_environment() {
    let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
    proxy.set_nonblocking(true).unwrap();
    let proxy_url = format!("http://{}", proxy.local_addr().unwrap());
    let (push_base, posts) = push_server();

    for var in PROXY_VARS {
        let path = format!("/up/{}", var.to_ascii_lowercase());
        let mut child = Command::new(std::env::current_exe().unwrap());
        child
            .args(["wakeup_child", "--exact", "--ignored", "--nocapture"])
            .env(CHILD_URL, format!("{push_base}{path}"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for other in PROXY_VARS.iter().chain(&["NO_PROXY", "no_proxy"]) {
            child.env_remove(other);
        }
        child.env(var, &proxy_url);
        let mut child = child.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });

        // The event: the child's wakeup was sent or failed.
        let until = Instant::now() + DEADLINE;
        let finished = loop {
            let left = until.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) if line.contains(CHILD_DONE) => break line,
                Ok(_) => {}
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("with {var} set, the child did not finish its wakeup");
                }
            }
        };
        let status = child.wait().unwrap();
        assert!(status.success(), "with {var} set, the child failed");

        // Any connection the relay made to the proxy is queued by now.
        match proxy.accept() {
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Ok((_, from)) => panic!(
                "with {var}={proxy_url} in the environment, the wakeup went to that \
                 proxy (connection from {from}; {finished})"
            ),
            Err(e) => panic!("accept on the proxy listener: {e}"),
        }
        let post = posts
            .recv_timeout(DEADLINE)
            .unwrap_or_else(|_| panic!("with {var} set, the endpoint got no wakeup ({finished})"));
        assert_eq!(post, format!("POST {path} HTTP/1.1"));
    }
}

/// Run by [`wakeups_ignore_a_proxy_named_in_the_environment`] in a child
/// process: sends one wakeup to `$WEFT_TEST_WAKEUP_URL` with the relay's
/// sender and reports when it has been sent or has failed.
#[tokio::test]
#[ignore = "a child process of wakeups_ignore_a_proxy_named_in_the_environment"]
async fn wakeup_child() {
    let Ok(url) = std::env::var(CHILD_URL) else {
        return;
    };
    let metrics = RelayMetrics::default();
    let waker = HttpWaker::spawn(
        HttpWakerConfig {
            timeout: Duration::from_secs(10),
            concurrency: 1,
            allow_private: true,
        },
        metrics.clone(),
    );
    assert!(waker.wake(url));
    let until = tokio::time::Instant::now() + DEADLINE;
    while metrics.wakeups_sent("http") + metrics.wakeup_failures() == 0 {
        assert!(tokio::time::Instant::now() < until, "no wakeup result");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!(
        "{CHILD_DONE}: sent {}, failed {}",
        metrics.wakeups_sent("http"),
        metrics.wakeup_failures()
    );
}

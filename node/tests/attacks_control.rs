//! Attacks on the local control socket (issue 13, hole 7). Whoever talks
//! to the socket acts as the account (`devices link` hands out the keys),
//! so: another local user is refused even if they reach the socket; the
//! socket only ever lives in a private directory; and a home or key file
//! that others can read or write is refused at start, with the fix.
//!
//! The other-uid test runs a client as uid 65534 (it needs root to switch
//! uid, which CI has); that client is this test binary itself, run with
//! the ignored test `other_uid_client`.

#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use common::{DEADLINE, TestNode};
use weft_node::api::{Reply, Request};
use weft_node::control::{ControlClient, serve};
use weft_node::home::Home;
use weft_node::{Node, NodeConfig};

/// The uid the attacker runs as (nobody).
const OTHER_UID: u32 = 65534;
/// Tells `other_uid_client` which socket to attack.
const SOCKET_ENV: &str = "WEFT_ATTACK_CONTROL_SOCKET";

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

fn mode_of(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

/// Not a test on its own: the attacker's client, run as another uid by
/// `another_uid_cannot_use_the_control_socket`. It asks for a device link
/// code (the account takeover) and prints its uid and the answer.
#[test]
#[ignore = "the attacker's client: run as another uid by another_uid_cannot_use_the_control_socket"]
fn other_uid_client() {
    let Ok(socket) = std::env::var(SOCKET_ENV) else {
        return;
    };
    // /proc/self belongs to whoever this process runs as.
    println!("UID {}", fs::metadata("/proc/self").unwrap().uid());
    let mut stream = match std::os::unix::net::UnixStream::connect(&socket) {
        Ok(s) => s,
        Err(e) => {
            println!("CONNECT-ERROR {e}");
            return;
        }
    };
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    // The daemon may hang up before reading: its answer is what counts.
    let _ = stream.write_all(b"{\"cmd\":\"devices_link\"}\n");
    let mut answer = String::new();
    match BufReader::new(stream).read_line(&mut answer) {
        Ok(_) => println!("REPLY {}", answer.trim_end()),
        Err(e) => println!("READ-ERROR {e}"),
    }
}

/// Runs `other_uid_client` as `OTHER_UID` against `socket`; its stdout.
async fn attack_as_other_uid(socket: &Path) -> String {
    let exe = std::env::current_exe().unwrap();
    let run = |exe: PathBuf| {
        let mut command = tokio::process::Command::new(exe);
        command
            .args(["other_uid_client", "--exact", "--ignored", "--nocapture"])
            .args(["--test-threads=1"])
            .env(SOCKET_ENV, socket)
            .uid(OTHER_UID)
            .gid(OTHER_UID)
            .kill_on_drop(true);
        command
    };
    let finished = |out: Result<std::io::Result<std::process::Output>, _>| {
        out.expect("the attacker's client did not finish in time")
    };
    let output = match finished(tokio::time::timeout(DEADLINE, run(exe.clone()).output()).await) {
        Ok(out) => out,
        // The target dir may be private (under /root): run a copy from a
        // directory the other uid can enter.
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            let dir = tempfile::Builder::new()
                .prefix("weft-attacker-")
                .tempdir()
                .unwrap();
            chmod(dir.path(), 0o755);
            let copy = dir.path().join("client");
            fs::copy(&exe, &copy).unwrap();
            chmod(&copy, 0o755);
            let out = finished(tokio::time::timeout(DEADLINE, run(copy).output()).await).unwrap();
            drop(dir);
            out
        }
        Err(e) => panic!("cannot run the attacker's client: {e}"),
    };
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(
        stdout.contains(&format!("UID {OTHER_UID}")),
        "the attacker's client did not run as uid {OTHER_UID}: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// Another local user who reaches the socket (here the test opens the
/// directory and the socket to everyone, as a careless `chmod` or a
/// filesystem without modes would) still gets nothing: the daemon checks
/// the caller's uid (SO_PEERCRED) and refuses before reading a request.
/// Today that caller gets a device link code: an account takeover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_uid_cannot_use_the_control_socket() {
    if fs::metadata("/proc/self").unwrap().uid() != 0 {
        eprintln!(
            "\n!!! SKIPPED another_uid_cannot_use_the_control_socket: it must run as root \
             to start a client as uid {OTHER_UID}; NOTHING WAS TESTED !!!\n"
        );
        return;
    }
    let mut alice = TestNode::start("alice", 1, &[]).await;
    let home = Home::new(alice.dir.path().join("home"));
    let server = serve(alice.handle.clone(), &home.socket_path())
        .await
        .unwrap();
    // Open the way to the socket, so that only the uid check stands.
    chmod(alice.dir.path(), 0o711);
    chmod(home.dir(), 0o711);
    chmod(&home.socket_path(), 0o666);

    let stdout = attack_as_other_uid(&home.socket_path()).await;
    let reply = stdout
        .lines()
        .find_map(|l| l.strip_prefix("REPLY "))
        .unwrap_or_else(|| panic!("the attacker got no answer at all: {stdout}"));
    let reply: Reply = serde_json::from_str(reply).unwrap_or_else(|e| panic!("{e}: {reply}"));
    assert!(
        !reply.ok && reply.data.is_none(),
        "a client of uid {OTHER_UID} was served: {stdout}"
    );
    let error = reply.error.unwrap();
    assert!(
        error.message.contains("uid") && error.message.contains(&OTHER_UID.to_string()),
        "the refusal does not say why: {error:?}"
    );

    // The owner is still served.
    let mut client = ControlClient::connect(&home.socket_path()).await.unwrap();
    let id = client.call(&Request::Id).await.unwrap().to_json();
    assert_eq!(id["name"], "Alice");
    server.stop();
    alice.stop().await;
}

/// The socket is only ever made inside a directory nobody else can
/// enter, so there is no moment (between bind and chmod) when another
/// user can connect to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_socket_is_never_made_where_others_can_reach_it() {
    let mut alice = TestNode::start("alice", 2, &[]).await;
    let open = alice.dir.path().join("open");
    fs::create_dir(&open).unwrap();
    chmod(&open, 0o755);
    let socket = open.join("weft.sock");
    let refused = serve(alice.handle.clone(), &socket).await;
    assert!(
        refused.is_err(),
        "served a control socket in {} (mode 0755)",
        open.display()
    );
    let message = refused.unwrap_err().to_string();
    assert!(
        message.contains(&format!("chmod 700 {}", open.display())),
        "the refusal does not say how to fix it: {message}"
    );
    assert!(!socket.exists(), "the socket was made anyway");

    // In the (private) home it is served, 0600 from the start.
    let home = Home::new(alice.dir.path().join("home"));
    let server = serve(alice.handle.clone(), &home.socket_path())
        .await
        .unwrap();
    assert_eq!(mode_of(&home.socket_path()), 0o600);
    server.stop();
    alice.stop().await;
}

/// A home that the group or others can read or enter (0755, 0750, 0701)
/// is refused at start, with the fix in the message; so is an existing
/// one at `init`. Once fixed, the node starts with everything it had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_home_others_can_enter_is_refused() {
    let dir = tempfile::Builder::new()
        .prefix("weft-attack-home-")
        .tempdir()
        .unwrap();
    let home = Home::new(dir.path().join("home"));
    let created = home.init("Alice").unwrap();
    assert_eq!(mode_of(home.dir()), 0o700, "new homes are created 0700");
    for mode in [0o755, 0o750, 0o701] {
        chmod(home.dir(), mode);
        let Err(refused) = Node::start(NodeConfig::new(home.dir(), None)).await else {
            panic!("a home with mode {mode:04o} was accepted");
        };
        let message = refused.to_string();
        assert!(
            message.contains(&format!("chmod 700 {}", home.dir().display())),
            "the refusal does not say how to fix it: {message}"
        );
    }
    chmod(home.dir(), 0o700);
    let node = Node::start(NodeConfig::new(home.dir(), None))
        .await
        .unwrap();
    let id = node.handle().call(Request::Id).await.unwrap().to_json();
    assert_eq!(id["user_id"], created.user_id.as_str());
    node.shutdown().await.unwrap();

    // `init` into an existing open directory writes no key there.
    let open = Home::new(dir.path().join("open"));
    fs::create_dir(open.dir()).unwrap();
    chmod(open.dir(), 0o755);
    let Err(refused) = open.init("Mallory's pick") else {
        panic!("init wrote keys into a home with mode 0755");
    };
    assert!(
        refused
            .to_string()
            .contains(&format!("chmod 700 {}", open.dir().display())),
        "{refused}"
    );
    assert!(!open.key_path().exists());
}

/// An identity.key that others can read is refused at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_file_others_can_read_is_refused() {
    let dir = tempfile::Builder::new()
        .prefix("weft-attack-key-")
        .tempdir()
        .unwrap();
    let home = Home::new(dir.path().join("home"));
    home.init("Alice").unwrap();
    chmod(&home.key_path(), 0o644);
    let Err(refused) = Node::start(NodeConfig::new(home.dir(), None)).await else {
        panic!("an identity.key with mode 0644 was accepted");
    };
    let message = refused.to_string();
    assert!(
        message.contains(&format!("chmod 600 {}", home.key_path().display())),
        "the refusal does not say how to fix it: {message}"
    );
    chmod(&home.key_path(), 0o600);
    let node = Node::start(NodeConfig::new(home.dir(), None))
        .await
        .unwrap();
    node.shutdown().await.unwrap();
}

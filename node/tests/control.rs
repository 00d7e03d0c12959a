//! The control socket under malformed and oversized requests: each gets a
//! clear error reply, and the node keeps serving.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use weft_node::api::{MAX_REQUEST_BYTES, Reply, Request};
use weft_node::control::{ControlClient, ControlServer, serve};
use weft_node::home::Home;
use weft_node::{Node, NodeConfig};

async fn ask(stream: &mut BufReader<UnixStream>, line: &[u8]) -> Reply {
    stream.get_mut().write_all(line).await.unwrap();
    let mut answer = String::new();
    stream.read_line(&mut answer).await.unwrap();
    serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{e}: {answer:?}"))
}

/// Alice's node, offline, serving its control socket (keep the directory).
async fn offline_alice() -> (tempfile::TempDir, Home, Node, ControlServer) {
    let dir = tempfile::Builder::new()
        .prefix("weft-control-")
        .tempdir()
        .unwrap();
    let home = Home::new(dir.path().join("home"));
    home.init("Alice").unwrap();
    let node = Node::start(NodeConfig::new(dir.path().join("home"), None))
        .await
        .unwrap();
    let server = serve(node.handle(), &home.socket_path()).await.unwrap();
    (dir, home, node, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_clear_errors() {
    let (_dir, home, node, server) = offline_alice().await;

    let mut raw = BufReader::new(UnixStream::connect(home.socket_path()).await.unwrap());
    for bad in [
        &b"garbage\n"[..],
        b"\xff\xfe\x00\n",
        br#"{"cmd":"send"}"#,
        br#"{"cmd":"send","target":"bob","text":"x","evil":1}"#,
    ] {
        let mut line = bad.to_vec();
        if !line.ends_with(b"\n") {
            line.push(b'\n');
        }
        let reply = ask(&mut raw, &line).await;
        let error = reply.error.expect("an error");
        assert!(!reply.ok && error.exit_code() == 2, "{error:?}");
    }
    // A request for an unknown contact is well-formed but bad input.
    let reply = ask(
        &mut raw,
        b"{\"cmd\":\"send\",\"target\":\"nobody\",\"text\":\"hi\"}\n",
    )
    .await;
    assert!(reply.error.unwrap().message.contains("nobody"));
    // An oversized line is refused with a reason, then the connection ends.
    let mut huge = br#"{"cmd":"send","target":"bob","text":""#.to_vec();
    huge.extend(std::iter::repeat_n(b'a', MAX_REQUEST_BYTES + 10));
    huge.extend_from_slice(b"\"}\n");
    // (The server may hang up before the writer is done: ignore its error.)
    let (r, mut w) = UnixStream::connect(home.socket_path())
        .await
        .unwrap()
        .into_split();
    let writer = tokio::spawn(async move { w.write_all(&huge).await.is_ok() });
    let mut answer = String::new();
    BufReader::new(r).read_line(&mut answer).await.unwrap();
    let reply: Reply = serde_json::from_str(&answer).unwrap();
    assert!(reply.error.unwrap().message.contains("longer than"));
    let _ = writer.await;

    // The node still serves.
    let mut client = ControlClient::connect(&home.socket_path()).await.unwrap();
    let id = client.call(&Request::Id).await.unwrap().to_json();
    assert_eq!(id["name"], "Alice");
    server.stop();
    node.shutdown().await.unwrap();
}

/// A reply may be far longer than any request: a page of long messages
/// comes through the control socket whole (the client used to read
/// replies with the request limit of 256 KiB and failed with "request too
/// large").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_longer_than_any_request_comes_whole() {
    let (_dir, home, node, server) = offline_alice().await;
    let mut client = ControlClient::connect(&home.socket_path()).await.unwrap();
    // Bob only hands out an invite; alice writes to him while offline.
    let bob = weft_node::identity::Identity::from_seed(b"bob/control", 0).unwrap();
    let invite = bob
        .invite("Bob", vec![bob.certificate().clone()], Vec::new(), 0)
        .unwrap();
    client
        .call(&Request::ContactAdd {
            invite,
            name: Some("bob".into()),
        })
        .await
        .unwrap();
    const MESSAGES: usize = 12;
    let text = "x".repeat(60 * 1024);
    for _ in 0..MESSAGES {
        client
            .call(&Request::Send {
                target: "bob".into(),
                text: text.clone(),
                reply_to: None,
            })
            .await
            .unwrap();
    }
    let page = client
        .call(&Request::Messages {
            target: "bob".into(),
            limit: Some(MESSAGES),
            before: None,
        })
        .await
        .unwrap()
        .to_json();
    assert!(page.to_string().len() > 2 * MAX_REQUEST_BYTES);
    assert_eq!(page.as_array().unwrap().len(), MESSAGES);
    server.stop();
    node.shutdown().await.unwrap();
}

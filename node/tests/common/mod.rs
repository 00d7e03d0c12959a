//! In-process test network: named nodes (alice, bob, carol) with seeded
//! identities on libp2p's memory transport, and helpers that wait for
//! what a test expects, with a deadline, never a fixed sleep.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use weft_node::api::Request;
use weft_node::home::Home;
use weft_node::identity::Identity;
use weft_node::{Multiaddr, NetConfig, Node, NodeConfig, NodeHandle, Settings, link_device};

/// Memory-transport ports unique across the tests of this process.
static NEXT_PORT: AtomicU64 = AtomicU64::new(1);

/// A memory-transport port no other node of this process uses.
pub fn next_port() -> u64 {
    NEXT_PORT.fetch_add(1, Ordering::Relaxed) + 10_000 * u64::from(std::process::id() % 1000)
}

pub const DEADLINE: Duration = Duration::from_secs(30);

pub struct TestNode {
    pub name: String,
    pub node: Option<Node>,
    pub handle: NodeHandle,
    pub addr: Multiaddr,
    pub dir: tempfile::TempDir,
}

impl TestNode {
    /// A node named `name` whose keys derive from `name` and `seed`.
    pub async fn start(name: &str, seed: u64, bootstrap: &[&TestNode]) -> TestNode {
        Self::start_with(name, seed, bootstrap, Settings::default()).await
    }

    /// The same, with its own timings and limits.
    pub async fn start_with(
        name: &str,
        seed: u64,
        bootstrap: &[&TestNode],
        settings: Settings,
    ) -> TestNode {
        let dir = tempfile::Builder::new()
            .prefix(&format!("weft-{name}-"))
            .tempdir()
            .unwrap();
        let home = Home::new(dir.path().join("home"));
        let identity = Identity::from_seed(format!("{name}/{seed}").as_bytes(), 0).unwrap();
        let display = {
            let mut c = name.chars();
            c.next()
                .map(|f| f.to_uppercase().chain(c).collect::<String>())
                .unwrap()
        };
        home.init_with(&identity, &display).unwrap();
        Self::run(name, dir, bootstrap, settings).await
    }

    /// Restarts a node from an existing home directory.
    pub async fn start_existing(
        name: &str,
        dir: tempfile::TempDir,
        bootstrap: &[&TestNode],
    ) -> TestNode {
        Self::run(name, dir, bootstrap, Settings::default()).await
    }

    /// Restarts a node from an existing home with no network at all: it
    /// hears only what a test hands it with `deliver`.
    pub async fn start_offline(name: &str, dir: tempfile::TempDir) -> TestNode {
        Self::start_offline_with(name, dir, Settings::default()).await
    }

    pub async fn start_offline_with(
        name: &str,
        dir: tempfile::TempDir,
        settings: Settings,
    ) -> TestNode {
        let mut config = NodeConfig::new(dir.path().join("home"), None);
        config.settings = settings;
        let node = Node::start(config).await.unwrap();
        let handle = node.handle();
        TestNode {
            name: name.to_string(),
            node: Some(node),
            handle,
            addr: "/memory/0".parse().unwrap(),
            dir,
        }
    }

    /// A second connection to this node's store, to look at what it holds.
    pub fn store(&self) -> weft_node::store::Store {
        weft_node::store::Store::open(&Home::new(self.dir.path().join("home")).db_path()).unwrap()
    }

    /// The bytes of an envelope this node holds (a message id is its
    /// envelope's id), read through a second connection to its store.
    pub fn envelope_bytes(&self, id: &str) -> Vec<u8> {
        let store = self.store();
        let id = id.parse().unwrap();
        store
            .db()
            .envelope(&id)
            .unwrap()
            .unwrap_or_else(|| panic!("{} holds no envelope {id}", self.name))
            .bytes
    }

    /// Every chain-sealed envelope this node holds in the conversations
    /// `wanted` picks, read through a second connection to its store.
    pub fn chain_envelopes(
        &self,
        wanted: impl Fn(&weft_node::store::ConversationRecord) -> bool,
    ) -> std::collections::HashSet<Vec<u8>> {
        self.stored_envelopes(wanted, |db, conv| {
            db.chain_positions(conv)
                .unwrap()
                .into_iter()
                .map(|p| p.3)
                .collect()
        })
        .into_iter()
        .collect()
    }

    /// The pairwise-sealed envelopes (key handouts) this node holds in the
    /// conversations `wanted` picks, oldest first, read the same way.
    pub fn sealed_envelopes(
        &self,
        wanted: impl Fn(&weft_node::store::ConversationRecord) -> bool,
    ) -> Vec<Vec<u8>> {
        self.stored_envelopes(wanted, |db, conv| {
            db.sealed_envelope_ids(conv)
                .unwrap()
                .into_iter()
                .map(|(_, rowid)| rowid)
                .collect()
        })
    }

    /// Every envelope this node holds (key handouts and chain-sealed).
    pub fn all_envelopes(&self) -> Vec<Vec<u8>> {
        let mut all = self.sealed_envelopes(|_| true);
        all.extend(self.chain_envelopes(|_| true));
        all
    }

    fn stored_envelopes(
        &self,
        wanted: impl Fn(&weft_node::store::ConversationRecord) -> bool,
        rows: impl Fn(&weft_node::store::Db<'_>, &weft_node::ids::ConversationId) -> Vec<i64>,
    ) -> Vec<Vec<u8>> {
        let store = self.store();
        let db = store.db();
        let mut out = Vec::new();
        for conv in db.conversations().unwrap().iter().filter(|c| wanted(c)) {
            out.extend(db.envelope_bytes_by_rowid(&rows(&db, &conv.id)).unwrap());
        }
        out
    }

    async fn run(
        name: &str,
        dir: tempfile::TempDir,
        bootstrap: &[&TestNode],
        settings: Settings,
    ) -> TestNode {
        let port = next_port();
        let mut net = NetConfig::memory(port);
        net.bootstrap = bootstrap.iter().map(|n| n.dial_addr()).collect();
        let mut config = NodeConfig::new(dir.path().join("home"), Some(net));
        config.settings = settings;
        let node = Node::start(config).await.unwrap();
        let handle = node.handle();
        let addr = format!("/memory/{port}").parse().unwrap();
        TestNode {
            name: name.to_string(),
            node: Some(node),
            handle,
            addr,
            dir,
        }
    }

    /// This node's address with its peer id, to dial or bootstrap from.
    pub fn dial_addr(&self) -> Multiaddr {
        format!("{}/p2p/{}", self.addr, self.handle.peer_id())
            .parse()
            .unwrap()
    }

    /// The memory-transport port this node listens on.
    pub fn port(&self) -> u64 {
        self.addr
            .to_string()
            .trim_start_matches("/memory/")
            .parse()
            .unwrap()
    }

    /// Runs `req` and gives its answer as the contract's JSON (what the
    /// control socket would send), which the tests assert on.
    pub async fn call(&self, req: Request) -> Value {
        self.handle
            .call(req.clone())
            .await
            .unwrap_or_else(|e| panic!("{}: {req:?} failed: {e}", self.name))
            .to_json()
    }

    pub async fn invite(&self) -> String {
        self.call(Request::Id).await["invite"]
            .as_str()
            .unwrap()
            .to_string()
    }

    pub async fn add_contact(&self, other: &TestNode) {
        let invite = other.invite().await;
        self.call(Request::ContactAdd {
            invite,
            name: Some(other.name.clone()),
        })
        .await;
    }

    pub async fn send(&self, target: &str, text: &str) -> Value {
        self.call(Request::Send {
            target: target.into(),
            text: text.into(),
            reply_to: None,
        })
        .await
    }

    pub async fn messages(&self, target: &str) -> Vec<Value> {
        let v = self
            .call(Request::Messages {
                target: target.into(),
                limit: Some(10_000),
                before: None,
            })
            .await;
        v.as_array().cloned().unwrap_or_default()
    }

    pub async fn texts(&self, target: &str) -> Vec<String> {
        self.messages(target)
            .await
            .iter()
            .map(|m| m["text"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    /// Waits until `target` holds a message with `text` (the conversation
    /// itself may not be known yet).
    pub async fn expect_text(&self, target: &str, text: &str) {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let req = Request::Messages {
                target: target.into(),
                limit: Some(10_000),
                before: None,
            };
            if let Ok(v) = self.handle.call(req).await.map(|r| r.to_json())
                && v.as_array()
                    .is_some_and(|ms| ms.iter().any(|m| m["text"] == text))
            {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                let call = self.handle.call(Request::Messages {
                    target: target.into(),
                    limit: Some(10_000),
                    before: None,
                });
                let have = match call.await {
                    Ok(v) => v.to_json().to_string(),
                    Err(e) => format!("({e})"),
                };
                panic!(
                    "{}: {text:?} never arrived in {target}; have {have}",
                    self.name
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until `check` holds for the messages of `target`.
    pub async fn wait_messages(
        &self,
        target: &str,
        what: &str,
        check: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let req = Request::Messages {
                target: target.into(),
                limit: Some(10_000),
                before: None,
            };
            if let Ok(v) = self.handle.call(req).await.map(|r| r.to_json())
                && let Some(ms) = v.as_array()
                && check(ms)
            {
                return ms.clone();
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "{}: timed out waiting for {what} in {target}; have {:?}",
                    self.name,
                    self.texts(target).await
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub async fn stop(&mut self) {
        if let Some(node) = self.node.take() {
            node.shutdown().await.unwrap();
        }
    }
}

/// Makes `a` and `b` contacts of each other.
pub async fn befriend(a: &TestNode, b: &TestNode) {
    a.add_contact(b).await;
    b.add_contact(a).await;
}

/// Links a new device to `account` (which must run) in a fresh home.
pub async fn link(account: &TestNode, name: &str, bootstrap: &[&TestNode]) -> TestNode {
    let code = account.call(Request::DevicesLink).await["code"]
        .as_str()
        .unwrap()
        .to_string();
    let dir = tempfile::Builder::new()
        .prefix(&format!("weft-{name}-"))
        .tempdir()
        .unwrap();
    let home = Home::new(dir.path().join("home"));
    let view = link_device(&home, &code, None, 0, NetConfig::memory(next_port()))
        .await
        .unwrap();
    assert_eq!(
        view.user_id,
        account.call(Request::Id).await["user_id"].as_str().unwrap()
    );
    // The code works once.
    let again = Home::new(dir.path().join("again"));
    assert!(
        link_device(&again, &code, None, 0, NetConfig::memory(next_port()))
            .await
            .is_err(),
        "a code is good for one device"
    );
    TestNode::start_existing(name, dir, bootstrap).await
}

pub fn group_create(name: &str, members: &[&str]) -> Request {
    Request::GroupCreate {
        name: name.into(),
        members: members.iter().map(|m| m.to_string()).collect(),
    }
}

/// Asks `check` every 10 ms until it answers, within the deadline.
pub async fn poll_until<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    mut check: impl FnMut() -> F,
) -> T {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Some(found) = check().await {
            return found;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub fn json_text(v: &Value) -> String {
    json!(v).to_string()
}

/// The routing secret of the one-to-one conversation between `a` and `b`
/// (or of `a`'s own account conversation when `b` is `a`), as either
/// side's node computes it.
pub fn direct_routing(a: &Identity, b: &Identity) -> weft_node::routing::Routing {
    weft_node::routing::Routing::direct(
        a.account_dh_secret(),
        &a.user_id(),
        &b.certificate().account_dh,
        &b.user_id(),
    )
    .unwrap()
}

/// An envelope of `conversation` (routing `tag`) sealed by hand from
/// `from`'s device to `to`'s, as a hostile peer would make it.
pub fn seal_by_hand(
    from: &Identity,
    tag: weft_node::ids::RoutingTag,
    conversation: weft_node::ids::ConversationId,
    to: &Identity,
    payload: &weft_node::payload::Payload,
) -> Vec<u8> {
    weft_node::crypto::envelope::seal_to_devices(
        from.device_signing_key(),
        tag,
        conversation,
        &[(to.device_id(), to.certificate().dh)],
        [0x33; 32],
        [0x44; 32],
        &payload.encode(),
    )
    .unwrap()
    .into_bytes()
}

/// The routing tag an envelope a node holds carries.
pub fn tag_of(envelope: &[u8]) -> weft_node::ids::RoutingTag {
    weft_node::crypto::envelope::Envelope::decode(envelope)
        .unwrap()
        .header
        .tag
}

/// A certificate of `device` for `user`'s account, with the device's
/// consent: what linking a device produces.
pub fn certify(
    user: &Identity,
    device: &Identity,
    at_ms: i64,
) -> weft_node::identity::DeviceCertificate {
    let dh = device.certificate().dh;
    let consent = weft_node::identity::DeviceCertificate::consent(
        device.device_signing_key(),
        &user.user_id(),
        &dh,
    );
    user.certify(&device.device_id(), dh, consent, at_ms)
        .unwrap()
}

impl TestNode {
    /// Every routing tag this node knows (read through a second
    /// connection to its store).
    pub fn known_tags(&self) -> Vec<weft_node::ids::RoutingTag> {
        let store = self.store();
        store
            .db()
            .routing_tags()
            .unwrap()
            .into_iter()
            .map(|(tag, _)| tag)
            .collect()
    }

    /// The secrets of this node's handout keys still held (read through a
    /// second connection to its store).
    pub fn own_handout_secrets(&self) -> Vec<[u8; 32]> {
        let store = self.store();
        let keys = store.db().own_handout_keys().unwrap();
        keys.iter().map(|k| *k.secret).collect()
    }

    /// The handout key this node knows for `device`, if any.
    pub fn handout_key_of(&self, device: &weft_node::ids::DeviceId) -> Option<[u8; 32]> {
        let store = self.store();
        store.db().handout_key(device).unwrap().map(|(dh, _)| dh)
    }

    /// How many one-time keys of `issuer` this node holds.
    pub fn one_time_keys_of(&self, issuer: &weft_node::ids::DeviceId) -> u64 {
        let store = self.store();
        store.db().one_time_key_count(issuer).unwrap()
    }

    /// The keys this node runs with (read from its home).
    pub fn identity(&self) -> Identity {
        Home::new(self.dir.path().join("home"))
            .load_identity()
            .unwrap()
    }
}

/// Every secret key a home holds that something sealed to its device may
/// have been sealed to, each with what it is: the certified DH key in
/// `identity.key`, and the handout and one-time key secrets in its
/// database (what an attacker with a copy of the home would try).
pub fn opening_secrets_in(home: &std::path::Path) -> Vec<(&'static str, [u8; 32])> {
    let home = Home::new(home.to_path_buf());
    let identity = home.load_identity().unwrap();
    let mut out = vec![("certified DH key", identity.device_dh_secret().to_bytes())];
    let store = weft_node::store::Store::open(&home.db_path()).unwrap();
    for k in store.db().own_handout_keys().unwrap() {
        out.push(("handout key", *k.secret));
    }
    let mut issued: std::collections::HashSet<Vec<u8>> = std::collections::HashSet::new();
    let db = rusqlite::Connection::open(home.db_path()).unwrap();
    let holders: Vec<Vec<u8>> = db
        .prepare("SELECT DISTINCT holder FROM own_one_time_keys")
        .unwrap()
        .query_map([], |row| row.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    for holder in holders {
        let holder = weft_node::ids::DeviceId(holder.as_slice().try_into().unwrap());
        for k in store.db().own_one_time_keys_for(&holder).unwrap() {
            if issued.insert(k.public.to_vec()) {
                out.push(("one-time key", *k.secret));
            }
        }
    }
    out
}

/// Alice, bob and carol (keys from `seed`), alice a contact of both, and
/// the group "trio" alice made with them.
pub async fn trio(seed: u64) -> (TestNode, TestNode, TestNode) {
    let alice = TestNode::start("alice", seed, &[]).await;
    let bob = TestNode::start("bob", seed, &[&alice]).await;
    let carol = TestNode::start("carol", seed, &[&alice, &bob]).await;
    befriend(&alice, &bob).await;
    befriend(&alice, &carol).await;
    alice.call(group_create("trio", &["bob", "carol"])).await;
    (alice, bob, carol)
}

/// What a test waits on for events: a node's API events (a receiver that
/// lagged skips what it missed, as the tests never need every event) or a
/// network task's events.
pub trait EventStream {
    type Event;
    /// The next event, or `None` once the stream has ended.
    fn next_event(&mut self) -> impl std::future::Future<Output = Option<Self::Event>>;
}

impl<T: Clone> EventStream for tokio::sync::broadcast::Receiver<T> {
    type Event = T;
    async fn next_event(&mut self) -> Option<T> {
        use tokio::sync::broadcast::error::RecvError;
        loop {
            match self.recv().await {
                Ok(event) => return Some(event),
                Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => return None,
            }
        }
    }
}

impl<T> EventStream for tokio::sync::mpsc::Receiver<T> {
    type Event = T;
    async fn next_event(&mut self) -> Option<T> {
        self.recv().await
    }
}

/// The next event of `events` that `wanted` accepts, skipping others;
/// panics, naming `what`, if none comes within [`DEADLINE`] or the stream
/// ends.
pub async fn next_event_matching<S: EventStream>(
    events: &mut S,
    what: &str,
    wanted: impl Fn(&S::Event) -> bool,
) -> S::Event {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        match tokio::time::timeout_at(deadline, events.next_event()).await {
            Ok(Some(event)) if wanted(&event) => return event,
            Ok(Some(_)) => {}
            Ok(None) => panic!("the event stream ended before {what}"),
            Err(_) => panic!("timed out after {DEADLINE:?} waiting for {what}"),
        }
    }
}

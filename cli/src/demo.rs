//! `weft demo`: a self-contained demonstration on this machine. Three
//! nodes (alice, bob, carol) in temporary homes, networked over loopback
//! only, exchange invites, send direct messages both ways, form a group in
//! which everyone writes, and wait until every message has arrived. Each
//! step is printed as it completes (one JSON object per step with
//! `--json`); a step that does not complete within 30 s fails the demo
//! (exit 1).

use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use serde_json::{Map, Value, json};
use weft_node::api::{
    ApiError, ContactView, GroupView, IdView, MessageView, Request, Response, SendView,
};
use weft_node::home::Home;
use weft_node::{Multiaddr, NetConfig, Node, NodeConfig, NodeHandle};

use crate::output;

/// The longest any one step may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
const POLL_EVERY: Duration = Duration::from_millis(100);
const GROUP: &str = "weft-demo";

/// One demo participant: a node with its own home.
struct Person {
    alias: &'static str,
    node: Node,
    handle: NodeHandle,
    id: IdView,
}

impl std::fmt::Debug for Person {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Person")
            .field("alias", &self.alias)
            .finish()
    }
}

impl Person {
    /// Runs `request` on this person's node and takes the view it answers.
    async fn request<T>(&self, request: Request) -> anyhow::Result<T>
    where
        T: TryFrom<Response, Error = ApiError>,
    {
        within(
            &format!("{}'s node answers", self.alias),
            self.handle.request(request),
        )
        .await?
        .with_context(|| format!("{}'s node", self.alias))
    }

    async fn messages(&self, target: &str) -> anyhow::Result<Vec<MessageView>> {
        self.request(Request::Messages {
            target: target.to_string(),
            limit: None,
            before: None,
        })
        .await
    }

    /// Waits until a message with this text shows in the conversation.
    async fn wait_for_text(&self, target: &str, text: &str) {
        loop {
            if let Ok(list) = self.messages(target).await
                && list.iter().any(|m| m.text == text)
            {
                return;
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
    }
}

/// Prints the steps as they complete.
#[derive(Debug)]
struct Reporter {
    json: bool,
    started: Instant,
}

impl Reporter {
    /// Reports one step: `human` for people, `fields` (plus `step` and
    /// `elapsed_ms`) as one JSON object.
    fn step(&self, step: &str, human: &str, fields: Value) -> anyhow::Result<()> {
        if self.json {
            let mut object = Map::new();
            object.insert("step".into(), json!(step));
            if let Value::Object(extra) = fields {
                object.extend(extra);
            }
            let elapsed = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
            object.insert("elapsed_ms".into(), json!(elapsed));
            output::out_json(&Value::Object(object))
        } else {
            output::out(human)
        }
    }
}

/// Runs `future`, failing with a clear message if it takes over 30 s.
async fn within<T>(what: &str, future: impl Future<Output = T>) -> anyhow::Result<T> {
    tokio::time::timeout(STEP_TIMEOUT, future)
        .await
        .map_err(|_| anyhow!("demo step did not complete within 30 s: {what}"))
}

/// Milliseconds since `t`, for the report.
fn ms_since(t: Instant) -> u64 {
    u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Runs the demonstration.
pub async fn run(json: bool) -> anyhow::Result<()> {
    let report = Reporter {
        json,
        started: Instant::now(),
    };
    let dir = tempfile::Builder::new()
        .prefix("weft-demo-")
        .tempdir()
        .context("creating a temporary directory")?;
    report.step(
        "start",
        &format!(
            "Weft demo: three nodes in temporary homes under {}, talking over loopback only.\n",
            dir.path().display()
        ),
        json!({"dir": dir.path().display().to_string()}),
    )?;

    // Identities.
    let names = [("alice", "Alice"), ("bob", "Bob"), ("carol", "Carol")];
    for (alias, name) in names {
        let home = Home::new(dir.path().join(alias));
        let id = home
            .init(name)
            .map_err(crate::client::node_error)
            .with_context(|| format!("creating {name}'s identity"))?;
        report.step(
            "init",
            &format!(
                "Created {name}'s identity: user {}",
                output::short(&id.user_id)
            ),
            json!({"node": alias, "user_id": id.user_id, "device_id": id.device_id}),
        )?;
    }

    // Nodes: alice first; bob and carol bootstrap from her.
    let alice = start(dir.path(), "alice", Vec::new()).await?;
    let alice_addrs = within("alice listens", listen_addrs(&alice.handle)).await?;
    let alice_addr: Multiaddr = format!("{}/p2p/{}", alice_addrs[0], alice.id.peer_id)
        .parse()
        .context("alice's address")?;
    report.step(
        "node",
        &format!("Started Alice's node, listening on {alice_addr}"),
        json!({"node": "alice", "peer_id": alice.id.peer_id, "listen": alice_addrs, "dial": alice_addr.to_string()}),
    )?;
    let mut people = vec![alice];
    for alias in ["bob", "carol"] {
        let person = start(dir.path(), alias, vec![alice_addr.clone()]).await?;
        let addrs = within(&format!("{alias} listens"), listen_addrs(&person.handle)).await?;
        report.step(
            "node",
            &format!(
                "Started {}'s node on {}, bootstrapping from Alice",
                person.id.name, addrs[0]
            ),
            json!({"node": alias, "peer_id": person.id.peer_id, "listen": addrs, "bootstrap": [alice_addr.to_string()]}),
        )?;
        people.push(person);
    }

    // Invites: everyone adds everyone (invites carry address hints).
    for me in &people {
        for them in &people {
            if me.alias == them.alias {
                continue;
            }
            let invite: IdView = them.request(Request::Id).await?;
            let _: ContactView = me
                .request(Request::ContactAdd {
                    invite: invite.invite,
                    name: Some(them.alias.to_string()),
                })
                .await
                .with_context(|| format!("{} adding {}", me.alias, them.alias))?;
        }
    }
    report.step(
        "contacts",
        "\nAlice, Bob and Carol exchanged invites: everyone has everyone as a contact.\n",
        json!({"pairs": 6}),
    )?;

    let [alice, bob, carol] = &people[..] else {
        bail!("internal: expected three people");
    };

    // Direct messages, both ways.
    for (from, to, text) in [
        (alice, bob, "Hi Bob! This is Alice, end-to-end encrypted."),
        (bob, alice, "Hi Alice, Bob here. Loud and clear!"),
    ] {
        let sent = Instant::now();
        let reply: SendView = from
            .request(Request::Send {
                target: to.alias.to_string(),
                text: text.to_string(),
                reply_to: None,
            })
            .await?;
        within(
            &format!("{} receives {}'s message", to.alias, from.alias),
            to.wait_for_text(from.alias, text),
        )
        .await?;
        let ms = ms_since(sent);
        report.step(
            "direct",
            &format!(
                "{} -> {}: \"{text}\"  (arrived in {ms} ms)",
                from.id.name, to.id.name
            ),
            json!({"from": from.alias, "to": to.alias, "text": text, "message": reply, "latency_ms": ms}),
        )?;
    }

    // A group of three, in which everyone writes.
    let group: GroupView = alice
        .request(Request::GroupCreate {
            name: GROUP.to_string(),
            members: vec!["bob".to_string(), "carol".to_string()],
        })
        .await
        .context("the group reply")?;
    for member in [bob, carol] {
        within(
            &format!("{} learns of the group", member.alias),
            wait_for_group(member, &group.id),
        )
        .await?;
    }
    report.step(
        "group",
        &format!("\nAlice created the group \"{GROUP}\" with Bob and Carol; both have joined it."),
        json!({"group": group.id, "name": GROUP, "members": ["alice", "bob", "carol"]}),
    )?;

    let texts = [
        (alice, "Welcome to the group, everyone!"),
        (bob, "Thanks Alice. Hello Carol!"),
        (carol, "Hi both! Carol checking in."),
    ];
    for (from, text) in texts {
        let sent = Instant::now();
        let reply: SendView = from
            .request(Request::Send {
                target: group.id.clone(),
                text: text.to_string(),
                reply_to: None,
            })
            .await?;
        for to in &people {
            if to.alias == from.alias {
                continue;
            }
            within(
                &format!("{} receives {}'s group message", to.alias, from.alias),
                to.wait_for_text(&group.id, text),
            )
            .await?;
        }
        let ms = ms_since(sent);
        report.step(
            "group_message",
            &format!(
                "{} -> {GROUP}: \"{text}\"  (everyone had it after {ms} ms)",
                from.id.name
            ),
            json!({"from": from.alias, "group": group.id, "text": text, "message": reply, "latency_ms": ms}),
        )?;
    }

    // Every member sees the same conversation, in the same order.
    let mut orders = Vec::new();
    for person in &people {
        let list = person.messages(&group.id).await?;
        orders.push(list.iter().map(|m| m.id.clone()).collect::<Vec<_>>());
    }
    let same_order = orders.windows(2).all(|w| w[0] == w[1]);
    let transcript = carol.messages(&group.id).await?;
    let mut human =
        format!("\nThe group as Carol sees it (the same order on every device: {same_order}):\n");
    for m in &transcript {
        human.push_str("  ");
        human.push_str(&output::message_line(m));
        human.push('\n');
    }
    report.step(
        "transcript",
        &human,
        json!({"node": "carol", "group": group.id, "same_order": same_order, "messages": transcript}),
    )?;

    for person in people {
        let alias = person.alias;
        person
            .node
            .shutdown()
            .await
            .map_err(crate::client::node_error)
            .with_context(|| format!("shutting down {alias}'s node"))?;
    }
    report.step(
        "done",
        &format!(
            "All messages arrived; the nodes shut down cleanly. Demo finished in {:.1} s.",
            report.started.elapsed().as_secs_f64()
        ),
        json!({"ok": true}),
    )?;
    Ok(())
}

/// Starts one participant's node on loopback, mDNS off.
async fn start(
    dir: &Path,
    alias: &'static str,
    bootstrap: Vec<Multiaddr>,
) -> anyhow::Result<Person> {
    let listen: Multiaddr = "/ip4/127.0.0.1/tcp/0".parse().context("listen address")?;
    let mut net = NetConfig::new(vec![listen]);
    net.mdns = false;
    net.bootstrap = bootstrap;
    let node = within(
        &format!("{alias}'s node starts"),
        Node::start(NodeConfig::new(dir.join(alias), Some(net))),
    )
    .await?
    .map_err(crate::client::node_error)
    .with_context(|| format!("starting {alias}'s node"))?;
    let handle = node.handle();
    let id: IdView = handle.request(Request::Id).await?;
    Ok(Person {
        alias,
        node,
        handle,
        id,
    })
}

/// Waits until the node listens somewhere, and returns where.
async fn listen_addrs(handle: &NodeHandle) -> Vec<String> {
    loop {
        let addrs = handle.listen_addrs().await;
        if !addrs.is_empty() {
            return addrs.iter().map(ToString::to_string).collect();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `person` is a member of the group.
async fn wait_for_group(person: &Person, group: &str) {
    loop {
        if let Ok(groups) = person.request::<Vec<GroupView>>(Request::GroupList).await
            && groups.iter().any(|g| g.id == group)
        {
            return;
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

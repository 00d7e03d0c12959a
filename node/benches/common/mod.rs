//! What the node benches share: calls with a deadline, where a node
//! listens, and making two nodes contacts.

#![allow(dead_code)]

use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, ensure};
use serde_json::Value;
use weft_node::api::Request;
use weft_node::ids::{ConversationId, DeviceId, EnvelopeId, UserId};
use weft_node::store::{MessageRecord, MessageStatus};
use weft_node::{Multiaddr, NodeHandle};

pub const DEADLINE: Duration = Duration::from_secs(300);

/// Runs a request, failing after [`DEADLINE`]; the answer as the
/// contract's JSON.
pub async fn call(h: &NodeHandle, request: Request) -> Result<Value> {
    let what = format!("{request:?}");
    tokio::time::timeout(DEADLINE, h.call(request))
        .await
        .map_err(|_| anyhow!("timed out: {what}"))?
        .map(|response| response.to_json())
        .map_err(|e| anyhow!("{what}: {e}"))
}

/// Where to dial the node: its first listen address with `/p2p/`.
pub async fn dial_addr(h: &NodeHandle) -> Result<Multiaddr> {
    let until = Instant::now() + DEADLINE;
    loop {
        if let Some(a) = h.listen_addrs().await.into_iter().next() {
            return Ok(format!("{a}/p2p/{}", h.peer_id()).parse()?);
        }
        ensure!(Instant::now() < until, "never listened");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Makes `a` (known to `b` as `a_name`) and `b` contacts of each other.
pub async fn befriend(a: &NodeHandle, a_name: &str, b: &NodeHandle, b_name: &str) -> Result<()> {
    for (me, other, name) in [(a, b, b_name), (b, a, a_name)] {
        let invite = call(other, Request::Id).await?["invite"]
            .as_str()
            .ok_or_else(|| anyhow!("no invite"))?
            .to_string();
        call(
            me,
            Request::ContactAdd {
                invite,
                name: Some(name.into()),
            },
        )
        .await?;
    }
    Ok(())
}

/// A delivered message as a long history holds it, written straight into
/// a store (ordered by `at`, in milliseconds).
pub fn stored_message(
    id: [u8; 16],
    conversation: ConversationId,
    sender: (UserId, DeviceId),
    at: i64,
    text: String,
) -> MessageRecord {
    MessageRecord {
        id: EnvelopeId(id),
        conversation,
        sender_user: sender.0,
        sender_device: sender.1,
        sent_at_ms: at,
        received_at_ms: at,
        hlc: (at as u64) << 16,
        epoch: 1,
        text,
        reply_to: None,
        status: MessageStatus::Delivered,
        edited: false,
        deleted: false,
    }
}

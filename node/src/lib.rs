//! Weft's node library: this device's keys, storage, networking and the
//! engine that ties them together, over the wire protocol of
//! `weft-proto` (re-exported here as `crypto`, `ids`, `payload`, ...).
//! The `weft` binary is a thin layer over it.
//!
//! Start with [`Node::start`] and talk to it through a [`NodeHandle`]
//! with the JSON-shaped requests of [`api`].

pub mod api;
mod backoff;
pub mod control;
pub mod error;
pub mod home;
pub mod identity;
pub mod link;
pub mod net;
pub mod node;
pub mod store;

// The wire protocol, under the paths the node has always used.
pub use weft_proto::{crypto, group, hlc, ids, mailbox, payload, routing};

pub use libp2p::{Multiaddr, PeerId};
pub use net::{ConnectionLimits, NetConfig};
pub use node::{Node, NodeConfig, NodeError, NodeHandle, Settings, link_device};

/// Wall-clock milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

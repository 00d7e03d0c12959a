//! Weft's node library: identity, end-to-end encryption, storage,
//! networking and the engine that ties them together. The `weft`,
//! `weft-relay` and `weft-sim` binaries are thin layers over it.
//!
//! Start with [`Node::start`] and talk to it through a [`NodeHandle`]
//! with the JSON-shaped requests of [`api`].

pub mod api;
pub mod control;
pub mod crypto;
pub mod group;
pub mod hlc;
pub mod home;
pub mod identity;
pub mod ids;
pub mod link;
pub mod mailbox;
pub mod net;
pub mod node;
pub mod payload;
pub mod routing;
pub mod store;

pub use libp2p::{Multiaddr, PeerId};
pub use net::NetConfig;
pub use node::{Node, NodeConfig, NodeError, NodeHandle, Settings, link_device, now_ms};

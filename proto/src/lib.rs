//! Weft's wire protocol, shared by the node and the relay: ids,
//! envelopes and their crypto, payloads, device certificates, group
//! states, routing tags and topics, the mailbox protocol and the direct
//! protocol's framing. No storage, no sockets, no tasks: what is on the
//! wire, how it is made and how it is checked (docs/protocol.md, whose
//! test vectors `node/tests/vectors.rs` checks). Besides, [`transport`]
//! builds the libp2p swarm both run; it does no I/O itself (the swarm
//! opens sockets once its owner listens, dials and polls it); and
//! [`address`] and [`ip_limits`] key and cap connections by IP address,
//! for both.

pub mod address;
pub mod crypto;
pub mod group;
pub mod hlc;
pub mod identity;
pub mod ids;
pub mod ip_limits;
pub mod mailbox;
pub mod net;
pub mod payload;
pub mod routing;
pub mod sim_transport;
pub mod transport;

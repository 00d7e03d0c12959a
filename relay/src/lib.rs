//! weft-relay: a community-run Weft relay. A libp2p node that serves
//! circuit relay v2 (so NATed devices can be reached), AutoNAT, Kademlia
//! (it doubles as a bootstrap node) and the mailbox protocol
//! (`/weft/mailbox/1`, `weft_proto::mailbox`): store-and-forward
//! mailboxes for devices that are away, with push wakeups.
//!
//! The binary (`main.rs`) is a thin layer over [`Relay`]:
//!
//! - [`config`]: the TOML file, environment and flags;
//! - [`store`]: SQLite mailboxes and mail, on a thread of their own, with
//!   group commit;
//! - [`service`]: what each mailbox request gets;
//! - [`verifier`]: deposited envelopes must verify as signed Weft
//!   envelopes, checked on threads of their own;
//! - [`depositor`]: who deposits (peer id and address), for the
//!   per-depositor quotas, and the cool-off of those just refused;
//! - [`net`]: the swarm task;
//! - the cap on connections from one IP address is
//!   `weft_proto::ip_limits` (shared with the node);
//! - [`wakeup`]: coalesced live and UnifiedPush wakeups;
//! - [`metrics`]: Prometheus metrics, `/metrics` and `/healthz`;
//! - [`server`]: starting and draining all of it.
//!
//! docs/relay.md is the operator's guide.

pub mod config;
pub mod depositor;
pub mod limiter;
pub mod metrics;
pub mod net;
pub mod server;
pub mod service;
pub mod store;
pub mod verifier;
pub mod wakeup;

pub use config::Config;
pub use server::{Relay, RelayError};

/// Unix time in milliseconds (0 if the clock is before 1970).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

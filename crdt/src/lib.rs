//! Weft's mergeable state as automerge documents. No I/O: callers load
//! and save bytes, carry changes in their own (signed, encrypted)
//! envelopes, and decide who may write what.
//!
//! - [`Annotations`]: what changes about a conversation's messages after
//!   they are sent (edits, deletions, reactions) and its group metadata
//!   (name, description, avatar, pins), one document per conversation per
//!   period ([`ShardKey`]).
//! - [`AccountState`]: a user's private state, shared only between the
//!   account's own devices (contacts and blocks, conversation settings,
//!   read positions, presence privacy).
//!
//! Both are *flat* documents ([`FlatDoc`]): one root map of scalar values
//! under structured string keys. That keeps every remote change checkable
//! before it is applied (each operation names the key it writes, so the
//! key says whose it is), and keeps message text out of automerge, whose
//! history cannot forget: a message's text and its edits' texts live in
//! the node's store, which can delete them; the documents hold references.

mod account;
mod annotations;
mod flat;

pub use account::{AccountState, AccountView, ContactEntry, ConversationSettings};
pub use annotations::{
    Annotation, Annotations, AnnotationsView, EditRef, GroupMeta, MAX_EMOJI, MessageAnnotations,
    PERIOD_MS, ShardKey, unhex,
};
pub use automerge::ChangeHash;
pub use automerge::sync::State as SyncState;
pub use flat::{FlatDoc, Inspected, Persist, Touch, TouchKind};

/// Ids as they appear in keys: lowercase hex of the raw bytes.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 15)] as char);
    }
    out
}

/// What can go wrong with a document or a change.
#[derive(Debug, thiserror::Error)]
pub enum CrdtError {
    /// Bytes that are not a document or a change.
    #[error("malformed: {0}")]
    Malformed(String),
    /// A well-formed change that writes what its author may not, or in a
    /// shape Weft never writes.
    #[error("refused change: {0}")]
    Refused(String),
    #[error("automerge: {0}")]
    Automerge(#[from] automerge::AutomergeError),
}

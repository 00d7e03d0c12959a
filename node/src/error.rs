//! The node's error: what starting, running or talking to a node can
//! fail with, with the layer's own error as its source. Kept apart from
//! the node module so that the home directory (which the node opens) can
//! use it without the two depending on each other.

use std::path::PathBuf;

use crate::api::ApiError;
use crate::identity::IdentityError;
use crate::net::NetError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("an identity already exists in {0}; keys are never overwritten")]
    AlreadyInitialized(PathBuf),
    #[error("no identity in {0}: run `weft init --name NAME` first")]
    NotInitialized(PathBuf),
    #[error("another Weft process (a daemon?) is using {0}")]
    Locked(PathBuf),
    #[error(
        "{} has mode {mode:04o}: other users may read or change it; run `chmod {fix:o} {}`",
        .path.display(),
        .path.display()
    )]
    NotPrivate { path: PathBuf, mode: u32, fix: u32 },
    #[error("corrupt {0}")]
    Corrupt(String),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("the node has stopped")]
    Stopped,
    #[error("control protocol: {0}")]
    Protocol(String),
}

impl From<NodeError> for ApiError {
    fn from(e: NodeError) -> Self {
        match e {
            NodeError::Identity(_) => ApiError::usage(e.to_string()),
            _ => ApiError::failed(e.to_string()),
        }
    }
}

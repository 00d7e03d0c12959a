//! The engine's error: what went wrong while it answered a request or took
//! in what a peer sent. A failure of a layer below (storage, crypto,
//! identity, documents) keeps its source; it becomes the user-facing
//! [`ApiError`] only when a request is answered.

use crate::api::ApiError;
use crate::crypto::CryptoError;
use crate::identity::IdentityError;
use crate::node::NodeError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The request cannot be done as asked: bad input, an unknown name, a
    /// message that is not the user's to change (exit code 2).
    #[error("{0}")]
    Usage(String),
    /// The request was fine but could not be done (exit code 1).
    #[error("{0}")]
    Failed(String),
    #[error("storage: {0}")]
    Store(#[from] StoreError),
    #[error("crypto: {0}")]
    Crypto(#[from] CryptoError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Document(#[from] weft_crdt::CrdtError),
    #[error(transparent)]
    Node(#[from] NodeError),
}

impl EngineError {
    pub fn usage(message: impl Into<String>) -> Self {
        Self::Usage(message.into())
    }

    pub fn failed(message: impl Into<String>) -> Self {
        Self::Failed(message.into())
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Usage(message) => ApiError::usage(message),
            EngineError::Node(e) => ApiError::from(e),
            other => ApiError::failed(other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ErrorKind;

    #[test]
    fn only_usage_errors_are_the_callers() {
        let usage = ApiError::from(EngineError::usage("no contact named bob"));
        assert_eq!(usage.kind, ErrorKind::Usage);
        assert_eq!(usage.message, "no contact named bob");
        let store = ApiError::from(EngineError::from(StoreError::Corrupt("bad row".into())));
        assert_eq!(store.kind, ErrorKind::Failed);
        assert!(store.message.starts_with("storage: "), "{}", store.message);
    }

    #[test]
    fn a_lower_layers_failure_keeps_its_source() {
        let e = EngineError::from(StoreError::Corrupt("bad row".into()));
        assert!(std::error::Error::source(&e).is_some());
    }
}

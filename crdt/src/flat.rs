//! [`FlatDoc`]: an automerge document that is one root map of scalar
//! values under string keys, with remote changes decoded and checked
//! ([`FlatDoc::inspect`]) before they are applied.

use std::panic::{AssertUnwindSafe, catch_unwind};

use automerge::legacy::{Key, ObjectId};
use automerge::sync::{self, SyncDoc};
use automerge::transaction::{CommitOptions, Transactable};
use automerge::{ActorId, AutoCommit, Change, ChangeHash, ROOT, ReadDoc, ScalarValue, Value};

use crate::CrdtError;

/// Longest key a change may write.
pub const MAX_KEY: usize = 200;
/// Longest string or bytes value a change may write.
pub const MAX_VALUE: usize = 1024;
/// Most operations in one change.
pub const MAX_OPS: usize = 4096;
/// Most bytes of one encoded change.
pub const MAX_CHANGE_BYTES: usize = 512 * 1024;

/// What one operation of a change does to its key.
#[derive(Clone, Debug, PartialEq)]
pub enum TouchKind {
    Put(ScalarValue),
    Delete,
}

/// One operation of a change: a key of the root map and what happens to it.
#[derive(Clone, Debug, PartialEq)]
pub struct Touch {
    pub key: String,
    pub kind: TouchKind,
}

/// A remote change, decoded and checked for shape, not yet applied.
#[derive(Debug)]
pub struct Inspected {
    pub(crate) change: Change,
    /// The change's actor: the device that wrote it.
    pub actor: Vec<u8>,
    pub touches: Vec<Touch>,
}

impl Inspected {
    pub fn hash(&self) -> ChangeHash {
        self.change.hash()
    }

    /// The changes this one builds on.
    pub fn deps(&self) -> &[ChangeHash] {
        self.change.deps()
    }
}

/// A flat automerge document.
#[derive(Debug)]
pub struct FlatDoc {
    doc: AutoCommit,
    /// Heads when last persisted ([`FlatDoc::persist`]), if ever.
    persisted: Option<Vec<ChangeHash>>,
    /// Increments written since the last whole save.
    increments: u32,
}

/// Increments written before the next [`FlatDoc::persist`] writes the
/// whole document again (compressed; increments are not).
const INCREMENTS_PER_SAVE: u32 = 64;

/// What to write to keep a document on disk.
#[derive(Debug, PartialEq, Eq)]
pub enum Persist {
    /// Nothing changed.
    Nothing,
    /// Replace what is stored with this whole document.
    Whole(Vec<u8>),
    /// Append these changes to what is stored (a document followed by
    /// change chunks loads as one).
    Append(Vec<u8>),
}

impl FlatDoc {
    /// An empty document whose own changes carry `actor` (the device id).
    pub fn new(actor: &[u8]) -> Self {
        Self {
            doc: AutoCommit::new().with_actor(ActorId::from(actor)),
            persisted: None,
            increments: 0,
        }
    }

    /// A document from [`FlatDoc::save`]d bytes.
    pub fn load(bytes: &[u8], actor: &[u8]) -> Result<Self, CrdtError> {
        let doc = catch_unwind(|| AutoCommit::load(bytes))
            .map_err(|_| CrdtError::Malformed("the document could not be decoded".into()))?
            .map_err(|e| CrdtError::Malformed(e.to_string()))?;
        let mut doc = doc.with_actor(ActorId::from(actor));
        let heads = doc.get_heads();
        Ok(Self {
            doc,
            persisted: Some(heads),
            increments: 0,
        })
    }

    /// The whole document, compressed.
    pub fn save(&mut self) -> Vec<u8> {
        self.doc.save()
    }

    /// What to write so that the stored bytes (what this document was
    /// loaded from plus what earlier calls said to write) load as this
    /// document: usually only the changes since the last call, and every
    /// [`INCREMENTS_PER_SAVE`] calls the whole document, compressed
    /// (compressing a large document on every change was the cost that
    /// dominated applying remote changes).
    pub fn persist(&mut self) -> Persist {
        let heads = self.doc.get_heads();
        match &self.persisted {
            Some(at) if *at == heads => Persist::Nothing,
            Some(at) if self.increments < INCREMENTS_PER_SAVE => {
                let bytes = self.doc.save_after(at);
                self.persisted = Some(heads);
                self.increments += 1;
                Persist::Append(bytes)
            }
            _ => {
                let bytes = self.doc.save();
                self.persisted = Some(heads);
                self.increments = 0;
                Persist::Whole(bytes)
            }
        }
    }

    pub fn put(&mut self, key: &str, value: impl Into<ScalarValue>) -> Result<(), CrdtError> {
        self.doc.put(ROOT, key, value.into())?;
        Ok(())
    }

    pub fn delete(&mut self, key: &str) -> Result<(), CrdtError> {
        if self.doc.get(ROOT, key)?.is_some() {
            self.doc.delete(ROOT, key)?;
        }
        Ok(())
    }

    /// Commits the pending operations as one change and returns its
    /// bytes, to send. Changes carry no wall-clock time (it would only
    /// leak when things were done; order comes from the keys' values).
    pub fn commit(&mut self) -> Option<Vec<u8>> {
        let hash = self
            .doc
            .commit_with(CommitOptions::default().with_time(0))?;
        self.doc
            .get_change_by_hash(&hash)
            .map(|c| c.raw_bytes().to_vec())
    }

    /// The value automerge picks for `key` (the same on every replica).
    pub fn get(&self, key: &str) -> Option<ScalarValue> {
        match self.doc.get(ROOT, key) {
            Ok(Some((Value::Scalar(v), _))) => Some(v.into_owned()),
            _ => None,
        }
    }

    /// Every value `key` holds: more than one after concurrent writes.
    pub fn get_all(&self, key: &str) -> Vec<ScalarValue> {
        self.doc
            .get_all(ROOT, key)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(v, _)| match v {
                Value::Scalar(v) => Some(v.into_owned()),
                Value::Object(_) => None,
            })
            .collect()
    }

    /// The keys that start with `prefix`, in order.
    pub fn keys_with_prefix(&self, prefix: &str) -> Vec<String> {
        self.doc
            .map_range(ROOT, prefix.to_string()..)
            .map(|item| item.key.into_owned())
            .take_while(|k| k.starts_with(prefix))
            .collect()
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.doc.length(ROOT)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Decodes a remote change and checks its shape: only puts of scalars
    /// and deletions on root keys, bounded. Says which keys it writes, so
    /// that the caller can check who may write them.
    pub fn inspect(bytes: &[u8]) -> Result<Inspected, CrdtError> {
        if bytes.len() > MAX_CHANGE_BYTES {
            return Err(CrdtError::Refused(format!(
                "a change of {} bytes (at most {MAX_CHANGE_BYTES})",
                bytes.len()
            )));
        }
        let decoded = catch_unwind(AssertUnwindSafe(|| {
            let change = Change::try_from(bytes).map_err(|e| e.to_string())?;
            let expanded = change.decode();
            Ok::<_, String>((change, expanded))
        }));
        let (change, expanded) = match decoded {
            Ok(Ok(decoded)) => decoded,
            Ok(Err(e)) => return Err(CrdtError::Malformed(e)),
            Err(_) => {
                return Err(CrdtError::Malformed(
                    "the change could not be decoded".into(),
                ));
            }
        };
        if expanded.operations.len() > MAX_OPS {
            return Err(CrdtError::Refused(format!(
                "{} operations in one change (at most {MAX_OPS})",
                expanded.operations.len()
            )));
        }
        let mut touches = Vec::with_capacity(expanded.operations.len());
        for op in expanded.operations {
            let (ObjectId::Root, Key::Map(key)) = (&op.obj, &op.key) else {
                return Err(CrdtError::Refused("an operation below the root map".into()));
            };
            if key.len() > MAX_KEY {
                return Err(CrdtError::Refused(format!("a key of {} bytes", key.len())));
            }
            let kind = match op.action {
                automerge::legacy::OpType::Put(v) => {
                    let size = match &v {
                        ScalarValue::Str(s) => s.len(),
                        ScalarValue::Bytes(b) => b.len(),
                        _ => 0,
                    };
                    if size > MAX_VALUE {
                        return Err(CrdtError::Refused(format!("a value of {size} bytes")));
                    }
                    TouchKind::Put(v)
                }
                automerge::legacy::OpType::Delete => TouchKind::Delete,
                _ => return Err(CrdtError::Refused("an object, counter or mark".into())),
            };
            touches.push(Touch {
                key: key.to_string(),
                kind,
            });
        }
        Ok(Inspected {
            actor: change.actor_id().to_bytes().to_vec(),
            change,
            touches,
        })
    }

    /// Applies an inspected change (and any that waited for it). `false`
    /// if the document had it already.
    pub fn apply(&mut self, change: Inspected) -> Result<bool, CrdtError> {
        let hash = change.change.hash();
        if self.doc.get_change_by_hash(&hash).is_some() {
            return Ok(false);
        }
        self.doc.apply_changes([change.change])?;
        Ok(true)
    }

    /// Applies many inspected changes at once (much faster than one by
    /// one: automerge merges them in one pass). Returns how many were new.
    pub fn apply_batch(&mut self, changes: Vec<Inspected>) -> Result<usize, CrdtError> {
        let new: Vec<Change> = changes
            .into_iter()
            .map(|c| c.change)
            .filter(|c| self.doc.get_change_by_hash(&c.hash()).is_none())
            .collect();
        let count = new.len();
        self.doc.apply_changes_batch(new)?;
        Ok(count)
    }

    /// Merges in another replica's saved document (from the account's own
    /// device: its changes are not checked one by one).
    pub fn merge_saved(&mut self, bytes: &[u8]) -> Result<(), CrdtError> {
        let mut other = FlatDoc::load(bytes, b"merge")?;
        self.doc.merge(&mut other.doc)?;
        Ok(())
    }

    /// Whether the document holds every change `change` depends on (else
    /// automerge would keep it aside, in memory only, until they come).
    pub fn has_deps_of(&mut self, change: &Inspected) -> bool {
        self.has_deps_given(change, &std::collections::HashSet::new())
    }

    /// The same, counting `coming` (changes about to be applied with it)
    /// as held.
    pub fn has_deps_given(
        &mut self,
        change: &Inspected,
        coming: &std::collections::HashSet<ChangeHash>,
    ) -> bool {
        change
            .change
            .deps()
            .iter()
            .all(|d| coming.contains(d) || self.doc.get_change_by_hash(d).is_some())
    }

    /// Changes the document depends on but lacks (applied changes wait
    /// for them).
    pub fn missing(&mut self) -> Vec<ChangeHash> {
        self.doc.get_missing_deps(&[])
    }

    pub fn heads(&mut self) -> Vec<ChangeHash> {
        self.doc.get_heads()
    }

    /// The changes after `heads`, encoded, in causal order.
    pub fn changes_since(&mut self, heads: &[ChangeHash]) -> Vec<Vec<u8>> {
        self.doc
            .get_changes(heads)
            .into_iter()
            .map(|c| c.raw_bytes().to_vec())
            .collect()
    }

    /// The next automerge sync message to a peer (between one account's
    /// own devices, over a direct stream), if any.
    pub fn sync_message(&mut self, state: &mut sync::State) -> Option<Vec<u8>> {
        self.doc
            .sync()
            .generate_sync_message(state)
            .map(sync::Message::encode)
    }

    /// Receives a sync message from a peer.
    pub fn receive_sync(&mut self, state: &mut sync::State, bytes: &[u8]) -> Result<(), CrdtError> {
        let message = catch_unwind(|| sync::Message::decode(bytes))
            .map_err(|_| CrdtError::Malformed("the sync message could not be decoded".into()))?
            .map_err(|e| CrdtError::Malformed(e.to_string()))?;
        self.doc.sync().receive_sync_message(state, message)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_round_trips_and_applies_once() -> Result<(), CrdtError> {
        let mut a = FlatDoc::new(b"alice-device");
        let mut b = FlatDoc::new(b"bob-device");
        a.put("k/1", "v")?;
        a.delete("k/none")?;
        let bytes = a.commit().ok_or(CrdtError::Malformed("no change".into()))?;
        let inspected = FlatDoc::inspect(&bytes)?;
        assert_eq!(inspected.actor, b"alice-device");
        assert_eq!(
            inspected.touches,
            vec![Touch {
                key: "k/1".into(),
                kind: TouchKind::Put("v".into())
            }]
        );
        assert!(b.apply(inspected)?);
        assert!(!b.apply(FlatDoc::inspect(&bytes)?)?, "applied once");
        assert_eq!(b.get("k/1"), Some("v".into()));
        assert_eq!(b.keys_with_prefix("k/"), vec!["k/1".to_string()]);
        Ok(())
    }

    #[test]
    fn persisted_increments_load_as_the_whole_document() -> Result<(), CrdtError> {
        let mut doc = FlatDoc::new(b"a");
        let mut stored = Vec::new();
        for i in 0..200 {
            doc.put(&format!("k/{i}"), i)?;
            doc.commit();
            match doc.persist() {
                Persist::Whole(bytes) => stored = bytes,
                Persist::Append(bytes) => stored.extend_from_slice(&bytes),
                Persist::Nothing => panic!("a change was made"),
            }
            if i % 37 == 0 {
                // Loaded again mid-way, it carries on from what is stored.
                doc = FlatDoc::load(&stored, b"a")?;
                assert_eq!(doc.persist(), Persist::Nothing);
            }
        }
        let loaded = FlatDoc::load(&stored, b"b")?;
        assert_eq!(loaded.len(), 200);
        assert_eq!(loaded.get("k/199"), Some(199.into()));
        Ok(())
    }

    #[test]
    fn nested_objects_and_counters_are_refused() -> Result<(), CrdtError> {
        let mut doc = AutoCommit::new();
        doc.put_object(ROOT, "nested", automerge::ObjType::Map)?;
        let hash = doc
            .commit()
            .ok_or(CrdtError::Malformed("no change".into()))?;
        let bytes = doc
            .get_change_by_hash(&hash)
            .map(|c| c.raw_bytes().to_vec())
            .unwrap_or_default();
        assert!(matches!(
            FlatDoc::inspect(&bytes),
            Err(CrdtError::Refused(_))
        ));
        Ok(())
    }

    #[test]
    fn a_change_that_waits_for_its_dependency_applies_when_it_comes() -> Result<(), CrdtError> {
        let mut a = FlatDoc::new(b"a");
        a.put("x", 1)?;
        let first = a.commit().unwrap_or_default();
        a.put("y", 2)?;
        let second = a.commit().unwrap_or_default();
        let mut b = FlatDoc::new(b"b");
        b.apply(FlatDoc::inspect(&second)?)?;
        assert_eq!(b.get("y"), None, "waits for the first");
        assert_eq!(b.missing().len(), 1);
        b.apply(FlatDoc::inspect(&first)?)?;
        assert_eq!(b.get("y"), Some(2.into()));
        assert!(b.missing().is_empty());
        Ok(())
    }

    #[test]
    fn sync_messages_bring_two_replicas_together() -> Result<(), CrdtError> {
        let mut a = FlatDoc::new(b"a");
        let mut b = FlatDoc::new(b"b");
        for i in 0..50 {
            a.put(&format!("a/{i}"), i)?;
            a.commit();
            b.put(&format!("b/{i}"), i)?;
            b.commit();
        }
        let (mut sa, mut sb) = (sync::State::new(), sync::State::new());
        for _ in 0..10 {
            let to_b = a.sync_message(&mut sa);
            let to_a = b.sync_message(&mut sb);
            if to_b.is_none() && to_a.is_none() {
                break;
            }
            if let Some(m) = to_b {
                b.receive_sync(&mut sb, &m)?;
            }
            if let Some(m) = to_a {
                a.receive_sync(&mut sa, &m)?;
            }
        }
        assert_eq!(a.heads(), b.heads());
        assert_eq!(a.len(), 100);
        Ok(())
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
                let _ = FlatDoc::inspect(&bytes);
                let _ = FlatDoc::load(&bytes, b"x");
                let mut doc = FlatDoc::new(b"x");
                let _ = doc.receive_sync(&mut sync::State::new(), &bytes);
            }

            #[test]
            fn truncated_changes_never_panic(cut in 0usize..200) {
                let mut a = FlatDoc::new(b"a");
                a.put("key", "value").ok();
                let bytes = a.commit().unwrap_or_default();
                let _ = FlatDoc::inspect(&bytes[..cut.min(bytes.len())]);
            }
        }
    }
}

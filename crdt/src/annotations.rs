//! [`Annotations`]: what changes about a conversation after its messages
//! are sent (edits, deletions, reactions, pins) and its group metadata.
//!
//! Keys of the flat document (ids in lowercase hex):
//!
//! | key | value | who may write (checked by the node) |
//! |---|---|---|
//! | `e/<message>` | bytes: [`EditRef`] | the message's sender |
//! | `x/<message>` | `true` (never removed) | the sender, or a group admin |
//! | `r/<message>/<user>/<emoji>` | `true`; removed to un-react | `<user>` |
//! | `p/<message>` | `true`; removed to unpin | admins |
//! | `g/name`, `g/description`, `g/avatar` | string | admins |
//!
//! Writing a value that one of a key's concurrent values already holds
//! comes out of automerge as deletions of the others, so every key may
//! also be deleted, by whoever may write it. (The node keeps a deletion's
//! effect in its store whatever the document later says: the text is
//! gone.)
//!
//! Concurrent edits of one message all stay in the document; every
//! replica shows the one with the greatest (HLC, edit id), so they agree.
//! A deletion beats any edit, and its reactions and pin stop showing
//! ([`Annotations::message`]); the node shows a deletion only if its
//! author may make it ([`Annotations::message_unless_deleted`]).
//!
//! Documents are sharded ([`ShardKey`]): a message's annotations live in
//! the shard of the period its HLC falls in, group metadata in the
//! conversation's meta shard. A long conversation is many small documents,
//! each loaded only when something in its period changes.

use std::collections::{BTreeMap, BTreeSet};

use automerge::ScalarValue;

use crate::flat::{FlatDoc, Inspected, Touch, TouchKind};
use crate::{CrdtError, hex};

/// The span of one shard: 30 days of HLC wall-clock time.
pub const PERIOD_MS: u64 = 30 * 24 * 3600 * 1000;
/// Longest emoji (reaction) in bytes.
pub const MAX_EMOJI: usize = 32;

/// Which document an annotation belongs in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShardKey {
    pub conversation: [u8; 32],
    /// `hlc wall ms / PERIOD_MS`, or `u64::MAX` for the meta shard.
    pub period: u64,
}

impl ShardKey {
    /// The shard of a message whose HLC wall clock is `hlc_ms`.
    pub fn of_message(conversation: [u8; 32], hlc_ms: u64) -> Self {
        Self {
            conversation,
            period: hlc_ms / PERIOD_MS,
        }
    }

    /// The shard of the conversation's group metadata.
    pub fn meta(conversation: [u8; 32]) -> Self {
        Self {
            conversation,
            period: u64::MAX,
        }
    }
}

/// Where an edit's text is: the edit envelope's id, and its HLC.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct EditRef {
    pub hlc: u64,
    pub edit: Vec<u8>,
}

impl EditRef {
    fn encode(&self) -> Vec<u8> {
        let mut out = self.hlc.to_be_bytes().to_vec();
        out.extend_from_slice(&self.edit);
        out
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        let (hlc, edit) = bytes.split_first_chunk::<8>()?;
        (!edit.is_empty() && edit.len() <= 32).then(|| Self {
            hlc: u64::from_be_bytes(*hlc),
            edit: edit.to_vec(),
        })
    }
}

/// What a key is about: for the node's check of who may write it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Annotation {
    Edit {
        message: String,
    },
    Delete {
        message: String,
    },
    React {
        message: String,
        user: String,
        emoji: String,
    },
    Pin {
        message: String,
    },
    Group {
        field: String,
    },
}

impl Annotation {
    /// What `touch` writes, if it is a write Weft makes: the right key
    /// shape and the right kind of value for it.
    pub fn of(touch: &Touch) -> Result<Self, CrdtError> {
        let refused = || CrdtError::Refused(format!("not an annotation write: {touch:?}"));
        let mut parts = touch.key.splitn(4, '/');
        let kind = parts.next().ok_or_else(refused)?;
        let rest: Vec<&str> = parts.collect();
        let is_true = matches!(touch.kind, TouchKind::Put(ScalarValue::Boolean(true)));
        let is_delete = touch.kind == TouchKind::Delete;
        let id_ok =
            |s: &str| !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
        let annotation = match (kind, rest.as_slice()) {
            ("e", [m]) if id_ok(m) => match &touch.kind {
                TouchKind::Put(ScalarValue::Bytes(b)) if EditRef::decode(b).is_some() => {
                    Annotation::Edit {
                        message: m.to_string(),
                    }
                }
                TouchKind::Delete => Annotation::Edit {
                    message: m.to_string(),
                },
                _ => return Err(refused()),
            },
            ("x", [m]) if id_ok(m) && (is_true || is_delete) => Annotation::Delete {
                message: m.to_string(),
            },
            ("r", [m, u, emoji])
                if id_ok(m) && id_ok(u) && valid_emoji(emoji) && (is_true || is_delete) =>
            {
                Annotation::React {
                    message: m.to_string(),
                    user: u.to_string(),
                    emoji: emoji.to_string(),
                }
            }
            ("p", [m]) if id_ok(m) && (is_true || is_delete) => Annotation::Pin {
                message: m.to_string(),
            },
            ("g", [f])
                if matches!(*f, "name" | "description" | "avatar")
                    && matches!(
                        touch.kind,
                        TouchKind::Put(ScalarValue::Str(_)) | TouchKind::Delete
                    ) =>
            {
                Annotation::Group {
                    field: f.to_string(),
                }
            }
            _ => return Err(refused()),
        };
        Ok(annotation)
    }
}

fn valid_emoji(emoji: &str) -> bool {
    !emoji.is_empty()
        && emoji.len() <= MAX_EMOJI
        && !emoji.contains('/')
        && !emoji.chars().any(char::is_control)
}

/// A message's annotations, materialised.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MessageAnnotations {
    /// The edit shown (none if deleted).
    pub edit: Option<EditRef>,
    pub deleted: bool,
    /// Emoji -> users (hex), none if deleted.
    pub reactions: BTreeMap<String, BTreeSet<String>>,
    pub pinned: bool,
}

/// Group metadata, materialised.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GroupMeta {
    pub name: Option<String>,
    pub description: Option<String>,
    pub avatar: Option<String>,
}

/// A whole shard, materialised: what convergence tests compare.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AnnotationsView {
    pub messages: BTreeMap<String, MessageAnnotations>,
    pub group: GroupMeta,
}

/// One shard of a conversation's annotations.
#[derive(Debug)]
pub struct Annotations {
    doc: FlatDoc,
}

impl Annotations {
    /// An empty shard; `device` is the actor of this device's changes.
    pub fn new(device: &[u8]) -> Self {
        Self {
            doc: FlatDoc::new(device),
        }
    }

    pub fn load(bytes: &[u8], device: &[u8]) -> Result<Self, CrdtError> {
        Ok(Self {
            doc: FlatDoc::load(bytes, device)?,
        })
    }

    pub fn save(&mut self) -> Vec<u8> {
        self.doc.save()
    }

    /// What to write to keep the shard on disk (see [`FlatDoc::persist`]).
    pub fn persist(&mut self) -> crate::Persist {
        self.doc.persist()
    }

    pub fn doc(&mut self) -> &mut FlatDoc {
        &mut self.doc
    }

    /// This device edits `message` (its own): the new text is in the
    /// edit envelope `edit`. Returns the change to send.
    pub fn edit(&mut self, message: &[u8], edit: EditRef) -> Result<Vec<u8>, CrdtError> {
        self.doc
            .put(&format!("e/{}", hex(message)), edit.encode())?;
        self.commit()
    }

    pub fn delete(&mut self, message: &[u8]) -> Result<Vec<u8>, CrdtError> {
        self.doc.put(&format!("x/{}", hex(message)), true)?;
        self.commit()
    }

    /// `user` (this device's user) adds or removes a reaction.
    pub fn react(
        &mut self,
        message: &[u8],
        user: &[u8],
        emoji: &str,
        on: bool,
    ) -> Result<Vec<u8>, CrdtError> {
        if !valid_emoji(emoji) {
            return Err(CrdtError::Refused(format!(
                "a reaction is 1 to {MAX_EMOJI} bytes without '/' or control characters"
            )));
        }
        let key = format!("r/{}/{}/{emoji}", hex(message), hex(user));
        if on {
            self.doc.put(&key, true)?;
        } else {
            self.doc.delete(&key)?;
        }
        self.commit()
    }

    pub fn pin(&mut self, message: &[u8], on: bool) -> Result<Vec<u8>, CrdtError> {
        let key = format!("p/{}", hex(message));
        if on {
            self.doc.put(&key, true)?;
        } else {
            self.doc.delete(&key)?;
        }
        self.commit()
    }

    /// Sets a group metadata field (`name`, `description`, `avatar`).
    pub fn set_group(&mut self, field: &str, value: &str) -> Result<Vec<u8>, CrdtError> {
        if !matches!(field, "name" | "description" | "avatar") {
            return Err(CrdtError::Refused(format!("no group field {field:?}")));
        }
        self.doc.put(&format!("g/{field}"), value)?;
        self.commit()
    }

    fn commit(&mut self) -> Result<Vec<u8>, CrdtError> {
        self.doc
            .commit()
            .ok_or_else(|| CrdtError::Refused("nothing changed".into()))
    }

    /// Decodes a remote change and says what each of its writes is about;
    /// the caller checks the author may make them, then [`Self::apply`]s.
    pub fn inspect(bytes: &[u8]) -> Result<(Inspected, Vec<Annotation>), CrdtError> {
        let inspected = FlatDoc::inspect(bytes)?;
        let what = inspected
            .touches
            .iter()
            .map(Annotation::of)
            .collect::<Result<Vec<_>, _>>()?;
        Ok((inspected, what))
    }

    pub fn apply(&mut self, change: Inspected) -> Result<bool, CrdtError> {
        self.doc.apply(change)
    }

    /// Merges in the same shard as another device of the account saved it.
    pub fn merge_saved(&mut self, bytes: &[u8]) -> Result<(), CrdtError> {
        self.doc.merge_saved(bytes)
    }

    /// Whether `change` can apply now (its dependencies are here).
    pub fn ready(&mut self, change: &Inspected) -> bool {
        self.doc.has_deps_of(change)
    }

    /// Whether `change` can apply together with `coming`.
    pub fn ready_with(
        &mut self,
        change: &Inspected,
        coming: &std::collections::HashSet<automerge::ChangeHash>,
    ) -> bool {
        self.doc.has_deps_given(change, coming)
    }

    /// Applies many checked changes in one pass; returns how many were new.
    pub fn apply_batch(&mut self, changes: Vec<Inspected>) -> Result<usize, CrdtError> {
        self.doc.apply_batch(changes)
    }

    /// Whether `key` (one a change touched) is set now. For a reaction
    /// key: whether the reaction stands after the merge.
    pub fn holds(&self, key: &str) -> bool {
        self.doc.get(key).is_some()
    }

    /// Whether `message` is deleted.
    pub fn is_deleted(&self, message: &[u8]) -> bool {
        self.holds(&format!("x/{}", hex(message)))
    }

    /// One message's annotations.
    pub fn message(&self, message: &[u8]) -> MessageAnnotations {
        let out = self.message_unless_deleted(message);
        if out.deleted {
            return MessageAnnotations {
                deleted: true,
                ..MessageAnnotations::default()
            };
        }
        out
    }

    /// One message's annotations as they show unless it is deleted: its
    /// edit, reactions and pin, whatever `x/` says. The node decides
    /// whether a deletion stands: one by an author who may not delete the
    /// message (taken in while the message was missing) must hide nothing.
    pub fn message_unless_deleted(&self, message: &[u8]) -> MessageAnnotations {
        let id = hex(message);
        let mut out = MessageAnnotations {
            deleted: self.doc.get(&format!("x/{id}")).is_some(),
            edit: self.winning_edit(&id),
            pinned: self.doc.get(&format!("p/{id}")).is_some(),
            ..MessageAnnotations::default()
        };
        let prefix = format!("r/{id}/");
        for key in self.doc.keys_with_prefix(&prefix) {
            if let Some((user, emoji)) = key[prefix.len()..].split_once('/') {
                out.reactions
                    .entry(emoji.to_string())
                    .or_default()
                    .insert(user.to_string());
            }
        }
        out
    }

    fn winning_edit(&self, id: &str) -> Option<EditRef> {
        self.all_edits(id).into_iter().max()
    }

    /// Every edit of `message` the shard holds, greatest (the one shown)
    /// first. The node shows the first whose author was allowed to make it.
    pub fn edits(&self, message: &[u8]) -> Vec<EditRef> {
        let mut edits = self.all_edits(&hex(message));
        edits.sort_unstable_by(|a, b| b.cmp(a));
        edits
    }

    fn all_edits(&self, id: &str) -> Vec<EditRef> {
        self.doc
            .get_all(&format!("e/{id}"))
            .iter()
            .filter_map(|v| match v {
                ScalarValue::Bytes(b) => EditRef::decode(b),
                _ => None,
            })
            .collect()
    }

    /// Everything, materialised.
    pub fn view(&self) -> AnnotationsView {
        let mut ids = BTreeSet::new();
        for prefix in ["e/", "x/", "r/", "p/"] {
            for key in self.doc.keys_with_prefix(prefix) {
                if let Some(id) = key[2..].split('/').next() {
                    ids.insert(id.to_string());
                }
            }
        }
        let mut messages = BTreeMap::new();
        for id in ids {
            let Some(bytes) = unhex(&id) else { continue };
            messages.insert(id, self.message(&bytes));
        }
        let field = |f: &str| match self.doc.get(&format!("g/{f}")) {
            Some(ScalarValue::Str(s)) => Some(s.to_string()),
            _ => None,
        };
        AnnotationsView {
            messages,
            group: GroupMeta {
                name: field("name"),
                description: field("description"),
                avatar: field("avatar"),
            },
        }
    }
}

/// The bytes of a key's hex id.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALICE: &[u8] = &[0xa1; 32];
    const BOB: &[u8] = &[0xb0; 32];
    const M1: &[u8] = &[1; 16];

    fn sync(from: &mut Annotations, to: &mut Annotations) -> Result<(), CrdtError> {
        let heads = to.doc().heads();
        for change in from.doc().changes_since(&heads) {
            let (inspected, _) = Annotations::inspect(&change)?;
            to.apply(inspected)?;
        }
        Ok(())
    }

    #[test]
    fn concurrent_edits_converge_on_the_latest() -> Result<(), CrdtError> {
        let mut phone = Annotations::new(b"alice-phone");
        let mut laptop = Annotations::new(b"alice-laptop");
        phone.edit(
            M1,
            EditRef {
                hlc: 10,
                edit: vec![1],
            },
        )?;
        laptop.edit(
            M1,
            EditRef {
                hlc: 12,
                edit: vec![2],
            },
        )?;
        sync(&mut phone, &mut laptop)?;
        sync(&mut laptop, &mut phone)?;
        assert_eq!(phone.view(), laptop.view());
        assert_eq!(
            phone.message(M1).edit,
            Some(EditRef {
                hlc: 12,
                edit: vec![2]
            })
        );
        Ok(())
    }

    #[test]
    fn concurrent_edits_at_one_timestamp_agree_on_the_larger_edit_id() -> Result<(), CrdtError> {
        let mut phone = Annotations::new(b"alice-phone");
        let mut laptop = Annotations::new(b"alice-laptop");
        let at = |edit: u8| EditRef {
            hlc: 10,
            edit: vec![edit],
        };
        phone.edit(M1, at(7))?;
        laptop.edit(M1, at(3))?;
        sync(&mut phone, &mut laptop)?;
        sync(&mut laptop, &mut phone)?;
        assert_eq!(phone.view(), laptop.view());
        assert_eq!(phone.message(M1).edit, Some(at(7)));
        assert_eq!(phone.edits(M1), vec![at(7), at(3)], "greatest first");
        Ok(())
    }

    #[test]
    fn a_deletion_wins_and_hides_reactions() -> Result<(), CrdtError> {
        let mut a = Annotations::new(ALICE);
        let mut b = Annotations::new(BOB);
        b.react(M1, BOB, "👍", true)?;
        a.edit(
            M1,
            EditRef {
                hlc: 5,
                edit: vec![9],
            },
        )?;
        a.delete(M1)?;
        sync(&mut a, &mut b)?;
        sync(&mut b, &mut a)?;
        let m = a.message(M1);
        assert!(m.deleted && m.edit.is_none() && m.reactions.is_empty());
        assert_eq!(a.view(), b.view());
        Ok(())
    }

    #[test]
    fn reactions_add_and_remove() -> Result<(), CrdtError> {
        let mut a = Annotations::new(ALICE);
        a.react(M1, ALICE, "👍", true)?;
        a.react(M1, ALICE, "🎉", true)?;
        a.react(M1, ALICE, "👍", false)?;
        let m = a.message(M1);
        assert_eq!(m.reactions.keys().collect::<Vec<_>>(), vec!["🎉"]);
        assert!(a.react(M1, ALICE, "a/b", true).is_err());
        assert!(a.react(M1, ALICE, "", true).is_err());
        Ok(())
    }

    #[test]
    fn writes_are_classified_and_odd_ones_refused() -> Result<(), CrdtError> {
        let mut a = Annotations::new(ALICE);
        let change = a.react(M1, ALICE, "👍", true)?;
        let (_, what) = Annotations::inspect(&change)?;
        assert_eq!(
            what,
            vec![Annotation::React {
                message: hex(M1),
                user: hex(ALICE),
                emoji: "👍".into()
            }]
        );
        // A key Weft never writes, and a deletion set to false, are refused.
        let mut odd = FlatDoc::new(ALICE);
        odd.put("zz/1", true)?;
        let change = odd.commit().unwrap_or_default();
        assert!(Annotations::inspect(&change).is_err());
        let mut undelete = FlatDoc::new(ALICE);
        undelete.put(&format!("x/{}", hex(M1)), false)?;
        let change = undelete.commit().unwrap_or_default();
        assert!(Annotations::inspect(&change).is_err());
        Ok(())
    }

    #[test]
    fn group_metadata_and_shards() -> Result<(), CrdtError> {
        let mut a = Annotations::new(ALICE);
        a.set_group("name", "hikers")?;
        a.pin(M1, true)?;
        assert!(a.set_group("owner", "me").is_err());
        let v = a.view();
        assert_eq!(v.group.name.as_deref(), Some("hikers"));
        assert!(v.messages[&hex(M1)].pinned);
        let conv = [7; 32];
        assert_eq!(
            ShardKey::of_message(conv, PERIOD_MS * 3 + 1),
            ShardKey {
                conversation: conv,
                period: 3
            }
        );
        assert_ne!(ShardKey::meta(conv), ShardKey::of_message(conv, 0));
        Ok(())
    }
}

//! Annotations in the store: the automerge shards (as bytes), the texts
//! of edits, reactions as shown, and changes waiting for their message.

use rusqlite::params;

use super::{Db, StoreError, id_at, sql_limit};
use crate::ids::{ConversationId, DeviceId, MessageId, UserId};

/// Changes kept while their message has not arrived; the oldest go first.
const MAX_PENDING: usize = 10_000;

/// A change that waits for its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingAnnotation {
    pub author: UserId,
    pub device: DeviceId,
    pub payload: Vec<u8>,
}

impl Db<'_> {
    /// The saved shard, if any: its last whole save followed by the
    /// changes appended since. `period` `u64::MAX` is the meta shard.
    pub fn shard(&self, conv: &ConversationId, period: u64) -> Result<Option<Vec<u8>>, StoreError> {
        let Some(mut doc) = self.query_opt(
            "SELECT doc FROM shards WHERE conversation = ?1 AND period = ?2",
            params![conv.0, period as i64],
            |row| Ok(row.get::<_, Vec<u8>>(0)?),
        )?
        else {
            return Ok(None);
        };
        let chunks: Vec<Vec<u8>> = self.query_vec(
            "SELECT bytes FROM shard_chunks WHERE conversation = ?1 AND period = ?2 ORDER BY seq",
            params![conv.0, period as i64],
            |row| Ok(row.get(0)?),
        )?;
        for chunk in chunks {
            doc.extend_from_slice(&chunk);
        }
        Ok(Some(doc))
    }

    /// Stores a shard whole, replacing what was saved and appended.
    pub fn put_shard(
        &self,
        conv: &ConversationId,
        period: u64,
        doc: &[u8],
    ) -> Result<(), StoreError> {
        self.atomically(|| {
            self.execute(
                "INSERT INTO shards (conversation, period, doc) VALUES (?1, ?2, ?3)
                 ON CONFLICT (conversation, period) DO UPDATE SET doc = excluded.doc",
                params![conv.0, period as i64, doc],
            )?;
            self.execute(
                "DELETE FROM shard_chunks WHERE conversation = ?1 AND period = ?2",
                params![conv.0, period as i64],
            )?;
            Ok(())
        })
    }

    /// Every shard's place, in a stable order.
    pub fn shard_ids(&self) -> Result<Vec<(ConversationId, u64)>, StoreError> {
        self.query_vec(
            "SELECT conversation, period FROM shards ORDER BY conversation, period",
            [],
            |row| Ok((id_at(row, 0)?, row.get::<_, i64>(1)? as u64)),
        )
    }

    /// Appends changes to a stored shard (or stores them as its start),
    /// without rewriting what is there.
    pub fn append_shard(
        &self,
        conv: &ConversationId,
        period: u64,
        changes: &[u8],
    ) -> Result<(), StoreError> {
        self.atomically(|| {
            self.execute(
                "INSERT INTO shards (conversation, period, doc) VALUES (?1, ?2, x'')
                 ON CONFLICT (conversation, period) DO NOTHING",
                params![conv.0, period as i64],
            )?;
            self.execute(
                "INSERT INTO shard_chunks (conversation, period, seq, bytes)
                 VALUES (?1, ?2, (SELECT COALESCE(MAX(seq), 0) + 1 FROM shard_chunks
                                  WHERE conversation = ?1 AND period = ?2), ?3)",
                params![conv.0, period as i64, changes],
            )?;
            Ok(())
        })
    }

    /// Keeps an edit's text (once per edit id).
    pub fn add_edit(&self, id: &[u8], message: &MessageId, text: &str) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO edits (id, message, text) VALUES (?1, ?2, ?3)
             ON CONFLICT (id) DO NOTHING",
            params![id, message.0, text],
        )?;
        Ok(())
    }

    pub fn edit_text(&self, id: &[u8]) -> Result<Option<String>, StoreError> {
        self.query_opt("SELECT text FROM edits WHERE id = ?1", [id], |row| {
            Ok(row.get(0)?)
        })
    }

    /// Shows `text` for the message (an edit), keeping the original once.
    /// Nothing happens to a deleted message.
    pub fn show_edit(&self, message: &MessageId, text: &str) -> Result<bool, StoreError> {
        let changed = self.execute(
            "UPDATE messages SET original_text = coalesce(original_text, text), text = ?2,
                                 edited = 1
             WHERE id = ?1 AND deleted = 0 AND (text != ?2 OR edited = 0)",
            params![message.0, text],
        )?;
        Ok(changed > 0)
    }

    /// Deletes the message's content (its text, original text, edits and
    /// reactions), leaving a tombstone, and its envelope's ciphertext (see
    /// [`Db::erase_envelope`]). Returns whether it was there and not
    /// deleted yet.
    pub fn erase_message(&self, message: &MessageId) -> Result<bool, StoreError> {
        self.atomically(|| {
            let changed = self.execute(
                "UPDATE messages SET text = '', original_text = NULL, edited = 0, deleted = 1
                 WHERE id = ?1 AND deleted = 0",
                [message.0],
            )?;
            let edits = self.execute("DELETE FROM edits WHERE message = ?1", [message.0])?;
            self.execute("DELETE FROM reactions WHERE message = ?1", [message.0])?;
            // A message's id is its envelope's id.
            let envelope = self.erase_envelope(message)?;
            if changed > 0 || edits > 0 || envelope {
                self.note_erased();
            }
            Ok(changed > 0)
        })
    }

    /// Replaces the message's reactions; returns whether they changed. A
    /// deleted message keeps none.
    pub fn set_reactions(
        &self,
        message: &MessageId,
        reactions: &[(UserId, String)],
    ) -> Result<bool, StoreError> {
        if self.is_erased(message)? {
            return Ok(false);
        }
        let before = self.reactions(message)?;
        let mut after = reactions.to_vec();
        after.sort();
        if before == after {
            return Ok(false);
        }
        // Only the difference is written: a popular message's reactions
        // change a few at a time.
        self.atomically(|| {
            for (user, emoji) in before.iter().filter(|r| after.binary_search(r).is_err()) {
                self.execute(
                    "DELETE FROM reactions WHERE message = ?1 AND user_id = ?2 AND emoji = ?3",
                    params![message.0, user.0, emoji],
                )?;
            }
            for (user, emoji) in after.iter().filter(|r| before.binary_search(r).is_err()) {
                self.execute(
                    "INSERT INTO reactions (message, user_id, emoji) VALUES (?1, ?2, ?3)",
                    params![message.0, user.0, emoji],
                )?;
            }
            Ok(true)
        })
    }

    /// Whether the message was deleted here (by someone allowed to).
    pub fn is_erased(&self, message: &MessageId) -> Result<bool, StoreError> {
        Ok(self
            .query_opt(
                "SELECT deleted FROM messages WHERE id = ?1",
                [message.0],
                |row| Ok(row.get::<_, bool>(0)?),
            )?
            .unwrap_or(false))
    }

    /// Shows or hides one reaction; whether that changed anything.
    pub fn put_reaction(
        &self,
        message: &MessageId,
        user: &UserId,
        emoji: &str,
        on: bool,
    ) -> Result<bool, StoreError> {
        let changed = if on {
            // A deleted message keeps none.
            self.execute(
                "INSERT INTO reactions (message, user_id, emoji)
                 SELECT ?1, ?2, ?3 WHERE NOT EXISTS
                   (SELECT 1 FROM messages WHERE id = ?1 AND deleted = 1)
                 ON CONFLICT DO NOTHING",
                params![message.0, user.0, emoji],
            )?
        } else {
            self.execute(
                "DELETE FROM reactions WHERE message = ?1 AND user_id = ?2 AND emoji = ?3",
                params![message.0, user.0, emoji],
            )?
        };
        Ok(changed > 0)
    }

    /// (user, emoji) pairs, sorted.
    pub fn reactions(&self, message: &MessageId) -> Result<Vec<(UserId, String)>, StoreError> {
        self.query_vec(
            "SELECT user_id, emoji FROM reactions WHERE message = ?1 ORDER BY user_id, emoji",
            [message.0],
            |row| Ok((id_at(row, 0)?, row.get(1)?)),
        )
    }

    /// Keeps a change until what it `waits_for` is here: a message (the
    /// key is the conversation the change came in, then the message id:
    /// 48 bytes) or a shard's earlier changes (the shard's key, 40 bytes).
    pub fn add_pending_annotation(
        &self,
        waits_for: &[u8],
        pending: &PendingAnnotation,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.atomically(|| {
            self.execute(
                "INSERT INTO pending_annotations (waits_for, author, device, payload, at)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    waits_for,
                    pending.author.0,
                    pending.device.0,
                    pending.payload,
                    now_ms
                ],
            )?;
            self.execute(
                "DELETE FROM pending_annotations WHERE rowid_ NOT IN
                 (SELECT rowid_ FROM pending_annotations ORDER BY rowid_ DESC LIMIT ?1)",
                [sql_limit(MAX_PENDING)],
            )?;
            Ok(())
        })
    }

    /// The changes that waited for `waits_for`, removed from the store.
    pub fn take_pending_annotations(
        &self,
        waits_for: &[u8],
    ) -> Result<Vec<PendingAnnotation>, StoreError> {
        let found = self.query_vec(
            "SELECT author, device, payload FROM pending_annotations
             WHERE waits_for = ?1 ORDER BY rowid_",
            [waits_for],
            |row| {
                Ok(PendingAnnotation {
                    author: id_at(row, 0)?,
                    device: id_at(row, 1)?,
                    payload: row.get(2)?,
                })
            },
        )?;
        if !found.is_empty() {
            self.execute(
                "DELETE FROM pending_annotations WHERE waits_for = ?1",
                [waits_for],
            )?;
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_support::store_with;
    use crate::store::{MessageRecord, MessageStatus, Store};

    /// Conversation 1 with one message from user 7.
    fn conversation_with_message(db: &Db<'_>) -> Result<(ConversationId, MessageId), StoreError> {
        let conv = ConversationId([1; 32]);
        let id = crate::ids::EnvelopeId([9; 16]);
        db.insert_message(&MessageRecord {
            id,
            conversation: conv,
            sender_user: UserId([7; 32]),
            sender_device: DeviceId([8; 32]),
            sent_at_ms: 1,
            received_at_ms: 2,
            hlc: 1 << 16,
            epoch: 1,
            text: "first".into(),
            reply_to: None,
            status: MessageStatus::Delivered,
            edited: false,
            deleted: false,
        })?;
        Ok((conv, id))
    }

    fn file_holds(path: &std::path::Path, needle: &[u8]) -> bool {
        std::fs::read(path).is_ok_and(|bytes| bytes.windows(needle.len()).any(|w| w == needle))
    }

    /// On a file: a deleted message's text and envelope leave both the
    /// database and its -wal once the deletion is checkpointed.
    #[test]
    fn a_deleted_message_leaves_neither_file() -> Result<(), StoreError> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("weft.db");
        let wal = dir.path().join("weft.db-wal");
        let mut store = Store::open(&path)?;
        store
            .db()
            .insert_conversation(&crate::store::test_support::conversation(1))?;
        let text = b"the meeting point is the old mill";
        let sealed = b"a ciphertext nobody may keep".repeat(4);
        let txn = store.transaction()?;
        let (conv, id) = conversation_with_message(&txn.db())?;
        // An edit's text is kept twice: as the edit, and as shown.
        txn.db()
            .add_edit(&[5; 16], &id, "the meeting point is the old mill")?;
        txn.db()
            .show_edit(&id, "the meeting point is the old mill")?;
        txn.db().insert_envelope(&crate::store::EnvelopeRecord {
            id,
            conversation: conv,
            sender_device: DeviceId([8; 32]),
            epoch: 1,
            counter: 0,
            bytes: sealed.clone(),
            received_at_ms: 2,
            sealed: false,
        })?;
        txn.commit()?;
        // Into the database file, out of the -wal.
        store.checkpoint_if_erased()?;
        assert!(file_holds(&path, text) && file_holds(&path, &sealed));

        let txn = store.transaction()?;
        assert!(txn.db().erase_message(&id)?);
        txn.commit()?;
        // Until the checkpoint, the database file still has the old page.
        assert!(file_holds(&path, text));
        store.checkpoint_if_erased()?;
        for file in [&path, &wal] {
            assert!(!file_holds(file, text), "{} holds the text", file.display());
            assert!(
                !file_holds(file, &sealed),
                "{} holds the envelope",
                file.display()
            );
        }
        assert_eq!(std::fs::metadata(&wal)?.len(), 0, "the -wal is emptied");
        Ok(())
    }

    #[test]
    fn edits_show_and_a_deletion_erases_everything() -> Result<(), StoreError> {
        let store = store_with(&[1])?;
        let db = store.db();
        let (conv, message) = conversation_with_message(&db)?;
        db.add_edit(&[1; 16], &message, "better")?;
        assert!(db.show_edit(&message, "better")?);
        assert!(
            !db.show_edit(&message, "better")?,
            "no change the second time"
        );
        db.set_reactions(&message, &[(UserId([2; 32]), "👍".into())])?;
        assert_eq!(db.reactions(&message)?.len(), 1);
        let both = [
            (UserId([3; 32]), "🎉".to_string()),
            (UserId([2; 32]), "👍".into()),
        ];
        assert!(db.set_reactions(&message, &both)?);
        assert!(!db.set_reactions(&message, &both)?, "nothing to change");
        assert!(db.set_reactions(&message, &both[..1])?);
        assert_eq!(
            db.reactions(&message)?,
            vec![(UserId([3; 32]), "🎉".into())]
        );
        db.set_reactions(&message, &[(UserId([2; 32]), "👍".into())])?;
        let m = db
            .message(&message)?
            .ok_or(StoreError::Corrupt("gone".into()))?;
        assert_eq!((m.text.as_str(), m.edited), ("better", true));
        db.insert_envelope(&crate::store::EnvelopeRecord {
            id: message,
            conversation: conv,
            sender_device: DeviceId([4; 32]),
            epoch: 1,
            counter: 0,
            bytes: b"the sealed text".to_vec(),
            received_at_ms: 1,
            sealed: false,
        })?;

        assert!(db.erase_message(&message)?);
        assert!(!db.erase_message(&message)?);
        assert!(db.has_envelope(&message)?);
        assert_eq!(db.envelope(&message)?, None, "its ciphertext is gone too");
        let m = db
            .message(&message)?
            .ok_or(StoreError::Corrupt("gone".into()))?;
        assert_eq!((m.text.as_str(), m.edited, m.deleted), ("", false, true));
        assert!(
            db.edit_text(&[1; 16])?.is_none(),
            "the edit's text is gone too"
        );
        assert!(db.reactions(&message)?.is_empty());
        assert!(db.is_erased(&message)?);
        assert!(!db.show_edit(&message, "again")?, "a tombstone stays one");
        let late = (UserId([5; 32]), "👀".to_string());
        assert!(!db.put_reaction(&message, &late.0, &late.1, true)?);
        assert!(!db.set_reactions(&message, std::slice::from_ref(&late))?);
        assert!(
            db.reactions(&message)?.is_empty(),
            "a tombstone keeps no reactions"
        );
        let original: Option<Option<String>> = db.query_opt(
            "SELECT original_text FROM messages WHERE id = ?1",
            [message.0],
            |row| Ok(row.get(0)?),
        )?;
        assert_eq!(original, Some(None), "the original text is gone");

        db.append_shard(&conv, 5, b"one")?;
        db.append_shard(&conv, 5, &[0, 1, 2])?;
        assert_eq!(
            db.shard(&conv, 5)?.as_deref(),
            Some(&b"one\x00\x01\x02"[..])
        );
        // A whole save replaces the appended changes.
        db.put_shard(&conv, 5, b"whole")?;
        db.append_shard(&conv, 5, b"+1")?;
        assert_eq!(db.shard(&conv, 5)?.as_deref(), Some(&b"whole+1"[..]));
        db.put_shard(&conv, u64::MAX, b"meta")?;
        db.put_shard(&conv, 3, b"three")?;
        assert_eq!(db.shard(&conv, u64::MAX)?.as_deref(), Some(&b"meta"[..]));
        assert_eq!(db.shard(&conv, 3)?.as_deref(), Some(&b"three"[..]));
        assert_eq!(db.shard(&conv, 4)?, None);
        Ok(())
    }

    #[test]
    fn pending_changes_wait_for_their_message_and_are_bounded() -> Result<(), StoreError> {
        let store = store_with(&[])?;
        let db = store.db();
        let m = crate::ids::EnvelopeId([5; 16]);
        let p = PendingAnnotation {
            author: UserId([1; 32]),
            device: DeviceId([2; 32]),
            payload: vec![1, 2, 3],
        };
        db.add_pending_annotation(&m.0, &p, 1)?;
        assert_eq!(db.take_pending_annotations(&m.0)?, vec![p]);
        assert!(db.take_pending_annotations(&m.0)?.is_empty());
        Ok(())
    }
}

//! Envelopes: those accepted (dedup, replay detection, catch-up), those
//! waiting to be sent (the outbox), and those waiting for a key (pending).
//!
//! The envelope of a deleted message keeps its row (id, sender, epoch,
//! counter: it is still known, for dedup and catch-up summaries) with its
//! bytes emptied; such an envelope is never read back or sent on.

use rusqlite::{Row, params};

use super::{Db, StoreError, id_at, sql_limit, to_sql_int, u64_at};
use crate::ids::{ConversationId, DeviceId, EnvelopeId};

/// An envelope we accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvelopeRecord {
    pub id: EnvelopeId,
    pub conversation: ConversationId,
    pub sender_device: DeviceId,
    pub epoch: u64,
    pub counter: u64,
    /// The signed envelope as received.
    pub bytes: Vec<u8>,
    pub received_at_ms: i64,
    /// Sealed to devices (sender keys, group states) rather than with a
    /// chain: catch-up names these by id, not by counter.
    pub sealed: bool,
}

impl EnvelopeRecord {
    fn from_row(row: &Row<'_>) -> Result<Self, StoreError> {
        Ok(EnvelopeRecord {
            id: id_at(row, 0)?,
            conversation: id_at(row, 1)?,
            sender_device: id_at(row, 2)?,
            epoch: u64_at(row, 3, "epoch")?,
            counter: u64_at(row, 4, "counter")?,
            bytes: row.get(5)?,
            received_at_ms: row.get(6)?,
            sealed: row.get(7)?,
        })
    }
}

/// An envelope we still have to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEntry {
    pub envelope_id: EnvelopeId,
    pub conversation: ConversationId,
    pub bytes: Vec<u8>,
    pub created_at_ms: i64,
    pub attempts: u32,
    pub next_attempt_at_ms: i64,
    /// When retrying stops.
    pub expires_at_ms: i64,
}

impl OutboxEntry {
    fn from_row(row: &Row<'_>) -> Result<Self, StoreError> {
        let attempts = u64_at(row, 4, "attempts")?;
        Ok(OutboxEntry {
            envelope_id: id_at(row, 0)?,
            conversation: id_at(row, 1)?,
            bytes: row.get(2)?,
            created_at_ms: row.get(3)?,
            attempts: u32::try_from(attempts)
                .map_err(|_| StoreError::Corrupt(format!("attempts {attempts}")))?,
            next_attempt_at_ms: row.get(5)?,
            expires_at_ms: row.get(6)?,
        })
    }
}

macro_rules! select_outbox {
    ($rest:literal) => {
        concat!(
            "SELECT envelope_id, conversation, bytes, created_at, attempts, next_attempt_at,
                    expires_at
             FROM outbox ",
            $rest
        )
    };
}

impl Db<'_> {
    /// Records an accepted envelope. False if we already had it.
    pub fn insert_envelope(&self, env: &EnvelopeRecord) -> Result<bool, StoreError> {
        let inserted = self.execute(
            "INSERT INTO envelopes
             (id, conversation, sender_device, epoch, counter, bytes, received_at, sealed)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
             ON CONFLICT (id) DO NOTHING",
            params![
                env.id.0,
                env.conversation.0,
                env.sender_device.0,
                to_sql_int(env.epoch, "epoch")?,
                to_sql_int(env.counter, "counter")?,
                env.bytes,
                env.received_at_ms,
                env.sealed,
            ],
        )?;
        Ok(inserted > 0)
    }

    pub fn has_envelope(&self, id: &EnvelopeId) -> Result<bool, StoreError> {
        self.exists("SELECT 1 FROM envelopes WHERE id = ?1", [id.0])
    }

    /// An accepted envelope, unless its bytes were erased.
    pub fn envelope(&self, id: &EnvelopeId) -> Result<Option<EnvelopeRecord>, StoreError> {
        self.query_opt(
            "SELECT id, conversation, sender_device, epoch, counter, bytes, received_at, sealed
             FROM envelopes WHERE id = ?1 AND length(bytes) > 0",
            [id.0],
            EnvelopeRecord::from_row,
        )
    }

    /// Empties the stored bytes of an envelope (its message was deleted)
    /// and drops it from the outbox: its ciphertext is kept nowhere, sent
    /// to no one again. Members who lack it get the deletion, not the
    /// message. Whether there were bytes to erase.
    pub fn erase_envelope(&self, id: &EnvelopeId) -> Result<bool, StoreError> {
        let erased = self.execute(
            "UPDATE envelopes SET bytes = x'' WHERE id = ?1 AND length(bytes) > 0",
            [id.0],
        )?;
        let unsent = self.execute("DELETE FROM outbox WHERE envelope_id = ?1", [id.0])?;
        if erased > 0 || unsent > 0 {
            self.note_erased();
        }
        Ok(erased > 0 || unsent > 0)
    }

    /// Erases the envelopes of messages deleted before deletions erased
    /// them (a database from an earlier version). How many.
    pub fn erase_envelopes_of_deleted_messages(&self) -> Result<u64, StoreError> {
        let ids = self.query_vec(
            "SELECT id FROM messages WHERE deleted = 1 AND (
                 EXISTS (SELECT 1 FROM envelopes e WHERE e.id = messages.id AND length(e.bytes) > 0)
                 OR EXISTS (SELECT 1 FROM outbox o WHERE o.envelope_id = messages.id))",
            [],
            |row| id_at::<EnvelopeId>(row, 0),
        )?;
        for id in &ids {
            self.erase_envelope(id)?;
        }
        Ok(ids.len() as u64)
    }

    /// Queues an envelope for sending. False if it is queued already (the
    /// queued entry is kept).
    pub fn enqueue_outbox(&self, entry: &OutboxEntry) -> Result<bool, StoreError> {
        let inserted = self.execute(
            "INSERT INTO outbox
             (envelope_id, conversation, bytes, created_at, attempts, next_attempt_at,
              expires_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (envelope_id) DO NOTHING",
            params![
                entry.envelope_id.0,
                entry.conversation.0,
                entry.bytes,
                entry.created_at_ms,
                entry.attempts,
                entry.next_attempt_at_ms,
                entry.expires_at_ms,
            ],
        )?;
        Ok(inserted > 0)
    }

    /// Up to `limit` entries due by `now_ms`, oldest first.
    pub fn outbox_due(&self, now_ms: i64, limit: usize) -> Result<Vec<OutboxEntry>, StoreError> {
        // rowid breaks ties in insertion order.
        self.query_vec(
            select_outbox!("WHERE next_attempt_at <= ?1 ORDER BY created_at, rowid LIMIT ?2"),
            params![now_ms, sql_limit(limit)],
            OutboxEntry::from_row,
        )
    }

    /// Up to `limit` queued entries of one conversation, due or not, oldest
    /// first.
    pub fn outbox_for_conversation(
        &self,
        conv: &ConversationId,
        limit: usize,
    ) -> Result<Vec<OutboxEntry>, StoreError> {
        self.query_vec(
            select_outbox!("WHERE conversation = ?1 ORDER BY created_at, rowid LIMIT ?2"),
            params![conv.0, sql_limit(limit)],
            OutboxEntry::from_row,
        )
    }

    /// Counts a send attempt and schedules the next. False if the entry is
    /// gone.
    pub fn record_outbox_attempt(
        &self,
        id: &EnvelopeId,
        next_attempt_at_ms: i64,
    ) -> Result<bool, StoreError> {
        let changed = self.execute(
            "UPDATE outbox SET attempts = min(attempts + 1, 4294967295), next_attempt_at = ?2
             WHERE envelope_id = ?1",
            params![id.0, next_attempt_at_ms],
        )?;
        Ok(changed > 0)
    }

    pub fn remove_outbox(&self, id: &EnvelopeId) -> Result<bool, StoreError> {
        Ok(self.execute("DELETE FROM outbox WHERE envelope_id = ?1", [id.0])? > 0)
    }

    /// One page of the outbox's index, without the envelopes' bytes: up to
    /// `limit` entries after row `after` (0 to start), in row order, as
    /// (row, envelope, conversation). Pass the last row back for the next
    /// page; an empty page is the end.
    pub fn outbox_index_page(
        &self,
        after: i64,
        limit: usize,
    ) -> Result<Vec<(i64, EnvelopeId, ConversationId)>, StoreError> {
        self.query_vec(
            "SELECT rowid, envelope_id, conversation FROM outbox
             WHERE rowid > ?1 ORDER BY rowid LIMIT ?2",
            params![after, sql_limit(limit)],
            |row| Ok((row.get(0)?, id_at(row, 1)?, id_at(row, 2)?)),
        )
    }

    /// The ids of up to `limit` queued entries, oldest first: the order in
    /// which a peer that comes online is offered them (a sender's chain
    /// counters in order, so the receiver never skips far ahead).
    pub fn outbox_ids(&self, limit: usize) -> Result<Vec<EnvelopeId>, StoreError> {
        self.query_vec(
            "SELECT envelope_id FROM outbox ORDER BY created_at, rowid LIMIT ?1",
            [sql_limit(limit)],
            |row| id_at(row, 0),
        )
    }

    /// Removes the entries whose time is up and returns their ids.
    pub fn expire_outbox(&self, now_ms: i64) -> Result<Vec<EnvelopeId>, StoreError> {
        let ids = self.query_vec(
            "SELECT envelope_id FROM outbox WHERE expires_at <= ?1",
            [now_ms],
            |row| id_at(row, 0),
        )?;
        if !ids.is_empty() {
            self.execute("DELETE FROM outbox WHERE expires_at <= ?1", [now_ms])?;
        }
        Ok(ids)
    }

    /// Where every chain-sealed envelope of the conversation sits, as
    /// (sender device, epoch, counter, row id), sorted: what catch-up
    /// summarises and compares.
    pub fn chain_positions(
        &self,
        conv: &ConversationId,
    ) -> Result<Vec<(DeviceId, u64, u64, i64)>, StoreError> {
        self.query_vec(
            "SELECT sender_device, epoch, counter, rowid FROM envelopes
             WHERE conversation = ?1 AND sealed = 0
             ORDER BY sender_device, epoch, counter",
            [conv.0],
            |row| {
                Ok((
                    id_at(row, 0)?,
                    u64_at(row, 1, "epoch")?,
                    u64_at(row, 2, "counter")?,
                    row.get(3)?,
                ))
            },
        )
    }

    /// The conversation's sealed envelopes as (id, row id), oldest first.
    pub fn sealed_envelope_ids(
        &self,
        conv: &ConversationId,
    ) -> Result<Vec<(EnvelopeId, i64)>, StoreError> {
        self.query_vec(
            "SELECT id, rowid FROM envelopes WHERE conversation = ?1 AND sealed = 1 ORDER BY rowid",
            [conv.0],
            |row| Ok((id_at(row, 0)?, row.get(1)?)),
        )
    }

    /// The stored bytes of envelopes by row id, in the order asked (those
    /// erased left out).
    pub fn envelope_bytes_by_rowid(&self, rowids: &[i64]) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut out = Vec::with_capacity(rowids.len());
        for rowid in rowids {
            if let Some(bytes) = self.query_opt(
                "SELECT bytes FROM envelopes WHERE rowid = ?1 AND length(bytes) > 0",
                [rowid],
                |row| Ok(row.get(0)?),
            )? {
                out.push(bytes);
            }
        }
        Ok(out)
    }

    pub fn outbox_len(&self) -> Result<u64, StoreError> {
        self.count("SELECT count(*) FROM outbox", [])
    }

    /// Keeps an envelope we cannot open yet. At most `cap` are kept in all,
    /// the oldest dropped first, so a hostile peer cannot fill the disk.
    pub fn add_pending(
        &self,
        conv: &ConversationId,
        bytes: &[u8],
        now_ms: i64,
        cap: usize,
    ) -> Result<(), StoreError> {
        let evicted = self.atomically(|| {
            self.execute(
                "INSERT INTO pending (conversation, bytes, received_at) VALUES (?1, ?2, ?3)",
                params![conv.0, bytes, now_ms],
            )?;
            // Row ids only grow (AUTOINCREMENT): everything at or below the
            // (cap+1)-th newest row id is beyond the cap.
            self.execute(
                "DELETE FROM pending WHERE rowid <=
                 (SELECT rowid FROM pending ORDER BY rowid DESC LIMIT 1 OFFSET ?1)",
                [sql_limit(cap)],
            )
        })?;
        if evicted > 0 {
            tracing::warn!(
                evicted,
                cap,
                "pending envelopes over the cap; dropped the oldest"
            );
        }
        Ok(())
    }

    /// The conversation's pending envelopes as (row id, bytes), oldest first.
    pub fn pending_for_conversation(
        &self,
        conv: &ConversationId,
    ) -> Result<Vec<(i64, Vec<u8>)>, StoreError> {
        self.query_vec(
            "SELECT rowid, bytes FROM pending WHERE conversation = ?1 ORDER BY rowid",
            [conv.0],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
    }

    /// False if the row was already gone.
    pub fn remove_pending(&self, rowid: i64) -> Result<bool, StoreError> {
        Ok(self.execute("DELETE FROM pending WHERE rowid = ?1", [rowid])? > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    fn envelope(n: u8) -> EnvelopeRecord {
        EnvelopeRecord {
            id: EnvelopeId([n; 16]),
            conversation: ConversationId([1; 32]),
            sender_device: DeviceId([2; 32]),
            epoch: 3,
            counter: u64::from(n),
            bytes: vec![n; 40],
            received_at_ms: 1_000,
            sealed: false,
        }
    }

    fn outbox_entry(n: u8, created_at_ms: i64, next_attempt_at_ms: i64) -> OutboxEntry {
        OutboxEntry {
            envelope_id: EnvelopeId([n; 16]),
            conversation: ConversationId([n % 2; 32]),
            bytes: vec![n; 10],
            created_at_ms,
            attempts: 0,
            next_attempt_at_ms,
            expires_at_ms: created_at_ms + 1_000_000,
        }
    }

    fn ids(entries: &[OutboxEntry]) -> Vec<u8> {
        entries.iter().map(|e| e.envelope_id.0[0]).collect()
    }

    #[test]
    fn expired_entries_leave_the_outbox() -> Result<(), StoreError> {
        let store = Store::open_in_memory()?;
        let db = store.db();
        let mut old = outbox_entry(1, 0, 0);
        old.expires_at_ms = 50;
        db.enqueue_outbox(&old)?;
        db.enqueue_outbox(&outbox_entry(2, 10, 10))?;
        assert!(db.expire_outbox(49)?.is_empty());
        assert_eq!(db.expire_outbox(50)?, vec![EnvelopeId([1; 16])]);
        assert_eq!(ids(&db.outbox_due(i64::MAX, 10)?), vec![2]);
        Ok(())
    }

    #[test]
    fn chain_positions_leave_out_sealed_envelopes() -> Result<(), StoreError> {
        let store = Store::open_in_memory()?;
        let db = store.db();
        for n in [3u8, 1, 2] {
            db.insert_envelope(&envelope(n))?;
        }
        let mut sealed = envelope(9);
        sealed.sealed = true;
        db.insert_envelope(&sealed)?;
        let counters: Vec<u64> = db
            .chain_positions(&ConversationId([1; 32]))?
            .iter()
            .map(|p| p.2)
            .collect();
        assert_eq!(counters, vec![1, 2, 3]);
        let sealed_ids = db.sealed_envelope_ids(&ConversationId([1; 32]))?;
        assert_eq!(sealed_ids.len(), 1);
        assert_eq!(
            db.envelope_bytes_by_rowid(&[sealed_ids[0].1])?,
            vec![vec![9; 40]]
        );
        Ok(())
    }

    #[test]
    fn an_erased_envelope_stays_known_but_is_never_read_back() -> Result<(), StoreError> {
        let store = Store::open_in_memory()?;
        let db = store.db();
        for n in 1..=3u8 {
            db.insert_envelope(&envelope(n))?;
        }
        let mut queued = outbox_entry(2, 10, 10);
        queued.envelope_id = EnvelopeId([2; 16]);
        db.enqueue_outbox(&queued)?;
        let gone = EnvelopeId([2; 16]);
        store.erased.set(false);
        assert!(db.erase_envelope(&gone)?);
        assert!(store.erased.get(), "a deletion is noted for the checkpoint");
        assert!(!db.erase_envelope(&gone)?);
        // Still known: a copy arriving again is a duplicate, and catch-up
        // summaries still claim it.
        assert!(db.has_envelope(&gone)?);
        assert!(!db.insert_envelope(&envelope(2))?);
        let positions = db.chain_positions(&ConversationId([1; 32]))?;
        assert_eq!(positions.len(), 3);
        // Never read back, offered or sent.
        assert_eq!(db.envelope(&gone)?, None);
        let rowids: Vec<i64> = positions.iter().map(|p| p.3).collect();
        assert_eq!(
            db.envelope_bytes_by_rowid(&rowids)?,
            vec![vec![1; 40], vec![3; 40]]
        );
        assert_eq!(db.outbox_len()?, 0);
        let raw: Vec<u8> = store.conn.query_row(
            "SELECT bytes FROM envelopes WHERE id = ?1",
            [gone.0],
            |row| row.get(0),
        )?;
        assert!(raw.is_empty());
        Ok(())
    }

    #[test]
    fn an_envelope_is_accepted_once() -> Result<(), StoreError> {
        let store = Store::open_in_memory()?;
        let db = store.db();
        let env = envelope(1);
        assert!(!db.has_envelope(&env.id)?);
        assert!(db.insert_envelope(&env)?);
        assert!(!db.insert_envelope(&env)?);
        assert!(db.has_envelope(&env.id)?);
        assert_eq!(db.envelope(&env.id)?, Some(env));
        assert_eq!(db.envelope(&EnvelopeId([9; 16]))?, None);

        let mut huge = envelope(2);
        huge.counter = u64::MAX;
        assert!(matches!(
            db.insert_envelope(&huge),
            Err(StoreError::OutOfRange("counter"))
        ));
        Ok(())
    }

    #[test]
    fn the_outbox_index_reads_in_pages_to_the_end() -> Result<(), StoreError> {
        let store = Store::open_in_memory()?;
        let db = store.db();
        for n in 1..=5 {
            db.enqueue_outbox(&outbox_entry(n, 10, 100))?;
        }
        let mut seen = Vec::new();
        let mut after = 0;
        loop {
            let page = db.outbox_index_page(after, 2)?;
            assert!(page.len() <= 2);
            let Some(&(last, ..)) = page.last() else {
                break;
            };
            after = last;
            seen.extend(page.into_iter().map(|(_, id, _)| id.0[0]));
        }
        assert_eq!(seen, [1, 2, 3, 4, 5]);
        Ok(())
    }

    #[test]
    fn due_entries_come_oldest_first() -> Result<(), StoreError> {
        let store = Store::open_in_memory()?;
        let db = store.db();
        assert!(db.enqueue_outbox(&outbox_entry(1, 30, 100))?);
        assert!(db.enqueue_outbox(&outbox_entry(2, 10, 100))?);
        assert!(db.enqueue_outbox(&outbox_entry(3, 20, 500))?);
        // Same creation time as 2: insertion order decides.
        assert!(db.enqueue_outbox(&outbox_entry(4, 10, 50))?);
        assert!(!db.enqueue_outbox(&outbox_entry(1, 0, 0))?);
        assert_eq!(db.outbox_len()?, 4);

        assert_eq!(ids(&db.outbox_due(100, 10)?), [2, 4, 1]);
        assert_eq!(ids(&db.outbox_due(100, 2)?), [2, 4]);
        assert_eq!(ids(&db.outbox_due(49, 10)?), Vec::<u8>::new());
        assert_eq!(ids(&db.outbox_due(1_000, 10)?), [2, 4, 3, 1]);
        assert_eq!(
            ids(&db.outbox_for_conversation(&ConversationId([1; 32]), 10)?),
            [3, 1]
        );

        assert!(db.record_outbox_attempt(&EnvelopeId([2; 16]), 700)?);
        assert!(!db.record_outbox_attempt(&EnvelopeId([9; 16]), 700)?);
        assert_eq!(ids(&db.outbox_due(100, 10)?), [4, 1]);
        let retried = db.outbox_due(700, 10)?;
        assert_eq!(retried.first().map(|e| e.attempts), Some(1));

        assert!(db.remove_outbox(&EnvelopeId([2; 16]))?);
        assert!(!db.remove_outbox(&EnvelopeId([2; 16]))?);
        assert_eq!(db.outbox_len()?, 3);
        Ok(())
    }

    #[test]
    fn pending_is_capped_dropping_the_oldest() -> Result<(), StoreError> {
        let store = Store::open_in_memory()?;
        let db = store.db();
        let (a, b) = (ConversationId([1; 32]), ConversationId([2; 32]));
        for i in 0..5u8 {
            let conv = if i % 2 == 0 { &a } else { &b };
            db.add_pending(conv, &[i], i64::from(i), 3)?;
        }
        // Kept: 2, 3, 4 (the three newest, across conversations).
        let bytes = |conv| -> Result<Vec<u8>, StoreError> {
            Ok(db
                .pending_for_conversation(conv)?
                .into_iter()
                .flat_map(|(_, bytes)| bytes)
                .collect())
        };
        assert_eq!(bytes(&a)?, [2, 4]);
        assert_eq!(bytes(&b)?, [3]);

        let first = db.pending_for_conversation(&a)?;
        let rowid = first.first().map_or(0, |(rowid, _)| *rowid);
        assert!(db.remove_pending(rowid)?);
        assert!(!db.remove_pending(rowid)?);
        assert_eq!(bytes(&a)?, [4]);

        db.add_pending(&a, &[9], 9, 0)?;
        assert!(db.pending_for_conversation(&a)?.is_empty());
        assert!(db.pending_for_conversation(&b)?.is_empty());
        Ok(())
    }
}

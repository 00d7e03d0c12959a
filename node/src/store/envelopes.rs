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

/// Who handed a pending envelope over, as its row records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingFrom {
    /// The delivering peer's libp2p id, as bytes; empty when the envelope
    /// was handed over locally. Its share of the queue is capped.
    pub peer: Vec<u8>,
    /// Whether that peer answers for the envelope (it sent it directly)
    /// rather than passing on what it could not check (gossip, a relay's
    /// mailbox).
    pub liable: bool,
}

/// A pending envelope read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingRow {
    pub rowid: i64,
    pub bytes: Vec<u8>,
    pub from: PendingFrom,
}

/// How much of the pending queue one holder may fill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingLimit {
    pub rows: u64,
    /// Of envelopes (their lengths summed).
    pub bytes: u64,
}

impl PendingLimit {
    fn holds(self, (rows, bytes): (u64, u64)) -> bool {
        rows <= self.rows && bytes <= self.bytes
    }
}

/// The pending queue's limits: in all, per delivering peer, per claimed
/// sender device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingCaps {
    pub total: PendingLimit,
    pub per_peer: PendingLimit,
    pub per_sender: PendingLimit,
}

/// How many rows keeping one envelope dropped, by the cap that dropped
/// them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PendingEvicted {
    /// The delivering peer's own oldest rows.
    pub by_peer: u64,
    /// The claimed sender's own oldest rows.
    pub by_sender: u64,
    /// The oldest rows of whichever peer held the most.
    pub by_total: u64,
}

/// Kinds of line in `pending_usage` (migration 0012).
const USAGE_TOTAL: i64 = 0;
const USAGE_PEER: i64 = 1;
const USAGE_SENDER: i64 = 2;

/// Whose share of the pending queue is checked.
#[derive(Clone, Copy)]
enum Holder<'a> {
    Peer(&'a [u8]),
    Sender(&'a DeviceId),
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

    /// Keeps an envelope we cannot place yet (its key, its sender's device
    /// or its group is on the way), sent by device `sender` and handed over
    /// as `from` says, then brings the queue back within `caps`: first the
    /// delivering peer's share, then the sender's, each by dropping its own
    /// oldest rows (so a flooder evicts its own junk, not the honest
    /// envelopes others handed over); then the totals, by dropping the
    /// oldest row of whichever delivering peer holds the most of what is
    /// over. What was dropped, and for which cap.
    pub fn add_pending(
        &self,
        slot: &ConversationId,
        bytes: &[u8],
        sender: &DeviceId,
        from: &PendingFrom,
        now_ms: i64,
        caps: &PendingCaps,
    ) -> Result<PendingEvicted, StoreError> {
        self.atomically(|| {
            self.execute(
                "INSERT INTO pending (conversation, bytes, received_at, peer, liable, sender, size)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, length(?2))",
                params![slot.0, bytes, now_ms, from.peer, from.liable, sender.0],
            )?;
            Ok(PendingEvicted {
                by_peer: self.evict_pending(Holder::Peer(&from.peer), caps.per_peer)?,
                by_sender: self.evict_pending(Holder::Sender(sender), caps.per_sender)?,
                by_total: self.evict_pending_over_total(caps.total)?,
            })
        })
    }

    /// Drops the oldest rows of `holder` until it is within `limit`. How
    /// many.
    fn evict_pending(&self, holder: Holder<'_>, limit: PendingLimit) -> Result<u64, StoreError> {
        let (kind, key, oldest) = match holder {
            Holder::Peer(peer) => (
                USAGE_PEER,
                peer,
                "DELETE FROM pending WHERE rowid =
                 (SELECT rowid FROM pending WHERE peer = ?1 ORDER BY rowid LIMIT 1)",
            ),
            Holder::Sender(sender) => (
                USAGE_SENDER,
                &sender.0[..],
                "DELETE FROM pending WHERE rowid =
                 (SELECT rowid FROM pending WHERE sender = ?1 ORDER BY rowid LIMIT 1)",
            ),
        };
        let mut evicted = 0;
        while !limit.holds(self.pending_usage(kind, key)?) {
            // Each round deletes a row: the loop ends with the holder's rows.
            if self.execute(oldest, [key])? == 0 {
                return Err(StoreError::Corrupt("pending usage out of step".into()));
            }
            evicted += 1;
        }
        Ok(evicted)
    }

    /// Drops rows until the queue is within `limit` in all: each time the
    /// oldest row of the delivering peer that holds the most rows (or
    /// bytes, when those are over). How many.
    fn evict_pending_over_total(&self, limit: PendingLimit) -> Result<u64, StoreError> {
        let mut evicted = 0;
        loop {
            let (rows, bytes) = self.pending_usage(USAGE_TOTAL, &[])?;
            let largest = if rows > limit.rows {
                "SELECT holder FROM pending_usage WHERE kind = ?1
                 ORDER BY row_count DESC, holder LIMIT 1"
            } else if bytes > limit.bytes {
                "SELECT holder FROM pending_usage WHERE kind = ?1
                 ORDER BY byte_count DESC, holder LIMIT 1"
            } else {
                return Ok(evicted);
            };
            let peer: Vec<u8> = self
                .query_opt(largest, [USAGE_PEER], |row| Ok(row.get(0)?))?
                .ok_or_else(|| StoreError::Corrupt("pending usage out of step".into()))?;
            if self.execute(
                "DELETE FROM pending WHERE rowid =
                 (SELECT rowid FROM pending WHERE peer = ?1 ORDER BY rowid LIMIT 1)",
                [&peer],
            )? == 0
            {
                return Err(StoreError::Corrupt("pending usage out of step".into()));
            }
            evicted += 1;
        }
    }

    /// (rows, bytes) the pending queue holds for one holder of a kind.
    fn pending_usage(&self, kind: i64, holder: &[u8]) -> Result<(u64, u64), StoreError> {
        Ok(self
            .query_opt(
                "SELECT row_count, byte_count FROM pending_usage WHERE kind = ?1 AND holder = ?2",
                params![kind, holder],
                |row| Ok((u64_at(row, 0, "row_count")?, u64_at(row, 1, "byte_count")?)),
            )?
            .unwrap_or((0, 0)))
    }

    /// The newest pending row's id (0 if none): rows kept later have
    /// larger ids (AUTOINCREMENT never reuses one).
    pub fn pending_high_water(&self) -> Result<i64, StoreError> {
        Ok(self
            .query_opt("SELECT max(rowid) FROM pending", [], |row| {
                Ok(row.get::<_, Option<i64>>(0)?)
            })?
            .flatten()
            .unwrap_or(0))
    }

    /// One page of the pending envelopes kept under `slot`: those after row
    /// `after` and at most row `through`, in row order, at most `max_rows`
    /// of them and no more than `max_bytes` of envelopes (but at least one,
    /// whatever its size). Pass the last row back for the next page; an
    /// empty page is the end. Whoever reads the queue holds a page at a
    /// time, never the queue.
    pub fn pending_page(
        &self,
        slot: &ConversationId,
        after: i64,
        through: i64,
        max_rows: usize,
        max_bytes: u64,
    ) -> Result<Vec<PendingRow>, StoreError> {
        let mut stmt = self.prepare(
            "SELECT rowid, size, bytes, peer, liable FROM pending
             WHERE conversation = ?1 AND rowid > ?2 AND rowid <= ?3
             ORDER BY rowid LIMIT ?4",
        )?;
        let mut rows = stmt.query(params![slot.0, after, through, sql_limit(max_rows)])?;
        let mut page = Vec::new();
        let mut held = 0u64;
        while let Some(row) = rows.next()? {
            // The size is read first: an envelope past the budget is not
            // loaded at all.
            let size = u64_at(row, 1, "size")?;
            if !page.is_empty() && held.saturating_add(size) > max_bytes {
                break;
            }
            held = held.saturating_add(size);
            page.push(PendingRow {
                rowid: row.get(0)?,
                bytes: row.get(2)?,
                from: PendingFrom {
                    peer: row.get(3)?,
                    liable: row.get(4)?,
                },
            });
        }
        Ok(page)
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

    const UNLIMITED: PendingLimit = PendingLimit {
        rows: u64::MAX,
        bytes: u64::MAX,
    };

    fn rows(rows: u64) -> PendingLimit {
        PendingLimit {
            rows,
            bytes: u64::MAX,
        }
    }

    fn bytes(bytes: u64) -> PendingLimit {
        PendingLimit {
            rows: u64::MAX,
            bytes,
        }
    }

    /// Handed over by peer `n` (0: locally).
    fn by(n: u8, liable: bool) -> PendingFrom {
        PendingFrom {
            peer: if n == 0 { Vec::new() } else { vec![n; 38] },
            liable,
        }
    }

    /// An envelope of `len` bytes that says what it is in its first four.
    fn envelope_bytes(tag: u32, len: usize) -> Vec<u8> {
        let mut bytes = vec![0u8; len.max(4)];
        bytes[..4].copy_from_slice(&tag.to_be_bytes());
        bytes
    }

    fn tag_of(bytes: &[u8]) -> u32 {
        u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
    }

    /// Every pending envelope of `slot` (by their tags), read in pages.
    fn kept(db: &Db<'_>, slot: &ConversationId) -> Result<Vec<u32>, StoreError> {
        let through = db.pending_high_water()?;
        let mut out = Vec::new();
        let mut after = 0;
        loop {
            let page = db.pending_page(slot, after, through, 7, u64::MAX)?;
            let Some(last) = page.last() else {
                return Ok(out);
            };
            after = last.rowid;
            out.extend(page.iter().map(|row| tag_of(&row.bytes)));
        }
    }

    /// (rows, bytes) per peer, per sender and in all, summed from the rows
    /// themselves (not from the usage the store keeps).
    #[allow(clippy::type_complexity)]
    fn held(
        store: &Store,
    ) -> Result<
        (
            Vec<(Vec<u8>, i64, i64)>,
            Vec<(Vec<u8>, i64, i64)>,
            (i64, i64),
        ),
        StoreError,
    > {
        let per = |column: &str| -> Result<Vec<(Vec<u8>, i64, i64)>, StoreError> {
            let mut stmt = store.conn.prepare(&format!(
                "SELECT {column}, count(*), sum(length(bytes)) FROM pending
                 GROUP BY {column} ORDER BY {column}"
            ))?;
            let rows = stmt.query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?;
            Ok(rows.collect::<Result<_, _>>()?)
        };
        let total = store.conn.query_row(
            "SELECT count(*), coalesce(sum(length(bytes)), 0) FROM pending",
            [],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )?;
        Ok((per("peer")?, per("sender")?, total))
    }

    #[test]
    fn a_flooding_peer_keeps_its_share_and_evicts_only_its_own_rows() -> Result<(), StoreError> {
        let store = Store::open_in_memory()?;
        let db = store.db();
        let slot = ConversationId([1; 32]);
        let caps = PendingCaps {
            total: rows(100),
            per_peer: rows(4),
            per_sender: UNLIMITED,
        };
        // An honest envelope from peer 1, then peer 2 sends 50 from as many
        // senders (device keys are free).
        let honest = db.add_pending(
            &slot,
            &envelope_bytes(1, 80),
            &DeviceId([1; 32]),
            &by(1, true),
            1,
            &caps,
        )?;
        assert_eq!(honest, PendingEvicted::default());
        let mut evictions = Vec::new();
        for n in 0..50u32 {
            let sender = DeviceId([(n % 200) as u8 + 10; 32]);
            evictions.push(db.add_pending(
                &slot,
                &envelope_bytes(1000 + n, 80),
                &sender,
                &by(2, true),
                2,
                &caps,
            )?);
        }
        // The flooder holds its four newest; the honest one stays.
        assert_eq!(kept(&db, &slot)?, [1, 1046, 1047, 1048, 1049]);
        // Each past the fourth cost the flooder its oldest (and is what
        // the engine penalises it for).
        for (n, evicted) in evictions.iter().enumerate() {
            let by_peer = u64::from(n >= 4);
            assert_eq!(
                *evicted,
                PendingEvicted {
                    by_peer,
                    ..Default::default()
                },
                "envelope {n}"
            );
        }
        Ok(())
    }

    #[test]
    fn a_flooding_sender_keeps_its_share_whoever_forwards_it() -> Result<(), StoreError> {
        let store = Store::open_in_memory()?;
        let db = store.db();
        let slot = ConversationId([1; 32]);
        let caps = PendingCaps {
            total: rows(100),
            per_peer: UNLIMITED,
            per_sender: rows(3),
        };
        let (honest, flooder) = (DeviceId([1; 32]), DeviceId([2; 32]));
        db.add_pending(
            &slot,
            &envelope_bytes(1, 80),
            &honest,
            &by(1, false),
            1,
            &caps,
        )?;
        // Gossip forwarders 1 to 5 pass on one sender's flood.
        let mut by_sender = Vec::new();
        for n in 0..30u32 {
            let forwarder = by((n % 5) as u8 + 1, false);
            let evicted = db.add_pending(
                &slot,
                &envelope_bytes(100 + n, 80),
                &flooder,
                &forwarder,
                2,
                &caps,
            )?;
            by_sender.push(evicted.by_sender);
        }
        assert_eq!(kept(&db, &slot)?, [1, 127, 128, 129]);
        let expected: Vec<u64> = (0..30).map(|n| u64::from(n >= 3)).collect();
        assert_eq!(by_sender, expected);
        Ok(())
    }

    #[test]
    fn over_the_totals_the_largest_holder_gives_way() -> Result<(), StoreError> {
        let store = Store::open_in_memory()?;
        let db = store.db();
        let slot = ConversationId([1; 32]);
        let caps = PendingCaps {
            total: rows(12),
            per_peer: rows(5),
            per_sender: UNLIMITED,
        };
        db.add_pending(
            &slot,
            &envelope_bytes(1, 80),
            &DeviceId([1; 32]),
            &by(1, false),
            1,
            &caps,
        )?;
        // Four peers, each within its share, together more than the queue
        // holds: the oldest row in all is the honest one, and it stays.
        let mut by_total = 0;
        for n in 0..20u32 {
            let peer = by((n % 4) as u8 + 2, true);
            let evicted = db.add_pending(
                &slot,
                &envelope_bytes(100 + n, 80),
                &DeviceId([9; 32]),
                &peer,
                2,
                &caps,
            )?;
            by_total += evicted.by_total;
        }
        let all = kept(&db, &slot)?;
        assert_eq!(all.len(), 12);
        assert_eq!(all[0], 1, "the honest envelope stays: {all:?}");
        assert_eq!(by_total, 9);
        let (peers, _, _) = held(&store)?;
        assert!(peers.iter().all(|(_, rows, _)| *rows <= 3), "{peers:?}");
        Ok(())
    }

    #[test]
    fn the_byte_caps_hold_with_large_envelopes() -> Result<(), StoreError> {
        const KIB: i64 = 1024;
        let store = Store::open_in_memory()?;
        let db = store.db();
        let slot = ConversationId([1; 32]);
        let caps = PendingCaps {
            total: bytes(1 << 20),
            per_peer: bytes(512 << 10),
            per_sender: bytes(256 << 10),
        };
        db.add_pending(
            &slot,
            &envelope_bytes(1, 100),
            &DeviceId([1; 32]),
            &by(1, true),
            1,
            &caps,
        )?;
        let check = |what: &str| -> Result<(), StoreError> {
            let (peers, senders, (_, total)) = held(&store)?;
            assert!(total <= 1024 * KIB, "{what}: {total} bytes in all");
            assert!(peers.iter().all(|p| p.2 <= 512 * KIB), "{what}: {peers:?}");
            assert!(
                senders.iter().all(|s| s.2 <= 256 * KIB),
                "{what}: {senders:?}"
            );
            Ok(())
        };
        // One sender's 64 KiB envelopes; one peer's from many senders;
        // then 200 KiB envelopes from four more peers, past the total.
        for n in 0..40u32 {
            db.add_pending(
                &slot,
                &envelope_bytes(100 + n, 64 << 10),
                &DeviceId([2; 32]),
                &by(2, true),
                2,
                &caps,
            )?;
            check("one sender")?;
        }
        for n in 0..40u32 {
            let sender = DeviceId([n as u8 + 10; 32]);
            db.add_pending(
                &slot,
                &envelope_bytes(200 + n, 64 << 10),
                &sender,
                &by(3, true),
                3,
                &caps,
            )?;
            check("one peer")?;
        }
        for n in 0..40u32 {
            let sender = DeviceId([n as u8 + 100; 32]);
            let peer = by((n % 4) as u8 + 4, false);
            db.add_pending(
                &slot,
                &envelope_bytes(300 + n, 200 << 10),
                &sender,
                &peer,
                4,
                &caps,
            )?;
            check("many peers")?;
        }
        assert_eq!(
            kept(&db, &slot)?.first(),
            Some(&1),
            "the honest envelope stays"
        );
        Ok(())
    }

    #[test]
    fn usage_follows_every_insert_and_removal() -> Result<(), StoreError> {
        let store = Store::open_in_memory()?;
        let db = store.db();
        let caps = PendingCaps {
            total: rows(40),
            per_peer: rows(15),
            per_sender: bytes(3_000),
        };
        let mut removed = 0;
        for n in 0..300u32 {
            let slot = ConversationId([(n % 3) as u8; 32]);
            let sender = DeviceId([(n % 7) as u8; 32]);
            let peer = by((n % 5) as u8, n % 2 == 0);
            db.add_pending(
                &slot,
                &envelope_bytes(n, 50 + (n as usize * 37) % 400),
                &sender,
                &peer,
                1,
                &caps,
            )?;
            if n % 4 == 0 {
                let first = db.pending_page(&slot, 0, i64::MAX, 1, u64::MAX)?;
                if let Some(row) = first.first() {
                    assert!(db.remove_pending(row.rowid)?);
                    assert!(!db.remove_pending(row.rowid)?);
                    removed += 1;
                }
            }
            let (peers, senders, total) = held(&store)?;
            let usage = |kind: i64| -> Result<Vec<(Vec<u8>, i64, i64)>, StoreError> {
                let mut stmt = store.conn.prepare(
                    "SELECT holder, row_count, byte_count FROM pending_usage
                     WHERE kind = ?1 ORDER BY holder",
                )?;
                let rows =
                    stmt.query_map([kind], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?;
                Ok(rows.collect::<Result<_, _>>()?)
            };
            assert_eq!(usage(USAGE_PEER)?, peers, "after {n}");
            assert_eq!(usage(USAGE_SENDER)?, senders, "after {n}");
            let (rows, bytes) = db.pending_usage(USAGE_TOTAL, &[])?;
            assert_eq!((rows as i64, bytes as i64), total, "after {n}");
        }
        assert!(removed > 0);
        Ok(())
    }

    #[test]
    fn pending_reads_in_bounded_pages_up_to_where_it_started() -> Result<(), StoreError> {
        let store = Store::open_in_memory()?;
        let db = store.db();
        let (a, b) = (ConversationId([1; 32]), ConversationId([2; 32]));
        let caps = PendingCaps {
            total: UNLIMITED,
            per_peer: UNLIMITED,
            per_sender: UNLIMITED,
        };
        assert_eq!(db.pending_high_water()?, 0);
        for n in 0..600u32 {
            db.add_pending(
                &a,
                &envelope_bytes(n, 100),
                &DeviceId([1; 32]),
                &by(1, true),
                1,
                &caps,
            )?;
            db.add_pending(
                &b,
                &envelope_bytes(n, 100),
                &DeviceId([1; 32]),
                &by(1, true),
                1,
                &caps,
            )?;
        }
        // One envelope larger than a page's bytes still makes a page.
        db.add_pending(
            &a,
            &envelope_bytes(600, 50_000),
            &DeviceId([1; 32]),
            &by(1, true),
            1,
            &caps,
        )?;
        let through = db.pending_high_water()?;
        // Kept while the pages are read: past where the reading stops.
        db.add_pending(
            &a,
            &envelope_bytes(601, 100),
            &DeviceId([1; 32]),
            &by(1, true),
            1,
            &caps,
        )?;
        let (max_rows, max_bytes) = (256, 10_000);
        let mut seen = Vec::new();
        let mut pages = 0;
        let mut after = 0;
        loop {
            let page = db.pending_page(&a, after, through, max_rows, max_bytes)?;
            let Some(last) = page.last() else {
                break;
            };
            after = last.rowid;
            pages += 1;
            let held: usize = page.iter().map(|row| row.bytes.len()).sum();
            assert!(page.len() <= max_rows);
            assert!(
                held as u64 <= max_bytes || page.len() == 1,
                "{held} bytes in a page"
            );
            assert!(page.iter().all(|row| row.from == by(1, true)));
            // Taken as it is read, as the engine does.
            for row in &page {
                assert!(db.remove_pending(row.rowid)?);
            }
            seen.extend(page.iter().map(|row| tag_of(&row.bytes)));
        }
        assert_eq!(seen, (0..=600).collect::<Vec<_>>());
        assert_eq!(
            pages, 7,
            "100 envelopes a page (10,000 bytes), then the large one"
        );
        assert_eq!(kept(&db, &a)?, [601]);
        assert_eq!(kept(&db, &b)?.len(), 600);
        Ok(())
    }
}

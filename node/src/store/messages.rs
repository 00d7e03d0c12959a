//! Message history: each message stored once, listed in conversation
//! order: the sender's hybrid logical clock, then the id (the same on every
//! device, whatever order messages arrived in).

use std::fmt;
use std::str::FromStr;

use rusqlite::{Row, params};
use serde::{Deserialize, Serialize};

use super::{Db, StoreError, id_at, opt_id_at, parsed_at, sql_limit};
use crate::ids::{ConversationId, DeviceId, MessageId, UserId};

/// How far a message has got, in order of progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MessageStatus {
    Queued,
    Sent,
    Relayed,
    Delivered,
    Read,
}

impl MessageStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            MessageStatus::Queued => "queued",
            MessageStatus::Sent => "sent",
            MessageStatus::Relayed => "relayed",
            MessageStatus::Delivered => "delivered",
            MessageStatus::Read => "read",
        }
    }

    /// Position in the progress order, as the SQL in `set_message_status`
    /// ranks the stored text.
    fn rank(self) -> i64 {
        match self {
            MessageStatus::Queued => 0,
            MessageStatus::Sent => 1,
            MessageStatus::Relayed => 2,
            MessageStatus::Delivered => 3,
            MessageStatus::Read => 4,
        }
    }
}

impl FromStr for MessageStatus {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "queued" => Ok(MessageStatus::Queued),
            "sent" => Ok(MessageStatus::Sent),
            "relayed" => Ok(MessageStatus::Relayed),
            "delivered" => Ok(MessageStatus::Delivered),
            "read" => Ok(MessageStatus::Read),
            _ => Err(StoreError::UnknownName {
                what: "message status",
                value: s.to_owned(),
            }),
        }
    }
}

impl fmt::Display for MessageStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageRecord {
    pub id: MessageId,
    pub conversation: ConversationId,
    pub sender_user: UserId,
    pub sender_device: DeviceId,
    /// The sender's clock.
    pub sent_at_ms: i64,
    /// Our clock.
    pub received_at_ms: i64,
    /// The sender's hybrid logical clock (clamped): the conversation order.
    pub hlc: u64,
    pub text: String,
    pub reply_to: Option<MessageId>,
    pub status: MessageStatus,
    pub edited: bool,
    pub deleted: bool,
    /// The group epoch it was sent under (1 in one-to-one conversations).
    pub epoch: u64,
}

impl MessageRecord {
    fn from_row(row: &Row<'_>) -> Result<Self, StoreError> {
        Ok(MessageRecord {
            id: id_at(row, 0)?,
            conversation: id_at(row, 1)?,
            sender_user: id_at(row, 2)?,
            sender_device: id_at(row, 3)?,
            sent_at_ms: row.get(4)?,
            received_at_ms: row.get(5)?,
            text: row.get(6)?,
            reply_to: opt_id_at(row, 7)?,
            status: parsed_at(row, 8)?,
            edited: row.get(9)?,
            deleted: row.get(10)?,
            hlc: super::u64_at(row, 11, "hlc")?,
            epoch: super::u64_at(row, 12, "epoch")?,
        })
    }
}

macro_rules! select_messages {
    ($rest:literal) => {
        concat!(
            "SELECT id, conversation, sender_user, sender_device, sent_at, received_at,
                    text, reply_to, status, edited, deleted, hlc, epoch
             FROM messages ",
            $rest
        )
    };
}

impl Db<'_> {
    /// Stores a message once: false if its id is already stored (the stored
    /// copy is kept). Its conversation must exist.
    pub fn insert_message(&self, msg: &MessageRecord) -> Result<bool, StoreError> {
        // ON CONFLICT (id) rather than OR IGNORE: only a duplicate id is
        // skipped; any other violation is an error, not a silent drop.
        let inserted = self.execute(
            "INSERT INTO messages (id, conversation, sender_user, sender_device, sent_at,
                                   received_at, text, reply_to, status, edited, deleted, hlc,
                                   epoch)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)
             ON CONFLICT (id) DO NOTHING",
            params![
                msg.id.0,
                msg.conversation.0,
                msg.sender_user.0,
                msg.sender_device.0,
                msg.sent_at_ms,
                msg.received_at_ms,
                msg.text,
                msg.reply_to.map(|id| id.0),
                msg.status.as_str(),
                msg.edited,
                msg.deleted,
                super::to_sql_int(msg.hlc, "hlc")?,
                super::to_sql_int(msg.epoch, "epoch")?,
            ],
        )?;
        Ok(inserted > 0)
    }

    pub fn message(&self, id: &MessageId) -> Result<Option<MessageRecord>, StoreError> {
        self.query_opt(
            select_messages!("WHERE id = ?1"),
            [id.0],
            MessageRecord::from_row,
        )
    }

    /// Moves the status forward. Acknowledgements arrive out of order, so a
    /// status never goes back (a late "delivered" leaves "read" alone).
    /// Returns whether the stored status changed.
    pub fn set_message_status(
        &self,
        id: &MessageId,
        status: MessageStatus,
    ) -> Result<bool, StoreError> {
        let changed = self.execute(
            "UPDATE messages SET status = ?2
             WHERE id = ?1
               AND CASE status WHEN 'queued' THEN 0 WHEN 'sent' THEN 1 WHEN 'relayed' THEN 2
                               WHEN 'delivered' THEN 3 ELSE 4 END < ?3",
            params![id.0, status.as_str(), status.rank()],
        )?;
        Ok(changed > 0)
    }

    /// The latest `limit` messages of the conversation, strictly before
    /// `before` if given, in ascending (hlc, id) order. `before` must be
    /// a message of this conversation.
    pub fn messages(
        &self,
        conv: &ConversationId,
        limit: usize,
        before: Option<&MessageId>,
    ) -> Result<Vec<MessageRecord>, StoreError> {
        let mut page = match before {
            None => self.query_vec(
                select_messages!("WHERE conversation = ?1 ORDER BY hlc DESC, id DESC LIMIT ?2"),
                params![conv.0, sql_limit(limit)],
                MessageRecord::from_row,
            )?,
            Some(before) => {
                let hlc: i64 = self
                    .query_opt(
                        "SELECT hlc FROM messages WHERE id = ?1 AND conversation = ?2",
                        params![before.0, conv.0],
                        |row| Ok(row.get(0)?),
                    )?
                    .ok_or(StoreError::UnknownMessage(*before))?;
                self.query_vec(
                    select_messages!(
                        "WHERE conversation = ?1 AND (hlc, id) < (?2, ?3)
                         ORDER BY hlc DESC, id DESC LIMIT ?4"
                    ),
                    params![conv.0, hlc, before.0, sql_limit(limit)],
                    MessageRecord::from_row,
                )?
            }
        };
        page.reverse();
        Ok(page)
    }

    /// Messages of every conversation in (hlc, id) order after `after`,
    /// sent at or after `since_ms`, at most `limit`: history for another
    /// device of the account.
    pub fn messages_after(
        &self,
        after: Option<(u64, MessageId)>,
        since_ms: i64,
        limit: usize,
    ) -> Result<Vec<MessageRecord>, StoreError> {
        let (hlc, id) = match after {
            Some((hlc, id)) => (super::to_sql_int(hlc, "hlc")?, id.0.to_vec()),
            None => (-1, Vec::new()),
        };
        self.query_vec(
            select_messages!(
                "WHERE (hlc, id) > (?1, ?2) AND sent_at >= ?3 ORDER BY hlc, id LIMIT ?4"
            ),
            params![hlc, id, since_ms, sql_limit(limit)],
            MessageRecord::from_row,
        )
    }

    /// Incoming messages of the conversation not yet marked read, oldest
    /// first, at most `limit`.
    /// Marks the incoming messages of `conv` up to `hlc` read (another
    /// device of the account read them) and recounts the unread ones.
    /// Returns how many became read.
    pub fn read_up_to(
        &self,
        conv: &ConversationId,
        me: &UserId,
        hlc: u64,
    ) -> Result<usize, StoreError> {
        self.atomically(|| {
            let changed = self.execute(
                "UPDATE messages SET status = 'read'
                 WHERE conversation = ?1 AND sender_user <> ?2 AND hlc <= ?3
                   AND status <> 'read'",
                params![conv.0, me.0, super::to_sql_int(hlc, "hlc")?],
            )?;
            if changed > 0 {
                self.recount_unread(conv, me)?;
            }
            Ok(changed)
        })
    }

    /// Sets the conversation's unread count to its incoming messages not
    /// marked read.
    pub fn recount_unread(&self, conv: &ConversationId, me: &UserId) -> Result<(), StoreError> {
        self.execute(
            "UPDATE conversations SET unread = (
                 SELECT COUNT(*) FROM messages WHERE conversation = ?1
                 AND sender_user <> ?2 AND status <> 'read')
             WHERE id = ?1",
            params![conv.0, me.0],
        )?;
        Ok(())
    }

    /// The order key of the conversation's latest message.
    pub fn latest_hlc(&self, conv: &ConversationId) -> Result<Option<u64>, StoreError> {
        let hlc: Option<i64> = self
            .query_opt(
                "SELECT MAX(hlc) FROM messages WHERE conversation = ?1",
                [conv.0],
                |row| Ok(row.get::<_, Option<i64>>(0)?),
            )?
            .flatten();
        Ok(hlc.and_then(|h| u64::try_from(h).ok()))
    }

    pub fn unread_incoming(
        &self,
        conv: &ConversationId,
        me: &UserId,
        limit: usize,
    ) -> Result<Vec<MessageId>, StoreError> {
        self.query_vec(
            "SELECT id FROM messages
             WHERE conversation = ?1 AND sender_user <> ?2 AND status <> 'read'
             ORDER BY hlc, id LIMIT ?3",
            params![conv.0, me.0, sql_limit(limit)],
            |row| id_at(row, 0),
        )
    }

    /// The newest clock value stored, to resume this device's clock after
    /// a restart.
    pub fn max_hlc(&self) -> Result<u64, StoreError> {
        let max: Option<i64> = self
            .query_opt("SELECT max(hlc) FROM messages", [], |row| Ok(row.get(0)?))?
            .flatten();
        Ok(max.map_or(0, |m| m.max(0) as u64))
    }

    pub fn message_count(&self, conv: &ConversationId) -> Result<u64, StoreError> {
        self.count(
            "SELECT count(*) FROM messages WHERE conversation = ?1",
            [conv.0],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::EnvelopeId;
    use crate::store::test_support::store_with;
    use proptest::prelude::*;

    fn conv() -> ConversationId {
        ConversationId([1; 32])
    }

    fn message(id: u8, sent_at_ms: i64) -> MessageRecord {
        message_with_id(EnvelopeId([id; 16]), sent_at_ms)
    }

    fn message_with_id(id: MessageId, sent_at_ms: i64) -> MessageRecord {
        MessageRecord {
            id,
            conversation: conv(),
            sender_user: UserId([7; 32]),
            sender_device: DeviceId([8; 32]),
            sent_at_ms,
            received_at_ms: sent_at_ms + 5,
            text: format!("hello {}", id.0[0]),
            reply_to: None,
            status: MessageStatus::Delivered,
            edited: false,
            deleted: false,
            hlc: crate::hlc::Hlc::new(sent_at_ms.max(0) as u64, 0).0,
            epoch: 1,
        }
    }

    fn listed_ids(msgs: &[MessageRecord]) -> Vec<u8> {
        msgs.iter().map(|m| m.id.0[0]).collect()
    }

    #[test]
    fn status_names_round_trip() -> Result<(), StoreError> {
        use MessageStatus::*;
        for status in [Queued, Sent, Relayed, Delivered, Read] {
            assert_eq!(status.as_str().parse::<MessageStatus>()?, status);
        }
        assert!("READ".parse::<MessageStatus>().is_err());
        Ok(())
    }

    #[test]
    fn a_message_is_stored_once() -> Result<(), StoreError> {
        let store = store_with(&[1])?;
        let db = store.db();
        let mut first = message(1, 100);
        first.reply_to = Some(EnvelopeId([0; 16]));
        assert!(db.insert_message(&first)?);
        let mut again = first.clone();
        again.text = "a replay".into();
        assert!(!db.insert_message(&again)?);
        assert_eq!(db.message(&first.id)?, Some(first));
        assert_eq!(db.message_count(&conv())?, 1);
        assert_eq!(db.message(&EnvelopeId([9; 16]))?, None);
        Ok(())
    }

    #[test]
    fn a_message_needs_its_conversation() -> Result<(), StoreError> {
        let store = store_with(&[])?;
        assert!(store.db().insert_message(&message(1, 100)).is_err());
        Ok(())
    }

    #[test]
    fn status_only_moves_forward() -> Result<(), StoreError> {
        let store = store_with(&[1])?;
        let db = store.db();
        let mut msg = message(1, 100);
        msg.status = MessageStatus::Queued;
        db.insert_message(&msg)?;
        assert!(db.set_message_status(&msg.id, MessageStatus::Sent)?);
        assert!(db.set_message_status(&msg.id, MessageStatus::Read)?);
        assert!(!db.set_message_status(&msg.id, MessageStatus::Delivered)?);
        assert!(!db.set_message_status(&msg.id, MessageStatus::Read)?);
        assert!(!db.set_message_status(&EnvelopeId([9; 16]), MessageStatus::Read)?);
        assert_eq!(
            db.message(&msg.id)?.map(|m| m.status),
            Some(MessageStatus::Read)
        );
        Ok(())
    }

    #[test]
    fn pages_walk_back_through_history() -> Result<(), StoreError> {
        let store = store_with(&[1, 2])?;
        let db = store.db();
        // Ids 5 and 3 share a send time: the id breaks the tie.
        for (id, at) in [(1, 10), (5, 20), (3, 20), (4, 30), (2, 40)] {
            db.insert_message(&message(id, at))?;
        }
        let mut other = message(9, 25);
        other.conversation = ConversationId([2; 32]);
        db.insert_message(&other)?;

        assert_eq!(
            listed_ids(&db.messages(&conv(), 100, None)?),
            [1, 3, 5, 4, 2]
        );
        assert_eq!(listed_ids(&db.messages(&conv(), 2, None)?), [4, 2]);
        let before_4 = EnvelopeId([4; 16]);
        assert_eq!(
            listed_ids(&db.messages(&conv(), 2, Some(&before_4))?),
            [3, 5]
        );
        let before_5 = EnvelopeId([5; 16]);
        assert_eq!(
            listed_ids(&db.messages(&conv(), 10, Some(&before_5))?),
            [1, 3]
        );
        let before_1 = EnvelopeId([1; 16]);
        assert!(db.messages(&conv(), 10, Some(&before_1))?.is_empty());
        assert!(db.messages(&conv(), 0, None)?.is_empty());
        assert_eq!(db.message_count(&conv())?, 5);

        // `before` from another conversation, or unknown, is an error.
        match db.messages(&conv(), 10, Some(&EnvelopeId([9; 16]))) {
            Err(StoreError::UnknownMessage(id)) => assert_eq!(id, EnvelopeId([9; 16])),
            other => panic!("expected UnknownMessage, got {other:?}"),
        }
        Ok(())
    }

    #[test]
    fn paging_uses_the_time_index() -> Result<(), StoreError> {
        let store = store_with(&[1])?;
        let plan: Vec<String> = store.db().query_vec(
            concat!(
                "EXPLAIN QUERY PLAN ",
                select_messages!(
                    "WHERE conversation = ?1 AND (hlc, id) < (?2, ?3)
                     ORDER BY hlc DESC, id DESC LIMIT ?4"
                )
            ),
            params![conv().0, 0, [0u8; 16], 10],
            |row| Ok(row.get(3)?),
        )?;
        let plan = plan.join("\n");
        assert!(plan.contains("messages_by_order"), "{plan}");
        assert!(!plan.contains("TEMP B-TREE"), "{plan}");
        Ok(())
    }

    /// Inserts `msgs` in the given order and reads the history back whole
    /// and page by page (newest page first, reassembled).
    fn history(
        msgs: &[MessageRecord],
        page: usize,
    ) -> Result<(Vec<MessageRecord>, Vec<MessageRecord>), StoreError> {
        let store = store_with(&[1])?;
        let db = store.db();
        for msg in msgs {
            db.insert_message(msg)?;
        }
        let whole = db.messages(&conv(), usize::MAX, None)?;
        let mut paged = Vec::new();
        let mut before = None;
        loop {
            let mut chunk = db.messages(&conv(), page, before.as_ref())?;
            if chunk.is_empty() {
                break;
            }
            before = chunk.first().map(|m| m.id);
            chunk.append(&mut paged);
            paged = chunk;
        }
        Ok((whole, paged))
    }

    proptest! {
        #[test]
        fn insertion_order_does_not_change_history(
            (msgs, shuffled) in prop::collection::btree_map(any::<[u8; 16]>(), 0i64..6, 0..40)
                .prop_map(|by_id| {
                    by_id
                        .into_iter()
                        .map(|(id, at)| message_with_id(EnvelopeId(id), at))
                        .collect::<Vec<_>>()
                })
                .prop_flat_map(|msgs| (Just(msgs.clone()), Just(msgs).prop_shuffle())),
            page in 1usize..7,
        ) {
            let mut expected = msgs;
            expected.sort_by_key(|m| (m.hlc, m.id));
            let (whole, paged) = history(&shuffled, page)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(&whole, &expected);
            prop_assert_eq!(&paged, &expected);
            let (in_order, _) = history(&expected, page)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(&in_order, &whole);
        }
    }
}

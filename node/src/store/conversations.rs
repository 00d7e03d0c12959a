//! Conversations (direct and group) and their member lists.

use std::fmt;
use std::str::FromStr;

use rusqlite::{Row, params};
use serde::{Deserialize, Serialize};

use super::{Db, StoreError, id_at, parsed_at, to_sql_int, u64_at};
use crate::ids::{ConversationId, RoutingTag, UserId};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConversationKind {
    Direct,
    Group,
}

impl ConversationKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ConversationKind::Direct => "direct",
            ConversationKind::Group => "group",
        }
    }
}

impl FromStr for ConversationKind {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "direct" => Ok(ConversationKind::Direct),
            "group" => Ok(ConversationKind::Group),
            _ => Err(StoreError::UnknownName {
                what: "conversation kind",
                value: s.to_owned(),
            }),
        }
    }
}

impl fmt::Display for ConversationKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A member's role in a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Member,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Member => "member",
            Role::Admin => "admin",
        }
    }
}

impl FromStr for Role {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "member" => Ok(Role::Member),
            "admin" => Ok(Role::Admin),
            _ => Err(StoreError::UnknownName {
                what: "role",
                value: s.to_owned(),
            }),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversationRecord {
    pub id: ConversationId,
    pub kind: ConversationKind,
    pub name: String,
    /// The gossip topic the conversation is published on.
    pub topic: String,
    /// The routing tag its envelopes carry now (`None` for a conversation
    /// made under protocol 1 whose routing secret is not known yet).
    pub tag: Option<RoutingTag>,
    /// Group epoch (1 for direct conversations).
    pub epoch: u64,
    /// The epoch of this device's own sending chain: one more at every
    /// group change and every revocation of a member's device.
    pub key_epoch: u64,
    /// Serialized group state, owned by the group module.
    pub state: Option<Vec<u8>>,
    pub created_at_ms: i64,
    pub last_message_at_ms: Option<i64>,
    pub unread: u32,
}

impl ConversationRecord {
    /// A new one-to-one conversation.
    pub fn direct(
        id: ConversationId,
        name: &str,
        routing: &crate::routing::Routing,
        created_at_ms: i64,
    ) -> Self {
        ConversationRecord {
            id,
            kind: ConversationKind::Direct,
            name: name.to_string(),
            topic: routing.topic(),
            tag: Some(routing.tag()),
            epoch: 1,
            key_epoch: 1,
            state: None,
            created_at_ms,
            last_message_at_ms: None,
            unread: 0,
        }
    }

    fn from_row(row: &Row<'_>) -> Result<Self, StoreError> {
        let unread = u64_at(row, 8, "unread count")?;
        Ok(ConversationRecord {
            id: id_at(row, 0)?,
            kind: parsed_at(row, 1)?,
            name: row.get(2)?,
            topic: row.get(3)?,
            epoch: u64_at(row, 4, "epoch")?,
            state: row.get(5)?,
            created_at_ms: row.get(6)?,
            last_message_at_ms: row.get(7)?,
            unread: u32::try_from(unread)
                .map_err(|_| StoreError::Corrupt(format!("unread count {unread}")))?,
            key_epoch: u64_at(row, 9, "key epoch")?,
            tag: row
                .get::<_, Option<Vec<u8>>>(10)?
                .map(|b| {
                    RoutingTag::from_slice(&b)
                        .ok_or_else(|| StoreError::Corrupt("routing tag".into()))
                })
                .transpose()?,
        })
    }
}

macro_rules! select_conversations {
    ($rest:literal) => {
        concat!(
            "SELECT id, kind, name, topic, epoch, state, created_at, last_message_at, unread,
                    key_epoch, tag
             FROM conversations ",
            $rest
        )
    };
}

impl Db<'_> {
    /// Adds a conversation. False if it already existed, which is then left
    /// untouched.
    pub fn insert_conversation(&self, conv: &ConversationRecord) -> Result<bool, StoreError> {
        let inserted = self.execute(
            "INSERT INTO conversations
             (id, kind, name, topic, epoch, state, created_at, last_message_at, unread,
              key_epoch, tag)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
             ON CONFLICT (id) DO NOTHING",
            params![
                conv.id.0,
                conv.kind.as_str(),
                conv.name,
                conv.topic,
                to_sql_int(conv.epoch, "epoch")?,
                conv.state,
                conv.created_at_ms,
                conv.last_message_at_ms,
                conv.unread,
                to_sql_int(conv.key_epoch, "key epoch")?,
                conv.tag.map(|t| t.0.to_vec()),
            ],
        )?;
        if inserted > 0
            && let Some(tag) = conv.tag
        {
            self.add_routing_tag(&tag, &conv.id)?;
        }
        Ok(inserted > 0)
    }

    /// Moves a conversation to a new routing secret (a group's next epoch,
    /// or the first protocol 2 secret of an older conversation). The old
    /// tags stay known.
    pub fn set_routing(
        &self,
        id: &ConversationId,
        topic: &str,
        tag: &RoutingTag,
    ) -> Result<(), StoreError> {
        self.execute(
            "UPDATE conversations SET topic = ?2, tag = ?3 WHERE id = ?1",
            params![id.0, topic, tag.0],
        )?;
        self.add_routing_tag(tag, id)
    }

    /// Remembers that `tag` names `conversation` (kept for envelopes of
    /// earlier epochs; a tag already known keeps its conversation).
    pub fn add_routing_tag(
        &self,
        tag: &RoutingTag,
        conversation: &ConversationId,
    ) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO routing_tags (tag, conversation) VALUES (?1, ?2)
             ON CONFLICT (tag) DO NOTHING",
            params![tag.0, conversation.0],
        )?;
        Ok(())
    }

    /// The conversation a routing tag names.
    pub fn conversation_of_tag(
        &self,
        tag: &RoutingTag,
    ) -> Result<Option<ConversationId>, StoreError> {
        self.query_opt(
            "SELECT conversation FROM routing_tags WHERE tag = ?1",
            [tag.0],
            |row| id_at(row, 0),
        )
    }

    /// Every known routing tag and its conversation.
    pub fn routing_tags(&self) -> Result<Vec<(RoutingTag, ConversationId)>, StoreError> {
        self.query_vec("SELECT tag, conversation FROM routing_tags", [], |row| {
            let tag: Vec<u8> = row.get(0)?;
            Ok((
                RoutingTag::from_slice(&tag)
                    .ok_or_else(|| StoreError::Corrupt("routing tag".into()))?,
                id_at(row, 1)?,
            ))
        })
    }

    /// Replaces the group name, epoch and state. False if the conversation
    /// is unknown.
    pub fn update_conversation_state(
        &self,
        id: &ConversationId,
        name: &str,
        epoch: u64,
        state: &[u8],
    ) -> Result<bool, StoreError> {
        let changed = self.execute(
            "UPDATE conversations SET name = ?2, epoch = ?3, state = ?4 WHERE id = ?1",
            params![id.0, name, to_sql_int(epoch, "epoch")?, state],
        )?;
        Ok(changed > 0)
    }

    /// Renames a conversation (a direct one follows its contact's alias).
    pub fn rename_conversation(&self, id: &ConversationId, name: &str) -> Result<(), StoreError> {
        self.execute(
            "UPDATE conversations SET name = ?2 WHERE id = ?1",
            params![id.0, name],
        )?;
        Ok(())
    }

    /// Sets the epoch of this device's sending chain in a conversation.
    pub fn set_key_epoch(&self, id: &ConversationId, key_epoch: u64) -> Result<(), StoreError> {
        self.execute(
            "UPDATE conversations SET key_epoch = ?2 WHERE id = ?1",
            params![id.0, to_sql_int(key_epoch, "key epoch")?],
        )?;
        Ok(())
    }

    pub fn conversation(
        &self,
        id: &ConversationId,
    ) -> Result<Option<ConversationRecord>, StoreError> {
        self.query_opt(
            select_conversations!("WHERE id = ?1"),
            [id.0],
            ConversationRecord::from_row,
        )
    }

    pub fn conversation_by_topic(
        &self,
        topic: &str,
    ) -> Result<Option<ConversationRecord>, StoreError> {
        self.query_opt(
            select_conversations!("WHERE topic = ?1"),
            [topic],
            ConversationRecord::from_row,
        )
    }

    /// Conversations with this name, ignoring ASCII case (names need not be
    /// unique), oldest first.
    pub fn conversations_named(&self, name: &str) -> Result<Vec<ConversationRecord>, StoreError> {
        self.query_vec(
            select_conversations!("WHERE name = ?1 COLLATE NOCASE ORDER BY created_at, id"),
            [name],
            ConversationRecord::from_row,
        )
    }

    /// All conversations, most recent activity first: the last message, or
    /// the creation for one without messages; then the newest created.
    pub fn conversations(&self) -> Result<Vec<ConversationRecord>, StoreError> {
        self.query_vec(
            select_conversations!(
                "ORDER BY max(ifnull(last_message_at, created_at), created_at) DESC,
                 created_at DESC, id"
            ),
            [],
            ConversationRecord::from_row,
        )
    }

    /// Records activity: the last message time only moves forward, and the
    /// unread count grows by `unread_increment` (saturating). False if the
    /// conversation is unknown.
    pub fn bump_conversation(
        &self,
        id: &ConversationId,
        last_message_at_ms: i64,
        unread_increment: u32,
    ) -> Result<bool, StoreError> {
        let changed = self.execute(
            "UPDATE conversations
             SET last_message_at = max(ifnull(last_message_at, ?2), ?2),
                 unread = min(unread + ?3, 4294967295)
             WHERE id = ?1",
            params![id.0, last_message_at_ms, unread_increment],
        )?;
        Ok(changed > 0)
    }

    /// False if the conversation is unknown.
    pub fn mark_conversation_read(&self, id: &ConversationId) -> Result<bool, StoreError> {
        let changed = self.execute("UPDATE conversations SET unread = 0 WHERE id = ?1", [id.0])?;
        Ok(changed > 0)
    }

    /// Replaces the member list. The conversation must exist. A user listed
    /// twice keeps the last role given.
    pub fn set_members(
        &self,
        conv: &ConversationId,
        members: &[(UserId, Role)],
    ) -> Result<(), StoreError> {
        self.atomically(|| {
            self.execute("DELETE FROM members WHERE conversation = ?1", [conv.0])?;
            let mut insert = self.prepare(
                "INSERT INTO members (conversation, user_id, role) VALUES (?1, ?2, ?3)
                 ON CONFLICT (conversation, user_id) DO UPDATE SET role = excluded.role",
            )?;
            for (user, role) in members {
                insert.execute(params![conv.0, user.0, role.as_str()])?;
            }
            Ok(())
        })
    }

    /// The members, ordered by user id.
    pub fn members(&self, conv: &ConversationId) -> Result<Vec<(UserId, Role)>, StoreError> {
        self.query_vec(
            "SELECT user_id, role FROM members WHERE conversation = ?1 ORDER BY user_id",
            [conv.0],
            |row| Ok((id_at(row, 0)?, parsed_at(row, 1)?)),
        )
    }

    pub fn is_member(&self, conv: &ConversationId, user: &UserId) -> Result<bool, StoreError> {
        self.exists(
            "SELECT 1 FROM members WHERE conversation = ?1 AND user_id = ?2",
            params![conv.0, user.0],
        )
    }

    /// The conversations the user is a member of, ordered by id.
    pub fn conversations_of_user(&self, user: &UserId) -> Result<Vec<ConversationId>, StoreError> {
        self.query_vec(
            "SELECT conversation FROM members WHERE user_id = ?1 ORDER BY conversation",
            [user.0],
            |row| id_at(row, 0),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_support::{conversation, store_with};

    #[test]
    fn names_round_trip() -> Result<(), StoreError> {
        for kind in [ConversationKind::Direct, ConversationKind::Group] {
            assert_eq!(kind.as_str().parse::<ConversationKind>()?, kind);
        }
        for role in [Role::Member, Role::Admin] {
            assert_eq!(role.as_str().parse::<Role>()?, role);
        }
        assert!("Admin".parse::<Role>().is_err());
        Ok(())
    }

    #[test]
    fn insert_never_overwrites() -> Result<(), StoreError> {
        let store = store_with(&[])?;
        let db = store.db();
        let original = conversation(1);
        assert!(db.insert_conversation(&original)?);
        let mut changed = original.clone();
        changed.name = "renamed".into();
        assert!(!db.insert_conversation(&changed)?);
        assert_eq!(db.conversation(&original.id)?, Some(original.clone()));
        assert_eq!(
            db.conversation_by_topic(&original.topic)?,
            Some(original.clone())
        );
        assert_eq!(db.conversation(&ConversationId([9; 32]))?, None);
        Ok(())
    }

    #[test]
    fn state_updates_and_lookup_by_name() -> Result<(), StoreError> {
        let store = store_with(&[1, 2])?;
        let db = store.db();
        let id = ConversationId([1; 32]);
        assert!(db.update_conversation_state(&id, "Book Club", 3, b"state")?);
        assert!(!db.update_conversation_state(&ConversationId([9; 32]), "x", 1, b"")?);
        let conv = db.conversation(&id)?;
        assert_eq!(conv.as_ref().map(|c| c.epoch), Some(3));
        assert_eq!(conv.and_then(|c| c.state).as_deref(), Some(&b"state"[..]));
        let named = db.conversations_named("book club")?;
        assert_eq!(named.iter().map(|c| c.id).collect::<Vec<_>>(), [id]);
        assert!(db.conversations_named("nothing")?.is_empty());
        assert!(matches!(
            db.update_conversation_state(&id, "x", u64::MAX, b""),
            Err(StoreError::OutOfRange(_))
        ));
        Ok(())
    }

    #[test]
    fn activity_orders_the_list() -> Result<(), StoreError> {
        // Created at 1001, 1002, 1003.
        let store = store_with(&[1, 2, 3])?;
        let db = store.db();
        let ids = |db: Db<'_>| -> Result<Vec<u8>, StoreError> {
            Ok(db.conversations()?.into_iter().map(|c| c.id.0[0]).collect())
        };
        assert_eq!(ids(db)?, [3, 2, 1]);
        assert!(db.bump_conversation(&ConversationId([1; 32]), 5_000, 2)?);
        assert_eq!(ids(db)?, [1, 3, 2]);
        // An older message does not move the conversation back.
        assert!(db.bump_conversation(&ConversationId([1; 32]), 4_000, 1)?);
        let first = db.conversation(&ConversationId([1; 32]))?;
        assert_eq!(
            first.as_ref().and_then(|c| c.last_message_at_ms),
            Some(5_000)
        );
        assert_eq!(first.map(|c| c.unread), Some(3));
        assert!(!db.bump_conversation(&ConversationId([9; 32]), 1, 1)?);

        assert!(db.mark_conversation_read(&ConversationId([1; 32]))?);
        assert_eq!(
            db.conversation(&ConversationId([1; 32]))?.map(|c| c.unread),
            Some(0)
        );
        Ok(())
    }

    #[test]
    fn unread_count_saturates() -> Result<(), StoreError> {
        let store = store_with(&[1])?;
        let db = store.db();
        let id = ConversationId([1; 32]);
        db.bump_conversation(&id, 1, u32::MAX)?;
        db.bump_conversation(&id, 2, 5)?;
        assert_eq!(db.conversation(&id)?.map(|c| c.unread), Some(u32::MAX));
        Ok(())
    }

    #[test]
    fn member_lists_are_replaced() -> Result<(), StoreError> {
        let store = store_with(&[1, 2])?;
        let db = store.db();
        let (g1, g2) = (ConversationId([1; 32]), ConversationId([2; 32]));
        let (ann, bob, cat) = (UserId([10; 32]), UserId([11; 32]), UserId([12; 32]));
        db.set_members(&g1, &[(ann, Role::Admin), (bob, Role::Member)])?;
        db.set_members(&g2, &[(bob, Role::Member)])?;
        assert_eq!(db.members(&g1)?, [(ann, Role::Admin), (bob, Role::Member)]);
        assert!(db.is_member(&g1, &ann)?);
        assert_eq!(db.conversations_of_user(&bob)?, [g1, g2]);

        db.set_members(&g1, &[(cat, Role::Member), (cat, Role::Admin)])?;
        assert_eq!(db.members(&g1)?, [(cat, Role::Admin)]);
        assert!(!db.is_member(&g1, &ann)?);
        assert_eq!(db.conversations_of_user(&bob)?, [g2]);
        Ok(())
    }

    #[test]
    fn members_need_a_known_conversation() -> Result<(), StoreError> {
        let store = store_with(&[1])?;
        let db = store.db();
        let unknown = ConversationId([9; 32]);
        assert!(
            db.set_members(&unknown, &[(UserId([1; 32]), Role::Member)])
                .is_err()
        );
        assert!(db.members(&unknown)?.is_empty());
        Ok(())
    }
}

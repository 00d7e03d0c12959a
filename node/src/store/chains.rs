//! Key-chain states per (conversation, sender device, epoch). The bytes are
//! opaque here: the crypto module owns their format.

use rusqlite::params;

use super::{Db, StoreError, to_sql_int};
use crate::ids::{ConversationId, DeviceId};

impl Db<'_> {
    pub fn get_chain(
        &self,
        conv: &ConversationId,
        sender: &DeviceId,
        epoch: u64,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        self.query_opt(
            "SELECT state FROM chains
             WHERE conversation = ?1 AND sender_device = ?2 AND epoch = ?3",
            params![conv.0, sender.0, to_sql_int(epoch, "epoch")?],
            |row| Ok(row.get(0)?),
        )
    }

    /// Stores a chain state, replacing the previous one.
    pub fn put_chain(
        &self,
        conv: &ConversationId,
        sender: &DeviceId,
        epoch: u64,
        state: &[u8],
    ) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO chains (conversation, sender_device, epoch, state)
             VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (conversation, sender_device, epoch) DO UPDATE SET state = excluded.state",
            params![conv.0, sender.0, to_sql_int(epoch, "epoch")?, state],
        )?;
        Ok(())
    }

    /// Forgets the conversation's chains of epochs before `epoch` (their
    /// keys must not outlive the epoch change). Returns how many went.
    pub fn delete_chains_before(
        &self,
        conv: &ConversationId,
        epoch: u64,
    ) -> Result<u64, StoreError> {
        // An epoch beyond i64::MAX cannot be stored, so every stored one is
        // before it.
        let epoch = i64::try_from(epoch).unwrap_or(i64::MAX);
        let deleted = self.execute(
            "DELETE FROM chains WHERE conversation = ?1 AND epoch < ?2",
            params![conv.0, epoch],
        )?;
        Ok(deleted as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    #[test]
    fn chains_are_upserted_and_pruned_by_epoch() -> Result<(), StoreError> {
        let store = Store::open_in_memory()?;
        let db = store.db();
        let (g, other) = (ConversationId([1; 32]), ConversationId([2; 32]));
        let (alice, bob) = (DeviceId([3; 32]), DeviceId([4; 32]));
        assert_eq!(db.get_chain(&g, &alice, 0)?, None);
        db.put_chain(&g, &alice, 0, b"a0")?;
        db.put_chain(&g, &alice, 0, b"a0 advanced")?;
        db.put_chain(&g, &alice, 1, b"a1")?;
        db.put_chain(&g, &bob, 0, b"b0")?;
        db.put_chain(&other, &alice, 0, b"other")?;
        assert_eq!(
            db.get_chain(&g, &alice, 0)?.as_deref(),
            Some(&b"a0 advanced"[..])
        );
        assert_eq!(db.get_chain(&g, &bob, 1)?, None);

        assert_eq!(db.delete_chains_before(&g, 1)?, 2);
        assert_eq!(db.get_chain(&g, &alice, 0)?, None);
        assert_eq!(db.get_chain(&g, &bob, 0)?, None);
        assert_eq!(db.get_chain(&g, &alice, 1)?.as_deref(), Some(&b"a1"[..]));
        assert_eq!(
            db.get_chain(&other, &alice, 0)?.as_deref(),
            Some(&b"other"[..])
        );

        assert_eq!(db.delete_chains_before(&g, u64::MAX)?, 1);
        assert!(db.put_chain(&g, &alice, u64::MAX, b"").is_err());
        Ok(())
    }
}

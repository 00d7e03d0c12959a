//! Key-chain states per (conversation, sender device, epoch). The bytes are
//! opaque here: the crypto module owns their format.

use rusqlite::params;

use super::{Db, StoreError, id_at, to_sql_int, u64_at};
use crate::ids::{ConversationId, DeviceId};

/// Where a chain belongs: its conversation, sender device and key epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ChainPlace {
    pub conversation: ConversationId,
    pub sender: DeviceId,
    pub epoch: u64,
}

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

    /// Every chain not sent by `me`: the receiving chains, with their
    /// states.
    pub fn receiving_chain_states(
        &self,
        me: &DeviceId,
    ) -> Result<Vec<(ChainPlace, Vec<u8>)>, StoreError> {
        self.query_vec(
            "SELECT conversation, sender_device, epoch, state FROM chains
             WHERE sender_device != ?1",
            [me.0],
            |row| {
                let place = ChainPlace {
                    conversation: id_at(row, 0)?,
                    sender: id_at(row, 1)?,
                    epoch: u64_at(row, 2, "epoch")?,
                };
                Ok((place, row.get(3)?))
            },
        )
    }

    /// Forgets a chain (its keys are overwritten on disk, and leave the
    /// `-wal` at the next checkpoint). False if it was not there.
    pub fn delete_chain(&self, place: &ChainPlace) -> Result<bool, StoreError> {
        let deleted = self.execute(
            "DELETE FROM chains WHERE conversation = ?1 AND sender_device = ?2 AND epoch = ?3",
            params![
                place.conversation.0,
                place.sender.0,
                to_sql_int(place.epoch, "epoch")?
            ],
        )?;
        if deleted > 0 {
            self.note_erased();
        }
        Ok(deleted > 0)
    }

    /// Forgets `me`'s own sending chains of key epochs before its
    /// conversation's current one: this device never sends in them again.
    /// Returns how many went.
    pub fn delete_replaced_sending_chains(&self, me: &DeviceId) -> Result<u64, StoreError> {
        let deleted = self.execute(
            "DELETE FROM chains WHERE sender_device = ?1
             AND epoch < (SELECT key_epoch FROM conversations WHERE id = chains.conversation)",
            [me.0],
        )?;
        if deleted > 0 {
            self.note_erased();
        }
        Ok(deleted as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;
    use crate::store::test_support::store_with;

    #[test]
    fn chains_are_upserted_per_sender_and_epoch() -> Result<(), StoreError> {
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
        assert!(db.put_chain(&g, &alice, u64::MAX, b"").is_err());

        // bob's own chains are not receiving chains.
        let mut theirs = db.receiving_chain_states(&bob)?;
        theirs.sort_by_key(|(p, _)| (p.conversation.0, p.epoch));
        let places: Vec<(u8, u64)> = theirs
            .iter()
            .map(|(p, _)| (p.conversation.0[0], p.epoch))
            .collect();
        assert_eq!(places, [(1, 0), (1, 1), (2, 0)]);

        let a0 = ChainPlace {
            conversation: g,
            sender: alice,
            epoch: 0,
        };
        assert!(db.delete_chain(&a0)?);
        assert!(!db.delete_chain(&a0)?);
        assert_eq!(db.get_chain(&g, &alice, 0)?, None);
        assert_eq!(db.get_chain(&g, &alice, 1)?.as_deref(), Some(&b"a1"[..]));
        Ok(())
    }

    #[test]
    fn own_sending_chains_of_earlier_key_epochs_go() -> Result<(), StoreError> {
        // conversation(1) is at key epoch 1; move it to 3.
        let store = store_with(&[1])?;
        let db = store.db();
        let g = ConversationId([1; 32]);
        db.set_key_epoch(&g, 3)?;
        let (me, alice) = (DeviceId([5; 32]), DeviceId([6; 32]));
        for epoch in 1..=3 {
            db.put_chain(&g, &me, epoch, b"mine")?;
            db.put_chain(&g, &alice, epoch, b"hers")?;
        }
        // A chain of a conversation not stored (yet) is left alone.
        let unknown = ConversationId([9; 32]);
        db.put_chain(&unknown, &me, 1, b"mine")?;

        store.erased.set(false);
        assert_eq!(db.delete_replaced_sending_chains(&me)?, 2);
        assert!(store.erased.get(), "a deletion is noted for the checkpoint");
        assert_eq!(db.get_chain(&g, &me, 2)?, None);
        assert!(db.get_chain(&g, &me, 3)?.is_some());
        assert!(db.get_chain(&unknown, &me, 1)?.is_some());
        for epoch in 1..=3 {
            assert!(db.get_chain(&g, &alice, epoch)?.is_some(), "not mine");
        }
        Ok(())
    }
}

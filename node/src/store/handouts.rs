//! Handout keys: this device's own (secrets, erased on time) and the
//! newest known of other devices.

use rusqlite::params;

use super::{Db, OwnKey, StoreError, key_at, own_key_at};
use crate::ids::DeviceId;

impl Db<'_> {
    /// This device's handout keys still held, the newest first.
    pub fn own_handout_keys(&self) -> Result<Vec<OwnKey>, StoreError> {
        self.query_vec(
            "SELECT public, secret, created_at FROM own_handout_keys ORDER BY created_at DESC",
            [],
            |row| own_key_at(row, "handout key"),
        )
    }

    /// Adds a new own handout key and retires the others at `now_ms`.
    pub fn add_own_handout_key(
        &self,
        public: &[u8; 32],
        secret: &[u8; 32],
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.execute(
            "UPDATE own_handout_keys SET retired_at = ?1 WHERE retired_at IS NULL",
            [now_ms],
        )?;
        self.execute(
            "INSERT INTO own_handout_keys (public, secret, created_at) VALUES (?1, ?2, ?3)",
            params![public, secret, now_ms],
        )?;
        Ok(())
    }

    /// Erases own handout keys retired before `before_ms` (how many).
    pub fn erase_own_handout_keys_retired_before(
        &self,
        before_ms: i64,
    ) -> Result<usize, StoreError> {
        self.execute(
            "DELETE FROM own_handout_keys WHERE retired_at IS NOT NULL AND retired_at < ?1",
            [before_ms],
        )
    }

    /// Records another device's handout key if it is newer than the one
    /// known. True if it was.
    pub fn set_handout_key(
        &self,
        device: &DeviceId,
        dh: &[u8; 32],
        created_at_ms: i64,
    ) -> Result<bool, StoreError> {
        let changed = self.execute(
            "INSERT INTO handout_keys (device, dh, created_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (device) DO UPDATE SET dh = excluded.dh, created_at = excluded.created_at
             WHERE excluded.created_at > handout_keys.created_at",
            params![device.0, dh, created_at_ms],
        )?;
        Ok(changed > 0)
    }

    /// The newest known handout key of a device, and when it was made.
    pub fn handout_key(&self, device: &DeviceId) -> Result<Option<([u8; 32], i64)>, StoreError> {
        self.query_opt(
            "SELECT dh, created_at FROM handout_keys WHERE device = ?1",
            [device.0],
            |row| {
                let dh: Vec<u8> = row.get(0)?;
                Ok((key_at(&dh, "handout key")?, row.get(1)?))
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    #[test]
    fn own_keys_are_retired_then_erased_and_peer_keys_only_move_forward() -> Result<(), StoreError>
    {
        let store = Store::open_in_memory()?;
        let db = store.db();
        db.add_own_handout_key(&[1; 32], &[11; 32], 100)?;
        db.add_own_handout_key(&[2; 32], &[12; 32], 200)?;
        let held = db.own_handout_keys()?;
        assert_eq!(
            held.iter().map(|k| k.public).collect::<Vec<_>>(),
            [[2; 32], [1; 32]]
        );
        // The first was retired at 200: erased only once that is old enough.
        assert_eq!(db.erase_own_handout_keys_retired_before(200)?, 0);
        assert_eq!(db.erase_own_handout_keys_retired_before(201)?, 1);
        assert_eq!(db.own_handout_keys()?.len(), 1);
        let device = DeviceId([5; 32]);
        assert!(db.set_handout_key(&device, &[7; 32], 10)?);
        assert!(!db.set_handout_key(&device, &[8; 32], 9)?);
        assert!(db.set_handout_key(&device, &[9; 32], 11)?);
        assert_eq!(db.handout_key(&device)?, Some(([9; 32], 11)));
        Ok(())
    }
}

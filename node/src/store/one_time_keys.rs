//! One-time handout keys: the secrets this device issued to each holder
//! device (erased once used or too old), and the keys other devices
//! issued to this one (each taken once).

use rusqlite::params;
use zeroize::Zeroizing;

use super::{Db, OwnKey, StoreError, key_at, own_key_at};
use crate::ids::DeviceId;

impl Db<'_> {
    /// Records secrets issued to `holder` in a batch made at `at_ms`.
    pub fn add_own_one_time_keys(
        &self,
        holder: &DeviceId,
        keys: &[([u8; 32], Zeroizing<[u8; 32]>)],
        at_ms: i64,
    ) -> Result<(), StoreError> {
        self.atomically(|| {
            for (public, secret) in keys {
                self.execute(
                    "INSERT INTO own_one_time_keys (public, secret, holder, created_at)
                     VALUES (?1, ?2, ?3, ?4)",
                    params![public, &secret[..], holder.0, at_ms],
                )?;
            }
            self.execute(
                "INSERT INTO one_time_batches_issued (holder, last_at) VALUES (?1, ?2)
                 ON CONFLICT (holder) DO UPDATE SET last_at = excluded.last_at",
                params![holder.0, at_ms],
            )?;
            Ok(())
        })
    }

    /// When this device last issued a batch to `holder`.
    pub fn last_one_time_batch_issued(&self, holder: &DeviceId) -> Result<Option<i64>, StoreError> {
        self.query_opt(
            "SELECT last_at FROM one_time_batches_issued WHERE holder = ?1",
            [holder.0],
            |row| Ok(row.get(0)?),
        )
    }

    /// The keys issued to `holder` still held, oldest first.
    pub fn own_one_time_keys_for(&self, holder: &DeviceId) -> Result<Vec<OwnKey>, StoreError> {
        self.query_vec(
            "SELECT public, secret, created_at FROM own_one_time_keys
             WHERE holder = ?1 ORDER BY created_at, public",
            [holder.0],
            |row| own_key_at(row, "one-time key"),
        )
    }

    /// How many keys issued to `holder` at or after `since_ms` are unused.
    pub fn own_one_time_keys_since(
        &self,
        holder: &DeviceId,
        since_ms: i64,
    ) -> Result<u64, StoreError> {
        self.count(
            "SELECT COUNT(*) FROM own_one_time_keys WHERE holder = ?1 AND created_at >= ?2",
            params![holder.0, since_ms],
        )
    }

    /// How many issued keys this device holds in all.
    pub fn own_one_time_key_count(&self) -> Result<u64, StoreError> {
        self.count("SELECT COUNT(*) FROM own_one_time_keys", [])
    }

    /// Erases an issued key (its handout opened). True if it was held.
    pub fn erase_own_one_time_key(&self, public: &[u8; 32]) -> Result<bool, StoreError> {
        Ok(self.execute("DELETE FROM own_one_time_keys WHERE public = ?1", [public])? > 0)
    }

    /// Erases issued keys made before `before_ms` (too old for any holder
    /// to still use). How many.
    pub fn erase_own_one_time_keys_before(&self, before_ms: i64) -> Result<usize, StoreError> {
        self.execute(
            "DELETE FROM own_one_time_keys WHERE created_at < ?1",
            [before_ms],
        )
    }

    /// Takes a batch of `issuer`'s keys for this device if it is newer than
    /// the last one taken, keeping at most `max` of the issuer's keys (the
    /// newest). True if taken.
    pub fn add_one_time_keys(
        &self,
        issuer: &DeviceId,
        keys: &[[u8; 32]],
        at_ms: i64,
        max: usize,
    ) -> Result<bool, StoreError> {
        self.atomically(|| {
            let newer = self.execute(
                "INSERT INTO one_time_batches_taken (issuer, last_at) VALUES (?1, ?2)
                 ON CONFLICT (issuer) DO UPDATE SET last_at = excluded.last_at
                 WHERE excluded.last_at > one_time_batches_taken.last_at",
                params![issuer.0, at_ms],
            )? > 0;
            if !newer {
                return Ok(false);
            }
            for key in keys {
                self.execute(
                    "INSERT OR IGNORE INTO one_time_keys (issuer, public, created_at)
                     VALUES (?1, ?2, ?3)",
                    params![issuer.0, key, at_ms],
                )?;
            }
            self.execute(
                "DELETE FROM one_time_keys WHERE issuer = ?1 AND public NOT IN (
                     SELECT public FROM one_time_keys WHERE issuer = ?1
                     ORDER BY created_at DESC, public LIMIT ?2)",
                params![issuer.0, i64::try_from(max).unwrap_or(i64::MAX)],
            )?;
            Ok(true)
        })
    }

    /// Takes (and forgets) the oldest of `issuer`'s keys made at or after
    /// `since_ms`, forgetting older ones (their secrets may be gone).
    pub fn take_one_time_key(
        &self,
        issuer: &DeviceId,
        since_ms: i64,
    ) -> Result<Option<[u8; 32]>, StoreError> {
        self.execute(
            "DELETE FROM one_time_keys WHERE issuer = ?1 AND created_at < ?2",
            params![issuer.0, since_ms],
        )?;
        let Some(key) = self.query_opt(
            "SELECT public FROM one_time_keys WHERE issuer = ?1
             ORDER BY created_at, public LIMIT 1",
            [issuer.0],
            |row| {
                let public: Vec<u8> = row.get(0)?;
                key_at(&public, "one-time key")
            },
        )?
        else {
            return Ok(None);
        };
        self.execute(
            "DELETE FROM one_time_keys WHERE issuer = ?1 AND public = ?2",
            params![issuer.0, key],
        )?;
        Ok(Some(key))
    }

    /// How many of `issuer`'s keys this device holds.
    pub fn one_time_key_count(&self, issuer: &DeviceId) -> Result<u64, StoreError> {
        self.count(
            "SELECT COUNT(*) FROM one_time_keys WHERE issuer = ?1",
            [issuer.0],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    #[test]
    fn issued_keys_are_erased_once_used_or_too_old() -> Result<(), StoreError> {
        let store = Store::open_in_memory()?;
        let db = store.db();
        let bob = DeviceId([2; 32]);
        let carol = DeviceId([3; 32]);
        let secret = |b: u8| Zeroizing::new([b; 32]);
        db.add_own_one_time_keys(&bob, &[([1; 32], secret(11)), ([2; 32], secret(12))], 100)?;
        db.add_own_one_time_keys(&carol, &[([3; 32], secret(13))], 200)?;
        assert_eq!(db.last_one_time_batch_issued(&bob)?, Some(100));
        let for_bob = db.own_one_time_keys_for(&bob)?;
        assert_eq!(for_bob.len(), 2);
        assert_eq!(*for_bob[0].secret, [11; 32]);
        assert_eq!(db.own_one_time_keys_since(&bob, 100)?, 2);
        assert_eq!(db.own_one_time_keys_since(&bob, 101)?, 0);
        assert!(db.erase_own_one_time_key(&[1; 32])?);
        assert!(!db.erase_own_one_time_key(&[1; 32])?);
        assert_eq!(db.erase_own_one_time_keys_before(150)?, 1);
        assert_eq!(db.own_one_time_key_count()?, 1);
        assert!(db.own_one_time_keys_for(&bob)?.is_empty());
        // The batch record outlives the keys: a replay is still refused.
        assert_eq!(db.last_one_time_batch_issued(&bob)?, Some(100));
        Ok(())
    }

    #[test]
    fn held_keys_are_taken_once_and_replayed_batches_refused() -> Result<(), StoreError> {
        let store = Store::open_in_memory()?;
        let db = store.db();
        let alice = DeviceId([1; 32]);
        assert!(db.add_one_time_keys(&alice, &[[1; 32], [2; 32]], 100, 3)?);
        // Not newer than the last batch: refused, even once its keys are gone.
        assert!(!db.add_one_time_keys(&alice, &[[1; 32], [2; 32]], 100, 3)?);
        assert_eq!(db.take_one_time_key(&alice, 0)?, Some([1; 32]));
        assert_eq!(db.take_one_time_key(&alice, 0)?, Some([2; 32]));
        assert_eq!(db.take_one_time_key(&alice, 0)?, None);
        assert!(!db.add_one_time_keys(&alice, &[[1; 32]], 99, 3)?);
        assert_eq!(db.one_time_key_count(&alice)?, 0);
        // At most `max` kept, the newest; too old ones are never taken.
        assert!(db.add_one_time_keys(&alice, &[[3; 32], [4; 32]], 200, 3)?);
        assert!(db.add_one_time_keys(&alice, &[[5; 32], [6; 32]], 300, 3)?);
        assert_eq!(db.one_time_key_count(&alice)?, 3);
        assert_eq!(db.take_one_time_key(&alice, 250)?, Some([5; 32]));
        assert_eq!(db.one_time_key_count(&alice)?, 1);
        Ok(())
    }
}

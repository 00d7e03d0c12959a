//! Known network addresses of peers, for redialing after a restart.

use rusqlite::params;

use super::{Db, StoreError, sql_limit};

/// Addresses kept per peer; the least recently seen go first.
const MAX_ADDRS_PER_PEER: usize = 32;
/// Addresses `peer_addrs` returns: enough to redial, few enough to try.
const ADDRS_TO_DIAL: usize = 16;

impl Db<'_> {
    /// Records that `addr` of `peer_id` was seen at `now_ms`.
    pub fn upsert_peer_addr(
        &self,
        peer_id: &str,
        addr: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.atomically(|| {
            self.execute(
                "INSERT INTO peers (peer_id, addr, last_seen) VALUES (?1, ?2, ?3)
                 ON CONFLICT (peer_id, addr) DO UPDATE
                 SET last_seen = max(last_seen, excluded.last_seen)",
                params![peer_id, addr, now_ms],
            )?;
            // A peer may advertise any number of addresses; keep the newest.
            self.execute(
                "DELETE FROM peers WHERE peer_id = ?1 AND addr NOT IN
                 (SELECT addr FROM peers WHERE peer_id = ?1
                  ORDER BY last_seen DESC, addr LIMIT ?2)",
                params![peer_id, sql_limit(MAX_ADDRS_PER_PEER)],
            )?;
            Ok(())
        })
    }

    /// The peer's most recently seen addresses, newest first (at most 16).
    pub fn peer_addrs(&self, peer_id: &str) -> Result<Vec<String>, StoreError> {
        self.query_vec(
            "SELECT addr FROM peers WHERE peer_id = ?1 ORDER BY last_seen DESC, addr LIMIT ?2",
            params![peer_id, sql_limit(ADDRS_TO_DIAL)],
            |row| Ok(row.get(0)?),
        )
    }

    /// Up to `limit` (peer id, address) pairs, most recently seen first.
    pub fn known_peers(&self, limit: usize) -> Result<Vec<(String, String)>, StoreError> {
        self.query_vec(
            "SELECT peer_id, addr FROM peers ORDER BY last_seen DESC, peer_id, addr LIMIT ?1",
            [sql_limit(limit)],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    #[test]
    fn addresses_are_capped_per_peer() -> Result<(), StoreError> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(&dir.path().join("weft.db"))?;
        let db = store.db();
        for i in 0..40i64 {
            db.upsert_peer_addr("peerA", &format!("/ip4/10.0.0.{i}/tcp/1"), i)?;
        }
        db.upsert_peer_addr("peerB", "/ip4/10.0.1.1/tcp/1", 100)?;
        // Seeing an old address again makes it the newest.
        db.upsert_peer_addr("peerA", "/ip4/10.0.0.20/tcp/1", 200)?;

        let stored: i64 = store.conn.query_row(
            "SELECT count(*) FROM peers WHERE peer_id = 'peerA'",
            [],
            |row| row.get(0),
        )?;
        assert_eq!(stored as usize, MAX_ADDRS_PER_PEER);

        let addrs = db.peer_addrs("peerA")?;
        assert_eq!(addrs.len(), ADDRS_TO_DIAL);
        assert_eq!(
            addrs.first().map(String::as_str),
            Some("/ip4/10.0.0.20/tcp/1")
        );
        assert_eq!(
            addrs.get(1).map(String::as_str),
            Some("/ip4/10.0.0.39/tcp/1")
        );
        assert!(
            !addrs.contains(&"/ip4/10.0.0.7/tcp/1".to_owned()),
            "evicted"
        );
        assert!(db.peer_addrs("nobody")?.is_empty());

        let known = db.known_peers(2)?;
        assert_eq!(
            known,
            [
                ("peerA".to_owned(), "/ip4/10.0.0.20/tcp/1".to_owned()),
                ("peerB".to_owned(), "/ip4/10.0.1.1/tcp/1".to_owned()),
            ]
        );
        Ok(())
    }

    #[test]
    fn last_seen_never_goes_back() -> Result<(), StoreError> {
        let store = Store::open_in_memory()?;
        let db = store.db();
        db.upsert_peer_addr("p", "/a", 50)?;
        db.upsert_peer_addr("p", "/b", 40)?;
        db.upsert_peer_addr("p", "/a", 10)?;
        assert_eq!(db.peer_addrs("p")?, ["/a", "/b"]);
        Ok(())
    }
}

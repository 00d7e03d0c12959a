//! Local storage: the node's SQLite database and its schema migrations.
//!
//! Owns every table (people, conversations, messages, envelopes, outbox,
//! key chains, pending envelopes, peer addresses, metadata); nothing else in
//! the node writes SQL. Queries live on [`Db`], a borrowed view that works
//! the same on the bare connection and inside a [`Txn`].
//!
//! What is deleted is overwritten (`secure_delete`), and after a deletion
//! of content or keys [`Store::checkpoint_if_erased`] empties the `-wal`,
//! which still holds the pages as they were before.

mod annotations;
mod chains;
mod conversations;
mod envelopes;
mod handouts;
mod messages;
pub mod meta;
mod one_time_keys;
mod peers;
mod people;
mod receipts;
mod wal_sync;

use std::cell::Cell;
use std::fs::{OpenOptions, Permissions};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use rusqlite::config::DbConfig;
use rusqlite::{CachedStatement, Connection, OptionalExtension, Params, Row, TransactionBehavior};

use zeroize::Zeroizing;

use crate::ids::{ConversationId, DeviceId, EnvelopeId, MessageId, UserId};

pub use annotations::PendingAnnotation;
pub use chains::ChainPlace;
pub use conversations::{ConversationKind, ConversationRecord, Role};
pub use envelopes::{
    EnvelopeRecord, OutboxEntry, PendingCaps, PendingEvicted, PendingFrom, PendingLimit, PendingRow,
};
pub use messages::{MessageRecord, MessageStatus};
pub use people::{Binding, Contact, DeviceRecord};
pub use receipts::UserReceipt;
pub use wal_sync::WalSyncer;

/// Schema migrations in order: (the `user_version` they bring the database
/// to, their SQL). Append only; never edit one that has shipped.
const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("migrations/0001_init.sql")),
    (2, include_str!("migrations/0002_reliable_delivery.sql")),
    (3, include_str!("migrations/0003_annotations.sql")),
    (4, include_str!("migrations/0004_key_epochs.sql")),
    (5, include_str!("migrations/0005_shard_chunks.sql")),
    (6, include_str!("migrations/0006_message_epochs.sql")),
    (7, include_str!("migrations/0007_device_bindings.sql")),
    (8, include_str!("migrations/0008_protocol_v2.sql")),
    (9, include_str!("migrations/0009_handout_keys.sql")),
    (10, include_str!("migrations/0010_one_time_keys.sql")),
    (
        11,
        include_str!("migrations/0011_pending_by_conversation.sql"),
    ),
    (12, include_str!("migrations/0012_pending_caps.sql")),
];

/// How long a statement waits for another connection's lock.
const BUSY_TIMEOUT: Duration = Duration::from_millis(5000);
/// How long a checkpoint after a deletion waits for another connection's
/// readers (it is tried again after the next commit).
const CHECKPOINT_WAIT: Duration = Duration::from_millis(100);

/// Anything that went wrong reading or writing the database.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("cannot prepare the database file: {0}")]
    Io(#[from] std::io::Error),
    #[error("corrupt row: {0}")]
    Corrupt(String),
    #[error(
        "the database has schema version {found}, newer than this program knows ({known}); \
         upgrade weft to use it"
    )]
    TooNew { found: i64, known: i64 },
    #[error("the alias {0:?} is already taken")]
    AliasTaken(String),
    #[error("this user is already a contact")]
    AlreadyContact,
    #[error("no message {0} in this conversation")]
    UnknownMessage(MessageId),
    #[error("{0} is too large to store")]
    OutOfRange(&'static str),
    #[error("unknown {what} {value:?}")]
    UnknownName { what: &'static str, value: String },
}

/// The node's database: one SQLite connection.
#[derive(Debug)]
pub struct Store {
    conn: Connection,
    durability: Durability,
    /// Something was deleted whose old pages the `-wal` may still hold.
    erased: Cell<bool>,
}

/// How a transaction's commit reaches the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// fsync at commit (`synchronous=FULL`): survives power loss. For
    /// anything acknowledged to a user or a peer.
    Full,
    /// No fsync at commit (`synchronous=NORMAL` in WAL mode): survives a
    /// crash of the process, not of the machine; the next `Full` commit
    /// makes it durable too. For what nobody has been promised yet.
    Normal,
}

impl Store {
    /// Opens (creating if needed) the database file at `path`, readable by
    /// its owner only, and brings its schema up to date.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        create_private_file(path)?;
        let conn = Connection::open(path)?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        // WAL lets readers run during a write; SQLite creates the -wal and
        // -shm files with the main file's mode, so they stay 0600 too.
        let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |row| row.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(%mode, "SQLite did not switch to WAL journal mode");
        }
        Self::configure(conn)
    }

    /// A fresh database in memory, for tests and simulations.
    pub fn open_in_memory() -> Result<Store, StoreError> {
        let conn = Connection::open_in_memory()?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        Self::configure(conn)
    }

    fn configure(mut conn: Connection) -> Result<Store, StoreError> {
        // FULL: a write we acknowledged to a peer must survive power loss.
        // secure_delete: a deleted message or key is overwritten with
        // zeros, not left in a free page for a copy of the file to find.
        conn.execute_batch(
            "PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON; PRAGMA secure_delete=ON;",
        )?;
        // Every statement the node uses stays prepared.
        conn.set_prepared_statement_cache_capacity(256);
        // And stays compiled: the bundled SQLite is built with STAT4, under
        // which binding a parameter of an indexed lookup re-compiled the
        // statement every time (9% of a node thread's time in the network
        // bench). The query planner stability guarantee keeps the first
        // plan; our queries have one right plan anyway.
        conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
        migrate(&mut conn)?;
        Ok(Store {
            conn,
            durability: Durability::Full,
            // A deletion before a crash may still be in the -wal: the
            // first commit checkpoints.
            erased: Cell::new(true),
        })
    }

    /// Queries on the bare connection: each write commits on its own.
    pub fn db(&self) -> Db<'_> {
        Db {
            conn: &self.conn,
            erased: &self.erased,
        }
    }

    /// After a commit that deleted content or keys: copies the `-wal` into
    /// the database (whose freed space `secure_delete` zeroed) and
    /// truncates it, so the pages from before the deletion are gone from
    /// both files. Nothing happens if nothing was deleted. Must not be
    /// called inside a transaction.
    pub fn checkpoint_if_erased(&self) -> Result<(), StoreError> {
        if !self.erased.replace(false) {
            return Ok(());
        }
        self.conn.busy_timeout(CHECKPOINT_WAIT)?;
        let result = self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |row| {
                row.get::<_, i64>(0)
            });
        self.conn.busy_timeout(BUSY_TIMEOUT)?;
        // 1: another connection's reader kept it from finishing.
        if result? != 0 {
            self.erased.set(true);
            tracing::warn!("the -wal could not be emptied after a deletion; trying again later");
        }
        Ok(())
    }

    /// Starts a write transaction (for group commit of many writes). It
    /// rolls back unless [`Txn::commit`] is called.
    pub fn transaction(&mut self) -> Result<Txn<'_>, StoreError> {
        self.transaction_with(Durability::Full)
    }

    /// A write transaction whose commit is as durable as asked.
    pub fn transaction_with(&mut self, durability: Durability) -> Result<Txn<'_>, StoreError> {
        if durability != self.durability {
            let pragma = match durability {
                Durability::Full => "PRAGMA synchronous=FULL",
                Durability::Normal => "PRAGMA synchronous=NORMAL",
            };
            self.conn.execute_batch(pragma)?;
            self.durability = durability;
        }
        // IMMEDIATE takes the write lock now, so a batch never fails halfway
        // on a read-to-write lock upgrade.
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        Ok(Txn {
            tx,
            erased: &self.erased,
        })
    }
}

/// An open write transaction; dropping it without `commit` rolls back.
#[derive(Debug)]
pub struct Txn<'a> {
    tx: rusqlite::Transaction<'a>,
    erased: &'a Cell<bool>,
}

impl Txn<'_> {
    /// Queries inside this transaction.
    pub fn db(&self) -> Db<'_> {
        Db {
            conn: &self.tx,
            erased: self.erased,
        }
    }

    pub fn commit(self) -> Result<(), StoreError> {
        Ok(self.tx.commit()?)
    }
}

/// A borrowed view of the connection carrying every query.
#[derive(Debug, Clone, Copy)]
pub struct Db<'a> {
    conn: &'a Connection,
    /// The store's note that something was deleted.
    erased: &'a Cell<bool>,
}

impl<'a> Db<'a> {
    /// Notes that content or keys were deleted: the next
    /// [`Store::checkpoint_if_erased`] empties the `-wal`.
    pub fn note_erased(&self) {
        self.erased.set(true);
    }

    pub fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.query_opt("SELECT value FROM meta WHERE key = ?1", [key], |row| {
            Ok(row.get(0)?)
        })
    }

    pub fn delete_meta(&self, key: &str) -> Result<(), StoreError> {
        self.execute("DELETE FROM meta WHERE key = ?1", [key])?;
        Ok(())
    }

    pub fn set_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO meta (key, value) VALUES (?1, ?2)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            rusqlite::params![key, value],
        )?;
        Ok(())
    }

    /// The one place statements are prepared. rusqlite's statement cache
    /// (`prepare_cached`) needs its `cache` feature, which the workspace's
    /// `default-features = false` turns off; enable it and switch here.
    fn prepare(&self, sql: &str) -> Result<CachedStatement<'a>, StoreError> {
        Ok(self.conn.prepare_cached(sql)?)
    }

    fn execute(&self, sql: &str, params: impl Params) -> Result<usize, StoreError> {
        Ok(self.prepare(sql)?.execute(params)?)
    }

    fn query_opt<T>(
        &self,
        sql: &str,
        params: impl Params,
        decode: impl FnOnce(&Row<'_>) -> Result<T, StoreError>,
    ) -> Result<Option<T>, StoreError> {
        let mut stmt = self.prepare(sql)?;
        let mut rows = stmt.query(params)?;
        match rows.next()? {
            Some(row) => Ok(Some(decode(row)?)),
            None => Ok(None),
        }
    }

    fn query_vec<T>(
        &self,
        sql: &str,
        params: impl Params,
        mut decode: impl FnMut(&Row<'_>) -> Result<T, StoreError>,
    ) -> Result<Vec<T>, StoreError> {
        let mut stmt = self.prepare(sql)?;
        let mut rows = stmt.query(params)?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            out.push(decode(row)?);
        }
        Ok(out)
    }

    fn exists(&self, sql: &str, params: impl Params) -> Result<bool, StoreError> {
        Ok(self
            .prepare(sql)?
            .query_row(params, |_| Ok(()))
            .optional()?
            .is_some())
    }

    fn count(&self, sql: &str, params: impl Params) -> Result<u64, StoreError> {
        let n: i64 = self.prepare(sql)?.query_row(params, |row| row.get(0))?;
        u64::try_from(n).map_err(|_| StoreError::Corrupt(format!("negative count {n}")))
    }

    /// Runs a multi-statement write all-or-nothing, inside a transaction or
    /// not: a savepoint nests in an open `Txn` and starts one otherwise.
    fn atomically<T>(&self, step: impl FnOnce() -> Result<T, StoreError>) -> Result<T, StoreError> {
        self.conn.execute_batch("SAVEPOINT weft_step")?;
        let result = step().and_then(|value| {
            self.conn.execute_batch("RELEASE weft_step")?;
            Ok(value)
        });
        if result.is_err() {
            // Undo only this step; an enclosing Txn stays usable.
            if let Err(error) = self
                .conn
                .execute_batch("ROLLBACK TO weft_step; RELEASE weft_step")
            {
                tracing::warn!(%error, "rolling back a failed store step failed");
            }
        }
        result
    }
}

/// One of this device's own X25519 keys (a handout or a one-time key).
pub struct OwnKey {
    pub public: [u8; 32],
    pub secret: Zeroizing<[u8; 32]>,
    pub created_at_ms: i64,
}

impl std::fmt::Debug for OwnKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnKey")
            .field("created_at_ms", &self.created_at_ms)
            .finish_non_exhaustive()
    }
}

/// An [`OwnKey`] from a row of (public, secret, created_at).
fn own_key_at(row: &Row<'_>, what: &str) -> Result<OwnKey, StoreError> {
    let public: Vec<u8> = row.get(0)?;
    let secret: Zeroizing<Vec<u8>> = Zeroizing::new(row.get(1)?);
    Ok(OwnKey {
        public: key_at(&public, what)?,
        secret: Zeroizing::new(key_at(&secret, what)?),
        created_at_ms: row.get(2)?,
    })
}

/// A stored 32-byte key (`what` names it if the row is corrupt).
fn key_at(bytes: &[u8], what: &str) -> Result<[u8; 32], StoreError> {
    <[u8; 32]>::try_from(bytes).map_err(|_| StoreError::Corrupt(what.into()))
}

/// Creates the file mode 0600 before SQLite opens it, so it is never
/// readable by others, and tightens an existing file to 0600.
fn create_private_file(path: &Path) -> Result<(), StoreError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)?;
    std::fs::set_permissions(path, Permissions::from_mode(0o600))?;
    Ok(())
}

/// Applies the migrations the database lacks, each in its own transaction.
fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let known = MIGRATIONS.last().map_or(0, |(version, _)| *version);
    for (version, sql) in MIGRATIONS {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        // Read inside the write lock: another process may have migrated.
        let found: i64 = tx.pragma_query_value(None, "user_version", |row| row.get(0))?;
        if found > known {
            return Err(StoreError::TooNew { found, known });
        }
        if found < 0 {
            return Err(StoreError::Corrupt(format!("schema version {found}")));
        }
        if found >= *version {
            continue;
        }
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", version)?;
        tx.commit()?;
        tracing::info!(version, "applied database migration");
    }
    Ok(())
}

/// An id type stored as a fixed-size BLOB.
trait BlobId: Sized {
    const WHAT: &'static str;
    fn from_blob(bytes: &[u8]) -> Option<Self>;
}

macro_rules! blob_ids {
    ($($id:ty => $what:literal),* $(,)?) => {
        $(impl BlobId for $id {
            const WHAT: &'static str = $what;
            fn from_blob(bytes: &[u8]) -> Option<Self> {
                <$id>::from_slice(bytes)
            }
        })*
    };
}

blob_ids!(
    UserId => "user id",
    DeviceId => "device id",
    ConversationId => "conversation id",
    EnvelopeId => "envelope id",
);

/// Reads column `idx` as an id.
fn id_at<T: BlobId>(row: &Row<'_>, idx: usize) -> Result<T, StoreError> {
    match opt_id_at(row, idx)? {
        Some(id) => Ok(id),
        None => Err(StoreError::Corrupt(format!("{} is NULL", T::WHAT))),
    }
}

/// Reads column `idx` as an id that may be NULL.
fn opt_id_at<T: BlobId>(row: &Row<'_>, idx: usize) -> Result<Option<T>, StoreError> {
    let value = row.get_ref(idx)?;
    let Some(bytes) = value
        .as_blob_or_null()
        .map_err(|e| StoreError::Corrupt(format!("{}: {e}", T::WHAT)))?
    else {
        return Ok(None);
    };
    T::from_blob(bytes)
        .map(Some)
        .ok_or_else(|| StoreError::Corrupt(format!("{} of {} bytes", T::WHAT, bytes.len())))
}

/// Reads column `idx` as a non-negative integer.
fn u64_at(row: &Row<'_>, idx: usize, what: &str) -> Result<u64, StoreError> {
    let n: i64 = row.get(idx)?;
    u64::try_from(n).map_err(|_| StoreError::Corrupt(format!("{what} is {n}")))
}

/// Reads column `idx` as text naming an enum variant.
fn parsed_at<T: FromStr<Err = StoreError>>(row: &Row<'_>, idx: usize) -> Result<T, StoreError> {
    let text = row
        .get_ref(idx)?
        .as_str()
        .map_err(|e| StoreError::Corrupt(e.to_string()))?;
    text.parse()
        .map_err(|e: StoreError| StoreError::Corrupt(e.to_string()))
}

/// SQLite integers are signed; a u64 beyond i64::MAX is refused, not wrapped.
fn to_sql_int(value: u64, what: &'static str) -> Result<i64, StoreError> {
    i64::try_from(value).map_err(|_| StoreError::OutOfRange(what))
}

/// A row limit for SQL (where no realistic `usize` exceeds i64).
fn sql_limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

#[cfg(test)]
pub(crate) mod test_support {
    use super::{ConversationKind, ConversationRecord, Store, StoreError};
    use crate::ids::ConversationId;

    /// A group conversation whose id and topic derive from `n`.
    pub(super) fn conversation(n: u8) -> ConversationRecord {
        let id = ConversationId([n; 32]);
        ConversationRecord {
            id,
            kind: ConversationKind::Group,
            name: format!("group {n}"),
            topic: crate::routing::Routing::from_bytes([n; 32]).topic(),
            tag: Some(crate::routing::Routing::from_bytes([n; 32]).tag()),
            epoch: 0,
            state: None,
            created_at_ms: 1_000 + i64::from(n),
            last_message_at_ms: None,
            unread: 0,
            key_epoch: 1,
        }
    }

    /// An in-memory store holding `conversation(n)` for each of `ns`.
    pub(crate) fn store_with(ns: &[u8]) -> Result<Store, StoreError> {
        let store = Store::open_in_memory()?;
        for &n in ns {
            store.db().insert_conversation(&conversation(n))?;
        }
        Ok(store)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user_version(store: &Store) -> Result<i64, StoreError> {
        Ok(store
            .conn
            .pragma_query_value(None, "user_version", |row| row.get(0))?)
    }

    fn mode_of(path: &Path) -> Result<u32, StoreError> {
        Ok(std::fs::metadata(path)?.permissions().mode() & 0o777)
    }

    /// Without the query planner stability guarantee, STAT4 made every
    /// bind of a lookup like this one re-compile the statement.
    #[test]
    fn cached_statements_are_not_recompiled_per_lookup() -> Result<(), StoreError> {
        let dir = tempfile::tempdir()?;
        let mut store = Store::open(&dir.path().join("weft.db"))?;
        const SQL: &str =
            "SELECT user_id, emoji FROM reactions WHERE message = ?1 ORDER BY user_id, emoji";
        for round in 0..4u8 {
            let txn = store.transaction()?;
            txn.db().reactions(&EnvelopeId([round; 16]))?;
            let recompiled = txn
                .db()
                .prepare(SQL)?
                .get_status(rusqlite::StatementStatus::RePrepare);
            assert_eq!(recompiled, 0, "round {round}");
            txn.commit()?;
        }
        Ok(())
    }

    #[test]
    fn migrations_are_numbered_in_order() {
        for (i, (version, sql)) in MIGRATIONS.iter().enumerate() {
            assert_eq!(*version, i as i64 + 1);
            assert!(!sql.trim().is_empty());
        }
    }

    #[test]
    fn fresh_file_is_migrated_and_reopens_with_its_data() -> Result<(), StoreError> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("weft.db");
        let user = UserId([3; 32]);
        {
            let store = Store::open(&path)?;
            assert_eq!(user_version(&store)?, MIGRATIONS.len() as i64);
            let journal: String = store
                .conn
                .query_row("PRAGMA journal_mode", [], |row| row.get(0))?;
            assert_eq!(journal, "wal");
            store.db().upsert_user(&user, "Ada", 5)?;
            store.db().set_meta("identity", b"secret")?;
        }
        let store = Store::open(&path)?;
        assert_eq!(user_version(&store)?, MIGRATIONS.len() as i64);
        assert_eq!(store.db().user_name(&user)?.as_deref(), Some("Ada"));
        assert_eq!(
            store.db().get_meta("identity")?.as_deref(),
            Some(&b"secret"[..])
        );
        let foreign_keys: i64 = store
            .conn
            .query_row("PRAGMA foreign_keys", [], |row| row.get(0))?;
        assert_eq!(foreign_keys, 1);
        let synchronous: i64 = store
            .conn
            .query_row("PRAGMA synchronous", [], |row| row.get(0))?;
        assert_eq!(synchronous, 2, "FULL");
        let secure_delete: i64 = store
            .conn
            .query_row("PRAGMA secure_delete", [], |row| row.get(0))?;
        assert_eq!(secure_delete, 1, "deleted content is overwritten");
        Ok(())
    }

    /// A database of protocol 1 (schema 7) keeps its device bindings
    /// through migration 0008, without the certificates it cannot use.
    #[test]
    fn protocol_1_certificates_stay_as_bindings() -> Result<(), StoreError> {
        let conn = Connection::open_in_memory()?;
        for (version, sql) in &MIGRATIONS[..7] {
            conn.execute_batch(sql)?;
            conn.pragma_update(None, "user_version", version)?;
        }
        let (device, user, group) = ([1u8; 32], [2u8; 32], ConversationId([9; 32]));
        conn.execute(
            "INSERT INTO devices (device_id, user_id, cert, revoked) VALUES (?1, ?2, ?3, 1)",
            rusqlite::params![device, user, b"a protocol 1 certificate".to_vec()],
        )?;
        conn.execute(
            "INSERT INTO conversations (id, kind, name, topic, epoch, state, created_at, key_epoch)
             VALUES (?1, 'group', 'old', 'weft/1/x', 3, X'0102', 5, 1)",
            [group.0],
        )?;
        let store = Store::configure(conn)?;
        let bound = store.db().device(&DeviceId(device))?.expect("kept");
        assert_eq!((bound.user_id, bound.revoked), (UserId(user), true));
        assert!(
            bound.cert.is_empty(),
            "a protocol 1 certificate is not used"
        );
        // Another account cannot take it, and its own account's new
        // certificate replaces the old one.
        assert_eq!(
            store
                .db()
                .bind_device(&DeviceId(device), &UserId([3; 32]), b"x")?,
            Binding::OtherUser(UserId(user))
        );
        assert_eq!(
            store
                .db()
                .bind_device(&DeviceId(device), &UserId(user), b"v2")?,
            Binding::Known
        );
        // The old group keeps its record, without a state or a tag.
        let record = store.db().conversation(&group)?.expect("kept");
        assert_eq!((record.state, record.tag), (None, None));
        Ok(())
    }

    /// Pending rows kept under schema 11 stay through migration 0012,
    /// counted under their sender (read from the header) and their size,
    /// as handed over locally; the caps apply to them from then on.
    #[test]
    fn pending_rows_kept_before_the_caps_are_counted() -> Result<(), StoreError> {
        let conn = Connection::open_in_memory()?;
        for (version, sql) in &MIGRATIONS[..11] {
            conn.execute_batch(sql)?;
            conn.pragma_update(None, "user_version", version)?;
        }
        // Version byte, routing tag, sender device, and the rest.
        let envelope = |sender: u8, len: usize| {
            let mut bytes = vec![2u8];
            bytes.extend([7u8; 16]);
            bytes.extend([sender; 32]);
            bytes.resize(len, 0);
            bytes
        };
        let slot = ConversationId([1; 32]);
        for (sender, len) in [(5, 100), (5, 200), (6, 300)] {
            conn.execute(
                "INSERT INTO pending (conversation, bytes, received_at) VALUES (?1, ?2, 1)",
                rusqlite::params![slot.0, envelope(sender, len)],
            )?;
        }
        let store = Store::configure(conn)?;
        let usage: Vec<(i64, Vec<u8>, i64, i64)> = store
            .conn
            .prepare(
                "SELECT kind, holder, row_count, byte_count FROM pending_usage
                 ORDER BY kind, holder",
            )?
            .query_map([], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
            })?
            .collect::<Result<_, _>>()?;
        assert_eq!(
            usage,
            vec![
                (0, vec![], 3, 600),
                (1, vec![], 3, 600),
                (2, vec![5; 32], 2, 300),
                (2, vec![6; 32], 1, 300),
            ]
        );
        let limit = PendingLimit {
            rows: 2,
            bytes: u64::MAX,
        };
        let caps = PendingCaps {
            total: PendingLimit {
                rows: 100,
                bytes: u64::MAX,
            },
            per_peer: PendingLimit {
                rows: 100,
                bytes: u64::MAX,
            },
            per_sender: limit,
        };
        let local = PendingFrom {
            peer: Vec::new(),
            liable: false,
        };
        let evicted = store.db().add_pending(
            &slot,
            &envelope(5, 400),
            &DeviceId([5; 32]),
            &local,
            2,
            &caps,
        )?;
        assert_eq!(evicted.by_sender, 1, "sender 5's oldest goes");
        let page = store.db().pending_page(&slot, 0, i64::MAX, 10, u64::MAX)?;
        let lengths: Vec<usize> = page.iter().map(|row| row.bytes.len()).collect();
        assert_eq!(lengths, [200, 300, 400]);
        assert!(page.iter().all(|row| row.from == local));
        Ok(())
    }

    #[test]
    fn newer_schema_is_refused() -> Result<(), StoreError> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("weft.db");
        let too_new = MIGRATIONS.len() as i64 + 1;
        {
            let store = Store::open(&path)?;
            store.conn.pragma_update(None, "user_version", too_new)?;
        }
        match Store::open(&path) {
            Err(StoreError::TooNew { found, known }) => {
                assert_eq!(found, too_new);
                assert_eq!(known, MIGRATIONS.len() as i64);
            }
            other => panic!("expected TooNew, got {other:?}"),
        }
        Ok(())
    }

    #[test]
    fn database_files_are_private() -> Result<(), StoreError> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("weft.db");
        let store = Store::open(&path)?;
        store.db().set_meta("k", b"v")?;
        assert_eq!(mode_of(&path)?, 0o600);
        let wal = dir.path().join("weft.db-wal");
        assert!(wal.exists());
        assert_eq!(mode_of(&wal)?, 0o600);
        drop(store);

        // A file left world-readable is tightened on open.
        std::fs::set_permissions(&path, Permissions::from_mode(0o644))?;
        let _store = Store::open(&path)?;
        assert_eq!(mode_of(&path)?, 0o600);
        Ok(())
    }

    #[test]
    fn dropped_transaction_rolls_back() -> Result<(), StoreError> {
        let mut store = Store::open_in_memory()?;
        let user = UserId([1; 32]);
        {
            let txn = store.transaction()?;
            txn.db().upsert_user(&user, "Ada", 1)?;
            assert_eq!(txn.db().user_name(&user)?.as_deref(), Some("Ada"));
        }
        assert_eq!(store.db().user_name(&user)?, None);

        let txn = store.transaction()?;
        txn.db().upsert_user(&user, "Ada", 1)?;
        txn.db().set_meta("k", b"v")?;
        txn.commit()?;
        assert_eq!(store.db().user_name(&user)?.as_deref(), Some("Ada"));
        assert_eq!(store.db().get_meta("k")?.as_deref(), Some(&b"v"[..]));
        Ok(())
    }

    #[test]
    fn transaction_on_a_file_commits_durably() -> Result<(), StoreError> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("weft.db");
        {
            let mut store = Store::open(&path)?;
            let txn = store.transaction()?;
            for i in 0..10u8 {
                txn.db()
                    .upsert_user(&UserId([i; 32]), &format!("u{i}"), 1)?;
            }
            txn.commit()?;
            let txn = store.transaction()?;
            txn.db().upsert_user(&UserId([99; 32]), "lost", 1)?;
            drop(txn);
        }
        let store = Store::open(&path)?;
        assert_eq!(
            store.db().user_name(&UserId([9; 32]))?.as_deref(),
            Some("u9")
        );
        assert_eq!(store.db().user_name(&UserId([99; 32]))?, None);
        Ok(())
    }

    #[test]
    fn failed_step_undoes_only_itself() -> Result<(), StoreError> {
        let mut store = Store::open_in_memory()?;
        let failing = |db: Db<'_>| {
            db.atomically(|| {
                db.set_meta("half", b"done")?;
                Err::<(), _>(StoreError::Corrupt("boom".into()))
            })
        };
        assert!(failing(store.db()).is_err());
        assert_eq!(store.db().get_meta("half")?, None);

        let txn = store.transaction()?;
        txn.db().set_meta("before", b"1")?;
        assert!(failing(txn.db()).is_err());
        txn.db().set_meta("after", b"2")?;
        txn.commit()?;
        assert_eq!(store.db().get_meta("half")?, None);
        assert!(store.db().get_meta("before")?.is_some());
        assert!(store.db().get_meta("after")?.is_some());
        Ok(())
    }

    #[test]
    fn meta_round_trips_and_overwrites() -> Result<(), StoreError> {
        let store = Store::open_in_memory()?;
        let db = store.db();
        assert_eq!(db.get_meta("k")?, None);
        db.set_meta("k", b"one")?;
        db.set_meta("k", b"two")?;
        assert_eq!(db.get_meta("k")?.as_deref(), Some(&b"two"[..]));
        Ok(())
    }

    #[test]
    fn corrupt_id_is_reported() -> Result<(), StoreError> {
        let store = Store::open_in_memory()?;
        store.conn.execute(
            "INSERT INTO devices (device_id, user_id, cert) VALUES (?1, ?2, ?3)",
            rusqlite::params![[1u8; 32], [2u8; 5], b"cert"],
        )?;
        match store.db().device(&DeviceId([1; 32])) {
            Err(StoreError::Corrupt(_)) => Ok(()),
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }
}

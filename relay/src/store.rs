//! The relay's storage: mailboxes and their mail in SQLite (WAL,
//! `synchronous=FULL`), with per-mailbox quotas, per-depositor quotas
//! (by peer id and by address, per mailbox and in all), a relay-wide byte
//! limit, expiry, and group commit.
//!
//! One thread owns the connection ([`StoreHandle::spawn`]). Requests
//! reach it over a bounded channel as jobs; it runs every job that is
//! waiting (up to [`MAX_BATCH`]) in one transaction, each in its own
//! savepoint, commits once — one fsync of the WAL — and only then answers
//! any of them. Under load many deposits share one fsync; nothing is
//! acknowledged before it is on disk.
//!
//! The queries themselves live on [`Db`], usable from a job or, in tests,
//! from [`Store::with_txn`].

use std::collections::HashMap;
use std::fs::{OpenOptions, Permissions};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use libp2p::PeerId;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use tokio::sync::{mpsc, oneshot};
use weft_proto::mailbox::MailboxId;

use crate::depositor::Depositor;

/// Schema migrations in order: (the `user_version` they bring the database
/// to, their SQL). Append only; never edit one that has shipped.
const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("migrations/0001_init.sql")),
    (2, include_str!("migrations/0002_depositors.sql")),
];

/// Most jobs committed together.
pub const MAX_BATCH: usize = 1024;
/// Most envelope bytes committed together (a batch stops growing past it).
const MAX_BATCH_BYTES: usize = 64 * 1024 * 1024;
/// Jobs waiting for the store thread.
const QUEUE: usize = 4096;
/// How long a statement waits for another connection's lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// `last_seen` is refreshed by a fetch at most this often (a write).
const LAST_SEEN_GRANULARITY_MS: i64 = 3_600_000;

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
         upgrade weft-relay to use it"
    )]
    TooNew { found: i64, known: i64 },
    #[error("the commit failed: {0}")]
    Commit(String),
    #[error("the store has shut down")]
    Closed,
}

/// A limit on envelopes waiting: their count and their bytes (0 in either:
/// no limit on it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quota {
    pub envelopes: u64,
    pub bytes: u64,
}

impl Quota {
    pub const UNLIMITED: Quota = Quota {
        envelopes: 0,
        bytes: 0,
    };
}

/// What one depositor may have waiting (deposited, not yet acknowledged
/// or expired). A depositor is its peer id and, separately, its address
/// (`depositor::Source`): fresh peer ids are free.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DepositorQuotas {
    /// One peer id, in one mailbox.
    pub peer_per_mailbox: Quota,
    /// One peer id, in all mailboxes.
    pub peer: Quota,
    /// One address, in one mailbox.
    pub ip_per_mailbox: Quota,
    /// One address, in all mailboxes.
    pub ip: Quota,
}

impl Default for DepositorQuotas {
    fn default() -> Self {
        const MIB: u64 = 1024 * 1024;
        // A tenth of a default mailbox per stranger, a quarter per
        // address; a peer may have 50,000 waiting in all (a big group
        // whose members are away), an address a tenth of the relay.
        Self {
            peer_per_mailbox: Quota {
                envelopes: 1_000,
                bytes: 8 * MIB,
            },
            peer: Quota {
                envelopes: 50_000,
                bytes: 256 * MIB,
            },
            ip_per_mailbox: Quota {
                envelopes: 2_500,
                bytes: 16 * MIB,
            },
            ip: Quota {
                envelopes: 100_000,
                bytes: 1024 * MIB,
            },
        }
    }
}

impl DepositorQuotas {
    pub const UNLIMITED: DepositorQuotas = DepositorQuotas {
        peer_per_mailbox: Quota::UNLIMITED,
        peer: Quota::UNLIMITED,
        ip_per_mailbox: Quota::UNLIMITED,
        ip: Quota::UNLIMITED,
    };
}

/// Which per-depositor quota a deposit would go over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuotaKind {
    PeerPerMailbox,
    Peer,
    IpPerMailbox,
    Ip,
}

impl QuotaKind {
    /// Its name in metrics and in the configuration's terms.
    pub fn label(self) -> &'static str {
        match self {
            QuotaKind::PeerPerMailbox => "peer_per_mailbox",
            QuotaKind::Peer => "peer",
            QuotaKind::IpPerMailbox => "ip_per_mailbox",
            QuotaKind::Ip => "ip",
        }
    }
}

/// What a quota counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    Envelopes,
    Bytes,
}

/// Storage limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreLimits {
    /// Most envelopes one mailbox holds.
    pub max_envelopes: u64,
    /// Most envelope bytes one mailbox holds.
    pub max_bytes: u64,
    /// Most mailboxes on this relay.
    pub max_mailboxes: u64,
    /// Most envelope bytes on this relay (0: no limit).
    pub max_total_bytes: u64,
    /// How long mail is kept unacknowledged.
    pub mail_ttl: Duration,
    /// A mailbox not registered, fetched or acknowledged for this long is
    /// removed with its mail.
    pub mailbox_expiry: Duration,
    /// What one depositor may have waiting.
    pub depositors: DepositorQuotas,
}

impl Default for StoreLimits {
    fn default() -> Self {
        Self {
            max_envelopes: 10_000,
            max_bytes: 64 * 1024 * 1024,
            max_mailboxes: 100_000,
            max_total_bytes: 10 * 1024 * 1024 * 1024,
            mail_ttl: Duration::from_secs(14 * 86_400),
            mailbox_expiry: Duration::from_secs(90 * 86_400),
            depositors: DepositorQuotas::default(),
        }
    }
}

/// What the relay holds, kept current by the store thread.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub mailboxes: u64,
    pub envelopes: u64,
    pub bytes: u64,
}

/// A registered mailbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MailboxInfo {
    pub id: MailboxId,
    pub peer: PeerId,
    pub wakeup: Option<String>,
    pub registered_at: i64,
    pub last_seen: i64,
    pub envelopes: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegisterOutcome {
    /// A new mailbox (`true`) or a renewal of the peer's existing one.
    Registered { new: bool },
    /// The relay holds its maximum of mailboxes.
    RelayFull { max: u64 },
    /// The id is bound to another peer (cannot happen with honestly
    /// derived ids; refused rather than rebound).
    Conflict,
}

/// Who to wake when mail arrived.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WakeTarget {
    pub mailbox: MailboxId,
    pub peer: PeerId,
    pub wakeup: Option<String>,
}

/// Why a deposit did not fit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Full {
    /// The mailbox's count quota.
    Count { max: u64 },
    /// The mailbox's byte quota.
    Bytes { max: u64 },
    /// The relay-wide byte limit.
    Relay,
    /// One of the depositor's quotas: it has `waiting` of `unit` there,
    /// at most `max`.
    Depositor {
        quota: QuotaKind,
        unit: Unit,
        waiting: u64,
        max: u64,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DepositOutcome {
    /// Every envelope is stored (`new` of them were not already there).
    Stored {
        accepted: u32,
        new: u32,
        wake: WakeTarget,
    },
    NotRegistered,
    /// Nothing was stored.
    Full(Full),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FetchOutcome {
    Mail {
        mailbox: MailboxId,
        items: Vec<(u64, Vec<u8>)>,
        more: bool,
    },
    NotRegistered,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AckOutcome {
    Acked { deleted: u32 },
    NotRegistered,
}

/// What one expiry sweep step removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Expired {
    pub envelopes: u64,
    pub mailboxes: u64,
    /// More is due: sweep again.
    pub more: bool,
}

/// The database and the limits it enforces. Owned by the store thread.
#[derive(Debug)]
pub struct Store {
    conn: Connection,
    limits: StoreLimits,
    totals: Totals,
}

impl Store {
    /// Opens (creating if needed) the database at `path`, readable by its
    /// owner only, and brings its schema up to date.
    pub fn open(path: &Path, limits: StoreLimits) -> Result<Store, StoreError> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)?;
        std::fs::set_permissions(path, Permissions::from_mode(0o600))?;
        let conn = Connection::open(path)?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |row| row.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(%mode, "SQLite did not switch to WAL journal mode");
        }
        Self::configure(conn, limits)
    }

    /// A fresh database in memory, for tests.
    pub fn open_in_memory(limits: StoreLimits) -> Result<Store, StoreError> {
        Self::configure(Connection::open_in_memory()?, limits)
    }

    fn configure(mut conn: Connection, limits: StoreLimits) -> Result<Store, StoreError> {
        // FULL: a deposit we acknowledged must survive power loss; in WAL
        // mode that is one fsync of the WAL per commit.
        conn.execute_batch(
            "PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON; PRAGMA journal_size_limit=67108864;",
        )?;
        conn.set_prepared_statement_cache_capacity(64);
        migrate(&mut conn)?;
        let mut store = Store {
            conn,
            limits,
            totals: Totals::default(),
        };
        store.totals = store.load_totals()?;
        Ok(store)
    }

    pub fn limits(&self) -> &StoreLimits {
        &self.limits
    }

    pub fn totals(&self) -> Totals {
        self.totals
    }

    fn load_totals(&self) -> Result<Totals, StoreError> {
        let (mailboxes, envelopes, bytes): (i64, i64, i64) = self.conn.query_row(
            "SELECT count(*), coalesce(sum(envelopes), 0), coalesce(sum(bytes), 0) FROM mailboxes",
            [],
            |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
        )?;
        Ok(Totals {
            mailboxes: to_u64(mailboxes)?,
            envelopes: to_u64(envelopes)?,
            bytes: to_u64(bytes)?,
        })
    }

    /// Runs `f` in its own transaction and commits it (tests, tools).
    pub fn with_txn<T>(
        &mut self,
        f: impl FnOnce(&mut Db<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let before = self.totals;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut db = Db {
            conn: &tx,
            limits: &self.limits,
            totals: &mut self.totals,
        };
        let result = f(&mut db).and_then(|value| {
            tx.commit()?;
            Ok(value)
        });
        if result.is_err() {
            self.totals = before;
        }
        result
    }

    /// Runs `jobs` in one transaction, each in a savepoint (a failed job
    /// is undone alone), commits once, then completes every job with the
    /// commit's outcome.
    fn run_batch(&mut self, jobs: Vec<Job>) {
        let snapshot = self.totals;
        let tx = match self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
        {
            Ok(tx) => tx,
            Err(e) => {
                let e = StoreError::from(e);
                tracing::error!("cannot start a transaction: {e}");
                for job in jobs {
                    (job.run)(None)(Err(&e));
                }
                return;
            }
        };
        let mut completions = Vec::with_capacity(jobs.len());
        for job in jobs {
            let before = self.totals;
            // Cached statements: parsed once, not for every job.
            let run = |sql: &str| tx.prepare_cached(sql).and_then(|mut s| s.execute([]));
            if let Err(e) = run("SAVEPOINT job") {
                let e = StoreError::from(e);
                completions.push((job.run)(None));
                tracing::error!("savepoint failed: {e}");
                continue;
            }
            let mut db = Db {
                conn: &tx,
                limits: &self.limits,
                totals: &mut self.totals,
            };
            let (ok, done) = run_job(job, &mut db);
            let ended = if ok {
                run("RELEASE job")
            } else {
                self.totals = before;
                run("ROLLBACK TO job").and_then(|_| run("RELEASE job"))
            };
            if let Err(e) = ended {
                tracing::error!("ending a savepoint failed: {e}");
            }
            completions.push(done);
        }
        let committed = tx.commit().map_err(StoreError::from);
        if let Err(e) = &committed {
            tracing::error!("commit failed: {e}");
            self.totals = self.load_totals().unwrap_or(snapshot);
        }
        let outcome = committed.as_ref().map(|_| ());
        for done in completions {
            done(outcome);
        }
    }
}

fn run_job(job: Job, db: &mut Db<'_>) -> (bool, Completion) {
    let mut ok = false;
    let done = (job.run)(Some((db, &mut ok)));
    (ok, done)
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let known = MIGRATIONS.last().map_or(0, |(version, _)| *version);
    for (version, sql) in MIGRATIONS {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
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

fn to_u64(n: i64) -> Result<u64, StoreError> {
    u64::try_from(n).map_err(|_| StoreError::Corrupt(format!("negative count {n}")))
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The dedup key of an envelope in a mailbox: the first 16 bytes of its
/// BLAKE3 hash (the node's message id).
pub fn envelope_id(envelope: &[u8]) -> [u8; 16] {
    let mut id = [0u8; 16];
    id.copy_from_slice(&blake3::hash(envelope).as_bytes()[..16]);
    id
}

fn mailbox_of(bytes: &[u8]) -> Result<MailboxId, StoreError> {
    <[u8; 16]>::try_from(bytes)
        .map(MailboxId)
        .map_err(|_| StoreError::Corrupt(format!("mailbox id of {} bytes", bytes.len())))
}

fn peer_of(bytes: &[u8]) -> Result<PeerId, StoreError> {
    PeerId::from_bytes(bytes).map_err(|e| StoreError::Corrupt(format!("peer id: {e}")))
}

/// The queries, on a connection inside a transaction. Keeps [`Totals`]
/// current as it writes.
#[derive(Debug)]
pub struct Db<'a> {
    conn: &'a Connection,
    limits: &'a StoreLimits,
    totals: &'a mut Totals,
}

impl Db<'_> {
    pub fn limits(&self) -> &StoreLimits {
        self.limits
    }

    pub fn totals(&self) -> Totals {
        *self.totals
    }

    /// Opens or renews `mailbox`, bound to `peer`.
    pub fn register(
        &mut self,
        mailbox: MailboxId,
        peer: &PeerId,
        wakeup: Option<&str>,
        now_ms: i64,
    ) -> Result<RegisterOutcome, StoreError> {
        let peer_bytes = peer.to_bytes();
        let existing: Option<Vec<u8>> = self
            .conn
            .prepare_cached("SELECT peer FROM mailboxes WHERE id = ?1")?
            .query_row([&mailbox.0[..]], |row| row.get(0))
            .optional()?;
        match existing {
            Some(bound) if bound == peer_bytes => {
                self.conn
                    .prepare_cached(
                        "UPDATE mailboxes SET wakeup = ?2, last_seen = ?3 WHERE id = ?1",
                    )?
                    .execute(params![&mailbox.0[..], wakeup, now_ms])?;
                Ok(RegisterOutcome::Registered { new: false })
            }
            Some(_) => Ok(RegisterOutcome::Conflict),
            None => {
                // The peer's mailbox under another id (the relay's key
                // changed, so did the derivation): it is gone for good.
                self.remove_mailboxes_of(&peer_bytes)?;
                if self.totals.mailboxes >= self.limits.max_mailboxes {
                    return Ok(RegisterOutcome::RelayFull {
                        max: self.limits.max_mailboxes,
                    });
                }
                self.conn
                    .prepare_cached(
                        "INSERT INTO mailboxes (id, peer, wakeup, registered_at, last_seen)
                         VALUES (?1, ?2, ?3, ?4, ?4)",
                    )?
                    .execute(params![&mailbox.0[..], peer_bytes, wakeup, now_ms])?;
                self.totals.mailboxes += 1;
                Ok(RegisterOutcome::Registered { new: true })
            }
        }
    }

    fn remove_mailboxes_of(&mut self, peer: &[u8]) -> Result<(), StoreError> {
        let old: Option<(Vec<u8>, i64, i64)> = self
            .conn
            .prepare_cached("SELECT id, envelopes, bytes FROM mailboxes WHERE peer = ?1")?
            .query_row([peer], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
            .optional()?;
        if let Some((id, envelopes, bytes)) = old {
            self.remove_mailbox(&id, to_u64(envelopes)?, to_u64(bytes)?)?;
        }
        Ok(())
    }

    fn remove_mailbox(&mut self, id: &[u8], envelopes: u64, bytes: u64) -> Result<(), StoreError> {
        let groups = self.depositors_of(
            "SELECT depositor, source, count(*), coalesce(sum(size), 0) FROM mail
             WHERE mailbox = ?1 GROUP BY depositor, source",
            params![id],
        )?;
        for group in &groups {
            self.release(id, group)?;
        }
        self.conn
            .prepare_cached("DELETE FROM mail WHERE mailbox = ?1")?
            .execute([id])?;
        self.conn
            .prepare_cached("DELETE FROM mailboxes WHERE id = ?1")?
            .execute([id])?;
        self.totals.mailboxes = self.totals.mailboxes.saturating_sub(1);
        self.totals.envelopes = self.totals.envelopes.saturating_sub(envelopes);
        self.totals.bytes = self.totals.bytes.saturating_sub(bytes);
        Ok(())
    }

    /// A registered mailbox.
    pub fn mailbox(&self, id: MailboxId) -> Result<Option<MailboxInfo>, StoreError> {
        let row = self
            .conn
            .prepare_cached(
                "SELECT peer, wakeup, registered_at, last_seen, envelopes, bytes
                 FROM mailboxes WHERE id = ?1",
            )?
            .query_row([&id.0[..]], |row| {
                Ok((
                    row.get::<_, Vec<u8>>(0)?,
                    row.get::<_, Option<String>>(1)?,
                    row.get::<_, i64>(2)?,
                    row.get::<_, i64>(3)?,
                    row.get::<_, i64>(4)?,
                    row.get::<_, i64>(5)?,
                ))
            })
            .optional()?;
        let Some((peer, wakeup, registered_at, last_seen, envelopes, bytes)) = row else {
            return Ok(None);
        };
        Ok(Some(MailboxInfo {
            id,
            peer: peer_of(&peer)?,
            wakeup,
            registered_at,
            last_seen,
            envelopes: to_u64(envelopes)?,
            bytes: to_u64(bytes)?,
        }))
    }

    /// The mailbox bound to `peer`.
    pub fn mailbox_of_peer(&self, peer: &PeerId) -> Result<Option<MailboxId>, StoreError> {
        let id: Option<Vec<u8>> = self
            .conn
            .prepare_cached("SELECT id FROM mailboxes WHERE peer = ?1")?
            .query_row([peer.to_bytes()], |row| row.get(0))
            .optional()?;
        id.map(|id| mailbox_of(&id)).transpose()
    }

    /// Stores `envelopes` from `depositor` in `mailbox`: all of them, or
    /// none if they do not fit. Envelopes already there count as accepted
    /// and are not stored twice (nor charged to anyone again).
    pub fn deposit(
        &mut self,
        mailbox: MailboxId,
        depositor: &Depositor,
        envelopes: &[Vec<u8>],
        now_ms: i64,
    ) -> Result<DepositOutcome, StoreError> {
        let row: Option<(Vec<u8>, Option<String>, i64, i64)> = self
            .conn
            .prepare_cached("SELECT peer, wakeup, envelopes, bytes FROM mailboxes WHERE id = ?1")?
            .query_row([&mailbox.0[..]], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
            })
            .optional()?;
        let Some((peer, wakeup, count, bytes)) = row else {
            return Ok(DepositOutcome::NotRegistered);
        };
        let (count, bytes) = (to_u64(count)?, to_u64(bytes)?);
        // Which envelopes are new (not stored, not repeated in the request).
        let mut fresh: Vec<([u8; 16], &Vec<u8>)> = Vec::with_capacity(envelopes.len());
        {
            let mut exists = self
                .conn
                .prepare_cached("SELECT 1 FROM mail WHERE mailbox = ?1 AND envelope_id = ?2")?;
            for envelope in envelopes {
                let id = envelope_id(envelope);
                if fresh.iter().any(|(seen, _)| *seen == id) {
                    continue;
                }
                if exists
                    .query_row(params![&mailbox.0[..], &id[..]], |_| Ok(()))
                    .optional()?
                    .is_none()
                {
                    fresh.push((id, envelope));
                }
            }
        }
        let new_count = fresh.len() as u64;
        let new_bytes: u64 = fresh.iter().map(|(_, e)| e.len() as u64).sum();
        let keys = UsageKeys::of(depositor);
        // The depositor's own quotas first: a stranger over its share is
        // told so, whatever room the mailbox has.
        if new_count > 0
            && let Some(full) = self.over_quota(&keys, &mailbox, new_count, new_bytes)?
        {
            return Ok(DepositOutcome::Full(full));
        }
        if count + new_count > self.limits.max_envelopes {
            return Ok(DepositOutcome::Full(Full::Count {
                max: self.limits.max_envelopes,
            }));
        }
        if bytes + new_bytes > self.limits.max_bytes {
            return Ok(DepositOutcome::Full(Full::Bytes {
                max: self.limits.max_bytes,
            }));
        }
        if self.limits.max_total_bytes > 0
            && new_bytes > 0
            && self.totals.bytes + new_bytes > self.limits.max_total_bytes
        {
            return Ok(DepositOutcome::Full(Full::Relay));
        }
        if !fresh.is_empty() {
            let mut insert = self.conn.prepare_cached(
                "INSERT INTO mail (mailbox, envelope_id, envelope, size, stored_at, depositor, source)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?;
            for (id, envelope) in &fresh {
                insert.execute(params![
                    &mailbox.0[..],
                    &id[..],
                    envelope,
                    envelope.len() as i64,
                    now_ms,
                    &keys.peer[1..],
                    &keys.ip[1..],
                ])?;
            }
            self.charge(&keys, &mailbox, new_count, new_bytes)?;
            self.conn
                .prepare_cached(
                    "UPDATE mailboxes SET envelopes = envelopes + ?2, bytes = bytes + ?3
                     WHERE id = ?1",
                )?
                .execute(params![
                    &mailbox.0[..],
                    to_i64(new_count),
                    to_i64(new_bytes)
                ])?;
            self.totals.envelopes += new_count;
            self.totals.bytes += new_bytes;
        }
        Ok(DepositOutcome::Stored {
            accepted: u32::try_from(envelopes.len()).unwrap_or(u32::MAX),
            new: u32::try_from(new_count).unwrap_or(u32::MAX),
            wake: WakeTarget {
                mailbox,
                peer: peer_of(&peer)?,
                wakeup,
            },
        })
    }

    /// Up to `limit` envelopes (and about `max_bytes`, but at least one)
    /// of `peer`'s own mailbox after cursor `after`, in cursor order.
    pub fn fetch(
        &mut self,
        peer: &PeerId,
        after: u64,
        limit: u32,
        max_bytes: usize,
        now_ms: i64,
    ) -> Result<FetchOutcome, StoreError> {
        let Some(mailbox) = self.mailbox_of_peer(peer)? else {
            return Ok(FetchOutcome::NotRegistered);
        };
        self.touch(mailbox, now_ms)?;
        let mut stmt = self.conn.prepare_cached(
            "SELECT cursor, envelope FROM mail WHERE mailbox = ?1 AND cursor > ?2
             ORDER BY cursor LIMIT ?3",
        )?;
        let limit = limit.max(1);
        let mut rows = stmt.query(params![&mailbox.0[..], to_i64(after), i64::from(limit) + 1])?;
        let mut items = Vec::new();
        let mut size = 0usize;
        let mut more = false;
        while let Some(row) = rows.next()? {
            let cursor = to_u64(row.get(0)?)?;
            let envelope: Vec<u8> = row.get(1)?;
            // Per item: the bytes plus a little postcard framing.
            let cost = envelope.len() + 16;
            if items.len() >= limit as usize || (!items.is_empty() && size + cost > max_bytes) {
                more = true;
                break;
            }
            size += cost;
            items.push((cursor, envelope));
        }
        Ok(FetchOutcome::Mail {
            mailbox,
            items,
            more,
        })
    }

    /// Marks a mailbox as in use (for expiry), writing at most once per
    /// [`LAST_SEEN_GRANULARITY_MS`].
    fn touch(&mut self, mailbox: MailboxId, now_ms: i64) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("UPDATE mailboxes SET last_seen = ?2 WHERE id = ?1 AND last_seen < ?3")?
            .execute(params![
                &mailbox.0[..],
                now_ms,
                now_ms.saturating_sub(LAST_SEEN_GRANULARITY_MS)
            ])?;
        Ok(())
    }

    /// Deletes `peer`'s own mail up to and including cursor `up_to`.
    pub fn ack(
        &mut self,
        peer: &PeerId,
        up_to: u64,
        now_ms: i64,
    ) -> Result<AckOutcome, StoreError> {
        let Some(mailbox) = self.mailbox_of_peer(peer)? else {
            return Ok(AckOutcome::NotRegistered);
        };
        self.touch(mailbox, now_ms)?;
        let up_to = to_i64(up_to);
        let groups = self.depositors_of(
            "SELECT depositor, source, count(*), coalesce(sum(size), 0) FROM mail
             WHERE mailbox = ?1 AND cursor <= ?2 GROUP BY depositor, source",
            params![&mailbox.0[..], up_to],
        )?;
        let count: i64 = groups.iter().map(|g| g.envelopes).sum();
        let bytes: i64 = groups.iter().map(|g| g.bytes).sum();
        if count > 0 {
            for group in &groups {
                self.release(&mailbox.0, group)?;
            }
            self.conn
                .prepare_cached("DELETE FROM mail WHERE mailbox = ?1 AND cursor <= ?2")?
                .execute(params![&mailbox.0[..], up_to])?;
            self.conn
                .prepare_cached(
                    "UPDATE mailboxes SET envelopes = max(envelopes - ?2, 0),
                     bytes = max(bytes - ?3, 0) WHERE id = ?1",
                )?
                .execute(params![&mailbox.0[..], count, bytes])?;
            self.totals.envelopes = self.totals.envelopes.saturating_sub(to_u64(count)?);
            self.totals.bytes = self.totals.bytes.saturating_sub(to_u64(bytes)?);
        }
        Ok(AckOutcome::Acked {
            deleted: u32::try_from(count).unwrap_or(u32::MAX),
        })
    }

    /// Removes up to `max_rows` envelopes older than the mail TTL and up
    /// to 16 mailboxes unused for longer than the mailbox expiry.
    pub fn expire(&mut self, now_ms: i64, max_rows: u32) -> Result<Expired, StoreError> {
        let mut expired = Expired::default();
        let cutoff = now_ms.saturating_sub(duration_ms(self.limits.mail_ttl));
        type Old = (i64, Vec<u8>, i64, Option<Vec<u8>>, Option<Vec<u8>>);
        let old: Vec<Old> = {
            let mut stmt = self.conn.prepare_cached(
                "SELECT cursor, mailbox, size, depositor, source FROM mail WHERE stored_at < ?1
                 ORDER BY stored_at LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![cutoff, i64::from(max_rows)], |row| {
                Ok((
                    row.get(0)?,
                    row.get(1)?,
                    row.get(2)?,
                    row.get(3)?,
                    row.get(4)?,
                ))
            })?;
            rows.collect::<Result<_, _>>()?
        };
        expired.more = old.len() as u64 >= u64::from(max_rows);
        let mut per_mailbox: HashMap<Vec<u8>, (i64, i64)> = HashMap::new();
        // (mailbox, depositor, source) -> (count, bytes)
        type Key = (Vec<u8>, Option<Vec<u8>>, Option<Vec<u8>>);
        let mut per_depositor: HashMap<Key, (i64, i64)> = HashMap::new();
        {
            let mut delete = self
                .conn
                .prepare_cached("DELETE FROM mail WHERE cursor = ?1")?;
            for (cursor, mailbox, size, depositor, source) in old {
                delete.execute([cursor])?;
                let entry = per_depositor
                    .entry((mailbox.clone(), depositor, source))
                    .or_default();
                entry.0 += 1;
                entry.1 += size;
                let entry = per_mailbox.entry(mailbox).or_default();
                entry.0 += 1;
                entry.1 += size;
            }
        }
        for ((mailbox, depositor, source), (envelopes, bytes)) in per_depositor {
            let group = DepositorGroup {
                depositor,
                source,
                envelopes,
                bytes,
            };
            self.release(&mailbox, &group)?;
        }
        for (mailbox, (count, bytes)) in per_mailbox {
            self.conn
                .prepare_cached(
                    "UPDATE mailboxes SET envelopes = max(envelopes - ?2, 0),
                     bytes = max(bytes - ?3, 0) WHERE id = ?1",
                )?
                .execute(params![mailbox, count, bytes])?;
            expired.envelopes += to_u64(count)?;
            self.totals.envelopes = self.totals.envelopes.saturating_sub(to_u64(count)?);
            self.totals.bytes = self.totals.bytes.saturating_sub(to_u64(bytes)?);
        }
        let idle_cutoff = now_ms.saturating_sub(duration_ms(self.limits.mailbox_expiry));
        let idle: Vec<(Vec<u8>, i64, i64)> = {
            let mut stmt = self.conn.prepare_cached(
                "SELECT id, envelopes, bytes FROM mailboxes WHERE last_seen < ?1 LIMIT 16",
            )?;
            let rows = stmt.query_map([idle_cutoff], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?))
            })?;
            rows.collect::<Result<_, _>>()?
        };
        expired.more |= idle.len() >= 16;
        for (id, envelopes, bytes) in idle {
            self.remove_mailbox(&id, to_u64(envelopes)?, to_u64(bytes)?)?;
            expired.envelopes += to_u64(envelopes)?;
            expired.mailboxes += 1;
        }
        Ok(expired)
    }
}

/// The quotas in the order they are checked (and the usage rows of
/// `over_quota`: peer per mailbox, peer, address per mailbox, address).
const QUOTA_ORDER: [QuotaKind; 4] = [
    QuotaKind::PeerPerMailbox,
    QuotaKind::Peer,
    QuotaKind::IpPerMailbox,
    QuotaKind::Ip,
];

/// Envelopes waiting: (count, bytes).
pub type Waiting = (u64, u64);

/// The `depositor_usage` keys a depositor is counted under.
struct UsageKeys {
    /// `'p'` | peer id bytes.
    peer: Vec<u8>,
    /// `'i'` | address key.
    ip: Vec<u8>,
}

impl UsageKeys {
    fn of(depositor: &Depositor) -> Self {
        let mut peer = vec![b'p'];
        peer.extend_from_slice(&depositor.peer.to_bytes());
        let mut ip = vec![b'i'];
        ip.extend_from_slice(depositor.source.key());
        Self { peer, ip }
    }
}

/// Mail of one depositor (peer id and address as stored; `None` for mail
/// from before depositors were recorded) in one mailbox.
#[derive(Debug)]
struct DepositorGroup {
    depositor: Option<Vec<u8>>,
    source: Option<Vec<u8>>,
    envelopes: i64,
    bytes: i64,
}

impl DepositorQuotas {
    fn of(&self, kind: QuotaKind) -> Quota {
        match kind {
            QuotaKind::PeerPerMailbox => self.peer_per_mailbox,
            QuotaKind::Peer => self.peer,
            QuotaKind::IpPerMailbox => self.ip_per_mailbox,
            QuotaKind::Ip => self.ip,
        }
    }
}

impl Db<'_> {
    /// The first of the depositor's quotas that `count` more envelopes of
    /// `bytes` in `mailbox` would go over.
    fn over_quota(
        &self,
        keys: &UsageKeys,
        mailbox: &MailboxId,
        count: u64,
        bytes: u64,
    ) -> Result<Option<Full>, StoreError> {
        if self.limits.depositors == DepositorQuotas::UNLIMITED {
            return Ok(None);
        }
        // The four rows in one statement: four lookups in the primary
        // key (no IN lists, which would build a temporary table each time).
        let mut usage = self.conn.prepare_cached(
            "SELECT 0, envelopes, bytes FROM depositor_usage WHERE depositor = ?1 AND mailbox = ?3
             UNION ALL
             SELECT 1, envelopes, bytes FROM depositor_usage WHERE depositor = ?1 AND mailbox = x''
             UNION ALL
             SELECT 2, envelopes, bytes FROM depositor_usage WHERE depositor = ?2 AND mailbox = ?3
             UNION ALL
             SELECT 3, envelopes, bytes FROM depositor_usage WHERE depositor = ?2 AND mailbox = x''",
        )?;
        let mut rows = usage.query(params![keys.peer, keys.ip, &mailbox.0[..]])?;
        let mut have = [(0u64, 0u64); 4];
        while let Some(row) = rows.next()? {
            let slot: i64 = row.get(0)?;
            if let Some(h) = usize::try_from(slot).ok().and_then(|i| have.get_mut(i)) {
                *h = (to_u64(row.get(1)?)?, to_u64(row.get(2)?)?);
            }
        }
        for (kind, (have_count, have_bytes)) in QUOTA_ORDER.into_iter().zip(have) {
            let quota = self.limits.depositors.of(kind);
            for (unit, have, more, max) in [
                (Unit::Envelopes, have_count, count, quota.envelopes),
                (Unit::Bytes, have_bytes, bytes, quota.bytes),
            ] {
                if max > 0 && have.saturating_add(more) > max {
                    return Ok(Some(Full::Depositor {
                        quota: kind,
                        unit,
                        waiting: have,
                        max,
                    }));
                }
            }
        }
        Ok(None)
    }

    /// Counts `count` envelopes of `bytes` more in `mailbox` against every
    /// key of the depositor.
    fn charge(
        &self,
        keys: &UsageKeys,
        mailbox: &MailboxId,
        count: u64,
        bytes: u64,
    ) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "INSERT INTO depositor_usage (depositor, mailbox, envelopes, bytes)
                 VALUES (?1, ?3, ?4, ?5), (?1, x'', ?4, ?5), (?2, ?3, ?4, ?5), (?2, x'', ?4, ?5)
                 ON CONFLICT (depositor, mailbox) DO UPDATE SET
                     envelopes = envelopes + excluded.envelopes, bytes = bytes + excluded.bytes",
            )?
            .execute(params![
                keys.peer,
                keys.ip,
                &mailbox.0[..],
                to_i64(count),
                to_i64(bytes)
            ])?;
        Ok(())
    }

    /// The mail a query selects, grouped by depositor: the query returns
    /// (depositor, source, count, bytes).
    fn depositors_of(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
    ) -> Result<Vec<DepositorGroup>, StoreError> {
        let mut stmt = self.conn.prepare_cached(sql)?;
        let rows = stmt.query_map(params, |row| {
            Ok(DepositorGroup {
                depositor: row.get(0)?,
                source: row.get(1)?,
                envelopes: row.get(2)?,
                bytes: row.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Uncounts a group of mail leaving `mailbox` (acknowledged, expired,
    /// or the mailbox removed); rows that reach zero go.
    fn release(&self, mailbox: &[u8], group: &DepositorGroup) -> Result<(), StoreError> {
        let key = |tag: u8, bytes: &Option<Vec<u8>>| {
            bytes.as_ref().map(|b| {
                let mut key = vec![tag];
                key.extend_from_slice(b);
                key
            })
        };
        // Mail from before depositors were recorded has neither.
        let keys: Vec<Vec<u8>> = [key(b'p', &group.depositor), key(b'i', &group.source)]
            .into_iter()
            .flatten()
            .collect();
        // Point statements: IN lists would build a temporary table each
        // time.
        let mut update = self.conn.prepare_cached(
            "UPDATE depositor_usage SET envelopes = max(envelopes - ?3, 0),
             bytes = max(bytes - ?4, 0) WHERE depositor = ?1 AND mailbox = ?2",
        )?;
        let mut delete = self.conn.prepare_cached(
            "DELETE FROM depositor_usage WHERE depositor = ?1 AND mailbox = ?2 AND envelopes = 0",
        )?;
        for key in &keys {
            for row_mailbox in [mailbox, &[][..]] {
                update.execute(params![key, row_mailbox, group.envelopes, group.bytes])?;
                delete.execute(params![key, row_mailbox])?;
            }
        }
        Ok(())
    }

    /// What `depositor` has waiting in `mailbox` (`None`: in all
    /// mailboxes) under its peer id and its address: ((count, bytes),
    /// (count, bytes)).
    pub fn depositor_usage(
        &self,
        depositor: &Depositor,
        mailbox: Option<MailboxId>,
    ) -> Result<(Waiting, Waiting), StoreError> {
        let keys = UsageKeys::of(depositor);
        let mut usage = self.conn.prepare_cached(
            "SELECT envelopes, bytes FROM depositor_usage WHERE depositor = ?1 AND mailbox = ?2",
        )?;
        let row_mailbox: &[u8] = mailbox.as_ref().map_or(&[], |m| &m.0);
        let mut get = |key: &[u8]| -> Result<Waiting, StoreError> {
            let (c, b): (i64, i64) = usage
                .query_row(params![key, row_mailbox], |row| {
                    Ok((row.get(0)?, row.get(1)?))
                })
                .optional()?
                .unwrap_or((0, 0));
            Ok((to_u64(c)?, to_u64(b)?))
        };
        Ok((get(&keys.peer)?, get(&keys.ip)?))
    }
}

/// Called once with the commit's outcome.
type Completion = Box<dyn FnOnce(Result<(), &StoreError>) + Send>;
/// Runs a job: with `Some((db, ok))` inside the batch's transaction (it
/// sets `ok` if its writes are to be kept), with `None` when it cannot
/// run. Returns how to complete it once the batch is committed.
type JobFn =
    Box<dyn for<'a, 'b> FnOnce(Option<(&'a mut Db<'b>, &'a mut bool)>) -> Completion + Send>;

struct Job {
    run: JobFn,
    /// Envelope bytes the job carries (bounds a batch's size).
    weight: usize,
}

enum Msg {
    Job(Job),
    /// Finish everything received so far, then stop.
    Close(oneshot::Sender<()>),
}

/// A cloneable handle to the store thread.
#[derive(Clone, Debug)]
pub struct StoreHandle {
    tx: mpsc::Sender<Msg>,
    limits: StoreLimits,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Msg::Job(job) => write!(f, "Job({} bytes)", job.weight),
            Msg::Close(_) => f.write_str("Close"),
        }
    }
}

/// What the store thread reports as it works (the relay's metrics
/// implement it; `()` reports nothing).
pub trait StoreObserver: Send + 'static {
    /// A batch of `jobs` committed, taking `took`.
    fn batch(&self, jobs: usize, took: std::time::Duration);
    /// What the store holds now.
    fn totals(&self, totals: Totals);
}

impl StoreObserver for () {
    fn batch(&self, _: usize, _: std::time::Duration) {}
    fn totals(&self, _: Totals) {}
}

impl StoreHandle {
    /// Moves `store` onto its own thread. `metrics` gets the totals after
    /// every batch.
    pub fn spawn(store: Store, metrics: impl StoreObserver) -> Result<StoreHandle, StoreError> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let limits = store.limits.clone();
        metrics.totals(store.totals());
        std::thread::Builder::new()
            .name("weft-relay-store".into())
            .spawn(move || run_thread(store, rx, metrics))?;
        Ok(StoreHandle { tx, limits })
    }

    pub fn limits(&self) -> &StoreLimits {
        &self.limits
    }

    /// Runs `f` in the next batch; answers once the batch is committed.
    pub async fn call<T: Send + 'static>(
        &self,
        weight: usize,
        f: impl FnOnce(&mut Db<'_>) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        let run: JobFn = Box::new(move |slot| {
            let result = match slot {
                Some((db, ok)) => {
                    let result = f(db);
                    *ok = result.is_ok();
                    result
                }
                None => Err(StoreError::Commit("the job could not run".into())),
            };
            Box::new(move |commit: Result<(), &StoreError>| {
                let answer = match commit {
                    Ok(()) => result,
                    Err(e) => Err(StoreError::Commit(e.to_string())),
                };
                let _ = tx.send(answer);
            })
        });
        self.tx
            .send(Msg::Job(Job { run, weight }))
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    pub async fn register(
        &self,
        mailbox: MailboxId,
        peer: PeerId,
        wakeup: Option<String>,
        now_ms: i64,
    ) -> Result<RegisterOutcome, StoreError> {
        self.call(0, move |db| {
            db.register(mailbox, &peer, wakeup.as_deref(), now_ms)
        })
        .await
    }

    pub async fn deposit(
        &self,
        mailbox: MailboxId,
        depositor: Depositor,
        envelopes: Vec<Vec<u8>>,
        now_ms: i64,
    ) -> Result<DepositOutcome, StoreError> {
        let weight = envelopes.iter().map(Vec::len).sum();
        self.call(weight, move |db| {
            db.deposit(mailbox, &depositor, &envelopes, now_ms)
        })
        .await
    }

    pub async fn fetch(
        &self,
        peer: PeerId,
        after: u64,
        limit: u32,
        max_bytes: usize,
        now_ms: i64,
    ) -> Result<FetchOutcome, StoreError> {
        self.call(0, move |db| {
            db.fetch(&peer, after, limit, max_bytes, now_ms)
        })
        .await
    }

    pub async fn ack(
        &self,
        peer: PeerId,
        up_to: u64,
        now_ms: i64,
    ) -> Result<AckOutcome, StoreError> {
        self.call(0, move |db| db.ack(&peer, up_to, now_ms)).await
    }

    /// One expiry step (see [`Db::expire`]).
    pub async fn expire(&self, now_ms: i64) -> Result<Expired, StoreError> {
        self.call(0, move |db| db.expire(now_ms, 10_000)).await
    }

    pub async fn totals(&self) -> Result<Totals, StoreError> {
        self.call(0, |db| Ok(db.totals())).await
    }

    pub async fn mailbox(&self, id: MailboxId) -> Result<Option<MailboxInfo>, StoreError> {
        self.call(0, move |db| db.mailbox(id)).await
    }

    /// Finishes and commits every job sent before this call, then stops
    /// the thread (later calls fail with [`StoreError::Closed`]).
    pub async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::Close(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

fn run_thread(mut store: Store, mut rx: mpsc::Receiver<Msg>, metrics: impl StoreObserver) {
    while let Some(first) = rx.blocking_recv() {
        let mut jobs = Vec::new();
        let mut weight = 0usize;
        let mut close = None;
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Msg::Job(job) => {
                    weight += job.weight;
                    jobs.push(job);
                }
                Msg::Close(done) => {
                    close = Some(done);
                    break;
                }
            }
            if jobs.len() >= MAX_BATCH || weight >= MAX_BATCH_BYTES {
                break;
            }
            next = rx.try_recv().ok();
        }
        if !jobs.is_empty() {
            let started = std::time::Instant::now();
            let n = jobs.len();
            store.run_batch(jobs);
            metrics.batch(n, started.elapsed());
            metrics.totals(store.totals());
        }
        if let Some(done) = close {
            rx.close();
            let _ = done.send(());
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::depositor::Source;

    fn peer(n: u8) -> PeerId {
        let key = libp2p::identity::Keypair::ed25519_from_bytes([n; 32]).unwrap();
        key.public().to_peer_id()
    }

    fn mailbox(n: u8) -> MailboxId {
        MailboxId([n; 16])
    }

    fn depositor(n: u8, ip: [u8; 4]) -> Depositor {
        Depositor {
            peer: peer(n),
            source: Source::V4(ip),
        }
    }

    /// The depositor of tests that are not about depositors.
    fn stranger() -> Depositor {
        depositor(200, [192, 0, 2, 200])
    }

    fn limits() -> StoreLimits {
        StoreLimits {
            max_envelopes: 5,
            max_bytes: 1000,
            max_mailboxes: 3,
            max_total_bytes: 0,
            mail_ttl: Duration::from_secs(100),
            mailbox_expiry: Duration::from_secs(1000),
            depositors: DepositorQuotas::UNLIMITED,
        }
    }

    fn env(n: u32, len: usize) -> Vec<u8> {
        let mut v = n.to_be_bytes().to_vec();
        v.resize(len.max(4), 0xab);
        v
    }

    fn registered(limits: StoreLimits) -> Store {
        let mut store = Store::open_in_memory(limits).unwrap();
        store
            .with_txn(|db| db.register(mailbox(1), &peer(1), None, 0))
            .unwrap();
        store
    }

    fn fetch_all(store: &mut Store, p: u8) -> Vec<(u64, Vec<u8>)> {
        match store
            .with_txn(|db| db.fetch(&peer(p), 0, 1024, usize::MAX, 0))
            .unwrap()
        {
            FetchOutcome::Mail { items, .. } => items,
            FetchOutcome::NotRegistered => panic!("not registered"),
        }
    }

    #[test]
    fn deposits_are_fetched_in_cursor_order_and_acks_delete_only_up_to_the_cursor() {
        let mut store = registered(limits());
        let envelopes: Vec<_> = (0..4).map(|n| env(n, 10)).collect();
        let out = store
            .with_txn(|db| db.deposit(mailbox(1), &stranger(), &envelopes, 1))
            .unwrap();
        assert!(matches!(
            out,
            DepositOutcome::Stored {
                accepted: 4,
                new: 4,
                ..
            }
        ));
        let items = fetch_all(&mut store, 1);
        assert_eq!(
            items.iter().map(|(_, e)| e.clone()).collect::<Vec<_>>(),
            envelopes
        );
        assert!(items.windows(2).all(|w| w[0].0 < w[1].0));
        let second = items[1].0;
        let acked = store.with_txn(|db| db.ack(&peer(1), second, 2)).unwrap();
        assert_eq!(acked, AckOutcome::Acked { deleted: 2 });
        let rest = fetch_all(&mut store, 1);
        assert_eq!(rest, items[2..].to_vec());
        assert_eq!(store.totals().envelopes, 2);
        assert_eq!(store.totals().bytes, 20);
        // Paging: one at a time with `more`.
        let page = store
            .with_txn(|db| db.fetch(&peer(1), 0, 1, usize::MAX, 0))
            .unwrap();
        assert_eq!(
            page,
            FetchOutcome::Mail {
                mailbox: mailbox(1),
                items: vec![items[2].clone()],
                more: true
            }
        );
        // Another peer's ack touches nothing here.
        store
            .with_txn(|db| db.register(mailbox(2), &peer(2), None, 0))
            .unwrap();
        let other = store.with_txn(|db| db.ack(&peer(2), u64::MAX, 3)).unwrap();
        assert_eq!(other, AckOutcome::Acked { deleted: 0 });
        assert_eq!(fetch_all(&mut store, 1).len(), 2);
    }

    #[test]
    fn duplicates_are_accepted_and_stored_once() {
        let mut store = registered(limits());
        let e = env(7, 10);
        for _ in 0..3 {
            let out = store
                .with_txn(|db| db.deposit(mailbox(1), &stranger(), &[e.clone(), e.clone()], 1))
                .unwrap();
            assert!(matches!(out, DepositOutcome::Stored { accepted: 2, .. }));
        }
        assert_eq!(fetch_all(&mut store, 1).len(), 1);
        assert_eq!(store.totals().envelopes, 1);
    }

    #[test]
    fn quotas_refuse_the_whole_deposit() {
        let mut store = registered(limits());
        let four: Vec<_> = (0..4).map(|n| env(n, 10)).collect();
        store
            .with_txn(|db| db.deposit(mailbox(1), &stranger(), &four, 1))
            .unwrap();
        // Two more would make 6 > 5: neither is stored.
        let two = vec![env(10, 10), env(11, 10)];
        let out = store
            .with_txn(|db| db.deposit(mailbox(1), &stranger(), &two, 1))
            .unwrap();
        assert_eq!(out, DepositOutcome::Full(Full::Count { max: 5 }));
        assert_eq!(fetch_all(&mut store, 1).len(), 4);
        // A duplicate still fits: it takes no room.
        let out = store
            .with_txn(|db| db.deposit(mailbox(1), &stranger(), &four[..1], 1))
            .unwrap();
        assert!(matches!(out, DepositOutcome::Stored { new: 0, .. }));
        // Bytes: 40 stored, 961 more is over 1000.
        let out = store
            .with_txn(|db| db.deposit(mailbox(1), &stranger(), &[env(20, 961)], 1))
            .unwrap();
        assert_eq!(out, DepositOutcome::Full(Full::Bytes { max: 1000 }));
        let out = store
            .with_txn(|db| db.deposit(mailbox(1), &stranger(), &[env(20, 960)], 1))
            .unwrap();
        assert!(matches!(out, DepositOutcome::Stored { new: 1, .. }));
        // Unknown mailbox.
        let out = store
            .with_txn(|db| db.deposit(mailbox(9), &stranger(), &[env(1, 1)], 1))
            .unwrap();
        assert_eq!(out, DepositOutcome::NotRegistered);
        // Relay-wide byte limit.
        let mut tight = limits();
        tight.max_total_bytes = 15;
        let mut store = registered(tight);
        store
            .with_txn(|db| db.deposit(mailbox(1), &stranger(), &[env(1, 10)], 1))
            .unwrap();
        let out = store
            .with_txn(|db| db.deposit(mailbox(1), &stranger(), &[env(2, 10)], 1))
            .unwrap();
        assert_eq!(out, DepositOutcome::Full(Full::Relay));
    }

    #[test]
    fn the_mailbox_count_is_limited_and_renewals_do_not_count() {
        let mut store = Store::open_in_memory(limits()).unwrap();
        for n in 1..=3 {
            let out = store
                .with_txn(|db| db.register(mailbox(n), &peer(n), None, 0))
                .unwrap();
            assert_eq!(out, RegisterOutcome::Registered { new: true });
        }
        let out = store
            .with_txn(|db| db.register(mailbox(4), &peer(4), None, 0))
            .unwrap();
        assert_eq!(out, RegisterOutcome::RelayFull { max: 3 });
        let out = store
            .with_txn(|db| db.register(mailbox(1), &peer(1), Some("https://p.example/x"), 5))
            .unwrap();
        assert_eq!(out, RegisterOutcome::Registered { new: false });
        let info = store
            .with_txn(|db| db.mailbox(mailbox(1)))
            .unwrap()
            .unwrap();
        assert_eq!(info.wakeup.as_deref(), Some("https://p.example/x"));
        assert_eq!(info.last_seen, 5);
        // Someone else cannot take over an id.
        let out = store
            .with_txn(|db| db.register(mailbox(1), &peer(9), None, 0))
            .unwrap();
        assert_eq!(out, RegisterOutcome::Conflict);
    }

    #[test]
    fn old_mail_and_idle_mailboxes_expire() {
        let mut store = registered(limits());
        store
            .with_txn(|db| db.register(mailbox(2), &peer(2), None, 0))
            .unwrap();
        store
            .with_txn(|db| db.deposit(mailbox(1), &stranger(), &[env(1, 10)], 0))
            .unwrap();
        store
            .with_txn(|db| db.deposit(mailbox(1), &stranger(), &[env(2, 10)], 50_000))
            .unwrap();
        // ttl is 100 s: at 120 s the first is due, the second is not.
        let ex = store.with_txn(|db| db.expire(120_000, 100)).unwrap();
        assert_eq!(ex.envelopes, 1);
        assert_eq!(fetch_all(&mut store, 1).len(), 1);
        assert_eq!(store.totals().envelopes, 1);
        // Mailbox 1 was fetched (last_seen moves, at most hourly, but it
        // starts at 0), mailbox 2 never: past 1000 s mailbox 2 goes.
        store
            .with_txn(|db| db.register(mailbox(1), &peer(1), None, 900_000))
            .unwrap();
        let ex = store.with_txn(|db| db.expire(1_500_000, 100)).unwrap();
        assert_eq!(ex.mailboxes, 1);
        assert!(
            store
                .with_txn(|db| db.mailbox(mailbox(2)))
                .unwrap()
                .is_none()
        );
        assert!(
            store
                .with_txn(|db| db.mailbox(mailbox(1)))
                .unwrap()
                .is_some()
        );
        assert_eq!(store.totals().mailboxes, 1);
    }

    #[test]
    fn unregistered_peers_fetch_and_ack_nothing() {
        let mut store = registered(limits());
        store
            .with_txn(|db| db.deposit(mailbox(1), &stranger(), &[env(1, 10)], 0))
            .unwrap();
        let out = store
            .with_txn(|db| db.fetch(&peer(3), 0, 10, usize::MAX, 0))
            .unwrap();
        assert_eq!(out, FetchOutcome::NotRegistered);
        let out = store.with_txn(|db| db.ack(&peer(3), u64::MAX, 0)).unwrap();
        assert_eq!(out, AckOutcome::NotRegistered);
        assert_eq!(fetch_all(&mut store, 1).len(), 1);
    }

    #[test]
    fn a_fetch_stops_at_its_byte_budget_but_returns_at_least_one() {
        let mut store = registered(limits());
        let envelopes: Vec<_> = (0..3).map(|n| env(n, 100)).collect();
        store
            .with_txn(|db| db.deposit(mailbox(1), &stranger(), &envelopes, 0))
            .unwrap();
        let out = store
            .with_txn(|db| db.fetch(&peer(1), 0, 10, 50, 0))
            .unwrap();
        let FetchOutcome::Mail { items, more, .. } = out else {
            panic!()
        };
        assert_eq!(items.len(), 1);
        assert!(more);
        let out = store
            .with_txn(|db| db.fetch(&peer(1), 0, 10, 240, 0))
            .unwrap();
        let FetchOutcome::Mail { items, more, .. } = out else {
            panic!()
        };
        assert_eq!(items.len(), 2);
        assert!(more);
    }

    #[test]
    fn mail_survives_reopening_and_cursors_are_never_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.db");
        let first_cursor;
        {
            let mut store = Store::open(&path, limits()).unwrap();
            store
                .with_txn(|db| db.register(mailbox(1), &peer(1), None, 0))
                .unwrap();
            store
                .with_txn(|db| db.deposit(mailbox(1), &stranger(), &[env(1, 10), env(2, 10)], 0))
                .unwrap();
            let items = fetch_all(&mut store, 1);
            first_cursor = items[1].0;
            store
                .with_txn(|db| db.ack(&peer(1), first_cursor, 0))
                .unwrap();
            store
                .with_txn(|db| db.deposit(mailbox(1), &stranger(), &[env(3, 10)], 0))
                .unwrap();
        }
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let mut store = Store::open(&path, limits()).unwrap();
        assert_eq!(
            store.totals(),
            Totals {
                mailboxes: 1,
                envelopes: 1,
                bytes: 10
            }
        );
        let items = fetch_all(&mut store, 1);
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].1, env(3, 10));
        assert!(items[0].0 > first_cursor);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_store_thread_batches_and_answers_after_commit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.db");
        let mut l = limits();
        l.max_envelopes = 10_000;
        l.max_bytes = 10_000_000;
        let store = Store::open(&path, l.clone()).unwrap();
        let handle = StoreHandle::spawn(store, ()).unwrap();
        handle.register(mailbox(1), peer(1), None, 0).await.unwrap();
        let mut tasks = Vec::new();
        for n in 0..200u32 {
            let h = handle.clone();
            tasks.push(tokio::spawn(async move {
                h.deposit(mailbox(1), stranger(), vec![env(n, 50)], 0).await
            }));
        }
        for t in tasks {
            let out = t.await.unwrap().unwrap();
            assert!(matches!(out, DepositOutcome::Stored { new: 1, .. }));
        }
        handle.close().await;
        assert!(matches!(handle.totals().await, Err(StoreError::Closed)));
        // Everything acknowledged is on disk.
        let mut store = Store::open(&path, l).unwrap();
        assert_eq!(fetch_all(&mut store, 1).len(), 200);
    }

    fn quotas(
        peer_per_mailbox: Quota,
        peer: Quota,
        ip_per_mailbox: Quota,
        ip: Quota,
    ) -> StoreLimits {
        StoreLimits {
            max_envelopes: 100,
            max_bytes: 100_000,
            depositors: DepositorQuotas {
                peer_per_mailbox,
                peer,
                ip_per_mailbox,
                ip,
            },
            ..limits()
        }
    }

    fn envelopes(n: u32) -> Quota {
        Quota {
            envelopes: u64::from(n),
            bytes: 0,
        }
    }

    fn deposit(
        store: &mut Store,
        mb: u8,
        who: &Depositor,
        envelopes: &[Vec<u8>],
    ) -> DepositOutcome {
        store
            .with_txn(|db| db.deposit(mailbox(mb), who, envelopes, 1))
            .unwrap()
    }

    fn stored(out: &DepositOutcome) -> bool {
        matches!(out, DepositOutcome::Stored { .. })
    }

    const STRANGER_IP: [u8; 4] = [203, 0, 113, 66];
    const FRIEND_IP: [u8; 4] = [198, 51, 100, 7];

    #[test]
    fn a_depositor_over_its_share_of_a_mailbox_is_refused_and_others_are_not() {
        let mut store = registered(quotas(
            envelopes(3),
            Quota::UNLIMITED,
            Quota::UNLIMITED,
            Quota::UNLIMITED,
        ));
        let stranger = depositor(66, STRANGER_IP);
        let friend = depositor(7, FRIEND_IP);
        let three: Vec<_> = (0..3).map(|n| env(n, 10)).collect();
        assert!(stored(&deposit(&mut store, 1, &stranger, &three)));
        // A fourth is over the stranger's share: refused, nothing stored.
        let out = deposit(&mut store, 1, &stranger, &[env(3, 10), env(4, 10)]);
        assert_eq!(
            out,
            DepositOutcome::Full(Full::Depositor {
                quota: QuotaKind::PeerPerMailbox,
                unit: Unit::Envelopes,
                waiting: 3,
                max: 3
            })
        );
        assert_eq!(fetch_all(&mut store, 1).len(), 3);
        // Repeating what it already deposited takes no room: accepted.
        assert!(stored(&deposit(&mut store, 1, &stranger, &three[..1])));
        // The friend's honest mail to the same mailbox still goes in.
        let out = deposit(&mut store, 1, &friend, &[env(100, 10), env(101, 10)]);
        assert!(
            matches!(out, DepositOutcome::Stored { new: 2, .. }),
            "{out:?}"
        );
        assert_eq!(fetch_all(&mut store, 1).len(), 5);
        // Another mailbox is another share.
        store
            .with_txn(|db| db.register(mailbox(2), &peer(2), None, 0))
            .unwrap();
        assert!(stored(&deposit(&mut store, 2, &stranger, &[env(5, 10)])));
        // Once the device has fetched and acknowledged, there is room again.
        let last = fetch_all(&mut store, 1).last().unwrap().0;
        store.with_txn(|db| db.ack(&peer(1), last, 2)).unwrap();
        assert!(stored(&deposit(
            &mut store,
            1,
            &stranger,
            &[env(3, 10), env(4, 10)]
        )));
        let usage = store
            .with_txn(|db| db.depositor_usage(&stranger, Some(mailbox(1))))
            .unwrap();
        assert_eq!(usage, ((2, 20), (2, 20)));
    }

    #[test]
    fn byte_shares_count_bytes() {
        let share = Quota {
            envelopes: 0,
            bytes: 100,
        };
        let mut store = registered(quotas(
            share,
            Quota::UNLIMITED,
            Quota::UNLIMITED,
            Quota::UNLIMITED,
        ));
        let stranger = depositor(66, STRANGER_IP);
        assert!(stored(&deposit(&mut store, 1, &stranger, &[env(1, 60)])));
        let out = deposit(&mut store, 1, &stranger, &[env(2, 41)]);
        assert_eq!(
            out,
            DepositOutcome::Full(Full::Depositor {
                quota: QuotaKind::PeerPerMailbox,
                unit: Unit::Bytes,
                waiting: 60,
                max: 100
            })
        );
        assert!(stored(&deposit(&mut store, 1, &stranger, &[env(2, 40)])));
    }

    #[test]
    fn a_depositor_is_limited_in_all_mailboxes_together() {
        let mut store = registered(quotas(
            Quota::UNLIMITED,
            envelopes(4),
            Quota::UNLIMITED,
            Quota::UNLIMITED,
        ));
        for n in 2..=3 {
            store
                .with_txn(|db| db.register(mailbox(n), &peer(n), None, 0))
                .unwrap();
        }
        let stranger = depositor(66, STRANGER_IP);
        assert!(stored(&deposit(
            &mut store,
            1,
            &stranger,
            &[env(1, 10), env(2, 10)]
        )));
        assert!(stored(&deposit(
            &mut store,
            2,
            &stranger,
            &[env(3, 10), env(4, 10)]
        )));
        let out = deposit(&mut store, 3, &stranger, &[env(5, 10)]);
        assert!(
            matches!(
                out,
                DepositOutcome::Full(Full::Depositor {
                    quota: QuotaKind::Peer,
                    waiting: 4,
                    max: 4,
                    ..
                })
            ),
            "{out:?}"
        );
        assert!(stored(&deposit(
            &mut store,
            3,
            &stranger_friend(),
            &[env(5, 10)]
        )));
    }

    /// Someone else than the stranger, elsewhere.
    fn stranger_friend() -> Depositor {
        depositor(7, FRIEND_IP)
    }

    #[test]
    fn fresh_peer_ids_from_one_address_share_its_quotas() {
        // Per mailbox: 5 from one address, whatever its peer ids.
        let mut store = registered(quotas(
            envelopes(2),
            Quota::UNLIMITED,
            envelopes(5),
            Quota::UNLIMITED,
        ));
        let mut accepted = 0;
        let mut refused = None;
        for n in 0..20u8 {
            let sybil = depositor(100 + n, STRANGER_IP);
            match deposit(&mut store, 1, &sybil, &[env(u32::from(n), 10)]) {
                DepositOutcome::Stored { .. } => accepted += 1,
                DepositOutcome::Full(full) => refused = refused.or(Some(full)),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(accepted, 5);
        assert!(
            matches!(
                refused,
                Some(Full::Depositor {
                    quota: QuotaKind::IpPerMailbox,
                    ..
                })
            ),
            "{refused:?}"
        );
        assert!(stored(&deposit(
            &mut store,
            1,
            &stranger_friend(),
            &[env(99, 10)]
        )));

        // In all mailboxes: 6 from one address.
        let mut store = Store::open_in_memory(quotas(
            Quota::UNLIMITED,
            Quota::UNLIMITED,
            Quota::UNLIMITED,
            envelopes(6),
        ))
        .unwrap();
        for n in 1..=3 {
            store
                .with_txn(|db| db.register(mailbox(n), &peer(n), None, 0))
                .unwrap();
        }
        let mut accepted = 0;
        for n in 0..12u8 {
            let sybil = depositor(100 + n, STRANGER_IP);
            let out = deposit(&mut store, 1 + n % 3, &sybil, &[env(u32::from(n), 10)]);
            match out {
                DepositOutcome::Stored { .. } => accepted += 1,
                DepositOutcome::Full(Full::Depositor {
                    quota: QuotaKind::Ip,
                    ..
                }) => {}
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(accepted, 6);
        assert!(stored(&deposit(
            &mut store,
            1,
            &stranger_friend(),
            &[env(99, 10)]
        )));
    }

    #[test]
    fn shares_are_released_by_acks_expiry_and_removed_mailboxes() {
        let mut store = registered(quotas(
            envelopes(100),
            envelopes(100),
            envelopes(100),
            envelopes(100),
        ));
        store
            .with_txn(|db| db.register(mailbox(2), &peer(2), None, 0))
            .unwrap();
        let a = depositor(66, STRANGER_IP);
        let b = depositor(67, STRANGER_IP);
        let usage = |store: &mut Store, who: &Depositor, mb: Option<u8>| {
            store
                .with_txn(|db| db.depositor_usage(who, mb.map(mailbox)))
                .unwrap()
        };
        store
            .with_txn(|db| db.deposit(mailbox(1), &a, &[env(1, 10), env(2, 10)], 0))
            .unwrap();
        store
            .with_txn(|db| db.deposit(mailbox(1), &b, &[env(3, 10)], 50_000))
            .unwrap();
        store
            .with_txn(|db| db.deposit(mailbox(2), &a, &[env(4, 10)], 0))
            .unwrap();
        assert_eq!(usage(&mut store, &a, None), ((3, 30), (4, 40)));
        assert_eq!(usage(&mut store, &a, Some(1)), ((2, 20), (3, 30)));
        // Ack of the first envelope of mailbox 1.
        let first = fetch_all(&mut store, 1)[0].0;
        store.with_txn(|db| db.ack(&peer(1), first, 1)).unwrap();
        assert_eq!(usage(&mut store, &a, None), ((2, 20), (3, 30)));
        assert_eq!(usage(&mut store, &a, Some(1)), ((1, 10), (2, 20)));
        // Expiry (ttl 100 s) takes a's remaining mail, not b's (later).
        store.with_txn(|db| db.expire(120_000, 100)).unwrap();
        assert_eq!(usage(&mut store, &a, None), ((0, 0), (1, 10)));
        assert_eq!(usage(&mut store, &b, None), ((1, 10), (1, 10)));
        // Mailbox 1 re-registered under another id by its peer: removed.
        store
            .with_txn(|db| db.register(mailbox(9), &peer(1), None, 130_000))
            .unwrap();
        assert_eq!(usage(&mut store, &b, None), ((0, 0), (0, 0)));
        assert_eq!(usage(&mut store, &a, Some(1)), ((0, 0), (0, 0)));
        // Nothing is left counted but what is waiting.
        let rows: i64 = store
            .with_txn(|db| {
                Ok(db
                    .conn
                    .query_row("SELECT count(*) FROM depositor_usage", [], |r| r.get(0))?)
            })
            .unwrap();
        assert_eq!(rows, 0, "rows at zero are deleted");
    }

    #[test]
    fn a_version_1_database_keeps_its_mail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(MIGRATIONS[0].1).unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
            conn.execute(
                "INSERT INTO mailboxes (id, peer, registered_at, last_seen, envelopes, bytes)
                 VALUES (?1, ?2, 0, 0, 2, 20)",
                params![&mailbox(1).0[..], peer(1).to_bytes()],
            )
            .unwrap();
            for n in 0..2 {
                let e = env(n, 10);
                conn.execute(
                    "INSERT INTO mail (mailbox, envelope_id, envelope, size, stored_at)
                     VALUES (?1, ?2, ?3, 10, 0)",
                    params![&mailbox(1).0[..], &envelope_id(&e)[..], e],
                )
                .unwrap();
            }
        }
        let mut store = Store::open(
            &path,
            quotas(
                envelopes(1),
                Quota::UNLIMITED,
                Quota::UNLIMITED,
                Quota::UNLIMITED,
            ),
        )
        .unwrap();
        let items = fetch_all(&mut store, 1);
        assert_eq!(
            items.iter().map(|(_, e)| e.clone()).collect::<Vec<_>>(),
            vec![env(0, 10), env(1, 10)]
        );
        // Old mail counts against no depositor; new mail does.
        let stranger = depositor(66, STRANGER_IP);
        assert!(stored(&deposit(&mut store, 1, &stranger, &[env(5, 10)])));
        assert!(!stored(&deposit(&mut store, 1, &stranger, &[env(6, 10)])));
        let out = store.with_txn(|db| db.ack(&peer(1), u64::MAX, 1)).unwrap();
        assert_eq!(out, AckOutcome::Acked { deleted: 3 });
        assert_eq!(
            store
                .with_txn(|db| db.depositor_usage(&stranger, None))
                .unwrap(),
            ((0, 0), (0, 0))
        );
        assert_eq!(store.totals().envelopes, 0);
    }
}

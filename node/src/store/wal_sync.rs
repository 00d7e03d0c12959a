//! Makes commits durable off the caller's thread.
//!
//! A commit in WAL mode with `synchronous=NORMAL` writes its frames to the
//! `-wal` file without an fsync: it survives a crash of the process, not a
//! power loss. An fsync of the `-wal` file afterwards makes every commit
//! written before it durable — on any descriptor of the file, since fsync
//! flushes the file (the inode), not the descriptor. This thread does that
//! fsync on request, coalescing requests that arrive while one runs, so
//! the node's thread never blocks on the disk for what it only has to
//! promise later (delivered receipts).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;

use tokio::sync::oneshot;

/// Most fsync requests waiting at once.
const QUEUE: usize = 1024;

type Done = oneshot::Sender<Result<(), String>>;

/// A handle to the fsync thread of one database file.
#[derive(Clone, Debug)]
pub struct WalSyncer {
    tx: std_mpsc::SyncSender<Done>,
}

impl WalSyncer {
    /// Starts the thread for the database at `db_path` (its WAL is
    /// `<db_path>-wal`). The thread ends when every handle is dropped.
    pub fn start(db_path: &Path) -> std::io::Result<Self> {
        let mut wal = db_path.as_os_str().to_owned();
        wal.push("-wal");
        let wal = PathBuf::from(wal);
        let (tx, rx) = std_mpsc::sync_channel::<Done>(QUEUE);
        std::thread::Builder::new()
            .name("weft-wal-sync".into())
            .spawn(move || run(&wal, rx))?;
        Ok(Self { tx })
    }

    /// Asks for every commit made so far to be made durable; the answer
    /// comes once it is.
    pub fn request(&self) -> oneshot::Receiver<Result<(), String>> {
        let (done, rx) = oneshot::channel();
        if let Err(e) = self.tx.try_send(done) {
            let done = match e {
                std_mpsc::TrySendError::Full(d) | std_mpsc::TrySendError::Disconnected(d) => d,
            };
            let _ = done.send(Err("the fsync queue is full or gone".into()));
        }
        rx
    }
}

fn run(wal: &Path, rx: std_mpsc::Receiver<Done>) {
    let mut file: Option<File> = None;
    while let Ok(first) = rx.recv() {
        // Everything queued meanwhile is covered by the same fsync.
        let mut waiting = vec![first];
        while let Ok(more) = rx.try_recv() {
            waiting.push(more);
        }
        let result = sync(wal, &mut file).map_err(|e| format!("fsync {}: {e}", wal.display()));
        for done in waiting {
            let _ = done.send(result.clone());
        }
    }
}

fn sync(wal: &Path, file: &mut Option<File>) -> std::io::Result<()> {
    if file.is_none() {
        *file = Some(File::open(wal)?);
    }
    match file {
        Some(f) => f.sync_data(),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Durability, Store};

    #[tokio::test]
    async fn requests_are_answered_after_an_fsync() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("weft.db");
        let mut store = Store::open(&path).unwrap();
        let txn = store.transaction_with(Durability::Normal).unwrap();
        txn.db().set_meta("k", b"v").unwrap();
        txn.commit().unwrap();
        let syncer = WalSyncer::start(&path).unwrap();
        let answers: Vec<_> = (0..5).map(|_| syncer.request()).collect();
        for a in answers {
            assert_eq!(a.await.unwrap(), Ok(()));
        }
    }

    #[tokio::test]
    async fn a_missing_wal_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let syncer = WalSyncer::start(&dir.path().join("nothing.db")).unwrap();
        assert!(syncer.request().await.unwrap().is_err());
    }
}

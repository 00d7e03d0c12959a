//! A node's home directory: where one device keeps everything. Owns the
//! layout (key file, database, control socket, lock) and the key file.
//!
//! Secrets never leave the home: the key file and the database are
//! created 0600 and the directory 0700, and a home or key file that other
//! users can read or write is refused (with the `chmod` that fixes it):
//! they could read the keys, or reach the control socket and act as us.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::error::NodeError;
use crate::identity::{DeviceCertificate, Identity, SecretKeys, validate_name};
use crate::store::Store;
use crate::store::meta;

const KEY_FILE: &str = "identity.key";
const KEY_FILE_VERSION: u8 = 2;
/// Room for an encoded key file (it takes about 300 bytes).
const KEY_FILE_MAX_BYTES: usize = 1024;
const DB_FILE: &str = "weft.db";
const SOCKET_FILE: &str = "weft.sock";
const LOCK_FILE: &str = "node.lock";
/// Mode bits that let the group or others read, write or enter.
const OPEN_TO_OTHERS: u32 = 0o077;

#[derive(Serialize, Deserialize)]
struct KeyFile {
    version: u8,
    secrets: SecretKeys,
    certificate: DeviceCertificate,
}

/// The key file of protocol 1 (no account key; a certificate without the
/// device's consent): read once, to upgrade it.
#[derive(Deserialize, zeroize::Zeroize, zeroize::ZeroizeOnDrop)]
struct KeyFileV1 {
    version: u8,
    user: Option<[u8; 32]>,
    device: [u8; 32],
    device_dh: [u8; 32],
}

/// The layout of one device's home directory.
#[derive(Clone, Debug)]
pub struct Home {
    dir: PathBuf,
}

/// Held while a process owns the home (a daemon, or a one-off command).
#[derive(Debug)]
pub struct HomeLock {
    _file: File,
}

impl Home {
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn key_path(&self) -> PathBuf {
        self.dir.join(KEY_FILE)
    }

    pub fn db_path(&self) -> PathBuf {
        self.dir.join(DB_FILE)
    }

    pub fn socket_path(&self) -> PathBuf {
        self.dir.join(SOCKET_FILE)
    }

    pub fn is_initialized(&self) -> bool {
        self.key_path().exists()
    }

    /// Creates a new account and device here. Refuses if an identity
    /// exists: keys are never overwritten.
    pub fn init(&self, name: &str) -> Result<crate::api::IdView, NodeError> {
        validate_name(name)?;
        let identity = Identity::generate(crate::now_ms())?;
        self.init_with(&identity, name)
    }

    /// Creates the home with a given identity (tests and simulations use
    /// seeded ones).
    pub fn init_with(
        &self,
        identity: &Identity,
        name: &str,
    ) -> Result<crate::api::IdView, NodeError> {
        validate_name(name)?;
        self.write_key_file(identity)?;
        let store = Store::open(&self.db_path())?;
        store.db().set_meta(meta::NAME, name.as_bytes())?;
        let invite = identity.invite(
            name,
            vec![identity.certificate().clone()],
            Vec::new(),
            crate::now_ms(),
        )?;
        Ok(crate::api::IdView {
            user_id: identity.user_id().to_string(),
            device_id: identity.device_id().to_string(),
            peer_id: identity.peer_id().to_string(),
            name: name.to_string(),
            invite,
        })
    }

    /// Creates the directory (0700) if it is missing; refuses an existing
    /// one that others can read or write: keys are never put there.
    pub fn create_dir(&self) -> Result<(), NodeError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)?;
        require_private(&self.dir, 0o700)
    }

    /// Refuses a home directory or key file that others can read or write.
    pub fn check_private(&self) -> Result<(), NodeError> {
        let not_found = |e: NodeError| match e {
            NodeError::Io(io) if io.kind() == std::io::ErrorKind::NotFound => {
                NodeError::NotInitialized(self.dir.clone())
            }
            e => e,
        };
        require_private(&self.dir, 0o700).map_err(not_found)?;
        require_private(&self.key_path(), 0o600).map_err(not_found)
    }

    /// Writes the key file (0600, never over an existing one).
    fn write_key_file(&self, identity: &Identity) -> Result<(), NodeError> {
        self.create_dir()?;
        self.write_key_file_at(&self.key_path(), identity)
    }

    fn write_key_file_at(&self, path: &Path, identity: &Identity) -> Result<(), NodeError> {
        let key_file = KeyFile {
            version: KEY_FILE_VERSION,
            secrets: identity.secrets(),
            certificate: identity.certificate().clone(),
        };
        // Encoded into one buffer of fixed size, wiped when dropped (a
        // growing Vec would leave copies of the secrets behind).
        let mut buffer = Zeroizing::new([0u8; KEY_FILE_MAX_BYTES]);
        let bytes = postcard::to_slice(&key_file, buffer.as_mut_slice())
            .map_err(|_| NodeError::Corrupt("key file".into()))?;
        // create_new: an existing key file is never replaced.
        let mut file = match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(NodeError::AlreadyInitialized(self.dir.clone()));
            }
            Err(e) => return Err(e.into()),
        };
        file.write_all(bytes)?;
        file.sync_all()?;
        Ok(())
    }

    /// Creates the home of a device linked to an existing account: it has
    /// no user key, and shows the account's `invite` (signed by the user
    /// key on the linking device).
    pub fn init_linked(
        &self,
        identity: &Identity,
        name: &str,
        invite: &str,
    ) -> Result<crate::api::IdView, NodeError> {
        validate_name(name)?;
        self.write_key_file(identity)?;
        let store = Store::open(&self.db_path())?;
        store.db().set_meta(meta::NAME, name.as_bytes())?;
        store
            .db()
            .set_meta(meta::ACCOUNT_INVITE, invite.as_bytes())?;
        Ok(crate::api::IdView {
            user_id: identity.user_id().to_string(),
            device_id: identity.device_id().to_string(),
            peer_id: identity.peer_id().to_string(),
            name: name.to_string(),
            invite: invite.to_string(),
        })
    }

    /// Loads this device's identity, from a private home only.
    pub fn load_identity(&self) -> Result<Identity, NodeError> {
        self.check_private()?;
        let bytes = match fs::read(self.key_path()) {
            Ok(b) => Zeroizing::new(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(NodeError::NotInitialized(self.dir.clone()));
            }
            Err(e) => return Err(e.into()),
        };
        if bytes.first() == Some(&1) {
            return self.upgrade_key_file_v1(&bytes);
        }
        let key_file: KeyFile =
            postcard::from_bytes(&bytes).map_err(|_| NodeError::Corrupt("key file".into()))?;
        if key_file.version != KEY_FILE_VERSION {
            return Err(NodeError::Corrupt(format!(
                "key file version {}",
                key_file.version
            )));
        }
        Ok(Identity::from_secrets(
            &key_file.secrets,
            Some(key_file.certificate),
            0,
        )?)
    }

    /// Upgrades a protocol 1 key file in place (see
    /// [`Identity::upgrade_v1`]): the new file is written beside it and
    /// renamed over it, so a crash leaves one or the other whole.
    fn upgrade_key_file_v1(&self, bytes: &[u8]) -> Result<Identity, NodeError> {
        // Only the secrets are read: the old certificate that follows is
        // replaced by a new one.
        let (old, _certificate): (KeyFileV1, &[u8]) = postcard::take_from_bytes(bytes)
            .map_err(|_| NodeError::Corrupt("key file (version 1)".into()))?;
        let identity = Identity::upgrade_v1(old.user, old.device, old.device_dh, crate::now_ms())?;
        let next = self.dir.join("identity.key.v2");
        let _ = fs::remove_file(&next);
        self.write_key_file_at(&next, &identity)?;
        fs::rename(&next, self.key_path())?;
        File::open(&self.dir)?.sync_all()?;
        tracing::info!("upgraded the key file to protocol 2");
        Ok(identity)
    }

    /// Takes the home for this process: one process at a time writes it,
    /// so two never advance the same key chain.
    pub fn lock(&self) -> Result<HomeLock, NodeError> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(self.dir.join(LOCK_FILE))?;
        match file.try_lock() {
            Ok(()) => Ok(HomeLock { _file: file }),
            Err(fs::TryLockError::WouldBlock) => Err(NodeError::Locked(self.dir.clone())),
            Err(fs::TryLockError::Error(e)) => Err(e.into()),
        }
    }
}

/// Refuses `path` if the group or others may read, write or enter it;
/// the error names the `chmod` (to `fix`) that makes it private.
pub(crate) fn require_private(path: &Path, fix: u32) -> Result<(), NodeError> {
    let mode = fs::metadata(path)?.permissions().mode() & 0o7777;
    if mode & OPEN_TO_OTHERS == 0 {
        return Ok(());
    }
    Err(NodeError::NotPrivate {
        path: path.to_path_buf(),
        mode,
        fix,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn init_refuses_to_overwrite_and_keys_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::new(dir.path().join("alice"));
        assert!(!home.is_initialized());
        let id = home.init("Alice").unwrap();
        assert!(matches!(
            home.init("Alice"),
            Err(NodeError::AlreadyInitialized(_))
        ));
        let loaded = home.load_identity().unwrap();
        assert_eq!(loaded.user_id().to_string(), id.user_id);
        let mode = fs::metadata(home.key_path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let mode = fs::metadata(home.db_path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    /// A key file of protocol 1, as that version wrote it.
    fn v1_key_file(user: Option<[u8; 32]>, device: [u8; 32], device_dh: [u8; 32]) -> Vec<u8> {
        #[derive(Serialize)]
        struct Secrets(Option<[u8; 32]>, [u8; 32], [u8; 32]);
        #[derive(Serialize)]
        struct Certificate(
            [u8; 32],
            [u8; 32],
            [u8; 32],
            i64,
            #[serde(with = "crate::identity::sig_bytes")] [u8; 64],
        );
        postcard::to_stdvec(&(
            1u8,
            Secrets(user, device, device_dh),
            Certificate([0; 32], device, [0; 32], 5, [7; 64]),
        ))
        .unwrap()
    }

    #[test]
    fn a_protocol_1_key_file_is_upgraded_where_the_user_key_is() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::new(dir.path().join("alice"));
        home.create_dir().unwrap();
        let (user, device, dh) = ([1; 32], [2; 32], [3; 32]);
        fs::write(home.key_path(), v1_key_file(Some(user), device, dh)).unwrap();
        fs::set_permissions(home.key_path(), fs::Permissions::from_mode(0o600)).unwrap();
        let upgraded = home.load_identity().unwrap();
        upgraded.certificate().verify().unwrap();
        assert_eq!(upgraded.secrets().device, device);
        // Written back: the next load reads version 2 and the same keys.
        let again = home.load_identity().unwrap();
        assert_eq!(again.certificate(), upgraded.certificate());
        assert_eq!(again.secrets().account_dh, upgraded.secrets().account_dh);
        let mode = fs::metadata(home.key_path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn a_device_linked_under_protocol_1_is_told_to_link_again() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::new(dir.path().join("phone"));
        home.create_dir().unwrap();
        fs::write(home.key_path(), v1_key_file(None, [2; 32], [3; 32])).unwrap();
        fs::set_permissions(home.key_path(), fs::Permissions::from_mode(0o600)).unwrap();
        let err = home.load_identity().unwrap_err().to_string();
        assert!(err.contains("link it again"), "{err}");
    }

    #[test]
    fn lock_is_exclusive() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::new(dir.path().to_path_buf());
        let first = home.lock().unwrap();
        assert!(matches!(home.lock(), Err(NodeError::Locked(_))));
        drop(first);
        assert!(home.lock().is_ok());
    }
}

//! The whole relay, started and stopped as one: identity key, store
//! thread, expiry sweeper, UnifiedPush sender, swarm task and metrics
//! server.
//!
//! [`Relay::start`] returns once the relay accepts requests (the moment
//! `main` prints the ready line). [`Relay::shutdown`] drains: it refuses
//! new requests, answers those in flight, commits what the store holds,
//! and stops every task.

use std::fs::{DirBuilder, OpenOptions, Permissions};
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use libp2p::identity::{KeyType, Keypair};
use libp2p::{Multiaddr, PeerId};
use prometheus_client::registry::Registry;
use tokio::sync::oneshot;

use crate::config::{Config, ConfigError, DEFAULT_METRICS};
use crate::metrics::{Health, MetricsError, MetricsServer, RelayMetrics};
use crate::net::{self, NetError, NetHandle};
use crate::service::{Service, ServiceConfig, ServiceError};
use crate::store::{Store, StoreError, StoreHandle};
use crate::wakeup::{HttpWaker, HttpWakerConfig};

/// The relay's identity key file in the data directory.
pub const KEY_FILE: &str = "relay.key";
/// The relay's database in the data directory.
pub const DB_FILE: &str = "relay.db";

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("bad configuration: {0}")]
    Config(#[from] ConfigError),
    #[error("cannot use the data directory {0}: {1}")]
    DataDir(PathBuf, std::io::Error),
    #[error("the key file {0}: {1}")]
    Key(PathBuf, String),
    #[error("storage: {0}")]
    Store(#[from] StoreError),
    #[error("network: {0}")]
    Net(#[from] NetError),
    #[error("metrics server: {0}")]
    Metrics(#[from] MetricsError),
    #[error("mailbox service: {0}")]
    Service(#[from] ServiceError),
}

/// A running relay.
#[derive(Debug)]
pub struct Relay {
    peer_id: PeerId,
    listen: Vec<Multiaddr>,
    metrics: RelayMetrics,
    store: StoreHandle,
    net: NetHandle,
    net_task: tokio::task::JoinHandle<()>,
    sweeper: (oneshot::Sender<()>, tokio::task::JoinHandle<()>),
    metrics_server: Option<MetricsServer>,
    draining: Arc<AtomicBool>,
}

impl Relay {
    /// Starts a relay keeping its key and database in `data_dir`.
    pub async fn start(config: &Config, data_dir: &Path) -> Result<Relay, RelayError> {
        config.check()?;
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(data_dir)
            .map_err(|e| RelayError::DataDir(data_dir.to_path_buf(), e))?;
        let key = load_or_create_key(&data_dir.join(KEY_FILE))?;
        let peer_id = key.public().to_peer_id();

        let mut registry = Registry::default();
        let metrics = RelayMetrics::register(&mut registry);
        let store = Store::open(&data_dir.join(DB_FILE), config.store_limits())?;
        let store = StoreHandle::spawn(store, metrics.clone())?;

        let service = Service::new(
            peer_id,
            ServiceConfig {
                access: config.access()?,
                requests_per_sec: config.limits.requests_per_sec,
                request_burst: config.limits.request_burst,
                allow_private_wakeup: config.wakeup.allow_private_hosts,
                ..ServiceConfig::default()
            },
            store.clone(),
            metrics.clone(),
        );
        let service = match service {
            Ok(service) => service,
            Err(e) => {
                store.close().await;
                return Err(e.into());
            }
        };
        let waker = config.wakeup.http.then(|| {
            HttpWaker::spawn(
                HttpWakerConfig {
                    timeout: Duration::from_secs(config.wakeup.timeout_secs),
                    concurrency: config.wakeup.concurrency,
                    allow_private: config.wakeup.allow_private_hosts,
                },
                metrics.clone(),
            )
        });
        let started = match net::start(key, config, service, waker, &mut registry).await {
            Ok(started) => started,
            Err(e) => {
                store.close().await;
                return Err(e.into());
            }
        };

        let (stop, stopped) = oneshot::channel();
        let interval = Duration::from_secs(config.storage.sweep_interval_secs);
        let sweeper = tokio::spawn(sweep(store.clone(), interval, stopped));

        let draining = Arc::new(AtomicBool::new(false));
        let registry = Arc::new(registry);
        let metrics_server = match config.metrics_addr()? {
            Some(addr) => {
                let health = Health {
                    store: store.clone(),
                    draining: draining.clone(),
                };
                match MetricsServer::start(&addr.to_string(), registry, health).await {
                    Ok(server) => Some(server),
                    // The default address is taken (another relay on this
                    // machine, a test): serve mail without metrics rather
                    // than not at all. A configured address must work.
                    Err(e) if config.metrics == DEFAULT_METRICS => {
                        tracing::warn!("no /metrics: {e}; set `metrics` to serve them");
                        None
                    }
                    Err(e) => {
                        started.handle.shutdown().await;
                        let _ = stop.send(());
                        store.close().await;
                        return Err(e.into());
                    }
                }
            }
            None => None,
        };
        tracing::info!(%peer_id, "weft-relay is ready");
        Ok(Relay {
            peer_id,
            listen: started.listen,
            metrics,
            store,
            net: started.handle,
            net_task: started.task,
            sweeper: (stop, sweeper),
            metrics_server,
            draining,
        })
    }

    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// The addresses it listens on (ports resolved).
    pub fn listen(&self) -> &[Multiaddr] {
        &self.listen
    }

    /// Where `/metrics` and `/healthz` are served, if they are.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_server.as_ref().map(|m| m.addr)
    }

    pub fn metrics(&self) -> &RelayMetrics {
        &self.metrics
    }

    pub fn store(&self) -> &StoreHandle {
        &self.store
    }

    /// Drains and stops: refuses new requests, answers the ones in
    /// flight, commits the store and stops every task.
    pub async fn shutdown(self) {
        self.draining.store(true, Ordering::Relaxed);
        tracing::info!("draining");
        self.net.shutdown().await;
        let _ = self.net_task.await;
        let _ = self.sweeper.0.send(());
        let _ = self.sweeper.1.await;
        self.store.close().await;
        if let Some(server) = self.metrics_server {
            server.stop().await;
        }
        tracing::info!("stopped");
    }
}

/// Removes expired mail and mailboxes every `interval` (and at start).
async fn sweep(store: StoreHandle, interval: Duration, mut stop: oneshot::Receiver<()>) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tick.tick() => {}
        }
        let (mut envelopes, mut mailboxes) = (0, 0);
        loop {
            match store.expire(crate::now_ms()).await {
                Ok(e) => {
                    envelopes += e.envelopes;
                    mailboxes += e.mailboxes;
                    if !e.more {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!("expiry sweep failed: {e}");
                    break;
                }
            }
        }
        if envelopes > 0 || mailboxes > 0 {
            tracing::info!(envelopes, mailboxes, "expired");
        }
    }
}

/// Loads the relay's ed25519 key from `path`, or creates it (mode 0600)
/// if there is none.
pub fn load_or_create_key(path: &Path) -> Result<Keypair, RelayError> {
    let key_err = |e: &dyn std::fmt::Display| RelayError::Key(path.to_path_buf(), e.to_string());
    match std::fs::read(path) {
        Ok(bytes) => {
            let mode = std::fs::metadata(path)
                .map_err(|e| key_err(&e))?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                tracing::warn!(path = %path.display(), "the key file was readable by others; now 0600");
                std::fs::set_permissions(path, Permissions::from_mode(0o600))
                    .map_err(|e| key_err(&e))?;
            }
            let key = Keypair::from_protobuf_encoding(&bytes).map_err(|e| key_err(&e))?;
            if key.key_type() != KeyType::Ed25519 {
                return Err(key_err(&"not an ed25519 key"));
            }
            Ok(key)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = Keypair::generate_ed25519();
            let bytes = key.to_protobuf_encoding().map_err(|e| key_err(&e))?;
            // Written whole under a temporary name, then renamed: a crash
            // never leaves a truncated key.
            let tmp = path.with_extension("key.tmp");
            let _ = std::fs::remove_file(&tmp);
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(|e| key_err(&e))?;
            file.write_all(&bytes).map_err(|e| key_err(&e))?;
            file.sync_all().map_err(|e| key_err(&e))?;
            std::fs::rename(&tmp, path).map_err(|e| key_err(&e))?;
            if let Some(dir) = path.parent()
                && let Ok(dir) = std::fs::File::open(dir)
            {
                let _ = dir.sync_all();
            }
            tracing::info!(path = %path.display(), "created the relay's identity key");
            Ok(key)
        }
        Err(e) => Err(key_err(&e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_created_private_once_and_then_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(KEY_FILE);
        let a = load_or_create_key(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let b = load_or_create_key(&path).unwrap();
        assert_eq!(a.public(), b.public());
        std::fs::write(&path, b"garbage").unwrap();
        assert!(load_or_create_key(&path).is_err());
    }
}

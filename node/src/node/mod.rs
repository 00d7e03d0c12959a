//! The node: one device's engine task, and the cloneable [`NodeHandle`]
//! through which the CLI, the control socket, tests and simulations reach
//! it.
//!
//! The engine task owns the store and all key state; the network task owns
//! the swarm. Requests reach the engine over a bounded channel and are
//! answered through a oneshot once their writes are committed.

mod engine;
mod join;

pub use engine::{
    ChainHave, DirectRequest, DirectResponse, HistoryCursor, HistoryRequest, Share, SyncRequest,
};
pub use join::link_device;

pub use crate::error::NodeError;
pub use crate::now_ms;

use std::path::PathBuf;
use std::time::Duration;

use libp2p::{Multiaddr, PeerId};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::api::{ApiError, Event, Request, Response};
use crate::home::Home;
use crate::net::{NetConfig, NetHandle};

/// Bound of the request queue into the engine.
pub const REQUEST_CAPACITY: usize = 1024;
/// How many events a slow `watch` subscriber may lag before it skips.
pub const EVENT_BACKLOG: usize = 4096;

/// How to start a node.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub home: PathBuf,
    /// `None`: offline, local state only; `send` queues durably and the
    /// next daemon sends.
    pub network: Option<NetConfig>,
    pub settings: Settings,
}

impl NodeConfig {
    pub fn new(home: impl Into<PathBuf>, network: Option<NetConfig>) -> Self {
        Self {
            home: home.into(),
            network,
            settings: Settings::default(),
        }
    }
}

/// Timings and limits of delivery, presence and sync (config.toml).
#[derive(Clone, Debug)]
pub struct Settings {
    /// How often presence heartbeats go to connected contacts.
    pub heartbeat: Duration,
    /// How long a typing indicator lasts unless renewed.
    pub typing_ttl: Duration,
    /// How long an unacknowledged envelope is retried before it is given up.
    pub outbox_expiry: Duration,
    /// First retry delay; each retry doubles it (with jitter), up to
    /// `retry_max`.
    pub retry_base: Duration,
    pub retry_max: Duration,
    /// How often each conversation is compared with a connected member
    /// (besides on every connection).
    pub sync_interval: Duration,
    /// Groups larger than this send no read receipts.
    pub read_receipts_max_group: usize,
    /// Delivered receipts leave at most once per `receipt_delay`: a
    /// message after a quiet spell is acknowledged at once; those stored
    /// within the delay of the last receipts wait for it and travel
    /// together, so a burst costs one signed receipt (and one fsync) per
    /// delay instead of one per message. A node that stops sends what is
    /// waiting.
    pub receipt_delay: Duration,
    /// How long the key of a message skipped in a sender's chain (one that
    /// arrived out of order, or not yet) is kept for it; also how long a
    /// sender's chain of an earlier epoch is kept once a newer one is here.
    /// After that the message can no longer be read: the key is gone, as
    /// forward secrecy needs.
    pub skipped_key_max_age: Duration,
    /// How long this device's handout key (what others seal key handouts
    /// to) is used before a new one replaces it. A replaced one is erased
    /// `skipped_key_max_age` later.
    pub handout_key_rotation: Duration,
    /// How many one-time handout keys this device keeps issued to each
    /// device it shares a conversation with (at most
    /// `identity::MAX_ONE_TIME_KEYS`; 0 issues none, and key handouts to
    /// this device are then sealed to its handout key).
    pub one_time_keys: usize,
    /// How much of the queue of envelopes that cannot be placed yet one
    /// delivering peer, one claimed sender, and all of them may fill
    /// (engine.rs, `PENDING_CAPS`, says why the defaults).
    pub pending_caps: crate::store::PendingCaps,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_secs(30),
            typing_ttl: Duration::from_secs(5),
            outbox_expiry: Duration::from_secs(30 * 24 * 3600),
            retry_base: Duration::from_secs(2),
            retry_max: Duration::from_secs(600),
            sync_interval: Duration::from_secs(60),
            read_receipts_max_group: 256,
            // Short enough that nobody watching a status notices.
            receipt_delay: Duration::from_millis(2),
            skipped_key_max_age: Duration::from_secs(30 * 24 * 3600),
            handout_key_rotation: Duration::from_secs(7 * 24 * 3600),
            one_time_keys: 4,
            pending_caps: engine::PENDING_CAPS,
        }
    }
}

pub(crate) enum Command {
    Api {
        request: Request,
        /// This node's listen addresses, for invites.
        listen: Vec<Multiaddr>,
        reply: oneshot::Sender<Result<Response, ApiError>>,
    },
    /// Envelopes from outside the network task (a relay mailbox, a test):
    /// validated and stored like directly sent ones. Replies how many were
    /// accepted.
    Deliver {
        envelopes: Vec<Vec<u8>>,
        reply: oneshot::Sender<u32>,
    },
    Shutdown(oneshot::Sender<()>),
}

/// A cloneable handle to a running node.
#[derive(Clone, Debug)]
pub struct NodeHandle {
    tx: mpsc::Sender<Command>,
    events: broadcast::Sender<Event>,
    net: Option<NetHandle>,
    peer_id: PeerId,
}

impl NodeHandle {
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// Runs one API request.
    pub async fn call(&self, request: Request) -> Result<Response, ApiError> {
        let listen = match (&request, &self.net) {
            (Request::Id | Request::Status | Request::DevicesLink, Some(_)) => {
                self.listen_addrs().await
            }
            _ => Vec::new(),
        };
        let status_peers = match (&request, &self.net) {
            (Request::Status, Some(net)) => Some(net.status().await.map_err(NodeError::from)?),
            _ => None,
        };
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Api {
                request,
                listen,
                reply,
            })
            .await
            .map_err(|_| ApiError::from(NodeError::Stopped))?;
        let mut response = rx.await.map_err(|_| ApiError::from(NodeError::Stopped))??;
        if let (Some(status), Response::Status(view)) = (status_peers, &mut response) {
            // The engine fills what it owns; the network's part is added here
            // so the engine never waits on the network task.
            engine::fill_status(view, &status);
        }
        Ok(response)
    }

    /// Runs one API request and takes its answer as the view it carries:
    /// `let id: IdView = handle.request(Request::Id).await?`.
    pub async fn request<T>(&self, request: Request) -> Result<T, ApiError>
    where
        T: TryFrom<Response, Error = ApiError>,
    {
        self.call(request).await?.try_into()
    }

    /// Hands the node envelopes that came another way (a relay mailbox, a
    /// file, a test). Each is validated like one sent directly by a peer;
    /// returns how many were accepted (new or already held).
    pub async fn deliver(&self, envelopes: Vec<Vec<u8>>) -> Result<u32, NodeError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Deliver { envelopes, reply })
            .await
            .map_err(|_| NodeError::Stopped)?;
        rx.await.map_err(|_| NodeError::Stopped)
    }

    /// Events for `watch`: messages, status changes, membership, peers.
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Where this node listens (empty when offline).
    pub async fn listen_addrs(&self) -> Vec<Multiaddr> {
        match &self.net {
            Some(net) => net.status().await.map(|s| s.listen).unwrap_or_default(),
            None => Vec::new(),
        }
    }
}

/// A running node: the engine task and, when online, the network task.
#[derive(Debug)]
pub struct Node {
    handle: NodeHandle,
    engine: Option<std::thread::JoinHandle<()>>,
    _lock: crate::home::HomeLock,
}

impl Node {
    /// Opens the home, takes its lock, and starts the tasks.
    pub async fn start(config: NodeConfig) -> Result<Node, NodeError> {
        let home = Home::new(config.home.clone());
        let identity = home.load_identity()?;
        let lock = home.lock()?;
        let store = crate::store::Store::open(&home.db_path())?;
        // One thread per node runs the engine and the network task (with
        // the swarm's connection tasks) on its own single-threaded
        // runtime: the two talk without crossing threads, and SQLite's
        // blocking calls never stall the caller's runtime.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let context = runtime.enter();
        // Relays found through the DHT before are used again from the
        // start: mail may wait there.
        let network = config.network.map(|mut net| {
            for addr in engine::found_relays(&store.db()) {
                let relay = addr.iter().last();
                if !net.relays.iter().any(|r| r.iter().last() == relay) {
                    net.relays.push(addr);
                }
            }
            net
        });
        let relays = network
            .as_ref()
            .map(|n| n.relays.clone())
            .unwrap_or_default();
        let (net, net_events) = match network {
            Some(net_config) => {
                let (handle, events, _join) =
                    crate::net::spawn(identity.libp2p_keypair()?, net_config)?;
                (Some(handle), Some(events))
            }
            None => (None, None),
        };
        let (tx, rx) = mpsc::channel(REQUEST_CAPACITY);
        let (events, _) = broadcast::channel(EVENT_BACKLOG);
        let handle = NodeHandle {
            tx,
            events: events.clone(),
            net: net.clone(),
            peer_id: identity.peer_id(),
        };
        let wal = crate::store::WalSyncer::start(&home.db_path())?;
        let engine = engine::Engine::new(
            identity,
            store,
            net,
            events,
            config.settings,
            Some(wal),
            relays,
        )?;
        drop(context);
        let engine = std::thread::Builder::new()
            .name("weft-engine".into())
            .spawn(move || runtime.block_on(engine.run(rx, net_events)))?;
        Ok(Node {
            handle,
            engine: Some(engine),
            _lock: lock,
        })
    }

    pub fn handle(&self) -> NodeHandle {
        self.handle.clone()
    }

    /// Stops gracefully: the engine finishes and commits the batch it is
    /// in, the network task stops, then the lock is released.
    pub async fn shutdown(mut self) -> Result<(), NodeError> {
        let (tx, rx) = oneshot::channel();
        if self.handle.tx.send(Command::Shutdown(tx)).await.is_ok() {
            let _ = rx.await;
        }
        if let Some(engine) = self.engine.take() {
            // The engine has answered; its thread is about to end.
            let _ = tokio::task::spawn_blocking(move || engine.join()).await;
        }
        Ok(())
    }
}

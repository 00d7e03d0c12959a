//! The engine task: owns the store, the key chains and the in-memory view
//! of conversations, and turns API requests and network events into
//! stored state, envelopes to send, and events.
//!
//! Work arrives in batches: everything ready is handled inside one SQLite
//! transaction (group commit), and only after the commit are replies
//! sent, envelopes published and events emitted. So a reply never claims
//! what the disk does not hold, and nothing leaves the device that a crash
//! could make us reuse a key for.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use libp2p::gossipsub::{MessageAcceptance, MessageId as GossipId};
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, oneshot};

mod account;
mod annotations;
mod devices;
mod expiry;
mod handouts;
mod one_time_keys;
mod presence;
mod receipts;
mod relay;
pub use devices::{HistoryCursor, HistoryRequest};
pub(crate) use devices::{META_ACCOUNT_INVITE, META_HISTORY_NEEDED};
pub(super) use relay::found_relays;
mod sync;

pub use presence::Share;
pub use sync::{ChainHave, SyncRequest};

use super::{Command, NodeError, Settings, now_ms};
use crate::api::{
    ApiError, ContactView, ConversationView, Event, GroupView, IdView, MemberView, MessageView,
    Request, SendView, StatusView,
};
use crate::crypto::CryptoError;
use crate::crypto::chain::{ReceivingChain, SendingChain};
use crate::crypto::envelope::{self, Envelope, Sealing};
use crate::group::{GroupMember, GroupRole, GroupState};
use crate::hlc::{Clock, Hlc};
use crate::home::META_NAME;
use crate::identity::{DeviceCertificate, Identity, Invite, peer_id_of, random_bytes};
use crate::ids::{ConversationId, DeviceId, EnvelopeId, MessageId, RoutingTag, UserId};
use crate::net::{NetCommand, NetEvent, NetHandle, NetStatus, PeerSource};
use crate::payload::{MAX_TEXT_BYTES, Payload, SenderKey, TextMessage};
use crate::routing::Routing;
use crate::store::{
    Binding, Contact, ConversationKind, ConversationRecord, Db, Durability, EnvelopeRecord,
    MessageRecord, MessageStatus, OutboxEntry, Role, Store, StoreError,
};

/// Most inputs handled in one transaction.
const BATCH: usize = 256;
/// Envelopes we could not open yet (waiting for a key), across all
/// conversations: a hostile peer must not fill the disk.
const PENDING_CAP: usize = 10_000;
/// How often the outbox, presence and typing timers are looked at.
const TICK: Duration = Duration::from_secs(1);
/// How long an envelope offered directly counts as in flight to a peer
/// (not offered again by a flush meanwhile).
const IN_FLIGHT: Duration = Duration::from_secs(10);
/// Most outbox entries retried per tick.
const RETRY_BATCH: usize = 512;
/// Most envelopes in one direct request.
const DIRECT_BATCH: usize = 512;
/// Bound of the routing-tag cache (tags of earlier epochs beyond it are
/// read from the store).
const ROUTING_TAGS_CACHE: usize = 65_536;
/// Bound of the receiving-chain cache.
const CHAIN_CACHE: usize = 20_000;

/// What travels on the direct protocol (docs/protocol.md).
#[derive(Debug, Serialize, Deserialize)]
pub enum DirectRequest {
    Envelopes(Vec<Vec<u8>>),
    /// Catch-up: "this is what I hold of the conversation; send what I
    /// lack".
    Sync(SyncRequest),
    /// A presence heartbeat: the sending device is online and will say so
    /// again within `interval_ms`.
    Presence {
        interval_ms: u32,
    },
    /// The sending device's user started (or stopped) typing.
    Typing {
        conversation: ConversationId,
        typing: bool,
    },
    /// A new device brings a link code (`crate::link`).
    Link(crate::link::LinkRequest),
    /// Another device of the account asks for history.
    History(devices::HistoryRequest),
}

#[derive(Debug, Serialize, Deserialize)]
pub enum DirectResponse {
    Ack {
        accepted: u32,
    },
    Refused(String),
    /// The answer to `Sync`: envelopes the asker lacks, in the order to
    /// process them, and whether more remain.
    Envelopes {
        envelopes: Vec<Vec<u8>>,
        more: bool,
    },
    /// The answer to `Link`: the new device's certificate.
    Linked(Box<crate::link::LinkGrant>),
    /// The answer to `History`.
    History(Box<devices::HistoryPage>),
}

/// A conversation as the engine keeps it in memory.
#[derive(Clone, Debug)]
struct Conv {
    id: ConversationId,
    kind: ConversationKind,
    /// The gossip topic and routing tag of the current routing secret
    /// (`crate::routing`); no tag for a conversation made under protocol 1
    /// whose secret is not known yet (it takes no new messages).
    topic: String,
    tag: Option<RoutingTag>,
    /// The group epoch (1 for direct conversations).
    epoch: u64,
    /// The epoch of this device's sending chain (see
    /// `ConversationRecord::key_epoch`).
    key_epoch: u64,
    members: Vec<UserId>,
    /// Shared: a conversation is looked up (and cloned) per message.
    group: Option<Arc<GroupState>>,
    /// Whether this user is (still) a member.
    active: bool,
}

impl Conv {
    /// A one-to-one conversation (or the account's own) as it starts.
    fn direct(id: ConversationId, members: Vec<UserId>, routing: &Routing) -> Self {
        Conv {
            id,
            kind: ConversationKind::Direct,
            topic: routing.topic(),
            tag: Some(routing.tag()),
            epoch: 1,
            key_epoch: 1,
            members,
            group: None,
            active: true,
        }
    }
}

/// Follow-up work, run after the batch's transaction commits.
enum Effect {
    Net(NetCommand),
    Event(Event),
    Reply(
        oneshot::Sender<Result<serde_json::Value, ApiError>>,
        Result<serde_json::Value, ApiError>,
    ),
    Direct {
        peer: PeerId,
        envelopes: Vec<(EnvelopeId, Vec<u8>)>,
    },
    DirectReply(oneshot::Sender<Vec<u8>>, Vec<u8>),
    /// How many delivered envelopes were accepted.
    Accepted(oneshot::Sender<u32>, u32),
    /// A catch-up request; its answer comes back as [`Internal::Synced`].
    Sync {
        peer: PeerId,
        conv: ConversationId,
        request: DirectRequest,
    },
    /// A mailbox request to a relay; its answer comes back as
    /// [`Internal::MailboxReply`].
    Mailbox {
        peer: PeerId,
        request: crate::mailbox::MailboxRequest,
        then: relay::MailboxThen,
    },
    /// A request whose answer does not matter (presence, typing).
    Notify {
        peer: PeerId,
        request: DirectRequest,
    },
    /// A history request to another device of the account; its answer
    /// comes back as [`Internal::History`].
    History {
        peer: PeerId,
        request: devices::HistoryRequest,
    },
}

/// Results of direct sends, fed back into the engine.
enum Internal {
    DirectAck {
        peer: PeerId,
        ids: Vec<EnvelopeId>,
        ok: bool,
    },
    Synced {
        peer: PeerId,
        conv: ConversationId,
        response: Option<DirectResponse>,
    },
    /// Effects that waited for their batch's commit to reach the disk.
    Durable(Vec<Effect>),
    MailboxReply {
        relay: PeerId,
        then: relay::MailboxThen,
        response: Option<crate::mailbox::MailboxResponse>,
    },
    History {
        peer: PeerId,
        response: Option<DirectResponse>,
    },
}

/// How an envelope arrived: decides replay handling and validation.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Via {
    Gossip,
    Direct,
    Pending,
}

/// What counts as a member device having an envelope we sent.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ack {
    /// A flood publish to it, or a direct acknowledgement (control
    /// envelopes and receipts: catch-up covers a lost one).
    Publish,
    /// Its delivered receipt or a direct acknowledgement (messages: retried
    /// until then).
    Receipt,
}

enum Verdict {
    Accept,
    Ignore,
    Reject(&'static str),
}

pub(super) struct Engine {
    /// What the engine knows besides its store and outlets (lent to each
    /// batch).
    state: EngineState,
    store: Store,
    outlets: Outlets,
    internal_rx: Option<mpsc::Receiver<Internal>>,
    /// Makes a commit durable off this thread (none for a store in memory).
    wal: Option<crate::store::WalSyncer>,
    /// Messages stored and not acknowledged yet (at most
    /// `MAX_RECEIPT_IDS`), when their delivered receipts leave, and when
    /// the last ones left (see `Settings::receipt_delay`).
    unacknowledged: Vec<(ConversationId, MessageId)>,
    receipts_due: Option<tokio::time::Instant>,
    acknowledged_at: Option<tokio::time::Instant>,
}

/// A text message sealed and published, not yet stored.
struct SealedText {
    conv: Conv,
    env: Envelope,
    counter: u64,
    early: bool,
    text: String,
    reply_to: Option<MessageId>,
    hlc: Hlc,
}

/// This device's sending chain for one conversation epoch, with how far
/// its counters are reserved on disk.
struct SendingSlot {
    chain: SendingChain,
    /// The disk holds the chain at this counter (committed): counters
    /// below it can never be reused, even after a crash, so envelopes
    /// sealed with them may leave before the batch commits.
    durable_until: u64,
    /// The same, as written in the open transaction.
    reserved_until: u64,
}

/// The member devices of a conversation other than this one, with their
/// DH keys and peer ids: derived from certificates once, used per send.
#[derive(Debug)]
struct Recipients {
    /// Epoch and member count it was computed for.
    fingerprint: (u64, usize),
    devices: Vec<(DeviceId, [u8; 32])>,
    peers: HashSet<PeerId>,
}

/// Bounds of the derived caches.
const RECIPIENTS_CACHE: usize = 4096;
const DEVICE_USERS_CACHE: usize = 16_384;
/// Fewer envelopes than this are checked on this thread alone.
const PARALLEL_VERIFY_MIN: usize = 32;
/// Decoded device keys kept.
const VERIFYING_KEYS: usize = 16_384;
/// Revoked devices held in memory (the store answers for the rest).
const MAX_REVOKED: usize = 4096;

/// How many counters one reservation covers: a crash skips at most this
/// many, which receivers absorb as skipped keys.
const COUNTER_RESERVATION: u64 = 256;

fn role_of(role: GroupRole) -> Role {
    match role {
        GroupRole::Admin => Role::Admin,
        GroupRole::Member => Role::Member,
    }
}

fn role_name(role: GroupRole) -> &'static str {
    match role {
        GroupRole::Admin => "admin",
        GroupRole::Member => "member",
    }
}

impl Engine {
    pub(super) fn new(
        identity: Identity,
        store: Store,
        net: Option<NetHandle>,
        events: broadcast::Sender<Event>,
        settings: Settings,
        wal: Option<crate::store::WalSyncer>,
        relays: Vec<Multiaddr>,
    ) -> Result<Self, NodeError> {
        // Offline, the relays of the last daemon still name this device's
        // mailboxes (for invites made now); online, they are recorded.
        let relays = if net.is_some() {
            relay::remember_relays(&store.db(), &relays);
            relays
        } else {
            relay::last_relays(&store.db())
        };
        let found: HashSet<PeerId> = relay::found_relays(&store.db())
            .iter()
            .filter_map(|a| match a.iter().last() {
                Some(Protocol::P2p(p)) => Some(p),
                _ => None,
            })
            .collect();
        let mut relays: Vec<(PeerId, Multiaddr)> = relays
            .into_iter()
            .filter_map(|a| match a.iter().last() {
                Some(Protocol::P2p(p)) => Some((p, a)),
                _ => None,
            })
            .collect();
        relays.dedup_by_key(|(p, _)| *p);
        let found_relays = found
            .into_iter()
            .filter(|p| relays.iter().any(|(r, _)| r == p))
            .collect();
        let clock = Clock::resume(Hlc(store.db().max_hlc()?));
        let share = store
            .db()
            .get_meta(presence::META_SHARE)?
            .and_then(|b| Share::parse(&String::from_utf8_lossy(&b)))
            .unwrap_or(Share::Contacts);
        let name = store
            .db()
            .get_meta(META_NAME)?
            .and_then(|b| String::from_utf8(b).ok())
            .unwrap_or_else(|| "me".to_string());
        let (internal_tx, internal_rx) = mpsc::channel(1024);
        let net_online = net.is_some();
        let mut engine = Self {
            state: EngineState {
                my_user: identity.user_id(),
                my_device: identity.device_id(),
                identity,
                name,
                convs: HashMap::new(),
                by_topic: HashMap::new(),
                by_tag: HashMap::new(),
                gates_due: Some(tokio::time::Instant::now()),
                sending: HashMap::new(),
                receiving: HashMap::new(),
                dirty_chains: HashSet::new(),
                verifying_keys: HashMap::new(),
                recipients: HashMap::new(),
                device_users: HashMap::new(),
                blocked: HashSet::new(),
                revoked: HashSet::new(),
                connected: HashSet::new(),
                topic_peers: HashMap::new(),
                unreached: HashMap::new(),
                offered: HashMap::new(),
                settings,
                clock,
                share,
                device_by_peer: HashMap::new(),
                presence: HashMap::new(),
                typing: HashMap::new(),
                syncing: HashMap::new(),
                relays,
                found_relays,
                fetching: HashSet::new(),
                mail_cursor: HashMap::new(),
                deposited: HashSet::new(),
                mailboxes: HashMap::new(),
                gaps: HashSet::new(),
                shards: HashMap::new(),
                dirty_shards: HashSet::new(),
                link_codes: Vec::new(),
                history_peer: None,
                account: None,
                account_dirty: false,
                read_positions: HashMap::new(),
                net_online,
            },
            store,
            outlets: Outlets {
                sent_early: std::cell::Cell::new(false),
                net,
                events,
                internal_tx,
            },
            internal_rx: Some(internal_rx),
            wal,
            unacknowledged: Vec::new(),
            receipts_due: None,
            acknowledged_at: None,
        };
        engine.load()?;
        Ok(engine)
    }

    /// Loads conversations and the outbox, subscribes to every active
    /// conversation's topic and dials known peers.
    fn load(&mut self) -> Result<(), NodeError> {
        let db = self.store.db();
        self.state.blocked = db
            .contacts()?
            .into_iter()
            .filter(|c| c.blocked)
            .map(|c| c.user_id)
            .collect();
        // Revocations of devices never certified here were once recorded
        // as revoked devices of whoever signed them: they bind nothing.
        let forgotten = db.forget_uncertified_devices(&self.state.my_device)?;
        if forgotten > 0 {
            tracing::info!(
                forgotten,
                "forgot revocations of devices never certified here"
            );
        }
        self.state.revoked = db.revoked_devices(MAX_REVOKED)?.into_iter().collect();
        if db.device(&self.state.my_device)?.is_some_and(|d| d.revoked) {
            self.state.revoked.insert(self.state.my_device);
        }
        // This device's own certificate (protocol 2 replaced it).
        db.bind_device(
            &self.state.my_device,
            &self.state.my_user,
            &self.state.identity.certificate().to_bytes(),
        )?;
        // Current tags only; earlier epochs' are looked up in the store
        // when an envelope names one.
        let records = db.conversations()?;
        let mut convs = Vec::with_capacity(records.len());
        for mut record in records {
            let members = db
                .members(&record.id)?
                .into_iter()
                .map(|(u, _)| u)
                .collect::<Vec<_>>();
            let group = record
                .state
                .as_deref()
                .and_then(GroupState::decode)
                .map(Arc::new);
            let active = members.contains(&self.state.my_user);
            if record.tag.is_none()
                && record.kind == ConversationKind::Direct
                && let Some(other) = members
                    .iter()
                    .find(|u| **u != self.state.my_user)
                    .or(members.first())
                && let Some(routing) = direct_routing(&self.state.identity, &db, other)?
            {
                // Made under protocol 1: its protocol 2 secret is known now.
                db.set_routing(&record.id, &routing.topic(), &routing.tag())?;
                (record.topic, record.tag) = (routing.topic(), Some(routing.tag()));
            }
            convs.push(Conv {
                id: record.id,
                kind: record.kind,
                topic: record.topic,
                tag: record.tag,
                epoch: record.epoch,
                key_epoch: record.key_epoch,
                members,
                group,
                active,
            });
        }
        // The account's own conversation (its devices' private state), and
        // its document.
        let share = db
            .get_meta(presence::META_SHARE)?
            .map(|_| self.state.share.as_str());
        account::seed_account(&db, &self.state.my_user, &self.state.my_device, share)?;
        let own = account::account_conversation(&self.state.my_user);
        if !convs.iter().any(|c| c.id == own) {
            let (record, conv) = account::new_account_conversation(&self.state.identity)?;
            db.insert_conversation(&record)?;
            db.set_members(&own, &[(self.state.my_user, Role::Member)])?;
            convs.push(conv);
        }
        let outbox = db.outbox_due(i64::MAX, 100_000)?;
        let mut pending_outbox = Vec::new();
        let known = db.known_peers(4096)?;
        for conv in convs {
            if let Some(tag) = conv.tag
                && self.state.by_tag.len() < ROUTING_TAGS_CACHE
            {
                self.state.by_tag.insert(tag, conv.id);
            }
            if conv.active && conv.tag.is_some() {
                self.outlets
                    .net_cmd(NetCommand::Subscribe(conv.topic.clone()));
            }
            self.state.by_topic.insert(conv.topic.clone(), conv.id);
            self.state.convs.insert(conv.id, conv);
        }
        for entry in outbox {
            pending_outbox.push(entry);
        }
        for entry in pending_outbox {
            // Who still lacks it is unknown after a restart: offer it to
            // every member device (receivers deduplicate).
            let peers = self.outbox_targets(&entry.conversation)?;
            self.state
                .unreached
                .insert(entry.envelope_id, (entry.conversation, peers));
        }
        let mut by_peer: HashMap<String, Vec<Multiaddr>> = HashMap::new();
        for (peer, addr) in known {
            if let Ok(addr) = addr.parse::<Multiaddr>() {
                by_peer.entry(peer).or_default().push(addr);
            }
        }
        // Member devices with no known address: the DHT may know them.
        let me = peer_id_of(&self.state.my_device);
        let ids: Vec<ConversationId> = self
            .state
            .convs
            .values()
            .filter(|c| c.active)
            .map(|c| c.id)
            .collect();
        for id in ids {
            for peer in self.outbox_targets(&id)? {
                if peer != me {
                    by_peer.entry(peer.to_string()).or_default();
                }
            }
        }
        for (peer, addrs) in by_peer {
            if let Ok(peer) = peer.parse::<PeerId>() {
                let source = if addrs.is_empty() {
                    PeerSource::Dht
                } else {
                    PeerSource::Manual
                };
                self.outlets.net_cmd(NetCommand::Dial {
                    peer,
                    addrs,
                    source,
                });
            }
        }
        Ok(())
    }

    /// Member peers of a conversation (other than this device), from what
    /// is on disk.
    fn outbox_targets(&self, conv: &ConversationId) -> Result<HashSet<PeerId>, NodeError> {
        let db = self.store.db();
        let mut peers = HashSet::new();
        let Some(c) = self.state.convs.get(conv) else {
            return Ok(peers);
        };
        if let Some(g) = &c.group {
            for m in &g.members {
                for d in &m.devices {
                    peers.insert(peer_id_of(&d.device));
                }
            }
        } else {
            for user in &c.members {
                for d in db.devices_of_user(user)? {
                    peers.insert(peer_id_of(&d.device_id));
                }
            }
        }
        peers.remove(&peer_id_of(&self.state.my_device));
        Ok(peers)
    }

    pub(super) async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut net_events: Option<mpsc::Receiver<NetEvent>>,
    ) {
        let mut internal = match self.internal_rx.take() {
            Some(rx) => rx,
            None => return,
        };
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut heartbeat = tokio::time::interval(self.state.settings.heartbeat);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sync = tokio::time::interval(self.state.settings.sync_interval);
        sync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first ticks of these fire at once: nobody is connected yet.
        heartbeat.tick().await;
        sync.tick().await;
        // Stop after this batch: asked to (with someone to tell), or every
        // handle is gone.
        let mut stopping = false;
        let mut done: Option<oneshot::Sender<()>> = None;
        loop {
            let mut batch: Vec<Input> = Vec::new();
            tokio::select! {
                cmd = commands.recv() => match cmd {
                    Some(Command::Shutdown(tx)) => (stopping, done) = (true, Some(tx)),
                    Some(cmd) => batch.push(Input::Command(cmd)),
                    None => stopping = true,
                },
                Some(ev) = recv_opt(&mut net_events) => batch.push(Input::Net(ev)),
                Some(int) = internal.recv() => batch.push(Input::Internal(int)),
                _ = tick.tick() => batch.push(Input::Tick),
                _ = heartbeat.tick() => batch.push(Input::Heartbeat),
                _ = sync.tick() => batch.push(Input::SyncTick),
                _ = sleep_until_opt(self.receipts_due) => batch.push(Input::Acknowledge),
            }
            // Drain whatever else is ready: one transaction for all of it.
            while batch.len() < BATCH && !stopping {
                if let Ok(cmd) = commands.try_recv() {
                    match cmd {
                        Command::Shutdown(tx) => (stopping, done) = (true, Some(tx)),
                        cmd => batch.push(Input::Command(cmd)),
                    }
                    continue;
                }
                if let Some(rx) = net_events.as_mut()
                    && let Ok(ev) = rx.try_recv()
                {
                    batch.push(Input::Net(ev));
                    continue;
                }
                if let Ok(int) = internal.try_recv() {
                    batch.push(Input::Internal(int));
                    continue;
                }
                break;
            }
            if stopping && batch.is_empty() && !self.unacknowledged.is_empty() {
                // What was stored is acknowledged before the node goes.
                batch.push(Input::Acknowledge);
            }
            self.handle_batch(batch, stopping).await;
            if stopping {
                if let Some(net) = &self.outlets.net {
                    net.shutdown().await;
                }
                if let Some(done) = done {
                    let _ = done.send(());
                }
                return;
            }
        }
    }

    /// Handles what arrived together in one transaction. `last`: the node
    /// stops after it, so nothing may wait for a later batch.
    async fn handle_batch(&mut self, batch: Vec<Input>, last: bool) {
        if batch.is_empty() {
            return;
        }
        let now = tokio::time::Instant::now();
        let receipt_delay = self.state.settings.receipt_delay;
        // Receipts leave at once after a quiet spell, else together with
        // the others of the same `receipt_delay`.
        let acknowledge = batch.iter().any(|i| matches!(i, Input::Acknowledge))
            || self
                .acknowledged_at
                .is_none_or(|at| now >= at + receipt_delay);
        let unacknowledged_before = self.unacknowledged.len();
        let mut acknowledged = false;
        let mut fx = Vec::new();
        let durable_fx;
        // Only what someone is promised must reach the platters before
        // the reply: user requests and direct requests we acknowledge.
        // Gossip we merely received commits without an fsync; the delivered
        // receipts for it wait for an fsync on another thread rather than
        // hold this one (`after_fsync`).
        let promised = batch.iter().any(|i| {
            matches!(
                i,
                Input::Command(_)
                    | Input::Net(NetEvent::Direct { .. })
                    | Input::Internal(Internal::MailboxReply { .. })
            )
        }) || last;
        let durability = if promised {
            Durability::Full
        } else {
            Durability::Normal
        };
        let committed = {
            let txn = match self.store.transaction_with(durability) {
                Ok(t) => t,
                Err(e) => {
                    tracing::error!("cannot begin transaction: {e}");
                    fail_inputs(batch, &e.to_string());
                    return;
                }
            };
            let db = txn.db();
            let mut state = State {
                e: &mut self.state,
                db: &db,
                fx: &mut fx,
                outlets: &self.outlets,
                delivered: &mut self.unacknowledged,
                durable_fx: Vec::new(),
                chain_stored: HashSet::new(),
                annotations: HashMap::new(),
                annotated: HashMap::new(),
                verified: HashSet::new(),
                annotation_hashes: HashMap::new(),
                account_merged: false,
            };
            for input in batch {
                match input {
                    // A message leaves before its writes: the network task
                    // (on this thread) gets a turn in between.
                    Input::Command(Command::Api {
                        request:
                            Request::Send {
                                target,
                                text,
                                reply_to,
                            },
                        reply,
                        ..
                    }) => {
                        let sealed = state.seal_text(&target, text, reply_to.as_deref());
                        if state.outlets.sent_early.replace(false) {
                            let_network_run().await;
                        }
                        let result = sealed.and_then(|s| state.store_sent(s));
                        state.fx.push(Effect::Reply(reply, result));
                    }
                    input => state.handle(input),
                }
            }
            state.fill_gaps();
            state.flush_annotations();
            state.flush_account();
            if !state.delivered.is_empty()
                && (acknowledge || last || state.delivered.len() >= crate::payload::MAX_RECEIPT_IDS)
            {
                state.flush_delivered();
                acknowledged = true;
            }
            state.save_shards();
            state.save_chains();
            state.refresh_gates();
            durable_fx = std::mem::take(&mut state.durable_fx);
            if self.outlets.sent_early.replace(false) {
                // Envelopes went out before the commit: on the wire with
                // them before the fsync holds the thread.
                let_network_run().await;
            }
            txn.commit()
        };
        if let Err(e) = committed {
            tracing::error!("commit failed: {e}");
            // Nothing of this batch is on disk: fail its replies, send
            // nothing, and reload key state from what the disk holds.
            for effect in fx {
                match effect {
                    Effect::Reply(reply, _) => {
                        let _ = reply.send(Err(ApiError::failed(format!("storage: {e}"))));
                    }
                    Effect::Accepted(reply, _) => {
                        let _ = reply.send(0);
                    }
                    _ => {}
                }
            }
            self.state.sending.clear();
            self.state.receiving.clear();
            self.state.dirty_chains.clear();
            // They may hold changes the disk does not.
            self.state.shards.clear();
            self.state.dirty_shards.clear();
            self.state.account = None;
            self.state.account_dirty = false;
            self.state.read_positions.clear();
            // This batch stored nothing to acknowledge. Receipts taken for
            // sending in it are lost; the senders' retries bring them back
            // (a duplicate offered directly is acknowledged again).
            self.unacknowledged
                .truncate(unacknowledged_before.min(self.unacknowledged.len()));
            return;
        }
        if acknowledged {
            self.acknowledged_at = Some(now);
        }
        // What waits leaves one delay after the last receipts.
        self.receipts_due = (!self.unacknowledged.is_empty())
            .then(|| self.acknowledged_at.map_or(now, |at| at + receipt_delay));
        if durability == Durability::Full {
            // Only an fsynced reservation may let envelopes leave early.
            for slot in self.state.sending.values_mut() {
                slot.durable_until = slot.reserved_until;
            }
        }
        run_effects(&self.outlets, fx);
        self.after_fsync(durability, durable_fx);
        // What this batch deleted leaves the -wal too.
        if let Err(e) = self.store.checkpoint_if_erased() {
            tracing::warn!("checkpoint after a deletion: {e}");
        }
    }

    /// Runs effects that promise durability (delivered receipts) once the
    /// batch's commit is on the disk: at once after a full commit, else
    /// after the fsync thread has flushed the WAL.
    fn after_fsync(&self, durability: Durability, effects: Vec<Effect>) {
        if effects.is_empty() {
            return;
        }
        let wal = match (&self.wal, durability) {
            (Some(wal), Durability::Normal) => wal,
            _ => return run_effects(&self.outlets, effects),
        };
        let done = wal.request();
        let internal = self.outlets.internal_tx.clone();
        tokio::spawn(async move {
            match done.await {
                Ok(Ok(())) => {
                    let _ = internal.send(Internal::Durable(effects)).await;
                }
                // Nothing is promised then; the senders' retries and
                // catch-up will ask again.
                Ok(Err(e)) => tracing::error!("receipts held back: {e}"),
                Err(_) => tracing::error!("receipts held back: the fsync thread is gone"),
            }
        });
    }
}

/// Where effects go: the network, `watch` subscribers, and the engine's
/// own queue of direct-send results.
struct Outlets {
    /// Set when an effect ran before its batch committed.
    sent_early: std::cell::Cell<bool>,
    net: Option<NetHandle>,
    events: broadcast::Sender<Event>,
    internal_tx: mpsc::Sender<Internal>,
}

impl Outlets {
    fn net_cmd(&self, cmd: NetCommand) {
        if let Some(net) = &self.net
            && !net.try_send(cmd)
        {
            // The outbox and retry tick cover anything dropped here.
            tracing::warn!("network command queue full; command dropped");
        }
    }

    fn send_direct(&self, peer: PeerId, envelopes: Vec<(EnvelopeId, Vec<u8>)>) {
        let Some(net) = &self.net else { return };
        for chunk in envelopes.chunks(DIRECT_BATCH) {
            let ids: Vec<EnvelopeId> = chunk.iter().map(|(id, _)| *id).collect();
            let request = DirectRequest::Envelopes(chunk.iter().map(|(_, b)| b.clone()).collect());
            let Ok(data) = postcard::to_stdvec(&request) else {
                continue;
            };
            let (tx, rx) = oneshot::channel();
            if !net.try_send(NetCommand::Direct {
                peer,
                data,
                reply: tx,
            }) {
                continue;
            }
            let internal = self.internal_tx.clone();
            tokio::spawn(async move {
                // All or nothing: a refused envelope in the batch means the
                // peer may lack some of them, so all are offered again
                // (it ignores those it has).
                let ok = matches!(
                    rx.await
                        .ok()
                        .and_then(|r| r.ok())
                        .and_then(|b| postcard::from_bytes::<DirectResponse>(&b).ok()),
                    Some(DirectResponse::Ack { accepted }) if accepted as usize == ids.len()
                );
                let _ = internal.send(Internal::DirectAck { peer, ids, ok }).await;
            });
        }
    }
}

impl Outlets {
    /// Sends a direct request whose answer (or its absence) comes back to
    /// the engine as the `Internal` that `answered` makes of it.
    fn ask(
        &self,
        peer: PeerId,
        request: &DirectRequest,
        answered: impl FnOnce(Option<DirectResponse>) -> Internal + Send + 'static,
    ) {
        let internal = self.internal_tx.clone();
        let Some(rx) = self.request(peer, request) else {
            let _ = internal.try_send(answered(None));
            return;
        };
        tokio::spawn(async move {
            let response = rx
                .await
                .ok()
                .and_then(|r| r.ok())
                .and_then(|b| postcard::from_bytes::<DirectResponse>(&b).ok());
            let _ = internal.send(answered(response)).await;
        });
    }

    /// Sends a mailbox request to a relay; the answer (or its absence)
    /// comes back to the engine.
    fn mailbox(
        &self,
        peer: PeerId,
        request: crate::mailbox::MailboxRequest,
        then: relay::MailboxThen,
    ) {
        let internal = self.internal_tx.clone();
        let rx = self.net.as_ref().and_then(|net| {
            let (tx, rx) = oneshot::channel();
            net.try_send(NetCommand::Mailbox {
                peer,
                data: request.encode(),
                reply: tx,
            })
            .then_some(rx)
        });
        tokio::spawn(async move {
            let response = match rx {
                Some(rx) => rx
                    .await
                    .ok()
                    .and_then(|r| r.ok())
                    .and_then(|b| crate::mailbox::MailboxResponse::decode(&b)),
                None => None,
            };
            let _ = internal
                .send(Internal::MailboxReply {
                    relay: peer,
                    then,
                    response,
                })
                .await;
        });
    }

    fn request(
        &self,
        peer: PeerId,
        request: &DirectRequest,
    ) -> Option<oneshot::Receiver<Result<Vec<u8>, crate::net::NetError>>> {
        let net = self.net.as_ref()?;
        let data = postcard::to_stdvec(request).ok()?;
        let (tx, rx) = oneshot::channel();
        net.try_send(NetCommand::Direct {
            peer,
            data,
            reply: tx,
        })
        .then_some(rx)
    }
}

fn run_effects(outlets: &Outlets, fx: Vec<Effect>) {
    for effect in fx {
        match effect {
            Effect::Net(cmd) => outlets.net_cmd(cmd),
            Effect::Event(ev) => {
                let _ = outlets.events.send(ev);
            }
            Effect::Reply(reply, result) => {
                let _ = reply.send(result);
            }
            Effect::DirectReply(reply, bytes) => {
                let _ = reply.send(bytes);
            }
            Effect::Accepted(reply, n) => {
                let _ = reply.send(n);
            }
            Effect::Direct { peer, envelopes } => outlets.send_direct(peer, envelopes),
            Effect::Sync {
                peer,
                conv,
                request,
            } => outlets.ask(peer, &request, move |response| Internal::Synced {
                peer,
                conv,
                response,
            }),
            Effect::Mailbox {
                peer,
                request,
                then,
            } => outlets.mailbox(peer, request, then),
            Effect::Notify { peer, request } => {
                // The answer does not matter; dropping its receiver is fine.
                let _ = outlets.request(peer, &request);
            }
            Effect::History { peer, request } => {
                outlets.ask(peer, &DirectRequest::History(request), move |response| {
                    Internal::History { peer, response }
                })
            }
        }
    }
}

/// Lets the network task and the connection tasks, which share this
/// thread, put what was just published on the wire: a turn for each hop
/// (swarm, connection, stream).
async fn let_network_run() {
    for _ in 0..16 {
        tokio::task::yield_now().await;
    }
}

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn recv_opt(rx: &mut Option<mpsc::Receiver<NetEvent>>) -> Option<NetEvent> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

enum Input {
    Command(Command),
    Net(NetEvent),
    Internal(Internal),
    /// The outbox, presence and typing timers.
    Tick,
    Heartbeat,
    SyncTick,
    /// Time to send the delivered receipts waiting.
    Acknowledge,
}

fn fail_inputs(batch: Vec<Input>, why: &str) {
    for input in batch {
        match input {
            Input::Command(Command::Api { reply, .. }) => {
                let _ = reply.send(Err(ApiError::failed(format!("storage: {why}"))));
            }
            Input::Command(Command::Deliver { reply, .. }) => {
                let _ = reply.send(0);
            }
            _ => {}
        }
    }
}

/// Everything the engine knows besides its store and outlets: owned by
/// the engine, lent to a batch's [`State`] next to the open transaction.
struct EngineState {
    identity: Identity,
    my_user: UserId,
    my_device: DeviceId,
    name: String,
    /// Whether a network task runs (not for an offline node).
    net_online: bool,
    convs: HashMap<ConversationId, Conv>,
    by_topic: HashMap<String, ConversationId>,
    /// Every routing tag known (current and earlier epochs).
    by_tag: HashMap<RoutingTag, ConversationId>,
    /// When the gossip gate (who may subscribe to which topic) is to be
    /// told the member devices again (`None`: it is up to date).
    gates_due: Option<tokio::time::Instant>,
    sending: HashMap<(ConversationId, u64), SendingSlot>,
    receiving: HashMap<(ConversationId, DeviceId, u64), ReceivingChain>,
    /// Receiving chains moved on in this batch and not written yet.
    dirty_chains: HashSet<(ConversationId, DeviceId, u64)>,
    /// Senders' device keys, decoded.
    verifying_keys: HashMap<DeviceId, ed25519_dalek::VerifyingKey>,
    recipients: HashMap<ConversationId, Arc<Recipients>>,
    device_users: HashMap<DeviceId, Option<UserId>>,
    blocked: HashSet<UserId>,
    /// Devices revoked by their accounts (at most `MAX_REVOKED` kept in
    /// memory; the store keeps all): nothing from them is accepted.
    revoked: HashSet<DeviceId>,
    connected: HashSet<PeerId>,
    topic_peers: HashMap<String, HashSet<PeerId>>,
    /// Envelopes in the outbox and the member peers not yet known to have
    /// them.
    unreached: HashMap<EnvelopeId, (ConversationId, HashSet<PeerId>)>,
    /// When each envelope was last offered to each peer directly.
    offered: HashMap<(EnvelopeId, PeerId), tokio::time::Instant>,
    settings: Settings,
    clock: Clock,
    share: Share,
    /// Which device (and user) each peer id is, derived from certificates
    /// (`None`: not a known device).
    device_by_peer: HashMap<PeerId, Option<(DeviceId, UserId)>>,
    presence: HashMap<UserId, presence::Presence>,
    typing: HashMap<(ConversationId, UserId), tokio::time::Instant>,
    /// Catch-up sessions in progress, with their round count.
    syncing: HashMap<(PeerId, ConversationId), u32>,
    /// Relays in use, configured and found (peer id, address with /p2p/).
    relays: Vec<(PeerId, Multiaddr)>,
    /// Those of `relays` found through the DHT.
    found_relays: HashSet<PeerId>,
    /// Relays a fetch is in flight from.
    fetching: HashSet<PeerId>,
    /// The last mail cursor acknowledged per relay.
    mail_cursor: HashMap<PeerId, u64>,
    /// Envelopes deposited for a device at its relays.
    deposited: HashSet<(EnvelopeId, PeerId)>,
    /// Our mailbox at each relay that accepted our registration, and how
    /// much was fetched from it.
    mailboxes: HashMap<PeerId, (crate::mailbox::MailboxId, u64)>,
    /// Conversations with an envelope waiting for a gap in its sender's
    /// chain to be filled (it came too far ahead).
    gaps: HashSet<ConversationId>,
    /// Annotation shards loaded (at most `annotations::SHARD_CACHE`).
    shards: HashMap<annotations::ShardId, weft_crdt::Annotations>,
    /// Those changed in the batch in progress.
    dirty_shards: HashSet<annotations::ShardId>,
    /// Link codes issued and not used yet.
    link_codes: Vec<devices::LinkSecret>,
    /// The device a history transfer is coming from.
    history_peer: Option<PeerId>,
    /// The account's private state (loaded when first needed), and
    /// whether it changed since it was saved.
    account: Option<weft_crdt::AccountState>,
    account_dirty: bool,
    /// The account's read position per conversation, as last read from it.
    read_positions: HashMap<ConversationId, u64>,
}

struct State<'s, 'd> {
    e: &'s mut EngineState,
    db: &'s Db<'d>,
    /// Run after the commit.
    fx: &'s mut Vec<Effect>,
    /// For what is safe to send before the batch is durable (see
    /// [`SendingSlot`]): it goes out at once.
    outlets: &'s Outlets,
    /// Messages stored and not acknowledged yet: their delivered receipts
    /// leave together, after a commit.
    delivered: &'s mut Vec<(ConversationId, MessageId)>,
    /// Effects to run once the commit is durable (the receipts for them).
    durable_fx: Vec<Effect>,
    /// Conversations this batch stored chain envelopes of.
    chain_stored: HashSet<ConversationId>,
    /// Annotation changes received in this batch, to apply at its end.
    annotations: HashMap<annotations::ShardId, Vec<annotations::Queued>>,
    /// Envelopes whose signatures were checked ahead, in parallel.
    verified: HashSet<EnvelopeId>,
    /// Messages annotated in this batch, as looked up.
    annotated: HashMap<MessageId, annotations::Annotated>,
    /// Their hashes, per shard (a change may build on one of them).
    annotation_hashes: HashMap<annotations::ShardId, HashSet<weft_crdt::ChangeHash>>,
    /// Whether this batch merged account changes from another device (the
    /// store is brought in line at its end).
    account_merged: bool,
}

type ApiResult = Result<serde_json::Value, ApiError>;

fn to_value<T: Serialize>(v: &T) -> ApiResult {
    serde_json::to_value(v).map_err(|e| ApiError::failed(e.to_string()))
}

fn store_err(e: crate::store::StoreError) -> ApiError {
    ApiError::failed(format!("storage: {e}"))
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        store_err(e)
    }
}

impl From<CryptoError> for ApiError {
    fn from(e: CryptoError) -> Self {
        ApiError::failed(format!("crypto: {e}"))
    }
}

impl State<'_, '_> {
    fn handle(&mut self, input: Input) {
        match input {
            Input::Command(Command::Api {
                request,
                listen,
                reply,
            }) => {
                let result = self.api(request, listen);
                self.fx.push(Effect::Reply(reply, result));
            }
            Input::Command(Command::Deliver { envelopes, reply }) => {
                let mut accepted = 0u32;
                self.preverify(envelopes.iter().map(Vec::as_slice));
                for bytes in &envelopes {
                    match self.receive(bytes, Via::Direct, None) {
                        Verdict::Reject(why) => {
                            tracing::debug!(why, "a delivered envelope is refused");
                        }
                        _ => accepted += 1,
                    }
                }
                self.fx.push(Effect::Accepted(reply, accepted));
            }
            Input::Command(Command::Shutdown(_)) => {}
            Input::Net(ev) => self.on_net(ev),
            Input::Internal(Internal::DirectAck { peer, ids, ok }) => {
                for id in &ids {
                    self.e.offered.remove(&(*id, peer));
                }
                if ok {
                    for id in ids {
                        self.reached(&id, &peer);
                    }
                    // Keep a flush to a peer that just came online going.
                    self.flush_to(peer, None);
                }
            }
            Input::Internal(Internal::Durable(effects)) => run_effects(self.outlets, effects),
            Input::Internal(Internal::MailboxReply {
                relay,
                then,
                response,
            }) => self.on_mailbox_reply(relay, then, response),
            Input::Internal(Internal::Synced {
                peer,
                conv,
                response,
            }) => self.on_synced(peer, conv, response),
            Input::Internal(Internal::History { peer, response }) => {
                self.on_history(peer, response)
            }
            Input::Tick => {
                self.retry();
                self.expire_presence();
                self.expire_keys();
            }
            Input::Heartbeat => {
                self.heartbeat();
                self.purge_offered();
            }
            Input::SyncTick => self.sync_all(),
            // Acted on at the batch's end.
            Input::Acknowledge => {}
        }
    }

    // ---- API -------------------------------------------------------------

    fn api(&mut self, request: Request, listen: Vec<Multiaddr>) -> ApiResult {
        match request {
            Request::Id => self.id(listen),
            Request::Status => {
                let view = StatusView {
                    peer_id: self.e.identity.peer_id().to_string(),
                    listen: Vec::new(),
                    peers: Vec::new(),
                    relays: self.e.relays.iter().map(|(_, a)| a.to_string()).collect(),
                    online: self.e.net_online,
                    outbox: self.db.outbox_len()?,
                };
                to_value(&view)
            }
            Request::ContactAdd { invite, name } => self.contact_add(&invite, name.as_deref()),
            Request::ContactList => {
                let mut out = Vec::new();
                for c in self.db.contacts()? {
                    out.push(self.contact_view(&c)?);
                }
                to_value(&out)
            }
            Request::ContactRemove { alias } => {
                let c = self.contact(&alias)?;
                self.db.remove_contact(&c.user_id)?;
                self.e.blocked.remove(&c.user_id);
                self.change_account(|a| a.remove_contact(&c.user_id.0))?;
                to_value(&self.contact_view(&c)?)
            }
            Request::ContactBlock { alias } => self.set_blocked(&alias, true),
            Request::ContactUnblock { alias } => self.set_blocked(&alias, false),
            Request::Send {
                target,
                text,
                reply_to,
            } => self.send(&target, text, reply_to.as_deref()),
            Request::GroupCreate { name, members } => self.group_create(&name, &members),
            Request::GroupAdd { group, member } => self.group_change(&group, &member, GroupOp::Add),
            Request::GroupRemove { group, member } => {
                self.group_change(&group, &member, GroupOp::Remove)
            }
            Request::GroupAdmin { group, member } => {
                self.group_change(&group, &member, GroupOp::Admin)
            }
            Request::GroupLeave { group } => self.group_leave(&group),
            Request::GroupList => {
                let mut out = Vec::new();
                for conv in self
                    .e
                    .convs
                    .values()
                    .filter(|c| c.kind == ConversationKind::Group)
                {
                    let Some(g) = &conv.group else { continue };
                    if !conv.active {
                        continue;
                    }
                    out.push(GroupView {
                        id: conv.id.to_string(),
                        name: g.name.clone(),
                        members: g.members.len(),
                        role: g
                            .member(&self.e.my_user)
                            .map_or("none", |m| role_name(m.role))
                            .into(),
                        epoch: g.epoch,
                    });
                }
                out.sort_by(|a, b| a.name.cmp(&b.name));
                to_value(&out)
            }
            Request::GroupMembers { group } => {
                let conv = self.group(&group)?;
                let g = conv
                    .group
                    .as_ref()
                    .ok_or_else(|| ApiError::failed("group has no state"))?;
                to_value(&member_views(g))
            }
            Request::Conversations => {
                let mut out = Vec::new();
                let hidden = account::account_conversation(&self.e.my_user);
                for r in self.db.conversations()? {
                    if r.id == hidden {
                        continue;
                    }
                    out.push(ConversationView {
                        id: r.id.to_string(),
                        kind: r.kind.as_str().to_string(),
                        name: r.name,
                        unread: r.unread,
                        last_message_at: r.last_message_at_ms,
                    });
                }
                to_value(&out)
            }
            Request::Messages {
                target,
                limit,
                before,
            } => {
                let conv = self.resolve(&target)?;
                let before = match before {
                    Some(b) => Some(
                        b.parse::<MessageId>()
                            .map_err(|_| ApiError::usage(format!("not a message id: {b}")))?,
                    ),
                    None => None,
                };
                let limit = limit.unwrap_or(50).min(10_000);
                let records = self.db.messages(&conv, limit, before.as_ref())?;
                let mut out = Vec::with_capacity(records.len());
                for r in &records {
                    out.push(self.message_view(r, true)?);
                }
                to_value(&out)
            }
            Request::Read { target } => {
                let conv = self.resolve(&target)?;
                self.mark_read(conv)
            }
            Request::DevicesLink => self.devices_link(listen),
            Request::DevicesList => self.devices_list(),
            Request::DevicesRevoke { device } => self.devices_revoke(&device),
            Request::Edit { id, text } => self.edit_message(&id, text),
            Request::Delete { id } => self.delete_message(&id),
            Request::React { id, emoji, remove } => self.react(&id, &emoji, !remove),
            Request::Presence { target } => self.presence_of(&target),
            Request::Typing { target, typing } => self.send_typing(&target, typing),
            Request::Privacy { presence } => self.privacy(presence.as_deref()),
            Request::RelayList => self.relay_list(),
            Request::PushRegister { url } => self.push_register(Some(url)),
            Request::PushUnregister => self.push_register(None),
            Request::Watch => Err(ApiError::usage("watch is a stream: use the control socket")),
        }
    }

    /// Where this device can be reached, with its `/p2p/`: the listen
    /// addresses (not the unspecified ones) and the circuit addresses
    /// through its relays, each once. For invites and link codes.
    fn reachable_at(&self, listen: Vec<Multiaddr>) -> Vec<String> {
        let peer = self.e.identity.peer_id();
        listen
            .into_iter()
            .filter(|a| {
                !a.iter()
                    .any(|p| matches!(p, Protocol::Ip4(ip) if ip.is_unspecified()))
            })
            .map(|a| a.with(Protocol::P2p(peer)).to_string())
            .chain(self.relay_addrs())
            .fold(Vec::new(), |mut seen: Vec<String>, a| {
                // A relay may announce the circuit address we also build.
                if !seen.contains(&a) {
                    seen.push(a);
                }
                seen
            })
    }

    fn id(&mut self, listen: Vec<Multiaddr>) -> ApiResult {
        let peer = self.e.identity.peer_id();
        let addrs = self.reachable_at(listen);
        let invite = self.account_invite(addrs)?;
        to_value(&IdView {
            user_id: self.e.my_user.to_string(),
            device_id: self.e.my_device.to_string(),
            peer_id: peer.to_string(),
            name: self.e.name.clone(),
            invite,
        })
    }

    fn contact(&self, alias: &str) -> Result<Contact, ApiError> {
        if let Some(c) = self.db.contact_by_alias(alias)? {
            return Ok(c);
        }
        if let Ok(user) = alias.parse::<UserId>()
            && let Some(c) = self.db.contact(&user)?
        {
            return Ok(c);
        }
        Err(ApiError::usage(format!("unknown contact: {alias}")))
    }

    fn contact_view(&self, c: &Contact) -> Result<ContactView, ApiError> {
        Ok(ContactView {
            alias: c.alias.clone(),
            user_id: c.user_id.to_string(),
            name: self
                .db
                .user_name(&c.user_id)?
                .unwrap_or_else(|| c.alias.clone()),
            blocked: c.blocked,
            devices: self.db.devices_of_user(&c.user_id)?.len(),
        })
    }

    fn set_blocked(&mut self, alias: &str, blocked: bool) -> ApiResult {
        let c = self.contact(alias)?;
        self.db.set_blocked(&c.user_id, blocked)?;
        if blocked {
            self.e.blocked.insert(c.user_id);
        } else {
            self.e.blocked.remove(&c.user_id);
        }
        self.change_account(|a| a.block(&c.user_id.0, blocked))?;
        let c = self.contact(alias)?;
        to_value(&self.contact_view(&c)?)
    }

    /// `weft contact add`: the contact, and the account's other devices
    /// told.
    fn contact_add(&mut self, text: &str, alias: Option<&str>) -> ApiResult {
        let invite =
            Invite::decode(text).map_err(|e| ApiError::usage(format!("invalid invite: {e}")))?;
        let alias = alias.unwrap_or(&invite.name).trim().to_string();
        let contact = self.import_contact(text, &alias)?;
        self.change_account(|a| {
            a.add_contact(&contact.user_id.0, &contact.alias, &contact.invite)
        })?;
        to_value(&self.contact_view(&contact)?)
    }

    /// Adds a contact from an invite under `alias`, learns its devices and
    /// addresses, and opens the direct conversation.
    fn import_contact(&mut self, text: &str, alias: &str) -> Result<Contact, ApiError> {
        let invite =
            Invite::decode(text).map_err(|e| ApiError::usage(format!("invalid invite: {e}")))?;
        if invite.user == self.e.my_user {
            return Err(ApiError::usage("that is your own invite"));
        }
        let alias = alias.trim().to_string();
        crate::identity::validate_name(&alias)
            .map_err(|_| ApiError::usage("alias must be 1 to 64 printable bytes"))?;
        if alias.parse::<UserId>().is_ok() || alias.parse::<ConversationId>().is_ok() {
            return Err(ApiError::usage("alias must not look like an id"));
        }
        let now = now_ms();
        let contact = Contact {
            user_id: invite.user,
            alias: alias.clone(),
            invite: text.trim().to_string(),
            blocked: false,
            added_at_ms: now,
        };
        self.db.insert_contact(&contact).map_err(|e| match e {
            crate::store::StoreError::AliasTaken(a) => {
                ApiError::usage(format!("alias {a} is taken: pick another with --name"))
            }
            crate::store::StoreError::AlreadyContact => ApiError::usage("already a contact"),
            e => store_err(e),
        })?;
        self.db.upsert_user(&invite.user, &invite.name, now)?;
        for cert in &invite.devices {
            self.learn_device(cert)?;
        }
        // Address hints: only those naming one of the invite's devices.
        let device_peers: HashSet<PeerId> = invite
            .devices
            .iter()
            .map(|c| peer_id_of(&c.device))
            .collect();
        let mut dial: HashMap<PeerId, Vec<Multiaddr>> = HashMap::new();
        for addr in &invite.addrs {
            let Ok(addr) = addr.parse::<Multiaddr>() else {
                continue;
            };
            if let Some(Protocol::P2p(peer)) = addr.iter().last()
                && device_peers.contains(&peer)
            {
                self.db
                    .upsert_peer_addr(&peer.to_string(), &addr.to_string(), now)?;
                dial.entry(peer).or_default().push(addr);
            }
        }
        for (peer, addrs) in dial {
            self.fx.push(Effect::Net(NetCommand::Dial {
                peer,
                addrs,
                source: PeerSource::Manual,
            }));
        }
        let conv = self.ensure_direct(&invite.user, &alias)?;
        // A message may have made the conversation first, named after the
        // sender's display name: it takes the alias now.
        self.db.rename_conversation(&conv, &alias)?;
        // Anything that waited for this contact's devices may open now.
        self.reprocess_pending(&conv);
        Ok(contact)
    }

    fn learn_device(&mut self, cert: &DeviceCertificate) -> Result<(), ApiError> {
        cert.verify().map_err(|e| ApiError::usage(e.to_string()))?;
        if let Binding::OtherUser(owner) = self.bind_device(cert)? {
            return Err(ApiError::usage(format!(
                "device {} of this invite is known here as a device of {owner}",
                cert.device
            )));
        }
        Ok(())
    }

    /// The direct conversation with `user`, created if new.
    fn ensure_direct(&mut self, user: &UserId, name: &str) -> Result<ConversationId, ApiError> {
        let id = ConversationId::direct(&self.e.my_user, user);
        if let Some(conv) = self.e.convs.get(&id) {
            // Never a group that took the id: its members would read on.
            if conv.kind != ConversationKind::Direct {
                return Err(ApiError::failed(
                    "a group holds the id of this one-to-one conversation",
                ));
            }
            return Ok(id);
        }
        let Some(routing) = direct_routing(&self.e.identity, self.db, user)? else {
            return Err(ApiError::failed(format!(
                "no protocol 2 certificate of {name} is known here: add their new invite (weft contact add)"
            )));
        };
        let record = ConversationRecord::direct(id, name, &routing, now_ms());
        self.db.insert_conversation(&record)?;
        self.db.set_members(
            &id,
            &[(self.e.my_user, Role::Member), (*user, Role::Member)],
        )?;
        self.devices_changed();
        let conv = Conv::direct(id, vec![self.e.my_user, *user], &routing);
        self.add_conv(conv.clone());
        self.hand_out_in(&conv)?;
        Ok(id)
    }

    /// Gives a one-to-one conversation made under protocol 1 its routing
    /// secret once a protocol 2 certificate of the other user is known.
    fn upgrade_direct_routing(&mut self, user: &UserId) -> Result<(), ApiError> {
        let id = ConversationId::direct(&self.e.my_user, user);
        let Some(conv) = self.e.convs.get(&id) else {
            return Ok(());
        };
        if conv.tag.is_some() || conv.kind != ConversationKind::Direct {
            return Ok(());
        }
        let Some(routing) = direct_routing(&self.e.identity, self.db, user)? else {
            return Ok(());
        };
        self.db.set_routing(&id, &routing.topic(), &routing.tag())?;
        let mut conv = conv.clone();
        if conv.active {
            self.fx
                .push(Effect::Net(NetCommand::Unsubscribe(conv.topic.clone())));
        }
        conv.topic = routing.topic();
        conv.tag = Some(routing.tag());
        self.add_conv(conv);
        Ok(())
    }

    /// The conversations this user is (still) a member of.
    fn active_convs(&self) -> Vec<Conv> {
        self.e
            .convs
            .values()
            .filter(|c| c.active)
            .cloned()
            .collect()
    }

    fn add_conv(&mut self, conv: Conv) {
        // A conversation without a routing secret (protocol 1) has no
        // topic to join.
        if conv.active && conv.tag.is_some() {
            self.fx
                .push(Effect::Net(NetCommand::Subscribe(conv.topic.clone())));
        }
        self.e.by_topic.insert(conv.topic.clone(), conv.id);
        let (id, tag) = (conv.id, conv.tag);
        self.e.convs.insert(id, conv);
        self.gates_changed(Duration::ZERO);
        if let Some(tag) = tag {
            self.tag_found(tag, id);
        }
    }

    /// Notes where a tag belongs (in a bounded cache: the store knows every
    /// tag), and takes in the chain envelopes that waited for it.
    fn tag_found(&mut self, tag: RoutingTag, conv: ConversationId) {
        if self.cache_tag(tag, conv) {
            self.reprocess_pending(&tag_slot(&tag));
        }
    }

    /// Puts a tag in the bounded cache; true if it was not there.
    fn cache_tag(&mut self, tag: RoutingTag, conv: ConversationId) -> bool {
        if self.e.by_tag.len() >= ROUTING_TAGS_CACHE {
            self.e.by_tag.clear();
        }
        self.e.by_tag.insert(tag, conv).is_none()
    }

    /// The conversation a routing tag names, if this node knows the tag.
    fn conversation_of_tag(
        &mut self,
        tag: &RoutingTag,
    ) -> Result<Option<ConversationId>, ApiError> {
        if let Some(conv) = self.e.by_tag.get(tag) {
            return Ok(Some(*conv));
        }
        let conv = self.db.conversation_of_tag(tag)?;
        if let Some(conv) = conv {
            self.cache_tag(*tag, conv);
        }
        Ok(conv)
    }

    /// Members or devices changed: the gate is told again after `delay`
    /// (never sooner than a change already waiting asked for).
    fn gates_changed(&mut self, delay: Duration) {
        let due = tokio::time::Instant::now() + delay;
        self.e.gates_due = Some(self.e.gates_due.map_or(due, |d| d.max(due)));
    }

    /// Tells the gossip gate, for every topic, which peers may take it:
    /// the member devices of its conversation, nobody else.
    fn refresh_gates(&mut self) {
        match self.e.gates_due {
            Some(due) if due <= tokio::time::Instant::now() => self.e.gates_due = None,
            _ => return,
        }
        for conv in self.active_convs() {
            let peers = match self.recipients(&conv) {
                Ok(r) => r.devices.iter().map(|(d, _)| peer_id_of(d)).collect(),
                Err(e) => {
                    tracing::warn!("cannot list the member devices of a conversation: {e}");
                    continue;
                }
            };
            self.fx.push(Effect::Net(NetCommand::TopicMembers {
                topic: conv.topic.clone(),
                peers,
            }));
        }
    }

    /// Resolves TARGET: a contact alias, a group name, a user id or a
    /// conversation id.
    fn resolve(&mut self, target: &str) -> Result<ConversationId, ApiError> {
        if let Some(c) = self.db.contact_by_alias(target)? {
            return self.ensure_direct(&c.user_id, &c.alias);
        }
        let groups: Vec<ConversationId> = self
            .db
            .conversations_named(target)?
            .into_iter()
            .filter(|r| r.kind == ConversationKind::Group)
            .map(|r| r.id)
            .collect();
        match groups.len() {
            1 => return Ok(groups[0]),
            0 => {}
            n => {
                return Err(ApiError::usage(format!(
                    "{n} groups are named {target}: use the conversation id (weft group list)"
                )));
            }
        }
        if let Ok(user) = target.parse::<UserId>() {
            if user == self.e.my_user {
                return Err(ApiError::usage("that is your own user id"));
            }
            if let Some(c) = self.db.contact(&user)? {
                return self.ensure_direct(&user, &c.alias);
            }
            let id = ConversationId::direct(&self.e.my_user, &user);
            if self.e.convs.contains_key(&id) {
                return Ok(id);
            }
            return Err(ApiError::usage(format!(
                "user {target} is not a contact: add their invite first"
            )));
        }
        if let Ok(id) = target.parse::<ConversationId>()
            && self.e.convs.contains_key(&id)
            && id != account::account_conversation(&self.e.my_user)
        {
            return Ok(id);
        }
        Err(ApiError::usage(format!(
            "unknown contact, group or conversation: {target}"
        )))
    }

    fn group(&mut self, target: &str) -> Result<Conv, ApiError> {
        let id = self.resolve(target)?;
        match self.e.convs.get(&id) {
            Some(c) if c.kind == ConversationKind::Group => Ok(c.clone()),
            _ => Err(ApiError::usage(format!("{target} is not a group"))),
        }
    }

    fn send(&mut self, target: &str, text: String, reply_to: Option<&str>) -> ApiResult {
        let sealed = self.seal_text(target, text, reply_to)?;
        self.store_sent(sealed)
    }

    /// The first half of `send`: checks, seals and publishes (at once when
    /// the counter is durable). The caller lets the network run before
    /// [`Self::store_sent`] does the writes, which the message need not
    /// wait for.
    fn seal_text(
        &mut self,
        target: &str,
        text: String,
        reply_to: Option<&str>,
    ) -> Result<SealedText, ApiError> {
        if text.len() > MAX_TEXT_BYTES {
            return Err(ApiError::usage(format!(
                "message is {} bytes; the limit is {MAX_TEXT_BYTES}",
                text.len()
            )));
        }
        if text.trim().is_empty() {
            return Err(ApiError::usage("message is empty"));
        }
        let reply_to = match reply_to {
            Some(r) => Some(
                r.parse::<MessageId>()
                    .map_err(|_| ApiError::usage(format!("not a message id: {r}")))?,
            ),
            None => None,
        };
        let conv = self.active_conversation(target)?;
        let hlc = self.e.clock.now(now_ms().max(0) as u64);
        let payload = Payload::Text(TextMessage {
            text: text.clone(),
            reply_to,
            hlc,
            epoch: conv.epoch,
        });
        let (env, counter, early) = self.seal_chain_message(&conv, &payload.encode())?;
        self.publish(&conv, &env, early);
        Ok(SealedText {
            conv,
            env,
            counter,
            early,
            text,
            reply_to,
            hlc,
        })
    }

    /// The second half of `send`: the writes, the event and the reply.
    fn store_sent(&mut self, sealed: SealedText) -> ApiResult {
        let SealedText {
            conv,
            env,
            counter,
            early,
            text,
            reply_to,
            hlc,
        } = sealed;
        let conv_id = conv.id;
        let sent_at = hlc.ms() as i64;
        let reached =
            self.track_envelope(&conv, &env, conv.key_epoch, counter, early, Ack::Receipt)?;
        let status = if reached {
            MessageStatus::Sent
        } else {
            MessageStatus::Queued
        };
        let record = MessageRecord {
            id: env.id(),
            conversation: conv_id,
            sender_user: self.e.my_user,
            sender_device: self.e.my_device,
            sent_at_ms: sent_at,
            received_at_ms: sent_at,
            text,
            reply_to,
            status,
            edited: false,
            deleted: false,
            hlc: hlc.0,
            epoch: conv.epoch,
        };
        self.db.insert_message(&record)?;
        self.db.bump_conversation(&conv_id, sent_at, 0)?;
        let view = self.message_view(&record, false)?;
        self.fx.push(Effect::Event(Event::Message(view)));
        to_value(&SendView {
            id: record.id.to_string(),
            conversation: conv_id.to_string(),
            status: status.as_str().to_string(),
        })
    }

    /// TARGET's conversation, which this user must still be a member of.
    fn active_conversation(&mut self, target: &str) -> Result<Conv, ApiError> {
        let id = self.resolve(target)?;
        let conv = self
            .e
            .convs
            .get(&id)
            .cloned()
            .ok_or_else(|| ApiError::failed("conversation vanished"))?;
        if !conv.active {
            return Err(ApiError::usage("you are no longer a member of this group"));
        }
        Ok(conv)
    }

    /// The member peers of a conversation that are connected now.
    fn connected_members(&mut self, conv: &Conv) -> Vec<PeerId> {
        match self.recipients(conv) {
            Ok(r) => r
                .peers
                .iter()
                .filter(|p| self.e.connected.contains(p))
                .copied()
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Member devices of a conversation other than this one, with their DH
    /// keys.
    fn recipients(&mut self, conv: &Conv) -> Result<Arc<Recipients>, ApiError> {
        let fingerprint = (
            conv.key_epoch,
            conv.group
                .as_ref()
                .map_or(conv.members.len(), |g| g.members.len()),
        );
        if let Some(r) = self.e.recipients.get(&conv.id)
            && r.fingerprint == fingerprint
        {
            return Ok(r.clone());
        }
        let devices = self.compute_recipients(conv)?;
        let peers = devices.iter().map(|(d, _)| peer_id_of(d)).collect();
        let r = Arc::new(Recipients {
            fingerprint,
            devices,
            peers,
        });
        if self.e.recipients.len() >= RECIPIENTS_CACHE {
            self.e.recipients.clear();
        }
        self.e.recipients.insert(conv.id, r.clone());
        Ok(r)
    }

    /// Forgets what was derived from device certificates and memberships.
    fn devices_changed(&mut self) {
        self.gates_changed(Duration::ZERO);
        self.e.recipients.clear();
        self.e.device_users.clear();
        self.e.device_by_peer.clear();
    }

    fn compute_recipients(&self, conv: &Conv) -> Result<Vec<(DeviceId, [u8; 32])>, ApiError> {
        let mut out = Vec::new();
        if let Some(g) = &conv.group {
            for m in &g.members {
                for d in &m.devices {
                    if d.device != self.e.my_device && !self.is_revoked(&d.device)? {
                        out.push((d.device, d.dh));
                    }
                }
                // Devices the member's account announced since the group
                // state was made.
                for d in self.db.devices_of_user(&m.user)? {
                    if d.device_id != self.e.my_device
                        && !out.iter().any(|(id, _)| *id == d.device_id)
                        && let Ok(cert) = DeviceCertificate::from_stored_bytes(&d.cert)
                    {
                        out.push((cert.device, cert.dh));
                    }
                }
            }
        } else {
            for user in &conv.members {
                for d in self.db.devices_of_user(user)? {
                    if d.device_id == self.e.my_device {
                        continue;
                    }
                    if let Ok(cert) = DeviceCertificate::from_stored_bytes(&d.cert) {
                        out.push((cert.device, cert.dh));
                    }
                }
            }
        }
        // Sealed to each device's handout key where one is known and young.
        out.into_iter()
            .map(|(device, dh)| Ok((device, self.sealing_key(&device, dh)?)))
            .collect()
    }

    /// Seals a payload with this device's chain for the conversation's
    /// current epoch, creating and distributing the chain first if new.
    /// Returns the envelope and whether it may leave before the batch
    /// commits (its counter is below the durable reservation).
    fn seal_chain_message(
        &mut self,
        conv: &Conv,
        plaintext: &[u8],
    ) -> Result<(Envelope, u64, bool), ApiError> {
        self.check_not_revoked()?;
        let tag = routing_tag_of(conv)?;
        let key = (conv.id, conv.key_epoch);
        if !self.e.sending.contains_key(&key) {
            let slot = match self
                .db
                .get_chain(&conv.id, &self.e.my_device, conv.key_epoch)?
            {
                // What the disk holds is a reservation: resume there.
                Some(bytes) => {
                    let chain = SendingChain::from_bytes(&bytes)?;
                    let at = chain.counter();
                    SendingSlot {
                        chain,
                        durable_until: at,
                        reserved_until: at,
                    }
                }
                None => {
                    let chain = SendingChain::new(fresh_key()?);
                    self.distribute_chain(conv, &chain)?;
                    // Nothing of a new chain is durable until this commit.
                    SendingSlot {
                        chain,
                        durable_until: 0,
                        reserved_until: 0,
                    }
                }
            };
            self.e.sending.insert(key, slot);
        }
        let slot = self
            .e
            .sending
            .get_mut(&key)
            .ok_or_else(|| ApiError::failed("chain vanished"))?;
        let (counter, mk) = slot.chain.step()?;
        if slot.chain.counter() > slot.reserved_until {
            // Reserve the next block of counters in this transaction: after
            // a crash the chain resumes past every counter used before it.
            let reserved = slot.chain.advanced(COUNTER_RESERVATION)?;
            slot.reserved_until = reserved.counter();
            self.db.put_chain(
                &conv.id,
                &self.e.my_device,
                conv.key_epoch,
                &reserved.to_bytes(),
            )?;
        }
        let early = counter < slot.durable_until;
        let env = envelope::seal_chain(
            self.e.identity.device_signing_key(),
            tag,
            conv.key_epoch,
            counter,
            &mk,
            plaintext,
        )?;
        Ok((env, counter, early))
    }

    fn distribute_chain(&mut self, conv: &Conv, chain: &SendingChain) -> Result<(), ApiError> {
        let recipients = self.recipients(conv)?;
        if recipients.devices.is_empty() {
            return Ok(());
        }
        self.send_chain_to(conv, &recipients.devices, chain.distribution())
    }

    /// Hands this device's sending chain for the conversation's epoch (its
    /// key and next counter) to `devices`, sealed to them.
    fn send_chain_to(
        &mut self,
        conv: &Conv,
        devices: &[(DeviceId, [u8; 32])],
        (chain_key, next_counter): ([u8; 32], u64),
    ) -> Result<(), ApiError> {
        // Sealed to one-time keys where this device holds them.
        let devices = self.take_one_time_keys(devices)?;
        let payload = Payload::SenderKey(SenderKey {
            epoch: conv.key_epoch,
            chain_key,
            next_counter,
            sender_cert: self.e.identity.certificate().clone(),
            sender_name: self.e.name.clone(),
        });
        let env = self.seal_to(conv.id, &devices, &payload)?;
        self.send_envelope(conv, &env, conv.key_epoch, 0, false, Ack::Publish)?;
        Ok(())
    }

    fn seal_to(
        &self,
        conv: ConversationId,
        recipients: &[(DeviceId, [u8; 32])],
        payload: &Payload,
    ) -> Result<Envelope, ApiError> {
        self.check_not_revoked()?;
        let tag = match self.e.convs.get(&conv) {
            Some(c) => routing_tag_of(c)?,
            None => return Err(ApiError::failed("no such conversation")),
        };
        Ok(envelope::seal_to_devices(
            self.e.identity.device_signing_key(),
            tag,
            conv,
            recipients,
            fresh_key()?,
            fresh_key()?,
            // Wiped once sealed: a sender key's chain key is in it.
            &zeroize::Zeroizing::new(payload.encode()),
        )?)
    }

    /// Sends a freshly made envelope: gossip to the topic (flood-published
    /// to every peer known to be subscribed), directly to member peers that
    /// are connected but not (yet) known to be subscribed, and remembers
    /// who is still missing it (for messages: every member device until it
    /// acknowledges). Returns whether any member peer was reached.
    fn send_envelope(
        &mut self,
        conv: &Conv,
        env: &Envelope,
        epoch: u64,
        counter: u64,
        early: bool,
        ack: Ack,
    ) -> Result<bool, ApiError> {
        self.publish(conv, env, early);
        self.track_envelope(conv, env, epoch, counter, early, ack)
    }

    /// Floods an envelope on the conversation's topic (now if `early`).
    fn publish(&mut self, conv: &Conv, env: &Envelope, early: bool) {
        if self.e.net_online {
            let publish = Effect::Net(NetCommand::Publish {
                topic: conv.topic.clone(),
                data: env.bytes().to_vec(),
            });
            self.later_or_now(publish, early);
        }
    }

    /// [`Self::send_envelope`] after the publish: offers, deposits, the
    /// envelope's row and its outbox entry.
    fn track_envelope(
        &mut self,
        conv: &Conv,
        env: &Envelope,
        epoch: u64,
        counter: u64,
        early: bool,
        ack: Ack,
    ) -> Result<bool, ApiError> {
        let targets = self.recipients(conv)?;
        let targets = &targets.peers;
        let mut missing = HashSet::new();
        let mut reached = false;
        if self.e.net_online {
            let subscribed = self.e.topic_peers.get(&conv.topic);
            let mut direct = Vec::new();
            for peer in targets.iter() {
                if subscribed.is_some_and(|s| s.contains(peer)) {
                    reached = true;
                    if ack == Ack::Receipt {
                        missing.insert(*peer);
                    }
                } else {
                    missing.insert(*peer);
                    if self.e.connected.contains(peer) {
                        direct.push(*peer);
                    }
                }
            }
            for peer in direct {
                self.offer(peer, env.id(), env.bytes().to_vec(), early);
            }
            // Devices that are away: their relays hold it for them.
            let away: Vec<(PeerId, EnvelopeId, Vec<u8>)> = missing
                .iter()
                .filter(|p| !self.e.connected.contains(p))
                .map(|p| (*p, env.id(), env.bytes().to_vec()))
                .collect();
            if !away.is_empty() {
                self.deposit(away);
            }
        } else {
            // Offline: everyone is missing it; the daemon will send it.
            missing = targets.iter().copied().collect();
        }
        let now = now_ms();
        self.db.insert_envelope(&EnvelopeRecord {
            id: env.id(),
            conversation: conv.id,
            sender_device: self.e.my_device,
            epoch,
            counter,
            bytes: env.bytes().to_vec(),
            received_at_ms: now,
            sealed: matches!(env.header.sealing, Sealing::Sealed { .. }),
        })?;
        if !missing.is_empty() {
            let expiry =
                i64::try_from(self.e.settings.outbox_expiry.as_millis()).unwrap_or(i64::MAX);
            self.db.enqueue_outbox(&OutboxEntry {
                envelope_id: env.id(),
                conversation: conv.id,
                bytes: env.bytes().to_vec(),
                created_at_ms: now,
                attempts: 0,
                next_attempt_at_ms: now + self.retry_delay_ms(0),
                expires_at_ms: now.saturating_add(expiry),
            })?;
            self.e.unreached.insert(env.id(), (conv.id, missing));
        }
        Ok(reached)
    }

    /// Runs an effect now (`early`: safe before the commit) or after it.
    fn later_or_now(&mut self, effect: Effect, early: bool) {
        if early {
            self.outlets.sent_early.set(true);
            run_effects(self.outlets, vec![effect]);
        } else {
            self.fx.push(effect);
        }
    }

    fn offer(&mut self, peer: PeerId, id: EnvelopeId, bytes: Vec<u8>, early: bool) {
        self.e
            .offered
            .insert((id, peer), tokio::time::Instant::now());
        if early {
            run_effects(
                self.outlets,
                vec![Effect::Direct {
                    peer,
                    envelopes: vec![(id, bytes)],
                }],
            );
            return;
        }
        // Coalesce with other envelopes for the same peer in this batch.
        for effect in self.fx.iter_mut() {
            if let Effect::Direct { peer: p, envelopes } = effect
                && *p == peer
                && envelopes.len() < DIRECT_BATCH
            {
                envelopes.push((id, bytes));
                return;
            }
        }
        self.fx.push(Effect::Direct {
            peer,
            envelopes: vec![(id, bytes)],
        });
    }

    /// A peer has an envelope: forget it from the outbox once every member
    /// peer has it, and mark the message sent.
    fn reached(&mut self, id: &EnvelopeId, peer: &PeerId) {
        self.e.offered.remove(&(*id, *peer));
        self.e.deposited.remove(&(*id, *peer));
        let Some((conv, missing)) = self.e.unreached.get_mut(id) else {
            return;
        };
        let conv = *conv;
        missing.remove(peer);
        if missing.is_empty() {
            self.e.unreached.remove(id);
            if let Err(e) = self.db.remove_outbox(id) {
                tracing::warn!("outbox: {e}");
            }
        }
        if let Ok(Some(m)) = self.db.message(id)
            && m.status == MessageStatus::Queued
            && self
                .db
                .set_message_status(id, MessageStatus::Sent)
                .unwrap_or(false)
        {
            self.fx.push(Effect::Event(Event::Status {
                id: id.to_string(),
                conversation: conv.to_string(),
                status: MessageStatus::Sent.as_str().to_string(),
                progress: None,
            }));
        }
    }

    /// Retries the outbox entries that are due: offered directly to the
    /// connected member peers still missing them, then scheduled again with
    /// exponential backoff and jitter. Entries past their expiry are given
    /// up.
    fn retry(&mut self) {
        let now = now_ms();
        match self.db.expire_outbox(now) {
            Ok(expired) => {
                for id in expired {
                    tracing::warn!(%id, "outbox entry expired undelivered");
                    self.e.unreached.remove(&id);
                }
            }
            Err(e) => tracing::warn!("outbox expiry: {e}"),
        }
        let due = match self.db.outbox_due(now, RETRY_BATCH) {
            Ok(due) => due,
            Err(e) => {
                tracing::warn!("outbox read: {e}");
                return;
            }
        };
        for entry in due {
            let id = entry.envelope_id;
            let Some((_, missing)) = self.e.unreached.get(&id) else {
                // Everyone has it (the entry outlived a restart's view).
                let _ = self.db.remove_outbox(&id);
                continue;
            };
            let peers: Vec<PeerId> = missing
                .iter()
                .filter(|p| self.e.connected.contains(p))
                .copied()
                .collect();
            let away: Vec<(PeerId, EnvelopeId, Vec<u8>)> = missing
                .iter()
                .filter(|p| !self.e.connected.contains(p))
                .map(|p| (*p, id, entry.bytes.clone()))
                .collect();
            for peer in peers {
                self.offer(peer, id, entry.bytes.clone(), false);
            }
            if !away.is_empty() {
                self.deposit(away);
            }
            let next = now + self.retry_delay_ms(entry.attempts.saturating_add(1));
            if let Err(e) = self.db.record_outbox_attempt(&id, next) {
                tracing::warn!("outbox: {e}");
            }
        }
    }

    /// The wait before retry number `attempt`: doubling from the base, up
    /// to the maximum, times a random factor in [0.5, 1.5) so that many
    /// nodes retrying do not move in step.
    fn retry_delay_ms(&self, attempt: u32) -> i64 {
        let base = self.e.settings.retry_base.as_millis() as f64;
        let max = self.e.settings.retry_max.as_millis() as f64;
        let delay = (base * 2f64.powi(attempt.min(30) as i32)).min(max);
        let jitter = 0.5 + (getrandom::u32().unwrap_or(u32::MAX / 2) as f64 / u32::MAX as f64);
        (delay * jitter) as i64
    }

    /// Forgets offers that were never answered, so they can be made again.
    fn purge_offered(&mut self) {
        let now = tokio::time::Instant::now();
        self.e
            .offered
            .retain(|_, at| now.duration_since(*at) < IN_FLIGHT);
    }

    fn offer_stored(&mut self, todo: Vec<(PeerId, EnvelopeId)>) {
        for (peer, id) in todo {
            match self.db.envelope(&id) {
                Ok(Some(env)) => self.offer(peer, id, env.bytes, false),
                Ok(None) => {
                    self.e.unreached.remove(&id);
                }
                Err(e) => tracing::warn!("outbox read: {e}"),
            }
        }
    }

    /// Offers a peer (just connected or subscribed, or that just
    /// acknowledged a batch) what it still misses, oldest first and a few
    /// batches at a time, leaving out what is already in flight to it.
    fn flush_to(&mut self, peer: PeerId, conv: Option<ConversationId>) {
        let wanted = |(c, missing): &(ConversationId, HashSet<PeerId>)| {
            conv.is_none_or(|x| x == *c) && missing.contains(&peer)
        };
        if !self.e.unreached.values().any(wanted) {
            return;
        }
        let order = match self.db.outbox_ids(usize::MAX) {
            Ok(ids) => ids,
            Err(e) => {
                tracing::warn!("outbox read: {e}");
                return;
            }
        };
        let now = tokio::time::Instant::now();
        let todo: Vec<(PeerId, EnvelopeId)> = order
            .into_iter()
            .filter(|id| {
                self.e.unreached.get(id).is_some_and(wanted)
                    && self
                        .e
                        .offered
                        .get(&(*id, peer))
                        .is_none_or(|at| now.duration_since(*at) >= IN_FLIGHT)
            })
            .map(|id| (peer, id))
            .take(4 * DIRECT_BATCH)
            .collect();
        self.offer_stored(todo);
    }

    // ---- groups ----------------------------------------------------------

    fn me_as_member(&self, role: GroupRole) -> GroupMember {
        GroupMember {
            user: self.e.my_user,
            name: self.e.name.clone(),
            role,
            devices: vec![self.e.identity.certificate().clone()],
        }
    }

    fn contact_as_member(&self, alias: &str) -> Result<GroupMember, ApiError> {
        let c = self.contact(alias)?;
        if c.blocked {
            return Err(ApiError::usage(format!("{alias} is blocked")));
        }
        let mut devices = Vec::new();
        for d in self.db.devices_of_user(&c.user_id)? {
            if let Ok(cert) = DeviceCertificate::from_stored_bytes(&d.cert) {
                devices.push(cert);
            }
        }
        devices.truncate(crate::identity::MAX_DEVICES);
        if devices.is_empty() {
            return Err(ApiError::failed(format!("no known device for {alias}")));
        }
        Ok(GroupMember {
            user: c.user_id,
            name: self.db.user_name(&c.user_id)?.unwrap_or(c.alias),
            role: GroupRole::Member,
            devices,
        })
    }

    fn group_create(&mut self, name: &str, members: &[String]) -> ApiResult {
        crate::identity::validate_name(name)
            .map_err(|_| ApiError::usage("group name must be 1 to 64 printable bytes"))?;
        let mut state = GroupState {
            id: ConversationId::new_group(
                random_bytes().map_err(|e| ApiError::failed(e.to_string()))?,
            ),
            name: name.to_string(),
            epoch: 1,
            members: vec![self.me_as_member(GroupRole::Admin)],
            routing: fresh_key()?,
        };
        for alias in members {
            let m = self.contact_as_member(alias)?;
            if state.member(&m.user).is_none() {
                state.members.push(m);
            }
        }
        state.check().map_err(|e| ApiError::usage(e.to_string()))?;
        let routing = state.routing();
        let record = ConversationRecord {
            id: state.id,
            kind: ConversationKind::Group,
            name: name.to_string(),
            topic: routing.topic(),
            tag: Some(routing.tag()),
            epoch: 0,
            state: None,
            created_at_ms: now_ms(),
            last_message_at_ms: None,
            unread: 0,
            key_epoch: 1,
        };
        self.db.insert_conversation(&record)?;
        let conv = self.apply_group(&state, &[])?;
        self.announce_group(&conv, &state, &[])?;
        to_value(&GroupView {
            id: state.id.to_string(),
            name: state.name.clone(),
            members: state.members.len(),
            role: "admin".into(),
            epoch: state.epoch,
        })
    }

    /// A group this user is an active member of, with its current state.
    fn active_group(&mut self, group: &str) -> Result<(Conv, Arc<GroupState>), ApiError> {
        let conv = self.group(group)?;
        let current = conv
            .group
            .clone()
            .ok_or_else(|| ApiError::failed("group has no state"))?;
        if !conv.active {
            return Err(ApiError::usage("you are no longer a member of this group"));
        }
        Ok((conv, current))
    }

    fn group_change(&mut self, group: &str, alias: &str, op: GroupOp) -> ApiResult {
        let (_, current) = self.active_group(group)?;
        if !current.is_admin(&self.e.my_user) {
            return Err(ApiError::usage("only an admin may do that"));
        }
        let mut next = GroupState::clone(&current);
        next.epoch += 1;
        // A new epoch, a new routing secret: a removed member cannot tell
        // the group's envelopes or topic from now on.
        next.routing = fresh_key()?;
        match op {
            GroupOp::Add => {
                let m = self.contact_as_member(alias)?;
                if current.member(&m.user).is_some() {
                    return Err(ApiError::usage(format!("{alias} is already a member")));
                }
                next.members.push(m);
            }
            GroupOp::Remove | GroupOp::Admin => {
                let user = self.member_user(&current, alias)?;
                if op == GroupOp::Remove {
                    if user == self.e.my_user {
                        return Err(ApiError::usage("to remove yourself, use group leave"));
                    }
                    next.members.retain(|m| m.user != user);
                } else {
                    for m in next.members.iter_mut().filter(|m| m.user == user) {
                        m.role = GroupRole::Admin;
                    }
                }
            }
        }
        next.check_transition(Some(&current), &self.e.my_user)
            .map_err(|e| ApiError::usage(e.to_string()))?;
        let removed: Vec<GroupMember> = current
            .members
            .iter()
            .filter(|m| next.member(&m.user).is_none())
            .cloned()
            .collect();
        let conv = self.apply_group(&next, &removed)?;
        self.announce_group(&conv, &next, &removed)?;
        to_value(&member_views(&next))
    }

    fn member_user(&self, state: &GroupState, alias: &str) -> Result<UserId, ApiError> {
        if let Ok(c) = self.contact(alias)
            && state.member(&c.user_id).is_some()
        {
            return Ok(c.user_id);
        }
        if let Ok(u) = alias.parse::<UserId>()
            && state.member(&u).is_some()
        {
            return Ok(u);
        }
        state
            .members
            .iter()
            .find(|m| m.name.eq_ignore_ascii_case(alias))
            .map(|m| m.user)
            .ok_or_else(|| ApiError::usage(format!("{alias} is not a member of {}", state.name)))
    }

    fn group_leave(&mut self, group: &str) -> ApiResult {
        let (_, current) = self.active_group(group)?;
        let next = current.without(&self.e.my_user, fresh_key()?);
        let me = current
            .member(&self.e.my_user)
            .cloned()
            .into_iter()
            .collect::<Vec<_>>();
        let conv = self.apply_group(&next, &me)?;
        self.announce_group(&conv, &next, &me)?;
        to_value(&serde_json::json!({ "conversation": conv.id.to_string(), "left": true }))
    }

    /// Seals the new state to every device of old and new members and
    /// sends it (gossip for current members, direct for new ones).
    fn announce_group(
        &mut self,
        conv: &Conv,
        state: &GroupState,
        removed: &[GroupMember],
    ) -> Result<(), ApiError> {
        let mut members: Vec<(DeviceId, [u8; 32])> = Vec::new();
        let mut leaving: Vec<(DeviceId, [u8; 32])> = Vec::new();
        for (list, of) in [(&mut members, &state.members[..]), (&mut leaving, removed)] {
            for d in of.iter().flat_map(|m| &m.devices) {
                if d.device != self.e.my_device && !list.iter().any(|(x, _)| *x == d.device) {
                    list.push((d.device, d.dh));
                }
            }
        }
        leaving.retain(|d| !members.contains(d));
        for (device, dh) in members.iter_mut().chain(leaving.iter_mut()) {
            *dh = self.sealing_key(device, *dh)?;
        }
        if !members.is_empty() {
            let env = self.seal_to(conv.id, &members, &Payload::Group(state.clone()))?;
            self.send_envelope(conv, &env, state.epoch, 0, false, Ack::Publish)?;
        }
        if !leaving.is_empty() {
            // Removed members must hear that they are out, but not the new
            // routing secret: they could follow the group's envelopes and
            // topic with it.
            let mut told = state.clone();
            told.routing = [0; 32];
            let env = self.seal_to(conv.id, &leaving, &Payload::Group(told))?;
            let mut them = conv.clone();
            let mut only_them = state.clone();
            only_them.members = removed.to_vec();
            them.group = Some(Arc::new(only_them));
            self.send_envelope(&them, &env, state.epoch, 0, false, Ack::Publish)?;
        }
        Ok(())
    }

    /// Stores a group state and updates the in-memory conversation.
    fn apply_group(
        &mut self,
        state: &GroupState,
        _removed: &[GroupMember],
    ) -> Result<Conv, ApiError> {
        if self
            .e
            .convs
            .get(&state.id)
            .is_some_and(|c| c.kind != ConversationKind::Group)
        {
            return Err(ApiError::failed("not a group conversation"));
        }
        let now = now_ms();
        for m in &state.members {
            self.db.upsert_user(&m.user, &m.name, now)?;
            for d in &m.devices {
                // Received states are checked before (`receive_group`).
                if let Binding::OtherUser(owner) = self.bind_device(d)? {
                    tracing::warn!(device = %d.device, %owner, "group member's device belongs to another account");
                }
            }
        }
        self.db
            .update_conversation_state(&state.id, &state.name, state.epoch, &state.encode())?;
        let members: Vec<(UserId, Role)> = state
            .members
            .iter()
            .map(|m| (m.user, role_of(m.role)))
            .collect();
        self.db.set_members(&state.id, &members)?;
        self.devices_changed();
        let active = state.member(&self.e.my_user).is_some();
        // Every group change starts new sending chains (after a removal,
        // the removed member must not read on).
        let key_epoch = match self.e.convs.get(&state.id) {
            Some(c) if c.group.as_deref() == Some(state) => c.key_epoch,
            Some(c) => c.key_epoch.saturating_add(1),
            None => 1,
        };
        self.db.set_key_epoch(&state.id, key_epoch)?;
        let routing = state.routing();
        self.db
            .set_routing(&state.id, &routing.topic(), &routing.tag())?;
        let conv = Conv {
            id: state.id,
            kind: ConversationKind::Group,
            topic: routing.topic(),
            tag: Some(routing.tag()),
            epoch: state.epoch,
            key_epoch,
            members: state.members.iter().map(|m| m.user).collect(),
            group: Some(Arc::new(state.clone())),
            active,
        };
        // The topic moves with the routing secret: leave the old one, join
        // the new one (while still a member; a repeated subscription is a
        // no-op).
        let joined = active && self.e.convs.get(&state.id).is_none_or(|c| !c.active);
        // Devices of members added since the state this device held: they
        // are handed its handout key (one that joins has none of ours).
        let known: HashSet<DeviceId> = self
            .e
            .convs
            .get(&state.id)
            .and_then(|c| c.group.as_deref())
            .into_iter()
            .flat_map(|g| {
                g.members
                    .iter()
                    .flat_map(|m| m.devices.iter().map(|d| d.device))
            })
            .collect();
        let added: Vec<(DeviceId, [u8; 32])> = state
            .members
            .iter()
            .flat_map(|m| &m.devices)
            .filter(|d| d.device != self.e.my_device && !known.contains(&d.device))
            .map(|d| (d.device, d.dh))
            .collect();
        if let Some(old) = self.e.convs.get(&state.id)
            && old.active
            && (!active || old.topic != conv.topic)
        {
            self.fx
                .push(Effect::Net(NetCommand::Unsubscribe(old.topic.clone())));
        }
        self.add_conv(conv.clone());
        if joined {
            self.hand_out_in(&conv)?;
        } else if active {
            self.hand_out_to_new_members(&conv, &added)?;
        }
        self.fx.push(Effect::Event(Event::Member {
            conversation: state.id.to_string(),
            name: state.name.clone(),
            epoch: state.epoch,
            members: member_views(state),
            active,
        }));
        Ok(conv)
    }

    // ---- views -----------------------------------------------------------

    fn user_name(&self, user: &UserId) -> String {
        if *user == self.e.my_user {
            return self.e.name.clone();
        }
        if let Ok(Some(c)) = self.db.contact(user) {
            return c.alias;
        }
        self.db
            .user_name(user)
            .ok()
            .flatten()
            .unwrap_or_else(|| user.to_string()[..8].to_string())
    }

    /// The API's view of a message. `with_receipts`: look up the per-member
    /// receipts and progress (not needed for a message just received).
    fn message_view(
        &self,
        r: &MessageRecord,
        with_receipts: bool,
    ) -> Result<MessageView, ApiError> {
        let conv = self.e.convs.get(&r.conversation);
        let outgoing = r.sender_user == self.e.my_user;
        let (receipts, progress) = match conv {
            Some(c) if with_receipts => {
                let (receipts, progress) = self.receipt_views(c, r)?;
                let receipts = (c.kind == ConversationKind::Group).then_some(receipts);
                (receipts, outgoing.then_some(progress))
            }
            _ => (None, None),
        };
        Ok(MessageView {
            id: r.id.to_string(),
            conversation: r.conversation.to_string(),
            sender: r.sender_user.to_string(),
            sender_name: self.user_name(&r.sender_user),
            text: r.text.clone(),
            sent_at: r.sent_at_ms,
            status: r.status.as_str().to_string(),
            reply_to: r.reply_to.map(|m| m.to_string()),
            edited: r.edited,
            deleted: r.deleted,
            reactions: {
                let mut by_emoji = std::collections::BTreeMap::<String, Vec<String>>::new();
                for (user, emoji) in self.db.reactions(&r.id)? {
                    by_emoji.entry(emoji).or_default().push(user.to_string());
                }
                by_emoji
            },
            receipts,
            progress,
            hlc: r.hlc,
            outgoing,
        })
    }

    // ---- network ---------------------------------------------------------

    fn on_net(&mut self, ev: NetEvent) {
        match ev {
            NetEvent::Gossip {
                message_id,
                source,
                topic,
                data,
            } => {
                let verdict = self.receive(&data, Via::Gossip, Some(&topic));
                self.report(message_id, source, verdict);
            }
            NetEvent::Direct { peer, data, reply } => {
                let response = match postcard::from_bytes::<DirectRequest>(&data) {
                    Ok(DirectRequest::Sync(request)) => self.answer_sync(peer, request),
                    Ok(DirectRequest::Link(request)) => self.answer_link(peer, request),
                    Ok(DirectRequest::History(request)) => self.answer_history(peer, request),
                    Ok(DirectRequest::Presence { interval_ms }) => {
                        self.on_presence(peer, interval_ms);
                        DirectResponse::Ack { accepted: 1 }
                    }
                    Ok(DirectRequest::Typing {
                        conversation,
                        typing,
                    }) => {
                        self.on_typing(peer, conversation, typing);
                        DirectResponse::Ack { accepted: 1 }
                    }
                    Ok(DirectRequest::Envelopes(envs)) => {
                        let mut accepted = 0u32;
                        self.preverify(envs.iter().take(DIRECT_BATCH).map(Vec::as_slice));
                        for bytes in envs.iter().take(DIRECT_BATCH) {
                            match self.receive(bytes, Via::Direct, None) {
                                Verdict::Reject(why) => {
                                    tracing::debug!(%peer, "direct envelope rejected: {why}");
                                    self.fx.push(Effect::Net(NetCommand::Penalize {
                                        peer,
                                        reason: why,
                                    }));
                                }
                                _ => accepted += 1,
                            }
                        }
                        DirectResponse::Ack { accepted }
                    }
                    Err(_) => {
                        self.fx.push(Effect::Net(NetCommand::Penalize {
                            peer,
                            reason: "malformed direct request",
                        }));
                        DirectResponse::Refused("malformed request".into())
                    }
                };
                let bytes = postcard::to_stdvec(&response).unwrap_or_default();
                self.fx.push(Effect::DirectReply(reply, bytes));
            }
            NetEvent::Connected { peer, .. } => {
                self.e.connected.insert(peer);
                self.fx.push(Effect::Event(Event::Peer {
                    peer_id: peer.to_string(),
                    connected: true,
                }));
                self.flush_to(peer, None);
                self.heartbeat_to(peer);
                self.sync_with(peer);
                self.relay_connected(peer);
                self.history_from(peer);
            }
            NetEvent::Disconnected { peer } => {
                self.e.connected.remove(&peer);
                self.peer_gone(peer);
                for peers in self.e.topic_peers.values_mut() {
                    peers.remove(&peer);
                }
                self.fx.push(Effect::Event(Event::Peer {
                    peer_id: peer.to_string(),
                    connected: false,
                }));
            }
            NetEvent::Subscribed { peer, topic } => {
                let peers = self.e.topic_peers.entry(topic.clone()).or_default();
                peers.insert(peer);
                let conv = self.e.by_topic.get(&topic).copied();
                if conv.is_some() {
                    self.flush_to(peer, conv);
                }
            }
            NetEvent::Unsubscribed { peer, topic } => {
                if let Some(peers) = self.e.topic_peers.get_mut(&topic) {
                    peers.remove(&peer);
                }
            }
            NetEvent::Listening { .. } => {}
            NetEvent::RelayFound { relay, addr } => self.relay_found(relay, addr),
            NetEvent::PeerAddrs { peer, addrs } => self.peer_addrs(peer, addrs),
            NetEvent::MailWaiting { relay } => {
                if self.e.relays.iter().any(|(p, _)| *p == relay) {
                    self.fetch_mail(relay);
                }
            }
        }
    }

    fn report(&mut self, message_id: GossipId, source: PeerId, verdict: Verdict) {
        let acceptance = match verdict {
            Verdict::Accept => MessageAcceptance::Accept,
            Verdict::Ignore => MessageAcceptance::Ignore,
            Verdict::Reject(why) => {
                tracing::debug!(%source, "gossip message rejected: {why}");
                self.fx.push(Effect::Net(NetCommand::Penalize {
                    peer: source,
                    reason: why,
                }));
                MessageAcceptance::Reject
            }
        };
        self.fx.push(Effect::Net(NetCommand::Validation {
            message_id,
            source,
            acceptance,
        }));
    }

    /// Validates, opens and stores one envelope from the network.
    fn receive(&mut self, bytes: &[u8], via: Via, topic: Option<&str>) -> Verdict {
        match self.try_receive(bytes, via, topic) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!("storage error while receiving: {e}");
                Verdict::Ignore
            }
        }
    }

    fn try_receive(
        &mut self,
        bytes: &[u8],
        via: Via,
        topic: Option<&str>,
    ) -> Result<Verdict, ApiError> {
        let env = match Envelope::decode(bytes) {
            Ok(env) => env,
            Err(CryptoError::Version(v)) => {
                tracing::debug!("refused an envelope of version {v} (this node speaks 2)");
                return Ok(Verdict::Reject("envelope of another protocol version"));
            }
            Err(_) => return Ok(Verdict::Reject("malformed envelope")),
        };
        // On gossip, the tag must belong to the topic's conversation (both
        // derive from the same routing secret).
        let tagged = self.conversation_of_tag(&env.header.tag)?;
        if let Some(topic) = topic {
            let Some(topic_conv) = self.e.by_topic.get(topic).copied() else {
                return Ok(Verdict::Ignore);
            };
            if tagged.is_some_and(|c| c != topic_conv) {
                return Ok(Verdict::Reject("envelope for another conversation"));
            }
        }
        if env.header.sender == self.e.my_device {
            return Ok(Verdict::Ignore);
        }
        let id = env.id();
        if self.db.has_envelope(&id)? {
            // Stored once, whatever the path. Not a strike even on gossip:
            // an honest envelope can come both directly (an offer to a peer
            // whose subscription was not known yet, a retry) and by gossip,
            // and penalising the forwarder for that banned honest peers
            // under load. A replaying peer gains nothing from it.
            if via == Via::Direct {
                // Offered again: its sender may have missed our receipt.
                self.acknowledge_again(&id)?;
            }
            return Ok(Verdict::Ignore);
        }
        if !self.verified.remove(&id) {
            let Some(key) = self.verifying_key(&env.header.sender) else {
                return Ok(Verdict::Reject("bad signature"));
            };
            if env.verify_with(&key).is_err() {
                return Ok(Verdict::Reject("bad signature"));
            }
        }
        if self.is_revoked(&env.header.sender)? {
            // Not a strike: an honest peer may forward it before it hears
            // of the revocation.
            return Ok(Verdict::Ignore);
        }
        match env.header.sealing.clone() {
            Sealing::Sealed { .. } => self.receive_sealed(&env, tagged, topic, via),
            Sealing::Chain { epoch, counter } => match tagged {
                Some(conv_id) => self.receive_chain(&env, conv_id, epoch, counter, via),
                None => {
                    // A tag we do not know (yet): a group whose state is
                    // on its way. It waits under its tag.
                    self.keep_pending(&env, &tag_slot(&env.header.tag))?;
                    Ok(Verdict::Ignore)
                }
            },
        }
    }

    /// A device's key, decoded (kept for its next envelope).
    fn verifying_key(&mut self, device: &DeviceId) -> Option<ed25519_dalek::VerifyingKey> {
        if let Some(key) = self.e.verifying_keys.get(device) {
            return Some(*key);
        }
        let key = ed25519_dalek::VerifyingKey::from_bytes(&device.0).ok()?;
        if self.e.verifying_keys.len() >= VERIFYING_KEYS {
            self.e.verifying_keys.clear();
        }
        self.e.verifying_keys.insert(*device, key);
        Some(key)
    }

    /// Checks the signatures of many envelopes ahead of receiving them one
    /// by one: half on this thread, half on another (signature checks are
    /// most of the cost of taking in a backlog). Those that pass are not
    /// checked again; the rest are, and are refused as usual.
    fn preverify<'b>(&mut self, envelopes: impl IntoIterator<Item = &'b [u8]>) {
        let mut work = Vec::new();
        for bytes in envelopes {
            if let Ok(env) = Envelope::decode(bytes)
                && let Some(key) = self.verifying_key(&env.header.sender)
            {
                work.push((env, key));
            }
        }
        if work.len() < PARALLEL_VERIFY_MIN {
            return;
        }
        let check = |part: &[(Envelope, ed25519_dalek::VerifyingKey)]| -> Vec<EnvelopeId> {
            part.iter()
                .filter(|(env, key)| env.verify_with(key).is_ok())
                .map(|(env, _)| env.id())
                .collect()
        };
        let (theirs, mine) = work.split_at(work.len() / 2);
        let (a, b) = std::thread::scope(|s| {
            let other = s.spawn(|| check(theirs));
            let b = check(mine);
            // A panicked helper verified nothing: its envelopes are
            // checked again one by one.
            (other.join().unwrap_or_default(), b)
        });
        self.verified.extend(a);
        self.verified.extend(b);
    }

    fn sender_user(&mut self, device: &DeviceId) -> Result<Option<UserId>, ApiError> {
        if let Some(user) = self.e.device_users.get(device) {
            return Ok(*user);
        }
        let user = self
            .db
            .device(device)?
            .filter(|d| !d.revoked)
            .map(|d| d.user_id);
        if self.e.device_users.len() >= DEVICE_USERS_CACHE {
            self.e.device_users.clear();
        }
        self.e.device_users.insert(*device, user);
        Ok(user)
    }

    /// Keeps an envelope that cannot be taken yet, under its conversation
    /// (or, for a tag not known yet, under [`tag_slot`]).
    fn keep_pending(&mut self, env: &Envelope, slot: &ConversationId) -> Result<(), ApiError> {
        self.db
            .add_pending(slot, env.bytes(), now_ms(), PENDING_CAP)?;
        Ok(())
    }

    fn receive_sealed(
        &mut self,
        env: &Envelope,
        tagged: Option<ConversationId>,
        topic: Option<&str>,
        via: Via,
    ) -> Result<Verdict, ApiError> {
        if let Some(opened) = self.open_with_one_time_key(env)? {
            let verdict =
                self.receive_opened(env, opened.conv, &opened.plain, tagged, topic, via)?;
            // Spent once the envelope is stored: it is never opened again.
            // One kept pending (a group not known yet) or set aside (a
            // blocked sender) may have to open again later.
            if self.db.has_envelope(&env.id())? {
                self.one_time_key_used(&opened.key, env.header.sender)?;
            }
            return Ok(verdict);
        }
        let keys = self.opening_keys()?;
        let keys: Vec<&x25519_dalek::StaticSecret> = keys.iter().collect();
        let (conv_id, plain) = match env.open_sealed_any(&self.e.my_device, &keys) {
            Ok((conv_id, plain)) => (conv_id, zeroize::Zeroizing::new(plain)),
            Err(CryptoError::NotARecipient) => {
                // For other members (e.g. keys for a later epoch): forward
                // it if a member sent it under a tag we know.
                let Some(conv_id) = tagged else {
                    return Ok(Verdict::Ignore);
                };
                let member = self.sender_user(&env.header.sender)?.is_some_and(|u| {
                    self.e
                        .convs
                        .get(&conv_id)
                        .is_some_and(|c| c.members.contains(&u))
                });
                if !member {
                    return Ok(Verdict::Ignore);
                }
                // Kept so that catch-up can hand it to the members it is for.
                self.store_envelope(env, &conv_id, 0, 0)?;
                return Ok(Verdict::Accept);
            }
            Err(CryptoError::Decrypt) if self.sender_user(&env.header.sender)?.is_some() => {
                // Signed by a device we know: sealed to a key erased since
                // (an old envelope offered again), not junk.
                return Ok(Verdict::Ignore);
            }
            Err(_) => return Ok(Verdict::Reject("sealed envelope does not open")),
        };
        self.receive_opened(env, conv_id, &plain, tagged, topic, via)
    }

    /// A sealed envelope opened: its conversation checked against how it
    /// came, its payload taken.
    fn receive_opened(
        &mut self,
        env: &Envelope,
        conv_id: ConversationId,
        plain: &[u8],
        tagged: Option<ConversationId>,
        topic: Option<&str>,
        via: Via,
    ) -> Result<Verdict, ApiError> {
        // The tag, where we know it, must name the conversation inside; on
        // gossip, so must the topic.
        if tagged.is_some_and(|c| c != conv_id)
            || topic.is_some_and(|t| self.e.by_topic.get(t) != Some(&conv_id))
        {
            return Ok(Verdict::Reject("envelope for another conversation"));
        }
        let Some(payload) = Payload::decode(plain) else {
            return Ok(Verdict::Reject("malformed payload"));
        };
        match payload {
            Payload::SenderKey(sk) => self.receive_sender_key(env, conv_id, sk, via),
            Payload::Devices(certs) => self.receive_devices(env, conv_id, certs),
            Payload::Revoked(revocation) => self.receive_revocation(env, conv_id, revocation),
            Payload::Group(state) => self.receive_group(env, conv_id, state),
            Payload::HandoutKey(key) => self.receive_handout_key(env, conv_id, key),
            Payload::OneTimeKeys(batches) => self.receive_one_time_keys(env, conv_id, batches),
            Payload::Text(_) | Payload::Receipt(_) | Payload::Annotate(_) | Payload::Account(_) => {
                Ok(Verdict::Reject("messages must be chain-sealed"))
            }
        }
    }

    /// Retries what waits for a gap, in conversations where this batch
    /// stored chain envelopes (the gap may be filled now).
    fn fill_gaps(&mut self) {
        let convs: Vec<ConversationId> = self
            .chain_stored
            .iter()
            .filter(|c| self.e.gaps.contains(c))
            .copied()
            .collect();
        for conv in convs {
            self.e.gaps.remove(&conv);
            // Anything still too far ahead puts the conversation back.
            self.reprocess_pending(&conv);
        }
    }

    fn store_envelope(
        &mut self,
        env: &Envelope,
        conv_id: &ConversationId,
        epoch: u64,
        counter: u64,
    ) -> Result<(), ApiError> {
        if matches!(env.header.sealing, Sealing::Chain { .. }) {
            self.chain_stored.insert(*conv_id);
        }
        self.db.insert_envelope(&EnvelopeRecord {
            id: env.id(),
            conversation: *conv_id,
            sender_device: env.header.sender,
            epoch,
            counter,
            bytes: env.bytes().to_vec(),
            received_at_ms: now_ms(),
            sealed: matches!(env.header.sealing, Sealing::Sealed { .. }),
        })?;
        Ok(())
    }

    fn receive_sender_key(
        &mut self,
        env: &Envelope,
        conv_id: ConversationId,
        sk: SenderKey,
        via: Via,
    ) -> Result<Verdict, ApiError> {
        let cert = &sk.sender_cert;
        if cert.device != env.header.sender || cert.verify().is_err() {
            return Ok(Verdict::Reject("sender key with a foreign certificate"));
        }
        // Weft checks names wherever they are set: one that fails was
        // crafted (to drive a terminal or pass for someone else).
        if crate::identity::validate_name(&sk.sender_name).is_err() {
            return Ok(Verdict::Reject("sender key with an invalid name"));
        }
        let user = cert.user;
        if self.e.blocked.contains(&user) {
            return Ok(Verdict::Ignore);
        }
        if !self.e.convs.contains_key(&conv_id) {
            if conv_id == ConversationId::direct(&self.e.my_user, &user) {
                // A first message from someone who has our invite.
                if let Binding::OtherUser(_) = self.bind_device(cert)? {
                    return Ok(Verdict::Reject("a device of another account"));
                }
                self.db.upsert_user(&user, &sk.sender_name, now_ms())?;
                let name = sk.sender_name.clone();
                self.ensure_direct(&user, &name)?;
            } else {
                // A group we have not heard of yet: its state may follow.
                self.keep_pending(env, &conv_id)?;
                return Ok(if via == Via::Gossip {
                    Verdict::Ignore
                } else {
                    Verdict::Accept
                });
            }
        }
        let is_member = self
            .e
            .convs
            .get(&conv_id)
            .is_some_and(|c| c.members.contains(&user));
        if !is_member {
            self.keep_pending(env, &conv_id)?;
            return Ok(Verdict::Ignore);
        }
        // A direct contact's device we learn about here must be certified by
        // that contact's user key, which `cert.verify` established.
        if let Binding::OtherUser(_) = self.bind_device(cert)? {
            return Ok(Verdict::Reject("a device of another account"));
        }
        if self
            .db
            .get_chain(&conv_id, &cert.device, sk.epoch)?
            .is_none()
        {
            let chain = ReceivingChain::new(sk.chain_key, sk.next_counter);
            self.db
                .put_chain(&conv_id, &cert.device, sk.epoch, &chain.to_bytes())?;
            self.cache_chain((conv_id, cert.device, sk.epoch), chain);
        }
        self.store_envelope(env, &conv_id, sk.epoch, 0)?;
        self.reprocess_pending(&conv_id);
        Ok(Verdict::Accept)
    }

    fn cache_chain(&mut self, key: (ConversationId, DeviceId, u64), chain: ReceivingChain) {
        if self.e.receiving.len() >= CHAIN_CACHE {
            // Nothing moved on may be dropped unwritten.
            self.save_chains();
            self.e.receiving.clear();
        }
        self.e.receiving.insert(key, chain);
    }

    /// Writes the receiving chains this batch moved on (once each, however
    /// many envelopes moved them), before the batch commits.
    fn save_chains(&mut self) {
        for key in std::mem::take(&mut self.e.dirty_chains) {
            let Some(chain) = self.e.receiving.get(&key) else {
                continue;
            };
            if let Err(e) = self.db.put_chain(&key.0, &key.1, key.2, &chain.to_bytes()) {
                tracing::error!("cannot save a receiving chain: {e}");
            }
        }
    }

    fn receive_group(
        &mut self,
        env: &Envelope,
        conv_id: ConversationId,
        state: GroupState,
    ) -> Result<Verdict, ApiError> {
        if state.id != conv_id {
            return Ok(Verdict::Reject("group state for another conversation"));
        }
        // Only a group's id takes a group state: a one-to-one or account
        // conversation's would hand its key to whoever the state names.
        match self.e.convs.get(&state.id) {
            Some(c) if c.kind != ConversationKind::Group => {
                return Ok(Verdict::Reject("group state for a one-to-one conversation"));
            }
            Some(_) => {}
            None if !state.id.is_group_form() => {
                return Ok(Verdict::Reject(
                    "group state for an id that is not a group's",
                ));
            }
            None => {}
        }
        // The author is whoever owns the signing device, as certified in the
        // current or the new state.
        let current = self.e.convs.get(&state.id).and_then(|c| c.group.clone());
        let author = current
            .as_deref()
            .into_iter()
            .chain(std::iter::once(&state))
            .flat_map(|g| g.members.iter())
            .find(|m| m.devices.iter().any(|d| d.device == env.header.sender))
            .map(|m| m.user);
        let Some(author) = author else {
            return Ok(Verdict::Reject("group change from an unknown device"));
        };
        // A device belongs to the account it was first bound to.
        for m in &state.members {
            for d in &m.devices {
                if self
                    .db
                    .device(&d.device)?
                    .is_some_and(|known| known.user_id != m.user)
                {
                    return Ok(Verdict::Reject(
                        "group state moves a device to another account",
                    ));
                }
            }
        }
        if self.e.blocked.contains(&author) && current.is_none() {
            return Ok(Verdict::Ignore);
        }
        match state.check_transition(current.as_deref(), &author) {
            Ok(()) => {}
            Err(crate::group::GroupError::Stale) => {
                // Envelopes sent under the state that lost still carry its
                // tag: keep recognising it.
                let tag = state.routing().tag();
                self.db.add_routing_tag(&tag, &state.id)?;
                self.tag_found(tag, state.id);
                self.store_envelope(env, &conv_id, state.epoch, 0)?;
                return Ok(Verdict::Accept);
            }
            Err(e) => {
                tracing::debug!("group change refused: {e}");
                return Ok(Verdict::Reject("group change not allowed"));
            }
        }
        if current.is_none() {
            if state.member(&self.e.my_user).is_none() {
                return Ok(Verdict::Ignore);
            }
            let routing = state.routing();
            self.db.insert_conversation(&ConversationRecord {
                id: state.id,
                kind: ConversationKind::Group,
                name: state.name.clone(),
                topic: routing.topic(),
                tag: Some(routing.tag()),
                epoch: 0,
                state: None,
                created_at_ms: now_ms(),
                last_message_at_ms: None,
                unread: 0,
                key_epoch: 1,
            })?;
        }
        self.apply_group(&state, &[])?;
        self.store_envelope(env, &conv_id, state.epoch, 0)?;
        self.reprocess_pending(&state.id);
        // A member who left chose the new epoch's routing secret: an
        // admin moves the group on to one the leaver does not know.
        // (Admins doing so at once converge like any concurrent change.)
        if state.member(&author).is_none() && state.is_admin(&self.e.my_user) {
            let mut next = state.clone();
            next.epoch += 1;
            next.routing = fresh_key()?;
            let conv = self.apply_group(&next, &[])?;
            self.announce_group(&conv, &next, &[])?;
        }
        Ok(Verdict::Accept)
    }

    fn receive_chain(
        &mut self,
        env: &Envelope,
        conv_id: ConversationId,
        epoch: u64,
        counter: u64,
        via: Via,
    ) -> Result<Verdict, ApiError> {
        let Some(conv) = self.e.convs.get(&conv_id).cloned() else {
            self.keep_pending(env, &conv_id)?;
            return Ok(Verdict::Ignore);
        };
        let Some(user) = self.sender_user(&env.header.sender)? else {
            // A device we have not met: its key (with its certificate) may
            // still be on the way.
            self.keep_pending(env, &conv_id)?;
            return Ok(Verdict::Ignore);
        };
        if !conv.members.contains(&user) {
            return Ok(Verdict::Reject("sender is not a member"));
        }
        if !conv.active {
            return Ok(Verdict::Ignore);
        }
        let key = (conv_id, env.header.sender, epoch);
        let now = now_ms();
        let chain = match self.e.receiving.get(&key) {
            Some(c) => Some(c.clone()),
            None => match self.db.get_chain(&conv_id, &env.header.sender, epoch)? {
                Some(bytes) => Some(ReceivingChain::from_bytes(&bytes, now)?),
                None => None,
            },
        };
        let Some(chain) = chain else {
            self.keep_pending(env, &conv_id)?;
            // A member's envelope we cannot read yet: still forward it.
            return Ok(if via == Via::Gossip {
                Verdict::Accept
            } else {
                Verdict::Ignore
            });
        };
        let (mk, after) = match chain.key_for(counter, now, self.e.settings.skipped_key_max_age) {
            Ok(x) => x,
            // Its key was kept for it as long as promised: it stays unread.
            Err(CryptoError::SkippedKeyExpired(_)) => return Ok(Verdict::Ignore),
            // A key already used: a replay on gossip; on a direct stream,
            // most likely an honest retry of something we have.
            Err(CryptoError::Replay(_)) if via != Via::Gossip => return Ok(Verdict::Ignore),
            Err(CryptoError::Replay(_)) => return Ok(Verdict::Reject("message key already used")),
            // Far ahead of what we hold: we missed many of this sender's
            // messages (we were away). Keep it until catch-up fills the gap.
            Err(CryptoError::TooFarAhead { .. }) => {
                self.keep_pending(env, &conv_id)?;
                self.e.gaps.insert(conv_id);
                self.catch_up(conv_id);
                return Ok(if via == Via::Gossip {
                    Verdict::Accept
                } else {
                    Verdict::Ignore
                });
            }
            Err(_) => return Ok(Verdict::Reject("counter out of range")),
        };
        let Ok(plain) = env.open_chain(&mk).map(zeroize::Zeroizing::new) else {
            return Ok(Verdict::Reject("does not decrypt"));
        };
        let Some(payload) = Payload::decode(&plain) else {
            return Ok(Verdict::Reject("malformed payload"));
        };
        let blocked = self.e.blocked.contains(&user);
        let t = match payload {
            Payload::Text(t) if t.text.len() > MAX_TEXT_BYTES => {
                return Ok(Verdict::Reject("text over the length limit"));
            }
            Payload::Text(t) => t,
            Payload::Receipt(receipt) => {
                self.advance_chain(key, after)?;
                self.store_envelope(env, &conv_id, epoch, counter)?;
                if !blocked {
                    self.receive_receipt(&conv, user, env.header.sender, receipt)?;
                }
                return Ok(Verdict::Accept);
            }
            Payload::Annotate(a) => {
                self.advance_chain(key, after)?;
                self.store_envelope(env, &conv_id, epoch, counter)?;
                if blocked {
                    return Ok(Verdict::Accept);
                }
                return Ok(
                    match self.receive_annotation(&conv, user, env.header.sender, a) {
                        Ok(()) => Verdict::Accept,
                        Err(why) => Verdict::Reject(why),
                    },
                );
            }
            Payload::Account(a) => {
                if conv_id != account::account_conversation(&self.e.my_user)
                    || user != self.e.my_user
                {
                    return Ok(Verdict::Reject("account state outside the account"));
                }
                self.advance_chain(key, after)?;
                self.store_envelope(env, &conv_id, epoch, counter)?;
                return Ok(match self.receive_account_change(env.header.sender, a) {
                    Ok(()) => Verdict::Accept,
                    Err(why) => Verdict::Reject(why),
                });
            }
            _ => return Ok(Verdict::Reject("unexpected chain-sealed payload")),
        };
        let now = now_ms();
        // A clock far in the future is clamped, and ours moves past it.
        let hlc = self.e.clock.observe(t.hlc, now.max(0) as u64);
        // Another device of this account may have read this far already.
        let read = user != self.e.my_user && hlc.0 <= self.read_position(&conv_id);
        let record = MessageRecord {
            id: env.id(),
            conversation: conv_id,
            sender_user: user,
            sender_device: env.header.sender,
            sent_at_ms: hlc.ms() as i64,
            received_at_ms: now,
            text: t.text,
            reply_to: t.reply_to,
            status: if read {
                MessageStatus::Read
            } else {
                MessageStatus::Delivered
            },
            edited: false,
            deleted: false,
            hlc: hlc.0,
            epoch: t.epoch,
        };
        if !blocked {
            self.typing_done(conv_id, user);
            // Shown at once, before the writes and the commit: the envelope
            // is authentic, new (not stored, its key unused) and opened.
            // Nothing is promised to the sender on the strength of this
            // event (acknowledgements wait for the commit), so showing it
            // early risks nothing and takes the writes off the latency.
            let view = self.message_view(&record, false)?;
            run_effects(self.outlets, vec![Effect::Event(Event::Message(view))]);
        }
        self.advance_chain(key, after)?;
        self.store_envelope(env, &conv_id, epoch, counter)?;
        // Blocked: verified and forwarded (the group keeps working), but
        // neither stored as a message nor shown.
        if !blocked && self.db.insert_message(&record)? {
            let unread = u32::from(user != self.e.my_user && !read);
            self.db
                .bump_conversation(&conv_id, record.sent_at_ms, unread)?;
            if user != self.e.my_user {
                self.delivered.push((conv_id, record.id));
            }
            self.annotations_waiting(&conv, &record.id);
        }
        Ok(Verdict::Accept)
    }

    /// Stores a receiving chain's state after a key was taken from it.
    fn advance_chain(
        &mut self,
        key: (ConversationId, DeviceId, u64),
        after: Option<ReceivingChain>,
    ) -> Result<(), ApiError> {
        if let Some(after) = after {
            // Written once at the end of the batch.
            self.cache_chain(key, after);
            self.e.dirty_chains.insert(key);
        }
        Ok(())
    }

    /// Retries envelopes of a conversation that were waiting for a key or a
    /// membership change.
    fn reprocess_pending(&mut self, conv: &ConversationId) {
        let rows = match self.db.pending_for_conversation(conv) {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!("pending read: {e}");
                return;
            }
        };
        self.preverify(rows.iter().map(|(_, bytes)| bytes.as_slice()));
        for (rowid, bytes) in rows {
            let _ = self.db.remove_pending(rowid);
            let _ = self.receive(&bytes, Via::Pending, None);
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum GroupOp {
    Add,
    Remove,
    Admin,
}

/// The routing secret of the one-to-one conversation with `other` (or of
/// the account's own, when `other` is this user): `None` while no
/// protocol 2 certificate of `other` is known (it carries their account
/// key).
fn direct_routing(
    identity: &Identity,
    db: &Db<'_>,
    other: &UserId,
) -> Result<Option<Routing>, StoreError> {
    let me = identity.user_id();
    let their_key = if *other == me {
        Some(identity.certificate().account_dh)
    } else {
        db.devices_of_user(other)?
            .iter()
            .filter_map(|d| DeviceCertificate::from_stored_bytes(&d.cert).ok())
            .max_by_key(|c| c.created_at_ms)
            .map(|c| c.account_dh)
    };
    Ok(their_key
        .and_then(|key| Routing::direct(identity.account_dh_secret(), &me, &key, other).ok()))
}

/// The routing tag a conversation's envelopes carry now.
fn routing_tag_of(conv: &Conv) -> Result<RoutingTag, ApiError> {
    conv.tag.ok_or_else(|| {
        ApiError::failed(
            "this conversation was made under protocol 1 and takes no new messages: exchange new invites (one-to-one) or make a new group",
        )
    })
}

/// Where chain envelopes of a routing tag not known yet wait: the tag,
/// padded to a conversation id (no real id has 16 zero bytes at the end
/// but with chance 2^-128).
fn tag_slot(tag: &RoutingTag) -> ConversationId {
    let mut slot = [0u8; 32];
    slot[..16].copy_from_slice(&tag.0);
    ConversationId(slot)
}

/// 32 bytes from the OS's random number generator.
fn fresh_key() -> Result<[u8; 32], ApiError> {
    random_bytes().map_err(|e| ApiError::failed(e.to_string()))
}

fn member_views(g: &GroupState) -> Vec<MemberView> {
    g.members
        .iter()
        .map(|m| MemberView {
            user_id: m.user.to_string(),
            name: m.name.clone(),
            role: role_name(m.role).to_string(),
            devices: m.devices.len(),
        })
        .collect()
}

/// Adds the network's part to a status reply.
pub(super) fn fill_status(value: &mut serde_json::Value, status: &NetStatus) {
    let listen: Vec<String> = status.listen.iter().map(|a| a.to_string()).collect();
    let peers: Vec<crate::api::PeerView> = status
        .peers
        .iter()
        .map(|p| crate::api::PeerView {
            peer_id: p.peer_id.to_string(),
            source: p.source.as_str().to_string(),
            addrs: p.addrs.iter().map(|a| a.to_string()).collect(),
        })
        .collect();
    if let Some(obj) = value.as_object_mut() {
        obj.insert("listen".into(), serde_json::json!(listen));
        obj.insert(
            "peers".into(),
            serde_json::to_value(peers).unwrap_or_default(),
        );
    }
}

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

use libp2p::PeerId;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

mod account;
mod annotations;
mod api;
mod chains;
mod contacts;
mod conversations;
mod devices;
mod directory;
mod effects;
mod error;
mod expiry;
mod groups;
mod handouts;
mod history;
mod net_events;
mod one_time_keys;
mod outbox;
mod permissions;
mod presence;
mod receipt_tally;
mod receipts;
mod receive;
mod relay;
mod send;
mod task;
pub use history::{HistoryCursor, HistoryRequest};
pub(super) use relay::found_relays;
mod sync;

pub use presence::Share;
pub use sync::{ChainHave, SyncRequest};

use chains::SendingSlot;
use directory::{MAX_REVOKED, Recipients};
use effects::{
    Input, Outlets, fail_inputs, let_network_run, recv_opt, run_effects, sleep_until_opt,
};

use super::Settings;
use crate::api::{ApiError, Event, MemberView, PeerView, Response, StatusView};
use crate::crypto::envelope::Envelope;
use crate::group::{GroupRole, GroupState};
use crate::hlc::{Clock, Hlc};
use crate::identity::{DeviceCertificate, Identity, random_bytes};
use crate::ids::{ConversationId, DeviceId, EnvelopeId, MessageId, RoutingTag, UserId};
use crate::net::{NetCommand, NetStatus};
use crate::routing::Routing;
use crate::store::{ConversationKind, Db, PendingCaps, PendingLimit, Role, Store, StoreError};
pub(super) use error::EngineError;

/// Most inputs handled in one transaction.
const BATCH: usize = 256;
/// Limits of the pending queue: envelopes we cannot place yet (a key, a
/// device or a group on its way), which anyone can make (a device key is
/// free) and any peer can hand over. Keeping one is cheap (the queue keeps
/// its counts), so what matters is room, and whose.
///
/// - In all, 10,000 envelopes and 64 MiB: far more than honest use keeps
///   (messages that came before their key or group, or too far ahead of a
///   gap, wait seconds to a catch-up), and the disk a stranger can take
///   stays small; without the byte cap 10,000 envelopes of up to 1 MiB
///   could take 10 GB.
/// - Per delivering peer, a quarter (2,500 envelopes, 16 MiB): one peer
///   pushes out only its own rows; it takes four flooding at once to fill
///   the queue, and then the totals push out the largest holder's rows,
///   not the honest peer's few.
/// - Per claimed sender device, a tenth (1,000 envelopes, 8 MiB): one
///   sender's flood forwarded by honest gossip peers stays small in each
///   of their shares. An honest device rarely has more than a few hundred
///   envelopes waiting; what it loses past that, catch-up brings again
///   once the key or group is here (as for anything dropped from here).
///
/// Tests set their own (`Settings::pending_caps`).
pub(super) const PENDING_CAPS: PendingCaps = PendingCaps {
    total: PendingLimit {
        rows: 10_000,
        bytes: 64 << 20,
    },
    per_peer: PendingLimit {
        rows: 2_500,
        bytes: 16 << 20,
    },
    per_sender: PendingLimit {
        rows: 1_000,
        bytes: 8 << 20,
    },
};
/// Pending envelopes held at once while they are taken again: a page of at
/// most 256 envelopes or 4 MiB (and one envelope past that, at most 1 MiB).
const PENDING_PAGE_ROWS: usize = 256;
const PENDING_PAGE_BYTES: u64 = 4 << 20;
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
    History(history::HistoryRequest),
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
    History(Box<history::HistoryPage>),
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
        oneshot::Sender<Result<Response, ApiError>>,
        Result<Response, EngineError>,
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
        request: history::HistoryRequest,
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

/// How an envelope arrived: decides replay handling and validation, and
/// whose share of the pending queue it takes if it has to wait there.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Via {
    /// Forwarded by gossip from this peer (the propagation source).
    Gossip(PeerId),
    /// Handed over otherwise: a direct request, a catch-up answer, a
    /// relay's mailbox, or locally.
    Direct(Handed),
    /// Taken again from the pending queue, handed over as it first was.
    Pending(Handed),
}

impl Via {
    fn is_gossip(self) -> bool {
        matches!(self, Via::Gossip(_))
    }

    /// Who handed the envelope over.
    fn handed(self) -> Handed {
        match self {
            Via::Gossip(peer) => Handed::ForwardedBy(peer),
            Via::Direct(handed) | Via::Pending(handed) => handed,
        }
    }
}

/// Who handed an envelope over, and whether junk in it is theirs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Handed {
    /// This node's user (`NodeHandle::deliver`), or not recorded (kept
    /// pending before the queue recorded it).
    Locally,
    /// A peer that passed on what it could not check: a gossip forwarder
    /// (it cannot open a group's envelopes it is not in, nor know every
    /// device), a relay handing over its mailbox.
    ForwardedBy(PeerId),
    /// A peer that sent it on its own account (a direct request, a
    /// catch-up answer, which hold only what it chose to send): it
    /// answers for junk in it.
    SentBy(PeerId),
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

/// Fewer envelopes than this are checked on this thread alone.
const PARALLEL_VERIFY_MIN: usize = 32;

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
    topics: conversations::Topics,
    /// Chains in use and decoded device keys.
    chains: chains::ChainCache,
    /// Who is who: recipients, devices' users, blocked and revoked.
    directory: directory::Directory,
    connected: HashSet<PeerId>,
    /// Who still misses what this device sent, and offers in flight.
    outbox: outbox::Outbox,
    settings: Settings,
    clock: Clock,
    presence: presence::PresenceBook,
    /// Catch-up sessions in progress, with their round count.
    syncing: HashMap<(PeerId, ConversationId), u32>,
    relays: relay::Relays,
    /// Conversations with an envelope waiting for a gap in its sender's
    /// chain to be filled (it came too far ahead).
    gaps: HashSet<ConversationId>,
    shards: annotations::ShardCache,
    linking: devices::Linking,
    account: account::AccountCache,
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
    /// While pending envelopes are taken again: the conversations asked
    /// for meanwhile, taken in after the pass that runs (passes never
    /// nest, so a queue of keys that each open the next holds one page
    /// and one stack frame, not one per key).
    pending_passes: Option<Vec<ConversationId>>,
}

type EngineResult<T> = Result<T, EngineError>;

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
fn routing_tag_of(conv: &Conv) -> Result<RoutingTag, EngineError> {
    conv.tag.ok_or_else(|| {
        EngineError::failed(
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
fn fresh_key() -> Result<[u8; 32], EngineError> {
    Ok(random_bytes()?)
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
pub(super) fn fill_status(view: &mut StatusView, status: &NetStatus) {
    view.listen = status.listen.iter().map(|a| a.to_string()).collect();
    view.peers = status
        .peers
        .iter()
        .map(|p| PeerView {
            peer_id: p.peer_id.to_string(),
            source: p.source.as_str().to_string(),
            addrs: p.addrs.iter().map(|a| a.to_string()).collect(),
        })
        .collect();
}

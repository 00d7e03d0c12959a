//! The engine task: loading what the disk holds at start, the batch
//! loop (one transaction per batch of inputs, effects after the commit)
//! and the durability of what it promised.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::api::{ApiError, Event, Request, Response};
use crate::group::GroupState;
use crate::hlc::{Clock, Hlc};
use crate::identity::{Identity, peer_id_of};
use crate::ids::ConversationId;
use crate::net::{NetCommand, NetEvent, NetHandle, PeerSource};
use crate::node::{Command, NodeError, Settings};
use crate::store::{ConversationKind, Durability, Role, Store, meta};

use super::{
    BATCH, Conv, Effect, Engine, EngineState, Input, Internal, MAX_REVOKED, Outlets, Share, State,
    TICK, account, annotations, chains, conversations, devices, direct_routing, directory,
    fail_inputs, let_network_run, outbox, presence, recv_opt, relay, run_effects, sleep_until_opt,
};

/// Outbox entries read per page at startup (ids only, no bytes).
const OUTBOX_LOAD_PAGE: usize = 10_000;

impl Engine {
    pub(in crate::node) fn new(
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
            .get_meta(meta::PRESENCE_SHARE)?
            .and_then(|b| Share::parse(&String::from_utf8_lossy(&b)))
            .unwrap_or(Share::Contacts);
        let name = store
            .db()
            .get_meta(meta::NAME)?
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
                net_online,
                convs: HashMap::new(),
                topics: conversations::Topics::gates_due_now(),
                chains: chains::ChainCache::default(),
                directory: directory::Directory::default(),
                connected: HashSet::new(),
                outbox: outbox::Outbox::default(),
                settings,
                clock,
                presence: presence::PresenceBook::sharing(share),
                syncing: HashMap::new(),
                relays: relay::Relays::new(relays, found_relays),
                gaps: HashSet::new(),
                shards: annotations::ShardCache::default(),
                linking: devices::Linking::default(),
                account: account::AccountCache::default(),
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
    pub(super) fn load(&mut self) -> Result<(), NodeError> {
        let db = self.store.db();
        self.state.directory.blocked = db
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
        self.state.directory.revoked = db.revoked_devices(MAX_REVOKED)?.into_iter().collect();
        if db.device(&self.state.my_device)?.is_some_and(|d| d.revoked) {
            self.state.directory.revoked.insert(self.state.my_device);
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
            .get_meta(meta::PRESENCE_SHARE)?
            .map(|_| self.state.presence.share.as_str());
        account::seed_account(&db, &self.state.my_user, &self.state.my_device, share)?;
        let own = account::account_conversation(&self.state.my_user);
        if !convs.iter().any(|c| c.id == own) {
            let (record, conv) = account::new_account_conversation(&self.state.identity)?;
            db.insert_conversation(&record)?;
            db.set_members(&own, &[(self.state.my_user, Role::Member)])?;
            convs.push(conv);
        }
        let known = db.known_peers(4096)?;
        for conv in convs {
            if let Some(tag) = conv.tag {
                self.state.topics.preload_tag(tag, conv.id);
            }
            if conv.active && conv.tag.is_some() {
                self.outlets
                    .net_cmd(NetCommand::Subscribe(conv.topic.clone()));
            }
            self.state.topics.add_topic(conv.topic.clone(), conv.id);
            self.state.convs.insert(conv.id, conv);
        }
        self.load_outbox()?;
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
    /// Tracks every queued envelope, read a page at a time without its
    /// bytes. All of them: the retry tick drops a due entry that is not
    /// tracked (everyone has it), so one left out here would be lost.
    fn load_outbox(&mut self) -> Result<(), NodeError> {
        let mut targets: HashMap<ConversationId, HashSet<PeerId>> = HashMap::new();
        let mut after = 0;
        loop {
            let page = self.store.db().outbox_index_page(after, OUTBOX_LOAD_PAGE)?;
            let Some(&(last, ..)) = page.last() else {
                return Ok(());
            };
            after = last;
            for (_, envelope, conv) in page {
                // Who still lacks it is unknown after a restart: offer it to
                // every member device (receivers deduplicate).
                let peers = match targets.get(&conv) {
                    Some(peers) => peers.clone(),
                    None => {
                        let peers = self.outbox_targets(&conv)?;
                        targets.insert(conv, peers.clone());
                        peers
                    }
                };
                self.state.outbox.track(envelope, conv, peers);
            }
        }
    }

    pub(super) fn outbox_targets(
        &self,
        conv: &ConversationId,
    ) -> Result<HashSet<PeerId>, NodeError> {
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

    pub(in crate::node) async fn run(
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
    pub(super) async fn handle_batch(&mut self, batch: Vec<Input>, last: bool) {
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
                pending_passes: None,
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
                        let result = sealed.and_then(|s| state.store_sent(s)).map(Response::Sent);
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
            self.state.chains.forget_all();
            // They may hold changes the disk does not.
            self.state.shards.clear();
            self.state.account.forget();
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
            self.state.chains.reservations_durable();
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
    pub(super) fn after_fsync(&self, durability: Durability, effects: Vec<Effect>) {
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

//! Edits, deletions and reactions, from the engine's side: the
//! conversation's annotation shards (`weft-crdt`), the commands that
//! change them, the changes that arrive in envelopes, and their effect on
//! the `messages` and `reactions` tables.
//!
//! A change arrives chain-sealed like a message, so its device is
//! authenticated; it takes effect only if its actor is that device and
//! the author may make every write in it (only a message's sender edits
//! it; the sender or a group admin deletes it; a user reacts only as
//! themselves).
//!
//! A change about a message not here goes into its shard at once, without
//! effect, and is kept for the message too: the message may never come (a
//! deleted one's envelope is erased everywhere), and the shard's later
//! changes (the deletion, anything made after) build on this one, so the
//! shard must not wait for it. When the message comes, the kept change is
//! checked against it and takes effect. So a shard may hold an edit its
//! author was not allowed to make: only an edit whose text was stored
//! (stored only once allowed) is ever shown. Deletions go into the shard
//! even where not allowed, keeping every replica's shard the same; only
//! one allowed here, checked with the message at hand, erases it.

use std::collections::{HashMap, HashSet};

use weft_crdt::{Annotations, CrdtError, EditRef, MessageAnnotations};

use crate::api::{Event, MessageView};
use crate::hlc::Hlc;
use crate::identity::random_bytes;
use crate::ids::{ConversationId, DeviceId, MessageId, UserId};
use crate::node::now_ms;
use crate::payload::{Annotate, EditText, MAX_CHANGE_BYTES};
use crate::payload::{MAX_TEXT_BYTES, Payload};
use crate::store::{MessageRecord, PendingAnnotation};

use super::EngineError;
use super::permissions::{self, ChangeShape, Write, may_write};
use super::{Ack, Conv, Effect, EngineResult, State};

/// Shards kept loaded (each is saved when changed, so any may go).
pub(super) const SHARD_CACHE: usize = 64;

/// A shard's place: conversation and period.
pub(super) type ShardId = (ConversationId, u64);

/// What a change is checked against: its message's place and author
/// (looked up once per batch).
#[derive(Clone, Copy)]
pub(super) struct Annotated {
    id: MessageId,
    conversation: ConversationId,
    sender_user: UserId,
    hlc: u64,
    epoch: u64,
}

/// A change waiting to be applied with its batch.
pub(super) struct Queued {
    change: weft_crdt::Inspected,
    /// The message it shows on; `None` for a change about a message not
    /// here, which goes into the shard without effect.
    message: Option<MessageId>,
    /// For a change that only adds or takes back reactions: the keys it
    /// touched, with their user and emoji (each is then shown or hidden on
    /// its own, instead of the message's reactions being read again).
    reactions: Option<Vec<(String, UserId, String)>>,
    /// A deletion allowed here: it erases the message (see `materialize`).
    deletes: bool,
}

/// The reaction keys a change touches, if it touches nothing else.
fn reaction_touches(change: &weft_crdt::Inspected) -> Option<Vec<(String, UserId, String)>> {
    let mut out = Vec::with_capacity(change.touches.len());
    for touch in &change.touches {
        let mut parts = touch.key.splitn(4, '/');
        let (Some("r"), Some(_message), Some(user), Some(emoji)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        let user = weft_crdt::unhex(user)
            .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
            .map(UserId)?;
        out.push((touch.key.clone(), user, emoji.to_string()));
    }
    Some(out)
}

fn crdt_err(e: CrdtError) -> EngineError {
    match e {
        CrdtError::Refused(why) => EngineError::usage(why),
        other => EngineError::failed(other.to_string()),
    }
}

/// What a change waiting for a shard's earlier changes is kept under.
fn shard_key_bytes((conv, period): ShardId) -> Vec<u8> {
    let mut key = conv.0.to_vec();
    key.extend_from_slice(&period.to_be_bytes());
    key
}

/// What a change about a message not here is kept under: the
/// conversation it came in, and the message. Only that message arriving
/// in that conversation takes it back (a member of one conversation must
/// not write in another's).
fn message_key_bytes(conv: &ConversationId, message: &MessageId) -> Vec<u8> {
    let mut key = conv.0.to_vec();
    key.extend_from_slice(&message.0);
    key
}

/// The shard of a message (`payload::shard_of`).
fn shard_id_of(conv: &ConversationId, epoch: u64, hlc: u64) -> ShardId {
    (*conv, crate::payload::shard_of(epoch, Hlc(hlc)))
}

/// Annotation shards loaded, and those changed in the batch in progress.
#[derive(Default)]
pub(super) struct ShardCache {
    /// Annotation shards loaded (at most [`SHARD_CACHE`]).
    loaded: HashMap<ShardId, weft_crdt::Annotations>,
    /// Those changed in the batch in progress.
    dirty: HashSet<ShardId>,
}

impl ShardCache {
    /// Whether loading one more shard needs room made first (by saving
    /// the changed ones and calling [`Self::clear`]).
    fn full(&self) -> bool {
        self.loaded.len() >= SHARD_CACHE
    }

    fn get_mut(&mut self, id: &ShardId) -> Option<&mut weft_crdt::Annotations> {
        self.loaded.get_mut(id)
    }

    /// Keeps a loaded shard (room is the caller's to make: see
    /// [`Self::full`]).
    fn insert(&mut self, id: ShardId, shard: weft_crdt::Annotations) {
        self.loaded.insert(id, shard);
    }

    /// The shard changed in this batch: it is saved before the commit.
    pub(super) fn changed(&mut self, id: ShardId) {
        self.dirty.insert(id);
    }

    /// The shards changed since this was last asked.
    fn take_changed(&mut self) -> HashSet<ShardId> {
        std::mem::take(&mut self.dirty)
    }

    /// Drops a shard: the next use loads it from the store again.
    pub(super) fn forget(&mut self, id: &ShardId) {
        self.loaded.remove(id);
    }

    /// Drops every shard and what changed (the batch rolled back, or room
    /// is made).
    pub(super) fn clear(&mut self) {
        self.loaded.clear();
        self.dirty.clear();
    }
}

impl State<'_, '_> {
    /// The shard, loaded from the store (or new) if not cached.
    fn shard(&mut self, id: ShardId) -> Result<&mut Annotations, EngineError> {
        if self.e.shards.get_mut(&id).is_none() {
            if self.e.shards.full() {
                // The changed ones are saved before they go.
                self.save_shards();
                self.e.shards.clear();
            }
            let device = self.e.my_device.0;
            let shard = match self.db.shard(&id.0, id.1)? {
                Some(bytes) => Annotations::load(&bytes, &device).map_err(crdt_err)?,
                None => Annotations::new(&device),
            };
            self.e.shards.insert(id, shard);
        }
        self.e
            .shards
            .get_mut(&id)
            .ok_or_else(|| EngineError::failed("shard vanished"))
    }

    /// Writes the shards changed in this batch (before its commit).
    pub(super) fn save_shards(&mut self) {
        for id in self.e.shards.take_changed() {
            if let Some(shard) = self.e.shards.get_mut(&id) {
                let written = match shard.persist() {
                    weft_crdt::Persist::Nothing => Ok(()),
                    weft_crdt::Persist::Whole(bytes) => self.db.put_shard(&id.0, id.1, &bytes),
                    weft_crdt::Persist::Append(bytes) => self.db.append_shard(&id.0, id.1, &bytes),
                };
                if let Err(e) = written {
                    tracing::error!("cannot save an annotation shard: {e}");
                    // What the disk holds is unknown now: load it again.
                    self.e.shards.forget(&id);
                }
            }
        }
    }

    /// A message of this user's, for changing it.
    fn message_for_change(&mut self, id: &str) -> Result<(MessageRecord, Conv), EngineError> {
        let id = id
            .parse::<MessageId>()
            .map_err(|_| EngineError::usage(format!("not a message id: {id}")))?;
        let m = self
            .db
            .message(&id)?
            .ok_or_else(|| EngineError::usage(format!("no such message: {id}")))?;
        if m.deleted {
            return Err(EngineError::usage("the message is deleted"));
        }
        let conv = self
            .e
            .convs
            .get(&m.conversation)
            .cloned()
            .ok_or_else(|| EngineError::failed("the message's conversation is gone"))?;
        if !conv.active {
            return Err(EngineError::usage(
                "you are no longer a member of this group",
            ));
        }
        Ok((m, conv))
    }

    /// `weft edit MSGID TEXT`.
    pub(super) fn edit_message(&mut self, id: &str, text: String) -> EngineResult<MessageView> {
        if text.len() > MAX_TEXT_BYTES {
            return Err(EngineError::usage(format!(
                "the text is {} bytes; the limit is {MAX_TEXT_BYTES}",
                text.len()
            )));
        }
        if text.trim().is_empty() {
            return Err(EngineError::usage(
                "the text is empty (delete the message instead)",
            ));
        }
        let (m, conv) = self.message_for_change(id)?;
        if !may_write(
            Write::Edit,
            &self.e.my_user,
            &m.sender_user,
            conv.group.as_deref(),
        ) {
            return Err(EngineError::usage("only the sender may edit a message"));
        }
        let edit_id: [u8; 16] = random_bytes()?;
        let hlc = self.e.clock.now(now_ms().max(0) as u64);
        let shard_id = shard_id_of(&conv.id, m.epoch, m.hlc);
        let change = self
            .shard(shard_id)?
            .edit(
                &m.id.0,
                EditRef {
                    hlc: hlc.0,
                    edit: edit_id.to_vec(),
                },
            )
            .map_err(crdt_err)?;
        self.db.add_edit(&edit_id, &m.id, &text)?;
        let edit = Some(EditText { id: edit_id, text });
        self.send_annotation(&conv, &m, shard_id, change, edit, false)
    }

    /// `weft delete MSGID`.
    pub(super) fn delete_message(&mut self, id: &str) -> EngineResult<MessageView> {
        let (m, conv) = self.message_for_change(id)?;
        if !may_write(
            Write::Delete,
            &self.e.my_user,
            &m.sender_user,
            conv.group.as_deref(),
        ) {
            return Err(EngineError::usage(
                "only the sender, or an admin of the group, may delete a message",
            ));
        }
        let shard_id = shard_id_of(&conv.id, m.epoch, m.hlc);
        let change = self.shard(shard_id)?.delete(&m.id.0).map_err(crdt_err)?;
        self.send_annotation(&conv, &m, shard_id, change, None, true)
    }

    /// `weft react MSGID EMOJI [--remove]`.
    pub(super) fn react(&mut self, id: &str, emoji: &str, on: bool) -> EngineResult<MessageView> {
        let (m, conv) = self.message_for_change(id)?;
        let shard_id = shard_id_of(&conv.id, m.epoch, m.hlc);
        let me = self.e.my_user;
        let already = self
            .db
            .reactions(&m.id)?
            .iter()
            .any(|(u, e)| *u == me && e == emoji);
        if already == on {
            // Nothing to change: say how it is.
            return self.message_view(&m, false);
        }
        let change = self
            .shard(shard_id)?
            .react(&m.id.0, &me.0, emoji, on)
            .map_err(crdt_err)?;
        self.send_annotation(&conv, &m, shard_id, change, None, false)
    }

    /// Seals and sends a change made here, and shows its effect
    /// (`deleting`: it deletes the message).
    fn send_annotation(
        &mut self,
        conv: &Conv,
        m: &MessageRecord,
        shard_id: ShardId,
        change: Vec<u8>,
        edit: Option<EditText>,
        deleting: bool,
    ) -> EngineResult<MessageView> {
        self.e.shards.changed(shard_id);
        let payload = Payload::Annotate(Annotate {
            message: m.id,
            period: shard_id.1,
            change,
            edit,
        });
        let (env, counter, early) = self.seal_chain_message(conv, &payload.encode())?;
        self.send_envelope(conv, &env, conv.key_epoch, counter, early, Ack::Publish)?;
        self.materialize(shard_id, &m.id, deleting)?;
        let m = self.db.message(&m.id)?.unwrap_or_else(|| m.clone());
        self.message_view(&m, false)
    }

    /// A member's change arrived (chain-sealed, authenticated as `device`
    /// of `user`). `Err` for a change to refuse (and penalise).
    pub(super) fn receive_annotation(
        &mut self,
        conv: &Conv,
        user: UserId,
        device: DeviceId,
        a: Annotate,
    ) -> Result<(), &'static str> {
        if a.change.len() > MAX_CHANGE_BYTES {
            return Err("annotation change too large");
        }
        if a.edit
            .as_ref()
            .is_some_and(|e| e.text.len() > MAX_TEXT_BYTES)
        {
            return Err("edit text too long");
        }
        let (inspected, what) =
            Annotations::inspect(&a.change).map_err(|_| "malformed annotation change")?;
        let ChangeShape { edits, deletion } =
            permissions::check_change(&inspected.actor, &device, &user, &a.message, &what)?;
        let found = match self.annotated.get(&a.message) {
            Some(m) => Ok(Some(*m)),
            None => self.db.message(&a.message).map(|m| {
                m.map(|m| {
                    let about = Annotated {
                        id: m.id,
                        conversation: m.conversation,
                        sender_user: m.sender_user,
                        hlc: m.hlc,
                        epoch: m.epoch,
                    };
                    self.annotated.insert(m.id, about);
                    about
                })
            }),
        };
        let m = match found {
            Ok(Some(m)) => m,
            Ok(None) => {
                // Who pins is not a matter of the message: refused here as
                // it would be with the message at hand.
                if what.iter().any(|w| Write::of(w) == Write::Pin)
                    && !may_write(Write::Pin, &user, &user, conv.group.as_deref())
                {
                    return Err("an annotation its author may not make");
                }
                // The message may never come (see the opening): into the
                // shard now, without effect, and kept for the message,
                // whose arrival decides whether the change takes effect.
                let shard_id = (conv.id, a.period);
                if self.queue_for_shard(shard_id, inspected, None, false, &a, user, device)? {
                    self.keep_annotation(
                        &message_key_bytes(&conv.id, &a.message),
                        user,
                        device,
                        &a,
                    );
                }
                return Ok(());
            }
            Err(e) => {
                tracing::warn!("message lookup: {e}");
                return Ok(());
            }
        };
        if m.conversation != conv.id {
            return Err("an annotation of another conversation's message");
        }
        let shard_id = shard_id_of(&conv.id, m.epoch, m.hlc);
        if a.period != shard_id.1 {
            return Err("an annotation for the wrong shard");
        }
        for w in &what {
            if !may_write(Write::of(w), &user, &m.sender_user, conv.group.as_deref()) {
                if deletion {
                    // Where the message is missing it went into the shard
                    // (see above), so it goes in here too, keeping every
                    // replica's shard the same; only an allowed deletion
                    // erases anything.
                    self.queue_for_shard(shard_id, inspected, Some(m.id), false, &a, user, device)?;
                }
                return Err("an annotation its author may not make");
            }
        }
        if let Some(edit) = &a.edit
            && edits
            && let Err(e) = self.db.add_edit(&edit.id, &m.id, &edit.text)
        {
            tracing::warn!("cannot store an edit: {e}");
            return Ok(());
        }
        self.queue_for_shard(shard_id, inspected, Some(m.id), deletion, &a, user, device)?;
        Ok(())
    }

    /// Queues a change for its shard's batch, to show on `message` (if
    /// any), or keeps it until the shard holds the changes it builds on.
    /// Whether it was queued. `deletes`: it is a deletion allowed here (it
    /// erases the message).
    #[allow(clippy::too_many_arguments)]
    fn queue_for_shard(
        &mut self,
        shard_id: ShardId,
        inspected: weft_crdt::Inspected,
        message: Option<MessageId>,
        deletes: bool,
        a: &Annotate,
        user: UserId,
        device: DeviceId,
    ) -> Result<bool, &'static str> {
        let mut coming = self.annotation_hashes.remove(&shard_id).unwrap_or_default();
        let ready = self
            .shard(shard_id)
            .map(|shard| shard.ready_with(&inspected, &coming));
        let ready = match ready {
            Ok(ready) => ready,
            Err(_) => {
                self.annotation_hashes.insert(shard_id, coming);
                return Err("annotation shard unreadable");
            }
        };
        if !ready {
            self.annotation_hashes.insert(shard_id, coming);
            // It builds on changes of this shard not here yet: it waits
            // for the shard to move (kept on disk, not in automerge's
            // memory-only queue).
            self.keep_annotation(&shard_key_bytes(shard_id), user, device, a);
            return Ok(false);
        }
        // Applied with the batch's other changes of this shard, in one
        // pass (one by one costs ~1 ms each in a large shard).
        coming.insert(inspected.hash());
        self.annotation_hashes.insert(shard_id, coming);
        let reactions = reaction_touches(&inspected);
        self.annotations.entry(shard_id).or_default().push(Queued {
            change: inspected,
            message,
            reactions,
            deletes,
        });
        Ok(true)
    }

    /// Applies the changes this batch received, shard by shard, shows
    /// their effect, and lets what waited for those shards try again.
    pub(super) fn flush_annotations(&mut self) {
        // Retried changes may queue more: rounds go on until none does.
        // Changes taken back from waiting and queued must be applied in
        // this batch (they are no longer kept on disk), so there is no
        // round limit; it ends because every round applies changes that
        // were queued, each one once.
        loop {
            let queued = std::mem::take(&mut self.annotations);
            self.annotation_hashes.clear();
            if queued.is_empty() {
                return;
            }
            for (shard_id, changes) in queued {
                // Messages to show again whole (edits, deletions, pins), and
                // reactions to show or hide one by one.
                let mut whole: Vec<MessageId> = Vec::new();
                let mut deleting: HashSet<MessageId> = HashSet::new();
                let mut reactions: Vec<(MessageId, String, UserId, String)> = Vec::new();
                let mut inspected = Vec::with_capacity(changes.len());
                for q in changes {
                    if let Some(message) = q.message {
                        if q.deletes {
                            deleting.insert(message);
                        }
                        match q.reactions {
                            Some(touched) => reactions.extend(
                                touched
                                    .into_iter()
                                    .map(|(key, user, emoji)| (message, key, user, emoji)),
                            ),
                            None => whole.push(message),
                        }
                    }
                    inspected.push(q.change);
                }
                whole.sort_unstable_by_key(|m| m.0);
                whole.dedup();
                match self.shard(shard_id).map(|s| s.apply_batch(inspected)) {
                    Ok(Ok(0)) => {}
                    Ok(Ok(_)) => {
                        self.e.shards.changed(shard_id);
                    }
                    Ok(Err(e)) => tracing::warn!("annotation changes not applied: {e}"),
                    Err(e) => tracing::warn!("annotation shard unreadable: {e:?}"),
                }
                for m in &whole {
                    if let Err(e) = self.materialize(shard_id, m, deleting.contains(m)) {
                        tracing::warn!("cannot show an annotation: {e:?}");
                    }
                }
                reactions.retain(|(m, ..)| whole.binary_search_by_key(&m.0, |w| w.0).is_err());
                if let Err(e) = self.show_reactions(shard_id, reactions) {
                    tracing::warn!("cannot show reactions: {e:?}");
                }
                if let Some(conv) = self.e.convs.get(&shard_id.0).cloned() {
                    self.retry_pending(&conv, &shard_key_bytes(shard_id));
                }
            }
        }
    }

    /// Shows or hides each touched reaction as the merged shard says (a
    /// message deleted here shows none: the store keeps it so; a deletion
    /// in the shard that was not allowed hides nothing).
    fn show_reactions(
        &mut self,
        shard_id: ShardId,
        mut touched: Vec<(MessageId, String, UserId, String)>,
    ) -> Result<(), EngineError> {
        touched.sort_unstable_by(|a, b| (a.0.0, &a.1).cmp(&(b.0.0, &b.1)));
        touched.dedup_by(|a, b| a.0 == b.0 && a.1 == b.1);
        let mut changed: Vec<MessageId> = Vec::new();
        for (message, key, user, emoji) in touched {
            let on = self.shard(shard_id)?.holds(&key);
            if self.db.put_reaction(&message, &user, &emoji, on)?
                && changed.last() != Some(&message)
            {
                changed.push(message);
            }
        }
        // The view is built only for someone watching.
        if self.outlets.events.receiver_count() > 0 {
            for message in changed {
                if let Some(m) = self.db.message(&message)? {
                    let view = self.message_view(&m, false)?;
                    self.fx.push(Effect::Event(Event::Updated(view)));
                }
            }
        }
        Ok(())
    }

    fn keep_annotation(
        &mut self,
        waits_for: &[u8],
        author: UserId,
        device: DeviceId,
        a: &Annotate,
    ) {
        let pending = PendingAnnotation {
            author,
            device,
            payload: Payload::Annotate(a.clone()).encode(),
        };
        if let Err(e) = self
            .db
            .add_pending_annotation(waits_for, &pending, now_ms())
        {
            tracing::warn!("cannot keep an annotation for later: {e}");
        }
    }

    /// Tries again the changes that waited for `waits_for`.
    fn retry_pending(&mut self, conv: &Conv, waits_for: &[u8]) {
        let pending = match self.db.take_pending_annotations(waits_for) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!("pending annotations: {e}");
                return;
            }
        };
        for p in pending {
            if let Some(Payload::Annotate(a)) = Payload::decode(&p.payload)
                && let Err(why) = self.receive_annotation(conv, p.author, p.device, a)
            {
                tracing::debug!("a waiting annotation is refused: {why}");
            }
        }
    }

    /// Changes that waited for `message`, now that it is stored.
    pub(super) fn annotations_waiting(&mut self, conv: &Conv, message: &MessageId) {
        self.retry_pending(conv, &message_key_bytes(&conv.id, message));
    }

    /// Brings the store's view of `message` in line with its shard, and
    /// tells `watch` if it changed. `deleting`: a deletion of it allowed
    /// here is being applied. Only that erases it: a deletion in the shard
    /// by someone who may not delete it (taken in while the message was
    /// missing) neither erases it nor hides its edits and reactions.
    fn materialize(
        &mut self,
        shard_id: ShardId,
        message: &MessageId,
        deleting: bool,
    ) -> Result<(), EngineError> {
        let mut changed = false;
        if deleting {
            changed |= self.db.erase_message(message)?;
        } else if !self.db.is_erased(message)? {
            let shard = self.shard(shard_id)?;
            let ann: MessageAnnotations = shard.message_unless_deleted(&message.0);
            let edits = shard.edits(&message.0);
            // The greatest edit whose text is stored: the text of one its
            // author may not make is never stored (see the opening).
            for edit in edits {
                if let Some(text) = self.db.edit_text(&edit.edit)? {
                    changed |= self.db.show_edit(message, &text)?;
                    break;
                }
            }
            let mut reactions = Vec::new();
            for (emoji, users) in &ann.reactions {
                for user in users {
                    if let Some(bytes) = weft_crdt::unhex(user)
                        && let Ok(user) = <[u8; 32]>::try_from(bytes.as_slice())
                    {
                        reactions.push((UserId(user), emoji.clone()));
                    }
                }
            }
            changed |= self.db.set_reactions(message, &reactions)?;
        }
        // The view is built only for someone watching: with many changes
        // it costs more than applying them.
        if changed
            && self.outlets.events.receiver_count() > 0
            && let Some(m) = self.db.message(message)?
        {
            let view = self.message_view(&m, false)?;
            self.fx.push(Effect::Event(Event::Updated(view)));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shard_changed_is_saved_once_and_a_forgotten_one_loads_again() {
        let mut cache = ShardCache::default();
        let id = (ConversationId([1; 32]), 7);
        cache.insert(id, Annotations::new(&[2; 32]));
        cache.changed(id);
        cache.changed(id);
        assert_eq!(cache.take_changed(), HashSet::from([id]));
        assert!(cache.take_changed().is_empty());
        assert!(cache.get_mut(&id).is_some());
        cache.forget(&id);
        assert!(cache.get_mut(&id).is_none());
    }

    #[test]
    fn the_cache_is_full_at_its_bound() {
        let mut cache = ShardCache::default();
        for period in 0..SHARD_CACHE as u64 {
            assert!(!cache.full());
            cache.insert(
                (ConversationId([1; 32]), period),
                Annotations::new(&[2; 32]),
            );
        }
        assert!(cache.full());
        cache.clear();
        assert!(!cache.full());
    }

    #[test]
    fn the_wire_and_the_documents_agree_on_the_shard_period() {
        assert_eq!(crate::payload::SHARD_PERIOD_MS, weft_crdt::PERIOD_MS);
    }
}

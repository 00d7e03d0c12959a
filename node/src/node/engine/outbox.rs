//! The outbox: who still misses each envelope sent, direct offers to
//! connected peers, and retries with backoff until every member device
//! has it or it expires. [`Outbox`] decides (time comes in as an
//! argument, so it is tested without a network); the `State` methods
//! below read and write the store and send.

use std::collections::{HashMap, HashSet};

use libp2p::PeerId;

use crate::api::Event;
use crate::backoff::{self, Backoff};
use crate::ids::{ConversationId, EnvelopeId};
use crate::node::now_ms;
use crate::store::MessageStatus;

use super::{DIRECT_BATCH, Effect, IN_FLIGHT, RETRY_BATCH, State, run_effects};

/// Who still misses each envelope this device sent (member peers not yet
/// known to have it), and when each was last offered to each peer
/// directly. Bounded by the store's outbox: an envelope is here only
/// while its outbox entry is.
#[derive(Default)]
pub(super) struct Outbox {
    unreached: HashMap<EnvelopeId, (ConversationId, HashSet<PeerId>)>,
    offered: HashMap<(EnvelopeId, PeerId), tokio::time::Instant>,
}

impl Outbox {
    /// Starts tracking an envelope of `conv` that `missing` lack.
    pub(super) fn track(&mut self, id: EnvelopeId, conv: ConversationId, missing: HashSet<PeerId>) {
        self.unreached.insert(id, (conv, missing));
    }

    /// The peers still missing an envelope (`None`: not tracked).
    pub(super) fn missing(&self, id: &EnvelopeId) -> Option<&HashSet<PeerId>> {
        self.unreached.get(id).map(|(_, missing)| missing)
    }

    /// Stops tracking an envelope (given up, or gone from the store).
    pub(super) fn forget(&mut self, id: &EnvelopeId) {
        self.unreached.remove(id);
    }

    /// Notes a direct offer made at `now`.
    pub(super) fn offered(&mut self, id: EnvelopeId, peer: PeerId, now: tokio::time::Instant) {
        self.offered.insert((id, peer), now);
    }

    /// An offer was answered (or failed): it may be made again.
    pub(super) fn answered(&mut self, id: &EnvelopeId, peer: &PeerId) {
        self.offered.remove(&(*id, *peer));
    }

    /// `peer` has the envelope: its conversation, and whether every member
    /// peer now has it (then it is no longer tracked). `None`: not tracked.
    pub(super) fn reached(
        &mut self,
        id: &EnvelopeId,
        peer: &PeerId,
    ) -> Option<(ConversationId, bool)> {
        self.offered.remove(&(*id, *peer));
        let (conv, missing) = self.unreached.get_mut(id)?;
        let conv = *conv;
        missing.remove(peer);
        let done = missing.is_empty();
        if done {
            self.unreached.remove(id);
        }
        Some((conv, done))
    }

    /// A peer that will never take anything again (a revoked device): the
    /// envelopes only it was missing, no longer tracked.
    pub(super) fn drop_peer(&mut self, peer: &PeerId) -> Vec<EnvelopeId> {
        let mut done = Vec::new();
        for (id, (_, missing)) in self.unreached.iter_mut() {
            if missing.remove(peer) && missing.is_empty() {
                done.push(*id);
            }
        }
        for id in &done {
            self.unreached.remove(id);
        }
        done
    }

    /// Forgets offers unanswered for [`IN_FLIGHT`] at `now`, so they can be
    /// made again.
    pub(super) fn purge_offered(&mut self, now: tokio::time::Instant) {
        self.offered
            .retain(|_, at| now.duration_since(*at) < IN_FLIGHT);
    }

    /// Whether `peer` misses anything (of `conv`, if given).
    pub(super) fn misses_any(&self, peer: &PeerId, conv: Option<ConversationId>) -> bool {
        self.unreached
            .values()
            .any(|(c, missing)| conv.is_none_or(|x| x == *c) && missing.contains(peer))
    }

    /// Of `order` (the outbox, oldest first), at most `limit` envelopes
    /// that `peer` misses (of `conv`, if given) and that are not in flight
    /// to it at `now`.
    pub(super) fn to_offer(
        &self,
        peer: &PeerId,
        conv: Option<ConversationId>,
        order: impl IntoIterator<Item = EnvelopeId>,
        now: tokio::time::Instant,
        limit: usize,
    ) -> Vec<EnvelopeId> {
        order
            .into_iter()
            .filter(|id| {
                self.unreached.get(id).is_some_and(|(c, missing)| {
                    conv.is_none_or(|x| x == *c) && missing.contains(peer)
                }) && self
                    .offered
                    .get(&(*id, *peer))
                    .is_none_or(|at| now.duration_since(*at) >= IN_FLIGHT)
            })
            .take(limit)
            .collect()
    }
}

impl State<'_, '_> {
    pub(super) fn offer(&mut self, peer: PeerId, id: EnvelopeId, bytes: Vec<u8>, early: bool) {
        self.e.outbox.offered(id, peer, tokio::time::Instant::now());
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
    pub(super) fn reached(&mut self, id: &EnvelopeId, peer: &PeerId) {
        self.e.relays.reached(*id, *peer);
        let Some((conv, done)) = self.e.outbox.reached(id, peer) else {
            return;
        };
        if done && let Err(e) = self.db.remove_outbox(id) {
            tracing::warn!("outbox: {e}");
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
    pub(super) fn retry(&mut self) {
        let now = now_ms();
        match self.db.expire_outbox(now) {
            Ok(expired) => {
                for id in expired {
                    tracing::warn!(%id, "outbox entry expired undelivered");
                    self.e.outbox.forget(&id);
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
            let Some(missing) = self.e.outbox.missing(&id) else {
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

    /// The wait in milliseconds before retry number `attempt` (this
    /// node's retry backoff, with a random jitter).
    pub(super) fn retry_delay_ms(&self, attempt: u32) -> i64 {
        let s = &self.e.settings;
        let delay = Backoff::new(s.retry_base, s.retry_max).delay(attempt, backoff::jitter());
        i64::try_from(delay.as_millis()).unwrap_or(i64::MAX)
    }

    /// Forgets offers that were never answered, so they can be made again.
    pub(super) fn purge_offered(&mut self) {
        self.e.outbox.purge_offered(tokio::time::Instant::now());
    }

    pub(super) fn offer_stored(&mut self, todo: Vec<(PeerId, EnvelopeId)>) {
        for (peer, id) in todo {
            match self.db.envelope(&id) {
                Ok(Some(env)) => self.offer(peer, id, env.bytes, false),
                Ok(None) => self.e.outbox.forget(&id),
                Err(e) => tracing::warn!("outbox read: {e}"),
            }
        }
    }

    /// Offers a peer (just connected or subscribed, or that just
    /// acknowledged a batch) what it still misses, oldest first and a few
    /// batches at a time, leaving out what is already in flight to it.
    pub(super) fn flush_to(&mut self, peer: PeerId, conv: Option<ConversationId>) {
        if !self.e.outbox.misses_any(&peer, conv) {
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
        let todo: Vec<(PeerId, EnvelopeId)> = self
            .e
            .outbox
            .to_offer(&peer, conv, order, now, 4 * DIRECT_BATCH)
            .into_iter()
            .map(|id| (peer, id))
            .collect();
        self.offer_stored(todo);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> (EnvelopeId, EnvelopeId, ConversationId, ConversationId) {
        (
            EnvelopeId([1; 16]),
            EnvelopeId([2; 16]),
            ConversationId([1; 32]),
            ConversationId([2; 32]),
        )
    }

    #[test]
    fn an_envelope_leaves_the_outbox_once_every_member_has_it() {
        let (e1, _, conv, _) = ids();
        let (bob, carol) = (PeerId::random(), PeerId::random());
        let mut outbox = Outbox::default();
        outbox.track(e1, conv, [bob, carol].into());
        assert_eq!(outbox.reached(&e1, &bob), Some((conv, false)));
        assert_eq!(outbox.reached(&e1, &bob), Some((conv, false)));
        assert_eq!(outbox.reached(&e1, &carol), Some((conv, true)));
        assert_eq!(outbox.reached(&e1, &carol), None);
        assert!(outbox.missing(&e1).is_none());
    }

    #[test]
    fn a_revoked_peer_no_longer_holds_envelopes_back() {
        let (e1, e2, conv, _) = ids();
        let (bob, carol) = (PeerId::random(), PeerId::random());
        let mut outbox = Outbox::default();
        outbox.track(e1, conv, [bob].into());
        outbox.track(e2, conv, [bob, carol].into());
        assert_eq!(outbox.drop_peer(&bob), vec![e1]);
        assert_eq!(outbox.missing(&e2), Some(&[carol].into()));
    }

    #[test]
    fn offers_in_flight_are_not_repeated_until_they_time_out() {
        let (e1, e2, c1, c2) = ids();
        let bob = PeerId::random();
        let t0 = tokio::time::Instant::now();
        let mut outbox = Outbox::default();
        outbox.track(e1, c1, [bob].into());
        outbox.track(e2, c2, [bob].into());
        assert!(outbox.misses_any(&bob, None));
        assert!(outbox.misses_any(&bob, Some(c2)));
        assert!(!outbox.misses_any(&PeerId::random(), None));
        assert_eq!(outbox.to_offer(&bob, None, [e1, e2], t0, 10), [e1, e2]);
        assert_eq!(outbox.to_offer(&bob, Some(c2), [e1, e2], t0, 10), [e2]);
        assert_eq!(outbox.to_offer(&bob, None, [e1, e2], t0, 1), [e1]);
        outbox.offered(e1, bob, t0);
        assert_eq!(outbox.to_offer(&bob, None, [e1, e2], t0, 10), [e2]);
        let later = t0 + IN_FLIGHT;
        assert_eq!(outbox.to_offer(&bob, None, [e1, e2], later, 10), [e1, e2]);
        // Purged once timed out; answered at once.
        outbox.purge_offered(later);
        outbox.offered(e2, bob, t0);
        outbox.answered(&e2, &bob);
        assert_eq!(outbox.to_offer(&bob, None, [e1, e2], t0, 10), [e1, e2]);
    }
}

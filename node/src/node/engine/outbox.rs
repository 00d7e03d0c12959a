//! The outbox: who still misses each envelope sent, direct offers to
//! connected peers, and retries with backoff until every member device
//! has it or it expires.

use super::*;

impl State<'_, '_> {
    pub(super) fn offer(&mut self, peer: PeerId, id: EnvelopeId, bytes: Vec<u8>, early: bool) {
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
    pub(super) fn reached(&mut self, id: &EnvelopeId, peer: &PeerId) {
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
    pub(super) fn retry(&mut self) {
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
    pub(super) fn retry_delay_ms(&self, attempt: u32) -> i64 {
        let base = self.e.settings.retry_base.as_millis() as f64;
        let max = self.e.settings.retry_max.as_millis() as f64;
        let delay = (base * 2f64.powi(attempt.min(30) as i32)).min(max);
        let jitter = 0.5 + (getrandom::u32().unwrap_or(u32::MAX / 2) as f64 / u32::MAX as f64);
        (delay * jitter) as i64
    }

    /// Forgets offers that were never answered, so they can be made again.
    pub(super) fn purge_offered(&mut self) {
        let now = tokio::time::Instant::now();
        self.e
            .offered
            .retain(|_, at| now.duration_since(*at) < IN_FLIGHT);
    }

    pub(super) fn offer_stored(&mut self, todo: Vec<(PeerId, EnvelopeId)>) {
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
    pub(super) fn flush_to(&mut self, peer: PeerId, conv: Option<ConversationId>) {
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
}

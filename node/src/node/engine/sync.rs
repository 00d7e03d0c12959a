//! Catch-up (anti-entropy): two members compare what they hold of a
//! conversation and the one that lacks something fetches it, in bounded
//! batches, from whichever member has it (not only from its sender).
//!
//! The asker sends a summary: per sender chain (device, epoch) the counter
//! ranges it holds, and the ids of the sealed envelopes (sender keys,
//! group states) it holds. The answerer sends back, sealed envelopes
//! first and then chain envelopes in counter order, up to one batch of
//! what the summary lacks, saying whether more remains; the asker stores
//! them through the usual validation and asks again. A session ends when
//! nothing more remains or a round brings nothing new.

use std::collections::{HashMap, HashSet};

use libp2p::PeerId;
use serde::{Deserialize, Serialize};

use crate::ids::{ConversationId, DeviceId, EnvelopeId};
use crate::net::NetCommand;

use super::EngineError;
use super::{DirectRequest, DirectResponse, Effect, Handed, State, Verdict, Via};

/// Most ranges listed per chain; a longer list is cut (the answerer then
/// sends some envelopes the asker has, which it ignores).
const MAX_RANGES: usize = 1024;
/// Most chains and sealed ids in one summary.
const MAX_CHAINS: usize = 4096;
const MAX_SEALED: usize = 4096;
/// Most envelopes, and bytes of envelopes, in one answer.
const SYNC_BATCH: usize = 2048;
const SYNC_BATCH_BYTES: usize = 4 * 1024 * 1024;
/// Most rounds of one session (a bound against an answerer that keeps
/// sending what we cannot use).
const MAX_ROUNDS: u32 = 1000;
/// Most sessions at once.
const MAX_SESSIONS: usize = 256;

/// What the asker holds of one conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncRequest {
    pub conversation: ConversationId,
    pub chains: Vec<ChainHave>,
    pub sealed: Vec<EnvelopeId>,
}

/// The counters held of one sender chain, as sorted, disjoint half-open
/// ranges `[start, end)`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainHave {
    pub device: DeviceId,
    pub epoch: u64,
    pub ranges: Vec<(u64, u64)>,
}

/// Folds sorted counters into ranges, at most `MAX_RANGES`.
fn ranges_of(counters: impl Iterator<Item = u64>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for c in counters {
        match out.last_mut() {
            Some((_, end)) if *end == c => *end = c.saturating_add(1),
            Some((_, end)) if *end > c => {}
            _ => {
                if out.len() == MAX_RANGES {
                    break;
                }
                out.push((c, c.saturating_add(1)));
            }
        }
    }
    out
}

fn covers(ranges: &[(u64, u64)], counter: u64) -> bool {
    // The last range starting at or before the counter.
    let i = ranges.partition_point(|(start, _)| *start <= counter);
    i > 0 && counter < ranges[i - 1].1
}

impl State<'_, '_> {
    /// Starts catch-up with a peer that just connected, for every
    /// conversation it is a member device of.
    pub(super) fn sync_with(&mut self, peer: PeerId) {
        let convs = self.active_convs();
        for conv in convs {
            if self
                .recipients(&conv)
                .is_ok_and(|r| r.peers.contains(&peer))
            {
                self.start_sync(peer, conv.id);
            }
        }
    }

    /// The periodic round: each conversation with one connected member
    /// (a different one each time, as the set allows).
    pub(super) fn sync_all(&mut self) {
        let convs = self.active_convs();
        for conv in convs {
            let connected = self.connected_members(&conv);
            if connected.is_empty() {
                continue;
            }
            let pick = getrandom::u32().unwrap_or(0) as usize % connected.len();
            self.start_sync(connected[pick], conv.id);
        }
    }

    /// Starts catch-up of one conversation with every connected member.
    pub(super) fn catch_up(&mut self, conv: ConversationId) {
        let Some(c) = self.e.convs.get(&conv).cloned() else {
            return;
        };
        for peer in self.connected_members(&c) {
            self.start_sync(peer, conv);
        }
    }

    fn start_sync(&mut self, peer: PeerId, conv: ConversationId) {
        if self.e.syncing.contains_key(&(peer, conv)) || self.e.syncing.len() >= MAX_SESSIONS {
            return;
        }
        self.e.syncing.insert((peer, conv), 0);
        self.ask(peer, conv);
    }

    fn ask(&mut self, peer: PeerId, conv: ConversationId) {
        match self.summary(conv) {
            Ok(request) => self.fx.push(Effect::Sync {
                peer,
                conv,
                request: DirectRequest::Sync(request),
            }),
            Err(e) => {
                tracing::warn!("catch-up summary: {e}");
                self.e.syncing.remove(&(peer, conv));
            }
        }
    }

    /// What this device holds of a conversation.
    fn summary(&self, conv: ConversationId) -> Result<SyncRequest, EngineError> {
        let mut chains: Vec<ChainHave> = Vec::new();
        let positions = self.db.chain_positions(&conv)?;
        for group in positions.chunk_by(|a, b| (a.0, a.1) == (b.0, b.1)) {
            if chains.len() == MAX_CHAINS {
                break;
            }
            chains.push(ChainHave {
                device: group[0].0,
                epoch: group[0].1,
                ranges: ranges_of(group.iter().map(|p| p.2)),
            });
        }
        let mut sealed: Vec<EnvelopeId> = self
            .db
            .sealed_envelope_ids(&conv)?
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        // The newest matter most (the oldest are the likeliest to be held
        // by everyone already).
        if sealed.len() > MAX_SEALED {
            sealed.drain(..sealed.len() - MAX_SEALED);
        }
        Ok(SyncRequest {
            conversation: conv,
            chains,
            sealed,
        })
    }

    /// Answers a summary from a member device with one batch of what it
    /// lacks.
    pub(super) fn answer_sync(&mut self, peer: PeerId, request: SyncRequest) -> DirectResponse {
        let refuse = |why: &str| DirectResponse::Refused(why.to_string());
        let Some(conv) = self.e.convs.get(&request.conversation).cloned() else {
            return refuse("unknown conversation");
        };
        if !self
            .recipients(&conv)
            .is_ok_and(|r| r.peers.contains(&peer))
        {
            return refuse("not a member device");
        }
        match self.missing_for(&request) {
            Ok((envelopes, more)) => DirectResponse::Envelopes { envelopes, more },
            Err(e) => {
                tracing::warn!("catch-up answer: {e}");
                refuse("storage error")
            }
        }
    }

    fn missing_for(&self, request: &SyncRequest) -> Result<(Vec<Vec<u8>>, bool), EngineError> {
        let conv = request.conversation;
        let theirs_sealed: HashSet<EnvelopeId> = request.sealed.iter().copied().collect();
        let theirs: HashMap<(DeviceId, u64), &[(u64, u64)]> = request
            .chains
            .iter()
            .take(MAX_CHAINS)
            .map(|c| ((c.device, c.epoch), c.ranges.as_slice()))
            .collect();
        let mut rowids: Vec<i64> = self
            .db
            .sealed_envelope_ids(&conv)?
            .into_iter()
            .filter(|(id, _)| !theirs_sealed.contains(id))
            .map(|(_, rowid)| rowid)
            .collect();
        for (device, epoch, counter, rowid) in self.db.chain_positions(&conv)? {
            let held = theirs
                .get(&(device, epoch))
                .is_some_and(|r| covers(r, counter));
            if !held {
                rowids.push(rowid);
            }
        }
        let more = rowids.len() > SYNC_BATCH;
        rowids.truncate(SYNC_BATCH);
        let mut envelopes = Vec::with_capacity(rowids.len());
        let mut bytes = 0;
        let mut cut = false;
        for env in self.db.envelope_bytes_by_rowid(&rowids)? {
            if bytes + env.len() > SYNC_BATCH_BYTES && !envelopes.is_empty() {
                cut = true;
                break;
            }
            bytes += env.len();
            envelopes.push(env);
        }
        Ok((envelopes, more || cut))
    }

    /// One batch of a catch-up session came back.
    pub(super) fn on_synced(
        &mut self,
        peer: PeerId,
        conv: ConversationId,
        response: Option<DirectResponse>,
    ) {
        let Some(DirectResponse::Envelopes { envelopes, more }) = response else {
            self.e.syncing.remove(&(peer, conv));
            return;
        };
        let mut new = 0usize;
        self.preverify(envelopes.iter().take(SYNC_BATCH).map(Vec::as_slice));
        for bytes in envelopes.iter().take(SYNC_BATCH) {
            let id = EnvelopeId::of(bytes);
            let had = self.db.has_envelope(&id).unwrap_or(true);
            match self.receive(bytes, Via::Direct(Handed::SentBy(peer)), None) {
                Verdict::Reject(why) => {
                    tracing::debug!(%peer, "catch-up envelope rejected: {why}");
                    self.fx
                        .push(Effect::Net(NetCommand::Penalize { peer, reason: why }));
                }
                _ => {
                    if !had && self.db.has_envelope(&id).unwrap_or(false) {
                        new += 1;
                    }
                }
            }
        }
        let rounds = self.e.syncing.get(&(peer, conv)).copied().unwrap_or(0) + 1;
        if more && new > 0 && rounds < MAX_ROUNDS && self.e.connected.contains(&peer) {
            self.e.syncing.insert((peer, conv), rounds);
            self.ask(peer, conv);
        } else {
            self.e.syncing.remove(&(peer, conv));
            // What waited for a gap to be filled may open now (once per
            // session: the pending table can be long).
            self.reprocess_pending(&conv);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn counters_fold_into_ranges() {
        assert_eq!(
            ranges_of([0, 1, 2, 5, 6, 9].into_iter()),
            vec![(0, 3), (5, 7), (9, 10)]
        );
        assert_eq!(ranges_of([4, 4, 5].into_iter()), vec![(4, 6)]);
        assert!(ranges_of(std::iter::empty()).is_empty());
    }

    #[test]
    fn too_many_ranges_are_cut_not_merged() {
        let r = ranges_of((0..10_000u64).map(|c| c * 2));
        assert_eq!(r.len(), MAX_RANGES);
        // Cutting only ever under-claims: the gaps stay gaps.
        assert!(!covers(&r, 1));
        assert!(!covers(&r, 5000));
    }

    proptest! {
        // A summary claims exactly the counters held (up to the cut).
        #[test]
        fn ranges_cover_exactly_what_is_held(mut held in proptest::collection::vec(0u64..500, 0..200)) {
            held.sort_unstable();
            let r = ranges_of(held.iter().copied());
            for c in 0..520 {
                prop_assert_eq!(covers(&r, c), held.binary_search(&c).is_ok());
            }
        }
    }
}

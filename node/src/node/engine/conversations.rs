//! Conversations: finding one by name, tag or topic, the gossip gate of
//! who may subscribe to each, and each one's recipient devices (with the
//! keys to seal to).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use libp2p::PeerId;

use crate::identity::{DeviceCertificate, peer_id_of};
use crate::ids::{ConversationId, DeviceId, RoutingTag, UserId};
use crate::net::NetCommand;
use crate::store::ConversationKind;

use super::EngineError;
use super::{Conv, Effect, ROUTING_TAGS_CACHE, Recipients, State, account, tag_slot};

/// Conversations by gossip topic and routing tag, who is subscribed to
/// each topic, and when the gossip gate is due to be told the members.
#[derive(Default)]
pub(super) struct Topics {
    by_topic: HashMap<String, ConversationId>,
    /// Routing tags known (current and earlier epochs), at most
    /// [`ROUTING_TAGS_CACHE`]: the store knows every tag.
    by_tag: HashMap<RoutingTag, ConversationId>,
    subscribed: HashMap<String, HashSet<PeerId>>,
    /// When the gossip gate (who may subscribe to which topic) is to be
    /// told the member devices again (`None`: it is up to date).
    gates_due: Option<tokio::time::Instant>,
}

impl Topics {
    /// Empty, with the gate to be told at once (at start).
    pub(super) fn gates_due_now() -> Self {
        Self {
            gates_due: Some(tokio::time::Instant::now()),
            ..Self::default()
        }
    }

    pub(super) fn add_topic(&mut self, topic: String, conv: ConversationId) {
        self.by_topic.insert(topic, conv);
    }

    pub(super) fn conversation_of_topic(&self, topic: &str) -> Option<ConversationId> {
        self.by_topic.get(topic).copied()
    }

    /// Puts a tag in the bounded cache; true if it was not there.
    pub(super) fn cache_tag(&mut self, tag: RoutingTag, conv: ConversationId) -> bool {
        if self.by_tag.len() >= ROUTING_TAGS_CACHE {
            self.by_tag.clear();
        }
        self.by_tag.insert(tag, conv).is_none()
    }

    /// At start: fills the cache while there is room, evicting nothing.
    pub(super) fn preload_tag(&mut self, tag: RoutingTag, conv: ConversationId) {
        if self.by_tag.len() < ROUTING_TAGS_CACHE {
            self.by_tag.insert(tag, conv);
        }
    }

    pub(super) fn cached_tag(&self, tag: &RoutingTag) -> Option<ConversationId> {
        self.by_tag.get(tag).copied()
    }

    /// Notes `peer` on `topic`: only a topic of a conversation here is
    /// tracked (a peer may subscribe to any topic it likes, and those are
    /// nothing to us), and a topic's entry goes with its last peer, so the
    /// map holds at most our topics with their connected subscribers.
    pub(super) fn subscribed(&mut self, peer: PeerId, topic: String) {
        if self.by_topic.contains_key(&topic) {
            self.subscribed.entry(topic).or_default().insert(peer);
        }
    }

    pub(super) fn unsubscribed(&mut self, peer: &PeerId, topic: &str) {
        if let Some(peers) = self.subscribed.get_mut(topic) {
            peers.remove(peer);
            if peers.is_empty() {
                self.subscribed.remove(topic);
            }
        }
    }

    pub(super) fn disconnected(&mut self, peer: &PeerId) {
        self.subscribed.retain(|_, peers| {
            peers.remove(peer);
            !peers.is_empty()
        });
    }

    /// The peers subscribed to `topic`, as far as gossip has told.
    pub(super) fn subscribers(&self, topic: &str) -> Option<&HashSet<PeerId>> {
        self.subscribed.get(topic)
    }

    /// The gate is to be told again at `due`, or later if a change already
    /// waiting asked for later (changes coming in a burst are told once).
    pub(super) fn gates_changed(&mut self, due: tokio::time::Instant) {
        self.gates_due = Some(self.gates_due.map_or(due, |d| d.max(due)));
    }

    /// Whether the gate is due to be told at `now`; it then counts as told.
    pub(super) fn take_gates_due(&mut self, now: tokio::time::Instant) -> bool {
        match self.gates_due {
            Some(due) if due <= now => {
                self.gates_due = None;
                true
            }
            _ => false,
        }
    }
}

impl State<'_, '_> {
    /// The conversations this user is (still) a member of.
    pub(super) fn active_convs(&self) -> Vec<Conv> {
        self.e
            .convs
            .values()
            .filter(|c| c.active)
            .cloned()
            .collect()
    }

    pub(super) fn add_conv(&mut self, conv: Conv) {
        // A conversation without a routing secret (protocol 1) has no
        // topic to join.
        if conv.active && conv.tag.is_some() {
            self.fx
                .push(Effect::Net(NetCommand::Subscribe(conv.topic.clone())));
        }
        self.e.topics.add_topic(conv.topic.clone(), conv.id);
        let (id, tag) = (conv.id, conv.tag);
        self.e.convs.insert(id, conv);
        self.gates_changed(Duration::ZERO);
        if let Some(tag) = tag {
            self.tag_found(tag, id);
        }
    }

    /// Notes where a tag belongs (in a bounded cache: the store knows every
    /// tag), and takes in the chain envelopes that waited for it.
    pub(super) fn tag_found(&mut self, tag: RoutingTag, conv: ConversationId) {
        if self.cache_tag(tag, conv) {
            self.reprocess_pending(&tag_slot(&tag));
        }
    }

    /// Puts a tag in the bounded cache; true if it was not there.
    pub(super) fn cache_tag(&mut self, tag: RoutingTag, conv: ConversationId) -> bool {
        self.e.topics.cache_tag(tag, conv)
    }

    /// The conversation a routing tag names, if this node knows the tag.
    pub(super) fn conversation_of_tag(
        &mut self,
        tag: &RoutingTag,
    ) -> Result<Option<ConversationId>, EngineError> {
        if let Some(conv) = self.e.topics.cached_tag(tag) {
            return Ok(Some(conv));
        }
        let conv = self.db.conversation_of_tag(tag)?;
        if let Some(conv) = conv {
            self.cache_tag(*tag, conv);
        }
        Ok(conv)
    }

    /// Members or devices changed: the gate is told again after `delay`
    /// (never sooner than a change already waiting asked for).
    pub(super) fn gates_changed(&mut self, delay: Duration) {
        self.e
            .topics
            .gates_changed(tokio::time::Instant::now() + delay);
    }

    /// Tells the gossip gate, for every topic, which peers may take it:
    /// the member devices of its conversation, nobody else.
    pub(super) fn refresh_gates(&mut self) {
        if !self.e.topics.take_gates_due(tokio::time::Instant::now()) {
            return;
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
    pub(super) fn resolve(&mut self, target: &str) -> Result<ConversationId, EngineError> {
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
                return Err(EngineError::usage(format!(
                    "{n} groups are named {target}: use the conversation id (weft group list)"
                )));
            }
        }
        if let Ok(user) = target.parse::<UserId>() {
            if user == self.e.my_user {
                return Err(EngineError::usage("that is your own user id"));
            }
            if let Some(c) = self.db.contact(&user)? {
                return self.ensure_direct(&user, &c.alias);
            }
            let id = ConversationId::direct(&self.e.my_user, &user);
            if self.e.convs.contains_key(&id) {
                return Ok(id);
            }
            return Err(EngineError::usage(format!(
                "user {target} is not a contact: add their invite first"
            )));
        }
        if let Ok(id) = target.parse::<ConversationId>()
            && self.e.convs.contains_key(&id)
            && id != account::account_conversation(&self.e.my_user)
        {
            return Ok(id);
        }
        Err(EngineError::usage(format!(
            "unknown contact, group or conversation: {target}"
        )))
    }

    pub(super) fn group(&mut self, target: &str) -> Result<Conv, EngineError> {
        let id = self.resolve(target)?;
        match self.e.convs.get(&id) {
            Some(c) if c.kind == ConversationKind::Group => Ok(c.clone()),
            _ => Err(EngineError::usage(format!("{target} is not a group"))),
        }
    }

    /// TARGET's conversation, which this user must still be a member of.
    pub(super) fn active_conversation(&mut self, target: &str) -> Result<Conv, EngineError> {
        let id = self.resolve(target)?;
        let conv = self
            .e
            .convs
            .get(&id)
            .cloned()
            .ok_or_else(|| EngineError::failed("conversation vanished"))?;
        if !conv.active {
            return Err(EngineError::usage(
                "you are no longer a member of this group",
            ));
        }
        Ok(conv)
    }

    /// The member peers of a conversation that are connected now.
    pub(super) fn connected_members(&mut self, conv: &Conv) -> Vec<PeerId> {
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
    pub(super) fn recipients(&mut self, conv: &Conv) -> Result<Arc<Recipients>, EngineError> {
        let fingerprint = (
            conv.key_epoch,
            conv.group
                .as_ref()
                .map_or(conv.members.len(), |g| g.members.len()),
        );
        if let Some(r) = self.e.directory.recipients(&conv.id, fingerprint) {
            return Ok(r);
        }
        let devices = self.compute_recipients(conv)?;
        let peers = devices.iter().map(|(d, _)| peer_id_of(d)).collect();
        let r = Arc::new(Recipients {
            fingerprint,
            devices,
            peers,
        });
        self.e.directory.keep_recipients(conv.id, r.clone());
        Ok(r)
    }

    /// Forgets what was derived from device certificates and memberships.
    pub(super) fn devices_changed(&mut self) {
        self.gates_changed(Duration::ZERO);
        self.e.directory.changed();
    }

    pub(super) fn compute_recipients(
        &self,
        conv: &Conv,
    ) -> Result<Vec<(DeviceId, [u8; 32])>, EngineError> {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    #[test]
    fn only_our_topics_are_tracked_and_an_empty_one_goes() {
        let mut topics = Topics::default();
        topics.add_topic("ours".into(), ConversationId([1; 32]));
        let (alice, bob) = (PeerId::random(), PeerId::random());
        for n in 0..1_000 {
            topics.subscribed(alice, format!("junk-{n}"));
        }
        topics.subscribed(alice, "ours".into());
        topics.subscribed(bob, "ours".into());
        assert_eq!(
            topics.subscribed.len(),
            1,
            "a stranger's topics are not kept"
        );
        topics.unsubscribed(&alice, "ours");
        assert_eq!(topics.subscribers("ours").map(HashSet::len), Some(1));
        topics.disconnected(&bob);
        assert!(topics.subscribed.is_empty(), "no empty entry is left");
    }

    #[test]
    fn the_tag_cache_stays_bounded_and_the_preload_evicts_nothing() {
        let mut topics = Topics::default();
        let tag = |i: usize| {
            let mut t = [0u8; 16];
            t[..8].copy_from_slice(&(i as u64).to_le_bytes());
            RoutingTag(t)
        };
        let conv = ConversationId([1; 32]);
        for i in 0..ROUTING_TAGS_CACHE + 10 {
            topics.preload_tag(tag(i), conv);
        }
        assert_eq!(topics.cached_tag(&tag(0)), Some(conv));
        assert_eq!(topics.cached_tag(&tag(ROUTING_TAGS_CACHE)), None);
        assert_eq!(topics.by_tag.len(), ROUTING_TAGS_CACHE);
        // Full: a tag cached now starts the cache afresh.
        assert!(topics.cache_tag(tag(ROUTING_TAGS_CACHE), conv));
        assert_eq!(topics.by_tag.len(), 1);
        assert!(
            !topics.cache_tag(tag(ROUTING_TAGS_CACHE), conv),
            "already cached"
        );
    }

    #[test]
    fn the_gate_is_told_once_after_the_latest_change_asked() {
        let mut topics = Topics::default();
        let t0 = Instant::now();
        assert!(!topics.take_gates_due(t0), "nothing changed");
        topics.gates_changed(t0 + Duration::from_millis(50));
        topics.gates_changed(t0);
        assert!(!topics.take_gates_due(t0 + Duration::from_millis(10)));
        assert!(topics.take_gates_due(t0 + Duration::from_millis(50)));
        assert!(
            !topics.take_gates_due(t0 + Duration::from_millis(60)),
            "told once"
        );
    }

    #[test]
    fn a_peer_that_leaves_is_subscribed_nowhere() {
        let mut topics = Topics::default();
        topics.add_topic("t1".into(), ConversationId([1; 32]));
        topics.add_topic("t2".into(), ConversationId([2; 32]));
        let (bob, carol) = (PeerId::random(), PeerId::random());
        topics.subscribed(bob, "t1".into());
        topics.subscribed(bob, "t2".into());
        topics.subscribed(carol, "t1".into());
        topics.unsubscribed(&carol, "t1");
        topics.disconnected(&bob);
        assert!(topics.subscribers("t1").is_none());
        assert!(topics.subscribers("t2").is_none());
    }
}

//! Presence and typing: heartbeats to the peers this user shares presence
//! with, who is online and when they were last seen, and short-lived
//! typing indicators. Typing is never stored; presence keeps only a
//! contact's last-seen time.
//!
//! Both travel on the direct protocol to connected peers: the connection
//! itself (noise, keyed by the device key) says which device is speaking.

use std::collections::HashMap;
use std::time::Duration;

use libp2p::PeerId;

use crate::api::Event;
use crate::api::{PresenceView, PrivacyView, TypingView};
use crate::identity::peer_id_of;
use crate::ids::{ConversationId, DeviceId, UserId};
use crate::node::now_ms;
use crate::store::meta;

use super::EngineError;
use super::{DirectRequest, Effect, EngineResult, State};

/// A device counts as online this many heartbeat intervals after the last.
const ONLINE_GRACE: f64 = 2.5;
/// Bounds a peer may ask for between heartbeats.
const MIN_INTERVAL_MS: u32 = 1_000;
const MAX_INTERVAL_MS: u32 = 3_600_000;
/// Most users and typing indicators tracked.
const MAX_TRACKED: usize = 4096;
/// Most devices mapped from peer ids.
const MAX_DEVICES: usize = 65_536;

/// Who sees this user's presence and typing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Share {
    /// Anyone this user shares a conversation with.
    Everyone,
    /// Contacts only (the default).
    #[default]
    Contacts,
    Nobody,
}

impl Share {
    pub fn as_str(self) -> &'static str {
        match self {
            Share::Everyone => "everyone",
            Share::Contacts => "contacts",
            Share::Nobody => "nobody",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "everyone" => Some(Share::Everyone),
            "contacts" => Some(Share::Contacts),
            "nobody" => Some(Share::Nobody),
            _ => None,
        }
    }
}

/// What we know of one user's presence.
#[derive(Clone, Copy, Debug)]
pub(in crate::node) struct Presence {
    /// Online until then, unless heard from again.
    until: tokio::time::Instant,
    last_seen_ms: i64,
}

/// What this node knows of others' presence and typing, and whom it
/// shares its own with.
#[derive(Default)]
pub(super) struct PresenceBook {
    seen: HashMap<UserId, Presence>,
    typing: HashMap<(ConversationId, UserId), tokio::time::Instant>,
    pub(super) share: Share,
}

/// What happened to someone's presence or typing: the events to emit.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Change {
    Online(UserId, i64),
    Offline(UserId, i64),
    Typing(ConversationId, UserId, bool),
}

impl PresenceBook {
    /// A book that knows nobody yet, sharing this user's presence as
    /// `share` says.
    pub(super) fn sharing(share: Share) -> Self {
        Self {
            share,
            ..Self::default()
        }
    }

    /// `user` was heard from at `now_ms` and counts as online until
    /// `until`. `Some` when they came online (at most [`MAX_TRACKED`]
    /// users are tracked; others are not shown online).
    pub(super) fn heard(
        &mut self,
        user: UserId,
        until: tokio::time::Instant,
        now_ms: i64,
    ) -> Option<Change> {
        if self.seen.len() >= MAX_TRACKED && !self.seen.contains_key(&user) {
            return None;
        }
        let presence = Presence {
            until,
            last_seen_ms: now_ms,
        };
        match self.seen.insert(user, presence) {
            None => Some(Change::Online(user, now_ms)),
            Some(_) => None,
        }
    }

    /// `user` left (their last device disconnected): offline, and no longer
    /// typing anywhere.
    pub(super) fn gone(&mut self, user: UserId) -> Vec<Change> {
        let mut changes: Vec<Change> = self
            .seen
            .remove(&user)
            .map(|p| Change::Offline(user, p.last_seen_ms))
            .into_iter()
            .collect();
        let convs: Vec<ConversationId> = self
            .typing
            .keys()
            .filter(|(_, u)| *u == user)
            .map(|(c, _)| *c)
            .collect();
        changes.extend(
            convs
                .into_iter()
                .filter_map(|c| self.stopped_typing(c, user)),
        );
        changes
    }

    /// Presences whose heartbeats stopped and typing that timed out by `now`.
    pub(super) fn expire(&mut self, now: tokio::time::Instant) -> Vec<Change> {
        let mut changes = Vec::new();
        self.seen.retain(|user, p| {
            let live = p.until > now;
            if !live {
                changes.push(Change::Offline(*user, p.last_seen_ms));
            }
            live
        });
        self.typing.retain(|(conv, user), until| {
            let live = *until > now;
            if !live {
                changes.push(Change::Typing(*conv, *user, false));
            }
            live
        });
        changes
    }

    pub(super) fn is_online(&self, user: &UserId) -> bool {
        self.seen.contains_key(user)
    }

    /// `user` is typing in `conv` until `until`; `Some` when they started.
    pub(super) fn started_typing(
        &mut self,
        conv: ConversationId,
        user: UserId,
        until: tokio::time::Instant,
    ) -> Option<Change> {
        if self.typing.len() >= MAX_TRACKED && !self.typing.contains_key(&(conv, user)) {
            return None;
        }
        match self.typing.insert((conv, user), until) {
            None => Some(Change::Typing(conv, user, true)),
            Some(_) => None,
        }
    }

    /// `user` stopped typing in `conv`; `Some` when they were.
    pub(super) fn stopped_typing(&mut self, conv: ConversationId, user: UserId) -> Option<Change> {
        self.typing
            .remove(&(conv, user))
            .map(|_| Change::Typing(conv, user, false))
    }
}

impl State<'_, '_> {
    /// The device and user behind a peer id, if it is a known device.
    pub(super) fn who(&mut self, peer: &PeerId) -> Option<(DeviceId, UserId)> {
        if let Some(who) = self.e.directory.peer_device(peer) {
            return who;
        }
        // Rebuilt on a miss (certificates change rarely); an unknown peer
        // is remembered as unknown until devices change.
        let devices = self.db.all_devices(MAX_DEVICES).ok()?;
        self.e.directory.rebuild_peers(
            devices
                .into_iter()
                .map(|(device, user)| (peer_id_of(&device), device, user)),
            *peer,
            MAX_DEVICES,
        );
        self.e.directory.peer_device(peer).flatten()
    }

    /// Whether this user's presence and typing may go to `user`.
    fn shares_with(&self, user: &UserId) -> bool {
        if self.e.directory.blocked.contains(user) || *user == self.e.my_user {
            return false;
        }
        match self.e.presence.share {
            Share::Nobody => false,
            Share::Contacts => self.db.contact(user).ok().flatten().is_some(),
            Share::Everyone => self
                .e
                .convs
                .values()
                .any(|c| c.active && c.members.contains(user)),
        }
    }

    /// Tells every connected peer we share presence with that we are here.
    pub(super) fn heartbeat(&mut self) {
        let peers: Vec<PeerId> = self.e.connected.iter().copied().collect();
        for peer in peers {
            self.heartbeat_to(peer);
        }
    }

    pub(super) fn heartbeat_to(&mut self, peer: PeerId) {
        let Some((_, user)) = self.who(&peer) else {
            return;
        };
        if !self.shares_with(&user) {
            return;
        }
        let interval_ms = u32::try_from(self.e.settings.heartbeat.as_millis()).unwrap_or(u32::MAX);
        self.fx.push(Effect::Notify {
            peer,
            request: DirectRequest::Presence { interval_ms },
        });
    }

    pub(super) fn on_presence(&mut self, peer: PeerId, interval_ms: u32) {
        let Some((_, user)) = self.who(&peer) else {
            return;
        };
        if self.e.directory.blocked.contains(&user) {
            return;
        }
        let interval = interval_ms.clamp(MIN_INTERVAL_MS, MAX_INTERVAL_MS);
        let grace = Duration::from_millis((f64::from(interval) * ONLINE_GRACE) as u64);
        let now = now_ms();
        if let Err(e) = self.db.set_last_seen(&user, now) {
            tracing::warn!("last seen: {e}");
        }
        let until = tokio::time::Instant::now() + grace;
        if let Some(change) = self.e.presence.heard(user, until, now) {
            self.emit(change);
        }
    }

    /// A peer disconnected: its user is offline unless another of their
    /// devices is still connected.
    pub(super) fn peer_gone(&mut self, peer: PeerId) {
        let Some((_, user)) = self.who(&peer) else {
            return;
        };
        let still_here = self
            .e
            .connected
            .iter()
            .copied()
            .collect::<Vec<_>>()
            .into_iter()
            .any(|p| self.who(&p).is_some_and(|(_, u)| u == user));
        if still_here {
            return;
        }
        for change in self.e.presence.gone(user) {
            self.emit(change);
        }
    }

    /// Ends presences whose heartbeats stopped and typing that timed out.
    pub(super) fn expire_presence(&mut self) {
        for change in self.e.presence.expire(tokio::time::Instant::now()) {
            self.emit(change);
        }
    }

    /// The event of a presence or typing change.
    fn emit(&mut self, change: Change) {
        let event = match change {
            Change::Online(user, at) | Change::Offline(user, at) => Event::Presence {
                user_id: user.to_string(),
                name: self.user_name(&user),
                online: matches!(change, Change::Online(..)),
                last_seen: Some(at),
            },
            Change::Typing(conv, user, typing) => Event::Typing {
                conversation: conv.to_string(),
                user_id: user.to_string(),
                name: self.user_name(&user),
                typing,
            },
        };
        self.fx.push(Effect::Event(event));
    }

    /// `weft presence TARGET`.
    pub(super) fn presence_of(&mut self, target: &str) -> EngineResult<PresenceView> {
        let user = match self.contact(target) {
            Ok(c) => c.user_id,
            Err(e) => match target.parse::<UserId>() {
                Ok(u) => u,
                Err(_) => return Err(e),
            },
        };
        let online = self.e.presence.is_online(&user);
        let last_seen = self.db.last_seen(&user)?;
        Ok(PresenceView {
            user_id: user.to_string(),
            name: self.user_name(&user),
            online,
            last_seen,
        })
    }

    /// `weft privacy [--presence MODE]`.
    pub(super) fn privacy(&mut self, presence: Option<&str>) -> EngineResult<PrivacyView> {
        if let Some(mode) = presence {
            let share = Share::parse(mode).ok_or_else(|| {
                EngineError::usage(format!(
                    "presence sharing must be everyone, contacts or nobody, not {mode}"
                ))
            })?;
            self.db
                .set_meta(meta::PRESENCE_SHARE, share.as_str().as_bytes())?;
            self.e.presence.share = share;
            self.change_account(|a| a.set_privacy(share.as_str()))?;
        }
        Ok(PrivacyView {
            presence: self.e.presence.share.as_str().to_string(),
        })
    }

    /// `weft typing TARGET`: tells the connected member devices we share
    /// presence with.
    pub(super) fn send_typing(&mut self, target: &str, typing: bool) -> EngineResult<TypingView> {
        let conv = self.active_conversation(target)?;
        let conv_id = conv.id;
        let mut told = 0u64;
        for peer in self.connected_members(&conv) {
            let Some((_, user)) = self.who(&peer) else {
                continue;
            };
            if !self.shares_with(&user) {
                continue;
            }
            told += 1;
            self.fx.push(Effect::Notify {
                peer,
                request: DirectRequest::Typing {
                    conversation: conv_id,
                    typing,
                },
            });
        }
        Ok(TypingView {
            conversation: conv_id.to_string(),
            typing,
            told,
        })
    }

    pub(super) fn on_typing(&mut self, peer: PeerId, conv: ConversationId, typing: bool) {
        let Some((_, user)) = self.who(&peer) else {
            return;
        };
        if self.e.directory.blocked.contains(&user)
            || !self
                .e
                .convs
                .get(&conv)
                .is_some_and(|c| c.active && c.members.contains(&user))
        {
            return;
        }
        if !typing {
            self.typing_done(conv, user);
            return;
        }
        let until = tokio::time::Instant::now() + self.e.settings.typing_ttl;
        if let Some(change) = self.e.presence.started_typing(conv, user, until) {
            self.emit(change);
        }
    }

    /// The user stopped typing (said so, timed out, or sent the message).
    pub(super) fn typing_done(&mut self, conv: ConversationId, user: UserId) {
        if let Some(change) = self.e.presence.stopped_typing(conv, user) {
            self.emit(change);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    fn user(n: u8) -> UserId {
        UserId([n; 32])
    }

    fn conv(n: u8) -> ConversationId {
        ConversationId([n; 32])
    }

    #[test]
    fn a_user_comes_online_once_and_goes_offline_when_heartbeats_stop() {
        let mut book = PresenceBook::default();
        let t0 = Instant::now();
        let bob = user(1);
        assert_eq!(
            book.heard(bob, t0 + Duration::from_secs(10), 1_000),
            Some(Change::Online(bob, 1_000))
        );
        // Heard again: still online, no second event, the window moves.
        assert_eq!(book.heard(bob, t0 + Duration::from_secs(20), 2_000), None);
        assert!(book.expire(t0 + Duration::from_secs(15)).is_empty());
        assert!(book.is_online(&bob));
        assert_eq!(
            book.expire(t0 + Duration::from_secs(20)),
            vec![Change::Offline(bob, 2_000)]
        );
        assert!(!book.is_online(&bob));
    }

    #[test]
    fn leaving_ends_presence_and_typing_everywhere() {
        let mut book = PresenceBook::default();
        let t0 = Instant::now();
        let (bob, carol) = (user(1), user(2));
        book.heard(bob, t0 + Duration::from_secs(10), 5);
        assert_eq!(
            book.started_typing(conv(1), bob, t0 + Duration::from_secs(3)),
            Some(Change::Typing(conv(1), bob, true))
        );
        assert_eq!(
            book.started_typing(conv(1), bob, t0 + Duration::from_secs(4)),
            None
        );
        book.started_typing(conv(1), carol, t0 + Duration::from_secs(3));
        let changes = book.gone(bob);
        assert_eq!(
            changes,
            vec![Change::Offline(bob, 5), Change::Typing(conv(1), bob, false)]
        );
        assert_eq!(book.gone(bob), vec![]);
        // carol's typing times out on its own.
        assert_eq!(
            book.expire(t0 + Duration::from_secs(3)),
            vec![Change::Typing(conv(1), carol, false)]
        );
        assert_eq!(book.stopped_typing(conv(1), carol), None);
    }

    #[test]
    fn at_most_max_tracked_users_are_tracked() {
        let mut book = PresenceBook::default();
        let until = Instant::now() + Duration::from_secs(10);
        for i in 0..MAX_TRACKED {
            let mut id = [0u8; 32];
            id[..8].copy_from_slice(&(i as u64).to_le_bytes());
            assert!(book.heard(UserId(id), until, 1).is_some());
        }
        assert_eq!(book.heard(user(0xff), until, 1), None);
        assert!(!book.is_online(&user(0xff)));
    }
}

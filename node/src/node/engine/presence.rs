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
    pub(super) seen: HashMap<UserId, Presence>,
    pub(super) typing: HashMap<(ConversationId, UserId), tokio::time::Instant>,
    pub(super) share: Share,
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
        if self.e.presence.seen.len() >= MAX_TRACKED && !self.e.presence.seen.contains_key(&user) {
            return;
        }
        let was_online = self.e.presence.seen.contains_key(&user);
        self.e.presence.seen.insert(
            user,
            Presence {
                until: tokio::time::Instant::now() + grace,
                last_seen_ms: now,
            },
        );
        if !was_online {
            self.presence_event(user, true, Some(now));
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
        if let Some(p) = self.e.presence.seen.remove(&user) {
            self.presence_event(user, false, Some(p.last_seen_ms));
        }
        let typing: Vec<ConversationId> = self
            .e
            .presence
            .typing
            .keys()
            .filter(|(_, u)| *u == user)
            .map(|(c, _)| *c)
            .collect();
        for conv in typing {
            self.typing_done(conv, user);
        }
    }

    /// Ends presences whose heartbeats stopped and typing that timed out.
    pub(super) fn expire_presence(&mut self) {
        let now = tokio::time::Instant::now();
        let gone: Vec<(UserId, i64)> = self
            .e
            .presence
            .seen
            .iter()
            .filter(|(_, p)| p.until <= now)
            .map(|(u, p)| (*u, p.last_seen_ms))
            .collect();
        for (user, last_seen) in gone {
            self.e.presence.seen.remove(&user);
            self.presence_event(user, false, Some(last_seen));
        }
        let stopped: Vec<(ConversationId, UserId)> = self
            .e
            .presence
            .typing
            .iter()
            .filter(|(_, until)| **until <= now)
            .map(|(k, _)| *k)
            .collect();
        for (conv, user) in stopped {
            self.typing_done(conv, user);
        }
    }

    fn presence_event(&mut self, user: UserId, online: bool, last_seen: Option<i64>) {
        self.fx.push(Effect::Event(Event::Presence {
            user_id: user.to_string(),
            name: self.user_name(&user),
            online,
            last_seen,
        }));
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
        let online = self.e.presence.seen.contains_key(&user);
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
        if self.e.presence.typing.len() >= MAX_TRACKED
            && !self.e.presence.typing.contains_key(&(conv, user))
        {
            return;
        }
        let until = tokio::time::Instant::now() + self.e.settings.typing_ttl;
        if self.e.presence.typing.insert((conv, user), until).is_none() {
            self.typing_event(conv, user, true);
        }
    }

    /// The user stopped typing (said so, timed out, or sent the message).
    pub(super) fn typing_done(&mut self, conv: ConversationId, user: UserId) {
        if self.e.presence.typing.remove(&(conv, user)).is_some() {
            self.typing_event(conv, user, false);
        }
    }

    fn typing_event(&mut self, conv: ConversationId, user: UserId, typing: bool) {
        self.fx.push(Effect::Event(Event::Typing {
            conversation: conv.to_string(),
            user_id: user.to_string(),
            name: self.user_name(&user),
            typing,
        }));
    }
}

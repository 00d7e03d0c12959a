//! The directory: what the engine derived from device certificates and
//! memberships (each conversation's recipient devices, each device's
//! user, each peer id's device), and the users blocked and devices
//! revoked. The store is the truth; the derived caches are bounded and
//! forgotten whenever devices or memberships change.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use libp2p::PeerId;

use crate::ids::{ConversationId, DeviceId, UserId};

/// Conversations whose recipients are kept.
const RECIPIENTS_CACHE: usize = 4096;
/// Devices whose user is kept.
const DEVICE_USERS_CACHE: usize = 16_384;
/// Revoked devices held in memory (the store answers for the rest).
pub(super) const MAX_REVOKED: usize = 4096;

/// The member devices of a conversation other than this one, with the
/// keys to seal to and their peer ids: derived from certificates once,
/// used per send.
#[derive(Debug)]
pub(super) struct Recipients {
    /// Epoch and member count it was computed for.
    pub(super) fingerprint: (u64, usize),
    pub(super) devices: Vec<(DeviceId, [u8; 32])>,
    pub(super) peers: HashSet<PeerId>,
}

#[derive(Default)]
pub(super) struct Directory {
    recipients: HashMap<ConversationId, Arc<Recipients>>,
    device_users: HashMap<DeviceId, Option<UserId>>,
    /// Which device (and user) each peer id is (`None`: not a known
    /// device).
    device_by_peer: HashMap<PeerId, Option<(DeviceId, UserId)>>,
    pub(super) blocked: HashSet<UserId>,
    /// Devices revoked by their accounts (at most [`MAX_REVOKED`] kept in
    /// memory; the store keeps all): nothing from them is accepted.
    pub(super) revoked: HashSet<DeviceId>,
}

impl Directory {
    /// A conversation's recipients, if known for this `fingerprint`.
    pub(super) fn recipients(
        &self,
        conv: &ConversationId,
        fingerprint: (u64, usize),
    ) -> Option<Arc<Recipients>> {
        self.recipients
            .get(conv)
            .filter(|r| r.fingerprint == fingerprint)
            .cloned()
    }

    pub(super) fn keep_recipients(&mut self, conv: ConversationId, recipients: Arc<Recipients>) {
        if self.recipients.len() >= RECIPIENTS_CACHE {
            self.recipients.clear();
        }
        self.recipients.insert(conv, recipients);
    }

    /// A device's user as last looked up (`Some(None)`: not a known,
    /// unrevoked device; `None`: not looked up).
    pub(super) fn device_user(&self, device: &DeviceId) -> Option<Option<UserId>> {
        self.device_users.get(device).copied()
    }

    pub(super) fn keep_device_user(&mut self, device: DeviceId, user: Option<UserId>) {
        if self.device_users.len() >= DEVICE_USERS_CACHE {
            self.device_users.clear();
        }
        self.device_users.insert(device, user);
    }

    /// The device behind a peer id as last looked up (`Some(None)`: not a
    /// known device; `None`: not looked up).
    pub(super) fn peer_device(&self, peer: &PeerId) -> Option<Option<(DeviceId, UserId)>> {
        self.device_by_peer.get(peer).copied()
    }

    /// Replaces the peer → device map with `devices` (every known device,
    /// at most `max`), remembering `asked` as unknown if it is not one.
    pub(super) fn rebuild_peers(
        &mut self,
        devices: impl IntoIterator<Item = (PeerId, DeviceId, UserId)>,
        asked: PeerId,
        max: usize,
    ) {
        self.device_by_peer.clear();
        for (peer, device, user) in devices {
            self.device_by_peer.insert(peer, Some((device, user)));
        }
        if self.device_by_peer.len() < max {
            self.device_by_peer.entry(asked).or_insert(None);
        }
    }

    /// Forgets what was derived from device certificates and memberships.
    pub(super) fn changed(&mut self) {
        self.recipients.clear();
        self.device_users.clear();
        self.device_by_peer.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recipients_are_kept_for_their_fingerprint_only() {
        let mut dir = Directory::default();
        let conv = ConversationId([1; 32]);
        let r = Arc::new(Recipients {
            fingerprint: (1, 2),
            devices: Vec::new(),
            peers: HashSet::new(),
        });
        dir.keep_recipients(conv, r);
        assert!(dir.recipients(&conv, (1, 2)).is_some());
        // A new epoch or another member count: computed again.
        assert!(dir.recipients(&conv, (2, 2)).is_none());
        assert!(dir.recipients(&conv, (1, 3)).is_none());
        dir.changed();
        assert!(dir.recipients(&conv, (1, 2)).is_none());
    }

    #[test]
    fn unknown_devices_and_peers_are_remembered_as_unknown_until_a_change() {
        let mut dir = Directory::default();
        let (device, user) = (DeviceId([1; 32]), UserId([2; 32]));
        assert_eq!(dir.device_user(&device), None);
        dir.keep_device_user(device, None);
        assert_eq!(dir.device_user(&device), Some(None));
        dir.keep_device_user(device, Some(user));
        assert_eq!(dir.device_user(&device), Some(Some(user)));
        let (known, stranger) = (PeerId::random(), PeerId::random());
        dir.rebuild_peers([(known, device, user)], stranger, 10);
        assert_eq!(dir.peer_device(&known), Some(Some((device, user))));
        assert_eq!(dir.peer_device(&stranger), Some(None));
        // Full: a stranger is not remembered.
        let other = PeerId::random();
        dir.rebuild_peers([(known, device, user)], other, 1);
        assert_eq!(dir.peer_device(&other), None);
        dir.changed();
        assert_eq!(dir.device_user(&device), None);
        assert_eq!(dir.peer_device(&known), None);
    }
}

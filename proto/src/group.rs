//! Group membership: the state every member holds and the rules every
//! member checks before accepting a change. Pure: no I/O.
//!
//! A group's state is replaced whole by each change, with the epoch one
//! higher. Only admins may change it, except that any member may leave. Of
//! two concurrent changes with the same epoch, the one with the larger
//! hash (of the state without its routing secret, then the larger secret)
//! wins everywhere, so members converge.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::identity::{DeviceCertificate, MAX_DEVICES, validate_name};
use crate::ids::{ConversationId, UserId};

/// Most members a group may have.
pub const MAX_GROUP_MEMBERS: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupRole {
    Member,
    Admin,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupMember {
    pub user: UserId,
    pub name: String,
    pub role: GroupRole,
    pub devices: Vec<DeviceCertificate>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupState {
    pub id: ConversationId,
    pub name: String,
    pub epoch: u64,
    pub members: Vec<GroupMember>,
    /// The group's routing secret for this epoch (`crate::routing`): fresh
    /// with every change of members, so a removed member cannot recognise
    /// the group's envelopes or topic afterwards. The state travels only
    /// sealed to member devices.
    pub routing: [u8; 32],
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GroupError {
    #[error("only an admin may do that")]
    NotAdmin,
    #[error("not a member of the group")]
    NotMember,
    #[error("a group has at most {MAX_GROUP_MEMBERS} members")]
    TooManyMembers,
    #[error("this change is older than the group's current state")]
    Stale,
    #[error("invalid group state: {0}")]
    Invalid(&'static str),
}

impl GroupState {
    pub fn member(&self, user: &UserId) -> Option<&GroupMember> {
        self.members.iter().find(|m| &m.user == user)
    }

    pub fn is_admin(&self, user: &UserId) -> bool {
        self.member(user)
            .is_some_and(|m| m.role == GroupRole::Admin)
    }

    pub fn routing(&self) -> crate::routing::Routing {
        crate::routing::Routing::from_bytes(self.routing)
    }

    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Option<Self> {
        postcard::from_bytes(bytes).ok()
    }

    /// Orders concurrent states of one epoch: the hash of the state
    /// without its routing secret, then the secret. A removed member is
    /// shown the state with the secret blanked (`routing` zero); ordered
    /// this way it still picks the same winner as the members.
    fn order_key(&self) -> ([u8; 32], [u8; 32]) {
        let mut bare = self.clone();
        bare.routing = [0; 32];
        (*blake3::hash(&bare.encode()).as_bytes(), self.routing)
    }

    /// Checks the state on its own: sizes, names, certificates, an admin.
    pub fn check(&self) -> Result<(), GroupError> {
        validate_name(&self.name).map_err(|_| GroupError::Invalid("group name"))?;
        if self.members.len() > MAX_GROUP_MEMBERS {
            return Err(GroupError::TooManyMembers);
        }
        let mut seen = BTreeSet::new();
        for m in &self.members {
            if !seen.insert(m.user) {
                return Err(GroupError::Invalid("duplicate member"));
            }
            validate_name(&m.name).map_err(|_| GroupError::Invalid("member name"))?;
            if m.devices.is_empty() || m.devices.len() > MAX_DEVICES {
                return Err(GroupError::Invalid("member devices"));
            }
            for d in &m.devices {
                if d.user != m.user || d.verify().is_err() {
                    return Err(GroupError::Invalid("member device certificate"));
                }
            }
        }
        if !self.members.is_empty() && !self.members.iter().any(|m| m.role == GroupRole::Admin) {
            return Err(GroupError::Invalid("no admin"));
        }
        Ok(())
    }

    /// Whether `author` may replace `current` (if any) with `self`. `Ok`
    /// means apply it; `Err(Stale)` means keep the current state.
    pub fn check_transition(
        &self,
        current: Option<&GroupState>,
        author: &UserId,
    ) -> Result<(), GroupError> {
        self.check()?;
        let Some(current) = current else {
            // First sight of a group: its creator (or an admin who added us)
            // must be an admin of what we are shown.
            return if self.is_admin(author) {
                Ok(())
            } else {
                Err(GroupError::NotAdmin)
            };
        };
        if self.id != current.id {
            return Err(GroupError::Invalid("another group"));
        }
        if self.epoch < current.epoch
            || (self.epoch == current.epoch && self.order_key() <= current.order_key())
        {
            return Err(GroupError::Stale);
        }
        if current.is_admin(author) {
            return Ok(());
        }
        if current.member(author).is_none() {
            return Err(GroupError::NotMember);
        }
        // A member who is not an admin may only leave: the same members
        // without them, the same name, roles only raised (so a group whose
        // last admin leaves still has one).
        let before: BTreeMap<_, _> = current.members.iter().map(|m| (m.user, m)).collect();
        let after: BTreeMap<_, _> = self.members.iter().map(|m| (m.user, m)).collect();
        let expected: BTreeSet<_> = before.keys().filter(|u| *u != author).collect();
        let got: BTreeSet<_> = after.keys().collect();
        if expected != got || self.name != current.name {
            return Err(GroupError::NotAdmin);
        }
        for (user, m) in &after {
            let old = before.get(user).ok_or(GroupError::NotAdmin)?;
            if m.devices != old.devices
                || (old.role == GroupRole::Admin && m.role != GroupRole::Admin)
            {
                return Err(GroupError::NotAdmin);
            }
        }
        Ok(())
    }

    /// The state after `leaver` leaves, with the next epoch's routing
    /// secret: if no admin would remain, the longest-standing remaining
    /// member becomes one.
    pub fn without(&self, leaver: &UserId, routing: [u8; 32]) -> GroupState {
        let mut next = self.clone();
        next.epoch += 1;
        next.routing = routing;
        next.members.retain(|m| &m.user != leaver);
        if !next.members.iter().any(|m| m.role == GroupRole::Admin)
            && let Some(first) = next.members.first_mut()
        {
            first.role = GroupRole::Admin;
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::DeviceId;

    /// A seeded account with one certified device.
    struct Account {
        user: UserId,
        certificate: DeviceCertificate,
    }

    impl Account {
        fn from_seed(seed: &str) -> Self {
            let key = |what: &str| {
                blake3::derive_key("weft test account", format!("{seed}/{what}").as_bytes())
            };
            let user_key = ed25519_dalek::SigningKey::from_bytes(&key("user"));
            let device_key = ed25519_dalek::SigningKey::from_bytes(&key("device"));
            let public = |secret: [u8; 32]| {
                x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(secret)).to_bytes()
            };
            let (dh, account_dh) = (public(key("dh")), public(key("account")));
            let user = UserId(user_key.verifying_key().to_bytes());
            let device = DeviceId(device_key.verifying_key().to_bytes());
            let consent = DeviceCertificate::consent(&device_key, &user, &dh);
            let certificate =
                DeviceCertificate::issue(&user_key, &device, dh, account_dh, consent, 1).unwrap();
            Self { user, certificate }
        }

        fn user_id(&self) -> UserId {
            self.user
        }

        fn certificate(&self) -> &DeviceCertificate {
            &self.certificate
        }
    }

    fn member(seed: &str, role: GroupRole) -> (Account, GroupMember) {
        let id = Account::from_seed(seed);
        let m = GroupMember {
            user: id.user_id(),
            name: seed.to_string(),
            role,
            devices: vec![id.certificate().clone()],
        };
        (id, m)
    }

    fn group() -> (Vec<Account>, GroupState) {
        let (a, am) = member("alice", GroupRole::Admin);
        let (b, bm) = member("bob", GroupRole::Member);
        let (c, cm) = member("carol", GroupRole::Member);
        let state = GroupState {
            id: ConversationId([1; 32]),
            name: "friends".into(),
            epoch: 1,
            members: vec![am, bm, cm],
            routing: [8; 32],
        };
        (vec![a, b, c], state)
    }

    #[test]
    fn admin_may_remove_member_may_not() {
        let (ids, g) = group();
        let mut next = g.clone();
        next.epoch = 2;
        next.members.retain(|m| m.user != ids[2].user_id());
        assert_eq!(next.check_transition(Some(&g), &ids[0].user_id()), Ok(()));
        assert_eq!(
            next.check_transition(Some(&g), &ids[1].user_id()),
            Err(GroupError::NotAdmin)
        );
        // Carol may leave herself.
        assert_eq!(next.check_transition(Some(&g), &ids[2].user_id()), Ok(()));
        // Replaying an older state is refused.
        assert_eq!(
            g.check_transition(Some(&next), &ids[0].user_id()),
            Err(GroupError::Stale)
        );
    }

    #[test]
    fn last_admin_leaving_promotes_someone() {
        let (ids, g) = group();
        let next = g.without(&ids[0].user_id(), [9; 32]);
        assert!(next.members.iter().any(|m| m.role == GroupRole::Admin));
        assert_eq!(next.check_transition(Some(&g), &ids[0].user_id()), Ok(()));
    }

    #[test]
    fn concurrent_changes_converge() {
        let (ids, g) = group();
        let mut x = g.clone();
        x.epoch = 2;
        x.name = "x".into();
        let mut y = g.clone();
        y.epoch = 2;
        y.name = "y".into();
        let a = ids[0].user_id();
        let x_then_y = y.check_transition(Some(&x), &a).is_ok();
        let y_then_x = x.check_transition(Some(&y), &a).is_ok();
        assert_ne!(x_then_y, y_then_x, "exactly one order replaces the other");
    }

    #[test]
    fn forged_device_certificate_is_refused() {
        let (ids, mut g) = group();
        g.members[1].devices = vec![ids[2].certificate().clone()];
        assert!(g.check().is_err());
    }
}

//! Group membership: the state every member holds and the rules every
//! member checks before accepting a change. Pure: no I/O.
//!
//! A group's state is replaced whole by each change, with the epoch one
//! higher. Only admins may change it, except that any member may leave. Of
//! two concurrent changes with the same epoch, the one with the larger
//! hash (of the state without its routing secret, then the larger secret)
//! wins everywhere, so members converge.

use std::collections::BTreeSet;

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
        // No group gets 2^64 changes: a state at the last epoch can only
        // be a jump, and there would be no epoch left to move on to.
        if self.epoch == u64::MAX {
            return Err(GroupError::Invalid("epoch"));
        }
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
        // A member who is not an admin may only leave: exactly the members
        // `without` leaves (the others as they were, one promoted only if
        // no admin would remain), the same name.
        if self.members != current.members_without(author) || self.name != current.name {
            return Err(GroupError::NotAdmin);
        }
        Ok(())
    }

    /// The state after `leaver` leaves, with the next epoch's routing
    /// secret: if no admin would remain, the longest-standing remaining
    /// member becomes one.
    pub fn without(&self, leaver: &UserId, routing: [u8; 32]) -> GroupState {
        GroupState {
            epoch: self.epoch.saturating_add(1),
            routing,
            members: self.members_without(leaver),
            ..self.clone()
        }
    }

    /// The members once `leaver` has left: if no admin would remain, the
    /// longest-standing remaining member becomes one.
    fn members_without(&self, leaver: &UserId) -> Vec<GroupMember> {
        let mut members: Vec<GroupMember> = self
            .members
            .iter()
            .filter(|m| &m.user != leaver)
            .cloned()
            .collect();
        if !members.iter().any(|m| m.role == GroupRole::Admin)
            && let Some(first) = members.first_mut()
        {
            first.role = GroupRole::Admin;
        }
        members
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

    /// The next epoch's state, as its author would start it.
    fn next_of(g: &GroupState) -> GroupState {
        let mut next = g.clone();
        next.epoch += 1;
        next.routing = [9; 32];
        next
    }

    #[test]
    fn only_admins_add_rename_and_promote() {
        let (ids, g) = group();
        let (alice, bob) = (ids[0].user_id(), ids[1].user_id());
        let (_, dave) = member("dave", GroupRole::Member);
        let mut added = next_of(&g);
        added.members.push(dave);
        let mut renamed = next_of(&g);
        renamed.name = "foes".into();
        // Bob makes himself an admin.
        let mut promoted = next_of(&g);
        promoted.members[1].role = GroupRole::Admin;
        for next in [added, renamed, promoted] {
            assert_eq!(next.check_transition(Some(&g), &alice), Ok(()));
            assert_eq!(
                next.check_transition(Some(&g), &bob),
                Err(GroupError::NotAdmin)
            );
        }
    }

    #[test]
    fn an_admin_may_remove_or_demote_another_admin() {
        let (ids, mut g) = group();
        g.members[1].role = GroupRole::Admin;
        let (alice, bob) = (ids[0].user_id(), ids[1].user_id());
        let mut demoted = next_of(&g);
        demoted.members[0].role = GroupRole::Member;
        assert_eq!(demoted.check_transition(Some(&g), &bob), Ok(()));
        let mut removed = next_of(&g);
        removed.members.retain(|m| m.user != alice);
        assert_eq!(removed.check_transition(Some(&g), &bob), Ok(()));
    }

    #[test]
    fn a_removed_member_can_no_longer_change_the_group() {
        let (ids, g) = group();
        let carol = ids[2].user_id();
        let mut removed = next_of(&g);
        removed.members.retain(|m| m.user != carol);
        // At the next epoch, Carol puts herself back: she is no member.
        let mut back = g.clone();
        back.epoch = removed.epoch + 1;
        assert_eq!(
            back.check_transition(Some(&removed), &carol),
            Err(GroupError::NotMember)
        );
        // Her own leave at the epoch she was removed at, arriving late:
        // refused either way (stale, or by someone who is no member).
        let late_leave = g.without(&carol, [7; 32]);
        assert!(late_leave.check_transition(Some(&removed), &carol).is_err());
        // Someone never in the group: no member either.
        let (outsider, _) = member("mallory", GroupRole::Member);
        assert_eq!(
            next_of(&g).check_transition(Some(&g), &outsider.user_id()),
            Err(GroupError::NotMember)
        );
    }

    #[test]
    fn the_first_sight_of_a_group_needs_an_admin_author() {
        let (ids, g) = group();
        assert_eq!(g.check_transition(None, &ids[0].user_id()), Ok(()));
        assert_eq!(
            g.check_transition(None, &ids[1].user_id()),
            Err(GroupError::NotAdmin)
        );
        let (outsider, _) = member("mallory", GroupRole::Member);
        assert_eq!(
            g.check_transition(None, &outsider.user_id()),
            Err(GroupError::NotAdmin)
        );
    }

    #[test]
    fn a_leaver_changes_nothing_but_their_own_membership() {
        let (ids, g) = group();
        let bob = ids[1].user_id();
        let leave = g.without(&bob, [9; 32]);
        assert_eq!(leave.check_transition(Some(&g), &bob), Ok(()));
        let mut and_rename = leave.clone();
        and_rename.name = "foes".into();
        let mut and_remove = leave.clone();
        and_remove.members.retain(|m| m.user != ids[2].user_id());
        let mut and_demote = leave.clone();
        and_demote.members[0].role = GroupRole::Member;
        and_demote.members[1].role = GroupRole::Admin;
        let mut and_devices = leave.clone();
        let carols = and_devices.members[1].devices[0].clone();
        and_devices.members[1].devices.push(carols);
        let (_, dave) = member("dave", GroupRole::Member);
        let mut and_add = leave;
        and_add.members.push(dave);
        for next in [and_rename, and_remove, and_demote, and_devices, and_add] {
            assert_eq!(
                next.check_transition(Some(&g), &bob),
                Err(GroupError::NotAdmin)
            );
        }
    }

    #[test]
    fn a_group_always_keeps_an_admin() {
        let (ids, g) = group();
        let alice = ids[0].user_id();
        // The only admin leaves without handing on: no admin is left.
        let mut bare_leave = next_of(&g);
        bare_leave.members.retain(|m| m.user != alice);
        assert_eq!(
            bare_leave.check_transition(Some(&g), &alice),
            Err(GroupError::Invalid("no admin"))
        );
        // Nor may the only admin step down.
        let mut stepped_down = next_of(&g);
        stepped_down.members[0].role = GroupRole::Member;
        assert_eq!(
            stepped_down.check_transition(Some(&g), &alice),
            Err(GroupError::Invalid("no admin"))
        );
    }

    #[test]
    fn leaving_hands_on_admin_only_when_none_would_remain() {
        let (ids, g) = group();
        let after_bob = g.without(&ids[1].user_id(), [9; 32]);
        assert_eq!((after_bob.epoch, after_bob.routing), (2, [9; 32]));
        let roles: Vec<_> = after_bob.members.iter().map(|m| m.role).collect();
        assert_eq!(roles, [GroupRole::Admin, GroupRole::Member]);
        // Alice, the only admin, leaves: Bob, the first of the rest.
        let after_alice = g.without(&ids[0].user_id(), [9; 32]);
        let roles: Vec<_> = after_alice.members.iter().map(|m| m.role).collect();
        assert_eq!(roles, [GroupRole::Admin, GroupRole::Member]);
        assert_eq!(after_alice.members[0].user, ids[1].user_id());
        // The last member leaves: an empty group, which is a valid state.
        let alone = GroupState {
            members: vec![g.members[0].clone()],
            ..g.clone()
        };
        let empty = alone.without(&ids[0].user_id(), [9; 32]);
        assert!(empty.members.is_empty());
        assert_eq!(
            empty.check_transition(Some(&alone), &ids[0].user_id()),
            Ok(())
        );
    }

    #[test]
    fn old_and_replayed_states_are_stale() {
        let (ids, g) = group();
        let alice = ids[0].user_id();
        assert_eq!(g.check_transition(Some(&g), &alice), Err(GroupError::Stale));
        let next = next_of(&g);
        assert_eq!(
            g.check_transition(Some(&next), &alice),
            Err(GroupError::Stale)
        );
        // Stale is decided before who wrote it: a non-member's old state
        // is only stale.
        let (outsider, _) = member("mallory", GroupRole::Member);
        assert_eq!(
            g.check_transition(Some(&next), &outsider.user_id()),
            Err(GroupError::Stale)
        );
        // An admin may skip epochs.
        let mut later = next_of(&g);
        later.epoch = 7;
        assert_eq!(later.check_transition(Some(&g), &alice), Ok(()));
    }

    #[test]
    fn a_state_of_another_group_is_refused() {
        let (ids, g) = group();
        let mut other = next_of(&g);
        other.id = ConversationId([2; 32]);
        assert_eq!(
            other.check_transition(Some(&g), &ids[0].user_id()),
            Err(GroupError::Invalid("another group"))
        );
    }

    #[test]
    fn malformed_states_are_refused() {
        let (_, g) = group();
        let mut crowded = g.clone();
        crowded.members = vec![g.members[1].clone(); MAX_GROUP_MEMBERS + 1];
        assert_eq!(crowded.check(), Err(GroupError::TooManyMembers));
        let mut twice = g.clone();
        twice.members.push(g.members[1].clone());
        assert_eq!(twice.check(), Err(GroupError::Invalid("duplicate member")));
        let mut deviceless = g.clone();
        deviceless.members[1].devices.clear();
        assert_eq!(
            deviceless.check(),
            Err(GroupError::Invalid("member devices"))
        );
        let mut badly_named = g.clone();
        badly_named.members[1].name = "bob\u{1b}[2J".into();
        assert_eq!(badly_named.check(), Err(GroupError::Invalid("member name")));
        let mut unnamed = g;
        unnamed.name = String::new();
        assert_eq!(unnamed.check(), Err(GroupError::Invalid("group name")));
    }

    #[test]
    fn a_removed_member_shown_the_blanked_state_orders_it_alike() {
        let (_, g) = group();
        let mut x = next_of(&g);
        x.name = "x".into();
        let mut y = next_of(&g);
        y.name = "y".into();
        let mut x_blank = x.clone();
        x_blank.routing = [0; 32];
        let mut y_blank = y.clone();
        y_blank.routing = [0; 32];
        assert_eq!(
            x.order_key() < y.order_key(),
            x_blank.order_key() < y_blank.order_key()
        );
    }

    #[test]
    fn a_leaver_may_not_promote_while_an_admin_remains() {
        // Roles may only be raised on a leave so that a group whose last
        // admin leaves keeps one (`without` promotes only then). Before
        // the fix any leaver could raise anyone, e.g. an accomplice:
        // `left: Ok(()) right: Err(NotAdmin)`.
        let (ids, g) = group();
        let bob = ids[1].user_id();
        let mut leave = g.without(&bob, [9; 32]);
        leave.members[1].role = GroupRole::Admin; // Carol
        assert_eq!(
            leave.check_transition(Some(&g), &bob),
            Err(GroupError::NotAdmin)
        );
    }

    #[test]
    fn a_leave_cannot_jump_to_the_last_epoch() {
        // A member who is no admin could send their leave at epoch
        // u64::MAX: it was accepted, and the admin's move to a fresh
        // routing secret (`epoch += 1` in the engine's receive_group, and
        // in `without` and every admin change after) overflowed: a panic
        // in debug builds, epoch 0 (stale everywhere) in release ones.
        // Before the fix: `assertion failed: leave.check_transition(..).is_err()`.
        let (ids, g) = group();
        let bob = ids[1].user_id();
        let mut leave = g.without(&bob, [9; 32]);
        leave.epoch = u64::MAX;
        assert!(leave.check_transition(Some(&g), &bob).is_err());
    }

    #[test]
    #[ignore = "hole, for the lead: an admin's change concurrent with their removal does not converge"]
    fn a_removed_admins_concurrent_change_converges() {
        // Alice and Bob are admins. At epoch 2, Alice removes Bob (x) while
        // Bob renames the group (y). Whoever takes x first refuses y (Bob
        // is no member of x: NotMember, not Stale); whoever takes y first
        // keeps it when x orders below it (Stale). Members end up in two
        // different groups.
        let (ids, mut g) = group();
        g.members[1].role = GroupRole::Admin;
        let (alice, bob) = (ids[0].user_id(), ids[1].user_id());
        let mut x = next_of(&g);
        x.members.retain(|m| m.user != bob);
        let mut y = next_of(&g);
        y.name = "renamed".into();
        // A routing secret for y that orders it above x.
        for byte in 0..=u8::MAX {
            y.routing = [byte; 32];
            if y.order_key() > x.order_key() {
                break;
            }
        }
        assert!(y.order_key() > x.order_key());
        let apply = |current: &GroupState, next: &GroupState, author: &UserId| {
            if next.check_transition(Some(current), author).is_ok() {
                next.clone()
            } else {
                current.clone()
            }
        };
        let x_first = apply(&apply(&g, &x, &alice), &y, &bob);
        let y_first = apply(&apply(&g, &y, &bob), &x, &alice);
        assert_eq!(x_first, y_first);
    }

    #[test]
    fn forged_device_certificate_is_refused() {
        let (ids, mut g) = group();
        g.members[1].devices = vec![ids[2].certificate().clone()];
        assert!(g.check().is_err());
    }
}

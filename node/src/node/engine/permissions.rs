//! Who may write what: the rules the engine checks before it takes in a
//! member's edit, deletion or reaction, a group state, or an account
//! change, and before it makes one itself. Pure: the callers
//! (`annotations.rs`, `receive.rs`) look up the message, the conversation
//! and the sender, and ask here; so the rules are tested without a store
//! or a network. Who may change a group's membership is
//! [`GroupState::check_transition`] (in `weft-proto`), checked once the
//! author is known ([`group_state_author`]); that a chain-sealed sender is
//! a member at all is checked in `receive.rs` before any of this.

use weft_crdt::Annotation;

use crate::group::GroupState;
use crate::ids::{ConversationId, DeviceId, MessageId, UserId};
use crate::store::ConversationKind;

/// A kind of write to a message's annotations (or a group's metadata).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Write {
    Edit,
    Delete,
    React,
    Pin,
    GroupMeta,
}

impl Write {
    pub(super) fn of(annotation: &Annotation) -> Self {
        match annotation {
            Annotation::Edit { .. } => Write::Edit,
            Annotation::Delete { .. } => Write::Delete,
            Annotation::React { .. } => Write::React,
            Annotation::Pin { .. } => Write::Pin,
            Annotation::Group { .. } => Write::GroupMeta,
        }
    }
}

/// Whether `user` administers a conversation: an admin of its group;
/// in a one-to-one conversation (no group state), both people.
pub(super) fn administers(group: Option<&GroupState>, user: &UserId) -> bool {
    match group {
        Some(g) => g.is_admin(user),
        None => true,
    }
}

/// Whether `author`, a member of the conversation, may make `write` about
/// a message sent by `sender`: only the sender edits it; the sender or an
/// admin deletes it; anyone reacts (as themselves, see [`check_change`]);
/// admins pin and set the group's metadata.
pub(super) fn may_write(
    write: Write,
    author: &UserId,
    sender: &UserId,
    group: Option<&GroupState>,
) -> bool {
    match write {
        Write::Edit => author == sender,
        Write::Delete => author == sender || administers(group, author),
        Write::React => true,
        Write::Pin | Write::GroupMeta => administers(group, author),
    }
}

/// What a received annotation change is, once its shape is checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct ChangeShape {
    /// It edits the message (its text comes with it).
    pub(super) edits: bool,
    /// It only deletes (it goes into its shard even where the message is
    /// missing or the deletion not allowed, see `annotations.rs`).
    pub(super) deletion: bool,
}

/// Checks a received annotation change before anything about its message
/// is known: it is made by the device that sent it (`actor`, automerge's
/// actor id, against `device`), it is about `message` only, and its
/// reactions are `author`'s own. `Err` says why it is refused.
pub(super) fn check_change(
    actor: &[u8],
    device: &DeviceId,
    author: &UserId,
    message: &MessageId,
    what: &[Annotation],
) -> Result<ChangeShape, &'static str> {
    if actor != device.0 {
        return Err("annotation change not by its sending device");
    }
    let target = weft_crdt::hex(&message.0);
    let me = weft_crdt::hex(&author.0);
    let mut edits = false;
    for w in what {
        let about = match w {
            Annotation::Edit { message } => {
                edits = true;
                Some(message)
            }
            Annotation::Delete { message } | Annotation::Pin { message } => Some(message),
            Annotation::React { message, user, .. } => {
                if *user != me {
                    return Err("a reaction in another user's name");
                }
                Some(message)
            }
            Annotation::Group { .. } => None,
        };
        if about.is_some_and(|m| *m != target) {
            return Err("an annotation change about another message");
        }
    }
    let deletion = !what.is_empty() && what.iter().all(|w| matches!(w, Annotation::Delete { .. }));
    Ok(ChangeShape { edits, deletion })
}

/// Whether a group state for conversation `id` may be taken at all, given
/// the kind of conversation held under that id (if any): only a group's.
/// A one-to-one or account conversation's would hand its key to whoever
/// the state names.
pub(super) fn group_state_target(
    held: Option<ConversationKind>,
    id: &ConversationId,
) -> Result<(), &'static str> {
    match held {
        Some(kind) if kind != ConversationKind::Group => {
            Err("group state for a one-to-one conversation")
        }
        Some(_) => Ok(()),
        None if !id.is_group_form() => Err("group state for an id that is not a group's"),
        None => Ok(()),
    }
}

/// The author of a group state signed by `device`: the member it is
/// certified for, in the state held (`current`) first, else in the new
/// one (a group seen for the first time, or a member's new device).
/// `None`: no member has that device, and the state is refused.
pub(super) fn group_state_author(
    current: Option<&GroupState>,
    next: &GroupState,
    device: &DeviceId,
) -> Option<UserId> {
    current
        .into_iter()
        .chain(std::iter::once(next))
        .flat_map(|g| g.members.iter())
        .find(|m| m.devices.iter().any(|d| d.device == *device))
        .map(|m| m.user)
}

/// Whether this user (`me`), on taking in `state` by `author`, moves the
/// group on to another epoch: the author left (and chose the new routing
/// secret, which they know), and `me` is an admin. (Admins doing so at
/// once converge like any concurrent change.)
pub(super) fn moves_on_after_leave(state: &GroupState, author: &UserId, me: &UserId) -> bool {
    state.member(author).is_none() && state.is_admin(me)
}

/// Whether `author` may send an account change in conversation `conv`:
/// only in `me`'s account conversation (`account`), and only from one of
/// `me`'s own devices.
pub(super) fn may_change_account(
    conv: &ConversationId,
    account: &ConversationId,
    author: &UserId,
    me: &UserId,
) -> bool {
    conv == account && author == me
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::group::{GroupMember, GroupRole};
    use crate::identity::{DeviceCertificate, Identity};
    use crate::ids::EnvelopeId;
    use weft_crdt::Annotations;

    fn user(n: u8) -> UserId {
        UserId([n; 32])
    }

    /// Three members, made with real certificates: 0 an admin, 1 and 2
    /// members.
    fn group(people: &[Identity]) -> GroupState {
        let members = people
            .iter()
            .enumerate()
            .map(|(i, p)| GroupMember {
                user: p.user_id(),
                name: format!("member{i}"),
                role: if i == 0 {
                    GroupRole::Admin
                } else {
                    GroupRole::Member
                },
                devices: vec![p.certificate().clone()],
            })
            .collect();
        GroupState {
            id: ConversationId::new_group([7; 16]),
            name: "friends".into(),
            epoch: 1,
            members,
            routing: [8; 32],
        }
    }

    fn people(n: usize) -> Vec<Identity> {
        (0..n)
            .map(|i| Identity::from_seed(format!("permissions/{i}").as_bytes(), 0))
            .collect::<Result<_, _>>()
            .expect("identities")
    }

    fn certificate(p: &Identity) -> &DeviceCertificate {
        p.certificate()
    }

    #[test]
    fn only_the_sender_edits() {
        let (alice, bob) = (user(1), user(2));
        assert!(may_write(Write::Edit, &alice, &alice, None));
        // Not even the other person of a one-to-one conversation, nor a
        // group admin.
        assert!(!may_write(Write::Edit, &bob, &alice, None));
        let p = people(3);
        let g = group(&p);
        let (admin, member) = (p[0].user_id(), p[1].user_id());
        assert!(!may_write(Write::Edit, &admin, &member, Some(&g)));
        assert!(may_write(Write::Edit, &member, &member, Some(&g)));
    }

    #[test]
    fn the_sender_or_an_admin_deletes() {
        let p = people(3);
        let g = group(&p);
        let (admin, bob, carol) = (p[0].user_id(), p[1].user_id(), p[2].user_id());
        assert!(may_write(Write::Delete, &bob, &bob, Some(&g)));
        assert!(may_write(Write::Delete, &admin, &bob, Some(&g)));
        assert!(!may_write(Write::Delete, &carol, &bob, Some(&g)));
        // An admin's message: another member may not delete it.
        assert!(!may_write(Write::Delete, &bob, &admin, Some(&g)));
        // Both people administer a one-to-one conversation: either
        // deletes the other's messages.
        assert!(may_write(Write::Delete, &user(2), &user(1), None));
    }

    #[test]
    fn anyone_in_the_conversation_reacts() {
        let p = people(3);
        let g = group(&p);
        let (admin, bob, carol) = (p[0].user_id(), p[1].user_id(), p[2].user_id());
        for author in [admin, bob, carol] {
            assert!(may_write(Write::React, &author, &bob, Some(&g)));
        }
        assert!(may_write(Write::React, &user(2), &user(1), None));
    }

    #[test]
    fn admins_pin_and_set_the_groups_metadata() {
        let p = people(3);
        let g = group(&p);
        let (admin, bob) = (p[0].user_id(), p[1].user_id());
        for write in [Write::Pin, Write::GroupMeta] {
            assert!(may_write(write, &admin, &bob, Some(&g)));
            // Not even on their own message.
            assert!(!may_write(write, &bob, &bob, Some(&g)));
            assert!(may_write(write, &user(2), &user(1), None));
        }
        // Someone who left administers nothing.
        assert!(!administers(Some(&g), &user(9)));
    }

    /// A change made with the CRDT, inspected as the receiver does.
    fn inspected(
        make: impl FnOnce(&mut Annotations) -> Result<Vec<u8>, weft_crdt::CrdtError>,
        device: &DeviceId,
    ) -> (Vec<u8>, Vec<Annotation>) {
        let mut doc = Annotations::new(&device.0);
        let change = make(&mut doc).expect("a change");
        let (inspected, what) = Annotations::inspect(&change).expect("it inspects");
        (inspected.actor, what)
    }

    #[test]
    fn a_change_is_checked_against_its_device_message_and_author() {
        let (device, other_device) = (DeviceId([3; 32]), DeviceId([4; 32]));
        let (bob, carol) = (user(2), user(3));
        let (m, other_m) = (EnvelopeId([5; 16]), EnvelopeId([6; 16]));
        let edit = weft_crdt::EditRef {
            hlc: 1,
            edit: vec![1],
        };

        let (actor, what) = inspected(|d| d.edit(&m.0, edit.clone()), &device);
        assert_eq!(
            check_change(&actor, &device, &bob, &m, &what),
            Ok(ChangeShape {
                edits: true,
                deletion: false
            })
        );
        // Made by another device than the one that sent it.
        assert_eq!(
            check_change(&actor, &other_device, &bob, &m, &what),
            Err("annotation change not by its sending device")
        );
        // About another message than the one it names.
        assert_eq!(
            check_change(&actor, &device, &bob, &other_m, &what),
            Err("an annotation change about another message")
        );

        let (actor, what) = inspected(|d| d.delete(&m.0), &device);
        assert_eq!(
            check_change(&actor, &device, &bob, &m, &what),
            Ok(ChangeShape {
                edits: false,
                deletion: true
            })
        );

        // A reaction is its author's own.
        let (actor, what) = inspected(|d| d.react(&m.0, &bob.0, "👍", true), &device);
        assert_eq!(
            check_change(&actor, &device, &bob, &m, &what),
            Ok(ChangeShape {
                edits: false,
                deletion: false
            })
        );
        assert_eq!(
            check_change(&actor, &device, &carol, &m, &what),
            Err("a reaction in another user's name")
        );
        // Taking a reaction back is a write of the same key.
        let (actor, what) = inspected(
            |d| {
                d.react(&m.0, &bob.0, "👍", true)?;
                d.react(&m.0, &bob.0, "👍", false)
            },
            &device,
        );
        assert_eq!(what.len(), 1);
        assert!(check_change(&actor, &device, &bob, &m, &what).is_ok());

        // Group metadata is about no message.
        let (actor, what) = inspected(|d| d.set_group("name", "x"), &device);
        assert_eq!(
            what.iter().map(Write::of).collect::<Vec<_>>(),
            [Write::GroupMeta]
        );
        assert!(check_change(&actor, &device, &bob, &m, &what).is_ok());
        // An empty change deletes nothing.
        assert_eq!(
            check_change(&device.0, &device, &bob, &m, &[]),
            Ok(ChangeShape {
                edits: false,
                deletion: false
            })
        );
    }

    #[test]
    fn writes_are_classified() {
        let message = "05".to_string();
        let all = [
            (
                Annotation::Edit {
                    message: message.clone(),
                },
                Write::Edit,
            ),
            (
                Annotation::Delete {
                    message: message.clone(),
                },
                Write::Delete,
            ),
            (
                Annotation::React {
                    message: message.clone(),
                    user: "02".into(),
                    emoji: "x".into(),
                },
                Write::React,
            ),
            (Annotation::Pin { message }, Write::Pin),
            (
                Annotation::Group {
                    field: "name".into(),
                },
                Write::GroupMeta,
            ),
        ];
        for (annotation, write) in all {
            assert_eq!(Write::of(&annotation), write);
        }
    }

    #[test]
    fn only_a_groups_id_takes_a_group_state() {
        let group_id = ConversationId::new_group([1; 16]);
        let direct = ConversationId::direct(&user(1), &user(2));
        assert_eq!(
            group_state_target(Some(ConversationKind::Group), &group_id),
            Ok(())
        );
        assert_eq!(group_state_target(None, &group_id), Ok(()));
        assert_eq!(
            group_state_target(Some(ConversationKind::Direct), &direct),
            Err("group state for a one-to-one conversation")
        );
        // Held as a one-to-one conversation, whatever the id looks like.
        assert!(group_state_target(Some(ConversationKind::Direct), &group_id).is_err());
        assert_eq!(
            group_state_target(None, &direct),
            Err("group state for an id that is not a group's")
        );
    }

    #[test]
    fn a_group_states_author_is_the_member_certified_for_its_device() {
        let p = people(4);
        let current = group(&p[..3]);
        let device = |i: usize| certificate(&p[i]).device;
        // A member of the state held.
        assert_eq!(
            group_state_author(Some(&current), &current, &device(1)),
            Some(p[1].user_id())
        );
        // A member who leaves is still found in the state held.
        let left = current.without(&p[2].user_id(), [9; 32]);
        assert_eq!(
            group_state_author(Some(&current), &left, &device(2)),
            Some(p[2].user_id())
        );
        // A group seen for the first time: its own members.
        assert_eq!(
            group_state_author(None, &current, &device(0)),
            Some(p[0].user_id())
        );
        // An outsider who names themselves in the new state is its author
        // (and `check_transition` refuses them: not a member).
        let mut with_outsider = current.clone();
        with_outsider.epoch = 2;
        with_outsider.members.push(GroupMember {
            user: p[3].user_id(),
            name: "outsider".into(),
            role: GroupRole::Admin,
            devices: vec![certificate(&p[3]).clone()],
        });
        let author = group_state_author(Some(&current), &with_outsider, &device(3));
        assert_eq!(author, Some(p[3].user_id()));
        assert_eq!(
            with_outsider.check_transition(Some(&current), &p[3].user_id()),
            Err(crate::group::GroupError::NotMember)
        );
        // A device nobody has.
        assert_eq!(
            group_state_author(Some(&current), &current, &DeviceId([9; 32])),
            None
        );
    }

    #[test]
    fn an_admin_moves_the_group_on_after_a_member_leaves() {
        let p = people(3);
        let g = group(&p);
        let (admin, bob, carol) = (p[0].user_id(), p[1].user_id(), p[2].user_id());
        let after_carol = g.without(&carol, [9; 32]);
        assert!(moves_on_after_leave(&after_carol, &carol, &admin));
        // Bob is no admin: he waits for one.
        assert!(!moves_on_after_leave(&after_carol, &carol, &bob));
        // An admin's change that keeps its author: nothing more to do.
        let mut renamed = g.clone();
        renamed.epoch = 2;
        renamed.name = "renamed".into();
        assert!(!moves_on_after_leave(&renamed, &admin, &admin));
        // An admin removed Carol: the author is still there.
        let mut removed = g;
        removed.epoch = 2;
        removed.members.retain(|m| m.user != carol);
        assert!(!moves_on_after_leave(&removed, &admin, &admin));
    }

    #[test]
    fn account_changes_come_only_from_the_account_in_its_conversation() {
        let (me, bob) = (user(1), user(2));
        let account = ConversationId::direct(&me, &me);
        let with_bob = ConversationId::direct(&me, &bob);
        assert!(may_change_account(&account, &account, &me, &me));
        assert!(!may_change_account(&with_bob, &account, &me, &me));
        assert!(!may_change_account(&account, &account, &bob, &me));
    }
}

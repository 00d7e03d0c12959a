//! Receipt aggregation: how the delivered and read receipts of a
//! conversation's members become a message's progress ("delivered to 3 of
//! 5, read by 2 of 5") and status, and what one new receipt does. Pure:
//! `receipts.rs` reads the receipts (per user, the furthest of their
//! devices, as the store aggregates them) and the message, asks here, and
//! writes the answer; so these rules are tested without a store or a
//! network.

use crate::api::Progress;
use crate::ids::UserId;
use crate::payload::ReceiptKind;
use crate::store::{ConversationKind, MessageStatus, UserReceipt};

/// The status a receipt of `kind` records.
pub(super) fn status_of_receipt(kind: ReceiptKind) -> MessageStatus {
    match kind {
        ReceiptKind::Delivered => MessageStatus::Delivered,
        ReceiptKind::Read => MessageStatus::Read,
    }
}

/// How far a message by `sender` has got with its recipients, as this
/// user (`me`) sees it: the conversation's members other than the sender
/// and this user, each counted once. A read counts as delivered too.
/// Receipts of users who are not members (any more) count for nothing.
pub(super) fn progress(
    members: &[UserId],
    sender: &UserId,
    me: &UserId,
    receipts: &[UserReceipt],
) -> Progress {
    let mut p = Progress::default();
    for user in members.iter().filter(|u| *u != sender && *u != me) {
        p.recipients += 1;
        if let Some(r) = receipt_of(receipts, user) {
            p.delivered += 1;
            if r.status == MessageStatus::Read {
                p.read += 1;
            }
        }
    }
    p
}

/// The receipt of one user, if any.
pub(super) fn receipt_of<'r>(
    receipts: &'r [UserReceipt],
    user: &UserId,
) -> Option<&'r UserReceipt> {
    receipts.iter().find(|r| r.user == *user)
}

/// The status one of this user's messages has reached at `progress`:
/// `read` or `delivered` once every recipient has got that far, `sent`
/// before (the store never moves a status back, so a message already
/// further along stays there). A message with no recipient stays `sent`.
pub(super) fn status_at(progress: Progress) -> MessageStatus {
    let all = progress.recipients;
    if all > 0 && progress.read == all {
        MessageStatus::Read
    } else if all > 0 && progress.delivered == all {
        MessageStatus::Delivered
    } else {
        MessageStatus::Sent
    }
}

/// How far one member has got with a message, as `weft receipts` shows
/// it: their receipt's status; without one, `queued` or `sent` for a
/// message of this user's (as far as this device knows), `unknown` for
/// someone else's.
pub(super) fn member_status(
    receipt: Option<&UserReceipt>,
    sent_by_me: bool,
    message_status: MessageStatus,
) -> &'static str {
    match receipt {
        Some(r) => r.status.as_str(),
        None if sent_by_me => match message_status {
            MessageStatus::Queued => "queued",
            _ => "sent",
        },
        None => "unknown",
    }
}

/// What a new receipt about a message of its conversation does here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ReceiptEffect {
    /// Nothing beyond being recorded.
    Nothing,
    /// Another device of this user read someone else's message: so has
    /// this one.
    ReadHere,
    /// A recipient of one of this user's messages got further: its
    /// progress and status are counted again.
    Recount,
}

/// What a receipt of `status` from `from` does to a message of `sender`
/// at `message_status`. This user's own receipts (from its other devices)
/// never count towards the progress of its messages.
pub(super) fn effect_of(
    from: &UserId,
    status: MessageStatus,
    me: &UserId,
    sender: &UserId,
    message_status: MessageStatus,
) -> ReceiptEffect {
    if from == me {
        if status == MessageStatus::Read && sender != me && message_status != MessageStatus::Read {
            ReceiptEffect::ReadHere
        } else {
            ReceiptEffect::Nothing
        }
    } else if sender == me {
        ReceiptEffect::Recount
    } else {
        ReceiptEffect::Nothing
    }
}

/// Whether `weft read` tells the senders: always in a one-to-one
/// conversation, in a group only up to `max_group` members (above that,
/// read receipts cost more than they tell).
pub(super) fn sends_read_receipts(
    kind: ConversationKind,
    members: usize,
    max_group: usize,
) -> bool {
    kind == ConversationKind::Direct || members <= max_group
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(n: u8) -> UserId {
        UserId([n; 32])
    }

    fn got(n: u8, status: MessageStatus) -> UserReceipt {
        UserReceipt {
            user: user(n),
            status,
            at_ms: i64::from(n),
        }
    }

    fn progress_of(recipients: u32, delivered: u32, read: u32) -> Progress {
        Progress {
            recipients,
            delivered,
            read,
        }
    }

    const ME: u8 = 1;

    /// A group of five: this user and four others.
    fn group_of_five() -> Vec<UserId> {
        (ME..=5).map(user).collect()
    }

    #[test]
    fn a_group_of_five_with_three_delivered_and_two_read() {
        use MessageStatus::{Delivered, Read};
        // Two read (and so have it), one only has it, one nothing yet.
        let receipts = [got(2, Read), got(3, Read), got(4, Delivered)];
        let p = progress(&group_of_five(), &user(ME), &user(ME), &receipts);
        assert_eq!(p, progress_of(4, 3, 2));
        assert_eq!(status_at(p), MessageStatus::Sent);
    }

    #[test]
    fn the_status_moves_once_every_recipient_got_that_far() {
        use MessageStatus::{Delivered, Read};
        let members = group_of_five();
        let me = user(ME);
        let all_have_it = [got(2, Read), got(3, Delivered), got(4, Read), got(5, Read)];
        let p = progress(&members, &me, &me, &all_have_it);
        assert_eq!(p, progress_of(4, 4, 3));
        assert_eq!(status_at(p), MessageStatus::Delivered);
        let all_read = [got(2, Read), got(3, Read), got(4, Read), got(5, Read)];
        let p = progress(&members, &me, &me, &all_read);
        assert_eq!(p, progress_of(4, 4, 4));
        assert_eq!(status_at(p), MessageStatus::Read);
        // Nobody yet.
        assert_eq!(
            status_at(progress(&members, &me, &me, &[])),
            MessageStatus::Sent
        );
    }

    #[test]
    fn a_read_counts_as_delivered() {
        // Read without a delivered receipt first (it was lost, or came
        // later): delivered too.
        let members = [user(ME), user(2)];
        let p = progress(
            &members,
            &user(ME),
            &user(ME),
            &[got(2, MessageStatus::Read)],
        );
        assert_eq!(p, progress_of(1, 1, 1));
        assert_eq!(status_at(p), MessageStatus::Read);
    }

    #[test]
    fn this_users_own_receipts_do_not_count() {
        // Another device of the sender's account acknowledged it: that is
        // no recipient.
        let members = [user(ME), user(2)];
        let own = [got(ME, MessageStatus::Read)];
        let p = progress(&members, &user(ME), &user(ME), &own);
        assert_eq!(p, progress_of(1, 0, 0));
        assert_eq!(status_at(p), MessageStatus::Sent);
        assert_eq!(
            effect_of(
                &user(ME),
                MessageStatus::Read,
                &user(ME),
                &user(ME),
                MessageStatus::Sent
            ),
            ReceiptEffect::Nothing
        );
    }

    #[test]
    fn receipts_of_non_members_are_ignored() {
        // User 9 is not (or no longer) a member: its receipt neither adds
        // a recipient nor completes the message.
        let members = [user(ME), user(2)];
        let receipts = [got(9, MessageStatus::Read)];
        let p = progress(&members, &user(ME), &user(ME), &receipts);
        assert_eq!(p, progress_of(1, 0, 0));
        assert_eq!(status_at(p), MessageStatus::Sent);
    }

    #[test]
    fn a_message_with_no_recipient_stays_sent() {
        // The only member left: nobody to deliver to, so never "read".
        let members = [user(ME)];
        let p = progress(
            &members,
            &user(ME),
            &user(ME),
            &[got(ME, MessageStatus::Read)],
        );
        assert_eq!(p, progress_of(0, 0, 0));
        assert_eq!(status_at(p), MessageStatus::Sent);
    }

    #[test]
    fn someone_elses_message_counts_neither_its_sender_nor_this_user() {
        // Carol's (3) message as this user sees it in a group of five:
        // the recipients are the three others.
        let receipts = [
            got(ME, MessageStatus::Read),
            got(2, MessageStatus::Delivered),
            got(3, MessageStatus::Read),
        ];
        let p = progress(&group_of_five(), &user(3), &user(ME), &receipts);
        assert_eq!(p, progress_of(3, 1, 0));
    }

    #[test]
    fn each_members_status_as_listed() {
        use MessageStatus::{Delivered, Queued, Read, Relayed, Sent};
        let read = got(2, Read);
        let delivered = got(2, Delivered);
        assert_eq!(member_status(Some(&read), true, Sent), "read");
        assert_eq!(member_status(Some(&delivered), false, Read), "delivered");
        assert_eq!(member_status(None, true, Queued), "queued");
        for status in [Sent, Relayed, Delivered, Read] {
            assert_eq!(member_status(None, true, status), "sent");
        }
        assert_eq!(member_status(None, false, Read), "unknown");
        assert_eq!(
            receipt_of(std::slice::from_ref(&delivered), &user(2)),
            Some(&delivered)
        );
        assert_eq!(receipt_of(&[delivered], &user(3)), None);
    }

    #[test]
    fn what_a_new_receipt_does() {
        use MessageStatus::{Delivered, Read, Sent};
        let (me, bob, carol) = (user(ME), user(2), user(3));
        // A recipient's receipt recounts this user's message, whatever
        // its kind.
        assert_eq!(
            effect_of(&bob, Delivered, &me, &me, Sent),
            ReceiptEffect::Recount
        );
        assert_eq!(
            effect_of(&bob, Read, &me, &me, Delivered),
            ReceiptEffect::Recount
        );
        // A receipt about someone else's message is only recorded (for
        // `weft receipts`).
        assert_eq!(
            effect_of(&bob, Read, &me, &carol, Delivered),
            ReceiptEffect::Nothing
        );
        // This account's other device read Bob's message: read here too,
        // once; its delivered receipt changes nothing.
        assert_eq!(
            effect_of(&me, Read, &me, &bob, Delivered),
            ReceiptEffect::ReadHere
        );
        assert_eq!(
            effect_of(&me, Read, &me, &bob, Read),
            ReceiptEffect::Nothing
        );
        assert_eq!(
            effect_of(&me, Delivered, &me, &bob, Delivered),
            ReceiptEffect::Nothing
        );
    }

    #[test]
    fn receipt_kinds_record_their_status() {
        assert_eq!(
            status_of_receipt(ReceiptKind::Delivered),
            MessageStatus::Delivered
        );
        assert_eq!(status_of_receipt(ReceiptKind::Read), MessageStatus::Read);
    }

    #[test]
    fn read_receipts_go_out_in_direct_conversations_and_small_groups() {
        assert!(sends_read_receipts(ConversationKind::Direct, 2, 0));
        assert!(sends_read_receipts(ConversationKind::Group, 10, 10));
        assert!(!sends_read_receipts(ConversationKind::Group, 11, 10));
    }
}

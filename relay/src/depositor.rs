//! Who deposits mail: the depositing connection's authenticated peer id
//! and the address it came from. Per-depositor quotas are counted under
//! both, since a fresh peer id costs nothing and an address costs
//! something. [`CoolOff`] remembers, briefly, depositors that were just
//! refused, so that their next deposits are refused before any work.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use weft_proto::mailbox::MailboxId;

use crate::store::{Full, QuotaKind};

/// The address part of a depositor, as quotas key it: IPv4 whole, IPv6
/// by its /64 (the key shared with the node, `weft_proto::address`; its
/// stored form is [`AddressKey::key`](weft_proto::address::AddressKey::key)).
pub use weft_proto::address::AddressKey as Source;

/// The one who deposits: its peer id and where it connected from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Depositor {
    pub peer: PeerId,
    pub source: Source,
}

/// What a depositor is cooling off for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cooling {
    /// It was over this quota (a [`Full::Depositor`]).
    Quota(Full),
    /// It deposited an envelope that did not verify.
    Unverified,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum CoolKey {
    /// A peer id, in one mailbox or (`None`) in all.
    Peer(PeerId, Option<MailboxId>),
    Source(Source, Option<MailboxId>),
}

/// Depositors refused a moment ago — over one of their quotas, or for an
/// envelope that did not verify — and, for [`CoolOff::PERIOD`], refused
/// again at once: a depositor that is full now will be a moment later,
/// and a flood of deposits that cannot be stored should not cost a
/// verification each. Keyed like the quota that refused (per mailbox or
/// not, by peer id or by address); an unverifiable deposit cools its peer
/// id only (an address may be shared with honest devices). Bounded: past
/// `max` keys, expired ones are dropped, and if none has expired a new
/// refusal is not remembered.
#[derive(Debug)]
pub struct CoolOff {
    until: HashMap<CoolKey, (Instant, Cooling)>,
    max: usize,
}

impl CoolOff {
    pub const PERIOD: Duration = Duration::from_secs(1);

    pub fn new(max: usize) -> Self {
        Self {
            until: HashMap::new(),
            max: max.max(1),
        }
    }

    /// Why `depositor` is still cooling off for a deposit to `mailbox`
    /// at `now`, if it is.
    pub fn check(
        &self,
        depositor: &Depositor,
        mailbox: MailboxId,
        now: Instant,
    ) -> Option<Cooling> {
        [
            CoolKey::Peer(depositor.peer, Some(mailbox)),
            CoolKey::Peer(depositor.peer, None),
            CoolKey::Source(depositor.source, Some(mailbox)),
            CoolKey::Source(depositor.source, None),
        ]
        .iter()
        .find_map(|key| match self.until.get(key) {
            Some((until, why)) if *until > now => Some(*why),
            _ => None,
        })
    }

    /// `depositor` was refused at `now` for `why`, depositing to `mailbox`.
    pub fn refused(
        &mut self,
        depositor: &Depositor,
        mailbox: MailboxId,
        why: Cooling,
        now: Instant,
    ) {
        let key = match why {
            Cooling::Quota(Full::Depositor { quota, .. }) => match quota {
                QuotaKind::PeerPerMailbox => CoolKey::Peer(depositor.peer, Some(mailbox)),
                QuotaKind::Peer => CoolKey::Peer(depositor.peer, None),
                QuotaKind::IpPerMailbox => CoolKey::Source(depositor.source, Some(mailbox)),
                QuotaKind::Ip => CoolKey::Source(depositor.source, None),
            },
            // Not a depositor's own quota: nothing to remember.
            Cooling::Quota(_) => return,
            Cooling::Unverified => CoolKey::Peer(depositor.peer, None),
        };
        if self.until.len() >= self.max && !self.until.contains_key(&key) {
            self.until.retain(|_, (until, _)| *until > now);
            if self.until.len() >= self.max {
                return;
            }
        }
        self.until.insert(key, (now + Self::PERIOD, why));
    }

    pub fn len(&self) -> usize {
        self.until.len()
    }

    pub fn is_empty(&self) -> bool {
        self.until.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Unit;

    fn depositor(n: u8, ip: [u8; 4]) -> Depositor {
        let key = libp2p::identity::Keypair::ed25519_from_bytes([n; 32]).unwrap();
        Depositor {
            peer: key.public().to_peer_id(),
            source: Source::V4(ip),
        }
    }

    fn full(quota: QuotaKind) -> Cooling {
        Cooling::Quota(Full::Depositor {
            quota,
            unit: Unit::Envelopes,
            waiting: 1,
            max: 1,
        })
    }

    #[test]
    fn a_refused_depositor_cools_off_where_it_was_refused_for_a_second() {
        let t0 = Instant::now();
        let (a, b) = (MailboxId([1; 16]), MailboxId([2; 16]));
        let stranger = depositor(1, [203, 0, 113, 1]);
        let sybil = depositor(2, [203, 0, 113, 1]);
        let neighbour = depositor(3, [203, 0, 113, 2]);
        let mut cool = CoolOff::new(100);
        cool.refused(&stranger, a, full(QuotaKind::PeerPerMailbox), t0);
        assert_eq!(
            cool.check(&stranger, a, t0),
            Some(full(QuotaKind::PeerPerMailbox))
        );
        assert_eq!(cool.check(&stranger, b, t0), None, "another mailbox");
        assert_eq!(cool.check(&sybil, a, t0), None, "another peer id");
        // Over its address's share: every peer id from there, in that
        // mailbox.
        cool.refused(&stranger, a, full(QuotaKind::IpPerMailbox), t0);
        assert!(cool.check(&sybil, a, t0).is_some());
        assert_eq!(cool.check(&sybil, b, t0), None);
        assert_eq!(cool.check(&neighbour, a, t0), None);
        // In all: everywhere.
        cool.refused(&stranger, a, full(QuotaKind::Ip), t0);
        assert!(cool.check(&sybil, b, t0).is_some());
        // An unverifiable deposit cools the peer id, not its address.
        cool.refused(&neighbour, a, Cooling::Unverified, t0);
        assert_eq!(cool.check(&neighbour, b, t0), Some(Cooling::Unverified));
        assert_eq!(cool.check(&depositor(4, [203, 0, 113, 2]), b, t0), None);
        // A mailbox or relay that is full is not the depositor's doing.
        cool.refused(&neighbour, b, Cooling::Quota(Full::Relay), t0);
        // A second later it is over.
        let later = t0 + CoolOff::PERIOD;
        for who in [&stranger, &sybil, &neighbour] {
            assert_eq!(cool.check(who, a, later), None);
            assert_eq!(cool.check(who, b, later), None);
        }
    }

    #[test]
    fn the_cool_off_list_is_bounded() {
        let t0 = Instant::now();
        let mut cool = CoolOff::new(3);
        let m = MailboxId([1; 16]);
        for n in 0..10 {
            cool.refused(&depositor(n, [10, 0, 0, n]), m, Cooling::Unverified, t0);
            assert!(cool.len() <= 3);
        }
        // Once they expire, new ones are remembered again.
        let later = t0 + CoolOff::PERIOD;
        cool.refused(
            &depositor(20, [10, 0, 0, 20]),
            m,
            Cooling::Unverified,
            later,
        );
        assert!(
            cool.check(&depositor(20, [10, 0, 0, 20]), m, later)
                .is_some()
        );
        assert_eq!(cool.len(), 1);
    }
}

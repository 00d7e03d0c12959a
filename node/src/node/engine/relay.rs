//! Relays, from the device's side: keeping a mailbox at each configured
//! relay (register, fetch, acknowledge after storing), and depositing
//! envelopes at the relays of member devices that are away.
//!
//! Relays found through the DHT are kept in the `meta` table, so that the
//! mailboxes there are still fetched after a restart.
//!
//! A device's relays are learned from its addresses: a circuit address
//! `<relay addr>/p2p/<relay>/p2p-circuit/p2p/<device>` (invites carry
//! them) names a relay where the device keeps a mailbox.

use std::collections::{HashMap, HashSet};

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};

use crate::api::{Event, PushView, RelayView};
use crate::ids::EnvelopeId;
use crate::mailbox::{MAX_DEPOSIT, MailboxId, MailboxRequest, MailboxResponse, Registration};
use crate::net::{NetCommand, PeerSource};
use crate::node::now_ms;
use crate::store::{MessageStatus, meta};

use super::EngineError;
use super::{Effect, EngineResult, Handed, State, Verdict, Via};

/// An envelope to deposit: its id and bytes.
type Held = (EnvelopeId, Vec<u8>);

/// Most bytes of envelopes in one deposit (a request frame is at most
/// 8 MiB).
const DEPOSIT_BYTES: usize = 4 * 1024 * 1024;

/// Splits envelopes into deposits of at most [`MAX_DEPOSIT`] envelopes and
/// [`DEPOSIT_BYTES`] bytes (an envelope alone is at most 1 MiB).
fn deposit_chunks(envelopes: &[Held]) -> Vec<&[Held]> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, (_, b)) in envelopes.iter().enumerate() {
        if i > start && (i - start == MAX_DEPOSIT || bytes + b.len() > DEPOSIT_BYTES) {
            out.push(&envelopes[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += b.len();
    }
    if start < envelopes.len() {
        out.push(&envelopes[start..]);
    }
    out
}

/// Found relays kept.
const MAX_FOUND_RELAYS: usize = 8;
/// A found relay not reached for this long is forgotten: mail there has
/// expired by then (relays keep it 14 days by default).
const FOUND_RELAY_MAX_AGE_MS: i64 = 14 * 24 * 3600 * 1000;

/// The relays found through the DHT, newest first, with when each was
/// last reached; those not reached for too long are left out.
fn read_found(db: &crate::store::Db<'_>, now: i64) -> Vec<(i64, Multiaddr)> {
    let Ok(Some(bytes)) = db.get_meta(meta::RELAYS_FOUND) else {
        return Vec::new();
    };
    let mut found: Vec<(i64, Multiaddr)> = String::from_utf8_lossy(&bytes)
        .lines()
        .filter_map(|line| {
            let (seen, addr) = line.split_once(' ')?;
            Some((seen.parse().ok()?, addr.parse().ok()?))
        })
        .filter(|(seen, _)| now.saturating_sub(*seen) < FOUND_RELAY_MAX_AGE_MS)
        .collect();
    found.sort_by_key(|f| std::cmp::Reverse(f.0));
    found.truncate(MAX_FOUND_RELAYS);
    found
}

/// The relays found through the DHT earlier that are still worth using.
pub(in crate::node) fn found_relays(db: &crate::store::Db<'_>) -> Vec<Multiaddr> {
    read_found(db, now_ms())
        .into_iter()
        .map(|(_, a)| a)
        .collect()
}

/// Records the relays a daemon starts with.
pub(in crate::node) fn remember_relays(db: &crate::store::Db<'_>, relays: &[Multiaddr]) {
    let text: String = relays
        .iter()
        .take(MAX_FOUND_RELAYS * 2)
        .map(|a| format!("{a}\n"))
        .collect();
    if let Err(e) = db.set_meta(meta::RELAYS_USED, text.as_bytes()) {
        tracing::warn!("cannot record the relays in use: {e}");
    }
}

/// The relays the last daemon used, and those found since.
pub(in crate::node) fn last_relays(db: &crate::store::Db<'_>) -> Vec<Multiaddr> {
    let mut relays: Vec<Multiaddr> = db
        .get_meta(meta::RELAYS_USED)
        .ok()
        .flatten()
        .map(|b| {
            String::from_utf8_lossy(&b)
                .lines()
                .filter_map(|l| l.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    for addr in found_relays(db) {
        if !relays.contains(&addr) {
            relays.push(addr);
        }
    }
    relays
}

/// Most envelopes fetched per page.
const FETCH_PAGE: u32 = 512;

/// What to do with a relay's answer.
#[derive(Debug)]
pub(in crate::node) enum MailboxThen {
    Registered,
    Fetched,
    Acked,
    /// These envelopes are now held for this device.
    Deposited {
        device: PeerId,
        ids: Vec<EnvelopeId>,
    },
}

/// The relays a device keeps mailboxes at, by its circuit addresses.
fn relays_in(addrs: &[String], device: &PeerId) -> Vec<(PeerId, Multiaddr)> {
    let mut out = Vec::new();
    for addr in addrs {
        let Ok(addr) = addr.parse::<Multiaddr>() else {
            continue;
        };
        let parts: Vec<Protocol<'_>> = addr.iter().collect();
        let Some(circuit) = parts.iter().position(|p| *p == Protocol::P2pCircuit) else {
            continue;
        };
        let ends_with_device = matches!(parts.last(), Some(Protocol::P2p(p)) if p == device);
        let relay = match circuit.checked_sub(1).and_then(|i| parts.get(i)) {
            Some(Protocol::P2p(r)) => *r,
            _ => continue,
        };
        if ends_with_device {
            let relay_addr: Multiaddr = parts[..circuit].iter().cloned().collect();
            out.push((relay, relay_addr));
        }
    }
    out
}

/// The relays this device uses and its mailboxes there: what was
/// deposited for others, what is being fetched, how far.
#[derive(Default)]
pub(super) struct Relays {
    /// Relays in use, configured and found (peer id, address with /p2p/).
    in_use: Vec<(PeerId, Multiaddr)>,
    /// Those of `in_use` found through the DHT.
    found: HashSet<PeerId>,
    /// Relays a fetch is in flight from.
    fetching: HashSet<PeerId>,
    /// The last mail cursor acknowledged per relay.
    mail_cursor: HashMap<PeerId, u64>,
    /// Envelopes deposited for a device at its relays.
    deposited: HashSet<(EnvelopeId, PeerId)>,
    /// Our mailbox at each relay that accepted our registration, and how
    /// much was fetched from it.
    mailboxes: HashMap<PeerId, (crate::mailbox::MailboxId, u64)>,
}

impl Relays {
    /// The relays of the configuration and those found before (`found`
    /// says which came from the DHT).
    pub(super) fn new(in_use: Vec<(PeerId, Multiaddr)>, found: HashSet<PeerId>) -> Self {
        Self {
            in_use,
            found,
            ..Self::default()
        }
    }

    pub(super) fn uses(&self, relay: &PeerId) -> bool {
        self.in_use.iter().any(|(p, _)| p == relay)
    }

    /// The relays in use, with their addresses.
    pub(super) fn in_use(&self) -> impl Iterator<Item = &(PeerId, Multiaddr)> {
        self.in_use.iter()
    }

    /// A relay found through the DHT is used from now on.
    fn adopt_found(&mut self, relay: PeerId, addr: Multiaddr) {
        if !self.uses(&relay) {
            self.in_use.push((relay, addr));
        }
        self.found.insert(relay);
    }

    /// The address of a relay in use that was found through the DHT.
    fn found_addr(&self, relay: &PeerId) -> Option<&Multiaddr> {
        if !self.found.contains(relay) {
            return None;
        }
        self.in_use.iter().find(|(p, _)| p == relay).map(|(_, a)| a)
    }

    /// Where the next fetch from `relay` starts, unless one is in flight.
    fn start_fetch(&mut self, relay: PeerId) -> Option<u64> {
        self.fetching
            .insert(relay)
            .then(|| self.mail_cursor.get(&relay).copied().unwrap_or(0))
    }

    fn fetch_ended(&mut self, relay: &PeerId) {
        self.fetching.remove(relay);
    }

    /// A page of `count` envelopes up to cursor `up_to` came from `relay`.
    fn fetched(&mut self, relay: PeerId, count: u64, up_to: u64) {
        if let Some(m) = self.mailboxes.get_mut(&relay) {
            m.1 += count;
        }
        self.mail_cursor.insert(relay, up_to);
    }

    /// `relay` took our registration (again): keeps what was fetched.
    fn registered(&mut self, relay: PeerId, mailbox: crate::mailbox::MailboxId) {
        let fetched = self.mailboxes.get(&relay).map_or(0, |m| m.1);
        self.mailboxes.insert(relay, (mailbox, fetched));
    }

    /// Our mailbox at `relay` and how much was fetched from it.
    fn mailbox(&self, relay: &PeerId) -> Option<&(crate::mailbox::MailboxId, u64)> {
        self.mailboxes.get(relay)
    }

    fn deposited(&mut self, id: EnvelopeId, device: PeerId) {
        self.deposited.insert((id, device));
    }

    fn was_deposited(&self, id: EnvelopeId, device: PeerId) -> bool {
        self.deposited.contains(&(id, device))
    }

    /// The device has the envelope: no deposit for it is remembered.
    pub(super) fn reached(&mut self, id: EnvelopeId, device: PeerId) {
        self.deposited.remove(&(id, device));
    }
}

impl State<'_, '_> {
    /// The network adopted a relay found through the DHT: keep a mailbox
    /// there too, and remember it.
    pub(super) fn relay_found(&mut self, relay: PeerId, addr: Multiaddr) {
        self.e.relays.adopt_found(relay, addr.clone());
        self.note_found_relay(&addr);
        if self.e.connected.contains(&relay) {
            self.relay_connected(relay);
        }
    }

    /// Records that a found relay was reached now.
    fn note_found_relay(&mut self, addr: &Multiaddr) {
        let now = now_ms();
        let mut found = read_found(self.db, now);
        found.retain(|(_, a)| a != addr);
        found.insert(0, (now, addr.clone()));
        found.truncate(MAX_FOUND_RELAYS);
        let text: String = found
            .iter()
            .map(|(seen, a)| format!("{seen} {a}\n"))
            .collect();
        if let Err(e) = self.db.set_meta(meta::RELAYS_FOUND, text.as_bytes()) {
            tracing::warn!("cannot remember the relays found: {e}");
        }
    }

    /// A connected peer announced its addresses: kept for a known device,
    /// so that its relays (circuit addresses) are known when it is away,
    /// even if they are newer than its invite.
    pub(super) fn peer_addrs(&mut self, peer: PeerId, addrs: Vec<Multiaddr>) {
        if peer == self.e.identity.peer_id() || self.who(&peer).is_none() {
            return;
        }
        let now = now_ms();
        for addr in addrs.iter().take(16) {
            if let Err(e) = self
                .db
                .upsert_peer_addr(&peer.to_string(), &addr.to_string(), now)
            {
                tracing::warn!("cannot record an address of {peer}: {e}");
                return;
            }
        }
    }

    /// A configured relay connected: (re)register, then fetch.
    pub(super) fn relay_connected(&mut self, relay: PeerId) {
        if !self.e.relays.uses(&relay) {
            return;
        }
        let wakeup = self
            .db
            .get_meta(meta::PUSH_URL)
            .ok()
            .flatten()
            .and_then(|b| String::from_utf8(b).ok());
        let registration = Registration::new(&self.e.identity, &relay, now_ms(), wakeup, None);
        self.fx.push(Effect::Mailbox {
            peer: relay,
            request: MailboxRequest::Register(Box::new(registration)),
            then: MailboxThen::Registered,
        });
    }

    /// Asks a relay for the next page of our mail.
    pub(super) fn fetch_mail(&mut self, relay: PeerId) {
        let Some(after) = self.e.relays.start_fetch(relay) else {
            return;
        };
        self.fx.push(Effect::Mailbox {
            peer: relay,
            request: MailboxRequest::Fetch {
                after,
                limit: FETCH_PAGE,
            },
            then: MailboxThen::Fetched,
        });
    }

    pub(super) fn on_mailbox_reply(
        &mut self,
        relay: PeerId,
        then: MailboxThen,
        response: Option<MailboxResponse>,
    ) {
        match (then, response) {
            (MailboxThen::Registered, Some(MailboxResponse::Registered { mailbox, .. })) => {
                tracing::debug!(%relay, %mailbox, "mailbox registered");
                if let Some(addr) = self.e.relays.found_addr(&relay).cloned() {
                    self.note_found_relay(&addr);
                }
                self.e.relays.registered(relay, mailbox);
                self.fetch_mail(relay);
            }
            (MailboxThen::Fetched, Some(MailboxResponse::Mail { items, more })) => {
                self.e.relays.fetch_ended(&relay);
                let Some(up_to) = items.iter().map(|(c, _)| *c).max() else {
                    return;
                };
                self.preverify(items.iter().map(|(_, bytes)| bytes.as_slice()));
                // Handed over, not vouched for: see `Handed`.
                let via = Via::Direct(Handed::ForwardedBy(relay));
                for (_, bytes) in &items {
                    if let Verdict::Reject(why) = self.receive(bytes, via, None) {
                        // The relay only stores; whoever deposited it is
                        // not known here. Nothing to penalise.
                        tracing::debug!(%relay, "mail rejected: {why}");
                    }
                }
                // Acknowledged after this batch's durable commit (the batch
                // is promised: see `handle_batch`), then the next page.
                self.e.relays.fetched(relay, items.len() as u64, up_to);
                self.fx.push(Effect::Mailbox {
                    peer: relay,
                    request: MailboxRequest::Ack { up_to },
                    then: MailboxThen::Acked,
                });
                if more {
                    self.fetch_mail(relay);
                }
            }
            (MailboxThen::Acked, _) => {}
            (MailboxThen::Deposited { device, ids }, Some(MailboxResponse::Deposited { .. })) => {
                for id in ids {
                    self.relayed(&id, device);
                }
            }
            (then, other) => {
                if matches!(then, MailboxThen::Fetched) {
                    self.e.relays.fetch_ended(&relay);
                }
                tracing::debug!(%relay, ?then, ?other, "mailbox request not answered as hoped");
            }
        }
    }

    /// A deposit went through: the message is `relayed` (unless further
    /// along), and this device is not deposited for again.
    fn relayed(&mut self, id: &EnvelopeId, device: PeerId) {
        self.e.relays.deposited(*id, device);
        let Ok(Some(m)) = self.db.message(id) else {
            return;
        };
        if m.sender_user == self.e.my_user
            && self
                .db
                .set_message_status(id, MessageStatus::Relayed)
                .unwrap_or(false)
        {
            self.fx.push(Effect::Event(Event::Status {
                id: id.to_string(),
                conversation: m.conversation.to_string(),
                status: MessageStatus::Relayed.as_str().to_string(),
                progress: None,
            }));
        }
    }

    /// Deposits envelopes at the relays of member devices that are not
    /// connected. `todo` is (device peer, envelope id, bytes).
    pub(super) fn deposit(&mut self, todo: Vec<(PeerId, EnvelopeId, Vec<u8>)>) {
        // (relay, device) -> envelopes
        let mut by_mailbox: HashMap<(PeerId, PeerId), Vec<Held>> = HashMap::new();
        for (device, id, bytes) in todo {
            if self.e.connected.contains(&device) || self.e.relays.was_deposited(id, device) {
                continue;
            }
            let addrs = self.db.peer_addrs(&device.to_string()).unwrap_or_default();
            for (relay, relay_addr) in relays_in(&addrs, &device) {
                if !self.e.connected.contains(&relay) {
                    // Reach it for the next round.
                    self.fx.push(Effect::Net(NetCommand::Dial {
                        peer: relay,
                        addrs: vec![relay_addr],
                        source: PeerSource::Relay,
                    }));
                    continue;
                }
                by_mailbox
                    .entry((relay, device))
                    .or_default()
                    .push((id, bytes.clone()));
            }
        }
        for ((relay, device), envelopes) in by_mailbox {
            let Some((device_id, _)) = self.who(&device) else {
                continue;
            };
            let mailbox = MailboxId::of(&device_id, &relay);
            for chunk in deposit_chunks(&envelopes) {
                self.fx.push(Effect::Mailbox {
                    peer: relay,
                    request: MailboxRequest::Deposit {
                        mailbox,
                        envelopes: chunk.iter().map(|(_, b)| b.clone()).collect(),
                    },
                    then: MailboxThen::Deposited {
                        device,
                        ids: chunk.iter().map(|(id, _)| *id).collect(),
                    },
                });
            }
        }
    }

    /// `weft relay list`.
    pub(super) fn relay_list(&mut self) -> EngineResult<Vec<RelayView>> {
        let views: Vec<crate::api::RelayView> = self
            .e
            .relays
            .in_use()
            .map(|(peer, addr)| RelayView {
                peer_id: peer.to_string(),
                addr: addr.to_string(),
                found: if self.e.relays.found.contains(peer) {
                    "dht"
                } else {
                    "config"
                }
                .to_string(),
                connected: self.e.connected.contains(peer),
                mailbox: self.e.relays.mailbox(peer).map(|m| m.0.to_string()),
                fetched: self.e.relays.mailbox(peer).map_or(0, |m| m.1),
            })
            .collect();
        Ok(views)
    }

    /// `weft push register URL` / `weft push unregister`: kept, and sent to
    /// every connected relay in a fresh registration.
    pub(super) fn push_register(&mut self, url: Option<String>) -> EngineResult<PushView> {
        if let Some(url) = &url
            && (url.len() > crate::mailbox::MAX_URL
                || !(url.starts_with("https://") || url.starts_with("http://")))
        {
            return Err(EngineError::usage(format!(
                "not an http(s) URL of at most {} bytes: {url}",
                crate::mailbox::MAX_URL
            )));
        }
        match &url {
            Some(u) => self.db.set_meta(meta::PUSH_URL, u.as_bytes())?,
            None => self.db.delete_meta(meta::PUSH_URL)?,
        }
        let connected: Vec<PeerId> = self
            .e
            .relays
            .in_use()
            .map(|(p, _)| *p)
            .filter(|p| self.e.connected.contains(p))
            .collect();
        for relay in &connected {
            self.relay_connected(*relay);
        }
        Ok(PushView {
            push: url,
            relays_told: connected.len() as u64,
        })
    }

    /// The circuit addresses through this device's relays, for invites.
    pub(super) fn relay_addrs(&self) -> Vec<String> {
        let me = self.e.identity.peer_id();
        self.e
            .relays
            .in_use()
            .map(|(_, addr)| {
                addr.clone()
                    .with(Protocol::P2pCircuit)
                    .with(Protocol::P2p(me))
                    .to_string()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relay_addr(relay: PeerId) -> Multiaddr {
        format!("/ip4/127.0.0.1/tcp/4001/p2p/{relay}")
            .parse()
            .unwrap()
    }

    #[test]
    fn one_fetch_at_a_time_from_where_the_last_acknowledged_page_ended() {
        let relay = PeerId::random();
        let mut relays = Relays::new(vec![(relay, relay_addr(relay))], HashSet::new());
        relays.registered(relay, crate::mailbox::MailboxId([1; 16]));
        assert_eq!(relays.start_fetch(relay), Some(0));
        assert_eq!(relays.start_fetch(relay), None, "one in flight");
        relays.fetched(relay, 3, 30);
        relays.fetch_ended(&relay);
        assert_eq!(relays.start_fetch(relay), Some(30));
        // Registering again keeps the count fetched.
        relays.registered(relay, crate::mailbox::MailboxId([2; 16]));
        assert_eq!(relays.mailbox(&relay).map(|m| m.1), Some(3));
    }

    #[test]
    fn a_relay_found_twice_is_used_once() {
        let relay = PeerId::random();
        let mut relays = Relays::default();
        assert!(!relays.uses(&relay));
        relays.adopt_found(relay, relay_addr(relay));
        relays.adopt_found(relay, relay_addr(relay));
        assert_eq!(relays.in_use().count(), 1);
        assert_eq!(relays.found_addr(&relay), Some(&relay_addr(relay)));
    }

    #[test]
    fn a_deposit_is_forgotten_once_the_device_has_the_envelope() {
        let (device, id) = (PeerId::random(), EnvelopeId([7; 16]));
        let mut relays = Relays::default();
        relays.deposited(id, device);
        assert!(relays.was_deposited(id, device));
        relays.reached(id, device);
        assert!(!relays.was_deposited(id, device));
    }

    #[test]
    fn deposits_are_split_by_count_and_bytes() {
        let small: Vec<Held> = (0..600)
            .map(|i| (EnvelopeId([i as u8; 16]), vec![0; 10]))
            .collect();
        let sizes: Vec<usize> = deposit_chunks(&small).iter().map(|c| c.len()).collect();
        assert_eq!(sizes, vec![256, 256, 88]);
        let big: Vec<Held> = (0..10)
            .map(|i| (EnvelopeId([i as u8; 16]), vec![0; 1024 * 1024]))
            .collect();
        let sizes: Vec<usize> = deposit_chunks(&big).iter().map(|c| c.len()).collect();
        assert_eq!(sizes, vec![4, 4, 2]);
        assert!(deposit_chunks(&[]).is_empty());
    }

    #[test]
    fn relays_are_read_from_circuit_addresses() {
        let device = crate::identity::Identity::from_seed(b"relay-test/d", 0)
            .unwrap()
            .peer_id();
        let relay = crate::identity::Identity::from_seed(b"relay-test/r", 0)
            .unwrap()
            .peer_id();
        let addrs = vec![
            format!("/ip4/10.0.0.1/tcp/4001/p2p/{relay}/p2p-circuit/p2p/{device}"),
            format!("/ip4/10.0.0.2/tcp/4001/p2p/{device}"),
            "not an address".to_string(),
        ];
        let found = relays_in(&addrs, &device);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].0, relay);
        assert_eq!(
            found[0].1.to_string(),
            format!("/ip4/10.0.0.1/tcp/4001/p2p/{relay}")
        );
    }
}

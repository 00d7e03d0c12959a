//! This account's devices, from the engine's side: issuing link codes and
//! certifying the device that brings one (`crate::link`), telling every
//! conversation about the account's devices, handing this device's
//! sending chains to devices learned later, `weft devices list`, and
//! history sync: a newly linked device asks the account's other devices
//! for the conversations, contacts, messages (with statuses and
//! reactions) and annotation shards they hold, page by page, over the
//! direct protocol. Only the account's own devices are answered.

use serde::{Deserialize, Serialize};

use super::*;
use crate::identity::Revocation;

/// How long a revoked device keeps its gossip topics, to hear that it is
/// revoked (it can open nothing new meanwhile: chains moved on).
const REVOKED_GATE_GRACE: Duration = Duration::from_secs(5);

/// 16 random bytes (zeros if the OS fails: only used for placeholders).
fn rand_id() -> [u8; 16] {
    random_bytes().unwrap_or_default()
}
use crate::link::{CODE_LIFETIME_MS, LinkCode, LinkGrant, LinkRequest};

/// Link codes waiting to be used, at most.
const MAX_LINK_CODES: usize = 4;
/// Messages per history page, and their text bytes.
const HISTORY_PAGE: usize = 1000;
const HISTORY_PAGE_BYTES: usize = 4 * 1024 * 1024;
/// Shards per history page.
const HISTORY_SHARDS: usize = 64;
/// `meta`: this device still has to fetch the account's history (set when
/// it is linked; holds the window start in ms, decimal).
pub(crate) const META_HISTORY_NEEDED: &str = "history_needed";
/// `meta`: the account's invite, for a device without the user key.
pub(crate) const META_ACCOUNT_INVITE: &str = "account_invite";
/// Revocations kept for devices not known yet, at most.
const MAX_PENDING_REVOCATIONS: usize = 4096;
/// Shortest device id prefix `weft devices revoke` accepts.
const MIN_DEVICE_PREFIX: usize = 4;

/// Where a history transfer is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HistoryCursor {
    /// People, contacts and conversations first.
    Start,
    /// Then the annotation shards, from this index.
    Shards(u32),
    /// Then messages after this one, in (hlc, id) order.
    Messages { hlc: u64, id: MessageId },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryRequest {
    pub cursor: HistoryCursor,
    /// Only messages sent at or after this (ms).
    pub since_ms: i64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryPage {
    pub users: Vec<(UserId, String)>,
    pub devices: Vec<DeviceCertificate>,
    pub contacts: Vec<HistoryContact>,
    pub conversations: Vec<HistoryConversation>,
    pub shards: Vec<(ConversationId, u64, Vec<u8>)>,
    pub messages: Vec<HistoryMessage>,
    /// The account's private state document (first page only).
    pub account: Option<Vec<u8>>,
    /// What to ask for next; `None`: done.
    pub next: Option<HistoryCursor>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryContact {
    pub user: UserId,
    pub alias: String,
    pub invite: String,
    pub blocked: bool,
    pub added_at_ms: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryConversation {
    pub id: ConversationId,
    pub group: bool,
    pub name: String,
    pub epoch: u64,
    pub state: Option<Vec<u8>>,
    pub created_at_ms: i64,
    pub last_message_at_ms: Option<i64>,
    /// Members, and whether each is an admin.
    pub members: Vec<(UserId, bool)>,
}

/// A message as the answering device stores it, with its reactions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryMessage {
    pub message: MessageRecord,
    pub reactions: Vec<(UserId, String)>,
}

/// A link code waiting for its device.
pub(super) struct LinkSecret {
    secret: [u8; 16],
    expires_at_ms: i64,
}

/// Equal, in time that does not depend on where they differ.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl State<'_, '_> {
    /// Whether `peer` is another, unrevoked device of this account.
    fn own_device(&mut self, peer: &PeerId) -> bool {
        *peer != self.e.identity.peer_id()
            && self
                .who(peer)
                .is_some_and(|(_, user)| user == self.e.my_user)
    }

    /// `weft devices link`: a one-time code for a new device.
    pub(super) fn devices_link(&mut self, listen: Vec<Multiaddr>) -> ApiResult {
        if !self.e.identity.holds_user_key() {
            return Err(ApiError::usage(
                "this device does not hold the account's user key: link from the first device",
            ));
        }
        if !self.e.net_online {
            return Err(ApiError::usage(
                "start the daemon first: it answers the new device",
            ));
        }
        let secret: [u8; 16] = random_bytes().map_err(|e| ApiError::failed(e.to_string()))?;
        let now = now_ms();
        self.e.link_codes.retain(|c| c.expires_at_ms > now);
        if self.e.link_codes.len() >= MAX_LINK_CODES {
            self.e.link_codes.remove(0);
        }
        let expires_at_ms = now + CODE_LIFETIME_MS;
        self.e.link_codes.push(LinkSecret {
            secret,
            expires_at_ms,
        });
        let mut addrs = self.reachable_at(listen);
        addrs.truncate(8);
        let code = LinkCode {
            user: self.e.my_user,
            device: self.e.my_device,
            addrs,
            secret,
        };
        to_value(&serde_json::json!({
            "code": code.encode(),
            "expires_at": expires_at_ms,
        }))
    }

    /// A new device asks to join with a code.
    pub(super) fn answer_link(&mut self, peer: PeerId, req: LinkRequest) -> DirectResponse {
        if peer_id_of(&req.device) != peer {
            return DirectResponse::Refused("the device is not the one connected".into());
        }
        let now = now_ms();
        self.e.link_codes.retain(|c| c.expires_at_ms > now);
        let Some(at) = self.e.link_codes.iter().position(|c| {
            same(
                &crate::link::proof(&c.secret, &req.device, &req.dh),
                &req.proof,
            )
        }) else {
            return DirectResponse::Refused("no such link code (expired or used)".into());
        };
        // One use only.
        self.e.link_codes.remove(at);
        let grant = (|| -> Result<LinkGrant, ApiError> {
            let cert = self
                .e
                .identity
                .certify(&req.device, req.dh, req.consent, now)
                .map_err(|e| ApiError::failed(e.to_string()))?;
            if let Binding::OtherUser(owner) = self.bind_device(&cert)? {
                return Err(ApiError::failed(format!(
                    "the device is known here as a device of {owner}"
                )));
            }
            self.announce_devices()?;
            self.share_chains_with(&cert)?;
            self.hand_out_to_device(&cert)?;
            let invite = self.account_invite(Vec::new())?;
            Ok(LinkGrant {
                certificate: cert,
                account_dh: self.e.identity.account_dh_secret().to_bytes(),
                name: self.e.name.clone(),
                invite,
            })
        })();
        match grant {
            Ok(grant) => {
                tracing::info!(%peer, "linked a new device to the account");
                self.fx.push(Effect::Event(Event::Device {
                    event: "linked".into(),
                    device_id: grant.certificate.device.to_string(),
                }));
                DirectResponse::Linked(Box::new(grant))
            }
            Err(e) => DirectResponse::Refused(format!("linking failed: {e}")),
        }
    }

    /// This account's devices' certificates (this one first).
    fn my_certificates(&mut self) -> Result<Vec<DeviceCertificate>, ApiError> {
        let mut certs = vec![self.e.identity.certificate().clone()];
        for d in self.db.devices_of_user(&self.e.my_user)? {
            if d.device_id != self.e.my_device
                && let Ok(cert) = DeviceCertificate::from_stored_bytes(&d.cert)
            {
                certs.push(cert);
            }
        }
        certs.truncate(crate::identity::MAX_DEVICES);
        Ok(certs)
    }

    /// An invite naming every device of the account. A device without
    /// the user key shows the one it was given when linked.
    pub(super) fn account_invite(&mut self, addrs: Vec<String>) -> Result<String, ApiError> {
        if !self.e.identity.holds_user_key() {
            return self
                .db
                .get_meta(META_ACCOUNT_INVITE)?
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| ApiError::failed("this linked device has no account invite"));
        }
        let certs = self.my_certificates()?;
        self.e
            .identity
            .invite(self.e.name.as_str(), certs, addrs, now_ms())
            .map_err(|e| ApiError::failed(e.to_string()))
    }

    /// Tells every conversation which devices this account has.
    fn announce_devices(&mut self) -> Result<(), ApiError> {
        let certs = self.my_certificates()?;
        let convs = self.active_convs();
        for conv in convs {
            let recipients = self.recipients(&conv)?;
            if recipients.devices.is_empty() {
                continue;
            }
            let env = self.seal_to(
                conv.id,
                &recipients.devices,
                &Payload::Devices(certs.clone()),
            )?;
            self.send_envelope(&conv, &env, conv.epoch, 0, false, Ack::Publish)?;
        }
        Ok(())
    }

    /// A member told which devices its account has.
    pub(super) fn receive_devices(
        &mut self,
        env: &Envelope,
        conv_id: ConversationId,
        certs: Vec<DeviceCertificate>,
    ) -> Result<Verdict, ApiError> {
        let Some(sender) = self.db.device(&env.header.sender)? else {
            // From a device we do not know yet: its own messages will say.
            return Ok(Verdict::Ignore);
        };
        if sender.revoked || certs.len() > crate::identity::MAX_DEVICES {
            return Ok(Verdict::Reject(
                "device list from a revoked device, or too long",
            ));
        }
        for cert in &certs {
            if cert.user != sender.user_id || cert.verify().is_err() {
                return Ok(Verdict::Reject("device list with a foreign certificate"));
            }
            // A device belongs to the account it was first bound to.
            if self
                .db
                .device(&cert.device)?
                .is_some_and(|d| d.user_id != cert.user)
            {
                return Ok(Verdict::Reject(
                    "device list claims another account's device",
                ));
            }
        }
        for cert in certs {
            if cert.device == self.e.my_device {
                continue;
            }
            if self.bind_device(&cert)? == Binding::New && !self.is_revoked(&cert.device)? {
                self.share_chains_with(&cert)?;
                self.hand_out_to_device(&cert)?;
            }
        }
        self.store_envelope(env, &conv_id, 0, 0)?;
        Ok(Verdict::Accept)
    }

    /// Hands this device's current sending chains to a device learned
    /// later, in every conversation its user is in: it reads what this
    /// device sends from now on.
    pub(super) fn share_chains_with(&mut self, cert: &DeviceCertificate) -> Result<(), ApiError> {
        let convs: Vec<Conv> = self
            .e
            .convs
            .values()
            .filter(|c| c.active && c.members.contains(&cert.user))
            .cloned()
            .collect();
        for conv in convs {
            let key = (conv.id, conv.key_epoch);
            let distribution = match self.e.sending.get(&key) {
                Some(slot) => Some(slot.chain.distribution()),
                None => match self
                    .db
                    .get_chain(&conv.id, &self.e.my_device, conv.key_epoch)?
                {
                    Some(bytes) => Some(SendingChain::from_bytes(&bytes)?.distribution()),
                    None => None,
                },
            };
            // No chain yet: the first message will hand it to everyone.
            if let Some(distribution) = distribution {
                let to = (cert.device, self.sealing_key(&cert.device, cert.dh)?);
                self.send_chain_to(&conv, &[to], distribution)?;
            }
        }
        Ok(())
    }

    /// Binds a verified certificate's device to its account, for good,
    /// and applies a revocation that was waiting for that device from that
    /// account. `Binding::OtherUser`: it belongs to another account here,
    /// and nothing changed.
    pub(super) fn bind_device(&mut self, cert: &DeviceCertificate) -> Result<Binding, ApiError> {
        let binding = self
            .db
            .bind_device(&cert.device, &cert.user, &cert.to_bytes())?;
        if let Binding::OtherUser(_) = binding {
            return Ok(binding);
        }
        self.devices_changed();
        self.upgrade_direct_routing(&cert.user)?;
        if binding == Binding::New
            && let Some(bytes) = self.db.take_pending_revocation(&cert.user, &cert.device)?
            && let Ok(rev) = postcard::from_bytes::<Revocation>(&bytes)
            && rev.verify().is_ok()
        {
            self.apply_revocation(&rev)?;
        }
        Ok(binding)
    }

    // ---- revocation ---------------------------------------------------

    /// Whether a device was revoked by its account.
    pub(super) fn is_revoked(&self, device: &DeviceId) -> Result<bool, ApiError> {
        if self.e.revoked.contains(device) {
            return Ok(true);
        }
        if self.e.revoked.len() < MAX_REVOKED {
            return Ok(false);
        }
        // More revocations than memory holds: the store knows them all.
        Ok(self.db.device(device)?.is_some_and(|d| d.revoked))
    }

    /// Refuses to send from a device its account revoked.
    pub(super) fn check_not_revoked(&self) -> Result<(), ApiError> {
        if self.e.revoked.contains(&self.e.my_device) {
            return Err(ApiError::usage(
                "this device was revoked by its account: it can no longer send",
            ));
        }
        Ok(())
    }

    /// `weft devices revoke DEVICE_ID`: signs the revocation with the user
    /// key, starts new sending chains wherever the device could read, and
    /// tells every conversation (and the device itself).
    pub(super) fn devices_revoke(&mut self, which: &str) -> ApiResult {
        if !self.e.identity.holds_user_key() {
            return Err(ApiError::usage(
                "only the account's first device holds the user key: revoke from there",
            ));
        }
        let device = self.own_device_named(which)?;
        if device == self.e.my_device {
            return Err(ApiError::usage(
                "this device holds the account's user key and cannot revoke itself",
            ));
        }
        let revocation = self
            .e
            .identity
            .revoke(&device, now_ms())
            .map_err(|e| ApiError::failed(e.to_string()))?;
        let rekeyed = self.apply_revocation(&revocation)?;
        self.announce_revocation(&revocation)?;
        to_value(&serde_json::json!({
            "device_id": device.to_string(),
            "revoked": true,
            "conversations_rekeyed": rekeyed,
        }))
    }

    /// One of this account's devices, by its id or a unique prefix of it.
    fn own_device_named(&mut self, which: &str) -> Result<DeviceId, ApiError> {
        let which = which.trim();
        if let Ok(id) = which.parse::<DeviceId>() {
            return match self.db.device(&id)? {
                Some(d) if d.user_id == self.e.my_user && d.revoked => {
                    Err(ApiError::usage("that device is already revoked"))
                }
                Some(d) if d.user_id == self.e.my_user => Ok(id),
                _ => Err(ApiError::usage(
                    "not a device of this account (see weft devices list)",
                )),
            };
        }
        if which.len() < MIN_DEVICE_PREFIX {
            return Err(ApiError::usage(format!(
                "give the device id, or at least its first {MIN_DEVICE_PREFIX} characters"
            )));
        }
        let matching: Vec<DeviceId> = self
            .my_certificates()?
            .into_iter()
            .map(|c| c.device)
            .filter(|d| d.to_string().starts_with(which))
            .collect();
        match matching.as_slice() {
            [one] => Ok(*one),
            [] => Err(ApiError::usage(format!(
                "no device of this account starts with {which} (see weft devices list)"
            ))),
            _ => Err(ApiError::usage(format!(
                "{which} names more than one device: give more of the id"
            ))),
        }
    }

    /// Applies a verified revocation: the device is refused from now on,
    /// nothing more is sent to it, and every conversation it could read
    /// gets new sending chains. Returns how many conversations.
    pub(super) fn apply_revocation(&mut self, rev: &Revocation) -> Result<usize, ApiError> {
        if rev.device == self.e.my_device && rev.user == self.e.my_user {
            // This device's own row, so that its revocation is recorded.
            let me = self.e.identity.certificate().clone();
            self.db.bind_device(&me.device, &me.user, &me.to_bytes())?;
        }
        if !self.db.revoke_device(&rev.device, &rev.user)? {
            return Ok(0);
        }
        // The gate shuts the revoked device out of the account's topics (it
        // is disconnected if subscribed), but only after it had time to
        // hear of its revocation.
        self.gates_changed(REVOKED_GATE_GRACE);
        // This device's own revocation is always held: it stops sending.
        if self.e.revoked.len() < MAX_REVOKED || rev.device == self.e.my_device {
            self.e.revoked.insert(rev.device);
        }
        self.devices_changed();
        let peer = peer_id_of(&rev.device);
        let mut done = Vec::new();
        for (id, (_, missing)) in self.e.unreached.iter_mut() {
            if missing.remove(&peer) && missing.is_empty() {
                done.push(*id);
            }
        }
        for id in done {
            self.e.unreached.remove(&id);
            self.db.remove_outbox(&id)?;
        }
        self.fx.push(Effect::Event(Event::Device {
            event: "revoked".into(),
            device_id: rev.device.to_string(),
        }));
        if rev.device == self.e.my_device {
            tracing::warn!("this device was revoked by its account");
            return Ok(0);
        }
        let convs: Vec<ConversationId> = self
            .e
            .convs
            .values()
            .filter(|c| c.active && c.members.contains(&rev.user))
            .map(|c| c.id)
            .collect();
        for id in &convs {
            self.rekey(id)?;
        }
        tracing::info!(device = %rev.device, conversations = convs.len(), "device revoked");
        // The account's own (hidden) conversation is rekeyed, not counted.
        let own = super::account::account_conversation(&self.e.my_user);
        Ok(convs.iter().filter(|c| **c != own).count())
    }

    /// Moves this device to a new sending chain in a conversation. The new
    /// chain is made, and handed to the member devices there are then, by
    /// the next message sent there.
    fn rekey(&mut self, id: &ConversationId) -> Result<(), ApiError> {
        let Some(conv) = self.e.convs.get_mut(id) else {
            return Ok(());
        };
        let old = conv.key_epoch;
        conv.key_epoch = old.saturating_add(1);
        let new = conv.key_epoch;
        self.e.sending.remove(&(*id, old));
        self.db.set_key_epoch(id, new)?;
        Ok(())
    }

    /// Tells every conversation, and the revoked device, of a revocation.
    fn announce_revocation(&mut self, rev: &Revocation) -> Result<(), ApiError> {
        let revoked_dh = self
            .db
            .device(&rev.device)?
            .and_then(|d| DeviceCertificate::from_stored_bytes(&d.cert).ok())
            .map(|c| (c.device, c.dh));
        let convs = self.active_convs();
        for conv in convs {
            let recipients = self.recipients(&conv)?;
            let mut devices = recipients.devices.clone();
            devices.extend(revoked_dh);
            let env = self.seal_to(conv.id, &devices, &Payload::Revoked(rev.clone()))?;
            self.send_envelope(&conv, &env, 0, 0, false, Ack::Publish)?;
        }
        Ok(())
    }

    /// A member's account revoked one of its devices.
    pub(super) fn receive_revocation(
        &mut self,
        env: &Envelope,
        conv_id: ConversationId,
        rev: Revocation,
    ) -> Result<Verdict, ApiError> {
        let Some(sender) = self.db.device(&env.header.sender)? else {
            return Ok(Verdict::Ignore);
        };
        if sender.user_id != rev.user || rev.verify().is_err() {
            return Ok(Verdict::Reject(
                "revocation not signed by the sender's account",
            ));
        }
        let mine = rev.device == self.e.my_device && rev.user == self.e.my_user;
        match self.db.device(&rev.device)? {
            Some(d) if d.user_id != rev.user => {
                return Ok(Verdict::Reject("revocation of another account's device"));
            }
            Some(_) => {
                self.apply_revocation(&rev)?;
            }
            None if mine => {
                self.apply_revocation(&rev)?;
            }
            // A device we have no certificate for: the revocation waits
            // until its account (the one that signed it) certifies it, so
            // nobody can lock out a device by naming it first.
            None => {
                let bytes =
                    postcard::to_stdvec(&rev).map_err(|e| ApiError::failed(e.to_string()))?;
                self.db.add_pending_revocation(
                    &rev.user,
                    &rev.device,
                    &bytes,
                    MAX_PENDING_REVOCATIONS,
                )?;
            }
        }
        self.store_envelope(env, &conv_id, 0, 0)?;
        Ok(Verdict::Accept)
    }

    /// `weft devices list`.
    pub(super) fn devices_list(&mut self) -> ApiResult {
        let mut out = Vec::new();
        for cert in self.my_certificates()? {
            out.push(serde_json::json!({
                "device_id": cert.device.to_string(),
                "peer_id": peer_id_of(&cert.device).to_string(),
                "created_at": cert.created_at_ms,
                "current": cert.device == self.e.my_device,
                "connected": self.e.connected.contains(&peer_id_of(&cert.device)),
            }));
        }
        Ok(serde_json::Value::Array(out))
    }

    // ---- history sync -------------------------------------------------

    /// Another device of the account connected: fetch history from it if
    /// this device still needs it.
    pub(super) fn history_from(&mut self, peer: PeerId) {
        if self.e.history_peer.is_some() || !self.own_device(&peer) {
            return;
        }
        let since_ms = match self.db.get_meta(META_HISTORY_NEEDED) {
            Ok(Some(b)) => String::from_utf8_lossy(&b).parse().unwrap_or(0),
            _ => return,
        };
        self.e.history_peer = Some(peer);
        self.fx.push(Effect::History {
            peer,
            request: HistoryRequest {
                cursor: HistoryCursor::Start,
                since_ms,
            },
        });
    }

    /// Answers a history page, to another device of this account only.
    pub(super) fn answer_history(&mut self, peer: PeerId, req: HistoryRequest) -> DirectResponse {
        if !self.own_device(&peer) {
            return DirectResponse::Refused(
                "history goes only to the account's own devices".into(),
            );
        }
        match self.history_page(req) {
            Ok(page) => DirectResponse::History(Box::new(page)),
            Err(e) => DirectResponse::Refused(format!("history: {e}")),
        }
    }

    fn history_page(&mut self, req: HistoryRequest) -> Result<HistoryPage, ApiError> {
        let mut page = HistoryPage::default();
        match req.cursor {
            HistoryCursor::Start => {
                for c in self.db.contacts()? {
                    page.users.push((
                        c.user_id,
                        self.db.user_name(&c.user_id)?.unwrap_or_default(),
                    ));
                    for d in self.db.devices_of_user(&c.user_id)? {
                        if let Ok(cert) = DeviceCertificate::from_stored_bytes(&d.cert) {
                            page.devices.push(cert);
                        }
                    }
                    page.contacts.push(HistoryContact {
                        user: c.user_id,
                        alias: c.alias,
                        invite: c.invite,
                        blocked: c.blocked,
                        added_at_ms: c.added_at_ms,
                    });
                }
                page.account = Some(self.account_bytes()?);
                let own = super::account::account_conversation(&self.e.my_user);
                for r in self.db.conversations()? {
                    if r.id == own {
                        continue;
                    }
                    let members = self
                        .db
                        .members(&r.id)?
                        .into_iter()
                        .map(|(u, role)| (u, role == Role::Admin))
                        .collect::<Vec<_>>();
                    for (user, _) in &members {
                        if !page.users.iter().any(|(u, _)| u == user) {
                            page.users
                                .push((*user, self.db.user_name(user)?.unwrap_or_default()));
                            for d in self.db.devices_of_user(user)? {
                                if let Ok(cert) = DeviceCertificate::from_stored_bytes(&d.cert) {
                                    page.devices.push(cert);
                                }
                            }
                        }
                    }
                    page.conversations.push(HistoryConversation {
                        id: r.id,
                        group: r.kind == ConversationKind::Group,
                        name: r.name,
                        epoch: r.epoch,
                        state: r.state,
                        created_at_ms: r.created_at_ms,
                        last_message_at_ms: r.last_message_at_ms,
                        members,
                    });
                }
                page.next = Some(HistoryCursor::Shards(0));
            }
            HistoryCursor::Shards(from) => {
                let all = self.db.shard_ids()?;
                let from = from as usize;
                for (conv, period) in all.iter().skip(from).take(HISTORY_SHARDS) {
                    if let Some(doc) = self.db.shard(conv, *period)? {
                        page.shards.push((*conv, *period, doc));
                    }
                }
                page.next = Some(if from + HISTORY_SHARDS < all.len() {
                    HistoryCursor::Shards((from + HISTORY_SHARDS) as u32)
                } else {
                    HistoryCursor::Messages {
                        hlc: 0,
                        id: EnvelopeId([0; 16]),
                    }
                });
            }
            HistoryCursor::Messages { hlc, id } => {
                let after = (hlc > 0).then_some((hlc, id));
                let records = self.db.messages_after(after, req.since_ms, HISTORY_PAGE)?;
                let full = records.len() == HISTORY_PAGE;
                let mut bytes = 0;
                for m in records {
                    bytes += m.text.len();
                    page.messages.push(HistoryMessage {
                        reactions: self.db.reactions(&m.id)?,
                        message: m,
                    });
                    if bytes > HISTORY_PAGE_BYTES {
                        break;
                    }
                }
                let cut = bytes > HISTORY_PAGE_BYTES;
                page.next = match page.messages.last() {
                    Some(last) if full || cut => Some(HistoryCursor::Messages {
                        hlc: last.message.hlc,
                        id: last.message.id,
                    }),
                    _ => None,
                };
            }
        }
        Ok(page)
    }

    /// A history page came back (or not).
    pub(super) fn on_history(&mut self, peer: PeerId, response: Option<DirectResponse>) {
        let page = match response {
            Some(DirectResponse::History(page)) => page,
            other => {
                tracing::warn!(%peer, ?other, "history sync stopped; it resumes on the next connection");
                self.e.history_peer = None;
                return;
            }
        };
        if let Err(e) = self.import_history(&page) {
            tracing::warn!(%peer, "history import failed: {e}");
            self.e.history_peer = None;
            return;
        }
        match page.next {
            Some(cursor) => {
                let since_ms = self
                    .db
                    .get_meta(META_HISTORY_NEEDED)
                    .ok()
                    .flatten()
                    .and_then(|b| String::from_utf8_lossy(&b).parse().ok())
                    .unwrap_or(0);
                self.fx.push(Effect::History {
                    peer,
                    request: HistoryRequest { cursor, since_ms },
                });
            }
            None => {
                tracing::info!(%peer, "history received from another device of the account");
                let _ = self.db.delete_meta(META_HISTORY_NEEDED);
                self.e.history_peer = None;
            }
        }
    }

    fn import_history(&mut self, page: &HistoryPage) -> Result<(), ApiError> {
        let now = now_ms();
        if let Some(account) = &page.account {
            self.merge_account(account)?;
        }
        for (user, name) in &page.users {
            self.db.upsert_user(user, name, now)?;
        }
        for cert in &page.devices {
            if cert.verify().is_ok()
                && cert.device != self.e.my_device
                && let Binding::OtherUser(owner) = self.bind_device(cert)?
            {
                tracing::warn!(device = %cert.device, %owner, "history names a device of another account");
            }
        }
        self.devices_changed();
        for c in &page.contacts {
            if self.db.contact(&c.user)?.is_none() {
                let contact = Contact {
                    user_id: c.user,
                    alias: c.alias.clone(),
                    invite: c.invite.clone(),
                    blocked: c.blocked,
                    added_at_ms: c.added_at_ms,
                };
                match self.db.insert_contact(&contact) {
                    // A message may have named the conversation already.
                    Ok(()) => self.db.rename_conversation(
                        &ConversationId::direct(&self.e.my_user, &c.user),
                        &c.alias,
                    )?,
                    Err(e) => tracing::debug!("contact {} not imported: {e}", c.alias),
                }
                if c.blocked {
                    self.e.blocked.insert(c.user);
                }
            }
        }
        for c in &page.conversations {
            let group = c
                .state
                .as_deref()
                .and_then(GroupState::decode)
                .map(Arc::new);
            // The routing secret: a group's is in its state; a one-to-one
            // conversation's derives from the account keys.
            let other = c
                .members
                .iter()
                .map(|(u, _)| *u)
                .find(|u| *u != self.e.my_user)
                .unwrap_or(self.e.my_user);
            let routing = match &group {
                Some(g) => Some(g.routing()),
                None if !c.group => super::direct_routing(&self.e.identity, self.db, &other)?,
                None => None,
            };
            let record = ConversationRecord {
                id: c.id,
                kind: if c.group {
                    ConversationKind::Group
                } else {
                    ConversationKind::Direct
                },
                name: c.name.clone(),
                topic: routing
                    .as_ref()
                    .map(|r| r.topic())
                    // Never subscribed (no tag); unique, and says nothing.
                    .unwrap_or_else(|| format!("weft/none/{}", hex::encode(rand_id()))),
                tag: routing.as_ref().map(|r| r.tag()),
                epoch: c.epoch,
                state: c.state.clone(),
                created_at_ms: c.created_at_ms,
                last_message_at_ms: c.last_message_at_ms,
                unread: 0,
                key_epoch: 1,
            };
            if self.db.insert_conversation(&record)? {
                let members: Vec<(UserId, Role)> = c
                    .members
                    .iter()
                    .map(|(u, admin)| (*u, if *admin { Role::Admin } else { Role::Member }))
                    .collect();
                self.db.set_members(&c.id, &members)?;
                let users: Vec<UserId> = members.iter().map(|(u, _)| *u).collect();
                let active = users.contains(&self.e.my_user);
                self.add_conv(Conv {
                    id: c.id,
                    kind: record.kind,
                    topic: record.topic.clone(),
                    tag: record.tag,
                    epoch: c.epoch,
                    key_epoch: 1,
                    members: users,
                    group,
                    active,
                });
                self.reprocess_pending(&c.id);
            }
        }
        for (conv, period, doc) in &page.shards {
            self.e.shards.remove(&(*conv, *period));
            let merged = match self.db.shard(conv, *period)? {
                None => doc.clone(),
                Some(mine) => {
                    let device = self.e.my_device.0;
                    let mut a = weft_crdt::Annotations::load(&mine, &device)
                        .map_err(|e| ApiError::failed(e.to_string()))?;
                    a.merge_saved(doc)
                        .map_err(|e| ApiError::failed(e.to_string()))?;
                    a.save()
                }
            };
            self.db.put_shard(conv, *period, &merged)?;
        }
        let mut read_elsewhere = HashSet::new();
        for HistoryMessage { message, reactions } in &page.messages {
            if !self.e.convs.contains_key(&message.conversation) {
                continue;
            }
            // A deletion leaves nothing of the text, whatever was sent.
            let record = MessageRecord {
                text: if message.deleted {
                    String::new()
                } else {
                    message.text.clone()
                },
                edited: message.edited && !message.deleted,
                ..message.clone()
            };
            if self.db.insert_message(&record)? {
                self.db.set_reactions(&record.id, reactions)?;
                // Read state is the account's: what the other device has
                // not read is unread here too.
                let unread = u32::from(
                    record.sender_user != self.e.my_user && record.status != MessageStatus::Read,
                );
                self.db
                    .bump_conversation(&record.conversation, record.sent_at_ms, unread)?;
            } else if self.db.set_message_status(&record.id, record.status)?
                && record.status == MessageStatus::Read
            {
                // Here already (it came by itself), and read on the other
                // device meanwhile.
                read_elsewhere.insert(record.conversation);
            }
        }
        for conv in read_elsewhere {
            self.db.recount_unread(&conv, &self.e.my_user)?;
        }
        Ok(())
    }
}

//! History sync: a newly linked device asks the account's other devices
//! for the conversations, contacts, messages (with statuses and
//! reactions) and annotation shards they hold, page by page, over the
//! direct protocol. Only the account's own devices are answered.

use std::collections::HashSet;
use std::sync::Arc;

use libp2p::PeerId;
use serde::{Deserialize, Serialize};

use crate::backoff;
use crate::group::GroupState;
use crate::identity::DeviceCertificate;
use crate::ids::{ConversationId, EnvelopeId, MessageId, UserId};
use crate::node::now_ms;
use crate::store::{
    Binding, Contact, ConversationKind, ConversationRecord, MessageRecord, MessageStatus, Role,
    meta,
};

use super::EngineError;
use super::{Conv, DirectResponse, Effect, State};

/// Messages per history page, and their text bytes.
const HISTORY_PAGE: usize = 1000;
const HISTORY_PAGE_BYTES: usize = 4 * 1024 * 1024;
/// Shards per history page.
const HISTORY_SHARDS: usize = 64;

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

impl State<'_, '_> {
    /// Another device of the account connected: fetch history from it if
    /// this device still needs it.
    pub(super) fn history_from(&mut self, peer: PeerId) {
        if !self.e.linking.may_ask_history(tokio::time::Instant::now()) || !self.own_device(&peer) {
            return;
        }
        let since_ms = match self.db.get_meta(meta::HISTORY_NEEDED) {
            Ok(Some(b)) => String::from_utf8_lossy(&b).parse().unwrap_or(0),
            Ok(None) => {
                self.e.linking.history_done();
                return;
            }
            Err(e) => {
                tracing::warn!("history: {e}");
                return;
            }
        };
        self.e.linking.history_started(peer);
        self.fx.push(Effect::History {
            peer,
            request: HistoryRequest {
                cursor: HistoryCursor::Start,
                since_ms,
            },
        });
    }

    /// Every tick: a transfer that failed, or never started because no
    /// connected device was known as the account's yet, is asked again of
    /// a connected device of the account (not only on the next
    /// connection, which may never come).
    pub(super) fn retry_history(&mut self) {
        if !self.e.linking.may_ask_history(tokio::time::Instant::now()) {
            return;
        }
        let connected: Vec<PeerId> = self.e.connected.iter().copied().collect();
        if let Some(peer) = connected.into_iter().find(|p| self.own_device(p)) {
            self.history_from(peer);
        }
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

    pub(super) fn history_page(&mut self, req: HistoryRequest) -> Result<HistoryPage, EngineError> {
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
                tracing::warn!(%peer, ?other, "history sync stopped; it is asked again shortly");
                self.e
                    .linking
                    .history_failed(tokio::time::Instant::now(), backoff::jitter());
                return;
            }
        };
        if let Err(e) = self.import_history(&page) {
            tracing::warn!(%peer, "history import failed: {e}");
            self.e
                .linking
                .history_failed(tokio::time::Instant::now(), backoff::jitter());
            return;
        }
        match page.next {
            Some(cursor) => {
                let since_ms = self
                    .db
                    .get_meta(meta::HISTORY_NEEDED)
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
                let _ = self.db.delete_meta(meta::HISTORY_NEEDED);
                self.e.linking.history_done();
            }
        }
    }

    pub(super) fn import_history(&mut self, page: &HistoryPage) -> Result<(), EngineError> {
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
                    self.e.directory.blocked.insert(c.user);
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
                    .unwrap_or_else(|| {
                        format!("weft/none/{}", hex::encode(super::devices::rand_id()))
                    }),
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
            self.e.shards.forget(&(*conv, *period));
            let merged = match self.db.shard(conv, *period)? {
                None => doc.clone(),
                Some(mine) => {
                    let device = self.e.my_device.0;
                    let mut a = weft_crdt::Annotations::load(&mine, &device)
                        .map_err(|e| EngineError::failed(e.to_string()))?;
                    a.merge_saved(doc)
                        .map_err(|e| EngineError::failed(e.to_string()))?;
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

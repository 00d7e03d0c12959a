//! The API: what each request of a `NodeHandle` (and so of the control
//! socket) does, and the views it answers with.

use libp2p::Multiaddr;
use libp2p::multiaddr::Protocol;

use crate::api::{ConversationView, GroupView, IdView, MessageView, Request, Response, StatusView};
use crate::ids::{MessageId, UserId};
use crate::store::{ConversationKind, MessageRecord};

use super::EngineError;
use super::{
    Effect, EngineResult, GroupOp, Handed, Input, Internal, State, Verdict, Via, account,
    member_views, role_name, run_effects,
};
use crate::node::Command;

impl State<'_, '_> {
    pub(super) fn handle(&mut self, input: Input) {
        match input {
            Input::Command(Command::Api {
                request,
                listen,
                reply,
            }) => {
                let result = self.api(request, listen);
                self.fx.push(Effect::Reply(reply, result));
            }
            Input::Command(Command::Deliver { envelopes, reply }) => {
                let mut accepted = 0u32;
                self.preverify(envelopes.iter().map(Vec::as_slice));
                for bytes in &envelopes {
                    match self.receive(bytes, Via::Direct(Handed::Locally), None) {
                        Verdict::Reject(why) => {
                            tracing::debug!(why, "a delivered envelope is refused");
                        }
                        _ => accepted += 1,
                    }
                }
                self.fx.push(Effect::Accepted(reply, accepted));
            }
            Input::Command(Command::Shutdown(_)) => {}
            Input::Net(ev) => self.on_net(ev),
            Input::Internal(Internal::DirectAck { peer, ids, ok }) => {
                for id in &ids {
                    self.e.outbox.answered(id, &peer);
                }
                if ok {
                    for id in ids {
                        self.reached(&id, &peer);
                    }
                    // Keep a flush to a peer that just came online going.
                    self.flush_to(peer, None);
                }
            }
            Input::Internal(Internal::Durable(effects)) => run_effects(self.outlets, effects),
            Input::Internal(Internal::MailboxReply {
                relay,
                then,
                response,
            }) => self.on_mailbox_reply(relay, then, response),
            Input::Internal(Internal::Synced {
                peer,
                conv,
                response,
            }) => self.on_synced(peer, conv, response),
            Input::Internal(Internal::History { peer, response }) => {
                self.on_history(peer, response)
            }
            Input::Tick => {
                self.retry();
                self.retry_history();
                self.expire_presence();
                self.expire_keys();
            }
            Input::Heartbeat => {
                self.heartbeat();
                self.purge_offered();
            }
            Input::SyncTick => self.sync_all(),
            // Acted on at the batch's end.
            Input::Acknowledge => {}
        }
    }

    pub(super) fn api(
        &mut self,
        request: Request,
        listen: Vec<Multiaddr>,
    ) -> EngineResult<Response> {
        match request {
            Request::Id => self.id(listen).map(Response::Id),
            Request::Status => {
                let view = StatusView {
                    peer_id: self.e.identity.peer_id().to_string(),
                    listen: Vec::new(),
                    peers: Vec::new(),
                    relays: self.e.relays.in_use().map(|(_, a)| a.to_string()).collect(),
                    online: self.e.net_online,
                    outbox: self.db.outbox_len()?,
                };
                Ok(Response::Status(view))
            }
            Request::ContactAdd { invite, name } => self
                .contact_add(&invite, name.as_deref())
                .map(Response::Contact),
            Request::ContactList => {
                let mut out = Vec::new();
                for c in self.db.contacts()? {
                    out.push(self.contact_view(&c)?);
                }
                Ok(Response::Contacts(out))
            }
            Request::ContactRemove { alias } => {
                let c = self.contact(&alias)?;
                self.db.remove_contact(&c.user_id)?;
                self.e.directory.blocked.remove(&c.user_id);
                self.change_account(|a| a.remove_contact(&c.user_id.0))?;
                self.contact_view(&c).map(Response::Contact)
            }
            Request::ContactBlock { alias } => {
                self.set_blocked(&alias, true).map(Response::Contact)
            }
            Request::ContactUnblock { alias } => {
                self.set_blocked(&alias, false).map(Response::Contact)
            }
            Request::Send {
                target,
                text,
                reply_to,
            } => self
                .send(&target, text, reply_to.as_deref())
                .map(Response::Sent),
            Request::GroupCreate { name, members } => {
                self.group_create(&name, &members).map(Response::Group)
            }
            Request::GroupAdd { group, member } => self
                .group_change(&group, &member, GroupOp::Add)
                .map(Response::Members),
            Request::GroupRemove { group, member } => self
                .group_change(&group, &member, GroupOp::Remove)
                .map(Response::Members),
            Request::GroupAdmin { group, member } => self
                .group_change(&group, &member, GroupOp::Admin)
                .map(Response::Members),
            Request::GroupLeave { group } => self.group_leave(&group).map(Response::Left),
            Request::GroupList => {
                let mut out = Vec::new();
                for conv in self
                    .e
                    .convs
                    .values()
                    .filter(|c| c.kind == ConversationKind::Group)
                {
                    let Some(g) = &conv.group else { continue };
                    if !conv.active {
                        continue;
                    }
                    out.push(GroupView {
                        id: conv.id.to_string(),
                        name: g.name.clone(),
                        members: g.members.len(),
                        role: g
                            .member(&self.e.my_user)
                            .map_or("none", |m| role_name(m.role))
                            .into(),
                        epoch: g.epoch,
                    });
                }
                out.sort_by(|a, b| a.name.cmp(&b.name));
                Ok(Response::Groups(out))
            }
            Request::GroupMembers { group } => {
                let conv = self.group(&group)?;
                let g = conv
                    .group
                    .as_ref()
                    .ok_or_else(|| EngineError::failed("group has no state"))?;
                Ok(Response::Members(member_views(g)))
            }
            Request::Conversations => {
                let mut out = Vec::new();
                let hidden = account::account_conversation(&self.e.my_user);
                for r in self.db.conversations()? {
                    if r.id == hidden {
                        continue;
                    }
                    out.push(ConversationView {
                        id: r.id.to_string(),
                        kind: r.kind.as_str().to_string(),
                        name: r.name,
                        unread: r.unread,
                        last_message_at: r.last_message_at_ms,
                    });
                }
                Ok(Response::Conversations(out))
            }
            Request::Messages {
                target,
                limit,
                before,
            } => {
                let conv = self.resolve(&target)?;
                let before = match before {
                    Some(b) => Some(
                        b.parse::<MessageId>()
                            .map_err(|_| EngineError::usage(format!("not a message id: {b}")))?,
                    ),
                    None => None,
                };
                let limit = limit.unwrap_or(50).min(10_000);
                let records = self.db.messages(&conv, limit, before.as_ref())?;
                let mut out = Vec::with_capacity(records.len());
                for r in &records {
                    out.push(self.message_view(r, true)?);
                }
                Ok(Response::Messages(out))
            }
            Request::Read { target } => {
                let conv = self.resolve(&target)?;
                self.mark_read(conv).map(Response::Read)
            }
            Request::DevicesLink => self.devices_link(listen).map(Response::LinkCode),
            Request::DevicesList => self.devices_list().map(Response::Devices),
            Request::DevicesRevoke { device } => {
                self.devices_revoke(&device).map(Response::Revoked)
            }
            Request::Edit { id, text } => self.edit_message(&id, text).map(Response::Message),
            Request::Delete { id } => self.delete_message(&id).map(Response::Message),
            Request::React { id, emoji, remove } => {
                self.react(&id, &emoji, !remove).map(Response::Message)
            }
            Request::Presence { target } => self.presence_of(&target).map(Response::Presence),
            Request::Typing { target, typing } => {
                self.send_typing(&target, typing).map(Response::Typing)
            }
            Request::Privacy { presence } => {
                self.privacy(presence.as_deref()).map(Response::Privacy)
            }
            Request::RelayList => self.relay_list().map(Response::Relays),
            Request::PushRegister { url } => self.push_register(Some(url)).map(Response::Push),
            Request::PushUnregister => self.push_register(None).map(Response::Push),
            Request::Watch => Err(EngineError::usage(
                "watch is a stream: use the control socket",
            )),
        }
    }

    /// Where this device can be reached, with its `/p2p/`: the listen
    /// addresses (not the unspecified ones) and the circuit addresses
    /// through its relays, each once. For invites and link codes.
    pub(super) fn reachable_at(&self, listen: Vec<Multiaddr>) -> Vec<String> {
        let peer = self.e.identity.peer_id();
        listen
            .into_iter()
            .filter(|a| {
                !a.iter()
                    .any(|p| matches!(p, Protocol::Ip4(ip) if ip.is_unspecified()))
            })
            .map(|a| a.with(Protocol::P2p(peer)).to_string())
            .chain(self.relay_addrs())
            .fold(Vec::new(), |mut seen: Vec<String>, a| {
                // A relay may announce the circuit address we also build.
                if !seen.contains(&a) {
                    seen.push(a);
                }
                seen
            })
    }

    pub(super) fn id(&mut self, listen: Vec<Multiaddr>) -> EngineResult<IdView> {
        let peer = self.e.identity.peer_id();
        let addrs = self.reachable_at(listen);
        let invite = self.account_invite(addrs)?;
        Ok(IdView {
            user_id: self.e.my_user.to_string(),
            device_id: self.e.my_device.to_string(),
            peer_id: peer.to_string(),
            name: self.e.name.clone(),
            invite,
        })
    }

    pub(super) fn user_name(&self, user: &UserId) -> String {
        if *user == self.e.my_user {
            return self.e.name.clone();
        }
        if let Ok(Some(c)) = self.db.contact(user) {
            return c.alias;
        }
        self.db
            .user_name(user)
            .ok()
            .flatten()
            .unwrap_or_else(|| user.to_string()[..8].to_string())
    }

    /// The API's view of a message. `with_receipts`: look up the per-member
    /// receipts and progress (not needed for a message just received).
    pub(super) fn message_view(
        &self,
        r: &MessageRecord,
        with_receipts: bool,
    ) -> Result<MessageView, EngineError> {
        let conv = self.e.convs.get(&r.conversation);
        let outgoing = r.sender_user == self.e.my_user;
        let (receipts, progress) = match conv {
            Some(c) if with_receipts => {
                let (receipts, progress) = self.receipt_views(c, r)?;
                let receipts = (c.kind == ConversationKind::Group).then_some(receipts);
                (receipts, outgoing.then_some(progress))
            }
            _ => (None, None),
        };
        Ok(MessageView {
            id: r.id.to_string(),
            conversation: r.conversation.to_string(),
            sender: r.sender_user.to_string(),
            sender_name: self.user_name(&r.sender_user),
            text: r.text.clone(),
            sent_at: r.sent_at_ms,
            status: r.status.as_str().to_string(),
            reply_to: r.reply_to.map(|m| m.to_string()),
            edited: r.edited,
            deleted: r.deleted,
            reactions: {
                let mut by_emoji = std::collections::BTreeMap::<String, Vec<String>>::new();
                for (user, emoji) in self.db.reactions(&r.id)? {
                    by_emoji.entry(emoji).or_default().push(user.to_string());
                }
                by_emoji
            },
            receipts,
            progress,
            hlc: r.hlc,
            outgoing,
        })
    }
}

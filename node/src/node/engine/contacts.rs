//! Contacts: adding one from an invite, blocking, and the one-to-one
//! conversation each contact has.

use std::collections::{HashMap, HashSet};

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};

use crate::api::ContactView;
use crate::identity::{DeviceCertificate, Invite, peer_id_of};
use crate::ids::{ConversationId, UserId};
use crate::net::{NetCommand, PeerSource};
use crate::node::now_ms;
use crate::store::{Binding, Contact, ConversationKind, ConversationRecord, Role};

use super::EngineError;
use super::{Conv, Effect, EngineResult, State, direct_routing};

impl State<'_, '_> {
    pub(super) fn contact(&self, alias: &str) -> Result<Contact, EngineError> {
        if let Some(c) = self.db.contact_by_alias(alias)? {
            return Ok(c);
        }
        if let Ok(user) = alias.parse::<UserId>()
            && let Some(c) = self.db.contact(&user)?
        {
            return Ok(c);
        }
        Err(EngineError::usage(format!("unknown contact: {alias}")))
    }

    pub(super) fn contact_view(&self, c: &Contact) -> Result<ContactView, EngineError> {
        Ok(ContactView {
            alias: c.alias.clone(),
            user_id: c.user_id.to_string(),
            name: self
                .db
                .user_name(&c.user_id)?
                .unwrap_or_else(|| c.alias.clone()),
            blocked: c.blocked,
            devices: self.db.devices_of_user(&c.user_id)?.len(),
        })
    }

    pub(super) fn set_blocked(&mut self, alias: &str, blocked: bool) -> EngineResult<ContactView> {
        let c = self.contact(alias)?;
        self.db.set_blocked(&c.user_id, blocked)?;
        if blocked {
            self.e.directory.blocked.insert(c.user_id);
        } else {
            self.e.directory.blocked.remove(&c.user_id);
        }
        self.change_account(|a| a.block(&c.user_id.0, blocked))?;
        let c = self.contact(alias)?;
        self.contact_view(&c)
    }

    /// `weft contact add`: the contact, and the account's other devices
    /// told.
    pub(super) fn contact_add(
        &mut self,
        text: &str,
        alias: Option<&str>,
    ) -> EngineResult<ContactView> {
        let invite =
            Invite::decode(text).map_err(|e| EngineError::usage(format!("invalid invite: {e}")))?;
        let alias = alias.unwrap_or(&invite.name).trim().to_string();
        let contact = self.import_contact(text, &alias)?;
        self.change_account(|a| {
            a.add_contact(&contact.user_id.0, &contact.alias, &contact.invite)
        })?;
        self.contact_view(&contact)
    }

    /// Adds a contact from an invite under `alias`, learns its devices and
    /// addresses, and opens the direct conversation.
    pub(super) fn import_contact(
        &mut self,
        text: &str,
        alias: &str,
    ) -> Result<Contact, EngineError> {
        let invite =
            Invite::decode(text).map_err(|e| EngineError::usage(format!("invalid invite: {e}")))?;
        if invite.user == self.e.my_user {
            return Err(EngineError::usage("that is your own invite"));
        }
        let alias = alias.trim().to_string();
        crate::identity::validate_name(&alias)
            .map_err(|_| EngineError::usage("alias must be 1 to 64 printable bytes"))?;
        if alias.parse::<UserId>().is_ok() || alias.parse::<ConversationId>().is_ok() {
            return Err(EngineError::usage("alias must not look like an id"));
        }
        let now = now_ms();
        let contact = Contact {
            user_id: invite.user,
            alias: alias.clone(),
            invite: text.trim().to_string(),
            blocked: false,
            added_at_ms: now,
        };
        self.db.insert_contact(&contact).map_err(|e| match e {
            crate::store::StoreError::AliasTaken(a) => {
                EngineError::usage(format!("alias {a} is taken: pick another with --name"))
            }
            crate::store::StoreError::AlreadyContact => EngineError::usage("already a contact"),
            e => EngineError::Store(e),
        })?;
        self.db.upsert_user(&invite.user, &invite.name, now)?;
        for cert in &invite.devices {
            self.learn_device(cert)?;
        }
        // Address hints: only those naming one of the invite's devices.
        let device_peers: HashSet<PeerId> = invite
            .devices
            .iter()
            .map(|c| peer_id_of(&c.device))
            .collect();
        let mut dial: HashMap<PeerId, Vec<Multiaddr>> = HashMap::new();
        for addr in &invite.addrs {
            let Ok(addr) = addr.parse::<Multiaddr>() else {
                continue;
            };
            if let Some(Protocol::P2p(peer)) = addr.iter().last()
                && device_peers.contains(&peer)
            {
                self.db
                    .upsert_peer_addr(&peer.to_string(), &addr.to_string(), now)?;
                dial.entry(peer).or_default().push(addr);
            }
        }
        for (peer, addrs) in dial {
            self.fx.push(Effect::Net(NetCommand::Dial {
                peer,
                addrs,
                source: PeerSource::Manual,
            }));
        }
        let conv = self.ensure_direct(&invite.user, &alias)?;
        // A message may have made the conversation first, named after the
        // sender's display name: it takes the alias now.
        self.db.rename_conversation(&conv, &alias)?;
        // Anything that waited for this contact's devices may open now.
        self.reprocess_pending(&conv);
        Ok(contact)
    }

    pub(super) fn learn_device(&mut self, cert: &DeviceCertificate) -> Result<(), EngineError> {
        cert.verify()
            .map_err(|e| EngineError::usage(e.to_string()))?;
        if let Binding::OtherUser(owner) = self.bind_device(cert)? {
            return Err(EngineError::usage(format!(
                "device {} of this invite is known here as a device of {owner}",
                cert.device
            )));
        }
        Ok(())
    }

    /// The direct conversation with `user`, created if new.
    pub(super) fn ensure_direct(
        &mut self,
        user: &UserId,
        name: &str,
    ) -> Result<ConversationId, EngineError> {
        let id = ConversationId::direct(&self.e.my_user, user);
        if let Some(conv) = self.e.convs.get(&id) {
            // Never a group that took the id: its members would read on.
            if conv.kind != ConversationKind::Direct {
                return Err(EngineError::failed(
                    "a group holds the id of this one-to-one conversation",
                ));
            }
            return Ok(id);
        }
        let Some(routing) = direct_routing(&self.e.identity, self.db, user)? else {
            return Err(EngineError::failed(format!(
                "no protocol 2 certificate of {name} is known here: add their new invite (weft contact add)"
            )));
        };
        let record = ConversationRecord::direct(id, name, &routing, now_ms());
        self.db.insert_conversation(&record)?;
        self.db.set_members(
            &id,
            &[(self.e.my_user, Role::Member), (*user, Role::Member)],
        )?;
        self.devices_changed();
        let conv = Conv::direct(id, vec![self.e.my_user, *user], &routing);
        self.add_conv(conv.clone());
        self.hand_out_in(&conv)?;
        Ok(id)
    }

    /// Gives a one-to-one conversation made under protocol 1 its routing
    /// secret once a protocol 2 certificate of the other user is known.
    pub(super) fn upgrade_direct_routing(&mut self, user: &UserId) -> Result<(), EngineError> {
        let id = ConversationId::direct(&self.e.my_user, user);
        let Some(conv) = self.e.convs.get(&id) else {
            return Ok(());
        };
        if conv.tag.is_some() || conv.kind != ConversationKind::Direct {
            return Ok(());
        }
        let Some(routing) = direct_routing(&self.e.identity, self.db, user)? else {
            return Ok(());
        };
        self.db.set_routing(&id, &routing.topic(), &routing.tag())?;
        let mut conv = conv.clone();
        if conv.active {
            self.fx
                .push(Effect::Net(NetCommand::Unsubscribe(conv.topic.clone())));
        }
        conv.topic = routing.topic();
        conv.tag = Some(routing.tag());
        self.add_conv(conv);
        Ok(())
    }
}

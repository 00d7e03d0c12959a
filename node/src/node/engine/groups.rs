//! Groups: creating one, adding, removing and promoting members, leaving,
//! and applying a new group state (a new key epoch and routing secret).

use std::collections::HashSet;
use std::sync::Arc;

use crate::api::{Event, GroupView, LeftView, MemberView};
use crate::group::{GroupMember, GroupRole, GroupState};
use crate::identity::{DeviceCertificate, random_bytes};
use crate::ids::{ConversationId, DeviceId, UserId};
use crate::net::NetCommand;
use crate::node::now_ms;
use crate::payload::Payload;
use crate::store::{Binding, ConversationKind, ConversationRecord, Role};

use super::EngineError;
use super::{Ack, Conv, Effect, EngineResult, GroupOp, State, fresh_key, member_views, role_of};

/// The conversation record of a group seen for the first time (its state
/// is applied to it next).
pub(super) fn new_group_record(state: &GroupState) -> ConversationRecord {
    let routing = state.routing();
    ConversationRecord {
        id: state.id,
        kind: ConversationKind::Group,
        name: state.name.clone(),
        topic: routing.topic(),
        tag: Some(routing.tag()),
        epoch: 0,
        state: None,
        created_at_ms: now_ms(),
        last_message_at_ms: None,
        unread: 0,
        key_epoch: 1,
    }
}

impl State<'_, '_> {
    pub(super) fn me_as_member(&self, role: GroupRole) -> GroupMember {
        GroupMember {
            user: self.e.my_user,
            name: self.e.name.clone(),
            role,
            devices: vec![self.e.identity.certificate().clone()],
        }
    }

    pub(super) fn contact_as_member(&self, alias: &str) -> Result<GroupMember, EngineError> {
        let c = self.contact(alias)?;
        if c.blocked {
            return Err(EngineError::usage(format!("{alias} is blocked")));
        }
        let mut devices = Vec::new();
        for d in self.db.devices_of_user(&c.user_id)? {
            if let Ok(cert) = DeviceCertificate::from_stored_bytes(&d.cert) {
                devices.push(cert);
            }
        }
        devices.truncate(crate::identity::MAX_DEVICES);
        if devices.is_empty() {
            return Err(EngineError::failed(format!("no known device for {alias}")));
        }
        Ok(GroupMember {
            user: c.user_id,
            name: self.db.user_name(&c.user_id)?.unwrap_or(c.alias),
            role: GroupRole::Member,
            devices,
        })
    }

    pub(super) fn group_create(
        &mut self,
        name: &str,
        members: &[String],
    ) -> EngineResult<GroupView> {
        crate::identity::validate_name(name)
            .map_err(|_| EngineError::usage("group name must be 1 to 64 printable bytes"))?;
        let mut state = GroupState {
            id: ConversationId::new_group(random_bytes()?),
            name: name.to_string(),
            epoch: 1,
            members: vec![self.me_as_member(GroupRole::Admin)],
            routing: fresh_key()?,
        };
        for alias in members {
            let m = self.contact_as_member(alias)?;
            if state.member(&m.user).is_none() {
                state.members.push(m);
            }
        }
        state
            .check()
            .map_err(|e| EngineError::usage(e.to_string()))?;
        self.db.insert_conversation(&new_group_record(&state))?;
        let conv = self.apply_group(&state, &[])?;
        self.announce_group(&conv, &state, &[])?;
        Ok(GroupView {
            id: state.id.to_string(),
            name: state.name.clone(),
            members: state.members.len(),
            role: "admin".into(),
            epoch: state.epoch,
        })
    }

    /// A group this user is an active member of, with its current state.
    pub(super) fn active_group(
        &mut self,
        group: &str,
    ) -> Result<(Conv, Arc<GroupState>), EngineError> {
        let conv = self.group(group)?;
        let current = conv
            .group
            .clone()
            .ok_or_else(|| EngineError::failed("group has no state"))?;
        if !conv.active {
            return Err(EngineError::usage(
                "you are no longer a member of this group",
            ));
        }
        Ok((conv, current))
    }

    pub(super) fn group_change(
        &mut self,
        group: &str,
        alias: &str,
        op: GroupOp,
    ) -> EngineResult<Vec<MemberView>> {
        let (_, current) = self.active_group(group)?;
        if !current.is_admin(&self.e.my_user) {
            return Err(EngineError::usage("only an admin may do that"));
        }
        let mut next = GroupState::clone(&current);
        // Saturating: a state at the last epoch is refused as invalid.
        next.epoch = next.epoch.saturating_add(1);
        // A new epoch, a new routing secret: a removed member cannot tell
        // the group's envelopes or topic from now on.
        next.routing = fresh_key()?;
        match op {
            GroupOp::Add => {
                let m = self.contact_as_member(alias)?;
                if current.member(&m.user).is_some() {
                    return Err(EngineError::usage(format!("{alias} is already a member")));
                }
                next.members.push(m);
            }
            GroupOp::Remove | GroupOp::Admin => {
                let user = self.member_user(&current, alias)?;
                if op == GroupOp::Remove {
                    if user == self.e.my_user {
                        return Err(EngineError::usage("to remove yourself, use group leave"));
                    }
                    next.members.retain(|m| m.user != user);
                } else {
                    for m in next.members.iter_mut().filter(|m| m.user == user) {
                        m.role = GroupRole::Admin;
                    }
                }
            }
        }
        next.check_transition(Some(&current), &self.e.my_user)
            .map_err(|e| EngineError::usage(e.to_string()))?;
        let removed: Vec<GroupMember> = current
            .members
            .iter()
            .filter(|m| next.member(&m.user).is_none())
            .cloned()
            .collect();
        let conv = self.apply_group(&next, &removed)?;
        self.announce_group(&conv, &next, &removed)?;
        Ok(member_views(&next))
    }

    pub(super) fn member_user(
        &self,
        state: &GroupState,
        alias: &str,
    ) -> Result<UserId, EngineError> {
        if let Ok(c) = self.contact(alias)
            && state.member(&c.user_id).is_some()
        {
            return Ok(c.user_id);
        }
        if let Ok(u) = alias.parse::<UserId>()
            && state.member(&u).is_some()
        {
            return Ok(u);
        }
        state
            .members
            .iter()
            .find(|m| m.name.eq_ignore_ascii_case(alias))
            .map(|m| m.user)
            .ok_or_else(|| EngineError::usage(format!("{alias} is not a member of {}", state.name)))
    }

    pub(super) fn group_leave(&mut self, group: &str) -> EngineResult<LeftView> {
        let (_, current) = self.active_group(group)?;
        let next = current.without(&self.e.my_user, fresh_key()?);
        let me = current
            .member(&self.e.my_user)
            .cloned()
            .into_iter()
            .collect::<Vec<_>>();
        let conv = self.apply_group(&next, &me)?;
        self.announce_group(&conv, &next, &me)?;
        Ok(LeftView {
            conversation: conv.id.to_string(),
            left: true,
        })
    }

    /// Seals the new state to every device of old and new members and
    /// sends it (gossip for current members, direct for new ones).
    pub(super) fn announce_group(
        &mut self,
        conv: &Conv,
        state: &GroupState,
        removed: &[GroupMember],
    ) -> Result<(), EngineError> {
        let mut members: Vec<(DeviceId, [u8; 32])> = Vec::new();
        let mut leaving: Vec<(DeviceId, [u8; 32])> = Vec::new();
        for (list, of) in [(&mut members, &state.members[..]), (&mut leaving, removed)] {
            for d in of.iter().flat_map(|m| &m.devices) {
                if d.device != self.e.my_device && !list.iter().any(|(x, _)| *x == d.device) {
                    list.push((d.device, d.dh));
                }
            }
        }
        leaving.retain(|d| !members.contains(d));
        for (device, dh) in members.iter_mut().chain(leaving.iter_mut()) {
            *dh = self.sealing_key(device, *dh)?;
        }
        if !members.is_empty() {
            let env = self.seal_to(conv.id, &members, &Payload::Group(state.clone()))?;
            self.send_envelope(conv, &env, state.epoch, 0, false, Ack::Publish)?;
        }
        if !leaving.is_empty() {
            // Removed members must hear that they are out, but not the new
            // routing secret: they could follow the group's envelopes and
            // topic with it.
            let mut told = state.clone();
            told.routing = [0; 32];
            let env = self.seal_to(conv.id, &leaving, &Payload::Group(told))?;
            let mut them = conv.clone();
            let mut only_them = state.clone();
            only_them.members = removed.to_vec();
            them.group = Some(Arc::new(only_them));
            self.send_envelope(&them, &env, state.epoch, 0, false, Ack::Publish)?;
        }
        Ok(())
    }

    /// Stores a group state and updates the in-memory conversation.
    pub(super) fn apply_group(
        &mut self,
        state: &GroupState,
        _removed: &[GroupMember],
    ) -> Result<Conv, EngineError> {
        if self
            .e
            .convs
            .get(&state.id)
            .is_some_and(|c| c.kind != ConversationKind::Group)
        {
            return Err(EngineError::failed("not a group conversation"));
        }
        let now = now_ms();
        for m in &state.members {
            self.db.upsert_user(&m.user, &m.name, now)?;
            for d in &m.devices {
                // Received states are checked before (`receive_group`).
                if let Binding::OtherUser(owner) = self.bind_device(d)? {
                    tracing::warn!(device = %d.device, %owner, "group member's device belongs to another account");
                }
            }
        }
        self.db
            .update_conversation_state(&state.id, &state.name, state.epoch, &state.encode())?;
        let members: Vec<(UserId, Role)> = state
            .members
            .iter()
            .map(|m| (m.user, role_of(m.role)))
            .collect();
        self.db.set_members(&state.id, &members)?;
        self.devices_changed();
        let active = state.member(&self.e.my_user).is_some();
        // Every group change starts new sending chains (after a removal,
        // the removed member must not read on).
        let key_epoch = match self.e.convs.get(&state.id) {
            Some(c) if c.group.as_deref() == Some(state) => c.key_epoch,
            Some(c) => c.key_epoch.saturating_add(1),
            None => 1,
        };
        self.db.set_key_epoch(&state.id, key_epoch)?;
        let routing = state.routing();
        self.db
            .set_routing(&state.id, &routing.topic(), &routing.tag())?;
        let conv = Conv {
            id: state.id,
            kind: ConversationKind::Group,
            topic: routing.topic(),
            tag: Some(routing.tag()),
            epoch: state.epoch,
            key_epoch,
            members: state.members.iter().map(|m| m.user).collect(),
            group: Some(Arc::new(state.clone())),
            active,
        };
        // The topic moves with the routing secret: leave the old one, join
        // the new one (while still a member; a repeated subscription is a
        // no-op).
        let joined = active && self.e.convs.get(&state.id).is_none_or(|c| !c.active);
        // Devices of members added since the state this device held: they
        // are handed its handout key (one that joins has none of ours).
        let known: HashSet<DeviceId> = self
            .e
            .convs
            .get(&state.id)
            .and_then(|c| c.group.as_deref())
            .into_iter()
            .flat_map(|g| {
                g.members
                    .iter()
                    .flat_map(|m| m.devices.iter().map(|d| d.device))
            })
            .collect();
        let added: Vec<(DeviceId, [u8; 32])> = state
            .members
            .iter()
            .flat_map(|m| &m.devices)
            .filter(|d| d.device != self.e.my_device && !known.contains(&d.device))
            .map(|d| (d.device, d.dh))
            .collect();
        if let Some(old) = self.e.convs.get(&state.id)
            && old.active
            && (!active || old.topic != conv.topic)
        {
            self.fx
                .push(Effect::Net(NetCommand::Unsubscribe(old.topic.clone())));
        }
        self.add_conv(conv.clone());
        if joined {
            self.hand_out_in(&conv)?;
        } else if active {
            self.hand_out_to_new_members(&conv, &added)?;
        }
        self.fx.push(Effect::Event(Event::Member {
            conversation: state.id.to_string(),
            name: state.name.clone(),
            epoch: state.epoch,
            members: member_views(state),
            active,
        }));
        Ok(conv)
    }
}

//! This account's private state, merged between its own devices only
//! (`weft_crdt::AccountState`): contacts with their invites, blocks, read
//! positions and presence privacy.
//!
//! A local change (`contact add`, `block`, `read`, `privacy`, ...) is
//! written to the store as before and to the document, and the document's
//! change goes, chain-sealed, into the account's own conversation: a
//! hidden conversation whose only member is this user, so its recipients
//! are the account's other devices and nothing else (gossip, outbox,
//! relays and catch-up carry it like any message). A change from another
//! device is checked (shape, and that its actor is the sending device),
//! merged, and at the end of the batch the store is brought in line with
//! the merged document. The document is saved with the annotation shards
//! (conversation: the account's own, period 0).

use std::collections::{HashMap, HashSet};

use weft_crdt::{AccountState, CrdtError, Inspected};

use crate::ids::{ConversationId, DeviceId, UserId};
use crate::node::now_ms;
use crate::payload::Payload;
use crate::payload::{AccountChange, MAX_CHANGE_BYTES};
use crate::store::{ConversationRecord, Db, PendingAnnotation, Role, meta};

use super::EngineError;
use super::{Ack, Conv, Share, State};
use crate::node::NodeError;

/// What account changes waiting for earlier ones are kept under.
const ACCOUNT_WAITS_FOR: &[u8] = b"account";
/// Read positions kept in memory.
const READ_POSITIONS: usize = 4096;
/// The account document's slot in the shards table.
const ACCOUNT_PERIOD: u64 = 0;

/// The account's own conversation: this user with itself.
pub(super) fn account_conversation(user: &UserId) -> ConversationId {
    ConversationId::direct(user, user)
}

/// A new account conversation: its record and its in-memory form. Its
/// routing secret derives from the account key, which only the account's
/// devices hold.
pub(super) fn new_account_conversation(
    identity: &crate::identity::Identity,
) -> Result<(ConversationRecord, Conv), NodeError> {
    let user = identity.user_id();
    let id = account_conversation(&user);
    let routing = crate::routing::Routing::direct(
        identity.account_dh_secret(),
        &user,
        &identity.certificate().account_dh,
        &user,
    )
    .map_err(|e| NodeError::Corrupt(format!("account key: {e}")))?;
    Ok((
        ConversationRecord::direct(id, "", &routing, now_ms()),
        Conv::direct(id, vec![user], &routing),
    ))
}

/// Gives a device that has no account document yet (made before there
/// was one) a first one: what its store holds, written as its own changes
/// (not sent: each device seeds its own, and merging keeps both).
pub(super) fn seed_account(
    db: &Db<'_>,
    user: &UserId,
    device: &DeviceId,
    share: Option<&str>,
) -> Result<(), NodeError> {
    let conv = account_conversation(user);
    if db.shard(&conv, ACCOUNT_PERIOD)?.is_some() {
        return Ok(());
    }
    let failed = |e: CrdtError| NodeError::Corrupt(format!("account state: {e}"));
    let mut doc = AccountState::new(&device.0);
    for c in db.contacts()? {
        doc.add_contact(&c.user_id.0, &c.alias, &c.invite)
            .map_err(failed)?;
        if c.blocked {
            doc.block(&c.user_id.0, true).map_err(failed)?;
        }
    }
    if let Some(share) = share {
        doc.set_privacy(share).map_err(failed)?;
    }
    db.put_shard(&conv, ACCOUNT_PERIOD, &doc.save())?;
    Ok(())
}

fn crdt_failed(e: CrdtError) -> EngineError {
    EngineError::failed(format!("account state: {e}"))
}

/// The account's private state (loaded when first needed), whether it
/// changed since it was saved, and the read positions last read from it.
#[derive(Default)]
pub(super) struct AccountCache {
    /// The account's private state (loaded when first needed), and
    /// whether it changed since it was saved.
    doc: Option<weft_crdt::AccountState>,
    dirty: bool,
    /// The account's read position per conversation, as last read from it.
    read_positions: HashMap<ConversationId, u64>,
}

impl AccountCache {
    /// The document changed: to be saved, and its read positions read
    /// again.
    fn changed(&mut self) {
        self.dirty = true;
        self.read_positions.clear();
    }

    /// Whether it changed since this was last asked.
    fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.dirty)
    }

    /// A read position asked before, if the document did not change since.
    fn read_position(&self, conv: &ConversationId) -> Option<u64> {
        self.read_positions.get(conv).copied()
    }

    /// Keeps a read position (at most [`READ_POSITIONS`]).
    fn keep_read_position(&mut self, conv: ConversationId, at: u64) {
        if self.read_positions.len() >= READ_POSITIONS {
            self.read_positions.clear();
        }
        self.read_positions.insert(conv, at);
    }

    /// Drops the document and all taken from it: the next use loads it
    /// from the store again.
    pub(super) fn forget(&mut self) {
        self.doc = None;
        self.dirty = false;
        self.read_positions.clear();
    }
}

impl State<'_, '_> {
    /// The account document, loaded if needed.
    fn account(&mut self) -> Result<&mut AccountState, EngineError> {
        if self.e.account.doc.is_none() {
            let conv = account_conversation(&self.e.my_user);
            let device = self.e.my_device.0;
            let doc = match self.db.shard(&conv, ACCOUNT_PERIOD)? {
                Some(bytes) => AccountState::load(&bytes, &device).map_err(crdt_failed)?,
                None => AccountState::new(&device),
            };
            self.e.account.doc = Some(doc);
        }
        self.e
            .account
            .doc
            .as_mut()
            .ok_or_else(|| EngineError::failed("account state vanished"))
    }

    /// The account's own conversation, created (hidden) if new.
    fn ensure_account_conversation(&mut self) -> Result<Conv, EngineError> {
        let id = account_conversation(&self.e.my_user);
        if let Some(conv) = self.e.convs.get(&id) {
            return Ok(conv.clone());
        }
        let (record, conv) = new_account_conversation(&self.e.identity)?;
        self.db.insert_conversation(&record)?;
        self.db
            .set_members(&id, &[(self.e.my_user, Role::Member)])?;
        self.add_conv(conv.clone());
        Ok(conv)
    }

    /// Makes a local change to the account state and sends it to the
    /// account's other devices. `change` returns the change's bytes, or
    /// `None` if nothing changed.
    pub(super) fn change_account(
        &mut self,
        change: impl FnOnce(&mut AccountState) -> Result<Option<Vec<u8>>, CrdtError>,
    ) -> Result<(), EngineError> {
        let Some(bytes) = change(self.account()?).map_err(crdt_failed)? else {
            return Ok(());
        };
        self.account_changed();
        // The store follows the document here too: a change made beside
        // concurrent ones (a block kept across a removal, say) must show
        // as the merge says, as on every other device.
        self.account_merged = true;
        let conv = self.ensure_account_conversation()?;
        if self.recipients(&conv)?.devices.is_empty() {
            // No other device yet: a device linked later gets the whole
            // document with its history.
            return Ok(());
        }
        let payload = Payload::Account(AccountChange { change: bytes });
        let (env, counter, early) = self.seal_chain_message(&conv, &payload.encode())?;
        self.send_envelope(&conv, &env, conv.key_epoch, counter, early, Ack::Publish)?;
        Ok(())
    }

    /// A change from another device of this account. `Err` for a change
    /// to refuse (and penalise).
    pub(super) fn receive_account_change(
        &mut self,
        device: DeviceId,
        a: AccountChange,
    ) -> Result<(), &'static str> {
        if a.change.len() > MAX_CHANGE_BYTES {
            return Err("account change too large");
        }
        let inspected = AccountState::inspect(&a.change).map_err(|_| "malformed account change")?;
        if inspected.actor != device.0 {
            return Err("account change not by its sending device");
        }
        match self.apply_account_change(device, inspected, &a) {
            Ok(()) => Ok(()),
            Err(e) => {
                tracing::warn!("account change not applied: {e:?}");
                Ok(())
            }
        }
    }

    fn apply_account_change(
        &mut self,
        device: DeviceId,
        inspected: Inspected,
        a: &AccountChange,
    ) -> Result<(), EngineError> {
        let doc = self.account()?;
        if !doc.doc().has_deps_given(&inspected, &HashSet::new()) {
            // It builds on changes not here yet: kept on disk until they are.
            let pending = PendingAnnotation {
                author: self.e.my_user,
                device,
                payload: Payload::Account(a.clone()).encode(),
            };
            self.db
                .add_pending_annotation(ACCOUNT_WAITS_FOR, &pending, now_ms())?;
            return Ok(());
        }
        if doc.apply(inspected).map_err(crdt_failed)? {
            self.account_changed();
            self.account_merged = true;
            // What waited for this change may apply now.
            for p in self.db.take_pending_annotations(ACCOUNT_WAITS_FOR)? {
                if let Some(Payload::Account(a)) = Payload::decode(&p.payload)
                    && let Err(why) = self.receive_account_change(p.device, a)
                {
                    tracing::debug!("a waiting account change is refused: {why}");
                }
            }
        }
        Ok(())
    }

    /// The document changed: to be saved, and its read positions read
    /// again.
    fn account_changed(&mut self) {
        self.e.account.changed();
    }

    /// How far the account has read `conv` (0: not at all). Asked for
    /// every message received, so kept until the document changes.
    pub(super) fn read_position(&mut self, conv: &ConversationId) -> u64 {
        if let Some(at) = self.e.account.read_position(conv) {
            return at;
        }
        let at = match self.account() {
            Ok(a) => a.read_up_to(&conv.0),
            Err(_) => return 0,
        };
        self.e.account.keep_read_position(*conv, at);
        at
    }

    /// Merges a whole document (from a history page).
    pub(super) fn merge_account(&mut self, saved: &[u8]) -> Result<(), EngineError> {
        self.account()?
            .doc()
            .merge_saved(saved)
            .map_err(crdt_failed)?;
        self.account_changed();
        self.account_merged = true;
        Ok(())
    }

    /// The saved document, for a history page.
    pub(super) fn account_bytes(&mut self) -> Result<Vec<u8>, EngineError> {
        Ok(self.account()?.save())
    }

    /// End of batch: brings the store in line with what other devices
    /// changed, then saves the document.
    pub(super) fn flush_account(&mut self) {
        if std::mem::take(&mut self.account_merged)
            && let Err(e) = self.materialize_account()
        {
            tracing::warn!("account state not applied: {e:?}");
        }
        if !self.e.account.take_changed() {
            return;
        }
        let conv = account_conversation(&self.e.my_user);
        let Some(doc) = self.e.account.doc.as_mut() else {
            return;
        };
        let written = match doc.doc().persist() {
            weft_crdt::Persist::Nothing => Ok(()),
            weft_crdt::Persist::Whole(bytes) => self.db.put_shard(&conv, ACCOUNT_PERIOD, &bytes),
            weft_crdt::Persist::Append(bytes) => {
                self.db.append_shard(&conv, ACCOUNT_PERIOD, &bytes)
            }
        };
        if let Err(e) = written {
            tracing::error!("cannot save the account state: {e}");
            self.e.account.forget();
        }
    }

    /// Makes contacts, blocks, privacy and read positions in the store
    /// what the merged document says.
    fn materialize_account(&mut self) -> Result<(), EngineError> {
        let view = self.account()?.view();
        // Contacts the document no longer has go; those it has come in
        // from their invites.
        for c in self.db.contacts()? {
            if !view.contacts.contains_key(&weft_crdt::hex(&c.user_id.0)) {
                self.db.remove_contact(&c.user_id)?;
                self.e.directory.blocked.remove(&c.user_id);
            }
        }
        for (user, entry) in &view.contacts {
            let Some(user) = weft_crdt::unhex(user)
                .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
                .map(UserId)
            else {
                continue;
            };
            if self.db.contact(&user)?.is_some() {
                continue;
            }
            let Some(invite) = &entry.invite else {
                continue;
            };
            let alias = match self.db.contact_by_alias(&entry.alias)? {
                // Two devices gave one alias to two people: the later
                // import tells them apart.
                Some(_) => format!("{}-{}", entry.alias, &user.to_string()[..6]),
                None => entry.alias.clone(),
            };
            if let Err(e) = self.import_contact(invite, &alias) {
                tracing::warn!("a contact from another device not imported: {e:?}");
            }
        }
        for c in self.db.contacts()? {
            let blocked = view.blocked.contains(&weft_crdt::hex(&c.user_id.0));
            if blocked != c.blocked {
                self.db.set_blocked(&c.user_id, blocked)?;
            }
            if blocked {
                self.e.directory.blocked.insert(c.user_id);
            } else {
                self.e.directory.blocked.remove(&c.user_id);
            }
        }
        if let Some(share) = view.privacy.as_deref().and_then(Share::parse)
            && share != self.e.presence.share
        {
            self.db
                .set_meta(meta::PRESENCE_SHARE, share.as_str().as_bytes())?;
            self.e.presence.share = share;
        }
        for (conv, settings) in &view.conversations {
            let Some(conv) = weft_crdt::unhex(conv)
                .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
                .map(ConversationId)
            else {
                continue;
            };
            if settings.read_up_to > 0 && self.e.convs.contains_key(&conv) {
                self.db
                    .read_up_to(&conv, &self.e.my_user, settings.read_up_to)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_positions_are_kept_until_the_document_changes() {
        let mut cache = AccountCache::default();
        let conv = ConversationId([1; 32]);
        cache.keep_read_position(conv, 42);
        assert_eq!(cache.read_position(&conv), Some(42));
        assert!(!cache.take_changed());
        cache.changed();
        assert_eq!(cache.read_position(&conv), None);
        assert!(cache.take_changed());
        assert!(!cache.take_changed(), "saved once");
    }

    #[test]
    fn at_most_read_positions_are_kept() {
        let mut cache = AccountCache::default();
        for i in 0..=READ_POSITIONS {
            let mut id = [0u8; 32];
            id[..8].copy_from_slice(&(i as u64).to_le_bytes());
            cache.keep_read_position(ConversationId(id), 1);
        }
        assert!(cache.read_positions.len() <= READ_POSITIONS);
    }
}

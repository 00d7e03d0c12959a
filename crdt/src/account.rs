//! [`AccountState`]: a user's private state, merged between the account's
//! own devices only (never shared with contacts or relays).
//!
//! Keys of the flat document (ids in lowercase hex):
//!
//! | key | value | meaning |
//! |---|---|---|
//! | `c/<user>` | string: alias, newline, invite | a contact; removed to remove it |
//! | `b/<user>` | `true`; removed to unblock | blocked |
//! | `m/<conversation>` | bool | muted |
//! | `a/<conversation>` | bool | archived |
//! | `rp/<conversation>/<device>` | uint (HLC) | read up to, per device |
//! | `privacy` | string | who sees presence |
//!
//! (Any key may also come as a deletion: automerge writes a value that one
//! of a key's concurrent values already holds that way.)
//!
//! A contact added on one device while removed on another stays (an add
//! concurrent with a removal wins: automerge's removal only removes the
//! values it saw). Each device writes only its own read position, and the
//! account's is the greatest, so reading on any device counts everywhere.

use std::collections::BTreeMap;

use automerge::ScalarValue;

use crate::flat::{FlatDoc, Inspected, TouchKind};
use crate::{CrdtError, hex};

/// A contact as the account's devices agree on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContactEntry {
    pub alias: String,
    /// The invite it was added from: another device imports the contact
    /// from it.
    pub invite: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConversationSettings {
    pub muted: bool,
    pub archived: bool,
    /// Read up to this HLC (the greatest of the devices').
    pub read_up_to: u64,
}

/// The whole state, materialised.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AccountView {
    pub contacts: BTreeMap<String, ContactEntry>,
    pub blocked: std::collections::BTreeSet<String>,
    pub conversations: BTreeMap<String, ConversationSettings>,
    pub privacy: Option<String>,
}

#[derive(Debug)]
pub struct AccountState {
    doc: FlatDoc,
    device: Vec<u8>,
}

impl AccountState {
    pub fn new(device: &[u8]) -> Self {
        Self {
            doc: FlatDoc::new(device),
            device: device.to_vec(),
        }
    }

    pub fn load(bytes: &[u8], device: &[u8]) -> Result<Self, CrdtError> {
        Ok(Self {
            doc: FlatDoc::load(bytes, device)?,
            device: device.to_vec(),
        })
    }

    pub fn save(&mut self) -> Vec<u8> {
        self.doc.save()
    }

    pub fn doc(&mut self) -> &mut FlatDoc {
        &mut self.doc
    }

    /// The change made, or `None` if nothing changed (the state already
    /// said so).
    fn commit(&mut self) -> Result<Option<Vec<u8>>, CrdtError> {
        Ok(self.doc.commit())
    }

    pub fn add_contact(
        &mut self,
        user: &[u8],
        alias: &str,
        invite: &str,
    ) -> Result<Option<Vec<u8>>, CrdtError> {
        // One value, so that alias and invite always travel together (an
        // alias contains no newline).
        self.doc
            .put(&format!("c/{}", hex(user)), format!("{alias}\n{invite}"))?;
        self.commit()
    }

    /// Removes a contact, and the block on them with it (a block belongs
    /// to a contact: adding them again starts unblocked).
    pub fn remove_contact(&mut self, user: &[u8]) -> Result<Option<Vec<u8>>, CrdtError> {
        self.doc.delete(&format!("c/{}", hex(user)))?;
        self.doc.delete(&format!("b/{}", hex(user)))?;
        self.commit()
    }

    /// The account's read position in a conversation (the greatest of its
    /// devices').
    pub fn read_up_to(&self, conversation: &[u8]) -> u64 {
        self.doc
            .keys_with_prefix(&format!("rp/{}/", hex(conversation)))
            .into_iter()
            .filter_map(|k| match self.doc.get(&k) {
                Some(ScalarValue::Uint(h)) => Some(h),
                _ => None,
            })
            .max()
            .unwrap_or(0)
    }

    pub fn block(&mut self, user: &[u8], blocked: bool) -> Result<Option<Vec<u8>>, CrdtError> {
        let key = format!("b/{}", hex(user));
        if blocked {
            self.doc.put(&key, true)?;
        } else {
            self.doc.delete(&key)?;
        }
        self.commit()
    }

    pub fn set_muted(
        &mut self,
        conversation: &[u8],
        on: bool,
    ) -> Result<Option<Vec<u8>>, CrdtError> {
        self.doc.put(&format!("m/{}", hex(conversation)), on)?;
        self.commit()
    }

    pub fn set_archived(
        &mut self,
        conversation: &[u8],
        on: bool,
    ) -> Result<Option<Vec<u8>>, CrdtError> {
        self.doc.put(&format!("a/{}", hex(conversation)), on)?;
        self.commit()
    }

    /// This device read `conversation` up to `hlc`; `None` if it had read
    /// that far already (nothing to send).
    pub fn mark_read(
        &mut self,
        conversation: &[u8],
        hlc: u64,
    ) -> Result<Option<Vec<u8>>, CrdtError> {
        let key = format!("rp/{}/{}", hex(conversation), hex(&self.device));
        if matches!(self.doc.get(&key), Some(ScalarValue::Uint(h)) if h >= hlc) {
            return Ok(None);
        }
        self.doc.put(&key, ScalarValue::Uint(hlc))?;
        self.commit()
    }

    pub fn set_privacy(&mut self, share: &str) -> Result<Option<Vec<u8>>, CrdtError> {
        self.doc.put("privacy", share)?;
        self.commit()
    }

    /// Decodes a change from another device of the account and checks its
    /// shape; a read position may only be the writing device's own. The
    /// caller checks that the actor is one of the account's devices.
    pub fn inspect(bytes: &[u8]) -> Result<Inspected, CrdtError> {
        let inspected = FlatDoc::inspect(bytes)?;
        let actor = hex(&inspected.actor);
        for touch in &inspected.touches {
            let ok = match (
                touch.key.split('/').collect::<Vec<_>>().as_slice(),
                &touch.kind,
            ) {
                (["c", _], TouchKind::Put(ScalarValue::Str(_)) | TouchKind::Delete) => true,
                (["b", _], TouchKind::Put(ScalarValue::Boolean(true)) | TouchKind::Delete) => true,
                (["m" | "a", _], TouchKind::Put(ScalarValue::Boolean(_)) | TouchKind::Delete) => {
                    true
                }
                (["rp", _, device], TouchKind::Put(ScalarValue::Uint(_)) | TouchKind::Delete) => {
                    *device == actor
                }
                (["privacy"], TouchKind::Put(ScalarValue::Str(_)) | TouchKind::Delete) => true,
                _ => false,
            };
            if !ok {
                return Err(CrdtError::Refused(format!(
                    "not an account-state write: {touch:?}"
                )));
            }
        }
        Ok(inspected)
    }

    pub fn apply(&mut self, change: Inspected) -> Result<bool, CrdtError> {
        self.doc.apply(change)
    }

    /// Is `user` blocked?
    pub fn is_blocked(&self, user: &[u8]) -> bool {
        self.doc.get(&format!("b/{}", hex(user))).is_some()
    }

    pub fn view(&self) -> AccountView {
        let mut v = AccountView::default();
        for key in self.doc.keys_with_prefix("c/") {
            if let Some(ScalarValue::Str(value)) = self.doc.get(&key) {
                let (alias, invite) = match value.split_once('\n') {
                    Some((alias, invite)) => (alias, Some(invite.to_string())),
                    None => (value.as_str(), None),
                };
                v.contacts.insert(
                    key[2..].to_string(),
                    ContactEntry {
                        alias: alias.to_string(),
                        invite,
                    },
                );
            }
        }
        v.blocked = self
            .doc
            .keys_with_prefix("b/")
            .into_iter()
            .map(|k| k[2..].to_string())
            .collect();
        for (prefix, muted) in [("m/", true), ("a/", false)] {
            for key in self.doc.keys_with_prefix(prefix) {
                let on = matches!(self.doc.get(&key), Some(ScalarValue::Boolean(true)));
                let entry = v.conversations.entry(key[2..].to_string()).or_default();
                if muted {
                    entry.muted = on;
                } else {
                    entry.archived = on;
                }
            }
        }
        for key in self.doc.keys_with_prefix("rp/") {
            let Some((conv, _device)) = key[3..].split_once('/') else {
                continue;
            };
            if let Some(ScalarValue::Uint(hlc)) = self.doc.get(&key) {
                let entry = v.conversations.entry(conv.to_string()).or_default();
                entry.read_up_to = entry.read_up_to.max(hlc);
            }
        }
        v.privacy = match self.doc.get("privacy") {
            Some(ScalarValue::Str(s)) => Some(s.to_string()),
            _ => None,
        };
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOB: &[u8] = &[0xb0; 32];
    const CONV: &[u8] = &[3; 16];

    fn exchange(a: &mut AccountState, b: &mut AccountState) -> Result<(), CrdtError> {
        let (ha, hb) = (a.doc().heads(), b.doc().heads());
        for c in a.doc().changes_since(&hb) {
            b.apply(AccountState::inspect(&c)?)?;
        }
        for c in b.doc().changes_since(&ha) {
            a.apply(AccountState::inspect(&c)?)?;
        }
        Ok(())
    }

    #[test]
    fn an_add_concurrent_with_a_removal_wins() -> Result<(), CrdtError> {
        let mut phone = AccountState::new(b"phone");
        let mut laptop = AccountState::new(b"laptop");
        phone.add_contact(BOB, "bob", "weft1bob")?;
        exchange(&mut phone, &mut laptop)?;
        phone.remove_contact(BOB)?;
        laptop.add_contact(BOB, "bobby", "weft1bob")?;
        exchange(&mut phone, &mut laptop)?;
        assert_eq!(phone.view(), laptop.view());
        assert_eq!(phone.view().contacts[&hex(BOB)].alias, "bobby");
        assert_eq!(
            phone.view().contacts[&hex(BOB)].invite.as_deref(),
            Some("weft1bob")
        );
        Ok(())
    }

    #[test]
    fn read_positions_take_the_greatest_and_blocks_merge() -> Result<(), CrdtError> {
        let mut phone = AccountState::new(b"phone");
        let mut laptop = AccountState::new(b"laptop");
        assert!(phone.mark_read(CONV, 50)?.is_some());
        assert!(phone.mark_read(CONV, 40)?.is_none(), "never backwards");
        laptop.mark_read(CONV, 70)?;
        laptop.block(BOB, true)?;
        phone.set_muted(CONV, true)?;
        exchange(&mut phone, &mut laptop)?;
        let v = phone.view();
        assert_eq!(v, laptop.view());
        let c = &v.conversations[&hex(CONV)];
        assert_eq!((c.read_up_to, c.muted, c.archived), (70, true, false));
        assert_eq!(phone.read_up_to(CONV), 70);
        assert!(phone.is_blocked(BOB));
        Ok(())
    }

    #[test]
    fn a_device_cannot_write_another_devices_read_position() -> Result<(), CrdtError> {
        let mut forger = FlatDoc::new(b"laptop");
        forger.put(
            &format!("rp/{}/{}", hex(CONV), hex(b"phone")),
            ScalarValue::Uint(9),
        )?;
        let change = forger.commit().unwrap_or_default();
        assert!(matches!(
            AccountState::inspect(&change),
            Err(CrdtError::Refused(_))
        ));
        Ok(())
    }
}

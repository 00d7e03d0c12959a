//! Users, their device certificates, and the contact list.

use rusqlite::{Row, params};

use super::{Db, StoreError, id_at};
use crate::ids::{DeviceId, UserId};

/// A device certificate of some user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRecord {
    pub device_id: DeviceId,
    pub user_id: UserId,
    pub cert: Vec<u8>,
    pub revoked: bool,
}

impl DeviceRecord {
    fn from_row(row: &Row<'_>) -> Result<Self, StoreError> {
        Ok(DeviceRecord {
            device_id: id_at(row, 0)?,
            user_id: id_at(row, 1)?,
            cert: row.get(2)?,
            revoked: row.get(3)?,
        })
    }
}

/// What [`Db::bind_device`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binding {
    /// The device was not known: it is bound to the user now.
    New,
    /// Already bound to the same user (its certificate is refreshed).
    Known,
    /// Bound to another user: nothing changed.
    OtherUser(UserId),
}

/// Someone in the contact list, under a local alias.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contact {
    pub user_id: UserId,
    /// Unique ignoring ASCII case.
    pub alias: String,
    /// The invite they were added from.
    pub invite: String,
    pub blocked: bool,
    pub added_at_ms: i64,
}

impl Contact {
    fn from_row(row: &Row<'_>) -> Result<Self, StoreError> {
        Ok(Contact {
            user_id: id_at(row, 0)?,
            alias: row.get(1)?,
            invite: row.get(2)?,
            blocked: row.get(3)?,
            added_at_ms: row.get(4)?,
        })
    }
}

macro_rules! select_devices {
    ($rest:literal) => {
        concat!(
            "SELECT device_id, user_id, cert, revoked FROM devices ",
            $rest
        )
    };
}

macro_rules! select_contacts {
    ($rest:literal) => {
        concat!(
            "SELECT user_id, alias, invite, blocked, added_at FROM contacts ",
            $rest
        )
    };
}

impl Db<'_> {
    pub fn upsert_user(&self, user: &UserId, name: &str, now_ms: i64) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO users (user_id, display_name, updated_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (user_id) DO UPDATE
             SET display_name = excluded.display_name, updated_at = excluded.updated_at",
            params![user.0, name, now_ms],
        )?;
        Ok(())
    }

    pub fn user_name(&self, user: &UserId) -> Result<Option<String>, StoreError> {
        self.query_opt(
            "SELECT display_name FROM users WHERE user_id = ?1",
            [user.0],
            |row| Ok(row.get(0)?),
        )
    }

    /// Records when a device of the user was last heard from (presence).
    /// Creates no user: only known users have a presence.
    pub fn set_last_seen(&self, user: &UserId, at_ms: i64) -> Result<(), StoreError> {
        self.execute(
            "UPDATE users SET last_seen = max(coalesce(last_seen, 0), ?2) WHERE user_id = ?1",
            params![user.0, at_ms],
        )?;
        Ok(())
    }

    pub fn last_seen(&self, user: &UserId) -> Result<Option<i64>, StoreError> {
        Ok(self
            .query_opt(
                "SELECT last_seen FROM users WHERE user_id = ?1",
                [user.0],
                |row| Ok(row.get::<_, Option<i64>>(0)?),
            )?
            .flatten())
    }

    /// Records a device's certificate for `user`. A device belongs to the
    /// account it was first bound to, for good: a certificate naming
    /// another account changes nothing and is answered with that account
    /// ([`Binding::OtherUser`]). A revoked device stays revoked:
    /// re-learning its certificate does not bring it back.
    pub fn bind_device(
        &self,
        device: &DeviceId,
        user: &UserId,
        cert: &[u8],
    ) -> Result<Binding, StoreError> {
        match self.device(device)? {
            Some(d) if d.user_id != *user => Ok(Binding::OtherUser(d.user_id)),
            Some(_) => {
                self.execute(
                    "UPDATE devices SET cert = ?2, cert_version = 2 WHERE device_id = ?1",
                    params![device.0, cert],
                )?;
                Ok(Binding::Known)
            }
            None => {
                self.execute(
                    "INSERT INTO devices (device_id, user_id, cert) VALUES (?1, ?2, ?3)",
                    params![device.0, user.0, cert],
                )?;
                Ok(Binding::New)
            }
        }
    }

    /// Marks a known device of `user` revoked for good. False if it is not
    /// a device of `user` that this store holds, or was revoked already.
    pub fn revoke_device(&self, device: &DeviceId, user: &UserId) -> Result<bool, StoreError> {
        let changed = self.execute(
            "UPDATE devices SET revoked = 1
             WHERE device_id = ?1 AND user_id = ?2 AND revoked = 0",
            params![device.0, user.0],
        )?;
        Ok(changed > 0)
    }

    /// Keeps a revocation (its encoded bytes) of a device not known yet,
    /// under the account that signed it; at most `cap` are kept (the
    /// oldest go first).
    pub fn add_pending_revocation(
        &self,
        user: &UserId,
        device: &DeviceId,
        revocation: &[u8],
        cap: usize,
    ) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO pending_revocations (user_id, device_id, revocation) VALUES (?1, ?2, ?3)
             ON CONFLICT DO NOTHING",
            params![user.0, device.0, revocation],
        )?;
        self.execute(
            "DELETE FROM pending_revocations WHERE rowid NOT IN
             (SELECT rowid FROM pending_revocations ORDER BY rowid DESC LIMIT ?1)",
            [super::sql_limit(cap)],
        )?;
        Ok(())
    }

    /// Takes the revocation waiting for `user`'s `device`, if any.
    pub fn take_pending_revocation(
        &self,
        user: &UserId,
        device: &DeviceId,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let found = self.query_opt(
            "SELECT revocation FROM pending_revocations WHERE user_id = ?1 AND device_id = ?2",
            params![user.0, device.0],
            |row| Ok(row.get::<_, Vec<u8>>(0)?),
        )?;
        if found.is_some() {
            self.execute(
                "DELETE FROM pending_revocations WHERE user_id = ?1 AND device_id = ?2",
                params![user.0, device.0],
            )?;
        }
        Ok(found)
    }

    /// Forgets devices recorded with no certificate (revocations of
    /// unknown devices, under the old rule), except `keep`. Returns how
    /// many.
    pub fn forget_uncertified_devices(&self, keep: &DeviceId) -> Result<usize, StoreError> {
        self.execute(
            "DELETE FROM devices WHERE length(cert) = 0 AND cert_version = 2 AND device_id != ?1",
            [keep.0],
        )
    }

    /// The user's devices that are not revoked.
    pub fn devices_of_user(&self, user: &UserId) -> Result<Vec<DeviceRecord>, StoreError> {
        self.query_vec(
            select_devices!("WHERE user_id = ?1 AND revoked = 0 ORDER BY device_id"),
            [user.0],
            DeviceRecord::from_row,
        )
    }

    /// Every device that is not revoked, as (device, user), at most `limit`.
    pub fn all_devices(&self, limit: usize) -> Result<Vec<(DeviceId, UserId)>, StoreError> {
        self.query_vec(
            "SELECT device_id, user_id FROM devices WHERE revoked = 0 LIMIT ?1",
            [super::sql_limit(limit)],
            |row| Ok((super::id_at(row, 0)?, super::id_at(row, 1)?)),
        )
    }

    /// Revoked devices, at most `limit`.
    pub fn revoked_devices(&self, limit: usize) -> Result<Vec<DeviceId>, StoreError> {
        self.query_vec(
            "SELECT device_id FROM devices WHERE revoked = 1 LIMIT ?1",
            [super::sql_limit(limit)],
            |row| super::id_at(row, 0),
        )
    }

    /// A device, revoked or not.
    pub fn device(&self, device: &DeviceId) -> Result<Option<DeviceRecord>, StoreError> {
        self.query_opt(
            select_devices!("WHERE device_id = ?1"),
            [device.0],
            DeviceRecord::from_row,
        )
    }

    /// Adds a contact; neither the user nor the alias (ignoring ASCII case)
    /// may be in the list already.
    pub fn insert_contact(&self, contact: &Contact) -> Result<(), StoreError> {
        if self.contact(&contact.user_id)?.is_some() {
            return Err(StoreError::AlreadyContact);
        }
        if self.contact_by_alias(&contact.alias)?.is_some() {
            return Err(StoreError::AliasTaken(contact.alias.clone()));
        }
        self.execute(
            "INSERT INTO contacts (user_id, alias, invite, blocked, added_at)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                contact.user_id.0,
                contact.alias,
                contact.invite,
                contact.blocked,
                contact.added_at_ms
            ],
        )?;
        Ok(())
    }

    /// The contact with this alias, ignoring ASCII case.
    pub fn contact_by_alias(&self, alias: &str) -> Result<Option<Contact>, StoreError> {
        self.query_opt(
            select_contacts!("WHERE alias = ?1"),
            [alias],
            Contact::from_row,
        )
    }

    pub fn contact(&self, user: &UserId) -> Result<Option<Contact>, StoreError> {
        self.query_opt(
            select_contacts!("WHERE user_id = ?1"),
            [user.0],
            Contact::from_row,
        )
    }

    /// All contacts, by alias ignoring ASCII case.
    pub fn contacts(&self) -> Result<Vec<Contact>, StoreError> {
        self.query_vec(
            select_contacts!("ORDER BY alias, user_id"),
            [],
            Contact::from_row,
        )
    }

    /// False if the user was not a contact.
    pub fn remove_contact(&self, user: &UserId) -> Result<bool, StoreError> {
        Ok(self.execute("DELETE FROM contacts WHERE user_id = ?1", [user.0])? > 0)
    }

    /// False if the user is not a contact.
    pub fn set_blocked(&self, user: &UserId, blocked: bool) -> Result<bool, StoreError> {
        let changed = self.execute(
            "UPDATE contacts SET blocked = ?2 WHERE user_id = ?1",
            params![user.0, blocked],
        )?;
        Ok(changed > 0)
    }

    /// Whether the user is a blocked contact (a stranger is not blocked).
    pub fn is_blocked(&self, user: &UserId) -> Result<bool, StoreError> {
        let blocked = self.query_opt(
            "SELECT blocked FROM contacts WHERE user_id = ?1",
            [user.0],
            |row| Ok(row.get::<_, bool>(0)?),
        )?;
        Ok(blocked.unwrap_or(false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    fn contact(n: u8, alias: &str) -> Contact {
        Contact {
            user_id: UserId([n; 32]),
            alias: alias.to_owned(),
            invite: format!("weft:invite:{n}"),
            blocked: false,
            added_at_ms: i64::from(n),
        }
    }

    #[test]
    fn user_names_are_upserted() -> Result<(), StoreError> {
        let store = Store::open_in_memory()?;
        let db = store.db();
        let user = UserId([1; 32]);
        assert_eq!(db.user_name(&user)?, None);
        db.upsert_user(&user, "Ada", 1)?;
        db.upsert_user(&user, "Ada L.", 2)?;
        assert_eq!(db.user_name(&user)?.as_deref(), Some("Ada L."));
        Ok(())
    }

    #[test]
    fn revoked_devices_stay_revoked() -> Result<(), StoreError> {
        let store = Store::open_in_memory()?;
        let db = store.db();
        let user = UserId([1; 32]);
        let (phone, laptop) = (DeviceId([2; 32]), DeviceId([3; 32]));
        assert_eq!(db.bind_device(&phone, &user, b"phone cert")?, Binding::New);
        db.bind_device(&laptop, &user, b"laptop cert")?;
        assert_eq!(db.devices_of_user(&user)?.len(), 2);

        assert!(db.revoke_device(&phone, &user)?);
        assert!(!db.revoke_device(&phone, &user)?);
        // Only a known device of the same user is revoked here.
        let never_seen = DeviceId([9; 32]);
        assert!(!db.revoke_device(&never_seen, &user)?);
        assert!(!db.revoke_device(&laptop, &UserId([7; 32]))?);
        assert_eq!(db.revoked_devices(10)?, vec![phone]);
        assert_eq!(
            db.bind_device(&phone, &user, b"phone cert again")?,
            Binding::Known
        );
        let listed: Vec<DeviceId> = db
            .devices_of_user(&user)?
            .into_iter()
            .map(|d| d.device_id)
            .collect();
        assert_eq!(listed, vec![laptop]);
        assert_eq!(
            db.device(&phone)?,
            Some(DeviceRecord {
                device_id: phone,
                user_id: user,
                cert: b"phone cert again".to_vec(),
                revoked: true,
            })
        );
        assert_eq!(db.device(&never_seen)?, None);
        Ok(())
    }

    #[test]
    fn a_device_stays_with_its_first_account() -> Result<(), StoreError> {
        let store = Store::open_in_memory()?;
        let db = store.db();
        let (bob, mallory) = (UserId([1; 32]), UserId([6; 32]));
        let device = DeviceId([2; 32]);
        db.bind_device(&device, &bob, b"bob's cert")?;
        assert_eq!(
            db.bind_device(&device, &mallory, b"mallory's cert")?,
            Binding::OtherUser(bob)
        );
        let record = db
            .device(&device)?
            .ok_or(StoreError::Corrupt("gone".into()))?;
        assert_eq!((record.user_id, record.cert), (bob, b"bob's cert".to_vec()));
        assert!(db.devices_of_user(&mallory)?.is_empty());
        Ok(())
    }

    #[test]
    fn pending_revocations_wait_per_account_and_are_bounded() -> Result<(), StoreError> {
        let store = Store::open_in_memory()?;
        let db = store.db();
        let (bob, mallory) = (UserId([1; 32]), UserId([6; 32]));
        let device = DeviceId([2; 32]);
        db.add_pending_revocation(&mallory, &device, b"mallory's", 10)?;
        assert_eq!(db.take_pending_revocation(&bob, &device)?, None);
        assert_eq!(
            db.take_pending_revocation(&mallory, &device)?.as_deref(),
            Some(&b"mallory's"[..])
        );
        assert_eq!(db.take_pending_revocation(&mallory, &device)?, None);
        for n in 0..5u8 {
            db.add_pending_revocation(&bob, &DeviceId([n; 32]), &[n], 3)?;
        }
        assert_eq!(db.take_pending_revocation(&bob, &DeviceId([0; 32]))?, None);
        assert!(
            db.take_pending_revocation(&bob, &DeviceId([4; 32]))?
                .is_some()
        );
        Ok(())
    }

    #[test]
    fn aliases_are_unique_ignoring_case() -> Result<(), StoreError> {
        let store = Store::open_in_memory()?;
        let db = store.db();
        db.insert_contact(&contact(1, "Alice"))?;
        match db.insert_contact(&contact(2, "alice")) {
            Err(StoreError::AliasTaken(alias)) => assert_eq!(alias, "alice"),
            other => panic!("expected AliasTaken, got {other:?}"),
        }
        match db.insert_contact(&contact(1, "Other")) {
            Err(StoreError::AlreadyContact) => {}
            other => panic!("expected AlreadyContact, got {other:?}"),
        }
        assert_eq!(db.contact_by_alias("ALICE")?, Some(contact(1, "Alice")));
        assert_eq!(db.contact(&UserId([1; 32]))?, Some(contact(1, "Alice")));
        assert_eq!(db.contact(&UserId([2; 32]))?, None);

        // The alias is free again once its contact is gone.
        assert!(db.remove_contact(&UserId([1; 32]))?);
        assert!(!db.remove_contact(&UserId([1; 32]))?);
        db.insert_contact(&contact(2, "alice"))?;
        Ok(())
    }

    #[test]
    fn contacts_are_listed_by_alias() -> Result<(), StoreError> {
        let store = Store::open_in_memory()?;
        let db = store.db();
        db.insert_contact(&contact(1, "carol"))?;
        db.insert_contact(&contact(2, "Bob"))?;
        db.insert_contact(&contact(3, "alice"))?;
        let aliases: Vec<String> = db.contacts()?.into_iter().map(|c| c.alias).collect();
        assert_eq!(aliases, ["alice", "Bob", "carol"]);
        Ok(())
    }

    #[test]
    fn blocked_flag_is_kept() -> Result<(), StoreError> {
        let store = Store::open_in_memory()?;
        let db = store.db();
        let mallory = UserId([6; 32]);
        assert!(!db.is_blocked(&mallory)?);
        assert!(!db.set_blocked(&mallory, true)?, "not a contact");
        db.insert_contact(&contact(6, "mallory"))?;
        assert!(db.set_blocked(&mallory, true)?);
        assert!(db.is_blocked(&mallory)?);
        assert!(db.contact(&mallory)?.is_some_and(|c| c.blocked));
        assert!(db.set_blocked(&mallory, false)?);
        assert!(!db.is_blocked(&mallory)?);
        Ok(())
    }
}

//! Delivered and read receipts: which recipient device has acknowledged
//! which message, and how far.

use rusqlite::params;

use super::{Db, MessageStatus, StoreError, id_at};
use crate::ids::{DeviceId, MessageId, UserId};

/// How far one recipient user has got with one message (the furthest of
/// their devices).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserReceipt {
    pub user: UserId,
    pub status: MessageStatus,
    pub at_ms: i64,
}

impl Db<'_> {
    /// Records a receipt; a status never goes back ("read" then a late
    /// "delivered" stays "read"). Returns whether anything changed.
    pub fn add_receipt(
        &self,
        message: &MessageId,
        device: &DeviceId,
        user: &UserId,
        status: MessageStatus,
        at_ms: i64,
    ) -> Result<bool, StoreError> {
        let status = match status {
            MessageStatus::Read => "read",
            _ => "delivered",
        };
        let changed = self.execute(
            "INSERT INTO receipts (message, device_id, user_id, status, at)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (message, device_id) DO UPDATE
             SET status = excluded.status, at = excluded.at
             WHERE receipts.status = 'delivered' AND excluded.status = 'read'",
            params![message.0, device.0, user.0, status, at_ms],
        )?;
        Ok(changed > 0)
    }

    /// Per recipient user, the furthest status any of their devices
    /// acknowledged for the message.
    pub fn receipts(&self, message: &MessageId) -> Result<Vec<UserReceipt>, StoreError> {
        self.query_vec(
            "SELECT user_id, max(CASE status WHEN 'read' THEN 1 ELSE 0 END), max(at)
             FROM receipts WHERE message = ?1 GROUP BY user_id ORDER BY user_id",
            [message.0],
            |row| {
                let read: i64 = row.get(1)?;
                Ok(UserReceipt {
                    user: id_at(row, 0)?,
                    status: if read == 1 {
                        MessageStatus::Read
                    } else {
                        MessageStatus::Delivered
                    },
                    at_ms: row.get(2)?,
                })
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    #[test]
    fn receipts_only_move_forward_and_aggregate_per_user() -> Result<(), StoreError> {
        let store = Store::open_in_memory()?;
        let db = store.db();
        let m = crate::ids::EnvelopeId([1; 16]);
        let (bob, carol) = (UserId([2; 32]), UserId([3; 32]));
        let (bob_phone, bob_laptop, carol_phone) =
            (DeviceId([4; 32]), DeviceId([5; 32]), DeviceId([6; 32]));
        assert!(db.add_receipt(&m, &bob_phone, &bob, MessageStatus::Read, 10)?);
        assert!(!db.add_receipt(&m, &bob_phone, &bob, MessageStatus::Delivered, 11)?);
        assert!(db.add_receipt(&m, &bob_laptop, &bob, MessageStatus::Delivered, 12)?);
        assert!(db.add_receipt(&m, &carol_phone, &carol, MessageStatus::Delivered, 13)?);
        let r = db.receipts(&m)?;
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].user, r[0].status), (bob, MessageStatus::Read));
        assert_eq!((r[1].user, r[1].status), (carol, MessageStatus::Delivered));
        Ok(())
    }
}

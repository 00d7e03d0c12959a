-- A revocation of a device this node holds no certificate for waits
-- here, under the account that signed it, until that same account
-- certifies the device. (It used to be recorded as a revoked device of
-- whichever account signed it, so anyone could lock out a device id
-- they had merely seen; the engine forgets those rows at start.)
CREATE TABLE pending_revocations (
    user_id    BLOB NOT NULL,
    device_id  BLOB NOT NULL,
    revocation BLOB NOT NULL,
    PRIMARY KEY (user_id, device_id)
);

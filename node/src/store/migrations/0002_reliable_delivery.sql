-- Weft node schema, version 2: reliable delivery.

-- Conversation order: the sender's hybrid logical clock (node/src/hlc.rs),
-- then the message id. Older rows get their send time as the clock.
ALTER TABLE messages ADD COLUMN hlc INTEGER NOT NULL DEFAULT 0 CHECK (hlc >= 0);
UPDATE messages SET hlc = max(sent_at, 0) * 65536;
DROP INDEX messages_by_time;
CREATE INDEX messages_by_order ON messages (conversation, hlc, id);

-- Delivered and read receipts, per message and recipient device. No foreign
-- key to messages: a receipt may arrive (in catch-up) before its message.
CREATE TABLE receipts (
    message   BLOB NOT NULL,
    device_id BLOB NOT NULL,
    user_id   BLOB NOT NULL,
    status    TEXT NOT NULL CHECK (status IN ('delivered', 'read')),
    at        INTEGER NOT NULL,
    PRIMARY KEY (message, device_id)
) STRICT, WITHOUT ROWID;

-- Sealed envelopes (sender keys, group states) are summarised by id in
-- catch-up, chain-sealed ones by (sender, epoch, counter).
ALTER TABLE envelopes ADD COLUMN sealed INTEGER NOT NULL DEFAULT 0 CHECK (sealed IN (0, 1));
CREATE INDEX envelopes_sealed ON envelopes (conversation, sealed);

-- When an outbox entry gives up (retries back off until then).
ALTER TABLE outbox ADD COLUMN expires_at INTEGER NOT NULL DEFAULT 9223372036854775807;

-- Presence: when we last heard from a user's device.
ALTER TABLE users ADD COLUMN last_seen INTEGER;

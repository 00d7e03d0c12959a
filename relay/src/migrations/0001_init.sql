-- weft-relay schema, version 1.
--
-- A mailbox is known by an opaque id (derived by the device from its key
-- and this relay's peer id) and bound to the libp2p peer that registered
-- it. No user id, name or contact list is stored.

CREATE TABLE mailboxes (
    id            BLOB PRIMARY KEY,      -- 16 bytes, MailboxId
    peer          BLOB NOT NULL UNIQUE,  -- the bound device's peer id (bytes)
    wakeup        TEXT,                  -- UnifiedPush endpoint, if any
    registered_at INTEGER NOT NULL,      -- unix ms of the first registration
    last_seen     INTEGER NOT NULL,      -- unix ms of the last register/fetch/ack
    envelopes     INTEGER NOT NULL DEFAULT 0,  -- stored count (quota)
    bytes         INTEGER NOT NULL DEFAULT 0   -- stored bytes (quota)
) WITHOUT ROWID;

CREATE INDEX mailboxes_last_seen ON mailboxes (last_seen);

-- AUTOINCREMENT: a cursor is never reused, even after the newest mail is
-- deleted, so a device's "after" cursor only ever moves forward.
CREATE TABLE mail (
    cursor      INTEGER PRIMARY KEY AUTOINCREMENT,
    mailbox     BLOB NOT NULL REFERENCES mailboxes (id) ON DELETE CASCADE,
    envelope_id BLOB NOT NULL,           -- blake3(envelope)[..16], dedup key
    envelope    BLOB NOT NULL,
    size        INTEGER NOT NULL,
    stored_at   INTEGER NOT NULL         -- unix ms
);

CREATE UNIQUE INDEX mail_dedup ON mail (mailbox, envelope_id);
CREATE INDEX mail_by_mailbox ON mail (mailbox, cursor);
CREATE INDEX mail_by_age ON mail (stored_at);

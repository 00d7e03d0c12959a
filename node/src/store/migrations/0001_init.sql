-- Weft node schema, version 1.
-- Ids are raw bytes (BLOB); times are unix milliseconds (INTEGER).
-- STRICT makes SQLite reject a value of the wrong type instead of storing it.

CREATE TABLE users (
    user_id      BLOB PRIMARY KEY NOT NULL,
    display_name TEXT NOT NULL,
    updated_at   INTEGER NOT NULL
) STRICT;

-- Every known device certificate of every known user. No foreign key to
-- users: a certificate can arrive before the user's profile.
CREATE TABLE devices (
    device_id BLOB PRIMARY KEY NOT NULL,
    user_id   BLOB NOT NULL,
    cert      BLOB NOT NULL,
    revoked   INTEGER NOT NULL DEFAULT 0 CHECK (revoked IN (0, 1))
) STRICT;
CREATE INDEX devices_by_user ON devices (user_id);

CREATE TABLE contacts (
    user_id  BLOB PRIMARY KEY NOT NULL,
    alias    TEXT NOT NULL UNIQUE COLLATE NOCASE,
    invite   TEXT NOT NULL,
    blocked  INTEGER NOT NULL DEFAULT 0 CHECK (blocked IN (0, 1)),
    added_at INTEGER NOT NULL
) STRICT;

CREATE TABLE conversations (
    id              BLOB PRIMARY KEY NOT NULL,
    kind            TEXT NOT NULL CHECK (kind IN ('direct', 'group')),
    name            TEXT NOT NULL,
    topic           TEXT NOT NULL UNIQUE,
    epoch           INTEGER NOT NULL CHECK (epoch >= 0),
    state           BLOB,
    created_at      INTEGER NOT NULL,
    last_message_at INTEGER,
    unread          INTEGER NOT NULL DEFAULT 0 CHECK (unread >= 0)
) STRICT;

CREATE TABLE members (
    conversation BLOB NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    user_id      BLOB NOT NULL,
    role         TEXT NOT NULL CHECK (role IN ('member', 'admin')),
    PRIMARY KEY (conversation, user_id)
) STRICT, WITHOUT ROWID;
CREATE INDEX members_by_user ON members (user_id);

-- reply_to has no foreign key: the message replied to may not have arrived.
CREATE TABLE messages (
    id            BLOB PRIMARY KEY NOT NULL,
    conversation  BLOB NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    sender_user   BLOB NOT NULL,
    sender_device BLOB NOT NULL,
    sent_at       INTEGER NOT NULL,
    received_at   INTEGER NOT NULL,
    text          TEXT NOT NULL,
    reply_to      BLOB,
    status        TEXT NOT NULL
        CHECK (status IN ('queued', 'sent', 'relayed', 'delivered', 'read')),
    edited        INTEGER NOT NULL DEFAULT 0 CHECK (edited IN (0, 1)),
    deleted       INTEGER NOT NULL DEFAULT 0 CHECK (deleted IN (0, 1))
) STRICT;
CREATE INDEX messages_by_time ON messages (conversation, sent_at, id);

-- Every envelope accepted, for dedup, replay detection and catch-up. No
-- foreign key: an envelope can be accepted before its conversation is known.
CREATE TABLE envelopes (
    id            BLOB PRIMARY KEY NOT NULL,
    conversation  BLOB NOT NULL,
    sender_device BLOB NOT NULL,
    epoch         INTEGER NOT NULL CHECK (epoch >= 0),
    counter       INTEGER NOT NULL CHECK (counter >= 0),
    bytes         BLOB NOT NULL,
    received_at   INTEGER NOT NULL
) STRICT;
CREATE INDEX envelopes_by_chain ON envelopes (conversation, sender_device, epoch, counter);

-- Envelopes we still have to publish. No foreign key: control envelopes
-- (key distribution, invites) may be sent before the conversation exists here.
CREATE TABLE outbox (
    envelope_id     BLOB PRIMARY KEY NOT NULL,
    conversation    BLOB NOT NULL,
    bytes           BLOB NOT NULL,
    created_at      INTEGER NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at INTEGER NOT NULL
) STRICT;
CREATE INDEX outbox_by_due ON outbox (next_attempt_at);
CREATE INDEX outbox_by_conversation ON outbox (conversation, created_at);

-- Opaque key-chain states; the crypto module owns the format. No foreign
-- key: a sender's chain can arrive before the group state that names it.
CREATE TABLE chains (
    conversation  BLOB NOT NULL,
    sender_device BLOB NOT NULL,
    epoch         INTEGER NOT NULL CHECK (epoch >= 0),
    state         BLOB NOT NULL,
    PRIMARY KEY (conversation, sender_device, epoch)
) STRICT, WITHOUT ROWID;

-- Envelopes not openable yet (their key has not arrived). AUTOINCREMENT so
-- row ids only grow: the smallest row id is always the oldest row.
CREATE TABLE pending (
    rowid        INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation BLOB NOT NULL,
    bytes        BLOB NOT NULL,
    received_at  INTEGER NOT NULL
) STRICT;
CREATE INDEX pending_by_conversation ON pending (conversation);

CREATE TABLE peers (
    peer_id   TEXT NOT NULL,
    addr      TEXT NOT NULL,
    last_seen INTEGER NOT NULL,
    PRIMARY KEY (peer_id, addr)
) STRICT, WITHOUT ROWID;
CREATE INDEX peers_by_last_seen ON peers (last_seen);

CREATE TABLE meta (
    key   TEXT PRIMARY KEY NOT NULL,
    value BLOB NOT NULL
) STRICT;

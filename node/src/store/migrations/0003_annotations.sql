-- Annotations (edits, deletions, reactions, pins): the automerge shards
-- they merge in, the texts of edits, and their materialised effect.

-- One weft-crdt annotations document per conversation per 30-day period
-- (period u64::MAX, stored as -1: the conversation's meta shard).
CREATE TABLE shards (
    conversation  BLOB NOT NULL,
    period        INTEGER NOT NULL,
    doc           BLOB NOT NULL,
    PRIMARY KEY (conversation, period)
) STRICT, WITHOUT ROWID;

-- The text of each edit (the shards hold only references). Deleting the
-- message deletes these.
CREATE TABLE edits (
    id       BLOB PRIMARY KEY NOT NULL,
    message  BLOB NOT NULL,
    text     TEXT NOT NULL
) STRICT;
CREATE INDEX edits_by_message ON edits (message);

-- The original text, kept while edits are shown (an edit's text replaces
-- `messages.text`).
ALTER TABLE messages ADD COLUMN original_text TEXT;

-- Reactions as the shard says now.
CREATE TABLE reactions (
    message  BLOB NOT NULL,
    user_id  BLOB NOT NULL,
    emoji    TEXT NOT NULL,
    PRIMARY KEY (message, user_id, emoji)
) STRICT, WITHOUT ROWID;

-- Annotation changes that cannot apply yet (decrypted payloads; bounded
-- by the node): `waits_for` is the message they are about (16 bytes), or
-- the shard (conversation and big-endian period, 40 bytes) whose earlier
-- changes they depend on.
CREATE TABLE pending_annotations (
    rowid_    INTEGER PRIMARY KEY,
    waits_for BLOB NOT NULL,
    author    BLOB NOT NULL,
    device    BLOB NOT NULL,
    payload   BLOB NOT NULL,
    at        INTEGER NOT NULL
) STRICT;
CREATE INDEX pending_annotations_by_wait ON pending_annotations (waits_for);

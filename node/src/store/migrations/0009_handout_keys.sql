-- Handout keys (docs/protocol.md): this device's own, newest first by
-- creation; a replaced one is erased `skipped_key_max_age` after it was
-- retired. And the newest known of each other device, signed by it.
CREATE TABLE own_handout_keys (
    public     BLOB PRIMARY KEY NOT NULL,
    secret     BLOB NOT NULL,
    created_at INTEGER NOT NULL,
    retired_at INTEGER
) STRICT, WITHOUT ROWID;

CREATE TABLE handout_keys (
    device     BLOB PRIMARY KEY NOT NULL,
    dh         BLOB NOT NULL,
    created_at INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

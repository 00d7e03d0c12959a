-- One-time handout keys (docs/protocol.md). The secrets this device
-- issued, each to one holder device: erased as soon as a handout sealed
-- to one opens, or once too old to be used.
CREATE TABLE own_one_time_keys (
    public     BLOB PRIMARY KEY NOT NULL,
    secret     BLOB NOT NULL,
    holder     BLOB NOT NULL,
    created_at INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

CREATE INDEX own_one_time_keys_by_holder ON own_one_time_keys (holder, created_at);

-- When this device last issued a batch to each holder: batches are
-- strictly newer than the last, so a holder can refuse a replayed one.
CREATE TABLE one_time_batches_issued (
    holder  BLOB PRIMARY KEY NOT NULL,
    last_at INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

-- Other devices' one-time keys this device holds, each used once.
CREATE TABLE one_time_keys (
    issuer     BLOB NOT NULL,
    public     BLOB NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (issuer, public)
) STRICT, WITHOUT ROWID;

-- The newest batch taken from each issuer.
CREATE TABLE one_time_batches_taken (
    issuer  BLOB PRIMARY KEY NOT NULL,
    last_at INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

-- The pending queue is capped per delivering peer and per claimed sender,
-- in rows and in bytes, as well as in all (store/envelopes.rs, `add_pending`;
-- docs/security.md). Each row records what the caps count:
--   peer:   the libp2p id (bytes) of the peer that handed it over; x'' when
--           it was handed over locally, or kept before this migration;
--   liable: 1 when that peer answers for it (it sent it directly: a direct
--           request, a catch-up answer), 0 when it only passed it on
--           (gossip forwarding, a relay's mailbox);
--   sender: the device the envelope's header names;
--   size:   length(bytes).
ALTER TABLE pending ADD COLUMN peer BLOB NOT NULL DEFAULT x'';
ALTER TABLE pending ADD COLUMN liable INTEGER NOT NULL DEFAULT 0;
ALTER TABLE pending ADD COLUMN sender BLOB NOT NULL DEFAULT x'';
ALTER TABLE pending ADD COLUMN size INTEGER NOT NULL DEFAULT 0;

-- Rows kept before: the sender from the header, which starts with the
-- version byte, the 16-byte routing tag and the 32-byte sender device
-- (docs/protocol.md); every kept envelope is at least 64 bytes long.
UPDATE pending SET
    size = length(bytes),
    sender = CASE WHEN length(bytes) >= 49 THEN substr(bytes, 18, 32) ELSE x'' END;

-- The oldest rows of one peer or one sender are what its cap evicts.
CREATE INDEX pending_by_peer ON pending (peer);
CREATE INDEX pending_by_sender ON pending (sender);

-- What the queue holds in all (kind 0, holder x''), per delivering peer
-- (kind 1) and per claimed sender (kind 2), kept by the triggers below so
-- that checking a cap costs a lookup, not a scan of the queue, however
-- fast a flood comes. Pending rows are inserted and deleted, never
-- updated. A peer's or sender's line goes with its last row; the total's
-- stays.
CREATE TABLE pending_usage (
    kind       INTEGER NOT NULL CHECK (kind IN (0, 1, 2)),
    holder     BLOB NOT NULL,
    row_count  INTEGER NOT NULL,
    byte_count INTEGER NOT NULL,
    PRIMARY KEY (kind, holder)
) STRICT, WITHOUT ROWID;
-- The total's cap evicts from the peer holding the most.
CREATE INDEX pending_usage_by_rows ON pending_usage (kind, row_count);
CREATE INDEX pending_usage_by_bytes ON pending_usage (kind, byte_count);

INSERT INTO pending_usage (kind, holder, row_count, byte_count)
    SELECT 0, x'', count(*), coalesce(sum(size), 0) FROM pending;
INSERT INTO pending_usage (kind, holder, row_count, byte_count)
    SELECT 1, peer, count(*), sum(size) FROM pending GROUP BY peer;
INSERT INTO pending_usage (kind, holder, row_count, byte_count)
    SELECT 2, sender, count(*), sum(size) FROM pending GROUP BY sender;

CREATE TRIGGER pending_counted AFTER INSERT ON pending
BEGIN
    INSERT INTO pending_usage (kind, holder, row_count, byte_count)
        VALUES (0, x'', 1, NEW.size), (1, NEW.peer, 1, NEW.size), (2, NEW.sender, 1, NEW.size)
        ON CONFLICT (kind, holder) DO UPDATE SET
            row_count = row_count + 1,
            byte_count = byte_count + excluded.byte_count;
END;

CREATE TRIGGER pending_uncounted AFTER DELETE ON pending
BEGIN
    UPDATE pending_usage SET row_count = row_count - 1, byte_count = byte_count - OLD.size
        WHERE kind = 0 AND holder = x'';
    UPDATE pending_usage SET row_count = row_count - 1, byte_count = byte_count - OLD.size
        WHERE kind = 1 AND holder = OLD.peer;
    UPDATE pending_usage SET row_count = row_count - 1, byte_count = byte_count - OLD.size
        WHERE kind = 2 AND holder = OLD.sender;
    DELETE FROM pending_usage WHERE kind = 1 AND holder = OLD.peer AND row_count <= 0;
    DELETE FROM pending_usage WHERE kind = 2 AND holder = OLD.sender AND row_count <= 0;
END;

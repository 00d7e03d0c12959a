-- weft-relay schema, version 2: who deposited each envelope, and what
-- each depositor has waiting, for the per-depositor quotas.
--
-- Mail stored before this version keeps its rows; its depositor is not
-- known (NULL) and it counts against no depositor's quota.

ALTER TABLE mail ADD COLUMN depositor BLOB;  -- the depositing peer id (bytes)
ALTER TABLE mail ADD COLUMN source BLOB;     -- its address key: IPv4 (4 bytes), IPv6 /64 (8), unknown (0)

-- What one depositor has waiting: in one mailbox, and in all of them
-- (mailbox = x''). A depositor is counted under two keys, 'p' | peer id
-- bytes and 'i' | address key, since fresh peer ids cost nothing. Kept
-- in the same transactions as the mail it counts; a row is deleted when
-- it reaches zero.
CREATE TABLE depositor_usage (
    depositor BLOB NOT NULL,
    mailbox   BLOB NOT NULL,
    envelopes INTEGER NOT NULL,
    bytes     INTEGER NOT NULL,
    PRIMARY KEY (depositor, mailbox)
) WITHOUT ROWID;

-- Protocol 2 (docs/protocol.md).
--
-- Certificates: a protocol 2 certificate also carries the device key's
-- consent to its account and the account's key. Protocol 1 certificates
-- cannot be turned into protocol 2 ones (only the device could sign its
-- consent), so their bytes are dropped; each row stays as the binding it
-- is (a device belongs for good to the account it was first bound to,
-- and a revoked device stays revoked) until that account's protocol 2
-- certificate for it arrives.
ALTER TABLE devices ADD COLUMN cert_version INTEGER NOT NULL DEFAULT 2;
UPDATE devices SET cert_version = 1, cert = X'' WHERE length(cert) > 0;

-- Envelopes name their conversation by a routing tag derived from a
-- secret only its members hold; the gossip topic derives from the same
-- secret. `tag` is the current one (NULL for a conversation made under
-- protocol 1 whose routing secret is not known yet), and routing_tags
-- maps every tag a conversation had (a group's changes with its epoch)
-- to it, so that envelopes of earlier epochs are still recognised.
ALTER TABLE conversations ADD COLUMN tag BLOB;
CREATE TABLE routing_tags (
    tag          BLOB PRIMARY KEY NOT NULL,
    conversation BLOB NOT NULL REFERENCES conversations (id) ON DELETE CASCADE
) STRICT, WITHOUT ROWID;
CREATE INDEX routing_tags_by_conversation ON routing_tags (conversation);

-- Protocol 1 group states do not decode as protocol 2 ones (no routing
-- secret); such a group keeps its history and members, read-only.
UPDATE conversations SET state = NULL WHERE kind = 'group';

-- The group epoch a message was sent under (1 in one-to-one
-- conversations): its annotations go into shards of that epoch, so a
-- member added later starts on shards with no changes from before.
ALTER TABLE messages ADD COLUMN epoch INTEGER NOT NULL DEFAULT 1;

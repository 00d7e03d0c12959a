-- Changes appended to an annotation shard since it was last saved whole,
-- one row per append: an append no longer rewrites the shard's blob.
-- A shard is its `shards.doc` followed by its chunks in `seq` order.
CREATE TABLE shard_chunks (
    conversation  BLOB NOT NULL,
    period        INTEGER NOT NULL,
    seq           INTEGER NOT NULL,
    bytes         BLOB NOT NULL,
    PRIMARY KEY (conversation, period, seq)
) STRICT, WITHOUT ROWID;

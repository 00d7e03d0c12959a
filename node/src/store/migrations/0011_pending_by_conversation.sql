-- A change about a message not here waits under the conversation it came
-- in and the message (48 bytes) instead of the message alone (16): taken
-- in later with whatever conversation the message turned out to be in, a
-- member of one conversation could react in another (docs/security.md).
-- The waits kept the old way cannot say where they came from: they go.
DELETE FROM pending_annotations WHERE length(waits_for) = 16;

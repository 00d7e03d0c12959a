-- Device revocation: every member replaces its sending chain in the
-- conversations the revoked device was in, without a group change. The
-- epoch this device's own sending chains use is now kept apart from the
-- group epoch; it moves on with every group change and every revocation.
ALTER TABLE conversations ADD COLUMN key_epoch INTEGER NOT NULL DEFAULT 1;
UPDATE conversations SET key_epoch = MAX(epoch, 1);

-- Caller key rotation with a grace period: the previous key's hash keeps working until
-- previous_key_expires_at (unix ms). Only hashes are kept, as for the current key.
ALTER TABLE callers ADD COLUMN previous_key_hash TEXT;
ALTER TABLE callers ADD COLUMN previous_key_expires_at BIGINT;
ALTER TABLE callers ADD COLUMN updated_at BIGINT;
CREATE UNIQUE INDEX callers_previous_key_hash ON callers (previous_key_hash);

-- Tenants: public settings only. The issuer column is the JSON IssuerSpec, which holds no secrets.
CREATE TABLE tenants (
    id           TEXT PRIMARY KEY,
    display_name TEXT NOT NULL,
    issuer       TEXT NOT NULL,
    version      BIGINT NOT NULL,
    created_at   BIGINT NOT NULL, -- unix ms
    updated_at   BIGINT NOT NULL  -- unix ms
);

-- One row per credential field, each sealed with AES-256-GCM (AAD = tenant id + field).
-- key_id repeats the key id inside the ciphertext so rekeying can find rows by key.
CREATE TABLE tenant_credentials (
    tenant_id TEXT NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    field     TEXT NOT NULL,
    key_id    TEXT NOT NULL,
    sealed    BYTEA NOT NULL,
    PRIMARY KEY (tenant_id, field)
);
CREATE INDEX tenant_credentials_key_id ON tenant_credentials (key_id);

-- API-key callers. Only the SHA-256 of the key is kept; tenants is a JSON array or "*".
CREATE TABLE callers (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL UNIQUE,
    key_hash   TEXT NOT NULL UNIQUE,
    tenants    TEXT NOT NULL,
    created_at BIGINT NOT NULL -- unix ms
);

-- The outcome of each tenant's latest partner calls, for the admin view. Never holds secrets:
-- the error is the broker's own problem code and operator-facing detail.
CREATE TABLE tenant_health (
    tenant_id         TEXT PRIMARY KEY REFERENCES tenants (id) ON DELETE CASCADE,
    last_success_at   BIGINT,          -- unix ms
    last_error_at     BIGINT,          -- unix ms
    last_error_code   TEXT,
    last_error_detail TEXT
);

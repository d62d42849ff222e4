-- Partner calls per tenant per minute (successes and failures), so the admin views can show
-- "mints in the last hour" from the broker's own record across replicas. Each tenant's rows
-- older than two hours are pruned as new ones are written.
CREATE TABLE tenant_mints (
    tenant_id TEXT   NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    minute    BIGINT NOT NULL,          -- unix ms at the start of the minute
    ok        BIGINT NOT NULL DEFAULT 0,
    failed    BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant_id, minute)
);

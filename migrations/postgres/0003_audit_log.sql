-- The audit trail: tokens handed out (coalesced: identical entries within one write batch
-- become one row with a count and a first/last time), admin mutations, refused requests.
-- Never a token or a secret: tokens appear only as a keyed fingerprint.
CREATE TABLE audit_log (
    id          BIGSERIAL PRIMARY KEY,
    at          BIGINT NOT NULL,           -- unix ms, first occurrence
    last_at     BIGINT NOT NULL,           -- unix ms, last occurrence
    count       BIGINT NOT NULL DEFAULT 1,
    kind        TEXT NOT NULL,             -- token | admin | refused
    action      TEXT NOT NULL,
    outcome     TEXT NOT NULL,
    caller      TEXT,
    auth_method TEXT,
    tenant      TEXT,
    source      TEXT,
    fingerprint TEXT,
    detail      TEXT,
    request_id  TEXT
);
CREATE INDEX audit_log_tenant ON audit_log (tenant, id);
CREATE INDEX audit_log_caller ON audit_log (caller, id);
CREATE INDEX audit_log_last_at ON audit_log (last_at);

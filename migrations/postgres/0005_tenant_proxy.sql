-- Proxy mode: a tenant's proxy settings as JSON (base URL, header names, limits; no secret).
-- The fixed header values are sealed rows in tenant_credentials under the field name
-- "proxy_header:<lower-case name>" (":" never occurs in a credential field name).
ALTER TABLE tenants ADD COLUMN proxy TEXT;

"""The README walk-through, driven by a client generated from openapi.yaml with
openapi-python-client: create a tenant, test it, create a caller, fetch a token, rotate the
tenant's credentials and the caller's key, read the tenant list, delete. Every answer must
parse into the generated models (a Problem where one is expected), so a spec that generated
clients cannot follow fails here.

Usage: python3 walkthrough.py <broker base URL> <admin token> <partner token URL>
"""
import sys

from token_broker_client import AuthenticatedClient
from token_broker_client.api.admin import (
    create_caller,
    create_tenant,
    delete_caller,
    delete_tenant,
    get_tenant,
    list_callers,
    list_tenants,
    patch_caller,
    put_credentials,
    rotate_caller_key,
    test_tenant,
)
from token_broker_client.api.token import get_token
from token_broker_client.models import (
    CreateCallerBody,
    CreateCallerResponse201,
    Credentials,
    Issuer,
    IssuerKind,
    ListTenantsResponse200,
    PatchCallerBody,
    Problem,
    RotateCallerKeyBody,
    RotateCallerKeyResponse200,
    ScopeType0,
    TenantSpec,
    Token,
)

base, admin_token, token_url = sys.argv[1:4]
admin = AuthenticatedClient(base_url=base, token=admin_token, raise_on_unexpected_status=True)


def expect(resp, status, model=None):
    assert resp.status_code == status, f"{resp.status_code}: {resp.content[:300]!r}"
    if model is not None:
        assert isinstance(resp.parsed, model), f"parsed as {type(resp.parsed).__name__}: {resp.parsed!r}"
    return resp.parsed


name = "billing-" + base.rsplit(":", 1)[-1]

# Start clean so the walk-through can run twice against one broker.
delete_tenant.sync_detailed("acme-setu", client=admin)
for c in list_callers.sync(client=admin).callers:
    if c.name in (name, name + "-all"):
        expect(delete_caller.sync_detailed(c.id, client=admin), 204)

creds = Credentials()
creds["client_id"] = "acme"
creds["client_secret"] = "demo-secret"
spec = TenantSpec(
    id="acme-setu",
    display_name="Acme (Setu)",
    issuer=Issuer(kind=IssuerKind.SETU_PARTNER, token_url=token_url, default_ttl_seconds=900),
    credentials=creds,
)
expect(create_tenant.sync_detailed(client=admin, body=spec), 201)
tested = expect(test_tenant.sync_detailed("acme-setu", client=admin), 200)
print("test:", tested.to_dict())

created = expect(
    create_caller.sync_detailed(client=admin, body=CreateCallerBody(name=name, tenants=["acme-setu"])),
    201,
    CreateCallerResponse201,
)
assert created.api_key.startswith("tbk_"), "the one-time key must survive parsing"
caller = AuthenticatedClient(base_url=base, token=created.api_key, raise_on_unexpected_status=True)
token = expect(get_token.sync_detailed("acme-setu", client=caller), 200, Token)
assert token.expires_in > 0 and token.token_type == "Bearer"
print("token expires in", token.expires_in, "s")

# A "*" scope round-trips through the generated union type.
star = expect(
    create_caller.sync_detailed(client=admin, body=CreateCallerBody(name=name + "-all", tenants=ScopeType0("*"))),
    201,
    CreateCallerResponse201,
)
assert star.tenants == ScopeType0("*")

# Rotate the tenant's credentials: 204 with the new ETag; the next fetch mints with them.
new_creds = Credentials()
new_creds["client_id"] = "acme-rotated"
new_creds["client_secret"] = "demo-secret"
rotated = put_credentials.sync_detailed("acme-setu", client=admin, body=new_creds)
assert rotated.status_code == 204, rotated.status_code
assert rotated.headers.get("etag") == '"v2"', rotated.headers
expect(get_token.sync_detailed("acme-setu", client=caller), 200, Token)

# Change the caller and roll its key with a grace period.
expect(
    patch_caller.sync_detailed(created.id, client=admin, body=PatchCallerBody(tenants=["acme-setu"])),
    200,
)
rolled = expect(
    rotate_caller_key.sync_detailed(created.id, client=admin, body=RotateCallerKeyBody(grace_seconds=60)),
    200,
    RotateCallerKeyResponse200,
)
new_caller = AuthenticatedClient(base_url=base, token=rolled.api_key, raise_on_unexpected_status=True)
expect(get_token.sync_detailed("acme-setu", client=new_caller), 200, Token)
expect(get_token.sync_detailed("acme-setu", client=caller), 200, Token)  # still in its grace

listed = expect(list_tenants.sync_detailed(client=admin), 200, ListTenantsResponse200)
assert any(t.id == "acme-setu" for t in listed.tenants)

expect(delete_tenant.sync_detailed("acme-setu", client=admin), 204)
expect(get_tenant.sync_detailed("acme-setu", client=admin), 404, Problem)
print("walk-through with the generated client: ok")

"""Python Authlib against the broker's /oauth2/token: client_secret_basic, client_secret_post
and the RFC 8693 token exchange, each compared with what the REST endpoint hands out."""
import os
import sys

import requests
from authlib.integrations.requests_client import OAuth2Session
from authlib.integrations.base_client.errors import OAuthError

base = os.environ["BROKER_URL"]
client_id = os.environ["OAUTH_CLIENT_ID"]
secret = os.environ["OAUTH_CLIENT_SECRET"]
token_url = f"{base}/oauth2/token"
resource = "urn:token-broker:tenant:acme-setu"
EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"


def check(cond, what):
    if not cond:
        sys.exit(f"authlib: FAILED: {what}")
    print(f"authlib: ok: {what}")


rest = requests.get(f"{base}/v1/tenants/acme-setu/token", headers={"authorization": f"Bearer {secret}"}).json()

basic = OAuth2Session(client_id, secret, token_endpoint_auth_method="client_secret_basic")
tok = basic.fetch_token(token_url, grant_type="client_credentials", resource=resource)
check(tok["token_type"] == "Bearer" and 0 < tok["expires_in"] <= 300, "client_secret_basic answers a Bearer token with expires_in")
check(tok["access_token"] == rest["access_token"], "client_secret_basic hands out the token the REST endpoint hands out")

post = OAuth2Session(client_id, secret, token_endpoint_auth_method="client_secret_post", scope="tenant:acme-setu")
tok = post.fetch_token(token_url, grant_type="client_credentials")
check(tok["access_token"] == rest["access_token"], "client_secret_post with scope=tenant:<id> hands out the same token")

# Authlib re-fetches a client-credentials token by itself once it expires.
auto = OAuth2Session(client_id, secret, token_endpoint=token_url, grant_type="client_credentials", scope="tenant:acme-setu")
auto.fetch_token()
auto.token["expires_at"] = 1
auto.ensure_active_token(auto.token)
check(auto.token["access_token"] == rest["access_token"] and auto.token["expires_at"] > 1, "an expired token is fetched again by the library")

for name, kwargs, want in [
    ("a wrong secret", {"client_secret": "tbk_wrong"}, "invalid_client"),
    ("a tenant outside the scope", {"resource": "urn:token-broker:tenant:other"}, "invalid_target"),
    ("an unknown tenant", {"resource": "urn:token-broker:tenant:nope"}, "invalid_target"),
]:
    s = OAuth2Session(client_id, kwargs.pop("client_secret", secret), token_endpoint_auth_method="client_secret_basic")
    try:
        s.fetch_token(token_url, grant_type="client_credentials", **{"resource": resource, **kwargs})
        check(False, f"{name} is refused")
    except OAuthError as e:
        check(e.error == want, f"{name} is refused with {want}")

anon = OAuth2Session(token_endpoint_auth_method="none")
tok = anon.fetch_token(
    token_url,
    grant_type=EXCHANGE,
    subject_token=os.environ["OAUTH_SUBJECT_TOKEN"],
    subject_token_type="urn:ietf:params:oauth:token-type:jwt",
    resource=resource,
)
check(tok["access_token"] == rest["access_token"], "RFC 8693 exchange of an IdP JWT hands out the same token")
check(tok["issued_token_type"] == "urn:ietf:params:oauth:token-type:access_token", "the exchange says what it issued")
print("authlib: all checks passed")

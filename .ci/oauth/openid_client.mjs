// Node openid-client against the broker: RFC 8414 discovery from the base URL, the client
// credentials grant, and the RFC 8693 token exchange; each compared with the REST endpoint.
import * as client from 'openid-client';

const base = process.env.BROKER_URL;
const id = process.env.OAUTH_CLIENT_ID;
const secret = process.env.OAUTH_CLIENT_SECRET;
const resource = 'urn:token-broker:tenant:acme-setu';

function check(cond, what) {
  if (!cond) {
    console.error(`openid-client: FAILED: ${what}`);
    process.exit(1);
  }
  console.log(`openid-client: ok: ${what}`);
}

const rest = await (await fetch(`${base}/v1/tenants/acme-setu/token`, {
  headers: { authorization: `Bearer ${secret}` },
})).json();

// Loopback test over plain HTTP: allowInsecureRequests; RFC 8414 metadata, not OIDC.
const options = { execute: [client.allowInsecureRequests], algorithm: 'oauth2' };
const config = await client.discovery(new URL(base), id, secret, client.ClientSecretBasic(secret), options);
check(config.serverMetadata().token_endpoint === `${base}/oauth2/token`, 'discovery finds the token endpoint');

const tok = await client.clientCredentialsGrant(config, { resource });
check(tok.access_token === rest.access_token && tok.token_type === 'bearer' && tok.expires_in > 0,
  'client credentials (client_secret_basic) hands out the REST endpoint\'s token');

const post = await client.discovery(new URL(base), id, secret, client.ClientSecretPost(secret), options);
const tok2 = await client.clientCredentialsGrant(post, { scope: 'tenant:acme-setu' });
check(tok2.access_token === rest.access_token, 'client_secret_post with scope=tenant:<id> too');

try {
  await client.clientCredentialsGrant(config, { resource: 'urn:token-broker:tenant:other' });
  check(false, 'a tenant outside the scope is refused');
} catch (e) {
  check(e.error === 'invalid_target', 'a tenant outside the scope is refused with invalid_target');
}

const anon = await client.discovery(new URL(base), 'anonymous', undefined, client.None(), options);
const exchanged = await client.genericGrantRequest(anon, 'urn:ietf:params:oauth:grant-type:token-exchange', {
  subject_token: process.env.OAUTH_SUBJECT_TOKEN,
  subject_token_type: 'urn:ietf:params:oauth:token-type:jwt',
  resource,
});
check(exchanged.access_token === rest.access_token
  && exchanged.issued_token_type === 'urn:ietf:params:oauth:token-type:access_token',
  'RFC 8693 exchange hands out the same token');
console.log('openid-client: all checks passed');

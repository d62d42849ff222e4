// A partner that demands proof of possession, built on panva's oidc-provider (OpenID
// Certified): its token endpoint takes private_key_jwt, client_secret_jwt, tls_client_auth and
// the JWT bearer grant, binds tokens with DPoP (nonces required) or the client certificate,
// and a resource server beside it accepts a token only with the proof it is bound to, checked
// with `jose` (not the broker's code).
//
//   node partner.mjs <http port> <https port> <resource http port> <resource https port> <dir>
//
// <dir> holds client.jwk.json (the broker tenant's public key), ca.pem, server.pem,
// server.key (the HTTPS listener's certificate, signed by ca.pem), selfsigned.pem (a
// self-signed client certificate). Prints "ready" when up.
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as https from 'node:https';
import Provider, { errors } from 'oidc-provider';
import * as jose from 'jose';

const [httpPort, httpsPort, rsPort, rsTlsPort, dir] = process.argv.slice(2);
const read = (f) => fs.readFileSync(`${dir}/${f}`, 'utf8');
const clientJwk = JSON.parse(read('client.jwk.json'));
const issuer = `http://127.0.0.1:${httpPort}`;
const cc = { grant_types: ['client_credentials'], response_types: [], redirect_uris: [] };
// The self-signed client certificate, registered as a JWK with its x5c (RFC 8705 §2.2).
const selfSigned = new crypto.X509Certificate(read('selfsigned.pem'));
const selfSignedJwk = { ...await jose.exportJWK(selfSigned.publicKey), x5c: [selfSigned.raw.toString('base64')] };
const JWT_BEARER = 'urn:ietf:params:oauth:grant-type:jwt-bearer';

const provider = new Provider(issuer, {
  clients: [
    { client_id: 'pkjwt', token_endpoint_auth_method: 'private_key_jwt', jwks: { keys: [clientJwk] }, ...cc },
    { client_id: 'csjwt', client_secret: 'csjwt-secret-that-is-at-least-32-bytes-long', token_endpoint_auth_method: 'client_secret_jwt', ...cc },
    { client_id: 'dpop', token_endpoint_auth_method: 'private_key_jwt', jwks: { keys: [clientJwk] }, dpop_bound_access_tokens: true, ...cc },
    { client_id: 'selfsigned', token_endpoint_auth_method: 'self_signed_tls_client_auth', jwks: { keys: [selfSignedJwk] }, tls_client_certificate_bound_access_tokens: true, ...cc },
    { client_id: 'mtls', token_endpoint_auth_method: 'tls_client_auth', tls_client_auth_subject_dn: 'CN=token-broker-test', tls_client_certificate_bound_access_tokens: true, ...cc },
    { client_id: 'bearer', token_endpoint_auth_method: 'none', grant_types: [JWT_BEARER], response_types: [], redirect_uris: [] },
  ],
  clientAuthMethods: ['client_secret_jwt', 'private_key_jwt', 'tls_client_auth', 'self_signed_tls_client_auth', 'none'],
  features: {
    clientCredentials: { enabled: true },
    devInteractions: { enabled: false },
    dPoP: { enabled: true, nonceSecret: crypto.randomBytes(32), requireNonce: () => true },
    mTLS: {
      enabled: true,
      tlsClientAuth: true,
      selfSignedTlsClientAuth: true,
      certificateBoundAccessTokens: true,
      getCertificate: (ctx) => ctx.req.socket.getPeerX509Certificate?.() ?? undefined,
      certificateAuthorized: (ctx) => ctx.req.socket.authorized === true,
      certificateSubjectMatches: (ctx, property, expected) =>
        property === 'tls_client_auth_subject_dn'
        && ctx.req.socket.getPeerX509Certificate().subject.trim() === expected.replace(/^CN=/, 'CN='),
    },
  },
  ttl: { ClientCredentials: 600, AccessToken: 600 },
});

// The JWT bearer grant (RFC 7523 §2.1), verified with jose against the tenant's public key.
provider.registerGrantType(JWT_BEARER, async (ctx) => {
  const { assertion } = ctx.oidc.params;
  let payload;
  try {
    ({ payload } = await jose.jwtVerify(assertion, await jose.importJWK(clientJwk, clientJwk.alg), {
      issuer: 'bearer@broker.test', audience: `${issuer}/token`, maxTokenAge: '1h',
    }));
  } catch (e) {
    throw new errors.InvalidGrant(`assertion: ${e.code || e.message}`);
  }
  if (payload.sub !== 'svc@broker.test' || !payload.jti) throw new errors.InvalidGrant('assertion claims');
  const token = new provider.ClientCredentials({ client: ctx.oidc.client, scope: payload.scope || '' });
  ctx.body = { access_token: await token.save(), expires_in: token.expiration, token_type: 'Bearer', scope: payload.scope };
}, ['assertion', 'scope']);

const callback = provider.callback();
http.createServer(callback).listen(httpPort, '127.0.0.1');
const tlsOptions = { cert: read('server.pem'), key: read('server.key'), ca: read('ca.pem'), requestCert: true, rejectUnauthorized: false };
https.createServer(tlsOptions, callback).listen(httpsPort, '127.0.0.1');

// The resource server: GET/POST /api/... answers 200 with what it checked, only for a token
// presented with its proof: a DPoP proof (RS nonce required) for a DPoP-bound token, the
// client certificate for a certificate-bound one. Everything else is 401.
const seenJti = new Set();
let rsNonce = crypto.randomBytes(16).toString('base64url');
const rsHandler = async (req, res) => {
  const deny = (error, extra = {}) => {
    res.writeHead(401, { 'content-type': 'application/json', ...extra });
    res.end(JSON.stringify({ error }));
  };
  try {
    const [scheme, value] = (req.headers.authorization || '').split(' ');
    const token = await provider.ClientCredentials.find(value);
    if (!token) return deny('invalid_token');
    const result = { client: token.clientId, scheme };
    if (token.jkt) {
      if (scheme !== 'DPoP') return deny('invalid_token');
      const proof = req.headers.dpop;
      if (!proof) return deny('invalid_dpop_proof');
      const { jwk, typ } = jose.decodeProtectedHeader(proof);
      const { payload } = await jose.jwtVerify(proof, await jose.importJWK(jwk, 'ES256'), { typ: 'dpop+jwt', maxTokenAge: '60s' });
      const url = new URL(req.url, `http://${req.headers.host}`);
      const htu = `${url.origin}${url.pathname}`;
      const ath = crypto.createHash('sha256').update(value).digest('base64url');
      if (typ !== 'dpop+jwt' || payload.htm !== req.method || payload.htu !== htu || payload.ath !== ath) {
        return deny('invalid_dpop_proof');
      }
      if (await jose.calculateJwkThumbprint(jwk) !== token.jkt) return deny('invalid_dpop_proof');
      if (seenJti.has(payload.jti)) return deny('invalid_dpop_proof');
      seenJti.add(payload.jti);
      if (payload.nonce !== rsNonce) {
        return deny('use_dpop_nonce', { 'dpop-nonce': rsNonce, 'www-authenticate': 'DPoP error="use_dpop_nonce"' });
      }
      result.dpop = { jkt: token.jkt, nonce: true };
    } else if (scheme !== 'Bearer') {
      return deny('invalid_token');
    }
    if (token['x5t#S256']) {
      const cert = req.socket.getPeerX509Certificate?.();
      const x5t = cert && crypto.hash('sha256', cert.raw, 'base64url');
      if (x5t !== token['x5t#S256']) return deny('invalid_token');
      result.mtls = { 'x5t#S256': x5t };
    }
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end(JSON.stringify(result));
  } catch (e) {
    deny('invalid_request', { 'x-error': String(e.code || e.message).slice(0, 100) });
  }
};
// Rotates the RS nonce on demand, so a test can watch the broker follow it.
const rs = (req, res) => {
  if (req.url === '/rotate-nonce') {
    rsNonce = crypto.randomBytes(16).toString('base64url');
    res.end('ok');
    return;
  }
  rsHandler(req, res);
};
http.createServer(rs).listen(rsPort, '127.0.0.1');
https.createServer(tlsOptions, rs).listen(rsTlsPort, '127.0.0.1', () => console.log('ready'));

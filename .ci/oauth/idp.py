"""The test IdP for the OAuth client checks: publishes a JWKS and signs caller JWTs.

    idp.py jwks PUBLIC_PEM KID                      -> JWKS JSON on stdout
    idp.py sign PRIVATE_PEM KID ISS AUD SUB TENANT  -> a signed RS256 JWT on stdout
"""
import json
import warnings

warnings.simplefilter("ignore")  # authlib.jose deprecation notice
import sys
import time

from authlib.jose import JsonWebKey, jwt

cmd = sys.argv[1]
if cmd == "jwks":
    pem, kid = sys.argv[2], sys.argv[3]
    key = JsonWebKey.import_key(open(pem, "rb").read(), {"kty": "RSA"}).as_dict()
    key.update({"kid": kid, "alg": "RS256", "use": "sig"})
    print(json.dumps({"keys": [key]}))
elif cmd == "sign":
    pem, kid, iss, aud, sub, tenant = sys.argv[2:8]
    now = int(time.time())
    claims = {"iss": iss, "aud": aud, "sub": sub, "iat": now, "exp": now + 600, "tenants": [tenant]}
    print(jwt.encode({"alg": "RS256", "kid": kid, "typ": "JWT"}, claims, open(pem, "rb").read()).decode())
else:
    sys.exit(f"unknown command {cmd}")

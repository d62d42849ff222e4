//! Micro-benchmarks of the token path's pieces: API-key verification, JWT verification (full
//! and cached), sealing and opening a cached token, expiry parsing.
//!   cargo bench --bench hot_path

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use token_broker::auth::api_keys::ApiKey;
use token_broker::auth::jwt::{JwtSettings, JwtVerifier};
use token_broker::crypto::KeyRing;
use token_broker::issuers::expiry;

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

fn benches(c: &mut Criterion) {
    let key = ApiKey::generate();
    let presented = key.expose().to_owned();
    c.bench_function("api_key_verify (parse + sha256)", |b| {
        b.iter(|| ApiKey::parse(black_box(&presented)).unwrap().digest())
    });

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let verifier = rt.block_on(async {
        let v = JwtVerifier::new(JwtSettings {
            jwks_url: "http://127.0.0.1:9/unused".into(),
            issuer: "https://idp.example".into(),
            audience: "token-broker".into(),
        });
        let all: serde_json::Value = serde_json::from_slice(&fixture("jwks_keys.json")).unwrap();
        v.load_jwks(&json!({"keys": [all["rsa1"], all["ec1"]]}));
        v
    });
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = json!({"sub": "svc", "iss": "https://idp.example", "aud": "token-broker", "exp": now + 3600, "tenants": "*"});
    let sign = |alg, pem: &str, kid: &str| {
        let mut h = Header::new(alg);
        h.kid = Some(kid.into());
        let k = match alg {
            Algorithm::ES256 => EncodingKey::from_ec_pem(&fixture(pem)).unwrap(),
            _ => EncodingKey::from_rsa_pem(&fixture(pem)).unwrap(),
        };
        jsonwebtoken::encode(&h, &claims, &k).unwrap()
    };
    let rs = sign(Algorithm::RS256, "rsa1.pem", "k1");
    let es = sign(Algorithm::ES256, "ec1.pem", "e1");
    c.bench_function("jwt_verify RS256 (signature)", |b| {
        b.iter(|| {
            rt.block_on(verifier.verify_signature(black_box(&rs)))
                .unwrap()
        })
    });
    c.bench_function("jwt_verify ES256 (signature)", |b| {
        b.iter(|| {
            rt.block_on(verifier.verify_signature(black_box(&es)))
                .unwrap()
        })
    });
    c.bench_function("jwt_verify cached", |b| {
        b.iter(|| rt.block_on(verifier.verify(black_box(&rs))).unwrap())
    });

    let ring = KeyRing::single(&KeyRing::generate_key_b64()).unwrap();
    let token =
        json!({"a": rs, "i": now, "e": now + 3600, "u": now + 3500, "f": now + 2400}).to_string();
    let sealed = ring.seal("acme-setu", "cached_token", token.as_bytes());
    c.bench_function("seal cached token (1 KiB)", |b| {
        b.iter(|| ring.seal("acme-setu", "cached_token", black_box(token.as_bytes())))
    });
    c.bench_function("open cached token (1 KiB)", |b| {
        b.iter(|| {
            ring.open("acme-setu", "cached_token", black_box(&sealed))
                .unwrap()
        })
    });
    c.bench_function("audit fingerprint (HMAC-SHA256)", |b| {
        b.iter(|| ring.fingerprint(black_box(&rs)))
    });
    c.bench_function("expiry: jwt_exp of a partner JWT", |b| {
        b.iter(|| expiry::jwt_exp(black_box(&rs)).unwrap())
    });
}

criterion_group!(hot_path, benches);
criterion_main!(hot_path);

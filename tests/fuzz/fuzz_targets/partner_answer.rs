//! Partner answers: any JSON through every kind's extraction and the expiry computation.
#![no_main]
use libfuzzer_sys::fuzz_target;
use secrecy::ExposeSecret;
use token_broker::issuers::{expiry, recipes};
use token_broker::tenants::IssuerSpec;

fuzz_target!(|data: &[u8]| {
    let Ok(doc) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    for kind in ["setu_partner", "comm100_partner", "oauth2_client_credentials", "oauth2_password"] {
        let spec: IssuerSpec = serde_json::from_value(serde_json::json!({
            "kind": kind, "token_url": "https://p.example.com/t", "default_ttl_seconds": 60
        }))
        .unwrap();
        if let Ok(e) = recipes::extract(&spec, &doc) {
            let exp = expiry::jwt_exp(e.access_token.expose_secret());
            let _ = expiry::expires_at_ms(1_700_000_000_000, e.expires_in, exp, spec.default_ttl_seconds);
        }
    }
});

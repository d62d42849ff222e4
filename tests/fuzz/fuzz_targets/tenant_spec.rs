//! Admin input: any bytes through JSON parsing, spec validation and merge patches.
#![no_main]
use libfuzzer_sys::fuzz_target;
use token_broker::tenants::{TenantPatch, TenantSpec};

fuzz_target!(|data: &[u8]| {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    for insecure in [false, true] {
        if let Ok(spec) = TenantSpec::parse(v.clone(), insecure) {
            if let Ok(patch) = TenantPatch::parse(v.clone()) {
                let _ = patch.merged_issuer(&spec.issuer, insecure);
            }
        }
    }
    if let Ok(patch) = TenantPatch::parse(v) {
        let base = serde_json::json!({"kind": "setu_partner", "token_url": "https://p.example.com/t"});
        let base = serde_json::from_value(base).unwrap();
        let _ = patch.merged_issuer(&base, false);
    }
});

//! Custom recipes: templates and JSON pointers from arbitrary input, rendered and applied.
#![no_main]
use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use token_broker::issuers::recipes;
use token_broker::tenants::template;
use token_broker::tenants::{Credentials, Tenant, TenantId};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let creds = Credentials::new(BTreeMap::from([
        ("client_id".to_string(), "id{{x}}".to_string().into()),
        ("secret".to_string(), "s%&=\"".to_string().into()),
    ]));
    let _ = template::placeholders(&text);
    let _ = template::render(&text, &creds);
    // Split the input into a recipe part and an answer part.
    let mut parts = text.splitn(2, '\u{0}');
    let (recipe, answer) = (parts.next().unwrap_or(""), parts.next().unwrap_or("{}"));
    let Ok(issuer) = serde_json::from_str::<serde_json::Value>(recipe) else { return };
    let Ok(issuer) = serde_json::from_value::<token_broker::tenants::IssuerSpec>(issuer) else { return };
    if issuer.validate(true).is_err() || issuer.validate_credentials(&creds).is_err() {
        return;
    }
    let tenant = Tenant {
        id: TenantId::parse("fuzz").unwrap(),
        display_name: "fuzz".into(),
        issuer,
        credentials: creds,
        proxy: None,
        proxy_headers: Default::default(),
        version: 1,
        created_at_ms: 0,
        updated_at_ms: 0,
    };
    let _ = recipes::prepare(&tenant, &recipes::Grant::Initial);
    if let Ok(doc) = serde_json::from_str::<serde_json::Value>(answer) {
        let _ = recipes::extract(&tenant.issuer, &doc);
    }
});

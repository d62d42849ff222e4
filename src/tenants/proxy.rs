//! A tenant's proxy settings: where callers' API requests are forwarded with the tenant's token
//! (`base_url`), fixed headers the partner wants on every call (values are secrets: sealed
//! like credentials, never shown), the timeout and the body cap. Stored without the header
//! values (`ProxySpec` names them); the values travel separately as `Credentials`.

use std::collections::BTreeMap;

use reqwest::header::{HeaderName, HeaderValue};
use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::spec::SpecError;
use super::Credentials;
use crate::egress as guard;

/// Default cap on a proxied request body.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 10 * 1024 * 1024;
/// The largest cap a tenant may set.
pub const MAX_MAX_BODY_BYTES: u64 = 1024 * 1024 * 1024;
/// Default cap on a proxied answer's body, and the largest a tenant may set.
pub const DEFAULT_MAX_RESPONSE_BYTES: u64 = 64 * 1024 * 1024;
pub const MAX_MAX_RESPONSE_BYTES: u64 = 4 * 1024 * 1024 * 1024;
/// Default deadline for a whole proxied answer (head and body), and its bounds.
pub const DEFAULT_RESPONSE_TIMEOUT_MS: u64 = 60_000;
const RESPONSE_TIMEOUT_MS: std::ops::RangeInclusive<u64> = 100..=3_600_000;
/// Fixed headers per tenant.
const MAX_HEADERS: usize = 32;

/// Headers that never cross the proxy in either direction (RFC 9110 §7.6.1 hop-by-hop, and
/// framing the HTTP stacks set themselves).
pub const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "host",
];

/// Headers a tenant may not fix: the hop-by-hop ones and the request id the broker sets.
fn reserved(name: &str) -> bool {
    HOP_BY_HOP.contains(&name) || name == "x-request-id"
}

/// The stored, shown proxy settings: no secret values.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProxySpec {
    pub base_url: String,
    /// Names (lower case) of the fixed headers; their values are sealed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub header_names: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_body_bytes: Option<u64>,
    /// Cap on the partner's answer body (default 64 MiB): a longer one is cut off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_response_bytes: Option<u64>,
    /// Deadline for the whole answer, body included (default 60 s): then it is cut off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_timeout_ms: Option<u64>,
    /// The header carrying the token (default `authorization`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_header: Option<String>,
    /// The scheme before the token (default `Bearer`; empty: the bare token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_scheme: Option<String>,
}

impl ProxySpec {
    pub fn max_body_bytes(&self) -> u64 {
        self.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES)
    }

    pub fn max_response_bytes(&self) -> u64 {
        self.max_response_bytes
            .unwrap_or(DEFAULT_MAX_RESPONSE_BYTES)
    }

    pub fn response_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(
            self.response_timeout_ms
                .unwrap_or(DEFAULT_RESPONSE_TIMEOUT_MS),
        )
    }

    pub fn auth_header(&self) -> HeaderName {
        self.auth_header
            .as_deref()
            .and_then(|h| HeaderName::from_bytes(h.as_bytes()).ok())
            .unwrap_or(reqwest::header::AUTHORIZATION)
    }

    /// The value of the auth header for `token`.
    pub fn auth_value(&self, token: &str) -> Option<HeaderValue> {
        let mut v = match self.auth_scheme.as_deref() {
            Some("") => HeaderValue::from_str(token),
            Some(s) => HeaderValue::from_str(&format!("{s} {token}")),
            None => HeaderValue::from_str(&format!("Bearer {token}")),
        }
        .ok()?;
        v.set_sensitive(true);
        Some(v)
    }

    /// Long because it is one check per proxy setting, in the spec's order.
    fn validate(&self, allow_insecure: bool) -> Result<(), SpecError> {
        let url = guard::check_token_url(&self.base_url, allow_insecure)
            .map_err(|e| SpecError::new("proxy.base_url", e.to_string()))?;
        if url.query().is_some() {
            return Err(SpecError::new(
                "proxy.base_url",
                "must not carry a query string",
            ));
        }
        if self
            .timeout_ms
            .is_some_and(|t| !(100..=300_000).contains(&t))
        {
            return Err(SpecError::new(
                "proxy.timeout_ms",
                "must be between 100 and 300000",
            ));
        }
        if self.max_body_bytes.is_some_and(|b| b > MAX_MAX_BODY_BYTES) {
            return Err(SpecError::new(
                "proxy.max_body_bytes",
                format!("must be between 0 and {MAX_MAX_BODY_BYTES}"),
            ));
        }
        if self
            .max_response_bytes
            .is_some_and(|b| b > MAX_MAX_RESPONSE_BYTES)
        {
            return Err(SpecError::new(
                "proxy.max_response_bytes",
                format!("must be between 0 and {MAX_MAX_RESPONSE_BYTES}"),
            ));
        }
        if self
            .response_timeout_ms
            .is_some_and(|t| !RESPONSE_TIMEOUT_MS.contains(&t))
        {
            return Err(SpecError::new(
                "proxy.response_timeout_ms",
                format!(
                    "must be between {} and {}",
                    RESPONSE_TIMEOUT_MS.start(),
                    RESPONSE_TIMEOUT_MS.end()
                ),
            ));
        }
        if let Some(h) = &self.auth_header {
            let name = header_name(h, "proxy.auth_header")?;
            if reserved(name.as_str()) {
                return Err(SpecError::new(
                    "proxy.auth_header",
                    "names a header the broker sets itself",
                ));
            }
        }
        if let Some(s) = &self.auth_scheme {
            if s.len() > 64
                || !s
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            {
                return Err(SpecError::new(
                    "proxy.auth_scheme",
                    "must be at most 64 letters, digits, '-', '_' or '.' (empty: the bare token)",
                ));
            }
        }
        Ok(())
    }
}

fn header_name(raw: &str, field: &str) -> Result<HeaderName, SpecError> {
    HeaderName::from_bytes(raw.as_bytes())
        .map_err(|_| SpecError::new(field, "is not a valid HTTP header name"))
}

/// Applies a `proxy` value from a create (`current` is `None`) or an RFC 7386 merge patch
/// (`null` removes the proxy; `headers` merges per name, `null` removing one) and validates
/// the result. Header values are never echoed in errors.
pub fn apply(
    current: Option<(&ProxySpec, &Credentials)>,
    patch: &Value,
    allow_insecure: bool,
) -> Result<Option<(ProxySpec, Credentials)>, SpecError> {
    let obj: &Map<String, Value> = match patch {
        Value::Null => return Ok(None),
        Value::Object(o) => o,
        _ => return Err(SpecError::new("proxy", "must be a JSON object or null")),
    };
    let doc = merged_settings(current.map(|(spec, _)| spec), obj)?;
    let headers = merged_headers(current.map(|(_, h)| h), obj)?;
    // The field is the path serde stopped at (the unknown name itself, for an unknown one).
    let mut spec: ProxySpec = serde_path_to_error::deserialize(doc).map_err(|e| {
        let field = match super::spec::dotted_path(e.path()).as_str() {
            "." => "proxy".to_owned(),
            path => format!("proxy.{path}"),
        };
        SpecError::new(field, "unknown field or wrong type; expected base_url, headers, timeout_ms, max_body_bytes, max_response_bytes, response_timeout_ms, auth_header, auth_scheme")
    })?;
    spec.header_names = headers.keys().cloned().collect();
    check_auth_header(&spec)?;
    spec.validate(allow_insecure)?;
    Ok(Some((spec, Credentials::new(headers))))
}

/// The settings with the patch merged in (RFC 7386: `null` removes a setting); `headers` are
/// merged apart (`merged_headers`), `header_names` is read-only, `base_url` must remain.
fn merged_settings(
    current: Option<&ProxySpec>,
    obj: &Map<String, Value>,
) -> Result<Value, SpecError> {
    let mut doc = match current {
        Some(spec) => serde_json::to_value(spec).expect("spec serialises"),
        None => Value::Object(Map::new()),
    };
    let fields = doc.as_object_mut().expect("object");
    fields.remove("header_names");
    for (k, v) in obj {
        match k.as_str() {
            "headers" => {}
            "header_names" => {
                return Err(SpecError::new(
                    "proxy.header_names",
                    "is read-only: set headers instead",
                ))
            }
            _ if v.is_null() => {
                fields.remove(k);
            }
            _ => {
                fields.insert(k.clone(), v.clone());
            }
        }
    }
    if !fields.contains_key("base_url") {
        return Err(SpecError::new("proxy.base_url", "missing field"));
    }
    Ok(doc)
}

/// The fixed headers with the patch's merged in per name (`null` removes one): names the
/// broker sets or strips are refused, values must be valid header values.
fn merged_headers(
    current: Option<&Credentials>,
    obj: &Map<String, Value>,
) -> Result<BTreeMap<String, SecretString>, SpecError> {
    let mut headers: BTreeMap<String, SecretString> = current
        .map(|h| h.iter().map(|(k, v)| (k.to_owned(), v.clone())).collect())
        .unwrap_or_default();
    let patch = match obj.get("headers") {
        None | Some(Value::Null) => return Ok(headers),
        Some(Value::Object(h)) => h,
        Some(_) => return Err(SpecError::new("proxy.headers", "must be a JSON object")),
    };
    for (name, value) in patch {
        let field = format!(
            "proxy.headers.{}",
            name.chars().take(64).collect::<String>()
        );
        let name = header_name(name, &field)?.as_str().to_owned();
        if reserved(&name) || name.starts_with("proxy-") || name == "cookie" {
            return Err(SpecError::new(
                field,
                "names a header the broker sets or strips",
            ));
        }
        match value {
            Value::Null => {
                headers.remove(&name);
            }
            Value::String(s)
                if !s.is_empty() && s.len() <= 8192 && HeaderValue::from_str(s).is_ok() =>
            {
                headers.insert(name, SecretString::from(s.clone()));
            }
            _ => {
                return Err(SpecError::new(
                    field,
                    "must be a non-empty header value of at most 8192 bytes, or null",
                ))
            }
        }
    }
    if headers.len() > MAX_HEADERS {
        return Err(SpecError::new(
            "proxy.headers",
            format!("at most {MAX_HEADERS} headers"),
        ));
    }
    Ok(headers)
}

/// No fixed header may be the auth header (it carries the tenant's token).
fn check_auth_header(spec: &ProxySpec) -> Result<(), SpecError> {
    if let Some(h) = &spec.auth_header {
        if spec.header_names.iter().any(|n| n.eq_ignore_ascii_case(h)) {
            return Err(SpecError::new(
                "proxy.headers",
                "a fixed header cannot be the auth header",
            ));
        }
    } else if spec.header_names.iter().any(|n| n == "authorization") {
        return Err(SpecError::new(
            "proxy.headers.authorization",
            "is the auth header: it carries the tenant's token",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn create(v: Value) -> Result<(ProxySpec, Credentials), SpecError> {
        apply(None, &v, false).map(|o| o.unwrap())
    }

    #[test]
    fn create_patch_and_remove() {
        let (spec, headers) = create(json!({
            "base_url": "https://api.partner.example.com/v2",
            "headers": {"X-Product-Instance-Id": "secret-instance"},
            "timeout_ms": 5000
        }))
        .unwrap();
        assert_eq!(spec.header_names, vec!["x-product-instance-id"]);
        assert_eq!(
            headers.get("x-product-instance-id"),
            Some("secret-instance")
        );
        assert_eq!(spec.max_body_bytes(), DEFAULT_MAX_BODY_BYTES);
        let (patched, h2) = apply(
            Some((&spec, &headers)),
            &json!({"headers": {"x-product-instance-id": null, "x-extra": "v"}, "timeout_ms": null}),
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!(patched.header_names, vec!["x-extra"]);
        assert_eq!(patched.timeout_ms, None);
        assert_eq!(patched.base_url, spec.base_url);
        assert!(h2.get("x-product-instance-id").is_none());
        assert!(apply(Some((&spec, &headers)), &Value::Null, false)
            .unwrap()
            .is_none());
    }

    #[test]
    fn refusals_name_the_field_never_the_value() {
        for (v, field) in [
            (json!({"headers": {}}), "proxy.base_url"),
            (
                json!({"base_url": "http://api.example.com"}),
                "proxy.base_url",
            ),
            (
                json!({"base_url": "https://10.0.0.1/api"}),
                "proxy.base_url",
            ),
            (
                json!({"base_url": "https://api.example.com/?a=1"}),
                "proxy.base_url",
            ),
            (
                json!({"base_url": "https://api.example.com", "headers": {"Host": "planted"}}),
                "proxy.headers.Host",
            ),
            (
                json!({"base_url": "https://api.example.com", "headers": {"authorization": "planted"}}),
                "proxy.headers.authorization",
            ),
            (
                json!({"base_url": "https://api.example.com", "headers": {"x-a": "bad\nplanted"}}),
                "proxy.headers.x-a",
            ),
            (
                json!({"base_url": "https://api.example.com", "timeout_ms": 5}),
                "proxy.timeout_ms",
            ),
            (
                json!({"base_url": "https://api.example.com", "max_body_bytes": 1u64 << 40}),
                "proxy.max_body_bytes",
            ),
            (
                json!({"base_url": "https://api.example.com", "auth_header": "Content-Length"}),
                "proxy.auth_header",
            ),
            (
                json!({"base_url": "https://api.example.com", "auth_scheme": "Bearer planted x"}),
                "proxy.auth_scheme",
            ),
            (
                json!({"base_url": "https://api.example.com", "nope": 1}),
                "proxy.nope",
            ),
            (json!("planted"), "proxy"),
        ] {
            let e = apply(None, &v, false).unwrap_err();
            assert_eq!(e.field, field, "{v}");
            assert!(!e.to_string().contains("planted"), "{e}");
        }
    }

    #[test]
    fn the_auth_header_value() {
        let (mut spec, _) = create(json!({"base_url": "https://api.example.com"})).unwrap();
        assert_eq!(spec.auth_value("t").unwrap(), "Bearer t");
        spec.auth_scheme = Some(String::new());
        assert_eq!(spec.auth_value("t").unwrap(), "t");
        spec.auth_header = Some("X-Api-Token".into());
        assert_eq!(spec.auth_header().as_str(), "x-api-token");
    }
}

//! The admin API's answers as the CLI reads them for its tables: typed after openapi.yaml, so
//! an answer without a field the CLI shows fails loudly (naming the field) instead of printing
//! `0` or `-`. Fields the CLI does not show are not listed, so a newer broker's additions are
//! fine. JSON and YAML output print the answer as it came.

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

use super::client::Failure;

/// Reads `v` as `T`, or says which field of which answer did not fit.
pub fn read<T: DeserializeOwned>(v: &Value, what: &str) -> Result<T, Failure> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        Failure::Unreachable(format!(
            "the broker's {what} does not have the shape this CLI reads (at `{}`: {}); is the CLI older or newer than the broker?",
            e.path(),
            e.inner()
        ))
    })
}

/// An element of an answer as it came (what JSON and YAML output print) and as the table
/// reads it: read once, both ways.
pub struct AsSent<T> {
    pub raw: Value,
    pub typed: T,
}

impl<'de, T: DeserializeOwned> Deserialize<'de> for AsSent<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = Value::deserialize(d)?;
        let typed = T::deserialize(&raw).map_err(serde::de::Error::custom)?;
        Ok(Self { raw, typed })
    }
}

/// `GET /admin/v1/tenants/{id}` (and each row of the list).
#[derive(Deserialize)]
pub struct Tenant {
    pub id: String,
    pub display_name: String,
    pub issuer: Issuer,
    pub credential_fields: Vec<String>,
    pub version: i64,
    pub updated_at: String,
    /// Present in the list and in a single tenant's view.
    pub health: Health,
}

#[derive(Deserialize)]
pub struct Issuer {
    pub kind: String,
    pub token_url: String,
    /// Absent or null for the kind's default client authentication.
    #[serde(default)]
    pub auth_method: Option<String>,
}

/// A tenant's health (openapi `Health`).
#[derive(Deserialize)]
pub struct Health {
    pub state: String,
    pub last_success_at: Option<String>,
    pub last_error: Option<LastError>,
    pub circuit: Option<Circuit>,
    pub token: Option<HeldToken>,
    pub mints_last_hour: u64,
}

#[derive(Deserialize)]
pub struct LastError {
    pub at: String,
    pub code: Option<String>,
    pub detail: Option<String>,
}

#[derive(Deserialize)]
pub struct Circuit {
    pub open: bool,
    pub failures: u64,
    pub retry_after: Option<u64>,
    pub probed: bool,
}

#[derive(Deserialize)]
pub struct HeldToken {
    pub expires_in: i64,
}

/// `GET /admin/v1/tenants`: one page.
#[derive(Deserialize)]
pub struct TenantPage {
    pub tenants: Vec<AsSent<Tenant>>,
    pub next_after: Option<String>,
}

/// A tenant just created or changed.
#[derive(Deserialize)]
pub struct Written {
    pub id: String,
    pub version: i64,
}

/// `POST /admin/v1/tenants/{id}/test`.
#[derive(Deserialize)]
pub struct TestResult {
    pub expires_in: i64,
    pub expires_at: String,
}

/// A caller (openapi `Caller`); `api_key` only when just created or rotated.
#[derive(Deserialize)]
pub struct Caller {
    pub id: String,
    pub name: String,
    pub tenants: Scope,
    #[serde(default)]
    pub created_at: Option<String>,
    #[serde(default)]
    pub api_key: Option<String>,
    #[serde(default)]
    pub previous_key_expires_at: Option<String>,
}

/// `"*"` or tenant ids.
#[derive(Deserialize)]
#[serde(untagged)]
pub enum Scope {
    All(String),
    Tenants(Vec<String>),
}

impl Scope {
    pub fn text(&self) -> String {
        match self {
            Self::All(s) => s.clone(),
            Self::Tenants(ids) => ids.join(","),
        }
    }
}

/// `GET /admin/v1/callers`.
#[derive(Deserialize)]
pub struct Callers {
    pub callers: Vec<Caller>,
}

/// One audit row (openapi `AuditEntry`).
#[derive(Deserialize)]
pub struct AuditEntry {
    pub id: i64,
    pub at: String,
    pub count: i64,
    pub action: String,
    pub outcome: String,
    pub caller: Option<String>,
    pub tenant: Option<String>,
    pub detail: Option<String>,
}

/// `GET /admin/v1/audit`: one page, newest first.
#[derive(Deserialize)]
pub struct AuditPage {
    pub entries: Vec<AsSent<AuditEntry>>,
}

/// `GET /admin/v1/kinds`.
#[derive(Deserialize)]
pub struct Kinds {
    pub kinds: Vec<Kind>,
}

#[derive(Deserialize)]
pub struct Kind {
    pub kind: String,
    pub form: bool,
    /// `null` for `custom` (any names its templates use).
    pub credentials: Option<Vec<CredentialField>>,
    pub auth_methods: Vec<AuthMethod>,
}

#[derive(Deserialize)]
pub struct AuthMethod {
    pub method: String,
    pub credentials: Vec<CredentialField>,
}

#[derive(Deserialize)]
pub struct CredentialField {
    pub name: String,
    pub required: bool,
    pub input: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_renamed_field_fails_naming_it() {
        let health = json!({"state": "ok", "last_success_at": null, "last_error": null,
            "circuit": null, "token": {"expires_in": 60}, "mints": 3});
        let err = read::<Health>(&health, "tenant health").err().unwrap();
        let text = err.to_string();
        assert!(text.contains("mints_last_hour"), "{text}");
        assert!(text.contains("tenant health"), "{text}");
    }

    #[test]
    fn scopes_and_optional_fields() {
        let c: Caller = read(
            &json!({"id": "cl_1", "name": "a", "tenants": ["x", "y"], "created_at": "t"}),
            "caller",
        )
        .unwrap();
        assert_eq!(c.tenants.text(), "x,y");
        assert!(c.api_key.is_none());
        let c: Caller = read(
            &json!({"id": "cl_1", "name": "a", "tenants": "*", "api_key": "k"}),
            "caller",
        )
        .unwrap();
        assert_eq!(c.tenants.text(), "*");
    }
}

//! Tenants: the validated `TenantId`, the issuer spec (no secrets), the credentials (only
//! secrets) and the parsing that turns admin input into them.

pub mod health;
pub mod proxy;
pub mod spec;
pub mod store;
pub mod template;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;

pub use health::{Health, HealthStore};
pub use spec::{
    AuthMethod, BodyType, CustomRequest, CustomResponse, IssuerKind, IssuerSpec, SpecError,
    TenantPatch, TenantSpec,
};
pub use store::{Entity, StoreError, TenantStore};

/// A tenant id: `[a-z0-9][a-z0-9._-]{0,63}`. Cheap to clone (shared string).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantId(Arc<str>);

#[derive(Debug, thiserror::Error)]
#[error("tenant id must match [a-z0-9][a-z0-9._-]{{0,63}}")]
pub struct InvalidTenantId;

impl TenantId {
    pub fn parse(s: &str) -> Result<Self, InvalidTenantId> {
        let b = s.as_bytes();
        let ok = (1..=64).contains(&b.len())
            && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
            && b.iter().all(|&c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'_' | b'-')
            });
        if ok {
            Ok(Self(Arc::from(s)))
        } else {
            Err(InvalidTenantId)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The id as a shared string (a reference count, no copy).
    pub fn shared(&self) -> Arc<str> {
        self.0.clone()
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TenantId({})", &self.0)
    }
}

impl Serialize for TenantId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

/// A tenant's named credential values. Values never leave memory unsealed and `Debug`
/// prints only the field names.
#[derive(Clone, Default)]
pub struct Credentials(BTreeMap<String, SecretString>);

impl Credentials {
    pub fn new(fields: BTreeMap<String, SecretString>) -> Self {
        Self(fields)
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(|s| s.expose_secret())
    }

    pub fn insert(&mut self, name: &str, value: SecretString) {
        self.0.insert(name.to_owned(), value);
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &SecretString)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v))
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.keys().map(|k| (k, "[REDACTED]")))
            .finish()
    }
}

/// A stored tenant: public settings plus its credentials (opened, in memory only).
#[derive(Clone, Debug)]
pub struct Tenant {
    pub id: TenantId,
    pub display_name: String,
    pub issuer: IssuerSpec,
    pub credentials: Credentials,
    pub proxy: Option<proxy::ProxySpec>,
    /// The proxy's fixed header values (lower-case names).
    pub proxy_headers: Credentials,
    pub version: i64,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_id_accepts_valid() {
        for ok in ["a", "acme-setu", "0.x_y-z", &"a".repeat(64)] {
            assert!(TenantId::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn tenant_id_rejects_invalid() {
        for bad in [
            "",
            "-a",
            ".a",
            "_a",
            "Acme",
            "a b",
            "a/b",
            "a:b",
            "é",
            &"a".repeat(65),
            "{a}",
        ] {
            assert!(TenantId::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn credentials_debug_redacts() {
        let c = Credentials::new(BTreeMap::from([(
            "client_secret".to_string(),
            SecretString::from("hunter2"),
        )]));
        let dbg = format!("{c:?}");
        assert!(dbg.contains("client_secret") && !dbg.contains("hunter2"));
    }
}

//! Token caches: the in-process cache (`memory`) and the shared Redis cache (`redis`), behind
//! one `TokenCache` trait chosen once at start.

pub mod memory;
pub mod redis;

use std::sync::Arc;

use async_trait::async_trait;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

use crate::issuers::expiry::skew_ms;
use crate::issuers::Minted;
use crate::tenants::TenantId;

/// A token as the broker keeps it.
pub struct CachedToken {
    pub access_token: SecretString,
    pub refresh_token: Option<SecretString>,
    /// When the partner was asked (unix ms).
    pub issued_at_ms: i64,
    /// The partner's expiry (unix ms).
    pub expires_at_ms: i64,
    /// After this the token is no longer handed out (`expires_at - skew`).
    pub usable_until_ms: i64,
    /// After this a fetch triggers a renewal.
    pub refresh_at_ms: i64,
}

impl CachedToken {
    /// Works out the usable end and refresh point of a fresh token.
    pub fn from_minted(m: Minted) -> Self {
        let lifetime = (m.expires_at_ms - m.issued_at_ms).max(0);
        let usable_until_ms = m.expires_at_ms - skew_ms(lifetime);
        let refresh_at_ms = (m.issued_at_ms + lifetime * 2 / 3).min(usable_until_ms);
        Self {
            access_token: m.access_token,
            refresh_token: m.refresh_token,
            issued_at_ms: m.issued_at_ms,
            expires_at_ms: m.expires_at_ms,
            usable_until_ms,
            refresh_at_ms,
        }
    }

    /// Whether it may be handed out at `now` to a caller that needs `min_ttl_ms` left.
    pub fn serves(&self, now_ms: i64, min_ttl_ms: i64) -> bool {
        now_ms < self.usable_until_ms && self.expires_at_ms - now_ms >= min_ttl_ms
    }

    /// A short fingerprint of the access token (hex SHA-256, 128 bits), for compare-and-delete.
    pub fn fingerprint(&self) -> String {
        fingerprint(self.access_token.expose_secret())
    }
}

impl std::fmt::Debug for CachedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedToken")
            .field("expires_at_ms", &self.expires_at_ms)
            .field("usable_until_ms", &self.usable_until_ms)
            .finish_non_exhaustive()
    }
}

/// Hex of the first 16 bytes of SHA-256(token).
pub fn fingerprint(token: &str) -> String {
    hex::encode(&Sha256::digest(token.as_bytes())[..16])
}

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("the shared cache is unavailable")]
    Unavailable(#[source] ::redis::RedisError),
}

/// Where tokens are kept between fetches.
#[async_trait]
pub trait TokenCache: Send + Sync {
    /// The token for `tenant`, if one is held and still usable.
    async fn get(&self, tenant: &TenantId) -> Result<Option<Arc<CachedToken>>, CacheError>;
    /// Stores `token` until its usable end.
    async fn put(&self, tenant: &TenantId, token: Arc<CachedToken>) -> Result<(), CacheError>;
    /// Drops the tenant's token.
    async fn remove(&self, tenant: &TenantId) -> Result<(), CacheError>;
    /// Drops the tenant's token only if it is still `access_token`; true if dropped.
    async fn remove_if_current(
        &self,
        tenant: &TenantId,
        access_token: &str,
    ) -> Result<bool, CacheError>;
    /// Whether the backing store answers.
    async fn ping(&self) -> Result<(), CacheError>;
}

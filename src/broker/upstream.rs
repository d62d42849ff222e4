//! What a mint needs from below the broker: the tenant as stored (its credentials sealed),
//! the partner's answer, and a place to record how the partner did. In the service this is
//! `Backends` (the database and `Issuers`); the broker's unit tests put a scripted partner
//! here, so flights run under a paused clock with no network or database in the way.

use std::time::Duration;

use futures_util::future::BoxFuture;

use crate::issuers::{Grant, IssuerError, Issuers, Minted};
use crate::tenants::store::{SealedTenant, StoreError, TenantRecord};
use crate::tenants::{HealthStore, Tenant, TenantId, TenantStore};

pub trait Upstream: Send + Sync {
    /// The tenant's row, its credentials still sealed (safe to keep in memory).
    fn sealed_tenant<'a>(
        &'a self,
        id: &'a TenantId,
    ) -> BoxFuture<'a, Result<SealedTenant, StoreError>>;
    /// Opens a sealed tenant's credentials, for one mint.
    fn open_tenant(&self, sealed: &SealedTenant) -> Result<Tenant, StoreError>;
    /// The tenant's public record (no credentials).
    fn tenant_record<'a>(
        &'a self,
        id: &'a TenantId,
    ) -> BoxFuture<'a, Result<TenantRecord, StoreError>>;
    /// One partner call, given up after `timeout`.
    fn mint<'a>(
        &'a self,
        tenant: &'a Tenant,
        grant: Grant<'a>,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Minted, IssuerError>>;
    /// Records a mint's outcome for the tenant's health (`None`: success; else code and
    /// detail). Never fails the mint.
    fn record_health<'a>(
        &'a self,
        id: &'a TenantId,
        error: Option<(&'a str, &'a str)>,
    ) -> BoxFuture<'a, ()>;
}

/// The service's upstream: tenants and health in the database, partners over HTTPS.
pub struct Backends {
    pub store: TenantStore,
    pub health: HealthStore,
    pub issuers: Issuers,
}

impl Upstream for Backends {
    fn sealed_tenant<'a>(
        &'a self,
        id: &'a TenantId,
    ) -> BoxFuture<'a, Result<SealedTenant, StoreError>> {
        Box::pin(self.store.sealed_tenant(id))
    }

    fn open_tenant(&self, sealed: &SealedTenant) -> Result<Tenant, StoreError> {
        self.store.open_tenant(sealed)
    }

    fn tenant_record<'a>(
        &'a self,
        id: &'a TenantId,
    ) -> BoxFuture<'a, Result<TenantRecord, StoreError>> {
        Box::pin(self.store.tenant_record(id))
    }

    fn mint<'a>(
        &'a self,
        tenant: &'a Tenant,
        grant: Grant<'a>,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Minted, IssuerError>> {
        Box::pin(self.issuers.mint(tenant, grant, timeout))
    }

    fn record_health<'a>(
        &'a self,
        id: &'a TenantId,
        error: Option<(&'a str, &'a str)>,
    ) -> BoxFuture<'a, ()> {
        Box::pin(self.health.record(id, error))
    }
}

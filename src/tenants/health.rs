//! The health repository: the outcome of each tenant's latest partner calls, as the admin API
//! shows it. Written by the broker after every mint; never fails a mint.

use sqlx::Row;

use super::TenantId;
use crate::db::{Db, StoreError};
use crate::time::now_ms;

/// The outcome of a tenant's latest partner calls.
#[derive(Clone, Debug, Default)]
pub struct Health {
    pub last_success_at_ms: Option<i64>,
    pub last_error_at_ms: Option<i64>,
    pub last_error_code: Option<String>,
    pub last_error_detail: Option<String>,
}

/// Tenant health in the database.
#[derive(Clone)]
pub struct HealthStore {
    db: Db,
}

impl HealthStore {
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    /// Records the outcome of a mint (`None`: success; else the problem code and an
    /// operator-facing detail). Failures to record are only logged: bookkeeping must not fail
    /// a mint.
    pub async fn record(&self, id: &TenantId, error: Option<(&str, &str)>) {
        let now = now_ms();
        let result = match error {
            None => {
                sqlx::query(
                    "INSERT INTO tenant_health (tenant_id, last_success_at) VALUES ($1, $2) ON CONFLICT (tenant_id) DO UPDATE SET last_success_at = excluded.last_success_at",
                )
                .bind(id.as_str())
                .bind(now)
                .execute(self.db.pool())
                .await
            }
            Some(e) => {
                sqlx::query(
                    "INSERT INTO tenant_health (tenant_id, last_error_at, last_error_code, last_error_detail) VALUES ($1, $2, $3, $4) ON CONFLICT (tenant_id) DO UPDATE SET last_error_at = excluded.last_error_at, last_error_code = excluded.last_error_code, last_error_detail = excluded.last_error_detail",
                )
                .bind(id.as_str())
                .bind(now)
                .bind(e.0)
                .bind(e.1)
                .execute(self.db.pool())
                .await
            }
        };
        if let Err(e) = result {
            tracing::debug!(tenant = %id, error = %e, "tenant health not recorded");
        }
    }

    /// The tenant's last partner outcomes.
    pub async fn get(&self, id: &TenantId) -> Result<Health, StoreError> {
        let row = sqlx::query(
            "SELECT last_success_at, last_error_at, last_error_code, last_error_detail FROM tenant_health WHERE tenant_id = $1",
        )
        .bind(id.as_str())
        .fetch_optional(self.db.pool())
        .await?;
        let Some(r) = row else {
            return Ok(Health::default());
        };
        Ok(Health {
            last_success_at_ms: r.try_get("last_success_at")?,
            last_error_at_ms: r.try_get("last_error_at")?,
            last_error_code: r.try_get("last_error_code")?,
            last_error_detail: r.try_get("last_error_detail")?,
        })
    }
}

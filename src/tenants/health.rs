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
    /// Successful partner calls in the last hour, across replicas.
    pub mints_last_hour: i64,
    /// Failed partner calls in the last hour, across replicas.
    pub failed_mints_last_hour: i64,
}

const MINUTE_MS: i64 = 60_000;
const HOUR_MS: i64 = 3_600_000;

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
    /// a mint, and while the database fails it costs the mint one attempt, not three.
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
            // The database is failing: the count would wait for it too, on the mint's path.
            tracing::debug!(tenant = %id, error = %e, "tenant health not recorded");
            return;
        }
        if let Err(e) = self.count(id, error.is_none(), now).await {
            tracing::debug!(tenant = %id, error = %e, "mint not counted");
        }
    }

    /// Adds one partner call to the tenant's minute and prunes its rows older than two hours.
    async fn count(&self, id: &TenantId, ok: bool, now: i64) -> Result<(), sqlx::Error> {
        let minute = now - now.rem_euclid(MINUTE_MS);
        let (ok, failed) = (i64::from(ok), i64::from(!ok));
        sqlx::query(
            "INSERT INTO tenant_mints (tenant_id, minute, ok, failed) VALUES ($1, $2, $3, $4) ON CONFLICT (tenant_id, minute) DO UPDATE SET ok = tenant_mints.ok + excluded.ok, failed = tenant_mints.failed + excluded.failed",
        )
        .bind(id.as_str())
        .bind(minute)
        .bind(ok)
        .bind(failed)
        .execute(self.db.pool())
        .await?;
        sqlx::query("DELETE FROM tenant_mints WHERE tenant_id = $1 AND minute < $2")
            .bind(id.as_str())
            .bind(now - 2 * HOUR_MS)
            .execute(self.db.pool())
            .await?;
        Ok(())
    }

    /// (successful, failed) partner calls in the hour before `now`, by whole minutes.
    async fn counts(&self, id: &TenantId, now: i64) -> Result<(i64, i64), StoreError> {
        let since = now - HOUR_MS;
        let since = since - since.rem_euclid(MINUTE_MS);
        // At most 61 rows (one per minute), summed here: SQL's SUM has a different type per
        // backend.
        let rows = sqlx::query(
            "SELECT ok, failed FROM tenant_mints WHERE tenant_id = $1 AND minute >= $2",
        )
        .bind(id.as_str())
        .bind(since)
        .fetch_all(self.db.pool())
        .await?;
        let mut sums = (0, 0);
        for r in rows {
            sums.0 += r.try_get::<i64, _>("ok")?;
            sums.1 += r.try_get::<i64, _>("failed")?;
        }
        Ok(sums)
    }

    /// The tenant's last partner outcomes.
    pub async fn get(&self, id: &TenantId) -> Result<Health, StoreError> {
        let (mints_last_hour, failed_mints_last_hour) = self.counts(id, now_ms()).await?;
        let row = sqlx::query(
            "SELECT last_success_at, last_error_at, last_error_code, last_error_detail FROM tenant_health WHERE tenant_id = $1",
        )
        .bind(id.as_str())
        .fetch_optional(self.db.pool())
        .await?;
        let Some(r) = row else {
            return Ok(Health {
                mints_last_hour,
                failed_mints_last_hour,
                ..Health::default()
            });
        };
        Ok(Health {
            last_success_at_ms: r.try_get("last_success_at")?,
            last_error_at_ms: r.try_get("last_error_at")?,
            last_error_code: r.try_get("last_error_code")?,
            last_error_detail: r.try_get("last_error_detail")?,
            mints_last_hour,
            failed_mints_last_hour,
        })
    }
}

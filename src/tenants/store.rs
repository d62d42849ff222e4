//! The tenant and caller store on sqlx's `Any` driver: one implementation for SQLite and
//! Postgres (the SQL here is the subset both speak), migrations chosen from `DATABASE_URL`.
//! Credentials are sealed before they reach SQL and opened after they leave it.

use std::collections::BTreeMap;
use std::sync::Arc;

use secrecy::{ExposeSecret, SecretString};
use sqlx::any::AnyRow;
use sqlx::Row;

use super::{Credentials, IssuerSpec, Tenant, TenantId};
use crate::crypto::KeyRing;
use crate::db::Db;
use crate::time::now_ms;

pub use crate::db::{Backend, StoreError};

/// A tenant's public record (what admins see): no credential values.
#[derive(Clone, Debug)]
pub struct TenantRecord {
    pub id: TenantId,
    pub display_name: String,
    pub issuer: IssuerSpec,
    pub credential_fields: Vec<String>,
    pub version: i64,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

/// The outcome of a tenant's latest partner calls.
#[derive(Clone, Debug, Default)]
pub struct Health {
    pub last_success_at_ms: Option<i64>,
    pub last_error_at_ms: Option<i64>,
    pub last_error_code: Option<String>,
    pub last_error_detail: Option<String>,
}

/// Which tenants a caller may fetch tokens for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    All,
    Tenants(Vec<String>),
}

impl Scope {
    pub fn allows(&self, tenant: &str) -> bool {
        match self {
            Self::All => true,
            Self::Tenants(t) => t.iter().any(|x| x == tenant),
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Self::All => serde_json::Value::String("*".into()),
            Self::Tenants(t) => serde_json::json!(t),
        }
    }

    fn from_json(s: &str) -> Result<Self, StoreError> {
        match serde_json::from_str::<serde_json::Value>(s) {
            Ok(serde_json::Value::String(s)) if s == "*" => Ok(Self::All),
            Ok(v) => serde_json::from_value(v)
                .map(Self::Tenants)
                .map_err(|_| StoreError::Corrupt("caller scope".into())),
            Err(_) => Err(StoreError::Corrupt("caller scope".into())),
        }
    }
}

/// An API-key caller (the key itself is never stored).
#[derive(Clone, Debug)]
pub struct CallerRecord {
    pub id: String,
    pub name: String,
    pub scope: Scope,
    pub created_at_ms: i64,
    /// Set when the record was found by a rotated-out key: when that key stops working.
    pub key_expires_at_ms: Option<i64>,
}

/// A tenant row with its credentials as stored: sealed.
pub struct SealedTenant {
    pub record: TenantRecord,
    sealed: Vec<(String, Vec<u8>)>,
}

/// The tenant and caller store: the database handle plus the key ring that seals credentials.
#[derive(Clone)]
pub struct TenantStore {
    db: Db,
    keys: Arc<KeyRing>,
}

const TENANT_COLUMNS: &str = "id, display_name, issuer, version, created_at, updated_at";

impl TenantStore {
    /// Connects (without migrating).
    pub async fn connect(url: &str, keys: Arc<KeyRing>) -> Result<Self, StoreError> {
        let db = Db::connect(url).await?;
        Ok(Self::new(db, keys))
    }

    pub fn new(db: Db, keys: Arc<KeyRing>) -> Self {
        Self { db, keys }
    }

    /// The database handle (shared with the audit trail).
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Applies the backend's migrations.
    pub async fn migrate(&self) -> Result<(), sqlx::migrate::MigrateError> {
        self.db.migrate().await
    }

    pub fn keys(&self) -> &KeyRing {
        &self.keys
    }

    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>, sqlx::Error> {
        self.db.begin_write().await
    }

    /// A cheap round trip for readiness.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.db.ping().await
    }

    pub async fn close(&self) {
        self.db.close().await;
    }

    fn seal_all(&self, id: &TenantId, creds: &Credentials) -> Vec<(String, String, Vec<u8>)> {
        creds
            .iter()
            .map(|(field, value)| {
                let sealed = self
                    .keys
                    .seal(id.as_str(), field, value.expose_secret().as_bytes());
                (field.to_owned(), self.keys.active_id().to_owned(), sealed)
            })
            .collect()
    }

    async fn write_credentials(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        id: &TenantId,
        creds: &Credentials,
    ) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM tenant_credentials WHERE tenant_id = $1")
            .bind(id.as_str())
            .execute(&mut **tx)
            .await?;
        for (field, key_id, sealed) in self.seal_all(id, creds) {
            sqlx::query(
                "INSERT INTO tenant_credentials (tenant_id, field, key_id, sealed) VALUES ($1, $2, $3, $4)",
            )
            .bind(id.as_str())
            .bind(field)
            .bind(key_id)
            .bind(sealed)
            .execute(&mut **tx)
            .await?;
        }
        Ok(())
    }

    /// Inserts a tenant and its sealed credentials in one transaction.
    pub async fn create_tenant(
        &self,
        id: &TenantId,
        display_name: &str,
        issuer: &IssuerSpec,
        creds: &Credentials,
    ) -> Result<TenantRecord, StoreError> {
        let now = now_ms();
        let issuer_json = serde_json::to_string(issuer).expect("spec serialises");
        let mut tx = self.begin_write().await?;
        let exists = sqlx::query("SELECT 1 FROM tenants WHERE id = $1")
            .bind(id.as_str())
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_some() {
            return Err(StoreError::Conflict);
        }
        sqlx::query(
            "INSERT INTO tenants (id, display_name, issuer, version, created_at, updated_at) VALUES ($1, $2, $3, 1, $4, $4)",
        )
        .bind(id.as_str())
        .bind(display_name)
        .bind(&issuer_json)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        self.write_credentials(&mut tx, id, creds).await?;
        tx.commit().await?;
        Ok(TenantRecord {
            id: id.clone(),
            display_name: display_name.to_owned(),
            issuer: issuer.clone(),
            credential_fields: creds.names().map(str::to_owned).collect(),
            version: 1,
            created_at_ms: now,
            updated_at_ms: now,
        })
    }

    fn record_from_row(row: &AnyRow, fields: Vec<String>) -> Result<TenantRecord, StoreError> {
        let id: String = row.try_get("id")?;
        let issuer: String = row.try_get("issuer")?;
        Ok(TenantRecord {
            id: TenantId::parse(&id).map_err(|_| StoreError::Corrupt("tenant id".into()))?,
            display_name: row.try_get("display_name")?,
            issuer: serde_json::from_str(&issuer)
                .map_err(|_| StoreError::Corrupt(format!("issuer spec of tenant {id}")))?,
            credential_fields: fields,
            version: row.try_get("version")?,
            created_at_ms: row.try_get("created_at")?,
            updated_at_ms: row.try_get("updated_at")?,
        })
    }

    /// A tenant's public record.
    pub async fn tenant_record(&self, id: &TenantId) -> Result<TenantRecord, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {TENANT_COLUMNS} FROM tenants WHERE id = $1"
        ))
        .bind(id.as_str())
        .fetch_one(self.db.pool())
        .await?;
        let fields =
            sqlx::query("SELECT field FROM tenant_credentials WHERE tenant_id = $1 ORDER BY field")
                .bind(id.as_str())
                .fetch_all(self.db.pool())
                .await?
                .iter()
                .map(|r| r.try_get::<String, _>("field"))
                .collect::<Result<Vec<_>, _>>()?;
        Self::record_from_row(&row, fields)
    }

    /// A tenant with its credentials opened (for minting).
    pub async fn tenant(&self, id: &TenantId) -> Result<Tenant, StoreError> {
        self.open_tenant(&self.sealed_tenant(id).await?)
    }

    /// A tenant's row with its credentials still sealed (safe to keep in memory).
    pub async fn sealed_tenant(&self, id: &TenantId) -> Result<SealedTenant, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {TENANT_COLUMNS} FROM tenants WHERE id = $1"
        ))
        .bind(id.as_str())
        .fetch_one(self.db.pool())
        .await?;
        let rows = sqlx::query("SELECT field, sealed FROM tenant_credentials WHERE tenant_id = $1")
            .bind(id.as_str())
            .fetch_all(self.db.pool())
            .await?;
        let mut sealed = Vec::with_capacity(rows.len());
        for r in &rows {
            sealed.push((
                r.try_get::<String, _>("field")?,
                r.try_get::<Vec<u8>, _>("sealed")?,
            ));
        }
        Ok(SealedTenant {
            record: Self::record_from_row(&row, Vec::new())?,
            sealed,
        })
    }

    /// Opens a sealed tenant's credentials.
    pub fn open_tenant(&self, t: &SealedTenant) -> Result<Tenant, StoreError> {
        let id = &t.record.id;
        let mut creds = BTreeMap::new();
        for (field, sealed) in &t.sealed {
            let plain = self.keys.open(id.as_str(), field, sealed)?;
            let value = String::from_utf8(plain.to_vec())
                .map_err(|_| StoreError::Corrupt("credential is not UTF-8".into()))?;
            creds.insert(field.clone(), SecretString::from(value));
        }
        let rec = &t.record;
        Ok(Tenant {
            id: rec.id.clone(),
            display_name: rec.display_name.clone(),
            issuer: rec.issuer.clone(),
            credentials: Credentials::new(creds),
            version: rec.version,
            created_at_ms: rec.created_at_ms,
            updated_at_ms: rec.updated_at_ms,
        })
    }

    /// Tenants ordered by id, after `after`, at most `limit`.
    pub async fn list_tenants(
        &self,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<TenantRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {TENANT_COLUMNS} FROM tenants WHERE id > $1 ORDER BY id LIMIT $2"
        ))
        .bind(after.unwrap_or(""))
        .bind(limit)
        .fetch_all(self.db.pool())
        .await?;
        let Some(last) = rows.last() else {
            return Ok(Vec::new());
        };
        let first: String = rows[0].try_get("id")?;
        let last: String = last.try_get("id")?;
        let mut fields: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for r in sqlx::query(
            "SELECT tenant_id, field FROM tenant_credentials WHERE tenant_id >= $1 AND tenant_id <= $2 ORDER BY field",
        )
        .bind(&first)
        .bind(&last)
        .fetch_all(self.db.pool())
        .await?
        {
            fields
                .entry(r.try_get("tenant_id")?)
                .or_default()
                .push(r.try_get("field")?);
        }
        rows.iter()
            .map(|row| {
                let id: String = row.try_get("id")?;
                Self::record_from_row(row, fields.remove(&id).unwrap_or_default())
            })
            .collect()
    }

    /// Replaces the display name, issuer and/or credentials in one transaction.
    /// With `expected_version`, the write happens only if the tenant is still at that version
    /// (optimistic concurrency); otherwise `VersionConflict` and nothing changes.
    pub async fn update_tenant(
        &self,
        id: &TenantId,
        display_name: Option<&str>,
        issuer: Option<&IssuerSpec>,
        creds: Option<&Credentials>,
        expected_version: Option<i64>,
    ) -> Result<TenantRecord, StoreError> {
        let now = now_ms();
        let mut tx = self.begin_write().await?;
        let mut sql = String::from(
            "UPDATE tenants SET display_name = COALESCE($2, display_name), issuer = COALESCE($3, issuer), version = version + 1, updated_at = $4 WHERE id = $1",
        );
        if expected_version.is_some() {
            sql.push_str(" AND version = $5");
        }
        let mut q = sqlx::query(&sql)
            .bind(id.as_str())
            .bind(display_name)
            .bind(issuer.map(|i| serde_json::to_string(i).expect("spec serialises")))
            .bind(now);
        if let Some(v) = expected_version {
            q = q.bind(v);
        }
        let updated = q.execute(&mut *tx).await?;
        if updated.rows_affected() == 0 {
            let exists = sqlx::query("SELECT 1 FROM tenants WHERE id = $1")
                .bind(id.as_str())
                .fetch_optional(&mut *tx)
                .await?;
            return Err(if exists.is_some() {
                StoreError::VersionConflict
            } else {
                StoreError::NotFound
            });
        }
        if let Some(creds) = creds {
            self.write_credentials(&mut tx, id, creds).await?;
        }
        tx.commit().await?;
        self.tenant_record(id).await
    }

    /// Records the outcome of a mint (`None`: success; else the problem code and an
    /// operator-facing detail). Failures to record are only logged: bookkeeping must not fail
    /// a mint.
    pub async fn record_health(&self, id: &TenantId, error: Option<(&str, &str)>) {
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
    pub async fn health(&self, id: &TenantId) -> Result<Health, StoreError> {
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

    /// Deletes a tenant and its credentials; false if it did not exist. With
    /// `expected_version`, only if the tenant is still at that version.
    pub async fn delete_tenant(
        &self,
        id: &TenantId,
        expected_version: Option<i64>,
    ) -> Result<bool, StoreError> {
        let mut tx = self.begin_write().await?;
        if let Some(v) = expected_version {
            let row = sqlx::query("SELECT version FROM tenants WHERE id = $1")
                .bind(id.as_str())
                .fetch_optional(&mut *tx)
                .await?;
            match row {
                None => return Ok(false),
                Some(r) if r.try_get::<i64, _>("version")? != v => {
                    return Err(StoreError::VersionConflict)
                }
                Some(_) => {}
            }
        }
        sqlx::query("DELETE FROM tenant_health WHERE tenant_id = $1")
            .bind(id.as_str())
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM tenant_credentials WHERE tenant_id = $1")
            .bind(id.as_str())
            .execute(&mut *tx)
            .await?;
        let n = sqlx::query("DELETE FROM tenants WHERE id = $1")
            .bind(id.as_str())
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        Ok(n > 0)
    }

    pub async fn count_tenants(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query("SELECT COUNT(*) AS n FROM tenants")
            .fetch_one(self.db.pool())
            .await?
            .try_get("n")?)
    }

    /// Re-seals every credential not sealed with the active key; returns how many rows changed.
    /// Safe to run again after an interruption: each row is rewritten on its own.
    pub async fn rekey(&self) -> Result<u64, StoreError> {
        let active = self.keys.active_id().to_owned();
        let rows = sqlx::query(
            "SELECT tenant_id, field, sealed FROM tenant_credentials WHERE key_id <> $1",
        )
        .bind(&active)
        .fetch_all(self.db.pool())
        .await?;
        let mut changed = 0;
        for r in rows {
            let tenant: String = r.try_get("tenant_id")?;
            let field: String = r.try_get("field")?;
            let sealed: Vec<u8> = r.try_get("sealed")?;
            let plain = self.keys.open(&tenant, &field, &sealed)?;
            let resealed = self.keys.seal(&tenant, &field, &plain);
            changed += sqlx::query(
                "UPDATE tenant_credentials SET sealed = $1, key_id = $2 WHERE tenant_id = $3 AND field = $4 AND sealed = $5",
            )
            .bind(resealed)
            .bind(&active)
            .bind(&tenant)
            .bind(&field)
            .bind(&sealed)
            .execute(self.db.pool())
            .await?
            .rows_affected();
        }
        Ok(changed)
    }

    /// Key ids still used by stored credentials, with their row counts.
    pub async fn key_usage(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let rows = sqlx::query(
            "SELECT key_id, COUNT(*) AS n FROM tenant_credentials GROUP BY key_id ORDER BY key_id",
        )
        .fetch_all(self.db.pool())
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("key_id")?, r.try_get("n")?)))
            .collect()
    }

    /// Up to `limit` `tenant/field` names of credentials sealed with `key_id`.
    pub async fn rows_sealed_with(
        &self,
        key_id: &str,
        limit: i64,
    ) -> Result<Vec<String>, StoreError> {
        sqlx::query(
            "SELECT tenant_id, field FROM tenant_credentials WHERE key_id = $1 ORDER BY tenant_id, field LIMIT $2",
        )
        .bind(key_id)
        .bind(limit)
        .fetch_all(self.db.pool())
        .await?
        .iter()
        .map(|r| {
            Ok(format!(
                "{}/{}",
                r.try_get::<String, _>("tenant_id")?,
                r.try_get::<String, _>("field")?
            ))
        })
        .collect()
    }

    /// Every tenant id.
    pub async fn tenant_ids(&self) -> Result<Vec<TenantId>, StoreError> {
        sqlx::query("SELECT id FROM tenants ORDER BY id")
            .fetch_all(self.db.pool())
            .await?
            .iter()
            .map(|r| {
                let id: String = r.try_get("id")?;
                TenantId::parse(&id).map_err(|_| StoreError::Corrupt("tenant id".into()))
            })
            .collect()
    }

    // ---- callers ----

    pub async fn create_caller(
        &self,
        id: &str,
        name: &str,
        key_hash: &str,
        scope: &Scope,
    ) -> Result<CallerRecord, StoreError> {
        let now = now_ms();
        sqlx::query(
            "INSERT INTO callers (id, name, key_hash, tenants, created_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(id)
        .bind(name)
        .bind(key_hash)
        .bind(scope.to_json().to_string())
        .bind(now)
        .execute(self.db.pool())
        .await?;
        Ok(CallerRecord {
            id: id.to_owned(),
            name: name.to_owned(),
            scope: scope.clone(),
            created_at_ms: now,
            key_expires_at_ms: None,
        })
    }

    fn caller_from_row(r: &AnyRow) -> Result<CallerRecord, StoreError> {
        let tenants: String = r.try_get("tenants")?;
        Ok(CallerRecord {
            id: r.try_get("id")?,
            name: r.try_get("name")?,
            scope: Scope::from_json(&tenants)?,
            created_at_ms: r.try_get("created_at")?,
            key_expires_at_ms: None,
        })
    }

    pub async fn list_callers(&self) -> Result<Vec<CallerRecord>, StoreError> {
        sqlx::query("SELECT id, name, tenants, created_at FROM callers ORDER BY name")
            .fetch_all(self.db.pool())
            .await?
            .iter()
            .map(Self::caller_from_row)
            .collect()
    }

    /// The caller whose current key, or previous key still in its grace period, has this hash.
    pub async fn caller_by_key_hash(&self, hash: &str) -> Result<Option<CallerRecord>, StoreError> {
        let Some(row) = sqlx::query(
            "SELECT id, name, tenants, created_at, key_hash, previous_key_expires_at FROM callers WHERE key_hash = $1 OR (previous_key_hash = $1 AND previous_key_expires_at > $2)",
        )
        .bind(hash)
        .bind(now_ms())
        .fetch_optional(self.db.pool())
        .await?
        else {
            return Ok(None);
        };
        let mut record = Self::caller_from_row(&row)?;
        let current: String = row.try_get("key_hash")?;
        if current != hash {
            record.key_expires_at_ms = row.try_get("previous_key_expires_at")?;
        }
        Ok(Some(record))
    }

    /// Changes a caller's name and/or scope; `NotFound` if there is no such caller,
    /// `Conflict` if the name is taken.
    pub async fn update_caller(
        &self,
        id: &str,
        name: Option<&str>,
        scope: Option<&Scope>,
    ) -> Result<CallerRecord, StoreError> {
        let done = sqlx::query(
            "UPDATE callers SET name = COALESCE($1, name), tenants = COALESCE($2, tenants), updated_at = $3 WHERE id = $4",
        )
        .bind(name)
        .bind(scope.map(|s| s.to_json().to_string()))
        .bind(now_ms())
        .bind(id)
        .execute(self.db.pool())
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        self.caller(id).await
    }

    /// Gives a caller a new key; the old one keeps working for `grace_ms` (0: not at all).
    pub async fn rotate_caller_key(
        &self,
        id: &str,
        new_hash: &str,
        grace_ms: i64,
    ) -> Result<CallerRecord, StoreError> {
        let now = now_ms();
        let done = if grace_ms > 0 {
            sqlx::query(
                "UPDATE callers SET previous_key_hash = key_hash, previous_key_expires_at = $1, key_hash = $2, updated_at = $3 WHERE id = $4",
            )
            .bind(now + grace_ms)
        } else {
            sqlx::query(
                "UPDATE callers SET previous_key_hash = NULL, previous_key_expires_at = $1, key_hash = $2, updated_at = $3 WHERE id = $4",
            )
            .bind(None::<i64>)
        }
        .bind(new_hash)
        .bind(now)
        .bind(id)
        .execute(self.db.pool())
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        self.caller(id).await
    }

    pub async fn caller(&self, id: &str) -> Result<CallerRecord, StoreError> {
        sqlx::query("SELECT id, name, tenants, created_at FROM callers WHERE id = $1")
            .bind(id)
            .fetch_optional(self.db.pool())
            .await?
            .as_ref()
            .map(Self::caller_from_row)
            .transpose()?
            .ok_or(StoreError::NotFound)
    }

    /// Which of `ids` are registered tenants.
    pub async fn existing_tenants(
        &self,
        ids: &[String],
    ) -> Result<std::collections::HashSet<String>, StoreError> {
        let all = self.tenant_ids().await?;
        let wanted: std::collections::HashSet<&str> = ids.iter().map(String::as_str).collect();
        Ok(all
            .into_iter()
            .map(|t| t.to_string())
            .filter(|t| wanted.contains(t.as_str()))
            .collect())
    }

    pub async fn delete_caller(&self, id: &str) -> Result<bool, StoreError> {
        Ok(sqlx::query("DELETE FROM callers WHERE id = $1")
            .bind(id)
            .execute(self.db.pool())
            .await?
            .rows_affected()
            > 0)
    }
}

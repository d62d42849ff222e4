//! The tenant store on sqlx's `Any` driver: one implementation for SQLite and
//! Postgres (the SQL here is the subset both speak), migrations chosen from `DATABASE_URL`.
//! Credentials are sealed before they reach SQL and opened after they leave it.

use std::collections::BTreeMap;
use std::sync::Arc;

use secrecy::{ExposeSecret, SecretString};
use sqlx::any::AnyRow;
use sqlx::Row;

use super::proxy::ProxySpec;
use super::{Credentials, IssuerSpec, Tenant, TenantId};
use crate::crypto::KeyRing;
use crate::db::{AlsoWrite, Db};
use crate::time::now_ms;

pub use crate::db::{Backend, Entity, StoreError};

/// A tenant's public record (what admins see): no credential values.
#[derive(Clone, Debug)]
pub struct TenantRecord {
    pub id: TenantId,
    pub display_name: String,
    pub issuer: IssuerSpec,
    pub credential_fields: Vec<String>,
    pub proxy: Option<ProxySpec>,
    pub version: i64,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

impl TenantRecord {
    /// The tenant with its opened credentials and proxy header values.
    pub fn with_secrets(&self, credentials: Credentials, proxy_headers: Credentials) -> Tenant {
        Tenant {
            id: self.id.clone(),
            display_name: self.display_name.clone(),
            issuer: self.issuer.clone(),
            credentials,
            proxy: self.proxy.clone(),
            proxy_headers,
            version: self.version,
            created_at_ms: self.created_at_ms,
            updated_at_ms: self.updated_at_ms,
        }
    }
}

/// What one write to a tenant changes, worked out from its current state.
pub struct Change {
    pub display_name: Option<String>,
    pub issuer: Option<IssuerSpec>,
    pub credentials: Option<Credentials>,
    /// `Some(None)` removes the proxy settings.
    pub proxy: Option<Option<(ProxySpec, Credentials)>>,
}

/// Why `write_tenant` wrote nothing.
#[derive(Debug)]
pub enum WriteError<E> {
    Store(StoreError),
    /// The change function refused (the caller's own error).
    Refused(E),
    /// Another write got in between and the write was fenced: not retried.
    LostRace,
}

/// Rounds of a contended write before giving up: each round one writer wins, so with dozens
/// writing at once a loser may need many (20 ran out once in 60 concurrent writes over two
/// replicas).
const WRITE_ROUNDS: u64 = 64;

/// A tenant row with its credentials as stored: sealed.
pub struct SealedTenant {
    pub record: TenantRecord,
    sealed: Vec<(String, Vec<u8>)>,
}

impl SealedTenant {
    /// A row as stored: the record and its sealed fields (`field`, sealed bytes).
    pub fn new(record: TenantRecord, sealed: Vec<(String, Vec<u8>)>) -> Self {
        Self { record, sealed }
    }
}

/// The tenant store: the database handle plus the key ring that seals credentials.
#[derive(Clone)]
pub struct TenantStore {
    db: Db,
    keys: Arc<KeyRing>,
}

const TENANT_COLUMNS: &str = "id, display_name, issuer, proxy, version, created_at, updated_at";

/// Field-name prefix of a proxy header's sealed value in `tenant_credentials`.
const PROXY_HEADER: &str = "proxy_header:";
/// SQL condition: the row is a credential, not a proxy header.
const IS_CREDENTIAL: &str = "field NOT LIKE 'proxy_header:%'";

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

    async fn begin_write(&self) -> Result<crate::db::WriteTx, sqlx::Error> {
        self.db.begin_write().await
    }

    /// A cheap round trip for readiness.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.db.ping().await
    }

    pub async fn close(&self) {
        self.db.close().await;
    }

    fn seal_all(
        &self,
        id: &TenantId,
        creds: &Credentials,
        prefix: &str,
    ) -> Vec<(String, String, Vec<u8>)> {
        creds
            .iter()
            .map(|(name, value)| {
                let field = format!("{prefix}{name}");
                let sealed = self
                    .keys
                    .seal(id.as_str(), &field, value.expose_secret().as_bytes());
                (field, self.keys.active_id().to_owned(), sealed)
            })
            .collect()
    }

    /// Replaces the tenant's credentials (`prefix` empty) or its proxy header values
    /// (`PROXY_HEADER`), sealed, leaving the other kind of row alone.
    async fn write_credentials(
        &self,
        tx: &mut crate::db::WriteTx,
        id: &TenantId,
        creds: &Credentials,
        prefix: &str,
    ) -> Result<(), StoreError> {
        let which = if prefix.is_empty() {
            IS_CREDENTIAL.to_owned()
        } else {
            format!("NOT ({IS_CREDENTIAL})")
        };
        sqlx::query(&format!(
            "DELETE FROM tenant_credentials WHERE tenant_id = $1 AND {which}"
        ))
        .bind(id.as_str())
        .execute(&mut **tx)
        .await?;
        for (field, key_id, sealed) in self.seal_all(id, creds, prefix) {
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
        proxy: Option<(&ProxySpec, &Credentials)>,
        also: &dyn AlsoWrite,
    ) -> Result<TenantRecord, StoreError> {
        let now = now_ms();
        let issuer_json = serde_json::to_string(issuer).expect("spec serialises");
        let proxy_json = proxy.map(|(p, _)| serde_json::to_string(p).expect("spec serialises"));
        let mut tx = self.begin_write().await?;
        let exists = sqlx::query("SELECT 1 FROM tenants WHERE id = $1")
            .bind(id.as_str())
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_some() {
            return Err(StoreError::Conflict);
        }
        sqlx::query(
            "INSERT INTO tenants (id, display_name, issuer, proxy, version, created_at, updated_at) VALUES ($1, $2, $3, $4, 1, $5, $5)",
        )
        .bind(id.as_str())
        .bind(display_name)
        .bind(&issuer_json)
        .bind(proxy_json)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        self.write_credentials(&mut tx, id, creds, "").await?;
        if let Some((_, headers)) = proxy {
            self.write_credentials(&mut tx, id, headers, PROXY_HEADER)
                .await?;
        }
        tx.commit_with(also).await?;
        Ok(TenantRecord {
            id: id.clone(),
            display_name: display_name.to_owned(),
            issuer: issuer.clone(),
            credential_fields: creds.names().map(str::to_owned).collect(),
            proxy: proxy.map(|(p, _)| p.clone()),
            version: 1,
            created_at_ms: now,
            updated_at_ms: now,
        })
    }

    fn record_from_row(row: &AnyRow, fields: Vec<String>) -> Result<TenantRecord, StoreError> {
        let id: String = row.try_get("id")?;
        let issuer: String = row.try_get("issuer")?;
        let proxy: Option<String> = row.try_get("proxy")?;
        let proxy = proxy
            .map(|p| serde_json::from_str(&p))
            .transpose()
            .map_err(|_| StoreError::Corrupt(format!("proxy spec of tenant {id}")))?;
        Ok(TenantRecord {
            id: TenantId::parse(&id).map_err(|_| StoreError::Corrupt("tenant id".into()))?,
            display_name: row.try_get("display_name")?,
            issuer: serde_json::from_str(&issuer)
                .map_err(|_| StoreError::Corrupt(format!("issuer spec of tenant {id}")))?,
            credential_fields: fields,
            proxy,
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
        .fetch_optional(self.db.pool())
        .await?
        .ok_or(StoreError::NotFound(Entity::Tenant))?;
        let fields =
            sqlx::query(&format!("SELECT field FROM tenant_credentials WHERE tenant_id = $1 AND {IS_CREDENTIAL} ORDER BY field"))
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
        .fetch_optional(self.db.pool())
        .await?
        .ok_or(StoreError::NotFound(Entity::Tenant))?;
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
        let mut proxy_headers = BTreeMap::new();
        for (field, sealed) in &t.sealed {
            let plain = self.keys.open(id.as_str(), field, sealed)?;
            let value = String::from_utf8(plain.to_vec())
                .map_err(|_| StoreError::Corrupt("credential is not UTF-8".into()))?;
            match field.strip_prefix(PROXY_HEADER) {
                Some(name) => proxy_headers.insert(name.to_owned(), SecretString::from(value)),
                None => creds.insert(field.clone(), SecretString::from(value)),
            };
        }
        Ok(t.record
            .with_secrets(Credentials::new(creds), Credentials::new(proxy_headers)))
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
            &format!("SELECT tenant_id, field FROM tenant_credentials WHERE tenant_id >= $1 AND tenant_id <= $2 AND {IS_CREDENTIAL} ORDER BY field"),
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
    ///
    /// Long because it is one transaction (the versioned UPDATE, the not-found or version
    /// check, the credentials, the audit row): pieces would pass the transaction around.
    pub async fn update_tenant(
        &self,
        id: &TenantId,
        change: &Change,
        expected_version: Option<i64>,
        also: &dyn AlsoWrite,
    ) -> Result<TenantRecord, StoreError> {
        let display_name = change.display_name.as_deref();
        let issuer = change.issuer.as_ref();
        let creds = change.credentials.as_ref();
        let proxy = change
            .proxy
            .as_ref()
            .map(|p| p.as_ref().map(|(s, h)| (s, h)));
        let now = now_ms();
        let mut tx = self.begin_write().await?;
        let mut sql = String::from(
            "UPDATE tenants SET display_name = COALESCE($2, display_name), issuer = COALESCE($3, issuer), version = version + 1, updated_at = $4",
        );
        if proxy.is_some() {
            sql.push_str(", proxy = $5");
        }
        sql.push_str(" WHERE id = $1");
        if expected_version.is_some() {
            sql.push_str(if proxy.is_some() {
                " AND version = $6"
            } else {
                " AND version = $5"
            });
        }
        let mut q = sqlx::query(&sql)
            .bind(id.as_str())
            .bind(display_name)
            .bind(issuer.map(|i| serde_json::to_string(i).expect("spec serialises")))
            .bind(now);
        if let Some(p) = proxy {
            q = q.bind(p.map(|(p, _)| serde_json::to_string(p).expect("spec serialises")));
        }
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
                StoreError::NotFound(Entity::Tenant)
            });
        }
        if let Some(creds) = creds {
            self.write_credentials(&mut tx, id, creds, "").await?;
        }
        if let Some(p) = proxy {
            let none = Credentials::default();
            let headers = p.map_or(&none, |(_, h)| h);
            self.write_credentials(&mut tx, id, headers, PROXY_HEADER)
                .await?;
        }
        tx.commit_with(also).await?;
        self.tenant_record(id).await
    }

    /// Read, compute the change, write only if nobody wrote in between. A lost race is retried
    /// after a short random pause (last write wins), unless `fenced` (the client named the
    /// version it read): then `LostRace`.
    pub async fn write_tenant<E>(
        &self,
        id: &TenantId,
        fenced: bool,
        change: impl Fn(&Tenant) -> Result<Change, E>,
        also: impl Fn(&Change) -> Box<dyn AlsoWrite>,
    ) -> Result<(TenantRecord, Change), WriteError<E>> {
        let mut round = 0;
        loop {
            round += 1;
            let current = self.tenant(id).await.map_err(WriteError::Store)?;
            let c = change(&current).map_err(WriteError::Refused)?;
            let written = self
                .update_tenant(id, &c, Some(current.version), &*also(&c))
                .await;
            match written {
                Ok(record) => return Ok((record, c)),
                Err(StoreError::VersionConflict) if fenced => return Err(WriteError::LostRace),
                Err(StoreError::VersionConflict) if round < WRITE_ROUNDS => {
                    let pause =
                        rand::Rng::gen_range(&mut rand::thread_rng(), 1..=(10 * round).min(200));
                    tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
                }
                Err(e) => return Err(WriteError::Store(e)),
            }
        }
    }

    /// Deletes a tenant and its credentials; false if it did not exist. With
    /// `expected_version`, only if the tenant is still at that version.
    pub async fn delete_tenant(
        &self,
        id: &TenantId,
        expected_version: Option<i64>,
        also: &dyn AlsoWrite,
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
        sqlx::query("DELETE FROM tenant_mints WHERE tenant_id = $1")
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
        if n == 0 {
            return Ok(false);
        }
        tx.commit_with(also).await?;
        Ok(true)
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
}

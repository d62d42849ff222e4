//! The caller repository: API-key callers (their scope, the SHA-256 of their key, a rotated-out
//! key's grace period). Keys themselves are never stored.

use sqlx::any::AnyRow;
use sqlx::Row;

use crate::db::{AlsoWrite, Db, Entity, StoreError, WriteTx};
use crate::time::now_ms;

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

/// Callers in the database.
#[derive(Clone)]
pub struct CallerStore {
    db: Db,
}

impl CallerStore {
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    pub async fn create_caller(
        &self,
        id: &str,
        name: &str,
        key_hash: &str,
        scope: &Scope,
        also: &dyn AlsoWrite,
    ) -> Result<CallerRecord, StoreError> {
        let now = now_ms();
        let mut tx = self.db.begin_write().await?;
        sqlx::query(
            "INSERT INTO callers (id, name, key_hash, tenants, created_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(id)
        .bind(name)
        .bind(key_hash)
        .bind(scope.to_json().to_string())
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit_with(also).await?;
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
    /// `Conflict` if the name is taken. `also` (given the changed record) commits with it.
    pub async fn update_caller(
        &self,
        id: &str,
        name: Option<&str>,
        scope: Option<&Scope>,
        also: impl Fn(&CallerRecord) -> Box<dyn AlsoWrite>,
    ) -> Result<CallerRecord, StoreError> {
        let mut tx = self.db.begin_write().await?;
        let done = sqlx::query(
            "UPDATE callers SET name = COALESCE($1, name), tenants = COALESCE($2, tenants), updated_at = $3 WHERE id = $4",
        )
        .bind(name)
        .bind(scope.map(|s| s.to_json().to_string()))
        .bind(now_ms())
        .bind(id)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(Entity::Caller));
        }
        let record = Self::caller_in(&mut tx, id).await?;
        tx.commit_with(&*also(&record)).await?;
        Ok(record)
    }

    /// The caller as the transaction sees it.
    async fn caller_in(tx: &mut WriteTx, id: &str) -> Result<CallerRecord, StoreError> {
        sqlx::query("SELECT id, name, tenants, created_at FROM callers WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut **tx)
            .await?
            .as_ref()
            .map(Self::caller_from_row)
            .transpose()?
            .ok_or(StoreError::NotFound(Entity::Caller))
    }

    /// Gives a caller a new key; the old one keeps working for `grace_ms` (0: not at all).
    pub async fn rotate_caller_key(
        &self,
        id: &str,
        new_hash: &str,
        grace_ms: i64,
        also: impl Fn(&CallerRecord) -> Box<dyn AlsoWrite>,
    ) -> Result<CallerRecord, StoreError> {
        let now = now_ms();
        let mut tx = self.db.begin_write().await?;
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
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(Entity::Caller));
        }
        let record = Self::caller_in(&mut tx, id).await?;
        tx.commit_with(&*also(&record)).await?;
        Ok(record)
    }

    pub async fn caller(&self, id: &str) -> Result<CallerRecord, StoreError> {
        sqlx::query("SELECT id, name, tenants, created_at FROM callers WHERE id = $1")
            .bind(id)
            .fetch_optional(self.db.pool())
            .await?
            .as_ref()
            .map(Self::caller_from_row)
            .transpose()?
            .ok_or(StoreError::NotFound(Entity::Caller))
    }

    pub async fn delete_caller(&self, id: &str, also: &dyn AlsoWrite) -> Result<bool, StoreError> {
        let mut tx = self.db.begin_write().await?;
        let n = sqlx::query("DELETE FROM callers WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if n == 0 {
            return Ok(false);
        }
        tx.commit_with(also).await?;
        Ok(true)
    }
}

//! The audit trail's rows in the database: batched inserts, newest-first queries, pruning.

use sqlx::Row as _;

use super::{Entry, Kind, Row};
use crate::db::{AlsoWrite, Db, StoreError};

/// Writes coalesced audit rows (entry, (first ms, last ms, count)) in one transaction.
pub async fn insert(db: &Db, rows: &[(Entry, (i64, i64, i64))]) -> Result<(), StoreError> {
    let mut tx = db.begin_write().await?;
    insert_on(&mut tx, rows).await?;
    tx.commit().await?;
    Ok(())
}

/// An admin change's audit row, written in the change's own transaction
/// (`WriteTx::commit_with`): the change and its row commit together or not at all.
pub struct InSameTransaction(pub Entry);

impl AlsoWrite for InSameTransaction {
    fn write<'c>(
        &'c self,
        conn: &'c mut sqlx::AnyConnection,
    ) -> futures_util::future::BoxFuture<'c, Result<(), sqlx::Error>> {
        Box::pin(async move {
            let now = crate::time::now_ms();
            insert_on(conn, &[(self.0.clone(), (now, now, 1))]).await
        })
    }
}

/// The rows' INSERTs on a connection inside a transaction.
async fn insert_on(
    conn: &mut sqlx::AnyConnection,
    rows: &[(Entry, (i64, i64, i64))],
) -> Result<(), sqlx::Error> {
    const COLS: usize = 13;
    for chunk in rows.chunks(200) {
        let mut sql = String::from(
            "INSERT INTO audit_log (at, last_at, count, kind, action, outcome, caller, auth_method, tenant, source, fingerprint, detail, request_id) VALUES ",
        );
        for i in 0..chunk.len() {
            if i > 0 {
                sql.push_str(", ");
            }
            sql.push('(');
            for c in 0..COLS {
                if c > 0 {
                    sql.push_str(", ");
                }
                sql.push_str(&format!("${}", i * COLS + c + 1));
            }
            sql.push(')');
        }
        // Only the one-row statement is kept prepared: a batch's SQL differs with its size,
        // and keeping one prepared statement per size (up to 200 per connection, each tens of
        // KB) held about 7 MB of a SQLite broker's memory and as much on a Postgres server.
        let mut q = sqlx::query(&sql).persistent(chunk.len() == 1);
        for (e, (first, last, count)) in chunk {
            q = q
                .bind(*first)
                .bind(*last)
                .bind(*count)
                .bind(e.kind.as_str())
                .bind(e.action.as_ref())
                .bind(e.outcome.as_ref())
                .bind(e.caller.as_deref())
                .bind(e.auth_method.map(|m| m.as_str()))
                .bind(e.tenant.as_deref())
                .bind(e.source.map(|s| s.as_str()))
                .bind(e.fingerprint.as_deref())
                .bind(e.detail.as_deref())
                .bind(e.request_id.as_deref());
        }
        q.execute(&mut *conn).await?;
    }
    Ok(())
}

/// Audit rows, newest first, optionally for one tenant and/or caller, before row `before`.
///
/// Long because it builds the filtered, paged SELECT and reads each column back into its type.
pub async fn query(
    db: &Db,
    tenant: Option<&str>,
    caller: Option<&str>,
    before: Option<i64>,
    limit: i64,
) -> Result<Vec<Row>, StoreError> {
    let mut sql = String::from(
        "SELECT id, at, last_at, count, kind, action, outcome, caller, auth_method, tenant, source, fingerprint, detail, request_id FROM audit_log WHERE 1 = 1",
    );
    let mut n = 0;
    let mut next = || {
        n += 1;
        format!("${n}")
    };
    if tenant.is_some() {
        sql.push_str(&format!(" AND tenant = {}", next()));
    }
    if caller.is_some() {
        sql.push_str(&format!(" AND caller = {}", next()));
    }
    if before.is_some() {
        sql.push_str(&format!(" AND id < {}", next()));
    }
    sql.push_str(&format!(" ORDER BY id DESC LIMIT {}", next()));
    let mut q = sqlx::query(&sql);
    if let Some(t) = tenant {
        q = q.bind(t);
    }
    if let Some(c) = caller {
        q = q.bind(c);
    }
    if let Some(b) = before {
        q = q.bind(b);
    }
    let rows = q.bind(limit).fetch_all(db.pool()).await?;
    rows.iter()
        .map(|r| {
            Ok(Row {
                id: r.try_get("id")?,
                at_ms: r.try_get("at")?,
                last_at_ms: r.try_get("last_at")?,
                count: r.try_get("count")?,
                entry: Entry {
                    // A spelling a newer build wrote is shown as a refusal, never dropped.
                    kind: Kind::parse(&r.try_get::<String, _>("kind")?).unwrap_or(Kind::Refused),
                    action: r.try_get::<String, _>("action")?.into(),
                    outcome: r.try_get::<String, _>("outcome")?.into(),
                    caller: r.try_get::<Option<String>, _>("caller")?.map(Into::into),
                    auth_method: r
                        .try_get::<Option<String>, _>("auth_method")?
                        .and_then(|m| crate::auth::AuthMethod::parse(&m)),
                    tenant: r.try_get::<Option<String>, _>("tenant")?.map(Into::into),
                    source: r
                        .try_get::<Option<String>, _>("source")?
                        .and_then(|m| crate::broker::Source::parse(&m)),
                    fingerprint: r
                        .try_get::<Option<String>, _>("fingerprint")?
                        .map(Into::into),
                    detail: r.try_get("detail")?,
                    request_id: r.try_get("request_id")?,
                },
            })
        })
        .collect()
}

/// Deletes audit rows last seen before `before_ms`.
pub async fn prune(db: &Db, before_ms: i64) -> Result<u64, StoreError> {
    Ok(sqlx::query("DELETE FROM audit_log WHERE last_at < $1")
        .bind(before_ms)
        .execute(db.pool())
        .await?
        .rows_affected())
}

//! The database handle: one sqlx `Any` pool for SQLite or Postgres (the SQL the repositories
//! write is the subset both speak), the backend's migrations, and the store error type.
//! Repositories (`tenants::store`, `audit::store`) hold a clone.

use std::time::Duration;

use futures_util::future::BoxFuture;
use sqlx::any::AnyPoolOptions;
use sqlx::pool::PoolConnection;
use sqlx::{AnyConnection, AnyPool};

use crate::crypto::CryptoError;

/// What a lookup did not find: each repository names its own, so a not-found answer says
/// which (`tenant_not_found`, `caller_not_found`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entity {
    Tenant,
    Caller,
}

impl std::fmt::Display for Entity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Tenant => "tenant",
            Self::Caller => "caller",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no such {0}")]
    NotFound(Entity),
    #[error("already exists")]
    Conflict,
    #[error("changed since it was read")]
    VersionConflict,
    #[error("the database is unavailable")]
    Unavailable(#[source] sqlx::Error),
    #[error("a stored credential does not open ({0})")]
    Crypto(#[from] CryptoError),
    #[error("a stored record is corrupt: {0}")]
    Corrupt(String),
    #[error("DATABASE_URL must start with sqlite: or postgres://")]
    UnsupportedUrl,
    #[error("the database {0:?} does not exist on the Postgres server: create it (createdb -O <user> {0}, or CREATE DATABASE) and start again")]
    NoSuchDatabase(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            // Every lookup that may find nothing uses fetch_optional and names its entity.
            sqlx::Error::RowNotFound => Self::Corrupt("an expected row is missing".into()),
            sqlx::Error::Database(d) if d.is_unique_violation() => Self::Conflict,
            _ => Self::Unavailable(e),
        }
    }
}

/// Files kept beside the database that only its owner may read (the encryption key file, the
/// admin token's hash): created exclusively with mode 0600, refused when group or others may
/// read or write them (what OpenSSH does with private keys).
pub mod private_file {
    use std::io::Write;
    use std::path::Path;

    /// Creates `path` with `contents` (mode 0600); `Ok(false)` if it already exists.
    pub fn create(path: &Path, contents: &[u8]) -> std::io::Result<bool> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let mut f = match opts.open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(false),
            Err(e) => return Err(e),
        };
        f.write_all(contents)?;
        f.sync_all()?;
        Ok(true)
    }

    /// Refuses `path` if group or others may read or write it: `mode … <risk>; <fix> and start
    /// again`.
    pub fn check_mode(path: &Path, risk: &str, fix: &str) -> std::io::Result<()> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path)?.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    format!("mode {mode:04o} {risk}; {fix} and start again"),
                ));
            }
        }
        let _ = (path, risk, fix);
        Ok(())
    }
}

/// What another repository writes in the same transaction as a change, so both commit or
/// neither does (an admin change and its audit row).
pub trait AlsoWrite: Send + Sync {
    fn write<'c>(&'c self, conn: &'c mut AnyConnection) -> BoxFuture<'c, Result<(), sqlx::Error>>;
}

/// Nothing more to write.
pub struct Nothing;

impl AlsoWrite for Nothing {
    fn write<'c>(&'c self, _: &'c mut AnyConnection) -> BoxFuture<'c, Result<(), sqlx::Error>> {
        Box::pin(async { Ok(()) })
    }
}

/// A write transaction begun and ended with plain `BEGIN`/`COMMIT` on a pooled connection.
/// A connection whose transaction state is unknown is closed, never reused: after a COMMIT
/// that fails (SQLite rolls back a commit that hits a full disk, and a pool that still thought
/// it inside a transaction failed every later BEGIN on it until a restart), or when the
/// transaction is dropped and its ROLLBACK fails.
pub struct WriteTx {
    conn: Option<PoolConnection<sqlx::Any>>,
}

impl WriteTx {
    /// Writes `also` and commits, both or neither.
    pub async fn commit_with(mut self, also: &dyn AlsoWrite) -> Result<(), sqlx::Error> {
        also.write(&mut self).await?;
        self.commit().await
    }

    pub async fn commit(mut self) -> Result<(), sqlx::Error> {
        use sqlx::Executor;
        let mut conn = self.conn.take().expect("an open transaction");
        match conn.execute("COMMIT").await {
            Ok(_) => Ok(()),
            Err(e) => {
                let _ = conn.close().await;
                Err(e)
            }
        }
    }
}

impl std::ops::Deref for WriteTx {
    type Target = AnyConnection;
    fn deref(&self) -> &AnyConnection {
        self.conn.as_ref().expect("an open transaction")
    }
}

impl std::ops::DerefMut for WriteTx {
    fn deref_mut(&mut self) -> &mut AnyConnection {
        self.conn.as_mut().expect("an open transaction")
    }
}

impl Drop for WriteTx {
    /// Not committed (an error on the way): rolled back before the connection is reused, or
    /// closed (which rolls it back) if that fails or no runtime is there to do it.
    fn drop(&mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    use sqlx::Executor;
                    if conn.execute("ROLLBACK").await.is_err() {
                        let _ = conn.close().await;
                    }
                });
            }
            Err(_) => drop(conn.detach()),
        }
    }
}

/// Which SQL backend a URL selects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn from_url(url: &str) -> Option<Self> {
        if url.starts_with("sqlite:") {
            Some(Self::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Some(Self::Postgres)
        } else {
            None
        }
    }
}

/// A connection pool and the backend it speaks.
#[derive(Clone)]
pub struct Db {
    pool: AnyPool,
    backend: Backend,
}

/// How long any Postgres statement waits for another session's lock.
const SET_LOCK_TIMEOUT: &str = "SET lock_timeout = '2s'";

/// How long a Postgres write transaction waits for a lock, and runs a statement.
const WRITE_TIMEOUTS: &str =
    "SET LOCAL lock_timeout = '2s'; SET LOCAL statement_timeout = '2500ms'";

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

impl Db {
    /// Connects (without migrating).
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let backend = Backend::from_url(url).ok_or_else(|| StoreError::UnsupportedUrl)?;
        // Each connection to an in-memory SQLite database opens a database of its own: one
        // connection, kept for the life of the process, is the whole database.
        let in_memory = backend == Backend::Sqlite && url.contains(":memory:");
        let max = match backend {
            Backend::Sqlite if in_memory => 1,
            Backend::Sqlite => 4,
            Backend::Postgres => 10,
        };
        let mut options = AnyPoolOptions::new()
            .max_connections(max)
            .acquire_timeout(Duration::from_secs(3));
        if in_memory {
            options = options
                .min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None);
        }
        if backend == Backend::Postgres {
            // No statement waits long for another session's lock (a migration, a careless
            // `LOCK TABLE`): after `LOCK_TIMEOUT` it fails and the caller says the database is
            // unavailable. Migrations lift it on their own connection (`migrate`).
            options = options.after_connect(|conn, _| {
                Box::pin(async move {
                    use sqlx::Executor;
                    conn.execute(SET_LOCK_TIMEOUT).await?;
                    Ok(())
                })
            });
        }
        if backend == Backend::Sqlite {
            // WAL lets readers (and other broker processes) work beside the one writer;
            // synchronous=NORMAL is safe from corruption in WAL mode and spares an fsync per commit.
            // A 512 KiB page cache per connection instead of SQLite's 2 MiB: the database is
            // read on cache misses only (the token path never reads it), the OS caches the
            // file anyway, and four connections' default caches were 8 MiB of the RSS.
            options = options.after_connect(|conn, _| {
                Box::pin(async move {
                    use sqlx::Executor;
                    conn.execute("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA busy_timeout = 2500; PRAGMA cache_size = -512;")
                        .await?;
                    Ok(())
                })
            });
        }
        let pool = options.connect(url).await.map_err(|e| {
            // Postgres says 3D000 (invalid_catalog_name) for a database that is not there.
            let missing =
                matches!(&e, sqlx::Error::Database(d) if d.code().as_deref() == Some("3D000"));
            match url::Url::parse(url) {
                Ok(u) if missing => {
                    StoreError::NoSuchDatabase(u.path().trim_start_matches('/').to_owned())
                }
                _ => StoreError::Unavailable(e),
            }
        })?;
        Ok(Self { pool, backend })
    }

    /// Applies the backend's migrations. On Postgres they run on a connection of their own
    /// without the lock timeout (a replica waits for another's migration to finish), closed
    /// afterwards.
    pub async fn migrate(&self) -> Result<(), sqlx::migrate::MigrateError> {
        match self.backend {
            Backend::Sqlite => SQLITE_MIGRATIONS.run(&self.pool).await,
            Backend::Postgres => {
                use sqlx::Executor;
                let mut conn = self.pool.acquire().await?.detach();
                conn.execute("SET lock_timeout = 0").await?;
                POSTGRES_MIGRATIONS.run(&mut conn).await
            }
        }
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// A write transaction, bounded in time: it fails (and changes nothing) rather than wait
    /// long on another session's lock. On SQLite it takes the write lock up front (`BEGIN
    /// IMMEDIATE`, waiting at most `busy_timeout`): a deferred transaction that reads first
    /// cannot wait for the lock once another writer has committed, and fails at once with
    /// SQLITE_BUSY. On Postgres `lock_timeout` and `statement_timeout` hold for this
    /// transaction only (a migration or a careless `LOCK TABLE` elsewhere costs an admin 2 s,
    /// not a hang).
    pub async fn begin_write(&self) -> Result<WriteTx, sqlx::Error> {
        use sqlx::Executor;
        let mut conn = self.pool.acquire().await?;
        match self.backend {
            // A BEGIN that fails started nothing: the connection goes back as it was.
            Backend::Sqlite => conn.execute("BEGIN IMMEDIATE").await?,
            Backend::Postgres => conn.execute("BEGIN").await?,
        };
        let mut tx = WriteTx { conn: Some(conn) };
        if self.backend == Backend::Postgres {
            tx.execute(WRITE_TIMEOUTS).await?;
        }
        Ok(tx)
    }

    /// A cheap round trip for readiness.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

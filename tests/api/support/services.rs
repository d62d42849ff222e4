//! The backing services a test needs: Postgres and Redis from the environment, the standard
//! local ports, or a throwaway server.

use super::*;

/// A service a test needs is missing: the test fails, saying how to provide it. (Built with
/// `BROKER_TEST_SKIP_SERVICES=1`, such tests are ignored instead and never get here.)
pub fn skip(what: &str) {
    panic!(
        "{what} is not available. Tried: the URL in DATABASE_URL / REDIS_URL if set, else {STANDARD_POSTGRES} (a user that may create databases) / {STANDARD_REDIS}, else a throwaway server (PostgreSQL's initdb as a non-root user; redis-server on PATH). Start it and point the tests at it (e.g. DATABASE_URL=postgres://user@host:5432/postgres, REDIS_URL=redis://host:6379), or run with BROKER_TEST_SKIP_SERVICES=1 to report such tests as ignored"
    );
}

pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub(crate) struct Throwaway {
    _child: Child,
    _dir: tempfile::TempDir,
    url: String,
}

pub(crate) static REDIS: OnceLock<Option<OwnRedis>> = OnceLock::new();

/// Where the suite looks when `REDIS_URL` / `DATABASE_URL` are unset: the services' standard
/// local ports, as a developer machine or CI runner has them.
pub(crate) const STANDARD_REDIS: &str = "redis://127.0.0.1:6379";
pub(crate) const STANDARD_POSTGRES: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// Says once, on the real stderr (libtest captures only the print macros), which service a
/// run uses when it was not told.
pub(crate) fn announce(what: &str, url: &str, how: &str) {
    let _ = writeln!(
        std::io::stderr(),
        "tests: {what} at {url} ({how}; set {} to choose)",
        if what == "Redis" {
            "REDIS_URL"
        } else {
            "DATABASE_URL"
        }
    );
}

/// Does a Redis answer PING at this port?
pub(crate) fn redis_answers(port: u16) -> bool {
    use std::io::Read;
    let Ok(mut s) = std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(500),
    ) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let mut buf = [0u8; 7];
    s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

pub(crate) static REDIS_URL: OnceLock<Option<String>> = OnceLock::new();

/// A Redis URL: `REDIS_URL`, else the one on the standard local port, else a throwaway
/// `redis-server` from PATH.
pub fn redis_url() -> Option<String> {
    if let Ok(url) = std::env::var("REDIS_URL") {
        return Some(url);
    }
    REDIS_URL
        .get_or_init(|| {
            if redis_answers(6379) {
                announce(
                    "Redis",
                    STANDARD_REDIS,
                    "REDIS_URL unset, the standard local port",
                );
                return Some(STANDARD_REDIS.to_string());
            }
            let url = REDIS.get_or_init(OwnRedis::start).as_ref()?.url();
            announce("Redis", &url, "REDIS_URL unset, a throwaway redis-server");
            Some(url)
        })
        .clone()
}

pub(crate) static POSTGRES: OnceLock<Option<Throwaway>> = OnceLock::new();

pub(crate) fn find_pg_bin(name: &str) -> Option<std::path::PathBuf> {
    if let Ok(out) = Command::new("which").arg(name).output() {
        if out.status.success() {
            return Some(String::from_utf8_lossy(&out.stdout).trim().into());
        }
    }
    let mut dirs: Vec<_> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .collect();
    dirs.sort_by_key(|d| d.file_name());
    dirs.iter()
        .rev()
        .map(|d| d.path().join("bin").join(name))
        .find(|p| p.exists())
}

/// Can this URL's user create databases? (A connection of its own, on a thread of its own: the
/// caller may be inside a runtime.)
pub(crate) fn postgres_can_create_databases(url: &str) -> bool {
    let url = url.to_string();
    std::thread::spawn(move || {
        use sqlx::Connection;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ok()?;
        rt.block_on(async {
            let mut conn =
                tokio::time::timeout(Duration::from_secs(3), sqlx::PgConnection::connect(&url))
                    .await
                    .ok()?
                    .ok()?;
            sqlx::query_scalar::<_, bool>(
                "SELECT rolcreatedb OR rolsuper FROM pg_roles WHERE rolname = current_user",
            )
            .fetch_one(&mut conn)
            .await
            .ok()
        })
    })
    .join()
    .ok()
    .flatten()
    .unwrap_or(false)
}

pub(crate) static POSTGRES_URL: OnceLock<Option<String>> = OnceLock::new();

/// An admin Postgres URL: `DATABASE_URL` (if postgres), else the one on the standard local port
/// (user `postgres`, trust auth), else a throwaway cluster from PATH (initdb refuses to run as
/// root, so as root this needs one of the first two).
pub fn postgres_admin_url() -> Option<String> {
    if let Ok(url) = std::env::var("DATABASE_URL") {
        if url.starts_with("postgres") {
            return Some(url);
        }
    }
    POSTGRES_URL
        .get_or_init(|| {
            if postgres_can_create_databases(STANDARD_POSTGRES) {
                announce(
                    "Postgres",
                    STANDARD_POSTGRES,
                    "DATABASE_URL unset, the standard local port",
                );
                return Some(STANDARD_POSTGRES.to_string());
            }
            let url = throwaway_postgres()?;
            announce("Postgres", &url, "DATABASE_URL unset, a throwaway cluster");
            Some(url)
        })
        .clone()
}

/// A throwaway Postgres cluster from PATH (or /usr/lib/postgresql), for the life of the run.
pub(crate) fn throwaway_postgres() -> Option<String> {
    POSTGRES
        .get_or_init(|| {
            let initdb = find_pg_bin("initdb")?;
            let pg_ctl = find_pg_bin("pg_ctl")?;
            let dir = tempfile::tempdir().ok()?;
            let data = dir.path().join("data");
            let ok = Command::new(&initdb)
                .args(["-U", "postgres", "--auth=trust", "-D"])
                .arg(&data)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .ok()?
                .success();
            if !ok {
                return None;
            }
            let port = free_port();
            let child = Command::new(&pg_ctl)
                .arg("-D")
                .arg(&data)
                .args(["-w", "-o"])
                .arg(format!(
                    "-p {port} -k {} -c listen_addresses=127.0.0.1",
                    dir.path().display()
                ))
                .arg("start")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .ok()?;
            for _ in 0..100 {
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Some(Throwaway {
                        _child: child,
                        _dir: dir,
                        url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
                    });
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            None
        })
        .as_ref()
        .map(|t| t.url.clone())
}

pub(crate) fn random_suffix() -> String {
    let mut raw = [0u8; 6];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut raw);
    hex::encode(raw)
}

/// A fresh, empty Postgres database for one test.
pub(crate) async fn fresh_postgres_db() -> Option<String> {
    use sqlx::Connection;
    let admin = postgres_admin_url()?;
    let mut conn = sqlx::PgConnection::connect(&admin).await.ok()?;
    let name = format!("tb_test_{}", random_suffix());
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .ok()?;
    let mut url = url::Url::parse(&admin).ok()?;
    url.set_path(&format!("/{name}"));
    Some(url.to_string())
}

/// Drops a database `fresh_postgres_db` made (with its open connections: an app the test did
/// not stop still holds some).
pub(crate) fn drop_postgres_db(name: &str) {
    use sqlx::Connection;
    if !name.starts_with("tb_test_")
        || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        return;
    }
    let Some(admin) = postgres_admin_url() else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        if let Ok(mut conn) = sqlx::PgConnection::connect(&admin).await {
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .execute(&mut conn)
                .await;
        }
    });
}

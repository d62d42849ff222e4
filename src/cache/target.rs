//! Where Redis is and how to talk to it: one node, a Redis Cluster (a comma-separated list of
//! node URLs), or a primary found through Redis Sentinel
//! (`redis+sentinel://[:password@]host1:26379,host2:26379/<master-name>`).
//! `RedisConn` is one connection type over the three; the Sentinel one finds the primary again
//! by itself after a failover.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{Sentinel, SentinelNodeConnectionInfo};
use redis::{
    AsyncConnectionConfig, Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, RedisResult, Value,
};

/// A parsed `REDIS_URL`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Single(String),
    Cluster(Vec<String>),
    Sentinel {
        sentinels: Vec<String>,
        master: String,
        password: Option<String>,
    },
}

const SENTINEL_SCHEME: &str = "redis+sentinel://";

impl Target {
    /// Parses `REDIS_URL`; the error says what is expected (never echoing the value).
    pub fn parse(url: &str) -> Result<Self, &'static str> {
        let url = url.trim();
        if let Some(rest) = url.strip_prefix(SENTINEL_SCHEME) {
            let (hosts, master) = rest
                .split_once('/')
                .ok_or("expected redis+sentinel://host:port[,host:port…]/<master-name>")?;
            let (password, hosts) = match hosts.rsplit_once('@') {
                Some((creds, hosts)) => {
                    let pw = creds.split_once(':').map_or(creds, |(_, p)| p);
                    (Some(pw.to_owned()).filter(|p| !p.is_empty()), hosts)
                }
                None => (None, hosts),
            };
            let master = master.trim_end_matches('/');
            if master.is_empty()
                || master.len() > 128
                || !master
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
            {
                return Err("expected a master name of [A-Za-z0-9._-] after the hosts in redis+sentinel://…/<master-name>");
            }
            let sentinels: Vec<String> = hosts
                .split(',')
                .map(str::trim)
                .filter(|h| !h.is_empty())
                .map(|h| format!("redis://{h}"))
                .collect();
            if sentinels.is_empty()
                || sentinels
                    .iter()
                    .any(|s| url::Url::parse(s).map_or(true, |u| u.host_str().is_none()))
            {
                return Err("expected host:port of at least one Sentinel in redis+sentinel://…");
            }
            return Ok(Self::Sentinel {
                sentinels,
                master: master.to_owned(),
                password,
            });
        }
        let mut nodes: Vec<String> = url
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        if nodes.is_empty()
            || nodes
                .iter()
                .any(|n| !(n.starts_with("redis://") || n.starts_with("rediss://")))
        {
            return Err("expected redis://host:port, a comma-separated list of node URLs for Redis Cluster, or redis+sentinel://host:port[,host:port…]/<master-name>");
        }
        Ok(if nodes.len() > 1 {
            Self::Cluster(nodes)
        } else {
            Self::Single(nodes.remove(0))
        })
    }

    /// A client for the node to subscribe to events on: `None` for a cluster (any node will
    /// do; the listener picks one). For Sentinel, the current primary.
    pub async fn events_client(&self) -> Option<RedisResult<redis::Client>> {
        match self {
            Self::Cluster(_) => None,
            Self::Single(url) => Some(redis::Client::open(url.as_str())),
            Self::Sentinel {
                sentinels,
                master,
                password,
            } => Some(
                async {
                    let mut s = Sentinel::build(sentinels.clone())?;
                    let info = sentinel_node_info(password);
                    primary_client(&mut s, master, &info, Duration::from_secs(1)).await
                }
                .await,
            ),
        }
    }
}

fn sentinel_node_info(password: &Option<String>) -> SentinelNodeConnectionInfo {
    SentinelNodeConnectionInfo {
        tls_mode: None,
        redis_connection_info: password.as_ref().map(|p| redis::RedisConnectionInfo {
            password: Some(p.clone()),
            ..Default::default()
        }),
    }
}

/// Asks the Sentinels which node is the primary; a client for it.
async fn primary_client(
    sentinel: &mut Sentinel,
    master: &str,
    info: &SentinelNodeConnectionInfo,
    bound: Duration,
) -> RedisResult<redis::Client> {
    tokio::time::timeout(bound, sentinel.async_master_for(master, Some(info)))
        .await
        .map_err(|_| RedisError::from((ErrorKind::IoError, "Sentinel did not answer")))?
}

/// One connection type for a single Redis, Redis Cluster and a Sentinel-managed primary.
#[derive(Clone)]
pub enum RedisConn {
    /// One node, fixed or found through Sentinel: a multiplexed connection replaced in the
    /// background after errors.
    Node(NodeConn),
    Cluster(ClusterConnection),
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Node(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Node(c) => c.req_packed_commands(cmd, offset, count),
            Self::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Node(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

impl RedisConn {
    /// Connects to `target`. `timeout` bounds each call; connecting may take up to 1 s.
    pub async fn connect(target: &Target, timeout: Duration) -> Result<Self, RedisError> {
        let connect_timeout = timeout.max(Duration::from_secs(1));
        match target {
            Target::Cluster(nodes) => {
                // Few, quick retries: the caller's own timeout is short, and a request that
                // hits a moved or dead slot is retried after the slot map is refreshed.
                let client = ClusterClientBuilder::new(nodes.clone())
                    .connection_timeout(connect_timeout)
                    .response_timeout(connect_timeout)
                    .retries(3)
                    .min_retry_wait(10)
                    .max_retry_wait(200)
                    .build()?;
                Ok(Self::Cluster(client.get_async_connection().await?))
            }
            Target::Single(url) => {
                let conn =
                    NodeConn::new(Source::Fixed(redis::Client::open(url.as_str())?), timeout);
                conn.inner.clone().reconnect_now().await?;
                Ok(Self::Node(conn))
            }
            Target::Sentinel {
                sentinels,
                master,
                password,
            } => {
                let conn = NodeConn::new(
                    Source::Sentinel {
                        sentinel: tokio::sync::Mutex::new(Sentinel::build(sentinels.to_vec())?),
                        master: master.clone(),
                        node_info: sentinel_node_info(password),
                    },
                    timeout,
                );
                conn.inner.clone().reconnect_now().await?;
                Ok(Self::Node(conn))
            }
        }
    }

    /// A call failed: the node may be gone or (Sentinel) the primary may have moved. Connect
    /// again in the background; the current connection serves until a new one stands.
    pub fn suspect(&self) {
        if let Self::Node(c) = self {
            c.inner.clone().reconnect_in_background();
        }
    }
}

/// Where a node connection goes.
enum Source {
    Fixed(redis::Client),
    Sentinel {
        sentinel: tokio::sync::Mutex<Sentinel>,
        master: String,
        node_info: SentinelNodeConnectionInfo,
    },
}

/// A multiplexed connection to one node, replaced by a background reconnect (one at a time,
/// retried until it works) after errors. Written here rather than using the crate's
/// `ConnectionManager`, which can keep a failed reconnect forever when the failure is not an
/// I/O error (seen with connect timeouts), and which cannot follow a Sentinel failover.
#[derive(Clone)]
pub struct NodeConn {
    inner: Arc<NodeInner>,
}

struct NodeInner {
    source: Source,
    timeout: Duration,
    current: RwLock<Option<MultiplexedConnection>>,
    reconnecting: AtomicBool,
}

impl NodeConn {
    fn new(source: Source, timeout: Duration) -> Self {
        Self {
            inner: Arc::new(NodeInner {
                source,
                timeout,
                current: RwLock::new(None),
                reconnecting: AtomicBool::new(false),
            }),
        }
    }

    fn current(&self) -> Option<MultiplexedConnection> {
        self.inner.current.read().expect("node conn").clone()
    }

    fn get_db(&self) -> i64 {
        0
    }

    /// The current connection; none yet starts a reconnect.
    fn conn(&self) -> RedisResult<MultiplexedConnection> {
        self.current().ok_or_else(|| {
            self.inner.clone().reconnect_in_background();
            no_primary()
        })
    }

    /// Passes `r` through, starting a reconnect when it says the node may be gone.
    fn watch<T>(&self, r: RedisResult<T>) -> RedisResult<T> {
        if r.as_ref().is_err_and(primary_may_have_moved) {
            self.inner.clone().reconnect_in_background();
        }
        r
    }

    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let r = self.conn()?.req_packed_command(cmd).await;
            self.watch(r)
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let r = self.conn()?.req_packed_commands(cmd, offset, count).await;
            self.watch(r)
        })
    }
}

fn no_primary() -> RedisError {
    RedisError::from((ErrorKind::IoError, "no Redis primary known yet"))
}

fn primary_may_have_moved(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || matches!(e.kind(), ErrorKind::ReadOnly | ErrorKind::MasterDown)
}

impl NodeInner {
    /// Connects (asking the Sentinels for the primary first) and makes it the connection.
    async fn reconnect_now(self: Arc<Self>) -> RedisResult<()> {
        let bound = self.timeout.max(Duration::from_secs(1));
        let client = match &self.source {
            Source::Fixed(client) => client.clone(),
            Source::Sentinel {
                sentinel,
                master,
                node_info,
            } => primary_client(&mut *sentinel.lock().await, master, node_info, bound).await?,
        };
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(bound)
            .set_response_timeout(self.timeout);
        let mut conn = tokio::time::timeout(
            bound,
            client.get_multiplexed_async_connection_with_config(&config),
        )
        .await
        .map_err(|_| RedisError::from((ErrorKind::IoError, "connect timed out")))??;
        // It must answer before it replaces a connection that may still work.
        tokio::time::timeout(bound, redis::cmd("PING").query_async::<()>(&mut conn))
            .await
            .map_err(|_| RedisError::from((ErrorKind::IoError, "PING timed out")))??;
        *self.current.write().expect("node conn") = Some(conn);
        Ok(())
    }

    /// One background re-resolution at a time, retried until a primary answers.
    fn reconnect_in_background(self: Arc<Self>) {
        if self.reconnecting.swap(true, Ordering::AcqRel) {
            return;
        }
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(50);
            loop {
                match self.clone().reconnect_now().await {
                    Ok(()) => break,
                    Err(e) => {
                        tracing::debug!(error = %e, "Redis reconnect failed; retrying");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(1));
                    }
                }
            }
            self.reconnecting.store(false, Ordering::Release);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_single_cluster_and_sentinel_urls() {
        assert_eq!(
            Target::parse("redis://r:6379").unwrap(),
            Target::Single("redis://r:6379".into())
        );
        assert_eq!(
            Target::parse("redis://a:1, redis://b:2").unwrap(),
            Target::Cluster(vec!["redis://a:1".into(), "redis://b:2".into()])
        );
        assert_eq!(
            Target::parse("redis+sentinel://s1:26379,s2:26379/mymaster").unwrap(),
            Target::Sentinel {
                sentinels: vec!["redis://s1:26379".into(), "redis://s2:26379".into()],
                master: "mymaster".into(),
                password: None,
            }
        );
        let Target::Sentinel { password, .. } =
            Target::parse("redis+sentinel://:pw@s1:26379/m").unwrap()
        else {
            panic!()
        };
        assert_eq!(password.as_deref(), Some("pw"));
        for bad in [
            "http://x",
            "redis+sentinel://s1:26379",
            "redis+sentinel://s1:26379/",
            "redis+sentinel:///m",
            "redis+sentinel://s1/m a",
            "",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }
}

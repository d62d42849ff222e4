//! Services and processes a test owns: its own Redis, cluster and Sentinels, the broker
//! binary, proxies that can be cut.

use super::*;

/// A redis-server this test owns (so it can stop, pause and restart it).
pub struct OwnRedis {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl OwnRedis {
    pub fn start() -> Option<Self> {
        let mut r = Self {
            port: free_port(),
            dir: tempfile::tempdir().ok()?,
            child: None,
        };
        r.restart().then_some(r)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts it (again) on the same port.
    pub fn restart(&mut self) -> bool {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let Ok(child) = child else { return false };
        self.child = Some(child);
        for _ in 0..50 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A TCP proxy the test can cut, standing in for a database that goes away.
pub struct CuttableProxy {
    pub port: u16,
    cut: tokio::sync::watch::Sender<bool>,
}

impl CuttableProxy {
    pub async fn start(target: (String, u16)) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (cut, watch) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                let mut watch = watch.clone();
                if *watch.borrow() {
                    continue;
                }
                let target = target.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = watch.wait_for(|c| *c) => {}
                    }
                });
            }
        });
        Self { port, cut }
    }

    /// Drops every connection and refuses new ones.
    pub fn cut(&self) {
        let _ = self.cut.send(true);
    }
}

/// The broker binary run as its own process, its stdout and stderr captured to files.
pub struct BrokerProcess {
    pub child: Child,
    pub address: String,
    pub log: std::path::PathBuf,
    pub out: std::path::PathBuf,
    _dir: Option<tempfile::TempDir>,
}

impl BrokerProcess {
    pub async fn start(envs: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut all = vec![("BROKER_ADMIN_TOKEN", ADMIN_TOKEN)];
        all.extend_from_slice(envs);
        let mut p = Self::start_in(dir.path(), &all).await;
        p._dir = Some(dir);
        p
    }

    /// `serve` on the SQLite database `broker.db` in `dir` (which outlives the process, so a
    /// test can start again on it), with only `envs` besides the listen address, the database
    /// and `BROKER_ALLOW_INSECURE_ISSUERS=true`.
    pub async fn start_in(dir: &std::path::Path, envs: &[(&str, &str)]) -> Self {
        let port = free_port();
        let n = std::fs::read_dir(dir).map_or(0, |d| d.count());
        let log = dir.join(format!("stderr-{n}.log"));
        let out = dir.join(format!("stdout-{n}.log"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_token-broker"));
        cmd.arg("serve")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("BROKER_LISTEN", format!("127.0.0.1:{port}"))
            .env(
                "DATABASE_URL",
                format!("sqlite://{}/broker.db", dir.display()),
            )
            .env("BROKER_ALLOW_INSECURE_ISSUERS", "true")
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&log).unwrap());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("the broker binary starts");
        let address = format!("http://127.0.0.1:{port}");
        for _ in 0..100 {
            if reqwest::get(format!("{address}/healthz")).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self {
            child,
            address,
            log,
            out,
            _dir: None,
        }
    }

    /// What the process printed on standard output so far.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    pub fn sigterm(&self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl CuttableProxy {
    /// Accepts connections again after `cut`.
    pub fn restore(&self) {
        let _ = self.cut.send(false);
    }
}

/// A port `p` below 45535 with `p` and `p + 10000` free (a cluster node's bus port).
pub(crate) fn free_cluster_port(taken: &[u16]) -> u16 {
    loop {
        // Below the kernel's ephemeral range (32768 and up, where every outgoing connection of
        // the concurrently running tests takes its local port), the cluster bus port (+10,000)
        // included: a node whose bus port was taken by a client socket exits at start.
        let p: u16 = rand::Rng::gen_range(&mut rand::thread_rng(), 20_000..22_700);
        if taken
            .iter()
            .any(|t| t.abs_diff(p) < 2 || t.abs_diff(p + 10_000) < 2)
        {
            continue;
        }
        let free = |port: u16| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok();
        if free(p) && free(p + 10_000) {
            return p;
        }
    }
}

/// One `redis-server` process this test owns, started with extra arguments.
pub struct RedisNode {
    pub port: u16,
    dir: tempfile::TempDir,
    args: Vec<String>,
    child: Option<Child>,
}

impl RedisNode {
    /// A node on a free port, started with `args`.
    pub fn spawn(args: &[&str]) -> Self {
        Self::start(free_cluster_port(&[]), args)
    }

    fn start(port: u16, args: &[&str]) -> Self {
        let mut n = Self {
            port,
            dir: tempfile::tempdir().unwrap(),
            args: args.iter().map(|a| a.to_string()).collect(),
            child: None,
        };
        n.restart();
        n
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts it (again) on the same port, empty (no persistence), with its cluster config
    /// file if it has one.
    pub fn restart(&mut self) {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!("redis-server could not start ({e}); install it (apt-get install redis-server)")
        });
        self.child = Some(child);
        for _ in 0..100 {
            // Answering on the port is not enough: another process may hold it while this
            // one exits on a failed bind (its bus port, say).
            let exited = self
                .child
                .as_mut()
                .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
            if exited {
                panic!(
                    "redis-server on port {} exited at start (port taken?)",
                    self.port
                );
            }
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server on port {} did not come up", self.port);
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RedisNode {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs one Redis command against `port` and returns its answer.
pub async fn redis_cmd(port: u16, args: &[&str]) -> redis::RedisResult<redis::Value> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query_async(&mut conn).await
}

pub fn redis_text(v: &redis::Value) -> String {
    match v {
        redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        redis::Value::SimpleString(s) => s.clone(),
        redis::Value::VerbatimString { text, .. } => text.clone(),
        other => format!("{other:?}"),
    }
}

/// A throwaway Redis Cluster: 3 primaries and 3 replicas on loopback.
pub struct RedisCluster {
    pub nodes: Vec<RedisNode>,
}

impl RedisCluster {
    pub async fn start() -> Self {
        let mut ports = Vec::new();
        for _ in 0..6 {
            ports.push(free_cluster_port(&ports));
        }
        let nodes: Vec<RedisNode> = ports
            .iter()
            .map(|&p| {
                RedisNode::start(
                    p,
                    &[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        "1000",
                        "--cluster-replica-validity-factor",
                        "0",
                    ],
                )
            })
            .collect();
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for p in &ports {
            create.arg(format!("127.0.0.1:{p}"));
        }
        let out = create
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("redis-cli is needed for the cluster tests (apt-get install redis-tools)");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let cluster = Self { nodes };
        cluster.wait_ok(Duration::from_secs(20)).await;
        cluster
    }

    /// `redis://a,redis://b,…` of the primaries the cluster started with.
    pub fn url(&self) -> String {
        self.nodes[..3]
            .iter()
            .map(RedisNode::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Waits until every live node says `cluster_state:ok` and all slots are served.
    pub async fn wait_ok(&self, within: Duration) -> Duration {
        let started = std::time::Instant::now();
        loop {
            let mut all_ok = true;
            for n in self.nodes.iter().filter(|n| n.child.is_some()) {
                let info = redis_cmd(n.port, &["CLUSTER", "INFO"])
                    .await
                    .map(|v| redis_text(&v))
                    .unwrap_or_default();
                if !info.contains("cluster_state:ok") {
                    all_ok = false;
                }
            }
            if all_ok {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < within,
                "the cluster did not reach cluster_state:ok within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The index of the node serving `slot` as primary.
    pub async fn primary_of(&self, slot: u16) -> usize {
        let v = redis_cmd(self.nodes[0].port, &["CLUSTER", "SLOTS"])
            .await
            .or(redis_cmd(self.nodes[1].port, &["CLUSTER", "SLOTS"]).await)
            .unwrap();
        let redis::Value::Array(ranges) = v else {
            panic!("CLUSTER SLOTS: {v:?}")
        };
        for r in ranges {
            let redis::Value::Array(parts) = r else {
                continue;
            };
            if let (redis::Value::Int(a), redis::Value::Int(b), redis::Value::Array(primary)) =
                (&parts[0], &parts[1], &parts[2])
            {
                if (*a as u16..=*b as u16).contains(&slot) {
                    let redis::Value::Int(port) = primary[1] else {
                        panic!()
                    };
                    return self
                        .nodes
                        .iter()
                        .position(|n| n.port == port as u16)
                        .unwrap();
                }
            }
        }
        panic!("slot {slot} not served");
    }
}

/// A throwaway primary, one replica and three Sentinels watching them as `mymaster`.
pub struct RedisSentinels {
    pub primary: RedisNode,
    /// Kept running (Sentinel promotes it).
    _replica: RedisNode,
    pub sentinels: Vec<RedisNode>,
}

impl RedisSentinels {
    pub async fn start() -> Self {
        let mut ports = Vec::new();
        for _ in 0..5 {
            ports.push(free_cluster_port(&ports));
        }
        let primary = RedisNode::start(ports[0], &[]);
        let replica = RedisNode::start(
            ports[1],
            &["--replicaof", "127.0.0.1", &ports[0].to_string()],
        );
        let mut sentinels = Vec::new();
        for &p in &ports[2..] {
            let dir = tempfile::tempdir().unwrap();
            let conf = dir.path().join("sentinel.conf");
            std::fs::write(
                &conf,
                format!(
                    "port {p}\nbind 127.0.0.1\nsentinel monitor mymaster 127.0.0.1 {} 2\nsentinel down-after-milliseconds mymaster 1000\nsentinel failover-timeout mymaster 3000\nsentinel parallel-syncs mymaster 1\n",
                    ports[0]
                ),
            )
            .unwrap();
            let child = Command::new("redis-server")
                .arg(&conf)
                .arg("--sentinel")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server --sentinel");
            for _ in 0..100 {
                if std::net::TcpStream::connect(("127.0.0.1", p)).is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            sentinels.push(RedisNode {
                port: p,
                dir,
                args: Vec::new(),
                child: Some(child),
            });
        }
        let s = Self {
            primary,
            _replica: replica,
            sentinels,
        };
        // Wait until the Sentinels agree on the primary and know the replica.
        for _ in 0..100 {
            let v = redis_cmd(s.sentinels[0].port, &["SENTINEL", "REPLICAS", "mymaster"]).await;
            if matches!(v, Ok(redis::Value::Array(ref r)) if !r.is_empty()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        s
    }

    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .sentinels
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!("redis+sentinel://{}/mymaster", hosts.join(","))
    }

    /// The port Sentinel currently names as primary.
    pub async fn primary_port(&self) -> Option<u16> {
        let v = redis_cmd(
            self.sentinels[0].port,
            &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster"],
        )
        .await
        .ok()?;
        let redis::Value::Array(parts) = v else {
            return None;
        };
        redis_text(parts.get(1)?).parse().ok()
    }
}

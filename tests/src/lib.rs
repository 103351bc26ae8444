//! Helpers for the end-to-end tests: real servers (Tansu, redis-server) started on free ports
//! by [`verdict::local_stack::LocalStack`], a regular Kafka producer and an independent
//! decisions consumer, and an independent scoring path to check decisions against.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use verdict::config::{example_config_dir, Config, EXAMPLE_CONFIG};
use verdict::demo::EXAMPLE_TOPICS;
use verdict::generator::{Transaction, World, Zones, ZONES};
use verdict::local_stack::LocalStack;

/// A broker and Redis with the example topics and a world's features loaded.
pub struct Harness {
    pub stack: LocalStack,
    pub world: World,
    pub zones: Zones,
    pub config: Config,
}

impl Harness {
    pub async fn start(cards: usize, merchants: usize) -> anyhow::Result<Self> {
        let stack = LocalStack::start()?;
        stack.create_topics(&EXAMPLE_TOPICS).await?;
        let world = World::generate(2026, cards, merchants);
        let zones = Zones::generate(2026, ZONES);
        world.load_into_redis(&stack.redis_url).await?;
        zones.load_into_redis(&stack.redis_url).await?;
        let mut config = Config::parse(EXAMPLE_CONFIG, &example_config_dir())?;
        config.kafka.brokers = stack.kafka_bootstrap.clone();
        config.redis.url = stack.redis_url.clone();
        // A free port: several pipelines (tests, a demo beside a running one) never collide.
        if let Some(http) = &mut config.http {
            http.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        }
        // Redis and the broker share two cores with the test: a loaded machine must not
        // push lookups into degraded mode, nor answers into fallbacks. These tests check the
        // model's answers; the deadline has its own test, which sets one.
        config.redis.response_timeout = Duration::from_secs(2);
        for w in &mut config.workloads {
            w.deadline = None;
        }
        Ok(Self {
            stack,
            world,
            zones,
            config,
        })
    }

    /// `count` transactions from the world's seeded stream.
    pub fn transactions(
        &self,
        count: usize,
        run_id: &str,
        unknown_card_rate: f64,
    ) -> Vec<Transaction> {
        let mut stream = self.world.transactions(99, run_id, unknown_card_rate);
        let now = verdict::workload::now_ms();
        (0..count).map(|i| stream.next_at(now + i as i64)).collect()
    }

    /// Writes the example config for a `verdict run` child process of this harness (its
    /// broker and Redis, a free metrics port, absolute model paths) to `dir`, after
    /// `edit` has changed its text; returns the file's path.
    pub fn write_process_config(
        &self,
        dir: &std::path::Path,
        edit: impl FnOnce(String) -> String,
    ) -> anyhow::Result<PathBuf> {
        let models = example_config_dir()
            .join("../../scorers/models")
            .canonicalize()?;
        let text = EXAMPLE_CONFIG
            .replace("127.0.0.1:9092", &self.stack.kafka_bootstrap)
            .replace("redis://127.0.0.1:6379", &self.stack.redis_url)
            .replace("response-timeout = \"50ms\"", "response-timeout = \"2s\"")
            // Several processes on one machine: each gets its own metrics port.
            .replace("listen = \"127.0.0.1:9464\"", "listen = \"127.0.0.1:0\"")
            .replace(
                "\"../../scorers/models/",
                &format!("\"{}/", models.display()),
            );
        let path = dir.join("verdict.toml");
        std::fs::write(&path, edit(text))?;
        Ok(path)
    }

    pub fn input_topic(&self) -> &str {
        &self.config.workloads[0].input_topic
    }

    pub fn decisions_topic(&self) -> &str {
        &self.config.workloads[0].decisions_topic
    }
}

/// librdkafka's mock cluster (one broker, the example topics) with a real `redis-server` and a
/// world's features: for the tests that take the broker down or inject its errors.
pub struct MockStack {
    pub cluster: rdkafka::mocking::MockCluster<'static, DefaultProducerContext>,
    pub redis: LocalStack,
    pub world: World,
    /// The example config pointed at both, a free metrics port, deadlines off.
    pub config: Config,
}

impl MockStack {
    pub async fn start() -> anyhow::Result<Self> {
        let cluster = rdkafka::mocking::MockCluster::new(1)?;
        for (topic, partitions) in EXAMPLE_TOPICS {
            cluster.create_topic(topic, partitions, 1)?;
        }
        let redis = LocalStack::redis_only()?;
        let world = World::generate(2026, 500, 100);
        world.load_into_redis(&redis.redis_url).await?;
        let mut config = Config::parse(EXAMPLE_CONFIG, &example_config_dir())?;
        config.kafka.brokers = cluster.bootstrap_servers();
        config.redis.url = redis.redis_url.clone();
        config.redis.response_timeout = Duration::from_secs(2);
        if let Some(http) = &mut config.http {
            http.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        }
        for w in &mut config.workloads {
            w.deadline = None;
        }
        Ok(Self {
            cluster,
            redis,
            world,
            config,
        })
    }

    pub fn brokers(&self) -> String {
        self.cluster.bootstrap_servers()
    }
}

/// A message to produce with everything Kafka allows: no value (a tombstone), headers.
#[derive(Debug, Clone)]
pub struct OutMessage {
    pub key: String,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
}

/// Produces messages with a plain librdkafka producer (keyed), at `rate` per second if given.
pub fn produce(
    brokers: &str,
    topic: &str,
    messages: &[(String, Vec<u8>)],
    rate: Option<f64>,
) -> anyhow::Result<()> {
    let messages: Vec<OutMessage> = messages
        .iter()
        .map(|(key, payload)| OutMessage {
            key: key.clone(),
            payload: Some(payload.clone()),
            headers: Vec::new(),
        })
        .collect();
    produce_messages(brokers, topic, &messages, rate)
}

/// [`produce`] for messages with headers or without a value.
pub fn produce_messages(
    brokers: &str,
    topic: &str,
    messages: &[OutMessage],
    rate: Option<f64>,
) -> anyhow::Result<()> {
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "2")
        .create()?;
    let started = Instant::now();
    for (i, m) in messages.iter().enumerate() {
        if let Some(rate) = rate {
            let due = started + Duration::from_secs_f64(i as f64 / rate);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        let mut headers = rdkafka::message::OwnedHeaders::new();
        for (name, value) in &m.headers {
            headers = headers.insert(rdkafka::message::Header {
                key: name,
                value: Some(value),
            });
        }
        let mut record: BaseRecord<'_, str, [u8]> =
            BaseRecord::to(topic).key(m.key.as_str()).headers(headers);
        if let Some(payload) = &m.payload {
            record = record.payload(payload.as_slice());
        }
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, back)) => {
                    record = back;
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        }
    }
    producer.flush(Duration::from_secs(30))?;
    Ok(())
}

/// Transactions as JSON messages keyed by card, as a payment system publishes them: one
/// card's transactions stay in one partition, in order, so its velocity windows see them in
/// event-time order.
pub fn as_messages(transactions: &[Transaction]) -> Vec<(String, Vec<u8>)> {
    transactions
        .iter()
        .map(|t| {
            (
                t.card_id.clone(),
                serde_json::to_vec(t).expect("serializable"),
            )
        })
        .collect()
}

/// A message as read back from a topic.
#[derive(Debug, Clone)]
pub struct Received {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub payload: Vec<u8>,
    pub headers: HashMap<String, String>,
}

/// Consumes a topic from the beginning on its own thread, with its own consumer group.
pub struct Collector {
    received: Arc<Mutex<Vec<Received>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Collector {
    pub fn start(brokers: &str, topic: &str) -> anyhow::Result<Self> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set(
                "group.id",
                format!("collector-{topic}-{}", std::process::id()),
            )
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .set("session.timeout.ms", "6000")
            .set("fetch.wait.max.ms", "10")
            .create()?;
        consumer.subscribe(&[topic])?;
        let received = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let received = Arc::clone(&received);
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Some(result) = consumer.poll(Duration::from_millis(50)) {
                        let m = result?;
                        let headers = m
                            .headers()
                            .map(|hs| {
                                use rdkafka::message::Headers;
                                hs.iter()
                                    .map(|h| {
                                        (
                                            h.key.to_string(),
                                            String::from_utf8_lossy(h.value.unwrap_or_default())
                                                .into_owned(),
                                        )
                                    })
                                    .collect()
                            })
                            .unwrap_or_default();
                        received.lock().unwrap().push(Received {
                            partition: m.partition(),
                            offset: m.offset(),
                            key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                            payload: m.payload().unwrap_or_default().to_vec(),
                            headers,
                        });
                    }
                }
                Ok(())
            })
        };
        Ok(Self {
            received,
            stop,
            thread: Some(thread),
        })
    }

    pub fn snapshot(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// Distinct keys received so far.
    pub fn distinct_keys(&self) -> usize {
        let received = self.received.lock().unwrap();
        received
            .iter()
            .filter_map(|r| r.key.as_deref())
            .collect::<std::collections::HashSet<_>>()
            .len()
    }

    /// Waits until `done(received)` holds, or fails after `timeout`.
    pub fn wait_until(
        &self,
        timeout: Duration,
        what: &str,
        mut done: impl FnMut(&Self) -> bool,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while !done(self) {
            anyhow::ensure!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what} ({} distinct keys so far)",
                self.distinct_keys()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    pub fn stop(mut self) -> anyhow::Result<Vec<Received>> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join()
                .map_err(|_| anyhow::anyhow!("collector panicked"))??;
        }
        Ok(self.snapshot())
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Reading the operations endpoint, as a scraper does.
pub use verdict::scrape;

/// Waits until the pipeline serving `/readyz` at `http` is ready (its consumers have joined),
/// so a test that times transactions from their production does not count the group join.
pub async fn wait_until_ready(http: std::net::SocketAddr, timeout: Duration) -> anyhow::Result<()> {
    let ready_by = Instant::now() + timeout;
    while scrape::get(http, "/readyz").map_or(0, |(status, _)| status) != 200 {
        anyhow::ensure!(
            Instant::now() < ready_by,
            "the pipeline was not ready within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// The `verdict` binary built next to this test.
pub fn verdict_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let binary = dir.join("verdict");
    assert!(
        binary.is_file(),
        "{} not found: build it first (`cargo build --release --bins`; deploy/test.sh does)",
        binary.display()
    );
    binary
}

/// A `verdict run` child process, killed if the test fails before stopping it.
pub struct VerdictProcess(Child, PathBuf);

impl VerdictProcess {
    pub fn spawn(config: &std::path::Path, log: &std::path::Path) -> Self {
        Self::spawn_with_env(config, log, &[("RUST_LOG", "info")])
    }

    /// [`VerdictProcess::spawn`] with environment variables of its own.
    pub fn spawn_with_env(
        config: &std::path::Path,
        log: &std::path::Path,
        env: &[(&str, &str)],
    ) -> Self {
        let child = Command::new(verdict_binary())
            .args(["run", "--config"])
            .arg(config)
            .envs(env.iter().copied())
            .stdout(std::fs::File::create(log).unwrap())
            .stderr(std::fs::File::create(log.with_extension("err")).unwrap())
            .spawn()
            .unwrap();
        Self(child, log.to_path_buf())
    }

    /// Waits until the process logged that its consumer got partitions (it has installed its
    /// signal handlers long before).
    pub fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let log = std::fs::read_to_string(&self.1).unwrap_or_default();
            if log.contains("partitions assigned") {
                return Ok(());
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "verdict did not join the group within {timeout:?}:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A crash: SIGKILL, no drain, no final commit.
    pub fn crash(&mut self) {
        self.0.kill().unwrap();
        self.0.wait().unwrap();
    }

    /// SIGTERM, then the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = libc::pid_t::try_from(self.0.id()).expect("pid fits pid_t");
        // SAFETY: kill(2) with a pid this test spawned and has not reaped yet.
        let sent = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(
            sent,
            0,
            "kill(SIGTERM) failed: {}",
            std::io::Error::last_os_error()
        );
        self.0.wait().unwrap()
    }
}

impl Drop for VerdictProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

impl VerdictProcess {
    /// The process id.
    pub fn id(&self) -> u32 {
        self.0.id()
    }
}

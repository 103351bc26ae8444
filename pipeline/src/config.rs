//! The configuration: one TOML document, loaded once in `main` and passed down.
//!
//! Keys are kebab-case, unknown keys are errors (a typo must not silently fall back to a
//! default), durations are human-readable (`"2ms"`, `"1s"`), and relative paths are resolved
//! against the config file's folder. librdkafka properties pass through untouched. See
//! `deploy/config/verdict.toml` for a complete, commented example.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rdkafka::config::ClientConfig;
use serde::Deserialize;
use verdict_features::{EntityLookup, RedisConfig, VelocitySpec};
use verdict_scorers::drift::DriftConfig;
use verdict_scorers::{ExecutionProvider, FraudThresholds, OnnxScorerConfig, PricingBounds};

use crate::http::HttpConfig;
use crate::PipelineError;

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Config {
    pub kafka: KafkaConfig,
    pub redis: RedisConfig,
    /// Path to `libonnxruntime.so`. Default: `$ORT_DYLIB_PATH`, else the `onnxruntime` wheel
    /// in the project's `.venv`.
    #[serde(default)]
    pub onnxruntime_library: Option<PathBuf>,
    /// The operations endpoint (`/metrics`, `/healthz`, `/readyz`); none when absent.
    #[serde(default)]
    pub http: Option<HttpConfig>,
    #[serde(default)]
    pub log: LogConfig,
    /// The workloads this process runs, each with its own consumer and stages.
    pub workloads: Vec<WorkloadConfig>,
}

/// `[log]`: logging of `verdict run` (the other commands log at info, as text).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct LogConfig {
    /// `tracing` filter directives, e.g. `"info"` or `"warn,verdict=debug"` (`debug` adds one
    /// line per batch). `RUST_LOG`, when set, wins.
    #[serde(default = "default_log_level")]
    pub level: String,
    /// `text` for terminals, `json` (one object per line) for log collectors. The
    /// `--log-format` flag, when given, wins.
    #[serde(default)]
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: default_log_level(),
            format: LogFormat::Text,
        }
    }
}

fn default_log_level() -> String {
    "warn,verdict=info".into()
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `[kafka]`: the cluster and client properties shared by every workload.
#[derive(Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct KafkaConfig {
    /// `bootstrap.servers`, e.g. `"127.0.0.1:9092"`.
    pub brokers: String,
    /// Consumer group id prefix: workload `fraud` consumes as `<group-id>.fraud`.
    pub group_id: String,
    /// librdkafka properties for every client (e.g. `security.protocol`, `sasl.*`).
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// librdkafka properties for consumers only; override verdict's defaults.
    #[serde(default)]
    pub consumer_properties: BTreeMap<String, String>,
    /// librdkafka properties for the producer only; override verdict's defaults.
    #[serde(default)]
    pub producer_properties: BTreeMap<String, String>,
}

impl fmt::Debug for KafkaConfig {
    // Properties can hold `sasl.password` and keys: print only their names.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("group_id", &self.group_id)
            .field("properties", &self.properties.keys().collect::<Vec<_>>())
            .field(
                "consumer_properties",
                &self.consumer_properties.keys().collect::<Vec<_>>(),
            )
            .field(
                "producer_properties",
                &self.producer_properties.keys().collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl KafkaConfig {
    /// Consumer properties: verdict's defaults, then `properties`, then `consumer-properties`.
    pub fn consumer(&self, group_id: &str) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            .set("group.id", group_id)
            // At least once: an offset is stored only after the batch's outputs are
            // acknowledged; stored offsets are committed in the background and on shutdown.
            .set("enable.auto.offset.store", "false")
            .set("enable.auto.commit", "true")
            // After a crash the next owner decides again what was acknowledged since the
            // last commit: at 1,000 ms a killed process of two left about 200 duplicates at
            // 800 tx/s (`tests/tests/failover.rs`). A commit is one small request, and none is
            // sent when nothing new was stored.
            .set("auto.commit.interval.ms", "200")
            .set("auto.offset.reset", "earliest")
            // How long the broker may hold a fetch that finds no new data. Apache Kafka
            // answers a fetch as soon as data arrives (fetch.min.bytes 1), so there this is
            // the rate of empty fetches when idle, not a latency floor. The test broker
            // (Tansu 0.6) holds every fetch this long, so there it is one. 5 ms made the
            // consumer's broker thread take 18% of a core at 2,000 tx/s on Tansu; 25 ms took
            // 71 instead of 125 µs of CPU per decision. Latency-bound deployments on Tansu
            // lower it in `consumer-properties`.
            .set("fetch.wait.max.ms", "25")
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "1000")
            .set("partition.assignment.strategy", "cooperative-sticky")
            // Bounded prefetch: under overload the backlog stays in Kafka, not in memory.
            .set("queued.max.messages.kbytes", "16384")
            // Per-partition consumer lag for `verdict_consumer_lag_messages`.
            .set("statistics.interval.ms", "5000");
        for (k, v) in self.properties.iter().chain(&self.consumer_properties) {
            config.set(k, v);
        }
        config
    }

    /// Producer properties: verdict's defaults, then `properties`, then `producer-properties`.
    pub fn producer(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            .set("linger.ms", "1")
            .set("acks", "all")
            // Not idempotent: librdkafka's idempotent producer (2.12) allows no new
            // ProduceRequest while 5 or more *messages* of a partition are in flight, and its
            // broker thread polls in a loop with no timeout until the ack comes. verdict's
            // batches are hundreds of records, so that was one request at a time plus a busy
            // loop: ~23,000 poll() calls a second and a third of the process's CPU at 10,000
            // tx/s on Tansu. One request in flight keeps the same order on retries without
            // the loop. Delivery stays at least once (a retried request may duplicate, as a
            // redelivered batch does), and decisions are keyed by transaction id. Exactly-once
            // workloads use the transactional producer, which is idempotent by necessity.
            .set("enable.idempotence", "false")
            .set("max.in.flight.requests.per.connection", "1")
            .set("message.timeout.ms", "30000");
        for (k, v) in self.properties.iter().chain(&self.producer_properties) {
            config.set(k, v);
        }
        config
    }

    /// Properties of an exactly-once workload's transactional producer.
    pub fn transactional_producer(&self, transactional_id: &str) -> ClientConfig {
        let mut config = self.producer();
        config
            .set("transactional.id", transactional_id)
            // Transactions require idempotence (and at most 5 requests in flight).
            .set("enable.idempotence", "true");
        // After a crash, read_committed readers wait for the dead instance's open
        // transaction until a restart with the same id aborts it or this timeout does
        // (librdkafka's default is 60 s).
        let overridden = |key: &str| {
            self.properties.contains_key(key) || self.producer_properties.contains_key(key)
        };
        if !overridden("transaction.timeout.ms") {
            config.set("transaction.timeout.ms", "10000");
        }
        // librdkafka refuses a message timeout longer than the transaction timeout.
        if !overridden("message.timeout.ms") {
            let transaction_timeout = config
                .get("transaction.timeout.ms")
                .unwrap_or("10000")
                .to_string();
            config.set("message.timeout.ms", transaction_timeout);
        }
        config
    }

    /// Consumer properties of an exactly-once workload: offsets are committed by the
    /// producer's transactions only, and reads skip aborted outputs of upstream transactions.
    pub fn transactional_consumer(&self, group_id: &str) -> ClientConfig {
        let mut config = self.consumer(group_id);
        config
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed");
        config
    }
}

/// This process's instance name, part of its transactional ids: `$VERDICT_INSTANCE_ID`, else
/// the host name (a Kubernetes pod's name), else `verdict`.
pub fn instance_id() -> String {
    std::env::var("VERDICT_INSTANCE_ID")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "verdict".into())
}

/// `[[workloads]]`: one scoring job.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct WorkloadConfig {
    /// Name used in decisions, logs and the consumer group.
    pub name: String,
    pub input_topic: String,
    pub decisions_topic: String,
    /// Where undecodable or unscorable messages go, with their cause in headers.
    pub dead_letter_topic: String,
    /// A built-in input contract (`fraud-transaction`) or a path to a JSON Schema file.
    pub input_schema: String,
    /// Model directory (`model.onnx` + `model.json`).
    pub model: PathBuf,
    pub batch: BatchConfig,
    #[serde(default)]
    pub lookups: Vec<EntityLookup>,
    /// In-stream sliding-window aggregates (velocity features), each a table for the SQL.
    #[serde(default)]
    pub velocity: Vec<VelocitySpec>,
    /// DataFusion SQL over `input` and the lookup tables; must select `row_id` and every model
    /// feature.
    pub sql: String,
    pub policy: PolicyConfig,
    #[serde(default)]
    pub scorer: OnnxScorerConfig,
    /// Drift monitoring against the model's reference distributions (off when absent).
    #[serde(default)]
    pub drift: Option<DriftConfig>,
    /// Put the model's input values in each decision (`features`), for audits and replays.
    #[serde(default)]
    pub include_features: bool,
    /// Every transaction answered inside a latency budget, with a fallback decision when the
    /// model's answer would be late (off when absent).
    #[serde(default)]
    pub deadline: Option<DeadlineConfig>,
    /// Batches in flight (consumed, not yet acknowledged) at which the source pauses its
    /// partitions, so it keeps polling (rebalances, acks) without fetching more. Default 32,
    /// above what the default channels hold (3 × `channel-capacity` + 8 awaiting
    /// acknowledgement + one per stage): by default a full channel blocks the source first,
    /// and librdkafka's prefetch is bounded by `queued.max.messages.kbytes` (16 MB). Pausing
    /// is the last resort because each pause/resume cycle costs a refetch: measured against
    /// Tansu, a burst that took 3 s to answer without pausing took 35 s pausing at 16.
    #[serde(default = "default_pause_at")]
    pub pause_at_batches_in_flight: usize,
    /// ...and at or below which it resumes them (hysteresis: no pause/resume flapping).
    /// Default 24.
    #[serde(default = "default_resume_at")]
    pub resume_at_batches_in_flight: usize,
    /// Largest message value accepted, in bytes; a larger one is dead-lettered as
    /// `oversized` without being parsed. Default 65536.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// Batches in flight between stages (per channel). Small: backpressure, not buffering.
    #[serde(default = "default_channel_capacity")]
    pub channel_capacity: usize,
    /// Exactly once (default false: at least once). Each batch's decisions, dead letters and
    /// drift alerts are produced, and its input offsets committed, in one Kafka transaction;
    /// an aborted transaction rewinds the consumer to the committed offsets. The producer's
    /// `transactional.id` is `<group-id>.<workload>.<instance>`, the instance being
    /// `$VERDICT_INSTANCE_ID` or the host name: keep it stable across restarts of one
    /// instance (a StatefulSet's pod name) and distinct between instances. Readers of the
    /// output topics must consume with `isolation.level = read_committed`. Costs one
    /// transaction commit (a few broker round trips) per batch, and batches are committed one
    /// at a time.
    #[serde(default)]
    pub exactly_once: bool,
}

fn default_pause_at() -> usize {
    32
}

fn default_resume_at() -> usize {
    24
}

/// `[workloads.deadline]`: the per-transaction latency budget.
///
/// Before the feature stage and before scoring, a batch whose every transaction would miss
/// its budget (given the stages' recently observed costs) skips the remaining work; when a
/// decision is about to be produced, each transaction whose budget would run out before its
/// delivery gets the fallback decision, marked `"fallback": "deadline"`, instead of a late
/// model answer.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct DeadlineConfig {
    /// The budget, e.g. `"50ms"`.
    #[serde(with = "humantime_serde")]
    pub budget: Duration,
    /// Where the budget starts: `consume` (when verdict read the message; the oldest message
    /// of its batch) or `event-time` (the input's event time, so time spent in Kafka counts).
    #[serde(default)]
    pub measured_from: BudgetStart,
    /// Input column holding the event time in ms since the epoch. Default `event_time_ms`.
    #[serde(default = "default_event_time_column")]
    pub event_time_column: String,
    pub fallback: FallbackConfig,
}

fn default_event_time_column() -> String {
    "event_time_ms".into()
}

/// What a latency budget is measured from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BudgetStart {
    #[default]
    Consume,
    EventTime,
}

/// `[workloads.deadline.fallback]`: the answer given without lookups or the model, computed
/// from the input message alone.
#[derive(Debug, Clone, Deserialize)]
#[serde(
    rename_all = "kebab-case",
    rename_all_fields = "kebab-case",
    deny_unknown_fields,
    tag = "kind"
)]
pub enum FallbackConfig {
    /// Fraud: `approve` up to `approve-up-to` (in the amount's units), else `otherwise`
    /// (`review` or `decline`).
    FraudRule {
        id_column: String,
        amount_column: String,
        approve_up_to: f64,
        otherwise: String,
    },
    /// Pricing: the base price, multiplier 1.
    BasePrice {
        id_column: String,
        base_price_column: String,
        #[serde(default)]
        currency_column: Option<String>,
    },
}

fn default_max_message_bytes() -> usize {
    crate::source::DEFAULT_MAX_MESSAGE_BYTES
}

fn default_channel_capacity() -> usize {
    2
}

/// `[workloads.batch]`: when a micro-batch closes.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BatchConfig {
    /// A batch closes when it holds this many messages...
    pub max_rows: usize,
    /// ...or this long after its first message arrived, whichever comes first.
    #[serde(with = "humantime_serde")]
    pub linger: Duration,
    /// `fixed` (default): close at `max-rows` or `linger`, whatever the load. `adaptive`:
    /// close as soon as the stages can take the batch (fewer than two batches in flight) and
    /// no more messages are waiting, so a lone transaction leaves at once and batches grow
    /// with the load; while the stages are busy, keep filling it, but no longer than half
    /// of what the workload's deadline leaves after the stages' observed cost (without a
    /// deadline: `linger`), and never past `max-rows`.
    #[serde(default)]
    pub mode: BatchMode,
}

/// How a micro-batch decides to close (`[workloads.batch] mode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum BatchMode {
    #[default]
    Fixed,
    Adaptive,
}

/// `[workloads.policy]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, tag = "kind")]
pub enum PolicyConfig {
    /// Score thresholds → approve / review / decline, with reason codes.
    Fraud(FraudThresholds),
    /// Predicted multiplier → clamped, rounded multiplier and price (`base_price` column).
    Pricing(PricingBounds),
}

impl Config {
    /// Parses a config file; relative paths inside it are resolved against its folder. Then
    /// applies the environment overrides ([`ENV_OVERRIDES`]).
    pub fn load(path: &Path) -> Result<Self, PipelineError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| PipelineError::Config(format!("{}: {e}", path.display())))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut config = Self::parse(&text, base).map_err(|e| match e {
            PipelineError::Config(msg) => {
                PipelineError::Config(format!("{}: {msg}", path.display()))
            }
            other => other,
        })?;
        config.apply_env(std::env::vars())?;
        Ok(config)
    }

    /// Applies the [`ENV_OVERRIDES`] found in `vars`. Containers keep the config file in the
    /// image and get addresses and secrets from their environment (a Secret for the Redis
    /// URL), so one file serves a laptop, docker compose and Kubernetes.
    pub fn apply_env(
        &mut self,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(), PipelineError> {
        for (name, value) in vars {
            match name.as_str() {
                "VERDICT_KAFKA_BROKERS" => self.kafka.brokers = value,
                "VERDICT_REDIS_URL" => self.redis.url = value,
                "VERDICT_HTTP_LISTEN" => {
                    let listen = value.parse().map_err(|e| {
                        PipelineError::Config(format!("VERDICT_HTTP_LISTEN `{value}`: {e}"))
                    })?;
                    match &mut self.http {
                        Some(http) => http.listen = listen,
                        None => self.http = Some(HttpConfig::listening_on(listen)),
                    }
                }
                "VERDICT_EXECUTION_PROVIDER" => {
                    let provider = match value.as_str() {
                        "cpu" => ExecutionProvider::Cpu,
                        "cuda" => ExecutionProvider::Cuda,
                        other => {
                            return Err(PipelineError::Config(format!(
                                "VERDICT_EXECUTION_PROVIDER `{other}`: expected cpu or cuda"
                            )))
                        }
                    };
                    for w in &mut self.workloads {
                        w.scorer.execution_provider = provider;
                    }
                }
                "VERDICT_LOG_FORMAT" => {
                    self.log.format = match value.as_str() {
                        "text" => LogFormat::Text,
                        "json" => LogFormat::Json,
                        other => {
                            return Err(PipelineError::Config(format!(
                                "VERDICT_LOG_FORMAT `{other}`: expected text or json"
                            )))
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Parses config text; relative paths are resolved against `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Self, PipelineError> {
        let mut config: Config =
            toml::from_str(text).map_err(|e| PipelineError::Config(e.to_string()))?;
        for w in &mut config.workloads {
            if w.model.is_relative() {
                let joined = base.join(&w.model);
                // Canonical when it exists, so logs show a readable path.
                w.model = joined.canonicalize().unwrap_or(joined);
            }
            if w.input_schema.ends_with(".json") && Path::new(&w.input_schema).is_relative() {
                w.input_schema = base.join(&w.input_schema).to_string_lossy().into_owned();
            }
        }
        if let Some(lib) = &config.onnxruntime_library {
            if lib.is_relative() {
                config.onnxruntime_library = Some(base.join(lib));
            }
        }
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), PipelineError> {
        if self.workloads.is_empty() {
            return Err(PipelineError::Config("no [[workloads]]".into()));
        }
        let mut names = std::collections::HashSet::new();
        for w in &self.workloads {
            if !names.insert(&w.name) {
                return Err(PipelineError::Config(format!(
                    "workload `{}` is defined twice",
                    w.name
                )));
            }
            if w.batch.max_rows == 0 || w.batch.max_rows > u32::MAX as usize {
                return Err(PipelineError::Config(format!(
                    "workload `{}`: batch.max-rows must be between 1 and {}",
                    w.name,
                    u32::MAX
                )));
            }
            if w.resume_at_batches_in_flight >= w.pause_at_batches_in_flight
                || w.pause_at_batches_in_flight == 0
            {
                return Err(PipelineError::Config(format!(
                    "workload `{}`: resume-at-batches-in-flight must be below pause-at-batches-in-flight (> 0)",
                    w.name
                )));
            }
            if let Some(FallbackConfig::FraudRule { otherwise, .. }) =
                w.deadline.as_ref().map(|d| &d.fallback)
            {
                if !matches!(otherwise.as_str(), "review" | "decline" | "approve") {
                    return Err(PipelineError::Config(format!(
                        "workload `{}`: deadline.fallback.otherwise must be approve, review or decline",
                        w.name
                    )));
                }
            }
            if w.channel_capacity == 0 {
                return Err(PipelineError::Config(format!(
                    "workload `{}`: channel-capacity must be at least 1",
                    w.name
                )));
            }
        }
        Ok(())
    }
}

/// Environment variables that override the config file, and what they set.
pub const ENV_OVERRIDES: [(&str, &str); 5] = [
    ("VERDICT_KAFKA_BROKERS", "kafka.brokers"),
    ("VERDICT_REDIS_URL", "redis.url"),
    ("VERDICT_HTTP_LISTEN", "http.listen"),
    (
        "VERDICT_EXECUTION_PROVIDER",
        "workloads.*.scorer.execution-provider",
    ),
    ("VERDICT_LOG_FORMAT", "log.format"),
];

/// The example config shipped with the repository (`deploy/config/verdict.toml`), used by the
/// demo and the benchmark with the broker and Redis addresses replaced.
pub const EXAMPLE_CONFIG: &str = include_str!("../../deploy/config/verdict.toml");

/// Folder the example config's relative paths are resolved against.
pub fn example_config_dir() -> PathBuf {
    repo_root().join("deploy/config")
}

/// The repository the demo and the benchmark take their models, config and Python baseline
/// from: the first of the working directory, the executable's folder and the source tree this
/// binary was built from (or one of their parents) that holds `deploy/config/verdict.toml`.
/// The executable and working directory come first so that a copied binary (or one built in
/// another clone) still runs against the checkout it is started in.
pub fn repo_root() -> PathBuf {
    let source_tree = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let starts = [
        std::env::current_dir().ok(),
        std::env::current_exe().ok(),
        Some(source_tree.clone()),
    ];
    starts
        .iter()
        .flatten()
        .flat_map(|start| start.ancestors())
        .find(|dir| dir.join("deploy/config/verdict.toml").is_file())
        .map(Path::to_path_buf)
        .unwrap_or(source_tree)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_config_parses_and_resolves_the_model_path() {
        let config = Config::parse(EXAMPLE_CONFIG, &example_config_dir()).unwrap();
        let fraud = &config.workloads[0];
        assert_eq!(fraud.name, "fraud");
        assert!(
            fraud.model.join("model.json").is_file(),
            "{:?}",
            fraud.model
        );
        assert_eq!(fraud.lookups.len(), 2);
    }

    #[test]
    fn librdkafka_accepts_the_exactly_once_client_properties() {
        use rdkafka::consumer::BaseConsumer;
        use rdkafka::producer::BaseProducer;
        let mut config = Config::parse(EXAMPLE_CONFIG, &example_config_dir()).unwrap();
        // The at-least-once producer is not idempotent (see `KafkaConfig::producer`); the
        // transactional one must be, and librdkafka accepts both with one request in flight.
        let at_least_once = config.kafka.producer();
        assert_eq!(at_least_once.get("enable.idempotence"), Some("false"));
        let _: BaseProducer = at_least_once.create().unwrap();
        let transactional = config.kafka.transactional_producer("verdict.fraud.test");
        assert_eq!(transactional.get("enable.idempotence"), Some("true"));
        let _: BaseProducer = transactional.create().unwrap();
        let _: BaseConsumer = config
            .kafka
            .transactional_consumer("verdict.fraud")
            .create()
            .unwrap();
        // A shorter transaction timeout drags the message timeout along.
        config
            .kafka
            .producer_properties
            .insert("transaction.timeout.ms".into(), "5000".into());
        let producer = config.kafka.transactional_producer("verdict.fraud.test");
        assert_eq!(producer.get("message.timeout.ms"), Some("5000"));
        let _: BaseProducer = producer.create().unwrap();
    }

    #[test]
    fn unknown_keys_are_errors() {
        let text = EXAMPLE_CONFIG.replace("[kafka]", "[kafka]\nbrokerz = \"x\"");
        let err = Config::parse(&text, Path::new("."))
            .unwrap_err()
            .to_string();
        assert!(err.contains("brokerz"), "{err}");
    }

    #[test]
    fn debug_output_never_shows_secrets() {
        let text = EXAMPLE_CONFIG
            .replace(
                "[kafka]",
                "[kafka]\nproperties = { \"sasl.password\" = \"hunter2\" }",
            )
            .replace("redis://127.0.0.1:6379", "redis://:hunter3@127.0.0.1:6379");
        let config = Config::parse(&text, &example_config_dir()).unwrap();
        let printed = format!("{config:?}");
        assert!(
            !printed.contains("hunter2") && !printed.contains("hunter3"),
            "{printed}"
        );
        assert!(printed.contains("sasl.password"));
    }

    #[test]
    fn environment_overrides_addresses_and_log_format() {
        let mut config = Config::parse(EXAMPLE_CONFIG, &example_config_dir()).unwrap();
        let vars = [
            ("VERDICT_KAFKA_BROKERS", "kafka:9092"),
            ("VERDICT_REDIS_URL", "redis://redis:6379"),
            ("VERDICT_HTTP_LISTEN", "0.0.0.0:9464"),
            ("VERDICT_LOG_FORMAT", "json"),
            ("VERDICT_EXECUTION_PROVIDER", "cuda"),
            ("UNRELATED", "x"),
        ];
        config
            .apply_env(vars.map(|(k, v)| (k.to_string(), v.to_string())))
            .unwrap();
        assert_eq!(config.kafka.brokers, "kafka:9092");
        assert_eq!(config.redis.url, "redis://redis:6379");
        assert_eq!(config.http.unwrap().listen.to_string(), "0.0.0.0:9464");
        assert_eq!(config.log.format, LogFormat::Json);
        assert!(config
            .workloads
            .iter()
            .all(|w| w.scorer.execution_provider == ExecutionProvider::Cuda));
        let mut config = Config::parse(EXAMPLE_CONFIG, &example_config_dir()).unwrap();
        let bad = [("VERDICT_HTTP_LISTEN".to_string(), "nowhere".to_string())];
        assert!(config.apply_env(bad).is_err());
    }

    #[test]
    fn verdicts_consumer_defaults_store_offsets_explicitly() {
        let config = Config::parse(EXAMPLE_CONFIG, &example_config_dir()).unwrap();
        let consumer = config.kafka.consumer("g");
        assert_eq!(consumer.get("enable.auto.offset.store"), Some("false"));
        assert_eq!(consumer.get("group.id"), Some("g"));
    }
}

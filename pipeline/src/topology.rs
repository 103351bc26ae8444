//! The topology: the only place that spawns threads and tasks.
//!
//! Per workload:
//!
//! ```text
//! source task ──InputBatch──▶ enrich task ──Enriched──▶ score task ──Scored──▶ sink task ──▶ acker task
//!  (poll, batch, decode)        (Redis + SQL)             (ONNX Runtime)        (policy,      (awaits deliveries
//!        ▲                                                                        enqueue)     in batch order)
//!        └────────────────────────────── ack(seq) after delivery ──────────────────────────────┘
//! ```
//!
//! Channels are bounded (`channel-capacity` batches): a slow stage blocks the one before it,
//! up to the source, which then stops polling. Every stage is a task on the async workers,
//! the source (woken by librdkafka's queue socket) and ONNX Runtime's run included: a thread
//! switch costs more than most stages' work on a batch. Shutdown signals the source only; it closes its open batch and its
//! channel, and each stage drains and exits when its input closes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use futures::future::{self, Either};
use futures::stream::{FuturesOrdered, StreamExt};
use hdrhistogram::Histogram;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use verdict_features::{FeatureStore, RedisFeatureStore};
use verdict_scorers::drift::DriftMonitor;
use verdict_scorers::{runtime, LoadedModel, OnnxScorer};
use verdict_sinks::transactional::transactional_id;
use verdict_sinks::{Delivery, KafkaSink, OutRecord, Sink, TransactionalSink};

use crate::config::{instance_id, BatchMode, Config, KafkaConfig, WorkloadConfig};
use crate::exactly_once;
use crate::health::Health;
use crate::http::HttpServer;
use crate::metered_store::MeteredStore;
use crate::metrics::{ErrorStage, Metrics, WorkloadMetrics};
use crate::source::kafka::{AdaptiveBatching, SourceSettings};
use crate::source::{spawn_kafka_source, Rewind, SourceHandle, SourceStats};
use crate::workload::{now_ms, Decided, DriftInput, Scored, Workload};
use crate::PipelineError;

/// Batches enqueued to the producer and awaiting their acknowledgement, per workload.
const MAX_BATCHES_AWAITING_ACK: usize = 8;

/// Batches one workload has in the feature stage at once: one whose replies are being read
/// and joined, one whose commands are already with Redis. More would only queue in Redis.
const ENRICH_IN_FLIGHT: usize = 2;

/// How long the sink keeps retrying a failed delivery after shutdown was requested; past it
/// the batch stays unacknowledged (its offsets uncommitted) and is consumed again next run.
pub(crate) const SHUTDOWN_RETRY_LIMIT: Duration = Duration::from_secs(20);

/// Counters of one workload, shared by its stages.
#[derive(Debug, Default)]
pub struct Counters {
    pub decisions: AtomicU64,
    pub dead_letters: AtomicU64,
    /// Decisions that are the workload's fallback (budget would have run out).
    pub fallbacks: AtomicU64,
    pub degraded_batches: AtomicU64,
    /// Drift alerts produced (firing, reminder, resolved).
    pub drift_alerts: AtomicU64,
    /// Batches the drift monitor did not see because it was behind (it never slows scoring).
    pub drift_batches_skipped: AtomicU64,
}

/// Per-batch stage timings (µs) and sizes.
pub struct StageTimings {
    pub rows: Histogram<u64>,
    pub lookup_us: Histogram<u64>,
    pub join_us: Histogram<u64>,
    pub score_us: Histogram<u64>,
    pub produce_us: Histogram<u64>,
    /// Record timestamp → decision delivered, per decision (µs).
    pub end_to_end_us: Histogram<u64>,
}

impl StageTimings {
    fn new() -> Self {
        let h = || Histogram::new_with_bounds(1, 60_000_000, 3).expect("static histogram bounds");
        Self {
            rows: h(),
            lookup_us: h(),
            join_us: h(),
            score_us: h(),
            produce_us: h(),
            end_to_end_us: h(),
        }
    }
}

/// What a workload did, once it has stopped.
pub struct WorkloadReport {
    pub name: String,
    pub source: SourceStats,
    pub decisions: u64,
    pub dead_letters: u64,
    /// Of `decisions`, those that are the fallback rather than the model's answer.
    pub fallbacks: u64,
    /// approve, review, decline, priced.
    pub outcomes: [u64; 4],
    pub degraded_batches: u64,
    pub drift_alerts: u64,
    pub drift_batches_skipped: u64,
    pub timings: StageTimings,
}

struct RunningWorkload {
    name: String,
    counters: Arc<Counters>,
    source: SourceHandle,
    enrich: JoinHandle<Result<(), PipelineError>>,
    score: JoinHandle<Result<(), PipelineError>>,
    /// At least once: the task that enqueues records (the acker awaits them). Exactly once,
    /// the committer (in `acker`) does both.
    sink: Option<JoinHandle<Result<(), PipelineError>>>,
    acker: JoinHandle<Result<([u64; 4], StageTimings), PipelineError>>,
    drift: Option<std::thread::JoinHandle<()>>,
}

/// A decided batch whose records are enqueued, waiting for their acknowledgement.
struct PendingBatch {
    scored: Scored,
    decided: Decided,
    /// `None` if enqueueing failed: the acker retries the batch.
    delivery: Option<Delivery>,
    enqueued_at: Instant,
}

/// A running pipeline.
pub struct Pipeline {
    shutdown: Arc<AtomicBool>,
    workloads: Vec<RunningWorkload>,
    failed: Vec<WorkloadFailure>,
    metrics: Arc<Metrics>,
    /// Serves `/metrics`, `/healthz`, `/readyz` until the pipeline has drained.
    http: Option<HttpServer>,
    health_checks: JoinHandle<()>,
}

/// What the stages of every workload share.
struct Shared {
    store: Arc<dyn FeatureStore>,
    sink: Arc<KafkaSink>,
    shutdown: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

/// A workload that could not start.
#[derive(Debug, Clone)]
pub struct WorkloadFailure {
    pub name: String,
    pub error: String,
}

/// Loads the model, plans the SQL, checks the topics exist, and spawns the stages.
async fn start_workload(
    config: &Config,
    wc: &WorkloadConfig,
    shared: &Shared,
) -> Result<RunningWorkload, PipelineError> {
    let model = LoadedModel::load(&wc.model)?;
    let workload = Arc::new(Workload::build(wc, &model).await?);
    let scorer = OnnxScorer::new(&model, &wc.scorer)?;
    let mut topics = vec![
        wc.input_topic.clone(),
        wc.decisions_topic.clone(),
        wc.dead_letter_topic.clone(),
    ];
    topics.extend(wc.drift.as_ref().map(|d| d.alerts_topic.clone()));
    let kafka = config.kafka.clone();
    tokio::task::spawn_blocking(move || check_topics_exist(&kafka, &topics))
        .await
        .map_err(|e| PipelineError::Stopped(e.to_string()))??;
    tracing::info!(
        workload = %wc.name,
        model = %model.metadata.name,
        model_version = %model.metadata.version,
        sha256 = %model.metadata.sha256,
        execution_provider = ?scorer.execution_provider(),
        "workload ready"
    );
    shared.metrics.model_loaded(
        &wc.name,
        &model.metadata.name,
        &model.metadata.version,
        &model.metadata.sha256,
        &format!("{:?}", scorer.execution_provider()),
    );
    let transactional = match wc.exactly_once {
        true => {
            let id = transactional_id(&config.kafka.group_id, &wc.name, &instance_id());
            let producer_config = config.kafka.transactional_producer(&id);
            let producer = tokio::task::spawn_blocking(move || {
                TransactionalSink::new(&producer_config, TRANSACTION_TIMEOUT)
            })
            .await
            .map_err(|e| PipelineError::Stopped(e.to_string()))?
            .map_err(|e| PipelineError::Kafka(format!("transactional producer `{id}`: {e}")))?;
            tracing::info!(workload = %wc.name, transactional_id = %id, "exactly once");
            Some(producer)
        }
        false => None,
    };
    spawn_workload(
        config,
        workload,
        model.metadata.clone(),
        scorer,
        transactional,
        shared,
    )
}

/// Pings the feature store every `interval` for `/readyz` and `verdict_feature_store_up`,
/// logging only the transitions.
fn spawn_health_checks(
    store: Arc<dyn FeatureStore>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    interval: Duration,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut was_up = None;
        loop {
            let result = store.ping().await.map_err(|e| e.to_string());
            let up = result.is_ok();
            if was_up != Some(up) {
                match &result {
                    Ok(()) => tracing::info!("feature store reachable"),
                    Err(e) => tracing::warn!(error = %e, "feature store unreachable"),
                }
                was_up = Some(up);
            }
            metrics.feature_store_up(up);
            health.feature_store_checked(result);
            tokio::time::sleep(interval).await;
        }
    })
}

/// verdict does not create topics (partitions and retention are the operator's choice):
/// a missing one is a clear error at start rather than a consumer that waits forever or
/// decisions that time out.
fn check_topics_exist(kafka: &KafkaConfig, topics: &[String]) -> Result<(), PipelineError> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let mut client_config = kafka.consumer("verdict-metadata");
    client_config.set("allow.auto.create.topics", "false");
    let client: BaseConsumer = client_config
        .create()
        .map_err(|e| PipelineError::Kafka(e.to_string()))?;
    for topic in topics {
        let metadata = client
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .map_err(|e| PipelineError::Kafka(format!("metadata for topic `{topic}`: {e}")))?;
        let found = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .is_some_and(|t| t.error().is_none() && !t.partitions().is_empty());
        if !found {
            return Err(PipelineError::Kafka(format!(
                "topic `{topic}` does not exist on {}; create it first",
                kafka.brokers
            )));
        }
    }
    Ok(())
}

impl Pipeline {
    /// Loads every model, plans every SQL statement, connects, and starts every workload.
    /// Must be called inside a Tokio runtime.
    pub async fn start(config: &Config) -> Result<Self, PipelineError> {
        let shutdown = Arc::new(AtomicBool::new(false));
        let metrics = Arc::new(Metrics::new()?);
        let health = Arc::new(Health::new(
            config
                .http
                .as_ref()
                .is_none_or(|h| h.ready_while_feature_store_down),
            Arc::clone(&shutdown),
        ));
        // Serve first: `/healthz` answers and `/readyz` says "starting" while models load.
        let http = match &config.http {
            Some(h) => Some(HttpServer::start(
                h.listen,
                Arc::clone(&metrics),
                Arc::clone(&health),
            )?),
            None => None,
        };
        runtime::environment(config.onnxruntime_library.as_deref())?;
        let store: Arc<dyn FeatureStore> = Arc::new(RedisFeatureStore::connect(&config.redis)?);
        let sink: Arc<KafkaSink> = Arc::new(
            KafkaSink::new(&config.kafka.producer())
                .map_err(|e| PipelineError::Kafka(e.to_string()))?,
        );
        let health_checks = spawn_health_checks(
            Arc::clone(&store),
            Arc::clone(&metrics),
            Arc::clone(&health),
            config
                .http
                .as_ref()
                .map_or(Duration::from_secs(2), |h| h.health_check_interval),
        );
        let shared = Shared {
            store,
            sink,
            shutdown: Arc::clone(&shutdown),
            metrics: Arc::clone(&metrics),
            health: Arc::clone(&health),
        };
        let mut workloads = Vec::new();
        let mut failed = Vec::new();
        // Workloads are independent: one that cannot start (bad model file, missing topic,
        // SQL that does not fit its model) is reported and skipped, and the others run.
        for wc in &config.workloads {
            let started = start_workload(config, wc, &shared).await;
            match started {
                Ok(running) => workloads.push(running),
                Err(e) => {
                    tracing::error!(workload = %wc.name, error = %e, "workload not started");
                    metrics.workload_failed(&wc.name);
                    health.workload_failed(&wc.name, &e.to_string());
                    failed.push(WorkloadFailure {
                        name: wc.name.clone(),
                        error: e.to_string(),
                    });
                }
            }
        }
        health.start_finished();
        if workloads.is_empty() {
            health_checks.abort();
            let reasons: Vec<String> = failed
                .iter()
                .map(|f| format!("{}: {}", f.name, f.error))
                .collect();
            return Err(PipelineError::Config(format!(
                "no workload could start: {}",
                reasons.join("; ")
            )));
        }
        Ok(Self {
            shutdown,
            workloads,
            failed,
            metrics,
            http,
            health_checks,
        })
    }

    /// The process's metrics (what `/metrics` serves).
    pub fn metrics(&self) -> Arc<Metrics> {
        Arc::clone(&self.metrics)
    }

    /// Where `/metrics`, `/healthz` and `/readyz` are served, when `[http]` is configured.
    pub fn http_address(&self) -> Option<std::net::SocketAddr> {
        self.http.as_ref().map(HttpServer::address)
    }

    /// Workloads of the config that could not start, with why.
    pub fn failed_workloads(&self) -> &[WorkloadFailure] {
        &self.failed
    }

    /// The flag that stops the pipeline (set by SIGTERM/SIGINT in `main`).
    pub fn shutdown_flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.shutdown)
    }

    /// Asks the sources to stop; [`Pipeline::wait`] returns once every stage has drained.
    pub fn stop(&self) {
        self.shutdown.store(true, Ordering::Relaxed);
    }

    /// Waits for every workload to stop (after [`Pipeline::stop`], or on a fatal error).
    pub async fn wait(self) -> Result<Vec<WorkloadReport>, PipelineError> {
        let mut reports = Vec::new();
        let mut first_error = None;
        // The endpoint keeps serving (readiness says "draining") until every stage is done.
        let _http = self.http;
        let health_checks = self.health_checks;
        for w in self.workloads {
            let source = w
                .source
                .task
                .await
                .map_err(|e| PipelineError::Stopped(format!("the source task: {e}")))?;
            let enrich = w
                .enrich
                .await
                .map_err(|e| PipelineError::Stopped(e.to_string()))?;
            let score = w
                .score
                .await
                .map_err(|e| PipelineError::Stopped(e.to_string()))?;
            let sink = match w.sink {
                Some(sink) => sink
                    .await
                    .map_err(|e| PipelineError::Stopped(e.to_string()))?,
                None => Ok(()),
            };
            let acker = w
                .acker
                .await
                .map_err(|e| PipelineError::Stopped(e.to_string()))?;
            let sink = sink.and(acker);
            if let Some(drift) = w.drift {
                // The drift thread ends once the sink task has dropped its sender.
                tokio::task::spawn_blocking(move || drift.join())
                    .await
                    .map_err(|e| PipelineError::Stopped(e.to_string()))?
                    .map_err(|_| PipelineError::Stopped("drift thread panicked".into()))?;
            }
            match (source, enrich, score, sink) {
                (Ok(source), Ok(()), Ok(()), Ok((outcomes, timings))) => {
                    reports.push(WorkloadReport {
                        name: w.name,
                        source,
                        decisions: w.counters.decisions.load(Ordering::Relaxed),
                        dead_letters: w.counters.dead_letters.load(Ordering::Relaxed),
                        fallbacks: w.counters.fallbacks.load(Ordering::Relaxed),
                        outcomes,
                        degraded_batches: w.counters.degraded_batches.load(Ordering::Relaxed),
                        drift_alerts: w.counters.drift_alerts.load(Ordering::Relaxed),
                        drift_batches_skipped: w
                            .counters
                            .drift_batches_skipped
                            .load(Ordering::Relaxed),
                        timings,
                    })
                }
                (s, e, sc, si) => {
                    let err = [s.err(), e.err(), sc.err(), si.err()]
                        .into_iter()
                        .flatten()
                        .next();
                    if first_error.is_none() {
                        first_error = err;
                    }
                }
            }
        }
        health_checks.abort();
        match first_error {
            Some(e) => Err(e),
            None => Ok(reports),
        }
    }
}

/// Scored batches queued for the drift monitor before new ones skip it.
const DRIFT_QUEUE_BATCHES: usize = 16;

/// Exactly once: alert batches waiting for the committer's next transaction.
const ALERT_QUEUE_BATCHES: usize = 16;

/// Exactly once: the limit of each transactional call and of its retries.
const TRANSACTION_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the drift monitor's alerts go.
enum AlertOutput {
    /// At least once: produced on their own.
    Produce(Arc<KafkaSink>),
    /// Exactly once: into the committer's next transaction.
    Transactions(mpsc::Sender<Vec<OutRecord>>),
}

/// The drift monitor's thread: counts batches into its window, closes windows by count or
/// age (checked at least once a second), and produces alerts keyed by `<workload>/<feature>`.
/// Alerts are not tied to input offsets: one lost in a crash is re-raised by the next windows.
fn spawn_drift_monitor(
    mut monitor: DriftMonitor,
    alerts_topic: String,
    rx: std::sync::mpsc::Receiver<DriftInput>,
    output: AlertOutput,
    metrics: Arc<Metrics>,
    counters: Arc<Counters>,
    workload_metrics: WorkloadMetrics,
) -> Result<std::thread::JoinHandle<()>, PipelineError> {
    let runtime = tokio::runtime::Handle::current();
    let workload = workload_metrics.workload().to_string();
    let mut windows_seen = 0;
    let topic: Arc<str> = alerts_topic.as_str().into();
    std::thread::Builder::new()
        .name(format!("drift-{workload}"))
        .spawn(move || loop {
            let alerts = match rx.recv_timeout(Duration::from_secs(1)) {
                Ok(input) => monitor.observe(
                    &input.values,
                    input.width,
                    &input.imputed,
                    &input.scores,
                    &input.event_times_ms,
                    now_ms(),
                ),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => monitor.tick(now_ms()),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
            };
            if monitor.windows_closed() != windows_seen {
                workload_metrics
                    .drift_windows
                    .inc_by(monitor.windows_closed() - windows_seen);
                windows_seen = monitor.windows_closed();
                metrics.drift_window(&workload, &monitor.last_window);
            }
            for alert in &alerts {
                let status = serde_json::to_value(alert.status)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default();
                workload_metrics.drift_alert(&status);
                metrics.drift_alert_active(
                    &workload,
                    &alert.feature,
                    alert.statistic,
                    alert.status != verdict_schemas::alert::AlertStatus::Resolved,
                );
            }
            if alerts.is_empty() {
                continue;
            }
            let mut records = Vec::with_capacity(alerts.len());
            for alert in &alerts {
                tracing::warn!(
                    workload = %alert.workload,
                    feature = %alert.feature,
                    statistic = alert.statistic,
                    status = ?alert.status,
                    value = alert.value,
                    p_value_corrected = ?alert.p_value_corrected,
                    psi = ?alert.psi,
                    window = alert.window.index,
                    "drift alert"
                );
                match serde_json::to_vec(alert) {
                    Ok(payload) => records.push(OutRecord {
                        topic: Arc::clone(&topic),
                        key: Some(
                            format!("{}/{}", alert.workload, alert.feature)
                                .into_bytes()
                                .into(),
                        ),
                        payload: payload.into(),
                        headers: Vec::new(),
                    }),
                    Err(e) => tracing::error!(error = %e, "encoding a drift alert"),
                }
            }
            counters
                .drift_alerts
                .fetch_add(records.len() as u64, Ordering::Relaxed);
            match &output {
                AlertOutput::Produce(sink) => {
                    let sink = Arc::clone(sink);
                    let workload = workload.clone();
                    let workload_metrics = workload_metrics.clone();
                    runtime.spawn(async move {
                        let delivered = match sink.send(&records).await {
                            Ok(delivery) => delivery.await,
                            Err(e) => Err(e),
                        };
                        if let Err(e) = delivered {
                            workload_metrics.error(ErrorStage::DriftAlert);
                            tracing::error!(workload = %workload, error = %e, "drift alerts not delivered");
                        }
                    });
                }
                AlertOutput::Transactions(committer) => {
                    if committer.blocking_send(records).is_err() {
                        workload_metrics.error(ErrorStage::DriftAlert);
                        tracing::error!(workload = %workload, "drift alerts not delivered: the committer stopped");
                    }
                }
            }
        })
        .map_err(|e| PipelineError::Stopped(format!("spawning the drift thread: {e}")))
}

/// Spawns a workload's stages. With `transactional` (exactly once) the last stage is the
/// committer; without, a sink task and an acker (at least once).
fn spawn_workload(
    config: &Config,
    workload: Arc<Workload>,
    model_metadata: verdict_scorers::ModelMetadata,
    mut scorer: OnnxScorer,
    transactional: Option<TransactionalSink>,
    shared: &Shared,
) -> Result<RunningWorkload, PipelineError> {
    let wc = &workload.config;
    let metrics = shared.metrics.workload(&wc.name);
    let store: Arc<dyn FeatureStore> = Arc::new(MeteredStore::new(
        Arc::clone(&shared.store),
        metrics.feature_store_seconds.clone(),
    ));
    let sink = Arc::clone(&shared.sink);
    let shutdown = Arc::clone(&shared.shutdown);
    let capacity = wc.channel_capacity;
    let (input_tx, mut input_rx) = mpsc::channel(capacity);
    let (enriched_tx, mut enriched_rx) = mpsc::channel(capacity);
    let (scored_tx, mut scored_rx) = mpsc::channel(capacity);
    let (ack_tx, ack_rx) = std::sync::mpsc::channel::<u64>();
    let counters = Arc::new(Counters::default());
    let rewind = transactional.as_ref().map(|_| Arc::new(Rewind::default()));
    let group_id = format!("{}.{}", config.kafka.group_id, wc.name);

    let source = spawn_kafka_source(
        SourceSettings {
            workload: wc.name.clone(),
            topic: wc.input_topic.clone(),
            consumer: if rewind.is_some() {
                config.kafka.transactional_consumer(&group_id)
            } else {
                config.kafka.consumer(&group_id)
            },
            max_rows: wc.batch.max_rows,
            linger: wc.batch.linger,
            metrics: Arc::clone(&shared.metrics),
            workload_metrics: metrics.clone(),
            joined: shared.health.workload_started(&wc.name),
            pause_at_batches: wc.pause_at_batches_in_flight,
            resume_at_batches: wc.resume_at_batches_in_flight,
            rewind: rewind.clone(),
            adaptive: (wc.batch.mode == BatchMode::Adaptive).then(|| AdaptiveBatching {
                budget: workload
                    .deadline
                    .as_ref()
                    .map(|d| (d.budget(), Arc::clone(&d.costs))),
            }),
        },
        workload.decoder()?,
        input_tx,
        ack_rx,
        Arc::clone(&shutdown),
    )?;

    let enrich = {
        let workload = Arc::clone(&workload);
        let counters = Arc::clone(&counters);
        let metrics = metrics.clone();
        tokio::spawn(async move {
            // Up to `ENRICH_IN_FLIGHT` batches at once, so the next batch's lookups reach
            // Redis while this one's replies are decoded and joined: the store's connection
            // is pipelined. Order holds: a batch is polled once as soon as it is taken, which
            // queues its round trip (the store queues before it waits for anything), so round
            // trips go out in batch order, velocity updates included; and batches leave in
            // the order they came.
            let mut in_flight = FuturesOrdered::new();
            let mut input_open = true;
            loop {
                let enriched = tokio::select! {
                    biased;
                    Some(enriched) = in_flight.next(), if !in_flight.is_empty() => enriched,
                    batch = input_rx.recv(), if input_open && in_flight.len() < ENRICH_IN_FLIGHT => {
                        match batch {
                            Some(batch) => {
                                let mut enriching = Box::pin(workload.enrich(store.as_ref(), batch));
                                in_flight.push_back(match futures::poll!(enriching.as_mut()) {
                                    Poll::Ready(enriched) => Either::Left(future::ready(enriched)),
                                    Poll::Pending => Either::Right(enriching),
                                });
                            }
                            None => input_open = false,
                        }
                        continue;
                    }
                    else => break,
                };
                if let Some(reason) = &enriched.degraded {
                    counters.degraded_batches.fetch_add(1, Ordering::Relaxed);
                    metrics.error(ErrorStage::FeatureStore);
                    tracing::warn!(
                        workload = %workload.name,
                        rows = enriched.batch.decoded.batch.num_rows(),
                        error = %reason,
                        "feature store unavailable; scoring with the model's defaults"
                    );
                }
                if enriched_tx.send(enriched).await.is_err() {
                    return Err(PipelineError::Stopped("scorer stopped".into()));
                }
            }
            Ok(())
        })
    };

    // Scoring runs on the runtime, not on a thread of its own: one model run per batch (tens
    // to hundreds of microseconds on a CPU) costs less than the two thread wake-ups of
    // handing the batch to a scorer thread and back, which on small batches were a large
    // part of the batch's cost (stop 30).
    let score = {
        let workload = Arc::clone(&workload);
        tokio::spawn(async move {
            while let Some(enriched) = enriched_rx.recv().await {
                let scored = workload.score(&mut scorer, enriched);
                if scored_tx.send(scored).await.is_err() {
                    return Err(PipelineError::Stopped("sink stopped".into()));
                }
            }
            Ok(())
        })
    };

    // The drift monitor runs on its own thread, fed by the sink task through a small bounded
    // queue with `try_send`: when it falls behind, batches skip it (counted) rather than
    // slowing decisions down.
    // Exactly once, alerts go into the committer's next transaction instead.
    let (alerts_tx, alerts_rx) = match rewind {
        Some(_) => {
            let (tx, rx) = mpsc::channel::<Vec<OutRecord>>(ALERT_QUEUE_BATCHES);
            (Some(tx), Some(rx))
        }
        None => (None, None),
    };
    let (drift_tx, drift) = match &wc.drift {
        Some(drift_config) => {
            let (tx, rx) = std::sync::mpsc::sync_channel::<DriftInput>(DRIFT_QUEUE_BATCHES);
            let monitor = DriftMonitor::new(&wc.name, &model_metadata, drift_config);
            let output = match alerts_tx {
                Some(tx) => AlertOutput::Transactions(tx),
                None => AlertOutput::Produce(Arc::clone(&shared.sink)),
            };
            let handle = spawn_drift_monitor(
                monitor,
                drift_config.alerts_topic.clone(),
                rx,
                output,
                Arc::clone(&shared.metrics),
                Arc::clone(&counters),
                metrics.clone(),
            )?;
            (Some(tx), Some(handle))
        }
        None => (None, None),
    };

    if let (Some(producer), Some(rewind)) = (transactional, rewind) {
        let committer = exactly_once::spawn_committer(exactly_once::Committer {
            accounts: BatchAccounts::new(&workload, &counters, &metrics),
            workload: Arc::clone(&workload),
            producer: Some(producer),
            rewind,
            scored: scored_rx,
            alerts: alerts_rx,
            drift: drift_tx,
            acks: ack_tx,
            counters: Arc::clone(&counters),
            metrics,
            shutdown,
            aborts_in_a_row: 0,
        });
        return Ok(RunningWorkload {
            name: wc.name.clone(),
            counters,
            source,
            enrich,
            score,
            sink: None,
            acker: committer,
            drift,
        });
    }

    // The sink task enqueues each batch's records as soon as it is decided; the acker awaits
    // the deliveries in batch order and acks each batch only after its own delivery, so
    // several batches wait on broker acknowledgements at once while offsets stay in order.
    let (pending_tx, mut pending_rx) = mpsc::channel::<PendingBatch>(MAX_BATCHES_AWAITING_ACK);
    let sink_task = {
        let workload = Arc::clone(&workload);
        let sink = Arc::clone(&sink);
        let counters = Arc::clone(&counters);
        let metrics = metrics.clone();
        tokio::spawn(async move {
            while let Some(scored) = scored_rx.recv().await {
                let decided = workload.decide(&scored)?;
                feed_drift(drift_tx.as_ref(), &scored, &decided, &metrics, &counters);
                let enqueued_at = Instant::now();
                let delivery = match sink.send(&decided.records).await {
                    Ok(delivery) => Some(delivery),
                    Err(e) => {
                        metrics.error(ErrorStage::Produce);
                        tracing::warn!(workload = %workload.name, error = %e, "enqueue failed; the batch will be retried");
                        None
                    }
                };
                let pending = PendingBatch {
                    scored,
                    decided,
                    delivery,
                    enqueued_at,
                };
                if pending_tx.send(pending).await.is_err() {
                    return Err(PipelineError::Stopped("acker stopped".into()));
                }
            }
            Ok(())
        })
    };
    let acker = {
        let mut accounts = BatchAccounts::new(&workload, &counters, &metrics);
        let workload = Arc::clone(&workload);
        let metrics = metrics.clone();
        tokio::spawn(async move {
            while let Some(pending) = pending_rx.recv().await {
                let PendingBatch {
                    scored,
                    decided,
                    delivery,
                    enqueued_at,
                } = pending;
                let delivered = match delivery {
                    Some(delivery) => delivery.await,
                    None => Err(verdict_sinks::SinkError::Encode("not enqueued".into())),
                };
                if let Err(e) = delivered {
                    metrics.error(ErrorStage::Produce);
                    tracing::warn!(workload = %workload.name, error = %e, "delivery failed; retrying the batch");
                    redeliver(sink.as_ref(), &decided.records, &workload.name, &shutdown).await?;
                }
                let produce_time = enqueued_at.elapsed();
                // Every output of the batch is acknowledged: its offsets may now be stored.
                if ack_tx.send(scored.enriched.batch.seq).is_err() {
                    return Err(PipelineError::Stopped(
                        "source stopped before its acks".into(),
                    ));
                }
                accounts.delivered(&scored, &decided, produce_time);
            }
            Ok(accounts.finish())
        })
    };

    Ok(RunningWorkload {
        name: wc.name.clone(),
        counters,
        source,
        enrich,
        score,
        sink: Some(sink_task),
        acker,
        drift,
    })
}

/// What the last stage records of each delivered (or committed) batch: metrics, the
/// report's timings and outcome counts, the deadline's stage costs and the per-batch log line.
pub(crate) struct BatchAccounts {
    workload: Arc<Workload>,
    counters: Arc<Counters>,
    metrics: WorkloadMetrics,
    feature_names: Vec<String>,
    timings: StageTimings,
    outcomes: [u64; 4],
}

impl BatchAccounts {
    fn new(workload: &Arc<Workload>, counters: &Arc<Counters>, metrics: &WorkloadMetrics) -> Self {
        Self {
            workload: Arc::clone(workload),
            counters: Arc::clone(counters),
            metrics: metrics.clone(),
            feature_names: workload.feature_names().map(str::to_string).collect(),
            timings: StageTimings::new(),
            outcomes: [0; 4],
        }
    }

    pub(crate) fn delivered(&mut self, scored: &Scored, decided: &Decided, produce_time: Duration) {
        let batch = &scored.enriched.batch;
        if let (Some(deadline), true) = (&self.workload.deadline, scored.scored.is_ok()) {
            deadline.costs.observe(
                scored.enriched.lookup_time + scored.enriched.join_time,
                scored.score_time,
                produce_time,
            );
        }
        record_batch_metrics(
            &self.metrics,
            &self.feature_names,
            scored,
            decided,
            produce_time,
        );
        let timings = &mut self.timings;
        let now = now_ms();
        for ts in &decided.decided_timestamps_ms {
            let _ = timings
                .end_to_end_us
                .record(((now - ts).max(0) as u64) * 1000);
        }
        let rows = batch.messages.len() as u64;
        let _ = timings.rows.record(rows.max(1));
        let _ = timings
            .lookup_us
            .record(micros(scored.enriched.lookup_time));
        let _ = timings.join_us.record(micros(scored.enriched.join_time));
        let _ = timings.score_us.record(micros(scored.score_time));
        let _ = timings.produce_us.record(micros(produce_time));
        for (total, n) in self.outcomes.iter_mut().zip(decided.outcomes) {
            *total += n as u64;
        }
        let counters = &self.counters;
        counters
            .decisions
            .fetch_add(decided.decisions as u64, Ordering::Relaxed);
        counters
            .dead_letters
            .fetch_add(decided.dead_letters as u64, Ordering::Relaxed);
        counters
            .fallbacks
            .fetch_add(decided.fallbacks as u64, Ordering::Relaxed);
        tracing::debug!(
            workload = %self.workload.name,
            seq = batch.seq,
            messages = rows,
            decisions = decided.decisions,
            dead_letters = decided.dead_letters,
            fallbacks = decided.fallbacks,
            keys_read = scored.enriched.lookup_stats.keys_read,
            entities_missing = scored.enriched.lookup_stats.entities_missing,
            lookup_us = micros(scored.enriched.lookup_time),
            join_us = micros(scored.enriched.join_time),
            score_us = micros(scored.score_time),
            produce_us = micros(produce_time),
            consume_to_ack_us = micros(batch.opened_at.elapsed()),
            "batch"
        );
    }

    pub(crate) fn finish(self) -> ([u64; 4], StageTimings) {
        (self.outcomes, self.timings)
    }
}

/// Feeds a decided batch to the drift monitor unless it needed fallbacks (shedding starts
/// with the drift statistics) or the monitor is behind (then the batch skips it, counted).
pub(crate) fn feed_drift(
    drift_tx: Option<&std::sync::mpsc::SyncSender<DriftInput>>,
    scored: &Scored,
    decided: &Decided,
    metrics: &WorkloadMetrics,
    counters: &Counters,
) {
    let Some(drift_tx) = drift_tx else {
        return;
    };
    let skipped = decided.fallbacks > 0
        || Workload::drift_input(scored).is_some_and(|input| drift_tx.try_send(input).is_err());
    if skipped {
        metrics.drift_batches_skipped.inc();
        counters
            .drift_batches_skipped
            .fetch_add(1, Ordering::Relaxed);
    }
}

/// Delivers a batch's records again until they are acknowledged, with backoff: an undelivered
/// batch is never acked. After shutdown was requested it gives up after
/// [`SHUTDOWN_RETRY_LIMIT`], leaving the batch uncommitted for the next run.
async fn redeliver(
    sink: &dyn Sink,
    records: &[verdict_sinks::OutRecord],
    workload: &str,
    shutdown: &AtomicBool,
) -> Result<(), PipelineError> {
    let mut backoff = Duration::from_millis(10);
    let mut shutdown_seen: Option<Instant> = None;
    loop {
        let attempt = match sink.send(records).await {
            Ok(delivery) => delivery.await,
            Err(e) => Err(e),
        };
        match attempt {
            Ok(()) => return Ok(()),
            Err(e) => {
                tracing::warn!(workload, error = %e, retry_in_ms = backoff.as_millis() as u64, "delivery failed; retrying the batch");
                if shutdown.load(Ordering::Relaxed) {
                    let since = *shutdown_seen.get_or_insert_with(Instant::now);
                    if since.elapsed() > SHUTDOWN_RETRY_LIMIT {
                        return Err(PipelineError::Sink(format!(
                            "gave up delivering a batch during shutdown: {e}; it will be consumed again"
                        )));
                    }
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// Everything the acker knows about a delivered batch, into the workload's metrics.
fn record_batch_metrics(
    metrics: &WorkloadMetrics,
    feature_names: &[String],
    scored: &Scored,
    decided: &Decided,
    produce_time: Duration,
) {
    let enriched = &scored.enriched;
    metrics.in_flight.dec();
    metrics.lookup.observe(enriched.lookup_time.as_secs_f64());
    metrics.join.observe(enriched.join_time.as_secs_f64());
    metrics.score.observe(scored.score_time.as_secs_f64());
    metrics.produce.observe(produce_time.as_secs_f64());
    for (counter, n) in metrics.decisions.iter().zip(decided.outcomes) {
        counter.inc_by(n as u64);
    }
    if enriched.degraded.is_some() {
        metrics
            .degraded_decisions
            .inc_by((decided.decisions - decided.fallbacks) as u64);
    }
    metrics.fallbacks.inc_by(decided.fallbacks as u64);
    if scored.scored.is_err() && !enriched.batch.decoded.message_index.is_empty() {
        metrics.error(ErrorStage::Score);
    }
    for (stage, cause) in &decided.dead_letter_causes {
        metrics.dead_letter(stage.as_str(), cause);
    }
    metrics
        .imputed_decisions
        .inc_by(decided.imputed_rows as u64);
    for (name, &n) in feature_names.iter().zip(&decided.imputed_by_feature) {
        if n > 0 {
            metrics.imputed_feature(name, n);
        }
    }
    metrics
        .entities_not_found
        .inc_by(enriched.lookup_stats.entities_missing as u64);
    let now = now_ms();
    for &t in &decided.decided_event_times_ms {
        metrics
            .from_event_time
            .observe((now - t).max(0) as f64 / 1000.0);
    }
    let since_consume = enriched.batch.opened_at.elapsed().as_secs_f64();
    for _ in 0..decided.decisions {
        metrics.from_consume.observe(since_consume);
    }
}

fn micros(d: Duration) -> u64 {
    (d.as_micros() as u64).max(1)
}

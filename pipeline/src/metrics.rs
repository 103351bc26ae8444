//! Prometheus metrics.
//!
//! One [`Metrics`] registry per process, served at `/metrics` by [`crate::http`]. Names follow
//! Prometheus conventions: the `verdict_` prefix, base units (seconds, messages), `_total` on
//! counters. The only labels are the workload and small closed sets (outcome, stage, cause,
//! model feature, partition) — never a card, customer or transaction, which would both leak
//! data and make the series count grow with traffic.
//!
//! Stages do not look labels up per batch: [`Metrics::workload`] resolves a
//! [`WorkloadMetrics`] of plain counter/histogram handles once, so recording costs an atomic
//! add. The metric list is documented in `deploy/README.md`, next to the dashboard and alert
//! rules that use it.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use prometheus::GaugeVec;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::PipelineError;

/// Latency buckets (seconds): 50 µs to 2.5 s, so sub-millisecond stages and second-long
/// stalls are both resolved.
const LATENCY_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002, 0.003, 0.005, 0.007_5, 0.01, 0.015, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// Micro-batch sizes (messages).
const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0,
];

/// The stages timed per batch, as `stage` label values.
pub const STAGES: [&str; 5] = ["decode", "feature_lookup", "join", "score", "produce"];

/// Where an error happened, as `stage` label values of `verdict_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorStage {
    /// The consumer reported an error (broker down, authorization...).
    Consume,
    /// A feature store round trip failed or timed out (the batch was scored degraded).
    FeatureStore,
    /// The SQL, tensor building or the model failed for a whole batch (dead-lettered).
    Score,
    /// A delivery to Kafka failed (the batch is retried).
    Produce,
    /// A drift alert could not be delivered.
    DriftAlert,
}

impl ErrorStage {
    const ALL: [ErrorStage; 5] = [
        ErrorStage::Consume,
        ErrorStage::FeatureStore,
        ErrorStage::Score,
        ErrorStage::Produce,
        ErrorStage::DriftAlert,
    ];

    fn as_str(self) -> &'static str {
        match self {
            ErrorStage::Consume => "consume",
            ErrorStage::FeatureStore => "feature_store",
            ErrorStage::Score => "score",
            ErrorStage::Produce => "produce",
            ErrorStage::DriftAlert => "drift_alert",
        }
    }
}

/// The process's registry and metric families.
pub struct Metrics {
    registry: Registry,
    consumed: IntCounterVec,
    decisions: IntCounterVec,
    degraded_decisions: IntCounterVec,
    fallbacks: IntCounterVec,
    dead_letters: IntCounterVec,
    errors: IntCounterVec,
    stage_seconds: HistogramVec,
    end_to_end_seconds: HistogramVec,
    batch_messages: HistogramVec,
    batches_in_flight: IntGaugeVec,
    consumer_lag: IntGaugeVec,
    assigned_partitions: IntGaugeVec,
    source_paused: IntGaugeVec,
    source_pauses: IntCounterVec,
    revoked_unbatched: IntCounterVec,
    transactions: IntCounterVec,
    rewinds: IntCounterVec,
    feature_store_seconds: HistogramVec,
    feature_store_up: IntGauge,
    imputed_decisions: IntCounterVec,
    imputed_features: IntCounterVec,
    entities_not_found: IntCounterVec,
    model_info: IntGaugeVec,
    workload_up: IntGaugeVec,
    drift_statistic: GaugeVec,
    drift_p_value: GaugeVec,
    drift_alert_active: IntGaugeVec,
    drift_alerts: IntCounterVec,
    drift_windows: IntCounterVec,
    drift_batches_skipped: IntCounterVec,
    /// Partitions whose lag gauge exists, per workload: a revoked partition's series is
    /// removed rather than left frozen at its last value.
    lag_series: Mutex<HashMap<String, HashSet<(String, String)>>>,
}

fn counter(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(c.clone()))?;
    Ok(c)
}

fn gauge(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntGaugeVec> {
    let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(g.clone()))?;
    Ok(g)
}

fn histogram(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> prometheus::Result<HistogramVec> {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )?;
    registry.register(Box::new(h.clone()))?;
    Ok(h)
}

impl Metrics {
    /// Registers every family. Fails only on a programming error (a duplicate or invalid
    /// name), which the unit tests catch.
    pub fn new() -> Result<Self, PipelineError> {
        Self::build().map_err(|e| PipelineError::Config(format!("metrics registry: {e}")))
    }

    fn build() -> prometheus::Result<Self> {
        let r = Registry::new();
        let w = &["workload"];
        let float_gauge =
            |name: &str, help: &str, labels: &[&str]| -> prometheus::Result<GaugeVec> {
                let g = GaugeVec::new(Opts::new(name, help), labels)?;
                r.register(Box::new(g.clone()))?;
                Ok(g)
            };
        let feature_store_up = IntGauge::new(
            "verdict_feature_store_up",
            "1 if the feature store (Redis) answered its last health check, else 0.",
        )?;
        r.register(Box::new(feature_store_up.clone()))?;
        Ok(Self {
            consumed: counter(&r, "verdict_messages_consumed_total", "Messages consumed from the input topic.", w)?,
            decisions: counter(
                &r,
                "verdict_decisions_total",
                "Decisions delivered to the decisions topic, by outcome (approve, review, decline, priced).",
                &["workload", "outcome"],
            )?,
            degraded_decisions: counter(
                &r,
                "verdict_degraded_decisions_total",
                "Decisions scored while the feature store was unavailable (lookup features at the model's defaults).",
                w,
            )?,
            fallbacks: counter(
                &r,
                "verdict_fallback_decisions_total",
                "Decisions answered by the workload's fallback rule instead of the model.",
                w,
            )?,
            dead_letters: counter(
                &r,
                "verdict_dead_letters_total",
                "Messages delivered to the dead-letter topic, by stage and cause.",
                &["workload", "stage", "cause"],
            )?,
            errors: counter(&r, "verdict_errors_total", "Errors by stage (each was retried, degraded or dead-lettered).", &["workload", "stage"])?,
            stage_seconds: histogram(
                &r,
                "verdict_stage_duration_seconds",
                "Time a micro-batch spent in each stage.",
                &["workload", "stage"],
                LATENCY_BUCKETS,
            )?,
            end_to_end_seconds: histogram(
                &r,
                "verdict_end_to_end_latency_seconds",
                "Per decision: from the transaction's event time (from=\"event_time\") or from its micro-batch's first consume (from=\"consume\") to the decision's delivery.",
                &["workload", "from"],
                LATENCY_BUCKETS,
            )?,
            batch_messages: histogram(&r, "verdict_batch_messages", "Messages per micro-batch.", w, BATCH_BUCKETS)?,
            batches_in_flight: gauge(&r, "verdict_batches_in_flight", "Micro-batches consumed and not yet acknowledged.", w)?,
            consumer_lag: gauge(
                &r,
                "verdict_consumer_lag_messages",
                "Messages between the consumer's position and the partition's high watermark (librdkafka statistics).",
                &["workload", "topic", "partition"],
            )?,
            assigned_partitions: gauge(&r, "verdict_assigned_partitions", "Input partitions assigned to this process.", w)?,
            source_paused: gauge(&r, "verdict_source_paused", "1 while the source has paused its partitions because too many batches are in flight.", w)?,
            source_pauses: counter(&r, "verdict_source_pauses_total", "Times the source paused its partitions (overload).", w)?,
            revoked_unbatched: counter(&r, "verdict_source_revoked_unbatched_total", "Messages polled but not yet batched when their partition was revoked: dropped here, decided by the partition's next owner.", w)?,
            transactions: counter(
                &r,
                "verdict_transactions_total",
                "Exactly once: batch transactions by how they ended (committed, aborted, or failed = the producer was recreated).",
                &["workload", "outcome"],
            )?,
            rewinds: counter(&r, "verdict_source_rewinds_total", "Exactly once: times the source went back to the committed offsets after an aborted transaction.", w)?,
            feature_store_seconds: histogram(
                &r,
                "verdict_feature_store_round_trip_seconds",
                "One feature-store round trip (a whole batch's reads and velocity updates).",
                w,
                LATENCY_BUCKETS,
            )?,
            feature_store_up,
            imputed_decisions: counter(
                &r,
                "verdict_decisions_with_imputed_features_total",
                "Decisions where at least one model feature was missing and took its default.",
                w,
            )?,
            imputed_features: counter(
                &r,
                "verdict_imputed_features_total",
                "Missing feature values replaced by the model's default, by feature.",
                &["workload", "feature"],
            )?,
            entities_not_found: counter(
                &r,
                "verdict_entities_not_found_total",
                "Entity lookups whose Redis hash did not exist.",
                w,
            )?,
            model_info: gauge(
                &r,
                "verdict_model_info",
                "The loaded model (always 1; the labels carry the information).",
                &["workload", "model", "version", "sha256", "execution_provider"],
            )?,
            workload_up: gauge(&r, "verdict_workload_up", "1 if the workload started, 0 if it failed to start.", w)?,
            drift_statistic: float_gauge(
                "verdict_drift_statistic",
                "Last closed drift window: the test statistic per monitored feature (statistic=\"ks\", \"chi_square\", \"psi\", \"missing_rate\", \"out_of_range_rate\").",
                &["workload", "feature", "statistic"],
            )?,
            drift_p_value: float_gauge(
                "verdict_drift_p_value",
                "Last closed drift window: the multiple-testing corrected p-value per monitored feature.",
                &["workload", "feature"],
            )?,
            drift_alert_active: gauge(
                &r,
                "verdict_drift_alert_active",
                "1 while a drift or data-quality alert is firing for the feature and statistic.",
                &["workload", "feature", "statistic"],
            )?,
            drift_alerts: counter(&r, "verdict_drift_alerts_total", "Drift alerts produced, by status (firing, reminder, resolved).", &["workload", "status"])?,
            drift_windows: counter(&r, "verdict_drift_windows_total", "Drift windows closed and tested.", w)?,
            drift_batches_skipped: counter(
                &r,
                "verdict_drift_batches_skipped_total",
                "Scored batches the drift monitor skipped because it was behind (it never slows scoring).",
                w,
            )?,
            registry: r,
            lag_series: Mutex::new(HashMap::new()),
        })
    }

    /// The handles of one workload. Every per-workload series is created here with value 0,
    /// so a scrape shows the workload (and `rate()` works) before its first message.
    pub fn workload(&self, workload: &str) -> WorkloadMetrics {
        let stage = |s: &str| self.stage_seconds.with_label_values(&[workload, s]);
        for stage in ErrorStage::ALL {
            self.errors.with_label_values(&[workload, stage.as_str()]);
        }
        for status in ["firing", "reminder", "resolved"] {
            self.drift_alerts.with_label_values(&[workload, status]);
        }
        self.workload_up.with_label_values(&[workload]).set(1);
        WorkloadMetrics {
            workload: workload.to_string(),
            consumed: self.consumed.with_label_values(&[workload]),
            decisions: ["approve", "review", "decline", "priced"]
                .map(|o| self.decisions.with_label_values(&[workload, o])),
            degraded_decisions: self.degraded_decisions.with_label_values(&[workload]),
            fallbacks: self.fallbacks.with_label_values(&[workload]),
            dead_letters: self.dead_letters.clone(),
            errors: self.errors.clone(),
            decode: stage("decode"),
            lookup: stage("feature_lookup"),
            join: stage("join"),
            score: stage("score"),
            produce: stage("produce"),
            from_event_time: self
                .end_to_end_seconds
                .with_label_values(&[workload, "event_time"]),
            from_consume: self
                .end_to_end_seconds
                .with_label_values(&[workload, "consume"]),
            batch_messages: self.batch_messages.with_label_values(&[workload]),
            in_flight: self.batches_in_flight.with_label_values(&[workload]),
            assigned_partitions: self.assigned_partitions.with_label_values(&[workload]),
            source_paused: self.source_paused.with_label_values(&[workload]),
            source_pauses: self.source_pauses.with_label_values(&[workload]),
            revoked_unbatched: self.revoked_unbatched.with_label_values(&[workload]),
            transactions: ["committed", "aborted", "failed"]
                .map(|o| self.transactions.with_label_values(&[workload, o])),
            rewinds: self.rewinds.with_label_values(&[workload]),
            feature_store_seconds: self.feature_store_seconds.with_label_values(&[workload]),
            imputed_decisions: self.imputed_decisions.with_label_values(&[workload]),
            imputed_features: self.imputed_features.clone(),
            entities_not_found: self.entities_not_found.with_label_values(&[workload]),
            drift_alerts: self.drift_alerts.clone(),
            drift_windows: self.drift_windows.with_label_values(&[workload]),
            drift_batches_skipped: self.drift_batches_skipped.with_label_values(&[workload]),
        }
    }

    /// Marks a workload that could not start.
    pub fn workload_failed(&self, workload: &str) {
        self.workload_up.with_label_values(&[workload]).set(0);
    }

    /// Publishes the loaded model as an info metric.
    pub fn model_loaded(
        &self,
        workload: &str,
        model: &str,
        version: &str,
        sha256: &str,
        provider: &str,
    ) {
        self.model_info
            .with_label_values(&[workload, model, version, sha256, provider])
            .set(1);
    }

    /// Records the result of a feature-store health check.
    pub fn feature_store_up(&self, up: bool) {
        self.feature_store_up.set(i64::from(up));
    }

    /// Replaces a workload's per-partition lag from one librdkafka statistics report.
    pub fn set_consumer_lag(&self, workload: &str, lags: &[(String, i32, i64)]) {
        let mut series = self.lag_series.lock().unwrap_or_else(|e| e.into_inner());
        let known = series.entry(workload.to_string()).or_default();
        let mut now = HashSet::new();
        for (topic, partition, lag) in lags {
            let partition = partition.to_string();
            self.consumer_lag
                .with_label_values(&[workload, topic, &partition])
                .set(*lag);
            now.insert((topic.clone(), partition));
        }
        for (topic, partition) in known.difference(&now) {
            let _ = self
                .consumer_lag
                .remove_label_values(&[workload, topic, partition]);
        }
        *known = now;
    }

    /// Publishes the tests of a closed drift window.
    pub fn drift_window(&self, workload: &str, tests: &[verdict_scorers::drift::TestOutcome]) {
        for t in tests {
            // `chi-square` → `chi_square`: label values in the metric naming style.
            let statistic = t.statistic.replace('-', "_");
            self.drift_statistic
                .with_label_values(&[workload, &t.feature, &statistic])
                .set(t.value);
            if let Some(psi) = t.psi {
                self.drift_statistic
                    .with_label_values(&[workload, &t.feature, "psi"])
                    .set(psi);
            }
            // Every monitored feature and statistic gets its alert series (0 until one fires),
            // so dashboards and alert rules see the full set.
            self.drift_alert_active
                .with_label_values(&[workload, &t.feature, &statistic]);
            if let Some(p) = t.p_value_corrected {
                self.drift_p_value
                    .with_label_values(&[workload, &t.feature])
                    .set(p);
            }
        }
    }

    /// Tracks whether a feature's alert (one per statistic) is firing.
    pub fn drift_alert_active(&self, workload: &str, feature: &str, statistic: &str, active: bool) {
        self.drift_alert_active
            .with_label_values(&[workload, feature, &statistic.replace('-', "_")])
            .set(i64::from(active));
    }

    /// The Prometheus text exposition of every family.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        // Encoding into a Vec fails only on invalid metric data, which registration rules out.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buffer) {
            tracing::error!(error = %e, "encoding metrics");
        }
        String::from_utf8(buffer).unwrap_or_default()
    }
}

/// One workload's metric handles.
#[derive(Clone)]
pub struct WorkloadMetrics {
    workload: String,
    pub consumed: IntCounter,
    /// approve, review, decline, priced (the order of `Outcome::ALL`).
    pub decisions: [IntCounter; 4],
    pub degraded_decisions: IntCounter,
    pub fallbacks: IntCounter,
    dead_letters: IntCounterVec,
    errors: IntCounterVec,
    pub decode: Histogram,
    pub lookup: Histogram,
    pub join: Histogram,
    pub score: Histogram,
    pub produce: Histogram,
    pub from_event_time: Histogram,
    pub from_consume: Histogram,
    pub batch_messages: Histogram,
    pub in_flight: IntGauge,
    pub assigned_partitions: IntGauge,
    pub source_paused: IntGauge,
    pub source_pauses: IntCounter,
    pub revoked_unbatched: IntCounter,
    /// committed, aborted, failed.
    pub transactions: [IntCounter; 3],
    pub rewinds: IntCounter,
    pub feature_store_seconds: Histogram,
    pub imputed_decisions: IntCounter,
    imputed_features: IntCounterVec,
    pub entities_not_found: IntCounter,
    drift_alerts: IntCounterVec,
    pub drift_windows: IntCounter,
    pub drift_batches_skipped: IntCounter,
}

impl WorkloadMetrics {
    /// The workload these handles label.
    pub fn workload(&self) -> &str {
        &self.workload
    }

    pub fn dead_letter(&self, stage: &str, cause: &str) {
        self.dead_letters
            .with_label_values(&[&self.workload, stage, cause])
            .inc();
    }

    pub fn error(&self, stage: ErrorStage) {
        self.errors
            .with_label_values(&[&self.workload, stage.as_str()])
            .inc();
    }

    pub fn imputed_feature(&self, feature: &str, count: u64) {
        self.imputed_features
            .with_label_values(&[&self.workload, feature])
            .inc_by(count);
    }

    pub fn drift_alert(&self, status: &str) {
        self.drift_alerts
            .with_label_values(&[&self.workload, status])
            .inc();
    }
}

/// Seconds as Prometheus wants them.
pub fn seconds(d: Duration) -> f64 {
    d.as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_registers_and_renders_with_conventional_names() {
        let metrics = Metrics::new().unwrap();
        let w = metrics.workload("fraud");
        w.consumed.inc_by(3);
        w.decisions[0].inc_by(2);
        w.dead_letter("decode", "invalid-json");
        w.lookup.observe(0.0004);
        metrics.set_consumer_lag("fraud", &[("transactions".into(), 0, 7)]);
        let text = metrics.render();
        assert!(
            text.contains("verdict_messages_consumed_total{workload=\"fraud\"} 3"),
            "{text}"
        );
        assert!(text.contains(
            "verdict_dead_letters_total{cause=\"invalid-json\",stage=\"decode\",workload=\"fraud\"} 1"
        ));
        assert!(text.contains(
            "verdict_stage_duration_seconds_bucket{stage=\"feature_lookup\",workload=\"fraud\",le=\"0.0005\"} 1"
        ));
        assert!(text.contains(
            "verdict_consumer_lag_messages{partition=\"0\",topic=\"transactions\",workload=\"fraud\"} 7"
        ));
        // Counters end in `_total`, every name carries the prefix, and every metric has its
        // row in the operator's table.
        let documented = include_str!("../../deploy/README.md");
        for line in text.lines().filter(|l| l.starts_with("# TYPE")) {
            let mut parts = line.split_whitespace().skip(2);
            let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
            assert!(name.starts_with("verdict_"), "{line}");
            assert_eq!(kind == "counter", name.ends_with("_total"), "{line}");
            assert!(
                documented.contains(&format!("| `{name}` |")),
                "{name} has no row in deploy/README.md's metrics table"
            );
        }
    }

    #[test]
    fn a_revoked_partition_loses_its_lag_series() {
        let metrics = Metrics::new().unwrap();
        metrics.set_consumer_lag("fraud", &[("t".into(), 0, 1), ("t".into(), 1, 2)]);
        metrics.set_consumer_lag("fraud", &[("t".into(), 1, 5)]);
        let text = metrics.render();
        assert!(!text.contains("partition=\"0\""), "{text}");
        assert!(text.contains("partition=\"1\",topic=\"t\",workload=\"fraud\"} 5"));
    }
}

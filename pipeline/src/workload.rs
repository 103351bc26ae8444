//! One workload, assembled from its config: input contract, lookups, SQL, model, policy and
//! encoders — and the per-batch work of each stage, free of threads and channels so the
//! topology's wiring and this logic are tested separately.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arrow::array::{
    Array, AsArray, Float32Array, Int64Array, ListBuilder, StringArray, StringBuilder,
};
use arrow::datatypes::{DataType, Int64Type, SchemaRef};
use arrow::record_batch::RecordBatch;
use verdict_features::lookup::{LookupStats, Lookups};
use verdict_features::{FeatureColumn, FeatureMatrix, FeatureStore, SqlJoin};
use verdict_schemas::{
    arrow_schema_from_json_schema, builtin_input_schema, decision_arrow_schema, Outcome,
};
use verdict_scorers::{FraudPolicy, LoadedModel, Scorer};
use verdict_sinks::{DecisionEncoder, OutRecord};

use crate::config::{PolicyConfig, WorkloadConfig};
use crate::dead_letter::{dead_letter, Stage};
use crate::source::InputBatch;
use crate::PipelineError;

/// Columns the workload SQL must produce besides the model's features.
pub const TRANSACTION_ID: &str = "transaction_id";
pub const EVENT_TIME_MS: &str = "event_time_ms";

/// A workload ready to run.
pub struct Workload {
    pub name: Arc<str>,
    pub config: WorkloadConfig,
    pub input_schema: SchemaRef,
    pub model_name: String,
    pub model_version: String,
    lookups: Lookups,
    join: SqlJoin,
    feature_columns: Vec<FeatureColumn>,
    policy: FraudPolicy,
    encoder: DecisionEncoder,
    dead_letter_topic: Arc<str>,
}

/// Why a whole batch could not be scored (its rows are dead-lettered with this cause).
#[derive(Debug, Clone)]
pub struct StageFailure {
    pub stage: Stage,
    pub cause: &'static str,
    pub detail: String,
}

/// Output of the feature stage.
pub struct Enriched {
    pub batch: InputBatch,
    pub joined: Result<RecordBatch, StageFailure>,
    pub lookup_stats: LookupStats,
    /// Set when the feature store failed and the batch goes on with the model's defaults.
    pub degraded: Option<String>,
    pub lookup_time: Duration,
    pub join_time: Duration,
}

/// Output of the scoring stage.
pub struct Scored {
    pub enriched: Enriched,
    pub scored: Result<(RecordBatch, FeatureMatrix, Vec<f32>), StageFailure>,
    pub score_time: Duration,
}

/// Output of the decision step: what to produce, and counts for logs and summaries.
#[derive(Default)]
pub struct Decided {
    pub records: Vec<OutRecord>,
    pub decisions: usize,
    pub outcomes: [usize; 3],
    pub dead_letters: usize,
    /// Produce timestamps of decided rows (ms), for latency accounting.
    pub decided_timestamps_ms: Vec<i64>,
}

impl Workload {
    /// Builds a workload: derives the input schema, plans the SQL, and checks that the SQL
    /// output carries every model feature (a mismatch names the feature and the model file).
    pub async fn build(
        config: &WorkloadConfig,
        model: &LoadedModel,
    ) -> Result<Self, PipelineError> {
        let cfg_err =
            |msg: String| PipelineError::Config(format!("workload `{}`: {msg}", config.name));
        let schema_text = if config.input_schema.ends_with(".json") {
            std::fs::read_to_string(&config.input_schema)
                .map_err(|e| cfg_err(format!("input-schema {}: {e}", config.input_schema)))?
        } else {
            builtin_input_schema(&config.input_schema)
                .map_err(|e| cfg_err(e.to_string()))?
                .to_string()
        };
        let input_schema = arrow_schema_from_json_schema(&config.input_schema, &schema_text)
            .map_err(|e| cfg_err(e.to_string()))?;
        // The SQL sees the decoded batch: input columns + row_id.
        let decoded_schema = crate::source::JsonBatchDecoder::new(input_schema.clone(), 1)?
            .schema()
            .clone();

        let lookups = Lookups::new(config.lookups.clone(), config.velocity.clone())
            .map_err(|e| cfg_err(e.to_string()))?;
        let lookup_schemas = lookups.table_schemas();
        let join = SqlJoin::plan(&config.sql, decoded_schema, &lookup_schemas)
            .await
            .map_err(|e| cfg_err(format!("sql: {e}")))?;

        let output = join.output_schema();
        for (column, wanted) in [
            (TRANSACTION_ID, DataType::Utf8),
            (EVENT_TIME_MS, DataType::Int64),
        ] {
            match output.field_with_name(column) {
                Ok(f) if f.data_type() == &wanted => {}
                Ok(f) => {
                    return Err(cfg_err(format!(
                        "sql: `{column}` is {}, expected {wanted}",
                        f.data_type()
                    )))
                }
                Err(_) => return Err(cfg_err(format!("sql: the output must contain `{column}`"))),
            }
        }
        for feature in model.feature_names() {
            let field = output.field_with_name(feature).map_err(|_| {
                cfg_err(format!(
                    "model {} expects feature `{feature}`, which the SQL does not produce",
                    model.dir.join("model.json").display()
                ))
            })?;
            if !field.data_type().is_numeric() && field.data_type() != &DataType::Boolean {
                return Err(cfg_err(format!(
                    "sql: feature `{feature}` is {}, the model needs a number",
                    field.data_type()
                )));
            }
        }

        let policy = match &config.policy {
            PolicyConfig::Fraud(thresholds) => {
                FraudPolicy::new(*thresholds).map_err(|e| cfg_err(e.to_string()))?
            }
        };
        let meta = &model.metadata;
        Ok(Self {
            name: config.name.as_str().into(),
            input_schema,
            model_name: meta.name.clone(),
            model_version: meta.version.clone(),
            lookups,
            join,
            feature_columns: meta
                .features
                .iter()
                .map(|f| FeatureColumn {
                    name: f.name.clone(),
                    default: f.default,
                })
                .collect(),
            policy,
            encoder: DecisionEncoder {
                topic: config.decisions_topic.as_str().into(),
                workload: config.name.clone(),
                model: meta.name.clone(),
                model_version: meta.version.clone(),
            },
            dead_letter_topic: config.dead_letter_topic.as_str().into(),
            config: config.clone(),
        })
    }

    /// Feature stage: lookups (one store round trip) then the SQL. If the store fails, the
    /// batch continues with all lookup values missing — the model's defaults stand in and
    /// each decision lists the imputed features — rather than stopping the stream.
    pub async fn enrich(&self, store: &dyn FeatureStore, batch: InputBatch) -> Enriched {
        let rows = &batch.decoded.batch;
        let started = Instant::now();
        let (tables, lookup_stats, degraded) = match self.lookups.fetch(store, rows).await {
            Ok((tables, stats)) => (Ok(tables), stats, None),
            Err(e) => {
                let reason = e.to_string();
                (
                    self.lookups.all_missing(rows),
                    LookupStats::default(),
                    Some(reason),
                )
            }
        };
        let lookup_time = started.elapsed();
        let started = Instant::now();
        let joined = match tables {
            Err(e) => Err(StageFailure {
                stage: Stage::Features,
                cause: "lookup-failed",
                detail: e.to_string(),
            }),
            Ok(tables) => {
                let mut all = Vec::with_capacity(tables.len() + 1);
                all.push(rows.clone());
                all.extend(tables);
                self.join.run(&all).await.map_err(|e| StageFailure {
                    stage: Stage::Features,
                    cause: "sql-failed",
                    detail: e.to_string(),
                })
            }
        };
        Enriched {
            batch,
            joined,
            lookup_stats,
            degraded,
            lookup_time,
            join_time: started.elapsed(),
        }
    }

    /// Scoring stage (blocking: runs on the scorer's own thread).
    pub fn score(&self, scorer: &mut dyn Scorer, enriched: Enriched) -> Scored {
        let started = Instant::now();
        let scored = match &enriched.joined {
            Err(failure) => Err(failure.clone()),
            Ok(joined) => FeatureMatrix::from_batch(joined, &self.feature_columns)
                .map_err(|e| StageFailure {
                    stage: Stage::Score,
                    cause: "features-unreadable",
                    detail: e.to_string(),
                })
                .and_then(|matrix| {
                    scorer
                        .score(&matrix.values, matrix.rows)
                        .map(|scores| (joined.clone(), matrix, scores))
                        .map_err(|e| StageFailure {
                            stage: Stage::Score,
                            cause: "model-failed",
                            detail: e.to_string(),
                        })
                }),
        };
        Scored {
            enriched,
            scored,
            score_time: started.elapsed(),
        }
    }

    /// Policy and encoding: one decision per scorable row, one dead letter per message that
    /// was rejected or could not be scored.
    pub fn decide(&self, scored: &Scored) -> Result<Decided, PipelineError> {
        let batch = &scored.enriched.batch;
        let mut out = Decided::default();
        for rejection in &batch.decoded.rejected {
            out.records.push(dead_letter(
                &batch.messages[rejection.index],
                &self.dead_letter_topic,
                &self.name,
                Stage::Decode,
                rejection.cause.as_str(),
                &rejection.detail,
            ));
        }
        let row_message = &batch.decoded.message_index;
        match &scored.scored {
            Err(failure) => {
                for &m in row_message {
                    out.records.push(dead_letter(
                        &batch.messages[m],
                        &self.dead_letter_topic,
                        &self.name,
                        failure.stage,
                        failure.cause,
                        &failure.detail,
                    ));
                }
            }
            Ok((joined, matrix, scores)) => {
                let decided_at = now_ms();
                let ids = joined
                    .column_by_name(TRANSACTION_ID)
                    .map(|c| c.as_string::<i32>().clone())
                    .ok_or_else(|| PipelineError::Decode("no transaction_id".into()))?;
                let times = joined
                    .column_by_name(EVENT_TIME_MS)
                    .map(|c| c.as_primitive::<Int64Type>().clone())
                    .ok_or_else(|| PipelineError::Decode("no event_time_ms".into()))?;
                let mut keep = Vec::with_capacity(joined.num_rows());
                for (row, &message) in row_message.iter().enumerate() {
                    if let Some(feature) = matrix.unscorable[row] {
                        out.records.push(dead_letter(
                            &batch.messages[message],
                            &self.dead_letter_topic,
                            &self.name,
                            Stage::Score,
                            "missing-feature",
                            &format!(
                                "feature `{}` is missing and the model has no default for it",
                                self.feature_columns[feature as usize].name
                            ),
                        ));
                    } else if ids.is_null(row) {
                        out.records.push(dead_letter(
                            &batch.messages[message],
                            &self.dead_letter_topic,
                            &self.name,
                            Stage::Score,
                            "missing-transaction-id",
                            "the SQL produced a null transaction_id",
                        ));
                    } else {
                        keep.push(row);
                    }
                }
                let mut imputed = ListBuilder::new(StringBuilder::new());
                let mut outcomes = Vec::with_capacity(keep.len());
                for &row in &keep {
                    let outcome = self.policy.decide(scores[row]);
                    out.outcomes[Outcome::ALL.iter().position(|o| *o == outcome).unwrap_or(0)] += 1;
                    outcomes.push(outcome.as_str());
                    imputed.append_value(
                        matrix.imputed[row]
                            .iter()
                            .map(|f| Some(self.feature_columns[*f as usize].name.as_str())),
                    );
                    if let Some(ts) = batch.messages[row_message[row]].timestamp_ms {
                        out.decided_timestamps_ms.push(ts);
                    }
                }
                let decisions = RecordBatch::try_new(
                    decision_arrow_schema(),
                    vec![
                        Arc::new(StringArray::from_iter_values(
                            keep.iter().map(|&r| ids.value(r)),
                        )),
                        Arc::new(StringArray::from(outcomes)),
                        Arc::new(Float32Array::from_iter_values(
                            keep.iter().map(|&r| scores[r]),
                        )),
                        Arc::new(Int64Array::from_iter(keep.iter().map(|&r| {
                            Some(if times.is_null(r) { 0 } else { times.value(r) })
                        }))),
                        Arc::new(Int64Array::from_value(decided_at, keep.len())),
                        Arc::new(imputed.finish()),
                    ],
                )
                .map_err(|e| PipelineError::Decode(e.to_string()))?;
                out.decisions = keep.len();
                out.records.extend(
                    self.encoder
                        .encode(&decisions)
                        .map_err(|e| PipelineError::Sink(e.to_string()))?,
                );
            }
        }
        out.dead_letters = out.records.len() - out.decisions;
        Ok(out)
    }
}

/// Wall-clock now, ms since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{example_config_dir, Config, EXAMPLE_CONFIG};
    use crate::source::{JsonBatchDecoder, RawMessage};
    use async_trait::async_trait;
    use verdict_features::{FeatureError, HashRead, InMemoryFeatureStore};
    use verdict_scorers::FnScorer;

    async fn fraud() -> Workload {
        let config = Config::parse(EXAMPLE_CONFIG, &example_config_dir()).unwrap();
        let wc = &config.workloads[0];
        Workload::build(wc, &LoadedModel::load(&wc.model).unwrap())
            .await
            .unwrap()
    }

    fn message(offset: i64, payload: &str) -> RawMessage {
        RawMessage {
            topic: "transactions".into(),
            partition: 0,
            offset,
            timestamp_ms: Some(1),
            key: Some(format!("k{offset}").into_bytes()),
            payload: Some(payload.as_bytes().to_vec()),
            headers: Vec::new(),
        }
    }

    fn tx(id: &str, card: &str, amount: f64) -> String {
        format!(
            r#"{{"transaction_id":"{id}","card_id":"{card}","merchant_id":"m1","amount":{amount},"currency":"EUR","country":"DE","channel":"online","event_time_ms":1700000000000}}"#
        )
    }

    fn batch(workload: &Workload, messages: Vec<RawMessage>) -> InputBatch {
        let mut decoder = JsonBatchDecoder::new(workload.input_schema.clone(), 16).unwrap();
        let payloads: Vec<Option<&[u8]>> = messages.iter().map(|m| m.payload.as_deref()).collect();
        let decoded = decoder.decode(&payloads).unwrap();
        InputBatch {
            seq: 0,
            decoded,
            messages,
            opened_at: Instant::now(),
        }
    }

    fn store() -> InMemoryFeatureStore {
        let store = InMemoryFeatureStore::new();
        store.insert(
            "card:c1",
            &[
                ("avg_amount_30d", "50"),
                ("tx_count_30d", "10"),
                ("chargeback_count_90d", "0"),
                ("card_age_days", "400"),
                ("home_country", "DE"),
            ],
        );
        store.insert(
            "merchant:m1",
            &[("fraud_rate_90d", "0.01"), ("risk_score", "0.2")],
        );
        store
    }

    /// Scores = the second feature (amount / card average) / 10, so the test can predict them.
    fn ratio_scorer() -> FnScorer<impl FnMut(&[f32]) -> f32 + Send> {
        FnScorer::new(10, |row: &[f32]| row[1] / 10.0)
    }

    #[tokio::test]
    async fn a_batch_becomes_decisions_and_dead_letters_on_test_doubles() {
        let w = fraud().await;
        let input = batch(
            &w,
            vec![
                message(0, &tx("t0", "c1", 100.0)),
                message(1, "{oops"),
                message(2, &tx("t2", "unknown", 5.0)),
                message(3, &tx("t3", "c1", 450.0)),
            ],
        );
        let store = store();
        let enriched = w.enrich(&store, input).await;
        assert!(enriched.degraded.is_none());
        assert_eq!(store.round_trips(), 1, "one round trip for both lookups");
        let scored = w.score(&mut ratio_scorer(), enriched);
        let decided = w.decide(&scored).unwrap();

        assert_eq!((decided.decisions, decided.dead_letters), (3, 1));
        let decisions: Vec<serde_json::Value> = decided
            .records
            .iter()
            .filter(|r| &*r.topic == "decisions")
            .map(|r| serde_json::from_slice(&r.payload).unwrap())
            .collect();
        // 100/50/10 = 0.2 approve; unknown card → ratio default 1.0 → 0.1 approve; 450/50/10 = 0.9 decline.
        assert_eq!(decisions[0]["transaction_id"], "t0");
        assert!((decisions[0]["score"].as_f64().unwrap() - 0.2).abs() < 1e-6);
        assert_eq!(decisions[1]["transaction_id"], "t2");
        assert_eq!(decisions[1]["decision"], "approve");
        assert!(decisions[1]["imputed_features"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("amount_to_card_avg")));
        assert_eq!(decisions[2]["decision"], "decline");
        let dead = decided
            .records
            .iter()
            .find(|r| &*r.topic == "transactions.dead-letter")
            .unwrap();
        assert_eq!(dead.payload, b"{oops");
    }

    struct DownStore;

    #[async_trait]
    impl verdict_features::FeatureStore for DownStore {
        async fn fetch(
            &self,
            _: &[HashRead<'_>],
            _: &[verdict_features::velocity::VelocityUpdate],
        ) -> Result<verdict_features::StoreAnswer, FeatureError> {
            Err(FeatureError::StoreTimeout { timeout_ms: 50 })
        }
    }

    #[tokio::test]
    async fn an_unreachable_feature_store_degrades_to_defaults_instead_of_stopping() {
        let w = fraud().await;
        let input = batch(&w, vec![message(0, &tx("t0", "c1", 100.0))]);
        let enriched = w.enrich(&DownStore, input).await;
        assert!(enriched.degraded.as_deref().unwrap().contains("50 ms"));
        let decided = w.decide(&w.score(&mut ratio_scorer(), enriched)).unwrap();
        assert_eq!(decided.decisions, 1);
        let decision: serde_json::Value =
            serde_json::from_slice(&decided.records[0].payload).unwrap();
        let imputed = decision["imputed_features"].as_array().unwrap();
        assert_eq!(
            imputed.len(),
            7,
            "every looked-up feature is imputed: {imputed:?}"
        );
    }

    struct BrokenScorer;

    impl Scorer for BrokenScorer {
        fn score(&mut self, _: &[f32], _: usize) -> verdict_scorers::Result<Vec<f32>> {
            Err(verdict_scorers::ScorerError::Score(
                "session run failed".into(),
            ))
        }
        fn feature_count(&self) -> usize {
            10
        }
    }

    #[tokio::test]
    async fn a_scoring_failure_dead_letters_the_batch_with_its_cause_and_loses_nothing() {
        let w = fraud().await;
        let input = batch(
            &w,
            vec![
                message(0, &tx("t0", "c1", 100.0)),
                message(1, &tx("t1", "c1", 7.0)),
            ],
        );
        let enriched = w.enrich(&store(), input).await;
        let decided = w.decide(&w.score(&mut BrokenScorer, enriched)).unwrap();
        assert_eq!((decided.decisions, decided.dead_letters), (0, 2));
        for (record, offset) in decided.records.iter().zip(["0", "1"]) {
            assert_eq!(&*record.topic, "transactions.dead-letter");
            let header = |name: &str| {
                record
                    .headers
                    .iter()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            };
            assert_eq!(header("verdict.stage").as_deref(), Some("score"));
            assert_eq!(header("verdict.cause").as_deref(), Some("model-failed"));
            assert_eq!(header("verdict.source.offset").as_deref(), Some(offset));
            assert!(header("verdict.detail")
                .unwrap()
                .contains("session run failed"));
        }
    }

    #[tokio::test]
    async fn sql_missing_a_model_feature_is_refused_naming_it() {
        let mut config = Config::parse(EXAMPLE_CONFIG, &example_config_dir()).unwrap();
        let wc = &mut config.workloads[0];
        wc.sql = wc.sql.replace("AS hour_of_day", "AS hour");
        let err = Workload::build(wc, &LoadedModel::load(&wc.model).unwrap())
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("`hour_of_day`") && err.contains("model.json"),
            "{err}"
        );
    }
}

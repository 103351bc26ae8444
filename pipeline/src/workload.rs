//! One workload, assembled from its config: input contract, lookups, SQL, model, policy and
//! encoders — and the per-batch work of each stage, free of threads and channels so the
//! topology's wiring and this logic are tested separately.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arrow::array::{
    Array, AsArray, Float32Array, Float32Builder, Float64Builder, Int64Array, ListBuilder,
    StringArray, StringBuilder,
};
use arrow::datatypes::{DataType, Int64Type, SchemaRef};
use arrow::record_batch::RecordBatch;
use verdict_features::lookup::{LookupStats, Lookups};
use verdict_features::{FeatureColumn, FeatureMatrix, FeatureStore, SqlJoin};
use verdict_schemas::{
    arrow_schema_from_json_schema, builtin_input_schema, decision_arrow_schema, InputConstraints,
    Outcome,
};
use verdict_scorers::{FraudPolicy, LoadedModel, PricingPolicy, Reference, Scorer};
use verdict_sinks::{DecisionEncoder, OutRecord};

use crate::config::{PolicyConfig, WorkloadConfig};
use crate::dead_letter::{dead_letter, Stage};
use crate::deadline::{Ahead, Deadline};
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
    features: FeatureStage,
    feature_columns: Vec<FeatureColumn>,
    policy: Policy,
    encoder: DecisionEncoder,
    dead_letter_topic: Arc<str>,
    /// The latency budget and fallback, when configured.
    pub deadline: Option<Deadline>,
}

/// Cause of a batch that skipped the rest of its work because every transaction in it would
/// miss its deadline; never a dead letter: its rows get the fallback decision.
pub const SHED_FOR_DEADLINE: &str = "shed-for-deadline";

/// The `degraded` value of a decision made without the feature store.
pub const DEGRADED_FEATURE_STORE: &str = "feature-store-unavailable";

/// A workload's decision policy, with what it needs from the SQL output.
enum Policy {
    /// Thresholds, and per model feature its reference and reason codes (`name:high`,
    /// `name:low`).
    Fraud {
        policy: FraudPolicy,
        references: Vec<(Reference, String, String)>,
    },
    /// Bounds; the price is `base_price` (a SQL output column) × the multiplier.
    Pricing { policy: PricingPolicy },
}

/// Column the pricing policy multiplies; `currency` is copied into the price when present.
pub const BASE_PRICE: &str = "base_price";
pub const CURRENCY: &str = "currency";

/// Reference percentile beyond which a feature value is a reason (both tails).
const REASON_TAIL: f64 = 0.05;
const MAX_REASONS: usize = 3;

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
    /// Each decoded row's deadline (ms since the epoch); empty without a deadline.
    pub deadlines_ms: Vec<i64>,
}

/// Output of the scoring stage.
pub struct Scored {
    pub enriched: Enriched,
    pub scored: Result<(RecordBatch, FeatureMatrix, Vec<f32>), StageFailure>,
    pub score_time: Duration,
}

/// What the drift monitor needs from a scored batch (scorable rows only), copied so the
/// batch itself can wait for its acknowledgement.
pub struct DriftInput {
    pub values: Vec<f32>,
    pub width: usize,
    pub imputed: Vec<Vec<u16>>,
    pub scores: Vec<f32>,
    pub event_times_ms: Vec<i64>,
}

/// Output of the decision step: what to produce, and counts for logs and summaries.
#[derive(Default)]
pub struct Decided {
    pub records: Vec<OutRecord>,
    pub decisions: usize,
    pub outcomes: [usize; 4],
    pub dead_letters: usize,
    /// Produce timestamps of decided rows (ms), for latency accounting.
    pub decided_timestamps_ms: Vec<i64>,
    /// Event times of decided rows (ms), for latency accounting.
    pub decided_event_times_ms: Vec<i64>,
    /// Stage and cause of each dead letter, for metrics.
    pub dead_letter_causes: Vec<(Stage, &'static str)>,
    /// Decisions with at least one feature at the model's default.
    pub imputed_rows: usize,
    /// Per model feature (in model order): decisions where it took its default.
    pub imputed_by_feature: Vec<u64>,
    /// Decisions that are the fallback, not the model's answer (included in `decisions`).
    pub fallbacks: usize,
}

/// The feature half of a workload — input contract, lookups, velocity and the planned SQL —
/// shared by serving and by the offline computation of training data, so both compute
/// features the same way.
pub struct FeatureStage {
    pub input_schema: SchemaRef,
    /// The contract's value rules, enforced by the decoder.
    pub input_constraints: InputConstraints,
    pub lookups: Lookups,
    pub join: SqlJoin,
}

impl FeatureStage {
    pub async fn build(config: &WorkloadConfig) -> Result<Self, PipelineError> {
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
        let input_constraints =
            InputConstraints::from_json_schema(&config.input_schema, &schema_text)
                .map_err(|e| cfg_err(e.to_string()))?;
        // The SQL sees the decoded batch: input columns + row_id.
        let decoded_schema = crate::source::JsonBatchDecoder::new(input_schema.clone(), 1)?
            .schema()
            .clone();
        let lookups = Lookups::new(config.lookups.clone(), config.velocity.clone())
            .map_err(|e| cfg_err(e.to_string()))?;
        let join = SqlJoin::plan(&config.sql, decoded_schema, &lookups.table_schemas())
            .await
            .map_err(|e| cfg_err(format!("sql: {e}")))?;
        Ok(Self {
            input_schema,
            input_constraints,
            lookups,
            join,
        })
    }

    /// A decoder for this contract: types, value rules and the message size bound.
    pub fn decoder(
        &self,
        max_rows: usize,
        max_message_bytes: usize,
    ) -> Result<crate::source::JsonBatchDecoder, PipelineError> {
        Ok(
            crate::source::JsonBatchDecoder::new(self.input_schema.clone(), max_rows)?
                .with_constraints(self.input_constraints.clone())
                .with_max_message_bytes(max_message_bytes),
        )
    }

    /// Lookups and velocity (one store round trip), then the SQL.
    pub async fn compute(
        &self,
        store: &dyn FeatureStore,
        rows: &RecordBatch,
    ) -> Result<(RecordBatch, LookupStats), verdict_features::FeatureError> {
        let (tables, stats) = self.lookups.fetch(store, rows).await?;
        let mut all = Vec::with_capacity(tables.len() + 1);
        all.push(rows.clone());
        all.extend(tables);
        Ok((self.join.run(&all).await?, stats))
    }
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
        let features = FeatureStage::build(config).await?;
        let input_schema = features.input_schema.clone();
        let output = features.join.output_schema();
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

        let deadline = match &config.deadline {
            Some(d) => Some(Deadline::new(d, &input_schema).map_err(|e| cfg_err(e.to_string()))?),
            None => None,
        };
        let meta = &model.metadata;
        let policy = match &config.policy {
            PolicyConfig::Fraud(thresholds) => Policy::Fraud {
                policy: FraudPolicy::new(*thresholds).map_err(|e| cfg_err(e.to_string()))?,
                references: meta
                    .features
                    .iter()
                    .map(|f| {
                        (
                            f.reference.clone(),
                            format!("{}:high", f.name),
                            format!("{}:low", f.name),
                        )
                    })
                    .collect(),
            },
            PolicyConfig::Pricing(bounds) => {
                match output.field_with_name(BASE_PRICE) {
                    Ok(f) if f.data_type().is_numeric() => {}
                    _ => {
                        return Err(cfg_err(format!(
                            "sql: the pricing policy needs a numeric `{BASE_PRICE}` column"
                        )))
                    }
                }
                Policy::Pricing {
                    policy: PricingPolicy::new(*bounds).map_err(|e| cfg_err(e.to_string()))?,
                }
            }
        };
        Ok(Self {
            name: config.name.as_str().into(),
            input_schema,
            model_name: meta.name.clone(),
            model_version: meta.version.clone(),
            features,
            feature_columns: meta
                .features
                .iter()
                .map(|f| FeatureColumn {
                    name: f.name.clone(),
                    default: f.default,
                })
                .collect(),
            policy,
            encoder: DecisionEncoder::new(
                config.decisions_topic.as_str().into(),
                config.name.clone(),
                meta.name.clone(),
                meta.version.clone(),
                meta.features.iter().map(|f| f.name.clone()).collect(),
            ),
            dead_letter_topic: config.dead_letter_topic.as_str().into(),
            deadline,
            config: config.clone(),
        })
    }

    /// Feature stage: lookups (one store round trip) then the SQL. If the store fails, the
    /// batch continues with all lookup values missing — the model's defaults stand in and
    /// each decision lists the imputed features — rather than stopping the stream.
    pub async fn enrich(&self, store: &dyn FeatureStore, batch: InputBatch) -> Enriched {
        let rows = &batch.decoded.batch;
        let deadlines_ms = match &self.deadline {
            Some(d) => d.deadlines_ms(&batch),
            None => Vec::new(),
        };
        if let Some(d) = &self.deadline {
            if rows.num_rows() > 0 && d.late(&deadlines_ms, Ahead::Features).iter().all(|&l| l) {
                return Enriched {
                    joined: Err(StageFailure {
                        stage: Stage::Features,
                        cause: SHED_FOR_DEADLINE,
                        detail: "every transaction of the batch would miss its deadline".into(),
                    }),
                    batch,
                    lookup_stats: LookupStats::default(),
                    degraded: None,
                    lookup_time: Duration::ZERO,
                    join_time: Duration::ZERO,
                    deadlines_ms,
                };
            }
        }
        let started = Instant::now();
        let (tables, lookup_stats, degraded) = match self.features.lookups.fetch(store, rows).await
        {
            Ok((tables, stats)) => (Ok(tables), stats, None),
            Err(e) => {
                let reason = e.to_string();
                (
                    self.features.lookups.all_missing(rows),
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
                self.features
                    .join
                    .run(&all)
                    .await
                    .map_err(|e| StageFailure {
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
            deadlines_ms,
        }
    }

    /// Its lookups and planned SQL (the feature stage's parts, for measuring them alone).
    pub fn features(&self) -> &FeatureStage {
        &self.features
    }

    /// The decoder the source uses for this workload's input.
    pub fn decoder(&self) -> Result<crate::source::JsonBatchDecoder, PipelineError> {
        self.features
            .decoder(self.config.batch.max_rows, self.config.max_message_bytes)
    }

    /// The model's feature names, in model order.
    pub fn feature_names(&self) -> impl Iterator<Item = &str> {
        self.feature_columns.iter().map(|c| c.name.as_str())
    }

    /// Scoring stage (blocking: runs on the scorer's own thread).
    pub fn score(&self, scorer: &mut dyn Scorer, enriched: Enriched) -> Scored {
        let started = Instant::now();
        let shed = self.deadline.as_ref().is_some_and(|d| {
            !enriched.deadlines_ms.is_empty()
                && d.late(&enriched.deadlines_ms, Ahead::Score)
                    .iter()
                    .all(|&l| l)
        });
        let scored = match &enriched.joined {
            Err(failure) => Err(failure.clone()),
            Ok(_) if shed => Err(StageFailure {
                stage: Stage::Score,
                cause: SHED_FOR_DEADLINE,
                detail: "every transaction of the batch would miss its deadline".into(),
            }),
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

    /// The scorable rows of a scored batch, for the drift monitor (`None` if the batch
    /// failed or has none).
    pub fn drift_input(scored: &Scored) -> Option<DriftInput> {
        let (joined, matrix, scores) = scored.scored.as_ref().ok()?;
        let times = joined
            .column_by_name(EVENT_TIME_MS)
            .map(|c| c.as_primitive::<Int64Type>().clone());
        let width = matrix.features;
        let rows: Vec<usize> = (0..matrix.rows)
            .filter(|&r| matrix.unscorable[r].is_none())
            .collect();
        if rows.is_empty() {
            return None;
        }
        let mut values = Vec::with_capacity(rows.len() * width);
        for &r in &rows {
            values.extend_from_slice(&matrix.values[r * width..(r + 1) * width]);
        }
        Some(DriftInput {
            values,
            width,
            imputed: rows.iter().map(|&r| matrix.imputed[r].clone()).collect(),
            scores: rows.iter().map(|&r| scores[r]).collect(),
            event_times_ms: rows
                .iter()
                .map(|&r| match &times {
                    Some(t) if !t.is_null(r) => t.value(r),
                    _ => now_ms(),
                })
                .collect(),
        })
    }

    /// Policy and encoding: one decision per scorable row, one dead letter per message that
    /// was rejected or could not be scored.
    pub fn decide(&self, scored: &Scored) -> Result<Decided, PipelineError> {
        let batch = &scored.enriched.batch;
        let mut out = Decided::default();
        for rejection in &batch.decoded.rejected {
            out.dead_letter_causes
                .push((Stage::Decode, rejection.cause.as_str()));
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
        let deadlines = &scored.enriched.deadlines_ms;
        let late = match &self.deadline {
            Some(d) if !deadlines.is_empty() => d.late(deadlines, Ahead::Deliver),
            _ => vec![false; row_message.len()],
        };
        let mut fallback_rows: Vec<usize> = Vec::new();
        match &scored.scored {
            Err(failure) if failure.cause == SHED_FOR_DEADLINE => {
                fallback_rows.extend(0..row_message.len());
            }
            Err(failure) => {
                for &m in row_message {
                    out.dead_letter_causes.push((failure.stage, failure.cause));
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
                    if late[row] {
                        // A model answer delivered after the budget is worth less than the
                        // fallback delivered in time.
                        fallback_rows.push(row);
                    } else if let Some(why) = matrix.unscorable[row] {
                        let name = &self.feature_columns[why.feature as usize].name;
                        let (cause, detail) = if why.non_finite {
                            (
                                "non-finite-feature",
                                format!("feature `{name}` is NaN or infinite"),
                            )
                        } else {
                            (
                                "missing-feature",
                                format!(
                                    "feature `{name}` is missing and the model has no default for it"
                                ),
                            )
                        };
                        out.dead_letter_causes.push((Stage::Score, cause));
                        out.records.push(dead_letter(
                            &batch.messages[message],
                            &self.dead_letter_topic,
                            &self.name,
                            Stage::Score,
                            cause,
                            &detail,
                        ));
                    } else if ids.is_null(row) {
                        out.dead_letter_causes
                            .push((Stage::Score, "missing-transaction-id"));
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
                let mut reasons = ListBuilder::new(StringBuilder::new());
                let mut multipliers = Float64Builder::with_capacity(keep.len());
                let mut prices = Float64Builder::with_capacity(keep.len());
                let mut features = ListBuilder::new(Float32Builder::new());
                let mut outcomes = Vec::with_capacity(keep.len());
                let base_prices = match joined.column_by_name(BASE_PRICE) {
                    Some(c) => Some(
                        arrow::compute::cast(c, &DataType::Float64)
                            .map_err(|e| PipelineError::Decode(e.to_string()))?,
                    ),
                    None => None,
                };
                let width = self.feature_columns.len();
                out.imputed_by_feature = vec![0; width];
                for &row in &keep {
                    if !matrix.imputed[row].is_empty() {
                        out.imputed_rows += 1;
                        for &f in &matrix.imputed[row] {
                            out.imputed_by_feature[f as usize] += 1;
                        }
                    }
                    if !times.is_null(row) {
                        out.decided_event_times_ms.push(times.value(row));
                    }
                    let values = &matrix.values[row * width..(row + 1) * width];
                    let outcome = match &self.policy {
                        Policy::Fraud { policy, references } => {
                            let outcome = policy.decide(scores[row]);
                            if outcome == Outcome::Approve {
                                reasons.append_value(std::iter::empty::<Option<&str>>());
                            } else {
                                reasons.append_value(
                                    reason_codes(references, values).into_iter().map(Some),
                                );
                            }
                            multipliers.append_null();
                            prices.append_null();
                            outcome
                        }
                        Policy::Pricing { policy } => {
                            let base = base_prices
                                .as_ref()
                                .map(|c| c.as_primitive::<arrow::datatypes::Float64Type>())
                                .filter(|c| !c.is_null(row))
                                .map(|c| c.value(row))
                                .unwrap_or(f64::NAN);
                            let quote = policy.price(scores[row], base);
                            reasons.append_value(std::iter::empty::<Option<&str>>());
                            multipliers.append_value(quote.multiplier);
                            prices.append_option(quote.amount.is_finite().then_some(quote.amount));
                            Outcome::Priced
                        }
                    };
                    out.outcomes[Outcome::ALL.iter().position(|o| *o == outcome).unwrap_or(0)] += 1;
                    outcomes.push(outcome.as_str());
                    imputed.append_value(
                        matrix.imputed[row]
                            .iter()
                            .map(|f| Some(self.feature_columns[*f as usize].name.as_str())),
                    );
                    if self.config.include_features {
                        features.append_value(values.iter().map(|v| Some(*v)));
                    } else {
                        features.append_null();
                    }
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
                        Arc::new(reasons.finish()),
                        Arc::new(multipliers.finish()),
                        Arc::new(prices.finish()),
                        Arc::new(match joined.column_by_name(CURRENCY) {
                            Some(c) if c.data_type() == &DataType::Utf8 => {
                                let c = c.as_string::<i32>();
                                StringArray::from_iter(keep.iter().map(|&r| {
                                    (!c.is_null(r) && matches!(self.policy, Policy::Pricing { .. }))
                                        .then(|| c.value(r))
                                }))
                            }
                            _ => StringArray::new_null(keep.len()),
                        }),
                        Arc::new(StringArray::from(vec![
                            scored
                                .enriched
                                .degraded
                                .as_ref()
                                .map(|_| DEGRADED_FEATURE_STORE);
                            keep.len()
                        ])),
                        Arc::new(StringArray::new_null(keep.len())),
                        Arc::new(features.finish()),
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
        if let (Some(deadline), false) = (&self.deadline, fallback_rows.is_empty()) {
            let (decisions, outcomes) =
                deadline.fallback_decisions(batch, &fallback_rows, now_ms())?;
            for outcome in outcomes {
                out.outcomes[Outcome::ALL.iter().position(|o| *o == outcome).unwrap_or(0)] += 1;
            }
            let times = decisions
                .column_by_name("event_time_ms")
                .map(|c| c.as_primitive::<Int64Type>().clone());
            for (i, &row) in fallback_rows.iter().enumerate() {
                if let Some(t) = &times {
                    out.decided_event_times_ms.push(t.value(i));
                }
                if let Some(ts) = batch.messages[row_message[row]].timestamp_ms {
                    out.decided_timestamps_ms.push(ts);
                }
            }
            out.decisions += fallback_rows.len();
            out.fallbacks = fallback_rows.len();
            out.records.extend(
                self.encoder
                    .encode(&decisions)
                    .map_err(|e| PipelineError::Sink(e.to_string()))?,
            );
        }
        out.dead_letters = out.records.len() - out.decisions;
        Ok(out)
    }
}

/// Up to [`MAX_REASONS`] reason codes: the features whose value lies in the outer
/// [`REASON_TAIL`] of their reference on either side (counting the value's whole reference
/// bin, so a common value is never a reason) or, for a category, is rarer than that share;
/// rarest first.
fn reason_codes<'a>(references: &'a [(Reference, String, String)], values: &[f32]) -> Vec<&'a str> {
    let mut candidates: Vec<(f64, &str)> = Vec::new();
    for ((reference, high, low), &value) in references.iter().zip(values) {
        let value = f64::from(value);
        match reference {
            Reference::Bins { .. } => {
                if let Some((at_or_below, at_or_above)) = reference.tails(value) {
                    if at_or_above <= REASON_TAIL + 1e-9 {
                        candidates.push((1.0 - at_or_above, high));
                    } else if at_or_below <= REASON_TAIL + 1e-9 {
                        candidates.push((1.0 - at_or_below, low));
                    }
                }
            }
            Reference::Categories { counts } => {
                let total: u64 = counts.values().sum();
                let seen = counts
                    .iter()
                    .find(|(k, _)| k.parse::<f64>().ok() == Some(value))
                    .map(|(_, n)| *n)
                    .unwrap_or(0);
                let share = seen as f64 / total.max(1) as f64;
                if share < REASON_TAIL {
                    candidates.push((1.0 - share, if value > 0.0 { high } else { low }));
                }
            }
        }
    }
    candidates.sort_by(|a, b| b.0.total_cmp(&a.0));
    candidates
        .into_iter()
        .take(MAX_REASONS)
        .map(|(_, r)| r)
        .collect()
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
    use crate::source::RawMessage;
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
            key: Some(format!("k{offset}").into_bytes().into()),
            payload: Some(payload.as_bytes().to_vec().into()),
            headers: Vec::new(),
        }
    }

    fn tx(id: &str, card: &str, amount: f64) -> String {
        format!(
            r#"{{"transaction_id":"{id}","card_id":"{card}","merchant_id":"m1","amount":{amount},"currency":"EUR","country":"DE","channel":"online","event_time_ms":1700000000000}}"#
        )
    }

    fn batch(workload: &Workload, messages: Vec<RawMessage>) -> InputBatch {
        let mut decoder = workload.decoder().unwrap();
        let payloads: Vec<Option<&[u8]>> = messages.iter().map(|m| m.payload.as_deref()).collect();
        let decoded = decoder.decode(&payloads).unwrap();
        InputBatch::unconsumed(decoded, messages)
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
            &[
                ("fraud_rate_90d", "0.01"),
                ("risk_score", "0.2"),
                ("age_days", "700"),
            ],
        );
        store
    }

    const FRAUD_FEATURES: usize = 15;

    /// Scores = the second feature (amount / card average) / 10, so the test can predict them.
    fn ratio_scorer() -> FnScorer<impl FnMut(&[f32]) -> f32 + Send> {
        FnScorer::new(FRAUD_FEATURES, |row: &[f32]| row[1] / 10.0)
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
        assert_eq!(&dead.payload[..], b"{oops");
    }

    struct DownStore;

    #[async_trait]
    impl verdict_features::FeatureStore for DownStore {
        async fn fetch(
            &self,
            _: &[HashRead<'_>],
            _: &[verdict_features::velocity::VelocityUpdate<'_>],
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
            12,
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
            FRAUD_FEATURES
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

    fn decisions_of(decided: &Decided) -> Vec<serde_json::Value> {
        decided
            .records
            .iter()
            .filter(|r| {
                &*r.topic != "transactions.dead-letter" && &*r.topic != "quotes.dead-letter"
            })
            .map(|r| serde_json::from_slice(&r.payload).unwrap())
            .collect()
    }

    #[tokio::test]
    async fn velocity_counts_reach_the_model_and_accumulate_across_batches() {
        let mut config = Config::parse(EXAMPLE_CONFIG, &example_config_dir()).unwrap();
        config.workloads[0].include_features = true;
        let wc = &config.workloads[0];
        let w = Workload::build(wc, &LoadedModel::load(&wc.model).unwrap())
            .await
            .unwrap();
        let store = store();
        let at = |id: &str, amount: f64, t: i64| {
            tx(id, "c1", amount).replace("1700000000000", &t.to_string())
        };
        let t0 = 1_700_000_000_000i64;
        // Batch 1: two payments 10 s apart. Batch 2: one 2 minutes later, one 2 hours later.
        let first = batch(
            &w,
            vec![
                message(0, &at("a", 10.0, t0)),
                message(1, &at("b", 20.0, t0 + 10_000)),
            ],
        );
        let second = batch(
            &w,
            vec![
                message(2, &at("c", 30.0, t0 + 130_000)),
                message(3, &at("d", 40.0, t0 + 7_200_000)),
            ],
        );
        let mut seen = Vec::new();
        for input in [first, second] {
            let enriched = w.enrich(&store, input).await;
            let decided = w.decide(&w.score(&mut ratio_scorer(), enriched)).unwrap();
            seen.extend(decisions_of(&decided));
        }
        let feature = |d: &serde_json::Value, name: &str| d["features"][name].as_f64().unwrap();
        let counts: Vec<(f64, f64, f64)> = seen
            .iter()
            .map(|d| {
                (
                    feature(d, "card_tx_count_1m"),
                    feature(d, "card_tx_count_1h"),
                    feature(d, "card_tx_count_24h"),
                )
            })
            .collect();
        assert_eq!(
            counts,
            vec![
                (1.0, 1.0, 1.0),
                (2.0, 2.0, 2.0),
                (1.0, 3.0, 3.0),
                (1.0, 1.0, 4.0)
            ]
        );
        // 24 h sum (10+20+30+40) over the card's 30-day average (50).
        assert!((feature(&seen[3], "card_amount_24h_to_avg") - 2.0).abs() < 1e-6);
    }

    #[tokio::test]
    async fn a_decline_names_the_features_furthest_from_the_reference() {
        let w = fraud().await;
        // Ten times the card's average, at a young high-risk merchant, abroad.
        let store = store();
        store.insert(
            "merchant:m9",
            &[
                ("fraud_rate_90d", "0.09"),
                ("risk_score", "0.95"),
                ("age_days", "3"),
            ],
        );
        let payload = tx("t0", "c1", 500.0)
            .replace("\"m1\"", "\"m9\"")
            .replace("\"DE\"", "\"NG\"");
        let enriched = w
            .enrich(&store, batch(&w, vec![message(0, &payload)]))
            .await;
        let always_decline = FnScorer::new(FRAUD_FEATURES, |_: &[f32]| 0.99);
        let decided = w
            .decide(&w.score(&mut { always_decline }, enriched))
            .unwrap();
        let decision = &decisions_of(&decided)[0];
        assert_eq!(decision["decision"], "decline");
        let reasons: Vec<&str> = decision["reasons"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_str().unwrap())
            .collect();
        assert!(!reasons.is_empty() && reasons.len() <= 3, "{reasons:?}");
        assert!(
            reasons.iter().all(|r| [
                "amount_to_card_avg:high",
                "merchant_fraud_rate_90d:high",
                "merchant_risk_score:high",
                "merchant_age_days:low",
                "is_foreign:high",
                "amount:high",
                "card_amount_24h_to_avg:high",
            ]
            .contains(r)),
            "{reasons:?}"
        );
    }

    #[tokio::test]
    async fn a_quote_is_priced_inside_the_bounds_and_rounded() {
        let config = Config::parse(EXAMPLE_CONFIG, &example_config_dir()).unwrap();
        let wc = config
            .workloads
            .iter()
            .find(|w| w.name == "pricing")
            .unwrap();
        let w = Workload::build(wc, &LoadedModel::load(&wc.model).unwrap())
            .await
            .unwrap();
        let store = InMemoryFeatureStore::new();
        store.insert(
            "zone:z1",
            &[
                ("baseline_demand", "40"),
                ("baseline_supply", "50"),
                ("avg_multiplier_7d", "1.1"),
            ],
        );
        let quote = |id: &str| {
            format!(
                r#"{{"quote_id":"{id}","zone_id":"z1","product":"standard","distance_km":5.0,"base_price":8.0,"currency":"EUR","open_requests":90,"available_drivers":20,"event_time_ms":1700000000000}}"#
            )
        };
        let input = batch(&w, vec![message(0, &quote("q1")), message(1, &quote("q2"))]);
        let enriched = w.enrich(&store, input).await;
        // A model that predicts 7.3 and one that predicts 1.337: the cap and the rounding.
        let mut n = 0;
        let mut scorer = FnScorer::new(8, move |_: &[f32]| {
            n += 1;
            if n == 1 {
                7.3
            } else {
                1.337
            }
        });
        let decided = w.decide(&w.score(&mut scorer, enriched)).unwrap();
        let d = decisions_of(&decided);
        assert_eq!(d[0]["decision"], "priced");
        assert_eq!(d[0]["workload"], "pricing");
        assert_eq!(
            d[0]["price"],
            serde_json::json!({"multiplier": 3.0, "amount": 24.0, "currency": "EUR"})
        );
        assert_eq!(d[1]["price"]["multiplier"], 1.35);
        assert_eq!(d[1]["price"]["amount"], 10.8);
    }
}

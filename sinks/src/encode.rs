//! Decisions batch → one keyed JSON record per row.

use std::ops::Range;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use bytes::Bytes;
use serde::{Serialize, Serializer};

use crate::decision_json::{BatchRecord, DecisionJson};

use arrow::array::{
    Array, AsArray, Float32Array, Float64Array, Int64Array, ListArray, StringArray,
};
use arrow::datatypes::{Float32Type, Float64Type, Int64Type};
use arrow::record_batch::RecordBatch;
use verdict_schemas::{DecisionRecord, Outcome, PriceRecord};

use crate::sink::OutRecord;
use crate::{Result, SinkError};

/// Row `row` of a list-of-strings column, written as a JSON array straight from the batch
/// (collecting it into a `Vec` first was an allocation per record that had any).
pub(crate) struct ListedStrings<'a> {
    values: &'a StringArray,
    range: Range<usize>,
}

impl<'a> ListedStrings<'a> {
    fn of(list: &'a ListArray, row: usize) -> Self {
        let range = if list.is_null(row) {
            0..0
        } else {
            let offsets = list.value_offsets();
            offsets[row] as usize..offsets[row + 1] as usize
        };
        Self {
            values: list.values().as_string::<i32>(),
            range,
        }
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &'a str> + '_ {
        self.range.clone().map(|i| self.values.value(i))
    }
}

impl Serialize for ListedStrings<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        serializer.collect_seq(self.iter())
    }
}

/// A row's model inputs as a JSON object of feature name → value, in model order, written
/// straight from the batch's `features` list (a `BTreeMap` per record was a dozen
/// allocations per decision when `include-features` is on).
pub(crate) struct FeatureValues<'a> {
    names: &'a [String],
    values: &'a Float32Array,
    range: Range<usize>,
}

impl FeatureValues<'_> {
    /// The row's values, in model order.
    pub(crate) fn values(&self) -> impl Iterator<Item = f32> + '_ {
        self.range.clone().map(|i| self.values.value(i))
    }
}

impl Serialize for FeatureValues<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        serializer.collect_map(self.names.iter().map(String::as_str).zip(self.values()))
    }
}

/// A decision without features is about 300 bytes of JSON.
const INITIAL_BYTES_PER_RECORD: usize = 384;

/// Encodes decisions for one workload's decisions topic.
#[derive(Debug)]
pub struct DecisionEncoder {
    pub topic: Arc<str>,
    workload: String,
    model: String,
    model_version: String,
    /// Model feature names, in the order of the batch's `features` lists.
    feature_names: Vec<String>,
    /// Writes each record's JSON with the parts above escaped once.
    json: DecisionJson,
    /// Key and payload bytes per record of the last batch: the next batch's buffer is sized
    /// from it, so it rarely grows while being written.
    bytes_per_record: AtomicUsize,
}

impl DecisionEncoder {
    pub fn new(
        topic: Arc<str>,
        workload: String,
        model: String,
        model_version: String,
        feature_names: Vec<String>,
    ) -> Self {
        let json = DecisionJson::new(&workload, &model, &model_version, &feature_names);
        Self {
            topic,
            workload,
            model,
            model_version,
            feature_names,
            json,
            bytes_per_record: AtomicUsize::new(INITIAL_BYTES_PER_RECORD),
        }
    }

    /// Row `row` of `columns` as a decision record.
    fn record<'a>(&'a self, columns: &DecisionColumns<'a>, row: usize) -> Result<BatchRecord<'a>> {
        let c = columns;
        let outcome = Outcome::parse(c.outcomes.value(row)).ok_or_else(|| {
            SinkError::Encode(format!("unknown outcome `{}`", c.outcomes.value(row)))
        })?;
        let price = (!c.prices.is_null(row)).then(|| PriceRecord {
            multiplier: c.multipliers.value(row),
            amount: c.prices.value(row),
            currency: (!c.currencies.is_null(row)).then(|| c.currencies.value(row)),
        });
        let features = (!c.features.is_null(row)).then(|| {
            let offsets = c.features.value_offsets();
            FeatureValues {
                names: &self.feature_names,
                values: c.features.values().as_primitive::<Float32Type>(),
                range: offsets[row] as usize..offsets[row + 1] as usize,
            }
        });
        Ok(DecisionRecord {
            transaction_id: c.ids.value(row),
            workload: &self.workload,
            decision: outcome,
            score: (!c.scores.is_null(row)).then(|| c.scores.value(row)),
            model: &self.model,
            model_version: &self.model_version,
            event_time_ms: c.event_times.value(row),
            decision_time_ms: c.decision_times.value(row),
            imputed_features: ListedStrings::of(c.imputed, row),
            reasons: ListedStrings::of(c.reasons, row),
            price,
            degraded: (!c.degraded.is_null(row)).then(|| c.degraded.value(row)),
            fallback: (!c.fallback.is_null(row)).then(|| c.fallback.value(row)),
            features,
        })
    }

    /// `batch` has [`verdict_schemas::decision_arrow_schema`]. Records are keyed by
    /// transaction id, so all decisions for a transaction land in one partition, in order.
    pub fn encode(&self, batch: &RecordBatch) -> Result<Vec<OutRecord>> {
        let columns = DecisionColumns::of(batch)?;
        // Every record's key and payload go into one buffer, sliced into records at the end:
        // one allocation per batch (and a few as it grows) instead of two per record. Sized
        // from the last batch's bytes per record.
        let rows = batch.num_rows();
        let mut buffer = Vec::with_capacity(
            rows * self
                .bytes_per_record
                .load(std::sync::atomic::Ordering::Relaxed),
        );
        // Per record: where its key ends and where its payload ends (each starts where the
        // previous part ended).
        let mut ends = Vec::with_capacity(rows);
        for row in 0..rows {
            let record = self.record(&columns, row)?;
            buffer.extend_from_slice(record.transaction_id.as_bytes());
            let key_end = buffer.len();
            self.json.write(&mut buffer, &record);
            ends.push((key_end, buffer.len()));
        }
        if rows > 0 {
            self.bytes_per_record.store(
                buffer.len().div_ceil(rows),
                std::sync::atomic::Ordering::Relaxed,
            );
        }
        let buffer = Bytes::from(buffer);
        let mut start = 0;
        Ok(ends
            .into_iter()
            .map(|(key_end, end)| {
                let record = OutRecord {
                    topic: Arc::clone(&self.topic),
                    key: Some(buffer.slice(start..key_end)),
                    payload: buffer.slice(key_end..end),
                    headers: Vec::new(),
                };
                start = end;
                record
            })
            .collect())
    }
}

/// The columns of a decisions batch ([`verdict_schemas::decision_arrow_schema`]), by name.
struct DecisionColumns<'a> {
    ids: &'a StringArray,
    outcomes: &'a StringArray,
    scores: &'a Float32Array,
    event_times: &'a Int64Array,
    decision_times: &'a Int64Array,
    imputed: &'a ListArray,
    reasons: &'a ListArray,
    multipliers: &'a Float64Array,
    prices: &'a Float64Array,
    currencies: &'a StringArray,
    features: &'a ListArray,
    degraded: &'a StringArray,
    fallback: &'a StringArray,
}

impl<'a> DecisionColumns<'a> {
    fn of(batch: &'a RecordBatch) -> Result<Self> {
        let column = |name: &str| {
            batch
                .column_by_name(name)
                .ok_or_else(|| SinkError::Encode(format!("decisions batch has no `{name}` column")))
        };
        Ok(Self {
            ids: column("transaction_id")?.as_string(),
            outcomes: column("decision")?.as_string(),
            scores: column("score")?.as_primitive::<Float32Type>(),
            event_times: column("event_time_ms")?.as_primitive::<Int64Type>(),
            decision_times: column("decision_time_ms")?.as_primitive::<Int64Type>(),
            imputed: column("imputed_features")?.as_list(),
            reasons: column("reasons")?.as_list(),
            multipliers: column("price_multiplier")?.as_primitive::<Float64Type>(),
            prices: column("price")?.as_primitive::<Float64Type>(),
            currencies: column("currency")?.as_string(),
            features: column("features")?.as_list(),
            degraded: column("degraded")?.as_string(),
            fallback: column("fallback")?.as_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Float32Builder, ListBuilder, StringBuilder};
    use proptest::prelude::*;
    use verdict_schemas::decision_arrow_schema;

    /// One generated decision row.
    #[derive(Debug, Clone)]
    struct Row {
        id: String,
        outcome: Outcome,
        score: Option<f32>,
        event_time_ms: i64,
        decision_time_ms: i64,
        imputed: Vec<String>,
        reasons: Vec<String>,
        price: Option<(f64, f64)>,
        currency: Option<String>,
        degraded: Option<String>,
        fallback: Option<String>,
        features: Option<Vec<f32>>,
    }

    const FEATURE_NAMES: [&str; 3] = ["amount", "is \"foreign\"", "h\u{1}our\n"];

    fn rows() -> impl Strategy<Value = Vec<Row>> {
        // Text with quotes, backslashes, control characters and non-ASCII: what escaping is for.
        let text = || r#"[a-z"\\\x00-\x1fé€😀 ]{0,12}"#;
        let strings = move || proptest::collection::vec(text(), 0..3);
        let row = (
            (
                text(),
                proptest::sample::select(Outcome::ALL.to_vec()),
                proptest::option::of(any::<f32>()),
                any::<i64>(),
                any::<i64>(),
                strings(),
                strings(),
            ),
            (
                proptest::option::of((any::<f64>(), any::<f64>())),
                proptest::option::of(text()),
                proptest::option::of(text()),
                proptest::option::of(text()),
                proptest::option::of(proptest::collection::vec(any::<f32>(), FEATURE_NAMES.len())),
            ),
        )
            .prop_map(
                |(
                    (id, outcome, score, event_time_ms, decision_time_ms, imputed, reasons),
                    (price, currency, degraded, fallback, features),
                )| Row {
                    id,
                    outcome,
                    score,
                    event_time_ms,
                    decision_time_ms,
                    imputed,
                    reasons,
                    price,
                    currency,
                    degraded,
                    fallback,
                    features,
                },
            );
        proptest::collection::vec(row, 0..8)
    }

    fn batch_of(rows: &[Row]) -> RecordBatch {
        // The schema's lists are not nullable: no decision has a null list.
        let list = |lists: Vec<Vec<String>>| {
            let mut b = ListBuilder::new(StringBuilder::new());
            for items in lists {
                b.append_value(items.into_iter().map(Some));
            }
            Arc::new(b.finish())
        };
        let mut features = ListBuilder::new(Float32Builder::new());
        for r in rows {
            features.append_option(r.features.clone().map(|v| v.into_iter().map(Some)));
        }
        let strings = |f: &dyn Fn(&Row) -> Option<String>| {
            Arc::new(StringArray::from(rows.iter().map(f).collect::<Vec<_>>()))
        };
        RecordBatch::try_new(
            decision_arrow_schema(),
            vec![
                strings(&|r| Some(r.id.clone())),
                strings(&|r| Some(r.outcome.as_str().to_string())),
                Arc::new(Float32Array::from(
                    rows.iter().map(|r| r.score).collect::<Vec<_>>(),
                )),
                Arc::new(Int64Array::from(
                    rows.iter().map(|r| r.event_time_ms).collect::<Vec<_>>(),
                )),
                Arc::new(Int64Array::from(
                    rows.iter().map(|r| r.decision_time_ms).collect::<Vec<_>>(),
                )),
                list(rows.iter().map(|r| r.imputed.clone()).collect()),
                list(rows.iter().map(|r| r.reasons.clone()).collect()),
                Arc::new(Float64Array::from(
                    rows.iter()
                        .map(|r| r.price.map(|p| p.0))
                        .collect::<Vec<_>>(),
                )),
                Arc::new(Float64Array::from(
                    rows.iter()
                        .map(|r| r.price.map(|p| p.1))
                        .collect::<Vec<_>>(),
                )),
                strings(&|r| r.currency.clone()),
                strings(&|r| r.degraded.clone()),
                strings(&|r| r.fallback.clone()),
                Arc::new(features.finish()),
            ],
        )
        .unwrap()
    }

    proptest! {
        /// The hand-written JSON is byte for byte what serde_json writes for the same record,
        /// whatever the strings (escapes, control characters, non-ASCII), the numbers
        /// (non-finite floats become `null` in both) and which optional parts are present.
        #[test]
        fn records_are_written_exactly_as_serde_writes_them(
            rows in rows(),
            workload in r#"[a-z"\\\x00-\x1fé]{1,8}"#,
            model in r#"[a-z"\\\x00-\x1fé]{1,8}"#,
            version in r#"[0-9a-z"\\]{1,4}"#,
        ) {
            let batch = batch_of(&rows);
            let encoder = DecisionEncoder::new(
                "decisions".into(),
                workload,
                model,
                version,
                FEATURE_NAMES.iter().map(|n| n.to_string()).collect(),
            );
            let records = encoder.encode(&batch).unwrap();
            prop_assert_eq!(records.len(), rows.len());
            let columns = DecisionColumns::of(&batch).unwrap();
            for (row, written) in records.iter().enumerate() {
                let record = encoder.record(&columns, row).unwrap();
                let expected = serde_json::to_vec(&record).unwrap();
                prop_assert_eq!(
                    String::from_utf8_lossy(&written.payload),
                    String::from_utf8_lossy(&expected)
                );
                prop_assert_eq!(written.key.as_deref(), Some(rows[row].id.as_bytes()));
            }
        }
    }

    #[test]
    fn each_row_becomes_a_json_decision_keyed_by_transaction_id() {
        let mut imputed = ListBuilder::new(StringBuilder::new());
        imputed.append_value([Some("card_age_days")]);
        imputed.append_value(Vec::<Option<&str>>::new());
        let mut reasons = ListBuilder::new(StringBuilder::new());
        reasons.append_value([Some("amount:high")]);
        reasons.append_value(Vec::<Option<&str>>::new());
        let mut features = ListBuilder::new(Float32Builder::new());
        features.append_value([Some(1.5f32), Some(2.0)]);
        features.append_null();
        let batch = RecordBatch::try_new(
            decision_arrow_schema(),
            vec![
                Arc::new(StringArray::from(vec!["t1", "t2"])),
                Arc::new(StringArray::from(vec!["decline", "approve"])),
                Arc::new(Float32Array::from(vec![Some(0.9), None])),
                Arc::new(Int64Array::from(vec![1, 2])),
                Arc::new(Int64Array::from(vec![10, 20])),
                Arc::new(imputed.finish()),
                Arc::new(reasons.finish()),
                Arc::new(Float64Array::from(vec![None, Some(1.25)])),
                Arc::new(Float64Array::from(vec![None, Some(12.5)])),
                Arc::new(StringArray::from(vec![None, Some("EUR")])),
                Arc::new(StringArray::from(vec![
                    Some("feature-store-unavailable"),
                    None,
                ])),
                Arc::new(StringArray::from(vec![None, Some("deadline")])),
                Arc::new(features.finish()),
            ],
        )
        .unwrap();
        let encoder = DecisionEncoder::new(
            "decisions".into(),
            "fraud".into(),
            "m".into(),
            "1".into(),
            vec!["a".into(), "b".into()],
        );
        let records = encoder.encode(&batch).unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].key.as_deref(), Some(&b"t1"[..]));
        let first: serde_json::Value = serde_json::from_slice(&records[0].payload).unwrap();
        assert_eq!(first["decision"], "decline");
        assert_eq!(first["imputed_features"][0], "card_age_days");
        assert_eq!(first["model_version"], "1");
        let second: serde_json::Value = serde_json::from_slice(&records[1].payload).unwrap();
        assert_eq!(second["imputed_features"].as_array().unwrap().len(), 0);
        assert_eq!(first["reasons"][0], "amount:high");
        assert_eq!(first["features"], serde_json::json!({"a": 1.5, "b": 2.0}));
        assert!(first.get("price").is_none());
        assert_eq!(
            second["price"],
            serde_json::json!({"multiplier": 1.25, "amount": 12.5, "currency": "EUR"})
        );
        assert!(second.get("features").is_none());
        assert_eq!(first["degraded"], "feature-store-unavailable");
        assert!(first.get("fallback").is_none());
        assert!(second.get("degraded").is_none());
        assert_eq!(second["fallback"], "deadline");
        assert!(second["score"].is_null(), "a fallback has no model score");
    }
}

//! Decisions batch → one keyed JSON record per row.

use std::ops::Range;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use bytes::Bytes;
use serde::{Serialize, Serializer};

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
struct ListedStrings<'a> {
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
}

impl Serialize for ListedStrings<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        serializer.collect_seq(self.range.clone().map(|i| self.values.value(i)))
    }
}

/// A row's model inputs as a JSON object of feature name → value, in model order, written
/// straight from the batch's `features` list (a `BTreeMap` per record was a dozen
/// allocations per decision when `include-features` is on).
struct FeatureValues<'a> {
    names: &'a [String],
    values: &'a Float32Array,
    range: Range<usize>,
}

impl Serialize for FeatureValues<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        serializer.collect_map(
            self.names
                .iter()
                .map(String::as_str)
                .zip(self.range.clone().map(|i| self.values.value(i))),
        )
    }
}

/// A decision without features is about 300 bytes of JSON.
const INITIAL_BYTES_PER_RECORD: usize = 384;

/// Encodes decisions for one workload's decisions topic.
#[derive(Debug)]
pub struct DecisionEncoder {
    pub topic: Arc<str>,
    pub workload: String,
    pub model: String,
    pub model_version: String,
    /// Model feature names, in the order of the batch's `features` lists.
    pub feature_names: Vec<String>,
    /// Key and payload bytes per record of the last batch: the next batch's buffer is sized
    /// from it, so it rarely grows while being written.
    pub bytes_per_record: AtomicUsize,
}

impl DecisionEncoder {
    pub fn new(
        topic: Arc<str>,
        workload: String,
        model: String,
        model_version: String,
        feature_names: Vec<String>,
    ) -> Self {
        Self {
            topic,
            workload,
            model,
            model_version,
            feature_names,
            bytes_per_record: AtomicUsize::new(INITIAL_BYTES_PER_RECORD),
        }
    }

    /// `batch` has [`verdict_schemas::decision_arrow_schema`]. Records are keyed by
    /// transaction id, so all decisions for a transaction land in one partition, in order.
    pub fn encode(&self, batch: &RecordBatch) -> Result<Vec<OutRecord>> {
        let column = |name: &str| {
            batch
                .column_by_name(name)
                .ok_or_else(|| SinkError::Encode(format!("decisions batch has no `{name}` column")))
        };
        let ids: &StringArray = column("transaction_id")?.as_string();
        let outcomes: &StringArray = column("decision")?.as_string();
        let scores: &Float32Array = column("score")?.as_primitive::<Float32Type>();
        let event_times: &Int64Array = column("event_time_ms")?.as_primitive::<Int64Type>();
        let decision_times: &Int64Array = column("decision_time_ms")?.as_primitive::<Int64Type>();
        let imputed: &ListArray = column("imputed_features")?.as_list();
        let reasons: &ListArray = column("reasons")?.as_list();
        let multipliers: &Float64Array = column("price_multiplier")?.as_primitive::<Float64Type>();
        let prices: &Float64Array = column("price")?.as_primitive::<Float64Type>();
        let currencies: &StringArray = column("currency")?.as_string();
        let features: &ListArray = column("features")?.as_list();
        let degraded: &StringArray = column("degraded")?.as_string();
        let fallback: &StringArray = column("fallback")?.as_string();

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
            let outcome = Outcome::parse(outcomes.value(row)).ok_or_else(|| {
                SinkError::Encode(format!("unknown outcome `{}`", outcomes.value(row)))
            })?;
            let price = (!prices.is_null(row)).then(|| PriceRecord {
                multiplier: multipliers.value(row),
                amount: prices.value(row),
                currency: (!currencies.is_null(row)).then(|| currencies.value(row)),
            });
            let feature_values = (!features.is_null(row)).then(|| {
                let offsets = features.value_offsets();
                FeatureValues {
                    names: &self.feature_names,
                    values: features.values().as_primitive::<Float32Type>(),
                    range: offsets[row] as usize..offsets[row + 1] as usize,
                }
            });
            let record = DecisionRecord {
                transaction_id: ids.value(row),
                workload: &self.workload,
                decision: outcome,
                score: (!scores.is_null(row)).then(|| scores.value(row)),
                model: &self.model,
                model_version: &self.model_version,
                event_time_ms: event_times.value(row),
                decision_time_ms: decision_times.value(row),
                imputed_features: ListedStrings::of(imputed, row),
                reasons: ListedStrings::of(reasons, row),
                price,
                degraded: (!degraded.is_null(row)).then(|| degraded.value(row)),
                fallback: (!fallback.is_null(row)).then(|| fallback.value(row)),
                features: feature_values,
            };
            buffer.extend_from_slice(ids.value(row).as_bytes());
            let key_end = buffer.len();
            serde_json::to_writer(&mut buffer, &record)
                .map_err(|e| SinkError::Encode(e.to_string()))?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Float32Builder, ListBuilder, StringBuilder};
    use verdict_schemas::decision_arrow_schema;

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

//! A decision record's JSON, written field by field with its fixed parts escaped once.
//!
//! Why not `serde_json::to_writer` on the whole record: serde escapes every field name and
//! every string it writes, byte by byte, and a decision has thirteen field names and three
//! strings (workload, model, model version) that are the same for every record an encoder
//! writes. At 10,000 tx/s that escaping was a quarter of the decision step (`serde_json`'s
//! `format_escaped_str` 1.6% of the whole process in a profile, the largest function on the
//! tokio workers). Here the fixed parts are escaped when the encoder is built; the values that
//! vary — the transaction id, list items, numbers, feature values — still go through
//! `serde_json`, so every byte is the one serde would write. The tests compare the two on
//! generated batches.

use serde::Serialize;
use verdict_schemas::DecisionRecord;

use crate::encode::{FeatureValues, ListedStrings};

/// The record type the encoder builds: lists and features borrowed from the batch.
pub(crate) type BatchRecord<'a> = DecisionRecord<'a, ListedStrings<'a>, FeatureValues<'a>>;

/// Writes [`DecisionRecord`]s of one workload and model.
#[derive(Debug)]
pub(crate) struct DecisionJson {
    workload: String,
    model: String,
    model_version: String,
    /// `,"workload":<workload>,"decision":`
    after_id: Vec<u8>,
    /// `,"model":<model>,"model_version":<version>,"event_time_ms":`
    after_score: Vec<u8>,
    /// `"<name>":` of each model feature, in model order.
    feature_keys: Vec<Vec<u8>>,
}

impl DecisionJson {
    pub(crate) fn new(
        workload: &str,
        model: &str,
        model_version: &str,
        feature_names: &[String],
    ) -> Self {
        let mut after_id = b",\"workload\":".to_vec();
        push_value(&mut after_id, workload);
        after_id.extend_from_slice(b",\"decision\":");
        let mut after_score = b",\"model\":".to_vec();
        push_value(&mut after_score, model);
        after_score.extend_from_slice(b",\"model_version\":");
        push_value(&mut after_score, model_version);
        after_score.extend_from_slice(b",\"event_time_ms\":");
        let feature_keys = feature_names
            .iter()
            .map(|name| {
                let mut key = Vec::with_capacity(name.len() + 3);
                push_value(&mut key, name.as_str());
                key.push(b':');
                key
            })
            .collect();
        Self {
            workload: workload.to_string(),
            model: model.to_string(),
            model_version: model_version.to_string(),
            after_id,
            after_score,
            feature_keys,
        }
    }

    /// Appends `record` as compact JSON, the bytes `serde_json::to_writer` would write. The
    /// record's workload, model and version must be this writer's (the encoder builds them
    /// from the same strings).
    pub(crate) fn write(&self, out: &mut Vec<u8>, record: &BatchRecord<'_>) {
        debug_assert_eq!(record.workload, self.workload);
        debug_assert_eq!(record.model, self.model);
        debug_assert_eq!(record.model_version, self.model_version);
        out.extend_from_slice(b"{\"transaction_id\":");
        push_value(out, record.transaction_id);
        out.extend_from_slice(&self.after_id);
        push_value(out, &record.decision);
        out.extend_from_slice(b",\"score\":");
        push_value(out, &record.score);
        out.extend_from_slice(&self.after_score);
        push_value(out, &record.event_time_ms);
        out.extend_from_slice(b",\"decision_time_ms\":");
        push_value(out, &record.decision_time_ms);
        out.extend_from_slice(b",\"imputed_features\":");
        push_strings(out, &record.imputed_features);
        out.extend_from_slice(b",\"reasons\":");
        push_strings(out, &record.reasons);
        if let Some(price) = &record.price {
            out.extend_from_slice(b",\"price\":{\"multiplier\":");
            push_value(out, &price.multiplier);
            out.extend_from_slice(b",\"amount\":");
            push_value(out, &price.amount);
            if let Some(currency) = price.currency {
                out.extend_from_slice(b",\"currency\":");
                push_value(out, currency);
            }
            out.push(b'}');
        }
        if let Some(degraded) = record.degraded {
            out.extend_from_slice(b",\"degraded\":");
            push_value(out, degraded);
        }
        if let Some(fallback) = record.fallback {
            out.extend_from_slice(b",\"fallback\":");
            push_value(out, fallback);
        }
        if let Some(features) = &record.features {
            out.extend_from_slice(b",\"features\":{");
            for (i, (key, value)) in self.feature_keys.iter().zip(features.values()).enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(key);
                push_value(out, &value);
            }
            out.push(b'}');
        }
        out.push(b'}');
    }
}

/// One value as serde_json writes it (strings escaped, non-finite floats as `null`).
fn push_value<T: Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    // Writing into a Vec cannot fail, and none of the types written here can fail to
    // serialize (no maps with non-string keys, no custom errors).
    let _ = serde_json::to_writer(&mut *out, value);
}

fn push_strings(out: &mut Vec<u8>, strings: &ListedStrings<'_>) {
    out.push(b'[');
    for (i, s) in strings.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        push_value(out, s);
    }
    out.push(b']');
}

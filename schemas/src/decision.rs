//! The decision message: one per input transaction, JSON, keyed by `transaction_id`.
//! Its contract for downstream teams is `schemas/json/decision.schema.json`.

use serde::Serialize;

/// The JSON Schema of [`DecisionRecord`], as shipped to downstream teams.
pub const DECISION_JSON_SCHEMA: &str = include_str!("../json/decision.schema.json");

/// What the policy decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Approve,
    Review,
    Decline,
}

impl Outcome {
    pub const ALL: [Outcome; 3] = [Outcome::Approve, Outcome::Review, Outcome::Decline];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Approve => "approve",
            Outcome::Review => "review",
            Outcome::Decline => "decline",
        }
    }
}

/// One decision, borrowed from the batch it was computed in (encoding allocates nothing but
/// the output buffer).
#[derive(Debug, Clone, Serialize)]
pub struct DecisionRecord<'a> {
    pub transaction_id: &'a str,
    pub workload: &'a str,
    pub decision: Outcome,
    pub score: f32,
    pub model: &'a str,
    pub model_version: &'a str,
    pub event_time_ms: i64,
    pub decision_time_ms: i64,
    pub imputed_features: Vec<&'a str>,
}

/// Arrow schema of the decisions batch that flows from the policy to the sink: one row per
/// input transaction. The sink encodes each row as a [`DecisionRecord`].
pub fn decision_arrow_schema() -> arrow::datatypes::SchemaRef {
    use arrow::datatypes::{DataType, Field, Schema};
    std::sync::Arc::new(Schema::new(vec![
        Field::new("transaction_id", DataType::Utf8, false),
        Field::new("decision", DataType::Utf8, false),
        Field::new("score", DataType::Float32, false),
        Field::new("event_time_ms", DataType::Int64, false),
        Field::new("decision_time_ms", DataType::Int64, false),
        Field::new(
            "imputed_features",
            DataType::List(std::sync::Arc::new(Field::new_list_field(
                DataType::Utf8,
                true,
            ))),
            false,
        ),
    ]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoded_decision_validates_against_its_json_schema() {
        let schema: serde_json::Value = serde_json::from_str(DECISION_JSON_SCHEMA).unwrap();
        let validator = jsonschema::validator_for(&schema).unwrap();
        let record = DecisionRecord {
            transaction_id: "tx-1",
            workload: "fraud",
            decision: Outcome::Review,
            score: 0.42,
            model: "fraud-mlp",
            model_version: "1.0.0",
            event_time_ms: 1_700_000_000_000,
            decision_time_ms: 1_700_000_000_003,
            imputed_features: vec!["card_age_days"],
        };
        let value = serde_json::to_value(&record).unwrap();
        assert!(validator.is_valid(&value), "{value}");

        // The schema really constrains: an unknown outcome is rejected.
        let mut bad = value.clone();
        bad["decision"] = "maybe".into();
        assert!(!validator.is_valid(&bad));
    }
}

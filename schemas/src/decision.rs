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
    /// A pricing decision: the record carries the price.
    Priced,
}

impl Outcome {
    pub const ALL: [Outcome; 4] = [
        Outcome::Approve,
        Outcome::Review,
        Outcome::Decline,
        Outcome::Priced,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Approve => "approve",
            Outcome::Review => "review",
            Outcome::Decline => "decline",
            Outcome::Priced => "priced",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|o| o.as_str() == s)
    }
}

/// The price of a pricing decision.
#[derive(Debug, Clone, Serialize)]
pub struct PriceRecord<'a> {
    /// The multiplier quoted, after the policy's clamping and rounding.
    pub multiplier: f64,
    /// `base_price × multiplier`, rounded to cents.
    pub amount: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub currency: Option<&'a str>,
}

/// One decision, borrowed from the batch it was computed in.
///
/// The lists and the feature map are type parameters so an encoder can write them straight
/// from its Arrow columns (anything that serializes as a JSON array of strings, and as an
/// object of feature name → number), allocating nothing per record; the defaults are the
/// plain owned forms.
#[derive(Debug, Clone, Serialize)]
pub struct DecisionRecord<
    'a,
    Names = Vec<&'a str>,
    Features = std::collections::BTreeMap<&'a str, f32>,
> {
    pub transaction_id: &'a str,
    pub workload: &'a str,
    pub decision: Outcome,
    /// The model's output; `None` for a fallback decision, which no model made.
    pub score: Option<f32>,
    pub model: &'a str,
    pub model_version: &'a str,
    pub event_time_ms: i64,
    pub decision_time_ms: i64,
    pub imputed_features: Names,
    /// Reason codes (`<feature>:high` / `<feature>:low`): for fraud reviews and declines, the
    /// features furthest out in their reference distribution.
    pub reasons: Names,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub price: Option<PriceRecord<'a>>,
    /// Set when the decision was made without the feature store (it was down or slow):
    /// `"feature-store-unavailable"`. `imputed_features` lists what took its default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub degraded: Option<&'a str>,
    /// Set when this is the workload's fallback decision rather than the model's, and why:
    /// `"deadline"` (the transaction's latency budget would have run out).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fallback: Option<&'a str>,
    /// The model's input values, when the workload is configured to include them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub features: Option<Features>,
}

/// Arrow schema of the decisions batch that flows from the policy to the sink: one row per
/// input transaction. The sink encodes each row as a [`DecisionRecord`].
pub fn decision_arrow_schema() -> arrow::datatypes::SchemaRef {
    use arrow::datatypes::{DataType, Field, Schema};
    std::sync::Arc::new(Schema::new(vec![
        Field::new("transaction_id", DataType::Utf8, false),
        Field::new("decision", DataType::Utf8, false),
        Field::new("score", DataType::Float32, true),
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
        Field::new(
            "reasons",
            DataType::List(std::sync::Arc::new(Field::new_list_field(
                DataType::Utf8,
                true,
            ))),
            false,
        ),
        Field::new("price_multiplier", DataType::Float64, true),
        Field::new("price", DataType::Float64, true),
        Field::new("currency", DataType::Utf8, true),
        Field::new("degraded", DataType::Utf8, true),
        Field::new("fallback", DataType::Utf8, true),
        Field::new(
            "features",
            DataType::List(std::sync::Arc::new(Field::new_list_field(
                DataType::Float32,
                true,
            ))),
            true,
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
        let record: DecisionRecord = DecisionRecord {
            transaction_id: "tx-1",
            workload: "fraud",
            decision: Outcome::Review,
            score: Some(0.42),
            model: "fraud-mlp",
            model_version: "1.0.0",
            event_time_ms: 1_700_000_000_000,
            decision_time_ms: 1_700_000_000_003,
            imputed_features: vec!["card_age_days"],
            reasons: vec!["card_tx_count_1m:high"],
            price: None,
            degraded: None,
            fallback: None,
            features: None,
        };
        let value = serde_json::to_value(&record).unwrap();
        assert!(validator.is_valid(&value), "{value}");

        // A fallback has no score and says so; a degraded decision says why.
        let fallback = DecisionRecord {
            score: None,
            fallback: Some("deadline"),
            degraded: Some("feature-store-unavailable"),
            ..record.clone()
        };
        let value = serde_json::to_value(&fallback).unwrap();
        assert!(validator.is_valid(&value), "{value}");
        let mut bad = value.clone();
        bad["fallback"] = "tired".into();
        assert!(!validator.is_valid(&bad));

        // The schema really constrains: an unknown outcome is rejected.
        let mut bad = value.clone();
        bad["decision"] = "maybe".into();
        assert!(!validator.is_valid(&bad));

        // A pricing decision carries its price; features are a name → value map.
        let priced = DecisionRecord {
            decision: Outcome::Priced,
            score: Some(1.37),
            reasons: vec![],
            price: Some(PriceRecord {
                multiplier: 1.35,
                amount: 13.5,
                currency: Some("EUR"),
            }),
            features: Some([("distance_km", 4.2f32)].into_iter().collect()),
            ..record
        };
        let value = serde_json::to_value(&priced).unwrap();
        assert!(validator.is_valid(&value), "{value}");
    }
}

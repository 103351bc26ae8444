//! The drift alert message, produced to a workload's alerts topic, keyed by
//! `<workload>/<feature>`. Its contract for analysts' tooling is
//! `schemas/json/drift-alert.schema.json`.

use serde::Serialize;

/// The JSON Schema of [`DriftAlert`].
pub const DRIFT_ALERT_JSON_SCHEMA: &str = include_str!("../json/drift-alert.schema.json");

/// Where an alert is in its life: one `firing` when the condition starts, a `reminder` at the
/// configured interval while it lasts, one `resolved` when it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertStatus {
    Firing,
    Reminder,
    Resolved,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

/// The window an alert was evaluated on (event time of its rows).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AlertWindow {
    /// Sequence number of the window since the workload started.
    pub index: u64,
    pub start_ms: i64,
    pub end_ms: i64,
    pub rows: u64,
}

/// Live versus reference distribution, as proportions over the same bins or categories.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AlertHistogram {
    /// Bin edges (numeric features and the score): bin i is `[edges[i], edges[i+1])`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub edges: Option<Vec<f64>>,
    /// Category labels (categorical features); the last is `other` (unseen in training).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub categories: Option<Vec<String>>,
    pub reference: Vec<f64>,
    pub live: Vec<f64>,
}

/// One drift or data-quality alert.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DriftAlert {
    pub workload: String,
    pub model: String,
    pub model_version: String,
    /// A model input feature, or `score` for the model's output.
    pub feature: String,
    /// `drift` (distribution shift) or `data-quality` (missing or out-of-range values).
    pub kind: &'static str,
    pub status: AlertStatus,
    /// `ks`, `chi-square`, `missing-rate` or `out-of-range-rate`.
    pub statistic: &'static str,
    /// The statistic's value in this window (KS D, chi-square, or a rate).
    pub value: f64,
    /// What the condition compares against: the significance level for the corrected
    /// p-value (drift), or the rate limit (data quality).
    pub threshold: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p_value: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p_value_corrected: Option<f64>,
    /// `benjamini-hochberg` or `bonferroni`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correction: Option<&'static str>,
    /// Population Stability Index of the window against the reference (drift alerts).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub psi: Option<f64>,
    pub severity: Severity,
    pub window: AlertWindow,
    /// Consecutive windows the condition has held (firing, reminder) or not held (resolved).
    pub consecutive_windows: u32,
    /// Event-time start of the first window of the episode.
    pub since_ms: i64,
    pub histogram: AlertHistogram,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_encoded_alert_validates_against_its_json_schema() {
        let schema: serde_json::Value = serde_json::from_str(DRIFT_ALERT_JSON_SCHEMA).unwrap();
        let validator = jsonschema::validator_for(&schema).unwrap();
        let alert = DriftAlert {
            workload: "fraud".into(),
            model: "fraud-mlp".into(),
            model_version: "2.0.0".into(),
            feature: "amount".into(),
            kind: "drift",
            status: AlertStatus::Firing,
            statistic: "ks",
            value: 0.12,
            threshold: 0.01,
            p_value: Some(1e-9),
            p_value_corrected: Some(1.5e-8),
            correction: Some("benjamini-hochberg"),
            psi: Some(0.08),
            severity: Severity::Info,
            window: AlertWindow {
                index: 7,
                start_ms: 1,
                end_ms: 2,
                rows: 2000,
            },
            consecutive_windows: 2,
            since_ms: 0,
            histogram: AlertHistogram {
                edges: Some(vec![0.0, 1.0, 2.0]),
                categories: None,
                reference: vec![0.5, 0.5],
                live: vec![0.3, 0.7],
            },
        };
        let value = serde_json::to_value(&alert).unwrap();
        assert!(validator.is_valid(&value), "{value}");
        let mut bad = value.clone();
        bad["status"] = "maybe".into();
        assert!(!validator.is_valid(&bad));
    }
}

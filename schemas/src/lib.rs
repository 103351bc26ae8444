//! verdict's wire contracts.
//!
//! This crate owns every format that crosses a process boundary, and nothing else: it does no
//! I/O. Downstream teams read the JSON Schema files under `schemas/json/`; the Rust types and
//! Arrow schemas here are derived from (or checked against) those same files.
//!
//! Layout:
//! - [`input`]: input JSON Schema → Arrow schema (the decoder's target), built-in input schemas;
//! - [`decision`]: the decision message produced for every transaction;
//! - [`alert`]: the drift alert produced to a workload's alerts topic;
//! - [`constraints`]: value rules of an input contract (ranges, enums, lengths), checked per row;
//! - [`dead_letter`]: the header names a dead letter carries;
//! - [`columns`]: column names shared by the pipeline stages.

pub mod alert;
pub mod columns;
pub mod constraints;
pub mod dead_letter;
pub mod decision;
pub mod input;

pub use alert::{AlertHistogram, AlertStatus, AlertWindow, DriftAlert, Severity};
pub use constraints::{InputConstraints, Violation};
pub use decision::{decision_arrow_schema, DecisionRecord, Outcome, PriceRecord};
pub use input::{arrow_schema_from_json_schema, builtin_input_schema};

/// Errors in a contract itself (not in the data it describes).
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("JSON Schema is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("JSON Schema {schema}: {reason}")]
    Unsupported { schema: String, reason: String },
    #[error("unknown built-in input schema `{0}` (known: {known})", known = input::BUILTIN_NAMES.join(", "))]
    UnknownBuiltin(String),
}

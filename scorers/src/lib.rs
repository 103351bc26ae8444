//! Scoring: models, ONNX Runtime sessions and decision policies.
//!
//! - [`model`]: a model directory (`model.onnx` + `model.json`), its metadata contract and the
//!   checksum check on load;
//! - [`runtime`]: the process-wide ONNX Runtime environment and finding `libonnxruntime.so`;
//! - [`scorer`]: the [`Scorer`] trait and a test double;
//! - [`onnx`]: the ONNX Runtime scorer (CPU, or CUDA with a logged fallback to CPU);
//! - [`policy`]: score → decision;
//! - [`drift`]: drift statistics against the model's reference distributions, and the monitor.

pub mod drift;
pub mod model;
pub mod onnx;
pub mod policy;
pub mod runtime;
pub mod scorer;

pub use model::{FeatureSpec, FeatureType, LoadedModel, ModelMetadata, Reference};
pub use onnx::{ExecutionProvider, OnnxScorer, OnnxScorerConfig};
pub use policy::{FraudPolicy, FraudThresholds, PriceQuote, PricingBounds, PricingPolicy};
pub use scorer::{FnScorer, Scorer};

use std::path::PathBuf;

/// Errors of the scoring crate. Each names the file or field at fault.
#[derive(Debug, thiserror::Error)]
pub enum ScorerError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: invalid model metadata: {source}")]
    Metadata {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: SHA-256 is {actual}, but model.json says {expected}: the model file is not the one its metadata describes")]
    Checksum {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("{path}: model does not match its metadata: {field}: {reason}")]
    Contract {
        path: PathBuf,
        field: String,
        reason: String,
    },
    #[error("ONNX Runtime library: {0}")]
    Library(String),
    #[error("ONNX Runtime: {0}")]
    Ort(String),
    #[error("scoring: {0}")]
    Score(String),
    #[error("policy: {0}")]
    Policy(String),
}

impl<R> From<ort::Error<R>> for ScorerError {
    fn from(e: ort::Error<R>) -> Self {
        ScorerError::Ort(e.to_string())
    }
}

pub type Result<T, E = ScorerError> = std::result::Result<T, E>;

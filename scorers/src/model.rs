//! A model directory holds `model.onnx` and `model.json`, written together by the training
//! script. `model.json` is the model's contract: which features in which order, what a missing
//! feature becomes, which output tensor is the score, and the SHA-256 of `model.onnx`, so a
//! model file swapped under a stale contract is refused instead of scoring garbage.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::{Result, ScorerError};

/// One model input feature, in the model's order.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureSpec {
    /// Column of the workload SQL's output that feeds this input.
    pub name: String,
    /// Value used when the feature is missing (null or non-finite). `null`: the feature is
    /// required, and a row without it cannot be scored.
    pub default: Option<f32>,
}

/// Which output tensor holds the score.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSpec {
    /// Output tensor name, e.g. `probabilities` (shape `[N, classes]`) or `score` (`[N]`/`[N, 1]`).
    pub name: String,
    /// Column of a 2-D output that is the score (1 = the positive class of a binary classifier).
    #[serde(default)]
    pub column: usize,
    /// What the score means, for humans.
    #[serde(default)]
    pub meaning: String,
}

/// A row of features with the score the training framework gave it: replayed through ONNX
/// Runtime by the tests, because exporters have silently changed models before.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GoldenRow {
    pub features: Vec<f32>,
    pub score: f32,
}

/// The contents of `model.json`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelMetadata {
    pub name: String,
    pub version: String,
    #[serde(default)]
    pub description: String,
    /// Name of the single input tensor, float32 `[N, features]`.
    pub input: String,
    pub features: Vec<FeatureSpec>,
    pub output: OutputSpec,
    /// Hex SHA-256 of `model.onnx`.
    pub sha256: String,
    /// How the model was trained and how well it did on holdout data (free-form).
    #[serde(default)]
    pub training: serde_json::Value,
    #[serde(default)]
    pub golden: Vec<GoldenRow>,
}

/// A model read from its directory, checksum verified.
#[derive(Debug, Clone)]
pub struct LoadedModel {
    pub dir: PathBuf,
    pub onnx_path: PathBuf,
    pub metadata: ModelMetadata,
    pub onnx: Vec<u8>,
}

impl LoadedModel {
    /// Reads `dir/model.json` and `dir/model.onnx` and checks the file's SHA-256.
    pub fn load(dir: &Path) -> Result<Self> {
        let json_path = dir.join("model.json");
        let onnx_path = dir.join("model.onnx");
        let read = |path: &Path| {
            std::fs::read(path).map_err(|source| ScorerError::Io {
                path: path.to_path_buf(),
                source,
            })
        };
        let metadata: ModelMetadata =
            serde_json::from_slice(&read(&json_path)?).map_err(|source| ScorerError::Metadata {
                path: json_path.clone(),
                source,
            })?;
        let onnx = read(&onnx_path)?;
        let actual = hex::encode(Sha256::digest(&onnx));
        if !actual.eq_ignore_ascii_case(&metadata.sha256) {
            return Err(ScorerError::Checksum {
                path: onnx_path,
                expected: metadata.sha256,
                actual,
            });
        }
        if metadata.features.is_empty() {
            return Err(ScorerError::Contract {
                path: json_path,
                field: "features".into(),
                reason: "is empty".into(),
            });
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            onnx_path,
            metadata,
            onnx,
        })
    }

    pub fn feature_names(&self) -> impl Iterator<Item = &str> {
        self.metadata.features.iter().map(|f| f.name.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn fraud_model_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("models/fraud-mlp")
    }

    #[test]
    fn the_committed_fraud_model_loads_and_its_checksum_matches() {
        let model = LoadedModel::load(&fraud_model_dir()).unwrap();
        assert_eq!(model.metadata.name, "fraud-mlp");
        assert_eq!(model.metadata.input, "features");
        assert_eq!(model.metadata.features.len(), 10);
        assert!(!model.metadata.golden.is_empty());
    }

    #[test]
    fn a_tampered_model_file_is_refused_naming_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let src = fraud_model_dir();
        std::fs::copy(src.join("model.json"), dir.join("model.json")).unwrap();
        let mut onnx = std::fs::read(src.join("model.onnx")).unwrap();
        let last = onnx.len() - 1;
        onnx[last] ^= 0xff;
        std::fs::write(dir.join("model.onnx"), onnx).unwrap();
        let err = LoadedModel::load(dir).unwrap_err().to_string();
        assert!(
            err.contains("model.onnx") && err.contains("SHA-256"),
            "{err}"
        );
    }

    #[test]
    fn a_missing_metadata_file_names_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let err = LoadedModel::load(tmp.path()).unwrap_err().to_string();
        assert!(err.contains("model.json"), "{err}");
    }
}

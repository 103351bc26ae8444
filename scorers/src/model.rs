//! A model directory holds `model.onnx`, `model.json` and `golden.json`, written together by
//! the training script. `model.json` is the model's contract: which features in which order,
//! with their types, what a missing feature becomes, which output tensor is the score, the
//! SHA-256 of `model.onnx` (a model file swapped under a stale contract is refused instead of
//! scoring garbage), and the reference distribution of every feature and of the score on the
//! training data (quantile bins and counts), which reason codes and drift statistics compare
//! live traffic against. `golden.json` holds feature rows with the scores ONNX Runtime's
//! Python package gave them, which the tests replay.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::{Result, ScorerError};

/// Element type of a model input feature. Every feature is fed to ONNX Runtime as `float32`;
/// the type says what the SQL must produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FeatureType {
    /// Any real number.
    Float,
    /// A count or other whole number.
    Integer,
    /// 0 or 1.
    Binary,
}

/// Distribution of a feature (or the score) on the training data.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind", deny_unknown_fields)]
pub enum Reference {
    /// Quantile bins: `edges` are ascending bin boundaries (k+1 of them for k bins, the first
    /// and last the training min and max), `counts` the training rows per bin. Bin *i* holds
    /// `edges[i] <= x < edges[i+1]`; the last bin includes its upper edge.
    Bins { edges: Vec<f64>, counts: Vec<u64> },
    /// Counts per category value (as a string, e.g. `"0"`, `"1"`).
    Categories { counts: BTreeMap<String, u64> },
}

impl Reference {
    /// Conservative tail masses of `x` in the reference: `(P(X ≤ x), P(X ≥ x))`, each counting
    /// the whole bin `x` falls in, so a value sitting on a mass point (a count of 0 that 95% of
    /// cards share, say) is never called rare. `None` for categories or an empty reference.
    pub fn tails(&self, x: f64) -> Option<(f64, f64)> {
        let Reference::Bins { edges, counts } = self else {
            return None;
        };
        let total: u64 = counts.iter().sum();
        if total == 0 || edges.len() != counts.len() + 1 || x.is_nan() {
            return None;
        }
        let (first, last) = (edges[0], edges[edges.len() - 1]);
        if x < first {
            return Some((0.0, 1.0));
        }
        if x > last {
            return Some((1.0, 0.0));
        }
        let bin = (0..counts.len())
            .find(|&i| x < edges[i + 1])
            .unwrap_or(counts.len() - 1);
        let below: u64 = counts[..bin].iter().sum();
        let total = total as f64;
        Some((
            (below + counts[bin]) as f64 / total,
            (total - below as f64) / total,
        ))
    }

    fn check(&self) -> std::result::Result<(), String> {
        match self {
            Reference::Bins { edges, counts } => {
                if edges.len() != counts.len() + 1 {
                    return Err(format!(
                        "{} edges for {} bins (expected one more edge than bins)",
                        edges.len(),
                        counts.len()
                    ));
                }
                // NaN edges fail too: partial_cmp gives None.
                if edges
                    .windows(2)
                    .any(|w| w[0].partial_cmp(&w[1]).is_none_or(|o| o.is_gt()))
                {
                    return Err("edges are not ascending".into());
                }
                Ok(())
            }
            Reference::Categories { counts } if counts.is_empty() => Err("no categories".into()),
            Reference::Categories { .. } => Ok(()),
        }
    }
}

/// One model input feature, in the model's order.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureSpec {
    /// Column of the workload SQL's output that feeds this input.
    pub name: String,
    #[serde(rename = "type")]
    pub kind: FeatureType,
    /// Value used when the feature is missing (null or non-finite). `null`: the feature is
    /// required, and a row without it cannot be scored.
    pub default: Option<f32>,
    /// Training distribution (after imputation).
    pub reference: Reference,
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
    pub meaning: String,
    /// Training distribution of the score.
    pub reference: Reference,
}

/// A row of features with the score ONNX Runtime's Python package gave it: the Rust scorer
/// must reproduce it (the training script also checks ONNX against the training framework,
/// because exporters have silently changed models before).
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
    /// `binary-classification` (score = probability of the positive class) or `regression`.
    pub task: String,
    /// How the model was trained and how well it did on holdout data (free-form).
    #[serde(default)]
    pub training: serde_json::Value,
}

/// A model read from its directory, checksum verified.
#[derive(Debug, Clone)]
pub struct LoadedModel {
    pub dir: PathBuf,
    pub onnx_path: PathBuf,
    pub metadata: ModelMetadata,
    pub onnx: Vec<u8>,
    /// Parity rows from `golden.json` (empty if the file is absent).
    pub golden: Vec<GoldenRow>,
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
        let contract = |field: String, reason: String| ScorerError::Contract {
            path: json_path.clone(),
            field,
            reason,
        };
        if metadata.features.is_empty() {
            return Err(contract("features".into(), "is empty".into()));
        }
        for (i, f) in metadata.features.iter().enumerate() {
            f.reference.check().map_err(|reason| {
                contract(format!("features[{i}] ({}).reference", f.name), reason)
            })?;
            if metadata.features[..i].iter().any(|g| g.name == f.name) {
                return Err(contract(
                    format!("features[{i}].name"),
                    format!("`{}` appears twice", f.name),
                ));
            }
        }
        metadata
            .output
            .reference
            .check()
            .map_err(|reason| contract("output.reference".into(), reason))?;
        if !matches!(
            metadata.task.as_str(),
            "binary-classification" | "regression"
        ) {
            return Err(contract(
                "task".into(),
                format!(
                    "`{}` is neither binary-classification nor regression",
                    metadata.task
                ),
            ));
        }
        let golden_path = dir.join("golden.json");
        let golden = match std::fs::read(&golden_path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map_err(|source| ScorerError::Metadata {
                    path: golden_path,
                    source,
                })?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(source) => {
                return Err(ScorerError::Io {
                    path: golden_path,
                    source,
                })
            }
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            onnx_path,
            metadata,
            onnx,
            golden,
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
        assert!(model.metadata.features.len() >= 10);
        assert!(model.golden.len() >= 200, "a few hundred parity rows");
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
    fn tails_count_the_whole_bin_so_mass_points_are_not_rare() {
        // 95% zeros: quantile edges collapse onto 0.
        let r = Reference::Bins {
            edges: vec![0.0, 1.0, 3.0],
            counts: vec![950, 50],
        };
        assert_eq!(r.tails(0.0), Some((0.95, 1.0)));
        assert_eq!(r.tails(2.0), Some((1.0, 0.05)));
        assert_eq!(r.tails(7.0), Some((1.0, 0.0)));
        assert_eq!(r.tails(-1.0), Some((0.0, 1.0)));
    }

    #[test]
    fn a_broken_reference_is_refused_naming_the_feature() {
        let tmp = tempfile::tempdir().unwrap();
        let src = fraud_model_dir();
        std::fs::copy(src.join("model.onnx"), tmp.path().join("model.onnx")).unwrap();
        let mut meta: serde_json::Value =
            serde_json::from_slice(&std::fs::read(src.join("model.json")).unwrap()).unwrap();
        meta["features"][1]["reference"]["counts"]
            .as_array_mut()
            .unwrap()
            .pop();
        std::fs::write(tmp.path().join("model.json"), meta.to_string()).unwrap();
        let err = LoadedModel::load(tmp.path()).unwrap_err().to_string();
        assert!(
            err.contains("features[1]") && err.contains("reference"),
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

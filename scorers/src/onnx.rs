//! ONNX Runtime scorer.
//!
//! Sessions are created once per workload. On these 2-core machines one intra-op thread with
//! spinning off beats two (ONNX Runtime's spinning threads compete with the pipeline's own), so
//! that is the default. CUDA is chosen in the config; when it cannot be registered (no GPU, CPU
//! wheel, missing CUDA libraries) the scorer logs a warning and runs on CPU, and says so in
//! [`OnnxScorer::execution_provider`].

use ort::ep;
use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;
use ort::value::{TensorElementType, TensorRef, ValueType};
use serde::Deserialize;

use crate::model::LoadedModel;
use crate::scorer::Scorer;
use crate::{runtime, Result, ScorerError};

/// Where ONNX Runtime runs the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExecutionProvider {
    #[default]
    Cpu,
    /// NVIDIA GPU through the CUDA execution provider (needs the `onnxruntime-gpu` library);
    /// falls back to CPU with a warning when unavailable.
    Cuda,
}

/// `[workloads.scorer]` section of the config.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct OnnxScorerConfig {
    #[serde(default)]
    pub execution_provider: ExecutionProvider,
    /// CUDA device ordinal.
    #[serde(default)]
    pub cuda_device: i32,
    /// ONNX Runtime intra-op threads (1 is fastest on small machines).
    #[serde(default = "one")]
    pub intra_op_threads: usize,
}

fn one() -> usize {
    1
}

impl Default for OnnxScorerConfig {
    fn default() -> Self {
        Self {
            execution_provider: ExecutionProvider::Cpu,
            cuda_device: 0,
            intra_op_threads: 1,
        }
    }
}

/// Scores with an ONNX Runtime session.
pub struct OnnxScorer {
    session: Session,
    input: String,
    output: String,
    output_column: usize,
    features: usize,
    provider: ExecutionProvider,
}

impl OnnxScorer {
    /// Creates the session and checks the model against its metadata: the input tensor exists,
    /// is float32 and has as many columns as there are features; the output tensor exists and
    /// has the score column.
    pub fn new(model: &LoadedModel, config: &OnnxScorerConfig) -> Result<Self> {
        let env = runtime::environment(None)?;
        let build = |cuda: bool| -> Result<Session> {
            let mut builder = Session::builder(env)?
                .with_optimization_level(GraphOptimizationLevel::All)?
                .with_intra_threads(config.intra_op_threads)?
                .with_intra_op_spinning(false)?
                .with_inter_threads(1)?;
            if cuda {
                builder = builder.with_execution_providers([ep::CUDA::default()
                    .with_device_id(config.cuda_device)
                    .build()
                    .error_on_failure()])?;
            }
            Ok(builder.commit_from_memory(&model.onnx)?)
        };
        let (session, provider) = match config.execution_provider {
            ExecutionProvider::Cpu => (build(false)?, ExecutionProvider::Cpu),
            ExecutionProvider::Cuda => match build(true) {
                Ok(session) => (session, ExecutionProvider::Cuda),
                Err(e) => {
                    tracing::warn!(
                        model = %model.metadata.name,
                        error = %e,
                        "CUDA execution provider unavailable; scoring on CPU"
                    );
                    (build(false)?, ExecutionProvider::Cpu)
                }
            },
        };

        let meta = &model.metadata;
        let contract = |field: &str, reason: String| ScorerError::Contract {
            path: model.onnx_path.clone(),
            field: field.to_string(),
            reason,
        };
        let input = session
            .inputs()
            .iter()
            .find(|i| i.name() == meta.input)
            .ok_or_else(|| {
                contract(
                    "input",
                    format!(
                        "no input tensor named `{}` (the model has: {})",
                        meta.input,
                        names(session.inputs().iter().map(|o| o.name()))
                    ),
                )
            })?;
        check_tensor(input.dtype(), meta.features.len(), "input", &meta.input)
            .map_err(|r| contract("input", r))?;
        let output = session
            .outputs()
            .iter()
            .find(|o| o.name() == meta.output.name)
            .ok_or_else(|| {
                contract(
                    "output.name",
                    format!(
                        "no output tensor named `{}` (the model has: {})",
                        meta.output.name,
                        names(session.outputs().iter().map(|o| o.name()))
                    ),
                )
            })?;
        if let Some(shape) = output.dtype().tensor_shape() {
            let columns = if shape.len() >= 2 { shape[1] } else { 1 };
            if columns > 0 && meta.output.column as i64 >= columns {
                return Err(contract(
                    "output.column",
                    format!(
                        "column {} but `{}` has {columns}",
                        meta.output.column, meta.output.name
                    ),
                ));
            }
        }
        Ok(Self {
            input: meta.input.clone(),
            output: meta.output.name.clone(),
            output_column: meta.output.column,
            features: meta.features.len(),
            session,
            provider,
        })
    }

    /// The provider actually in use (after any fallback).
    pub fn execution_provider(&self) -> ExecutionProvider {
        self.provider
    }
}

fn names<'a>(names: impl Iterator<Item = &'a str>) -> String {
    names
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn check_tensor(ty: &ValueType, width: usize, what: &str, name: &str) -> Result<(), String> {
    match ty {
        ValueType::Tensor { ty, shape, .. } => {
            if *ty != TensorElementType::Float32 {
                return Err(format!("{what} `{name}` is {ty:?}, expected float32"));
            }
            if shape.len() != 2 || (shape[1] >= 0 && shape[1] as usize != width) {
                return Err(format!(
                    "{what} `{name}` has shape {:?}, expected [N, {width}] (one column per feature in model.json)",
                    &shape[..]
                ));
            }
            Ok(())
        }
        other => Err(format!("{what} `{name}` is {other:?}, expected a tensor")),
    }
}

impl Scorer for OnnxScorer {
    fn score(&mut self, features: &[f32], rows: usize) -> Result<Vec<f32>> {
        if rows == 0 {
            return Ok(Vec::new());
        }
        if features.len() != rows * self.features {
            return Err(ScorerError::Score(format!(
                "expected {} values, got {}",
                rows * self.features,
                features.len()
            )));
        }
        let tensor = TensorRef::from_array_view(([rows, self.features], features))?;
        let outputs = self
            .session
            .run(ort::inputs![self.input.as_str() => tensor])?;
        let (shape, values) = outputs[self.output.as_str()].try_extract_tensor::<f32>()?;
        let width = if shape.len() >= 2 {
            shape[1] as usize
        } else {
            1
        };
        if values.len() != rows * width {
            return Err(ScorerError::Score(format!(
                "output `{}` has {} values for {rows} rows",
                self.output,
                values.len()
            )));
        }
        Ok(values
            .chunks(width)
            .map(|row| row[self.output_column])
            .collect())
    }

    fn feature_count(&self) -> usize {
        self.features
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn model() -> LoadedModel {
        LoadedModel::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("models/fraud-mlp")).unwrap()
    }

    /// Every committed model: verdict's scorer gives the scores ONNX Runtime's Python package
    /// gave the same rows (`golden.json`, written by the training script) within 1e-5.
    #[test]
    fn the_scorer_reproduces_python_onnx_runtimes_golden_scores_for_every_model() {
        let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
        let mut checked = 0;
        for entry in std::fs::read_dir(&models).unwrap() {
            let model = LoadedModel::load(&entry.unwrap().path()).unwrap();
            let mut scorer = OnnxScorer::new(&model, &OnnxScorerConfig::default()).unwrap();
            let golden = &model.golden;
            assert!(
                golden.len() >= 200,
                "{}: {} golden rows",
                model.dir.display(),
                golden.len()
            );
            let matrix: Vec<f32> = golden.iter().flat_map(|g| g.features.clone()).collect();
            let scores = scorer.score(&matrix, golden.len()).unwrap();
            for (g, s) in golden.iter().zip(&scores) {
                let tolerance = 1e-5 * g.score.abs().max(1.0);
                assert!(
                    (g.score - s).abs() <= tolerance,
                    "{}: python onnxruntime {} vs verdict {s}",
                    model.metadata.name,
                    g.score
                );
            }
            // Row by row gives the same scores as the batch.
            for (i, g) in golden.iter().enumerate().take(20) {
                let one = scorer.score(&g.features, 1).unwrap();
                assert!((one[0] - scores[i]).abs() <= 1e-6 * scores[i].abs().max(1.0));
            }
            checked += 1;
        }
        assert!(checked >= 3, "fraud MLP, fraud GBT and pricing models");
    }

    #[test]
    fn cuda_without_a_gpu_falls_back_to_cpu() {
        let config = OnnxScorerConfig {
            execution_provider: ExecutionProvider::Cuda,
            ..OnnxScorerConfig::default()
        };
        let mut scorer = OnnxScorer::new(&model(), &config).unwrap();
        // On a build machine (CPU wheel, no GPU) this is CPU; on a GPU host with onnxruntime-gpu
        // it is CUDA. Either way it scores.
        let features = vec![0.5f32; model().metadata.features.len()];
        assert_eq!(scorer.score(&features, 1).unwrap().len(), 1);
        if std::env::var_os("VERDICT_EXPECT_CUDA").is_some() {
            assert_eq!(scorer.execution_provider(), ExecutionProvider::Cuda);
        }
    }

    #[test]
    fn metadata_naming_a_wrong_input_is_refused_with_the_field() {
        let mut model = model();
        model.metadata.input = "x".into();
        let err = OnnxScorer::new(&model, &OnnxScorerConfig::default())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("input") && err.contains("`features`"), "{err}");
    }

    #[test]
    fn metadata_with_the_wrong_feature_count_is_refused() {
        let mut model = model();
        model.metadata.features.pop();
        let expected = format!("expected [N, {}]", model.metadata.features.len());
        let err = OnnxScorer::new(&model, &OnnxScorerConfig::default())
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains(&expected) && err.contains("model.onnx"),
            "{err}"
        );
    }
}

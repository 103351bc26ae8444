//! The scoring abstraction: a dense feature matrix in, one score per row out.

use crate::Result;

/// Scores batches. `score` takes `&mut self` because an ONNX Runtime session run does: a scorer
/// is owned by the one stage that runs it, off the async workers.
pub trait Scorer: Send {
    /// `features` is row-major, `rows * self.feature_count()` values.
    fn score(&mut self, features: &[f32], rows: usize) -> Result<Vec<f32>>;
    fn feature_count(&self) -> usize;
}

/// Test double: scores each row with a closure.
pub struct FnScorer<F> {
    features: usize,
    f: F,
}

impl<F: FnMut(&[f32]) -> f32 + Send> FnScorer<F> {
    pub fn new(features: usize, f: F) -> Self {
        Self { features, f }
    }
}

impl<F: FnMut(&[f32]) -> f32 + Send> Scorer for FnScorer<F> {
    fn score(&mut self, features: &[f32], rows: usize) -> Result<Vec<f32>> {
        if features.len() != rows * self.features {
            return Err(crate::ScorerError::Score(format!(
                "expected {} values, got {}",
                rows * self.features,
                features.len()
            )));
        }
        Ok(features.chunks(self.features).map(&mut self.f).collect())
    }

    fn feature_count(&self) -> usize {
        self.features
    }
}

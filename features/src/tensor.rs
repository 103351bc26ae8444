//! The model's input: a dense row-major `f32` matrix `[rows, features]` built from the SQL
//! output's columns in the model's feature order.
//!
//! Imputation is explicit: a null value takes the feature's documented default from the
//! model's metadata, and every imputed cell is reported per row, so the decision can say which
//! features were missing. A null feature with no default cannot be imputed, and a NaN or
//! infinite value (a division by a zero average, a corrupt `nan` in Redis) is not missing but
//! wrong: either row is reported as unscorable, with the feature and why, instead of being fed
//! garbage or silently papered over.

use arrow::array::{Array, Float32Array};
use arrow::compute::cast;
use arrow::datatypes::DataType;
use arrow::record_batch::RecordBatch;

use crate::{FeatureError, Result};

/// One model input: the SQL output column it is read from and its imputation default.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureColumn {
    pub name: String,
    /// Value used when the column is null or non-finite; `None`: the row cannot be scored.
    pub default: Option<f32>,
}

/// The model input of one batch.
#[derive(Debug, Clone, Default)]
pub struct FeatureMatrix {
    /// Row-major values, `rows * features` long.
    pub values: Vec<f32>,
    pub rows: usize,
    pub features: usize,
    /// Per row, the indices (into the feature list) of the features that were imputed.
    pub imputed: Vec<Vec<u16>>,
    /// Per row, the first feature that makes it unscorable, and why.
    pub unscorable: Vec<Option<Unscorable>>,
}

/// Why a row cannot be scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unscorable {
    /// Index into the feature list.
    pub feature: u16,
    /// `true`: the value is NaN or infinite; `false`: null, and the model has no default.
    pub non_finite: bool,
}

impl FeatureMatrix {
    /// Builds the matrix; numeric and boolean columns are cast to `f32`.
    pub fn from_batch(batch: &RecordBatch, columns: &[FeatureColumn]) -> Result<Self> {
        let rows = batch.num_rows();
        let features = columns.len();
        let mut values = vec![0f32; rows * features];
        let mut imputed = vec![Vec::new(); rows];
        let mut unscorable = vec![None; rows];
        for (f, spec) in columns.iter().enumerate() {
            let column = batch.column_by_name(&spec.name).ok_or_else(|| {
                FeatureError::Output(format!(
                    "model feature `{}` is not a column of the SQL output",
                    spec.name
                ))
            })?;
            let as_f32 = cast(column, &DataType::Float32).map_err(|e| {
                FeatureError::Output(format!(
                    "model feature `{}` ({}) cannot be read as a number: {e}",
                    spec.name,
                    column.data_type()
                ))
            })?;
            let as_f32 = as_f32
                .as_any()
                .downcast_ref::<Float32Array>()
                .ok_or_else(|| FeatureError::Output(format!("cast of `{}` failed", spec.name)))?;
            for row in 0..rows {
                let slot = &mut values[row * features + f];
                if as_f32.is_null(row) {
                    match spec.default {
                        Some(default) => {
                            imputed[row].push(f as u16);
                            *slot = default;
                        }
                        None => {
                            unscorable[row].get_or_insert(Unscorable {
                                feature: f as u16,
                                non_finite: false,
                            });
                            *slot = f32::NAN;
                        }
                    }
                } else {
                    // Casting a finite f64 beyond f32's range also lands here, as infinity.
                    let v = as_f32.value(row);
                    if !v.is_finite() {
                        unscorable[row].get_or_insert(Unscorable {
                            feature: f as u16,
                            non_finite: true,
                        });
                    }
                    *slot = v;
                }
            }
        }
        Ok(Self {
            values,
            rows,
            features,
            imputed,
            unscorable,
        })
    }

    /// The values of one row.
    pub fn row(&self, row: usize) -> &[f32] {
        &self.values[row * self.features..(row + 1) * self.features]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{BooleanArray, Float64Array, Int64Array};
    use arrow::datatypes::{Field, Schema};
    use std::sync::Arc;

    fn batch() -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("a", DataType::Float64, true),
            Field::new("b", DataType::Int64, true),
            Field::new("c", DataType::Boolean, true),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Float64Array::from(vec![
                    Some(1.5),
                    None,
                    Some(f64::INFINITY),
                ])),
                Arc::new(Int64Array::from(vec![Some(7), Some(8), None])),
                Arc::new(BooleanArray::from(vec![Some(true), Some(false), None])),
            ],
        )
        .unwrap()
    }

    fn col(name: &str, default: Option<f32>) -> FeatureColumn {
        FeatureColumn {
            name: name.into(),
            default,
        }
    }

    #[test]
    fn model_order_casts_and_documented_defaults() {
        // Model order differs from the batch's column order.
        let m = FeatureMatrix::from_batch(
            &batch(),
            &[
                col("b", Some(-1.0)),
                col("a", Some(9.0)),
                col("c", Some(0.0)),
            ],
        )
        .unwrap();
        assert_eq!((m.rows, m.features), (3, 3));
        assert_eq!(m.row(0), &[7.0, 1.5, 1.0]);
        assert_eq!(m.row(1), &[8.0, 9.0, 0.0]);
        assert_eq!(m.row(2)[0], -1.0);
        assert_eq!(m.imputed, vec![vec![], vec![1], vec![0, 2]]);
        // Infinity is not missing but wrong: the row is not scored with it, nor with a default.
        assert_eq!(
            m.unscorable,
            vec![
                None,
                None,
                Some(Unscorable {
                    feature: 1,
                    non_finite: true
                })
            ]
        );
    }

    #[test]
    fn missing_value_without_default_marks_the_row_unscorable() {
        let m =
            FeatureMatrix::from_batch(&batch(), &[col("a", None), col("b", Some(0.0))]).unwrap();
        let missing = Some(Unscorable {
            feature: 0,
            non_finite: false,
        });
        let infinite = Some(Unscorable {
            feature: 0,
            non_finite: true,
        });
        assert_eq!(m.unscorable, vec![None, missing, infinite]);
    }

    #[test]
    fn missing_column_names_the_feature() {
        let err = FeatureMatrix::from_batch(&batch(), &[col("zzz", Some(0.0))])
            .unwrap_err()
            .to_string();
        assert!(err.contains("`zzz`"), "{err}");
    }
}

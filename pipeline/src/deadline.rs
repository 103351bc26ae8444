//! Per-transaction latency budgets and the fallback decision.
//!
//! Each transaction's deadline is its start (consume time of the oldest message of its batch,
//! or its event time) plus the workload's budget. The stages ask "would this transaction's
//! answer still be delivered in time?" using the recently observed cost of the work left
//! ([`StageCosts`], a moving average per stage). Shedding, cheapest loss first:
//!
//! 1. drift statistics: a batch with any fallback is not fed to the drift monitor (which also
//!    skips batches whenever it is behind);
//! 2. a batch whose every transaction would be late skips the feature stage (lookups,
//!    velocity updates, SQL) or scoring, and all its transactions get the fallback;
//! 3. at decision time, each transaction whose budget would run out before delivery gets the
//!    fallback instead of a late model answer;
//! 4. the source pauses its partitions while too many batches are in flight (see
//!    `source::kafka`), so overload queues in Kafka, not in memory.
//!
//! A fallback is computed from the input message alone (no store, no model): for fraud a
//! rule on the amount, for pricing the base price. A skipped feature stage also skips the
//! batch's velocity updates, so later velocity counts can undercount by the shed ones.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{
    Array, AsArray, Float32Array, Float64Array, Int64Array, ListBuilder, RecordBatch, StringArray,
    StringBuilder,
};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Float64Type, Int64Type};
use verdict_schemas::{decision_arrow_schema, Outcome};

use crate::config::{BudgetStart, DeadlineConfig, FallbackConfig};
use crate::source::InputBatch;
use crate::workload::now_ms;
use crate::PipelineError;

/// The `fallback` value of a decision given because the budget would have run out.
pub const FALLBACK_DEADLINE: &str = "deadline";

/// Recent per-batch cost of each stage, in µs (exponential moving average, weight 1/8).
#[derive(Debug, Default)]
pub struct StageCosts {
    features_us: AtomicU64,
    score_us: AtomicU64,
    deliver_us: AtomicU64,
}

/// Where in the pipeline a deadline is checked: what work is still ahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ahead {
    /// Lookups, SQL, scoring, delivery.
    Features,
    /// Scoring, delivery.
    Score,
    /// Delivery only.
    Deliver,
}

impl StageCosts {
    /// Records one batch's observed stage times.
    pub fn observe(&self, features: Duration, score: Duration, deliver: Duration) {
        fn update(slot: &AtomicU64, sample: Duration) {
            let sample = sample.as_micros() as u64;
            let old = slot.load(Ordering::Relaxed);
            let new = if old == 0 {
                sample
            } else {
                // Integer EWMA, rounded up so a steady cost is not underestimated.
                (old * 7 + sample).div_ceil(8)
            };
            slot.store(new, Ordering::Relaxed);
        }
        update(&self.features_us, features);
        update(&self.score_us, score);
        update(&self.deliver_us, deliver);
    }

    /// Predicted time (ms, rounded up) until a decision made now would be delivered, from
    /// the given point.
    pub fn remaining_ms(&self, from: Ahead) -> i64 {
        let f = self.features_us.load(Ordering::Relaxed);
        let s = self.score_us.load(Ordering::Relaxed);
        let d = self.deliver_us.load(Ordering::Relaxed);
        let us = match from {
            Ahead::Features => f + s + d,
            Ahead::Score => s + d,
            Ahead::Deliver => d,
        };
        us.div_ceil(1000) as i64
    }
}

/// A workload's budget and fallback, ready to apply to batches.
pub struct Deadline {
    budget_ms: i64,
    measured_from: BudgetStart,
    event_time_column: String,
    fallback: Fallback,
    pub costs: Arc<StageCosts>,
}

enum Fallback {
    FraudRule {
        id_column: String,
        amount_column: String,
        approve_up_to: f64,
        otherwise: Outcome,
    },
    BasePrice {
        id_column: String,
        base_price_column: String,
        currency_column: Option<String>,
    },
}

impl Deadline {
    /// The latency budget of each transaction.
    pub fn budget(&self) -> Duration {
        Duration::from_millis(self.budget_ms.max(0) as u64)
    }

    /// Checks the configured columns against the input schema.
    pub fn new(
        config: &DeadlineConfig,
        input_schema: &arrow::datatypes::Schema,
    ) -> Result<Self, PipelineError> {
        let need = |column: &str, numeric: bool| -> Result<(), PipelineError> {
            let field = input_schema.field_with_name(column).map_err(|_| {
                PipelineError::Config(format!("deadline: the input has no column `{column}`"))
            })?;
            let ok = if numeric {
                field.data_type().is_numeric()
            } else {
                field.data_type() == &DataType::Utf8
            };
            if ok {
                Ok(())
            } else {
                Err(PipelineError::Config(format!(
                    "deadline: column `{column}` is {}",
                    field.data_type()
                )))
            }
        };
        need(&config.event_time_column, true)?;
        let fallback = match &config.fallback {
            FallbackConfig::FraudRule {
                id_column,
                amount_column,
                approve_up_to,
                otherwise,
            } => {
                need(id_column, false)?;
                need(amount_column, true)?;
                Fallback::FraudRule {
                    id_column: id_column.clone(),
                    amount_column: amount_column.clone(),
                    approve_up_to: *approve_up_to,
                    otherwise: Outcome::parse(otherwise).ok_or_else(|| {
                        PipelineError::Config(format!("deadline: unknown outcome `{otherwise}`"))
                    })?,
                }
            }
            FallbackConfig::BasePrice {
                id_column,
                base_price_column,
                currency_column,
            } => {
                need(id_column, false)?;
                need(base_price_column, true)?;
                if let Some(c) = currency_column {
                    need(c, false)?;
                }
                Fallback::BasePrice {
                    id_column: id_column.clone(),
                    base_price_column: base_price_column.clone(),
                    currency_column: currency_column.clone(),
                }
            }
        };
        Ok(Self {
            budget_ms: config.budget.as_millis() as i64,
            measured_from: config.measured_from,
            event_time_column: config.event_time_column.clone(),
            fallback,
            costs: Arc::new(StageCosts::default()),
        })
    }

    /// Each decoded row's deadline, in ms since the epoch.
    pub fn deadlines_ms(&self, batch: &InputBatch) -> Vec<i64> {
        let rows = batch.decoded.batch.num_rows();
        match self.measured_from {
            BudgetStart::Consume => {
                let opened_ms = now_ms() - batch.opened_at.elapsed().as_millis() as i64;
                vec![opened_ms + self.budget_ms; rows]
            }
            BudgetStart::EventTime => {
                let times = batch
                    .decoded
                    .batch
                    .column_by_name(&self.event_time_column)
                    .and_then(|c| cast(c, &DataType::Int64).ok());
                match times {
                    Some(t) => {
                        let t = t.as_primitive::<Int64Type>();
                        (0..rows)
                            .map(|r| {
                                // No event time: the budget runs from consume.
                                if t.is_null(r) {
                                    now_ms() + self.budget_ms
                                } else {
                                    t.value(r).saturating_add(self.budget_ms)
                                }
                            })
                            .collect()
                    }
                    None => vec![now_ms() + self.budget_ms; rows],
                }
            }
        }
    }

    /// Which rows would miss their deadline if their answer needed the work `ahead`.
    pub fn late(&self, deadlines_ms: &[i64], ahead: Ahead) -> Vec<bool> {
        let done_ms = now_ms() + self.costs.remaining_ms(ahead);
        deadlines_ms.iter().map(|&d| done_ms > d).collect()
    }

    /// Fallback decisions for the given decoded rows, in the decisions batch schema.
    pub fn fallback_decisions(
        &self,
        batch: &InputBatch,
        rows: &[usize],
        decided_at_ms: i64,
    ) -> Result<(RecordBatch, Vec<Outcome>), PipelineError> {
        let input = &batch.decoded.batch;
        let err = |m: String| PipelineError::Decode(format!("fallback: {m}"));
        let column = |name: &str| {
            input
                .column_by_name(name)
                .ok_or_else(|| err(format!("no column `{name}`")))
        };
        let numbers = |name: &str| -> Result<Float64Array, PipelineError> {
            let c = cast(column(name)?, &DataType::Float64).map_err(|e| err(e.to_string()))?;
            Ok(c.as_primitive::<Float64Type>().clone())
        };
        let times = cast(column(&self.event_time_column)?, &DataType::Int64)
            .map_err(|e| err(e.to_string()))?;
        let times = times.as_primitive::<Int64Type>();
        let n = rows.len();
        let (id_column, outcomes, multipliers, prices, currencies) = match &self.fallback {
            Fallback::FraudRule {
                id_column,
                amount_column,
                approve_up_to,
                otherwise,
            } => {
                let amounts = numbers(amount_column)?;
                let outcomes: Vec<Outcome> = rows
                    .iter()
                    .map(|&r| {
                        if amounts.is_valid(r) && amounts.value(r) <= *approve_up_to {
                            Outcome::Approve
                        } else {
                            *otherwise
                        }
                    })
                    .collect();
                (
                    id_column,
                    outcomes,
                    Float64Array::new_null(n),
                    Float64Array::new_null(n),
                    StringArray::new_null(n),
                )
            }
            Fallback::BasePrice {
                id_column,
                base_price_column,
                currency_column,
            } => {
                let base = numbers(base_price_column)?;
                let currency = match currency_column {
                    Some(c) => Some(column(c)?.as_string::<i32>().clone()),
                    None => None,
                };
                (
                    id_column,
                    vec![Outcome::Priced; n],
                    Float64Array::from(vec![1.0; n]),
                    Float64Array::from_iter(rows.iter().map(|&r| {
                        base.is_valid(r)
                            .then(|| (base.value(r) * 100.0).round() / 100.0)
                            .filter(|p| p.is_finite())
                    })),
                    StringArray::from_iter(rows.iter().map(|&r| {
                        currency
                            .as_ref()
                            .filter(|c| c.is_valid(r))
                            .map(|c| c.value(r).to_string())
                    })),
                )
            }
        };
        let ids = column(id_column)?.as_string::<i32>();
        let mut empty = ListBuilder::new(StringBuilder::new());
        let mut empty2 = ListBuilder::new(StringBuilder::new());
        for _ in 0..n {
            empty.append_value(std::iter::empty::<Option<&str>>());
            empty2.append_value(std::iter::empty::<Option<&str>>());
        }
        let schema = decision_arrow_schema();
        let features_type = schema
            .field_with_name("features")
            .map_err(|e| err(e.to_string()))?
            .data_type()
            .clone();
        let features = arrow::array::new_null_array(&features_type, n);
        let decisions = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from_iter_values(
                    rows.iter().map(|&r| ids.value(r)),
                )),
                Arc::new(StringArray::from_iter_values(
                    outcomes.iter().map(|o| o.as_str()),
                )),
                Arc::new(Float32Array::new_null(n)),
                Arc::new(Int64Array::from_iter_values(rows.iter().map(|&r| {
                    if times.is_null(r) {
                        0
                    } else {
                        times.value(r)
                    }
                }))),
                Arc::new(Int64Array::from_value(decided_at_ms, n)),
                Arc::new(empty.finish()),
                Arc::new(empty2.finish()),
                Arc::new(multipliers),
                Arc::new(prices),
                Arc::new(currencies),
                Arc::new(StringArray::new_null(n)),
                Arc::new(StringArray::from(vec![FALLBACK_DEADLINE; n])),
                features,
            ],
        )
        .map_err(|e| err(e.to_string()))?;
        Ok((decisions, outcomes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn costs_average_and_sum_what_is_ahead() {
        let c = StageCosts::default();
        assert_eq!(c.remaining_ms(Ahead::Features), 0);
        c.observe(
            Duration::from_millis(4),
            Duration::from_millis(2),
            Duration::from_millis(1),
        );
        assert_eq!(c.remaining_ms(Ahead::Features), 7);
        assert_eq!(c.remaining_ms(Ahead::Score), 3);
        assert_eq!(c.remaining_ms(Ahead::Deliver), 1);
        // One slow batch moves the estimate by an eighth of the difference.
        c.observe(
            Duration::from_millis(12),
            Duration::from_millis(2),
            Duration::from_millis(1),
        );
        assert_eq!(c.remaining_ms(Ahead::Features), 8);
    }
}

//! What encoding a batch of decisions costs, per record.
//!
//! `cargo run --release -p verdict-sinks --example encode_cost`
//!
//! Builds fraud-like decisions batches (transaction ids of 20 characters, mostly approvals
//! with a score, one review in fifty with a reason code, no imputed features, no feature
//! values — the example config's defaults) and times [`DecisionEncoder::encode`] over many
//! batches: a different batch each iteration, alternating through a pool so the encoder does
//! not see the same bytes twice in a row. Prints the median and p90 per record for several
//! batch sizes. Compare builds by running it on each, alternately.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{
    Float32Array, Float32Builder, Float64Array, Int64Array, ListBuilder, RecordBatch, StringArray,
    StringBuilder,
};
use verdict_schemas::decision_arrow_schema;
use verdict_sinks::DecisionEncoder;

const ITERATIONS: usize = 2_000;
const POOL: usize = 16;

fn batch(rows: usize, first_id: usize) -> RecordBatch {
    let ids: Vec<String> = (first_id..first_id + rows)
        .map(|i| format!("tx-{i:010}-a1b2c3"))
        .collect();
    let reviewed = |i: usize| (first_id + i).is_multiple_of(50);
    let mut imputed = ListBuilder::new(StringBuilder::new());
    let mut reasons = ListBuilder::new(StringBuilder::new());
    let mut features = ListBuilder::new(Float32Builder::new());
    for i in 0..rows {
        imputed.append_value(Vec::<Option<&str>>::new());
        if reviewed(i) {
            reasons.append_value([Some("amount:high")]);
        } else {
            reasons.append_value(Vec::<Option<&str>>::new());
        }
        features.append_null();
    }
    let nulls = || Arc::new(StringArray::from(vec![None::<&str>; rows]));
    RecordBatch::try_new(
        decision_arrow_schema(),
        vec![
            Arc::new(StringArray::from(ids)),
            Arc::new(StringArray::from_iter_values((0..rows).map(|i| {
                if reviewed(i) {
                    "review"
                } else {
                    "approve"
                }
            }))),
            Arc::new(Float32Array::from_iter_values(
                (0..rows).map(|i| ((first_id + i) % 997) as f32 / 997.0),
            )),
            Arc::new(Int64Array::from_iter_values(
                (0..rows).map(|i| 1_764_000_000_000 + (first_id + i) as i64),
            )),
            Arc::new(Int64Array::from_iter_values(
                (0..rows).map(|i| 1_764_000_000_020 + (first_id + i) as i64),
            )),
            Arc::new(imputed.finish()),
            Arc::new(reasons.finish()),
            Arc::new(Float64Array::from(vec![None; rows])),
            Arc::new(Float64Array::from(vec![None; rows])),
            nulls(),
            nulls(),
            nulls(),
            Arc::new(features.finish()),
        ],
    )
    .expect("the batch fits the decisions schema")
}

fn main() -> anyhow::Result<()> {
    let encoder = DecisionEncoder::new(
        "fraud.decisions".into(),
        "fraud".into(),
        "fraud-mlp".into(),
        "1.0.0".into(),
        Vec::new(),
    );
    println!("batch rows | ns per record, p50 / p90 | bytes per record");
    for rows in [64usize, 144, 512] {
        let pool: Vec<RecordBatch> = (0..POOL).map(|b| batch(rows, b * rows)).collect();
        let mut samples = Vec::with_capacity(ITERATIONS);
        let mut bytes = 0;
        for i in 0..ITERATIONS {
            let started = Instant::now();
            let records = encoder.encode(&pool[i % POOL])?;
            samples.push(started.elapsed());
            bytes = records.iter().map(|r| r.payload.len()).sum::<usize>() / rows;
        }
        samples.sort();
        let per_record = |q: f64| {
            let at: Duration = samples[((samples.len() - 1) as f64 * q) as usize];
            at.as_secs_f64() * 1e9 / rows as f64
        };
        println!(
            "{rows:>10} | {:>6.0} / {:>6.0} | {bytes}",
            per_record(0.5),
            per_record(0.9)
        );
    }
    Ok(())
}

//! What the workload SQL costs per batch, planned per batch versus planned once.
//!
//! `cargo run --release --example join_cost`
//!
//! Both sides run the example fraud workload's statement over the same decoded batches and
//! lookup tables (card + merchant, two LEFT JOINs and derived columns):
//! - per batch: register the batch's tables as `MemTable`s and `ctx.sql(..).collect()`, the
//!   straightforward way;
//! - planned once, hash joins: [`verdict_features::SqlJoin::run_with_hash_joins`], the physical
//!   plan built once and re-executed with its leaves bound to each batch, joins as DataFusion
//!   plans them (a hash table per join per batch);
//! - planned once, row-aligned: [`verdict_features::SqlJoin::run`], the same plan with its
//!   `row_id` joins replaced by side-by-side columns (what the pipeline does).
//!
//! The two planned-once paths alternate batch by batch, so a noisy machine slows both alike;
//! their outputs are compared on every batch. Prints the median and p90 per batch for several
//! batch sizes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::datasource::MemTable;
use datafusion::prelude::SessionContext;
use verdict::config::{example_config_dir, Config, EXAMPLE_CONFIG};
use verdict::generator::World;
use verdict::source::JsonBatchDecoder;
use verdict_features::{InMemoryFeatureStore, Lookups, SqlJoin};
use verdict_schemas::{arrow_schema_from_json_schema, builtin_input_schema};

const ITERATIONS: usize = 300;

fn quantiles(mut samples: Vec<Duration>) -> (f64, f64) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e6;
    (at(0.5), at(0.9))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse(EXAMPLE_CONFIG, &example_config_dir())?;
    let workload = &config.workloads[0];
    let schema = arrow_schema_from_json_schema(
        &workload.input_schema,
        builtin_input_schema(&workload.input_schema)?,
    )?;

    let world = World::generate(1, 5_000, 500);
    let store = InMemoryFeatureStore::new();
    for c in &world.cards {
        store.insert(
            &format!("card:{}", c.id),
            &[
                ("avg_amount_30d", &c.avg_amount_30d.to_string()),
                ("tx_count_30d", &c.tx_count_30d.to_string()),
                ("chargeback_count_90d", &c.chargeback_count_90d.to_string()),
                ("card_age_days", &c.card_age_days.to_string()),
                ("home_country", c.home_country),
            ],
        );
    }
    for m in &world.merchants {
        store.insert(
            &format!("merchant:{}", m.id),
            &[
                ("fraud_rate_90d", &m.fraud_rate_90d.to_string()),
                ("risk_score", &m.risk_score.to_string()),
            ],
        );
    }
    let lookups = Lookups::new(workload.lookups.clone(), workload.velocity.clone())?;
    let lookup_schemas = lookups.table_schemas();

    println!(
        "batch rows | plan + collect per batch (p50 / p90) | planned once, hash joins (p50 / p90) | planned once, row-aligned (p50 / p90) | hash / aligned p50"
    );
    for rows in [1usize, 16, 64, 144, 512] {
        let mut decoder = JsonBatchDecoder::new(schema.clone(), rows)?;
        let mut stream = world.transactions(rows as u64, "join", 0.03);
        // A different batch each iteration: a plan that kept state would show stale rows.
        let mut batches = Vec::new();
        for _ in 0..16 {
            let payloads: Vec<Vec<u8>> = (0..rows)
                .map(|i| serde_json::to_vec(&stream.next_at(1_700_000_000_000 + i as i64)))
                .collect::<Result<_, _>>()?;
            let refs: Vec<Option<&[u8]>> = payloads.iter().map(|p| Some(p.as_slice())).collect();
            let input = decoder.decode(&refs)?.batch;
            let (tables, _) = lookups.fetch(&store, &input).await?;
            let mut all = vec![input];
            all.extend(tables);
            batches.push(all);
        }

        let mut per_batch = Vec::with_capacity(ITERATIONS);
        for i in 0..ITERATIONS {
            let tables = &batches[i % batches.len()];
            let started = Instant::now();
            let ctx = SessionContext::new();
            ctx.register_table(
                "input",
                Arc::new(MemTable::try_new(
                    tables[0].schema(),
                    vec![vec![tables[0].clone()]],
                )?),
            )?;
            for ((name, schema), table) in lookup_schemas.iter().zip(&tables[1..]) {
                ctx.register_table(
                    name.as_str(),
                    Arc::new(MemTable::try_new(
                        schema.clone(),
                        vec![vec![table.clone()]],
                    )?),
                )?;
            }
            let out = ctx.sql(&workload.sql).await?.collect().await?;
            per_batch.push(started.elapsed());
            assert_eq!(out.iter().map(|b| b.num_rows()).sum::<usize>(), rows);
        }

        let join = SqlJoin::plan(&workload.sql, batches[0][0].schema(), &lookup_schemas).await?;
        anyhow::ensure!(
            join.has_row_aligned_joins(),
            "the example statement's joins were expected to be row-aligned"
        );
        let mut hashed = Vec::with_capacity(ITERATIONS);
        let mut aligned = Vec::with_capacity(ITERATIONS);
        for i in 0..ITERATIONS {
            let tables = &batches[i % batches.len()];
            let mut outputs = Vec::with_capacity(2);
            for hash_first in [i % 2 == 0, i % 2 != 0] {
                let started = Instant::now();
                let out = if hash_first {
                    join.run_with_hash_joins(tables).await?
                } else {
                    join.run(tables).await?
                };
                let took = started.elapsed();
                if hash_first {
                    hashed.push(took);
                } else {
                    aligned.push(took);
                }
                outputs.push(out);
            }
            assert_eq!(outputs[0].num_rows(), rows);
            anyhow::ensure!(outputs[0] == outputs[1], "the two plans' outputs differ");
        }
        let (a50, a90) = quantiles(per_batch);
        let (h50, h90) = quantiles(hashed);
        let (r50, r90) = quantiles(aligned);
        println!(
            "{rows:>10} | {a50:>10.0} µs / {a90:>6.0} µs             | {h50:>10.0} µs / {h90:>6.0} µs              | {r50:>10.0} µs / {r90:>6.0} µs               | {:.2}×",
            h50 / r50
        );
    }
    Ok(())
}

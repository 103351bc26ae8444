//! `verdict features load`: bulk-load entity features into Redis from a CSV file, in the
//! layout the lookups read (`HSET <key-prefix><key> <field> <value> …`).
//!
//! The first row names the columns; one column is the entity key, every other column becomes
//! a hash field. Empty cells are skipped (the field stays absent, so the lookup yields null
//! and the model's default applies). Writes are pipelined, 1000 entities per round trip.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

#[derive(Args)]
pub struct LoadArgs {
    /// Redis URL, e.g. `redis://127.0.0.1:6379`.
    #[arg(long)]
    pub redis_url: String,
    /// CSV file with a header row.
    #[arg(long)]
    pub file: PathBuf,
    /// Column holding the entity key.
    #[arg(long, default_value = "id")]
    pub key_column: String,
    /// Prefix of the Redis keys, e.g. `card:` (as in the workload's lookup).
    #[arg(long)]
    pub key_prefix: String,
}

pub async fn run(args: LoadArgs) -> anyhow::Result<()> {
    let mut reader = csv::Reader::from_path(&args.file)
        .with_context(|| format!("opening {}", args.file.display()))?;
    let headers = reader.headers()?.clone();
    let key_index = headers
        .iter()
        .position(|h| h == args.key_column)
        .with_context(|| {
            format!(
                "{} has no column `{}` (columns: {})",
                args.file.display(),
                args.key_column,
                headers.iter().collect::<Vec<_>>().join(", ")
            )
        })?;
    let client = redis::Client::open(args.redis_url.as_str())?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .context("connecting to Redis")?;
    let mut pipe = redis::pipe();
    let (mut pending, mut loaded) = (0usize, 0usize);
    for (line, record) in reader.records().enumerate() {
        let record = record.with_context(|| format!("{} row {}", args.file.display(), line + 2))?;
        let key = record.get(key_index).unwrap_or_default();
        anyhow::ensure!(
            !key.is_empty(),
            "{} row {}: empty `{}`",
            args.file.display(),
            line + 2,
            args.key_column
        );
        let fields: Vec<(&str, &str)> = headers
            .iter()
            .zip(record.iter())
            .enumerate()
            .filter(|(i, (_, v))| *i != key_index && !v.is_empty())
            .map(|(_, pair)| pair)
            .collect();
        if fields.is_empty() {
            continue;
        }
        pipe.hset_multiple(format!("{}{key}", args.key_prefix), &fields)
            .ignore();
        pending += 1;
        if pending == 1000 {
            pipe.query_async::<()>(&mut conn).await?;
            pipe = redis::pipe();
            loaded += pending;
            pending = 0;
        }
    }
    if pending > 0 {
        pipe.query_async::<()>(&mut conn).await?;
        loaded += pending;
    }
    println!(
        "loaded {loaded} entities from {} as `{}<{}>`",
        args.file.display(),
        args.key_prefix,
        args.key_column
    );
    Ok(())
}

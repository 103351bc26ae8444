//! `verdict gen`: synthetic traffic and data for both reference workloads.
//!
//! - `gen topic`: produce transactions or quote requests to a topic at a given rate;
//! - `gen entities`: write the entity features (cards, merchants, zones) as CSV files for
//!   `verdict features load`;
//! - `gen dataset`: compute a labelled training set by running the workload's own feature
//!   stage (lookups, velocity, SQL) over generated traffic, in memory. Training on what the
//!   pipeline computes, not on a re-implementation of it, is what keeps training and serving
//!   features identical.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use arrow::array::{Array, AsArray};
use arrow::datatypes::{DataType, Float64Type};
use arrow::record_batch::RecordBatch;
use clap::{Args, Subcommand};
use rdkafka::config::ClientConfig;
use rdkafka::producer::{DefaultProducerContext, Producer, ThreadedProducer};
use verdict_features::InMemoryFeatureStore;

use crate::config::Config;
use crate::generator::{load_hashes_into_memory, Kind, Synthetic};
use crate::source::DEFAULT_MAX_MESSAGE_BYTES;
use crate::workload::{now_ms, FeatureStage};

#[derive(Subcommand)]
pub enum GenCommand {
    /// Produce synthetic messages to a Kafka topic, keyed by their id.
    Topic(TopicArgs),
    /// Write entity features as CSV (one file per entity type) for `verdict features load`.
    Entities(EntitiesArgs),
    /// Compute a labelled training set with the workload's own feature stage.
    Dataset(DatasetArgs),
}

#[derive(Args)]
pub struct TopicArgs {
    #[arg(long, value_enum)]
    pub kind: Kind,
    /// `bootstrap.servers`.
    #[arg(long)]
    pub brokers: String,
    #[arg(long)]
    pub topic: String,
    /// Messages per second (0: as fast as the producer takes them).
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    #[arg(long, default_value_t = 10_000)]
    pub count: usize,
    /// Seed of the world; use the same one as `gen entities` so keys have features.
    #[arg(long, default_value_t = 42)]
    pub world_seed: u64,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

#[derive(Args)]
pub struct EntitiesArgs {
    #[arg(long, value_enum)]
    pub kind: Kind,
    #[arg(long, default_value_t = 42)]
    pub world_seed: u64,
    /// Folder for `<entity>.csv` files.
    #[arg(long)]
    pub out_dir: PathBuf,
}

#[derive(Args)]
pub struct DatasetArgs {
    #[arg(long, value_enum)]
    pub kind: Kind,
    /// Config holding the workload whose feature stage computes the columns.
    #[arg(long)]
    pub config: PathBuf,
    #[arg(long)]
    pub workload: String,
    #[arg(long, default_value_t = 200_000)]
    pub count: usize,
    /// Simulated arrivals per second of event time (spreads the set over hours and days,
    /// so the velocity windows see realistic gaps).
    #[arg(long, default_value_t = 1.5)]
    pub events_per_second: f64,
    #[arg(long, default_value_t = 42)]
    pub world_seed: u64,
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// CSV output: every numeric or boolean column the SQL produces, then `label`.
    #[arg(long)]
    pub out: PathBuf,
}

pub async fn run(command: GenCommand) -> anyhow::Result<()> {
    match command {
        GenCommand::Topic(args) => {
            tokio::task::spawn_blocking(move || produce_synthetic(&args)).await?
        }
        GenCommand::Entities(args) => entities(args),
        GenCommand::Dataset(args) => dataset(args).await,
    }
}

/// Produces `args.count` synthetic messages at `args.rate` (blocking).
pub fn produce_synthetic(args: &TopicArgs) -> anyhow::Result<()> {
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", &args.brokers)
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .context("creating the producer")?;
    let world = Synthetic::generate(args.kind, args.world_seed);
    let mut stream = world.stream(args.seed, &format!("gen-{}", now_ms()));
    let interval = (args.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / args.rate));
    let started = Instant::now();
    for i in 0..args.count {
        if let Some(interval) = interval {
            let due = started + interval.mul_f64(i as f64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        let message = stream(now_ms());
        crate::driver::send(
            &producer,
            &args.topic,
            message.id.as_bytes(),
            &message.payload,
        )?;
    }
    producer.flush(Duration::from_secs(30))?;
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "produced {} messages to `{}` in {elapsed:.1} s ({:.0}/s)",
        args.count,
        args.topic,
        args.count as f64 / elapsed.max(1e-9)
    );
    Ok(())
}

fn entities(args: EntitiesArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.out_dir)?;
    let world = Synthetic::generate(args.kind, args.world_seed);
    // One file per key prefix (`card:`, `merchant:`, `zone:`), columns `id` then the fields.
    let mut files: Vec<(String, std::io::BufWriter<std::fs::File>)> = Vec::new();
    for (key, fields) in world.entity_hashes() {
        let (entity, id) = key.split_once(':').unwrap_or(("entity", &key));
        if files.last().map(|(e, _)| e.as_str()) != Some(entity) {
            let path = args.out_dir.join(format!("{entity}.csv"));
            let mut file = std::io::BufWriter::new(std::fs::File::create(&path)?);
            let header: Vec<&str> = fields.iter().map(|(f, _)| *f).collect();
            writeln!(file, "id,{}", header.join(","))?;
            println!("writing {}", path.display());
            files.push((entity.to_string(), file));
        }
        let values: Vec<&str> = fields.iter().map(|(_, v)| v.as_str()).collect();
        if let Some((_, file)) = files.last_mut() {
            writeln!(file, "{id},{}", values.join(","))?;
        }
    }
    for (_, mut file) in files {
        file.flush()?;
    }
    Ok(())
}

async fn dataset(args: DatasetArgs) -> anyhow::Result<()> {
    let config = Config::load(&args.config)?;
    let workload = config
        .workloads
        .iter()
        .find(|w| w.name == args.workload)
        .with_context(|| {
            format!(
                "no workload `{}` in {}",
                args.workload,
                args.config.display()
            )
        })?;
    let stage = FeatureStage::build(workload).await?;
    let world = Synthetic::generate(args.kind, args.world_seed);
    let store = InMemoryFeatureStore::new();
    load_hashes_into_memory(&store, &world.entity_hashes());
    let mut stream = world.stream(args.seed, "train");
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(&args.out).with_context(|| args.out.display().to_string())?,
    );

    const BATCH: usize = 512;
    let start_ms: i64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z
    let step_ms = 1000.0 / args.events_per_second;
    let mut decoder = stage.decoder(BATCH, DEFAULT_MAX_MESSAGE_BYTES)?;
    let mut written = 0usize;
    let mut header_done = false;
    while written < args.count {
        let n = BATCH.min(args.count - written);
        let mut labels = Vec::with_capacity(n);
        let payloads: Vec<Vec<u8>> = (0..n)
            .map(|i| {
                let t = start_ms + ((written + i) as f64 * step_ms) as i64;
                let m = stream(t);
                labels.push(m.label);
                m.payload
            })
            .collect();
        let payloads: Vec<Option<&[u8]>> = payloads.iter().map(|p| Some(p.as_slice())).collect();
        let decoded = decoder.decode(&payloads)?;
        anyhow::ensure!(
            decoded.rejected.is_empty(),
            "generated messages were rejected: {:?}",
            decoded.rejected.first().map(|r| &r.detail)
        );
        let (features, _) = stage.compute(&store, &decoded.batch).await?;
        if !header_done {
            write_header(&mut out, &features)?;
            header_done = true;
        }
        write_rows(&mut out, &features, &labels)?;
        written += n;
    }
    out.flush()?;
    println!("wrote {written} rows to {}", args.out.display());
    Ok(())
}

fn csv_columns(batch: &RecordBatch) -> Vec<usize> {
    batch
        .schema()
        .fields()
        .iter()
        .enumerate()
        .filter(|(_, f)| {
            f.name() != verdict_schemas::columns::ROW_ID
                && (f.data_type().is_numeric() || f.data_type() == &DataType::Boolean)
        })
        .map(|(i, _)| i)
        .collect()
}

fn write_header(out: &mut impl Write, batch: &RecordBatch) -> anyhow::Result<()> {
    let schema = batch.schema();
    let names: Vec<&str> = csv_columns(batch)
        .into_iter()
        .map(|i| schema.field(i).name().as_str())
        .collect();
    writeln!(out, "{},label", names.join(","))?;
    Ok(())
}

/// Nulls are empty fields: the training script imputes them with the model's defaults, as
/// the scorer does.
fn write_rows(out: &mut impl Write, batch: &RecordBatch, labels: &[f64]) -> anyhow::Result<()> {
    let columns: Vec<_> = csv_columns(batch)
        .into_iter()
        .map(|i| arrow::compute::cast(batch.column(i), &DataType::Float64))
        .collect::<Result<_, _>>()?;
    for (row, label) in labels.iter().enumerate().take(batch.num_rows()) {
        for column in &columns {
            let values = column.as_primitive::<Float64Type>();
            if values.is_null(row) {
                write!(out, ",")?;
            } else {
                write!(out, "{},", values.value(row))?;
            }
        }
        writeln!(out, "{label}")?;
    }
    Ok(())
}

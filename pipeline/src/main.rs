//! The `verdict` command line.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::signal::unix::{signal, SignalKind};
use tracing_subscriber::EnvFilter;
use verdict::{bench, demo, feature_load, gen, Config, Pipeline};

#[derive(Parser)]
#[command(
    name = "verdict",
    version,
    about = "Streaming real-time scoring: Kafka → Arrow → Redis + DataFusion → ONNX Runtime → Kafka"
)]
struct Cli {
    /// Log format: `text` for terminals, `json` for log collectors.
    #[arg(long, global = true, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the workloads of a config until SIGTERM/SIGINT.
    Run {
        #[arg(long)]
        config: PathBuf,
    },
    /// Start a local broker and Redis, run the example fraud workload on generated
    /// transactions, and show the decisions flowing and a summary.
    Demo(demo::DemoArgs),
    /// Measure throughput and produce → decision latency.
    Bench(bench::BenchArgs),
    /// Synthetic traffic, entity features and training sets for the reference workloads.
    #[command(subcommand)]
    Gen(gen::GenCommand),
    /// Manage entity features in Redis.
    #[command(subcommand)]
    Features(FeaturesCommand),
}

#[derive(Subcommand)]
enum FeaturesCommand {
    /// Bulk-load entity features from a CSV file into Redis hashes.
    Load(feature_load::LoadArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // RUST_LOG wins; otherwise info for verdict, warnings for the rest.
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn,verdict=info"));
    // Colours only on a terminal: log files and collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi);
    match cli.log_format {
        LogFormat::Text => subscriber.init(),
        LogFormat::Json => subscriber.json().init(),
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        match cli.command {
            Command::Run { config } => run(config).await,
            Command::Demo(args) => demo::run(args).await,
            Command::Bench(args) => bench::run(args).await,
            Command::Gen(command) => gen::run(command).await,
            Command::Features(FeaturesCommand::Load(args)) => feature_load::run(args).await,
        }
    })
}

async fn run(path: PathBuf) -> anyhow::Result<()> {
    let config = Config::load(&path)?;
    // Listen before starting anything: a SIGTERM that arrives while models load and the
    // consumer joins must still mean "stop cleanly", not the default "die at once".
    let mut terminate = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
    let pipeline = Pipeline::start(&config).await?;
    let stop = pipeline.shutdown_flag();
    tokio::spawn(async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
        tracing::info!("signal received: draining in-flight batches and committing");
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    let reports = pipeline.wait().await?;
    for r in reports {
        tracing::info!(
            workload = %r.name,
            decisions = r.decisions,
            dead_letters = r.dead_letters,
            "stopped"
        );
    }
    Ok(())
}

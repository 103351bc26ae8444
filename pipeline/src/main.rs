//! The `verdict` command line.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::signal::unix::{signal, SignalKind};
use tracing_subscriber::EnvFilter;
use verdict::config::{LogConfig, LogFormat};
use verdict::{bench, demo, feature_load, gen, Config, Pipeline};

#[derive(Parser)]
#[command(
    name = "verdict",
    version,
    about = "Streaming real-time scoring: Kafka → Arrow → Redis + DataFusion → ONNX Runtime → Kafka"
)]
struct Cli {
    /// Log format: `text` for terminals, `json` for log collectors. Overrides the config's
    /// `[log] format`.
    #[arg(long, global = true)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Command,
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
    tune_allocator();
    let cli = Cli::parse();
    // `demo` and `bench` start servers and measured processes as children; stopped by a
    // signal, they take them down too. `run` starts none and drains on SIGTERM instead.
    if matches!(cli.command, Command::Demo(_) | Command::Bench(_)) {
        verdict::children::kill_children_on_signal();
    }
    // `run` reads its config before logging starts, so `[log]` applies from the first line.
    let config = match &cli.command {
        Command::Run { config } => Some(Config::load(config)?),
        _ => None,
    };
    init_logging(
        config
            .as_ref()
            .map(|c| &c.log)
            .unwrap_or(&LogConfig::default()),
        cli.log_format,
    )?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        match cli.command {
            Command::Run { .. } => {
                let result = run(config.context("the config was not loaded")?).await;
                // Also as a log event, so a collector reading JSON logs sees why it stopped.
                if let Err(e) = &result {
                    tracing::error!(error = format!("{e:#}"), "verdict run failed");
                }
                result
            }
            Command::Demo(args) => demo::run(args).await,
            Command::Bench(args) => bench::run(args).await,
            Command::Gen(command) => gen::run(command).await,
            Command::Features(FeaturesCommand::Load(args)) => feature_load::run(args).await,
        }
    })
}

/// Turns off glibc's fastbins. They keep small freed chunks unmerged until a request of
/// 1 KiB or more makes malloc consolidate all of them; the pipeline frees hundreds of small
/// buffers per batch and then asks for kilobyte ones, so that sweep ran about once per batch
/// (2.5% of the process at 10,000 tx/s in a profile). Small chunks still come from glibc's
/// per-thread cache. Measured with `pipeline/bench/ab.sh` (`GLIBC_TUNABLES=
/// glibc.malloc.mxfast=0`, the same setting): lower CPU per decision in 7 of 8 pairs, about 3%.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; it runs before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MXFAST, 0);
    }
}

/// `RUST_LOG` wins over `[log] level`; `--log-format` wins over `[log] format`.
fn init_logging(log: &LogConfig, format_flag: Option<LogFormat>) -> anyhow::Result<()> {
    let filter = match EnvFilter::try_from_default_env() {
        Ok(filter) => filter,
        Err(_) => EnvFilter::try_new(&log.level)
            .with_context(|| format!("[log] level `{}`", log.level))?,
    };
    // Colours only on a terminal: log files and collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi);
    match format_flag.unwrap_or(log.format) {
        LogFormat::Text => subscriber.init(),
        LogFormat::Json => subscriber.json().flatten_event(true).init(),
    }
    Ok(())
}

async fn run(config: Config) -> anyhow::Result<()> {
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

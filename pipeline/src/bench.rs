//! `verdict bench`: throughput and produce → decision latency of the fraud workload.
//!
//! By default it is self-contained like the demo (local Tansu + Redis, pipeline in-process);
//! with `--brokers` it only drives an already running pipeline that uses the example
//! config's topics. Latency is measured from just before each produce call to the decision's
//! arrival at an independent consumer. Results are printed and, with `--out`, written as JSON.
//!
//! In self-contained mode the process CPU time it prints includes the load generator and the
//! measuring consumer, so CPU per decision is an upper bound for the pipeline alone.
//! `--rates` / `--find-max-rate` (open_loop.rs) and `--processes` (scale_out.rs) run the
//! pipeline as separate processes and bill it alone; `--baseline python` compares it with
//! the Python stack (baseline.rs, or open_loop.rs with `--rates`).

use std::time::Duration;

use anyhow::Context;
use serde_json::json;

use crate::demo::{local_setup, print_summary, EXAMPLE_TOPICS};
use crate::driver::{drive, percentiles_ms, DriveSpec};
use crate::generator::World;
use crate::Pipeline;

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Transactions to produce.
    #[arg(long, default_value_t = 100_000)]
    pub count: usize,
    /// Offered rate (tx/s); omit to produce as fast as possible (throughput run).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Override the workload's batch.max-rows.
    #[arg(long)]
    pub max_rows: Option<usize>,
    /// Override the workload's batch.mode (`fixed` or `adaptive`).
    #[arg(long, value_enum)]
    pub batch_mode: Option<crate::config::BatchMode>,
    /// Override the workload's batch.linger (e.g. `1ms`).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub linger: Option<Duration>,
    /// Drive an already running pipeline on these brokers instead of starting one.
    #[arg(long)]
    pub brokers: Option<String>,
    /// linger.ms of the load generator's producer. Each produce request costs the test broker
    /// (Tansu) a fixed amount of CPU: at 1 ms and 5,000 tx/s Tansu saturates a core on
    /// produce requests alone and the figures measure it, not verdict.
    #[arg(long, default_value_t = 5)]
    pub producer_linger_ms: u32,
    /// With `--rates` / `--find-max-rate`: `linger.ms` of the verdict process's own producer
    /// (decisions and dead letters) instead of its default (1). A longer linger means fewer,
    /// larger produce requests (less CPU on verdict's and the broker's side) for up to that
    /// much more latency per decision.
    #[arg(long)]
    pub verdict_producer_linger_ms: Option<u32>,
    /// With `--rates` / `--find-max-rate`: any other librdkafka property of the verdict
    /// process's producer, as `KEY=VALUE` (repeatable), e.g.
    /// `--verdict-producer-property enable.idempotence=true` to measure a setting against
    /// verdict's default in the same session.
    #[arg(long = "verdict-producer-property", value_name = "KEY=VALUE", value_parser = key_value)]
    pub verdict_producer_properties: Vec<(String, String)>,
    /// `fetch.wait.max.ms` of every consumer in the run: the pipeline's, the Python
    /// baseline's (with `--rates`) and the measuring consumer's. On Apache Kafka it only
    /// bounds how long an empty fetch waits. The test broker (Tansu 0.6) holds *every* fetch
    /// this long, data or not (tansu-storage's `FetchService` sleeps the rest of the wait
    /// after reading), so there it is a latency floor of each consumer hop, bought with one
    /// fetch round trip per wait of CPU on both sides.
    #[arg(long, default_value_t = 25)]
    pub fetch_wait_ms: u32,
    /// Transactions sent (at the same rate) and not measured before the measured run, so the
    /// figures are steady state: the first batches pay for offset lookups, connection set-up
    /// and ONNX Runtime's first run.
    #[arg(long, default_value_t = 1_000)]
    pub warmup: usize,
    /// Cards in the synthetic world. Velocity windows count per card, so the number of cards
    /// sets how busy each card looks: at the default, a 100k burst is ~0.5 payments per card,
    /// as real traffic spread over many cards is; a few thousand cards make every card look
    /// like a card-testing attack (and every velocity read scan tens of events).
    #[arg(long, default_value_t = 200_000)]
    pub cards: usize,
    /// Drift monitor: as the config says (default), `on`, `off`, or `compare` (the same load
    /// twice in one run, monitor off then on, with the difference printed).
    #[arg(long, value_enum)]
    pub drift: Option<DriftMode>,
    /// Scale-out: run these numbers of separate `verdict run` processes in one consumer
    /// group (e.g. `1,2,3`) and compare throughput and partition assignment.
    #[arg(long, value_delimiter = ',')]
    pub processes: Option<Vec<usize>>,
    /// Partitions of the input and decisions topics with `--processes` (the most processes
    /// that get work).
    #[arg(long, default_value_t = 6)]
    pub partitions: i32,
    /// Compare with a baseline in the same run: `python` drains the same backlog with
    /// verdict and with pipeline/bench/baseline.py (see `baseline.rs`), or with `--rates`
    /// / `--find-max-rate` drives both open loop (see `open_loop.rs`); either way it checks
    /// both decide alike and prints both systems' figures and the ratios.
    #[arg(long, value_enum)]
    pub baseline: Option<Baseline>,
    /// Open loop, each system a separate process on a fresh broker and Redis: one probe per
    /// offered rate (tx/s), `--count` transactions each, with `--baseline python` also the
    /// baseline at the same rates (see `open_loop.rs`).
    #[arg(long, value_delimiter = ',')]
    pub rates: Option<Vec<f64>>,
    /// Search each system's maximum sustainable rate (open loop, `--probe-seconds` of load
    /// per probe).
    #[arg(long)]
    pub find_max_rate: bool,
    /// With `--rates`: first measure one broker hop alone at each rate (load generator →
    /// broker → measuring consumer, no system in between), the latency floor under both
    /// systems, since a decision takes two such hops; also whether the hop alone keeps up,
    /// and the whole box's CPU per message it costs.
    #[arg(long)]
    pub broker_hop: bool,
    /// With `--rates`: only the broker hop (as `--broker-hop`), no system.
    #[arg(long, requires = "rates", conflicts_with_all = ["find_max_rate", "baseline"])]
    pub broker_hop_only: bool,
    /// Seconds of load per probe of the maximum-rate search.
    #[arg(long, default_value_t = 10.0)]
    pub probe_seconds: f64,
    /// Model directory for the fraud workload instead of the example's (e.g.
    /// scorers/models/fraud-gbt).
    #[arg(long)]
    pub model: Option<std::path::PathBuf>,
    /// Rounds of the baseline comparison; the table shows their medians.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Write the results as JSON to this file.
    #[arg(long)]
    pub out: Option<std::path::PathBuf>,
}

/// CPU seconds used so far by the calling thread (`libc::CLOCK_THREAD_CPUTIME_ID`) or this
/// process (`libc::CLOCK_PROCESS_CPUTIME_ID`), to the nanosecond, where /proc counts ticks.
pub fn cpu_clock_seconds(clock: libc::clockid_t) -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// CPU seconds (user + system) this process has used, from /proc.
pub fn process_cpu_seconds() -> Option<f64> {
    cpu_seconds_of("/proc/self/stat")
}

/// CPU seconds (user + system) from a `/proc/<pid>/stat` file.
pub fn cpu_seconds_of(stat_path: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(stat_path).ok()?;
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// Peak resident memory of this process, MiB.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// What verdict is compared with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Baseline {
    /// confluent-kafka + redis-py + numpy + onnxruntime, batched (pipeline/bench/baseline.py).
    Python,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DriftMode {
    On,
    Off,
    Compare,
}

/// What one measured run gave, for the drift comparison.
struct RunFigures {
    throughput: f64,
    p50_ms: f64,
    p99_ms: f64,
    cpu_us_per_decision: Option<f64>,
    drift_alerts: u64,
    drift_batches_skipped: u64,
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.rates.is_some() || args.find_max_rate {
        let rates = args.rates.clone().unwrap_or_default();
        return crate::open_loop::run(&args, &rates).await;
    }
    if let Some(counts) = &args.processes {
        return crate::scale_out::run(&args, counts).await;
    }
    if let Some(Baseline::Python) = args.baseline {
        return crate::baseline::run(&args, args.rounds.max(1)).await;
    }
    match args.drift {
        Some(DriftMode::Compare) => {
            let off = run_once(&args, Some(false), None).await?;
            println!();
            let on = run_once(&args, Some(true), args.out.as_deref()).await?;
            println!();
            println!("drift monitor off vs on (same load, same run)");
            for (label, f) in [("off", &off), ("on", &on)] {
                println!(
                    "  {label:3}  {:.0} decisions/s  p50 {:.2} ms  p99 {:.2} ms  CPU {} µs/decision  alerts {}  batches skipped by the monitor {}",
                    f.throughput,
                    f.p50_ms,
                    f.p99_ms,
                    f.cpu_us_per_decision.map(|c| format!("{c:.1}")).unwrap_or_else(|| "?".into()),
                    f.drift_alerts,
                    f.drift_batches_skipped,
                );
            }
            println!(
                "  on/off  throughput {:.3}×  p99 {:.3}×",
                on.throughput / off.throughput.max(1e-9),
                on.p99_ms / off.p99_ms.max(1e-9)
            );
            Ok(())
        }
        Some(DriftMode::On) => run_once(&args, Some(true), args.out.as_deref())
            .await
            .map(|_| ()),
        Some(DriftMode::Off) => run_once(&args, Some(false), args.out.as_deref())
            .await
            .map(|_| ()),
        None => run_once(&args, None, args.out.as_deref()).await.map(|_| ()),
    }
}

/// One measured run. `drift`: force the fraud workload's drift monitor on or off.
async fn run_once(
    args: &BenchArgs,
    drift: Option<bool>,
    out: Option<&std::path::Path>,
) -> anyhow::Result<RunFigures> {
    let run_id = format!("bench{}", std::process::id());
    let (stack, world, brokers, pipeline, workload) = match &args.brokers {
        Some(brokers) => {
            let world = World::generate(42, args.cards, 2_000);
            (None, world, brokers.clone(), None, None)
        }
        None => {
            let (stack, world, mut config) = local_setup(args.cards, 2_000).await?;
            if let Some(rows) = args.max_rows {
                config.workloads[0].batch.max_rows = rows;
            }
            if let Some(linger) = args.linger {
                config.workloads[0].batch.linger = linger;
            }
            if let Some(mode) = args.batch_mode {
                config.workloads[0].batch.mode = mode;
            }
            if let Some(model) = &args.model {
                config.workloads[0].model = model.canonicalize()?;
            }
            config
                .kafka
                .consumer_properties
                .insert("fetch.wait.max.ms".into(), args.fetch_wait_ms.to_string());
            match drift {
                Some(false) => config.workloads[0].drift = None,
                Some(true) if config.workloads[0].drift.is_none() => anyhow::bail!(
                    "the config has no [workloads.drift] for `{}`",
                    config.workloads[0].name
                ),
                _ => {}
            }
            let brokers = stack.kafka_bootstrap.clone();
            let pipeline = Pipeline::start(&config).await?;
            let workload = config.workloads[0].clone();
            (Some(stack), world, brokers, Some(pipeline), Some(workload))
        }
    };
    let batch = workload
        .as_ref()
        .map(|w| {
            format!(
                "{:?} batching, max-rows {} linger {:?}",
                w.batch.mode, w.batch.max_rows, w.batch.linger
            )
        })
        .unwrap_or_else(|| "external pipeline".into());
    let drift_label = match (drift, &workload) {
        (Some(false), _) => "drift monitor off",
        (_, Some(w)) if w.drift.is_some() => "drift monitor on",
        _ => "drift monitor off",
    };
    println!(
        "verdict bench: {} transactions after {} warm-up, offered rate {}, {batch}, {drift_label}, load generator linger.ms {}",
        args.count,
        args.warmup,
        args.rate
            .map(|r| format!("{r:.0} tx/s"))
            .unwrap_or_else(|| "unthrottled".into()),
        args.producer_linger_ms
    );
    let spec = DriveSpec {
        rate_per_sec: args.rate,
        producer_linger_ms: args.producer_linger_ms,
        fetch_wait_ms: args.fetch_wait_ms,
        ..DriveSpec::new(
            brokers,
            EXAMPLE_TOPICS[0].0,
            EXAMPLE_TOPICS[1].0,
            args.count,
            run_id,
        )
    };
    let (world, spec) = if args.warmup > 0 {
        let warmup = DriveSpec {
            count: args.warmup,
            run_id: format!("{}w", spec.run_id),
            ..spec.clone()
        };
        tokio::task::spawn_blocking(move || drive(&world, &warmup).map(|_| (world, spec))).await??
    } else {
        (world, spec)
    };
    let cpu_before = process_cpu_seconds();
    let report = tokio::task::spawn_blocking(move || drive(&world, &spec)).await??;
    let cpu = match (cpu_before, process_cpu_seconds()) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let reports = match pipeline {
        Some(p) => {
            p.stop();
            p.wait().await?
        }
        None => Vec::new(),
    };
    drop(stack);
    print_summary(&report, &reports);
    let [p50, p99, p999, max] = percentiles_ms(&report.latency_us);
    let cpu_us_per_decision = cpu.map(|c| c * 1e6 / report.decided.max(1) as f64);
    if let Some(c) = cpu_us_per_decision {
        println!(
            "  process CPU   {:.2} s = {c:.1} µs per decision (includes the load generator and measuring consumer)",
            cpu.unwrap_or_default()
        );
    }
    if let Some(rss) = peak_rss_mib() {
        println!("  peak RSS      {rss:.0} MiB (whole process)");
    }
    if let Some(path) = out {
        let stage = |f: fn(&crate::topology::StageTimings) -> &hdrhistogram::Histogram<u64>| {
            reports.first().map(|r| {
                let h = f(&r.timings);
                json!({"mean_us": h.mean(), "p50_us": h.value_at_quantile(0.5), "p99_us": h.value_at_quantile(0.99)})
            })
        };
        let result = json!({
            "count": args.count,
            "offered_rate": args.rate,
            "warmup": args.warmup,
            "producer_linger_ms": args.producer_linger_ms,
            "decided": report.decided,
            "duplicates": report.duplicates,
            "throughput_per_s": report.throughput(),
            "latency_ms": {"p50": p50, "p99": p99, "p99_9": p999, "max": max},
            "process_cpu_s": cpu,
            "process_cpu_us_per_decision": cpu_us_per_decision,
            "peak_rss_mib": peak_rss_mib(),
            "cores": std::thread::available_parallelism().map(|n| n.get()).ok(),
            "stages": {
                "rows_per_batch": stage(|t| &t.rows),
                "lookup": stage(|t| &t.lookup_us),
                "join": stage(|t| &t.join_us),
                "score": stage(|t| &t.score_us),
                "produce": stage(|t| &t.produce_us),
            },
        });
        std::fs::write(path, serde_json::to_string_pretty(&result)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("  results written to {}", path.display());
    }
    anyhow::ensure!(
        report.decided == report.sent,
        "{} of {} transactions got no decision",
        report.sent - report.decided,
        report.sent
    );
    let fraud = reports.first();
    Ok(RunFigures {
        throughput: report.throughput(),
        p50_ms: p50,
        p99_ms: p99,
        cpu_us_per_decision,
        drift_alerts: fraud.map(|r| r.drift_alerts).unwrap_or(0),
        drift_batches_skipped: fraud.map(|r| r.drift_batches_skipped).unwrap_or(0),
    })
}

/// `KEY=VALUE` of a command-line librdkafka property.
fn key_value(arg: &str) -> Result<(String, String), String> {
    match arg.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
        _ => Err(format!("`{arg}`: expected KEY=VALUE")),
    }
}

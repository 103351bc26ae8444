//! `verdict bench --rates 2000,5000,10000 [--baseline python] [--find-max-rate]`: each system
//! as a separate process, driven open loop at fixed offered rates, measured from outside.
//!
//! One probe = one system at one offered rate on a fresh broker and Redis (the same world of
//! cards and merchants each time, so every probe starts from the same feature state):
//! - the system runs as a child process: `verdict run` with the example fraud workload, or
//!   `pipeline/bench/baseline.py`. verdict's deadline and drift monitor are off and its Redis
//!   timeout is 2 s, since the baseline has none of them: both do the same work and must reach
//!   the same decisions;
//! - the driver ([`crate::driver`]) produces `--warmup` transactions, waits for their
//!   decisions, then produces the measured ones at the offered rate on its own clock (open
//!   loop: a slow system cannot slow the producer and hide its latency) and measures produce
//!   → decision at an independent consumer. Input is keyed by card (per-card order) and event
//!   times follow the offered rate from a base shared by both systems, so the two compute the
//!   same velocity features; the decisions of both are compared transaction by transaction;
//! - CPU seconds come from `/proc/<pid>/stat` around the measured part; memory is the
//!   child's resident set, sampled every second, and its peak (`VmHWM`).
//!
//! `--find-max-rate` searches, per system, the highest offered rate it sustains: every
//! transaction decided and the backlog bounded, i.e. the median latency of the last tenth of
//! the run at most twice that of the first tenth plus 25 ms (a system behind the offered rate
//! piles up a backlog that the last transactions wait behind), with the load generator
//! meeting the rate. It grows the rate by half until a probe fails, then bisects.
//!
//! A long run at one rate (`--rates 10000 --count 3000000`, five minutes) is the memory soak:
//! the table shows the resident set one minute in and at the end.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;

use crate::bench::BenchArgs;
use crate::box_cpu::{BoxCpu, BoxCpuSplit};
use crate::config::{example_config_dir, repo_root, BatchMode, Config, EXAMPLE_CONFIG};
use crate::demo::{local_setup, EXAMPLE_TOPICS};
use crate::driver::{drive, percentiles_ms, DriveReport, DriveSpec};
use crate::measured_process::MeasuredProcess;
use crate::scrape::{self, Sample};
use crate::thread_cpu::{ThreadCpuSample, ThreadCpuSplit};

/// Decisions of two systems agree when the scores differ by at most this much.
const SCORE_TOLERANCE: f64 = 1e-5;
/// Probes of one max-rate search, at most. Growing by half from 4,000 tx/s reaches 100,000 in
/// nine probes, and from a 1.5× bracket three bisections reach `SEARCH_RESOLUTION`.
const MAX_PROBES: usize = 12;
/// The search stops when the highest sustained and the lowest failed rate are this close.
const SEARCH_RESOLUTION: f64 = 1.1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum System {
    Verdict,
    Python,
}

impl System {
    fn name(self) -> &'static str {
        match self {
            System::Verdict => "verdict",
            System::Python => "Python",
        }
    }
}

/// What one probe measured.
#[derive(Debug, Clone, serde::Serialize)]
struct Probe {
    system: System,
    offered_per_s: f64,
    sent: usize,
    decided: usize,
    duplicates: usize,
    throughput_per_s: f64,
    /// p50, p99, p99.9, max of produce → decision, ms.
    latency_ms: [f64; 4],
    latency_first_tenth_ms: f64,
    latency_last_tenth_ms: f64,
    /// Medians, ms: produce → decision produced (input hop + the system's work), decision
    /// produced → arrival (output hop); see `DriveReport::split_median_ms`.
    split_median_ms: [f64; 2],
    /// The load generator's own pace: it met the offered rate if this is ≈ sent / rate.
    produce_seconds: f64,
    cpu_seconds: f64,
    cpu_us_per_decision: f64,
    peak_rss_mib: f64,
    /// Resident set (MiB) one minute into the measured run (or at its end if shorter), and
    /// at its end.
    rss_after_1_min_mib: f64,
    rss_at_end_mib: f64,
    /// The anonymous part of the resident set (`RssAnon`: heap, stacks, buffers), MiB: its
    /// largest sample, one minute in and at the end. The resident set also counts the pages
    /// of the executable mapped in, and how many of those are depends on how the file sits
    /// in the page cache: one binary measured 94 and 109 MiB peak from two copies of the same
    /// file, with the same 17.8 MiB anonymous. Growth and leaks show here.
    peak_anon_mib: f64,
    anon_after_1_min_mib: f64,
    anon_at_end_mib: f64,
    sustained: bool,
    /// Where the whole box's CPU went over the measured part.
    whole_box: Option<BoxCpuSplit>,
    /// Where the system's own CPU went over the measured part, by thread.
    threads: Option<ThreadCpuSplit>,
    #[serde(skip)]
    decisions: Vec<Option<(Arc<str>, f64)>>,
}

impl Probe {
    fn why_not_sustained(&self) -> Option<String> {
        why_not_sustained(
            self.sent,
            self.decided,
            self.offered_per_s,
            self.produce_seconds,
            self.latency_first_tenth_ms,
            self.latency_last_tenth_ms,
        )
    }
}

/// Why a run at `offered_per_s` did not keep up, or `None` if it did: every message answered,
/// the load generator on schedule, and the median latency of the last tenth of the run not
/// above twice the first tenth's + 25 ms (a backlog that grows).
fn why_not_sustained(
    sent: usize,
    answered: usize,
    offered_per_s: f64,
    produce_seconds: f64,
    first_tenth_ms: f64,
    last_tenth_ms: f64,
) -> Option<String> {
    let planned = sent as f64 / offered_per_s;
    if answered < sent {
        Some(format!("{} undecided", sent - answered))
    } else if produce_seconds > planned * 1.05 + 0.5 {
        Some(format!(
            "load generator behind: {produce_seconds:.1} s for {planned:.1} s of load"
        ))
    } else if last_tenth_ms > 2.0 * first_tenth_ms + 25.0 {
        Some(format!(
            "backlog grew: median {first_tenth_ms:.1} ms in the first tenth, {last_tenth_ms:.1} ms in the last"
        ))
    } else {
        None
    }
}

/// The example config cut to the fraud workload, without deadline and drift monitor, with a
/// 2 s Redis timeout, `model` and the bench's batching overrides.
/// The `linger.ms` the verdict process's producer runs with, read back from the config it is
/// given (verdict's default, then `--verdict-producer-linger-ms`, then any
/// `--verdict-producer-property linger.ms=…`, which may be a fraction): a number when it
/// parses as one.
fn verdict_producer_linger_ms(args: &BenchArgs, model: &Path) -> anyhow::Result<serde_json::Value> {
    let config = Config::parse(&process_config(args, model)?, Path::new("/"))?;
    Ok(match config.kafka.producer().get("linger.ms") {
        Some(value) => match value.parse::<f64>() {
            Ok(ms) => json!(ms),
            Err(_) => json!(value),
        },
        None => serde_json::Value::Null,
    })
}

fn process_config(args: &BenchArgs, model: &Path) -> anyhow::Result<String> {
    // The fraud workload is the first; the pricing one starts at the second `[[workloads]]`.
    let fraud_only = match EXAMPLE_CONFIG.match_indices("\n[[workloads]]\n").nth(1) {
        Some((at, _)) => &EXAMPLE_CONFIG[..at + 1],
        None => EXAMPLE_CONFIG,
    };
    let dropped = [
        "[workloads.deadline]",
        "[workloads.deadline.fallback]",
        "[workloads.drift]",
    ];
    let mut text = String::new();
    let mut skipping = false;
    for line in fraud_only.lines() {
        if line.starts_with('[') {
            skipping = dropped.contains(&line.trim());
        }
        if skipping {
            continue;
        }
        let line = if line.starts_with("group-id = ") {
            let mut l = format!(
                "{line}\nconsumer-properties = {{ \"fetch.wait.max.ms\" = \"{}\" }}",
                args.fetch_wait_ms
            );
            // A map, later settings replacing earlier ones: `--verdict-producer-linger-ms`
            // together with `--verdict-producer-property linger.ms=…` wrote the key twice,
            // which TOML refuses (the process did not start).
            let mut producer: std::collections::BTreeMap<String, String> = args
                .verdict_producer_linger_ms
                .map(|ms| ("linger.ms".to_string(), ms.to_string()))
                .into_iter()
                .collect();
            producer.extend(args.verdict_producer_properties.iter().cloned());
            if !producer.is_empty() {
                let entries: Vec<String> = producer
                    .iter()
                    .map(|(key, value)| format!("{key:?} = {value:?}"))
                    .collect();
                l.push_str(&format!(
                    "\nproducer-properties = {{ {} }}",
                    entries.join(", ")
                ));
            }
            l
        } else if line.starts_with("model = ") {
            format!("model = {:?}", model.display().to_string())
        } else if line.starts_with("response-timeout = ") {
            "response-timeout = \"2s\"".to_string()
        } else if line.starts_with("max-rows = ") {
            match args.max_rows {
                Some(rows) => format!("max-rows = {rows}"),
                None => line.to_string(),
            }
        } else if line.starts_with("linger = ") {
            let mut l = match args.linger {
                Some(linger) => format!("linger = \"{}\"", humantime::format_duration(linger)),
                None => line.to_string(),
            };
            if args.batch_mode == Some(BatchMode::Adaptive) {
                l.push_str("\nmode = \"adaptive\"");
            }
            l
        } else {
            line.to_string()
        };
        text.push_str(&line);
        text.push('\n');
    }
    // Parsed here so a config the child would refuse fails before any probe.
    let config = Config::parse(&text, &example_config_dir())?;
    anyhow::ensure!(
        config.workloads.len() == 1 && config.workloads[0].deadline.is_none(),
        "the bench's process config should hold the fraud workload alone, without deadline"
    );
    Ok(text)
}

/// Samples a process's resident set every second until `stop`.
/// One sample of a process's memory, MiB.
#[derive(Debug, Clone, Copy)]
struct MemorySample {
    at: Instant,
    rss_mib: f64,
    anon_mib: f64,
}

/// Samples `VmRSS` and `RssAnon` of `pid` once a second until `stop`.
fn sample_rss(pid: u32, stop: Arc<AtomicBool>) -> Arc<Mutex<Vec<MemorySample>>> {
    let samples = Arc::new(Mutex::new(Vec::new()));
    let out = Arc::clone(&samples);
    std::thread::spawn(move || {
        let status = format!("/proc/{pid}/status");
        let mib = |status: &str, field: &str| {
            status
                .lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
                .map(|kib| kib / 1024.0)
        };
        while !stop.load(Ordering::Relaxed) {
            if let Ok(text) = std::fs::read_to_string(&status) {
                if let (Some(rss_mib), Some(anon_mib)) =
                    (mib(&text, "VmRSS:"), mib(&text, "RssAnon:"))
                {
                    out.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(MemorySample {
                            at: Instant::now(),
                            rss_mib,
                            anon_mib,
                        });
                }
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    });
    samples
}

/// One system at one offered rate, on a fresh stack.
async fn probe(
    args: &BenchArgs,
    system: System,
    rate: f64,
    count: usize,
    model: &Path,
    event_time_base_ms: i64,
) -> anyhow::Result<Probe> {
    let (stack, world, _) = local_setup(args.cards, 2_000).await?;
    stack
        .create_topics(&[
            ("decisions.baseline", 3),
            ("transactions.dead-letter.baseline", 1),
        ])
        .await?;
    let dir = tempfile::tempdir()?;
    let log = dir.path().join(format!("{}.log", system.name()));
    let decisions_topic = match system {
        System::Verdict => EXAMPLE_TOPICS[1].0,
        System::Python => "decisions.baseline",
    };
    let process = match system {
        System::Verdict => {
            let config = dir.path().join("verdict.toml");
            std::fs::write(&config, process_config(args, model)?)?;
            let mut p = MeasuredProcess::verdict(
                &std::env::current_exe()?,
                &config,
                &stack.kafka_bootstrap,
                &stack.redis_url,
                &log,
            )?;
            tokio::task::block_in_place(|| p.wait_ready(Duration::from_secs(90)))
                .with_context(|| std::fs::read_to_string(&log).unwrap_or_default())?;
            p
        }
        System::Python => {
            let python = repo_root().join(".venv/bin/python");
            anyhow::ensure!(
                python.is_file(),
                "{} not found: run deploy/setup.sh",
                python.display()
            );
            let mut command = Command::new(python);
            command
                .arg(repo_root().join("pipeline/bench/baseline.py"))
                .args(["--brokers", &stack.kafka_bootstrap])
                .args(["--redis", &stack.redis_url])
                .args(["--input", EXAMPLE_TOPICS[0].0, "--output", decisions_topic])
                .args(["--group", "baseline.fraud"])
                .args(["--fetch-wait-ms", &args.fetch_wait_ms.to_string()])
                .arg("--model")
                .arg(model);
            MeasuredProcess::spawn(command, &log).context("starting the Python baseline")?
        }
    };

    let spec = DriveSpec {
        rate_per_sec: Some(rate),
        producer_linger_ms: args.producer_linger_ms,
        // The warm-up's event times come first, then the measured run's.
        event_time_base_ms: Some(
            event_time_base_ms + (args.warmup as f64 * 1000.0 / rate) as i64 + 1_000,
        ),
        key_by_card: true,
        fetch_wait_ms: args.fetch_wait_ms,
        ..DriveSpec::new(
            stack.kafka_bootstrap.clone(),
            EXAMPLE_TOPICS[0].0,
            decisions_topic,
            count,
            format!("open-loop-{rate:.0}"),
        )
    };
    let warmup = DriveSpec {
        count: args.warmup,
        run_id: format!("{}w", spec.run_id),
        event_time_base_ms: Some(event_time_base_ms),
        // Includes the baseline's start and group join, which the warm-up absorbs.
        settle_timeout: Duration::from_secs(120),
        ..spec.clone()
    };
    let mut accounted = vec![(system.name().to_string(), process.pid())];
    accounted.extend(stack.processes());
    accounted.push(("harness".to_string(), std::process::id()));
    let box_cpu = BoxCpu::new(accounted, Some(stack.redis_url.clone()));
    let (report, cpu_seconds, rss, box_split, thread_split) =
        tokio::task::block_in_place(|| -> anyhow::Result<_> {
            if args.warmup > 0 {
                let w = drive(&world, &warmup)?;
                anyhow::ensure!(
                    w.decided == w.sent,
                    "{}: {} of {} warm-up transactions got no decision; log:\n{}",
                    system.name(),
                    w.sent - w.decided,
                    w.sent,
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            let stop = Arc::new(AtomicBool::new(false));
            let rss = sample_rss(process.pid(), Arc::clone(&stop));
            let timers_before = process.scrape().ok();
            let box_before = box_cpu.sample();
            let threads_before = ThreadCpuSample::of(process.pid());
            let cpu_before = process.cpu_seconds().context("reading the process's CPU")?;
            let report: DriveReport = drive(&world, &spec)?;
            let cpu_after = process.cpu_seconds().context("reading the process's CPU")?;
            let thread_split =
                threads_before.split_until(&ThreadCpuSample::of(process.pid()), report.decided);
            // Cores busy over the load itself (first produce → last decision), not over the
            // measuring consumer's group join before it.
            let box_split = box_cpu.split(
                &box_before,
                &box_cpu.sample(),
                report.decided,
                report.elapsed.as_secs_f64(),
            );
            if let (Some(before), Ok(after)) = (timers_before, process.scrape()) {
                println!("{}", own_timers(&before, &after));
            }
            stop.store(true, Ordering::Relaxed);
            let rss = std::mem::take(&mut *rss.lock().unwrap_or_else(|e| e.into_inner()));
            Ok((report, cpu_after - cpu_before, rss, box_split, thread_split))
        })?;
    let peak_rss_mib = process.peak_rss_mib().unwrap_or(f64::NAN);
    tokio::task::block_in_place(|| process.stop())?;
    drop(stack);

    let started = rss.first().map(|m| m.at);
    let after_1_min = rss
        .iter()
        .find(|m| started.is_some_and(|s| m.at.duration_since(s) >= Duration::from_secs(60)))
        .or(rss.last());
    let mut probe = Probe {
        system,
        offered_per_s: rate,
        sent: report.sent,
        decided: report.decided,
        duplicates: report.duplicates,
        throughput_per_s: report.throughput(),
        latency_ms: percentiles_ms(&report.latency_us),
        latency_first_tenth_ms: report.latency_first_tenth_ms,
        latency_last_tenth_ms: report.latency_last_tenth_ms,
        split_median_ms: report.split_median_ms,
        produce_seconds: report.produce_elapsed.as_secs_f64(),
        cpu_seconds,
        cpu_us_per_decision: cpu_seconds * 1e6 / report.decided.max(1) as f64,
        peak_rss_mib,
        rss_after_1_min_mib: after_1_min.map_or(f64::NAN, |m| m.rss_mib),
        rss_at_end_mib: rss.last().map_or(f64::NAN, |m| m.rss_mib),
        peak_anon_mib: rss.iter().map(|m| m.anon_mib).fold(f64::NAN, f64::max),
        anon_after_1_min_mib: after_1_min.map_or(f64::NAN, |m| m.anon_mib),
        anon_at_end_mib: rss.last().map_or(f64::NAN, |m| m.anon_mib),
        sustained: false,
        whole_box: Some(box_split),
        threads: Some(thread_split),
        decisions: report.decisions,
    };
    probe.sustained = probe.why_not_sustained().is_none();
    print_probe(&probe);
    Ok(probe)
}

/// verdict's own view of the measured part, from its metrics before and after: rows per
/// batch, mean time per batch in each stage, and mean consume → delivery per decision.
fn own_timers(before: &[Sample], after: &[Sample]) -> String {
    let delta = |name: &str, labels: &[(&str, &str)]| {
        scrape::sum(after, name, labels) - scrape::sum(before, name, labels)
    };
    let batches = delta("verdict_batch_messages_count", &[]);
    let rows = delta("verdict_batch_messages_sum", &[]);
    let mut stages: Vec<&str> = after
        .iter()
        .filter(|s| s.name == "verdict_stage_duration_seconds_count")
        .filter_map(|s| s.labels.get("stage").map(String::as_str))
        .collect();
    stages.dedup();
    let per_stage: Vec<String> = stages
        .iter()
        .map(|stage| {
            let labels = [("stage", *stage)];
            let seconds = delta("verdict_stage_duration_seconds_sum", &labels);
            let count = delta("verdict_stage_duration_seconds_count", &labels);
            format!("{stage} {:.2}", seconds * 1e3 / count.max(1.0))
        })
        .collect();
    let from_consume = [("from", "consume")];
    let consume_to_delivery_ms = delta("verdict_end_to_end_latency_seconds_sum", &from_consume)
        * 1e3
        / delta("verdict_end_to_end_latency_seconds_count", &from_consume).max(1.0);
    format!(
        "    verdict's timers: {batches:.0} batches of {:.1} rows; mean ms per batch: {}; consume → delivered {consume_to_delivery_ms:.1} ms mean",
        rows / batches.max(1.0),
        per_stage.join(", "),
    )
}

fn print_probe(p: &Probe) {
    let [p50, p99, p999, max] = p.latency_ms;
    println!(
        "  {:7} {:>7.0} tx/s offered: {:>7.0} decided/s  p50 {p50:.1} ms  p99 {p99:.1} ms  p99.9 {p999:.1} ms  max {max:.1} ms (median split at the decision's produce: {:.1} + {:.1} ms)  CPU {:.1} µs/decision  RSS peak {:.0} MiB (1 min {:.0}, end {:.0}), anonymous peak {:.1} MiB (1 min {:.1}, end {:.1})  {}",
        p.system.name(),
        p.offered_per_s,
        p.throughput_per_s,
        p.split_median_ms[0],
        p.split_median_ms[1],
        p.cpu_us_per_decision,
        p.peak_rss_mib,
        p.rss_after_1_min_mib,
        p.rss_at_end_mib,
        p.peak_anon_mib,
        p.anon_after_1_min_mib,
        p.anon_at_end_mib,
        match p.why_not_sustained() {
            None => "sustained".to_string(),
            Some(why) => format!("NOT sustained ({why})"),
        }
    );
    if let Some(split) = &p.whole_box {
        println!("{}", split.describe());
    }
    if let Some(threads) = &p.threads {
        println!("{}", threads.describe(p.system.name()));
    }
}

/// One broker hop on its own, as the floor under both systems' latency and cost: the load
/// generator produces to the input topic at `rate` and the measuring consumer reads the input
/// topic itself (no system in between), on a fresh broker, with the same client settings.
/// Judged sustained by the probes' rule, with the whole box's CPU per message: what the
/// broker and the harness take before any system runs (a system's decisions cross the broker
/// twice).
async fn broker_hop(args: &BenchArgs, rate: f64) -> anyhow::Result<serde_json::Value> {
    let (stack, world, _) = local_setup(args.cards, 2_000).await?;
    let spec = DriveSpec {
        rate_per_sec: Some(rate),
        producer_linger_ms: args.producer_linger_ms,
        fetch_wait_ms: args.fetch_wait_ms,
        ..DriveSpec::new(
            stack.kafka_bootstrap.clone(),
            EXAMPLE_TOPICS[0].0,
            EXAMPLE_TOPICS[0].0,
            args.count,
            format!("hop-{rate:.0}"),
        )
    };
    let warmup = DriveSpec {
        count: args.warmup,
        run_id: format!("{}w", spec.run_id),
        ..spec.clone()
    };
    let mut accounted = stack.processes();
    accounted.push(("harness".to_string(), std::process::id()));
    let box_cpu = BoxCpu::new(accounted, None);
    let (report, box_split) = tokio::task::block_in_place(|| -> anyhow::Result<_> {
        drive(&world, &warmup)?;
        let before = box_cpu.sample();
        let report = drive(&world, &spec)?;
        let split = box_cpu.split(
            &before,
            &box_cpu.sample(),
            report.decided,
            report.elapsed.as_secs_f64(),
        );
        Ok((report, split))
    })?;
    drop(stack);
    let [p50, p99, p999, max] = percentiles_ms(&report.latency_us);
    let not_sustained = why_not_sustained(
        report.sent,
        report.decided,
        rate,
        report.produce_elapsed.as_secs_f64(),
        report.latency_first_tenth_ms,
        report.latency_last_tenth_ms,
    );
    println!(
        "  one broker hop {rate:>7.0} tx/s: {} of {} arrived  p50 {p50:.1} ms  p99 {p99:.1} ms  p99.9 {p999:.1} ms  max {max:.1} ms  {}",
        report.decided,
        report.sent,
        match &not_sustained {
            None => "sustained".to_string(),
            Some(why) => format!("NOT sustained ({why})"),
        }
    );
    println!("{}", box_split.describe_per("message"));
    Ok(json!({
        "offered_per_s": rate,
        "sent": report.sent,
        "arrived": report.decided,
        "latency_ms": [p50, p99, p999, max],
        "latency_first_tenth_ms": report.latency_first_tenth_ms,
        "latency_last_tenth_ms": report.latency_last_tenth_ms,
        "sustained": not_sustained.is_none(),
        "whole_box": box_split,
    }))
}

/// Transactions whose decisions differ between two probes of the same spec.
fn differing(a: &Probe, b: &Probe) -> (usize, f64) {
    let mut differ = 0;
    let mut largest_gap = 0.0f64;
    for (x, y) in a.decisions.iter().zip(&b.decisions) {
        if let (Some((dx, sx)), Some((dy, sy))) = (x, y) {
            let gap = (sx - sy).abs();
            largest_gap = largest_gap.max(gap);
            if dx != dy || gap > SCORE_TOLERANCE {
                differ += 1;
            }
        }
    }
    (differ, largest_gap)
}

/// The highest sustained offered rate of `system`, searched from `start`.
/// What a maximum-rate search found: the highest rate it saw sustained and the lowest it saw
/// fail. When it ran out of probes before the two were within `SEARCH_RESOLUTION`, the
/// maximum lies somewhere between them, and the report says so.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct SearchOutcome {
    sustained: Option<f64>,
    failed: Option<f64>,
}

impl SearchOutcome {
    /// The rate to probe next: up by half while every probe was sustained, down by a third
    /// while every probe failed, then the bracket's geometric mean (to 100 tx/s); `None` once
    /// the bracket is within `SEARCH_RESOLUTION`.
    fn next_rate(&self, probed: f64) -> Option<f64> {
        match (self.sustained, self.failed) {
            (Some(_), None) => Some(probed * 1.5),
            (None, Some(_)) => Some(probed / 1.5),
            (Some(lo), Some(hi)) if hi / lo > SEARCH_RESOLUTION => {
                Some(((lo * hi).sqrt() / 100.0).round() * 100.0)
            }
            _ => None,
        }
    }

    fn resolved(&self) -> bool {
        match (self.sustained, self.failed) {
            (Some(lo), Some(hi)) => hi / lo <= SEARCH_RESOLUTION,
            _ => false,
        }
    }

    fn describe(&self, system: &str) -> String {
        match (self.sustained, self.failed) {
            (Some(lo), Some(hi)) if !self.resolved() => format!(
                "maximum sustainable rate, {system}: between {lo:.0} and {hi:.0} tx/s (the search ran out of its {MAX_PROBES} probes; start it higher with --rates)"
            ),
            (Some(lo), _) => format!("maximum sustainable rate, {system}: {lo:.0} tx/s"),
            (None, _) => format!("maximum sustainable rate, {system}: below every rate probed"),
        }
    }
}

async fn find_max_rate(
    args: &BenchArgs,
    system: System,
    start: f64,
    model: &Path,
    probes: &mut Vec<Probe>,
) -> anyhow::Result<SearchOutcome> {
    let mut outcome = SearchOutcome::default();
    let mut rate = start;
    for _ in 0..MAX_PROBES {
        let count = (rate * args.probe_seconds).round() as usize;
        let p = probe(args, system, rate, count, model, crate::workload::now_ms()).await?;
        if p.sustained {
            outcome.sustained = Some(rate);
        } else {
            outcome.failed = Some(rate);
        }
        probes.push(p);
        match outcome.next_rate(rate) {
            Some(next) => rate = next,
            None => break,
        }
    }
    Ok(outcome)
}

pub async fn run(args: &BenchArgs, rates: &[f64]) -> anyhow::Result<()> {
    let systems: Vec<System> = match args.baseline {
        Some(crate::bench::Baseline::Python) => vec![System::Verdict, System::Python],
        None => vec![System::Verdict],
    };
    let model = match &args.model {
        Some(m) => m
            .canonicalize()
            .with_context(|| format!("--model {}", m.display()))?,
        None => Config::parse(EXAMPLE_CONFIG, &example_config_dir())?.workloads[0]
            .model
            .canonicalize()?,
    };
    let model_name = model
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    println!(
        "verdict bench, open loop: fraud workload, model {model_name}, {} measured transactions per rate ({} s per search probe) after {} warm-up, each system a separate process on a fresh broker and Redis ({} cores)",
        args.count,
        args.probe_seconds,
        args.warmup,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );

    let mut hops = Vec::new();
    if args.broker_hop || args.broker_hop_only {
        for &rate in rates {
            hops.push(broker_hop(args, rate).await?);
        }
    }
    let rates = if args.broker_hop_only { &[][..] } else { rates };
    let mut fixed: Vec<Probe> = Vec::new();
    let mut mismatches = Vec::new();
    for &rate in rates {
        let base = crate::workload::now_ms();
        let mut at_rate = Vec::new();
        for &system in &systems {
            at_rate.push(probe(args, system, rate, args.count, &model, base).await?);
        }
        if let [a, b] = at_rate.as_slice() {
            let (differ, gap) = differing(a, b);
            println!(
                "  {rate:.0} tx/s: {differ} decisions differ between verdict and Python (largest score gap {gap:.2e})"
            );
            if differ > 0 {
                mismatches.push((rate, differ));
            }
        }
        fixed.extend(at_rate);
    }

    let mut searched = Vec::new();
    let mut max_rates = Vec::new();
    if args.find_max_rate {
        for &system in &systems {
            let start = rates.iter().copied().fold(4_000.0, f64::max);
            println!(
                "  searching the maximum sustainable rate of {} from {start:.0} tx/s",
                system.name()
            );
            let max = find_max_rate(args, system, start, &model, &mut searched).await?;
            max_rates.push((system, max));
        }
    }

    if !fixed.is_empty() {
        println!();
        println!("offered rate   system    decided/s   p50 ms   p99 ms  p99.9 ms   max ms  CPU µs/dec  peak RSS MiB");
    }
    for p in &fixed {
        let [p50, p99, p999, max] = p.latency_ms;
        println!(
            "  {:>9.0}   {:7} {:>11.0} {p50:>8.1} {p99:>8.1} {p999:>9.1} {max:>8.1} {:>11.1} {:>13.0}{}",
            p.offered_per_s,
            p.system.name(),
            p.throughput_per_s,
            p.cpu_us_per_decision,
            p.peak_rss_mib,
            if p.sustained { "" } else { "  (not sustained)" }
        );
    }
    for &rate in rates {
        let at = |s: System| {
            fixed
                .iter()
                .find(|p| p.offered_per_s == rate && p.system == s)
        };
        if let (Some(v), Some(py)) = (at(System::Verdict), at(System::Python)) {
            println!(
                "  {rate:>9.0}   Python/verdict: CPU per decision {:.1}×, p99 {:.1}×",
                py.cpu_us_per_decision / v.cpu_us_per_decision.max(1e-9),
                py.latency_ms[1] / v.latency_ms[1].max(1e-9)
            );
        }
    }
    for (system, outcome) in &max_rates {
        println!("{}", outcome.describe(system.name()));
    }
    if let [(
        _,
        SearchOutcome {
            sustained: Some(v), ..
        },
    ), (
        _,
        SearchOutcome {
            sustained: Some(py),
            ..
        },
    )] = max_rates.as_slice()
    {
        println!("  verdict/Python: {:.1}×", v / py);
    }
    if let Some(path) = &args.out {
        let report = json!({
            "workload": "fraud",
            "model": model_name,
            "cores": std::thread::available_parallelism().map(|n| n.get()).ok(),
            "warmup": args.warmup,
            "fetch_wait_ms": args.fetch_wait_ms,
            "load_generator_linger_ms": args.producer_linger_ms,
            "verdict_producer_linger_ms": verdict_producer_linger_ms(args, &model)?,
            "verdict_producer_properties": args.verdict_producer_properties.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
            "broker_hop": hops,
            "fixed_rates": fixed,
            "max_rate_search": searched,
            "max_sustainable_rate": max_rates.iter().map(|(s, o)| json!({"system": s, "rate_per_s": o.sustained, "lowest_failed_per_s": o.failed, "resolved": o.resolved()})).collect::<Vec<_>>(),
            "decision_mismatches": mismatches.iter().map(|(r, n)| json!({"rate": r, "transactions": n})).collect::<Vec<_>>(),
        });
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
        println!("results written to {}", path.display());
    }
    anyhow::ensure!(
        mismatches.is_empty(),
        "verdict and the baseline decided differently: {mismatches:?} (rate, transactions)"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    fn args(extra: &[&str]) -> BenchArgs {
        Cli::parse_from(std::iter::once("bench").chain(extra.iter().copied())).bench
    }

    /// The hop alone needs rates to measure at, and is no search and no comparison.
    #[test]
    fn the_broker_hop_alone_takes_rates_and_nothing_that_runs_a_system() {
        let parse = |extra: &[&str]| {
            Cli::try_parse_from(std::iter::once("bench").chain(extra.iter().copied()))
                .map(|cli| cli.bench)
        };
        let hop = parse(&["--broker-hop-only", "--rates", "1000,2000"]).expect("parses");
        assert!(hop.broker_hop_only);
        assert_eq!(hop.rates, Some(vec![1_000.0, 2_000.0]));
        assert!(parse(&["--broker-hop-only"]).is_err());
        assert!(parse(&["--broker-hop-only", "--rates", "1000", "--find-max-rate"]).is_err());
        assert!(parse(&[
            "--broker-hop-only",
            "--rates",
            "1000",
            "--baseline",
            "python"
        ])
        .is_err());
    }

    #[test]
    fn the_process_config_is_the_fraud_workload_doing_the_baselines_work() {
        let gbt = example_config_dir().join("../../scorers/models/fraud-gbt");
        let text = process_config(
            &args(&[
                "--batch-mode",
                "adaptive",
                "--max-rows",
                "256",
                "--fetch-wait-ms",
                "3",
                "--verdict-producer-linger-ms",
                "5",
                "--verdict-producer-property",
                "enable.idempotence=true",
                "--verdict-producer-property",
                "max.in.flight.requests.per.connection=5",
            ]),
            &gbt,
        )
        .unwrap();
        let config = Config::parse(&text, Path::new("/nonexistent")).unwrap();
        assert_eq!(config.workloads.len(), 1);
        let fraud = &config.workloads[0];
        assert_eq!(fraud.name, "fraud");
        assert!(fraud.deadline.is_none());
        assert!(fraud.drift.is_none());
        assert_eq!(fraud.model, gbt);
        assert_eq!(fraud.batch.mode, BatchMode::Adaptive);
        assert_eq!(fraud.batch.max_rows, 256);
        assert_eq!(config.redis.response_timeout, Duration::from_secs(2));
        assert_eq!(
            config.kafka.consumer("g").get("fetch.wait.max.ms"),
            Some("3")
        );
        let producer = config.kafka.producer();
        assert_eq!(producer.get("linger.ms"), Some("5"));
        assert_eq!(producer.get("enable.idempotence"), Some("true"));
        assert_eq!(
            producer.get("max.in.flight.requests.per.connection"),
            Some("5")
        );
        // Without the flag verdict keeps its own default.
        let default = process_config(&args(&[]), &gbt).unwrap();
        let default = Config::parse(&default, Path::new("/nonexistent")).unwrap();
        assert_eq!(default.kafka.producer().get("linger.ms"), Some("1"));
    }

    #[test]
    fn the_results_name_the_linger_the_producer_runs_with() {
        let mlp = example_config_dir().join("../../scorers/models/fraud-mlp");
        let linger = |flags: &[&str]| verdict_producer_linger_ms(&args(flags), &mlp).unwrap();
        assert_eq!(linger(&[]), json!(1.0));
        assert_eq!(linger(&["--verdict-producer-linger-ms", "5"]), json!(5.0));
        // A property is applied after the flag, and librdkafka takes fractions.
        assert_eq!(
            linger(&[
                "--verdict-producer-linger-ms",
                "5",
                "--verdict-producer-property",
                "linger.ms=0.1",
            ]),
            json!(0.1)
        );
    }

    fn probe(first_tenth_ms: f64, last_tenth_ms: f64, decided: usize, produce_s: f64) -> Probe {
        Probe {
            system: System::Verdict,
            offered_per_s: 1_000.0,
            sent: 10_000,
            decided,
            duplicates: 0,
            throughput_per_s: 1_000.0,
            latency_ms: [1.0; 4],
            latency_first_tenth_ms: first_tenth_ms,
            latency_last_tenth_ms: last_tenth_ms,
            split_median_ms: [1.0; 2],
            produce_seconds: produce_s,
            cpu_seconds: 1.0,
            cpu_us_per_decision: 100.0,
            peak_rss_mib: 1.0,
            rss_after_1_min_mib: 1.0,
            rss_at_end_mib: 1.0,
            peak_anon_mib: 1.0,
            anon_after_1_min_mib: 1.0,
            anon_at_end_mib: 1.0,
            sustained: false,
            whole_box: None,
            threads: None,
            decisions: Vec::new(),
        }
    }

    #[test]
    fn a_rate_is_sustained_only_with_every_decision_a_bounded_backlog_and_the_load_offered() {
        assert_eq!(probe(3.0, 4.0, 10_000, 10.0).why_not_sustained(), None);
        // Jitter of a few ms at low latency is not a growing backlog.
        assert_eq!(probe(2.0, 20.0, 10_000, 10.0).why_not_sustained(), None);
        assert!(probe(3.0, 400.0, 10_000, 10.0)
            .why_not_sustained()
            .unwrap()
            .contains("backlog grew"));
        assert!(probe(3.0, 4.0, 9_999, 10.0)
            .why_not_sustained()
            .unwrap()
            .contains("1 undecided"));
        assert!(probe(3.0, 4.0, 10_000, 12.0)
            .why_not_sustained()
            .unwrap()
            .contains("load generator behind"));
    }

    /// Runs the search's steps against a system that sustains exactly up to `max` tx/s.
    fn search(start: f64, max: f64) -> (SearchOutcome, usize) {
        let mut outcome = SearchOutcome::default();
        let mut rate = start;
        for probes in 1..=MAX_PROBES {
            if rate <= max {
                outcome.sustained = Some(rate);
            } else {
                outcome.failed = Some(rate);
            }
            match outcome.next_rate(rate) {
                Some(next) => rate = next,
                None => return (outcome, probes),
            }
        }
        (outcome, MAX_PROBES)
    }

    #[test]
    fn the_search_brackets_the_maximum_within_its_resolution_up_to_100k_from_4k() {
        // Stop 26's fast phase: 45,562 sustained and 68,344 failed were the eighth probe,
        // where the old eight-probe limit ended the search unresolved.
        for max in [5_000.0, 22_400.0, 50_000.0, 60_000.0, 99_000.0] {
            let (outcome, probes) = search(4_000.0, max);
            assert!(
                outcome.resolved(),
                "max {max}: {outcome:?} after {probes} probes"
            );
            let (lo, hi) = (outcome.sustained.unwrap(), outcome.failed.unwrap());
            assert!(lo <= max && max < hi, "max {max}: {outcome:?}");
            assert!(outcome
                .describe("verdict")
                .ends_with(&format!("{lo:.0} tx/s")));
        }
    }

    #[test]
    fn a_search_that_runs_out_of_probes_reports_the_bracket_it_has() {
        let outcome = SearchOutcome {
            sustained: Some(45_562.0),
            failed: Some(68_344.0),
        };
        assert!(!outcome.resolved());
        assert!(outcome
            .describe("verdict")
            .contains("between 45562 and 68344 tx/s"));
        let nothing = SearchOutcome {
            sustained: None,
            failed: Some(4_000.0),
        };
        assert!(nothing
            .describe("verdict")
            .contains("below every rate probed"));
        // A maximum below the start: the search goes down until a probe holds, then bisects.
        let (outcome, _) = search(4_000.0, 1_000.0);
        assert!(outcome.resolved(), "{outcome:?}");
        assert!(outcome.sustained.unwrap() <= 1_000.0 && 1_000.0 < outcome.failed.unwrap());
    }
}

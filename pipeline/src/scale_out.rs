//! `verdict bench --processes 1,2,3`: scale-out the way Kafka consumers scale — several
//! `verdict run` processes in one consumer group on one broker — measured.
//!
//! For each process count it starts that many real `verdict run` processes (this binary, the
//! example config, addresses from the environment overrides, each with its own metrics port),
//! waits until every one is ready and the group has spread the input partitions over them,
//! drives the same burst through the input topic, and reports the decisions per second seen
//! by an independent consumer, how the partitions and decisions were shared (from each
//! process's own `/metrics`), and the CPU the verdict processes used (from /proc). Processes
//! are stopped with SIGTERM, as Kubernetes stops a pod, so each drains and commits.
//!
//! The broker, Redis and the load generator run on the same machine; on a small machine the
//! processes compete with them for cores, and the figures show exactly that.

use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;

use crate::bench::BenchArgs;
use crate::demo::{local_setup_with_topics, EXAMPLE_TOPICS};
use crate::driver::{drive, percentiles_ms, DriveSpec};
use crate::measured_process::MeasuredProcess;
use crate::scrape::{get, sum};

/// What one process count gave.
struct Row {
    processes: usize,
    throughput: f64,
    p50_ms: f64,
    p99_ms: f64,
    partitions: Vec<u64>,
    decisions: Vec<u64>,
    cpu_s: f64,
    decided: usize,
}

pub async fn run(args: &BenchArgs, counts: &[usize]) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.brokers.is_none(),
        "--processes starts its own broker; drop --brokers"
    );
    let input = EXAMPLE_TOPICS[0].0;
    let decisions_topic = EXAMPLE_TOPICS[1].0;
    // The input and decisions topics get `--partitions`; the rest keep the example's counts.
    let topics: Vec<(&str, i32)> = EXAMPLE_TOPICS
        .iter()
        .map(|&(t, p)| {
            (
                t,
                if t == input || t == decisions_topic {
                    args.partitions
                } else {
                    p
                },
            )
        })
        .collect();
    let exe = std::env::current_exe()?;
    let config = crate::config::example_config_dir().join("verdict.toml");
    let logs = tempfile::tempdir()?;
    println!(
        "verdict bench --processes: {} transactions per run (after {} warm-up) into `{input}` ({} partitions), one consumer group, broker and Redis on this machine ({} cores)",
        args.count,
        args.warmup,
        args.partitions,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    let mut rows = Vec::new();
    for &n in counts {
        // A fresh broker and Redis per process count. Reusing one group across counts hung
        // on Tansu: after the previous members stopped, new members sometimes never
        // completed their join (seen for the 3-member group in 4 of 7 runs; see the note of
        // issue 6). A fresh stack also keeps each measurement independent of the last.
        let (stack, w, _) = local_setup_with_topics(args.cards, 2_000, &topics).await?;
        anyhow::ensure!(n >= 1, "--processes: counts start at 1");
        let mut members = Vec::new();
        for i in 0..n {
            let log = logs.path().join(format!("verdict-{n}-{i}.log"));
            members.push(MeasuredProcess::verdict(
                &exe,
                &config,
                &stack.kafka_bootstrap,
                &stack.redis_url,
                &log,
            )?);
        }
        // Ready, and the group settled: every input partition owned by exactly one member.
        let settled = tokio::task::block_in_place(|| -> anyhow::Result<Vec<u64>> {
            let deadline = Instant::now() + Duration::from_secs(90);
            loop {
                if members.iter().all(MeasuredProcess::ready) {
                    let owned: Vec<u64> = members
                        .iter()
                        .map(|m| {
                            m.scrape().map(|s| {
                                sum(&s, "verdict_assigned_partitions", &[("workload", "fraud")])
                                    as u64
                            })
                        })
                        .collect::<anyhow::Result<_>>()?;
                    if owned.iter().sum::<u64>() == args.partitions as u64 {
                        return Ok(owned);
                    }
                }
                if Instant::now() > deadline {
                    let readiness: Vec<String> = members
                        .iter()
                        .map(|m| match m.metrics.map(|a| get(a, "/readyz")) {
                            Some(Ok((status, body))) => format!("{status}: {body}"),
                            Some(Err(e)) => e.to_string(),
                            None => "no endpoint".into(),
                        })
                        .collect();
                    eprintln!("readiness:\n{}", readiness.join("\n"));
                    let logs: Vec<String> = (0..n)
                        .map(|i| {
                            std::fs::read_to_string(
                                logs.path().join(format!("verdict-{n}-{i}.log")),
                            )
                            .unwrap_or_default()
                        })
                        .collect();
                    anyhow::bail!(
                        "{n} processes did not settle in 90 s; logs:\n{}",
                        logs.join("\n---\n")
                    );
                }
                std::thread::sleep(Duration::from_millis(250));
            }
        })?;
        let spec = DriveSpec {
            rate_per_sec: args.rate,
            seed: 11 + n as u64,
            settle_timeout: Duration::from_secs(120),
            producer_linger_ms: args.producer_linger_ms,
            fetch_wait_ms: args.fetch_wait_ms,
            ..DriveSpec::new(
                stack.kafka_bootstrap.clone(),
                input,
                decisions_topic,
                args.count,
                format!("scale{}-{n}", std::process::id()),
            )
        };
        let warmup = DriveSpec {
            count: args.warmup,
            run_id: format!("{}w", spec.run_id),
            ..spec.clone()
        };
        let fraud = [("workload", "fraud")];
        let (report, cpu, decided_before) =
            tokio::task::block_in_place(|| -> anyhow::Result<_> {
                if args.warmup > 0 {
                    drive(&w, &warmup)?;
                }
                let cpu_before: Vec<f64> = members
                    .iter()
                    .map(|m| m.cpu_seconds().unwrap_or(0.0))
                    .collect();
                let decided_before: Vec<u64> = members
                    .iter()
                    .map(|m| {
                        m.scrape()
                            .map(|s| sum(&s, "verdict_decisions_total", &fraud) as u64)
                    })
                    .collect::<anyhow::Result<_>>()?;
                let report = drive(&w, &spec)?;
                let cpu: f64 = members
                    .iter()
                    .zip(&cpu_before)
                    .map(|(m, before)| m.cpu_seconds().unwrap_or(0.0) - before)
                    .sum();
                Ok((report, cpu, decided_before))
            })?;
        let decisions: Vec<u64> = tokio::task::block_in_place(|| {
            members
                .iter()
                .zip(&decided_before)
                .map(|(m, b)| {
                    m.scrape()
                        .map(|s| sum(&s, "verdict_decisions_total", &fraud) as u64 - b)
                })
                .collect::<anyhow::Result<Vec<u64>>>()
        })?;
        for m in members {
            tokio::task::block_in_place(|| m.stop())?;
        }
        // The members have drained and committed; now the broker and Redis can go.
        drop(stack);
        let [p50, p99, _, _] = percentiles_ms(&report.latency_us);
        anyhow::ensure!(
            report.decided == report.sent,
            "{n} processes: {} of {} transactions got no decision",
            report.sent - report.decided,
            report.sent
        );
        println!(
            "  {n} process(es): {:>8.0} decisions/s  p50 {p50:.1} ms  p99 {p99:.1} ms  partitions per process {settled:?}  decisions per process {decisions:?}  verdict CPU {cpu:.1} s ({:.1} µs/decision)",
            report.throughput(),
            cpu * 1e6 / report.decided.max(1) as f64
        );
        rows.push(Row {
            processes: n,
            throughput: report.throughput(),
            p50_ms: p50,
            p99_ms: p99,
            partitions: settled,
            decisions,
            cpu_s: cpu,
            decided: report.decided,
        });
    }
    if let Some(first) = rows.first() {
        println!("  throughput relative to {} process(es):", first.processes);
        for r in &rows {
            println!(
                "    {} → {:.2}×",
                r.processes,
                r.throughput / first.throughput.max(1e-9)
            );
        }
    }
    if let Some(path) = &args.out {
        let result = json!({
            "count": args.count,
            "partitions": args.partitions,
            "offered_rate": args.rate,
            "cores": std::thread::available_parallelism().map(|n| n.get()).ok(),
            "runs": rows.iter().map(|r| json!({
                "processes": r.processes,
                "throughput_per_s": r.throughput,
                "latency_ms": {"p50": r.p50_ms, "p99": r.p99_ms},
                "partitions_per_process": r.partitions,
                "decisions_per_process": r.decisions,
                "verdict_cpu_s": r.cpu_s,
                "verdict_cpu_us_per_decision": r.cpu_s * 1e6 / r.decided.max(1) as f64,
            })).collect::<Vec<_>>(),
        });
        std::fs::write(path, serde_json::to_string_pretty(&result)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("  results written to {}", path.display());
    }
    Ok(())
}

//! `verdict bench --baseline python`: verdict and the Python baseline (`pipeline/bench/
//! baseline.py`: confluent-kafka + redis-py + numpy + onnxruntime, batched) on the same broker,
//! Redis, data and model, in one run, with both systems' figures and the ratios side by side.
//!
//! Each round produces `--count` fresh transactions to a topic of its own as a backlog, then
//! lets each system drain it from the start with its own consumer group and output topic:
//! verdict first (the example fraud workload, in this process, deadline and drift monitor off
//! since the baseline has neither), then the baseline as a child process. Throughput is
//! decisions over drain time (verdict: from readiness to the last `decision_time_ms`; the
//! baseline: from its first message to its last commit); CPU per decision comes from the
//! OS (for verdict, this process's /proc figures minus the harness reader thread's own CPU;
//! the reader's librdkafka threads stay billed, so verdict's is an upper bound; `getrusage`
//! for the baseline). Velocity state is shared and idempotent per
//! transaction id, so both compute the same features, and the round checks that every
//! transaction got the same decision from both (scores within 1e-5). Drain throughput is
//! what it measures; open-loop latency is `verdict bench --rate`.

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::json;

use crate::bench::{peak_rss_mib, process_cpu_seconds, BenchArgs};
use crate::config::repo_root;
use crate::demo::local_setup;
use crate::Pipeline;

/// One system's figures in one round.
#[derive(Debug, Clone, serde::Serialize)]
struct Figures {
    decisions: usize,
    seconds: f64,
    cpu_seconds: f64,
    peak_rss_mib: f64,
}

impl Figures {
    fn throughput(&self) -> f64 {
        self.decisions as f64 / self.seconds.max(1e-9)
    }

    fn cpu_us_per_decision(&self) -> f64 {
        self.cpu_seconds * 1e6 / self.decisions.max(1) as f64
    }
}

/// Transaction id → (decision, score), as a system decided a round.
type DecisionsById = HashMap<String, (String, f64)>;

/// The baseline's last line.
#[derive(serde::Deserialize)]
struct BaselineReport {
    decisions: usize,
    seconds: f64,
    cpu_seconds: f64,
    peak_rss_bytes: f64,
}

/// CPU seconds the calling thread has used.
fn thread_cpu_seconds() -> f64 {
    crate::bench::cpu_clock_seconds(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// What the reader of one topic saw.
struct Read {
    decisions: DecisionsById,
    /// The latest `decision_time_ms` among them.
    last_decided_ms: i64,
    /// CPU seconds the reading thread used (librdkafka's own threads not included).
    cpu_seconds: f64,
}

/// Reads `topic` from the start (assigned, not subscribed: no group join to wait for) until
/// `expected` distinct keys arrived or `timeout`.
fn read_decisions(
    brokers: &str,
    topic: &str,
    expected: usize,
    timeout: Duration,
) -> anyhow::Result<Read> {
    let cpu_at_start = thread_cpu_seconds();
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("baseline-reader-{topic}"))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "25")
        .create()?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let mut partitions = TopicPartitionList::new();
    for t in metadata.topics() {
        for p in t.partitions() {
            partitions.add_partition_offset(topic, p.id(), Offset::Beginning)?;
        }
    }
    consumer.assign(&partitions)?;
    let mut seen = HashMap::with_capacity(expected);
    let mut last_decided_ms = 0;
    let give_up = Instant::now() + timeout;
    while seen.len() < expected {
        anyhow::ensure!(
            Instant::now() < give_up,
            "{} of {expected} decisions on `{topic}` within {timeout:?}",
            seen.len()
        );
        let Some(message) = consumer.poll(Duration::from_millis(50)) else {
            continue;
        };
        let message = message?;
        let (Some(key), Some(payload)) = (message.key(), message.payload()) else {
            continue;
        };
        let value: serde_json::Value = serde_json::from_slice(payload)?;
        let decision = value["decision"].as_str().unwrap_or_default().to_string();
        let score = value["score"].as_f64().unwrap_or(f64::NAN);
        last_decided_ms = last_decided_ms.max(value["decision_time_ms"].as_i64().unwrap_or(0));
        seen.insert(String::from_utf8_lossy(key).into_owned(), (decision, score));
    }
    Ok(Read {
        decisions: seen,
        last_decided_ms,
        cpu_seconds: thread_cpu_seconds() - cpu_at_start,
    })
}

pub async fn run(args: &BenchArgs, rounds: usize) -> anyhow::Result<()> {
    let (stack, world, base_config) = local_setup(args.cards, 2_000).await?;
    let brokers = stack.kafka_bootstrap.clone();
    let python = repo_root().join(".venv/bin/python");
    anyhow::ensure!(
        python.is_file(),
        "{} not found: run deploy/setup.sh",
        python.display()
    );
    let mut results = Vec::new();
    for round in 0..rounds {
        let input = format!("transactions.round-{round}");
        let ours = format!("decisions.round-{round}");
        let theirs = format!("decisions.baseline.round-{round}");
        stack
            .create_topics(&[
                (input.as_str(), 3),
                (ours.as_str(), 3),
                (theirs.as_str(), 3),
                ("transactions.dead-letter.baseline", 1),
            ])
            .await?;

        // The data set: a backlog both systems drain from its start.
        let mut stream = world.transactions(7 + round as u64, &format!("round-{round}"), 0.01);
        let now = crate::workload::now_ms();
        let transactions: Vec<_> = (0..args.count)
            .map(|i| stream.next_at(now + i as i64))
            .collect();
        let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("linger.ms", "5")
            .create()?;
        for t in &transactions {
            let payload = serde_json::to_vec(t)?;
            let mut record = BaseRecord::to(&input).key(&t.card_id).payload(&payload);
            while let Err((_, back)) = producer.send(record) {
                record = back;
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        producer.flush(Duration::from_secs(60))?;

        // verdict.
        let mut config = base_config.clone();
        config.workloads.retain(|w| w.name == "fraud");
        config.kafka.group_id = format!("bench-round-{round}");
        for w in &mut config.workloads {
            w.input_topic = input.clone();
            w.decisions_topic = ours.clone();
            w.deadline = None;
            w.drift = None;
        }
        let pipeline = Pipeline::start(&config).await?;
        if let Some(http) = pipeline.http_address() {
            // Ready = the consumer joined: the drain starts now, as the baseline's clock
            // starts at its first message.
            while !matches!(crate::scrape::get(http, "/readyz"), Ok((200, _))) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let cpu_before = process_cpu_seconds().unwrap_or(0.0);
        let started_ms = crate::workload::now_ms();
        let (b, topic, n) = (brokers.clone(), ours.clone(), args.count);
        let read = tokio::task::spawn_blocking(move || {
            read_decisions(&b, &topic, n, Duration::from_secs(600))
        })
        .await??;
        let ours_decided = read.decisions;
        let cpu_after = process_cpu_seconds().unwrap_or(0.0);
        pipeline.stop();
        pipeline.wait().await?;
        let verdict = Figures {
            decisions: ours_decided.len(),
            seconds: (read.last_decided_ms - started_ms) as f64 / 1000.0,
            // The harness's reader thread is not verdict's work.
            cpu_seconds: cpu_after - cpu_before - read.cpu_seconds,
            peak_rss_mib: peak_rss_mib().unwrap_or(0.0),
        };

        // The Python baseline.
        let model = config.workloads[0].model.clone();
        let output = Command::new(&python)
            .arg(repo_root().join("pipeline/bench/baseline.py"))
            .args(["--brokers", &brokers, "--redis", &stack.redis_url])
            .args(["--input", &input, "--output", &theirs])
            .args(["--group", &format!("baseline-round-{round}")])
            .arg("--model")
            .arg(&model)
            .args(["--expect", &args.count.to_string()])
            .output()
            .context("running the Python baseline")?;
        anyhow::ensure!(
            output.status.success(),
            "the Python baseline failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let stdout = String::from_utf8_lossy(&output.stdout);
        let report: BaselineReport = serde_json::from_str(
            stdout
                .lines()
                .last()
                .context("the baseline printed nothing")?,
        )?;
        let baseline = Figures {
            decisions: report.decisions,
            seconds: report.seconds,
            cpu_seconds: report.cpu_seconds,
            peak_rss_mib: report.peak_rss_bytes / (1024.0 * 1024.0),
        };
        let (b, topic, n) = (brokers.clone(), theirs.clone(), args.count);
        let theirs_decided = tokio::task::spawn_blocking(move || {
            read_decisions(&b, &topic, n, Duration::from_secs(120))
        })
        .await??
        .decisions;

        // Same decisions?
        let mut different = Vec::new();
        let mut max_score_gap = 0.0f64;
        for (id, (decision, score)) in &ours_decided {
            match theirs_decided.get(id) {
                Some((d, s)) => {
                    max_score_gap = max_score_gap.max((s - score).abs());
                    if d != decision || (s - score).abs() > 1e-5 {
                        different.push(id.clone());
                    }
                }
                None => different.push(id.clone()),
            }
        }
        println!(
            "round {round}: {} transactions; verdict {:.0} tx/s, {:.1} µs CPU/decision; Python {:.0} tx/s, {:.1} µs CPU/decision; {} decisions differ (largest score gap {max_score_gap:.2e})",
            args.count,
            verdict.throughput(),
            verdict.cpu_us_per_decision(),
            baseline.throughput(),
            baseline.cpu_us_per_decision(),
            different.len(),
        );
        anyhow::ensure!(
            different.is_empty(),
            "verdict and the baseline disagree on {} transactions, e.g. {:?}",
            different.len(),
            &different[..different.len().min(5)]
        );
        results.push((verdict, baseline));
    }

    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let column = |f: &dyn Fn(&(Figures, Figures)) -> f64| median(results.iter().map(f).collect());
    let rows = [
        (
            "throughput (tx/s)",
            column(&|r| r.0.throughput()),
            column(&|r| r.1.throughput()),
        ),
        (
            "CPU per decision (µs)",
            column(&|r| r.0.cpu_us_per_decision()),
            column(&|r| r.1.cpu_us_per_decision()),
        ),
        (
            "peak RSS (MiB)",
            column(&|r| r.0.peak_rss_mib),
            column(&|r| r.1.peak_rss_mib),
        ),
    ];
    println!();
    println!(
        "fraud workload, MLP, {} transactions drained, median of {rounds} rounds",
        args.count
    );
    println!(
        "  {:24} {:>12} {:>12} {:>10}",
        "", "verdict", "Python", "ratio"
    );
    for (name, ours, theirs) in &rows {
        let ratio = if name.starts_with("throughput") {
            ours / theirs.max(1e-9)
        } else {
            theirs / ours.max(1e-9)
        };
        println!("  {name:24} {ours:>12.1} {theirs:>12.1} {ratio:>9.1}×");
    }
    println!("  (ratio: how many times better verdict is; verdict's CPU excludes the harness's reader thread but not its librdkafka threads)");
    if let Some(path) = &args.out {
        let report = json!({
            "workload": "fraud",
            "model": "fraud-mlp",
            "transactions_per_round": args.count,
            "rounds": results.iter().map(|(v, b)| json!({"verdict": v, "python": b})).collect::<Vec<_>>(),
            "median": {
                "verdict": {"throughput": rows[0].1, "cpu_us_per_decision": rows[1].1, "peak_rss_mib": rows[2].1},
                "python": {"throughput": rows[0].2, "cpu_us_per_decision": rows[1].2, "peak_rss_mib": rows[2].2},
                "throughput_ratio": rows[0].1 / rows[0].2.max(1e-9),
                "cpu_ratio": rows[1].2 / rows[1].1.max(1e-9),
            },
        });
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
        println!("results written to {}", path.display());
    }
    Ok(())
}

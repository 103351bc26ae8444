//! The operations endpoint under real traffic (Tansu broker, redis-server, the example
//! config's two workloads): `/metrics` passes `promtool check metrics`, its counters add up
//! to the messages sent, every metric the Grafana dashboard and the alert rules use is really
//! exported, and `/healthz` / `/readyz` answer as Kubernetes probes expect.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use std::io::Write;
use verdict::demo::{sample_bad_messages, EXAMPLE_TOPICS};
use verdict::Pipeline;
use verdict_tests::scrape::{families, get, referenced_metrics, samples, sum};
use verdict_tests::{as_messages, produce, Collector, Harness};

fn repo_file(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// Polls `check` on fresh scrapes until it holds or `timeout` passes.
fn wait_for_scrape(
    address: std::net::SocketAddr,
    timeout: Duration,
    what: &str,
    check: impl Fn(&str) -> bool,
) -> anyhow::Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let (status, body) = get(address, "/metrics")?;
        if status == 200 && check(&body) {
            return Ok(body);
        }
        if Instant::now() > deadline {
            anyhow::bail!("timed out waiting for {what}; last scrape:\n{body}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `promtool check metrics` on a scrape body.
fn promtool_check(text: &str) -> anyhow::Result<()> {
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            anyhow::anyhow!(
                "promtool (Debian package prometheus, installed by deploy/test.sh): {e}"
            )
        })?;
    promtool
        .stdin
        .take()
        .expect("piped")
        .write_all(text.as_bytes())?;
    let checked = promtool.wait_with_output()?;
    anyhow::ensure!(
        checked.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_add_up_to_the_traffic_and_pass_promtool() -> anyhow::Result<()> {
    // More than the fraud drift window (2,000 rows), so drift statistics are exported too.
    const GOOD: usize = 2_500;
    let harness = Harness::start(3_000, 1_000).await?;
    let brokers = harness.stack.kafka_bootstrap.clone();
    let decisions = Collector::start(&brokers, harness.decisions_topic())?;
    let pipeline = Pipeline::start(&harness.config).await?;
    let address = pipeline
        .http_address()
        .expect("the example config serves [http]");

    tokio::task::block_in_place(|| -> anyhow::Result<()> {
        assert_eq!(get(address, "/healthz")?.0, 200);
        // Ready once both workloads' consumers have joined their groups and Redis answered.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (status, body) = get(address, "/readyz")?;
            if status == 200 {
                assert!(
                    body.contains("[+] workload fraud: consumer joined"),
                    "{body}"
                );
                break;
            }
            assert_eq!(status, 503, "{body}");
            anyhow::ensure!(Instant::now() < deadline, "never ready:\n{body}");
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    })?;

    let mut messages = as_messages(&harness.transactions(GOOD, "observability", 0.0));
    let bad = sample_bad_messages();
    for (i, payload) in bad.iter().enumerate() {
        messages.insert(i * 400, (format!("bad-{i}"), payload.clone()));
    }
    let topic = harness.input_topic().to_string();
    let producer_brokers = brokers.clone();
    let sent = (GOOD + bad.len()) as f64;
    // Paced, so scrapes land while messages are still being consumed and decided.
    let producer = tokio::task::spawn_blocking(move || {
        produce(&producer_brokers, &topic, &messages, Some(2_000.0))
    });
    let mid_flow = tokio::task::block_in_place(|| -> anyhow::Result<String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (_, body) = get(address, "/metrics")?;
            let consumed = sum(
                &samples(&body),
                "verdict_messages_consumed_total",
                &[("workload", "fraud")],
            );
            if consumed > 0.0 && consumed < sent {
                return Ok(body);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "no scrape caught traffic flowing"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    })?;
    producer.await??;

    let text = tokio::task::block_in_place(|| -> anyhow::Result<String> {
        decisions.wait_until(Duration::from_secs(120), "every decision", |c| {
            c.distinct_keys() >= GOOD
        })?;
        // Metrics are recorded when a batch is acknowledged; lag comes from librdkafka's
        // statistics every 5 s, drift statistics when the monitor closes its window.
        wait_for_scrape(
            address,
            Duration::from_secs(30),
            "counters, lag and drift",
            |body| {
                let s = samples(body);
                let fraud = [("workload", "fraud")];
                sum(&s, "verdict_decisions_total", &fraud)
                    + sum(&s, "verdict_dead_letters_total", &fraud)
                    >= sent
                    && s.iter().any(|x| {
                        x.name == "verdict_consumer_lag_messages" && x.labels["workload"] == "fraud"
                    })
                    && sum(&s, "verdict_consumer_lag_messages", &fraud) == 0.0
                    && sum(&s, "verdict_drift_windows_total", &fraud) >= 1.0
            },
        )
    })?;
    pipeline.stop();
    pipeline.wait().await?;
    decisions.stop()?;

    // The format, as Prometheus's own checker sees it: mid-flow and after.
    promtool_check(&mid_flow)?;
    promtool_check(&text)?;
    // Counters only grow.
    let (before, after) = (samples(&mid_flow), samples(&text));
    for name in [
        "verdict_messages_consumed_total",
        "verdict_decisions_total",
        "verdict_batch_messages_count",
    ] {
        let fraud = [("workload", "fraud")];
        assert!(
            sum(&before, name, &fraud) <= sum(&after, name, &fraud),
            "{name}"
        );
    }

    // The counters add up to the traffic.
    let s = samples(&text);
    let fraud = [("workload", "fraud")];
    assert_eq!(sum(&s, "verdict_messages_consumed_total", &fraud), sent);
    assert_eq!(sum(&s, "verdict_decisions_total", &fraud), GOOD as f64);
    assert_eq!(
        sum(&s, "verdict_dead_letters_total", &fraud),
        bad.len() as f64
    );
    for (cause, n) in [
        ("invalid-json", 1.0),
        ("not-utf8", 1.0),
        ("empty-payload", 1.0),
        ("schema-mismatch", 2.0),
    ] {
        assert_eq!(
            sum(
                &s,
                "verdict_dead_letters_total",
                &[("workload", "fraud"), ("cause", cause)]
            ),
            n,
            "cause {cause}"
        );
    }
    assert_eq!(
        sum(
            &s,
            "verdict_messages_consumed_total",
            &[("workload", "pricing")]
        ),
        0.0
    );
    assert_eq!(
        sum(
            &s,
            "verdict_end_to_end_latency_seconds_count",
            &[("workload", "fraud"), ("from", "consume")]
        ),
        GOOD as f64
    );
    assert_eq!(
        sum(
            &s,
            "verdict_end_to_end_latency_seconds_count",
            &[("workload", "fraud"), ("from", "event_time")]
        ),
        GOOD as f64
    );
    let batches = sum(&s, "verdict_batch_messages_count", &fraud);
    assert!(batches >= 1.0);
    assert_eq!(sum(&s, "verdict_batch_messages_sum", &fraud), sent);
    for stage in ["decode", "feature_lookup", "join", "score", "produce"] {
        assert_eq!(
            sum(
                &s,
                "verdict_stage_duration_seconds_count",
                &[("workload", "fraud"), ("stage", stage)]
            ),
            batches,
            "one {stage} timing per batch"
        );
    }
    assert_eq!(
        sum(&s, "verdict_feature_store_round_trip_seconds_count", &fraud),
        batches
    );
    assert_eq!(sum(&s, "verdict_batches_in_flight", &fraud), 0.0);
    assert_eq!(sum(&s, "verdict_degraded_decisions_total", &fraud), 0.0);
    assert_eq!(sum(&s, "verdict_feature_store_up", &[]), 1.0);
    let partitions = EXAMPLE_TOPICS
        .iter()
        .find(|(t, _)| *t == harness.input_topic())
        .map(|(_, p)| *p)
        .unwrap_or(0);
    assert_eq!(
        sum(&s, "verdict_assigned_partitions", &fraud),
        partitions as f64
    );
    let model = s
        .iter()
        .find(|x| x.name == "verdict_model_info" && x.labels["workload"] == "fraud")
        .expect("model info");
    assert_eq!(model.labels["model"], "fraud-mlp");
    assert_eq!(model.labels["sha256"].len(), 64);
    assert!(s.iter().any(|x| x.name == "verdict_drift_statistic"
        && x.labels["workload"] == "fraud"
        && x.labels["statistic"] == "psi"));
    // No per-card or per-transaction label, ever.
    for x in &s {
        for key in x.labels.keys() {
            assert!(
                !["card", "card_id", "transaction_id", "customer"].contains(&key.as_str()),
                "{x:?}"
            );
        }
    }

    // Everything the dashboard and the alert rules query is something verdict exports.
    let exported = families(&text);
    for file in [
        "deploy/grafana/dashboards/verdict.json",
        "deploy/prometheus/alerts.yml",
    ] {
        let referenced = referenced_metrics(&std::fs::read_to_string(repo_file(file))?);
        assert!(referenced.len() >= 5, "{file}: {referenced:?}");
        for name in referenced {
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .filter(|base| exported.contains(*base))
                .unwrap_or(&name);
            assert!(
                exported.contains(family),
                "{file} uses {name}, which verdict does not export"
            );
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_fails_when_a_workload_cannot_start_or_redis_is_down_by_policy(
) -> anyhow::Result<()> {
    let mut harness = Harness::start(10, 10).await?;
    // Nothing listens on this port: Redis is down.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    harness.config.redis.url = format!("redis://{closed}");
    harness.config.redis.response_timeout = Duration::from_millis(200);
    let http = harness.config.http.as_mut().expect("[http]");
    http.ready_while_feature_store_down = false;
    http.health_check_interval = Duration::from_millis(200);
    harness.config.workloads[1].model = repo_file("scorers/models/no-such-model");
    let pipeline = Pipeline::start(&harness.config).await?;
    let address = pipeline.http_address().expect("[http]");

    let (status, body, text) = tokio::task::block_in_place(|| -> anyhow::Result<_> {
        // Give the consumers time to join: readiness must still fail, for the other reasons.
        std::thread::sleep(Duration::from_secs(3));
        let (status, body) = get(address, "/readyz")?;
        Ok((status, body, get(address, "/metrics")?.1))
    })?;
    assert_eq!(get(address, "/healthz")?.0, 200, "alive though not ready");
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("[-] workload pricing: failed to start"),
        "{body}"
    );
    assert!(body.contains("[-] feature store unreachable"), "{body}");
    let s = samples(&text);
    assert_eq!(
        sum(&s, "verdict_workload_up", &[("workload", "pricing")]),
        0.0
    );
    assert_eq!(
        sum(&s, "verdict_workload_up", &[("workload", "fraud")]),
        1.0
    );
    assert_eq!(sum(&s, "verdict_feature_store_up", &[]), 0.0);
    pipeline.stop();
    pipeline.wait().await?;
    Ok(())
}

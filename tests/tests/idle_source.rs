//! The source is a task that librdkafka wakes, not a thread that polls: a running pipeline
//! has no `source-<workload>` thread, an idle one costs its runtime's workers next to nothing,
//! and transactions produced after the idle spell are decided (the wake-up still works).

use std::time::{Duration, Instant};

use verdict::Pipeline;
use verdict_tests::{as_messages, produce, Collector, Harness};

/// The runtime's threads as `/proc` shows them (workers and blocking threads alike).
const RUNTIME_THREAD: &str = "tokio-rt-worker";

/// Nanoseconds on a CPU of every thread of this process named `name`
/// (`/proc/self/task/<tid>/schedstat`).
fn cpu_ns_of_threads(name: &str) -> u64 {
    thread_names_and_cpu()
        .into_iter()
        .filter(|(comm, _)| comm == name)
        .map(|(_, ns)| ns)
        .sum()
}

fn thread_names_and_cpu() -> Vec<(String, u64)> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    tasks
        .flatten()
        .map(|task| {
            let path = task.path();
            let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
            let ns = std::fs::read_to_string(path.join("schedstat"))
                .unwrap_or_default()
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
            (comm.trim_end().to_string(), ns)
        })
        .collect()
}

async fn decide(
    harness: &Harness,
    decisions: &Collector,
    run_id: &str,
    expected_total: usize,
) -> anyhow::Result<()> {
    let transactions = harness.transactions(100, run_id, 0.0);
    let messages = as_messages(&transactions);
    let brokers = harness.stack.kafka_bootstrap.clone();
    let topic = harness.input_topic().to_string();
    tokio::task::spawn_blocking(move || produce(&brokers, &topic, &messages, None)).await??;
    tokio::task::block_in_place(|| {
        decisions.wait_until(
            Duration::from_secs(60),
            "a decision for every transaction",
            |c| c.distinct_keys() >= expected_total,
        )
    })?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_source_sleeps_until_librdkafka_wakes_it() -> anyhow::Result<()> {
    let harness = Harness::start(200, 50).await?;
    let decisions = Collector::start(&harness.stack.kafka_bootstrap, harness.decisions_topic())?;
    let pipeline = Pipeline::start(&harness.config).await?;
    let http = pipeline.http_address().expect("http configured");
    verdict_tests::wait_until_ready(http, Duration::from_secs(60)).await?;
    decide(&harness, &decisions, "before-idle", 100).await?;

    let source_threads: Vec<String> = thread_names_and_cpu()
        .into_iter()
        .map(|(comm, _)| comm)
        .filter(|comm| comm.starts_with("source-"))
        .collect();
    assert!(
        source_threads.is_empty(),
        "the sources run as tasks, yet these threads exist: {source_threads:?}"
    );

    // Let the last batch's acknowledgements and commits settle, then measure an idle spell.
    tokio::time::sleep(Duration::from_secs(1)).await;
    const IDLE: Duration = Duration::from_secs(3);
    let started = Instant::now();
    let before = cpu_ns_of_threads(RUNTIME_THREAD);
    tokio::time::sleep(IDLE).await;
    let idle_ms = (cpu_ns_of_threads(RUNTIME_THREAD) - before) as f64 / 1e6;
    let measured_over = started.elapsed();
    // Two sources waking every 50 ms to look at shutdown and acks, librdkafka's statistics
    // and the health checks cost a few milliseconds a second; a source that polled in a loop
    // instead of sleeping on its socket would cost a core.
    const IDLE_BOUND_MS: f64 = 60.0;
    assert!(
        idle_ms < IDLE_BOUND_MS,
        "the runtime's threads spent {idle_ms:.1} ms of CPU over {measured_over:?} of idling \
         (bound {IDLE_BOUND_MS} ms)"
    );
    println!("runtime threads idle: {idle_ms:.1} ms of CPU over {measured_over:?}");

    decide(&harness, &decisions, "after-idle", 200).await?;
    pipeline.stop();
    let reports = pipeline.wait().await?;
    assert_eq!(reports[0].decisions, 200);
    decisions.stop()?;
    Ok(())
}

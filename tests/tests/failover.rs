//! Crash and rebalance safety beyond a single process:
//! - two `verdict run` processes share the consumer group over a real broker (Tansu); one is
//!   killed with SIGKILL mid-stream, and the survivor takes over its partitions: no
//!   transaction is lost;
//! - a second process joins while the first is busy: the first hands partitions over at the
//!   revocation (its source waits for its in-flight batches and commits them first, and drops
//!   the revoked partitions' messages from its open batch): no transaction is lost and none is
//!   decided twice;
//! - a broker outage of several seconds (librdkafka's mock cluster, the one place a broker
//!   can be taken down and brought back on cue) with a real redis-server: nothing is lost and
//!   the pipeline recovers by itself.

use std::collections::HashMap;
use std::time::Duration;

use verdict::Pipeline;
use verdict_tests::{as_messages, produce, Collector, Harness, MockStack, VerdictProcess};

/// Transactions in the tests with `verdict run` processes.
const COUNT: usize = 8_000;

/// What the tests with `verdict run` processes share: a broker and Redis, the processes'
/// config file, a decisions collector, and `COUNT` transactions to produce.
struct Processes {
    /// Holds the servers for the test's length.
    _harness: Harness,
    dir: tempfile::TempDir,
    config_path: std::path::PathBuf,
    brokers: String,
    decisions: Collector,
    transactions: Vec<verdict::generator::Transaction>,
    messages: Vec<(String, Vec<u8>)>,
    topic: String,
}

impl Processes {
    async fn prepare(run_id: &str) -> anyhow::Result<Self> {
        let harness = Harness::start(1_000, 200).await?;
        let brokers = harness.stack.kafka_bootstrap.clone();
        let dir = tempfile::tempdir()?;
        let config_path = harness.write_process_config(dir.path(), |text| text)?;
        let decisions = Collector::start(&brokers, harness.decisions_topic())?;
        let transactions = harness.transactions(COUNT, run_id, 0.0);
        let messages = as_messages(&transactions);
        let topic = harness.input_topic().to_string();
        Ok(Self {
            _harness: harness,
            dir,
            config_path,
            brokers,
            decisions,
            transactions,
            messages,
            topic,
        })
    }
}

fn missing(
    transactions: &[verdict::generator::Transaction],
    received: &[verdict_tests::Received],
) -> Vec<String> {
    let mut per_id: HashMap<&str, usize> = HashMap::new();
    for r in received {
        if let Some(k) = r.key.as_deref() {
            *per_id.entry(k).or_default() += 1;
        }
    }
    transactions
        .iter()
        .filter(|t| !per_id.contains_key(t.transaction_id.as_str()))
        .map(|t| t.transaction_id.clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_survivor_of_two_processes_takes_over_and_nothing_is_lost() -> anyhow::Result<()> {
    let Processes {
        _harness,
        dir,
        config_path,
        brokers,
        decisions,
        transactions,
        messages,
        topic,
    } = Processes::prepare("failover").await?;

    tokio::task::block_in_place(|| -> anyhow::Result<()> {
        let mut first = VerdictProcess::spawn(&config_path, &dir.path().join("first.log"));
        let mut second = VerdictProcess::spawn(&config_path, &dir.path().join("second.log"));
        first.wait_ready(Duration::from_secs(60))?;
        second.wait_ready(Duration::from_secs(60))?;
        let b = brokers.clone();
        let producer = std::thread::spawn(move || produce(&b, &topic, &messages, Some(800.0)));
        decisions.wait_until(Duration::from_secs(90), "decisions from both", |c| {
            c.distinct_keys() >= 2_000
        })?;
        // Both processes own partitions of the 3 before one dies.
        let log = |name: &str| std::fs::read_to_string(dir.path().join(name)).unwrap_or_default();
        anyhow::ensure!(
            log("first.log").contains("partitions assigned")
                && log("second.log").contains("partitions assigned"),
            "both processes joined"
        );
        first.crash();
        let result = decisions.wait_until(
            Duration::from_secs(120),
            "a decision for every transaction from the survivor",
            |c| c.distinct_keys() >= COUNT,
        );
        producer
            .join()
            .map_err(|_| anyhow::anyhow!("producer panicked"))??;
        let status = second.terminate();
        result?;
        anyhow::ensure!(status.success(), "the survivor stops cleanly, got {status}");
        Ok(())
    })?;
    let received = decisions.stop()?;
    let lost = missing(&transactions, &received);
    assert!(
        lost.is_empty(),
        "{} lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    eprintln!(
        "{COUNT} transactions, {} decisions ({} duplicates) after one of two processes was killed",
        received.len(),
        received.len() - COUNT
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_joining_mid_stream_takes_partitions_over_and_nothing_is_lost(
) -> anyhow::Result<()> {
    let Processes {
        _harness,
        dir,
        config_path,
        brokers,
        decisions,
        transactions,
        messages,
        topic,
    } = Processes::prepare("join").await?;

    let log = |name: &str| std::fs::read_to_string(dir.path().join(name)).unwrap_or_default();
    tokio::task::block_in_place(|| -> anyhow::Result<()> {
        let mut first = VerdictProcess::spawn(&config_path, &dir.path().join("first.log"));
        first.wait_ready(Duration::from_secs(60))?;
        let b = brokers.clone();
        let producer = std::thread::spawn(move || produce(&b, &topic, &messages, Some(800.0)));
        decisions.wait_until(Duration::from_secs(90), "decisions from the first", |c| {
            c.distinct_keys() >= 2_000
        })?;
        // Joins while the first has batches in flight: the first's revocation runs inside its
        // source's poll, on a runtime worker, and must wait for them without stalling the
        // stages that deliver them.
        let mut second = VerdictProcess::spawn(&config_path, &dir.path().join("second.log"));
        second.wait_ready(Duration::from_secs(60))?;
        let result = decisions.wait_until(
            Duration::from_secs(120),
            "a decision for every transaction",
            |c| c.distinct_keys() >= COUNT,
        );
        producer
            .join()
            .map_err(|_| anyhow::anyhow!("producer panicked"))??;
        let second_status = second.terminate();
        let first_status = first.terminate();
        result?;
        anyhow::ensure!(
            first_status.success() && second_status.success(),
            "both stop cleanly, got {first_status} and {second_status}"
        );
        Ok(())
    })?;
    let (first_log, second_log) = (log("first.log"), log("second.log"));
    assert!(
        second_log.contains("partitions assigned"),
        "the second process got partitions"
    );
    let handed_over = first_log
        .lines()
        .find(|l| l.contains("partitions revoked"))
        .expect("the first process gave partitions up");
    assert!(
        handed_over.contains("unacknowledged_batches=0"),
        "the first finished its in-flight batches before giving partitions up: {handed_over}"
    );
    // Anything decided twice would arrive by now.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let received = decisions.stop()?;
    let lost = missing(&transactions, &received);
    assert!(
        lost.is_empty(),
        "{} lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    let dropped: Vec<&str> = first_log
        .lines()
        .chain(second_log.lines())
        .filter(|l| l.contains("left to their next owner"))
        .collect();
    eprintln!(
        "{COUNT} transactions, {} decisions ({} duplicates) with a second process joining; \
         open batches at the revocations: {dropped:#?}",
        received.len(),
        received.len() - COUNT
    );
    // A clean hand-over decides nothing twice: the in-flight batches are committed before the
    // partitions move, and the open batch drops what it holds of them. (With the open batch
    // left alone, 3 runs in 8 decided 1-6 transactions twice.) Duplicates remain the contract
    // after a crash, not after a join.
    if received.len() > COUNT {
        let mut per_id: HashMap<&str, Vec<(i32, i64)>> = HashMap::new();
        for r in &received {
            if let Some(k) = r.key.as_deref() {
                per_id.entry(k).or_default().push((r.partition, r.offset));
            }
        }
        let twice: Vec<_> = per_id.iter().filter(|(_, p)| p.len() > 1).collect();
        for (name, log) in [("first", &first_log), ("second", &second_log)] {
            for line in log.lines().filter(|l| !l.contains(" DEBUG ")) {
                eprintln!("{name}: {line}");
            }
        }
        panic!(
            "{} transactions decided more than once (decision partition, offset): {twice:?}",
            twice.len()
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_loses_nothing_and_the_pipeline_recovers() -> anyhow::Result<()> {
    let stack = MockStack::start().await?;
    let (cluster, brokers, world, config) =
        (&stack.cluster, stack.brokers(), &stack.world, &stack.config);
    let pipeline = Pipeline::start(config).await?;
    let http = pipeline.http_address().expect("http configured");
    verdict_tests::wait_until_ready(http, Duration::from_secs(60)).await?;

    // 8 s of traffic at 500 tx/s; the broker is down from 2 s to 7 s.
    let mut stream = world.transactions(7, "outage", 0.0);
    let now = verdict::workload::now_ms();
    let transactions: Vec<_> = (0..4_000).map(|i| stream.next_at(now + i)).collect();
    let messages = as_messages(&transactions);
    let b = brokers.clone();
    let producer = std::thread::spawn(move || produce(&b, "transactions", &messages, Some(500.0)));
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.broker_down(1)?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    cluster.broker_up(1)?;
    // The decisions are read after the outage by a consumer of their own (one that lived
    // through the outage is librdkafka's to recover, not the pipeline's).
    let decisions = Collector::start(&brokers, "decisions")?;
    let waited = tokio::task::block_in_place(|| -> anyhow::Result<()> {
        producer
            .join()
            .map_err(|_| anyhow::anyhow!("producer panicked"))??;
        decisions.wait_until(
            Duration::from_secs(120),
            "every decision after the outage",
            |c| c.distinct_keys() >= transactions.len(),
        )
    });
    if let Err(e) = waited {
        // What the pipeline saw, for the failure message.
        let (_, metrics) = verdict::scrape::get(http, "/metrics")?;
        let seen: Vec<&str> = metrics
            .lines()
            .filter(|l| {
                l.contains("workload=\"fraud\"")
                    && [
                        "consumed",
                        "decisions_total",
                        "errors_total",
                        "assigned",
                        "in_flight",
                    ]
                    .iter()
                    .any(|k| l.contains(k))
            })
            .collect();
        anyhow::bail!("{e}\n{}", seen.join("\n"));
    }
    pipeline.stop();
    let reports = pipeline.wait().await?;
    let received = decisions.stop()?;
    let lost = missing(&transactions, &received);
    assert!(
        lost.is_empty(),
        "{} lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    let fraud = reports
        .iter()
        .find(|r| r.name == "fraud")
        .expect("fraud ran");
    assert_eq!(fraud.dead_letters, 0);
    eprintln!(
        "{} transactions, {} decisions across a 5 s broker outage",
        transactions.len(),
        received.len()
    );
    Ok(())
}

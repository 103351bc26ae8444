//! Past capacity, every transaction is still answered inside its budget: a burst far above
//! what the pipeline can score on this machine, with a 150 ms budget measured from each
//! transaction's event time (set as it is produced). Every transaction gets exactly one
//! answer; every model answer was decided within the budget; the late ones are the
//! workload's fallback, marked as such, with the rule's outcome; the source paused its
//! partitions rather than buffer the backlog.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use verdict::config::{BudgetStart, DeadlineConfig, FallbackConfig};
use verdict::generator::Transaction;
use verdict::scrape;
use verdict::workload::now_ms;
use verdict::Pipeline;
use verdict_tests::{Collector, Harness};

const BUDGET_MS: i64 = 150;
const APPROVE_UP_TO: f64 = 50.0;

/// Produces at `rate` per second, stamping each event time at send.
fn burst(
    brokers: &str,
    topic: &str,
    transactions: &mut [Transaction],
    rate: f64,
) -> anyhow::Result<()> {
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "1000000")
        .create()?;
    let started = Instant::now();
    for (i, t) in transactions.iter_mut().enumerate() {
        let due = started + Duration::from_secs_f64(i as f64 / rate);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        t.event_time_ms = now_ms();
        let payload = serde_json::to_vec(&*t)?;
        let mut record = BaseRecord::to(topic)
            .key(t.card_id.as_str())
            .payload(payload.as_slice());
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, back)) => {
                    record = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }
    producer.flush(Duration::from_secs(60))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_past_capacity_is_answered_in_budget_or_by_marked_fallbacks() -> anyhow::Result<()>
{
    let mut harness = Harness::start(2_000, 200).await?;
    let fraud = &mut harness.config.workloads[0];
    // Small batches: a fixed per-batch cost caps the pipeline well below the offered rate,
    // so the overload is certain on any machine.
    fraud.batch.max_rows = 32;
    // Exercise the pause/resume path: with the defaults the bounded channels block the
    // source before this many batches are in flight (see the config docs).
    fraud.pause_at_batches_in_flight = 16;
    fraud.resume_at_batches_in_flight = 12;
    fraud.deadline = Some(DeadlineConfig {
        budget: Duration::from_millis(BUDGET_MS as u64),
        measured_from: BudgetStart::EventTime,
        event_time_column: "event_time_ms".into(),
        fallback: FallbackConfig::FraudRule {
            id_column: "transaction_id".into(),
            amount_column: "amount".into(),
            approve_up_to: APPROVE_UP_TO,
            otherwise: "review".into(),
        },
    });
    let brokers = harness.stack.kafka_bootstrap.clone();
    let decisions = Collector::start(&brokers, harness.decisions_topic())?;
    let pipeline = Pipeline::start(&harness.config).await?;
    let http = pipeline.http_address().expect("http configured");
    // Produce only once the consumers have joined: event times start counting at once.
    verdict_tests::wait_until_ready(http, Duration::from_secs(60)).await?;

    // 40,000 tx/s for 3 s. 20,000 was not enough in a fast phase of the 2-core CI host: all
    // 60,000 were decided by the model within 33 ms of their event time.
    let mut transactions = harness.transactions(120_000, "overload", 0.0);
    let topic = harness.input_topic().to_string();
    let started = Instant::now();
    let b = brokers.clone();
    let transactions = tokio::task::spawn_blocking(move || {
        burst(&b, &topic, &mut transactions, 40_000.0).map(|()| transactions)
    })
    .await??;
    let produced_in = started.elapsed();
    tokio::task::block_in_place(|| {
        decisions.wait_until(
            Duration::from_secs(180),
            "an answer for every transaction",
            |c| c.distinct_keys() >= transactions.len(),
        )
    })?;
    let answered_in = started.elapsed();
    let (_, metrics) = scrape::get(http, "/metrics")?;
    pipeline.stop();
    pipeline.wait().await?;
    let received = decisions.stop()?;

    let amounts: HashMap<&str, f64> = transactions
        .iter()
        .map(|t| (t.transaction_id.as_str(), t.amount))
        .collect();
    let mut by_id: HashMap<String, serde_json::Value> = HashMap::new();
    for r in &received {
        let d: serde_json::Value = serde_json::from_slice(&r.payload)?;
        by_id.insert(r.key.clone().unwrap_or_default(), d);
    }
    assert_eq!(
        by_id.len(),
        transactions.len(),
        "every transaction answered"
    );

    let (mut model, mut fallbacks, mut worst_model_ms) = (0usize, 0usize, 0i64);
    for (id, d) in &by_id {
        let took = d["decision_time_ms"].as_i64().unwrap() - d["event_time_ms"].as_i64().unwrap();
        match d.get("fallback").and_then(|f| f.as_str()) {
            None => {
                model += 1;
                worst_model_ms = worst_model_ms.max(took);
                assert!(d["score"].is_number());
                assert!(
                    took <= BUDGET_MS,
                    "{id}: a model answer decided {took} ms after its event time, budget {BUDGET_MS}"
                );
            }
            Some(reason) => {
                fallbacks += 1;
                assert_eq!(reason, "deadline");
                assert!(d["score"].is_null(), "a fallback has no model score: {d}");
                let expected = if amounts[id.as_str()] <= APPROVE_UP_TO {
                    "approve"
                } else {
                    "review"
                };
                assert_eq!(d["decision"], expected, "{id}: the fallback rule's outcome");
            }
        }
    }
    let pauses = scrape::sum(
        &scrape::samples(&metrics),
        "verdict_source_pauses_total",
        &[("workload", "fraud")],
    );
    eprintln!(
        "{} transactions produced in {produced_in:?}, all answered after {answered_in:?}: \
         {model} model answers (slowest decided {worst_model_ms} ms after event time), \
         {fallbacks} fallbacks; source paused {pauses} times",
        transactions.len()
    );
    assert!(
        fallbacks > 0,
        "the burst did not exceed capacity: no fallback was needed"
    );
    assert!(model > 0, "no model answer at all");
    assert!(pauses > 0.0, "the source never paused its partitions");
    Ok(())
}

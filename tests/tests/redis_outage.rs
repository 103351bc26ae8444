//! Redis trouble degrades, it does not stop: the real `redis-server` is killed (SIGKILL)
//! mid-stream and restarted seconds later on the same port, while transactions flow through
//! a real broker. Every transaction gets a decision; those decided during the outage say
//! `"degraded": "feature-store-unavailable"` and list the features that took their defaults;
//! those after the restart are normal again, without restarting the pipeline.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use verdict::workload::now_ms;
use verdict::Pipeline;
use verdict_tests::{as_messages, produce, Collector, Harness};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_crash_is_scored_degraded_and_recovers_by_itself() -> anyhow::Result<()> {
    let mut harness = Harness::start(500, 100).await?;
    // Lookups give up quickly so the outage shows within the test's time; reconnects too.
    harness.config.redis.response_timeout = Duration::from_millis(200);
    harness.config.redis.connect_timeout = Duration::from_millis(200);
    let redis_url = harness.stack.redis_url.clone();
    {
        // Snapshot the features, so the restarted server comes back with them.
        let client = redis::Client::open(redis_url.as_str())?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("SAVE").query_async::<()>(&mut conn).await?;
    }
    let brokers = harness.stack.kafka_bootstrap.clone();
    let decisions = Collector::start(&brokers, harness.decisions_topic())?;
    let pipeline = Pipeline::start(&harness.config).await?;
    let http = pipeline.http_address().expect("http configured");
    verdict_tests::wait_until_ready(http, Duration::from_secs(60)).await?;

    // 11 s of traffic at 800 tx/s; Redis is down from 3 s to 7 s.
    let rate = 800.0;
    let transactions = harness.transactions(8_800, "outage", 0.0);
    let messages = as_messages(&transactions);
    let topic = harness.input_topic().to_string();
    let started = Instant::now();
    let started_ms = now_ms();
    let producer = {
        let brokers = brokers.clone();
        tokio::task::spawn_blocking(move || produce(&brokers, &topic, &messages, Some(rate)))
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Decisions before `kill_started_ms` were looked up while Redis was alive; lookups after
    // `killed_ms` find it dead. Between the two, either.
    let kill_started_ms = now_ms();
    harness.stack.kill_redis()?;
    let killed_ms = now_ms();
    tokio::time::sleep(Duration::from_secs(4)).await;
    // Redis may answer before `restart_redis` returns (it polls the port): "during" ends at
    // the restart's start.
    let restart_started_ms = now_ms();
    harness.stack.restart_redis()?;
    let restarted_ms = now_ms();
    producer.await??;
    let produced_for = started.elapsed();

    tokio::task::block_in_place(|| {
        decisions.wait_until(
            Duration::from_secs(120),
            "a decision for every transaction",
            |c| c.distinct_keys() >= transactions.len(),
        )
    })?;
    pipeline.stop();
    let reports = pipeline.wait().await?;
    let received = decisions.stop()?;

    let mut by_id: HashMap<String, serde_json::Value> = HashMap::new();
    for r in &received {
        let d: serde_json::Value = serde_json::from_slice(&r.payload)?;
        by_id.insert(r.key.clone().unwrap_or_default(), d);
    }
    for t in &transactions {
        assert!(
            by_id.contains_key(&t.transaction_id),
            "no decision for {}",
            t.transaction_id
        );
    }

    // Classify by what bounds each lookup in time: it happened after the transaction was
    // produced (the producer paces at `rate`, never early) and before its decision. Surely
    // during the outage: produced after the kill (+ a batch in flight) and decided before the
    // restart. Surely before: decided before the kill. Surely after: produced well after the
    // restart (the reconnect backoff is at most 1 s).
    let index: HashMap<&str, usize> = transactions
        .iter()
        .enumerate()
        .map(|(i, t)| (t.transaction_id.as_str(), i))
        .collect();
    let (mut before, mut during, mut after) = (0, 0, 0);
    let (mut degraded_during, mut degraded_before, mut degraded_after) = (0, 0, 0);
    for (id, d) in &by_id {
        let decided = d["decision_time_ms"].as_i64().unwrap();
        let produced = started_ms + (index[id.as_str()] as f64 * 1000.0 / rate) as i64;
        let degraded = d.get("degraded").and_then(|v| v.as_str());
        if let Some(reason) = degraded {
            assert_eq!(reason, "feature-store-unavailable");
            let imputed = d["imputed_features"].as_array().unwrap();
            assert!(
                imputed.iter().any(|f| f == "card_age_days"),
                "a degraded decision lists the store's features as imputed: {d}"
            );
            assert!(
                d["score"].is_number(),
                "a degraded decision is still the model's: {d}"
            );
        }
        if decided < kill_started_ms {
            before += 1;
            if degraded.is_some() {
                degraded_before += 1;
            }
        } else if produced > killed_ms + 200 && decided < restart_started_ms {
            during += 1;
            if degraded.is_some() {
                degraded_during += 1;
            }
        } else if produced > restarted_ms + 2_500 {
            after += 1;
            if degraded.is_some() {
                degraded_after += 1;
            }
        }
    }
    eprintln!(
        "produced for {produced_for:?}; decisions before {before}, during {during} \
         ({degraded_during} degraded), after {after}; degraded before {degraded_before}, after {degraded_after}"
    );
    assert!(before > 500, "traffic before the outage: {before}");
    assert!(during > 1_000, "traffic during the outage: {during}");
    assert_eq!(
        degraded_during, during,
        "every decision during the outage is marked degraded"
    );
    assert!(after > 500, "traffic after the restart: {after}");
    assert_eq!(degraded_before, 0, "decisions before the outage are normal");
    assert_eq!(degraded_after, 0, "decisions after the restart are normal");

    let fraud = reports.iter().find(|r| r.name == "fraud").unwrap();
    assert!(fraud.degraded_batches > 0);
    assert_eq!(fraud.dead_letters, 0, "an outage dead-letters nothing");
    Ok(())
}

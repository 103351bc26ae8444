//! Fraud and pricing side by side in one process, against a real broker and Redis: every
//! input gets exactly one decision of its own workload, velocity features seen by the fraud
//! model match a brute-force recount, and workloads that cannot start (bad model, missing
//! topic) are reported without taking the others down.

use std::collections::HashMap;
use std::time::Duration;

use verdict::config::{PolicyConfig, WorkloadConfig};
use verdict::generator::Transaction;
use verdict::Pipeline;
use verdict_tests::{as_messages, produce, Collector, Harness};

const TRANSACTIONS: usize = 3_000;
const QUOTES: usize = 1_500;
/// Event-time spacing of the generated transactions: 3000 × 150 ms = 7.5 minutes, so the
/// 1-minute window differs from the 1-hour one.
const SPACING_MS: i64 = 150;

fn workload<'a>(harness: &'a Harness, name: &str) -> &'a WorkloadConfig {
    harness
        .config
        .workloads
        .iter()
        .find(|w| w.name == name)
        .expect("example workload")
}

/// Count of `tx`'s card's transactions with event time in (t − w, t], itself included.
fn recount(tx: &Transaction, all: &[Transaction], window_ms: i64) -> f64 {
    all.iter()
        .filter(|o| {
            o.card_id == tx.card_id
                && o.event_time_ms > tx.event_time_ms - window_ms
                && o.event_time_ms <= tx.event_time_ms
        })
        .count() as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fraud_and_pricing_run_together_and_velocity_matches_a_recount() -> anyhow::Result<()> {
    // Few cards, so cards repeat (and the generator plants card-testing bursts).
    let mut harness = Harness::start(400, 200).await?;
    for w in &mut harness.config.workloads {
        w.include_features = true;
    }
    // Two workloads that cannot start: a model directory without a model, and a topic that
    // does not exist. Both must be reported; fraud and pricing must run regardless.
    let mut broken_model = workload(&harness, "pricing").clone();
    broken_model.name = "broken-model".into();
    broken_model.model = std::env::temp_dir().join("verdict-no-such-model");
    let mut missing_topic = workload(&harness, "pricing").clone();
    missing_topic.name = "missing-topic".into();
    missing_topic.input_topic = "no-such-topic".into();
    harness.config.workloads.push(broken_model);
    harness.config.workloads.push(missing_topic);

    let brokers = harness.stack.kafka_bootstrap.clone();
    let fraud = workload(&harness, "fraud").clone();
    let pricing = workload(&harness, "pricing").clone();
    let decisions = Collector::start(&brokers, &fraud.decisions_topic)?;
    let prices = Collector::start(&brokers, &pricing.decisions_topic)?;
    let pipeline = Pipeline::start(&harness.config).await?;

    let failed = pipeline.failed_workloads();
    assert_eq!(failed.len(), 2, "{failed:?}");
    assert!(
        failed[0].name == "broken-model" && failed[0].error.contains("model.json"),
        "{failed:?}"
    );
    assert!(
        failed[1].name == "missing-topic" && failed[1].error.contains("`no-such-topic`"),
        "{failed:?}"
    );

    let base = verdict::workload::now_ms();
    let mut stream = harness.world.transactions(5, "two", 0.02);
    let transactions: Vec<Transaction> = (0..TRANSACTIONS)
        .map(|i| stream.next_at(base + i as i64 * SPACING_MS))
        .collect();
    let mut requests = harness.zones.requests(6, "two");
    let quotes: Vec<(String, Vec<u8>)> = (0..QUOTES)
        .map(|_| {
            let q = requests.next_at(verdict::workload::now_ms());
            (q.quote_id.clone(), serde_json::to_vec(&q).expect("json"))
        })
        .collect();
    let quote_bases: HashMap<String, f64> = quotes
        .iter()
        .map(|(id, payload)| {
            let v: serde_json::Value = serde_json::from_slice(payload).expect("json");
            (id.clone(), v["base_price"].as_f64().expect("base price"))
        })
        .collect();

    let messages = as_messages(&transactions);
    let (b1, b2) = (brokers.clone(), brokers.clone());
    let (t1, t2) = (fraud.input_topic.clone(), pricing.input_topic.clone());
    let fraud_producer = tokio::task::spawn_blocking(move || produce(&b1, &t1, &messages, None));
    let pricing_producer = tokio::task::spawn_blocking(move || produce(&b2, &t2, &quotes, None));
    fraud_producer.await??;
    pricing_producer.await??;

    tokio::task::block_in_place(|| {
        decisions.wait_until(Duration::from_secs(180), "every transaction decided", |c| {
            c.distinct_keys() >= TRANSACTIONS
        })?;
        prices.wait_until(Duration::from_secs(120), "every quote priced", |c| {
            c.distinct_keys() >= QUOTES
        })
    })?;
    pipeline.stop();
    pipeline.wait().await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let decisions = decisions.stop()?;
    let prices = prices.stop()?;

    // Exactly one decision per input, from its own workload.
    assert_eq!(
        decisions.len(),
        TRANSACTIONS,
        "no duplicates, nothing missing"
    );
    assert_eq!(prices.len(), QUOTES, "no duplicates, nothing missing");
    let schema: serde_json::Value =
        serde_json::from_str(verdict_schemas::decision::DECISION_JSON_SCHEMA)?;
    let validator = jsonschema::validator_for(&schema)?;
    let mut by_id: HashMap<String, serde_json::Value> = HashMap::new();
    for r in &decisions {
        let d: serde_json::Value = serde_json::from_slice(&r.payload)?;
        assert!(validator.is_valid(&d), "{d}");
        assert_eq!(d["workload"], "fraud");
        assert!(["approve", "review", "decline"].contains(&d["decision"].as_str().unwrap()));
        by_id.insert(d["transaction_id"].as_str().unwrap().to_string(), d);
    }
    let PolicyConfig::Pricing(bounds) = &pricing.policy else {
        panic!("pricing policy");
    };
    for r in &prices {
        let d: serde_json::Value = serde_json::from_slice(&r.payload)?;
        assert!(validator.is_valid(&d), "{d}");
        assert_eq!(d["workload"], "pricing");
        assert_eq!(d["decision"], "priced");
        let id = d["transaction_id"].as_str().unwrap();
        let multiplier = d["price"]["multiplier"].as_f64().unwrap();
        assert!((bounds.min_multiplier..=bounds.max_multiplier).contains(&multiplier));
        let expected = (quote_bases[id] * multiplier * 100.0).round() / 100.0;
        assert!(
            (d["price"]["amount"].as_f64().unwrap() - expected).abs() < 1e-9,
            "{d}"
        );
    }
    assert_eq!(by_id.len(), TRANSACTIONS);

    // Velocity the model saw == a brute-force recount, for a sample (every 7th transaction).
    let mut repeats = 0;
    for tx in transactions.iter().step_by(7) {
        let d = &by_id[&tx.transaction_id];
        let seen = |name: &str| d["features"][name].as_f64().unwrap();
        for (name, window_ms) in [
            ("card_tx_count_1m", 60_000),
            ("card_tx_count_1h", 3_600_000),
            ("card_tx_count_24h", 86_400_000),
        ] {
            assert_eq!(
                seen(name),
                recount(tx, &transactions, window_ms),
                "{name} of {} ({})",
                tx.transaction_id,
                tx.card_id
            );
        }
        if seen("card_tx_count_1h") > 1.0 {
            repeats += 1;
        }
    }
    assert!(
        repeats > 50,
        "the sample must include repeat cards ({repeats})"
    );
    Ok(())
}

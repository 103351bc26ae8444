//! End to end, against a real Kafka-protocol broker (Tansu) and a real redis-server, both
//! started on free ports by the test itself.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::TopicPartitionList;

use redis::Commands;
use verdict::config::example_config_dir;
use verdict::generator::Transaction;
use verdict::workload::now_ms;
use verdict::Pipeline;
use verdict_scorers::{LoadedModel, OnnxScorer, OnnxScorerConfig, Scorer};
use verdict_tests::{as_messages, produce, Collector, Harness, VerdictProcess};

/// The model's features for one transaction, computed row by row from Redis with plain Rust
/// — an independent path from the pipeline's Arrow + DataFusion one — and imputed with the
/// model's documented defaults. Returns the feature vector and the imputed feature names.
fn features_row_by_row(
    tx: &Transaction,
    history: &[Transaction],
    redis: &mut redis::Connection,
    model: &LoadedModel,
) -> (Vec<f32>, Vec<String>) {
    // Velocity by brute force over the run: this card's transactions with event time in
    // (t − w, t], this one included.
    let window = |w_ms: i64| {
        let same: Vec<&Transaction> = history
            .iter()
            .filter(|h| {
                h.card_id == tx.card_id
                    && h.event_time_ms > tx.event_time_ms - w_ms
                    && h.event_time_ms <= tx.event_time_ms
            })
            .collect();
        let cents: i64 = same.iter().map(|h| (h.amount * 100.0).round() as i64).sum();
        (same.len() as f64, cents as f64 / 100.0)
    };
    let card: HashMap<String, String> = redis.hgetall(format!("card:{}", tx.card_id)).unwrap();
    let merchant: HashMap<String, String> = redis
        .hgetall(format!("merchant:{}", tx.merchant_id))
        .unwrap();
    let num = |h: &HashMap<String, String>, k: &str| h.get(k).map(|v| v.parse::<f64>().unwrap());
    let raw: Vec<(&str, Option<f64>)> = vec![
        ("amount", Some(tx.amount)),
        (
            "amount_to_card_avg",
            num(&card, "avg_amount_30d").map(|avg| tx.amount / avg),
        ),
        ("card_tx_count_30d", num(&card, "tx_count_30d")),
        ("card_chargebacks_90d", num(&card, "chargeback_count_90d")),
        ("card_age_days", num(&card, "card_age_days")),
        (
            "is_foreign",
            card.get("home_country")
                .map(|home| if *home != tx.country { 1.0 } else { 0.0 }),
        ),
        ("merchant_fraud_rate_90d", num(&merchant, "fraud_rate_90d")),
        ("merchant_risk_score", num(&merchant, "risk_score")),
        ("merchant_age_days", num(&merchant, "age_days")),
        (
            "is_online",
            Some(if tx.channel == "online" { 1.0 } else { 0.0 }),
        ),
        (
            "hour_of_day",
            Some(((tx.event_time_ms / 3_600_000) % 24) as f64),
        ),
        ("card_tx_count_1m", Some(window(60_000).0)),
        ("card_tx_count_1h", Some(window(3_600_000).0)),
        ("card_tx_count_24h", Some(window(86_400_000).0)),
        (
            "card_amount_24h_to_avg",
            num(&card, "avg_amount_30d").map(|avg| window(86_400_000).1 / avg),
        ),
    ];
    let mut values = Vec::new();
    let mut imputed = Vec::new();
    for (spec, (name, value)) in model.metadata.features.iter().zip(raw) {
        assert_eq!(
            spec.name, name,
            "the test's feature order must follow model.json"
        );
        match value {
            Some(v) => values.push(v as f32),
            None => {
                values.push(spec.default.expect("every fraud feature has a default"));
                imputed.push(name.to_string());
            }
        }
    }
    (values, imputed)
}

fn fraud_model() -> LoadedModel {
    let config =
        verdict::Config::parse(verdict::config::EXAMPLE_CONFIG, &example_config_dir()).unwrap();
    LoadedModel::load(&config.workloads[0].model).unwrap()
}

/// Offsets the group has committed, per partition.
fn committed(brokers: &str, group: &str, topic: &str, partitions: i32) -> Vec<i64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let committed = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .unwrap();
    (0..partitions)
        .map(|p| {
            committed
                .find_partition(topic, p)
                .and_then(|e| e.offset().to_raw())
                .unwrap_or(-1)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_transaction_gets_exactly_one_decision_with_the_models_score() -> anyhow::Result<()> {
    const COUNT: usize = 10_000;
    let harness = Harness::start(3_000, 1_000).await?;
    let brokers = harness.stack.kafka_bootstrap.clone();
    let decisions = Collector::start(&brokers, harness.decisions_topic())?;
    let pipeline = Pipeline::start(&harness.config).await?;

    // 5% of the cards have no features in Redis.
    let transactions = harness.transactions(COUNT, "e2e", 0.05);
    let messages = as_messages(&transactions);
    let topic = harness.input_topic().to_string();
    let producer_brokers = brokers.clone();
    tokio::task::spawn_blocking(move || produce(&producer_brokers, &topic, &messages, None))
        .await??;

    tokio::task::block_in_place(|| {
        decisions.wait_until(
            Duration::from_secs(180),
            "a decision for every transaction",
            |c| c.distinct_keys() >= COUNT,
        )
    })?;
    pipeline.stop();
    let reports = pipeline.wait().await?;
    // Anything late would show up now.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let received = decisions.stop()?;

    // Exactly one decision per transaction: none missing, none extra.
    let mut by_id: HashMap<String, serde_json::Value> = HashMap::new();
    for r in &received {
        let value: serde_json::Value = serde_json::from_slice(&r.payload)?;
        let id = value["transaction_id"].as_str().unwrap().to_string();
        assert_eq!(
            r.key.as_deref(),
            Some(id.as_str()),
            "decisions are keyed by transaction id"
        );
        assert!(
            by_id.insert(id.clone(), value).is_none(),
            "two decisions for {id}"
        );
    }
    assert_eq!(by_id.len(), COUNT);
    assert_eq!(reports[0].decisions, COUNT as u64);
    assert_eq!(reports[0].dead_letters, 0);

    // Every decision fits the published JSON Schema.
    let schema: serde_json::Value =
        serde_json::from_str(verdict_schemas::decision::DECISION_JSON_SCHEMA)?;
    let validator = jsonschema::validator_for(&schema)?;
    for decision in by_id.values() {
        if let Err(e) = validator.validate(decision) {
            panic!("decision does not match decision.schema.json: {e}: {decision}");
        }
    }

    // Each score equals the model's score on independently computed features.
    let model = fraud_model();
    let mut scorer = OnnxScorer::new(&model, &OnnxScorerConfig::default())?;
    let mut redis = redis::Client::open(harness.stack.redis_url.as_str())?.get_connection()?;
    let verdict::config::PolicyConfig::Fraud(thresholds) = &harness.config.workloads[0].policy
    else {
        panic!("the first example workload is fraud");
    };
    let policy = verdict_scorers::FraudPolicy::new(*thresholds)?;
    let mut unknown_cards = 0;
    let mut max_diff = 0f32;
    for tx in &transactions {
        let decision = &by_id[&tx.transaction_id];
        let (features, imputed) = features_row_by_row(tx, &transactions, &mut redis, &model);
        let expected = scorer.score(&features, 1)?[0];
        let got = decision["score"].as_f64().unwrap() as f32;
        max_diff = max_diff.max((expected - got).abs());
        assert!(
            (expected - got).abs() <= 1e-5,
            "{}: pipeline score {got}, independent score {expected}",
            tx.transaction_id
        );
        assert_eq!(decision["decision"], policy.decide(got).as_str());
        let reported: Vec<&str> = decision["imputed_features"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(reported, imputed, "{}", tx.transaction_id);
        assert_eq!(decision["event_time_ms"].as_i64(), Some(tx.event_time_ms));
        assert_eq!(decision["model"], model.metadata.name);
        if tx.card_id.starts_with("card-unknown") {
            unknown_cards += 1;
            assert!(reported.contains(&"amount_to_card_avg"));
        }
    }
    assert!(
        unknown_cards > 100,
        "the run must include cards without features ({unknown_cards})"
    );
    eprintln!("max |pipeline - independent| score difference: {max_diff:e}; {unknown_cards} unknown cards");

    // Everything decided was committed on shutdown: each partition's committed offset is one
    // past its last message. (The end offsets come from reading the topic back, because
    // Tansu's ListOffsets reports the last record batch's base offset, not the log end.)
    let inputs = Collector::start(&brokers, harness.input_topic())?;
    tokio::task::block_in_place(|| {
        // Inputs are keyed by card: count messages, not keys.
        inputs.wait_until(Duration::from_secs(60), "the input topic read back", |c| {
            c.snapshot().len() >= COUNT
        })
    })?;
    let inputs = inputs.stop()?;
    let committed = committed(&brokers, "verdict.fraud", harness.input_topic(), 3);
    for (partition, committed) in committed.iter().enumerate() {
        let end = inputs
            .iter()
            .filter(|r| r.partition == partition as i32)
            .map(|r| r.offset + 1)
            .max()
            .unwrap_or(0);
        assert_eq!(
            *committed, end,
            "partition {partition}: committed {committed}, log end {end}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_and_a_restart_mid_stream_lose_no_transaction() -> anyhow::Result<()> {
    const COUNT: usize = 8_000;
    let harness = Harness::start(1_000, 200).await?;
    let brokers = harness.stack.kafka_bootstrap.clone();
    let dir = tempfile::tempdir()?;
    let config_path = harness.write_process_config(dir.path(), |text| text)?;

    let decisions = Collector::start(&brokers, harness.decisions_topic())?;
    let transactions = harness.transactions(COUNT, "restart", 0.02);
    let messages = as_messages(&transactions);
    let topic = harness.input_topic().to_string();
    let b = brokers.clone();
    let producer = std::thread::spawn(move || produce(&b, &topic, &messages, Some(800.0)));

    let (crashed_at_ms, second_stopped_at_ms) = tokio::task::block_in_place(|| {
        // 1. A crash: SIGKILL, no drain, no final commit.
        let mut first = VerdictProcess::spawn(&config_path, &dir.path().join("first.log"));
        decisions.wait_until(Duration::from_secs(90), "first decisions", |c| {
            c.distinct_keys() >= 1_000
        })?;
        first.crash();
        let crashed_at_ms = now_ms();
        let after_crash = decisions.distinct_keys();

        // 2. A restart that is stopped gracefully with SIGTERM mid-stream.
        let mut second = VerdictProcess::spawn(&config_path, &dir.path().join("second.log"));
        decisions.wait_until(Duration::from_secs(90), "decisions after the crash", |c| {
            c.distinct_keys() >= after_crash + 1_500
        })?;
        second.wait_ready(Duration::from_secs(30))?;
        let status = second.terminate();
        let second_stopped_at_ms = now_ms();
        assert!(status.success(), "graceful shutdown exits 0, got {status}");

        // 3. A third run finishes the stream.
        let mut third = VerdictProcess::spawn(&config_path, &dir.path().join("third.log"));
        let result = decisions.wait_until(
            Duration::from_secs(120),
            "a decision for every transaction",
            |c| c.distinct_keys() >= COUNT,
        );
        let ready = third.wait_ready(Duration::from_secs(30));
        let status = third.terminate();
        ready?;
        result?;
        assert!(status.success(), "graceful shutdown exits 0, got {status}");
        anyhow::Ok((crashed_at_ms, second_stopped_at_ms))
    })?;
    producer.join().unwrap()?;
    let received = decisions.stop()?;
    let mut per_id: HashMap<String, usize> = HashMap::new();
    for r in &received {
        *per_id.entry(r.key.clone().unwrap_or_default()).or_default() += 1;
    }
    // Which process made each decision, from the time it was decided: the processes ran one
    // after another. (Not from its offset: Tansu may append a killed producer's last request
    // seconds after the kill, among the next process's decisions.)
    let mut decided_by: HashMap<&str, [usize; 3]> = HashMap::new();
    for r in &received {
        let decision: serde_json::Value = serde_json::from_slice(&r.payload)?;
        let decided_at_ms = decision["decision_time_ms"]
            .as_i64()
            .ok_or_else(|| anyhow::anyhow!("a decision without decision_time_ms"))?;
        let process = if decided_at_ms <= crashed_at_ms {
            0
        } else if decided_at_ms <= second_stopped_at_ms {
            1
        } else {
            2
        };
        decided_by
            .entry(r.key.as_deref().unwrap_or_default())
            .or_default()[process] += 1;
    }
    // The second's graceful stop committed everything it decided, so the third decides none
    // of it again; nor does a process decide anything twice. Only the crash may leave
    // duplicates: the first's uncommitted tail, decided again by whichever process reads
    // that partition next.
    let decided_twice_without_a_crash: Vec<(&str, [usize; 3])> = decided_by
        .iter()
        .filter(|(_, by)| (by[1] > 0 && by[2] > 0) || by.iter().any(|n| *n > 1))
        .map(|(id, by)| (*id, *by))
        .collect();
    if !decided_twice_without_a_crash.is_empty() {
        for name in ["first.log", "second.log", "third.log"] {
            let log = std::fs::read_to_string(dir.path().join(name)).unwrap_or_default();
            for line in log.lines().filter(|l| !l.contains(" DEBUG ")) {
                eprintln!("{name}: {line}");
            }
        }
    }
    assert!(
        decided_twice_without_a_crash.is_empty(),
        "{} transactions decided twice by one process, or by the second and again by the \
         third after a graceful stop (decisions by the first, second, third process): {:?}",
        decided_twice_without_a_crash.len(),
        &decided_twice_without_a_crash[..decided_twice_without_a_crash.len().min(5)]
    );
    let missing: Vec<&str> = transactions
        .iter()
        .map(|t| t.transaction_id.as_str())
        .filter(|id| !per_id.contains_key(*id))
        .collect();
    assert!(
        missing.is_empty(),
        "{} transactions lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    let duplicates: usize = per_id.values().map(|n| n - 1).sum();
    let again_by = |process: usize| {
        decided_by
            .values()
            .filter(|by| by[0] > 0 && by[process] > 0)
            .count()
    };
    eprintln!(
        "{COUNT} transactions, {} decisions, {duplicates} duplicates after a crash and a \
         restart: decided by the crashed process and again by the second {}, by the third {}",
        received.len(),
        again_by(1),
        again_by(2)
    );
    Ok(())
}

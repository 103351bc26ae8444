//! Bad input, end to end: a corpus of 41 kinds of malformed or contract-breaking messages
//! mixed into valid traffic, against a real broker (Tansu) and redis-server. Every valid
//! message gets a decision, every bad one a dead letter with the original key, value and
//! headers plus provenance and the right cause, and the pipeline keeps going.

use std::collections::HashMap;
use std::time::Duration;

use verdict::generator::bad_input::{fraud_corpus, CorpusIds};
use verdict::Pipeline;
use verdict_tests::{as_messages, produce, produce_messages, Collector, Harness, OutMessage};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_bad_input_becomes_a_dead_letter_with_its_cause() -> anyhow::Result<()> {
    let harness = Harness::start(200, 50).await?;
    let brokers = harness.stack.kafka_bootstrap.clone();
    let fraud = &harness.config.workloads[0];
    // A card whose 30-day average is 0: `amount / avg_amount_30d` is infinite.
    {
        let client = redis::Client::open(harness.stack.redis_url.as_str())?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("HSET")
            .arg("card:zero-average")
            .arg(&[
                ("avg_amount_30d", "0"),
                ("tx_count_30d", "3"),
                ("chargeback_count_90d", "0"),
                ("card_age_days", "400"),
                ("home_country", "DE"),
            ])
            .query_async::<()>(&mut conn)
            .await?;
    }
    let decisions = Collector::start(&brokers, &fraud.decisions_topic)?;
    let dead = Collector::start(&brokers, &fraud.dead_letter_topic)?;
    let pipeline = Pipeline::start(&harness.config).await?;

    let good = harness.transactions(600, "corpus", 0.0);
    let card = good[0].card_id.clone();
    let merchant = good[0].merchant_id.clone();
    let corpus = fraud_corpus(&CorpusIds {
        card_id: &card,
        merchant_id: &merchant,
        zero_average_card_id: "zero-average",
        event_time_ms: verdict::workload::now_ms(),
    });
    assert!(corpus.len() >= 30);
    let mut messages: Vec<OutMessage> = as_messages(&good)
        .into_iter()
        .map(|(key, payload)| OutMessage {
            key,
            payload: Some(payload),
            headers: Vec::new(),
        })
        .collect();
    // Spread the bad ones through the stream, several to a batch, each with a header of its
    // own that its dead letter must keep.
    for (i, bad) in corpus.iter().enumerate() {
        messages.insert(
            i * 13 + 5,
            OutMessage {
                key: bad.kind.to_string(),
                payload: bad.payload.clone(),
                headers: vec![(
                    "trace-id".into(),
                    format!("trace-{}", bad.kind).into_bytes(),
                )],
            },
        );
    }
    let topic = fraud.input_topic.clone();
    let b = brokers.clone();
    tokio::task::spawn_blocking(move || produce_messages(&b, &topic, &messages, Some(4_000.0)))
        .await??;
    tokio::task::block_in_place(|| {
        decisions.wait_until(Duration::from_secs(120), "every valid decision", |c| {
            c.distinct_keys() >= good.len()
        })?;
        dead.wait_until(Duration::from_secs(60), "every dead letter", |c| {
            c.distinct_keys() >= corpus.len()
        })
    })?;

    // Still running: a second wave after all the bad input is decided too.
    let after = harness.transactions(200, "after-corpus", 0.0);
    let topic = fraud.input_topic.clone();
    let b = brokers.clone();
    let wave = as_messages(&after);
    tokio::task::spawn_blocking(move || produce(&b, &topic, &wave, None)).await??;
    tokio::task::block_in_place(|| {
        decisions.wait_until(Duration::from_secs(60), "the second wave", |c| {
            c.distinct_keys() >= good.len() + after.len()
        })
    })?;
    pipeline.stop();
    let reports = pipeline.wait().await?;
    let dead_letters = dead.stop()?;
    let decided = decisions.stop()?;

    // Exactly the valid ones were decided.
    let decided_ids: HashMap<String, usize> = decided.iter().fold(HashMap::new(), |mut m, r| {
        *m.entry(r.key.clone().unwrap_or_default()).or_default() += 1;
        m
    });
    for t in good.iter().chain(&after) {
        assert!(
            decided_ids.contains_key(&t.transaction_id),
            "no decision for {}",
            t.transaction_id
        );
    }
    assert_eq!(
        decided_ids.len(),
        good.len() + after.len(),
        "a bad message was decided"
    );
    assert_eq!(
        dead_letters.len(),
        corpus.len(),
        "one dead letter per bad message"
    );

    let mut wrong = Vec::new();
    for bad in &corpus {
        let Some(letter) = dead_letters
            .iter()
            .find(|r| r.key.as_deref() == Some(bad.kind))
        else {
            wrong.push(format!("{}: no dead letter", bad.kind));
            continue;
        };
        let h = &letter.headers;
        let expect = [
            ("verdict.cause", bad.cause.to_string()),
            ("verdict.stage", bad.stage.to_string()),
            ("verdict.workload", "fraud".to_string()),
            ("verdict.source.topic", fraud.input_topic.clone()),
            ("trace-id", format!("trace-{}", bad.kind)),
        ];
        for (name, value) in expect {
            if h.get(name) != Some(&value) {
                wrong.push(format!(
                    "{}: {name} = {:?}, expected {value:?}",
                    bad.kind,
                    h.get(name)
                ));
            }
        }
        if letter.payload != bad.payload.clone().unwrap_or_default() {
            wrong.push(format!("{}: the original value was not kept", bad.kind));
        }
        for name in ["verdict.source.partition", "verdict.source.offset"] {
            if h.get(name).and_then(|v| v.parse::<i64>().ok()).is_none() {
                wrong.push(format!("{}: {name} missing or not a number", bad.kind));
            }
        }
        if h.get("verdict.detail")
            .is_none_or(|d| d.is_empty() || d.len() > 300)
        {
            wrong.push(format!("{}: detail missing or too long", bad.kind));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");

    let fraud_report = reports
        .iter()
        .find(|r| r.name == "fraud")
        .expect("fraud report");
    assert_eq!(fraud_report.dead_letters, corpus.len() as u64);
    assert_eq!(fraud_report.decisions, (good.len() + after.len()) as u64);
    Ok(())
}

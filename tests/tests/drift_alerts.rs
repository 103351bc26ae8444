//! Drift alerts end to end, against a real broker and Redis: a stream whose second half is
//! shifted raises alerts on the alerts topic naming the shifted features, and the same stream
//! unshifted (the control) raises none.

use std::time::Duration;

use verdict::generator::Transaction;
use verdict::Pipeline;
use verdict_scorers::drift::DriftConfig;
use verdict_tests::{as_messages, produce, Collector, Harness};

const TRANSACTIONS: usize = 8_000;
const WINDOW_ROWS: u64 = 1_000;
/// Spread over a day of event time, as the training data is, so time of day and the score it
/// moves look like the reference.
const SPACING_MS: i64 = 10_800;
/// About 6.4 transactions per card per day, as in the training data (200,000 over 37 hours on
/// 20,000 cards), so the velocity windows look like the reference too.
const CARDS: usize = 1_250;
const RATE_PER_S: f64 = 4_000.0;

async fn alerts_for(shift_second_half: bool) -> anyhow::Result<Vec<serde_json::Value>> {
    let mut harness = Harness::start(CARDS, 2_000).await?;
    let fraud = harness
        .config
        .workloads
        .iter_mut()
        .find(|w| w.name == "fraud")
        .expect("fraud workload");
    let alerts_topic = "fraud.drift-alerts";
    fraud.drift = Some(DriftConfig {
        window_rows: WINDOW_ROWS,
        window_age: Duration::from_secs(600),
        // Time of day is not stationary within a window of a few hours of this stream, and
        // neither is the score, which the model makes depend on it (night is riskier); the
        // 24-hour velocity windows start empty in a fresh Redis, while the reference saw days
        // of history. None of that is drift. (The simulation test covers the score.)
        exclude: vec![
            "hour_of_day".into(),
            "card_tx_count_24h".into(),
            "card_amount_24h_to_avg".into(),
            "score".into(),
        ],
        ..DriftConfig::new(alerts_topic)
    });
    let brokers = harness.stack.kafka_bootstrap.clone();
    let decisions = Collector::start(&brokers, "decisions")?;
    let alerts = Collector::start(&brokers, alerts_topic)?;
    let pipeline = Pipeline::start(&harness.config).await?;

    let base = verdict::workload::now_ms() - TRANSACTIONS as i64 * SPACING_MS;
    let mut stream = harness.world.transactions(31, "drift", 0.03);
    let transactions: Vec<Transaction> = (0..TRANSACTIONS)
        .map(|i| {
            let mut tx = stream.next_at(base + i as i64 * SPACING_MS);
            if shift_second_half && i >= TRANSACTIONS / 2 {
                // Customers suddenly spend 60% more.
                tx.amount = (tx.amount * 1.6 * 100.0).round() / 100.0;
            }
            tx
        })
        .collect();
    // One key, so one partition: the stream is processed in event-time order and each window
    // holds consecutive transactions (windows fill in processing order).
    let messages: Vec<(String, Vec<u8>)> = as_messages(&transactions)
        .into_iter()
        .map(|(_, payload)| ("drift-test".to_string(), payload))
        .collect();
    let b = brokers.clone();
    tokio::task::spawn_blocking(move || produce(&b, "transactions", &messages, Some(RATE_PER_S)))
        .await??;
    tokio::task::block_in_place(|| {
        decisions.wait_until(Duration::from_secs(180), "every transaction decided", |c| {
            c.distinct_keys() >= TRANSACTIONS
        })
    })?;
    // The monitor runs behind the decisions; give its last window time to be produced.
    tokio::time::sleep(Duration::from_secs(3)).await;
    pipeline.stop();
    let reports = pipeline.wait().await?;
    let fraud_report = reports.iter().find(|r| r.name == "fraud").expect("report");
    assert_eq!(fraud_report.drift_batches_skipped, 0, "the monitor kept up");
    tokio::time::sleep(Duration::from_secs(1)).await;
    decisions.stop()?;
    let received = alerts.stop()?;
    let schema: serde_json::Value =
        serde_json::from_str(verdict_schemas::alert::DRIFT_ALERT_JSON_SCHEMA)?;
    let validator = jsonschema::validator_for(&schema)?;
    let mut out = Vec::new();
    for r in received {
        let alert: serde_json::Value = serde_json::from_slice(&r.payload)?;
        assert!(validator.is_valid(&alert), "{alert}");
        assert_eq!(
            r.key.as_deref(),
            Some(format!("fraud/{}", alert["feature"].as_str().unwrap()).as_str())
        );
        out.push(alert);
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shifted_stream_raises_alerts_naming_the_shifted_features() -> anyhow::Result<()> {
    let alerts = alerts_for(true).await?;
    let firing: Vec<(&str, &str, u64)> = alerts
        .iter()
        .filter(|a| a["status"] == "firing")
        .map(|a| {
            (
                a["feature"].as_str().unwrap(),
                a["statistic"].as_str().unwrap(),
                a["window"]["index"].as_u64().unwrap(),
            )
        })
        .collect();
    eprintln!("firing: {firing:?}");
    let first_shifted_window = TRANSACTIONS as u64 / 2 / WINDOW_ROWS;
    for feature in ["amount", "amount_to_card_avg"] {
        let hit = firing
            .iter()
            .find(|(f, s, _)| *f == feature && *s == "ks")
            .unwrap_or_else(|| panic!("no alert on {feature}: {firing:?}"));
        // Two consecutive shifted windows: the second one fires.
        assert_eq!(hit.2, first_shifted_window + 1, "{feature}");
    }
    assert!(
        firing.iter().all(|(_, _, w)| *w > first_shifted_window),
        "nothing fires before the shift: {firing:?}"
    );
    let amount = alerts
        .iter()
        .find(|a| a["feature"] == "amount" && a["status"] == "firing")
        .unwrap();
    assert!(amount["p_value_corrected"].as_f64().unwrap() < 0.01);
    let live = amount["histogram"]["live"].as_array().unwrap();
    let reference = amount["histogram"]["reference"].as_array().unwrap();
    assert_eq!(live.len(), reference.len());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unshifted_control_stream_raises_no_alert() -> anyhow::Result<()> {
    let alerts = alerts_for(false).await?;
    assert!(alerts.is_empty(), "{alerts:#?}");
    Ok(())
}

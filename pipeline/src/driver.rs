//! Drives a pipeline from outside, as a payment system and a downstream service would: one
//! thread produces transactions to the input topic at a fixed offered rate (open loop: a slow
//! pipeline cannot slow the producer down and hide its latency), another consumes the
//! decisions topic with its own consumer group. Latency is measured per transaction from just
//! before its produce call to its decision's arrival, on one monotonic clock.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};

use crate::generator::World;
use crate::workload::now_ms;
use crate::PipelineError;

/// What to drive.
#[derive(Debug, Clone)]
pub struct DriveSpec {
    pub brokers: String,
    pub input_topic: String,
    pub decisions_topic: String,
    /// Valid transactions to produce.
    pub count: usize,
    /// Offered rate, transactions per second; `None`: as fast as the producer goes.
    pub rate_per_sec: Option<f64>,
    /// Prefix of transaction ids, unique per run so earlier runs' decisions are ignored.
    pub run_id: String,
    pub seed: u64,
    pub unknown_card_rate: f64,
    /// Malformed messages mixed in (they must come out as dead letters, not decisions).
    pub bad_messages: Vec<Vec<u8>>,
    /// Print this many decisions as they arrive.
    pub print_samples: usize,
    /// Give up waiting for decisions this long after the last produce.
    pub settle_timeout: Duration,
    /// The load generator's `linger.ms`: how long its producer gathers transactions into one
    /// produce request (a payment system's own client setting).
    pub producer_linger_ms: u32,
    /// `Some(t0)`: transaction `i` gets event time `t0 + i / rate` instead of the wall clock
    /// at its produce, so two systems driven with the same spec compute the same velocity and
    /// time-of-day features and must reach the same decisions.
    pub event_time_base_ms: Option<i64>,
    /// Key input messages by card id (each card's payments in order on one partition, as
    /// payment systems partition) rather than by transaction id.
    pub key_by_card: bool,
    /// `fetch.wait.max.ms` of the measuring consumer (see `BenchArgs::fetch_wait_ms`).
    pub fetch_wait_ms: u32,
}

impl DriveSpec {
    /// `count` transactions as fast as the producer goes, keyed by transaction id with wall
    /// clock event times, 3% of them for unknown cards; the fields are public for the rest.
    pub fn new(
        brokers: impl Into<String>,
        input_topic: impl Into<String>,
        decisions_topic: impl Into<String>,
        count: usize,
        run_id: impl Into<String>,
    ) -> Self {
        DriveSpec {
            brokers: brokers.into(),
            input_topic: input_topic.into(),
            decisions_topic: decisions_topic.into(),
            count,
            rate_per_sec: None,
            run_id: run_id.into(),
            seed: 11,
            unknown_card_rate: 0.03,
            bad_messages: Vec::new(),
            print_samples: 0,
            settle_timeout: Duration::from_secs(60),
            producer_linger_ms: 5,
            event_time_base_ms: None,
            key_by_card: false,
            fetch_wait_ms: 25,
        }
    }
}

/// What was measured.
pub struct DriveReport {
    pub sent: usize,
    /// Distinct transactions with a decision.
    pub decided: usize,
    /// Decisions received beyond the first per transaction (at-least-once redeliveries).
    pub duplicates: usize,
    pub outcomes: HashMap<String, u64>,
    /// Produce → decision arrival, µs.
    pub latency_us: Histogram<u64>,
    /// First produce → last decision.
    pub elapsed: Duration,
    /// Time spent producing (shows whether the offered rate was met).
    pub produce_elapsed: Duration,
    /// Per transaction (by sequence number): its decision and score, if one arrived.
    pub decisions: Vec<Option<(Arc<str>, f64)>>,
    /// Median latency (ms) of the first and of the last tenth of the transactions sent. A
    /// pipeline that keeps up shows about the same figure twice; one that falls behind shows
    /// its backlog growing: the last tenth waited longer.
    pub latency_first_tenth_ms: f64,
    pub latency_last_tenth_ms: f64,
    /// The latency split at the decision's Kafka timestamp (its CreateTime, stamped by the
    /// system's producer when it hands the decision over), medians in ms: produce → decision
    /// produced (input hop + the system's own work) and decision produced → arrival (output
    /// hop). Millisecond resolution; the two clocks are this host's.
    pub split_median_ms: [f64; 2],
}

impl DriveReport {
    /// Decisions per second over the run.
    pub fn throughput(&self) -> f64 {
        self.decided as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

fn kafka_err(e: impl std::fmt::Display) -> PipelineError {
    PipelineError::Kafka(e.to_string())
}

/// The two fields of a decision the driver keeps. Typed and borrowed: at tens of thousands
/// of decisions a second, a `serde_json::Value` per decision (a map and a string per field)
/// was a visible share of the harness's own CPU, which shares the box with the system
/// under test.
///
/// `decision` is a bare `Cow` with `borrow`: serde borrows a `Cow` only when it is the
/// field's type itself, not inside an `Option`. Empty when absent.
#[derive(Default, serde::Deserialize)]
struct DecisionFields<'a> {
    #[serde(borrow, default)]
    decision: std::borrow::Cow<'a, str>,
    score: Option<f64>,
}

/// Produces `spec.count` transactions over `world` and waits for their decisions.
pub fn drive(world: &World, spec: &DriveSpec) -> Result<DriveReport, PipelineError> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &spec.brokers)
        .set("group.id", format!("verdict-driver-{}", spec.run_id))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", spec.fetch_wait_ms.to_string())
        .set("session.timeout.ms", "6000")
        .create()
        .map_err(kafka_err)?;
    consumer
        .subscribe(&[spec.decisions_topic.as_str()])
        .map_err(kafka_err)?;
    // Join the group before producing, so no decision predates the consumer.
    let join_deadline = Instant::now() + Duration::from_secs(60);
    while consumer.assignment().map(|a| a.count()).unwrap_or(0) == 0 {
        if Instant::now() > join_deadline {
            return Err(kafka_err(
                "the decisions consumer got no partitions within 60 s",
            ));
        }
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            // Decisions from earlier runs: not ours.
            let _ = m;
        }
    }
    // An assigned partition still has to look up its start offset and issue its first
    // fetch; without this pause the first transaction's latency includes that (about 45 ms).
    let settle = Instant::now() + Duration::from_secs(1);
    while Instant::now() < settle {
        let _ = consumer.poll(Duration::from_millis(50));
    }

    let clock = Instant::now();
    let clock_wall_us = now_ms() as f64 * 1000.0;
    let producing_done = Arc::new(AtomicBool::new(false));
    let producer_thread = {
        let spec = spec.clone();
        let world = world.clone();
        let done = Arc::clone(&producing_done);
        std::thread::Builder::new()
            .name("driver-producer".into())
            .spawn(move || produce(&world, &spec, clock, &done))
            .map_err(|e| PipelineError::Stopped(e.to_string()))?
    };

    let prefix = format!("{}-", spec.run_id);
    let mut arrival_us: Vec<u64> = vec![u64::MAX; spec.count];
    // The decision's Kafka timestamp, µs on `clock`.
    let mut decision_created_us: Vec<Option<f64>> = vec![None; spec.count];
    let mut decided = 0usize;
    let mut duplicates = 0usize;
    let mut outcomes: HashMap<String, u64> = HashMap::new();
    let mut decisions: Vec<Option<(Arc<str>, f64)>> = vec![None; spec.count];
    let mut interned: HashMap<String, Arc<str>> = HashMap::new();
    let mut printed = 0usize;
    let mut last_arrival = clock;
    let mut settle_deadline: Option<Instant> = None;
    while decided < spec.count {
        if settle_deadline.is_none() && producing_done.load(Ordering::Acquire) {
            settle_deadline = Some(Instant::now() + spec.settle_timeout);
        }
        if settle_deadline.is_some_and(|d| Instant::now() > d) {
            break;
        }
        let Some(result) = consumer.poll(Duration::from_millis(50)) else {
            continue;
        };
        let message = result.map_err(kafka_err)?;
        let now = Instant::now();
        let Some(seq) = message
            .key()
            .and_then(|k| std::str::from_utf8(k).ok())
            .and_then(|k| k.strip_prefix(&prefix))
            .and_then(|s| s.parse::<usize>().ok())
            .filter(|s| *s < spec.count)
        else {
            continue;
        };
        if arrival_us[seq] != u64::MAX {
            duplicates += 1;
            continue;
        }
        arrival_us[seq] = now.duration_since(clock).as_micros() as u64;
        decision_created_us[seq] = message
            .timestamp()
            .to_millis()
            .map(|ms| ms as f64 * 1000.0 - clock_wall_us);
        decided += 1;
        last_arrival = now;
        let payload = message.payload().unwrap_or_default();
        let fields: DecisionFields = serde_json::from_slice(payload).unwrap_or_default();
        let outcome = match &*fields.decision {
            "" => "?",
            decision => decision,
        };
        let outcome = match interned.get(outcome) {
            Some(o) => Arc::clone(o),
            None => {
                let o: Arc<str> = outcome.into();
                interned.insert(outcome.to_string(), Arc::clone(&o));
                outcomes.insert(outcome.to_string(), 0);
                o
            }
        };
        if let Some(count) = outcomes.get_mut(&*outcome) {
            *count += 1;
        }
        decisions[seq] = Some((outcome, fields.score.unwrap_or(f64::NAN)));
        if printed < spec.print_samples {
            printed += 1;
            println!("  decision  {}", String::from_utf8_lossy(payload));
        }
    }
    let (send_us, produce_elapsed) = producer_thread
        .join()
        .map_err(|_| PipelineError::Stopped("producer thread panicked".into()))??;

    let mut latency_us = Histogram::new_with_bounds(1, 600_000_000, 3)
        .map_err(|e| PipelineError::Stopped(e.to_string()))?;
    for (sent, arrived) in send_us.iter().zip(&arrival_us) {
        if *arrived != u64::MAX {
            let _ = latency_us.record(arrived.saturating_sub(*sent).max(1));
        }
    }
    let tenth = (spec.count / 10).max(1);
    let median_ms = |range: std::ops::Range<usize>| {
        let mut waits: Vec<u64> = range
            .filter(|&i| arrival_us[i] != u64::MAX)
            .map(|i| arrival_us[i].saturating_sub(send_us[i]))
            .collect();
        waits.sort_unstable();
        waits
            .get(waits.len() / 2)
            .map_or(f64::NAN, |us| *us as f64 / 1000.0)
    };
    let mut upstream_us = Vec::new();
    let mut downstream_us = Vec::new();
    for (i, created) in decision_created_us.iter().enumerate() {
        if let Some(created) = created {
            upstream_us.push(created - send_us[i] as f64);
            downstream_us.push(arrival_us[i] as f64 - created);
        }
    }
    let median_of = |mut v: Vec<f64>| {
        v.sort_unstable_by(f64::total_cmp);
        v.get(v.len() / 2).map_or(f64::NAN, |us| us / 1000.0)
    };
    Ok(DriveReport {
        split_median_ms: [median_of(upstream_us), median_of(downstream_us)],
        sent: spec.count,
        decided,
        duplicates,
        outcomes,
        latency_us,
        elapsed: last_arrival.duration_since(clock),
        produce_elapsed,
        decisions,
        latency_first_tenth_ms: median_ms(0..tenth.min(spec.count)),
        latency_last_tenth_ms: median_ms(spec.count.saturating_sub(tenth)..spec.count),
    })
}

/// How far ahead of its due time the producer may send a transaction rather than sleep.
/// Far below the producer's own `linger.ms`, so batching, not pacing, shapes what the
/// broker sees.
const PACING_SLACK: Duration = Duration::from_micros(500);

/// Producer thread: returns each transaction's send time (µs on `clock`).
fn produce(
    world: &World,
    spec: &DriveSpec,
    clock: Instant,
    done: &AtomicBool,
) -> Result<(Vec<u64>, Duration), PipelineError> {
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", &spec.brokers)
        .set("linger.ms", spec.producer_linger_ms.to_string())
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .map_err(kafka_err)?;
    // Connect and learn the partition leaders before the first measured send: otherwise the
    // first transaction's latency is the producer's start-up (about 100 ms on Tansu).
    producer
        .client()
        .fetch_metadata(Some(&spec.input_topic), Duration::from_secs(10))
        .map_err(kafka_err)?;
    let mut stream = world.transactions(spec.seed, &spec.run_id, spec.unknown_card_rate);
    let mut send_us = Vec::with_capacity(spec.count);
    let interval = spec
        .rate_per_sec
        .map(|r| Duration::from_secs_f64(1.0 / r.max(1e-3)));
    let event_spacing_ms = spec.rate_per_sec.map_or(1.0, |r| 1000.0 / r.max(1e-3));
    // Spread the bad messages through the run.
    let bad_every = (spec.count / (spec.bad_messages.len() + 1)).max(1);
    let mut bad = spec.bad_messages.iter().enumerate();
    let mut payload = Vec::with_capacity(512);
    let started = Instant::now();
    for i in 0..spec.count {
        if let Some(interval) = interval {
            // Sleep only when at least `PACING_SLACK` ahead: a sleep per transaction (every
            // 40 µs at 25,000 tx/s) costs the harness a wake-up each, on the box the system
            // under test runs on. Each transaction's latency still counts from its own send.
            let due = started + interval.mul_f64(i as f64);
            let now = Instant::now();
            if due > now + PACING_SLACK {
                std::thread::sleep(due - now);
            }
        }
        if i > 0 && i % bad_every == 0 {
            if let Some((n, payload)) = bad.next() {
                send(
                    &producer,
                    &spec.input_topic,
                    format!("bad-{n}").as_bytes(),
                    payload,
                )?;
            }
        }
        let event_time_ms = match spec.event_time_base_ms {
            Some(base) => base + (i as f64 * event_spacing_ms) as i64,
            None => now_ms(),
        };
        let tx = stream.next_at(event_time_ms);
        payload.clear();
        serde_json::to_writer(&mut payload, &tx)
            .map_err(|e| PipelineError::Decode(e.to_string()))?;
        let key = if spec.key_by_card {
            tx.card_id.as_bytes()
        } else {
            tx.transaction_id.as_bytes()
        };
        send_us.push(clock.elapsed().as_micros() as u64);
        send(&producer, &spec.input_topic, key, &payload)?;
    }
    for (n, payload) in bad {
        send(
            &producer,
            &spec.input_topic,
            format!("bad-{n}").as_bytes(),
            payload,
        )?;
    }
    producer.flush(Duration::from_secs(30)).map_err(kafka_err)?;
    let produce_elapsed = started.elapsed();
    done.store(true, Ordering::Release);
    Ok((send_us, produce_elapsed))
}

pub(crate) fn send(
    producer: &ThreadedProducer<DefaultProducerContext>,
    topic: &str,
    key: &[u8],
    payload: &[u8],
) -> Result<(), PipelineError> {
    let mut record = BaseRecord::to(topic).key(key).payload(payload);
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                record = back;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err((e, _)) => return Err(kafka_err(e)),
        }
    }
}

/// p50 / p99 / p99.9 / max of a µs histogram, in ms, for printing.
pub fn percentiles_ms(h: &Histogram<u64>) -> [f64; 4] {
    [
        h.value_at_quantile(0.50) as f64 / 1000.0,
        h.value_at_quantile(0.99) as f64 / 1000.0,
        h.value_at_quantile(0.999) as f64 / 1000.0,
        h.max() as f64 / 1000.0,
    ]
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::*;

    #[test]
    fn reads_a_decisions_outcome_and_score_and_nothing_else() {
        let payload = br#"{"transaction_id":"t-1","decision":"decline","score":0.93,"features":{"amount":12.5},"reasons":["velocity"]}"#;
        let fields: DecisionFields = serde_json::from_slice(payload).unwrap();
        assert_eq!(fields.decision, "decline");
        assert_eq!(fields.score, Some(0.93));
        // The outcome borrows the payload unless it has escapes.
        assert!(matches!(fields.decision, Cow::Borrowed(_)));
        let escaped: DecisionFields =
            serde_json::from_slice(br#"{"decision":"re\"view"}"#).unwrap();
        assert_eq!(escaped.decision, "re\"view");
        assert_eq!(escaped.score, None);
        // Not a decision: the caller counts it as "?" with no score.
        let garbage: DecisionFields = serde_json::from_slice(b"not json").unwrap_or_default();
        assert_eq!(garbage.decision, "");
    }
}

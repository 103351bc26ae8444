//! `verdict demo`: the whole system on one machine with nothing started by hand. It starts a
//! Kafka-protocol broker and Redis, loads card and merchant features, runs the example fraud
//! workload (`deploy/config/verdict.toml`) in-process, produces generated transactions (and a
//! few malformed messages, which must come out as dead letters), prints decisions as they
//! arrive at an independent consumer, and ends with a summary.

use anyhow::Context;

use crate::config::{example_config_dir, Config, EXAMPLE_CONFIG};
use crate::driver::{drive, percentiles_ms, DriveReport, DriveSpec};
use crate::generator::{World, Zones, ZONES};
use crate::local_stack::LocalStack;
use crate::topology::WorkloadReport;
use crate::Pipeline;

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Transactions to produce.
    #[arg(long, default_value_t = 20_000)]
    pub count: usize,
    /// Offered rate, transactions per second.
    #[arg(long, default_value_t = 5_000.0)]
    pub rate: f64,
    /// Decisions to print as they arrive.
    #[arg(long, default_value_t = 5)]
    pub samples: usize,
    /// Quote requests for the pricing workload, produced after the transactions (0: none).
    #[arg(long, default_value_t = 2_000)]
    pub quotes: usize,
}

/// Topics of the example config, with their partition counts.
pub const EXAMPLE_TOPICS: [(&str, i32); 8] = [
    ("transactions", 3),
    ("decisions", 3),
    ("transactions.dead-letter", 1),
    ("fraud.drift-alerts", 1),
    ("quotes", 3),
    ("prices", 3),
    ("quotes.dead-letter", 1),
    ("pricing.drift-alerts", 1),
];

/// Starts the local servers, creates the example topics, loads a world into Redis and returns
/// the example config pointed at them.
pub async fn local_setup(
    cards: usize,
    merchants: usize,
) -> anyhow::Result<(LocalStack, World, Config)> {
    local_setup_with_topics(cards, merchants, &EXAMPLE_TOPICS).await
}

/// [`local_setup`] with other partition counts (`topics` must name the example topics).
pub async fn local_setup_with_topics(
    cards: usize,
    merchants: usize,
    topics: &[(&str, i32)],
) -> anyhow::Result<(LocalStack, World, Config)> {
    let stack = LocalStack::start()?;
    stack.create_topics(topics).await?;
    let world = World::generate(42, cards, merchants);
    world
        .load_into_redis(&stack.redis_url)
        .await
        .context("loading features into Redis")?;
    Zones::generate(42, ZONES)
        .load_into_redis(&stack.redis_url)
        .await
        .context("loading zone features into Redis")?;
    let mut config = Config::parse(EXAMPLE_CONFIG, &example_config_dir())?;
    config.kafka.brokers = stack.kafka_bootstrap.clone();
    config.redis.url = stack.redis_url.clone();
    // A free port: several pipelines (tests, a demo beside a running one) never collide.
    if let Some(http) = &mut config.http {
        http.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    }
    Ok((stack, world, config))
}

/// A few kinds of bad input, to show they become dead letters and nothing stops.
pub fn sample_bad_messages() -> Vec<Vec<u8>> {
    vec![
        b"{not json".to_vec(),
        br#"{"transaction_id":"bad-type","card_id":"c","merchant_id":"m","amount":"ten","currency":"EUR","country":"DE","channel":"pos","event_time_ms":1}"#.to_vec(),
        br#"{"transaction_id":"no-card"}"#.to_vec(),
        vec![0xff, 0xfe, 0x00],
        Vec::new(),
    ]
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    println!(
        "verdict demo: starting a Kafka-protocol broker (Tansu) and redis-server on free ports"
    );
    let (stack, world, config) = local_setup(5_000, 500).await?;
    println!(
        "  broker {}  redis {}  ({} cards, {} merchants loaded)",
        stack.kafka_bootstrap,
        stack.redis_url,
        world.cards.len(),
        world.merchants.len()
    );
    let pipeline = Pipeline::start(&config).await?;
    if let Some(address) = pipeline.http_address() {
        println!("  metrics http://{address}/metrics  readiness http://{address}/readyz");
    }
    let workload = &config.workloads[0];
    println!(
        "  workload `{}`: {} → {} (dead letters → {}), model {}",
        workload.name,
        workload.input_topic,
        workload.decisions_topic,
        workload.dead_letter_topic,
        workload.model.display()
    );
    let bad = sample_bad_messages();
    println!(
        "producing {} transactions at {} tx/s, plus {} malformed messages",
        args.count,
        args.rate,
        bad.len()
    );
    let spec = DriveSpec {
        rate_per_sec: Some(args.rate),
        seed: 7,
        bad_messages: bad,
        print_samples: args.samples,
        settle_timeout: std::time::Duration::from_secs(30),
        ..DriveSpec::new(
            stack.kafka_bootstrap.clone(),
            workload.input_topic.clone(),
            workload.decisions_topic.clone(),
            args.count,
            format!("demo{}", std::process::id()),
        )
    };
    let drive_report = tokio::task::spawn_blocking(move || drive(&world, &spec)).await??;

    let pricing = config.workloads.iter().find(|w| w.name == "pricing");
    let priced = match (pricing, args.quotes) {
        (Some(pricing), quotes) if quotes > 0 => {
            println!();
            println!(
                "pricing: producing {quotes} quote requests to `{}`, prices on `{}`",
                pricing.input_topic, pricing.decisions_topic
            );
            let (brokers, input, output) = (
                stack.kafka_bootstrap.clone(),
                pricing.input_topic.clone(),
                pricing.decisions_topic.clone(),
            );
            tokio::task::spawn_blocking(move || drive_quotes(&brokers, &input, &output, quotes))
                .await??
        }
        _ => 0,
    };
    pipeline.stop();
    let reports = pipeline.wait().await?;
    print_summary(&drive_report, &reports);
    anyhow::ensure!(
        drive_report.decided == drive_report.sent,
        "{} of {} transactions got no decision",
        drive_report.sent - drive_report.decided,
        drive_report.sent
    );
    anyhow::ensure!(
        priced == args.quotes,
        "{} of {} quotes got no price",
        args.quotes - priced,
        args.quotes
    );
    Ok(())
}

/// Produces quote requests, reads the prices back, prints a few and the multiplier mix.
/// Returns how many distinct quotes were priced.
fn drive_quotes(brokers: &str, input: &str, output: &str, count: usize) -> anyhow::Result<usize> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::Message;

    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("demo-prices-{}", std::process::id()))
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .create()?;
    consumer.subscribe(&[output])?;
    crate::gen::produce_synthetic(&crate::gen::TopicArgs {
        kind: crate::generator::Kind::Pricing,
        brokers: brokers.to_string(),
        topic: input.to_string(),
        rate: 1_000.0,
        count,
        world_seed: 42,
        seed: 9,
    })?;
    let mut seen = std::collections::HashSet::new();
    let mut multipliers = std::collections::BTreeMap::<String, usize>::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while seen.len() < count && std::time::Instant::now() < deadline {
        let Some(message) = consumer.poll(std::time::Duration::from_millis(100)) else {
            continue;
        };
        let message = message?;
        let decision: serde_json::Value =
            serde_json::from_slice(message.payload().unwrap_or_default())?;
        let id = decision["transaction_id"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if seen.insert(id) {
            if seen.len() <= 3 {
                println!("  {decision}");
            }
            let m = decision["price"]["multiplier"].as_f64().unwrap_or(f64::NAN);
            *multipliers.entry(format!("{m:.2}")).or_default() += 1;
        }
    }
    let mut top: Vec<_> = multipliers.into_iter().collect();
    top.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
    let top: Vec<String> = top
        .iter()
        .take(6)
        .map(|(m, n)| format!("×{m}: {n}"))
        .collect();
    println!(
        "  priced {} of {count}; most quoted multipliers {}",
        seen.len(),
        top.join(", ")
    );
    Ok(seen.len())
}

/// Prints the driver's and the pipeline's figures.
pub fn print_summary(drive: &DriveReport, reports: &[WorkloadReport]) {
    let [p50, p99, p999, max] = percentiles_ms(&drive.latency_us);
    println!();
    println!("summary");
    println!(
        "  transactions  sent {}  decided {}  duplicates {}",
        drive.sent, drive.decided, drive.duplicates
    );
    let mut mix: Vec<_> = drive.outcomes.iter().collect();
    mix.sort();
    let mix: Vec<String> = mix
        .iter()
        .map(|(k, v)| {
            format!(
                "{k} {v} ({:.1}%)",
                **v as f64 * 100.0 / drive.decided.max(1) as f64
            )
        })
        .collect();
    println!("  decision mix  {}", mix.join(", "));
    println!(
        "  latency produce → decision (ms)  p50 {p50:.2}  p99 {p99:.2}  p99.9 {p999:.2}  max {max:.2}"
    );
    println!(
        "  throughput    {:.0} decisions/s over {:.2} s (producing took {:.2} s)",
        drive.throughput(),
        drive.elapsed.as_secs_f64(),
        drive.produce_elapsed.as_secs_f64()
    );
    for r in reports {
        let t = &r.timings;
        let mean = |h: &hdrhistogram::Histogram<u64>| h.mean();
        println!(
            "  pipeline `{}`  messages {}  batches {}  decisions {} (fallbacks {})  dead letters {}  degraded batches {}  drift alerts {}",
            r.name, r.source.messages, r.source.batches, r.decisions, r.fallbacks, r.dead_letters, r.degraded_batches, r.drift_alerts
        );
        let [e50, e99, _, emax] = percentiles_ms(&t.end_to_end_us);
        println!(
            "  pipeline view: record timestamp → decision acknowledged (ms)  p50 {e50:.1}  p99 {e99:.1}  max {emax:.1}"
        );
        println!(
            "  per batch (mean, µs)  rows {:.0}  redis lookup {:.0}  sql join {:.0}  onnx score {:.0}  produce+ack {:.0}",
            mean(&t.rows),
            mean(&t.lookup_us),
            mean(&t.join_us),
            mean(&t.score_us),
            mean(&t.produce_us)
        );
    }
}

//! The user-facing tools against real servers: `verdict gen entities` + `verdict features
//! load` put exactly the generator's features into Redis, in the layout the lookups read;
//! `verdict gen topic` produces messages that fit the input contract; `verdict gen dataset`
//! writes the model's features and a label.

use std::collections::HashMap;

use redis::Commands;
use verdict::config::example_config_dir;
use verdict::feature_load::{self, LoadArgs};
use verdict::gen::{self, DatasetArgs, EntitiesArgs, GenCommand, TopicArgs};
use verdict::generator::{Kind, Synthetic};
use verdict::local_stack::LocalStack;
use verdict_tests::Collector;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entities_written_as_csv_load_into_redis_as_the_lookups_expect() -> anyhow::Result<()> {
    let stack = LocalStack::redis_only()?;
    let dir = tempfile::tempdir()?;
    gen::run(GenCommand::Entities(EntitiesArgs {
        kind: Kind::Fraud,
        world_seed: 11,
        out_dir: dir.path().to_path_buf(),
    }))
    .await?;
    for (file, prefix) in [("card.csv", "card:"), ("merchant.csv", "merchant:")] {
        feature_load::run(LoadArgs {
            redis_url: stack.redis_url.clone(),
            file: dir.path().join(file),
            key_column: "id".into(),
            key_prefix: prefix.into(),
        })
        .await?;
    }
    let expected = Synthetic::generate(Kind::Fraud, 11).entity_hashes();
    let mut redis = redis::Client::open(stack.redis_url.as_str())?.get_connection()?;
    let keys: usize = redis::cmd("DBSIZE").query(&mut redis)?;
    assert_eq!(keys, expected.len(), "one hash per entity");
    for (key, fields) in expected.iter().step_by(97) {
        let stored: HashMap<String, String> = redis.hgetall(key)?;
        let wanted: HashMap<String, String> = fields
            .iter()
            .map(|(f, v)| (f.to_string(), v.clone()))
            .collect();
        assert_eq!(stored, wanted, "{key}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gen_topic_produces_quotes_that_fit_the_input_contract() -> anyhow::Result<()> {
    let stack = LocalStack::start()?;
    stack.create_topics(&[("quotes", 2)]).await?;
    let brokers = stack.kafka_bootstrap.clone();
    let collector = Collector::start(&brokers, "quotes")?;
    gen::run(GenCommand::Topic(TopicArgs {
        kind: Kind::Pricing,
        brokers: brokers.clone(),
        topic: "quotes".into(),
        rate: 2_000.0,
        count: 500,
        world_seed: 1,
        seed: 2,
    }))
    .await?;
    tokio::task::block_in_place(|| {
        collector.wait_until(std::time::Duration::from_secs(60), "500 quotes", |c| {
            c.distinct_keys() >= 500
        })
    })?;
    let schema: serde_json::Value =
        serde_json::from_str(verdict_schemas::input::PRICING_QUOTE_JSON_SCHEMA)?;
    let validator = jsonschema::validator_for(&schema)?;
    let received = collector.stop()?;
    assert_eq!(received.len(), 500);
    for r in &received {
        let quote: serde_json::Value = serde_json::from_slice(&r.payload)?;
        assert!(validator.is_valid(&quote), "{quote}");
        assert_eq!(r.key.as_deref(), quote["quote_id"].as_str(), "keyed by id");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gen_dataset_writes_every_model_feature_and_a_label() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("fraud.csv");
    gen::run(GenCommand::Dataset(DatasetArgs {
        kind: Kind::Fraud,
        config: example_config_dir().join("verdict.toml"),
        workload: "fraud".into(),
        count: 3_000,
        events_per_second: 1.5,
        world_seed: 42,
        seed: 3,
        out: out.clone(),
    }))
    .await?;
    let text = std::fs::read_to_string(&out)?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    assert_eq!(header.last(), Some(&"label"));
    let model = verdict_scorers::LoadedModel::load(
        &verdict::Config::load(&example_config_dir().join("verdict.toml"))?.workloads[0].model,
    )?;
    for feature in model.feature_names() {
        assert!(
            header.contains(&feature),
            "{feature} missing from {header:?}"
        );
    }
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), 3_000);
    assert!(rows.iter().all(|r| r.len() == header.len()));
    let frauds = rows.iter().filter(|r| r.last() == Some(&"1")).count();
    assert!((30..400).contains(&frauds), "{frauds} frauds in 3000");
    Ok(())
}

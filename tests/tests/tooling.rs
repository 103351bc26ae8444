//! The user-facing tools against real servers: `verdict gen entities` + `verdict features
//! load` put exactly the generator's features into Redis, in the layout the lookups read;
//! `verdict gen topic` produces messages that fit the input contract; `verdict gen dataset`
//! writes the model's features and a label; `verdict demo` stopped by a signal takes the
//! servers it started with it.

use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use redis::Commands;
use verdict::config::example_config_dir;
use verdict::feature_load::{self, LoadArgs};
use verdict::gen::{self, DatasetArgs, EntitiesArgs, GenCommand, TopicArgs};
use verdict::generator::{Kind, Synthetic};
use verdict::local_stack::LocalStack;
use verdict_tests::{verdict_binary, Collector};

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

/// A `redis-server` started on a port another one already holds exits with `EADDRINUSE`
/// while the other keeps answering there; the stack must see that the answer is not from its
/// own child rather than hand out a server that belongs to someone else (two tests once shared
/// one that way, and the second failed when the first one's ended).
#[test]
fn a_redis_whose_port_is_taken_is_not_mistaken_for_the_one_answering_there() -> anyhow::Result<()> {
    let holder = LocalStack::redis_only()?;
    let mut late = LocalStack::redis_only()?;
    late.kill_redis()?;
    late.redis_url = holder.redis_url.clone();
    let error = late
        .restart_redis()
        .expect_err("the port is held by the other stack's redis-server");
    let message = error.to_string();
    assert!(
        message.contains("not ours") || message.contains("exited"),
        "unexpected error: {message}"
    );
    // The holder is untouched.
    let mut redis = redis::Client::open(holder.redis_url.as_str())?.get_connection()?;
    let pong: String = redis::cmd("PING").query(&mut redis)?;
    assert_eq!(pong, "PONG");
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

/// Process ids and names (`comm`) of the live processes whose parent is `parent`. A zombie
/// (killed, not yet reaped by whoever inherited it) does not count as live.
fn live_children(parent: u32) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Some((ppid, state, name)) = stat_of(pid) {
            if ppid == parent && state != 'Z' {
                found.push((pid, name));
            }
        }
    }
    found
}

/// Parent pid, state and name of a process, from `/proc/<pid>/stat` (`None`: it is gone).
fn stat_of(pid: u32) -> Option<(u32, char, String)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid …`; comm may hold spaces, so split at the last `)`.
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let name = stat[open + 1..close].to_string();
    let mut rest = stat[close + 1..].split_whitespace();
    let state = rest.next()?.chars().next()?;
    let ppid = rest.next()?.parse().ok()?;
    Some((ppid, state, name))
}

/// A signal's default action skips destructors, so before the fix a demo (or bench) stopped
/// with `kill` left Tansu and `redis-server` running. Now it kills them first, and still ends
/// by the signal it got.
#[test]
fn a_demo_stopped_by_sigterm_takes_its_servers_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut demo = std::process::Command::new(verdict_binary())
        .args(["demo", "--count", "1000000", "--rate", "1000"])
        .stdout(std::fs::File::create(dir.path().join("demo.log")).unwrap())
        .stderr(std::fs::File::create(dir.path().join("demo.err")).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let servers = loop {
        let children = live_children(demo.id());
        let named = |n: &str| children.iter().any(|(_, name)| name.starts_with(n));
        if named("redis-server") && named("tansu") {
            break children;
        }
        assert!(
            Instant::now() < deadline,
            "the demo did not start both servers within 60 s: {children:?}"
        );
        assert!(demo.try_wait().unwrap().is_none(), "the demo exited early");
        std::thread::sleep(Duration::from_millis(50));
    };
    let pid = libc::pid_t::try_from(demo.id()).unwrap();
    // SAFETY: kill(2) with a pid this test spawned and has not reaped yet.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = demo.wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGTERM), "{status:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // Gone, or a zombie: both mean killed. A pid reused by another program has another
        // name.
        let alive: Vec<&(u32, String)> = servers
            .iter()
            .filter(|(pid, name)| {
                stat_of(*pid).is_some_and(|(_, state, now)| state != 'Z' && &now == name)
            })
            .collect();
        if alive.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still running 10 s after the demo was stopped: {alive:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

//! Secrets and card numbers stay out of logs and metrics. A `verdict run` process is given
//! canary secrets (a Redis password the real `redis-server` requires, SASL and TLS key
//! passwords in the librdkafka properties), the most verbose logging there is (`RUST_LOG=trace`
//! and librdkafka `debug=all`), and traffic whose card ids are Luhn-valid card numbers, some
//! of it malformed so error paths log too. Every line it writes and its `/metrics` page are
//! then scanned for the canaries and for any Luhn-valid 13–19 digit run.

use std::time::Duration;

use verdict::config::{example_config_dir, Config, EXAMPLE_CONFIG};
use verdict::local_stack::free_port;
use verdict::scrape;
use verdict_tests::{produce, Collector, Harness, VerdictProcess};

/// Whether a digit string passes the Luhn check.
fn luhn_valid(digits: &[u8]) -> bool {
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, d)| {
            let d = u32::from(d - b'0');
            if i % 2 == 1 {
                let d2 = d * 2;
                if d2 > 9 {
                    d2 - 9
                } else {
                    d2
                }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// A Luhn-valid 16-digit number starting with `prefix` (15 digits).
fn card_number(prefix: u64) -> String {
    let body = format!("{prefix:015}");
    (0..10)
        .map(|check| format!("{body}{check}"))
        .find(|n| luhn_valid(n.as_bytes()))
        .expect("one check digit fits")
}

/// Every Luhn-valid run of 13 to 19 digits in `text` (separators are not digits, so card
/// numbers formatted with spaces would be split: the ones here are unformatted).
fn card_numbers_in(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for run in text.split(|c: char| !c.is_ascii_digit()) {
        if (13..=19).contains(&run.len()) && luhn_valid(run.as_bytes()) {
            found.push(run.to_string());
        }
    }
    found
}

/// Every Luhn-valid 13–19 digit run in a Prometheus text page, where a card number could
/// leak: comments, metric names, label values and the integer part of a sample value. The
/// fraction of a float sample (`_sum 0.01234567890123456`) is left out: its 16–17 digits are
/// rounding noise that passes the check one time in ten, and no identifier can hide there.
fn card_numbers_in_metrics(page: &str) -> Vec<String> {
    page.lines()
        .flat_map(|line| {
            let scanned = match line.rsplit_once(' ') {
                Some((series, value)) if !line.starts_with('#') => {
                    let integer = value.split(['.', 'e', 'E']).next().unwrap_or(value);
                    format!("{series} {integer}")
                }
                _ => line.to_string(),
            };
            card_numbers_in(&scanned)
        })
        .collect()
}

#[test]
fn the_luhn_scanner_finds_card_numbers() {
    assert!(luhn_valid(b"4111111111111111"));
    assert!(!luhn_valid(b"4111111111111112"));
    let n = card_number(411_111_111_111_111);
    assert_eq!(card_numbers_in(&format!("card {n} ok")), vec![n.clone()]);
    // In /metrics: found in a label and as an integer sample, not in a float's fraction.
    let page =
        format!("# HELP x_total help\nx_total{{card=\"{n}\"}} 1\ny {n}\nz_sum 0.{n}\nw 1.5e{n}\n");
    assert_eq!(card_numbers_in_metrics(&page), vec![n.clone(), n]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_secrets_and_card_numbers_never_reach_logs_or_metrics() -> anyhow::Result<()> {
    let harness = Harness::start(200, 50).await?;
    let tag = std::process::id();
    let redis_canary = format!("CanaryRedisPw{tag}x");
    let sasl_canary = format!("CanarySaslPw{tag}x");
    let ssl_canary = format!("CanarySslKeyPw{tag}x");
    {
        let client = redis::Client::open(harness.stack.redis_url.as_str())?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("CONFIG")
            .arg(&["SET", "requirepass", redis_canary.as_str()])
            .query_async::<()>(&mut conn)
            .await?;
    }
    let redis_url = harness
        .stack
        .redis_url
        .replace("redis://", &format!("redis://:{redis_canary}@"));
    let brokers = harness.stack.kafka_bootstrap.clone();
    let port = free_port()?;
    let model_dir = |name: &str| {
        example_config_dir()
            .join("../../scorers/models")
            .join(name)
            .canonicalize()
    };
    let text = EXAMPLE_CONFIG
        .replace("127.0.0.1:9092", &brokers)
        .replace("redis://127.0.0.1:6379", &redis_url)
        .replace("127.0.0.1:9464", &format!("127.0.0.1:{port}"))
        .replace(
            "\"../../scorers/models/fraud-mlp\"",
            &format!("{:?}", model_dir("fraud-mlp")?),
        )
        .replace(
            "\"../../scorers/models/pricing-gbt\"",
            &format!("{:?}", model_dir("pricing-gbt")?),
        )
        .replace(
            "group-id = \"verdict\"",
            &format!(
                "group-id = \"verdict\"\n\
                 [kafka.properties]\n\
                 \"sasl.username\" = \"canary-user\"\n\
                 \"sasl.password\" = \"{sasl_canary}\"\n\
                 \"ssl.key.password\" = \"{ssl_canary}\"\n\
                 \"debug\" = \"all\""
            ),
        );
    let dir = tempfile::tempdir()?;
    let config_path = dir.path().join("verdict.toml");
    std::fs::write(&config_path, &text)?;

    // `Debug` of the parsed config (what a panic or an error message could print).
    let parsed = Config::load(&config_path)?;
    let debug = format!("{parsed:?}");
    for canary in [&redis_canary, &sasl_canary, &ssl_canary] {
        assert!(
            !debug.contains(canary.as_str()),
            "Debug output shows a secret: {debug}"
        );
    }

    let decisions = Collector::start(&brokers, harness.decisions_topic())?;
    let log = dir.path().join("verdict.log");
    let mut process = VerdictProcess::spawn_with_env(&config_path, &log, &[("RUST_LOG", "trace")]);
    tokio::task::block_in_place(|| process.wait_ready(Duration::from_secs(60)))?;

    // Card numbers where card tokens belong, valid and malformed messages alike.
    let mut transactions = harness.transactions(300, "pan", 0.0);
    let mut pans = Vec::new();
    for (i, t) in transactions.iter_mut().enumerate() {
        t.card_id = card_number(400_000_000_000_000 + i as u64 * 7_919);
        pans.push(t.card_id.clone());
    }
    let mut messages: Vec<(String, Vec<u8>)> = transactions
        .iter()
        .map(|t| (t.card_id.clone(), serde_json::to_vec(t).unwrap()))
        .collect();
    for (i, pan) in pans.iter().take(5).enumerate() {
        messages.push((
            pan.clone(),
            format!("{{\"transaction_id\":\"{pan}\",\"amount\":{pan}").into_bytes(),
        ));
        messages.push((
            pan.clone(),
            format!(
                r#"{{"transaction_id":"bad-{i}","card_id":"c","merchant_id":"m","amount":"{pan}","currency":"EUR","country":"DE","channel":"pos","event_time_ms":{pan}}}"#
            )
            .into_bytes(),
        ));
    }
    let topic = harness.input_topic().to_string();
    let b = brokers.clone();
    tokio::task::spawn_blocking(move || produce(&b, &topic, &messages, None)).await??;
    tokio::task::block_in_place(|| {
        decisions.wait_until(Duration::from_secs(90), "every decision", |c| {
            c.distinct_keys() >= transactions.len()
        })
    })?;
    let (_, metrics) = scrape::get(
        std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        "/metrics",
    )?;
    let status = tokio::task::block_in_place(|| process.terminate());
    assert!(status.success(), "graceful shutdown exits 0, got {status}");
    decisions.stop()?;

    let stdout = std::fs::read_to_string(&log)?;
    let stderr = std::fs::read_to_string(log.with_extension("err"))?;
    let logs = format!("{stdout}\n{stderr}");
    let lines = logs.lines().count();
    assert!(lines > 1_000, "trace logging was on: {lines} lines");
    assert!(
        logs.contains("rdkafka"),
        "librdkafka's debug lines are in the log"
    );
    for canary in [&redis_canary, &sasl_canary, &ssl_canary] {
        let hits: Vec<&str> = logs
            .lines()
            .filter(|l| l.contains(canary.as_str()))
            .take(3)
            .collect();
        assert!(hits.is_empty(), "a secret was logged: {hits:#?}");
        assert!(
            !metrics.contains(canary.as_str()),
            "a secret is in /metrics"
        );
    }
    // The card numbers fed must appear nowhere.
    let leaked: Vec<&str> = logs
        .lines()
        .filter(|l| pans.iter().any(|p| l.contains(p.as_str())))
        .take(3)
        .collect();
    assert!(
        leaked.is_empty(),
        "card numbers in the log, e.g. {leaked:#?}"
    );
    assert!(
        !pans.iter().any(|p| metrics.contains(p.as_str())),
        "card numbers in /metrics"
    );
    // Any other Luhn-valid digit run is reported (librdkafka's microsecond clocks and
    // event times can pass the check by chance, so these are printed, not failed on).
    let luhn_runs: usize = logs.lines().map(|l| card_numbers_in(l).len()).sum();
    let in_metrics = card_numbers_in_metrics(&metrics);
    assert!(
        in_metrics.is_empty(),
        "a Luhn-valid number in /metrics: {in_metrics:?}"
    );
    eprintln!(
        "{lines} log lines and {} bytes of metrics scanned; none of {} card numbers found; \
         {luhn_runs} other Luhn-valid digit runs in the log",
        metrics.len(),
        pans.len()
    );
    Ok(())
}

/// Redis over TLS with an ACL user, both given in the URL: a real `redis-server` with a TLS
/// port and a self-signed certificate (made by `openssl` here), reached by the same store the
/// pipeline uses. `#insecure` skips certificate verification, which a self-signed test
/// certificate needs; production URLs leave it out and the system's trust store applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_feature_store_speaks_tls_with_acl_credentials_from_the_url() -> anyhow::Result<()> {
    use verdict_features::{FeatureStore, RedisConfig, RedisFeatureStore};
    let dir = tempfile::tempdir()?;
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let made = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()?;
    anyhow::ensure!(
        made.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&made.stderr)
    );
    let port = free_port()?;
    let mut server = std::process::Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ])
        .args(["--tls-auth-clients", "no", "--dir"])
        .arg(dir.path())
        .arg("--tls-cert-file")
        .arg(&cert)
        .arg("--tls-key-file")
        .arg(&key)
        .stdout(std::process::Stdio::null())
        .spawn()?;
    let result = async {
        let config = |url: String| RedisConfig {
            url,
            response_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(2),
        };
        let base = format!("rediss://127.0.0.1:{port}/#insecure");
        // The default user (no password yet) creates the ACL user over TLS.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let client = redis::Client::open(base.as_str())?;
        let mut conn = loop {
            match client.get_multiplexed_async_connection().await {
                Ok(c) => break c,
                Err(e) if std::time::Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(anyhow::anyhow!("TLS connection: {e}")),
            }
        };
        redis::cmd("ACL")
            .arg(&["SETUSER", "verdict", "on", ">tls-acl-pw", "~*", "+@all"])
            .query_async::<()>(&mut conn)
            .await?;
        redis::cmd("ACL")
            .arg(&["SETUSER", "default", "off"])
            .query_async::<()>(&mut conn)
            .await?;

        let store = RedisFeatureStore::connect(&config(format!(
            "rediss://verdict:tls-acl-pw@127.0.0.1:{port}/#insecure"
        )))?;
        store.ping().await?;
        let wrong = RedisFeatureStore::connect(&config(format!(
            "rediss://verdict:wrong@127.0.0.1:{port}/#insecure"
        )))?;
        anyhow::ensure!(
            wrong.ping().await.is_err(),
            "a wrong ACL password is refused"
        );
        let plain = RedisFeatureStore::connect(&config(format!(
            "redis://verdict:tls-acl-pw@127.0.0.1:{port}"
        )))?;
        anyhow::ensure!(
            plain.ping().await.is_err(),
            "plain text is refused by a TLS port"
        );
        Ok(())
    }
    .await;
    let _ = server.kill();
    let _ = server.wait();
    result
}

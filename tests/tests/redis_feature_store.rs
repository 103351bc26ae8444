//! The Redis feature store against a real `redis-server`:
//! - hash reads: a batch's pipelined `HMGET`s, read into one buffer, must answer what the
//!   in-memory store answers, for any values (empty strings, `:` and `-`, non-ASCII), missing
//!   fields, missing hashes and several lookups in one round trip;
//! - velocity: the Lua script that runs inside Redis must count exactly what the definition
//!   ([`recount`]) says, batch after batch, with out-of-order, late and redelivered events —
//!   and agree with the in-memory implementation that computes training data, late flags
//!   included.

use std::rc::Rc;

use proptest::prelude::*;
use verdict::local_stack::LocalStack;
use verdict_features::velocity::{recount, VelocityEvent, VelocityUpdate};
use verdict_features::{
    EntityLookup, FeatureField, FeatureStore, FeatureType, HashRead, InMemoryFeatureStore,
    InMemoryVelocity, Lookups, RedisConfig, RedisFeatureStore,
};

const WINDOWS_MS: [i64; 3] = [60_000, 3_600_000, 86_400_000];
const LATENESS_MS: i64 = 300_000;
const HORIZON_MS: i64 = 86_400_000 + LATENESS_MS;

type Server = (LocalStack, tokio::runtime::Runtime, RedisFeatureStore);

thread_local! {
    /// One server for every case of a property (each case uses its own key prefix), per test
    /// thread. Not a `static`: a static is never dropped, so its redis-server outlived the test
    /// binary. libtest runs each test on its own thread, whose thread-locals are dropped (the
    /// server killed) when the test ends.
    static REDIS: Rc<Server> = Rc::new(start_redis());
}

fn redis() -> Rc<Server> {
    REDIS.with(Rc::clone)
}

fn start_redis() -> Server {
    let stack = LocalStack::redis_only().expect("redis-server starts");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let config: RedisConfig = serde_json::from_value(serde_json::json!({
        "url": stack.redis_url,
        "response-timeout": "5s",
        "connect-timeout": "5s",
    }))
    .expect("config");
    // The connection manager spawns its driver on the runtime it is created in.
    let store = runtime
        .block_on(async { RedisFeatureStore::connect(&config) })
        .expect("client");
    (stack, runtime, store)
}

/// Card-testing bursts (seconds apart), hour-scale gaps, day-scale gaps, gaps of exactly a
/// window, events up to an hour out of order, and redeliveries.
fn events() -> impl Strategy<Value = Vec<VelocityEvent<'static>>> {
    // Exact window lengths as gaps, and no skew, put events right on window boundaries.
    let gap = prop_oneof![
        0i64..5_000,
        0i64..600_000,
        0i64..20_000_000,
        Just(60_000i64),
        Just(3_600_000i64),
        Just(86_400_000i64),
    ];
    let skew = prop_oneof![Just(0i64), -3_600_000i64..1_000];
    proptest::collection::vec((0u8..3, gap, skew, 1i64..100_000, 0u8..8), 1..150).prop_map(
        |steps| {
            let mut clock = 1_750_000_000_000i64;
            let mut out: Vec<VelocityEvent<'static>> = Vec::new();
            for (n, (card, gap, skew, cents, redeliver)) in steps.into_iter().enumerate() {
                if redeliver == 0 && !out.is_empty() {
                    let again = out[(n * 7) % out.len()].clone();
                    out.push(again);
                    continue;
                }
                clock += gap;
                out.push(VelocityEvent {
                    key: format!("card-{card}").into(),
                    event_time_ms: clock + skew,
                    amount_cents: cents,
                    id: format!("tx-{n}").into(),
                });
            }
            out
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn redis_velocity_matches_a_brute_force_recount(events in events(), batch in 1usize..40) {
        static CASE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let prefix = format!("case{}:", CASE.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        let events: Vec<VelocityEvent<'static>> = events
            .into_iter()
            .map(|e| VelocityEvent {
                key: format!("{prefix}{}", e.key).into(),
                ..e
            })
            .collect();
        let server = redis();
        let (_, runtime, store) = &*server;
        let mut memory = InMemoryVelocity::default();
        let mut from_redis = Vec::new();
        let mut from_memory = Vec::new();
        for chunk in events.chunks(batch) {
            let update = VelocityUpdate {
                windows_ms: WINDOWS_MS.to_vec(),
                horizon_ms: HORIZON_MS,
                events: chunk.to_vec(),
            };
            let answer = runtime
                .block_on(store.fetch(&[], std::slice::from_ref(&update)))
                .expect("redis answers");
            from_redis.extend(answer.velocity.into_iter().flatten());
            from_memory.extend(memory.apply(&update));
        }
        prop_assert_eq!(from_redis.len(), events.len());
        for (i, got) in from_redis.iter().enumerate() {
            prop_assert_eq!(got, &from_memory[i], "event {}: Redis vs in-memory", i);
            let (counts, sums) = recount(&events, &WINDOWS_MS, i);
            if got.late {
                for (got, recounted) in got.counts.iter().zip(&counts) {
                    prop_assert!(got <= recounted, "late event {} overcounts", i);
                }
            } else {
                prop_assert_eq!(got.counts.as_slice(), counts.as_slice(), "event {} counts", i);
                prop_assert_eq!(got.sums_cents.as_slice(), sums.as_slice(), "event {} sums", i);
            }
        }
    }
}

/// Round trips started one after another share one pipelined connection: each is sent
/// before the earlier ones have their replies, yet Redis applies them, and their answers
/// reach their callers, in the order they started. Forty one-event updates of one card, all
/// in flight at once: the n-th sees n events, and their amounts.
#[test]
fn round_trips_in_flight_together_apply_in_the_order_they_started() {
    let server = redis();
    let (_stack, runtime, store) = &*server;
    let updates: Vec<VelocityUpdate<'static>> = (0..40i64)
        .map(|n| VelocityUpdate {
            windows_ms: WINDOWS_MS.to_vec(),
            horizon_ms: HORIZON_MS,
            events: vec![VelocityEvent {
                key: "in-flight:card-1".into(),
                event_time_ms: 1_750_000_000_000 + n * 1_000,
                amount_cents: 100 + n,
                id: format!("tx-{n}").into(),
            }],
        })
        .collect();
    let answers = runtime.block_on(async {
        let mut in_flight = Vec::new();
        for update in &updates {
            let mut fetch = store.fetch(&[], std::slice::from_ref(update));
            // Polled once as it starts, as the pipeline's feature stage does.
            assert!(futures::poll!(fetch.as_mut()).is_pending());
            in_flight.push(fetch);
        }
        futures::future::join_all(in_flight).await
    });
    for (n, answer) in answers.into_iter().enumerate() {
        let answer = answer.expect("redis answers");
        let seen = &answer.velocity[0][0];
        let n = n as i64;
        assert_eq!(seen.counts.as_slice(), [n + 1; 3], "update {n}");
        let sum: i64 = (0..=n).map(|i| 100 + i).sum();
        assert_eq!(seen.sums_cents[2], sum, "update {n}");
    }
}

/// Keys carry a TTL of the horizon, so an idle card's history leaves Redis by itself.
#[test]
fn velocity_keys_expire_after_the_horizon() {
    let server = redis();
    let (stack, runtime, store) = &*server;
    let update = VelocityUpdate {
        windows_ms: WINDOWS_MS.to_vec(),
        horizon_ms: HORIZON_MS,
        events: vec![VelocityEvent {
            key: "ttl:card-1".into(),
            event_time_ms: 1_750_000_000_000,
            amount_cents: 1234,
            id: "tx-1".into(),
        }],
    };
    runtime
        .block_on(store.fetch(&[], &[update]))
        .expect("redis answers");
    let client = redis::Client::open(stack.redis_url.as_str()).unwrap();
    let mut conn = client.get_connection().unwrap();
    let ttl: i64 = redis::cmd("PTTL")
        .arg("ttl:card-1")
        .query(&mut conn)
        .unwrap();
    assert!(
        ttl > HORIZON_MS - 60_000 && ttl <= HORIZON_MS,
        "PTTL {ttl} ms, horizon {HORIZON_MS} ms"
    );
}

/// The script answers in one string of integers; sums past 1e14 cents (where Lua's default
/// number format switches to exponent notation) still arrive exact.
#[test]
fn sums_beyond_lua_number_formatting_arrive_exact() {
    let server = redis();
    let (_stack, runtime, store) = &*server;
    let event = |n: i64, cents: i64| VelocityEvent {
        key: "big:card-1".into(),
        event_time_ms: 1_750_000_000_000 + n,
        amount_cents: cents,
        id: format!("tx-{n}").into(),
    };
    let update = VelocityUpdate {
        windows_ms: WINDOWS_MS.to_vec(),
        horizon_ms: HORIZON_MS,
        events: vec![event(1, 60_000_000_000_003), event(2, 60_000_000_000_004)],
    };
    let answer = runtime
        .block_on(store.fetch(&[], &[update]))
        .expect("redis answers");
    let counts = &answer.velocity[0];
    assert_eq!(counts[0].sums_cents.as_slice(), [60_000_000_000_003; 3]);
    assert_eq!(counts[1].sums_cents.as_slice(), [120_000_000_000_007; 3]);
    assert_eq!(counts[1].counts.as_slice(), [2; 3]);
}

/// Field values with the awkward cases: empty, separators, digits that look like a length,
/// multi-byte characters.
fn field_value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("-".to_string()),
        Just("3:-".to_string()),
        Just("12:".to_string()),
        "[0-9]{1,6}\\.[0-9]{1,3}",
        "[a-zA-Z:\\-é€ ]{0,12}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Two lookups (different field lists) read in one round trip: Redis answers what the
    /// in-memory store answers, value for value, misses included.
    #[test]
    fn hash_reads_match_the_in_memory_store(
        stored in proptest::collection::vec(
            (0u8..20, proptest::collection::vec(proptest::option::of(field_value()), 3)),
            0..20,
        ),
        card_keys in proptest::collection::vec(0u8..24, 0..30),
        merchant_keys in proptest::collection::vec(0u8..24, 0..30),
        case in any::<u64>(),
    ) {
        let server = redis();
        let (stack, runtime, store) = &*server;
        let memory = InMemoryFeatureStore::new();
        let fields = ["a", "b:c", "d"];
        let client = redis::Client::open(stack.redis_url.as_str()).unwrap();
        let mut conn = client.get_connection().unwrap();
        for (entity, values) in &stored {
            // Every stored entity is a card and a merchant hash, with the same values.
            for kind in ["card", "merchant"] {
                let key = format!("{case}:{kind}:{entity}");
                let present: Vec<(&str, &str)> = fields
                    .iter()
                    .zip(values)
                    .filter_map(|(f, v)| v.as_deref().map(|v| (*f, v)))
                    .collect();
                if present.is_empty() {
                    continue;
                }
                memory.insert(&key, &present);
                let _: () = redis::cmd("HSET").arg(&key).arg(&present).query(&mut conn).unwrap();
            }
        }
        let card_fields: Vec<String> = fields.iter().map(|f| f.to_string()).collect();
        let merchant_fields: Vec<String> = vec!["d".into(), "a".into()];
        let keys: Vec<(String, &[String])> = card_keys
            .iter()
            .map(|k| (format!("{case}:card:{k}"), card_fields.as_slice()))
            .chain(merchant_keys.iter().map(|k| (format!("{case}:merchant:{k}"), merchant_fields.as_slice())))
            .collect();
        let reads: Vec<HashRead<'_>> =
            keys.iter().map(|(key, fields)| HashRead { key, fields }).collect();

        let from_redis = runtime.block_on(store.fetch(&reads, &[])).expect("redis answers");
        let from_memory = runtime.block_on(memory.fetch(&reads, &[])).unwrap();
        prop_assert_eq!(from_redis.hashes.len(), reads.len());
        for (index, read) in reads.iter().enumerate() {
            prop_assert_eq!(
                from_redis.hashes.read(index).collect::<Vec<_>>(),
                from_memory.hashes.read(index).collect::<Vec<_>>(),
                "read {} ({})", index, read.key
            );
        }
    }
}

/// A stored value that is not UTF-8 becomes a null feature and is counted as unparseable; the
/// batch's other rows keep their features.
#[test]
fn a_value_that_is_not_utf8_is_counted_and_does_not_fail_the_batch() {
    let server = redis();
    let (stack, runtime, store) = &*server;
    let client = redis::Client::open(stack.redis_url.as_str()).unwrap();
    let mut conn = client.get_connection().unwrap();
    let _: () = redis::cmd("HSET")
        .arg("utf8:card:bad")
        .arg("home")
        .arg(&b"\xff\xfeDE"[..])
        .arg("avg")
        .arg("1.5")
        .query(&mut conn)
        .unwrap();
    let _: () = redis::cmd("HSET")
        .arg("utf8:card:good")
        .arg("home")
        .arg("FR")
        .query(&mut conn)
        .unwrap();
    let lookup = EntityLookup {
        name: "card".into(),
        key_column: "card_id".into(),
        key_prefix: "utf8:card:".into(),
        fields: vec![
            FeatureField {
                name: "home".into(),
                kind: FeatureType::Utf8,
            },
            FeatureField {
                name: "avg".into(),
                kind: FeatureType::Float64,
            },
        ],
    };
    let schema = std::sync::Arc::new(arrow::datatypes::Schema::new(vec![
        arrow::datatypes::Field::new("card_id", arrow::datatypes::DataType::Utf8, true),
    ]));
    let input = arrow::record_batch::RecordBatch::try_new(
        schema,
        vec![std::sync::Arc::new(arrow::array::StringArray::from(vec![
            "bad", "good",
        ]))],
    )
    .unwrap();
    let (tables, stats) = runtime
        .block_on(
            Lookups::new(vec![lookup], vec![])
                .unwrap()
                .fetch(store, &input),
        )
        .expect("the batch is answered");
    assert_eq!(stats.values_unparseable, 1);
    let expected = [
        "+--------+---------+------+-----+",
        "| row_id | card_id | home | avg |",
        "+--------+---------+------+-----+",
        "| 0      | bad     |      | 1.5 |",
        "| 1      | good    | FR   |     |",
        "+--------+---------+------+-----+",
    ];
    assert_eq!(
        arrow::util::pretty::pretty_format_batches(&tables)
            .unwrap()
            .to_string(),
        expected.join("\n")
    );
}

/// A key that holds something other than a hash fails the round trip with Redis's reason;
/// nothing is silently read as missing.
#[test]
fn a_key_that_is_not_a_hash_is_an_error() {
    let server = redis();
    let (stack, runtime, store) = &*server;
    let client = redis::Client::open(stack.redis_url.as_str()).unwrap();
    let mut conn = client.get_connection().unwrap();
    let _: () = redis::cmd("SET")
        .arg("wrongtype:card:1")
        .arg("x")
        .query(&mut conn)
        .unwrap();
    let fields = vec!["avg".to_string()];
    let err = runtime
        .block_on(store.fetch(
            &[HashRead {
                key: "wrongtype:card:1",
                fields: &fields,
            }],
            &[],
        ))
        .unwrap_err();
    assert!(err.to_string().contains("WRONGTYPE"), "{err}");
}

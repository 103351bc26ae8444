//! Velocity features against a real `redis-server`: the Lua script that runs inside Redis must
//! count exactly what the definition ([`recount`]) says, batch after batch, with out-of-order,
//! late and redelivered events — and agree with the in-memory implementation that computes
//! training data, late flags included.

use std::sync::OnceLock;

use proptest::prelude::*;
use verdict::local_stack::LocalStack;
use verdict_features::velocity::{recount, VelocityEvent, VelocityUpdate};
use verdict_features::{FeatureStore, InMemoryVelocity, RedisConfig, RedisFeatureStore};

const WINDOWS_MS: [i64; 3] = [60_000, 3_600_000, 86_400_000];
const LATENESS_MS: i64 = 300_000;
const HORIZON_MS: i64 = 86_400_000 + LATENESS_MS;

/// One server for every case of the property (each case uses its own key prefix).
fn redis() -> &'static (LocalStack, tokio::runtime::Runtime, RedisFeatureStore) {
    static REDIS: OnceLock<(LocalStack, tokio::runtime::Runtime, RedisFeatureStore)> =
        OnceLock::new();
    REDIS.get_or_init(|| {
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
    })
}

/// Card-testing bursts (seconds apart), hour-scale gaps, day-scale gaps, gaps of exactly a
/// window, events up to an hour out of order, and redeliveries.
fn events() -> impl Strategy<Value = Vec<VelocityEvent>> {
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
            let mut out: Vec<VelocityEvent> = Vec::new();
            for (n, (card, gap, skew, cents, redeliver)) in steps.into_iter().enumerate() {
                if redeliver == 0 && !out.is_empty() {
                    let again = out[(n * 7) % out.len()].clone();
                    out.push(again);
                    continue;
                }
                clock += gap;
                out.push(VelocityEvent {
                    key: format!("card-{card}"),
                    event_time_ms: clock + skew,
                    amount_cents: cents,
                    id: format!("tx-{n}"),
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
        let events: Vec<VelocityEvent> = events
            .into_iter()
            .map(|e| VelocityEvent { key: format!("{prefix}{}", e.key), ..e })
            .collect();
        let (_, runtime, store) = redis();
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
                prop_assert_eq!(&got.counts, &counts, "event {} counts", i);
                prop_assert_eq!(&got.sums_cents, &sums, "event {} sums", i);
            }
        }
    }
}

/// Keys carry a TTL of the horizon, so an idle card's history leaves Redis by itself.
#[test]
fn velocity_keys_expire_after_the_horizon() {
    let (stack, runtime, store) = redis();
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
    let (_stack, runtime, store) = redis();
    let event = |n: i64, cents: i64| VelocityEvent {
        key: "big:card-1".into(),
        event_time_ms: 1_750_000_000_000 + n,
        amount_cents: cents,
        id: format!("tx-{n}"),
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
    assert_eq!(counts[0].sums_cents, vec![60_000_000_000_003; 3]);
    assert_eq!(counts[1].sums_cents, vec![120_000_000_000_007; 3]);
    assert_eq!(counts[1].counts, vec![2; 3]);
}

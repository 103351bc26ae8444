//! Synthetic, seeded data for both reference workloads: card payments with planted fraud
//! ([`fraud`]) and ride quote requests with demand and time effects ([`pricing`]). The same
//! generators feed model training (`verdict gen dataset`), the demo, the benchmark and the
//! tests.

pub mod bad_input;
pub mod fraud;
pub mod pricing;

pub use fraud::{Card, Merchant, Transaction, Transactions, World, COUNTRIES};
pub use pricing::{Quote, QuoteRequests, Zone, Zones, ZONES};

use rand::rngs::StdRng;
use rand::Rng;
use verdict_features::InMemoryFeatureStore;

/// One entity's feature hash: the Redis key and its fields.
pub type EntityHash = (String, Vec<(&'static str, String)>);

/// Writes feature hashes to Redis, pipelined in chunks of 1000.
pub async fn load_hashes_into_redis(
    redis_url: &str,
    hashes: &[EntityHash],
) -> Result<(), redis::RedisError> {
    let client = redis::Client::open(redis_url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    for chunk in hashes.chunks(1000) {
        let mut pipe = redis::pipe();
        for (key, fields) in chunk {
            pipe.hset_multiple(key, fields).ignore();
        }
        pipe.query_async::<()>(&mut conn).await?;
    }
    Ok(())
}

/// Puts feature hashes into an in-memory store (offline feature computation, tests).
pub fn load_hashes_into_memory(store: &InMemoryFeatureStore, hashes: &[EntityHash]) {
    for (key, fields) in hashes {
        let fields: Vec<(&str, &str)> = fields.iter().map(|(f, v)| (*f, v.as_str())).collect();
        store.insert(key, &fields);
    }
}

/// Which synthetic workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// Card transactions with planted fraud (label: 1 = fraud).
    Fraud,
    /// Ride quote requests (label: the market-clearing multiplier).
    Pricing,
}

/// A generated message with its training label.
pub struct Labelled {
    pub id: String,
    pub payload: Vec<u8>,
    pub label: f64,
}

/// The synthetic world of one workload kind.
pub enum Synthetic {
    Fraud(World),
    Pricing(Zones),
}

impl Synthetic {
    /// Sizes used by the demo, the benchmark, the tests and training.
    pub fn generate(kind: Kind, seed: u64) -> Self {
        match kind {
            Kind::Fraud => Synthetic::Fraud(World::generate(seed, 20_000, 2_000)),
            Kind::Pricing => Synthetic::Pricing(Zones::generate(seed, ZONES)),
        }
    }

    pub fn entity_hashes(&self) -> Vec<EntityHash> {
        match self {
            Synthetic::Fraud(world) => world.feature_hashes(),
            Synthetic::Pricing(zones) => zones.feature_hashes(),
        }
    }

    /// A seeded stream: `next(event_time_ms)` gives the next message and its label.
    pub fn stream<'a>(&'a self, seed: u64, run_id: &str) -> Box<dyn FnMut(i64) -> Labelled + 'a> {
        let encode = |value: Result<Vec<u8>, serde_json::Error>| value.unwrap_or_default();
        match self {
            Synthetic::Fraud(world) => {
                let mut stream = world.transactions(seed, run_id, 0.03);
                Box::new(move |t| {
                    let (tx, fraud) = stream.next_labelled_at(t);
                    Labelled {
                        payload: encode(serde_json::to_vec(&tx)),
                        id: tx.transaction_id,
                        label: if fraud { 1.0 } else { 0.0 },
                    }
                })
            }
            Synthetic::Pricing(zones) => {
                let mut stream = zones.requests(seed, run_id);
                Box::new(move |t| {
                    let (quote, multiplier) = stream.next_labelled_at(t);
                    Labelled {
                        payload: encode(serde_json::to_vec(&quote)),
                        id: quote.quote_id,
                        label: multiplier,
                    }
                })
            }
        }
    }
}

/// A standard normal draw (Box–Muller): enough for synthetic data, and no extra dependency.
pub(crate) fn normal(rng: &mut StdRng) -> f64 {
    let u1: f64 = rng.random_range(f64::EPSILON..1.0);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

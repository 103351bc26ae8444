//! Synthetic data: cards, merchants and card transactions.
//!
//! The distributions mirror `scorers/training/train_fraud.py`, which trained the fraud model,
//! so demo and benchmark traffic looks like what the model has seen. Everything is seeded:
//! the same seed gives the same world and the same transactions.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

/// Countries and their weights, as in the training script.
pub const COUNTRIES: [&str; 10] = ["US", "GB", "DE", "FR", "NL", "ES", "IT", "BR", "IN", "NG"];
const COUNTRY_WEIGHTS: [f64; 10] = [0.30, 0.12, 0.12, 0.10, 0.06, 0.08, 0.08, 0.06, 0.05, 0.03];

/// A card's features, stored in Redis as `card:<id>`.
#[derive(Debug, Clone)]
pub struct Card {
    pub id: String,
    pub avg_amount_30d: f64,
    pub tx_count_30d: i64,
    pub chargeback_count_90d: i64,
    pub card_age_days: i64,
    pub home_country: &'static str,
}

/// A merchant's features, stored in Redis as `merchant:<id>`.
#[derive(Debug, Clone)]
pub struct Merchant {
    pub id: String,
    pub fraud_rate_90d: f64,
    pub risk_score: f64,
}

/// One transaction as the payment system publishes it (`fraud-transaction` schema).
#[derive(Debug, Clone, Serialize)]
pub struct Transaction {
    pub transaction_id: String,
    pub card_id: String,
    pub merchant_id: String,
    pub amount: f64,
    pub currency: &'static str,
    pub country: &'static str,
    pub channel: &'static str,
    pub event_time_ms: i64,
}

/// The entities of a synthetic world.
#[derive(Debug, Clone)]
pub struct World {
    pub cards: Vec<Card>,
    pub merchants: Vec<Merchant>,
}

fn normal(rng: &mut StdRng) -> f64 {
    // Box–Muller: enough for synthetic data, and no extra dependency.
    let u1: f64 = rng.random_range(f64::EPSILON..1.0);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

fn country(rng: &mut StdRng) -> &'static str {
    let mut x: f64 = rng.random();
    for (c, w) in COUNTRIES.iter().zip(COUNTRY_WEIGHTS) {
        if x < w {
            return c;
        }
        x -= w;
    }
    COUNTRIES[0]
}

impl World {
    pub fn generate(seed: u64, cards: usize, merchants: usize) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let cards = (0..cards)
            .map(|i| Card {
                id: format!("card-{i}"),
                avg_amount_30d: ((50f64).ln() + 0.8 * normal(&mut rng)).exp(),
                tx_count_30d: rng.random_range(0..=120),
                chargeback_count_90d: if rng.random::<f64>() < 0.95 {
                    0
                } else {
                    rng.random_range(1..=3)
                },
                card_age_days: rng.random_range(1..=3650),
                home_country: country(&mut rng),
            })
            .collect();
        let merchants = (0..merchants)
            .map(|i| {
                let high_risk = rng.random::<f64>() < 0.05;
                Merchant {
                    id: format!("merchant-{i}"),
                    fraud_rate_90d: if high_risk {
                        rng.random_range(0.02..0.10)
                    } else {
                        // Mostly well under 1%.
                        rng.random::<f64>().powi(3) * 0.02
                    },
                    risk_score: if high_risk {
                        rng.random_range(0.6..1.0)
                    } else {
                        rng.random_range(0.0..0.7)
                    },
                }
            })
            .collect();
        Self { cards, merchants }
    }

    /// Writes every entity's feature hash to Redis, pipelined in chunks.
    pub async fn load_into_redis(&self, redis_url: &str) -> Result<(), redis::RedisError> {
        let client = redis::Client::open(redis_url)?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        for chunk in self.cards.chunks(1000) {
            let mut pipe = redis::pipe();
            for c in chunk {
                pipe.hset_multiple(
                    format!("card:{}", c.id),
                    &[
                        ("avg_amount_30d", format!("{:.4}", c.avg_amount_30d)),
                        ("tx_count_30d", c.tx_count_30d.to_string()),
                        ("chargeback_count_90d", c.chargeback_count_90d.to_string()),
                        ("card_age_days", c.card_age_days.to_string()),
                        ("home_country", c.home_country.to_string()),
                    ],
                )
                .ignore();
            }
            pipe.query_async::<()>(&mut conn).await?;
        }
        for chunk in self.merchants.chunks(1000) {
            let mut pipe = redis::pipe();
            for m in chunk {
                pipe.hset_multiple(
                    format!("merchant:{}", m.id),
                    &[
                        ("fraud_rate_90d", format!("{:.6}", m.fraud_rate_90d)),
                        ("risk_score", format!("{:.6}", m.risk_score)),
                    ],
                )
                .ignore();
            }
            pipe.query_async::<()>(&mut conn).await?;
        }
        Ok(())
    }

    /// An endless, seeded stream of transactions over this world. `unknown_card_rate` of them
    /// use a card that has no features in Redis.
    pub fn transactions(
        &self,
        seed: u64,
        run_id: &str,
        unknown_card_rate: f64,
    ) -> Transactions<'_> {
        Transactions {
            world: self,
            rng: StdRng::seed_from_u64(seed),
            run_id: run_id.to_string(),
            next: 0,
            unknown_card_rate,
        }
    }
}

/// Iterator of transactions; ids are `<run_id>-<sequence>`.
pub struct Transactions<'a> {
    world: &'a World,
    rng: StdRng,
    run_id: String,
    next: u64,
    unknown_card_rate: f64,
}

impl Transactions<'_> {
    /// The next transaction, stamped with `event_time_ms`.
    pub fn next_at(&mut self, event_time_ms: i64) -> Transaction {
        let rng = &mut self.rng;
        let card = &self.world.cards[rng.random_range(0..self.world.cards.len())];
        let merchant = &self.world.merchants[rng.random_range(0..self.world.merchants.len())];
        let unknown = rng.random::<f64>() < self.unknown_card_rate;
        let amount = (card.avg_amount_30d * (0.5 * normal(rng)).exp() * 100.0).round() / 100.0;
        let country = if rng.random::<f64>() < 0.10 {
            COUNTRIES[rng.random_range(0..COUNTRIES.len())]
        } else {
            card.home_country
        };
        let channel = if rng.random::<f64>() < 0.6 {
            "online"
        } else {
            "pos"
        };
        let seq = self.next;
        self.next += 1;
        Transaction {
            transaction_id: format!("{}-{seq}", self.run_id),
            card_id: if unknown {
                format!("card-unknown-{seq}")
            } else {
                card.id.clone()
            },
            merchant_id: merchant.id.clone(),
            amount,
            currency: "EUR",
            country,
            channel,
            event_time_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_world_and_stream() {
        let a = World::generate(7, 50, 10);
        let b = World::generate(7, 50, 10);
        assert_eq!(a.cards[17].avg_amount_30d, b.cards[17].avg_amount_30d);
        let ta = a.transactions(1, "r", 0.1).next_at(5);
        let tb = b.transactions(1, "r", 0.1).next_at(5);
        assert_eq!(
            serde_json::to_string(&ta).unwrap(),
            serde_json::to_string(&tb).unwrap()
        );
    }

    #[test]
    fn transactions_fit_the_input_contract() {
        let schema: serde_json::Value =
            serde_json::from_str(verdict_schemas::input::FRAUD_TRANSACTION_JSON_SCHEMA).unwrap();
        let world = World::generate(1, 20, 5);
        let mut stream = world.transactions(2, "run", 0.5);
        for _ in 0..50 {
            let tx = serde_json::to_value(stream.next_at(1_700_000_000_000)).unwrap();
            for required in schema["required"].as_array().unwrap() {
                assert!(tx.get(required.as_str().unwrap()).is_some(), "{tx}");
            }
            assert!(tx["amount"].as_f64().unwrap() > 0.0);
        }
    }
}

//! Synthetic card payments: cards, merchants, and transactions with planted fraud.
//!
//! This is the source of the fraud model's training data (`verdict gen dataset`, called by
//! `scorers/training/train.py`) as well as of demo and benchmark traffic, so live traffic looks
//! like what the model has seen. Fraud patterns planted, each raising the chance that the
//! transaction is labelled fraud:
//! - **card testing**: a burst of 5–20 small payments on one card at one merchant, back to back;
//! - **unusual amount**: 6–25× the card's 30-day average;
//! - **new high-risk merchant**: a merchant a few weeks old with a high risk score;
//! - **foreign country**: a country other than the card's home;
//! - and milder signals: online, night time, a young card, past chargebacks.
//!
//! Everything is seeded: the same seed gives the same world and the same transactions.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use super::{load_hashes_into_redis, normal, EntityHash};

/// Countries and their weights.
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
    pub age_days: i64,
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
                    age_days: if high_risk && rng.random::<f64>() < 0.5 {
                        rng.random_range(1..45)
                    } else {
                        rng.random_range(30..5000)
                    },
                }
            })
            .collect();
        Self { cards, merchants }
    }

    /// Every card's and merchant's feature hash (`card:<id>`, `merchant:<id>`).
    pub fn feature_hashes(&self) -> Vec<EntityHash> {
        let cards = self.cards.iter().map(|c| {
            (
                format!("card:{}", c.id),
                vec![
                    ("avg_amount_30d", format!("{:.4}", c.avg_amount_30d)),
                    ("tx_count_30d", c.tx_count_30d.to_string()),
                    ("chargeback_count_90d", c.chargeback_count_90d.to_string()),
                    ("card_age_days", c.card_age_days.to_string()),
                    ("home_country", c.home_country.to_string()),
                ],
            )
        });
        let merchants = self.merchants.iter().map(|m| {
            (
                format!("merchant:{}", m.id),
                vec![
                    ("fraud_rate_90d", format!("{:.6}", m.fraud_rate_90d)),
                    ("risk_score", format!("{:.6}", m.risk_score)),
                    ("age_days", m.age_days.to_string()),
                ],
            )
        });
        cards.chain(merchants).collect()
    }

    /// Writes every entity's feature hash to Redis.
    pub async fn load_into_redis(&self, redis_url: &str) -> Result<(), redis::RedisError> {
        load_hashes_into_redis(redis_url, &self.feature_hashes()).await
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
            burst: None,
        }
    }
}

/// An ongoing card-testing attack: the next transactions are small payments on one card.
#[derive(Debug, Clone, Copy)]
struct Burst {
    card: usize,
    merchant: usize,
    remaining: u32,
}

/// Iterator of transactions; ids are `<run_id>-<sequence>`.
pub struct Transactions<'a> {
    world: &'a World,
    rng: StdRng,
    run_id: String,
    next: u64,
    unknown_card_rate: f64,
    burst: Option<Burst>,
}

/// Chance that a transaction starts a card-testing burst.
const BURST_START_RATE: f64 = 0.002;
/// Chance of an amount far above the card's usual.
const UNUSUAL_AMOUNT_RATE: f64 = 0.006;

impl Transactions<'_> {
    /// The next transaction, stamped with `event_time_ms`.
    pub fn next_at(&mut self, event_time_ms: i64) -> Transaction {
        self.next_labelled_at(event_time_ms).0
    }

    /// The next transaction and whether it is fraud (the label the model learns).
    pub fn next_labelled_at(&mut self, event_time_ms: i64) -> (Transaction, bool) {
        let world = self.world;
        let rng = &mut self.rng;
        let seq = self.next;
        self.next += 1;
        if self.burst.is_none() && rng.random::<f64>() < BURST_START_RATE {
            self.burst = Some(Burst {
                card: rng.random_range(0..world.cards.len()),
                merchant: rng.random_range(0..world.merchants.len()),
                remaining: rng.random_range(5..=20),
            });
        }
        let tx_id = format!("{}-{seq}", self.run_id);
        if let Some(burst) = &mut self.burst {
            burst.remaining -= 1;
            let (card, merchant) = (&world.cards[burst.card], &world.merchants[burst.merchant]);
            if burst.remaining == 0 {
                self.burst = None;
            }
            let tx = Transaction {
                transaction_id: tx_id,
                card_id: card.id.clone(),
                merchant_id: merchant.id.clone(),
                amount: (rng.random_range(0.5f64..5.0) * 100.0).round() / 100.0,
                currency: "EUR",
                country: card.home_country,
                channel: "online",
                event_time_ms,
            };
            return (tx, rng.random::<f64>() < 0.9);
        }

        let card = &world.cards[rng.random_range(0..world.cards.len())];
        let merchant = &world.merchants[rng.random_range(0..world.merchants.len())];
        let unknown = rng.random::<f64>() < self.unknown_card_rate;
        let unusual = rng.random::<f64>() < UNUSUAL_AMOUNT_RATE;
        let ratio = if unusual {
            rng.random_range(6.0..25.0)
        } else {
            (0.5 * normal(rng)).exp()
        };
        let amount = ((card.avg_amount_30d * ratio * 100.0).round() / 100.0).max(0.01);
        let country = if rng.random::<f64>() < 0.10 {
            COUNTRIES[rng.random_range(0..COUNTRIES.len())]
        } else {
            card.home_country
        };
        let online = rng.random::<f64>() < 0.6;
        let hour = (event_time_ms / 3_600_000).rem_euclid(24);
        let flag = |b: bool| if b { 1.0 } else { 0.0 };
        let logit = -6.3
            + 1.7 * ratio.clamp(0.2, 50.0).ln().max(0.0)
            + 1.6 * flag(country != card.home_country)
            + 30.0 * merchant.fraud_rate_90d
            + 1.0 * merchant.risk_score
            + 1.8 * flag(merchant.age_days < 60 && merchant.risk_score > 0.6)
            + 0.7 * flag(online)
            + 0.8 * flag(!(6..23).contains(&hour))
            + 1.2 * flag(card.card_age_days < 60)
            + 0.8 * card.chargeback_count_90d as f64;
        let fraud = rng.random::<f64>() < 1.0 / (1.0 + (-logit).exp());
        let tx = Transaction {
            transaction_id: tx_id,
            card_id: if unknown {
                format!("card-unknown-{seq}")
            } else {
                card.id.clone()
            },
            merchant_id: merchant.id.clone(),
            amount,
            currency: "EUR",
            country,
            channel: if online { "online" } else { "pos" },
            event_time_ms,
        };
        (tx, fraud)
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
    fn planted_card_testing_bursts_hit_one_card_back_to_back() {
        let world = World::generate(3, 1000, 50);
        let mut stream = world.transactions(4, "b", 0.0);
        // Spread over one day: night-time payments are riskier.
        let txs: Vec<(Transaction, bool)> = (0..20_000)
            .map(|i| stream.next_labelled_at(i * 4_320))
            .collect();
        // A run of ≥5 consecutive small online payments on one card is a burst.
        let mut bursts = 0;
        let mut run = 1;
        for pair in txs.windows(2) {
            if pair[1].0.card_id == pair[0].0.card_id && pair[1].0.amount <= 5.0 {
                run += 1;
            } else {
                if run >= 5 {
                    bursts += 1;
                }
                run = 1;
            }
        }
        assert!(
            (15..=70).contains(&bursts),
            "{bursts} bursts in 20k transactions"
        );
        let fraud_rate = txs.iter().filter(|(_, f)| *f).count() as f64 / txs.len() as f64;
        assert!(
            (0.01..0.08).contains(&fraud_rate),
            "fraud rate {fraud_rate}"
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

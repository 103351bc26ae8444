//! Synthetic ride quote requests for the pricing workload.
//!
//! A quote request names a zone, a product and a trip, and carries the live demand signals the
//! dispatch system has (open requests and available drivers in the zone). Zones have features
//! in Redis (`zone:<id>`). The multiplier the model learns is driven by demand over supply,
//! rush hours, weekend nights, the product and the zone's usual surge, plus noise.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use super::{load_hashes_into_redis, normal, EntityHash};

pub const PRODUCTS: [&str; 3] = ["standard", "xl", "premium"];

/// Zones of the example city (demo, benchmark, tests and training use the same).
pub const ZONES: usize = 60;

/// A zone's features, stored in Redis as `zone:<id>`.
#[derive(Debug, Clone)]
pub struct Zone {
    pub id: String,
    /// Usual open requests at a time (over the last week).
    pub baseline_demand: f64,
    /// Usual available drivers.
    pub baseline_supply: f64,
    /// Mean multiplier paid in the zone over the last 7 days.
    pub avg_multiplier_7d: f64,
}

/// One quote request (`pricing-quote` schema).
#[derive(Debug, Clone, Serialize)]
pub struct Quote {
    pub quote_id: String,
    pub zone_id: String,
    pub product: &'static str,
    pub distance_km: f64,
    pub base_price: f64,
    pub currency: &'static str,
    pub open_requests: i64,
    pub available_drivers: i64,
    pub event_time_ms: i64,
}

/// The zones of a synthetic city.
#[derive(Debug, Clone)]
pub struct Zones {
    pub zones: Vec<Zone>,
}

impl Zones {
    pub fn generate(seed: u64, zones: usize) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let zones = (0..zones)
            .map(|i| {
                let baseline_demand = rng.random_range(5.0..120.0);
                let surge_bias: f64 = rng.random_range(-0.05..0.2);
                Zone {
                    id: format!("zone-{i}"),
                    baseline_demand,
                    baseline_supply: baseline_demand * rng.random_range(0.8..1.6),
                    avg_multiplier_7d: 1.1 + surge_bias,
                }
            })
            .collect();
        Self { zones }
    }

    /// Every zone's feature hash (`zone:<id>`).
    pub fn feature_hashes(&self) -> Vec<EntityHash> {
        self.zones
            .iter()
            .map(|z| {
                (
                    format!("zone:{}", z.id),
                    vec![
                        ("baseline_demand", format!("{:.3}", z.baseline_demand)),
                        ("baseline_supply", format!("{:.3}", z.baseline_supply)),
                        ("avg_multiplier_7d", format!("{:.4}", z.avg_multiplier_7d)),
                    ],
                )
            })
            .collect()
    }

    /// Writes every zone's feature hash to Redis.
    pub async fn load_into_redis(&self, redis_url: &str) -> Result<(), redis::RedisError> {
        load_hashes_into_redis(redis_url, &self.feature_hashes()).await
    }

    /// An endless, seeded stream of quote requests.
    pub fn requests(&self, seed: u64, run_id: &str) -> QuoteRequests<'_> {
        QuoteRequests {
            zones: self,
            rng: StdRng::seed_from_u64(seed),
            run_id: run_id.to_string(),
            next: 0,
        }
    }
}

/// Iterator of quote requests; ids are `<run_id>-<sequence>`.
pub struct QuoteRequests<'a> {
    zones: &'a Zones,
    rng: StdRng,
    run_id: String,
    next: u64,
}

impl QuoteRequests<'_> {
    pub fn next_at(&mut self, event_time_ms: i64) -> Quote {
        self.next_labelled_at(event_time_ms).0
    }

    /// The next request and the multiplier that clears the market (what the model learns).
    pub fn next_labelled_at(&mut self, event_time_ms: i64) -> (Quote, f64) {
        let rng = &mut self.rng;
        let zone = &self.zones.zones[rng.random_range(0..self.zones.zones.len())];
        let hour = (event_time_ms / 3_600_000).rem_euclid(24);
        // 1970-01-01 was a Thursday: day 0 → 4 (Mon = 1 … Sun = 7 as 0).
        let weekday = (event_time_ms / 86_400_000 + 4).rem_euclid(7);
        let rush = matches!(hour, 7..=9 | 17..=19);
        let weekend_night = matches!(weekday, 5 | 6) && !(3..22).contains(&hour);
        let demand_level = if rush {
            1.6
        } else if weekend_night {
            1.4
        } else {
            1.0
        };
        let open_requests =
            (zone.baseline_demand * demand_level * (0.35 * normal(rng)).exp()).round() as i64;
        let available_drivers =
            ((zone.baseline_supply * (0.3 * normal(rng)).exp()).round() as i64).max(0);
        let product = PRODUCTS[rng.random_range(0..PRODUCTS.len())];
        let distance_km = ((6.0f64).ln() + 0.6 * normal(rng)).exp().clamp(0.5, 80.0);
        let per_km = match product {
            "xl" => 1.6,
            "premium" => 2.4,
            _ => 1.1,
        };
        let base_price = ((2.5 + per_km * distance_km) * 100.0).round() / 100.0;
        let pressure = open_requests as f64 / (available_drivers.max(1) as f64);
        let multiplier = 1.0
            + 0.55 * (pressure - 0.8).max(0.0).ln_1p()
            + if rush { 0.12 } else { 0.0 }
            + if weekend_night { 0.10 } else { 0.0 }
            + if product == "premium" { 0.05 } else { 0.0 }
            + (zone.avg_multiplier_7d - 1.1)
            - 0.004 * distance_km.min(40.0)
            + 0.05 * normal(rng);
        let seq = self.next;
        self.next += 1;
        let quote = Quote {
            quote_id: format!("{}-{seq}", self.run_id),
            zone_id: zone.id.clone(),
            product,
            distance_km: (distance_km * 100.0).round() / 100.0,
            base_price,
            currency: "EUR",
            open_requests,
            available_drivers,
            event_time_ms,
        };
        (quote, multiplier.clamp(0.7, 4.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_fit_the_input_contract_and_demand_raises_the_multiplier() {
        let schema: serde_json::Value =
            serde_json::from_str(verdict_schemas::input::PRICING_QUOTE_JSON_SCHEMA).unwrap();
        let zones = Zones::generate(1, 20);
        let mut stream = zones.requests(2, "q");
        let mut by_pressure = (Vec::new(), Vec::new());
        for i in 0..5000 {
            let (quote, multiplier) = stream.next_labelled_at(1_700_000_000_000 + i * 60_000);
            let value = serde_json::to_value(&quote).unwrap();
            for required in schema["required"].as_array().unwrap() {
                assert!(value.get(required.as_str().unwrap()).is_some(), "{value}");
            }
            let pressure = quote.open_requests as f64 / quote.available_drivers.max(1) as f64;
            if pressure > 1.5 {
                by_pressure.1.push(multiplier);
            } else if pressure < 0.8 {
                by_pressure.0.push(multiplier);
            }
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        assert!(mean(&by_pressure.1) > mean(&by_pressure.0) + 0.2);
    }
}

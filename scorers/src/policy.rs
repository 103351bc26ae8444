//! Decision policies: a score becomes an outcome.

use serde::Deserialize;
use verdict_schemas::Outcome;

use crate::{Result, ScorerError};

/// Fraud thresholds on the fraud probability: below `review` approve, from `review` review,
/// from `decline` decline.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct FraudThresholds {
    /// Scores at or above this (and below `decline`) are sent to manual review.
    pub review: f32,
    /// Scores at or above this are declined.
    pub decline: f32,
}

/// The fraud policy.
#[derive(Debug, Clone, Copy)]
pub struct FraudPolicy {
    thresholds: FraudThresholds,
}

impl FraudPolicy {
    /// Refuses thresholds outside [0, 1] or out of order.
    pub fn new(thresholds: FraudThresholds) -> Result<Self> {
        let FraudThresholds { review, decline } = thresholds;
        if !(0.0..=1.0).contains(&review) || !(0.0..=1.0).contains(&decline) || review > decline {
            return Err(ScorerError::Policy(format!(
                "fraud thresholds must satisfy 0 <= review ({review}) <= decline ({decline}) <= 1"
            )));
        }
        Ok(Self { thresholds })
    }

    pub fn decide(&self, score: f32) -> Outcome {
        // NaN compares false everywhere: it would approve. A scorer never yields NaN for a row
        // it scored, but a policy must not fail open, so NaN is reviewed.
        if score.is_nan() {
            Outcome::Review
        } else if score >= self.thresholds.decline {
            Outcome::Decline
        } else if score >= self.thresholds.review {
            Outcome::Review
        } else {
            Outcome::Approve
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> FraudPolicy {
        FraudPolicy::new(FraudThresholds {
            review: 0.3,
            decline: 0.8,
        })
        .unwrap()
    }

    #[test]
    fn thresholds_map_scores_to_outcomes_at_their_boundaries() {
        let p = policy();
        assert_eq!(p.decide(0.0), Outcome::Approve);
        assert_eq!(p.decide(0.2999), Outcome::Approve);
        assert_eq!(p.decide(0.3), Outcome::Review);
        assert_eq!(p.decide(0.7999), Outcome::Review);
        assert_eq!(p.decide(0.8), Outcome::Decline);
        assert_eq!(p.decide(1.0), Outcome::Decline);
    }

    #[test]
    fn nan_never_approves() {
        assert_eq!(policy().decide(f32::NAN), Outcome::Review);
    }

    #[test]
    fn thresholds_out_of_order_are_refused() {
        let err = FraudPolicy::new(FraudThresholds {
            review: 0.9,
            decline: 0.5,
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("review (0.9)"), "{err}");
    }

    proptest::proptest! {
        #[test]
        fn outcome_is_monotonic_in_the_score(a in 0f32..=1.0, b in 0f32..=1.0) {
            let p = policy();
            let rank = |o: Outcome| Outcome::ALL.iter().position(|x| *x == o).unwrap();
            let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
            proptest::prop_assert!(rank(p.decide(lo)) <= rank(p.decide(hi)));
        }
    }
}

/// `[workloads.policy] kind = "pricing"`: the model predicts a price multiplier; the policy
/// keeps it inside business bounds and on a price grid.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct PricingBounds {
    /// Lowest multiplier ever quoted (e.g. 1.0: never below the base price).
    pub min_multiplier: f64,
    /// Highest multiplier ever quoted (a surge cap).
    pub max_multiplier: f64,
    /// Multipliers are rounded to a multiple of this (e.g. 0.05); 0 disables rounding.
    #[serde(default)]
    pub multiplier_step: f64,
}

/// A quoted price.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PriceQuote {
    pub multiplier: f64,
    /// `base_price × multiplier`, rounded to cents.
    pub amount: f64,
}

/// The pricing policy.
#[derive(Debug, Clone, Copy)]
pub struct PricingPolicy {
    bounds: PricingBounds,
}

impl PricingPolicy {
    /// Refuses bounds that are not positive and ordered, or a negative step.
    pub fn new(bounds: PricingBounds) -> Result<Self> {
        let PricingBounds {
            min_multiplier: lo,
            max_multiplier: hi,
            multiplier_step: step,
        } = bounds;
        let valid = lo > 0.0 && lo <= hi && hi.is_finite() && step >= 0.0 && step.is_finite();
        if !valid {
            return Err(ScorerError::Policy(format!(
                "pricing bounds must satisfy 0 < min-multiplier ({lo}) <= max-multiplier ({hi}) \
                 and multiplier-step ({step}) >= 0"
            )));
        }
        Ok(Self { bounds })
    }

    /// Clamps, then rounds to the step (staying inside the bounds), then prices. A NaN
    /// prediction quotes the lower bound: never an unbounded price.
    pub fn price(&self, predicted: f32, base_price: f64) -> PriceQuote {
        let PricingBounds {
            min_multiplier: lo,
            max_multiplier: hi,
            multiplier_step: step,
        } = self.bounds;
        let predicted = f64::from(predicted);
        let mut m = if predicted.is_nan() {
            lo
        } else {
            predicted.clamp(lo, hi)
        };
        if step > 0.0 {
            m = (m / step).round() * step;
            // Rounding may step just outside a bound that is not on the grid.
            if m > hi + 1e-9 {
                m -= step;
            }
            if m < lo - 1e-9 {
                m += step;
            }
            m = (m * 1e6).round() / 1e6;
        }
        PriceQuote {
            multiplier: m,
            amount: (base_price * m * 100.0).round() / 100.0,
        }
    }
}

#[cfg(test)]
mod pricing_tests {
    use super::*;

    fn policy() -> PricingPolicy {
        PricingPolicy::new(PricingBounds {
            min_multiplier: 1.0,
            max_multiplier: 3.0,
            multiplier_step: 0.05,
        })
        .unwrap()
    }

    #[test]
    fn multipliers_are_clamped_rounded_and_priced_in_cents() {
        let p = policy();
        assert_eq!(
            p.price(0.7, 10.0),
            PriceQuote {
                multiplier: 1.0,
                amount: 10.0
            }
        );
        assert_eq!(
            p.price(1.234, 10.0),
            PriceQuote {
                multiplier: 1.25,
                amount: 12.5
            }
        );
        assert_eq!(
            p.price(7.0, 9.99),
            PriceQuote {
                multiplier: 3.0,
                amount: 29.97
            }
        );
        assert_eq!(p.price(f32::NAN, 10.0).multiplier, 1.0);
    }

    #[test]
    fn bad_bounds_are_refused() {
        let err = PricingPolicy::new(PricingBounds {
            min_multiplier: 2.0,
            max_multiplier: 1.0,
            multiplier_step: 0.1,
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("min-multiplier (2)"), "{err}");
    }

    proptest::proptest! {
        #[test]
        fn the_quote_stays_inside_the_bounds(x in -10f32..10.0, base in 0.0f64..500.0) {
            let q = policy().price(x, base);
            proptest::prop_assert!((1.0..=3.0).contains(&q.multiplier));
            proptest::prop_assert!(((q.multiplier / 0.05).round() * 0.05 - q.multiplier).abs() < 1e-9);
        }
    }
}

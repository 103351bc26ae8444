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

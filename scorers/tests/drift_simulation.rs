//! The drift monitor on simulated traffic drawn from the shipped fraud model's own reference
//! distributions: quiet when nothing drifts, and quick to name the feature that does.

use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use verdict_schemas::{AlertStatus, DriftAlert};
use verdict_scorers::drift::{Correction, DriftConfig, DriftMonitor};
use verdict_scorers::{LoadedModel, ModelMetadata, Reference};

const WINDOW: usize = 2_000;

fn model() -> ModelMetadata {
    LoadedModel::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("models/fraud-mlp"))
        .expect("model")
        .metadata
}

/// One draw from a reference: a bin by its count, then uniform inside it (or a category by
/// its count).
fn draw(reference: &Reference, rng: &mut StdRng) -> f64 {
    match reference {
        Reference::Bins { edges, counts } => {
            let total: u64 = counts.iter().sum();
            let mut pick = rng.random_range(0..total);
            let bin = counts
                .iter()
                .position(|&c| {
                    if pick < c {
                        true
                    } else {
                        pick -= c;
                        false
                    }
                })
                .unwrap_or(counts.len() - 1);
            let (lo, hi) = (edges[bin], edges[bin + 1]);
            if hi > lo {
                rng.random_range(lo..hi)
            } else {
                lo
            }
        }
        Reference::Categories { counts } => {
            let total: u64 = counts.values().sum();
            let mut pick = rng.random_range(0..total);
            for (label, &c) in counts {
                if pick < c {
                    return label.parse().expect("numeric category");
                }
                pick -= c;
            }
            unreachable!("pick < total")
        }
    }
}

/// Mean and standard deviation of a binned reference (bin midpoints).
fn moments(reference: &Reference) -> (f64, f64) {
    let Reference::Bins { edges, counts } = reference else {
        panic!("numeric feature expected");
    };
    let total = counts.iter().sum::<u64>() as f64;
    let mids: Vec<f64> = edges.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
    let mean = mids
        .iter()
        .zip(counts)
        .map(|(m, &c)| m * c as f64)
        .sum::<f64>()
        / total;
    let var = mids
        .iter()
        .zip(counts)
        .map(|(m, &c)| (m - mean).powi(2) * c as f64)
        .sum::<f64>()
        / total;
    (mean, var.sqrt())
}

/// Feeds one window; `tweak(feature index, value) -> value` shifts the live data.
fn window(
    monitor: &mut DriftMonitor,
    meta: &ModelMetadata,
    rng: &mut StdRng,
    index: i64,
    tweak: &dyn Fn(usize, f64, &mut StdRng) -> f64,
) -> Vec<DriftAlert> {
    let width = meta.features.len();
    let mut values = Vec::with_capacity(WINDOW * width);
    let mut scores = Vec::with_capacity(WINDOW);
    for _ in 0..WINDOW {
        for (i, f) in meta.features.iter().enumerate() {
            let v = draw(&f.reference, rng);
            values.push(tweak(i, v, rng) as f32);
        }
        scores.push(draw(&meta.output.reference, rng) as f32);
    }
    let times = vec![index * 60_000; WINDOW];
    monitor.observe(
        &values,
        width,
        &vec![Vec::new(); WINDOW],
        &scores,
        &times,
        index * 60_000,
    )
}

fn config(correction: Correction) -> DriftConfig {
    DriftConfig {
        correction,
        ..DriftConfig::new("alerts")
    }
}

#[test]
fn five_hundred_windows_without_drift_stay_below_the_false_alarm_level() {
    let meta = model();
    for correction in [Correction::BenjaminiHochberg, Correction::Bonferroni] {
        let cfg = config(correction);
        let mut monitor = DriftMonitor::new("fraud", &meta, &cfg);
        let mut rng = StdRng::seed_from_u64(7);
        let mut fired = 0;
        let mut raw_rejections = 0;
        for w in 0..500 {
            let alerts = window(&mut monitor, &meta, &mut rng, w, &|_, v, _| v);
            fired += alerts
                .iter()
                .filter(|a| a.status == AlertStatus::Firing)
                .count();
            raw_rejections += monitor
                .last_window
                .iter()
                .filter(|t| t.p_value.is_some_and(|p| p < cfg.alpha))
                .count();
        }
        let rate = fired as f64 / 500.0;
        eprintln!(
            "{correction:?}: {fired} alerts in 500 windows (rate {rate}); \
             {raw_rejections} raw p < alpha over 500 × {} tests",
            meta.features.len() + 1
        );
        assert!(
            rate <= cfg.alpha,
            "{correction:?}: alert rate {rate} > {}",
            cfg.alpha
        );
    }
}

#[test]
fn a_quarter_sigma_mean_shift_and_a_category_mix_change_are_named_within_the_configured_windows() {
    let meta = model();
    let cfg = config(Correction::BenjaminiHochberg);
    let shifted = meta
        .features
        .iter()
        .position(|f| f.name == "merchant_risk_score")
        .expect("feature");
    let online = meta
        .features
        .iter()
        .position(|f| f.name == "is_online")
        .expect("feature");
    let (_, sigma) = moments(&meta.features[shifted].reference);
    let reference_online = match &meta.features[online].reference {
        Reference::Categories { counts } => {
            counts["1"] as f64 / counts.values().sum::<u64>() as f64
        }
        _ => panic!("is_online is categorical"),
    };
    let mut monitor = DriftMonitor::new("fraud", &meta, &cfg);
    let mut rng = StdRng::seed_from_u64(11);
    // Five quiet windows, then the shift.
    for w in 0..5 {
        let alerts = window(&mut monitor, &meta, &mut rng, w, &|_, v, _| v);
        assert!(alerts.is_empty(), "{alerts:?}");
    }
    let tweak = |i: usize, v: f64, rng: &mut StdRng| {
        if i == shifted {
            v + 0.25 * sigma
        } else if i == online {
            // Online share up by 10 points.
            if rng.random::<f64>() < reference_online + 0.10 {
                1.0
            } else {
                0.0
            }
        } else {
            v
        }
    };
    let mut firing = Vec::new();
    for w in 5..5 + cfg.consecutive_windows as i64 {
        firing.extend(
            window(&mut monitor, &meta, &mut rng, w, &tweak)
                .into_iter()
                .filter(|a| a.status == AlertStatus::Firing),
        );
    }
    let names: Vec<(&str, &str)> = firing
        .iter()
        .map(|a| (a.feature.as_str(), a.statistic))
        .collect();
    assert!(names.contains(&("merchant_risk_score", "ks")), "{names:?}");
    assert!(names.contains(&("is_online", "chi-square")), "{names:?}");
    assert!(
        names
            .iter()
            .all(|(f, _)| ["merchant_risk_score", "is_online", "score"].contains(f)),
        "only the shifted features (or the score): {names:?}"
    );
    // Back to the reference: both resolve after as many quiet windows.
    let mut resolved = Vec::new();
    for w in 7..7 + cfg.consecutive_windows as i64 {
        resolved.extend(
            window(&mut monitor, &meta, &mut rng, w, &|_, v, _| v)
                .into_iter()
                .filter(|a| a.status == AlertStatus::Resolved)
                .map(|a| a.feature),
        );
    }
    assert!(
        resolved.contains(&"merchant_risk_score".to_string()),
        "{resolved:?}"
    );
    assert!(resolved.contains(&"is_online".to_string()), "{resolved:?}");
}

#[test]
fn an_ongoing_drift_fires_once_then_reminds_at_the_interval_not_every_window() {
    let meta = model();
    let cfg = DriftConfig {
        // Windows are a minute apart in this simulation: a reminder every third window.
        reminder_interval: std::time::Duration::from_secs(180),
        ..config(Correction::BenjaminiHochberg)
    };
    let shifted = meta
        .features
        .iter()
        .position(|f| f.name == "merchant_risk_score")
        .expect("feature");
    let (_, sigma) = moments(&meta.features[shifted].reference);
    let mut monitor = DriftMonitor::new("fraud", &meta, &cfg);
    let mut rng = StdRng::seed_from_u64(5);
    let mut statuses = Vec::new();
    for w in 0..10 {
        for alert in window(&mut monitor, &meta, &mut rng, w, &|i, v, _| {
            if i == shifted {
                v + sigma
            } else {
                v
            }
        }) {
            if alert.feature == "merchant_risk_score" {
                statuses.push((w, alert.status));
            }
        }
    }
    // Fires on the 2nd window (index 1), then reminds every 3 windows while it lasts.
    assert_eq!(
        statuses,
        vec![
            (1, AlertStatus::Firing),
            (4, AlertStatus::Reminder),
            (7, AlertStatus::Reminder)
        ]
    );
}

#[test]
fn missing_values_raise_a_data_quality_alert() {
    let meta = model();
    let cfg = config(Correction::BenjaminiHochberg);
    let mut monitor = DriftMonitor::new("fraud", &meta, &cfg);
    let mut rng = StdRng::seed_from_u64(3);
    let width = meta.features.len();
    let card_age = meta
        .features
        .iter()
        .position(|f| f.name == "card_age_days")
        .expect("feature") as u16;
    let mut alerts = Vec::new();
    for w in 0..2i64 {
        let mut values = Vec::new();
        let mut imputed = Vec::new();
        let mut scores = Vec::new();
        for row in 0..WINDOW {
            for f in &meta.features {
                values.push(draw(&f.reference, &mut rng) as f32);
            }
            // 30% of rows lost the card's age (above the 20% limit).
            imputed.push(if row % 10 < 3 {
                vec![card_age]
            } else {
                Vec::new()
            });
            scores.push(draw(&meta.output.reference, &mut rng) as f32);
        }
        let times = vec![w * 60_000; WINDOW];
        alerts.extend(monitor.observe(&values, width, &imputed, &scores, &times, w * 60_000));
    }
    let quality: Vec<(&str, &str, f64)> = alerts
        .iter()
        .filter(|a| a.kind == "data-quality")
        .map(|a| (a.feature.as_str(), a.statistic, a.value))
        .collect();
    assert_eq!(quality, vec![("card_age_days", "missing-rate", 0.3)]);
}

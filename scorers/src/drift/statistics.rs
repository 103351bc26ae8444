//! Drift statistics on binned data: the reference is the model's training distribution as
//! quantile bins (or category counts), the live window is counted into the same bins, so the
//! cost per transaction is one bin lookup and a window's statistics cost O(bins).
//!
//! Distributions come from statrs (chi-square). statrs has no Kolmogorov distribution, so its
//! survival function is computed here from the classical series (see [`kolmogorov_sf`]); the
//! tests compare every value with scipy on committed fixtures.

use statrs::distribution::{ChiSquared, ContinuousCDF};

/// Floor for a bin's proportion in the PSI, so an empty bin on one side gives a large but
/// finite contribution (the usual convention; 1e-4 ≈ one row in ten thousand).
pub const PSI_EPSILON: f64 = 1e-4;

/// Population Stability Index of `live` against `reference` counts over the same bins:
/// Σ (q − p)·ln(q / p), with proportions floored at [`PSI_EPSILON`]. `None` if either side is
/// empty or the bin counts differ.
pub fn psi(reference: &[u64], live: &[u64]) -> Option<f64> {
    let (rt, lt) = (total(reference), total(live));
    if rt == 0 || lt == 0 || reference.len() != live.len() {
        return None;
    }
    Some(
        reference
            .iter()
            .zip(live)
            .map(|(&r, &l)| {
                let p = (r as f64 / rt as f64).max(PSI_EPSILON);
                let q = (l as f64 / lt as f64).max(PSI_EPSILON);
                (q - p) * (q / p).ln()
            })
            .sum(),
    )
}

/// Two-sample Kolmogorov–Smirnov on binned samples: `D` is the largest gap between the two
/// empirical CDFs at the bin boundaries, and the p-value is the asymptotic one,
/// `Q_KS(D·√(n·m/(n+m)))`. Binning can only hide part of a gap, so `D` never exceeds the
/// raw-sample statistic and the test errs on the quiet side. Returns `(D, p)`.
pub fn ks_binned(reference: &[u64], live: &[u64]) -> Option<(f64, f64)> {
    let (n, m) = (total(reference), total(live));
    if n == 0 || m == 0 || reference.len() != live.len() {
        return None;
    }
    let (mut cr, mut cl, mut d) = (0u64, 0u64, 0f64);
    for (&r, &l) in reference.iter().zip(live) {
        cr += r;
        cl += l;
        d = d.max((cr as f64 / n as f64 - cl as f64 / m as f64).abs());
    }
    let (n, m) = (n as f64, m as f64);
    let effective = (n * m / (n + m)).sqrt();
    Some((d, kolmogorov_sf(d * effective)))
}

/// Survival function of the Kolmogorov distribution, `P(K > x)` (scipy's
/// `special.kolmogorov`). Two forms of the same series, each used where it converges fast:
/// `2 Σ (−1)^(k−1) e^(−2k²x²)` for larger x, and
/// `1 − (√(2π)/x) Σ e^(−(2k−1)²π²/(8x²))` for small x.
pub fn kolmogorov_sf(x: f64) -> f64 {
    if x.is_nan() {
        return f64::NAN;
    }
    if x <= 0.0 {
        return 1.0;
    }
    if x < 1.0 {
        let pi2 = std::f64::consts::PI * std::f64::consts::PI;
        let sum: f64 = (1..=20)
            .map(|k| {
                let odd = (2 * k - 1) as f64;
                (-(odd * odd) * pi2 / (8.0 * x * x)).exp()
            })
            .sum();
        (1.0 - (2.0 * std::f64::consts::PI).sqrt() / x * sum).clamp(0.0, 1.0)
    } else {
        let sum: f64 = (1..=100)
            .map(|k| {
                let k = k as f64;
                let sign = if k as u64 % 2 == 1 { 1.0 } else { -1.0 };
                sign * (-2.0 * k * k * x * x).exp()
            })
            .sum();
        (2.0 * sum).clamp(0.0, 1.0)
    }
}

/// Pearson's chi-square goodness of fit of `observed` counts against `expected`
/// proportions (any positive scale; normalised here), `k − 1` degrees of freedom.
/// Returns `(statistic, p)`; `None` for fewer than two categories, no observations, or a
/// category with zero expected proportion.
pub fn chi_square(observed: &[u64], expected_weights: &[f64]) -> Option<(f64, f64)> {
    let n = total(observed) as f64;
    let weight: f64 = expected_weights.iter().sum();
    if observed.len() < 2
        || observed.len() != expected_weights.len()
        || n == 0.0
        || expected_weights.iter().any(|w| w.is_nan() || *w <= 0.0)
    {
        return None;
    }
    let statistic: f64 = observed
        .iter()
        .zip(expected_weights)
        .map(|(&o, &w)| {
            let e = n * w / weight;
            (o as f64 - e).powi(2) / e
        })
        .sum();
    let df = (observed.len() - 1) as f64;
    let p = ChiSquared::new(df).ok()?.sf(statistic);
    Some((statistic, p))
}

/// How p-values of one window's tests are corrected for testing many features at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Correction {
    /// Benjamini–Hochberg: controls the false discovery rate.
    BenjaminiHochberg,
    /// Bonferroni: controls the family-wise error rate (stricter).
    Bonferroni,
}

impl Correction {
    /// Adjusted p-values, in the order given (as scipy's `false_discovery_control(ps,
    /// method="bh")` and `min(1, m·p)`).
    pub fn adjust(self, p: &[f64]) -> Vec<f64> {
        let m = p.len() as f64;
        match self {
            Correction::Bonferroni => p.iter().map(|p| (p * m).min(1.0)).collect(),
            Correction::BenjaminiHochberg => {
                let mut order: Vec<usize> = (0..p.len()).collect();
                order.sort_by(|&a, &b| p[a].total_cmp(&p[b]));
                let mut adjusted = vec![0.0; p.len()];
                let mut running = 1.0f64;
                for (rank, &i) in order.iter().enumerate().rev() {
                    running = running.min(p[i] * m / (rank + 1) as f64);
                    adjusted[i] = running.min(1.0);
                }
                adjusted
            }
        }
    }
}

fn total(counts: &[u64]) -> u64 {
    counts.iter().sum()
}

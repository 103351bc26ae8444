//! The drift monitor of one workload: it counts every scored row into the reference bins of
//! each monitored feature and of the score (one bin lookup per value), closes tumbling
//! windows by row count or by age, tests each window against the reference, corrects the
//! p-values for the number of tests, and turns conditions that persist into alerts.
//!
//! Statistics per window:
//! - numeric features and the score: two-sample KS on the reference bins (`ks`), with PSI as
//!   the magnitude;
//! - categorical features (0/1 features, whose reference is category counts): chi-square
//!   against the reference proportions; values never seen in training are counted in an
//!   `other` category (reference weight: a half pseudo-count, as every category gets);
//! - data quality: share of imputed (missing) values, and of values outside the reference's
//!   range.
//!
//! A drift condition is `corrected p < alpha`; a data-quality condition is `rate > limit`.
//! An alert fires after `consecutive-windows` windows in a row meet the condition, repeats as
//! a reminder every `reminder-interval` while it holds, and resolves after as many windows in
//! a row without it.

use std::collections::HashMap;
use std::time::Duration;

use serde::Deserialize;
use verdict_schemas::{AlertHistogram, AlertStatus, AlertWindow, DriftAlert, Severity};

use super::statistics::{chi_square, ks_binned, psi, Correction};
use crate::model::{ModelMetadata, Reference};

/// `[workloads.drift]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct DriftConfig {
    /// Topic the alerts go to (keyed by `<workload>/<feature>`).
    pub alerts_topic: String,
    /// A window closes after this many rows...
    #[serde(default = "default_window_rows")]
    pub window_rows: u64,
    /// ...or when its first row is this old (processing time) and it has `min-rows` rows.
    #[serde(with = "humantime_serde", default = "default_window_age")]
    pub window_age: Duration,
    /// Fewer rows than this are not tested when a window closes by age (carried over).
    #[serde(default = "default_min_rows")]
    pub min_rows: u64,
    /// Significance level for the corrected p-values: the per-window false-alarm level.
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    #[serde(default = "default_correction")]
    pub correction: Correction,
    /// Windows in a row a condition must hold before an alert fires (and must not hold
    /// before it resolves).
    #[serde(default = "default_consecutive")]
    pub consecutive_windows: u32,
    /// How often a firing alert is repeated while it lasts.
    #[serde(with = "humantime_serde", default = "default_reminder")]
    pub reminder_interval: Duration,
    /// Data quality: share of imputed values above which a feature alerts.
    #[serde(default = "default_missing_rate")]
    pub max_missing_rate: f64,
    /// Data quality: share of values outside the reference range above which a feature alerts.
    #[serde(default = "default_out_of_range_rate")]
    pub max_out_of_range_rate: f64,
    /// Features not monitored, e.g. a time-of-day feature, which is not stationary within a
    /// window of minutes.
    #[serde(default)]
    pub exclude: Vec<String>,
}

fn default_window_rows() -> u64 {
    2_000
}
fn default_window_age() -> Duration {
    Duration::from_secs(60)
}
fn default_min_rows() -> u64 {
    200
}
fn default_alpha() -> f64 {
    0.01
}
fn default_correction() -> Correction {
    Correction::BenjaminiHochberg
}
fn default_consecutive() -> u32 {
    2
}
fn default_reminder() -> Duration {
    Duration::from_secs(600)
}
fn default_missing_rate() -> f64 {
    0.2
}
fn default_out_of_range_rate() -> f64 {
    0.05
}

impl DriftConfig {
    /// The defaults, sending alerts to `alerts_topic`.
    pub fn new(alerts_topic: &str) -> Self {
        Self {
            alerts_topic: alerts_topic.to_string(),
            window_rows: default_window_rows(),
            window_age: default_window_age(),
            min_rows: default_min_rows(),
            alpha: default_alpha(),
            correction: default_correction(),
            consecutive_windows: default_consecutive(),
            reminder_interval: default_reminder(),
            max_missing_rate: default_missing_rate(),
            max_out_of_range_rate: default_out_of_range_rate(),
            exclude: Vec::new(),
        }
    }
}

/// How one monitored value is binned.
enum Binning {
    Numeric {
        edges: Vec<f64>,
        reference: Vec<u64>,
    },
    /// Category labels (the last is `other`), reference counts, and chi-square weights
    /// (counts + ½).
    Categorical {
        labels: Vec<String>,
        reference: Vec<u64>,
        weights: Vec<f64>,
    },
}

impl Binning {
    fn from_reference(reference: &Reference) -> Self {
        match reference {
            Reference::Bins { edges, counts } => Binning::Numeric {
                edges: edges.clone(),
                reference: counts.clone(),
            },
            Reference::Categories { counts } => {
                let mut labels: Vec<String> = counts.keys().cloned().collect();
                let mut reference: Vec<u64> = counts.values().copied().collect();
                labels.push("other".into());
                reference.push(0);
                let weights = reference.iter().map(|&c| c as f64 + 0.5).collect();
                Binning::Categorical {
                    labels,
                    reference,
                    weights,
                }
            }
        }
    }

    fn bins(&self) -> usize {
        match self {
            Binning::Numeric { reference, .. } | Binning::Categorical { reference, .. } => {
                reference.len()
            }
        }
    }

    /// The bin of `x`, and whether it lies outside the reference range.
    fn locate(&self, x: f64) -> (usize, bool) {
        match self {
            Binning::Numeric { edges, .. } => {
                let last = edges.len() - 1;
                let interior = &edges[1..last];
                let bin = interior.partition_point(|e| *e <= x);
                (bin, x < edges[0] || x > edges[last])
            }
            Binning::Categorical { labels, .. } => {
                let label = category_label(x);
                let other = labels.len() - 1;
                let bin = labels[..other]
                    .iter()
                    .position(|l| *l == label)
                    .unwrap_or(other);
                (bin, bin == other)
            }
        }
    }
}

/// A category value as the training script writes it (`0`, `1`, `2.5`).
fn category_label(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else {
        format!("{x}")
    }
}

struct Tracked {
    name: String,
    /// Column in the feature matrix; `None` for the score.
    column: Option<usize>,
    binning: Binning,
    live: Vec<u64>,
    missing: u64,
    out_of_range: u64,
}

#[derive(Default)]
struct Episode {
    holding: u32,
    not_holding: u32,
    firing: bool,
    streak_start_ms: i64,
    last_notified_ms: i64,
}

/// What one closed window found for one test (for logs and the simulation tests).
#[derive(Debug, Clone, PartialEq)]
pub struct TestOutcome {
    pub feature: String,
    pub statistic: &'static str,
    pub value: f64,
    pub p_value: Option<f64>,
    pub p_value_corrected: Option<f64>,
    /// Population stability index of the window (drift tests only).
    pub psi: Option<f64>,
    pub holds: bool,
}

/// The drift monitor of one workload.
pub struct DriftMonitor {
    workload: String,
    model: String,
    model_version: String,
    config: DriftConfig,
    tracked: Vec<Tracked>,
    rows: u64,
    start_ms: i64,
    end_ms: i64,
    opened_at_ms: Option<i64>,
    window_index: u64,
    episodes: HashMap<(String, &'static str), Episode>,
    /// The last closed window's tests.
    pub last_window: Vec<TestOutcome>,
}

impl DriftMonitor {
    pub fn new(workload: &str, model: &ModelMetadata, config: &DriftConfig) -> Self {
        let mut tracked: Vec<Tracked> = model
            .features
            .iter()
            .enumerate()
            .filter(|(_, f)| !config.exclude.contains(&f.name))
            .map(|(column, f)| Tracked::new(&f.name, Some(column), &f.reference))
            .collect();
        if !config.exclude.iter().any(|e| e == "score") {
            tracked.push(Tracked::new("score", None, &model.output.reference));
        }
        Self {
            workload: workload.to_string(),
            model: model.name.clone(),
            model_version: model.version.clone(),
            config: config.clone(),
            tracked,
            rows: 0,
            start_ms: i64::MAX,
            end_ms: i64::MIN,
            opened_at_ms: None,
            window_index: 0,
            episodes: HashMap::new(),
            last_window: Vec::new(),
        }
    }

    /// Windows closed so far.
    pub fn windows_closed(&self) -> u64 {
        self.window_index
    }

    /// Counts a scored batch: `values` row-major with `width` features, `imputed[row]` the
    /// imputed feature indices, `scores` and `event_times_ms` per row. Returns the alerts of
    /// every window this closed.
    pub fn observe(
        &mut self,
        values: &[f32],
        width: usize,
        imputed: &[Vec<u16>],
        scores: &[f32],
        event_times_ms: &[i64],
        now_ms: i64,
    ) -> Vec<DriftAlert> {
        let mut alerts = Vec::new();
        for (row, &score) in scores.iter().enumerate() {
            if self.opened_at_ms.is_none() {
                self.opened_at_ms = Some(now_ms);
            }
            let t = event_times_ms.get(row).copied().unwrap_or(now_ms);
            self.start_ms = self.start_ms.min(t);
            self.end_ms = self.end_ms.max(t);
            self.rows += 1;
            for tracked in &mut self.tracked {
                let value = match tracked.column {
                    Some(c) => {
                        if imputed.get(row).is_some_and(|i| i.contains(&(c as u16))) {
                            tracked.missing += 1;
                        }
                        values.get(row * width + c).copied().unwrap_or(f32::NAN)
                    }
                    None => score,
                };
                tracked.count(f64::from(value));
            }
            if self.rows >= self.config.window_rows {
                alerts.extend(self.close(now_ms));
            }
        }
        alerts.extend(self.tick(now_ms));
        alerts
    }

    /// Closes the window if it is older than `window-age` and has `min-rows` rows.
    pub fn tick(&mut self, now_ms: i64) -> Vec<DriftAlert> {
        match self.opened_at_ms {
            Some(opened)
                if now_ms - opened >= self.config.window_age.as_millis() as i64
                    && self.rows >= self.config.min_rows =>
            {
                self.close(now_ms)
            }
            _ => Vec::new(),
        }
    }

    fn close(&mut self, now_ms: i64) -> Vec<DriftAlert> {
        let window = AlertWindow {
            index: self.window_index,
            start_ms: self.start_ms,
            end_ms: self.end_ms,
            rows: self.rows,
        };
        // Drift tests first, so their p-values can be corrected together.
        let mut tests: Vec<(usize, &'static str, f64, f64, Option<f64>)> = Vec::new();
        for (i, t) in self.tracked.iter().enumerate() {
            let result = match &t.binning {
                Binning::Numeric { reference, .. } => {
                    ks_binned(reference, &t.live).map(|(d, p)| ("ks", d, p))
                }
                Binning::Categorical { weights, .. } => {
                    chi_square(&t.live, weights).map(|(x2, p)| ("chi-square", x2, p))
                }
            };
            if let Some((statistic, value, p)) = result {
                tests.push((i, statistic, value, p, psi(t.reference(), &t.live)));
            }
        }
        let raw: Vec<f64> = tests.iter().map(|t| t.3).collect();
        let corrected = self.config.correction.adjust(&raw);
        let mut outcomes = Vec::new();
        let mut alerts = Vec::new();
        for ((i, statistic, value, p, psi), p_corrected) in tests.into_iter().zip(corrected) {
            let holds = p_corrected < self.config.alpha;
            let severity = match psi {
                Some(v) if v >= 0.25 => Severity::Critical,
                Some(v) if v >= 0.1 => Severity::Warning,
                _ => Severity::Info,
            };
            let draft = Draft {
                tracked: i,
                kind: "drift",
                statistic,
                value,
                threshold: self.config.alpha,
                p_value: Some(p),
                p_value_corrected: Some(p_corrected),
                psi,
                severity,
            };
            outcomes.push(self.outcome(&draft, holds));
            alerts.extend(self.advance(draft, holds, &window, now_ms));
        }
        for i in 0..self.tracked.len() {
            let t = &self.tracked[i];
            let rows = self.rows.max(1) as f64;
            let checks = [
                (
                    "missing-rate",
                    t.missing as f64 / rows,
                    self.config.max_missing_rate,
                ),
                (
                    "out-of-range-rate",
                    t.out_of_range as f64 / rows,
                    self.config.max_out_of_range_rate,
                ),
            ];
            for (statistic, rate, limit) in checks {
                let holds = rate > limit;
                let draft = Draft {
                    tracked: i,
                    kind: "data-quality",
                    statistic,
                    value: rate,
                    threshold: limit,
                    p_value: None,
                    p_value_corrected: None,
                    psi: None,
                    severity: if rate >= 2.0 * limit {
                        Severity::Critical
                    } else {
                        Severity::Warning
                    },
                };
                outcomes.push(self.outcome(&draft, holds));
                alerts.extend(self.advance(draft, holds, &window, now_ms));
            }
        }
        self.last_window = outcomes;
        for t in &mut self.tracked {
            t.reset();
        }
        self.rows = 0;
        self.start_ms = i64::MAX;
        self.end_ms = i64::MIN;
        self.opened_at_ms = None;
        self.window_index += 1;
        alerts
    }

    fn outcome(&self, draft: &Draft, holds: bool) -> TestOutcome {
        TestOutcome {
            feature: self.tracked[draft.tracked].name.clone(),
            statistic: draft.statistic,
            value: draft.value,
            p_value: draft.p_value,
            psi: draft.psi,
            p_value_corrected: draft.p_value_corrected,
            holds,
        }
    }

    /// Moves one (feature, statistic) episode forward and says what to announce.
    fn advance(
        &mut self,
        draft: Draft,
        holds: bool,
        window: &AlertWindow,
        now_ms: i64,
    ) -> Option<DriftAlert> {
        let needed = self.config.consecutive_windows.max(1);
        let reminder = self.config.reminder_interval.as_millis() as i64;
        let key = (self.tracked[draft.tracked].name.clone(), draft.statistic);
        let episode = self.episodes.entry(key).or_default();
        let status = if holds {
            if episode.holding == 0 {
                episode.streak_start_ms = window.start_ms;
            }
            episode.holding += 1;
            episode.not_holding = 0;
            if !episode.firing && episode.holding >= needed {
                episode.firing = true;
                episode.last_notified_ms = now_ms;
                Some((AlertStatus::Firing, episode.holding))
            } else if episode.firing && now_ms - episode.last_notified_ms >= reminder {
                episode.last_notified_ms = now_ms;
                Some((AlertStatus::Reminder, episode.holding))
            } else {
                None
            }
        } else {
            episode.not_holding += 1;
            episode.holding = 0;
            if episode.firing && episode.not_holding >= needed {
                episode.firing = false;
                Some((AlertStatus::Resolved, episode.not_holding))
            } else {
                None
            }
        };
        let since_ms = episode.streak_start_ms;
        let (status, consecutive_windows) = status?;
        let tracked = &self.tracked[draft.tracked];
        Some(DriftAlert {
            workload: self.workload.clone(),
            model: self.model.clone(),
            model_version: self.model_version.clone(),
            feature: tracked.name.clone(),
            kind: draft.kind,
            status,
            statistic: draft.statistic,
            value: draft.value,
            threshold: draft.threshold,
            p_value: draft.p_value,
            p_value_corrected: draft.p_value_corrected,
            correction: draft.p_value.map(|_| match self.config.correction {
                Correction::BenjaminiHochberg => "benjamini-hochberg",
                Correction::Bonferroni => "bonferroni",
            }),
            psi: draft.psi,
            severity: draft.severity,
            window: window.clone(),
            consecutive_windows,
            since_ms,
            histogram: tracked.histogram(),
        })
    }
}

/// An alert's fields before the episode decides whether to send it.
struct Draft {
    tracked: usize,
    kind: &'static str,
    statistic: &'static str,
    value: f64,
    threshold: f64,
    p_value: Option<f64>,
    p_value_corrected: Option<f64>,
    psi: Option<f64>,
    severity: Severity,
}

impl Tracked {
    fn new(name: &str, column: Option<usize>, reference: &Reference) -> Self {
        let binning = Binning::from_reference(reference);
        Self {
            name: name.to_string(),
            column,
            live: vec![0; binning.bins()],
            binning,
            missing: 0,
            out_of_range: 0,
        }
    }

    fn count(&mut self, x: f64) {
        if x.is_nan() {
            self.missing += 1;
            return;
        }
        let (bin, outside) = self.binning.locate(x);
        self.live[bin] += 1;
        if outside {
            self.out_of_range += 1;
        }
    }

    fn reference(&self) -> &[u64] {
        match &self.binning {
            Binning::Numeric { reference, .. } | Binning::Categorical { reference, .. } => {
                reference
            }
        }
    }

    fn histogram(&self) -> AlertHistogram {
        let proportions = |counts: &[u64]| {
            let total = counts.iter().sum::<u64>().max(1) as f64;
            counts.iter().map(|&c| c as f64 / total).collect()
        };
        let (edges, categories) = match &self.binning {
            Binning::Numeric { edges, .. } => (Some(edges.clone()), None),
            Binning::Categorical { labels, .. } => (None, Some(labels.clone())),
        };
        AlertHistogram {
            edges,
            categories,
            reference: proportions(self.reference()),
            live: proportions(&self.live),
        }
    }

    fn reset(&mut self) {
        self.live.iter_mut().for_each(|c| *c = 0);
        self.missing = 0;
        self.out_of_range = 0;
    }
}

//! Drift monitoring: live traffic against the reference distributions a model ships with.
//!
//! - [`statistics`]: PSI, binned two-sample KS, chi-square, multiple-testing corrections;
//! - [`monitor`]: tumbling windows (by count and by time) of bin counts per feature and for
//!   the score, evaluated against the reference, and the alert lifecycle (firing after N
//!   consecutive windows, reminders, resolved).

pub mod monitor;
pub mod statistics;

pub use monitor::{DriftConfig, DriftMonitor, TestOutcome};
pub use statistics::Correction;

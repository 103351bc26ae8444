//! Liveness and readiness, as Kubernetes probes read them.
//!
//! - `/healthz` answers 200 while the process serves HTTP at all: a liveness probe should
//!   restart a wedged process, not one whose Redis is down.
//! - `/readyz` answers 200 only when every configured workload started (model loaded, SQL
//!   planned, topics present), every workload's consumer has joined its group, the process is
//!   not draining, and the feature store answered its last health check — or the config says
//!   a Redis outage is served in degraded mode (`ready-while-feature-store-down`, the default:
//!   decisions keep flowing with the model's defaults, and taking every replica out of service
//!   because they share one Redis would help nobody). A workload that failed to start keeps
//!   the process unready on purpose: a rolling update with a broken model then stalls with
//!   the old pods still serving, instead of replacing them.
//!
//! Otherwise 503, with a body saying which check failed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Readiness inputs, written by the pipeline and read by the HTTP thread.
#[derive(Debug)]
pub struct Health {
    ready_while_feature_store_down: bool,
    started: AtomicBool,
    /// The pipeline's shutdown flag: once set, the process is draining.
    shutdown: Arc<AtomicBool>,
    feature_store_up: AtomicBool,
    feature_store_error: Mutex<Option<String>>,
    workloads: Mutex<Vec<WorkloadHealth>>,
}

#[derive(Debug)]
struct WorkloadHealth {
    name: String,
    failed: Option<String>,
    joined: Arc<AtomicBool>,
}

/// The answer to `/readyz`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    pub ready: bool,
    /// One line per check.
    pub report: String,
}

impl Health {
    pub fn new(ready_while_feature_store_down: bool, shutdown: Arc<AtomicBool>) -> Self {
        Self {
            ready_while_feature_store_down,
            started: AtomicBool::new(false),
            shutdown,
            // Unknown until the first check: not ready.
            feature_store_up: AtomicBool::new(false),
            feature_store_error: Mutex::new(Some("not checked yet".into())),
            workloads: Mutex::new(Vec::new()),
        }
    }

    /// A workload that started; the returned flag is set once its consumer joins the group.
    pub fn workload_started(&self, name: &str) -> Arc<AtomicBool> {
        let joined = Arc::new(AtomicBool::new(false));
        self.lock_workloads().push(WorkloadHealth {
            name: name.to_string(),
            failed: None,
            joined: Arc::clone(&joined),
        });
        joined
    }

    pub fn workload_failed(&self, name: &str, error: &str) {
        self.lock_workloads().push(WorkloadHealth {
            name: name.to_string(),
            failed: Some(error.to_string()),
            joined: Arc::new(AtomicBool::new(false)),
        });
    }

    /// Every configured workload has been started or has failed.
    pub fn start_finished(&self) {
        self.started.store(true, Ordering::Relaxed);
    }

    pub fn feature_store_checked(&self, result: Result<(), String>) {
        self.feature_store_up
            .store(result.is_ok(), Ordering::Relaxed);
        *self
            .feature_store_error
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = result.err();
    }

    pub fn readiness(&self) -> Readiness {
        let mut ready = true;
        let mut report = Vec::new();
        let mut check = |ok: bool, line: String| {
            ready &= ok;
            report.push(format!("[{}] {line}", if ok { "+" } else { "-" }));
        };
        check(
            self.started.load(Ordering::Relaxed),
            "workloads started".into(),
        );
        check(
            !self.shutdown.load(Ordering::Relaxed),
            "not draining".into(),
        );
        for w in self.lock_workloads().iter() {
            match &w.failed {
                Some(error) => check(
                    false,
                    format!("workload {}: failed to start: {error}", w.name),
                ),
                None => check(
                    w.joined.load(Ordering::Relaxed),
                    format!("workload {}: consumer joined its group", w.name),
                ),
            }
        }
        let up = self.feature_store_up.load(Ordering::Relaxed);
        let line = match self
            .feature_store_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_deref()
        {
            None => "feature store reachable".to_string(),
            Some(_) if self.ready_while_feature_store_down => {
                "feature store unreachable: serving degraded (model defaults)".to_string()
            }
            Some(error) => format!("feature store unreachable: {error}"),
        };
        check(up || self.ready_while_feature_store_down, line);
        Readiness {
            ready,
            report: report.join("\n") + "\n",
        }
    }

    fn lock_workloads(&self) -> std::sync::MutexGuard<'_, Vec<WorkloadHealth>> {
        self.workloads.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_every_check_passes() {
        let shutdown = Arc::new(AtomicBool::new(false));
        let health = Health::new(false, Arc::clone(&shutdown));
        assert!(!health.readiness().ready, "nothing started yet");
        let joined = health.workload_started("fraud");
        health.start_finished();
        health.feature_store_checked(Ok(()));
        assert!(!health.readiness().ready, "consumer not in its group yet");
        joined.store(true, Ordering::Relaxed);
        assert!(health.readiness().ready, "{}", health.readiness().report);
        health.feature_store_checked(Err("connection refused".into()));
        let r = health.readiness();
        assert!(!r.ready);
        assert!(r.report.contains("connection refused"), "{}", r.report);
        health.feature_store_checked(Ok(()));
        shutdown.store(true, Ordering::Relaxed);
        assert!(!health.readiness().ready);
    }

    #[test]
    fn degraded_mode_keeps_readiness_when_configured() {
        let health = Health::new(true, Arc::default());
        health
            .workload_started("fraud")
            .store(true, Ordering::Relaxed);
        health.start_finished();
        health.feature_store_checked(Err("timeout".into()));
        let r = health.readiness();
        assert!(r.ready, "{}", r.report);
        assert!(r.report.contains("degraded"), "{}", r.report);
    }

    #[test]
    fn a_workload_that_failed_to_start_keeps_the_process_unready() {
        let health = Health::new(true, Arc::default());
        health
            .workload_started("fraud")
            .store(true, Ordering::Relaxed);
        health.workload_failed("pricing", "model.onnx: checksum mismatch");
        health.start_finished();
        health.feature_store_checked(Ok(()));
        let r = health.readiness();
        assert!(!r.ready);
        assert!(
            r.report.contains("pricing: failed to start: model.onnx"),
            "{}",
            r.report
        );
    }
}

//! What both delivery-report idle tests share: per-thread CPU time from `/proc` and a
//! producer on a mock cluster with one batch's records.

use std::sync::Arc;

use rdkafka::config::ClientConfig;
use rdkafka::mocking::MockCluster;
use rdkafka::ClientContext;
use verdict_sinks::{KafkaSink, OutRecord};

/// The report thread's name as `/proc` shows it: Linux keeps its first 15 bytes.
pub const REPORT_THREAD: &str = "delivery-report";

/// Nanoseconds on a CPU of every thread of this process named `name`, and how many there are
/// (`/proc/self/task/<tid>/schedstat`).
pub fn cpu_ns_of_threads(name: &str) -> (usize, u64) {
    let mut threads = 0;
    let mut total = 0;
    for task in std::fs::read_dir("/proc/self/task").expect("/proc/self/task") {
        let path = task.expect("task").path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if comm.trim_end() != name {
            continue;
        }
        let schedstat = std::fs::read_to_string(path.join("schedstat")).unwrap_or_default();
        if let Some(ns) = schedstat
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
        {
            threads += 1;
            total += ns;
        }
    }
    (threads, total)
}

/// A producer on `cluster` (which must have a `decisions` topic) and 20 records for it.
pub fn sink_and_records<C: ClientContext>(
    cluster: &MockCluster<'_, C>,
) -> (KafkaSink, Vec<OutRecord>) {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", cluster.bootstrap_servers())
        .set("linger.ms", "1")
        .set("message.timeout.ms", "5000");
    let sink = KafkaSink::new(&config).expect("producer");
    let topic: Arc<str> = "decisions".into();
    let records = (0..20)
        .map(|i| OutRecord {
            topic: Arc::clone(&topic),
            key: Some(format!("k{i}").into_bytes().into()),
            payload: bytes::Bytes::from_static(b"{}"),
            headers: Vec::new(),
        })
        .collect();
    (sink, records)
}

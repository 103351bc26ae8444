//! The delivery report thread sleeps while there is nothing to report.
//!
//! rdkafka's own polling thread (`FutureProducer`) spins through the last fraction of a
//! millisecond of every 100 ms poll, busy or idle: about 1% of a core. This checks the
//! replacement's thread, alone in its test binary so no other producer's thread is counted.
//! CPU time comes from `/proc/self/task/<tid>/schedstat` (nanoseconds on a CPU).

use std::sync::Arc;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::mocking::MockCluster;
use verdict_sinks::{KafkaSink, OutRecord, Sink};

/// The thread's name as `/proc` shows it: Linux keeps its first 15 bytes.
const THREAD: &str = "delivery-report";

/// Nanoseconds on a CPU of every thread of this process named `name`.
fn cpu_ns_of_threads(name: &str) -> (usize, u64) {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_delivery_report_thread_does_not_spin_when_idle() {
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster.create_topic("decisions", 1, 1).expect("topic");
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", cluster.bootstrap_servers())
        .set("linger.ms", "1")
        .set("message.timeout.ms", "5000");
    let sink = KafkaSink::new(&config).expect("producer");
    let topic: Arc<str> = "decisions".into();
    let records: Vec<OutRecord> = (0..20)
        .map(|i| OutRecord {
            topic: Arc::clone(&topic),
            key: Some(format!("k{i}").into_bytes().into()),
            payload: bytes::Bytes::from_static(b"{}"),
            headers: Vec::new(),
        })
        .collect();
    // Busy first: reports are served (the batch resolves) by the thread measured below.
    for _ in 0..5 {
        let delivery = sink.send(&records).await.expect("enqueued");
        tokio::time::timeout(Duration::from_secs(10), delivery)
            .await
            .expect("delivered in time")
            .expect("delivered");
    }

    let (threads, before) = cpu_ns_of_threads(THREAD);
    assert_eq!(threads, 1, "one delivery report thread per producer");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, after) = cpu_ns_of_threads(THREAD);
    let used = Duration::from_nanos(after - before);
    // Ten safety wake-ups a second cost microseconds; a 1% spin would be ~30 ms here.
    assert!(
        used < Duration::from_millis(5),
        "the idle delivery report thread used {used:?} of CPU in 3 s"
    );

    drop(sink);
    assert_eq!(cpu_ns_of_threads(THREAD).0, 0, "stopped on drop");
}

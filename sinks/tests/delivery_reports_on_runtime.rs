//! A producer made on a tokio runtime has its delivery reports served by a task on that
//! runtime — no thread of its own — which costs the runtime's workers nothing while there is
//! nothing to report.
//!
//! Alone in its test binary, so the only tokio workers and producer threads are this test's.
//! CPU time comes from `/proc/self/task/<tid>/schedstat` (nanoseconds on a CPU).

mod idle;

use std::time::Duration;

use rdkafka::mocking::MockCluster;
use verdict_sinks::Sink;

use idle::{cpu_ns_of_threads, sink_and_records, REPORT_THREAD};

/// The name tokio gives the runtime's workers.
const WORKERS: &str = "tokio-rt-worker";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_are_served_on_the_runtime_and_idle_costs_its_workers_nothing() {
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster.create_topic("decisions", 1, 1).expect("topic");
    let (sink, records) = sink_and_records(&cluster);
    assert_eq!(
        cpu_ns_of_threads(REPORT_THREAD).0,
        0,
        "on a runtime, no thread of its own"
    );
    // Every batch resolves: its reports were served, by the runtime's task.
    for _ in 0..5 {
        let delivery = sink.send(&records).await.expect("enqueued");
        tokio::time::timeout(Duration::from_secs(10), delivery)
            .await
            .expect("delivered in time")
            .expect("delivered");
    }

    let (workers, before) = cpu_ns_of_threads(WORKERS);
    assert_eq!(workers, 2, "the test's two workers");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, after) = cpu_ns_of_threads(WORKERS);
    let used = Duration::from_nanos(after - before);
    // Ten safety wake-ups a second cost microseconds; a 1% spin would be ~30 ms here.
    assert!(
        used < Duration::from_millis(5),
        "the idle runtime's workers used {used:?} of CPU in 3 s"
    );

    // Still served after the idle spell, and the producer's drop does not hang.
    let delivery = sink.send(&records).await.expect("enqueued");
    tokio::time::timeout(Duration::from_secs(10), delivery)
        .await
        .expect("delivered in time")
        .expect("delivered");
    drop(sink);
}

//! Delivery reports served by a thread of their own (a producer made outside a tokio
//! runtime) cost nothing while there is nothing to report.
//!
//! rdkafka's own polling thread (`FutureProducer`) spins through the last fraction of a
//! millisecond of every 100 ms poll, busy or idle: about 1% of a core. This checks the
//! replacement's thread, alone in its test binary so no other producer's thread is counted
//! (`delivery_reports_on_runtime.rs` checks the same on a runtime). CPU time comes from
//! `/proc/self/task/<tid>/schedstat` (nanoseconds on a CPU).

mod idle;

use std::time::Duration;

use rdkafka::mocking::MockCluster;
use verdict_sinks::Sink;

use idle::{cpu_ns_of_threads, sink_and_records, REPORT_THREAD};

#[test]
fn the_delivery_report_thread_does_not_spin_when_idle() {
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster.create_topic("decisions", 1, 1).expect("topic");
    // No tokio runtime here: the reports get a thread of their own.
    let (sink, records) = sink_and_records(&cluster);
    // Busy first: reports are served (the batch resolves) by the thread measured below.
    for _ in 0..5 {
        let delivery = futures::executor::block_on(sink.send(&records)).expect("enqueued");
        futures::executor::block_on(delivery).expect("delivered");
    }

    let (threads, before) = cpu_ns_of_threads(REPORT_THREAD);
    assert_eq!(threads, 1, "one delivery report thread per producer");
    std::thread::sleep(Duration::from_secs(3));
    let (_, after) = cpu_ns_of_threads(REPORT_THREAD);
    let used = Duration::from_nanos(after - before);
    // Ten safety wake-ups a second cost microseconds; a 1% spin would be ~30 ms here.
    assert!(
        used < Duration::from_millis(5),
        "the idle delivery report thread used {used:?} of CPU in 3 s"
    );

    drop(sink);
    assert_eq!(cpu_ns_of_threads(REPORT_THREAD).0, 0, "stopped on drop");
}

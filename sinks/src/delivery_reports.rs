//! Serving a producer's delivery reports on a thread that sleeps until librdkafka has one.
//!
//! Why not rdkafka's `FutureProducer`/`ThreadedProducer`: their thread calls
//! `BaseProducer::poll(100 ms)` in a loop, and that call polls until its deadline with the
//! remaining time truncated to whole milliseconds, so the last fraction of a millisecond of
//! every call is a loop of non-blocking polls. Under load that spin was about 60% of the
//! polling thread's samples and a tenth of verdict's CPU at 10,000 tx/s (`perf`, 2026-11-23).
//!
//! Here librdkafka writes a byte to a socket whenever its (main) event queue goes from empty to
//! non-empty (`rd_kafka_queue_io_event_enable`), the thread blocks reading that socket, and
//! then serves exactly the events queued — one `poll(0)` each, which returns after one event
//! without spinning. The read also times out every [`SAFETY_POLL`], so an event whose wake-up
//! was missed is served late, never lost. Stopping writes to the same socket.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use rdkafka::bindings as rdsys;
use rdkafka::producer::{BaseProducer, Producer, ProducerContext};

use crate::{Result, SinkError};

/// Longest the thread sleeps without a wake-up: a bound on a missed one, not a poll rate.
const SAFETY_POLL: Duration = Duration::from_millis(100);
/// Most events served per wake-up before the socket is read again (keeps a stuck queue from
/// becoming a spin).
const MAX_EVENTS_PER_WAKE: usize = 100_000;

/// The producer's main event queue, held while the thread uses it.
struct MainQueue(*mut rdsys::rd_kafka_queue_t);

// librdkafka queues are thread-safe; the handle is only a reference-counted pointer.
unsafe impl Send for MainQueue {}
unsafe impl Sync for MainQueue {}

impl MainQueue {
    fn len(&self) -> usize {
        // SAFETY: the pointer came from rd_kafka_queue_get_main and is destroyed only in Drop.
        unsafe { rdsys::rd_kafka_queue_length(self.0) }
    }
}

impl Drop for MainQueue {
    fn drop(&mut self) {
        // SAFETY: as above; disabling first so librdkafka never writes to a closed socket.
        unsafe {
            rdsys::rd_kafka_queue_io_event_enable(self.0, -1, std::ptr::null(), 0);
            rdsys::rd_kafka_queue_destroy(self.0);
        }
    }
}

/// The thread serving one producer's delivery reports; stops and joins on drop.
pub(crate) struct DeliveryReports {
    stop: Arc<AtomicBool>,
    /// Our end for waking the thread; librdkafka writes to a clone of it.
    wake: UnixStream,
    thread: Option<JoinHandle<()>>,
}

impl DeliveryReports {
    pub(crate) fn start<C>(producer: Arc<BaseProducer<C>>) -> Result<Self>
    where
        C: ProducerContext + 'static,
    {
        let (mut sleeper, wake) = UnixStream::pair()?;
        // librdkafka writes from its own threads and must never block on a full socket: a
        // pending byte already means "look at the queue".
        wake.set_nonblocking(true)?;
        sleeper.set_read_timeout(Some(SAFETY_POLL))?;
        let librdkafka_end = wake.try_clone()?;

        // SAFETY: the client pointer is valid while `producer` lives, which the thread's Arc
        // guarantees past the queue's own drop (the queue is dropped first, in the thread).
        let queue =
            MainQueue(unsafe { rdsys::rd_kafka_queue_get_main(producer.client().native_ptr()) });
        if queue.0.is_null() {
            return Err(SinkError::Config("the producer has no main queue".into()));
        }
        const PAYLOAD: &[u8] = b"!";
        // SAFETY: librdkafka copies the payload; the fd stays open until the queue's Drop
        // disables the events (the thread owns `librdkafka_end` until after that).
        unsafe {
            rdsys::rd_kafka_queue_io_event_enable(
                queue.0,
                librdkafka_end.as_raw_fd(),
                PAYLOAD.as_ptr().cast(),
                PAYLOAD.len(),
            );
        }

        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("delivery-reports".into())
            .spawn(move || {
                let mut buf = [0u8; 256];
                loop {
                    // Each poll(0) serves one event and returns: no deadline to spin towards.
                    let mut served = 0;
                    while served < MAX_EVENTS_PER_WAKE && queue.len() > 0 {
                        producer.poll(Duration::ZERO);
                        served += 1;
                    }
                    if stopping.load(Ordering::Acquire) {
                        break;
                    }
                    match sleeper.read(&mut buf) {
                        Ok(0) => break,
                        Ok(_) => {}
                        Err(e)
                            if matches!(
                                e.kind(),
                                ErrorKind::WouldBlock
                                    | ErrorKind::TimedOut
                                    | ErrorKind::Interrupted
                            ) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "delivery report socket; serving by timer");
                            std::thread::sleep(SAFETY_POLL);
                        }
                    }
                }
                drop(queue);
                drop(librdkafka_end);
            })?;
        Ok(Self {
            stop,
            wake,
            thread: Some(thread),
        })
    }
}

impl Drop for DeliveryReports {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // A full socket already holds a wake-up; any error leaves the timer to end the wait.
        let _ = (&self.wake).write(b"s");
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

//! Serving a producer's delivery reports when librdkafka has one, and only then.
//!
//! Why not rdkafka's `FutureProducer`/`ThreadedProducer`: their thread calls
//! `BaseProducer::poll(100 ms)` in a loop, and that call polls until its deadline with the
//! remaining time truncated to whole milliseconds, so the last fraction of a millisecond of
//! every call is a loop of non-blocking polls. Under load that spin was about 60% of the
//! polling thread's samples and a tenth of verdict's CPU at 10,000 tx/s (`perf`, 2026-11-23).
//!
//! Here librdkafka writes a byte to a socket whenever its (main) event queue goes from empty to
//! non-empty (`rd_kafka_queue_io_event_enable`); whoever serves waits for that socket to be
//! readable and then serves exactly the events queued — one `poll(0)` each, which returns
//! after one event without spinning. The wait also ends every [`SAFETY_POLL`], so an event
//! whose wake-up was missed is served late, never lost. Stopping writes to the same socket.
//!
//! Created on a tokio runtime (the pipeline's case), the socket is watched by the runtime's
//! I/O driver and the reports are served by a task: the worker that wakes for them is the one
//! that then runs the task awaiting the batch's delivery, where a thread of its own cost two
//! thread wake-ups per report (stop 30). Created outside a runtime, a thread serves them.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use rdkafka::bindings as rdsys;
use rdkafka::producer::{BaseProducer, Producer, ProducerContext};

use crate::queue_wakeup::QueueWakeup;
use crate::{Result, SinkError};

/// Longest the thread sleeps without a wake-up: a bound on a missed one, not a poll rate.
const SAFETY_POLL: Duration = Duration::from_millis(100);
/// Most events served per wake-up before the socket is read again (keeps a stuck queue from
/// becoming a spin).
const MAX_EVENTS_PER_WAKE: usize = 100_000;

/// What serves one producer's delivery reports; stops on drop.
pub(crate) struct DeliveryReports {
    stop: Arc<AtomicBool>,
    /// Our end for waking the server; librdkafka writes to a clone of it.
    wake: UnixStream,
    serving: Serving,
}

enum Serving {
    /// A task on the runtime the producer was created on. It ends at the wake-up that stop
    /// sends, dropping its reference to the producer.
    Task,
    /// A thread of its own (no runtime at creation), joined on drop.
    Thread(Option<JoinHandle<()>>),
}

impl DeliveryReports {
    pub(crate) fn start<C>(producer: Arc<BaseProducer<C>>) -> Result<Self>
    where
        C: ProducerContext + 'static,
    {
        // SAFETY: the client pointer is valid while `producer` lives, and the server holds
        // the producer's Arc past the queue's drop (field order of `Server`).
        let (queue, sleeper) = unsafe {
            QueueWakeup::enable(rdsys::rd_kafka_queue_get_main(
                producer.client().native_ptr(),
            ))
        }?
        .ok_or_else(|| SinkError::Config("the producer has no main queue".into()))?;
        // Stopping writes to the same socket librdkafka does.
        let wake = queue.waker()?;

        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let server = Server {
            queue,
            producer,
            stopping,
        };
        let serving = match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                // Registered through a duplicate, so a runtime without its I/O driver (which
                // refuses it) still leaves `sleeper` for a thread.
                let watched = sleeper.try_clone()?;
                watched.set_nonblocking(true)?;
                let registered = {
                    let _entered = runtime.enter();
                    tokio::net::UnixStream::from_std(watched)
                };
                match registered {
                    Ok(watched) => {
                        runtime.spawn(server.serve_on_runtime(watched));
                        Serving::Task
                    }
                    Err(_) => server.spawn_thread(sleeper)?,
                }
            }
            Err(_) => server.spawn_thread(sleeper)?,
        };
        Ok(Self {
            stop,
            wake,
            serving,
        })
    }
}

/// The producer and its woken event queue, owned by whatever serves them.
///
/// Fields drop in declaration order, and that order matters: the queue first (its drop
/// disables the wake-ups and releases its reference into the client), then (possibly the
/// last) reference to the producer.
struct Server<C: ProducerContext + 'static> {
    queue: QueueWakeup,
    producer: Arc<BaseProducer<C>>,
    stopping: Arc<AtomicBool>,
}

impl<C: ProducerContext + 'static> Server<C> {
    /// Serves the events queued now: each `poll(0)` serves one and returns, no deadline to
    /// spin towards.
    fn serve_queued(&self) {
        let mut served = 0;
        while served < MAX_EVENTS_PER_WAKE && !self.queue.is_empty() {
            self.producer.poll(Duration::ZERO);
            served += 1;
        }
    }

    fn stopped(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    async fn serve_on_runtime(self, sleeper: tokio::net::UnixStream) {
        let mut buf = [0u8; 256];
        loop {
            self.serve_queued();
            if self.stopped() {
                break;
            }
            match tokio::time::timeout(SAFETY_POLL, sleeper.readable()).await {
                Err(_safety_poll) => continue,
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "delivery report socket; serving by timer");
                    tokio::time::sleep(SAFETY_POLL).await;
                    continue;
                }
            }
            // Empty the socket before serving the queue: a byte written after this means
            // events the next serve has not seen, and wakes this task again.
            loop {
                match sleeper.try_read(&mut buf) {
                    Ok(0) => return,
                    Ok(_) => {}
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "delivery report socket; serving by timer");
                        break;
                    }
                }
            }
        }
    }

    fn spawn_thread(self, mut sleeper: UnixStream) -> Result<Serving> {
        sleeper.set_read_timeout(Some(SAFETY_POLL))?;
        let thread = std::thread::Builder::new()
            .name("delivery-reports".into())
            .spawn(move || {
                let mut buf = [0u8; 256];
                loop {
                    self.serve_queued();
                    if self.stopped() {
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
            })?;
        Ok(Serving::Thread(Some(thread)))
    }
}

impl Drop for DeliveryReports {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // A full socket already holds a wake-up; any error leaves the timer to end the wait.
        let _ = (&self.wake).write(b"s");
        if let Serving::Thread(thread) = &mut self.serving {
            if let Some(thread) = thread.take() {
                let _ = thread.join();
            }
        }
    }
}

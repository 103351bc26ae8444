//! Waking the source task when librdkafka queues something for the consumer.
//!
//! Why: the source used to be a thread blocked in `poll(timeout)` on the consumer's queue.
//! Every batch then crossed from that thread to a runtime worker, and each message librdkafka
//! fetched woke that thread first. As a task, the source sleeps on a socket that librdkafka
//! writes a byte to whenever the consumer's queue goes from empty to non-empty
//! (`rd_kafka_queue_io_event_enable`); the runtime's I/O driver watches it, so the worker that
//! wakes for a fetch decodes the batch and goes straight on to the feature stage with it.
//!
//! The socket and its protocol are the delivery reports' ([`QueueWakeup`]): empty the socket,
//! then poll until the queue is empty.
//!
//! The wait for an open batch's linger to end is a `timerfd` watched by the same I/O driver,
//! not a tokio timer: tokio's timers fire on whole-millisecond ticks rounded up, and the
//! driver's `epoll_wait` rounds its timeout up to a millisecond again, so a 2 ms linger ended
//! about a millisecond late on average (a 0.7 ms higher mean consume → delivered in the first
//! A/B of this change). A `timerfd` wakes `epoll` on time.

use std::io::ErrorKind;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use rdkafka::bindings as rdsys;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use verdict_sinks::queue_wakeup::QueueWakeup;

use crate::PipelineError;

/// A consumer's wake-up socket, watched by the runtime it was registered on. Must be dropped
/// before the consumer it was registered for, whose queue it references.
pub(super) struct ConsumerWakeups {
    queue: QueueWakeup,
    watched: tokio::net::UnixStream,
    timer: Timer,
}

/// A one-shot `timerfd` on the monotonic clock, watched by the runtime's I/O driver.
struct Timer(AsyncFd<OwnedFd>);

impl Timer {
    fn new() -> std::io::Result<Self> {
        // SAFETY: plain system call; the descriptor is owned below.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: the descriptor is valid, and the `AsyncFd` owns it: nothing closes or
        // replaces it while it is registered.
        Ok(Self(unsafe {
            AsyncFd::register_with_interest(fd, Interest::READABLE)?
        }))
    }

    /// Sets the timer to expire once, `after` from now. Setting it again discards an expiry
    /// not yet read (the kernel resets the count), so a stale one never ends a later wait.
    fn arm(&self, after: Duration) -> std::io::Result<()> {
        // A zero time would disarm the timer instead.
        let after = after.max(Duration::from_nanos(1));
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: after.as_secs() as libc::time_t,
                tv_nsec: after.subsec_nanos() as libc::c_long,
            },
        };
        // SAFETY: valid descriptor and pointers for the call's duration.
        let set =
            unsafe { libc::timerfd_settime(self.0.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
        if set < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits until the armed time has passed.
    async fn expired(&self) -> std::io::Result<()> {
        loop {
            let mut ready = self.0.readable().await?;
            let mut expirations = [0u8; 8];
            // SAFETY: reads at most 8 bytes into a buffer of 8.
            let read = unsafe {
                libc::read(
                    self.0.as_raw_fd(),
                    expirations.as_mut_ptr().cast(),
                    expirations.len(),
                )
            };
            if read == 8 {
                return Ok(());
            }
            let e = std::io::Error::last_os_error();
            match e.kind() {
                // Readiness was stale (the timer was set again since): wait for the new time.
                ErrorKind::WouldBlock => ready.clear_ready(),
                ErrorKind::Interrupted => {}
                _ => return Err(e),
            }
        }
    }
}

impl ConsumerWakeups {
    /// Asks librdkafka to signal `consumer`'s queue on a socket the current runtime watches.
    /// Must be called within a runtime with its I/O driver enabled.
    pub(super) fn register<C: ConsumerContext>(
        consumer: &BaseConsumer<C>,
    ) -> Result<Self, PipelineError> {
        let socket_error =
            |e: std::io::Error| PipelineError::Kafka(format!("the consumer's wake-up socket: {e}"));
        // SAFETY: the client pointer is valid while `consumer` lives, and the caller drops this
        // value before the consumer.
        let (queue, watched) = unsafe {
            QueueWakeup::enable(rdsys::rd_kafka_queue_get_consumer(
                consumer.client().native_ptr(),
            ))
        }
        .map_err(socket_error)?
        .ok_or_else(|| PipelineError::Kafka("the consumer has no queue (no group.id?)".into()))?;
        watched.set_nonblocking(true).map_err(socket_error)?;
        let watched = tokio::net::UnixStream::from_std(watched).map_err(socket_error)?;
        let timer = Timer::new()
            .map_err(|e| PipelineError::Kafka(format!("the source's linger timer: {e}")))?;
        Ok(Self {
            queue,
            watched,
            timer,
        })
    }

    /// Events waiting in the consumer's queue. A `poll` that served a rebalance or a
    /// statistics event returns nothing although more may wait; this tells whether to poll
    /// again before sleeping, since no new wake-up comes for a queue that never emptied.
    pub(super) fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Sleeps until librdkafka signals the queue or `timeout` passes, then empties the
    /// socket. Poll the queue after it returns, whichever it was.
    pub(super) async fn wait(&self, timeout: Duration) {
        if let Err(e) = self.timer.arm(timeout) {
            tracing::warn!(error = %e, "the source's linger timer; waiting on tokio's");
            let _ = tokio::time::timeout(timeout, self.watched.readable()).await;
        } else {
            tokio::select! {
                woken = self.watched.readable() => {
                    if let Err(e) = woken {
                        // Polling on the timeouts alone still consumes, only later.
                        tracing::warn!(error = %e, "the consumer's wake-up socket failed");
                        let _ = self.timer.expired().await;
                        return;
                    }
                }
                expired = self.timer.expired() => {
                    if let Err(e) = expired {
                        tracing::warn!(error = %e, "the source's linger timer failed");
                    }
                    return;
                }
            }
        }
        let mut buf = [0u8; 256];
        loop {
            match self.watched.try_read(&mut buf) {
                // librdkafka's end closes only after this value's queue is dropped.
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!(error = %e, "reading the consumer's wake-up socket");
                    break;
                }
            }
        }
    }
}

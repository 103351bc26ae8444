//! A librdkafka queue that writes a byte to a socket when it goes from empty to non-empty
//! (`rd_kafka_queue_io_event_enable`), so a task or thread can sleep on the socket instead of
//! in a polling call.
//!
//! Shared by the producer's delivery reports (here) and the consumer's source (`verdict`).
//! The protocol for whoever sleeps on the other end: empty the socket, then serve the queue
//! until [`QueueWakeup::len`] is 0. A byte written after the socket was emptied means events
//! the serving has not seen, and wakes the sleeper again; a stale byte costs one empty serve.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use rdkafka::bindings as rdsys;

/// A queue whose wake-ups are enabled, and librdkafka's end of their socket.
///
/// Fields drop in declaration order, and that order matters: the queue first (disabling the
/// wake-ups, so librdkafka never writes to a closed socket, and releasing its reference into
/// the client), then the socket. Drop it before the client the queue belongs to.
pub struct QueueWakeup {
    queue: Queue,
    /// Never read: librdkafka writes its wake-ups to this descriptor.
    librdkafka_end: UnixStream,
}

/// A reference to one of a client's queues.
struct Queue(*mut rdsys::rd_kafka_queue_t);

// librdkafka queues are thread-safe; the handle is only a reference-counted pointer.
unsafe impl Send for Queue {}
unsafe impl Sync for Queue {}

impl Drop for Queue {
    fn drop(&mut self) {
        // SAFETY: the pointer came from one of rd_kafka_queue_get_* and is destroyed only
        // here; the wake-ups are disabled first so librdkafka never writes to a closed socket.
        unsafe {
            rdsys::rd_kafka_queue_io_event_enable(self.0, -1, std::ptr::null(), 0);
            rdsys::rd_kafka_queue_destroy(self.0);
        }
    }
}

impl QueueWakeup {
    /// Takes ownership of `queue` (a reference from `rd_kafka_queue_get_main`,
    /// `rd_kafka_queue_get_consumer`, …) and enables its wake-ups. Returns the socket end to
    /// sleep on, blocking; set it non-blocking to hand it to an async runtime. `None` for a
    /// null queue.
    ///
    /// # Safety
    ///
    /// `queue` must be null or a queue reference of a client that outlives the returned
    /// value; nothing else may destroy it.
    pub unsafe fn enable(
        queue: *mut rdsys::rd_kafka_queue_t,
    ) -> std::io::Result<Option<(Self, UnixStream)>> {
        if queue.is_null() {
            return Ok(None);
        }
        let queue = Queue(queue);
        let (sleeper, librdkafka_end) = UnixStream::pair()?;
        // librdkafka writes from its own threads and must never block on a full socket: a
        // pending byte already means "look at the queue".
        librdkafka_end.set_nonblocking(true)?;
        const PAYLOAD: &[u8] = b"!";
        // SAFETY: librdkafka copies the payload; the descriptor stays open until the queue's
        // Drop has disabled the wake-ups (field order above).
        unsafe {
            rdsys::rd_kafka_queue_io_event_enable(
                queue.0,
                librdkafka_end.as_raw_fd(),
                PAYLOAD.as_ptr().cast(),
                PAYLOAD.len(),
            );
        }
        Ok(Some((
            Self {
                queue,
                librdkafka_end,
            },
            sleeper,
        )))
    }

    /// A second handle on librdkafka's end of the socket (non-blocking): writing a byte to it
    /// wakes the sleeper as librdkafka does, for telling it to stop.
    pub fn waker(&self) -> std::io::Result<UnixStream> {
        self.librdkafka_end.try_clone()
    }

    /// Events waiting in the queue.
    pub fn len(&self) -> usize {
        // SAFETY: the pointer is valid until Drop.
        unsafe { rdsys::rd_kafka_queue_length(self.queue.0) }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

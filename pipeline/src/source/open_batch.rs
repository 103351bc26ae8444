//! The batch the source is filling: when it closes (the [`MicroBatcher`]) and its messages'
//! bytes, copied out of librdkafka's fetch buffers into one buffer per batch.
//!
//! Why one buffer: a message's key and payload must outlive librdkafka's copy (a message can
//! be dead-lettered stages later), but two `Vec`s per message cost two allocations on the
//! source and two frees on whichever thread drops the batch. Here each batch's bytes are
//! one `Vec` that grows while the batch fills and becomes a shared [`Bytes`] when it closes;
//! every message then holds a slice of it.

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::batcher::MicroBatcher;
use super::RawMessage;

/// A message's fields that are not bytes of the batch buffer.
#[derive(Debug, Clone)]
pub struct MessageMeta {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    pub timestamp_ms: Option<i64>,
    pub headers: Vec<(String, Vec<u8>)>,
}

/// A message in the open batch: its key and payload are still ranges of the buffer.
#[derive(Debug)]
struct Pending {
    meta: MessageMeta,
    key: Option<Range<usize>>,
    payload: Option<Range<usize>>,
    received_at: Instant,
}

/// A closed batch: its messages in arrival order, and when its first message arrived.
#[derive(Debug)]
pub struct ClosedBatch {
    pub messages: Vec<RawMessage>,
    pub opened_at: Instant,
}

/// The open batch of a source.
#[derive(Debug)]
pub struct OpenBatch {
    batcher: MicroBatcher<Pending>,
    bytes: Vec<u8>,
    /// The last batch's size in bytes: the next buffer starts that large, so a steady load
    /// allocates it once per batch instead of growing it message by message.
    last_batch_bytes: usize,
}

impl OpenBatch {
    pub fn new(max_rows: usize, linger: Duration) -> Self {
        Self {
            batcher: MicroBatcher::new(max_rows, linger),
            bytes: Vec::new(),
            last_batch_bytes: 0,
        }
    }

    /// Adds a message received at `now`, copying its key and payload; returns the batch if
    /// this message filled it.
    pub fn push(
        &mut self,
        meta: MessageMeta,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        now: Instant,
    ) -> Option<ClosedBatch> {
        if self.bytes.capacity() == 0 {
            self.bytes.reserve(self.last_batch_bytes);
        }
        let key = key.map(|k| self.append(k));
        let payload = payload.map(|p| self.append(p));
        let pending = Pending {
            meta,
            key,
            payload,
            received_at: now,
        };
        let full = self.batcher.push(pending, now)?;
        Some(self.close(full))
    }

    /// Returns the batch if its linger has expired at `now`.
    pub fn poll_expired(&mut self, now: Instant) -> Option<ClosedBatch> {
        let expired = self.batcher.poll_expired(now)?;
        Some(self.close(expired))
    }

    /// Closes the open batch now, if it has anything.
    pub fn flush(&mut self) -> Option<ClosedBatch> {
        let rest = self.batcher.flush()?;
        Some(self.close(rest))
    }

    /// How long a poll may block without missing the open batch's deadline (at most `cap`).
    pub fn wait_budget(&self, now: Instant, cap: Duration) -> Duration {
        self.batcher.wait_budget(now, cap)
    }

    /// See [`MicroBatcher::set_linger`].
    pub fn set_linger(&mut self, linger: Duration) {
        self.batcher.set_linger(linger);
    }

    pub fn is_empty(&self) -> bool {
        self.batcher.is_empty()
    }

    /// Drops the messages of partitions this consumer no longer owns; returns how many. Their
    /// offsets were never stored, so the partitions' next owner reads them again: deciding
    /// them here too would answer the same transactions twice. Their bytes stay in the buffer
    /// until the batch closes.
    pub fn drop_partitions(&mut self, revoked: &[(String, i32)]) -> usize {
        if revoked.is_empty() {
            return 0;
        }
        self.batcher.retain(|p| {
            !revoked.iter().any(|(topic, partition)| {
                p.meta.partition == *partition && *p.meta.topic == **topic
            })
        })
    }

    fn append(&mut self, data: &[u8]) -> Range<usize> {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(data);
        start..self.bytes.len()
    }

    /// Turns the buffer into the shared bytes of `pending`'s messages; the next batch starts
    /// a new buffer.
    fn close(&mut self, pending: Vec<Pending>) -> ClosedBatch {
        self.last_batch_bytes = self.bytes.len();
        let bytes = Bytes::from(std::mem::take(&mut self.bytes));
        // The batcher only closes non-empty batches.
        let opened_at = pending.first().map_or_else(Instant::now, |p| p.received_at);
        let messages = pending
            .into_iter()
            .map(|p| RawMessage {
                topic: p.meta.topic,
                partition: p.meta.partition,
                offset: p.meta.offset,
                timestamp_ms: p.meta.timestamp_ms,
                key: p.key.map(|r| bytes.slice(r)),
                payload: p.payload.map(|r| bytes.slice(r)),
                headers: p.meta.headers,
            })
            .collect();
        ClosedBatch {
            messages,
            opened_at,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(offset: i64) -> MessageMeta {
        MessageMeta {
            topic: "transactions".into(),
            partition: 1,
            offset,
            timestamp_ms: Some(1_700_000_000_000 + offset),
            headers: if offset == 1 {
                vec![("trace".into(), b"t1".to_vec())]
            } else {
                Vec::new()
            },
        }
    }

    #[test]
    fn each_message_keeps_its_own_key_payload_and_fields() {
        let mut open = OpenBatch::new(3, Duration::from_secs(1));
        let t0 = Instant::now();
        assert!(open
            .push(meta(0), Some(b"k0"), Some(b"{\"a\":0}"), t0)
            .is_none());
        // No key, and an empty payload: both must stay what they were.
        assert!(open
            .push(meta(1), None, Some(b""), t0 + Duration::from_millis(1))
            .is_none());
        let closed = open
            .push(meta(2), Some(b"k2"), None, t0 + Duration::from_millis(2))
            .expect("the third message fills the batch");
        assert_eq!(closed.opened_at, t0);
        let m = &closed.messages;
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].key.as_deref(), Some(&b"k0"[..]));
        assert_eq!(m[0].payload.as_deref(), Some(&b"{\"a\":0}"[..]));
        assert_eq!(m[1].key, None);
        assert_eq!(m[1].payload.as_deref(), Some(&b""[..]));
        assert_eq!(m[1].headers, vec![("trace".to_string(), b"t1".to_vec())]);
        assert_eq!(m[2].key.as_deref(), Some(&b"k2"[..]));
        assert_eq!(m[2].payload, None);
        assert_eq!(
            m.iter().map(|m| m.offset).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
        assert_eq!(m[2].timestamp_ms, Some(1_700_000_000_002));
        assert!(open.is_empty());
    }

    #[test]
    fn a_revoked_partitions_messages_leave_the_open_batch() {
        let mut open = OpenBatch::new(10, Duration::from_secs(1));
        let t0 = Instant::now();
        let on = |partition: i32, offset: i64| MessageMeta {
            partition,
            ..meta(offset)
        };
        open.push(on(0, 10), Some(b"a"), Some(b"p0"), t0);
        open.push(on(1, 20), Some(b"b"), Some(b"p1"), t0);
        open.push(on(2, 30), Some(b"c"), Some(b"p2"), t0);
        let other_topic = MessageMeta {
            topic: "other".into(),
            ..on(1, 40)
        };
        open.push(other_topic, None, Some(b"o1"), t0);
        let revoked = [
            ("transactions".to_string(), 1),
            ("transactions".to_string(), 2),
        ];
        assert_eq!(open.drop_partitions(&revoked), 2);
        let closed = open.flush().expect("two messages stay");
        let kept: Vec<(&str, i32, i64, Option<&[u8]>)> = closed
            .messages
            .iter()
            .map(|m| (&*m.topic, m.partition, m.offset, m.payload.as_deref()))
            .collect();
        assert_eq!(
            kept,
            vec![
                ("transactions", 0, 10, Some(&b"p0"[..])),
                ("other", 1, 40, Some(&b"o1"[..])),
            ]
        );
        open.push(on(1, 21), None, Some(b"x"), t0);
        assert_eq!(open.drop_partitions(&revoked), 1);
        assert!(open.is_empty());
        assert!(open.flush().is_none());
    }

    #[test]
    fn a_closed_batch_does_not_share_bytes_with_the_next() {
        let mut open = OpenBatch::new(10, Duration::from_millis(5));
        let t0 = Instant::now();
        open.push(meta(0), None, Some(b"first batch"), t0);
        let first = open.flush().expect("one message");
        open.push(meta(1), None, Some(b"second"), t0);
        let second = open
            .poll_expired(t0 + Duration::from_millis(5))
            .expect("linger expired");
        assert_eq!(
            first.messages[0].payload.as_deref(),
            Some(&b"first batch"[..])
        );
        assert_eq!(second.messages[0].payload.as_deref(), Some(&b"second"[..]));
        assert!(open.flush().is_none());
    }
}

//! The source: a Kafka consumer in a consumer group, polled by a task that librdkafka wakes,
//! cutting micro-batches and decoding them into Arrow before handing whole batches to the
//! async stages. Kafka offsets never leave the source: stages see batches and acknowledge
//! them by sequence number; the source stores a batch's offsets only after its ack (at least
//! once), or the batch carries them to the transaction that commits it (exactly once).
//!
//! - [`batcher`]: when a batch closes (`max-rows` | `linger`);
//! - [`open_batch`]: the batch being filled, its messages' bytes in one buffer;
//! - [`decode`]: JSON → Arrow, isolating bad messages;
//! - [`kafka`]: the consumer task, offsets, rebalances and shutdown;
//! - [`wakeups`]: the socket librdkafka signals when the consumer's queue has something.

pub mod batcher;
pub mod decode;
pub mod kafka;
pub mod open_batch;
mod wakeups;

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use rdkafka::consumer::ConsumerGroupMetadata;
use verdict_sinks::NextOffset;

pub use decode::{DecodeCause, Decoded, JsonBatchDecoder, Rejection, DEFAULT_MAX_MESSAGE_BYTES};
pub use kafka::{spawn_kafka_source, Rewind, SourceHandle, SourceStats};

/// One consumed message, owned (its bytes are needed again if it is dead-lettered).
///
/// Its key and payload are slices of one buffer per batch (`Bytes`: a reference count, no
/// copy), not two allocations per message that another thread frees.
#[derive(Debug, Clone)]
pub struct RawMessage {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    /// The record's timestamp (producer create time or broker log-append time), ms since epoch.
    pub timestamp_ms: Option<i64>,
    pub key: Option<Bytes>,
    pub payload: Option<Bytes>,
    pub headers: Vec<(String, Vec<u8>)>,
}

/// A micro-batch on its way through the stages.
#[derive(Debug)]
pub struct InputBatch {
    /// Sequence number within the workload; the ack names it.
    pub seq: u64,
    pub decoded: Decoded,
    pub messages: Vec<RawMessage>,
    /// When its first message was consumed.
    pub opened_at: Instant,
    /// Time spent turning its JSON into Arrow.
    pub decode_time: std::time::Duration,
    /// Committing this batch: the next offset to read of each of its partitions.
    pub next_offsets: Vec<NextOffset>,
    /// Exactly once: the rewind epoch it was consumed in. A batch consumed before a rewind
    /// (an aborted transaction) is dropped; the source reads its messages again.
    pub epoch: u64,
    /// Exactly once: the consumer group's generation and member when it was consumed, sent
    /// with its offsets so the coordinator refuses them from a member that lost the group.
    pub group: Option<GroupMetadata>,
}

impl InputBatch {
    /// A batch that no source consumed (tests, measurements): sequence 0, opened now, no
    /// offsets to commit.
    pub fn unconsumed(decoded: Decoded, messages: Vec<RawMessage>) -> Self {
        Self {
            seq: 0,
            decoded,
            messages,
            opened_at: Instant::now(),
            decode_time: std::time::Duration::ZERO,
            next_offsets: Vec::new(),
            epoch: 0,
            group: None,
        }
    }
}

/// A consumer group's metadata as librdkafka hands it to a transaction (opaque).
#[derive(Clone)]
pub struct GroupMetadata(pub Arc<ConsumerGroupMetadata>);

impl std::fmt::Debug for GroupMetadata {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GroupMetadata")
    }
}

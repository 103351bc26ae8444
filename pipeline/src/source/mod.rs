//! The source: a Kafka consumer in a consumer group, polled in a loop on a dedicated thread,
//! cutting micro-batches and decoding them into Arrow before handing whole batches to the
//! async stages. Kafka offsets never leave the source: stages see batches and acknowledge
//! them by sequence number; the source stores a batch's offsets only after its ack.
//!
//! - [`batcher`]: when a batch closes (`max-rows` | `linger`);
//! - [`decode`]: JSON → Arrow, isolating bad messages;
//! - [`kafka`]: the consumer thread, offsets, rebalances and shutdown.

pub mod batcher;
pub mod decode;
pub mod kafka;

use std::sync::Arc;
use std::time::Instant;

pub use decode::{DecodeCause, Decoded, JsonBatchDecoder, Rejection, DEFAULT_MAX_MESSAGE_BYTES};
pub use kafka::{spawn_kafka_source, SourceHandle, SourceStats};

/// One consumed message, owned (its bytes are needed again if it is dead-lettered).
#[derive(Debug, Clone)]
pub struct RawMessage {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    /// The record's timestamp (producer create time or broker log-append time), ms since epoch.
    pub timestamp_ms: Option<i64>,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
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
}

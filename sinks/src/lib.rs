//! Sinks: where decisions and dead letters go.
//!
//! - [`sink`]: the [`Sink`] trait (hand over a batch of records, get a future that resolves
//!   when all are acknowledged) and an in-memory test double;
//! - [`kafka`]: the Kafka producer implementation (at least once);
//! - [`delivery_reports`]: what serves its delivery reports, woken by a
//!   [`queue_wakeup::QueueWakeup`] (which the consumer's source uses too);
//! - [`transactional`]: a Kafka transaction per batch (exactly once);
//! - [`encode`]: a decisions `RecordBatch` → keyed JSON records.

mod decision_json;
mod delivery_reports;
pub mod encode;
pub mod kafka;
pub mod queue_wakeup;
pub mod sink;
pub mod transactional;

pub use encode::DecisionEncoder;
pub use kafka::KafkaSink;
pub use sink::{Delivery, MemorySink, OutRecord, Sink};
pub use transactional::{NextOffset, TransactionError, TransactionalSink};

/// Errors of the sink stage.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("Kafka producer: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("delivery to `{topic}` failed: {reason}")]
    Delivery { topic: String, reason: String },
    #[error("encoding: {0}")]
    Encode(String),
    #[error("configuration: {0}")]
    Config(String),
    /// Setting up the producer's delivery report thread or its wake-up socket.
    #[error("delivery report thread: {0}")]
    Io(#[from] std::io::Error),
}

pub type Result<T, E = SinkError> = std::result::Result<T, E>;

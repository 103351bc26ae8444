//! Exactly-once sink: one Kafka transaction per batch.
//!
//! A batch's decisions, dead letters and drift alerts are produced inside a transaction
//! together with the batch's input offsets (`send_offsets_to_transaction`), so a
//! `read_committed` reader sees all of a batch's outputs and its offsets committed, or none
//! of it. The calls block (they wait on the transaction coordinator), so callers run them
//! off the async workers.
//!
//! librdkafka sorts transaction errors into three classes, and each has one answer here:
//! - *retriable* (a timeout, a coordinator moving): the same call is made again, with
//!   backoff, until `timeout` has passed;
//! - *abortable* (a record failed, the coordinator lost the transaction): the transaction is
//!   aborted and [`TransactionError::Aborted`] tells the caller to rewind its consumer to the
//!   last committed offsets, since everything after them was thrown away;
//! - *fatal* (fenced by a newer instance with the same `transactional.id`, an idempotence
//!   failure): the producer is unusable; [`TransactionError::Fatal`] tells the caller to
//!   [`TransactionalSink::recreate`] it (whose `init_transactions` aborts what the old one
//!   left open) and rewind.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};

use crate::sink::OutRecord;
use crate::{Result, SinkError};

/// Why a batch's transaction did not commit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransactionError {
    /// Aborted: none of the batch's records is visible to `read_committed` readers and its
    /// offsets are not committed. The caller rewinds to the committed offsets.
    #[error("transaction aborted: {0}")]
    Aborted(String),
    /// The producer can no longer be used. The caller recreates it and rewinds.
    #[error("transactional producer failed: {0}")]
    Fatal(String),
}

/// The next offset to read of one input partition: what a batch commits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NextOffset {
    pub topic: Arc<str>,
    pub partition: i32,
    /// One past the batch's highest offset in this partition.
    pub offset: i64,
}

/// A transactional producer (one `transactional.id`, one transaction at a time).
pub struct TransactionalSink {
    config: ClientConfig,
    producer: ThreadedProducer<DefaultProducerContext>,
    /// Limit of each blocking call, and of the retries of a retriable one.
    timeout: Duration,
}

/// What a failed call means for the transaction in progress.
enum Class {
    Retriable(String),
    Abortable(String),
    Fatal(String),
}

fn classify(e: &KafkaError) -> Class {
    let text = e.to_string();
    match e {
        KafkaError::Transaction(t) if t.is_fatal() => Class::Fatal(text),
        KafkaError::Transaction(t) if t.txn_requires_abort() => Class::Abortable(text),
        KafkaError::Transaction(t) if t.is_retriable() => Class::Retriable(text),
        // Anything else inside a transaction (a record the producer refused, a state error)
        // leaves the batch incomplete: abort it rather than commit part of it.
        _ => Class::Abortable(text),
    }
}

impl TransactionalSink {
    /// Creates the producer and registers its `transactional.id` with the coordinator, which
    /// fences any older instance with the same id and aborts what it left open. `config`
    /// must set `transactional.id`.
    pub fn new(config: &ClientConfig, timeout: Duration) -> Result<Self> {
        let producer = Self::create(config, timeout)?;
        Ok(Self {
            config: config.clone(),
            producer,
            timeout,
        })
    }

    fn create(
        config: &ClientConfig,
        timeout: Duration,
    ) -> Result<ThreadedProducer<DefaultProducerContext>> {
        if config.get("transactional.id").is_none() {
            return Err(SinkError::Config(
                "an exactly-once producer needs `transactional.id`".into(),
            ));
        }
        let producer: ThreadedProducer<DefaultProducerContext> = config.create()?;
        producer.init_transactions(timeout)?;
        Ok(producer)
    }

    /// Replaces a producer that failed fatally.
    pub fn recreate(&mut self) -> Result<()> {
        self.producer = Self::create(&self.config, self.timeout)?;
        Ok(())
    }

    /// Produces `records` and commits `offsets` for `group` in one transaction. Blocks until
    /// the transaction is committed or given up. With no offsets (drift alerts alone) the
    /// transaction carries records only.
    pub fn commit(
        &self,
        records: &[OutRecord],
        offsets: &[NextOffset],
        group: Option<&ConsumerGroupMetadata>,
    ) -> Result<(), TransactionError> {
        if let Err(e) = self.producer.begin_transaction() {
            return Err(match classify(&e) {
                Class::Fatal(reason) => TransactionError::Fatal(reason),
                // Nothing is open yet: there is nothing to abort.
                Class::Abortable(reason) | Class::Retriable(reason) => {
                    TransactionError::Aborted(reason)
                }
            });
        }
        match self.fill_and_commit(records, offsets, group) {
            Ok(()) => Ok(()),
            Err(Class::Fatal(reason)) => Err(TransactionError::Fatal(reason)),
            Err(Class::Abortable(reason)) | Err(Class::Retriable(reason)) => self.abort(reason),
        }
    }

    fn fill_and_commit(
        &self,
        records: &[OutRecord],
        offsets: &[NextOffset],
        group: Option<&ConsumerGroupMetadata>,
    ) -> Result<(), Class> {
        for record in records {
            self.produce(record)?;
        }
        if let (Some(group), false) = (group, offsets.is_empty()) {
            let mut list = TopicPartitionList::with_capacity(offsets.len());
            for o in offsets {
                list.add_partition_offset(&o.topic, o.partition, Offset::Offset(o.offset))
                    .map_err(|e| Class::Abortable(e.to_string()))?;
            }
            self.retrying(|| {
                self.producer
                    .send_offsets_to_transaction(&list, group, self.timeout)
            })?;
        }
        // Commit flushes the transaction's records first; a record that failed makes it
        // fail with an abortable error.
        self.retrying(|| self.producer.commit_transaction(self.timeout))
    }

    fn produce(&self, record: &OutRecord) -> Result<(), Class> {
        let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
        for (key, value) in &record.headers {
            headers = headers.insert(Header {
                key,
                value: Some(value),
            });
        }
        let mut base = BaseRecord::<[u8], [u8]>::to(&record.topic)
            .payload(&record.payload[..])
            .headers(headers);
        if let Some(key) = &record.key {
            base = base.key(&key[..]);
        }
        let give_up = Instant::now() + self.timeout;
        loop {
            match self.producer.send(base) {
                Ok(()) => return Ok(()),
                // The local queue is full: the producer's thread is delivering; wait for room.
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                    if Instant::now() < give_up =>
                {
                    base = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((e, _)) => return Err(classify(&e)),
            }
        }
    }

    /// Calls `op` again while it fails with a retriable error, until the timeout.
    fn retrying(&self, op: impl Fn() -> rdkafka::error::KafkaResult<()>) -> Result<(), Class> {
        let give_up = Instant::now() + self.timeout;
        let mut backoff = Duration::from_millis(20);
        loop {
            match op() {
                Ok(()) => return Ok(()),
                Err(e) => match classify(&e) {
                    Class::Retriable(reason) if Instant::now() >= give_up => {
                        return Err(Class::Abortable(format!("still failing: {reason}")))
                    }
                    Class::Retriable(reason) => {
                        tracing::debug!(error = %reason, "retriable transaction error; retrying");
                        std::thread::sleep(backoff);
                        backoff = (backoff * 2).min(Duration::from_millis(500));
                    }
                    other => return Err(other),
                },
            }
        }
    }

    fn abort(&self, reason: String) -> Result<(), TransactionError> {
        match self.retrying(|| self.producer.abort_transaction(self.timeout)) {
            Ok(()) => Err(TransactionError::Aborted(reason)),
            // A producer that cannot even abort is recreated; its successor's
            // `init_transactions` aborts the transaction on the coordinator.
            Err(Class::Fatal(e)) | Err(Class::Abortable(e)) | Err(Class::Retriable(e)) => Err(
                TransactionError::Fatal(format!("{reason}; then the abort failed: {e}")),
            ),
        }
    }
}

/// The `transactional.id` of one workload of one process.
///
/// It must be stable across restarts of the same instance (so a restarted process fences
/// its predecessor and aborts what it left open, at once rather than after
/// `transaction.timeout.ms`) and distinct between instances consuming in one group (two
/// producers with one id fence each other). `instance` is the pod or host name.
pub fn transactional_id(group_id: &str, workload: &str, instance: &str) -> String {
    format!("{group_id}.{workload}.{instance}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_producer_without_a_transactional_id_is_refused() {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", "127.0.0.1:1");
        let err = TransactionalSink::new(&config, Duration::from_millis(10))
            .err()
            .expect("refused");
        assert!(err.to_string().contains("transactional.id"), "{err}");
    }

    #[test]
    fn transactional_ids_name_group_workload_and_instance() {
        assert_eq!(
            transactional_id("verdict", "fraud", "pod-7"),
            "verdict.fraud.pod-7"
        );
    }
}

//! Kafka sink: a `FutureProducer` shared by every workload of the process.
//!
//! Every record of a batch is enqueued at once and the returned [`Delivery`] awaits all their
//! delivery reports together, so a batch costs one produce round trip, not one per record,
//! and the next batch can be enqueued while this one is being acknowledged. librdkafka retries transient
//! errors itself (up to `message.timeout.ms`); an error that surfaces here fails the batch, and
//! the topology, which alone decides, retries it. An idempotent producer's timed-out message
//! may still have been written, so a retry can duplicate: delivery is at least once.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::future::join_all;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use crate::sink::{Delivery, OutRecord, Sink};
use crate::{Result, SinkError};

/// Produces records to Kafka.
#[derive(Clone)]
pub struct KafkaSink {
    producer: FutureProducer,
}

impl KafkaSink {
    /// `config` holds librdkafka properties, passed through untouched.
    pub fn new(config: &ClientConfig) -> Result<Self> {
        Ok(Self {
            producer: config.create()?,
        })
    }

    /// Waits for queued messages to be delivered (used on shutdown).
    pub fn flush(&self, timeout: Duration) -> Result<()> {
        Ok(self.producer.flush(timeout)?)
    }
}

#[async_trait]
impl Sink for KafkaSink {
    async fn send(&self, records: &[OutRecord]) -> Result<Delivery> {
        let mut deliveries = Vec::with_capacity(records.len());
        for record in records {
            let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
            for (key, value) in &record.headers {
                headers = headers.insert(Header {
                    key,
                    value: Some(value),
                });
            }
            let mut future_record = FutureRecord::to(&record.topic)
                .payload(&record.payload)
                .headers(headers);
            if let Some(key) = &record.key {
                future_record = future_record.key(key);
            }
            loop {
                match self.producer.send_result(future_record) {
                    Ok(delivery) => {
                        deliveries.push((delivery, Arc::clone(&record.topic)));
                        break;
                    }
                    // The local queue is full: block (backpressure) until librdkafka drains it.
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        future_record = back;
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    Err((e, _)) => return Err(e.into()),
                }
            }
        }
        Ok(Box::pin(async move {
            let results = join_all(
                deliveries
                    .into_iter()
                    .map(|(d, t)| async move { (d.await, t) }),
            )
            .await;
            for (result, topic) in results {
                match result {
                    Ok(Ok(_)) => {}
                    Ok(Err((e, _))) => {
                        return Err(SinkError::Delivery {
                            topic: topic.to_string(),
                            reason: e.to_string(),
                        })
                    }
                    Err(_canceled) => {
                        return Err(SinkError::Delivery {
                            topic: topic.to_string(),
                            reason: "producer shut down before the delivery report".into(),
                        })
                    }
                }
            }
            Ok(())
        }))
    }
}

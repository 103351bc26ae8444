//! Kafka sink: one producer shared by every workload of the process.
//!
//! Every record of a batch is enqueued at once and the returned [`Delivery`] resolves when
//! all their delivery reports are in, so a batch costs one produce round trip, not one per
//! record, and the next batch can be enqueued while this one is being acknowledged.
//! librdkafka retries transient errors itself (up to `message.timeout.ms`); an error that
//! surfaces here fails the batch, and the topology, which alone decides, retries it. An
//! idempotent producer's timed-out message may still have been written, so a retry can
//! duplicate: delivery is at least once.
//!
//! The records of one batch share one [`BatchDelivery`] as their delivery opaque: a report
//! costs an atomic decrement, and the batch's waiter is woken once. (rdkafka's
//! `FutureProducer` allocates a channel per record and wakes a future per report.)

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use tokio::sync::oneshot;

use crate::sink::{Delivery, OutRecord, Sink};
use crate::{Result, SinkError};

/// The delivery bookkeeping of one [`Sink::send`]: records not yet reported, and the
/// waiter, told once: at the first failure or when the last record is acknowledged.
struct BatchDelivery {
    outstanding: AtomicUsize,
    waiter: Mutex<Option<oneshot::Sender<Result<()>>>>,
}

impl BatchDelivery {
    fn tell(&self, outcome: Result<()>) {
        let waiter = self.waiter.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(waiter) = waiter {
            // The batch's Delivery may have been dropped (shutdown): nobody to tell.
            let _ = waiter.send(outcome);
        }
    }
}

/// Routes each delivery report to its batch.
struct BatchReports;

impl ClientContext for BatchReports {}

impl ProducerContext for BatchReports {
    type DeliveryOpaque = Arc<BatchDelivery>;

    fn delivery(&self, result: &DeliveryResult<'_>, batch: Arc<BatchDelivery>) {
        match result {
            Ok(_) => {
                if batch.outstanding.fetch_sub(1, Ordering::AcqRel) == 1 {
                    batch.tell(Ok(()));
                }
            }
            Err((e, message)) => batch.tell(Err(SinkError::Delivery {
                topic: message.topic().to_string(),
                reason: e.to_string(),
            })),
        }
    }
}

/// Produces records to Kafka.
#[derive(Clone)]
pub struct KafkaSink {
    producer: Arc<ThreadedProducer<BatchReports>>,
}

impl KafkaSink {
    /// `config` holds librdkafka properties, passed through untouched.
    pub fn new(config: &ClientConfig) -> Result<Self> {
        Ok(Self {
            producer: Arc::new(config.create_with_context(BatchReports)?),
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
        if records.is_empty() {
            return Ok(Box::pin(std::future::ready(Ok(()))));
        }
        let (waiter, delivered) = oneshot::channel();
        let batch = Arc::new(BatchDelivery {
            outstanding: AtomicUsize::new(records.len()),
            waiter: Mutex::new(Some(waiter)),
        });
        for record in records {
            let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
            for (key, value) in &record.headers {
                headers = headers.insert(Header {
                    key,
                    value: Some(value),
                });
            }
            let mut base = BaseRecord::with_opaque_to(&record.topic, Arc::clone(&batch))
                .payload(&record.payload)
                .headers(headers);
            if let Some(key) = &record.key {
                base = base.key(key);
            }
            loop {
                match self.producer.send(base) {
                    Ok(()) => break,
                    // The local queue is full: block (backpressure) until librdkafka drains it.
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        base = back;
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    // The records already enqueued still get their reports; nobody waits.
                    Err((e, _)) => return Err(e.into()),
                }
            }
        }
        let topic = Arc::clone(&records[0].topic);
        Ok(Box::pin(async move {
            match delivered.await {
                Ok(outcome) => outcome,
                // Every record's opaque was dropped unreported: the producer went away.
                Err(_) => Err(SinkError::Delivery {
                    topic: topic.to_string(),
                    reason: "producer shut down before the delivery report".into(),
                }),
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Headers;
    use rdkafka::mocking::MockCluster;
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

    use super::*;

    fn record(topic: &Arc<str>, key: &str) -> OutRecord {
        OutRecord {
            topic: Arc::clone(topic),
            key: Some(key.as_bytes().to_vec()),
            payload: format!("{{\"id\":\"{key}\"}}").into_bytes(),
            headers: vec![("cause".into(), b"none".to_vec())],
        }
    }

    fn sink(cluster: &MockCluster<'_, rdkafka::producer::DefaultProducerContext>) -> KafkaSink {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .set("linger.ms", "1")
            .set("message.timeout.ms", "5000");
        KafkaSink::new(&config).expect("producer")
    }

    // The mock cluster is librdkafka's in-process broker: the tool for injecting produce
    // errors, which a real broker cannot be made to answer on demand.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_resolves_once_every_record_is_acknowledged() {
        let cluster = MockCluster::new(1).expect("mock cluster");
        cluster.create_topic("decisions", 3, 1).expect("topic");
        let topic: Arc<str> = "decisions".into();
        let records: Vec<OutRecord> = (0..50)
            .map(|i| record(&topic, &format!("tx-{i}")))
            .collect();
        let sink = sink(&cluster);
        let delivery = sink.send(&records).await.expect("enqueued");
        tokio::time::timeout(Duration::from_secs(10), delivery)
            .await
            .expect("delivered in time")
            .expect("delivered");
        assert!(sink.send(&[]).await.expect("nothing to send").await.is_ok());

        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .set("group.id", "check")
            .set("auto.offset.reset", "earliest")
            .create()
            .expect("consumer");
        consumer.subscribe(&["decisions"]).expect("subscribe");
        let mut keys = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while keys.len() < records.len() && std::time::Instant::now() < deadline {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
                let headers = m.headers().expect("headers");
                assert_eq!(headers.get(0).key, "cause");
                keys.push(key);
            }
        }
        keys.sort();
        let mut expected: Vec<String> = (0..50).map(|i| format!("tx-{i}")).collect();
        expected.sort();
        assert_eq!(keys, expected);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_record_fails_its_batch_with_the_brokers_reason() {
        let cluster = MockCluster::new(1).expect("mock cluster");
        cluster.create_topic("decisions", 1, 1).expect("topic");
        let topic: Arc<str> = "decisions".into();
        let sink = sink(&cluster);
        // Warm up (metadata, connection), so the injected error meets the batch's request.
        sink.send(&[record(&topic, "warm")])
            .await
            .expect("enqueued")
            .await
            .expect("warm-up delivered");
        // Not retriable: librdkafka reports it at once instead of retrying.
        cluster.request_errors(
            RDKafkaApiKey::Produce,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED],
        );
        let records: Vec<OutRecord> = (0..5).map(|i| record(&topic, &format!("tx-{i}"))).collect();
        let delivery = sink.send(&records).await.expect("enqueued");
        let outcome = tokio::time::timeout(Duration::from_secs(10), delivery)
            .await
            .expect("reported in time");
        match outcome {
            Err(SinkError::Delivery { topic, reason }) => {
                assert_eq!(topic, "decisions");
                assert!(reason.to_lowercase().contains("authoriz"), "{reason}");
            }
            other => panic!("expected a delivery failure, got {other:?}"),
        }
    }
}

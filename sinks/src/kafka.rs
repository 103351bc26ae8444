//! Kafka sink: one producer shared by every workload of the process.
//!
//! Every record of a batch is enqueued at once and the returned [`Delivery`] awaits all their
//! delivery reports together, so a batch costs one produce round trip, not one per record,
//! and the next batch can be enqueued while this one is being acknowledged. librdkafka retries transient
//! errors itself (up to `message.timeout.ms`); an error that surfaces here fails the batch, and
//! the topology, which alone decides, retries it. An idempotent producer's timed-out message
//! may still have been written, so a retry can duplicate: delivery is at least once.
//!
//! Each record carries a one-shot channel as its delivery opaque, as rdkafka's `FutureProducer`
//! does; unlike it, the delivery reports are served by [`DeliveryReports`], a thread that sleeps
//! until librdkafka has a report instead of spinning at the end of every poll.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::channel::oneshot;
use futures::future::join_all;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::ClientContext;

use crate::delivery_reports::DeliveryReports;
use crate::sink::{Delivery, OutRecord, Sink};
use crate::{Result, SinkError};

/// Where a record's delivery report goes: its batch's [`Delivery`] awaits the receiver.
type ReportSender = oneshot::Sender<KafkaResult<()>>;

/// Hands each delivery report to the channel the record was produced with.
struct ReportToChannel;

impl ClientContext for ReportToChannel {}

impl ProducerContext for ReportToChannel {
    type DeliveryOpaque = Box<ReportSender>;

    fn delivery(&self, result: &DeliveryResult<'_>, report: Self::DeliveryOpaque) {
        // The receiver is gone only if its batch was abandoned; nothing waits for the answer.
        let _ = report.send(result.as_ref().map(|_| ()).map_err(|(e, _)| e.clone()));
    }
}

struct Producing {
    // Declared first: dropped (stopped and joined) before the producer it serves.
    _reports: DeliveryReports,
    producer: Arc<BaseProducer<ReportToChannel>>,
}

/// Produces records to Kafka.
#[derive(Clone)]
pub struct KafkaSink {
    inner: Arc<Producing>,
}

impl KafkaSink {
    /// `config` holds librdkafka properties, passed through untouched.
    pub fn new(config: &ClientConfig) -> Result<Self> {
        let producer = Arc::new(config.create_with_context(ReportToChannel)?);
        let reports = DeliveryReports::start(Arc::clone(&producer))?;
        Ok(Self {
            inner: Arc::new(Producing {
                _reports: reports,
                producer,
            }),
        })
    }

    /// Waits for queued messages to be delivered (used on shutdown).
    pub fn flush(&self, timeout: Duration) -> Result<()> {
        Ok(self.inner.producer.flush(timeout)?)
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
            let (report, delivered) = oneshot::channel();
            let mut base_record = BaseRecord::with_opaque_to(&record.topic, Box::new(report))
                .payload(&record.payload)
                .headers(headers);
            if let Some(key) = &record.key {
                base_record = base_record.key(key);
            }
            loop {
                match self.inner.producer.send(base_record) {
                    Ok(()) => {
                        deliveries.push((delivered, Arc::clone(&record.topic)));
                        break;
                    }
                    // The local queue is full: block (backpressure) until librdkafka drains it.
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        base_record = back;
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
                    Ok(Err(e)) => {
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

#[cfg(test)]
mod tests {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::{Headers, Message};
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

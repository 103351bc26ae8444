//! Kafka sink: one producer shared by every workload of the process.
//!
//! Every record of a batch is enqueued at once and the returned [`Delivery`] awaits all their
//! delivery reports together, so a batch costs one produce round trip, not one per record,
//! and the next batch can be enqueued while this one is being acknowledged. librdkafka retries transient
//! errors itself (up to `message.timeout.ms`); an error that surfaces here fails the batch, and
//! the topology, which alone decides, retries it. An idempotent producer's timed-out message
//! may still have been written, so a retry can duplicate: delivery is at least once.
//!
//! Every record of a batch carries the same [`BatchReports`] as its delivery opaque, a count
//! of the reports still due: the last report resolves the batch. That is one reference-count
//! increment per record, where a one-shot channel per record (rdkafka's `FutureProducer`) is
//! two allocations per record and a future per record for the batch to join. The delivery
//! reports are served by [`DeliveryReports`] — a task on the tokio runtime the sink was made
//! on, or a thread without one — which wakes only when librdkafka has a report instead of
//! spinning at the end of every poll.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::channel::oneshot;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::ClientContext;

use crate::delivery_reports::DeliveryReports;
use crate::sink::{Delivery, OutRecord, Sink};
use crate::{Result, SinkError};

/// One batch's delivery reports, counted down as they arrive.
struct BatchReports {
    state: Mutex<Outstanding>,
}

struct Outstanding {
    /// Reports still due, plus one while [`KafkaSink::send`] is still enqueueing (so reports
    /// of early records cannot resolve the batch before its last record is queued).
    due: usize,
    /// The first failure reported: `(topic, reason)`.
    failure: Option<(String, String)>,
    /// Resolves the batch's [`Delivery`]; taken when `due` reaches zero. Dropped unsent (the
    /// producer went away with reports still due), the delivery fails.
    resolve: Option<oneshot::Sender<Result<()>>>,
}

impl BatchReports {
    fn new() -> (Arc<Self>, oneshot::Receiver<Result<()>>) {
        let (resolve, resolved) = oneshot::channel();
        let reports = Self {
            state: Mutex::new(Outstanding {
                due: 1,
                failure: None,
                resolve: Some(resolve),
            }),
        };
        (Arc::new(reports), resolved)
    }

    fn expect_one(&self) {
        self.lock().due += 1;
    }

    /// One report arrived (`failure`: its topic and reason), or the enqueueing ended (`None`).
    fn arrived(&self, failure: Option<(String, String)>) {
        let mut state = self.lock();
        if state.failure.is_none() {
            state.failure = failure;
        }
        state.due -= 1;
        if state.due == 0 {
            let outcome = match state.failure.take() {
                None => Ok(()),
                Some((topic, reason)) => Err(SinkError::Delivery { topic, reason }),
            };
            if let Some(resolve) = state.resolve.take() {
                // The receiver is gone only if its batch was abandoned; nothing waits.
                let _ = resolve.send(outcome);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Outstanding> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Counts each delivery report against the batch its record was produced with.
struct ReportToBatch;

impl ClientContext for ReportToBatch {}

impl ProducerContext for ReportToBatch {
    type DeliveryOpaque = Arc<BatchReports>;

    fn delivery(&self, result: &DeliveryResult<'_>, batch: Self::DeliveryOpaque) {
        let failure = match result {
            Ok(_) => None,
            Err((e, message)) => Some((message.topic().to_string(), e.to_string())),
        };
        batch.arrived(failure);
    }
}

struct Producing {
    // Declared first: stopped (a thread also joined) before this reference to the producer
    // goes; a task drops its own reference when it ends.
    _reports: DeliveryReports,
    producer: Arc<BaseProducer<ReportToBatch>>,
}

/// Produces records to Kafka.
#[derive(Clone)]
pub struct KafkaSink {
    inner: Arc<Producing>,
}

impl KafkaSink {
    /// `config` holds librdkafka properties, passed through untouched.
    pub fn new(config: &ClientConfig) -> Result<Self> {
        let producer = Arc::new(config.create_with_context(ReportToBatch)?);
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
        let (batch, resolved) = BatchReports::new();
        // Named if the producer goes away before reporting (a batch rarely spans topics).
        let first_topic = records.first().map(|r| Arc::clone(&r.topic));
        for record in records {
            let mut base_record = BaseRecord::with_opaque_to(&record.topic, Arc::clone(&batch))
                .payload(&record.payload[..]);
            // librdkafka allocates a header list even for none: only build one when needed.
            if !record.headers.is_empty() {
                let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
                for (key, value) in &record.headers {
                    headers = headers.insert(Header {
                        key,
                        value: Some(value),
                    });
                }
                base_record = base_record.headers(headers);
            }
            if let Some(key) = &record.key {
                base_record = base_record.key(&key[..]);
            }
            // Counted before it is queued: its report may arrive before `send` returns.
            batch.expect_one();
            loop {
                match self.inner.producer.send(base_record) {
                    Ok(()) => break,
                    // The local queue is full: block (backpressure) until librdkafka drains it.
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        base_record = back;
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    Err((e, _)) => {
                        // Not queued: no report will come for it. The batch fails here; the
                        // reports of its records already queued resolve a delivery no one awaits.
                        batch.arrived(None);
                        return Err(e.into());
                    }
                }
            }
        }
        // Enqueueing is over: from here the last report resolves the batch.
        batch.arrived(None);
        Ok(Box::pin(async move {
            match resolved.await {
                Ok(outcome) => outcome,
                Err(_canceled) => Err(SinkError::Delivery {
                    topic: first_topic.as_deref().unwrap_or_default().to_string(),
                    reason: "producer shut down before the delivery report".into(),
                }),
            }
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
            key: Some(key.as_bytes().to_vec().into()),
            payload: format!("{{\"id\":\"{key}\"}}").into_bytes().into(),
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

    #[test]
    fn a_batch_resolves_after_its_last_report_and_the_end_of_enqueueing() {
        let (batch, mut resolved) = BatchReports::new();
        batch.expect_one();
        batch.expect_one();
        // Both reports arrive while `send` is still enqueueing: not resolved yet.
        batch.arrived(None);
        batch.arrived(Some(("decisions".into(), "broker said no".into())));
        assert!(resolved.try_recv().expect("not cancelled").is_none());
        batch.arrived(None);
        match resolved.try_recv().expect("not cancelled") {
            Some(Err(SinkError::Delivery { topic, reason })) => {
                assert_eq!(
                    (topic.as_str(), reason.as_str()),
                    ("decisions", "broker said no")
                );
            }
            other => panic!("expected the first failure, got {other:?}"),
        }
    }

    #[test]
    fn a_batch_whose_reports_never_come_fails_instead_of_hanging() {
        let (batch, resolved) = BatchReports::new();
        batch.expect_one();
        // The producer is destroyed with the record's opaque: the count never reaches zero.
        drop(batch);
        assert!(futures::executor::block_on(resolved).is_err());
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

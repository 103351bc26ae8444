//! The Kafka consumer task.
//!
//! Why `BaseConsumer` rather than `StreamConsumer`: a stream wakes an async task per message
//! (reported 5× slower) and has lost wakeups (rust-rdkafka #665, #638). Here one task sleeps
//! until librdkafka signals the consumer's queue ([`super::wakeups`]), then takes everything
//! waiting with non-blocking polls, batches and decodes, and waits on the bounded channel to
//! the stages when they are behind — that wait is the pipeline's backpressure. It was a thread
//! of its own until stop 31; as a task, a fetched batch goes from librdkafka to the producer
//! without crossing to another thread of verdict's.
//!
//! Offsets: `enable.auto.offset.store=false`. When a batch is acknowledged (all its decisions
//! and dead letters delivered), the highest offset of each of its partitions is stored, and
//! librdkafka commits stored offsets in the background and on shutdown. Acks arrive in batch
//! order because the stages keep order. On a revocation, the rebalance callback waits for the
//! in-flight batches, stores their offsets and commits before the partitions move; storing an
//! offset for a partition already revoked fails (librdkafka ≥ 1.9) and is benign — the new
//! owner re-reads from the last commit, so the worst case is a duplicate decision, never a
//! lost one.
//!
//! Exactly once: nothing is stored or committed here. Each batch carries its next offsets and
//! the group metadata to the transaction that commits it. After an aborted transaction the
//! committer bumps the [`Rewind`] epoch; the source then drops its open batch, seeks every
//! assigned partition back to its committed offset and stamps later batches with the new
//! epoch, and the committer drops the batches of older epochs still in the stages.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::mpsc::Sender;
use verdict_sinks::NextOffset;

use super::batcher::adaptive_wait;
use super::decode::JsonBatchDecoder;
use super::open_batch::{ClosedBatch, MessageMeta, OpenBatch};
use super::wakeups::ConsumerWakeups;
use super::{GroupMetadata, InputBatch, RawMessage};
use crate::deadline::{Ahead, StageCosts};
use crate::metrics::{ErrorStage, Metrics, WorkloadMetrics};
use crate::PipelineError;

/// Longest a poll blocks when no batch is open (keeps shutdown and acks responsive).
const IDLE_POLL: Duration = Duration::from_millis(50);
/// Poll wait while paused: acks (which may allow resuming) are absorbed between polls.
const PAUSED_POLL: Duration = Duration::from_millis(2);
/// Longest the source waits for in-flight batches on shutdown or revocation.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Adaptive batching: with fewer batches than this in flight the stages can take a batch at
/// once, so an open batch closes as soon as no more messages are waiting. Two, not one: the
/// feature stage can work on a batch while the previous one is scored and delivered.
const ADAPTIVE_IDLE_BELOW_BATCHES: usize = 2;

/// What adaptive batching needs to know (`[workloads.batch] mode = "adaptive"`).
pub struct AdaptiveBatching {
    /// The workload's latency budget and its stages' observed costs, with a deadline.
    pub budget: Option<(Duration, Arc<StageCosts>)>,
}

/// Limit of the committed-offset fetch and the seek of a rewind.
const REWIND_TIMEOUT: Duration = Duration::from_secs(10);

/// Exactly once: how the committer asks the source to rewind after an aborted transaction.
#[derive(Debug, Default)]
pub struct Rewind {
    epoch: AtomicU64,
}

impl Rewind {
    /// The epoch batches are consumed in now; a batch of an older one is to be dropped.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Everything consumed after the committed offsets is void: read it again.
    pub fn request(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }
}

/// What the source did, returned when its thread ends.
#[derive(Debug, Default, Clone)]
pub struct SourceStats {
    pub messages: u64,
    pub batches: u64,
    pub rejected: u64,
    pub acked_batches: u64,
}

/// The running source task.
pub struct SourceHandle {
    pub task: tokio::task::JoinHandle<Result<SourceStats, PipelineError>>,
}

/// Offsets of batches handed to the stages and not yet acknowledged.
#[derive(Default)]
struct InFlight {
    /// seq → the highest offset of each (topic, partition) in that batch.
    batches: BTreeMap<u64, Vec<PartitionOffset>>,
}

struct SourceContext {
    workload: String,
    in_flight: Mutex<InFlight>,
    acks: Mutex<Receiver<u64>>,
    metrics: Arc<Metrics>,
    workload_metrics: WorkloadMetrics,
    /// Set once the consumer has joined its group (readiness).
    joined: Arc<AtomicBool>,
    /// Set while the source holds its partitions paused (overload); partitions assigned
    /// meanwhile are paused as they arrive.
    paused: AtomicBool,
    /// Offsets are committed by transactions, not by the consumer.
    exactly_once: bool,
    /// Partitions assigned, counted from the rebalances themselves (cooperative: each one
    /// adds or removes some). Not asked of librdkafka: `post_rebalance` runs after the
    /// unassign, and when the revoke is the one closing the consumer raises, the group can
    /// terminate right then and never answer `rd_kafka_assignment` (a request to the group's
    /// thread, like the one in librdkafka#4041). A CI run hung there, in `Pipeline::wait`.
    assigned: AtomicI64,
    /// Set while the source task is inside `poll`, where the rebalance callbacks run: on a
    /// runtime worker, so what they wait for must first hand the worker's other tasks on.
    polling_on_runtime: AtomicBool,
    /// Partitions revoked since the source last looked: the open batch, which the callback
    /// cannot reach, still holds their messages.
    revoked: Mutex<Vec<(String, i32)>>,
    /// Set with `revoked`, so the source checks a flag, not a lock, after every poll.
    revoked_pending: AtomicBool,
}

/// What one absorption of acks found.
struct Absorbed {
    /// Batches acknowledged.
    acked: u64,
    /// The stages have dropped their end: no more acks will come.
    stages_gone: bool,
}

/// The part of librdkafka's statistics JSON the lag metric needs.
#[derive(serde::Deserialize)]
struct Statistics {
    #[serde(default)]
    topics: HashMap<String, TopicStatistics>,
}

#[derive(serde::Deserialize)]
struct TopicStatistics {
    #[serde(default)]
    partitions: HashMap<String, PartitionStatistics>,
}

#[derive(serde::Deserialize)]
struct PartitionStatistics {
    #[serde(default)]
    consumer_lag: i64,
    #[serde(default)]
    fetch_state: String,
}

impl ClientContext for SourceContext {
    // Parsed here rather than by rdkafka's `Statistics`, which fails as a whole when a
    // librdkafka release adds or changes any field the lag does not need.
    fn stats_raw(&self, statistics: &[u8]) {
        let statistics: Statistics = match serde_json::from_slice(statistics) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(workload = %self.workload, error = %e, "unreadable librdkafka statistics");
                return;
            }
        };
        let mut lags = Vec::new();
        for (topic, t) in statistics.topics {
            for (partition, p) in t.partitions {
                // -1 is librdkafka's internal "unassigned" partition; a negative lag is
                // unknown (no committed offset or high watermark yet); fetch_state "none"
                // means the partition is not ours.
                let Ok(partition) = partition.parse::<i32>() else {
                    continue;
                };
                if partition < 0 || p.consumer_lag < 0 || p.fetch_state == "none" {
                    continue;
                }
                lags.push((topic.clone(), partition, p.consumer_lag));
            }
        }
        self.metrics.set_consumer_lag(&self.workload, &lags);
    }
}

impl ConsumerContext for SourceContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(partitions) = rebalance {
            // The open batch's messages of these partitions are not decided here: the source
            // drops them when this poll returns, before it takes the next message.
            self.revoked
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend(
                    partitions
                        .elements()
                        .iter()
                        .map(|p| (p.topic().to_string(), p.partition())),
                );
            self.revoked_pending.store(true, Ordering::Release);
            // Finish what is in flight and commit it while we still own the partitions, so
            // the next owner starts after it instead of deciding it again.
            let pending = self.blocking(|| {
                let pending = self.drain(consumer, DRAIN_TIMEOUT);
                if !self.exactly_once {
                    commit_stored(consumer, &self.workload, "commit on revoke failed");
                }
                pending
            });
            tracing::info!(
                workload = %self.workload,
                revoked = partitions.count(),
                unacknowledged_batches = pending,
                "partitions revoked"
            );
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let change = match rebalance {
            Rebalance::Assign(partitions) => partitions.count() as i64,
            Rebalance::Revoke(partitions) => -(partitions.count() as i64),
            Rebalance::Error(_) => 0,
        };
        let assigned = assigned_after(&self.assigned, change);
        self.workload_metrics.assigned_partitions.set(assigned);
        if !matches!(rebalance, Rebalance::Error(_)) {
            self.joined.store(true, Ordering::Relaxed);
        }
        match rebalance {
            Rebalance::Assign(partitions) => {
                if self.paused.load(Ordering::Relaxed) {
                    if let Err(e) = consumer.pause(partitions) {
                        tracing::warn!(workload = %self.workload, error = %e, "pausing newly assigned partitions");
                    }
                }
                tracing::info!(
                    workload = %self.workload,
                    assigned = partitions.count(),
                    "partitions assigned"
                )
            }
            Rebalance::Error(e) => {
                tracing::warn!(workload = %self.workload, error = %e, "rebalance error")
            }
            Rebalance::Revoke(_) => {}
        }
    }
}

/// Commits the stored offsets now. A failure is not fatal, but whoever reads the partitions
/// next decides again what was decided since the last background commit: worth a warning.
/// Nothing stored since the last commit is not a failure.
fn commit_stored(consumer: &BaseConsumer<SourceContext>, workload: &str, failed: &str) {
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
        Err(e) => tracing::warn!(workload = %workload, error = %e, "{failed}"),
    }
}

/// Applies one rebalance's change to the assigned-partition count; never below zero (an eager
/// revoke after an error could name partitions the count never saw).
fn assigned_after(assigned: &AtomicI64, change: i64) -> i64 {
    let previous = assigned
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
            Some((n + change).max(0))
        })
        .unwrap_or_default();
    (previous + change).max(0)
}

impl SourceContext {
    /// The partitions revoked since the last call, if any.
    fn take_revoked(&self) -> Option<Vec<(String, i32)>> {
        if !self.revoked_pending.swap(false, Ordering::Acquire) {
            return None;
        }
        Some(std::mem::take(
            &mut *self.revoked.lock().unwrap_or_else(|e| e.into_inner()),
        ))
    }

    /// Runs `f`, which may block for seconds (waiting for acks, a synchronous commit). Called
    /// from a rebalance callback inside the source task's poll, it first hands the worker's
    /// other tasks to another thread: the stages must go on delivering the batches `f` waits
    /// for. Elsewhere (the final close, on a blocking thread) it just runs `f`.
    fn blocking<R>(&self, f: impl FnOnce() -> R) -> R {
        if self.polling_on_runtime.load(Ordering::Relaxed) {
            tokio::task::block_in_place(f)
        } else {
            f()
        }
    }

    /// Stores offsets of every acknowledged batch, waiting up to `wait` for the first ack.
    fn absorb_acks(&self, consumer: &BaseConsumer<Self>, wait: Option<Duration>) -> Absorbed {
        use std::sync::mpsc::{RecvTimeoutError, TryRecvError};
        let acks = self.acks.lock().unwrap_or_else(|e| e.into_inner());
        let mut absorbed = Absorbed {
            acked: 0,
            stages_gone: false,
        };
        let mut first = match wait {
            Some(timeout) => match acks.recv_timeout(timeout) {
                Ok(seq) => Some(seq),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => {
                    absorbed.stages_gone = true;
                    None
                }
            },
            None => None,
        };
        loop {
            let seq = match first.take() {
                Some(seq) => seq,
                None => match acks.try_recv() {
                    Ok(seq) => seq,
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        absorbed.stages_gone = true;
                        break;
                    }
                },
            };
            absorbed.acked += 1;
            let offsets = self
                .in_flight
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .batches
                .remove(&seq);
            if self.exactly_once {
                // The batch's transaction committed its offsets (or it was dropped).
                continue;
            }
            for (topic, partition, offset) in offsets.into_iter().flatten() {
                // librdkafka stores offset + 1: the next message to read.
                if let Err(e) = consumer.store_offset(&topic, partition, offset) {
                    tracing::debug!(
                        workload = %self.workload, topic = %topic, partition, offset, error = %e,
                        "offset not stored (partition no longer assigned)"
                    );
                }
            }
        }
        absorbed
    }

    fn in_flight_count(&self) -> usize {
        self.in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .batches
            .len()
    }

    /// Waits until every in-flight batch is acknowledged (or `timeout`, or the stages are
    /// gone); returns how many were still unacknowledged.
    fn drain(&self, consumer: &BaseConsumer<Self>, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        while self.in_flight_count() > 0 {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            let absorbed = self.absorb_acks(
                consumer,
                Some((deadline - now).min(Duration::from_millis(100))),
            );
            // The stages stopped: what is still in flight will never be acknowledged (it is
            // consumed again by whoever reads next), and waiting out the timeout would only
            // spin on a closed channel.
            if absorbed.stages_gone {
                break;
            }
        }
        self.in_flight_count()
    }
}

/// Pauses or resumes every assigned partition.
fn set_paused(consumer: &BaseConsumer<SourceContext>, pause: bool, workload: &str) {
    let result = consumer.assignment().and_then(|assignment| {
        if pause {
            consumer.pause(&assignment)
        } else {
            consumer.resume(&assignment)
        }
    });
    match result {
        Ok(()) => tracing::debug!(workload, paused = pause, "source flow control"),
        Err(e) => tracing::warn!(workload, error = %e, paused = pause, "pause/resume failed"),
    }
}

/// Seeks every assigned partition back to its committed offset (or, with none committed,
/// to where `auto.offset.reset` says); returns how many partitions moved. librdkafka
/// discards what it had fetched past the new positions.
fn rewind_to_committed(
    consumer: &BaseConsumer<SourceContext>,
    reset_to_end: bool,
) -> rdkafka::error::KafkaResult<usize> {
    let assignment = consumer.assignment()?;
    if assignment.count() == 0 {
        return Ok(0);
    }
    let committed = consumer.committed_offsets(assignment, REWIND_TIMEOUT)?;
    let mut positions = TopicPartitionList::with_capacity(committed.count());
    for p in committed.elements() {
        let offset = match p.offset() {
            Offset::Offset(n) => Offset::Offset(n),
            _ if reset_to_end => Offset::End,
            _ => Offset::Beginning,
        };
        positions.add_partition_offset(p.topic(), p.partition(), offset)?;
    }
    let moved = positions.count();
    for p in consumer
        .seek_partitions(positions, REWIND_TIMEOUT)?
        .elements()
    {
        p.error()?;
    }
    Ok(moved)
}

/// A topic, a partition and an offset in it.
type PartitionOffset = (Arc<str>, i32, i64);

/// Most messages taken in one burst of non-blocking polls before the loop's bookkeeping
/// (acks, flow control) runs again.
const MAX_BURST: usize = 1024;

/// The highest offset of each partition among `messages`. A batch holds a few partitions, and
/// messages arrive in runs of one partition: a scan of a short list, with the last match
/// checked first, instead of hashing the topic name per message.
fn highest_offsets(messages: &[RawMessage]) -> Vec<PartitionOffset> {
    let mut offsets: Vec<PartitionOffset> = Vec::new();
    let mut last = 0;
    for m in messages {
        let same = |(topic, partition, _): &PartitionOffset| {
            *partition == m.partition && (Arc::ptr_eq(topic, &m.topic) || *topic == m.topic)
        };
        let slot = if offsets.get(last).is_some_and(same) {
            last
        } else if let Some(found) = offsets.iter().position(same) {
            found
        } else {
            offsets.push((Arc::clone(&m.topic), m.partition, m.offset));
            offsets.len() - 1
        };
        offsets[slot].2 = offsets[slot].2.max(m.offset);
        last = slot;
    }
    offsets
}

/// The shared name of `topic`: one allocation per topic for the consumer's life, found by a
/// scan (a consumer reads a topic or a few) rather than by hashing the name per message.
fn interned(topics: &mut Vec<Arc<str>>, topic: &str) -> Arc<str> {
    match topics.iter().find(|t| ***t == *topic) {
        Some(t) => Arc::clone(t),
        None => {
            let t: Arc<str> = topic.into();
            topics.push(Arc::clone(&t));
            t
        }
    }
}

/// Settings of one source.
pub struct SourceSettings {
    pub workload: String,
    pub topic: String,
    pub consumer: ClientConfig,
    pub max_rows: usize,
    pub linger: Duration,
    pub metrics: Arc<Metrics>,
    pub workload_metrics: WorkloadMetrics,
    pub joined: Arc<AtomicBool>,
    /// Pause the partitions at this many batches in flight...
    pub pause_at_batches: usize,
    /// ...and resume them at this many or fewer.
    pub resume_at_batches: usize,
    /// Adaptive batching; `None`: fixed `max-rows` / `linger`.
    pub adaptive: Option<AdaptiveBatching>,
    /// Exactly once: offsets go with each batch to its transaction, and the committer
    /// rewinds the source through this after an abort. `None`: at least once.
    pub rewind: Option<Arc<Rewind>>,
}

/// A message as the consumer lends it, or the error it polled instead.
type Polled<'c> = Option<KafkaResult<BorrowedMessage<'c>>>;

/// Takes what the consumer's queue holds now, without waiting. Rebalance callbacks run inside
/// this call; while it lasts they may block (see [`SourceContext::blocking`]).
fn poll_now(consumer: &BaseConsumer<SourceContext>) -> Polled<'_> {
    let ctx = consumer.context();
    ctx.polling_on_runtime.store(true, Ordering::Relaxed);
    let polled = consumer.poll(Duration::ZERO);
    ctx.polling_on_runtime.store(false, Ordering::Relaxed);
    polled
}

/// Most polls in a row that return nothing while the queue still reports events (rebalances,
/// statistics and other events a poll serves itself) before the task sleeps anyway.
const MAX_EMPTY_POLLS: usize = 64;

/// Polls for the first message of a burst, sleeping on the consumer's wake-up socket until
/// one arrives or `deadline` passes (or the source is asked to stop).
async fn first_message<'c>(
    consumer: &'c BaseConsumer<SourceContext>,
    wakeups: &ConsumerWakeups,
    deadline: Instant,
    shutdown: &AtomicBool,
) -> Polled<'c> {
    let mut empty_polls = 0;
    loop {
        if let Some(polled) = poll_now(consumer) {
            return Some(polled);
        }
        // No new wake-up comes for a queue that never emptied: poll again first.
        if wakeups.queued() > 0 && empty_polls < MAX_EMPTY_POLLS {
            empty_polls += 1;
            continue;
        }
        let now = Instant::now();
        if now >= deadline || shutdown.load(Ordering::Relaxed) {
            return None;
        }
        wakeups.wait(deadline - now).await;
        empty_polls = 0;
    }
}

/// The consumer, closed off the runtime if the task is dropped before it ends (the runtime
/// shutting down): closing leaves the group, which runs the revocation callback, and that
/// waits for the in-flight batches.
struct ClosedOffRuntime(Option<BaseConsumer<SourceContext>>);

impl ClosedOffRuntime {
    fn consumer(&self) -> &BaseConsumer<SourceContext> {
        self.0
            .as_ref()
            .expect("the consumer is taken only by into_inner, which consumes the guard")
    }

    fn into_inner(mut self) -> Option<BaseConsumer<SourceContext>> {
        self.0.take()
    }
}

impl Drop for ClosedOffRuntime {
    fn drop(&mut self) {
        if let Some(consumer) = self.0.take() {
            // If no thread can be had, the close runs here, blocking this thread.
            let _ = std::thread::Builder::new()
                .name("source-close".into())
                .spawn(move || drop(consumer));
        }
    }
}

/// Turns closed batches into [`InputBatch`]es: decoding, sequence numbers, in-flight offsets.
struct BatchMaker {
    decoder: JsonBatchDecoder,
    metrics: WorkloadMetrics,
    seq: u64,
}

impl BatchMaker {
    fn make(
        &mut self,
        closed: ClosedBatch,
        epoch: u64,
        stats: &mut SourceStats,
        consumer: &BaseConsumer<SourceContext>,
    ) -> Result<InputBatch, PipelineError> {
        let ctx = consumer.context();
        let ClosedBatch {
            messages,
            opened_at,
        } = closed;
        let payloads: Vec<Option<&[u8]>> = messages.iter().map(|m| m.payload.as_deref()).collect();
        let decode_started = Instant::now();
        let decoded = self.decoder.decode(&payloads)?;
        let decode_time = decode_started.elapsed();
        self.metrics.consumed.inc_by(messages.len() as u64);
        self.metrics.batch_messages.observe(messages.len() as f64);
        self.metrics.decode.observe(decode_time.as_secs_f64());
        self.metrics.in_flight.inc();
        let offsets = highest_offsets(&messages);
        stats.messages += messages.len() as u64;
        stats.batches += 1;
        stats.rejected += decoded.rejected.len() as u64;
        let next_offsets = offsets
            .iter()
            .map(|(topic, partition, offset)| NextOffset {
                topic: Arc::clone(topic),
                partition: *partition,
                offset: offset + 1,
            })
            .collect();
        let group = if ctx.exactly_once {
            consumer
                .group_metadata()
                .map(|g| GroupMetadata(Arc::new(g)))
        } else {
            None
        };
        let seq = self.seq;
        self.seq += 1;
        ctx.in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .batches
            .insert(seq, offsets);
        Ok(InputBatch {
            seq,
            decoded,
            messages,
            opened_at,
            decode_time,
            next_offsets,
            epoch,
            group,
        })
    }
}

/// Starts the source as a task on the current runtime, which must be tokio's multi-thread one
/// with its I/O driver: a revocation blocks the source's worker until the in-flight batches
/// are delivered, and the stages delivering them need the other workers meanwhile.
///
/// Batches go to `batches`; the stages send each batch's `seq` to `acks` once its outputs are
/// delivered. Setting `shutdown` makes the source close its open batch, stop consuming, wait
/// for the in-flight batches and commit.
pub fn spawn_kafka_source(
    settings: SourceSettings,
    decoder: JsonBatchDecoder,
    batches: Sender<InputBatch>,
    acks: Receiver<u64>,
    shutdown: Arc<AtomicBool>,
) -> Result<SourceHandle, PipelineError> {
    let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
        PipelineError::Config("the source runs on a tokio runtime and none is running".into())
    })?;
    if runtime.runtime_flavor() != tokio::runtime::RuntimeFlavor::MultiThread {
        return Err(PipelineError::Config(
            "the source needs tokio's multi-thread runtime: a revocation blocks its worker \
             while the other workers deliver the in-flight batches"
                .into(),
        ));
    }
    let context = SourceContext {
        workload: settings.workload.clone(),
        in_flight: Mutex::new(InFlight::default()),
        acks: Mutex::new(acks),
        metrics: Arc::clone(&settings.metrics),
        workload_metrics: settings.workload_metrics.clone(),
        joined: Arc::clone(&settings.joined),
        paused: AtomicBool::new(false),
        exactly_once: settings.rewind.is_some(),
        assigned: AtomicI64::new(0),
        polling_on_runtime: AtomicBool::new(false),
        revoked: Mutex::new(Vec::new()),
        revoked_pending: AtomicBool::new(false),
    };
    let consumer: BaseConsumer<SourceContext> = settings
        .consumer
        .create_with_context(context)
        .map_err(|e| PipelineError::Kafka(format!("creating the consumer: {e}")))?;
    consumer
        .subscribe(&[settings.topic.as_str()])
        .map_err(|e| PipelineError::Kafka(format!("subscribing to `{}`: {e}", settings.topic)))?;
    let wakeups = ConsumerWakeups::register(&consumer)?;
    let maker = BatchMaker {
        decoder,
        metrics: settings.workload_metrics.clone(),
        seq: 0,
    };
    let task = runtime.spawn(run_source(
        ClosedOffRuntime(Some(consumer)),
        wakeups,
        settings,
        maker,
        batches,
        shutdown,
    ));
    Ok(SourceHandle { task })
}

/// The source's loop: poll, batch, decode, hand over; flow control, acks and rewinds between
/// bursts; on shutdown, drain and commit.
async fn run_source(
    guard: ClosedOffRuntime,
    wakeups: ConsumerWakeups,
    settings: SourceSettings,
    mut maker: BatchMaker,
    batches: Sender<InputBatch>,
    shutdown: Arc<AtomicBool>,
) -> Result<SourceStats, PipelineError> {
    let reset_to_end = matches!(
        settings.consumer.get("auto.offset.reset"),
        Some("latest" | "largest" | "end")
    );
    let metrics = &settings.workload_metrics;
    let consumer = guard.consumer();
    let ctx = consumer.context();
    let mut open_batch = OpenBatch::new(settings.max_rows, settings.linger);
    let mut stats = SourceStats::default();
    let mut topics: Vec<Arc<str>> = Vec::new();
    let mut epoch = settings.rewind.as_ref().map_or(0, |r| r.epoch());
    let stages_stopped = |_| PipelineError::Stopped("the stages stopped before the source".into());

    let mut last_error_log = Instant::now() - Duration::from_secs(60);
    while !shutdown.load(Ordering::Relaxed) {
        stats.acked_batches += ctx.absorb_acks(consumer, None).acked;
        if let Some(rewind) = &settings.rewind {
            let requested = rewind.epoch();
            if requested != epoch {
                // Fetching the committed offsets is a round trip to the coordinator.
                match tokio::task::block_in_place(|| rewind_to_committed(consumer, reset_to_end)) {
                    Ok(partitions) => {
                        // The open batch was read past the committed offsets too.
                        let _ = open_batch.flush();
                        epoch = requested;
                        metrics.rewinds.inc();
                        tracing::warn!(
                            workload = %settings.workload,
                            partitions,
                            epoch,
                            "rewound to the committed offsets after an aborted transaction"
                        );
                    }
                    // Batches consumed meanwhile keep the old epoch and are dropped; the next
                    // iteration tries again.
                    Err(e) => {
                        metrics.error(ErrorStage::Consume);
                        tracing::warn!(workload = %settings.workload, error = %e, "rewind failed; retrying");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                }
            }
        }
        // Overload: stop fetching rather than buffer. Kafka keeps the backlog; the consumer
        // keeps polling (rebalances, acks) while paused. Hysteresis between the two thresholds
        // avoids pausing and resuming on every batch.
        let in_flight = ctx.in_flight_count();
        let paused = ctx.paused.load(Ordering::Relaxed);
        if !paused && in_flight >= settings.pause_at_batches {
            ctx.paused.store(true, Ordering::Relaxed);
            set_paused(consumer, true, &settings.workload);
            metrics.source_paused.set(1);
            metrics.source_pauses.inc();
        } else if paused && in_flight <= settings.resume_at_batches {
            ctx.paused.store(false, Ordering::Relaxed);
            set_paused(consumer, false, &settings.workload);
            metrics.source_paused.set(0);
        }
        let stages_idle = match &settings.adaptive {
            Some(adaptive) => {
                let (budget, predicted) = match &adaptive.budget {
                    Some((budget, costs)) => (
                        Some(*budget),
                        Duration::from_millis(costs.remaining_ms(Ahead::Features).max(0) as u64),
                    ),
                    None => (None, Duration::ZERO),
                };
                open_batch.set_linger(adaptive_wait(budget, predicted, settings.linger));
                in_flight < ADAPTIVE_IDLE_BELOW_BATCHES
            }
            None => false,
        };
        let now = Instant::now();
        let cap = if ctx.paused.load(Ordering::Relaxed) {
            PAUSED_POLL
        } else {
            IDLE_POLL
        };
        // Adaptive and the stages can take a batch: only take what is already waiting, then
        // close.
        let wait = if stages_idle && !open_batch.is_empty() {
            Duration::ZERO
        } else {
            open_batch.wait_budget(now, cap)
        };
        let first = first_message(consumer, &wakeups, now + wait, &shutdown).await;
        // One clock read per burst: the arrival time of every message drained with it (an
        // early stamp only makes the batch look older to its deadline) and the linger check.
        let polled_at = Instant::now();
        // What else is already waiting is taken without the per-poll bookkeeping above (acks,
        // flow control, the adaptive linger, clock reads): at the baseline's batching that
        // bookkeeping was about a tenth of the source's CPU. The burst ends at a full batch
        // (the bookkeeping then runs before the next) or at MAX_BURST, so acks are absorbed
        // at least that often. Messages borrow the consumer and are not `Send`: none lives
        // past this block, so none is held across the hand-over's await.
        let mut closed = None;
        {
            let mut polled = first;
            let mut drained = 0;
            loop {
                // A revocation ran inside the poll just made: every message the open batch
                // holds was polled before it, and those of the revoked partitions are their
                // next owner's now. (What that poll returned was fetched after it.)
                if let Some(revoked) = ctx.take_revoked() {
                    let dropped = open_batch.drop_partitions(&revoked);
                    if dropped > 0 {
                        metrics.revoked_unbatched.inc_by(dropped as u64);
                    }
                    tracing::info!(
                        workload = %settings.workload,
                        dropped_messages = dropped,
                        "open batch: messages of revoked partitions left to their next owner"
                    );
                }
                match polled {
                    Some(Ok(message)) => {
                        drained += 1;
                        let meta = MessageMeta {
                            topic: interned(&mut topics, message.topic()),
                            partition: message.partition(),
                            offset: message.offset(),
                            timestamp_ms: message.timestamp().to_millis(),
                            headers: message
                                .headers()
                                .map(|hs| {
                                    hs.iter()
                                        .map(|h| {
                                            (
                                                h.key.to_string(),
                                                h.value.unwrap_or_default().to_vec(),
                                            )
                                        })
                                        .collect()
                                })
                                .unwrap_or_default(),
                        };
                        closed = open_batch.push(meta, message.key(), message.payload(), polled_at);
                        if closed.is_some() || drained >= MAX_BURST {
                            break;
                        }
                        polled = poll_now(consumer);
                    }
                    // Transient broker errors are retried by librdkafka; log, at most once a
                    // second, and keep polling.
                    Some(Err(e)) => {
                        metrics.error(ErrorStage::Consume);
                        if last_error_log.elapsed() > Duration::from_secs(1) {
                            tracing::warn!(workload = %settings.workload, error = %e, "consumer error");
                            last_error_log = Instant::now();
                        }
                        break;
                    }
                    // Nothing more waiting: adaptive with idle stages closes the batch now.
                    None => {
                        if stages_idle {
                            closed = open_batch.flush();
                        }
                        break;
                    }
                }
            }
        }
        if let Some(closed) = closed {
            let batch = maker.make(closed, epoch, &mut stats, consumer)?;
            batches.send(batch).await.map_err(stages_stopped)?;
        }
        if let Some(expired) = open_batch.poll_expired(polled_at) {
            let batch = maker.make(expired, epoch, &mut stats, consumer)?;
            batches.send(batch).await.map_err(stages_stopped)?;
        }
    }

    // Shutdown: close the open batch, let the stages drain, store and commit, leave the group.
    if let Some(rest) = open_batch.flush() {
        let batch = maker.make(rest, epoch, &mut stats, consumer)?;
        batches.send(batch).await.map_err(stages_stopped)?;
    }
    drop(batches);
    // The wake-ups reference the consumer's queue: gone before the consumer.
    drop(wakeups);
    let exactly_once = ctx.exactly_once;
    let workload = settings.workload.clone();
    let consumer = guard.into_inner();
    let pending = tokio::task::spawn_blocking(move || {
        let Some(consumer) = consumer else {
            return 0;
        };
        let pending = consumer.context().drain(&consumer, DRAIN_TIMEOUT);
        if !exactly_once {
            commit_stored(&consumer, &workload, "final commit failed");
        }
        pending
    })
    .await
    .map_err(|e| PipelineError::Stopped(format!("the source's final commit: {e}")))?;
    stats.acked_batches = stats.batches - pending as u64;
    if pending > 0 {
        tracing::warn!(
            workload = %settings.workload,
            unacknowledged_batches = pending,
            "stopped with batches not acknowledged; they will be consumed again"
        );
    }
    tracing::info!(
        workload = %settings.workload,
        messages = stats.messages,
        batches = stats.batches,
        rejected = stats.rejected,
        "source stopped"
    );
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_assigned_count_follows_incremental_rebalances_and_never_goes_negative() {
        let assigned = AtomicI64::new(0);
        assert_eq!(assigned_after(&assigned, 3), 3);
        assert_eq!(assigned_after(&assigned, 2), 5);
        assert_eq!(assigned_after(&assigned, -2), 3);
        assert_eq!(assigned_after(&assigned, 0), 3);
        assert_eq!(assigned_after(&assigned, -5), 0);
        assert_eq!(assigned.load(Ordering::Relaxed), 0);
    }

    fn message(topic: &Arc<str>, partition: i32, offset: i64) -> RawMessage {
        RawMessage {
            topic: Arc::clone(topic),
            partition,
            offset,
            timestamp_ms: None,
            key: None,
            payload: None,
            headers: Vec::new(),
        }
    }

    #[test]
    fn a_batch_stores_the_highest_offset_of_each_partition() {
        let a: Arc<str> = "transactions".into();
        // The same name from another allocation is the same topic.
        let a_again: Arc<str> = "transactions".into();
        let b: Arc<str> = "refunds".into();
        let messages = [
            message(&a, 0, 10),
            message(&a, 0, 11),
            message(&a, 1, 7),
            message(&a_again, 0, 12),
            message(&b, 0, 3),
            message(&a, 1, 5),
            message(&b, 0, 2),
        ];
        let offsets: Vec<(String, i32, i64)> = highest_offsets(&messages)
            .into_iter()
            .map(|(topic, partition, offset)| (topic.to_string(), partition, offset))
            .collect();
        assert_eq!(
            offsets,
            vec![
                ("transactions".to_string(), 0, 12),
                ("transactions".to_string(), 1, 7),
                ("refunds".to_string(), 0, 3),
            ]
        );
        assert!(highest_offsets(&[]).is_empty());
    }

    #[test]
    fn topic_names_are_shared_not_copied_per_message() {
        let mut topics = Vec::new();
        let first = interned(&mut topics, "transactions");
        let again = interned(&mut topics, "transactions");
        let other = interned(&mut topics, "refunds");
        assert!(Arc::ptr_eq(&first, &again));
        assert_eq!(&*other, "refunds");
        assert_eq!(topics.len(), 2);
    }
}

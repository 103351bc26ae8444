//! The Kafka consumer thread.
//!
//! Why a thread and `BaseConsumer` rather than `StreamConsumer`: a stream wakes an async task
//! per message (reported 5× slower) and has lost wakeups (rust-rdkafka #665, #638). Here one
//! thread polls, batches and decodes, and blocks on the bounded channel to the stages when they
//! are behind — that blocking is the pipeline's backpressure.
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
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::mpsc::Sender;
use verdict_sinks::NextOffset;

use super::batcher::adaptive_wait;
use super::decode::JsonBatchDecoder;
use super::open_batch::{ClosedBatch, MessageMeta, OpenBatch};
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

/// The running source thread.
pub struct SourceHandle {
    pub thread: JoinHandle<Result<SourceStats, PipelineError>>,
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
            // Finish what is in flight and commit it while we still own the partitions, so
            // the next owner starts after it instead of deciding it again.
            let pending = self.drain(consumer, DRAIN_TIMEOUT);
            if !self.exactly_once {
                if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
                    tracing::debug!(workload = %self.workload, error = %e, "commit on revoke");
                }
            }
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
    /// Stores offsets of every acknowledged batch; returns how many batches were acked.
    fn absorb_acks(&self, consumer: &BaseConsumer<Self>, wait: Option<Duration>) -> u64 {
        let acks = self.acks.lock().unwrap_or_else(|e| e.into_inner());
        let mut acked = 0;
        let mut first = match wait {
            Some(timeout) => acks.recv_timeout(timeout).ok(),
            None => None,
        };
        loop {
            let seq = match first.take() {
                Some(seq) => seq,
                None => match acks.try_recv() {
                    Ok(seq) => seq,
                    Err(_) => break,
                },
            };
            acked += 1;
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
        acked
    }

    fn in_flight_count(&self) -> usize {
        self.in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .batches
            .len()
    }

    /// Waits until every in-flight batch is acknowledged (or `timeout`); returns how many
    /// were still unacknowledged.
    fn drain(&self, consumer: &BaseConsumer<Self>, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        while self.in_flight_count() > 0 {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            self.absorb_acks(
                consumer,
                Some((deadline - now).min(Duration::from_millis(100))),
            );
        }
        self.in_flight_count()
    }
}

/// librdkafka takes poll timeouts in whole milliseconds and rdkafka truncates: the last
/// fraction of a millisecond before a batch's linger ends would become non-blocking polls in
/// a loop, a spin that took about a tenth of a core at 2,000 tx/s (200 batches a second).
/// Rounding up overshoots the linger by under a millisecond instead.
fn whole_millis(wait: Duration) -> Duration {
    Duration::from_millis(wait.as_micros().div_ceil(1000) as u64)
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

/// Starts the consumer thread. Batches go to `batches`; the stages send each batch's `seq` to
/// `acks` once its outputs are delivered. Setting `shutdown` makes the source close its open
/// batch, stop consuming, wait for the in-flight batches and commit.
pub fn spawn_kafka_source(
    settings: SourceSettings,
    mut decoder: JsonBatchDecoder,
    batches: Sender<InputBatch>,
    acks: Receiver<u64>,
    shutdown: Arc<AtomicBool>,
) -> Result<SourceHandle, PipelineError> {
    let context = SourceContext {
        workload: settings.workload.clone(),
        in_flight: Mutex::new(InFlight::default()),
        acks: Mutex::new(acks),
        metrics: settings.metrics,
        workload_metrics: settings.workload_metrics.clone(),
        joined: settings.joined,
        paused: AtomicBool::new(false),
        exactly_once: settings.rewind.is_some(),
        assigned: AtomicI64::new(0),
    };
    let reset_to_end = matches!(
        settings.consumer.get("auto.offset.reset"),
        Some("latest" | "largest" | "end")
    );
    let metrics = settings.workload_metrics;
    let consumer: BaseConsumer<SourceContext> = settings
        .consumer
        .create_with_context(context)
        .map_err(|e| PipelineError::Kafka(format!("creating the consumer: {e}")))?;
    consumer
        .subscribe(&[settings.topic.as_str()])
        .map_err(|e| PipelineError::Kafka(format!("subscribing to `{}`: {e}", settings.topic)))?;

    let thread = std::thread::Builder::new()
        .name(format!("source-{}", settings.workload))
        .spawn(move || {
            let mut open_batch = OpenBatch::new(settings.max_rows, settings.linger);
            let mut stats = SourceStats::default();
            let mut seq = 0u64;
            let mut topics: Vec<Arc<str>> = Vec::new();
            let ctx = consumer.context();
            let mut epoch = settings.rewind.as_ref().map_or(0, |r| r.epoch());
            let consumer_ref = &consumer;
            let mut send = |closed: ClosedBatch, epoch: u64, stats: &mut SourceStats| {
                let ClosedBatch {
                    messages,
                    opened_at,
                } = closed;
                let payloads: Vec<Option<&[u8]>> =
                    messages.iter().map(|m| m.payload.as_deref()).collect();
                let decode_started = Instant::now();
                let decoded = decoder.decode(&payloads)?;
                let decode_time = decode_started.elapsed();
                metrics.consumed.inc_by(messages.len() as u64);
                metrics.batch_messages.observe(messages.len() as f64);
                metrics.decode.observe(decode_time.as_secs_f64());
                metrics.in_flight.inc();
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
                    consumer_ref
                        .group_metadata()
                        .map(|g| GroupMetadata(Arc::new(g)))
                } else {
                    None
                };
                ctx.in_flight
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .batches
                    .insert(seq, offsets);
                let batch = InputBatch {
                    seq,
                    decoded,
                    messages,
                    opened_at,
                    decode_time,
                    next_offsets,
                    epoch,
                    group,
                };
                seq += 1;
                batches.blocking_send(batch).map_err(|_| {
                    PipelineError::Stopped("the stages stopped before the source".into())
                })
            };

            let mut last_error_log = Instant::now() - Duration::from_secs(60);
            while !shutdown.load(Ordering::Relaxed) {
                stats.acked_batches += ctx.absorb_acks(&consumer, None);
                if let Some(rewind) = &settings.rewind {
                    let requested = rewind.epoch();
                    if requested != epoch {
                        match rewind_to_committed(&consumer, reset_to_end) {
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
                            // Batches consumed meanwhile keep the old epoch and are dropped;
                            // the next iteration tries again.
                            Err(e) => {
                                metrics.error(ErrorStage::Consume);
                                tracing::warn!(workload = %settings.workload, error = %e, "rewind failed; retrying");
                                std::thread::sleep(Duration::from_millis(100));
                                continue;
                            }
                        }
                    }
                }
                // Overload: stop fetching rather than buffer. Kafka keeps the backlog; the
                // consumer keeps polling (rebalances, acks) while paused. Hysteresis between
                // the two thresholds avoids pausing and resuming on every batch.
                let in_flight = ctx.in_flight_count();
                let paused = ctx.paused.load(Ordering::Relaxed);
                if !paused && in_flight >= settings.pause_at_batches {
                    ctx.paused.store(true, Ordering::Relaxed);
                    set_paused(&consumer, true, &settings.workload);
                    metrics.source_paused.set(1);
                    metrics.source_pauses.inc();
                } else if paused && in_flight <= settings.resume_at_batches {
                    ctx.paused.store(false, Ordering::Relaxed);
                    set_paused(&consumer, false, &settings.workload);
                    metrics.source_paused.set(0);
                }
                let stages_idle = match &settings.adaptive {
                    Some(adaptive) => {
                        let (budget, predicted) = match &adaptive.budget {
                            Some((budget, costs)) => (
                                Some(*budget),
                                Duration::from_millis(
                                    costs.remaining_ms(Ahead::Features).max(0) as u64,
                                ),
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
                // Adaptive and the stages can take a batch: only take what is already
                // waiting, then close.
                let wait = if stages_idle && !open_batch.is_empty() {
                    Duration::ZERO
                } else {
                    open_batch.wait_budget(now, cap)
                };
                let mut polled = consumer.poll(whole_millis(wait));
                // One clock read per burst: the arrival time of every message drained with it
                // (an early stamp only makes the batch look older to its deadline) and the
                // linger check.
                let polled_at = Instant::now();
                let mut drained = 0;
                // What else is already waiting is taken without the per-poll bookkeeping above
                // (acks, flow control, the adaptive linger, clock reads): at the baseline's
                // batching that bookkeeping was about a tenth of the source thread. The burst
                // ends at a full batch (the bookkeeping then runs before the next) or at
                // MAX_BURST, so acks are absorbed at least that often.
                loop {
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
                            let full =
                                open_batch.push(meta, message.key(), message.payload(), polled_at);
                            if let Some(full) = full {
                                send(full, epoch, &mut stats)?;
                                break;
                            }
                            if drained >= MAX_BURST {
                                break;
                            }
                            polled = consumer.poll(Duration::ZERO);
                        }
                        // Transient broker errors are retried by librdkafka; log, at most once
                        // a second, and keep polling.
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
                                if let Some(batch) = open_batch.flush() {
                                    send(batch, epoch, &mut stats)?;
                                }
                            }
                            break;
                        }
                    }
                }
                if let Some(expired) = open_batch.poll_expired(polled_at) {
                    send(expired, epoch, &mut stats)?;
                }
            }

            // Shutdown: close the open batch, let the stages drain, store and commit.
            if let Some(rest) = open_batch.flush() {
                send(rest, epoch, &mut stats)?;
            }
            drop(batches);
            let pending = ctx.drain(&consumer, DRAIN_TIMEOUT);
            stats.acked_batches = stats.batches - pending as u64;
            if !ctx.exactly_once {
                if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
                    tracing::debug!(workload = %settings.workload, error = %e, "final commit")
                }
            }
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
        })
        .map_err(|e| PipelineError::Stopped(format!("spawning the source thread: {e}")))?;
    Ok(SourceHandle { thread })
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

    #[test]
    fn poll_timeouts_round_up_to_whole_milliseconds() {
        assert_eq!(whole_millis(Duration::ZERO), Duration::ZERO);
        assert_eq!(
            whole_millis(Duration::from_micros(1)),
            Duration::from_millis(1)
        );
        assert_eq!(
            whole_millis(Duration::from_micros(1_700)),
            Duration::from_millis(2)
        );
        assert_eq!(
            whole_millis(Duration::from_millis(50)),
            Duration::from_millis(50)
        );
    }
}

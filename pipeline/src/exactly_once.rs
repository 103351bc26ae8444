//! The last stage of an exactly-once workload: the committer.
//!
//! It decides each scored batch and commits, in one Kafka transaction, the batch's
//! decisions, its dead letters, any drift alerts raised since the last transaction, and the
//! batch's input offsets. One transaction at a time: a batch is acknowledged to the source
//! only once its transaction has committed.
//!
//! When a transaction is aborted (or the producer fails and is recreated, which aborts what
//! it had open), everything consumed after the committed offsets is void: the committer
//! bumps the [`Rewind`] epoch, drops the batches of the old epoch still in the stages, and
//! the source reads from the committed offsets again. So every input offset ends up with
//! exactly one committed output, whatever failed in between. Drift alerts of an aborted
//! transaction are kept for the next one; the drift monitor sees the re-read batches a
//! second time (its windows are statistics, not outputs).

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use verdict_sinks::{NextOffset, OutRecord, TransactionError, TransactionalSink};

use crate::metrics::{ErrorStage, WorkloadMetrics};
use crate::source::{GroupMetadata, Rewind};
use crate::topology::{feed_drift, BatchAccounts, Counters, StageTimings, SHUTDOWN_RETRY_LIMIT};
use crate::workload::{DriftInput, Scored, Workload};
use crate::PipelineError;

/// What the committer task owns.
pub(crate) struct Committer {
    pub accounts: BatchAccounts,
    pub workload: Arc<Workload>,
    /// Moves into each blocking call and back.
    pub producer: Option<TransactionalSink>,
    pub rewind: Arc<Rewind>,
    pub scored: mpsc::Receiver<Scored>,
    /// Drift alerts to commit (`None` without a drift monitor).
    pub alerts: Option<mpsc::Receiver<Vec<OutRecord>>>,
    pub drift: Option<std::sync::mpsc::SyncSender<DriftInput>>,
    pub acks: std::sync::mpsc::Sender<u64>,
    pub counters: Arc<Counters>,
    pub metrics: WorkloadMetrics,
    pub shutdown: Arc<AtomicBool>,
    /// Transactions aborted since the last commit.
    pub aborts_in_a_row: u32,
}

/// Aborts in a row after which the producer is recreated: a producer that keeps failing
/// (fenced, but told so as an abortable error) is not going to recover by itself.
const ABORTS_BEFORE_RECREATE: u32 = 3;

/// Index of each outcome in `WorkloadMetrics::transactions`.
const COMMITTED: usize = 0;
const ABORTED: usize = 1;
const FAILED: usize = 2;

pub(crate) fn spawn_committer(
    committer: Committer,
) -> JoinHandle<Result<([u64; 4], StageTimings), PipelineError>> {
    tokio::spawn(committer.run())
}

impl Committer {
    async fn run(mut self) -> Result<([u64; 4], StageTimings), PipelineError> {
        let mut producer = self.producer.take();
        let mut alerts: Vec<OutRecord> = Vec::new();
        let mut alerts_rx = self.alerts.take();
        loop {
            let scored = tokio::select! {
                scored = self.scored.recv() => match scored {
                    Some(scored) => scored,
                    None => break,
                },
                more = recv_alerts(&mut alerts_rx) => {
                    match more {
                        Some(more) => {
                            alerts.extend(more);
                            // Alerts alone carry no offsets: an abort needs no rewind, they
                            // wait for the next transaction.
                            let records = alerts.clone();
                            if self.transact(&mut producer, records, Vec::new(), None).await?.is_ok() {
                                alerts.clear();
                            }
                        }
                        None => alerts_rx = None,
                    }
                    continue;
                }
            };
            let batch = &scored.enriched.batch;
            if batch.epoch != self.rewind.epoch() {
                // Consumed before a rewind: the source reads these messages again.
                self.drop_batch(batch.seq)?;
                continue;
            }
            let mut decided = self.workload.decide(&scored)?;
            feed_drift(
                self.drift.as_ref(),
                &scored,
                &decided,
                &self.metrics,
                &self.counters,
            );
            if let Some(rx) = &mut alerts_rx {
                while let Ok(more) = rx.try_recv() {
                    alerts.extend(more);
                }
            }
            let mut records = std::mem::take(&mut decided.records);
            let alert_count = alerts.len();
            records.extend(alerts.iter().cloned());
            let started = Instant::now();
            let result = self
                .transact(
                    &mut producer,
                    records,
                    batch.next_offsets.clone(),
                    batch.group.clone(),
                )
                .await?;
            match result {
                Ok(()) => {
                    alerts.drain(..alert_count);
                    if self.acks.send(batch.seq).is_err() {
                        return Err(PipelineError::Stopped(
                            "source stopped before its acks".into(),
                        ));
                    }
                    self.accounts
                        .delivered(&scored, &decided, started.elapsed());
                }
                Err(_) => {
                    // `transact` rewound the source; this batch is read again.
                    self.drop_batch(batch.seq)?;
                }
            }
        }
        // The input is closed: let the drift thread end, then commit its last alerts.
        drop(self.drift.take());
        if let Some(mut rx) = alerts_rx {
            while let Some(more) = rx.recv().await {
                alerts.extend(more);
            }
        }
        if !alerts.is_empty() {
            let _ = self
                .transact(&mut producer, alerts, Vec::new(), None)
                .await?;
        }
        Ok(self.accounts.finish())
    }

    /// A batch that will not be committed: acknowledged (so the source stops counting it in
    /// flight) without its offsets.
    fn drop_batch(&self, seq: u64) -> Result<(), PipelineError> {
        self.metrics.in_flight.dec();
        self.acks
            .send(seq)
            .map_err(|_| PipelineError::Stopped("source stopped before its acks".into()))
    }

    /// Runs one transaction off the async workers. On an abort or a failure it rewinds the
    /// source (when offsets were involved) and, after a failure, recreates the producer;
    /// the inner result says whether the transaction committed.
    async fn transact(
        &mut self,
        producer: &mut Option<TransactionalSink>,
        records: Vec<OutRecord>,
        offsets: Vec<NextOffset>,
        group: Option<GroupMetadata>,
    ) -> Result<Result<(), TransactionError>, PipelineError> {
        let carries_offsets = !offsets.is_empty();
        let p = producer
            .take()
            .ok_or_else(|| PipelineError::Stopped("transactional producer lost".into()))?;
        let (p, result) = tokio::task::spawn_blocking(move || {
            let result = p.commit(&records, &offsets, group.as_ref().map(|g| g.0.as_ref()));
            (p, result)
        })
        .await
        .map_err(|e| PipelineError::Stopped(format!("transaction task: {e}")))?;
        *producer = Some(p);
        match &result {
            Ok(()) => {
                self.metrics.transactions[COMMITTED].inc();
                self.aborts_in_a_row = 0;
            }
            Err(TransactionError::Aborted(reason)) => {
                self.metrics.transactions[ABORTED].inc();
                self.metrics.error(ErrorStage::Produce);
                self.aborts_in_a_row += 1;
                tracing::warn!(workload = %self.workload.name, error = %reason, aborts_in_a_row = self.aborts_in_a_row, "transaction aborted; rewinding to the committed offsets");
                if self.aborts_in_a_row >= ABORTS_BEFORE_RECREATE {
                    self.recreate(producer).await?;
                    self.aborts_in_a_row = 0;
                }
                if carries_offsets {
                    self.rewind.request();
                }
            }
            Err(TransactionError::Fatal(reason)) => {
                self.metrics.transactions[FAILED].inc();
                self.metrics.error(ErrorStage::Produce);
                tracing::error!(workload = %self.workload.name, error = %reason, "transactional producer failed; recreating it and rewinding");
                self.recreate(producer).await?;
                self.aborts_in_a_row = 0;
                // Whatever the old producer had open is aborted by the new one's
                // `init_transactions`; batches consumed since the last commit are void.
                if carries_offsets {
                    self.rewind.request();
                }
            }
        }
        Ok(result)
    }

    /// Recreates the producer, retrying with backoff (the broker may be down); gives up only
    /// during shutdown, after [`SHUTDOWN_RETRY_LIMIT`].
    async fn recreate(
        &self,
        producer: &mut Option<TransactionalSink>,
    ) -> Result<(), PipelineError> {
        let mut backoff = Duration::from_millis(100);
        let mut shutdown_seen: Option<Instant> = None;
        loop {
            let mut p = producer
                .take()
                .ok_or_else(|| PipelineError::Stopped("transactional producer lost".into()))?;
            let (p, result) = tokio::task::spawn_blocking(move || {
                let result = p.recreate();
                (p, result)
            })
            .await
            .map_err(|e| PipelineError::Stopped(format!("transaction task: {e}")))?;
            *producer = Some(p);
            match result {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::warn!(workload = %self.workload.name, error = %e, "recreating the transactional producer failed; retrying");
                    if self.shutdown.load(std::sync::atomic::Ordering::Relaxed) {
                        let since = *shutdown_seen.get_or_insert_with(Instant::now);
                        if since.elapsed() > SHUTDOWN_RETRY_LIMIT {
                            return Err(PipelineError::Sink(format!(
                                "no transactional producer during shutdown: {e}"
                            )));
                        }
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }
}

/// The next alert batch, or never when there is no (more) alert channel.
async fn recv_alerts(rx: &mut Option<mpsc::Receiver<Vec<OutRecord>>>) -> Option<Vec<OutRecord>> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

//! The micro-batcher: a batch closes when it holds `max-rows` messages or `linger` after its
//! first message arrived, whichever comes first. Adaptive batching (`mode = "adaptive"`)
//! moves the linger with the load and closes early when the stages are idle; the source
//! thread applies that rule, this type keeps the arithmetic. Pure logic over a clock passed in, so it is
//! tested without sleeping.

use std::time::{Duration, Instant};

/// Accumulates items into batches.
#[derive(Debug)]
pub struct MicroBatcher<T> {
    max_rows: usize,
    linger: Duration,
    items: Vec<T>,
    opened_at: Option<Instant>,
}

impl<T> MicroBatcher<T> {
    pub fn new(max_rows: usize, linger: Duration) -> Self {
        Self {
            max_rows: max_rows.max(1),
            linger,
            items: Vec::with_capacity(max_rows.max(1)),
            opened_at: None,
        }
    }

    /// Adds an item received at `now`; returns the batch if this item filled it.
    pub fn push(&mut self, item: T, now: Instant) -> Option<Vec<T>> {
        self.opened_at.get_or_insert(now);
        self.items.push(item);
        (self.items.len() >= self.max_rows).then(|| self.take())
    }

    /// Returns the batch if its linger has expired at `now`.
    pub fn poll_expired(&mut self, now: Instant) -> Option<Vec<T>> {
        match self.deadline() {
            Some(deadline) if now >= deadline => Some(self.take()),
            _ => None,
        }
    }

    /// When the open batch must close; `None` while empty.
    pub fn deadline(&self) -> Option<Instant> {
        self.opened_at.map(|t| t + self.linger)
    }

    /// How long a poll may block without missing the deadline (at most `cap`).
    pub fn wait_budget(&self, now: Instant, cap: Duration) -> Duration {
        self.deadline()
            .map(|d| d.saturating_duration_since(now).min(cap))
            .unwrap_or(cap)
    }

    /// Changes how long a batch may stay open (adaptive batching re-decides it as the load
    /// and the stages' costs change); applies to the open batch too.
    pub fn set_linger(&mut self, linger: Duration) {
        self.linger = linger;
    }

    /// Closes the open batch now (shutdown, rebalance), if it has anything.
    pub fn flush(&mut self) -> Option<Vec<T>> {
        (!self.items.is_empty()).then(|| self.take())
    }

    /// Keeps only the items `keep` accepts (a revocation takes some partitions' messages
    /// away); returns how many went. The deadline stays the first arrival's, even if that
    /// item went: closing a little early is harmless, closing late is not.
    pub fn retain(&mut self, keep: impl FnMut(&T) -> bool) -> usize {
        let before = self.items.len();
        self.items.retain(keep);
        if self.items.is_empty() {
            self.opened_at = None;
        }
        before - self.items.len()
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    fn take(&mut self) -> Vec<T> {
        self.opened_at = None;
        std::mem::replace(&mut self.items, Vec::with_capacity(self.max_rows))
    }
}

/// Adaptive batching: the longest a batch may wait for more messages while the stages are
/// busy. With a latency budget, half of what the budget leaves after the stages' predicted
/// cost for a batch (the other half absorbs queueing behind the batches in flight); without
/// one, `linger`.
pub fn adaptive_wait(
    budget: Option<Duration>,
    predicted_cost: Duration,
    linger: Duration,
) -> Duration {
    match budget {
        Some(budget) => budget.saturating_sub(predicted_cost) / 2,
        None => linger,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINGER: Duration = Duration::from_millis(5);

    #[test]
    fn closes_at_max_rows() {
        let t0 = Instant::now();
        let mut b = MicroBatcher::new(3, LINGER);
        assert!(b.push(1, t0).is_none());
        assert!(b.push(2, t0).is_none());
        assert_eq!(b.push(3, t0), Some(vec![1, 2, 3]));
        assert!(b.is_empty());
        assert_eq!(b.deadline(), None);
    }

    #[test]
    fn closes_at_linger_measured_from_the_first_message() {
        let t0 = Instant::now();
        let mut b = MicroBatcher::new(100, LINGER);
        b.push(1, t0);
        b.push(2, t0 + Duration::from_millis(4));
        assert!(b.poll_expired(t0 + Duration::from_millis(4)).is_none());
        assert_eq!(b.poll_expired(t0 + LINGER), Some(vec![1, 2]));
        // The next batch's linger starts at its own first message.
        b.push(3, t0 + Duration::from_millis(20));
        assert!(b.poll_expired(t0 + Duration::from_millis(24)).is_none());
        assert_eq!(
            b.poll_expired(t0 + Duration::from_millis(25)),
            Some(vec![3])
        );
    }

    #[test]
    fn an_empty_batcher_never_expires_and_waits_the_cap() {
        let t0 = Instant::now();
        let mut b: MicroBatcher<u8> = MicroBatcher::new(10, LINGER);
        assert!(b.poll_expired(t0 + Duration::from_secs(60)).is_none());
        assert_eq!(
            b.wait_budget(t0, Duration::from_millis(100)),
            Duration::from_millis(100)
        );
        b.push(1, t0);
        assert_eq!(
            b.wait_budget(t0 + Duration::from_millis(2), Duration::from_millis(100)),
            Duration::from_millis(3)
        );
        assert_eq!(
            b.wait_budget(t0 + Duration::from_millis(9), Duration::from_millis(100)),
            Duration::ZERO
        );
    }

    #[test]
    fn adaptive_waits_shrink_as_the_stages_get_slower() {
        let ms = Duration::from_millis;
        let budget = Some(ms(50));
        assert_eq!(adaptive_wait(budget, ms(10), ms(2)), ms(20));
        assert_eq!(adaptive_wait(budget, ms(40), ms(2)), ms(5));
        // Stages slower than the budget: no waiting at all (the deadline's fallbacks answer).
        assert_eq!(adaptive_wait(budget, ms(80), ms(2)), Duration::ZERO);
        // No budget: the configured linger.
        assert_eq!(adaptive_wait(None, ms(80), ms(2)), ms(2));
    }

    #[test]
    fn a_shorter_linger_applies_to_the_open_batch() {
        let t0 = Instant::now();
        let mut b = MicroBatcher::new(100, Duration::from_millis(20));
        b.push(1, t0);
        assert!(b.poll_expired(t0 + Duration::from_millis(5)).is_none());
        b.set_linger(Duration::from_millis(5));
        assert_eq!(b.poll_expired(t0 + Duration::from_millis(5)), Some(vec![1]));
    }

    #[test]
    fn retain_drops_items_and_an_emptied_batch_has_no_deadline() {
        let t0 = Instant::now();
        let mut b = MicroBatcher::new(10, LINGER);
        b.push(1, t0);
        b.push(2, t0 + Duration::from_millis(1));
        b.push(3, t0 + Duration::from_millis(2));
        assert_eq!(b.retain(|i| *i != 2), 1);
        assert_eq!(b.deadline(), Some(t0 + LINGER));
        assert_eq!(b.flush(), Some(vec![1, 3]));
        b.push(4, t0);
        assert_eq!(b.retain(|_| false), 1);
        assert_eq!(b.deadline(), None);
        assert_eq!(b.flush(), None);
    }

    #[test]
    fn flush_returns_a_partial_batch_once() {
        let mut b = MicroBatcher::new(10, LINGER);
        b.push("a", Instant::now());
        assert_eq!(b.flush(), Some(vec!["a"]));
        assert_eq!(b.flush(), None);
    }

    proptest::proptest! {
        /// Whatever the arrival times, every item comes out exactly once, in order, no batch
        /// exceeds max-rows, and no batch outlives its linger when polled.
        #[test]
        fn batches_preserve_items_and_respect_bounds(
            max_rows in 1usize..20,
            gaps_us in proptest::collection::vec(0u64..3000, 0..200),
        ) {
            let t0 = Instant::now();
            let mut b = MicroBatcher::new(max_rows, Duration::from_millis(2));
            let mut out: Vec<Vec<usize>> = Vec::new();
            let mut now = t0;
            for (i, gap) in gaps_us.iter().enumerate() {
                now += Duration::from_micros(*gap);
                if let Some(batch) = b.poll_expired(now) { out.push(batch); }
                if let Some(first) = b.deadline() {
                    proptest::prop_assert!(now < first);
                }
                if let Some(batch) = b.push(i, now) { out.push(batch); }
            }
            if let Some(batch) = b.flush() { out.push(batch); }
            let flat: Vec<usize> = out.iter().flatten().copied().collect();
            proptest::prop_assert_eq!(flat, (0..gaps_us.len()).collect::<Vec<_>>());
            proptest::prop_assert!(out.iter().all(|batch| !batch.is_empty() && batch.len() <= max_rows));
        }
    }
}

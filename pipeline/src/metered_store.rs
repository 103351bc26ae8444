//! A [`FeatureStore`] decorator that times each round trip into a workload's
//! `verdict_feature_store_round_trip_seconds` histogram. The stores stay free of metrics; the
//! one Redis connection is shared, the timing is per workload.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use prometheus::Histogram;
use verdict_features::velocity::VelocityUpdate;
use verdict_features::{FeatureStore, HashRead, StoreAnswer};

pub struct MeteredStore {
    inner: Arc<dyn FeatureStore>,
    round_trip: Histogram,
}

impl MeteredStore {
    pub fn new(inner: Arc<dyn FeatureStore>, round_trip: Histogram) -> Self {
        Self { inner, round_trip }
    }
}

#[async_trait]
impl FeatureStore for MeteredStore {
    async fn fetch(
        &self,
        reads: &[HashRead<'_>],
        updates: &[VelocityUpdate<'_>],
    ) -> verdict_features::Result<StoreAnswer> {
        let started = Instant::now();
        let answer = self.inner.fetch(reads, updates).await;
        // Failed round trips count too: a timeout shows up as a slow tail, which is the point.
        self.round_trip.observe(started.elapsed().as_secs_f64());
        answer
    }

    async fn ping(&self) -> verdict_features::Result<()> {
        self.inner.ping().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::HistogramOpts;
    use verdict_features::InMemoryFeatureStore;

    #[tokio::test]
    async fn times_every_round_trip_and_passes_answers_through() {
        let inner = InMemoryFeatureStore::new();
        inner.insert("card:1", &[("avg", "5")]);
        let histogram = Histogram::with_opts(HistogramOpts::new("t", "t")).unwrap();
        let store = MeteredStore::new(Arc::new(inner.clone()), histogram.clone());
        let fields = vec!["avg".to_string()];
        let answer = store
            .fetch(
                &[HashRead {
                    key: "card:1",
                    fields: &fields,
                }],
                &[],
            )
            .await
            .unwrap();
        assert_eq!(answer.hashes.len(), 1);
        assert_eq!(answer.hashes.get(0, 0), Some(&b"5"[..]));
        assert_eq!(histogram.get_sample_count(), 1);
        assert_eq!(inner.round_trips(), 1);
    }
}

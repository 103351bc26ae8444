//! The feature store abstraction: a whole batch's hash reads and velocity updates in one
//! round trip.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use async_trait::async_trait;

use crate::velocity::{InMemoryVelocity, VelocityCounts, VelocityUpdate};
use crate::Result;

/// One hash to read: the Redis key and the fields wanted, in order.
#[derive(Debug, Clone, Copy)]
pub struct HashRead<'a> {
    pub key: &'a str,
    pub fields: &'a [String],
}

/// What one round trip answered.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct StoreAnswer {
    /// Aligned with the reads: one inner vector per read, one entry per field, `None` where
    /// the field (or the whole hash) does not exist.
    pub hashes: Vec<Vec<Option<String>>>,
    /// Aligned with the updates, then with each update's events.
    pub velocity: Vec<Vec<VelocityCounts>>,
}

/// Where entity features live. Implementations must answer a whole batch in one round trip
/// (a pipeline), because a round trip costs more than reading tens of fields.
#[async_trait]
pub trait FeatureStore: Send + Sync {
    /// Reads every requested field of every hash, and records every velocity event and
    /// returns its windows (see [`crate::velocity`] for the semantics).
    async fn fetch(
        &self,
        reads: &[HashRead<'_>],
        updates: &[VelocityUpdate],
    ) -> Result<StoreAnswer>;

    /// A cheap reachability check for health endpoints; bounded by the store's own timeout.
    async fn ping(&self) -> Result<()> {
        Ok(())
    }
}

/// Test double: hashes in a map. Counts round trips so tests can check batching.
#[derive(Debug, Default, Clone)]
pub struct InMemoryFeatureStore {
    hashes: Arc<RwLock<HashMap<String, HashMap<String, String>>>>,
    velocity: Arc<std::sync::Mutex<InMemoryVelocity>>,
    round_trips: Arc<std::sync::atomic::AtomicUsize>,
}

impl InMemoryFeatureStore {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&self, key: &str, fields: &[(&str, &str)]) {
        let mut hashes = self.hashes.write().unwrap_or_else(|e| e.into_inner());
        let hash = hashes.entry(key.to_string()).or_default();
        for (f, v) in fields {
            hash.insert(f.to_string(), v.to_string());
        }
    }

    pub fn round_trips(&self) -> usize {
        self.round_trips.load(std::sync::atomic::Ordering::Relaxed)
    }
}

#[async_trait]
impl FeatureStore for InMemoryFeatureStore {
    async fn fetch(
        &self,
        reads: &[HashRead<'_>],
        updates: &[VelocityUpdate],
    ) -> Result<StoreAnswer> {
        self.round_trips
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut velocity = self.velocity.lock().unwrap_or_else(|e| e.into_inner());
        let velocity = updates.iter().map(|u| velocity.apply(u)).collect();
        let hashes = self.hashes.read().unwrap_or_else(|e| e.into_inner());
        let hashes = reads
            .iter()
            .map(|r| {
                let hash = hashes.get(r.key);
                r.fields
                    .iter()
                    .map(|f| hash.and_then(|h| h.get(f).cloned()))
                    .collect()
            })
            .collect();
        Ok(StoreAnswer { hashes, velocity })
    }
}

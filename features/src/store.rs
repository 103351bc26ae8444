//! The feature store abstraction: read many hashes in one round trip.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use async_trait::async_trait;

use crate::Result;

/// One hash to read: the Redis key and the fields wanted, in order.
#[derive(Debug, Clone, Copy)]
pub struct HashRead<'a> {
    pub key: &'a str,
    pub fields: &'a [String],
}

/// Where entity features live. Implementations must answer a whole slice of reads in one round
/// trip (a pipeline), because a round trip costs more than reading tens of fields.
#[async_trait]
pub trait FeatureStore: Send + Sync {
    /// Reads every requested field of every hash. The result is aligned with `reads`: one
    /// inner vector per read, one entry per field, `None` where the field (or the whole hash)
    /// does not exist.
    async fn read_hashes(&self, reads: &[HashRead<'_>]) -> Result<Vec<Vec<Option<String>>>>;
}

/// Test double: hashes in a map. Counts round trips so tests can check batching.
#[derive(Debug, Default, Clone)]
pub struct InMemoryFeatureStore {
    hashes: Arc<RwLock<HashMap<String, HashMap<String, String>>>>,
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
    async fn read_hashes(&self, reads: &[HashRead<'_>]) -> Result<Vec<Vec<Option<String>>>> {
        self.round_trips
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let hashes = self.hashes.read().unwrap_or_else(|e| e.into_inner());
        Ok(reads
            .iter()
            .map(|r| {
                let hash = hashes.get(r.key);
                r.fields
                    .iter()
                    .map(|f| hash.and_then(|h| h.get(f).cloned()))
                    .collect()
            })
            .collect())
    }
}

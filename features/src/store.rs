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
    /// Aligned with the reads: per read, one value per field, `None` where the field (or the
    /// whole hash) does not exist.
    pub hashes: HashValues,
    /// Aligned with the updates, then with each update's events.
    pub velocity: Vec<Vec<VelocityCounts>>,
}

/// The field values of a round trip's hash reads, all in one buffer: a batch reads hundreds of
/// values, and a `String` (or a reply object) per value is what the hot path spent its
/// allocations on.
#[derive(Debug, Clone, PartialEq)]
pub struct HashValues {
    bytes: Vec<u8>,
    /// Per value, reads one after the other: its `start..end` in `bytes`, `None` if missing.
    spans: Vec<Option<(u32, u32)>>,
    /// Where each read's values start in `spans`, plus one closing entry.
    read_starts: Vec<u32>,
}

impl Default for HashValues {
    fn default() -> Self {
        Self::with_capacity(0, 0, 0)
    }
}

impl HashValues {
    pub fn with_capacity(reads: usize, values: usize, bytes: usize) -> Self {
        let mut read_starts = Vec::with_capacity(reads + 1);
        read_starts.push(0);
        Self {
            bytes: Vec::with_capacity(bytes),
            spans: Vec::with_capacity(values),
            read_starts,
        }
    }

    /// Appends one value to the read being built.
    pub fn push_value(&mut self, value: Option<&[u8]>) {
        let span = value.map(|v| {
            let start = self.bytes.len();
            self.bytes.extend_from_slice(v);
            // A batch's values are kilobytes; u32 offsets halve the index.
            (start as u32, self.bytes.len() as u32)
        });
        self.spans.push(span);
    }

    /// Closes the read being built: the values pushed since the last call are its fields.
    pub fn finish_read(&mut self) {
        self.read_starts.push(self.spans.len() as u32);
    }

    /// Appends a whole read.
    pub fn push_read<'v>(&mut self, values: impl IntoIterator<Item = Option<&'v [u8]>>) {
        for value in values {
            self.push_value(value);
        }
        self.finish_read();
    }

    /// Number of reads answered.
    pub fn len(&self) -> usize {
        self.read_starts.len() - 1
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values of read `read`, in field order (empty past the last read).
    pub fn read(&self, read: usize) -> impl Iterator<Item = Option<&[u8]>> + '_ {
        let (start, end) = match (self.read_starts.get(read), self.read_starts.get(read + 1)) {
            (Some(&start), Some(&end)) => (start as usize, end as usize),
            _ => (0, 0),
        };
        self.spans[start..end]
            .iter()
            .map(|span| span.map(|(s, e)| &self.bytes[s as usize..e as usize]))
    }

    /// Field `field` of read `read`; `None` if missing or out of range.
    pub fn get(&self, read: usize, field: usize) -> Option<&[u8]> {
        let start = *self.read_starts.get(read)? as usize;
        let end = *self.read_starts.get(read + 1)? as usize;
        let (s, e) = (*self.spans[start..end].get(field)?)?;
        Some(&self.bytes[s as usize..e as usize])
    }
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
        updates: &[VelocityUpdate<'_>],
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
        updates: &[VelocityUpdate<'_>],
    ) -> Result<StoreAnswer> {
        self.round_trips
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut velocity = self.velocity.lock().unwrap_or_else(|e| e.into_inner());
        let velocity = updates.iter().map(|u| velocity.apply(u)).collect();
        let stored = self.hashes.read().unwrap_or_else(|e| e.into_inner());
        let mut hashes = HashValues::default();
        for read in reads {
            let hash = stored.get(read.key);
            hashes.push_read(
                read.fields
                    .iter()
                    .map(|f| hash.and_then(|h| h.get(f)).map(String::as_bytes)),
            );
        }
        Ok(StoreAnswer { hashes, velocity })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_values_keep_reads_fields_and_misses_apart() {
        let mut values = HashValues::default();
        values.push_read([Some(&b"10.5"[..]), None, Some(&b""[..])]);
        values.push_read([]);
        values.push_read([None, Some(&b"DE"[..])]);

        assert_eq!(values.len(), 3);
        assert_eq!(values.get(0, 0), Some(&b"10.5"[..]));
        assert_eq!(values.get(0, 1), None);
        assert_eq!(values.get(0, 2), Some(&b""[..]), "empty is not missing");
        assert_eq!(values.get(0, 3), None, "past the read's fields");
        assert_eq!(values.read(1).count(), 0);
        assert_eq!(
            values.read(2).collect::<Vec<_>>(),
            vec![None, Some(&b"DE"[..])]
        );
        assert_eq!(values.get(3, 0), None, "past the last read");
        assert_eq!(values.read(3).count(), 0);
    }
}

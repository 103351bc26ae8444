//! The sink abstraction.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;

use crate::Result;

/// Resolves once every record handed over by one [`Sink::send`] is acknowledged (or one failed).
pub type Delivery = Pin<Box<dyn Future<Output = Result<()>> + Send>>;

/// One message to produce.
///
/// Key and payload are `Bytes`: an encoder writes a whole batch's records into one buffer and
/// hands out slices of it (a reference count each, not two allocations per record), and a
/// dead letter shares the consumed message's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutRecord {
    pub topic: Arc<str>,
    pub key: Option<Bytes>,
    pub payload: Bytes,
    pub headers: Vec<(String, Vec<u8>)>,
}

/// Where a batch's outputs go.
///
/// `send` hands the records over and returns as soon as they are queued (waiting only while
/// the local queue is full), with a [`Delivery`] that resolves when the destination has
/// acknowledged all of them. Splitting the two lets the caller keep several batches in flight
/// — a broker acknowledgement takes milliseconds — while still committing input offsets in
/// order, each only after its batch's delivery resolved.
#[async_trait]
pub trait Sink: Send + Sync {
    async fn send(&self, records: &[OutRecord]) -> Result<Delivery>;
}

/// Test double: keeps what it was sent.
#[derive(Debug, Default, Clone)]
pub struct MemorySink {
    records: Arc<Mutex<Vec<OutRecord>>>,
}

impl MemorySink {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn records(&self) -> Vec<OutRecord> {
        self.records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

#[async_trait]
impl Sink for MemorySink {
    async fn send(&self, records: &[OutRecord]) -> Result<Delivery> {
        self.records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(records);
        Ok(Box::pin(std::future::ready(Ok(()))))
    }
}

//! The sink abstraction.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use crate::Result;

/// One message to produce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutRecord {
    pub topic: Arc<str>,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
}

/// Where a batch's outputs go. `send_all` resolves only once every record is acknowledged by
/// the destination (or one failed): the caller commits input offsets after that, never before.
#[async_trait]
pub trait Sink: Send + Sync {
    async fn send_all(&self, records: &[OutRecord]) -> Result<()>;
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
    async fn send_all(&self, records: &[OutRecord]) -> Result<()> {
        self.records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(records);
        Ok(())
    }
}

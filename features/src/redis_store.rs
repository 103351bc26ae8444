//! Redis implementation of [`FeatureStore`]: entity features are hashes (`HSET card:42
//! avg_amount_30d 51.2 ...`), the layout feature-store users know, read with one pipeline of
//! `HMGET`s per batch.
//!
//! Timeouts are not optional: without them a request against a paused server hangs forever
//! (redis-rs #395). The connection manager reconnects by itself with backoff.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::Deserialize;

use crate::store::{FeatureStore, HashRead};
use crate::{FeatureError, Result};

/// `[redis]` section of the config.
#[derive(Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RedisConfig {
    /// Redis URL, e.g. `redis://127.0.0.1:6379/0`. May carry a password: never logged.
    pub url: String,
    /// Longest wait for one pipelined round trip (a whole batch's lookups).
    #[serde(with = "humantime_serde", default = "default_response_timeout")]
    pub response_timeout: Duration,
    /// Longest wait to (re)connect.
    #[serde(with = "humantime_serde", default = "default_connect_timeout")]
    pub connect_timeout: Duration,
}

fn default_response_timeout() -> Duration {
    Duration::from_millis(50)
}
fn default_connect_timeout() -> Duration {
    Duration::from_millis(500)
}

impl fmt::Debug for RedisConfig {
    // The URL may carry credentials.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &"<redacted>")
            .field("response_timeout", &self.response_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

/// Reads entity hashes from Redis.
#[derive(Clone)]
pub struct RedisFeatureStore {
    connection: ConnectionManager,
    response_timeout: Duration,
}

impl RedisFeatureStore {
    /// Connects lazily: the first batch opens the connection, so the pipeline can start while
    /// Redis is still coming up.
    pub fn connect(config: &RedisConfig) -> Result<Self> {
        let client = redis::Client::open(config.url.as_str())?;
        let manager_config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(config.response_timeout))
            .set_connection_timeout(Some(config.connect_timeout))
            .set_number_of_retries(3)
            .set_max_delay(Duration::from_secs(1));
        let connection = ConnectionManager::new_lazy_with_config(client, manager_config)?;
        Ok(Self {
            connection,
            response_timeout: config.response_timeout,
        })
    }
}

#[async_trait]
impl FeatureStore for RedisFeatureStore {
    async fn read_hashes(&self, reads: &[HashRead<'_>]) -> Result<Vec<Vec<Option<String>>>> {
        if reads.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for read in reads {
            pipe.cmd("HMGET").arg(read.key).arg(read.fields);
        }
        let mut connection = self.connection.clone();
        // The manager's own response timeout covers one request; this one bounds the whole
        // pipeline including a reconnect.
        let query = pipe.query_async::<Vec<Vec<Option<String>>>>(&mut connection);
        match tokio::time::timeout(self.response_timeout, query).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(FeatureError::StoreTimeout {
                timeout_ms: self.response_timeout.as_millis(),
            }),
        }
    }
}

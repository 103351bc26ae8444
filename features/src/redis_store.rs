//! Redis implementation of [`FeatureStore`]: entity features are hashes (`HSET card:42
//! avg_amount_30d 51.2 ...`), the layout feature-store users know, read with one pipeline of
//! `HMGET`s per batch; the same pipeline carries the batch's velocity updates (one `EVAL` per
//! velocity spec, see [`crate::velocity`]).
//!
//! Timeouts are not optional: without them a request against a paused server hangs forever
//! (redis-rs #395). The connection manager reconnects by itself with backoff.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::Deserialize;

use crate::store::{FeatureStore, HashRead, HashValues, StoreAnswer};
use crate::velocity::{decode_lua_reply, VelocityUpdate, VELOCITY_LUA};
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

/// Appends one `HMGET` reply to `into` as one read, copying each value's bytes into the batch's
/// buffer rather than converting it to a `String` of its own.
fn push_hmget_reply(reply: redis::Value, into: &mut HashValues) -> Result<()> {
    use redis::Value;
    if let Value::Array(items) = &reply {
        if items
            .iter()
            .all(|item| matches!(item, Value::BulkString(_) | Value::Nil))
        {
            into.push_read(items.iter().map(|item| match item {
                Value::BulkString(bytes) => Some(bytes.as_slice()),
                _ => None,
            }));
            return Ok(());
        }
    }
    // Anything else (an error reply such as WRONGTYPE, an unexpected type) goes through the
    // crate's conversion for its error.
    let values: Vec<Option<Vec<u8>>> =
        redis::from_redis_value(reply).map_err(redis::RedisError::from)?;
    into.push_read(values.iter().map(|v| v.as_deref()));
    Ok(())
}

#[async_trait]
impl FeatureStore for RedisFeatureStore {
    async fn fetch(
        &self,
        reads: &[HashRead<'_>],
        updates: &[VelocityUpdate],
    ) -> Result<StoreAnswer> {
        // An update without events (every key null) costs no command.
        let sent: Vec<&VelocityUpdate> = updates.iter().filter(|u| !u.events.is_empty()).collect();
        if reads.is_empty() && sent.is_empty() {
            return Ok(StoreAnswer {
                hashes: HashValues::default(),
                velocity: vec![Vec::new(); updates.len()],
            });
        }
        let mut pipe = redis::pipe();
        for read in reads {
            pipe.cmd("HMGET").arg(read.key).arg(read.fields);
        }
        for update in &sent {
            // EVAL with the script text, not EVALSHA: no NOSCRIPT after a Redis restart, and
            // Redis caches the compiled script by its hash anyway.
            let cmd = pipe.cmd("EVAL").arg(VELOCITY_LUA).arg(update.events.len());
            for e in &update.events {
                cmd.arg(&e.key);
            }
            cmd.arg(update.windows_ms.len())
                .arg(&update.windows_ms)
                .arg(update.horizon_ms);
            for e in &update.events {
                cmd.arg(e.event_time_ms).arg(e.amount_cents).arg(&e.id);
            }
        }
        let mut connection = self.connection.clone();
        // The manager's own response timeout covers one request; this one bounds the whole
        // pipeline including a reconnect.
        let query = pipe.query_async::<Vec<redis::Value>>(&mut connection);
        let replies = match tokio::time::timeout(self.response_timeout, query).await {
            Ok(result) => result?,
            Err(_) => {
                return Err(FeatureError::StoreTimeout {
                    timeout_ms: self.response_timeout.as_millis(),
                })
            }
        };
        if replies.len() != reads.len() + sent.len() {
            return Err(FeatureError::Output(format!(
                "Redis answered {} of {} pipelined commands",
                replies.len(),
                reads.len() + sent.len()
            )));
        }
        let mut replies = replies.into_iter();
        let values = reads.iter().map(|r| r.fields.len()).sum();
        let mut answer = StoreAnswer {
            hashes: HashValues::with_capacity(reads.len(), values, values * 8),
            velocity: Vec::with_capacity(updates.len()),
        };
        for reply in replies.by_ref().take(reads.len()) {
            push_hmget_reply(reply, &mut answer.hashes)?;
        }
        for update in updates {
            let values: Vec<u8> = if update.events.is_empty() {
                Vec::new()
            } else {
                match replies.next() {
                    Some(reply) => {
                        redis::from_redis_value(reply).map_err(redis::RedisError::from)?
                    }
                    None => Vec::new(),
                }
            };
            answer.velocity.push(decode_lua_reply(
                &values,
                update.events.len(),
                update.windows_ms.len(),
            )?);
        }
        Ok(answer)
    }

    async fn ping(&self) -> Result<()> {
        let mut connection = self.connection.clone();
        let command = redis::cmd("PING");
        let ping = command.query_async::<String>(&mut connection);
        match tokio::time::timeout(self.response_timeout, ping).await {
            Ok(result) => result.map(|_| ()).map_err(FeatureError::from),
            Err(_) => Err(FeatureError::StoreTimeout {
                timeout_ms: self.response_timeout.as_millis(),
            }),
        }
    }
}

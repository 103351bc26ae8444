//! Features: everything between a decoded input batch and the model's input tensor.
//!
//! - [`store`]: the [`FeatureStore`] trait (one round trip for a whole batch) and an in-memory
//!   test double;
//! - [`redis_store`]: the Redis implementation (pipelined `HMGET`, timeouts, reconnects);
//! - [`resp`]: the Redis protocol as verdict speaks it, parsed in place;
//! - [`lookup`]: entity lookups → Arrow tables aligned to the input rows;
//! - [`velocity`]: in-stream sliding-window counts and sums per entity, kept in Redis;
//! - [`join`]: the workload's DataFusion SQL, planned once and re-executed per batch;
//! - [`row_aligned`]: its joins on `row_id` as side-by-side columns instead of hash joins;
//! - [`projection`]: its projections without DataFusion's per-execution metrics;
//! - [`tensor`]: the SQL output → a dense `f32` matrix in the model's feature order, with
//!   documented imputation of missing values.

pub mod join;
pub mod lookup;
pub mod projection;
pub mod redis_store;
pub mod resp;
pub mod row_aligned;
pub mod store;
pub mod tensor;
pub mod velocity;

pub use join::SqlJoin;
pub use lookup::{EntityLookup, FeatureField, FeatureType, LookupStats, Lookups};
pub use redis_store::{RedisConfig, RedisFeatureStore};
pub use store::{FeatureStore, HashRead, HashValues, InMemoryFeatureStore, StoreAnswer};
pub use tensor::{FeatureColumn, FeatureMatrix, Unscorable};
pub use velocity::{InMemoryVelocity, VelocitySpec};

/// Errors of the feature stage. The topology decides what to do with each (retry, degrade,
/// dead-letter); nothing here panics on I/O.
#[derive(Debug, thiserror::Error)]
pub enum FeatureError {
    /// The Redis URL could not be understood.
    #[error("feature store: {0}")]
    Store(#[from] redis::RedisError),
    /// Redis answered with an error, or with something that is not the protocol.
    #[error("feature store: {0}")]
    Reply(#[from] resp::ReplyError),
    #[error("feature store connection: {0}")]
    Connection(#[from] std::io::Error),
    #[error("feature store did not answer within {timeout_ms} ms")]
    StoreTimeout { timeout_ms: u128 },
    #[error("lookup `{lookup}`: key column `{column}`: {reason}")]
    KeyColumn {
        lookup: String,
        column: String,
        reason: String,
    },
    #[error("SQL: {0}")]
    Sql(#[from] datafusion::error::DataFusionError),
    #[error("Arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    #[error("velocity `{name}`: {reason}")]
    Velocity { name: String, reason: String },
    #[error("SQL output: {0}")]
    Output(String),
}

pub type Result<T, E = FeatureError> = std::result::Result<T, E>;

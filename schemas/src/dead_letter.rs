//! Dead letters: a message verdict could not decide is produced, with its original key, value
//! and headers, to the workload's dead-letter topic, with these headers added.

/// Topic the message was consumed from.
pub const SOURCE_TOPIC: &str = "verdict.source.topic";
/// Partition it was consumed from (decimal).
pub const SOURCE_PARTITION: &str = "verdict.source.partition";
/// Its offset in that partition (decimal).
pub const SOURCE_OFFSET: &str = "verdict.source.offset";
/// Pipeline stage that rejected it: `decode`, `features`, `score`.
pub const STAGE: &str = "verdict.stage";
/// Machine-readable cause, e.g. `invalid-json`, `schema-mismatch`, `not-utf8`, `missing-feature`.
pub const CAUSE: &str = "verdict.cause";
/// Human-readable detail of the cause (never the payload itself).
pub const DETAIL: &str = "verdict.detail";
/// Workload that rejected it.
pub const WORKLOAD: &str = "verdict.workload";

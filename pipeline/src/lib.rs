//! verdict: the pipeline process.
//!
//! This crate owns the configuration, the CLI, the Kafka source and micro-batcher, the
//! topology (the only place that spawns threads and tasks), offsets and commits, and the
//! demo and bench commands. The stages' logic lives in the library crates:
//! `verdict-features` (Redis + DataFusion), `verdict-scorers` (ONNX Runtime, policies),
//! `verdict-sinks` (Kafka producer, encoders), `verdict-schemas` (wire contracts).
//!
//! Layout:
//! - [`config`]: the TOML tree;
//! - [`source`]: consumer task, micro-batcher, JSON → Arrow;
//! - [`workload`]: one workload's per-batch work (enrich, score, decide);
//! - [`dead_letter`]: dead-letter records;
//! - [`deadline`]: latency budgets, stage cost estimates, fallback decisions;
//! - [`topology`]: wiring, backpressure, acks, shutdown;
//! - [`metrics`], [`health`], [`http`]: Prometheus metrics, readiness, and the endpoint
//!   serving them;
//! - [`generator`]: synthetic cards, merchants and transactions (demo, bench, tests);
//! - [`local_stack`]: starts a Kafka-protocol broker (Tansu) and `redis-server` on free ports;
//! - [`driver`]: produces transactions and measures decisions (demo, bench);
//! - [`demo`], [`bench`]: the commands; [`baseline`] (drain against the Python stack),
//!   [`open_loop`] (fixed offered rates and the maximum sustainable rate, each system a
//!   [`measured_process`]) and [`scale_out`] are the bench's modes.

pub mod baseline;
pub mod bench;
pub mod box_cpu;
pub mod children;
pub mod config;
pub mod dead_letter;
pub mod deadline;
pub mod demo;
pub mod driver;
mod exactly_once;
pub mod feature_load;
pub mod gen;
pub mod generator;
pub mod health;
pub mod http;
pub mod local_stack;
pub mod measured_process;
pub mod metered_store;
pub mod metrics;
pub mod open_loop;
pub mod scale_out;
pub mod scrape;
pub mod source;
pub mod thread_cpu;
pub mod topology;
pub mod workload;

pub use config::Config;
pub use topology::Pipeline;

/// Errors of the pipeline. `main` reports them; stages never panic on I/O.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("config: {0}")]
    Config(String),
    #[error("Kafka: {0}")]
    Kafka(String),
    #[error("decode: {0}")]
    Decode(String),
    #[error("sink: {0}")]
    Sink(String),
    #[error("stopped: {0}")]
    Stopped(String),
    #[error("local stack: {0}")]
    LocalStack(String),
    #[error(transparent)]
    Features(#[from] verdict_features::FeatureError),
    #[error(transparent)]
    Scorers(#[from] verdict_scorers::ScorerError),
}

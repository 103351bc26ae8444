//! The hot path allocates per batch, not per row.
//!
//! A counting allocator (this test binary's global allocator) counts the heap allocations each
//! stage makes on this thread while it processes a batch of the fraud workload: decode (JSON →
//! Arrow), the feature lookup against a real `redis-server` (commands written, replies
//! decoded; the connection's task runs on this thread's runtime), the SQL join, scoring
//! (tensor building and the ONNX Runtime call), and the decision step (policy, decisions
//! batch, one keyed JSON record per row), also with `include-features` on. Each stage runs
//! on a small and on a large batch of the same transactions; what the large one allocates
//! more, divided by the extra rows, is the stage's allocations per row. Buffers that grow by doubling add a few allocations per
//! doubling, far below one per row; something that allocates for every row shows as ≥ 1.
//!
//! Counted: Rust's allocations (`Vec`, `String`, Arrow buffers, `Box`). Not counted:
//! allocations inside C libraries (librdkafka, ONNX Runtime), which use `malloc` directly.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::time::Duration;

use verdict::config::{example_config_dir, Config, EXAMPLE_CONFIG};
use verdict::generator::World;
use verdict::local_stack::LocalStack;
use verdict::source::{InputBatch, RawMessage};
use verdict::workload::Workload;
use verdict_features::{FeatureStore, RedisFeatureStore};
use verdict_scorers::{runtime, LoadedModel, OnnxScorer};

struct CountingAllocator;

thread_local! {
    /// Allocations (and reallocations) made by this thread since it started.
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn count_one() {
    // `try_with`: the allocator also runs while thread-locals are being torn down.
    let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
}

// SAFETY: every call is forwarded unchanged to the system allocator; counting touches only a
// const-initialised thread-local `Cell`, which never allocates.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_one();
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count_one();
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count_one();
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// Allocations this thread makes while `f` runs, and its result.
fn counted<T>(f: impl FnOnce() -> T) -> (u64, T) {
    let before = ALLOCATIONS.with(Cell::get);
    let out = f();
    (ALLOCATIONS.with(Cell::get) - before, out)
}

const SMALL: usize = 64;
const LARGE: usize = 512;

/// Allocations of each stage for one batch.
#[derive(Debug, Default, Clone, Copy)]
struct StageAllocations {
    decode: u64,
    lookup: u64,
    join: u64,
    score: u64,
    decide: u64,
    /// The decision step of the same workload with `include-features = true`.
    decide_with_features: u64,
    /// Decisions that are a review or a decline: they carry reason codes.
    with_reasons: usize,
}

struct Fixture {
    _stack: LocalStack,
    runtime: tokio::runtime::Runtime,
    store: RedisFeatureStore,
    workload: Workload,
    /// The same workload with `include-features = true` (decisions carry the model inputs).
    with_features: Workload,
    scorer: OnnxScorer,
    messages: Vec<RawMessage>,
}

impl Fixture {
    fn start() -> Fixture {
        let stack = LocalStack::redis_only().expect("redis-server starts");
        // One thread: the Redis connection's task runs here, so its allocations are counted.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let world = World::generate(2026, 2_000, 200);
        let mut config = Config::parse(EXAMPLE_CONFIG, &example_config_dir()).expect("config");
        config.redis.url = stack.redis_url.clone();
        config.redis.response_timeout = Duration::from_secs(5);
        let wc = config
            .workloads
            .iter()
            .find(|w| w.name == "fraud")
            .expect("the example config has the fraud workload")
            .clone();
        runtime::environment(config.onnxruntime_library.as_deref()).expect("ONNX Runtime");
        let model = LoadedModel::load(&wc.model).expect("model");
        let scorer = OnnxScorer::new(&model, &wc.scorer).expect("scorer");
        let (store, workload, with_features) = runtime.block_on(async {
            world
                .load_into_redis(&stack.redis_url)
                .await
                .expect("features loaded");
            let store = RedisFeatureStore::connect(&config.redis).expect("client");
            let workload = Workload::build(&wc, &model).await.expect("workload");
            let mut wc = wc.clone();
            wc.include_features = true;
            let with_features = Workload::build(&wc, &model).await.expect("workload");
            (store, workload, with_features)
        });
        let mut stream = world.transactions(7, "allocations", 0.02);
        let start_ms = verdict::workload::now_ms();
        let messages = (0..LARGE)
            .map(|i| {
                let t = stream.next_at(start_ms + i as i64 * 3);
                RawMessage {
                    topic: "transactions".into(),
                    partition: 0,
                    offset: i as i64,
                    timestamp_ms: Some(start_ms),
                    key: Some(t.card_id.clone().into_bytes().into()),
                    payload: Some(serde_json::to_vec(&t).expect("serializable").into()),
                    headers: Vec::new(),
                }
            })
            .collect();
        Fixture {
            _stack: stack,
            runtime,
            store,
            workload,
            with_features,
            scorer,
            messages,
        }
    }

    /// Runs the first `rows` messages through every stage, counting each stage's allocations.
    fn run(&mut self, rows: usize) -> StageAllocations {
        let w = &self.workload;
        let messages = self.messages[..rows].to_vec();
        let mut decoder = w.decoder().expect("decoder");
        let payloads: Vec<Option<&[u8]>> = messages.iter().map(|m| m.payload.as_deref()).collect();
        let (decode, decoded) = counted(|| decoder.decode(&payloads).expect("decoded"));
        assert_eq!(decoded.batch.num_rows(), rows, "every message decodes");
        let input = decoded.batch.clone();
        let (lookup, tables) = counted(|| {
            self.runtime
                .block_on(
                    w.features()
                        .lookups
                        .fetch(&self.store as &dyn FeatureStore, &input),
                )
                .expect("lookups")
        });
        let (tables, _) = tables;
        let mut all = vec![input];
        all.extend(tables);
        let (join, joined) = counted(|| {
            self.runtime
                .block_on(w.features().join.run(&all))
                .expect("join")
        });
        assert_eq!(joined.num_rows(), rows);
        drop((all, joined));
        // The same batch again through enrich (its own lookup and join), for `score`.
        let batch = InputBatch::unconsumed(decoded, messages);
        let enriched = self
            .runtime
            .block_on(w.enrich(&self.store as &dyn FeatureStore, batch));
        assert!(enriched.degraded.is_none(), "{:?}", enriched.degraded);
        let (score, scored) = counted(|| w.score(&mut self.scorer, enriched));
        assert!(scored.scored.is_ok(), "scored");
        let (decide, decided) = counted(|| w.decide(&scored).expect("decided"));
        assert_eq!(decided.decisions, rows, "one decision per transaction");
        let with_reasons = decided.outcomes[1] + decided.outcomes[2];
        let (decide_with_features, decided) = counted(|| {
            self.with_features
                .decide(&scored)
                .expect("decided with features")
        });
        assert_eq!(decided.decisions, rows);
        // Dropping is part of the cost too, but frees allocate nothing.
        drop((scored, decided));
        StageAllocations {
            decode,
            lookup,
            join,
            score,
            decide,
            decide_with_features,
            with_reasons,
        }
    }
}

/// The most allocations per row a stage may make. Growing buffers stay far below it (0.00–0.03
/// here); the decision step's 0.09 is its builders growing plus the rows with reason codes (a
/// review or decline lists the features behind it: 8 of the 512 rows). One allocation per row
/// in any stage is 1.
const MAX_PER_ROW: f64 = 0.25;

/// Allocations per extra row between the small and the large batch.
fn per_row(small: u64, large: u64) -> f64 {
    (large as f64 - small as f64) / (LARGE - SMALL) as f64
}

#[test]
fn no_stage_allocates_per_row() {
    let mut fixture = Fixture::start();
    // Warm up: plans, caches, the connection, ONNX Runtime's first run.
    fixture.run(LARGE);
    fixture.run(SMALL);
    let small = fixture.run(SMALL);
    let large = fixture.run(LARGE);
    let stages = [
        ("decode", small.decode, large.decode),
        ("lookup", small.lookup, large.lookup),
        ("join", small.join, large.join),
        ("score", small.score, large.score),
        ("decide", small.decide, large.decide),
        (
            "decide, include-features",
            small.decide_with_features,
            large.decide_with_features,
        ),
    ];
    println!(
        "reviews and declines: {} of {SMALL} rows, {} of {LARGE}",
        small.with_reasons, large.with_reasons
    );
    let mut per_row_stages = Vec::new();
    for (stage, s, l) in stages {
        println!(
            "{stage:>24}: {s:>6} allocations at {SMALL} rows, {l:>6} at {LARGE}: {:.3} per row",
            per_row(s, l)
        );
        if per_row(s, l) >= MAX_PER_ROW {
            per_row_stages.push(stage);
        }
    }
    assert!(
        per_row_stages.is_empty(),
        "these stages allocate per row (≥ {MAX_PER_ROW} per row): {per_row_stages:?}"
    );
}

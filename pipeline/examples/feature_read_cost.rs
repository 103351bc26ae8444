//! What one batch's hash reads cost verdict and Redis, in CPU, for four read paths measured
//! in the same run:
//! - **HMGET → String per value**: one `HMGET` per key in one pipeline through the redis
//!   crate, every value converted to a `String` (what `RedisFeatureStore` did first, and what
//!   the Python baseline does);
//! - **HMGET → one buffer**: the same pipeline through the redis crate, every reply value
//!   copied into one buffer per batch ([`HashValues`]; what `RedisFeatureStore` did next);
//! - **own RESP reader** ([`RedisFeatureStore`] now): the same commands on verdict's own
//!   connection, encoded straight into one write buffer, replies parsed in place into the
//!   batch's buffer ([`verdict_features::resp`]);
//! - **packed Lua read** (tried, not taken): the `HMGET`s run inside Redis by a Lua script that
//!   packs every value into a single reply string, so the client parses one bulk string per
//!   lookup instead of one per value. It cuts verdict's share and moves more than that onto
//!   single-threaded Redis, and the round trip gets slower; this example shows by how much.
//!
//! `cargo run --release --example feature_read_cost`
//!
//! Starts its own `redis-server` on a free port, loads the fraud world's card and merchant
//! hashes, then runs the example fraud workload's lookups (card + merchant hashes; no
//! velocity, which all paths would send alike) for real decoded batches, one batch at a time,
//! as the pipeline's lookup stage does, alternating the paths in rounds. All of them must build
//! the same tables. For each batch size and path it prints, per batch:
//! - wall time (median, p90);
//! - this process's CPU (user + system from `/proc/self/stat`, over all iterations), which is
//!   the client's cost: building the commands, parsing the replies, building the tables;
//! - `redis-server`'s CPU over the same iterations (from `/proc/<pid>/stat`).
//!
//! CPU figures are averages over the iterations; /proc counts in 10 ms ticks, so the runs are
//! long enough for that to be under 1%.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use redis::aio::MultiplexedConnection;
use verdict::bench::cpu_seconds_of;
use verdict::config::{example_config_dir, Config, EXAMPLE_CONFIG};
use verdict::generator::{load_hashes_into_redis, World};
use verdict::local_stack::LocalStack;
use verdict::source::JsonBatchDecoder;
use verdict_features::velocity::VelocityUpdate;
use verdict_features::{
    FeatureStore, HashRead, HashValues, Lookups, RedisConfig, RedisFeatureStore, StoreAnswer,
};
use verdict_schemas::{arrow_schema_from_json_schema, builtin_input_schema};

/// Rows decoded per size; the lookups run over them round-robin.
const DISTINCT_BATCHES: usize = 32;
/// Each store runs this many rounds per size, alternating, so drift on a shared box hits both.
const ROUNDS: usize = 3;

/// The read path before [`HashValues`]: one `HMGET` per key in one pipeline, every value a
/// reply object converted to a `String`.
struct PipelinedHmget {
    connection: MultiplexedConnection,
}

#[async_trait]
impl FeatureStore for PipelinedHmget {
    async fn fetch(
        &self,
        reads: &[HashRead<'_>],
        _: &[VelocityUpdate<'_>],
    ) -> verdict_features::Result<StoreAnswer> {
        let mut pipe = redis::pipe();
        for read in reads {
            pipe.cmd("HMGET").arg(read.key).arg(read.fields);
        }
        let mut connection = self.connection.clone();
        let replies: Vec<Vec<Option<String>>> = pipe.query_async(&mut connection).await?;
        let mut hashes = HashValues::default();
        for reply in &replies {
            hashes.push_read(reply.iter().map(|v| v.as_deref().map(str::as_bytes)));
        }
        Ok(StoreAnswer {
            hashes,
            velocity: Vec::new(),
        })
    }
}

/// The read path before verdict's own RESP reader: the redis crate's pipeline and reply
/// objects, each value copied into the batch's [`HashValues`].
struct CrateHmgetBuffer {
    connection: MultiplexedConnection,
}

#[async_trait]
impl FeatureStore for CrateHmgetBuffer {
    async fn fetch(
        &self,
        reads: &[HashRead<'_>],
        _: &[VelocityUpdate<'_>],
    ) -> verdict_features::Result<StoreAnswer> {
        use redis::Value;
        let mut pipe = redis::pipe();
        for read in reads {
            pipe.cmd("HMGET").arg(read.key).arg(read.fields);
        }
        let mut connection = self.connection.clone();
        let replies: Vec<Value> = pipe.query_async(&mut connection).await?;
        let values = reads.iter().map(|r| r.fields.len()).sum();
        let mut hashes = HashValues::with_capacity(reads.len(), values, values * 8);
        for reply in &replies {
            let Value::Array(items) = reply else {
                return Err(verdict_features::FeatureError::Output(format!(
                    "HMGET answered {reply:?}"
                )));
            };
            hashes.push_read(items.iter().map(|item| match item {
                Value::BulkString(bytes) => Some(bytes.as_slice()),
                _ => None,
            }));
        }
        Ok(StoreAnswer {
            hashes,
            velocity: Vec::new(),
        })
    }
}

/// `EVAL HASH_READ_LUA <number of keys> <key>… <field>…`: `HMGET <key> <field>…` for every
/// key, packed into one string: per key and field in order, `-` for a missing value, else its
/// length in bytes, `:` and its bytes (lengths make any byte a valid value: nothing needs
/// escaping).
const HASH_READ_LUA: &str = r#"
local out, n = {}, 0
for i = 1, #KEYS do
  local values = redis.call('HMGET', KEYS[i], unpack(ARGV))
  for j = 1, #ARGV do
    local v = values[j]
    if v then
      out[n + 1], out[n + 2], out[n + 3] = #v, ':', v
      n = n + 3
    else
      out[n + 1] = '-'
      n = n + 1
    end
  end
end
return table.concat(out)
"#;

/// Appends the `keys` × `fields` values of one [`HASH_READ_LUA`] reply to `into`.
fn decode_hash_reply(
    reply: &[u8],
    keys: usize,
    fields: usize,
    into: &mut HashValues,
) -> verdict_features::Result<()> {
    let malformed = |at: usize, what: &str| {
        verdict_features::FeatureError::Output(format!(
            "hash read reply ({} bytes for {keys} keys × {fields} fields): {what} at byte {at}",
            reply.len()
        ))
    };
    let mut at = 0;
    for _ in 0..keys {
        for _ in 0..fields {
            match reply.get(at) {
                None => return Err(malformed(at, "ends early")),
                Some(b'-') => {
                    into.push_value(None);
                    at += 1;
                }
                Some(_) => {
                    let colon = reply[at..]
                        .iter()
                        .position(|&b| b == b':')
                        .ok_or_else(|| malformed(at, "no `:` after a length"))?;
                    let length: usize = std::str::from_utf8(&reply[at..at + colon])
                        .ok()
                        .and_then(|digits| digits.parse().ok())
                        .ok_or_else(|| malformed(at, "a length that is not a number"))?;
                    let start = at + colon + 1;
                    let value = reply
                        .get(start..start + length)
                        .ok_or_else(|| malformed(start, "a value longer than the reply"))?;
                    into.push_value(Some(value));
                    at = start + length;
                }
            }
        }
        into.finish_read();
    }
    if at != reply.len() {
        return Err(malformed(at, "bytes left over"));
    }
    Ok(())
}

/// The alternative: one packed Lua read per lookup (per run of reads wanting the same fields).
struct PackedLuaRead {
    connection: MultiplexedConnection,
}

#[async_trait]
impl FeatureStore for PackedLuaRead {
    async fn fetch(
        &self,
        reads: &[HashRead<'_>],
        _: &[VelocityUpdate<'_>],
    ) -> verdict_features::Result<StoreAnswer> {
        let groups: Vec<&[HashRead<'_>]> = reads.chunk_by(|a, b| a.fields == b.fields).collect();
        let mut pipe = redis::pipe();
        for group in &groups {
            let cmd = pipe.cmd("EVAL").arg(HASH_READ_LUA).arg(group.len());
            for read in *group {
                cmd.arg(read.key);
            }
            cmd.arg(group[0].fields);
        }
        let mut connection = self.connection.clone();
        let replies: Vec<Vec<u8>> = pipe.query_async(&mut connection).await?;
        let mut hashes = HashValues::default();
        for (group, reply) in groups.iter().zip(&replies) {
            decode_hash_reply(reply, group.len(), group[0].fields.len(), &mut hashes)?;
        }
        Ok(StoreAnswer {
            hashes,
            velocity: Vec::new(),
        })
    }
}

/// Wall times and the two processes' CPU seconds over some iterations.
#[derive(Default)]
struct Measured {
    walls: Vec<Duration>,
    own_cpu_s: f64,
    redis_cpu_s: f64,
}

fn quantile(samples: &mut [Duration], q: f64) -> f64 {
    samples.sort();
    samples[((samples.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e6
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse(EXAMPLE_CONFIG, &example_config_dir())?;
    let workload = &config.workloads[0];
    let schema = arrow_schema_from_json_schema(
        &workload.input_schema,
        builtin_input_schema(&workload.input_schema)?,
    )?;

    let stack = LocalStack::redis_only()?;
    // The bench's world: 20,000 cards, 500 merchants.
    let world = World::generate(1, 20_000, 500);
    load_hashes_into_redis(&stack.redis_url, &world.feature_hashes()).await?;
    let client = redis::Client::open(stack.redis_url.as_str())?;
    let mut admin = client.get_multiplexed_async_connection().await?;
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut admin)
        .await?;
    let redis_pid: u32 = info
        .lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .and_then(|p| p.trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no process_id in INFO"))?;
    let redis_stat = format!("/proc/{redis_pid}/stat");

    let current = RedisFeatureStore::connect(&RedisConfig {
        url: stack.redis_url.clone(),
        response_timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(2),
    })?;
    let hmget = PipelinedHmget {
        connection: client.get_multiplexed_async_connection().await?,
    };
    let crate_buffer = CrateHmgetBuffer {
        connection: client.get_multiplexed_async_connection().await?,
    };
    let packed = PackedLuaRead {
        connection: client.get_multiplexed_async_connection().await?,
    };
    let stores: [(&str, &dyn FeatureStore); 4] = [
        ("HMGET → Strings", &hmget),
        ("HMGET → buffer", &crate_buffer),
        ("own RESP reader", &current),
        ("packed Lua read", &packed),
    ];
    let lookups = Lookups::new(workload.lookups.clone(), Vec::new())?;

    println!("rows | read path        | wall p50 / p90    | verdict CPU per batch (per row) | redis-server CPU per batch (per row)");
    for (rows, iterations) in [(1usize, 6_000usize), (16, 3_000), (144, 1_200), (512, 400)] {
        let mut decoder = JsonBatchDecoder::new(schema.clone(), rows)?;
        let mut stream = world.transactions(rows as u64, "reads", 0.03);
        let mut batches = Vec::with_capacity(DISTINCT_BATCHES);
        for b in 0..DISTINCT_BATCHES {
            let base = 1_700_000_000_000 + (b * rows) as i64;
            let payloads: Vec<Vec<u8>> = (0..rows)
                .map(|i| serde_json::to_vec(&stream.next_at(base + i as i64)))
                .collect::<Result<_, _>>()?;
            let refs: Vec<Option<&[u8]>> = payloads.iter().map(|p| Some(p.as_slice())).collect();
            batches.push(decoder.decode(&refs)?.batch);
        }
        // Every path must build the same tables; this also warms connections and the script
        // cache.
        for batch in &batches {
            let (expected, _) = lookups.fetch(stores[0].1, batch).await?;
            for (name, store) in &stores[1..] {
                let (tables, _) = lookups.fetch(*store, batch).await?;
                anyhow::ensure!(tables == expected, "{name} disagrees with {}", stores[0].0);
            }
        }

        let mut measured: [Measured; 4] = Default::default();
        for _ in 0..ROUNDS {
            for ((_, store), m) in stores.iter().zip(measured.iter_mut()) {
                let own_before = cpu_seconds_of("/proc/self/stat").unwrap_or(0.0);
                let redis_before = cpu_seconds_of(&redis_stat).unwrap_or(0.0);
                for i in 0..iterations {
                    let batch = &batches[i % batches.len()];
                    let started = Instant::now();
                    let (tables, _) = lookups.fetch(*store, batch).await?;
                    m.walls.push(started.elapsed());
                    anyhow::ensure!(tables.iter().all(|t| t.num_rows() == rows));
                }
                m.own_cpu_s += cpu_seconds_of("/proc/self/stat").unwrap_or(0.0) - own_before;
                m.redis_cpu_s += cpu_seconds_of(&redis_stat).unwrap_or(0.0) - redis_before;
            }
        }
        for ((name, _), m) in stores.iter().zip(measured.iter_mut()) {
            let per_batch = |seconds: f64| seconds * 1e6 / (iterations * ROUNDS) as f64;
            println!(
                "{rows:>4} | {name:<16} | {:>6.0} / {:>6.0} µs | {:>9.1} µs ({:>5.2} µs)        | {:>9.1} µs ({:>5.2} µs)",
                quantile(&mut m.walls, 0.5),
                quantile(&mut m.walls, 0.9),
                per_batch(m.own_cpu_s),
                per_batch(m.own_cpu_s) / rows as f64,
                per_batch(m.redis_cpu_s),
                per_batch(m.redis_cpu_s) / rows as f64,
            );
        }
    }
    Ok(())
}
